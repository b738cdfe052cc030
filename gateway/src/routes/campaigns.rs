//! Campaigns: the operator creates, replenishes and closes them; anyone signed in lists and
//! reads them.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use commands::stream_id;
use commands::trace::TraceParent;
use domain::campaign::{Campaign, CampaignAggregate, CampaignCommand, CampaignStatus, NewCampaign};
use domain::stock::StockBucket;
use domain::store::StoreAggregate;
use domain::{CampaignId, StoreId, Timestamp};
use projections::CampaignView;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{field_id, path_id, query, IdempotencyKeyHeader, RawJson, Trace};
use crate::idempotency::{idempotent, Replays};
use crate::openapi::IdempotencyKey;
use crate::reply::Reply;
use crate::state::{metadata, AppState};
use crate::views::{CampaignBody, CampaignListBody, CampaignStatusBody};

/// A campaign to publish. The limits are those of `domain::limits`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCampaign {
    /// The store that sells it.
    #[schema(format = Ulid)]
    store_id: String,
    /// The drink: 1 to 64 characters, not blank, no control characters.
    #[schema(min_length = 1, max_length = 64)]
    sku: String,
    /// 1 to 200 characters, not blank, no control characters.
    #[schema(min_length = 1, max_length = 200)]
    title: String,
    /// The deal price of one unit, in minor units.
    #[schema(minimum = 1, maximum = 100_000_000)]
    price_cents: u64,
    /// Units on offer.
    #[schema(minimum = 1, maximum = 10_000_000)]
    quota: u32,
    /// The most units one customer may hold.
    #[schema(minimum = 1, maximum = 10_000)]
    per_user_limit: u32,
    #[schema(value_type = String, format = DateTime)]
    starts_at: Timestamp,
    /// After `starts_at` and after now, at most 366 days after `starts_at`.
    #[schema(value_type = String, format = DateTime)]
    ends_at: Timestamp,
    /// How long a customer has to pay before the order is cancelled.
    #[schema(minimum = 1, maximum = 86_400)]
    payment_timeout_seconds: u32,
    /// How many stock buckets the units may be spread over, so that several instances sell
    /// the campaign without waiting on each other: 1 (the default) to 64. Use about as many as
    /// instances that serve the sale.
    #[schema(minimum = 1, maximum = 64)]
    #[serde(default = "one_bucket")]
    stock_buckets: u32,
}

fn one_bucket() -> u32 {
    1
}

/// Units to add to a campaign.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Replenish {
    /// At least 1; the campaign may not go over 10 000 000 units in total.
    #[schema(minimum = 1, maximum = 10_000_000)]
    quantity: u32,
}

/// Which campaigns to list.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this store's campaigns.
    #[param(format = Ulid)]
    store_id: Option<String>,
    /// Only campaigns in this status now.
    #[param(inline)]
    status: Option<CampaignStatusBody>,
}

/// The path of one campaign.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path; handlers read it as text, so a bad id is a 404.
pub struct CampaignPath {
    /// The campaign's id.
    #[param(format = Ulid)]
    id: String,
}

/// Renders the campaign a command left, with its other buckets' units as they were read.
fn render(
    status: StatusCode,
    others: Vec<StockBucket>,
) -> impl Fn(&Option<Campaign>) -> Reply + Send + Sync {
    move |campaign| {
        let campaign = campaign.as_ref().expect("a decided campaign exists");
        let view = CampaignView::of(campaign, &others);
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
#[utoipa::path(
    post,
    path = "/v1/campaigns",
    operation_id = "create_campaign",
    tag = "catalog",
    security(("bearer" = [])),
    params(IdempotencyKey),
    request_body = CreateCampaign,
    responses(
        (status = 201, description = "Published", body = CampaignBody, links(
            ("GetCampaign" = (operation_id = "get_campaign", parameters(("id" = "$response.body#/campaign_id")))),
            ("ReplenishCampaign" = (operation_id = "replenish_campaign", parameters(("id" = "$response.body#/campaign_id")))),
            ("CloseCampaign" = (operation_id = "close_campaign", parameters(("id" = "$response.body#/campaign_id")))),
            ("PlaceOrder" = (operation_id = "place_order", request_body = json!({"campaign_id": "$response.body#/campaign_id"}))),
        )),
        (status = 403, description = "Only the operator publishes campaigns"),
        (status = 422, description = "No such store (`store_not_found`), or a field out of its limits (`invalid_input`)"),
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
        "POST /v1/campaigns",
        &body.0,
        Replays::AS_STORED,
        move |key| async move {
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
                stock_buckets: request.stock_buckets,
                now: chrono::Utc::now(),
            });
            // A new campaign holds every unit in its own bucket.
            let render = render(StatusCode::CREATED, Vec::new());
            let stream = stream_id::<CampaignAggregate>(campaign_id);
            let executed = state
                .create::<CampaignAggregate>(&stream, &command, meta, key.as_ref(), &render)
                .await?;
            Ok(render(&executed.state))
        },
    )
    .await)
}

