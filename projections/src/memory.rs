//! Read models in process memory: the embedded default, and what each gateway instance uses
//! until the Redis read models land.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;

use async_trait::async_trait;
use commands::{LogCursor, RecordedEvent};
use domain::campaign::{CampaignEvent, CampaignStatus, Stock};
use domain::order::{OrderEvent, OrderStatus};
use domain::payment::{PaymentEvent, PaymentStatus};
use domain::{CampaignId, OrderId, PaymentId, StoreId, Timestamp, UserId};
use tokio::sync::watch;

use crate::read_model::{
    CampaignView, OrderFilter, OrderPage, OrderView, PaymentView, ReadModel, ReadModelError,
    CAMPAIGNS_LIST_MAX, ORDERS_PAGE_MAX,
};

/// Campaign and order views in memory.
pub struct MemoryReadModel {
    views: RwLock<Views>,
    position: watch::Sender<LogCursor>,
}

#[derive(Default)]
struct Views {
    campaigns: BTreeMap<CampaignId, CampaignView>,
    orders: BTreeMap<OrderId, OrderView>,
    by_user: HashMap<UserId, BTreeSet<OrderId>>,
    by_campaign: HashMap<CampaignId, BTreeSet<OrderId>>,
    payment_orders: HashMap<PaymentId, OrderId>,
}

impl Default for MemoryReadModel {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryReadModel {
    /// An empty model at the start of the log.
    pub fn new() -> Self {
        MemoryReadModel {
            views: RwLock::new(Views::default()),
            position: watch::channel(LogCursor::default()).0,
        }
    }

    /// Applies events in log order. Events at or before the current position are skipped, so
    /// a batch delivered twice changes nothing the second time.
    pub fn apply(&self, batch: &[RecordedEvent]) -> Result<(), schemas::SchemaError> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let position = *self.position.borrow();
        {
            let mut views = self.views.write().unwrap_or_else(|p| p.into_inner());
            for recorded in batch.iter().filter(|r| r.cursor > position) {
                views.apply(recorded)?;
            }
        }
        self.position.send_if_modified(|p| {
            let moved = last.cursor > *p;
            *p = (*p).max(last.cursor);
            moved
        });
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Views> {
        self.views.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Views {
    fn apply(&mut self, recorded: &RecordedEvent) -> Result<(), schemas::SchemaError> {
        let envelope = &recorded.envelope;
        match envelope.category() {
            "campaign" => self.apply_campaign(
                stream_ulid(&envelope.stream_id),
                &schemas::from_envelope(envelope)?,
            ),
            "order" => self.apply_order(
                stream_ulid(&envelope.stream_id),
                &schemas::from_envelope(envelope)?,
            ),
            "payment" => self.apply_payment(
                stream_ulid(&envelope.stream_id),
                &schemas::from_envelope(envelope)?,
            ),
            _ => {}
        }
        Ok(())
    }

    fn apply_campaign(&mut self, id: Option<ulid::Ulid>, event: &CampaignEvent) {
        let Some(id) = id.map(CampaignId::from_ulid) else {
            return;
        };
        if let CampaignEvent::CampaignCreated(c) = event {
            self.campaigns.insert(
                id,
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
                    closed_at: None,
                    stock: Stock {
                        total: c.quota,
                        available: c.quota,
                        reserved: 0,
                        sold: 0,
                    },
                },
            );
            return;
        }
        let Some(view) = self.campaigns.get_mut(&id) else {
            return;
        };
        let stock = &mut view.stock;
        match *event {
            CampaignEvent::CampaignCreated(_) => unreachable!("handled above"),
            CampaignEvent::StockReplenished { quantity, .. } => {
                stock.total += quantity;
                stock.available += quantity;
            }
            CampaignEvent::CampaignClosed { at } => view.closed_at = Some(at),
            CampaignEvent::StockReserved { quantity, .. } => {
                stock.available -= quantity;
                stock.reserved += quantity;
            }
            CampaignEvent::StockReleased { quantity, .. } => {
                stock.reserved -= quantity;
                stock.available += quantity;
            }
            CampaignEvent::StockSold { quantity, .. } => {
                stock.reserved -= quantity;
                stock.sold += quantity;
            }
        }
    }

    fn apply_order(&mut self, id: Option<ulid::Ulid>, event: &OrderEvent) {
        let Some(id) = id.map(OrderId::from_ulid) else {
            return;
        };
        if let OrderEvent::OrderPlaced {
            order_id,
            user_id,
            campaign_id,
            quantity,
            amount_cents,
            placed_at,
            ..
        } = *event
        {
            self.orders.insert(
                id,
                OrderView {
                    order_id,
                    user_id,
                    campaign_id,
                    quantity,
                    amount_cents,
                    status: OrderStatus::Pending,
                    rejection: None,
                    cancellation: None,
                    payment: None,
                    created_at: placed_at,
                    updated_at: placed_at,
                },
            );
            self.by_user.entry(user_id).or_default().insert(id);
            self.by_campaign.entry(campaign_id).or_default().insert(id);
            return;
        }
        let Some(order) = self.orders.get_mut(&id) else {
            return;
        };
        match *event {
            OrderEvent::OrderPlaced { .. } => unreachable!("handled above"),
            OrderEvent::OrderRejected { reason, at } => {
                order.status = OrderStatus::Rejected;
                order.rejection = Some(reason);
                order.updated_at = at;
            }
            OrderEvent::OrderAwaitingPayment { payment_id, at, .. } => {
                order.status = OrderStatus::AwaitingPayment;
                order.updated_at = at;
                self.payment_orders.insert(payment_id, id);
                if order.payment.is_none() {
                    order.payment = Some(PaymentView {
                        payment_id,
                        status: PaymentStatus::Pending,
                        amount_cents: order.amount_cents,
                    });
                }
            }
            OrderEvent::OrderConfirmed { at, .. } => {
                order.status = OrderStatus::Confirmed;
                order.updated_at = at;
            }
            OrderEvent::OrderCancelled { reason, at } => {
                order.status = OrderStatus::Cancelled;
                order.cancellation = Some(reason);
                order.updated_at = at;
            }
        }
    }

    fn apply_payment(&mut self, id: Option<ulid::Ulid>, event: &PaymentEvent) {
        let Some(payment_id) = id.map(PaymentId::from_ulid) else {
            return;
        };
        let (status, at) = match *event {
            PaymentEvent::PaymentRequested {
                order_id,
                amount_cents,
                at,
                ..
            } => {
                self.payment_orders.insert(payment_id, order_id);
                if let Some(order) = self.orders.get_mut(&order_id) {
                    order.payment = Some(PaymentView {
                        payment_id,
                        status: PaymentStatus::Pending,
                        amount_cents,
                    });
                    order.updated_at = order.updated_at.max(at);
                }
                return;
            }
            PaymentEvent::PaymentSucceeded { at, .. } => (PaymentStatus::Succeeded, at),
            PaymentEvent::PaymentFailed { at, .. } => (PaymentStatus::Failed, at),
            PaymentEvent::PaymentTimedOut { at } => (PaymentStatus::TimedOut, at),
            PaymentEvent::PaymentRefunded { at } => (PaymentStatus::Refunded, at),
        };
        let order = self
            .payment_orders
            .get(&payment_id)
            .and_then(|o| self.orders.get_mut(o));
        if let Some(order) = order {
            if let Some(payment) = order.payment.as_mut() {
                payment.status = status;
            }
            order.updated_at = order.updated_at.max(at);
        }
    }
}

/// The aggregate id in a stream id `<category>-<ulid>`.
fn stream_ulid(stream_id: &str) -> Option<ulid::Ulid> {
    stream_id
        .split_once('-')
        .and_then(|(_, id)| ulid::Ulid::from_string(id).ok())
}

#[async_trait]
impl ReadModel for MemoryReadModel {
    async fn campaign(&self, id: CampaignId) -> Result<Option<CampaignView>, ReadModelError> {
        Ok(self.read().campaigns.get(&id).cloned())
    }

