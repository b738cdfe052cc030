//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

/// Longest a readiness probe waits for a dependency.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Liveness: the process answers. Checks nothing else, so it stays cheap.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
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

/// Readiness: every dependency answers (the event log, and the bus it is mirrored to). 503
/// when one does not. The relay's role (`leader` or `standby`) and position are reported, not
/// judged: one instance leads, the others stand by.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (log, bus) = tokio::join!(
        probe("event log", state.handler.log().ping()),
        probe("bus", state.bus.ping()),
    );
    let relay = *state.relay.borrow();
    let ready = log == "up" && bus == "up";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "checks": { "event_log": log, "bus": bus },
            "relay": {
                "role": if relay.leader { "leader" } else { "standby" },
                "global_position": relay.position.global_position,
                "published": relay.published,
            },
        })),
    )
}