/// Lists campaigns, optionally of one store and in one status.
#[utoipa::path(
    get,
    path = "/v1/campaigns",
    operation_id = "list_campaigns",
    tag = "catalog",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "The campaigns", body = CampaignListBody),
        (status = 400, description = "An unknown query parameter, or an unknown status"),
        (status = 422, description = "`store_id` is not an id"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<CampaignListBody>, ApiError> {
    let q: ListQuery = query(raw.as_deref())?;
    let store_id: Option<StoreId> = q
        .store_id
        .as_deref()
        .map(|s| field_id(s, "store_id"))
        .transpose()?;
    state.caught_up(&caller).await;
    let now = chrono::Utc::now();
    let status = q.status.map(CampaignStatus::from);
    let campaigns = state.read_model.campaigns(store_id, status, now).await?;
    Ok(Json(CampaignListBody {
        items: campaigns
            .iter()
            .map(|c| CampaignBody::new(c, now))
            .collect(),
    }))
}

/// One campaign.
#[utoipa::path(
    get,
    path = "/v1/campaigns/{id}",
    operation_id = "get_campaign",
    tag = "catalog",
    security(("bearer" = [])),
    params(CampaignPath),
    responses(
        (status = 200, description = "The campaign", body = CampaignBody),
        (status = 404, description = "No such campaign"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CampaignBody>, ApiError> {
    let id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    state.caught_up(&caller).await;
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
#[utoipa::path(
    post,
    path = "/v1/campaigns/{id}/replenish",
    operation_id = "replenish_campaign",
    tag = "catalog",
    security(("bearer" = [])),
    params(CampaignPath, IdempotencyKey),
    request_body = Replenish,
    responses(
        (status = 200, description = "Replenished", body = CampaignBody),
        (status = 403, description = "Only the operator replenishes"),
        (status = 404, description = "No such campaign"),
        (status = 409, description = "The campaign is closed (`campaign_closed`)"),
        (status = 422, description = "The quantity is 0 or would take the campaign over its limit"),
    )
)]
pub async fn replenish(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    Trace(trace): Trace,
    Path(id): Path<String>,
    body: RawJson,
) -> Result<Response, ApiError> {
    let request = Operation {
        state: &state,
        caller,
        key,
        trace,
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
#[utoipa::path(
    post,
    path = "/v1/campaigns/{id}/close",
    operation_id = "close_campaign",
    tag = "catalog",
    security(("bearer" = [])),
    params(CampaignPath, IdempotencyKey),
    responses(
        (status = 200, description = "Closed", body = CampaignBody),
        (status = 403, description = "Only the operator closes campaigns"),
        (status = 404, description = "No such campaign"),
    )
)]
pub async fn close(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    Trace(trace): Trace,
    Path(id): Path<String>,
    body: RawJson,
) -> Result<Response, ApiError> {
    let request = Operation {
        state: &state,
        caller,
        key,
        trace,
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
    trace: TraceParent,
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
        trace,
        id,
        action,
        body,
    } = request;
    caller.require_operator()?;
    let id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    let meta = metadata(&caller, &trace, key.as_deref());
    let route = format!("POST /v1/campaigns/{id}/{action}");
    let body = &body;
    Ok(idempotent(
        state,
        &caller,
        key,
        &route,
        &body.0,
        Replays::AS_STORED,
        move |key| async move {
            let command = command(body)?;
            let stream = stream_id::<CampaignAggregate>(id);
            let campaign = state
                .handler
                .load::<CampaignAggregate>(&stream)
                .await?
                .state
                .ok_or(ApiError::NotFound {
                    code: "campaign_not_found",
                    what: "campaign",
                })?;
            let others =
                sagas::campaign_writer::other_buckets(state.handler.log().as_ref(), &campaign)
                    .await?;
            let render = render(StatusCode::OK, others);
            let executed = state
                .execute::<CampaignAggregate>(&stream, &command, meta, key.as_ref(), &render)
                .await
                .map_err(not_found_in_path)?;
            Ok(render(&executed.state))
        },
    )
    .await)
}
