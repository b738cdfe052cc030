//! Campaigns: the operator creates, replenishes and closes them; anyone signed in lists and
//! reads them.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use commands::stream_id;
use domain::campaign::{Campaign, CampaignAggregate, CampaignCommand, CampaignStatus, NewCampaign};
use domain::store::StoreAggregate;
use domain::{CampaignId, StoreId, Timestamp};
use projections::CampaignView;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{field_id, path_id, query, IdempotencyKeyHeader, RawJson, TraceId};
use crate::idempotency::{as_stored, idempotent, Done};
use crate::reply::Reply;
use crate::state::{metadata, AppState};
use crate::views::{CampaignBody, Items};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateCampaign {
    store_id: String,
    sku: String,
    title: String,
    price_cents: u64,
    quota: u32,
    per_user_limit: u32,
    starts_at: Timestamp,
    ends_at: Timestamp,
    payment_timeout_seconds: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Replenish {
    quantity: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    store_id: Option<String>,
    status: Option<CampaignStatus>,
}

fn render(status: StatusCode) -> impl Fn(&Option<Campaign>) -> Reply + Send + Sync {
    move |campaign| {
        let view = CampaignView::from(campaign.as_ref().expect("a decided campaign exists"));
        Reply::json(status, &CampaignBody::new(&view, chrono::Utc::now()))
    }
}

/// A campaign addressed by the path that does not exist is a 404, not a bad body.
fn not_found_in_path(error: ApiError) -> ApiError {
    match error {
        ApiError::Unprocessable {
            code: "campaign_not_found",
            ..
        } => ApiError::NotFound {
            code: "campaign_not_found",
            what: "campaign",
        },
        other => other,
    }
}

/// Publishes a campaign. 201 with the campaign.
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
        "POST /v1/campaigns",
        &body.0,
        as_stored,
        move |claim| async move {
            let request: CreateCampaign = body.parse()?;
            let store_id: StoreId = field_id(&request.store_id, "store_id")?;
            let store = state
                .handler
                .load::<StoreAggregate>(&stream_id::<StoreAggregate>(store_id))
                .await?
                .state;
            let campaign_id = CampaignId::from_ulid(crate::ids::new_ulid());
            let command = CampaignCommand::Create(NewCampaign {
                campaign_id,
                store,
                sku: request.sku,
                title: request.title,
                price_cents: request.price_cents,
                quota: request.quota,
                per_user_limit: request.per_user_limit,
                starts_at: request.starts_at,
                ends_at: request.ends_at,
                payment_timeout_seconds: request.payment_timeout_seconds,
                now: chrono::Utc::now(),
            });
            let render = render(StatusCode::CREATED);
            let stream = stream_id::<CampaignAggregate>(campaign_id);
            let executed = state
                .execute::<CampaignAggregate>(&stream, &command, meta, claim.as_ref(), &render)
                .await?;
            Ok(Done {
                reply: render(&executed.state),
                recorded: claim.is_some(),
            })
        },
    )
    .await)
}

/// Lists campaigns, optionally of one store and in one status.
pub async fn list(
    State(state): State<AppState>,
    _caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<Items<CampaignBody>>, ApiError> {
    let q: ListQuery = query(raw.as_deref())?;
    let store_id: Option<StoreId> = q
        .store_id
        .as_deref()
        .map(|s| field_id(s, "store_id"))
        .transpose()?;
    state.caught_up().await;
    let now = chrono::Utc::now();
    let campaigns = state.read_model.campaigns(store_id, q.status, now).await?;
    Ok(Json(Items {
        items: campaigns
            .iter()
            .map(|c| CampaignBody::new(c, now))
            .collect(),
    }))
}

/// One campaign.
pub async fn get(
    State(state): State<AppState>,
    _caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CampaignBody>, ApiError> {
    let id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    state.caught_up().await;
    let campaign = state
        .read_model
        .campaign(id)
        .await?
        .ok_or(ApiError::NotFound {
            code: "campaign_not_found",
            what: "campaign",
        })?;
    Ok(Json(CampaignBody::new(&campaign, chrono::Utc::now())))
}

/// Adds stock. 200 with the campaign.
pub async fn replenish(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    TraceId(trace_id): TraceId,
    Path(id): Path<String>,
    body: RawJson,
) -> Result<Response, ApiError> {
    let request = Operation {
        state: &state,
        caller,
        key,
        trace_id,
        id,
        action: "replenish",
        body,
    };
    operate(request, |body| {
        let request: Replenish = body.parse()?;
        Ok(CampaignCommand::Replenish {
            quantity: request.quantity,
            now: chrono::Utc::now(),
        })
    })
    .await
}

/// Stops the campaign taking orders. 200 with the campaign; closing twice is fine.
pub async fn close(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    TraceId(trace_id): TraceId,
    Path(id): Path<String>,
    body: RawJson,
) -> Result<Response, ApiError> {
    let request = Operation {
        state: &state,
        caller,
        key,
        trace_id,
        id,
        action: "close",
        body,
    };
    operate(request, |_| {
        Ok(CampaignCommand::Close {
            now: chrono::Utc::now(),
        })
    })
    .await
}

/// An operator's request to change an existing campaign, as the route received it.
struct Operation<'a> {
    state: &'a AppState,
    caller: Caller,
    key: Option<String>,
    trace_id: String,
    id: String,
    action: &'static str,
    body: RawJson,
}

/// Runs an operator's change to the campaign in the path, under its Idempotency-Key: 200 with
/// the campaign, 404 when the path names none.
async fn operate(
    request: Operation<'_>,
    command: impl FnOnce(&RawJson) -> Result<CampaignCommand, ApiError>,
) -> Result<Response, ApiError> {
    let Operation {
        state,
        caller,
        key,
        trace_id,
        id,
        action,
        body,
    } = request;
    caller.require_operator()?;
    let id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    let meta = metadata(&caller, &trace_id, key.as_deref());
    let route = format!("POST /v1/campaigns/{id}/{action}");
    let body = &body;
    Ok(idempotent(
        state,
        &caller,
        key,
        &route,
        &body.0,
        as_stored,
        move |claim| async move {
            let command = command(body)?;
            let render = render(StatusCode::OK);
            let stream = stream_id::<CampaignAggregate>(id);
            let executed = state
                .execute::<CampaignAggregate>(&stream, &command, meta, claim.as_ref(), &render)
                .await
                .map_err(not_found_in_path)?;
            let recorded = claim.is_some() && executed.appended.is_some();
            Ok(Done {
                reply: render(&executed.state),
                recorded,
            })
        },
    )
    .await)
}
