//! The invariants, checked against the log after every step.
//!
//! The [`Model`] folds the log's new events after each step with the aggregates' own `evolve`
//! (so a step costs its events, not the whole log), counts what happened to each order's
//! units, and then checks every campaign, holding and order it knows. The checks are the
//! business's, stated independently of the code under test: stock adds up, nobody holds more
//! than the limit, and every order agrees with its units and its money.

use std::collections::{BTreeMap, BTreeSet};

use commands::log::memory::MemoryEventLog;
use commands::{EventLog, LogCursor, RecordedEvent};
use domain::campaign::{Campaign, CampaignAggregate, CampaignEvent};
use domain::holding::{Holding, HoldingAggregate, HoldingEvent, ReservationState};
use domain::order::{Order, OrderAggregate, OrderEvent, OrderStatus};
use domain::payment::{Payment, PaymentAggregate, PaymentEvent, PaymentStatus};
use domain::stock::StockBucketEvent;
use domain::{Aggregate, CampaignId, OrderId, UserId};

/// What happened to one order's units, counted from the holdings' events.
#[derive(Clone, Copy, Debug, Default)]
struct Units {
    reserved: u32,
    released: u32,
    sold: u32,
}

/// A campaign's stock as its buckets' events count it, kept apart from the aggregates'
/// `evolve` (which asserts invariants of its own): units in all, available in each bucket
/// (any sign, so that a wrong move shows as a number, not a panic), and sold.
#[derive(Clone, Debug, Default)]
struct Ledger {
    total: i64,
    available: BTreeMap<u32, i64>,
    sold: i64,
}

impl Ledger {
    /// Moves the counters of `bucket` by a `StockMoved` or a transfer.
    fn moved(&mut self, bucket: u32, available: i64, sold: i64) {
        *self.available.entry(bucket).or_default() += available;
        self.sold += sold;
    }

    fn campaign(&mut self, event: &CampaignEvent) {
        match event {
            CampaignEvent::CampaignCreated(created) => {
                self.total += i64::from(created.quota);
                self.moved(0, i64::from(created.quota), 0);
            }
            CampaignEvent::StockReplenished { quantity, .. } => {
                self.total += i64::from(*quantity);
                self.moved(0, i64::from(*quantity), 0);
            }
            CampaignEvent::StockMoved {
                reserved,
                released,
                sold,
                ..
            } => self.moved(
                0,
                i64::from(*released) - i64::from(*reserved),
                i64::from(*sold),
            ),
            CampaignEvent::StockTransferredOut { units, .. } => {
                self.moved(0, -i64::from(*units), 0)
            }
            CampaignEvent::StockTransferredIn { units, .. } => self.moved(0, i64::from(*units), 0),
            _ => {}
        }
    }

    fn bucket(&mut self, bucket: u32, event: &StockBucketEvent) {
        match event {
            StockBucketEvent::StockMoved {
                reserved,
                released,
                sold,
                ..
            } => self.moved(
                bucket,
                i64::from(*released) - i64::from(*reserved),
                i64::from(*sold),
            ),
            StockBucketEvent::StockTransferredOut { units, .. } => {
                self.moved(bucket, -i64::from(*units), 0)
            }
            StockBucketEvent::StockTransferredIn { units, .. } => {
                self.moved(bucket, i64::from(*units), 0)
            }
        }
    }
}

/// Everything the log says, folded.
#[derive(Default)]
pub struct Model {
    cursor: LogCursor,
    /// Events folded so far.
    pub events: u64,
    campaigns: BTreeMap<CampaignId, Campaign>,
    ledgers: BTreeMap<CampaignId, Ledger>,
    /// Campaigns whose stock moved in the transaction being folded: checked when it ends, as
    /// a transfer leaves one bucket after it reached the other.
    moved: BTreeSet<CampaignId>,
    transaction: u64,
    holdings: BTreeMap<(CampaignId, UserId), Holding>,
    /// Orders with their payment (by the order's id: a payment has its order's id).
    pub orders: BTreeMap<OrderId, Order>,
    payments: BTreeMap<OrderId, Payment>,
    units: BTreeMap<OrderId, Units>,
}

