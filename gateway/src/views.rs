//! The JSON bodies of API.md, built from read-model views. Each derives its OpenAPI schema
//! ([`crate::openapi`]), so the document describes what is sent, field for field.

use domain::campaign::{CampaignStatus, Stock};
use domain::order::{CancelReason, OrderStatus, RejectReason};
use domain::payment::PaymentStatus;
use domain::{CampaignId, OrderId, PaymentId, StoreId, Timestamp, UserId};
use projections::{CampaignView, OrderView};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A campaign with its stock.
#[derive(Serialize, ToSchema)]
#[schema(as = Campaign)]
pub struct CampaignBody {
    #[schema(value_type = String, format = Ulid)]
    campaign_id: CampaignId,
    #[schema(value_type = String, format = Ulid)]
    store_id: StoreId,
    sku: String,
    title: String,
    price_cents: u64,
    quota: u32,
    per_user_limit: u32,
    #[schema(value_type = String, format = DateTime)]
    starts_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    ends_at: Timestamp,
    payment_timeout_seconds: u32,
    status: CampaignStatusBody,
    stock: StockBody,
}

impl CampaignBody {
    /// The body of a campaign view at `now`.
    pub fn new(view: &CampaignView, now: Timestamp) -> CampaignBody {
        CampaignBody {
            campaign_id: view.campaign_id,
            store_id: view.store_id,
            sku: view.sku.clone(),
            title: view.title.clone(),
            price_cents: view.price_cents.get(),
            quota: view.quota,
            per_user_limit: view.per_user_limit,
            starts_at: view.starts_at,
            ends_at: view.ends_at,
            payment_timeout_seconds: view.payment_timeout_seconds,
            status: view.status(now).into(),
            stock: view.stock.into(),
        }
    }
}

/// Where a campaign stands: before, within or after its sales window (or closed).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = CampaignStatus)]
pub enum CampaignStatusBody {
    /// Before its sales window.
    Scheduled,
    /// Taking orders.
    Open,
    /// Closed by the operator, or past its window.
    Closed,
}

impl From<CampaignStatus> for CampaignStatusBody {
    fn from(status: CampaignStatus) -> Self {
        match status {
            CampaignStatus::Scheduled => CampaignStatusBody::Scheduled,
            CampaignStatus::Open => CampaignStatusBody::Open,
            CampaignStatus::Closed => CampaignStatusBody::Closed,
        }
    }
}

impl From<CampaignStatusBody> for CampaignStatus {
    fn from(status: CampaignStatusBody) -> Self {
        match status {
            CampaignStatusBody::Scheduled => CampaignStatus::Scheduled,
            CampaignStatusBody::Open => CampaignStatus::Open,
            CampaignStatusBody::Closed => CampaignStatus::Closed,
        }
    }
}

/// A campaign's units: `available + reserved + sold == total`.
#[derive(Serialize, ToSchema)]
#[schema(as = Stock)]
pub struct StockBody {
    /// Every unit the campaign ever had: quota plus replenishments.
    total: u32,
    /// Units nobody holds.
    available: u32,
    /// Units held for orders awaiting payment.
    reserved: u32,
    /// Units paid for.
    sold: u32,
}

impl From<Stock> for StockBody {
    fn from(stock: Stock) -> Self {
        StockBody {
            total: stock.total,
            available: stock.available,
            reserved: stock.reserved,
            sold: stock.sold,
        }
    }
}

/// An order's payment.
#[derive(Serialize, ToSchema)]
#[schema(as = Payment)]
pub struct PaymentBody {
    #[schema(value_type = String, format = Ulid)]
    payment_id: PaymentId,
    status: PaymentStatusBody,
    amount_cents: u64,
}

/// Where a payment stands.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = PaymentStatus)]
pub enum PaymentStatusBody {
    /// Requested, no answer yet.
    Pending,
    /// The provider took the money.
    Succeeded,
    /// The provider refused.
    Failed,
    /// No answer before the deadline.
    TimedOut,
    /// The money went back.
    Refunded,
}

impl From<PaymentStatus> for PaymentStatusBody {
    fn from(status: PaymentStatus) -> Self {
        match status {
            PaymentStatus::Pending => PaymentStatusBody::Pending,
            PaymentStatus::Succeeded => PaymentStatusBody::Succeeded,
            PaymentStatus::Failed => PaymentStatusBody::Failed,
            PaymentStatus::TimedOut => PaymentStatusBody::TimedOut,
            PaymentStatus::Refunded => PaymentStatusBody::Refunded,
        }
    }
}

