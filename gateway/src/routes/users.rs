//! `POST /v1/users`: the operator registers a customer and gets their token.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use commands::idempotency::StoredResponse;
use commands::stream_id;
use domain::user::{User, UserAggregate, UserCommand};
use domain::UserId;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::extract::{IdempotencyKeyHeader, RawJson, Trace};
use crate::idempotency::{idempotent, Replays};
use crate::openapi::IdempotencyKey;
use crate::reply::Reply;
use crate::state::{metadata, AppState};

/// A customer to register.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    /// 1 to 100 characters, not blank, no control characters.
    #[schema(min_length = 1, max_length = 100)]
    name: String,
}

/// A registered customer, with the token they call the API with.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(as = User)]
pub struct UserBody {
    #[schema(value_type = String, format = Ulid)]
    user_id: UserId,
    name: String,
    /// The customer's bearer token, shown only in this answer (and its replays).
    token: String,
}

/// What the stored response holds instead of the token: tokens are never stored.
const TOKEN_PLACEHOLDER: &str = "";

/// Registers a customer. 201 with the token, which is shown only here.
#[utoipa::path(
    post,
    path = "/v1/users",
    operation_id = "create_user",
    tag = "catalog",
    security(("bearer" = [])),
    params(IdempotencyKey),
    request_body = CreateUser,
    responses(
        (status = 201, description = "Registered", body = UserBody),
        (status = 403, description = "Only the operator registers customers"),
        (status = 422, description = "The name is blank, too long or has control characters"),
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
        "POST /v1/users",
        &body.0,
        Replays::restoring(restore_token),
        move |key| async move {
            let request: CreateUser = body.parse()?;
            let user_id = UserId::from_ulid(crate::ids::new_ulid());
            let token = state.auth.issue(user_id);
            let command = UserCommand::Register {
                user_id,
                name: request.name,
                token_sha256: Auth::token_sha256(&token),
                now: chrono::Utc::now(),
            };
            let render = |user: &Option<User>, token: &str| {
                let user = user.as_ref().expect("registered");
                Reply::json(
                    StatusCode::CREATED,
                    &UserBody {
                        user_id,
                        name: user.name.clone(),
                        token: token.to_owned(),
                    },
                )
            };
            let stored_render = |user: &Option<User>| render(user, TOKEN_PLACEHOLDER);
            let stream = stream_id::<UserAggregate>(user_id);
            let executed = state
                .create::<UserAggregate>(&stream, &command, meta, key.as_ref(), &stored_render)
                .await?;
            Ok(render(&executed.state, &token))
        },
    )
    .await)
}

/// Puts the token back into a replayed `POST /v1/users` response; it is derived from the user
/// id, so it is the same token the first response carried.
fn restore_token(state: &AppState, mut stored: StoredResponse) -> StoredResponse {
    if let Ok(mut body) = serde_json::from_slice::<UserBody>(&stored.body) {
        body.token = state.auth.issue(body.user_id);
        stored.body = serde_json::to_vec(&body).expect("serializes");
    }
    stored
}
