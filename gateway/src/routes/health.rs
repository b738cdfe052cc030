//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::roles::Role;
use crate::state::AppState;

/// Longest a readiness probe waits for a dependency.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Liveness: the process answers. Checks nothing else, so it stays cheap.
#[utoipa::path(
    get,
    path = "/healthz",
    operation_id = "healthz",
    tag = "operations",
    responses((status = 200, description = "`{\"status\": \"ok\"}`: the process answers", body = Object))
)]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// What this process's relay does: `leader` (it publishes the log), `standby` (another
/// process leads) or `not_run` (this process does not run the relay role).
pub fn relay_role(state: &AppState) -> &'static str {
    match (state.roles.runs(Role::Relay), state.relay.borrow().leader) {
        (false, _) => "not_run",
        (true, true) => "leader",
        (true, false) => "standby",
    }
}

/// "up" when `probe` succeeds within [`PROBE_TIMEOUT`], "down" otherwise.
async fn probe<E: std::fmt::Display>(
    what: &str,
    probe: impl std::future::Future<Output = Result<(), E>>,
) -> &'static str {
    match tokio::time::timeout(PROBE_TIMEOUT, probe).await {
        Ok(Ok(())) => "up",
        Ok(Err(error)) => {
            tracing::warn!(%error, "{what} not ready");
            "down"
        }
        Err(_) => {
            tracing::warn!("{what} did not answer within {PROBE_TIMEOUT:?}");
            "down"
        }
    }
}

/// Readiness: every dependency answers (the event log, the bus it is mirrored to, the read
/// models' store), and every read model has a live version. 503 when one does not. The
/// relay's role (`leader` or `standby`) and position, and each read model's lag, are reported,
/// not judged: one instance leads, the others stand by, and lag comes and goes with load.
#[utoipa::path(
    get,
    path = "/readyz",
    operation_id = "readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready: `checks` has every dependency `up`, and every read model is `live`", body = Object),
        (status = 503, description = "Not ready: a dependency is `down`, or a read model is `missing`", body = Object),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (log, bus, read_models) = tokio::join!(
        probe("event log", state.handler.log().ping()),
        probe("bus", state.bus.ping()),
        probe("read models", state.read_model.ping()),
    );
    let mut projections = serde_json::Map::new();
    let mut all_live = true;
    if read_models == "up" {
        let versions = tokio::time::timeout(PROBE_TIMEOUT, state.read_model.versions()).await;
        let versions = versions.ok().and_then(Result::ok).unwrap_or_default();
        for name in projections::ProjectionName::ALL {
            let live = versions
                .iter()
                .find(|v| v.name == name && v.status == projections::VersionStatus::Live);
            let lag = match (live, log) {
                (Some(v), "up") => {
                    let count = state
                        .handler
                        .log()
                        .count_after(v.position, name.categories());
                    tokio::time::timeout(PROBE_TIMEOUT, count)
                        .await
                        .ok()
                        .and_then(Result::ok)
                }
                _ => None,
            };
            all_live &= live.is_some();
            projections.insert(
                name.as_str().into(),
                json!({
                    "status": if live.is_some() { "live" } else { "missing" },
                    "version": live.map(|v| v.version),
                    "position": live.map(|v| v.position),
                    "lag": lag,
                }),
            );
        }
    }
    let relay = *state.relay.borrow();
    let ready = log == "up" && bus == "up" && read_models == "up" && all_live;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": { "event_log": log, "bus": bus, "read_models": read_models },
            "roles": state.roles.names(),
            "relay": {
                "role": relay_role(&state),
                "global_position": relay.position.global_position,
                "published": relay.published,
            },
            "projections": projections,
        })),
    )
}
