//! Read models in process memory: the embedded default, and the fresh fold audits compare
//! the live read models with. Same versions, same rules and same ops as the Redis store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use domain::campaign::{CampaignStatus, Stock};
use domain::order::OrderStatus;
use domain::payment::PaymentStatus;
use domain::{CampaignId, Cents, OrderId, PaymentId, StoreId, Timestamp, UserId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ops::{timestamp, unsnake, Change, Op, ProjectionName};
use crate::read_model::{
    CampaignView, Funnel, OrderFilter, OrderPage, OrderView, PaymentView, ReadModel,
    ReadModelError, CAMPAIGNS_LIST_MAX, ORDERS_PAGE_MAX,
};
use crate::store::{ApplyOutcome, ProjectionStore, ProjectionVersion, RebuildError, VersionStatus};

/// Every projection's versions, in memory.
pub struct MemoryProjections {
    slots: RwLock<[Slot; 2]>,
    changes: watch::Sender<u64>,
}

/// One projection's versions.
#[derive(Default)]
struct Slot {
    live: Option<u32>,
    last_version: u32,
    versions: BTreeMap<u32, Keyspace>,
    /// The version being built and until when its rebuild holds the lease.
    lease: Option<(u32, Instant)>,
}

/// One version of one projection.
struct Keyspace {
    status: VersionStatus,
    views: Views,
    applied: HashMap<String, u64>,
    position: u64,
    events: u64,
}

impl Keyspace {
    fn new(status: VersionStatus) -> Keyspace {
        Keyspace {
            status,
            views: Views::default(),
            applied: HashMap::new(),
            position: 0,
            events: 0,
        }
    }

    /// Applies `change` unless the stream's `version` is done here; with `in_order`, only
    /// when it is the stream's next version. Returns whether it applied.
    fn apply(&mut self, change: &Change, in_order: bool) -> bool {
        let done = self.applied.get(&change.stream_id).copied().unwrap_or(0);
        if change.version <= done || (in_order && change.version != done + 1) {
            return false;
        }
        for op in &change.ops {
            self.views.run(op);
        }
        self.applied
            .insert(change.stream_id.clone(), change.version);
        self.position = self.position.max(change.position);
        self.events += 1;
        true
    }
}

/// An order as stored: its payment is joined when it is read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OrderRecord {
    user_id: UserId,
    campaign_id: CampaignId,
    quantity: u32,
    amount_cents: Cents,
    status: OrderStatus,
    reason: String,
    payment_id: Option<PaymentId>,
    created_at: i64,
    updated_at: i64,
}

/// A payment as its answers left it; its amount is its order's.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PaymentRecord {
    status: PaymentStatus,
    updated_at: i64,
}

#[derive(Default)]
struct Views {
    campaigns: BTreeMap<CampaignId, CampaignView>,
    orders: BTreeMap<OrderId, OrderRecord>,
    by_user: HashMap<UserId, BTreeSet<OrderId>>,
    by_campaign: HashMap<CampaignId, BTreeSet<OrderId>>,
    payments: HashMap<PaymentId, PaymentRecord>,
    /// The payment requested for an order, from the payment's own stream.
    order_payments: HashMap<OrderId, PaymentId>,
    /// Each campaign's orders counted by [`Funnel::field`].
    funnels: HashMap<CampaignId, HashMap<String, i64>>,
    /// Each campaign's stock as the sums of every move applied, signed and whatever the order
    /// the moves came in: the projection keeps order within a stream only, so one bucket's
    /// sale may come before another bucket's reservation of the same units, or a bucket's
    /// move before the campaign's `CampaignCreated`. Views show these sums (negative ones as
    /// zero); once every move is applied they are the log's.
    stock: HashMap<CampaignId, StockSums>,
}

/// A campaign's units as sums of moves: total, available, reserved, sold.
#[derive(Clone, Copy, Debug, Default)]
struct StockSums([i64; 4]);

impl StockSums {
    fn add(&mut self, by: [i64; 4]) {
        for (sum, by) in self.0.iter_mut().zip(by) {
            *sum = sum.saturating_add(by);
        }
    }

