//! What the gateway asks of a read model.

use std::collections::BTreeMap;

use async_trait::async_trait;
use domain::campaign::{CampaignStatus, Stock};
use domain::order::{CancelReason, OrderStatus, RejectReason};
use domain::payment::PaymentStatus;
use domain::{CampaignId, Cents, OrderId, PaymentId, StoreId, Timestamp, UserId};
use tokio::sync::watch;

/// Most orders one page may hold.
pub const ORDERS_PAGE_MAX: usize = 200;
/// Most campaigns one listing returns.
pub const CAMPAIGNS_LIST_MAX: usize = 1_000;

/// A campaign and its stock, as customers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CampaignView {
    /// Which campaign.
    pub campaign_id: CampaignId,
    /// Publishing store.
    pub store_id: StoreId,
    /// The drink.
    pub sku: String,
    /// Headline.
    pub title: String,
    /// Deal price per unit.
    pub price_cents: Cents,
    /// Initial stock.
    pub quota: u32,
    /// Most live units per user.
    pub per_user_limit: u32,
    /// Start of the sales window.
    pub starts_at: Timestamp,
    /// End of the sales window.
    pub ends_at: Timestamp,
    /// Payment window.
    pub payment_timeout_seconds: u32,
    /// When an operator closed it.
    pub closed_at: Option<Timestamp>,
    /// Its units.
    pub stock: Stock,
}

impl CampaignView {
    /// The view of a campaign aggregate, with its stock told from its own bucket and
    /// `others`, its other buckets.
    pub fn of(c: &domain::campaign::Campaign, others: &[domain::stock::StockBucket]) -> Self {
        CampaignView {
            campaign_id: c.campaign_id,
            store_id: c.store_id,
            sku: c.sku.clone(),
            title: c.title.clone(),
            price_cents: c.price_cents,
            quota: c.quota,
            per_user_limit: c.per_user_limit,
            starts_at: c.starts_at,
            ends_at: c.ends_at,
            payment_timeout_seconds: c.payment_timeout_seconds,
            closed_at: c.closed_at,
            stock: c.stock(others),
        }
    }
}

impl OrderView {
    /// The view of an order aggregate, with its payment as the read model knows it.
    pub fn of(order: &domain::order::Order, payment: Option<PaymentView>) -> Self {
        OrderView {
            order_id: order.order_id,
            user_id: order.user_id,
            campaign_id: order.campaign_id,
            quantity: order.quantity,
            amount_cents: order.amount_cents,
            status: order.status,
            rejection: order.rejection,
            cancellation: order.cancellation,
            payment,
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

impl CampaignView {
    /// Where it stands at `now`; the same rule as the aggregate's.
    pub fn status(&self, now: Timestamp) -> CampaignStatus {
        CampaignStatus::at(now, self.starts_at, self.ends_at, self.closed_at)
    }
}

/// The payment of an order, as the customer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentView {
    /// Which payment.
    pub payment_id: PaymentId,
    /// Where it stands.
    pub status: PaymentStatus,
    /// How much.
    pub amount_cents: Cents,
}

/// An order, as its customer sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderView {
    /// Which order.
    pub order_id: OrderId,
    /// Whose.
    pub user_id: UserId,
    /// For which campaign.
    pub campaign_id: CampaignId,
    /// Units.
    pub quantity: u32,
    /// Price.
    pub amount_cents: Cents,
    /// Where it stands.
    pub status: OrderStatus,
    /// Why it was rejected.
    pub rejection: Option<RejectReason>,
    /// Why it was cancelled.
    pub cancellation: Option<CancelReason>,
    /// Its payment, once requested.
    pub payment: Option<PaymentView>,
    /// When placed.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// Which orders to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderFilter {
    /// Only this customer's.
    pub user_id: Option<UserId>,
    /// Only this campaign's.
    pub campaign_id: Option<CampaignId>,
    /// Only in this status.
    pub status: Option<OrderStatus>,
}

/// A page of orders, newest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderPage {
    /// The orders.
    pub items: Vec<OrderView>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<OrderId>,
}

/// A read model failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    /// Its store failed.
    #[error("read model unavailable: {0}")]
    Unavailable(String),
    /// No version of it is live (a new deployment, a flushed or restarted store): it answers
    /// nothing until a rebuild makes one live.
    #[error("the {0} read model has no live version; it is being rebuilt from the log")]
    Missing(crate::ops::ProjectionName),
}

/// How a campaign's orders stand: how many are at each step now, the rejected and the
/// cancelled by reason. Kept by the orders read model as the orders move, so reading it costs
/// the same however many orders the campaign has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Funnel {
    /// Placed; stock not decided yet.
    pub pending: u64,
    /// Stock reserved, payment not answered yet.
    pub awaiting_payment: u64,
    /// Paid.
    pub confirmed: u64,
    /// Refused by the stock decision, by reason (`sold_out`, `limit_exceeded`, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Cancelled after placing, by reason (`customer`, `payment_failed`, ...).
    pub cancelled: BTreeMap<String, u64>,
}