impl Model {
    /// Folds the events appended since the last call.
    pub async fn catch_up(&mut self, log: &MemoryEventLog) -> Result<(), String> {
        loop {
            let batch = log
                .read_all(self.cursor, commands::log::READ_EVENTS_MAX)
                .await
                .map_err(|e| format!("reading the log: {e}"))?;
            let Some(last) = batch.last() else {
                return Ok(());
            };
            self.cursor = last.cursor;
            for event in &batch {
                if event.cursor.transaction_id != self.transaction {
                    self.transaction_ended()?;
                    self.transaction = event.cursor.transaction_id;
                }
                self.fold(event)?;
            }
            // The simulation's transactions are far smaller than a read: none is cut short.
            self.transaction_ended()?;
        }
    }

    fn transaction_ended(&mut self) -> Result<(), String> {
        for campaign_id in std::mem::take(&mut self.moved) {
            check_ledger(campaign_id, &self.ledgers[&campaign_id])?;
        }
        Ok(())
    }

    fn fold(&mut self, recorded: &RecordedEvent) -> Result<(), String> {
        let envelope = &recorded.envelope;
        let undecodable = |e: schemas::SchemaError| format!("{}: {e}", envelope.stream_id);
        self.events += 1;
        let (category, id) = envelope
            .stream_id
            .split_once('-')
            .ok_or_else(|| format!("stream {} has no category", envelope.stream_id))?;
        match category {
            "campaign" => {
                let event: CampaignEvent = schemas::from_envelope(envelope).map_err(undecodable)?;
                let campaign_id: CampaignId = id.parse().map_err(|_| "campaign id")?;
                self.ledgers
                    .entry(campaign_id)
                    .or_default()
                    .campaign(&event);
                self.moved.insert(campaign_id);
                if matches!(
                    event,
                    CampaignEvent::StockMoved { .. }
                        | CampaignEvent::StockTransferredOut { .. }
                        | CampaignEvent::StockTransferredIn { .. }
                ) {
                    // Counted by the ledger alone: the aggregate's own assertions would stop
                    // the model at the first wrong move, before its checks could say what.
                    return Ok(());
                }
                let state = self.campaigns.remove(&campaign_id);
                if let Some(campaign) = CampaignAggregate::evolve(state, &event) {
                    self.campaigns.insert(campaign_id, campaign);
                }
            }
            "stock" => {
                let event: StockBucketEvent =
                    schemas::from_envelope(envelope).map_err(undecodable)?;
                let (campaign, bucket) = id.rsplit_once('-').ok_or("bucket stream id")?;
                let campaign_id: CampaignId =
                    campaign.parse().map_err(|_| "bucket's campaign id")?;
                let bucket: u32 = bucket.parse().map_err(|_| "bucket number")?;
                self.ledgers
                    .entry(campaign_id)
                    .or_default()
                    .bucket(bucket, &event);
                self.moved.insert(campaign_id);
            }
            "holding" => {
                let event: HoldingEvent = schemas::from_envelope(envelope).map_err(undecodable)?;
                let (key, order_id) = match &event {
                    HoldingEvent::UnitsReserved {
                        order_id,
                        campaign_id,
                        user_id,
                        ..
                    }
                    | HoldingEvent::UnitsReleased {
                        order_id,
                        campaign_id,
                        user_id,
                        ..
                    }
                    | HoldingEvent::UnitsSold {
                        order_id,
                        campaign_id,
                        user_id,
                        ..
                    } => ((*campaign_id, *user_id), *order_id),
                };
                let units = self.units.entry(order_id).or_default();
                match &event {
                    HoldingEvent::UnitsReserved { .. } => units.reserved += 1,
                    HoldingEvent::UnitsReleased { .. } => units.released += 1,
                    HoldingEvent::UnitsSold { .. } => units.sold += 1,
                }
                check_units(order_id, *units)?;
                let state = self.holdings.remove(&key).unwrap_or_default();
                self.holdings
                    .insert(key, HoldingAggregate::evolve(state, &event));
            }
            "order" => {
                let event: OrderEvent = schemas::from_envelope(envelope).map_err(undecodable)?;
                let order_id: OrderId = id.parse().map_err(|_| "order id")?;
                let state = self.orders.remove(&order_id);
                if let Some(order) = OrderAggregate::evolve(state, &event) {
                    // An order awaiting payment requested it: the payment's stream starts with
                    // its first answer.
                    if let Some(requested) = Payment::requested_by(&order) {
                        self.payments.entry(order_id).or_insert(requested);
                    }
                    self.orders.insert(order_id, order);
                }
            }
            "payment" => {
                let event: PaymentEvent = schemas::from_envelope(envelope).map_err(undecodable)?;
                let order_id: OrderId = id.parse().map_err(|_| "payment id")?;
                let state = self.payments.remove(&order_id);
                if state.is_none() && !matches!(event, PaymentEvent::PaymentRequested { .. }) {
                    return Err(format!("payment {order_id} answered, never requested"));
                }
                if let Some(payment) = PaymentAggregate::evolve(state, &event) {
                    self.payments.insert(order_id, payment);
                }
            }
            other => return Err(format!("unexpected stream category {other}")),
        }
        Ok(())
    }

