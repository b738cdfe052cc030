//! Idempotency-Key semantics of API.md, around a route's work, owned here and nowhere else.
//!
//! Same key and same request: the first response is replayed with `Idempotent-Replayed: true`.
//! Same key, other request: 422 `idempotency_key_reused`. Same key while the first request
//! runs on this instance: 409 `idempotency_key_in_use`.
//!
//! Nothing is claimed before the work runs. A route's work has no effect before its append,
//! and the append records the response under the key in the same transaction
//! ([`AppState::execute`] does it when handed the request's [`KeyContext`]). A request that
//! appended nothing records its answer alone afterwards. Whoever records first wins: a request
//! that finds the key recorded (a retry, or the same request racing on another instance)
//! answers with the recorded response instead of its own, and its own events were not stored.
//! A server error records nothing, so the client's retry runs again; so does a request that
//! died half-way. A reply made after the append (an order after `Prefer: wait`) replaces the
//! recorded one, so a replay is always the answer the client got.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use axum::response::{IntoResponse, Response};
use commands::idempotency::{
    Answer, IdempotencyKey, IdempotencyRecord, KeepIn, Keeping, Prior, Recorded, StoredResponse,
};
use commands::{AppendRequest, LogError};
use schemas::Envelope;
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::reply::{replay, Reply};
use crate::state::AppState;

/// The Idempotency-Key a request runs under, handed to [`AppState::execute`] so the append
/// records the response with the events.
#[derive(Clone)]
pub struct KeyContext(Arc<KeyState>);

struct KeyState {
    key: IdempotencyKey,
    request_sha256: String,
    replays: Replays,
    outcome: Mutex<KeyOutcome>,
}

/// How a route's recorded answers are replayed.
#[derive(Clone, Copy)]
pub struct Replays {
    /// Fills in what a stored response deliberately leaves out (a customer token).
    restore: fn(&AppState, StoredResponse) -> StoredResponse,
    /// Makes the answer again from the events the request started its stream with. A route
    /// that can lets the log keep its keys in those events instead of a record of their own
    /// (`commands::idempotency::Keeping::InFirstEvent`).
    from_events: Option<RenderEvents>,
}

/// Makes a route's answer from the events a request started its stream with; `None` for
/// events it cannot render.
pub type RenderEvents = fn(&[Envelope]) -> Option<Reply>;

impl Replays {
    /// Replays the stored response as it is.
    pub const AS_STORED: Replays = Replays {
        restore: as_stored,
        from_events: None,
    };

    /// Replays the stored response after `restore` filled it in.
    pub const fn restoring(restore: fn(&AppState, StoredResponse) -> StoredResponse) -> Replays {
        Replays {
            restore,
            from_events: None,
        }
    }

    /// Makes the answer of a request that started a stream again from its events with
    /// `render` (`None` for events it cannot render); other answers are stored.
    pub const fn from_events(render: RenderEvents) -> Replays {
        Replays {
            restore: as_stored,
            from_events: Some(render),
        }
    }
}

/// What became of the key while the work ran.
#[derive(Clone)]
enum KeyOutcome {
    /// Nothing recorded yet.
    Open,
    /// An append recorded the response with its events.
    Recorded,
    /// Another request (or this one's first try) recorded the key first.
    Taken(Box<Recorded>),
}

impl KeyContext {
    /// The key.
    pub fn key(&self) -> &IdempotencyKey {
        &self.0.key
    }

    /// The SHA-256 of the request, in hex.
    pub fn request_sha256(&self) -> &str {
        &self.0.request_sha256
    }

    /// Where the log may keep the key's record.
    pub fn keep_in(&self) -> KeepIn {
        match self.0.replays.from_events {
            Some(_) => KeepIn::FirstEvent,
            None => KeepIn::Apart,
        }
    }

    fn set(&self, outcome: KeyOutcome) {
        *self.0.outcome.lock().unwrap_or_else(|p| p.into_inner()) = outcome;
    }

    fn outcome(&self) -> KeyOutcome {
        self.0
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Notes what an append that carried the key did with it.
    pub fn appended<T>(&self, outcome: &Result<T, commands::CommandError>, replayed: bool) {
        match outcome {
            Ok(_) if !replayed => self.set(KeyOutcome::Recorded),
            Err(commands::CommandError::Log(LogError::KeyTaken(record))) => {
                self.set(KeyOutcome::Taken(record.clone()));
            }
            _ => {}
        }
    }
}

/// Keys of requests running on this instance, so a second request with a key in flight gets
/// 409 at once instead of doing the work twice.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<IdempotencyKey>>);

impl InFlight {
    fn enter(&self, key: &IdempotencyKey) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
    }

