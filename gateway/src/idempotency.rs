//! Idempotency-Key semantics of API.md, around a route's work.
//!
//! Same key and same request: the first response is replayed with `Idempotent-Replayed: true`.
//! Same key, other request: 422 `idempotency_key_reused`. Same key while the first request
//! runs: 409 `idempotency_key_in_use`. A request that appends records its response in the
//! append's transaction; one that appends nothing records it right after; a server error
//! gives the key back so the client's retry runs again.

use std::future::Future;

use axum::response::{IntoResponse, Response};
use commands::idempotency::{
    Begin, ClaimOptions, IdempotencyClaim, IdempotencyKey, StoredResponse,
};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::reply::{replay, Reply};
use crate::state::AppState;

/// What a route's work produced.
pub struct Done {
    /// The answer.
    pub reply: Reply,
    /// Whether the answer was already recorded with an append.
    pub recorded: bool,
}

/// Runs `work` under the request's Idempotency-Key, if it has one. `restore` fills in what a
/// stored response deliberately leaves out (a customer token) before it is replayed.
pub async fn idempotent<F, Fut>(
    state: &AppState,
    caller: &Caller,
    key: Option<String>,
    route: &str,
    body: &[u8],
    restore: fn(&AppState, StoredResponse) -> StoredResponse,
    work: F,
) -> Response
where
    F: FnOnce(Option<IdempotencyClaim>) -> Fut,
    Fut: Future<Output = Result<Done, ApiError>>,
{
    let Some(key) = key else {
        return match work(None).await {
            Ok(done) => done.reply.into_response(),
            Err(error) => error.into_response(),
        };
    };
    let key = IdempotencyKey {
        scope: caller.scope(),
        key,
    };
    let log = state.handler.log();
    let claim = match log
        .begin_idempotent(&key, &request_sha256(route, body), ClaimOptions::default())
        .await
    {
        Ok(Begin::Claimed(claim)) => claim,
        Ok(Begin::Completed(stored)) => return replay(restore(state, stored)),
        Ok(Begin::InFlight) => {
            return ApiError::Conflict {
                code: "idempotency_key_in_use",
                detail: "a request with this Idempotency-Key is still in progress".into(),
            }
            .into_response()
        }
        Ok(Begin::Mismatch) => {
            return ApiError::Unprocessable {
                code: "idempotency_key_reused",
                detail: "this Idempotency-Key was used with a different request".into(),
            }
            .into_response()
        }
        Err(error) => return ApiError::from(error).into_response(),
    };
    let outcome = work(Some(claim.clone())).await;
    let (reply, recorded) = match outcome {
        Ok(done) => (done.reply, done.recorded),
        Err(error) if error.status().is_server_error() => {
            if let Err(abandon) = log.abandon_idempotent(&claim).await {
                tracing::warn!(error = %abandon, "idempotency key not released");
            }
            return error.into_response();
        }
        Err(error) => (error.to_reply(), false),
    };
    if !recorded {
        if let Err(error) = log.complete_idempotent(&claim, &reply.to_stored()).await {
            tracing::warn!(%error, "idempotent response not recorded");
        }
    }
    reply.into_response()
}

/// Identifies "the same request": the route and the body, with JSON bodies compared by value
/// (key order and white space do not make a request different).
pub fn request_sha256(route: &str, body: &[u8]) -> String {
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .map(|v| serde_json::to_vec(&v).expect("values serialize"));
    let mut hasher = Sha256::new();
    hasher.update(route.as_bytes());
    hasher.update(b"\n");
    hasher.update(canonical.as_deref().unwrap_or(body));
    hex::encode(hasher.finalize())
}

/// Replays a stored response as it is.
pub fn as_stored(_state: &AppState, stored: StoredResponse) -> StoredResponse {
    stored
}
