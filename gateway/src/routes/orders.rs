//! Orders: customers place, read, list and cancel their own; the operator reads all.

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use commands::bus::partition::order_ulid;
use std::convert::Infallible;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use commands::stream_id;
use domain::order::{CancelReason, Order, OrderAggregate, OrderCommand, OrderStatus};
use domain::Aggregate;
use domain::{CampaignId, OrderId};
use futures::Stream;
use projections::{OrderFilter, OrderView};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::extract::{field_id, path_id, query, IdempotencyKeyHeader, RawJson, Trace};
use crate::idempotency::{idempotent, Replays};
use crate::openapi::{IdempotencyKey, RequiredIdempotencyKey};
use crate::reply::Reply;
use crate::state::{metadata, AppState};
use crate::views::{OrderBody, OrderPageBody, OrderStatusBody};

/// Orders per page when the client does not say.
const ORDERS_PAGE_DEFAULT: usize = 50;

/// An order to place.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    /// The campaign to buy from.
    #[schema(format = Ulid)]
    campaign_id: String,
    /// Units, 1 to 10 000.
    #[schema(minimum = 1, maximum = 10_000)]
    quantity: u32,
}

/// Which orders to list, and where the page starts.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only orders of this campaign.
    #[param(format = Ulid)]
    campaign_id: Option<String>,
    /// Only orders in this status.
    #[param(inline)]
    status: Option<OrderStatusBody>,
    /// The `next_cursor` of the previous page (an order id); empty for the first page.
    #[param(pattern = "^$|^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$")]
    cursor: Option<String>,
    /// Orders per page, 1 to 200; 50 when not given.
    #[param(minimum = 1, maximum = 200)]
    limit: Option<usize>,
}

/// The path of one order.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path; handlers read it as text, so a bad id is a 404.
pub struct OrderPath {
    /// The order's id.
    #[param(format = Ulid)]
    id: String,
}

/// The `Prefer` header of `POST /v1/orders`.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // Only describes the header.
pub struct PreferWait {
    /// `wait=N`: hold the answer up to N seconds (at most 20) until the order has left
    /// `pending`. Anything else is ignored.
    #[param(rename = "Prefer")]
    prefer: Option<String>,
}

fn not_found() -> ApiError {
    ApiError::NotFound {
        code: "order_not_found",
        what: "order",
    }
}

/// Places an order. 202 with the order, pending until the stock decision.
#[utoipa::path(
    post,
    path = "/v1/orders",
    operation_id = "place_order",
    tag = "orders",
    security(("bearer" = [])),
    params(RequiredIdempotencyKey, PreferWait),
    request_body = PlaceOrder,
    responses(
        (status = 202, description = "Placed: `pending`, or, with `Prefer: wait`, as far as the saga got", body = OrderBody,
            headers(("Location" = String, description = "The order's URL")), links(
            ("GetOrder" = (operation_id = "get_order", parameters(("id" = "$response.body#/order_id")))),
            ("FollowOrder" = (operation_id = "follow_order", parameters(("id" = "$response.body#/order_id")))),
            ("CancelOrder" = (operation_id = "cancel_order", parameters(("id" = "$response.body#/order_id")))),
        )),
        (status = 400, description = "No Idempotency-Key (`idempotency_key_required`)"),
        (status = 403, description = "Only customers place orders"),
        (status = 422, description = "No such campaign (`campaign_not_found`), or a quantity out of range (`invalid_input`)"),
    )
)]
pub async fn place(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    Trace(trace): Trace,
    headers: axum::http::HeaderMap,
    body: RawJson,
) -> Result<Response, ApiError> {
    let user_id = caller.require_customer()?;
    let wait = prefer_wait(&headers);
    if key.is_none() {
        return Err(ApiError::BadRequest {
            code: "idempotency_key_required",
            detail: "POST /v1/orders needs an Idempotency-Key header".into(),
        });
    }
    let meta = metadata(&caller, &trace, key.as_deref());
    let (state, body) = (&state, &body);
    Ok(idempotent(
        state,
        &caller,
        key,
        "POST /v1/orders",
        &body.0,
        Replays::from_events(placed_from_events),
        move |key| async move {
            let request: PlaceOrder = body.parse()?;
            let campaign_id: CampaignId = field_id(&request.campaign_id, "campaign_id")?;
            let unit_price_cents = state.prices.of(&state.handler, campaign_id).await?;
            // The id carries the key of the campaign and customer: the order's events travel in
            // its customer's partition (commands::bus::partition).
            let order_id = OrderId::from_ulid(order_ulid(
                crate::ids::new_ulid(),
                campaign_id,
                user_id,
            ));
            let command = OrderCommand::Place {
                order_id,
                user_id,
                campaign_id,
                quantity: request.quantity,
                unit_price_cents,
                now: chrono::Utc::now(),
            };
            let render = |order: &Option<Order>| placed(order.as_ref().expect("placed"));
            let stream = stream_id::<OrderAggregate>(order_id);
            let executed = state
                .create::<OrderAggregate>(&stream, &command, meta, key.as_ref(), &render)
                .await?;
            if executed.appended.is_some() {
                metrics::counter!("groupbuy_orders_placed_total", "campaign_id" => campaign_id.to_string())
                    .increment(1);
            }
            let reply = match decided(state, order_id, wait).await {
                Some(view) => {
                    let location =
                        HeaderValue::try_from(format!("/v1/orders/{order_id}")).expect("ascii");
                    Reply::json(StatusCode::ACCEPTED, &OrderBody::from(&view))
                        .with_header(header::LOCATION, location)
                        .superseding_recorded()
                }
                None => render(&executed.state),
            };
            Ok(reply)
        },
    )
    .await)
}

