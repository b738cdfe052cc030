//! Operator endpoints that read the log itself: any stream, page by page; one order's whole
//! history (its events and those of its reservation and payment, in log order); and a
//! campaign as it stood at any point of the log (time travel). They
//! answer from the log, not from a read model, so they show exactly what was recorded.

use axum::extract::{Path, RawQuery, State};
use axum::Json;
use commands::{stream_id, EventLog, LogError, RecordedEvent};
use domain::campaign::CampaignAggregate;
use domain::order::{OrderAggregate, OrderEvent};
use domain::payment::PaymentAggregate;
use domain::saga::payment_id_of;
use domain::stock::StockBucketAggregate;
use domain::{Aggregate, CampaignId, OrderId};
use projections::CampaignView;
use sagas::campaign_writer::{bucket_stream, holding_stream};
use schemas::Envelope;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{path_id, query};
use crate::state::AppState;
use crate::views::CampaignBody;

/// Events a page holds when the query does not say.
const PAGE_DEFAULT: usize = 100;
/// Most events a page holds.
const PAGE_MAX: usize = 1_000;
/// Highest `from_version` (and highest position in the document) taken: the largest integer
/// JSON carries exactly.
const VERSION_MAX: u64 = (1 << 53) - 1;
/// Longest stream id taken.
const STREAM_ID_MAX: usize = 200;
/// Most events of a customer's holding read for one order's history.
const HOLDING_EVENTS_MAX: usize = 10_000;

/// One event as the log recorded it: its envelope and its payload.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = LoggedEvent)]
pub struct EventBody {
    /// Unique id (ULID).
    pub event_id: String,
    /// `<category>-<aggregate id>`.
    pub stream_id: String,
    /// 1-based version within its stream.
    pub stream_version: u64,
    /// Position in the global log.
    pub global_position: u64,
    /// The event type, as in the schema registry.
    pub event_type: String,
    /// The schema version its payload was written with (read back upcast to the newest).
    pub schema_version: u32,
    /// When the log recorded it (RFC 3339).
    pub recorded_at: String,
    /// Trace id, span id, correlation id, causation id, Idempotency-Key and actor.
    #[schema(value_type = Object)]
    pub metadata: Value,
    /// The payload.
    #[schema(value_type = Object)]
    pub data: Value,
}

impl From<RecordedEvent> for EventBody {
    fn from(event: RecordedEvent) -> Self {
        event.envelope.into()
    }
}

impl From<Envelope> for EventBody {
    fn from(e: Envelope) -> Self {
        EventBody {
            event_id: e.event_id.to_string(),
            stream_id: e.stream_id,
            stream_version: e.stream_version,
            global_position: e.global_position,
            event_type: e.event_type,
            schema_version: e.schema_version,
            recorded_at: e
                .recorded_at
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            metadata: serde_json::to_value(&e.metadata).unwrap_or(Value::Null),
            data: e.data,
        }
    }
}

/// A page of one stream's events.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = StreamEventPage)]
pub struct StreamPageBody {
    /// The stream.
    pub stream_id: String,
    /// Its events, in version order.
    pub events: Vec<EventBody>,
    /// Pass as `from_version` for the next page; `null` on the last one.
    pub next_from_version: Option<u64>,
}

/// Which events of the stream.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// The first version to return; 1 when not given.
    #[param(minimum = 1, maximum = 9_007_199_254_740_991_i64)]
    from_version: Option<u64>,
    /// Most events to return, 1 to 1000; 100 when not given.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<usize>,
}

/// The path of one stream.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path.
pub struct StreamPath {
    /// `<category>-<id>`, as in the events' `stream_id`: `order-<order id>`,
    /// `payment-<payment id>`, `holding-<campaign id>-<user id>`, `campaign-<campaign id>`,
    /// `stock-<campaign id>-<bucket>`, ...
    stream_id: String,
}