impl Funnel {
    /// Every order ever placed in the campaign.
    pub fn placed(&self) -> u64 {
        self.pending
            + self.awaiting_payment
            + self.confirmed
            + self.rejected.values().sum::<u64>()
            + self.cancelled.values().sum::<u64>()
    }

    /// The counter an order in `status` for `reason` is counted in, as stores keep it:
    /// the status, and for a rejected or cancelled order its reason after a colon.
    pub fn field(status: OrderStatus, reason: &str) -> String {
        let status = crate::ops::snake(&status);
        if reason.is_empty() {
            status
        } else {
            format!("{status}:{reason}")
        }
    }

    /// The funnel of counters kept under [`Funnel::field`] names; counters of no known status
    /// and counters at zero or below are left out.
    pub fn from_counts<'a>(counts: impl IntoIterator<Item = (&'a str, i64)>) -> Funnel {
        let mut funnel = Funnel::default();
        for (field, count) in counts {
            let Ok(count) = u64::try_from(count) else {
                continue;
            };
            if count == 0 {
                continue;
            }
            let (status, reason) = field.split_once(':').unwrap_or((field, ""));
            match (crate::ops::unsnake::<OrderStatus>(status), reason) {
                (Some(OrderStatus::Pending), _) => funnel.pending += count,
                (Some(OrderStatus::AwaitingPayment), _) => funnel.awaiting_payment += count,
                (Some(OrderStatus::Confirmed), _) => funnel.confirmed += count,
                (Some(OrderStatus::Rejected), reason) => {
                    *funnel.rejected.entry(reason.to_owned()).or_default() += count;
                }
                (Some(OrderStatus::Cancelled), reason) => {
                    *funnel.cancelled.entry(reason.to_owned()).or_default() += count;
                }
                (None, _) => {}
            }
        }
        funnel
    }
}

/// The queries of the HTTP API.
#[async_trait]
pub trait ReadModel: Send + Sync + 'static {
    /// One campaign.
    async fn campaign(&self, id: CampaignId) -> Result<Option<CampaignView>, ReadModelError>;

    /// Campaigns, oldest first, optionally of one store and in one status at `now`; at most
    /// [`CAMPAIGNS_LIST_MAX`].
    async fn campaigns(
        &self,
        store_id: Option<StoreId>,
        status: Option<CampaignStatus>,
        now: Timestamp,
    ) -> Result<Vec<CampaignView>, ReadModelError>;

    /// One order.
    async fn order(&self, id: OrderId) -> Result<Option<OrderView>, ReadModelError>;

    /// Orders matching `filter`, newest first, older than `after`, at most `limit`.
    async fn orders(
        &self,
        filter: &OrderFilter,
        after: Option<OrderId>,
        limit: usize,
    ) -> Result<OrderPage, ReadModelError>;

    /// How the orders of campaign `id` stand; all zero for a campaign without orders.
    async fn funnel(&self, id: CampaignId) -> Result<Funnel, ReadModelError>;

    /// The last version of `stream_id` the live read model holding its views applied; 0 when
    /// none (or when no read model reads the stream).
    async fn applied_version(&self, stream_id: &str) -> Result<u64, ReadModelError>;

    /// [`ReadModel::applied_version`] of each of `stream_ids`, at once where the model can
    /// (one round trip for a consumer's batch).
    async fn applied_version_each(
        &self,
        stream_ids: &[String],
    ) -> Result<Vec<u64>, ReadModelError> {
        let mut versions = Vec::with_capacity(stream_ids.len());
        for stream_id in stream_ids {
            versions.push(self.applied_version(stream_id).await?);
        }
        Ok(versions)
    }

    /// [`ReadModel::applied_version`] of each of `stream_ids`, at once, for a reader waiting
    /// to see its writes: [`ReadModelError::Missing`] when a read model of them has no live
    /// version, which will show nothing until a rebuild makes one live.
    async fn applied_versions(&self, stream_ids: &[String]) -> Result<Vec<u64>, ReadModelError> {
        self.applied_version_each(stream_ids).await
    }

    /// A counter that moves whenever a read model may have changed: wait on it, then query
    /// again. It may move without a change, and under load one move may stand for many.
    fn changes(&self) -> watch::Receiver<u64>;

    /// Checks the store answers, for readiness probes.
    async fn ping(&self) -> Result<(), ReadModelError> {
        Ok(())
    }
}

/// Waits until `model` has applied every (stream, version) of `writes`, or `timeout` passes.
/// Returns the writes it does not show yet.
pub async fn wait_for_all(
    model: &dyn ReadModel,
    mut writes: Vec<(String, u64)>,
    timeout: std::time::Duration,
) -> Result<Vec<(String, u64)>, ReadModelError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut changes = model.changes();
    loop {
        changes.borrow_and_update();
        if writes.is_empty() {
            return Ok(writes);
        }
        let streams: Vec<String> = writes.iter().map(|(s, _)| s.clone()).collect();
        let applied = model.applied_versions(&streams).await?;
        let mut applied = applied.into_iter();
        writes.retain(|(_, version)| applied.next().unwrap_or(0) < *version);
        if writes.is_empty() {
            return Ok(writes);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Ok(writes),
        }
    }
}