/// The answer to a placement: 202 with the order as placed.
fn placed(order: &Order) -> Reply {
    let view = OrderView::of(order, None);
    let location = HeaderValue::try_from(format!("/v1/orders/{}", order.order_id)).expect("ascii");
    Reply::json(StatusCode::ACCEPTED, &OrderBody::from(&view))
        .with_header(header::LOCATION, location)
}

/// The answer to a placement made again from the events it appended, for a retry: the log
/// keeps the placement's Idempotency-Key in its first event.
fn placed_from_events(events: &[schemas::Envelope]) -> Option<Reply> {
    let order = events.iter().try_fold(None, |order, envelope| {
        let event = schemas::from_envelope(envelope).ok()?;
        Some(OrderAggregate::evolve(order, &event))
    })?;
    Some(placed(order.as_ref()?))
}

/// `GET /v1/orders/{id}/events`: the order as Server-Sent Events, to its owner or the
/// operator. An `order` event carries the order (as `GET /v1/orders/{id}` does) now and after
/// every change; the stream ends once the order is final and its payment settled.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}/events",
    operation_id = "follow_order",
    tag = "orders",
    security(("bearer" = [])),
    params(OrderPath),
    responses(
        (status = 200, description = "Server-Sent Events: an `order` event with the order now and after every change, until it is final and its payment settled", body = OrderEvent, content_type = "text/event-stream"),
        (status = 404, description = "No such order, or another customer's"),
    )
)]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id: OrderId = path_id(&id, "order_not_found", "order")?;
    visible_order(&state, &caller, id).await?;
    let changes = state.read_model.changes();
    let changes = futures::stream::unfold(
        (state, changes, None::<serde_json::Value>, false),
        move |(state, mut changes, last, finished)| async move {
            if finished {
                return None;
            }
            loop {
                changes.borrow_and_update();
                let view = state.read_model.order(id).await.ok().flatten()?;
                let body = serde_json::to_value(OrderBody::from(&view)).ok()?;
                if last.as_ref() != Some(&body) {
                    let settled = !matches!(
                        view.status,
                        OrderStatus::Pending | OrderStatus::AwaitingPayment
                    ) && view
                        .payment
                        .as_ref()
                        .is_none_or(|p| p.status != domain::payment::PaymentStatus::Pending);
                    let event = SseEvent::default().event("order").json_data(&body).ok()?;
                    return Some((Ok(event), (state, changes, Some(body), settled)));
                }
                changes.changed().await.ok()?;
            }
        },
    );
    Ok(Sse::new(changes).keep_alive(KeepAlive::default()))
}

/// One Server-Sent Event of `GET /v1/orders/{id}/events`.
#[derive(ToSchema)]
#[allow(dead_code)] // Only describes the events, which axum's `Sse` writes.
pub struct OrderEvent {
    /// Always `order`.
    #[schema(pattern = "^order$")]
    event: String,
    /// The order as `GET /v1/orders/{id}` answers it, in JSON.
    #[schema(content_media_type = "application/json")]
    data: String,
}

/// The longest `Prefer: wait=N` is honoured, in seconds: below the request timeout.
pub const PREFER_WAIT_MAX_SECONDS: u64 = 20;

/// `Prefer: wait=N` (RFC 7240), capped; anything unreadable is ignored, as preferences are.
fn prefer_wait(headers: &axum::http::HeaderMap) -> std::time::Duration {
    let seconds = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .filter_map(|p| p.trim().strip_prefix("wait="))
        .find_map(|n| n.trim().parse::<u64>().ok())
        .unwrap_or(0);
    std::time::Duration::from_secs(seconds.min(PREFER_WAIT_MAX_SECONDS))
}

