//! A sale as operators watch it: a campaign's stock and its order funnel, now or live as
//! Server-Sent Events. The console's campaign page reads these; so can any dashboard.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use domain::{CampaignId, Timestamp};
use futures::{Stream, StreamExt};
use projections::Funnel;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{path_id, query};
use crate::routes::campaigns::CampaignPath;
use crate::state::AppState;
use crate::views::CampaignBody;

/// How often a live sale is sent when the query does not say, in milliseconds.
const INTERVAL_DEFAULT_MS: u64 = 1_000;
/// The most often a live sale is sent, in milliseconds.
const INTERVAL_MIN_MS: u64 = 200;
/// The least often a live sale is sent, in milliseconds.
const INTERVAL_MAX_MS: u64 = 60_000;

/// How a campaign's orders stand, counted as they move.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OrderFunnel)]
pub struct FunnelBody {
    /// Every order placed in the campaign: the sum of the counts below.
    pub placed: u64,
    /// Placed; stock not decided yet.
    pub pending: u64,
    /// Stock reserved; waiting for the payment.
    pub awaiting_payment: u64,
    /// Paid.
    pub confirmed: u64,
    /// Refused by the stock decision, by reason (`sold_out`, `limit_exceeded`,
    /// `campaign_not_open`).
    pub rejected: BTreeMap<String, u64>,
    /// Cancelled after placing, by reason (`customer`, `payment_failed`, `payment_timeout`).
    pub cancelled: BTreeMap<String, u64>,
}

impl From<Funnel> for FunnelBody {
    fn from(funnel: Funnel) -> Self {
        FunnelBody {
            placed: funnel.placed(),
            pending: funnel.pending,
            awaiting_payment: funnel.awaiting_payment,
            confirmed: funnel.confirmed,
            rejected: funnel.rejected,
            cancelled: funnel.cancelled,
        }
    }
}

/// A campaign's sale at one instant, from the read models.
#[derive(Serialize, ToSchema)]
#[schema(as = Sale)]
pub struct SaleBody {
    /// When it was read.
    #[schema(value_type = String, format = DateTime)]
    pub at: Timestamp,
    /// The campaign with its stock, as `GET /v1/campaigns/{id}` answers it.
    pub campaign: CampaignBody,
    /// Its orders.
    pub orders: FunnelBody,
}

/// The query of `GET /v1/admin/campaigns/{id}/sale/live`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LiveQuery {
    /// Milliseconds between two `sale` events, 200 to 60000; 1000 when left out.
    interval_ms: Option<u64>,
}

/// The sale of campaign `id` now; `None` when the read model has no such campaign.
async fn sale(state: &AppState, id: CampaignId) -> Result<Option<SaleBody>, ApiError> {
    let (campaign, funnel) =
        tokio::join!(state.read_model.campaign(id), state.read_model.funnel(id));
    let Some(campaign) = campaign? else {
        return Ok(None);
    };
    let at = chrono::Utc::now();
    Ok(Some(SaleBody {
        at,
        campaign: CampaignBody::new(&campaign, at),
        orders: funnel?.into(),
    }))
}

fn campaign_not_found() -> ApiError {
    ApiError::NotFound {
        code: "campaign_not_found",
        what: "campaign",
    }
}

/// `GET /v1/admin/campaigns/{id}/sale`: the campaign's stock and its order funnel now.
#[utoipa::path(
    get,
    path = "/v1/admin/campaigns/{id}/sale",
    operation_id = "get_sale",
    tag = "operations",
    security(("bearer" = [])),
    params(CampaignPath),
    responses(
        (status = 200, description = "The campaign's stock and how its orders stand", body = SaleBody),
        (status = 403, description = "Only the operator watches sales"),
        (status = 404, description = "No such campaign (`campaign_not_found`)"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<SaleBody>, ApiError> {
    caller.require_operator()?;
    let id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    sale(&state, id)
        .await?
        .map(Json)
        .ok_or_else(campaign_not_found)
}

/// `GET /v1/admin/campaigns/{id}/sale/live`: the sale as Server-Sent Events, a `sale` event
/// every `interval_ms` until the client goes away or the process shuts down. Each carries its
/// time, so a client can tell rates (orders a second) from two of them.
#[utoipa::path(
    get,
    path = "/v1/admin/campaigns/{id}/sale/live",
    operation_id = "follow_sale",
    tag = "operations",
    security(("bearer" = [])),
    params(CampaignPath, LiveQuery),
    responses(
        (status = 200, description = "Server-Sent Events: a `sale` event now and every `interval_ms`", body = SaleEvent, content_type = "text/event-stream"),
        (status = 400, description = "An unknown query parameter or an interval out of range (`invalid_query`)"),
        (status = 403, description = "Only the operator watches sales"),
        (status = 404, description = "No such campaign (`campaign_not_found`)"),
    )
)]
pub async fn live(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    caller.require_operator()?;
    let id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    let q: LiveQuery = query(raw.as_deref())?;
    let interval_ms = q.interval_ms.unwrap_or(INTERVAL_DEFAULT_MS);
    if !(INTERVAL_MIN_MS..=INTERVAL_MAX_MS).contains(&interval_ms) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: format!("interval_ms is {INTERVAL_MIN_MS} to {INTERVAL_MAX_MS}"),
        });
    }
    let first = sale(&state, id).await?.ok_or_else(campaign_not_found)?;
    let mut ticks = tokio::time::interval(Duration::from_millis(interval_ms));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = state.closing.subscribe();
    let events = futures::stream::unfold(
        (state, ticks, Some(first)),
        move |(state, mut ticks, first)| async move {
            ticks.tick().await;
            let body = match first {
                Some(body) => body,
                // A read model that cannot answer for a moment skips a tick; the stream goes on.
                None => loop {
                    if let Ok(Some(body)) = sale(&state, id).await {
                        break body;
                    }
                    ticks.tick().await;
                },
            };
            let event = SseEvent::default()
                .event("sale")
                .json_data(&body)
                .unwrap_or_else(|_| SseEvent::default().comment("unencodable sale"));
            Some((Ok(event), (state, ticks, None)))
        },
    );
    let closed = async move {
        let _ = closing.wait_for(|closing| *closing).await;
    };
    Ok(Sse::new(events.take_until(closed)).keep_alive(KeepAlive::default()))
}

/// One Server-Sent Event of `GET /v1/admin/campaigns/{id}/sale/live`.
#[derive(ToSchema)]
#[allow(dead_code)] // Only describes the events, which axum's `Sse` writes.
pub struct SaleEvent {
    /// Always `sale`.
    #[schema(pattern = "^sale$")]
    event: String,
    /// The sale as `GET /v1/admin/campaigns/{id}/sale` answers it, in JSON.
    #[schema(content_media_type = "application/json")]
    data: String,
}