/// `GET /v1/admin/streams/{stream_id}/events`: a stream's events, in version order, a page
/// at a time.
#[utoipa::path(
    get,
    path = "/v1/admin/streams/{stream_id}/events",
    operation_id = "list_stream_events",
    tag = "operations",
    security(("bearer" = [])),
    params(StreamPath, StreamQuery),
    responses(
        (status = 200, description = "A page of the stream's events", body = StreamPageBody),
        (status = 400, description = "An unknown query parameter or a value out of range (`invalid_query`)"),
        (status = 403, description = "Only the operator reads the log"),
        (status = 404, description = "The log holds no event of this stream (`stream_not_found`)"),
    )
)]
pub async fn stream_events(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<StreamPageBody>, ApiError> {
    caller.require_operator()?;
    let q: StreamQuery = query(raw.as_deref())?;
    let from_version = q.from_version.unwrap_or(1);
    let limit = q.limit.unwrap_or(PAGE_DEFAULT);
    if !(1..=VERSION_MAX).contains(&from_version) || !(1..=PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: format!("from_version is 1 to {VERSION_MAX}, and limit 1 to {PAGE_MAX}"),
        });
    }
    let not_found = || ApiError::NotFound {
        code: "stream_not_found",
        what: "stream",
    };
    if !is_stream_id(&stream) {
        return Err(not_found());
    }
    let log = state.handler.log();
    // One more than asked, to tell whether a next page exists.
    let mut events = log
        .read_stream(&stream, from_version - 1, limit + 1)
        .await?;
    if events.is_empty() && log.read_stream(&stream, 0, 1).await?.is_empty() {
        return Err(not_found());
    }
    let next_from_version = (events.len() > limit).then(|| {
        events.truncate(limit);
        events
            .last()
            .map_or(from_version, |e| e.envelope.stream_version + 1)
    });
    Ok(Json(StreamPageBody {
        stream_id: stream,
        events: events.into_iter().map(EventBody::from).collect(),
        next_from_version,
    }))
}

/// Whether `stream` can be a stream id: a lower-case category, `-`, and an id of letters,
/// digits and `-`.
fn is_stream_id(stream: &str) -> bool {
    let Some((category, id)) = stream.split_once('-') else {
        return false;
    };
    stream.len() <= STREAM_ID_MAX
        && !category.is_empty()
        && category.bytes().all(|b| b.is_ascii_lowercase())
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// One order's history.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OrderHistory)]
pub struct OrderHistoryBody {
    /// The order.
    pub order_id: String,
    /// Every event of the order, of its payment, of its customer's holding that concerns it,
    /// and the saga's records of it (written by earlier versions), in log order. The saga's
    /// steps are the events whose metadata names the actor `saga:order`.
    pub events: Vec<EventBody>,
}

/// The path of one order.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path.
pub struct OrderPath {
    /// The order's id.
    id: String,
}

/// `GET /v1/admin/orders/{id}/history`: everything the log holds about one order, in log
/// order: how it was placed, reserved, paid, confirmed or cancelled, and who did what.
#[utoipa::path(
    get,
    path = "/v1/admin/orders/{id}/history",
    operation_id = "get_order_history",
    tag = "operations",
    security(("bearer" = [])),
    params(OrderPath),
    responses(
        (status = 200, description = "The order's events, in log order", body = OrderHistoryBody),
        (status = 403, description = "Only the operator reads the log"),
        (status = 404, description = "No such order (`order_not_found`)"),
    )
)]
pub async fn order_history(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<OrderHistoryBody>, ApiError> {
    caller.require_operator()?;
    let order_id: OrderId = path_id(&id, "order_not_found", "order")?;
    let events = history(state.handler.log().as_ref(), order_id)
        .await?
        .ok_or(ApiError::NotFound {
            code: "order_not_found",
            what: "order",
        })?;
    Ok(Json(OrderHistoryBody {
        order_id: order_id.to_string(),
        events: events.into_iter().map(EventBody::from).collect(),
    }))
}

/// The events of `order_id`'s history, in log order; `None` when the log has no such order.
pub async fn history(
    log: &dyn EventLog,
    order_id: OrderId,
) -> Result<Option<Vec<RecordedEvent>>, LogError> {
    let order_stream = stream_id::<OrderAggregate>(order_id);
    let mut events = all_of(log, &order_stream, commands::log::READ_EVENTS_MAX).await?;
    let Some(placed) = events.first() else {
        return Ok(None);
    };
    let holding = match schemas::from_envelope::<OrderEvent>(&placed.envelope) {
        Ok(OrderEvent::OrderPlaced {
            campaign_id,
            user_id,
            ..
        }) => Some(holding_stream(campaign_id, user_id)),
        _ => None,
    };
    let payment = stream_id::<PaymentAggregate>(payment_id_of(order_id));
    events.extend(all_of(log, &payment, commands::log::READ_EVENTS_MAX).await?);
    events.extend(
        all_of(
            log,
            &format!("ordersaga-{order_id}"),
            commands::log::READ_EVENTS_MAX,
        )
        .await?,
    );
    if let Some(holding) = holding {
        let id = order_id.to_string();
        let concerns_it = |e: &RecordedEvent| {
            e.envelope.data.get("order_id").and_then(Value::as_str) == Some(id.as_str())
        };
        let held = all_of(log, &holding, HOLDING_EVENTS_MAX).await?;
        events.extend(held.into_iter().filter(concerns_it));
    }
    events.sort_by_key(|e| (e.cursor.transaction_id, e.envelope.global_position));
    Ok(Some(events))
}

/// When to look back to.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AsOfQuery {
    /// A global log position (the campaign as it stood once every event up to that position
    /// was recorded), or an RFC 3339 time; now when not given.
    #[param(value_type = Option<AsOfParam>)]
    as_of: Option<String>,
}

