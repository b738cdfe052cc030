//! The JSON bodies of API.md, built from read-model views.

use domain::campaign::{CampaignStatus, Stock};
use domain::order::{OrderStatus, RejectReason};
use domain::payment::PaymentStatus;
use domain::{CampaignId, OrderId, PaymentId, StoreId, Timestamp, UserId};
use projections::{CampaignView, OrderView};
use serde::Serialize;

/// A campaign with its stock.
#[derive(Serialize)]
pub struct CampaignBody {
    campaign_id: CampaignId,
    store_id: StoreId,
    sku: String,
    title: String,
    price_cents: u64,
    quota: u32,
    per_user_limit: u32,
    starts_at: Timestamp,
    ends_at: Timestamp,
    payment_timeout_seconds: u32,
    status: CampaignStatus,
    stock: Stock,
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
            status: view.status(now),
            stock: view.stock,
        }
    }
}

/// An order's payment.
#[derive(Serialize)]
pub struct PaymentBody {
    payment_id: PaymentId,
    status: PaymentStatus,
    amount_cents: u64,
}

/// An order.
#[derive(Serialize)]
pub struct OrderBody {
    order_id: OrderId,
    user_id: UserId,
    campaign_id: CampaignId,
    quantity: u32,
    amount_cents: u64,
    status: OrderStatus,
    reason: Option<&'static str>,
    payment: Option<PaymentBody>,
    created_at: Timestamp,
    updated_at: Timestamp,
}

impl From<&OrderView> for OrderBody {
    fn from(view: &OrderView) -> OrderBody {
        let reason = match (view.rejection, view.cancellation) {
            (Some(RejectReason::SoldOut), _) => Some("sold_out"),
            (Some(RejectReason::LimitExceeded), _) => Some("limit_exceeded"),
            (Some(RejectReason::CampaignNotOpen), _) => Some("campaign_not_open"),
            (None, Some(domain::order::CancelReason::Customer)) => Some("customer"),
            (None, Some(domain::order::CancelReason::PaymentFailed)) => Some("payment_failed"),
            (None, Some(domain::order::CancelReason::PaymentTimeout)) => Some("payment_timeout"),
            (None, None) => None,
        };
        OrderBody {
            order_id: view.order_id,
            user_id: view.user_id,
            campaign_id: view.campaign_id,
            quantity: view.quantity,
            amount_cents: view.amount_cents.get(),
            status: view.status,
            reason,
            payment: view.payment.as_ref().map(|p| PaymentBody {
                payment_id: p.payment_id,
                status: p.status,
                amount_cents: p.amount_cents.get(),
            }),
            created_at: view.created_at,
            updated_at: view.updated_at,
        }
    }
}

/// A list of items.
#[derive(Serialize)]
pub struct Items<T> {
    /// The items.
    pub items: Vec<T>,
}

/// A page of orders.
#[derive(Serialize)]
pub struct OrderPageBody {
    /// The orders.
    pub items: Vec<OrderBody>,
    /// The cursor of the next page, or null.
    pub next_cursor: Option<String>,
}