    async fn campaigns(
        &self,
        store_id: Option<StoreId>,
        status: Option<CampaignStatus>,
        now: Timestamp,
    ) -> Result<Vec<CampaignView>, ReadModelError> {
        Ok(self
            .read()
            .campaigns
            .values()
            .filter(|c| store_id.is_none_or(|s| c.store_id == s))
            .filter(|c| status.is_none_or(|s| c.status(now) == s))
            .take(CAMPAIGNS_LIST_MAX)
            .cloned()
            .collect())
    }

    async fn order(&self, id: OrderId) -> Result<Option<OrderView>, ReadModelError> {
        Ok(self.read().orders.get(&id).cloned())
    }

    async fn orders(
        &self,
        filter: &OrderFilter,
        after: Option<OrderId>,
        limit: usize,
    ) -> Result<OrderPage, ReadModelError> {
        let limit = limit.clamp(1, ORDERS_PAGE_MAX);
        let views = self.read();
        let empty = BTreeSet::new();
        // Walk the narrowest index the filter allows, newest first.
        let ids: Box<dyn Iterator<Item = &OrderId>> = match (filter.user_id, filter.campaign_id) {
            (Some(user), _) => Box::new(views.by_user.get(&user).unwrap_or(&empty).iter().rev()),
            (None, Some(campaign)) => Box::new(
                views
                    .by_campaign
                    .get(&campaign)
                    .unwrap_or(&empty)
                    .iter()
                    .rev(),
            ),
            (None, None) => Box::new(views.orders.keys().rev()),
        };
        let mut matching = ids
            .filter(|id| after.is_none_or(|a| **id < a))
            .filter_map(|id| views.orders.get(id))
            .filter(|o| filter.user_id.is_none_or(|u| o.user_id == u))
            .filter(|o| filter.campaign_id.is_none_or(|c| o.campaign_id == c))
            .filter(|o| filter.status.is_none_or(|s| o.status == s));
        let items: Vec<OrderView> = matching.by_ref().take(limit).cloned().collect();
        let next = if matching.next().is_some() {
            items.last().map(|o| o.order_id)
        } else {
            None
        };
        Ok(OrderPage { items, next })
    }

    fn position(&self) -> watch::Receiver<LogCursor> {
        self.position.subscribe()
    }
}