    fn leave(&self, key: &IdempotencyKey) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Leaves the in-flight set however the request ends (a dropped connection cancels it).
struct Entered<'a> {
    in_flight: &'a InFlight,
    key: &'a IdempotencyKey,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.in_flight.leave(self.key);
    }
}

/// Runs `work` under the request's Idempotency-Key, if it has one; a recorded answer is
/// replayed as `replays` says.
pub async fn idempotent<F, Fut>(
    state: &AppState,
    caller: &Caller,
    key: Option<String>,
    route: &str,
    body: &[u8],
    replays: Replays,
    work: F,
) -> Response
where
    F: FnOnce(Option<KeyContext>) -> Fut,
    Fut: Future<Output = Result<Reply, ApiError>>,
{
    let Some(key) = key else {
        return match work(None).await {
            Ok(reply) => reply.into_response(),
            Err(error) => error.into_response(),
        };
    };
    let context = KeyContext(Arc::new(KeyState {
        key: IdempotencyKey {
            scope: caller.scope(),
            key,
        },
        request_sha256: request_sha256(route, body),
        replays,
        outcome: Mutex::new(KeyOutcome::Open),
    }));
    let key = context.key().clone();
    if !state.in_flight.enter(&key) {
        return in_use().into_response();
    }
    let _entered = Entered {
        in_flight: &state.in_flight,
        key: &key,
    };
    let outcome = work(Some(context.clone())).await;
    let reply = match (context.outcome(), outcome) {
        (KeyOutcome::Taken(record), _) => return answer(state, &context, &record),
        (KeyOutcome::Recorded, Ok(reply)) if reply.supersedes_recorded => {
            let record = IdempotencyRecord {
                key: key.clone(),
                request_sha256: context.request_sha256().to_owned(),
                keeping: Keeping::Apart(reply.to_stored()),
            };
            if let Err(error) = state.handler.log().amend_idempotent(record).await {
                // A replay then answers with the reply the append recorded, which was true
                // when it was made.
                tracing::warn!(%error, "superseding idempotent response not recorded");
            }
            return reply.into_response();
        }
        (KeyOutcome::Recorded, Ok(reply)) => return reply.into_response(),
        (_, Err(error)) if error.status().is_server_error() => return error.into_response(),
        (_, Ok(reply)) => reply,
        (_, Err(error)) => error.to_reply(),
    };
    // Nothing was appended (a refusal, a no-op): record the answer alone.
    let record = IdempotencyRecord {
        key: key.clone(),
        request_sha256: context.request_sha256().to_owned(),
        keeping: Keeping::Apart(reply.to_stored()),
    };
    let recorded = state
        .handler
        .log()
        .append(AppendRequest {
            streams: Vec::new(),
            idempotency: Some(record),
        })
        .await;
    match recorded {
        Ok(_) => reply.into_response(),
        Err(LogError::KeyTaken(record)) => answer(state, &context, &record),
        Err(error) => {
            // The answer stands; a retry runs the request again and may answer the same.
            tracing::warn!(%error, "idempotent response not recorded");
            reply.into_response()
        }
    }
}

/// The answer to a request whose key was recorded first by another request.
fn answer(state: &AppState, context: &KeyContext, record: &Recorded) -> Response {
    let replays = context.0.replays;
    match record.answer_to(context.request_sha256()) {
        Prior::Same(Answer::Response(stored)) => replay((replays.restore)(state, stored)),
        Prior::Same(Answer::Appended(events)) => {
            match replays.from_events.and_then(|render| render(&events)) {
                Some(reply) => replay((replays.restore)(state, reply.to_stored())),
                None => ApiError::Internal(format!(
                    "the answer recorded in event {} cannot be made again",
                    events
                        .first()
                        .map_or_else(String::new, |e| e.event_id.to_string())
                ))
                .into_response(),
            }
        }
        Prior::Different => ApiError::Unprocessable {
            code: "idempotency_key_reused",
            detail: "this Idempotency-Key was used with a different request".into(),
        }
        .into_response(),
    }
}

/// The first request holds no lease that could outlive it: it ends with its own request (a
/// dropped connection cancels it), usually within milliseconds, so a retry a second later
/// finds its answer recorded, or nothing, and runs.
fn in_use() -> ApiError {
    ApiError::KeyInUse { retry_after_s: 1 }
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