    /// Every invariant that holds after every step.
    pub fn check(&self) -> Result<(), String> {
        for campaign in self.campaigns.values() {
            self.check_stock(campaign)?;
        }
        for ((campaign_id, user_id), holding) in &self.holdings {
            let limit = self
                .campaigns
                .get(campaign_id)
                .map_or(0, |c| c.per_user_limit);
            if holding.live_units > limit {
                return Err(format!(
                    "per-user limit: customer {user_id} holds {} units of campaign \
                     {campaign_id}, limit {limit}",
                    holding.live_units
                ));
            }
            let held: u32 = holding.orders.values().map(|h| h.quantity).sum();
            if held != holding.live_units {
                return Err(format!(
                    "holding of {user_id}: {held} units by order, {} live",
                    holding.live_units
                ));
            }
        }
        for (order_id, order) in &self.orders {
            self.check_order(*order_id, order)?;
        }
        for (order_id, payment) in &self.payments {
            if !self.orders.contains_key(order_id) {
                return Err(format!("payment {order_id} has no order"));
            }
            if payment.status == PaymentStatus::Refunded
                && self.orders[order_id].status != OrderStatus::Cancelled
            {
                return Err(format!("order {order_id}: refunded but not cancelled"));
            }
        }
        Ok(())
    }

    /// Total = available + reserved + sold, with reserved and sold as the holdings hold them
    /// and available and sold as the buckets count them.
    fn check_stock(&self, campaign: &Campaign) -> Result<(), String> {
        let id = campaign.campaign_id;
        let ledger = self.ledgers.get(&id).cloned().unwrap_or_default();
        let available: i64 = ledger.available.values().sum();
        let sold_in_buckets = ledger.sold;
        let (mut reserved, mut sold) = (0i64, 0i64);
        let holdings = self.holdings.range(
            (id, UserId::from_ulid(ulid::Ulid(0)))..=(id, UserId::from_ulid(ulid::Ulid(u128::MAX))),
        );
        for (_, holding) in holdings {
            for held in holding.orders.values() {
                match held.state {
                    ReservationState::Reserved => reserved += i64::from(held.quantity),
                    ReservationState::Sold => sold += i64::from(held.quantity),
                }
            }
        }
        let total = ledger.total;
        if total != i64::from(campaign.total_units) {
            return Err(format!(
                "stock of campaign {id}: {total} units by its events, {} by the campaign",
                campaign.total_units
            ));
        }
        if available + reserved + sold != total {
            return Err(format!(
                "stock of campaign {id}: {available} available + {reserved} reserved + {sold} \
                 sold != {total} total"
            ));
        }
        if sold != sold_in_buckets {
            return Err(format!(
                "stock of campaign {id}: holdings sold {sold}, buckets counted {sold_in_buckets}"
            ));
        }
        Ok(())
    }

