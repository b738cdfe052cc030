//! Operator endpoints for dead letters: what the consumers gave up on, listed, read, handed
//! back to their consumer (replay) or thrown away (discard). They work the same on JetStream
//! and on the embedded bus, and `groupbuy dead-letters` calls them.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use commands::bus::{BusError, StoredLetter};
use commands::subscription::Handler;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::query;
use crate::routes::history::EventBody;
use crate::state::AppState;

/// Letters a page holds when the query does not say.
const PAGE_DEFAULT: usize = 50;
/// Most letters a page holds.
const PAGE_MAX: usize = 500;
/// Highest letter number taken: the largest integer JSON carries exactly.
const ID_MAX: u64 = (1 << 53) - 1;

/// The consumers a letter can be handed back to, by name.
#[derive(Clone, Default)]
pub struct Consumers(Vec<(String, Arc<dyn Handler>)>);

impl Consumers {
    /// `handlers`, each under its consumer's name.
    pub fn new(handlers: Vec<(String, Arc<dyn Handler>)>) -> Self {
        Consumers(handlers)
    }

    /// The handler of the consumer `name`. A consumer of one process's own (the embedded
    /// read models on a shared mirror) is named `<name>-<ulid>`: it is the consumer `name`.
    fn handler(&self, name: &str) -> Option<&Arc<dyn Handler>> {
        self.0.iter().find_map(|(consumer, handler)| {
            let own = name
                .strip_prefix(consumer.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'));
            own.then_some(handler)
        })
    }
}

/// One dead letter.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = DeadLetter)]
pub struct DeadLetterBody {
    /// Its number, increasing in the order letters were stored.
    pub id: u64,
    /// The consumer that gave up on it.
    pub consumer: String,
    /// The subject the message was delivered on.
    pub subject: String,
    /// Why the consumer gave up.
    pub reason: String,
    /// When the bus stored it (RFC 3339).
    pub stored_at: String,
    /// The events it carries, when its body can be read.
    pub events: Option<Vec<EventBody>>,
    /// Its body as text, when it cannot be read as events (a poison message).
    pub body: Option<String>,
}

impl From<StoredLetter> for DeadLetterBody {
    fn from(letter: StoredLetter) -> Self {
        let (events, body) = match letter.events() {
            Ok(events) => (
                Some(events.into_iter().map(EventBody::from).collect()),
                None,
            ),
            Err(_) => (
                None,
                Some(String::from_utf8_lossy(&letter.payload).into_owned()),
            ),
        };
        DeadLetterBody {
            id: letter.id,
            consumer: letter.consumer,
            subject: letter.subject,
            reason: letter.reason,
            stored_at: letter
                .stored_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            events,
            body,
        }
    }
}

/// A page of dead letters.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = DeadLetterPage)]
pub struct DeadLetterPageBody {
    /// The letters, oldest first.
    pub dead_letters: Vec<DeadLetterBody>,
    /// Pass as `after` for the next page; `null` on the last one.
    pub next_after: Option<u64>,
}

/// Which letters.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// Only letters numbered above this; from the first when not given.
    #[param(minimum = 0, maximum = 9_007_199_254_740_991_i64)]
    after: Option<u64>,
    /// Most letters to return, 1 to 500; 50 when not given.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<usize>,
}

/// The path of one letter.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path.
pub struct DeadLetterPath {
    /// The letter's number (`id`).
    id: u64,
}

/// What a replay did.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = DeadLetterReplayed)]
pub struct ReplayedBody {
    /// The letter, now removed.
    pub id: u64,
    /// The consumer that handled it.
    pub consumer: String,
    /// Events handled.
    pub events: usize,
}

/// `GET /v1/admin/dead-letters`: the dead letters of every consumer, oldest first, a page at a
/// time.
#[utoipa::path(
    get,
    path = "/v1/admin/dead-letters",
    operation_id = "list_dead_letters",
    tag = "operations",
    security(("bearer" = [])),
    params(DeadLetterQuery),
    responses(
        (status = 200, description = "A page of dead letters", body = DeadLetterPageBody),
        (status = 400, description = "An unknown query parameter or a value out of range (`invalid_query`)"),
        (status = 403, description = "Only the operator reads dead letters"),
        (status = 503, description = "The bus cannot be reached (`bus_unavailable`)"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<DeadLetterPageBody>, ApiError> {
    caller.require_operator()?;
    let q: DeadLetterQuery = query(raw.as_deref())?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(PAGE_DEFAULT);
    if after > ID_MAX || !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: format!("after is 0 to {ID_MAX}, and limit 1 to {PAGE_MAX}"),
        });
    }
    // One more than asked, to tell whether a next page exists.
    let mut letters = state
        .bus
        .dead_letters_after(after, limit + 1)
        .await
        .map_err(unavailable)?;
    let next_after = (letters.len() > limit).then(|| {
        letters.truncate(limit);
        letters.last().map_or(after, |l| l.id)
    });
    Ok(Json(DeadLetterPageBody {
        dead_letters: letters.into_iter().map(DeadLetterBody::from).collect(),
        next_after,
    }))
}