    fn shown(self) -> Stock {
        let units = |sum: i64| u32::try_from(sum.max(0)).unwrap_or(u32::MAX);
        Stock {
            total: units(self.0[0]),
            available: units(self.0[1]),
            reserved: units(self.0[2]),
            sold: units(self.0[3]),
        }
    }
}

impl Views {
    fn run(&mut self, op: &Op) {
        match op {
            Op::Campaign {
                campaign_id,
                store_id,
                sku,
                title,
                price_cents,
                quota,
                per_user_limit,
                starts_at,
                ends_at,
                payment_timeout_seconds,
            } => {
                let sums = self.stock.entry(*campaign_id).or_default();
                sums.add([i64::from(*quota), i64::from(*quota), 0, 0]);
                let stock = sums.shown();
                self.campaigns.insert(
                    *campaign_id,
                    CampaignView {
                        campaign_id: *campaign_id,
                        store_id: *store_id,
                        sku: sku.clone(),
                        title: title.clone(),
                        price_cents: *price_cents,
                        quota: *quota,
                        per_user_limit: *per_user_limit,
                        starts_at: timestamp(*starts_at),
                        ends_at: timestamp(*ends_at),
                        payment_timeout_seconds: *payment_timeout_seconds,
                        closed_at: None,
                        stock,
                    },
                );
            }
            Op::Stock {
                campaign_id,
                total,
                available,
                reserved,
                sold,
            } => {
                let sums = self.stock.entry(*campaign_id).or_default();
                sums.add([*total, *available, *reserved, *sold]);
                if let Some(view) = self.campaigns.get_mut(campaign_id) {
                    view.stock = sums.shown();
                }
            }
            Op::Close { campaign_id, at } => {
                if let Some(view) = self.campaigns.get_mut(campaign_id) {
                    view.closed_at = Some(timestamp(*at));
                }
            }
            Op::Order {
                order_id,
                user_id,
                campaign_id,
                quantity,
                amount_cents,
                at,
            } => {
                self.orders.insert(
                    *order_id,
                    OrderRecord {
                        user_id: *user_id,
                        campaign_id: *campaign_id,
                        quantity: *quantity,
                        amount_cents: *amount_cents,
                        status: OrderStatus::Pending,
                        reason: String::new(),
                        payment_id: None,
                        created_at: *at,
                        updated_at: *at,
                    },
                );
                self.by_user.entry(*user_id).or_default().insert(*order_id);
                self.by_campaign
                    .entry(*campaign_id)
                    .or_default()
                    .insert(*order_id);
                self.count(*campaign_id, OrderStatus::Pending, "", 1);
            }
            Op::OrderStatus {
                order_id,
                status,
                reason,
                payment_id,
                at,
            } => {
                if let Some(order) = self.orders.get_mut(order_id) {
                    let was = (order.status, std::mem::take(&mut order.reason));
                    order.status = *status;
                    order.reason.clone_from(reason);
                    if payment_id.is_some() {
                        order.payment_id = *payment_id;
                    }
                    order.updated_at = order.updated_at.max(*at);
                    let campaign_id = order.campaign_id;
                    if (was.0, was.1.as_str()) != (*status, reason.as_str()) {
                        self.count(campaign_id, was.0, &was.1, -1);
                        self.count(campaign_id, *status, reason, 1);
                    }
                }
            }
            Op::Payment {
                payment_id,
                requested,
                status,
                at,
            } => {
                if let Some((order_id, _)) = requested {
                    self.order_payments.insert(*order_id, *payment_id);
                    self.payments.insert(
                        *payment_id,
                        PaymentRecord {
                            status: *status,
                            updated_at: *at,
                        },
                    );
                } else {
                    // The first answer starts the record: the order's move to awaiting
                    // payment was the request.
                    let payment = self.payments.entry(*payment_id).or_insert(PaymentRecord {
                        status: *status,
                        updated_at: *at,
                    });
                    payment.status = *status;
                    payment.updated_at = payment.updated_at.max(*at);
                }
            }
        }
    }

