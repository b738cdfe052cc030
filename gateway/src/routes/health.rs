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

/// Readiness: every dependency answers. 503 when one does not.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let log = match tokio::time::timeout(PROBE_TIMEOUT, state.handler.log().ping()).await {
        Ok(Ok(())) => "up",
        Ok(Err(error)) => {
            tracing::warn!(%error, "event log not ready");
            "down"
        }
        Err(_) => "down",
    };
    let ready = log == "up";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({ "status": if ready { "ready" } else { "not_ready" }, "checks": { "event_log": log } }),
        ),
    )
}
