//! The reconciliation audit: the whole log replayed, in global order, against the invariants
//! of DESIGN.md, and the live read models compared with a fresh fold of the same log.
//!
//! Memory is bounded by the number of streams, campaigns, orders and payments (a few dozen
//! bytes each, plus the fresh fold's views when read models are compared), never by the number
//! of events: the log is read in batches and each event is dropped once folded.
//!
//! Checks, by violation `kind`:
//!
//! - `version_gap`: a stream's versions are not 1, 2, 3, ...
//! - `stock_invariant`: a stock bucket went negative; or, after some transaction, a campaign's
//!   buckets and its customers' holdings disagreed: the units neither available nor sold in
//!   any bucket must be exactly the units the holdings hold reserved, the units sold in the
//!   buckets exactly those the holdings hold sold, and none of it negative.
//! - `per_user_limit`: a reservation left a customer holding more live units of a campaign
//!   than its limit.
//! - `order_inconsistent`: an order disagrees with its stock and payment events. Confirmed
//!   means reserved and paid (and, once settled, sold); sold means confirmed; cancelled means
//!   released exactly once and never sold; rejected means never reserved; refunded means a
//!   success that came after the order was cancelled; a success on a cancelled order must be
//!   refunded. States that a running saga passes through (cancelled, release still to come)
//!   count only once they are older than [`AuditOptions::settle`].
//! - `order_stuck`: an order that nothing moves on: `pending` (its stock never decided) for
//!   longer than [`AuditOptions::stuck_after`], or `awaiting_payment` that long past its
//!   payment deadline (which should have cancelled it). Such an order passes every other check,
//!   and waits for somebody to notice.
//! - `undecodable`: an event whose payload does not decode as its type.
//! - `read_model_mismatch`: a live view differs from the fresh fold, or is missing, or is
//!   extra. Views whose streams the live read model has applied to another version than the
//!   fold (events in flight) are not counted.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use commands::{EventLog, LogCursor, LogError, RecordedEvent};
use domain::campaign::CampaignEvent;
use domain::holding::HoldingEvent;
use domain::order::{OrderEvent, OrderStatus};
use domain::payment::PaymentEvent;
use domain::stock::StockBucketEvent;
use domain::{CampaignId, OrderId, PaymentId, Timestamp, UserId};
use serde::Serialize;

use crate::memory::MemoryProjections;
use crate::ops::{Change, ProjectionName};
use crate::read_model::{OrderFilter, ReadModel, ReadModelError, ORDERS_PAGE_MAX};
use crate::store::ProjectionStore;

/// How an audit runs.
#[derive(Clone, Debug)]
pub struct AuditOptions {
    /// Events read per batch.
    pub batch: usize,
    /// How long an order may sit in a state a saga is still working on before the audit
    /// counts it as inconsistent.
    pub settle: Duration,
    /// How long an order may stay `pending`, or `awaiting_payment` past its deadline, before
    /// the audit counts it as stuck.
    pub stuck_after: Duration,
    /// Most violations reported (the count of events and streams is always complete).
    pub violations_max: usize,
}

impl Default for AuditOptions {
    fn default() -> Self {
        AuditOptions {
            batch: 5_000,
            settle: Duration::from_secs(120),
            stuck_after: Duration::from_secs(300),
            violations_max: 1_000,
        }
    }
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Violation {
    /// What kind: `version_gap`, `stock_invariant`, `per_user_limit`, `order_inconsistent`,
    /// `order_stuck`, `undecodable` or `read_model_mismatch`.
    pub kind: String,
    /// The stream it was found in.
    pub stream_id: String,
    /// What exactly.
    pub detail: String,
}

/// What an audit found, as API.md's AuditReport.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AuditReport {
    /// Whether `violations` is empty.
    pub ok: bool,
    /// Events replayed.
    pub events_read: u64,
    /// Streams they belong to.
    pub streams_read: u64,
    /// When the audit finished.
    #[schema(value_type = String, format = DateTime)]
    pub checked_at: Timestamp,
    /// What it found.
    pub violations: Vec<Violation>,
    /// Violations found beyond [`AuditOptions::violations_max`] and left out.
    pub violations_omitted: u64,
    /// Views not compared because the live read model was mid-way through their events.
    pub views_in_flight: u64,
}