/// What `as_of` takes, for the OpenAPI document: a global log position or an RFC 3339 time.
pub struct AsOfParam;

impl utoipa::PartialSchema for AsOfParam {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, OneOfBuilder, SchemaFormat};
        use utoipa::openapi::Type;
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(VERSION_MAX)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
            )
            .into()
    }
}

impl ToSchema for AsOfParam {
    fn name() -> std::borrow::Cow<'static, str> {
        "AsOf".into()
    }
}

/// Which events a look back takes in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum AsOf {
    Position(u64),
    Time(chrono::DateTime<chrono::Utc>),
    Now,
}

impl AsOf {
    fn parse(given: Option<&str>) -> Result<AsOf, ApiError> {
        let Some(given) = given else {
            return Ok(AsOf::Now);
        };
        if let Ok(position) = given.parse::<u64>() {
            return Ok(AsOf::Position(position));
        }
        chrono::DateTime::parse_from_rfc3339(given)
            .map(|t| AsOf::Time(t.with_timezone(&chrono::Utc)))
            .map_err(|_| ApiError::BadRequest {
                code: "invalid_query",
                detail: format!("as_of is a log position or an RFC 3339 time, not {given:?}"),
            })
    }

    fn includes(self, event: &RecordedEvent) -> bool {
        match self {
            AsOf::Position(position) => event.envelope.global_position <= position,
            AsOf::Time(time) => event.envelope.recorded_at <= time,
            AsOf::Now => true,
        }
    }
}

/// A campaign as it stood at some point of the log.
#[derive(Serialize, ToSchema)]
#[schema(as = CampaignAsOf)]
pub struct CampaignAsOfBody {
    /// The position of the last event of the campaign's streams taken in.
    pub global_position: u64,
    /// When the log recorded that event (RFC 3339).
    pub recorded_at: String,
    /// The campaign, terms and stock, as it stood then; its status is as of `as_of` (or of
    /// that event, when `as_of` is a position).
    pub campaign: CampaignBody,
}

/// The path of one campaign.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path.
pub struct CampaignPath {
    /// The campaign's id.
    id: String,
}