    /// Moves the funnel counter of `campaign_id` for `status` and `reason` by `by`.
    fn count(&mut self, campaign_id: CampaignId, status: OrderStatus, reason: &str, by: i64) {
        *self
            .funnels
            .entry(campaign_id)
            .or_default()
            .entry(Funnel::field(status, reason))
            .or_default() += by;
    }

    fn order(&self, order_id: OrderId) -> Option<OrderView> {
        let order = self.orders.get(&order_id)?;
        let payment_id = order
            .payment_id
            .or_else(|| self.order_payments.get(&order_id).copied());
        let payment = payment_id.map(|payment_id| match self.payments.get(&payment_id) {
            Some(p) => (
                PaymentView {
                    payment_id,
                    status: p.status,
                    amount_cents: order.amount_cents,
                },
                p.updated_at,
            ),
            None => (
                PaymentView {
                    payment_id,
                    status: PaymentStatus::Pending,
                    amount_cents: order.amount_cents,
                },
                order.updated_at,
            ),
        });
        Some(order_view(
            order_id,
            &OrderFields {
                user_id: order.user_id,
                campaign_id: order.campaign_id,
                quantity: order.quantity,
                amount_cents: order.amount_cents,
                status: order.status,
                reason: &order.reason,
                created_at: order.created_at,
                updated_at: order.updated_at,
            },
            payment,
        ))
    }
}

/// An order's own fields, as both stores keep them.
pub(crate) struct OrderFields<'a> {
    pub user_id: UserId,
    pub campaign_id: CampaignId,
    pub quantity: u32,
    pub amount_cents: Cents,
    pub status: OrderStatus,
    pub reason: &'a str,
    pub created_at: i64,
    pub updated_at: i64,
}

/// The view of an order and its payment (with the time the payment last changed).
pub(crate) fn order_view(
    order_id: OrderId,
    order: &OrderFields<'_>,
    payment: Option<(PaymentView, i64)>,
) -> OrderView {
    let updated_at = payment
        .as_ref()
        .map_or(order.updated_at, |(_, at)| order.updated_at.max(*at));
    OrderView {
        order_id,
        user_id: order.user_id,
        campaign_id: order.campaign_id,
        quantity: order.quantity,
        amount_cents: order.amount_cents,
        status: order.status,
        rejection: (order.status == OrderStatus::Rejected)
            .then(|| unsnake(order.reason))
            .flatten(),
        cancellation: (order.status == OrderStatus::Cancelled)
            .then(|| unsnake(order.reason))
            .flatten(),
        payment: payment.map(|(view, _)| view),
        created_at: timestamp(order.created_at),
        updated_at: timestamp(updated_at),
    }
}

impl MemoryProjections {
    /// A store with a live, empty version of every projection: right for an empty log. For a
    /// log that has events, see [`MemoryProjections::unbuilt`].
    pub fn new() -> Self {
        let store = Self::unbuilt();
        {
            let mut slots = store.write();
            for slot in slots.iter_mut() {
                slot.last_version = 1;
                slot.live = Some(1);
                slot.versions.insert(1, Keyspace::new(VersionStatus::Live));
            }
        }
        store
    }

