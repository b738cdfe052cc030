//! `POST /v1/stores`: the operator opens a store.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use commands::stream_id;
use domain::store::{Store, StoreAggregate, StoreCommand};
use domain::StoreId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{IdempotencyKeyHeader, RawJson, Trace};
use crate::idempotency::{idempotent, Replays};
use crate::openapi::IdempotencyKey;
use crate::reply::Reply;
use crate::state::{metadata, AppState};

/// A store to open.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateStore {
    /// 1 to 100 characters, not blank, no control characters.
    #[schema(min_length = 1, max_length = 100)]
    name: String,
    /// 1 to 100 characters, not blank, no control characters.
    #[schema(min_length = 1, max_length = 100)]
    region: String,
}

/// A store.
#[derive(Serialize, ToSchema)]
#[schema(as = Store)]
pub struct StoreBody<'a> {
    #[schema(value_type = String, format = Ulid)]
    store_id: StoreId,
    name: &'a str,
    region: &'a str,
}

/// Opens a store. 201 with the store.
#[utoipa::path(
    post,
    path = "/v1/stores",
    operation_id = "create_store",
    tag = "catalog",
    security(("bearer" = [])),
    params(IdempotencyKey),
    request_body = CreateStore,
    responses(
        (status = 201, description = "Opened", body = StoreBody),
        (status = 403, description = "Only the operator opens stores"),
        (status = 422, description = "The name or region is blank, too long or has control characters"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    Trace(trace): Trace,
    body: RawJson,
) -> Result<Response, ApiError> {
    caller.require_operator()?;
    let meta = metadata(&caller, &trace, key.as_deref());
    let (state, body) = (&state, &body);
    Ok(idempotent(
        state,
        &caller,
        key,
        "POST /v1/stores",
        &body.0,
        Replays::AS_STORED,
        move |key| async move {
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
                .create::<StoreAggregate>(&stream, &command, meta, key.as_ref(), &render)
                .await?;
            Ok(render(&executed.state))
        },
    )
    .await)
}