/// Waits up to `wait` for the order to leave `pending` in the read model; its view then.
async fn decided(
    state: &AppState,
    order_id: OrderId,
    wait: std::time::Duration,
) -> Option<OrderView> {
    if wait.is_zero() {
        return None;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut changes = state.read_model.changes();
    loop {
        changes.borrow_and_update();
        let view = state.read_model.order(order_id).await.ok().flatten();
        if let Some(view) = view.filter(|v| v.status != OrderStatus::Pending) {
            return Some(view);
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            return state.read_model.order(order_id).await.ok().flatten();
        }
    }
}

/// An order as the read model has it, once it caught up with this instance's writes; 404 to
/// a customer who does not own it.
async fn visible_order(
    state: &AppState,
    caller: &Caller,
    id: OrderId,
) -> Result<OrderView, ApiError> {
    state.caught_up(caller).await;
    let order = state.read_model.order(id).await?.ok_or_else(not_found)?;
    match caller {
        Caller::Customer(user) if order.user_id != *user => Err(not_found()),
        _ => Ok(order),
    }
}

/// One order, to its owner or the operator.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    operation_id = "get_order",
    tag = "orders",
    security(("bearer" = [])),
    params(OrderPath),
    responses(
        (status = 200, description = "The order", body = OrderBody),
        (status = 404, description = "No such order, or another customer's"),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<OrderBody>, ApiError> {
    let id: OrderId = path_id(&id, "order_not_found", "order")?;
    let order = visible_order(&state, &caller, id).await?;
    Ok(Json(OrderBody::from(&order)))
}

/// A customer's own orders, or (to the operator) everyone's; newest first, paged.
#[utoipa::path(
    get,
    path = "/v1/orders",
    operation_id = "list_orders",
    tag = "orders",
    security(("bearer" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "A page of orders, newest first", body = OrderPageBody),
        (status = 400, description = "An unknown query parameter, an unknown status, a limit out of range, or a cursor this API did not give out"),
        (status = 422, description = "`campaign_id` is not an id"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Json<OrderPageBody>, ApiError> {
    let q: ListQuery = query(raw.as_deref())?;
    let limit = q.limit.unwrap_or(ORDERS_PAGE_DEFAULT);
    if !(1..=projections::read_model::ORDERS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::BadRequest {
            code: "invalid_query",
            detail: "limit must be between 1 and 200".into(),
        });
    }
    // An empty `cursor=` is the first page, as no cursor is.
    let after: Option<OrderId> = q
        .cursor
        .as_deref()
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.parse().map_err(|_| ApiError::BadRequest {
                code: "invalid_cursor",
                detail: "cursor is not one this API gave out".into(),
            })
        })
        .transpose()?;
    let filter = OrderFilter {
        user_id: match caller {
            Caller::Customer(user) => Some(user),
            Caller::Operator => None,
        },
        campaign_id: q
            .campaign_id
            .as_deref()
            .map(|c| field_id(c, "campaign_id"))
            .transpose()?,
        status: q.status.map(OrderStatus::from),
    };
    state.caught_up(&caller).await;
    let page = state.read_model.orders(&filter, after, limit).await?;
    Ok(Json(OrderPageBody {
        items: page.items.iter().map(OrderBody::from).collect(),
        next_cursor: page.next.map(|id| id.to_string()),
    }))
}

/// The owner cancels an order that is not final yet. 202 with the order; 409 when final.
#[utoipa::path(
    post,
    path = "/v1/orders/{id}/cancel",
    operation_id = "cancel_order",
    tag = "orders",
    security(("bearer" = [])),
    params(OrderPath, IdempotencyKey),
    responses(
        (status = 202, description = "Cancelled; the saga releases the units", body = OrderBody),
        (status = 403, description = "Only the customer who placed it cancels an order"),
        (status = 404, description = "No such order, or another customer's"),
        (status = 409, description = "The order is final already (`order_already_final`)"),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    IdempotencyKeyHeader(key): IdempotencyKeyHeader,
    Trace(trace): Trace,
    Path(id): Path<String>,
    body: RawJson,
) -> Result<Response, ApiError> {
    let user_id = caller.require_customer()?;
    let order_id: OrderId = path_id(&id, "order_not_found", "order")?;
    let meta = metadata(&caller, &trace, key.as_deref());
    let route = format!("POST /v1/orders/{order_id}/cancel");
    let (state, body) = (&state, &body);
    Ok(idempotent(
        state,
        &caller,
        key,
        &route,
        &body.0,
        Replays::AS_STORED,
        move |key| async move {
            let stream = stream_id::<OrderAggregate>(order_id);
            let current = state.handler.load::<OrderAggregate>(&stream).await?.state;
            if current.as_ref().is_none_or(|o| o.user_id != user_id) {
                return Err(not_found());
            }
            let payment = state
                .read_model
                .order(order_id)
                .await?
                .and_then(|o| o.payment);
            let render = move |order: &Option<Order>| {
                let view = OrderView::of(order.as_ref().expect("exists"), payment.clone());
                Reply::json(StatusCode::ACCEPTED, &OrderBody::from(&view))
            };
            let command = OrderCommand::Cancel {
                reason: CancelReason::Customer,
                now: chrono::Utc::now(),
            };
            let executed = state
                .execute::<OrderAggregate>(&stream, &command, meta, key.as_ref(), &render)
                .await?;
            if let (Some(_), Some(order)) = (&executed.appended, &executed.state) {
                metrics::counter!(
                    "groupbuy_orders_cancelled_total",
                    "campaign_id" => order.campaign_id.to_string(),
                    "reason" => "customer"
                )
                .increment(1);
            }
            Ok(render(&executed.state))
        },
    )
    .await)
}