/// `GET /v1/admin/dead-letters/{id}`: one dead letter, with its events.
#[utoipa::path(
    get,
    path = "/v1/admin/dead-letters/{id}",
    operation_id = "get_dead_letter",
    tag = "operations",
    security(("bearer" = [])),
    params(DeadLetterPath),
    responses(
        (status = 200, description = "The dead letter", body = DeadLetterBody),
        (status = 403, description = "Only the operator reads dead letters"),
        (status = 404, description = "No such letter, or it was replayed or discarded (`dead_letter_not_found`)"),
        (status = 503, description = "The bus cannot be reached (`bus_unavailable`)"),
    )
)]
pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeadLetterBody>, ApiError> {
    caller.require_operator()?;
    Ok(Json(letter(&state, &id).await?.into()))
}

/// `POST /v1/admin/dead-letters/{id}/replay`: hands the letter's events to its consumer again,
/// as a delivery would, and removes the letter once they are handled. The consumer handles
/// them in this instance, on the deployment's shared log and read models, so any instance
/// can replay any consumer's letters. A letter that fails again stays, with the error.
#[utoipa::path(
    post,
    path = "/v1/admin/dead-letters/{id}/replay",
    operation_id = "replay_dead_letter",
    tag = "operations",
    security(("bearer" = [])),
    params(DeadLetterPath),
    responses(
        (status = 200, description = "Handled by its consumer, and removed", body = ReplayedBody),
        (status = 403, description = "Only the operator replays dead letters"),
        (status = 404, description = "No such letter (`dead_letter_not_found`)"),
        (status = 409, description = "No consumer of this deployment goes by the letter's consumer name (`unknown_consumer`)"),
        (status = 422, description = "Its body is not events (`unreadable_dead_letter`: discard it), or its consumer failed on it again (`replay_failed`); the letter stays"),
        (status = 503, description = "The bus cannot be reached (`bus_unavailable`)"),
    )
)]
pub async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ReplayedBody>, ApiError> {
    caller.require_operator()?;
    let letter = letter(&state, &id).await?;
    let handler = state
        .dead_letter_consumers
        .handler(&letter.consumer)
        .ok_or_else(|| ApiError::Conflict {
            code: "unknown_consumer",
            detail: format!(
                "no consumer of this deployment is named {:?}; discard the letter",
                letter.consumer
            ),
        })?;
    let events = letter.events().map_err(|why| ApiError::Unprocessable {
        code: "unreadable_dead_letter",
        detail: format!("the letter's body is not events ({why}); discard it"),
    })?;
    let handled = if handler.handles_batches() {
        handler
            .handle_batch(&events.iter().collect::<Vec<_>>())
            .await
    } else {
        let mut handled = Ok(());
        for event in &events {
            handled = handler.handle(event).await;
            if handled.is_err() {
                break;
            }
        }
        handled
    };
    handled.map_err(|error| ApiError::Unprocessable {
        code: "replay_failed",
        detail: format!("{} failed on it again: {error}", letter.consumer),
    })?;
    state
        .bus
        .discard_dead_letter(letter.id)
        .await
        .map_err(unavailable)?;
    tracing::info!(id = letter.id, consumer = %letter.consumer, events = events.len(), "replayed a dead letter");
    Ok(Json(ReplayedBody {
        id: letter.id,
        consumer: letter.consumer,
        events: events.len(),
    }))
}

/// `DELETE /v1/admin/dead-letters/{id}`: throws the letter away.
#[utoipa::path(
    delete,
    path = "/v1/admin/dead-letters/{id}",
    operation_id = "discard_dead_letter",
    tag = "operations",
    security(("bearer" = [])),
    params(DeadLetterPath),
    responses(
        (status = 204, description = "Discarded"),
        (status = 403, description = "Only the operator discards dead letters"),
        (status = 404, description = "No such letter (`dead_letter_not_found`)"),
        (status = 503, description = "The bus cannot be reached (`bus_unavailable`)"),
    )
)]
pub async fn discard(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_operator()?;
    let id = letter_id(&id)?;
    if state
        .bus
        .discard_dead_letter(id)
        .await
        .map_err(unavailable)?
    {
        tracing::info!(id, "discarded a dead letter");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

async fn letter(state: &AppState, id: &str) -> Result<StoredLetter, ApiError> {
    let id = letter_id(id)?;
    state
        .bus
        .dead_letter_at(id)
        .await
        .map_err(unavailable)?
        .ok_or_else(not_found)
}

/// A letter number from the path; anything else names no letter.
fn letter_id(id: &str) -> Result<u64, ApiError> {
    id.bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| id.parse::<u64>().ok())
        .flatten()
        .filter(|id| (1..=ID_MAX).contains(id))
        .ok_or_else(not_found)
}

fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "dead_letter_not_found",
        what: "dead letter",
    }
}

fn unavailable(error: BusError) -> ApiError {
    ApiError::Unavailable {
        code: "bus_unavailable",
        detail: error.to_string(),
        retry_after_s: 1,
    }
}