/// The audit could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The log could not be read.
    #[error("event log: {0}")]
    Log(#[from] LogError),
    /// The read model could not be read.
    #[error(transparent)]
    ReadModel(#[from] ReadModelError),
}

/// Replays the whole of `log` and checks it; compares `read_model` with a fresh fold when
/// given. `progress` hears the number of events read after every batch.
pub async fn audit(
    log: &dyn EventLog,
    read_model: Option<&dyn ReadModel>,
    options: &AuditOptions,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<AuditReport, AuditError> {
    let mut replay = Replay::new(options.violations_max);
    let fold = MemoryProjections::new();
    let batch_size = options.batch.clamp(1, commands::log::READ_EVENTS_MAX);
    let mut cursor = LogCursor::default();
    loop {
        let batch = log.read_all(cursor, batch_size).await?;
        for event in &batch {
            if event.cursor.transaction_id != replay.transaction {
                replay.transaction_ended();
                replay.transaction = event.cursor.transaction_id;
            }
            replay.event(event);
            if read_model.is_some() {
                fold_event(&fold, event).await;
            }
        }
        progress(replay.events);
        match batch.last() {
            Some(last) if batch.len() == batch_size => cursor = last.cursor,
            _ => break,
        }
    }
    replay.transaction_ended();
    let now = Utc::now();
    replay.settled(now, options.settle);
    replay.stuck(now, options.stuck_after);
    let mut views_in_flight = 0;
    if let Some(live) = read_model {
        views_in_flight = compare(&fold, live, &mut replay).await?;
    }
    Ok(AuditReport {
        ok: replay.violations.is_empty() && replay.omitted == 0,
        events_read: replay.events,
        streams_read: replay.versions.len() as u64,
        checked_at: now,
        violations: replay.violations,
        violations_omitted: replay.omitted,
        views_in_flight,
    })
}

async fn fold_event(fold: &MemoryProjections, event: &RecordedEvent) {
    for name in ProjectionName::ALL {
        // Undecodable events are reported by the replay; the fold skips them.
        if let Ok(Some(change)) = Change::of(name, &event.envelope) {
            let _ = fold.apply(name, &change).await;
        }
    }
}

/// A reservation as the campaign's events tell it.
#[derive(Default)]
struct Held {
    reserved: u8,
    released: u8,
    sold: u8,
}

#[derive(Default)]
struct CampaignFacts {
    per_user_limit: i64,
    stock_buckets: u32,
    total: i64,
    /// Available units of each bucket, by bucket.
    available: HashMap<u32, i64>,
    /// Units sold by the decisions of each bucket.
    sold: HashMap<u32, i64>,
    /// Units per customer: reserved, and sold.
    holdings: HashMap<UserId, (i64, i64)>,
    /// Units reserved and sold over every holding.
    held_reserved: i64,
    held_sold: i64,
}

impl CampaignFacts {
    /// What is wrong with the buckets and holdings together, if anything: checked between
    /// transactions, since one append moves both.
    fn disagreement(&self) -> Option<String> {
        let available: i64 = self.available.values().sum();
        let sold: i64 = self.sold.values().sum();
        let reserved = self.total - available - sold;
        (reserved < 0 || reserved != self.held_reserved || sold != self.held_sold).then(|| {
            format!(
                "total {}, available {available}, reserved {reserved}, sold {sold} in the buckets; \
                 reserved {}, sold {} in the holdings",
                self.total, self.held_reserved, self.held_sold
            )
        })
    }
}

struct OrderFacts {
    status: OrderStatus,
    since: Timestamp,
    payment_id: Option<PaymentId>,
    /// When its payment times out, once it awaits one.
    deadline: Option<Timestamp>,
}

#[derive(Default)]
struct PaymentFacts {
    /// Its order, when an older log's `PaymentRequested` named it.
    order_id: Option<OrderId>,
    succeeded: bool,
    succeeded_at: Option<Timestamp>,
    refunded: bool,
}

struct Replay {
    events: u64,
    /// The transaction being read, and the campaigns it touched.
    transaction: u64,
    touched: Vec<(CampaignId, String)>,
    versions: HashMap<String, u64>,
    campaigns: HashMap<CampaignId, CampaignFacts>,
    held: HashMap<OrderId, Held>,
    orders: HashMap<OrderId, OrderFacts>,
    payments: HashMap<PaymentId, PaymentFacts>,
    violations: Vec<Violation>,
    violations_max: usize,
    omitted: u64,
}

impl Replay {
    fn new(violations_max: usize) -> Replay {
        Replay {
            events: 0,
            transaction: 0,
            touched: Vec::new(),
            versions: HashMap::new(),
            campaigns: HashMap::new(),
            held: HashMap::new(),
            orders: HashMap::new(),
            payments: HashMap::new(),
            violations: Vec::new(),
            violations_max,
            omitted: 0,
        }
    }

    fn violation(&mut self, kind: &str, stream_id: &str, detail: String) {
        if self.violations.len() < self.violations_max {
            self.violations.push(Violation {
                kind: kind.to_owned(),
                stream_id: stream_id.to_owned(),
                detail,
            });
        } else {
            self.omitted += 1;
        }
    }

    fn event(&mut self, recorded: &RecordedEvent) {
        let envelope = &recorded.envelope;
        self.events += 1;
        let stream = envelope.stream_id.as_str();
        let last = self.versions.get(stream).copied().unwrap_or(0);
        if envelope.stream_version != last + 1 {
            self.violation(
                "version_gap",
                stream,
                format!("version {} follows version {last}", envelope.stream_version),
            );
        }
        self.versions
            .insert(stream.to_owned(), envelope.stream_version.max(last));
        let Some((_, id)) = stream.split_once('-') else {
            return;
        };
        // `<campaign id>-<bucket>` for a stock bucket, `<campaign id>-<user id>` for a holding.
        let pair = || {
            let (campaign, rest) = id.split_once('-')?;
            Some((
                CampaignId::from_ulid(ulid::Ulid::from_string(campaign).ok()?),
                rest,
            ))
        };
        let one = || ulid::Ulid::from_string(id).ok();
        let decoded = match (envelope.category(), pair(), one()) {
            ("campaign", _, Some(id)) => schemas::from_envelope(envelope)
                .map(|e| self.campaign(stream, CampaignId::from_ulid(id), e)),
            ("stock", Some((campaign_id, bucket)), _) => match bucket.parse() {
                Ok(bucket) => schemas::from_envelope(envelope)
                    .map(|e| self.bucket(stream, campaign_id, bucket, e)),
                Err(_) => Ok(()),
            },
            ("holding", Some((campaign_id, _)), _) => {
                schemas::from_envelope(envelope).map(|e| self.holding(stream, campaign_id, e))
            }
            ("order", _, Some(id)) => schemas::from_envelope(envelope)
                .map(|e| self.order(stream, OrderId::from_ulid(id), e, envelope.recorded_at)),
            ("payment", _, Some(id)) => schemas::from_envelope(envelope)
                .map(|e| self.payment(stream, PaymentId::from_ulid(id), e)),
            _ => Ok(()),
        };
        if let Err(error) = decoded {
            self.violation(
                "undecodable",
                stream,
                format!("version {}: {error}", envelope.stream_version),
            );
        }
    }

    /// Checks the buckets against the holdings of every campaign the transaction that just
    /// ended touched.
    fn transaction_ended(&mut self) {
        let touched = std::mem::take(&mut self.touched);
        for (campaign_id, stream) in touched {
            let problem = self
                .campaigns
                .get(&campaign_id)
                .and_then(CampaignFacts::disagreement);
            if let Some(detail) = problem {
                self.violation("stock_invariant", &stream, detail);
            }
        }
    }

    fn touch(&mut self, campaign_id: CampaignId, stream: &str) {
        if !self.touched.iter().any(|(c, _)| *c == campaign_id) {
            self.touched.push((campaign_id, stream.to_owned()));
        }
    }

    /// The campaign's facts, or a violation when its stock moves before it exists.
    fn facts_of(&mut self, stream: &str, id: CampaignId) -> Option<&mut CampaignFacts> {
        if !self.campaigns.contains_key(&id) {
            self.violation(
                "stock_invariant",
                stream,
                "stock moved before the campaign was created".into(),
            );
            return None;
        }
        self.touch(id, stream);
        self.campaigns.get_mut(&id)
    }

    fn campaign(&mut self, stream: &str, id: CampaignId, event: CampaignEvent) {
        if let CampaignEvent::CampaignCreated(c) = &event {
            let quota = i64::from(c.quota);
            self.campaigns.insert(
                id,
                CampaignFacts {
                    per_user_limit: i64::from(c.per_user_limit),
                    stock_buckets: c.stock_buckets,
                    total: quota,
                    available: HashMap::from([(0, quota)]),
                    ..Default::default()
                },
            );
            return;
        }
        // Events recorded before holdings existed move the bucket and a holding at once.
        let (order_id, user_id, reserved, released, sold) = match event {
            CampaignEvent::CampaignCreated(_) => unreachable!("handled above"),
            CampaignEvent::CampaignClosed { .. } => return,
            CampaignEvent::StockReplenished { quantity, .. } => {
                if let Some(c) = self.facts_of(stream, id) {
                    c.total += i64::from(quantity);
                    *c.available.entry(0).or_default() += i64::from(quantity);
                }
                return;
            }
            CampaignEvent::StockMoved {
                reserved,
                released,
                sold,
                ..
            } => return self.moved(stream, id, 0, reserved, released, sold),
            CampaignEvent::StockTransferredOut { units, .. } => {
                return self.moved(stream, id, 0, units, 0, 0)
            }
            CampaignEvent::StockTransferredIn { units, .. } => {
                return self.moved(stream, id, 0, 0, units, 0)
            }
            CampaignEvent::StockReserved {
                order_id,
                user_id,
                quantity,
                ..
            } => (order_id, user_id, quantity, 0, 0),
            CampaignEvent::StockReleased {
                order_id,
                user_id,
                quantity,
                ..
            } => (order_id, user_id, 0, quantity, 0),
            CampaignEvent::StockSold {
                order_id,
                user_id,
                quantity,
                ..
            } => (order_id, user_id, 0, 0, quantity),
        };
        self.moved(stream, id, 0, reserved, released, sold);
        self.held(stream, id, order_id, user_id, reserved, released, sold);
    }

    fn bucket(&mut self, stream: &str, id: CampaignId, bucket: u32, event: StockBucketEvent) {
        match event {
            StockBucketEvent::StockMoved {
                reserved,
                released,
                sold,
                ..
            } => self.moved(stream, id, bucket, reserved, released, sold),
            StockBucketEvent::StockTransferredOut { units, .. } => {
                self.moved(stream, id, bucket, units, 0, 0)
            }
            StockBucketEvent::StockTransferredIn { units, .. } => {
                self.moved(stream, id, bucket, 0, units, 0)
            }
        }
    }

    /// Units leaving (`taken`) and coming back to (`given`) a bucket's available units, and
    /// units its decisions sold.
    fn moved(
        &mut self,
        stream: &str,
        id: CampaignId,
        bucket: u32,
        taken: u32,
        given: u32,
        sold: u32,
    ) {
        let Some(c) = self.facts_of(stream, id) else {
            return;
        };
        let available = c.available.entry(bucket).or_default();
        *available += i64::from(given) - i64::from(taken);
        let available = *available;
        *c.sold.entry(bucket).or_default() += i64::from(sold);
        if available < 0 {
            self.violation(
                "stock_invariant",
                stream,
                format!("bucket {bucket} went to {available} available units"),
            );
        }
    }

    fn holding(&mut self, stream: &str, id: CampaignId, event: HoldingEvent) {
        let (order_id, user_id, reserved, released, sold) = match event {
            HoldingEvent::UnitsReserved {
                order_id,
                user_id,
                quantity,
                ..
            } => (order_id, user_id, quantity, 0, 0),
            HoldingEvent::UnitsReleased {
                order_id,
                user_id,
                quantity,
                ..
            } => (order_id, user_id, 0, quantity, 0),
            HoldingEvent::UnitsSold {
                order_id,
                user_id,
                quantity,
                ..
            } => (order_id, user_id, 0, 0, quantity),
        };
        self.held(stream, id, order_id, user_id, reserved, released, sold);
    }

    /// One order's units moving in its customer's holding: reserved, released or sold.
    #[allow(clippy::too_many_arguments)]
    fn held(
        &mut self,
        stream: &str,
        id: CampaignId,
        order_id: OrderId,
        user_id: UserId,
        reserved: u32,
        released: u32,
        sold: u32,
    ) {
        let Some(c) = self.facts_of(stream, id) else {
            return;
        };
        let (reserved, released, sold) =
            (i64::from(reserved), i64::from(released), i64::from(sold));
        let holding = c.holdings.entry(user_id).or_default();
        holding.0 += reserved - released - sold;
        holding.1 += sold;
        c.held_reserved += reserved - released - sold;
        c.held_sold += sold;
        let live = holding.0 + holding.1;
        let mut problems = Vec::new();
        if reserved > 0 && live > c.per_user_limit {
            problems.push((
                "per_user_limit",
                format!(
                    "customer {user_id} holds {live} live units, more than the limit of {}, after order {order_id}",
                    c.per_user_limit
                ),
            ));
        }
        let held = self.held.entry(order_id).or_default();
        let order = self.orders.get(&order_id).map(|o| o.status);
        if reserved > 0 {
            held.reserved = held.reserved.saturating_add(1);
            if held.reserved > 1 {
                problems.push((
                    "order_inconsistent",
                    format!("order {order_id} was reserved twice"),
                ));
            }
            if order == Some(OrderStatus::Rejected) {
                problems.push((
                    "order_inconsistent",
                    format!("order {order_id} was reserved after it was rejected"),
                ));
            }
        }
        if released > 0 {
            held.released = held.released.saturating_add(1);
            if held.released > 1 {
                problems.push((
                    "order_inconsistent",
                    format!("order {order_id} was released twice"),
                ));
            }
        }
        if sold > 0 {
            held.sold = held.sold.saturating_add(1);
            if order != Some(OrderStatus::Confirmed) {
                problems.push((
                    "order_inconsistent",
                    format!("order {order_id} was sold without being confirmed"),
                ));
            }
        }
        for (kind, detail) in problems {
            self.violation(kind, stream, detail);
        }
    }

    fn order(&mut self, stream: &str, id: OrderId, event: OrderEvent, recorded_at: Timestamp) {
        let mut deadline = None;
        let (status, payment_id) = match event {
            OrderEvent::OrderPlaced { .. } => (OrderStatus::Pending, None),
            OrderEvent::OrderRejected { .. } => (OrderStatus::Rejected, None),
            OrderEvent::OrderAwaitingPayment {
                payment_id,
                deadline: due,
                ..
            } => {
                deadline = Some(due);
                (OrderStatus::AwaitingPayment, Some(payment_id))
            }
            OrderEvent::OrderConfirmed { payment_id, .. } => {
                (OrderStatus::Confirmed, Some(payment_id))
            }
            OrderEvent::OrderCancelled { .. } => (OrderStatus::Cancelled, None),
        };
        let known_payment = self.orders.get(&id).and_then(|o| o.payment_id);
        let payment_id = payment_id.or(known_payment);
        let mut problem = None;
        match status {
            OrderStatus::Confirmed => {
                let reserved = self
                    .held
                    .get(&id)
                    .is_some_and(|h| h.reserved > 0 && h.released == 0);
                let paid = payment_id
                    .and_then(|p| self.payments.get(&p))
                    .is_some_and(|p| p.succeeded);
                if !reserved || !paid {
                    problem = Some(format!(
                        "confirmed while {} and {}",
                        if reserved { "reserved" } else { "not reserved" },
                        if paid { "paid" } else { "not paid" }
                    ));
                }
            }
            OrderStatus::Rejected
                if self.held.get(&id).is_some_and(|h| h.reserved > h.released) =>
            {
                problem = Some("rejected while holding reserved stock".into());
            }
            _ => {}
        }
        if let Some(detail) = problem {
            self.violation("order_inconsistent", stream, detail);
        }
        self.orders.insert(
            id,
            OrderFacts {
                status,
                since: recorded_at,
                payment_id,
                deadline,
            },
        );
    }

    fn payment(&mut self, stream: &str, id: PaymentId, event: PaymentEvent) {
        let facts = self.payments.entry(id).or_default();
        match event {
            PaymentEvent::PaymentRequested { order_id, .. } => facts.order_id = Some(order_id),
            PaymentEvent::PaymentSucceeded { at, .. } => {
                facts.succeeded = true;
                facts.succeeded_at = Some(at);
            }
            PaymentEvent::PaymentFailed { .. } | PaymentEvent::PaymentTimedOut { .. } => {}
            PaymentEvent::PaymentRefunded { .. } => {
                facts.refunded = true;
                let succeeded = facts.succeeded;
                // An order's payment has the order's id; an older log's request names it too.
                let order_id = facts.order_id.unwrap_or(OrderId::from_ulid(id.ulid()));
                let cancelled = self
                    .orders
                    .get(&order_id)
                    .is_some_and(|o| o.status == OrderStatus::Cancelled);
                if !succeeded || !cancelled {
                    self.violation(
                        "order_inconsistent",
                        stream,
                        format!(
                            "refunded {} and {}",
                            if succeeded {
                                "after a success"
                            } else {
                                "without a success"
                            },
                            if cancelled {
                                "the order cancelled"
                            } else {
                                "the order not cancelled"
                            }
                        ),
                    );
                }
            }
        }
    }

    /// The checks on where every order ended up.
    fn settled(&mut self, now: Timestamp, settle: Duration) {
        let settle = chrono::Duration::from_std(settle).unwrap_or(chrono::Duration::MAX);
        let mut found = Vec::new();
        for (order_id, order) in &self.orders {
            let settled = now - order.since >= settle;
            let held = self.held.get(order_id);
            let (reserved, released, sold) =
                held.map_or((0, 0, 0), |h| (h.reserved, h.released, h.sold));
            let payment = order.payment_id.and_then(|p| self.payments.get(&p));
            let problem = match order.status {
                OrderStatus::Cancelled if sold > 0 => Some("cancelled but its stock was sold"),
                OrderStatus::Cancelled if settled && reserved > released => {
                    Some("cancelled but its stock was never released")
                }
                OrderStatus::Cancelled
                    if settled && payment.is_some_and(|p| p.succeeded && !p.refunded) =>
                {
                    Some("cancelled after a successful payment that was never refunded")
                }
                OrderStatus::Confirmed if settled && sold == 0 => {
                    Some("confirmed but its stock was never sold")
                }
                OrderStatus::Rejected if reserved > released => {
                    Some("rejected while holding reserved stock")
                }
                _ => None,
            };
            if let Some(problem) = problem {
                found.push((format!("order-{order_id}"), problem.to_owned()));
            }
        }
        found.sort();
        for (stream, detail) in found {
            self.violation("order_inconsistent", &stream, detail);
        }
    }
}

impl Replay {
    /// Orders that nothing moves on any more.
    fn stuck(&mut self, now: Timestamp, stuck_after: Duration) {
        let bound = chrono::Duration::from_std(stuck_after).unwrap_or(chrono::Duration::MAX);
        let mut found = Vec::new();
        for (order_id, order) in &self.orders {
            let detail = match (order.status, order.deadline) {
                (OrderStatus::Pending, _) if now - order.since >= bound => format!(
                    "pending for {} s: its stock was never decided",
                    (now - order.since).num_seconds()
                ),
                (OrderStatus::AwaitingPayment, Some(deadline)) if now - deadline >= bound => {
                    format!(
                        "awaiting payment {} s past its deadline: it was never cancelled",
                        (now - deadline).num_seconds()
                    )
                }
                _ => continue,
            };
            found.push((format!("order-{order_id}"), detail));
        }
        found.sort();
        for (stream, detail) in found {
            self.violation("order_stuck", &stream, detail);
        }
    }
}

/// Compares `live` with `fold` view by view; returns how many views were skipped as in flight.
async fn compare(
    fold: &MemoryProjections,
    live: &dyn ReadModel,
    replay: &mut Replay,
) -> Result<u64, AuditError> {
    let mut in_flight = 0;
    let far_future = Utc::now() + chrono::Duration::days(365 * 100);
    let expected = fold.campaigns(None, None, far_future).await?;
    let mut found: HashMap<CampaignId, _> = live
        .campaigns(None, None, far_future)
        .await?
        .into_iter()
        .map(|c| (c.campaign_id, c))
        .collect();
    for campaign in expected {
        let stream = format!("campaign-{}", campaign.campaign_id);
        let live_view = found.remove(&campaign.campaign_id);
        if live_view.as_ref() == Some(&campaign) {
            continue;
        }
        // Its stock moves on every bucket's stream.
        let buckets = replay
            .campaigns
            .get(&campaign.campaign_id)
            .map_or(1, |c| c.stock_buckets);
        let mut streams = vec![stream.clone()];
        streams.extend((1..buckets).map(|b| format!("stock-{}-{b}", campaign.campaign_id)));
        let streams: Vec<&str> = streams.iter().map(String::as_str).collect();
        if in_motion(fold, live, &streams).await? {
            in_flight += 1;
            continue;
        }
        // The view was read before the versions were: it may have caught up in between.
        let live_view = live.campaign(campaign.campaign_id).await?;
        if live_view.as_ref() == Some(&campaign) {
            continue;
        }
        let detail = match live_view {
            None => "the read model lacks this campaign".to_owned(),
            Some(view) => format!("read model {view:?}; the log says {campaign:?}"),
        };
        replay.violation("read_model_mismatch", &stream, detail);
    }
    for extra in found.into_keys() {
        replay.violation(
            "read_model_mismatch",
            &format!("campaign-{extra}"),
            "the read model has a campaign the log does not".into(),
        );
    }
    // Orders, newest first, page by page from both.
    let filter = OrderFilter::default();
    let (mut fold_after, mut live_after) = (None, None);
    let mut fold_done = false;
    let mut live_done = false;
    let mut pending_live: HashMap<OrderId, crate::OrderView> = HashMap::new();
    let mut pending_fold: HashMap<OrderId, crate::OrderView> = HashMap::new();
    while !(fold_done && live_done) {
        if !fold_done {
            let page = fold.orders(&filter, fold_after, ORDERS_PAGE_MAX).await?;
            fold_done = page.next.is_none();
            fold_after = page.next;
            for view in page.items {
                match pending_live.remove(&view.order_id) {
                    Some(live_view) => {
                        in_flight +=
                            check_order(fold, live, replay, &view, Some(live_view)).await?;
                    }
                    None => {
                        pending_fold.insert(view.order_id, view);
                    }
                }
            }
        }
        if !live_done {
            let page = live.orders(&filter, live_after, ORDERS_PAGE_MAX).await?;
            live_done = page.next.is_none();
            live_after = page.next;
            for view in page.items {
                match pending_fold.remove(&view.order_id) {
                    Some(fold_view) => {
                        in_flight +=
                            check_order(fold, live, replay, &fold_view, Some(view)).await?;
                    }
                    None => {
                        pending_live.insert(view.order_id, view);
                    }
                }
            }
        }
    }
    for (_, view) in pending_fold {
        in_flight += check_order(fold, live, replay, &view, None).await?;
    }
    for (order_id, _) in pending_live {
        replay.violation(
            "read_model_mismatch",
            &format!("order-{order_id}"),
            "the read model has an order the log does not".into(),
        );
    }
    Ok(in_flight)
}

async fn check_order(
    fold: &MemoryProjections,
    live: &dyn ReadModel,
    replay: &mut Replay,
    expected: &crate::OrderView,
    found: Option<crate::OrderView>,
) -> Result<u64, AuditError> {
    if found.as_ref() == Some(expected) {
        return Ok(0);
    }
    let order_stream = format!("order-{}", expected.order_id);
    let payment_stream = expected
        .payment
        .as_ref()
        .map(|p| format!("payment-{}", p.payment_id));
    let mut streams = vec![order_stream.as_str()];
    streams.extend(payment_stream.as_deref());
    if in_motion(fold, live, &streams).await? {
        return Ok(1);
    }
    // The view was read before the versions were: it may have caught up in between.
    let found = live.order(expected.order_id).await?;
    if found.as_ref() == Some(expected) {
        return Ok(0);
    }
    let detail = match found {
        None => "the read model lacks this order".to_owned(),
        Some(view) => format!("read model {view:?}; the log says {expected:?}"),
    };
    replay.violation("read_model_mismatch", &order_stream, detail);
    Ok(0)
}

/// Whether the live read model has applied another version of any of `streams` than the fold.
async fn in_motion(
    fold: &MemoryProjections,
    live: &dyn ReadModel,
    streams: &[&str],
) -> Result<bool, AuditError> {
    for stream in streams {
        if fold.applied_version(stream).await? != live.applied_version(stream).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use commands::log::memory::MemoryEventLog;
    use commands::{AppendRequest, NewEvent, StreamAppend};
    use domain::Cents;
    use ulid::Ulid;

    use super::*;

    async fn append<E: serde::Serialize>(
        log: &MemoryEventLog,
        stream_id: &str,
        after: u64,
        event: &E,
    ) {
        log.append(AppendRequest {
            streams: vec![StreamAppend {
                stream_id: stream_id.to_owned(),
                expected_version: after,
                events: vec![NewEvent {
                    event_id: Ulid::new(),
                    event: schemas::encode(event).unwrap(),
                    metadata: Default::default(),
                }],
            }],
            idempotency: None,
        })
        .await
        .unwrap();
    }

    /// An order placed, and left `pending` or, with a deadline, `awaiting_payment`.
    async fn order(log: &MemoryEventLog, deadline: Option<Timestamp>) -> String {
        let order_id = OrderId::from_ulid(Ulid::new());
        let stream = format!("order-{order_id}");
        let now = Utc::now();
        let placed = OrderEvent::OrderPlaced {
            order_id,
            user_id: UserId::from_ulid(Ulid::new()),
            campaign_id: CampaignId::from_ulid(Ulid::new()),
            quantity: 1,
            unit_price_cents: Cents::new(100),
            amount_cents: Cents::new(100),
            placed_at: now,
        };
        append(log, &stream, 0, &placed).await;
        if let Some(deadline) = deadline {
            let awaiting = OrderEvent::OrderAwaitingPayment {
                payment_id: PaymentId::from_ulid(order_id.ulid()),
                deadline,
                at: now,
            };
            append(log, &stream, 1, &awaiting).await;
        }
        stream
    }

    async fn stuck(log: &MemoryEventLog, stuck_after: Duration) -> Vec<(String, String)> {
        let options = AuditOptions {
            stuck_after,
            ..Default::default()
        };
        let report = audit(log, None, &options, &|_| {}).await.unwrap();
        let mut found: Vec<_> = report
            .violations
            .into_iter()
            .filter(|v| v.kind == "order_stuck")
            .map(|v| (v.stream_id, v.detail))
            .collect();
        found.sort();
        found
    }

    #[tokio::test]
    async fn orders_that_nothing_moves_on_are_reported_once_past_the_bound() {
        let log = MemoryEventLog::new();
        let pending = order(&log, None).await;
        let overdue = order(&log, Some(Utc::now() - chrono::Duration::hours(1))).await;
        let not_yet_due = order(&log, Some(Utc::now() + chrono::Duration::hours(1))).await;

        // Within the bound, nothing is stuck yet.
        assert_eq!(stuck(&log, Duration::from_secs(300)).await.len(), 1);
        let found = stuck(&log, Duration::ZERO).await;
        let streams: Vec<&str> = found.iter().map(|(s, _)| s.as_str()).collect();
        let mut expected = vec![pending.as_str(), overdue.as_str()];
        expected.sort();
        assert_eq!(streams, expected, "{found:?}");
        assert!(!streams.contains(&not_yet_due.as_str()));
        for (stream, detail) in &found {
            if *stream == pending {
                assert!(detail.contains("pending"), "{detail}");
            } else {
                assert!(detail.contains("past its deadline"), "{detail}");
            }
        }
    }

    /// The violations of `kind` in a log-only audit.
    async fn violations(log: &MemoryEventLog, kind: &str) -> Vec<String> {
        let report = audit(log, None, &AuditOptions::default(), &|_| {})
            .await
            .unwrap();
        report
            .violations
            .into_iter()
            .filter(|v| v.kind == kind)
            .map(|v| format!("{}: {}", v.stream_id, v.detail))
            .collect()
    }

    #[tokio::test]
    async fn a_refund_is_checked_against_the_order_whose_request_started_the_payment() {
        // The payment's stream starts with its first answer: the order's move to awaiting
        // payment was the request, and the payment has the order's id.
        let log = MemoryEventLog::new();
        let deadline = Utc::now() + chrono::Duration::hours(1);
        let cancelled = order(&log, Some(deadline)).await;
        let not_cancelled = order(&log, Some(deadline)).await;
        let at = Utc::now();
        append(
            &log,
            &cancelled,
            2,
            &OrderEvent::OrderCancelled {
                reason: domain::order::CancelReason::Customer,
                at,
            },
        )
        .await;
        for order_stream in [&cancelled, &not_cancelled] {
            let payment_stream = order_stream.replace("order-", "payment-");
            let succeeded = PaymentEvent::PaymentSucceeded {
                provider_reference: "psp-1".into(),
                at,
            };
            append(&log, &payment_stream, 0, &succeeded).await;
            append(
                &log,
                &payment_stream,
                1,
                &PaymentEvent::PaymentRefunded { at },
            )
            .await;
        }
        let found = violations(&log, "order_inconsistent").await;
        let refunds: Vec<&String> = found.iter().filter(|v| v.contains("refunded")).collect();
        assert_eq!(refunds.len(), 1, "{found:?}");
        let payment_of_not_cancelled = not_cancelled.replace("order-", "payment-");
        assert!(
            refunds[0].starts_with(&payment_of_not_cancelled)
                && refunds[0].contains("the order not cancelled"),
            "{found:?}"
        );
    }
}