    /// A store with no versions at all: every projection needs a rebuild before it answers.
    pub fn unbuilt() -> Self {
        MemoryProjections {
            slots: RwLock::new(Default::default()),
            changes: watch::channel(0).0,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, [Slot; 2]> {
        self.slots.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, [Slot; 2]> {
        self.slots.write().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Runs `f` on the live views of `name`; [`ReadModelError::Missing`] when it has none.
    fn live<T>(
        &self,
        name: ProjectionName,
        f: impl FnOnce(&Views) -> T,
    ) -> Result<T, ReadModelError> {
        let slots = self.read();
        let slot = &slots[name.index()];
        match slot.live.and_then(|v| slot.versions.get(&v)) {
            Some(keyspace) => Ok(f(&keyspace.views)),
            None => Err(ReadModelError::Missing(name)),
        }
    }
}

impl Default for MemoryProjections {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl ReadModel for MemoryProjections {
    async fn campaign(&self, id: CampaignId) -> Result<Option<CampaignView>, ReadModelError> {
        self.live(ProjectionName::Campaigns, |v| v.campaigns.get(&id).cloned())
    }

    async fn campaigns(
        &self,
        store_id: Option<StoreId>,
        status: Option<CampaignStatus>,
        now: Timestamp,
    ) -> Result<Vec<CampaignView>, ReadModelError> {
        self.live(ProjectionName::Campaigns, |views| {
            views
                .campaigns
                .values()
                .filter(|c| store_id.is_none_or(|s| c.store_id == s))
                .filter(|c| status.is_none_or(|s| c.status(now) == s))
                .take(CAMPAIGNS_LIST_MAX)
                .cloned()
                .collect()
        })
    }

    async fn order(&self, id: OrderId) -> Result<Option<OrderView>, ReadModelError> {
        self.live(ProjectionName::Orders, |v| v.order(id))
    }

    async fn funnel(&self, id: CampaignId) -> Result<Funnel, ReadModelError> {
        self.live(ProjectionName::Orders, |v| {
            v.funnels.get(&id).map_or_else(Funnel::default, |counts| {
                Funnel::from_counts(counts.iter().map(|(f, n)| (f.as_str(), *n)))
            })
        })
    }

    async fn orders(
        &self,
        filter: &OrderFilter,
        after: Option<OrderId>,
        limit: usize,
    ) -> Result<OrderPage, ReadModelError> {
        let limit = limit.clamp(1, ORDERS_PAGE_MAX);
        self.live(ProjectionName::Orders, |views| {
            let empty = BTreeSet::new();
            // Walk the narrowest index the filter allows, newest first.
            let ids: Box<dyn Iterator<Item = &OrderId>> = match (filter.user_id, filter.campaign_id)
            {
                (Some(user), _) => {
                    Box::new(views.by_user.get(&user).unwrap_or(&empty).iter().rev())
                }
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
                .filter(|id| {
                    views.orders.get(id).is_some_and(|o| {
                        filter.user_id.is_none_or(|u| o.user_id == u)
                            && filter.campaign_id.is_none_or(|c| o.campaign_id == c)
                            && filter.status.is_none_or(|s| o.status == s)
                    })
                });
            let items: Vec<OrderView> = matching
                .by_ref()
                .take(limit)
                .filter_map(|id| views.order(*id))
                .collect();
            let next = if matching.next().is_some() {
                items.last().map(|o| o.order_id)
            } else {
                None
            };
            OrderPage { items, next }
        })
    }

    async fn applied_version(&self, stream_id: &str) -> Result<u64, ReadModelError> {
        let Some(name) = ProjectionName::of_stream(stream_id) else {
            return Ok(0);
        };
        let slots = self.read();
        let slot = &slots[name.index()];
        Ok(slot
            .live
            .and_then(|v| slot.versions.get(&v))
            .and_then(|k| k.applied.get(stream_id).copied())
            .unwrap_or(0))
    }

    async fn applied_versions(&self, stream_ids: &[String]) -> Result<Vec<u64>, ReadModelError> {
        let slots = self.read();
        stream_ids
            .iter()
            .map(|stream_id| {
                let Some(name) = ProjectionName::of_stream(stream_id) else {
                    return Ok(0);
                };
                let slot = &slots[name.index()];
                let live = slot
                    .live
                    .and_then(|v| slot.versions.get(&v))
                    .ok_or(ReadModelError::Missing(name))?;
                Ok(live.applied.get(stream_id).copied().unwrap_or(0))
            })
            .collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[async_trait]
impl ProjectionStore for MemoryProjections {
    async fn apply(
        &self,
        name: ProjectionName,
        change: &Change,
    ) -> Result<ApplyOutcome, ReadModelError> {
        Ok(self
            .apply_all(name, std::slice::from_ref(change))
            .await?
            .remove(0))
    }

    async fn apply_all(
        &self,
        name: ProjectionName,
        changes: &[Change],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        let outcomes = {
            let mut slots = self.write();
            let slot = &mut slots[name.index()];
            let live = slot.live;
            changes
                .iter()
                .map(|change| {
                    let mut applied = false;
                    for (version, keyspace) in slot.versions.iter_mut() {
                        let is_live = Some(*version) == live;
                        let took = keyspace.apply(change, !is_live);
                        applied |= took && is_live;
                    }
                    ApplyOutcome { live, applied }
                })
                .collect()
        };
        self.changed();
        Ok(outcomes)
    }

    async fn skip(
        &self,
        name: ProjectionName,
        stream_id: &str,
        version: u64,
    ) -> Result<(), ReadModelError> {
        let mut slots = self.write();
        let slot = &mut slots[name.index()];
        if let Some(keyspace) = slot.live.and_then(|v| slot.versions.get_mut(&v)) {
            let done = keyspace.applied.entry(stream_id.to_owned()).or_default();
            *done = (*done).max(version);
        }
        Ok(())
    }

    async fn versions(&self) -> Result<Vec<ProjectionVersion>, ReadModelError> {
        let slots = self.read();
        Ok(ProjectionName::ALL
            .into_iter()
            .flat_map(|name| {
                slots[name.index()]
                    .versions
                    .iter()
                    .map(move |(version, k)| ProjectionVersion {
                        name,
                        version: *version,
                        status: k.status,
                        position: k.position,
                        events: k.events,
                    })
            })
            .collect())
    }

    async fn begin_rebuild(
        &self,
        name: ProjectionName,
        lease: Duration,
    ) -> Result<u32, RebuildError> {
        let mut slots = self.write();
        let slot = &mut slots[name.index()];
        if let Some((version, until)) = slot.lease {
            if until > Instant::now() {
                return Err(RebuildError::Busy(name));
            }
            // Abandoned: its rebuild stopped renewing the lease.
            slot.versions.remove(&version);
        }
        slot.last_version += 1;
        let version = slot.last_version;
        slot.versions
            .insert(version, Keyspace::new(VersionStatus::Building));
        slot.lease = Some((version, Instant::now() + lease));
        Ok(version)
    }

    async fn rebuild_apply(
        &self,
        name: ProjectionName,
        version: u32,
        changes: &[Change],
        lease: Duration,
    ) -> Result<(), RebuildError> {
        let mut slots = self.write();
        let slot = &mut slots[name.index()];
        match (&mut slot.lease, slot.versions.get_mut(&version)) {
            (Some((leased, until)), Some(keyspace)) if *leased == version => {
                *until = Instant::now() + lease;
                for change in changes {
                    keyspace.apply(change, false);
                }
                Ok(())
            }
            _ => Err(RebuildError::LeaseLost { name, version }),
        }
    }

    async fn finish_rebuild(
        &self,
        name: ProjectionName,
        version: u32,
    ) -> Result<Option<u32>, RebuildError> {
        let replaced = {
            let mut slots = self.write();
            let slot = &mut slots[name.index()];
            if !matches!(slot.lease, Some((leased, _)) if leased == version) {
                return Err(RebuildError::LeaseLost { name, version });
            }
            let Some(keyspace) = slot.versions.get_mut(&version) else {
                return Err(RebuildError::LeaseLost { name, version });
            };
            keyspace.status = VersionStatus::Live;
            slot.lease = None;
            let replaced = slot.live.replace(version);
            // Queries hold the lock while they read, so nothing reads the old version now.
            if let Some(old) = replaced {
                slot.versions.remove(&old);
            }
            replaced
        };
        self.changed();
        Ok(replaced)
    }

    async fn abandon_rebuild(
        &self,
        name: ProjectionName,
        version: u32,
    ) -> Result<(), ReadModelError> {
        let mut slots = self.write();
        let slot = &mut slots[name.index()];
        if matches!(slot.lease, Some((leased, _)) if leased == version) {
            slot.lease = None;
        }
        if slot.live != Some(version) {
            slot.versions.remove(&version);
        }
        Ok(())
    }

    async fn drop_version(&self, name: ProjectionName, version: u32) -> Result<(), ReadModelError> {
        let mut slots = self.write();
        let slot = &mut slots[name.index()];
        let building = matches!(slot.lease, Some((leased, _)) if leased == version);
        if slot.live != Some(version) && !building {
            slot.versions.remove(&version);
        }
        Ok(())
    }
}