    fn check_order(&self, order_id: OrderId, order: &Order) -> Result<(), String> {
        let units = self.units.get(&order_id).copied().unwrap_or_default();
        let payment = self.payments.get(&order_id).map(|p| p.status);
        let wrong = |what: &str| Err(format!("order {order_id} ({:?}): {what}", order.status));
        match order.status {
            OrderStatus::Confirmed if payment != Some(PaymentStatus::Succeeded) => {
                wrong(&format!("confirmed with payment {payment:?}"))
            }
            OrderStatus::Confirmed if units.reserved == 0 => wrong("confirmed, never reserved"),
            OrderStatus::Rejected if units.reserved > 0 => wrong("rejected, but units reserved"),
            OrderStatus::Cancelled | OrderStatus::Rejected if units.sold > 0 => {
                wrong("units sold for an order called off")
            }
            OrderStatus::Pending | OrderStatus::AwaitingPayment if units.sold > 0 => {
                wrong("units sold before the order was confirmed")
            }
            _ => Ok(()),
        }
    }

    /// What must hold once the run is quiet: deliveries drained, the clock past every
    /// deadline. Every order is final with its compensations done.
    pub fn check_quiet(&self) -> Result<(), String> {
        self.check()?;
        for (order_id, order) in &self.orders {
            let units = self.units.get(order_id).copied().unwrap_or_default();
            let payment = self.payments.get(order_id).map(|p| p.status);
            let wrong = |what: &str| {
                Err(format!(
                    "quiet, order {order_id} ({:?}, payment {payment:?}, units {units:?}): {what}",
                    order.status
                ))
            };
            match order.status {
                OrderStatus::Pending | OrderStatus::AwaitingPayment => {
                    return wrong("still not final");
                }
                OrderStatus::Confirmed if units.sold != 1 => return wrong("confirmed, not sold"),
                OrderStatus::Cancelled if units.reserved != units.released => {
                    return wrong("cancelled, units not given back");
                }
                OrderStatus::Cancelled if payment == Some(PaymentStatus::Succeeded) => {
                    return wrong("cancelled, money kept");
                }
                _ if payment == Some(PaymentStatus::Pending) => {
                    return wrong("payment still pending");
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Orders still waiting for something, for the quiet phase to know when it is done.
    pub fn open_orders(&self) -> usize {
        self.orders
            .values()
            .filter(|o| {
                matches!(
                    o.status,
                    OrderStatus::Pending | OrderStatus::AwaitingPayment
                )
            })
            .count()
    }

    /// The order, as the log has it.
    pub fn order(&self, order_id: OrderId) -> Option<&Order> {
        self.orders.get(&order_id)
    }
}

/// No bucket below zero, none of them above what the campaign ever had.
fn check_ledger(campaign_id: CampaignId, ledger: &Ledger) -> Result<(), String> {
    let available: i64 = ledger.available.values().sum();
    if ledger.available.values().any(|&units| units < 0) || ledger.sold < 0 {
        return Err(format!(
            "stock of campaign {campaign_id} below zero: {ledger:?}"
        ));
    }
    if available + ledger.sold > ledger.total {
        return Err(format!(
            "stock of campaign {campaign_id}: {available} available and {} sold of {} in all",
            ledger.sold, ledger.total
        ));
    }
    Ok(())
}

/// An order's units move at most once each way, and never both released and sold.
fn check_units(order_id: OrderId, units: Units) -> Result<(), String> {
    if units.reserved > 1 || units.released > 1 || units.sold > 1 {
        return Err(format!("order {order_id}: units moved twice: {units:?}"));
    }
    if units.released + units.sold > units.reserved {
        return Err(format!(
            "order {order_id}: units moved without a reservation: {units:?}"
        ));
    }
    if units.released > 0 && units.sold > 0 {
        return Err(format!("order {order_id}: units both released and sold"));
    }
    Ok(())
}
