//! `POST /v1/stores`: the operator opens a store.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use commands::stream_id;
use domain::store::{Store, StoreAggregate, StoreCommand};
use domain::StoreId;
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{IdempotencyKeyHeader, RawJson, TraceId};
use crate::idempotency::{as_stored, idempotent, Done};
use crate::reply::Reply;
use crate::state::{metadata, AppState};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateStore {
    name: String,
    region: String,
}

#[derive(Serialize)]
struct StoreBody<'a> {
    store_id: StoreId,
    name: &'a str,
    region: &'a str,
}

/// Opens a store. 201 with the store.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    TraceId(trace_id): TraceId,
    body: RawJson,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let meta = metadata(&caller, &trace_id, key.as_deref());
    let (state, body) = (&state, &body);
    Ok(idempotent(
        state,
        &caller,
        key,
        "POST /v1/stores",
        &body.0,
        as_stored,
        move |claim| async move {
            let request: CreateStore = body.parse()?;
            let store_id = StoreId::from_ulid(crate::ids::new_ulid());
            let command = StoreCommand::Create {
                store_id,
                name: request.name,
                region: request.region,
                now: chrono::Utc::now(),
            };
            let render = |store: &Option<Store>| {
                let store = store.as_ref().expect("created");
                Reply::json(
                    StatusCode::CREATED,
                    &StoreBody {
                        store_id: store.store_id,
                        name: &store.name,
                        region: &store.region,
                    },
                )
            };
            let stream = stream_id::<StoreAggregate>(store_id);
            let executed = state
                .execute::<StoreAggregate>(&stream, &command, meta, claim.as_ref(), &render)
                .await?;
            Ok(Done {
                reply: render(&executed.state),
                recorded: claim.is_some(),
            })
        },
    )
    .await)
}