/// `GET /v1/admin/campaigns/{id}`: the campaign, terms and stock, folded from the log as it
/// stood at `as_of` (time travel), or now.
#[utoipa::path(
    get,
    path = "/v1/admin/campaigns/{id}",
    operation_id = "get_campaign_as_of",
    tag = "operations",
    security(("bearer" = [])),
    params(CampaignPath, AsOfQuery),
    responses(
        (status = 200, description = "The campaign as it stood then", body = CampaignAsOfBody),
        (status = 400, description = "`as_of` is neither a position nor an RFC 3339 time, or an unknown parameter (`invalid_query`)"),
        (status = 403, description = "Only the operator reads the log"),
        (status = 404, description = "No such campaign at that point (`campaign_not_found`)"),
    )
)]
pub async fn campaign_as_of(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<CampaignAsOfBody>, ApiError> {
    caller.require_operator()?;
    let q: AsOfQuery = query(raw.as_deref())?;
    let as_of = AsOf::parse(q.as_of.as_deref())?;
    let not_found = || ApiError::NotFound {
        code: "campaign_not_found",
        what: "campaign",
    };
    let campaign_id: CampaignId = path_id(&id, "campaign_not_found", "campaign")?;
    let log = state.handler.log().as_ref();
    let (campaign, mut last) =
        fold_as_of::<CampaignAggregate>(log, &bucket_stream(campaign_id, 0), as_of).await?;
    let campaign = campaign.ok_or_else(not_found)?;
    let mut buckets = Vec::new();
    for bucket in 1..campaign.stock_buckets {
        let (stock, seen) =
            fold_as_of::<StockBucketAggregate>(log, &bucket_stream(campaign_id, bucket), as_of)
                .await?;
        buckets.push(stock);
        last = last.max(seen);
    }
    let (global_position, recorded_at) = last.ok_or_else(not_found)?;
    let at = match as_of {
        AsOf::Time(time) => time,
        AsOf::Now => chrono::Utc::now(),
        AsOf::Position(_) => recorded_at,
    };
    Ok(Json(CampaignAsOfBody {
        global_position,
        recorded_at: recorded_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        campaign: CampaignBody::new(&CampaignView::of(&campaign, &buckets), at),
    }))
}

/// `stream` folded over the events `as_of` takes in, with the position and time of the last.
async fn fold_as_of<A: Aggregate>(
    log: &dyn EventLog,
    stream: &str,
    as_of: AsOf,
) -> Result<(A::State, Option<(u64, domain::Timestamp)>), ApiError> {
    let events = all_of(log, stream, usize::MAX).await?;
    let mut state = A::State::default();
    let mut last = None;
    for recorded in events.iter().filter(|e| as_of.includes(e)) {
        let event: A::Event = schemas::from_envelope(&recorded.envelope)
            .map_err(|e| ApiError::Internal(format!("{stream}: {e}")))?;
        state = A::evolve(state, &event);
        last = Some((
            recorded.envelope.global_position,
            recorded.envelope.recorded_at,
        ));
    }
    Ok((state, last))
}

/// Up to `most` events of `stream`, from its first.
async fn all_of(
    log: &dyn EventLog,
    stream: &str,
    most: usize,
) -> Result<Vec<RecordedEvent>, LogError> {
    let mut events: Vec<RecordedEvent> = Vec::new();
    while events.len() < most {
        let after = events.last().map_or(0, |e| e.envelope.stream_version);
        let limit = commands::log::READ_EVENTS_MAX.min(most - events.len());
        let page = log.read_stream(stream, after, limit).await?;
        let done = page.len() < limit;
        events.extend(page);
        if done {
            break;
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_a_category_and_an_id() {
        assert!(is_stream_id("order-01JABCDEFGHJKMNPQRSTVWXYZ0"));
        assert!(is_stream_id("stock-01JABCDEFGHJKMNPQRSTVWXYZ0-3"));
        for bad in ["order", "-x", "Order-x", "order-", "order-x y", "order-é"] {
            assert!(!is_stream_id(bad), "{bad}");
        }
        assert!(!is_stream_id(&format!(
            "order-{}",
            "x".repeat(STREAM_ID_MAX)
        )));
    }
}