/// Where an order stands.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = OrderStatus)]
pub enum OrderStatusBody {
    /// Placed; stock not decided yet.
    Pending,
    /// Stock reserved and payment requested.
    AwaitingPayment,
    /// Paid. Final.
    Confirmed,
    /// Refused by the stock decision (see `reason`). Final.
    Rejected,
    /// Cancelled after placing (see `reason`). Final.
    Cancelled,
}

impl From<OrderStatus> for OrderStatusBody {
    fn from(status: OrderStatus) -> Self {
        match status {
            OrderStatus::Pending => OrderStatusBody::Pending,
            OrderStatus::AwaitingPayment => OrderStatusBody::AwaitingPayment,
            OrderStatus::Confirmed => OrderStatusBody::Confirmed,
            OrderStatus::Rejected => OrderStatusBody::Rejected,
            OrderStatus::Cancelled => OrderStatusBody::Cancelled,
        }
    }
}

impl From<OrderStatusBody> for OrderStatus {
    fn from(status: OrderStatusBody) -> Self {
        match status {
            OrderStatusBody::Pending => OrderStatus::Pending,
            OrderStatusBody::AwaitingPayment => OrderStatus::AwaitingPayment,
            OrderStatusBody::Confirmed => OrderStatus::Confirmed,
            OrderStatusBody::Rejected => OrderStatus::Rejected,
            OrderStatusBody::Cancelled => OrderStatus::Cancelled,
        }
    }
}

/// Why an order was rejected or cancelled.
#[derive(Clone, Copy, Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = OrderReason)]
pub enum OrderReasonBody {
    /// Rejected: not enough units.
    SoldOut,
    /// Rejected: over the per-user limit.
    LimitExceeded,
    /// Rejected: outside the sales window, or closed.
    CampaignNotOpen,
    /// Cancelled by the customer.
    Customer,
    /// Cancelled: the provider said the payment failed.
    PaymentFailed,
    /// Cancelled: nobody paid before the deadline.
    PaymentTimeout,
}

impl OrderReasonBody {
    fn of(rejection: Option<RejectReason>, cancellation: Option<CancelReason>) -> Option<Self> {
        Some(match (rejection, cancellation) {
            (Some(RejectReason::SoldOut), _) => OrderReasonBody::SoldOut,
            (Some(RejectReason::LimitExceeded), _) => OrderReasonBody::LimitExceeded,
            (Some(RejectReason::CampaignNotOpen), _) => OrderReasonBody::CampaignNotOpen,
            (None, Some(CancelReason::Customer)) => OrderReasonBody::Customer,
            (None, Some(CancelReason::PaymentFailed)) => OrderReasonBody::PaymentFailed,
            (None, Some(CancelReason::PaymentTimeout)) => OrderReasonBody::PaymentTimeout,
            (None, None) => return None,
        })
    }
}

/// An order.
#[derive(Serialize, ToSchema)]
#[schema(as = Order)]
pub struct OrderBody {
    #[schema(value_type = String, format = Ulid)]
    order_id: OrderId,
    #[schema(value_type = String, format = Ulid)]
    user_id: UserId,
    #[schema(value_type = String, format = Ulid)]
    campaign_id: CampaignId,
    quantity: u32,
    amount_cents: u64,
    status: OrderStatusBody,
    /// Why it was rejected or cancelled; null otherwise.
    reason: Option<OrderReasonBody>,
    /// Null until the payment is requested.
    payment: Option<PaymentBody>,
    #[schema(value_type = String, format = DateTime)]
    created_at: Timestamp,
    #[schema(value_type = String, format = DateTime)]
    updated_at: Timestamp,
}

impl From<&OrderView> for OrderBody {
    fn from(view: &OrderView) -> OrderBody {
        OrderBody {
            order_id: view.order_id,
            user_id: view.user_id,
            campaign_id: view.campaign_id,
            quantity: view.quantity,
            amount_cents: view.amount_cents.get(),
            status: view.status.into(),
            reason: OrderReasonBody::of(view.rejection, view.cancellation),
            payment: view.payment.as_ref().map(|p| PaymentBody {
                payment_id: p.payment_id,
                status: p.status.into(),
                amount_cents: p.amount_cents.get(),
            }),
            created_at: view.created_at,
            updated_at: view.updated_at,
        }
    }
}

/// The campaigns that match a listing.
#[derive(Serialize, ToSchema)]
#[schema(as = CampaignList)]
pub struct CampaignListBody {
    /// The campaigns.
    pub items: Vec<CampaignBody>,
}

/// A page of orders.
#[derive(Serialize, ToSchema)]
#[schema(as = OrderPage)]
pub struct OrderPageBody {
    /// The orders, newest first.
    pub items: Vec<OrderBody>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}
