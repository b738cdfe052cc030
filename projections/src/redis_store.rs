//! Read models in Redis, shared by every gateway instance.
//!
//! Every write and every query is one Redis function (`redis_functions.lua`, loaded on
//! connect), so each runs atomically: an event's effects and the record that it was applied
//! change together, and a query reads one version of a projection, never half of two. The
//! key layout is described at the top of the Lua file.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{FromRedisValue, RedisError, ToRedisArgs};
use async_trait::async_trait;
use domain::campaign::{CampaignStatus, Stock};
use domain::order::OrderStatus;
use domain::{CampaignId, Cents, OrderId, PaymentId, StoreId, Timestamp};
use tokio::sync::watch;

use crate::memory::{order_view, OrderFields};
use crate::ops::{snake, timestamp, unsnake, Change, Op, ProjectionName};
use crate::read_model::{
    CampaignView, Funnel, OrderFilter, OrderPage, OrderView, PaymentView, ReadModel,
    ReadModelError, CAMPAIGNS_LIST_MAX, ORDERS_PAGE_MAX,
};
use crate::store::{ApplyOutcome, ProjectionStore, ProjectionVersion, RebuildError, VersionStatus};

/// The function library as written: `@BUILD@` marks where [`Library`] puts its build.
pub const FUNCTIONS: &str = include_str!("redis_functions.lua");
/// What marks the build in [`FUNCTIONS`].
const BUILD_MARKER: &str = "@BUILD@";
/// How often an instance looks for changes made by any instance, while someone waits.
const CHANGE_POLL: Duration = Duration::from_millis(10);
/// How long connecting to Redis may take before it is reported unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a cluster call is retried (the slots moved, a node reconnects) before it fails.
const CLUSTER_RETRIES: u32 = 3;
/// Most campaigns a listing looks at before filtering by status.
const CAMPAIGNS_SCAN_MAX: usize = 10_000;
/// Keys removed per command when a version is dropped.
const DROP_BATCH: usize = 1_000;

/// The read models in one Redis, or one Redis Cluster, under one key prefix.
#[derive(Clone)]
pub struct RedisProjections {
    conn: Connection,
    prefix: String,
    changes: Arc<watch::Sender<u64>>,
}

/// A connection to one Redis server or to a Redis Cluster. Every key of a projection carries
/// the projection's hash tag (see [`RedisProjections::base`]), so that each function call
/// touches one slot, and the cluster client routes it by the key it declares.
#[derive(Clone)]
enum Connection {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, RedisError> {
        match self.clone() {
            Connection::Server(mut conn) => cmd.query_async(&mut conn).await,
            Connection::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }

    /// Runs `cmd`, which names no key (`SCAN`), on the server that holds `key`.
    async fn query_at<T: FromRedisValue>(
        &self,
        key: &str,
        cmd: &::redis::Cmd,
    ) -> Result<T, RedisError> {
        match self.clone() {
            Connection::Server(mut conn) => cmd.query_async(&mut conn).await,
            Connection::Cluster(mut conn) => {
                let slot: u16 = ::redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query_async(&mut conn)
                    .await?;
                let at = Route::new(slot, SlotAddr::Master);
                let reply = conn
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(at)),
                    )
                    .await?;
                ::redis::from_redis_value(&reply)
            }
        }
    }
}

fn unavailable(error: RedisError) -> ReadModelError {
    ReadModelError::Unavailable(format!("redis: {error}"))
}

/// [`unavailable`], or, for a query that found no live version, [`ReadModelError::Missing`].
fn unanswered(name: ProjectionName) -> impl FnOnce(RedisError) -> ReadModelError {
    move |error| {
        if error.code() == Some("NOLIVE") {
            ReadModelError::Missing(name)
        } else {
            unavailable(error)
        }
    }
}

fn corrupt(what: &str, id: &str) -> ReadModelError {
    ReadModelError::Unavailable(format!("redis holds a {what} {id} that does not read back"))
}

/// Whether `prefix` is safe as a key prefix (and inside a SCAN pattern).
pub fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl RedisProjections {
    /// Connects, loads the functions and starts watching for changes.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisProjections, ReadModelError> {
        if !valid_prefix(prefix) {
            return Err(ReadModelError::Unavailable(format!(
                "the redis key prefix {prefix:?} may hold only letters, digits, '-', '_' and '.'"
            )));
        }
        // Several servers, separated by commas, are nodes of one cluster; so may be one.
        let nodes: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let first = *nodes.first().ok_or_else(|| {
            ReadModelError::Unavailable("no Redis server is named (REDIS_URL is empty)".into())
        })?;
        let client = ::redis::Client::open(first).map_err(unavailable)?;
        // One plain connection first: the manager retries an unreachable server for a long
        // while without a word, where an operator wants to hear at once where and why.
        let unreachable = |why: String| {
            ReadModelError::Unavailable(format!(
                "cannot reach Redis at {}: {why}",
                client.get_connection_info().addr
            ))
        };
        let mut plain =
            match tokio::time::timeout(CONNECT_TIMEOUT, client.get_multiplexed_async_connection())
                .await
            {
                Ok(Ok(plain)) => plain,
                Ok(Err(error)) => return Err(unreachable(error.to_string())),
                Err(_) => {
                    return Err(unreachable(format!(
                        "no answer within {} s",
                        CONNECT_TIMEOUT.as_secs()
                    )))
                }
            };
        let info: String = ::redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut plain)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = if info.contains("cluster_enabled:1") {
            // Retried briefly, as the server's manager reconnects: a call to the slots of a
            // master that is down fails in about a second, for the consumer to retry and a
            // query to answer 503, instead of waiting out the client's default of minutes.
            let cluster = ::redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(CONNECT_TIMEOUT)
                .retries(CLUSTER_RETRIES)
                .min_retry_wait(100)
                .max_retry_wait(500)
                .build()
                .map_err(unavailable)?;
            Connection::Cluster(cluster.get_async_connection().await.map_err(unavailable)?)
        } else if nodes.len() > 1 {
            return Err(unreachable(format!(
                "{} servers are named, as for a cluster, but this one is not a cluster node",
                nodes.len()
            )));
        } else {
            Connection::Server(ConnectionManager::new(client).await.map_err(unavailable)?)
        };
        load_functions(&conn).await.map_err(unavailable)?;
        let store = RedisProjections {
            conn,
            prefix: prefix.to_owned(),
            changes: Arc::new(watch::channel(0).0),
        };
        tokio::spawn(watch_changes(
            store.conn.clone(),
            ProjectionName::ALL.map(|name| store.tick_key(name)),
            Arc::downgrade(&store.changes),
        ));
        Ok(store)
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The keys of projection `name` start with this. The name in braces is the keys' hash
    /// tag: in a cluster, all of a projection's keys share one slot, so one function call may
    /// apply a batch of its events and record them applied, atomically.
    pub fn base(&self, name: ProjectionName) -> String {
        format!("{}:rm:{{{}}}", self.prefix, name)
    }

    /// The keys of version `version` of `name` start with this and a `:`.
    pub fn root(&self, name: ProjectionName, version: u32) -> String {
        format!("{}:v{version}", self.base(name))
    }

    /// Moves whenever projection `name` may have changed.
    fn tick_key(&self, name: ProjectionName) -> String {
        format!("{}:tick", self.base(name))
    }

    /// `FCALL` (or, `read_only`, `FCALL_RO`) of `function` on projection `name`: its base is
    /// declared as the call's one key, by which a cluster routes it to the slot of all the
    /// projection's keys, and is passed again as the first argument, where the functions
    /// read it.
    fn fcall(&self, function: &str, read_only: bool, name: ProjectionName) -> ::redis::Cmd {
        let base = self.base(name);
        let mut cmd = ::redis::cmd(if read_only { "FCALL_RO" } else { "FCALL" });
        cmd.arg(Library::this_build().function(function))
            .arg(1)
            .arg(&base)
            .arg(base);
        cmd
    }

    /// [`RedisProjections::fcall`] with `args` after the base.
    async fn call<T: FromRedisValue>(
        &self,
        function: &str,
        read_only: bool,
        name: ProjectionName,
        args: impl ToRedisArgs,
    ) -> Result<T, RedisError> {
        let mut cmd = self.fcall(function, read_only, name);
        cmd.arg(args);
        self.query(&cmd).await
    }

    /// Runs `cmd`; when Redis lost the functions (it restarted: it keeps nothing on disk),
    /// loads them again and runs it once more.
    async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, RedisError> {
        match self.conn.query(cmd).await {
            Err(error) if lost_functions(&error) => {
                tracing::warn!("redis lost the read-model functions; loading them again");
                load_functions(&self.conn).await?;
                self.conn.query(cmd).await
            }
            other => other,
        }
    }

    /// Moves this instance's watch at once: waiters here need not wait for the poller.
    fn changed_here(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// The function library as this build loads it. Its name and its functions' names end in a
/// hash of its text (`groupbuy_rm_<build>`, `groupbuy_orders_<build>`), so that instances of
/// builds whose functions differ (a rolling upgrade) each call their own in one Redis: loading
/// one build's library never replaces another's. A build's library stays in Redis when the
/// build is gone; `FUNCTION DELETE` removes it once no instance of that build runs.
pub struct Library {
    /// The hash of the text, in hex.
    pub build: String,
    /// `groupbuy_rm_<build>`.
    pub name: String,
    /// The text to load.
    pub source: String,
}

impl Library {
    /// This build's library.
    pub fn this_build() -> &'static Library {
        static LIBRARY: std::sync::LazyLock<Library> =
            std::sync::LazyLock::new(|| Library::of(FUNCTIONS));
        &LIBRARY
    }

    /// The library of the text `source`, its marker replaced by the text's hash.
    pub fn of(source: &str) -> Library {
        let build = format!("{:016x}", fnv1a(source.as_bytes()));
        Library {
            name: format!("groupbuy_rm_{build}"),
            source: source.replace(BUILD_MARKER, &build),
            build,
        }
    }

    /// The name `function` is registered under in this library.
    fn function(&self, function: &str) -> String {
        format!("{function}_{}", self.build)
    }
}

/// FNV-1a, 64 bits: stable across builds and Rust versions, which `std`'s hasher is not, so
/// the same text always names the same library.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn lost_functions(error: &RedisError) -> bool {
    error.to_string().contains("Function not found")
}

/// Loads this build's functions, on every master of a cluster. `REPLACE` replaces only a
/// library of the same name, which is the same text.
async fn load_functions(conn: &Connection) -> Result<(), RedisError> {
    let mut load = ::redis::cmd("FUNCTION");
    load.arg("LOAD")
        .arg("REPLACE")
        .arg(&Library::this_build().source);
    let _: String = conn.query(&load).await?;
    Ok(())
}

/// Moves `changes` whenever a tick key does, polling only while someone waits.
async fn watch_changes<const N: usize>(
    conn: Connection,
    keys: [String; N],
    changes: Weak<watch::Sender<u64>>,
) {
    let mut last: Option<u64> = None;
    loop {
        tokio::time::sleep(CHANGE_POLL).await;
        let Some(changes) = changes.upgrade() else {
            return;
        };
        if changes.receiver_count() == 0 {
            continue;
        }
        // One GET a key: in a cluster, the keys are in different slots.
        let mut tick = Some(0u64);
        for key in &keys {
            let moved: Result<Option<u64>, _> = conn.query(::redis::cmd("GET").arg(key)).await;
            tick = match (tick, moved) {
                (Some(sum), Ok(n)) => Some(sum.wrapping_add(n.unwrap_or(0))),
                _ => None,
            };
        }
        if let Some(tick) = tick {
            if last != Some(tick) {
                last = Some(tick);
                changes.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }
}

/// The ops as the Lua functions read them: every number a string, no nulls ([`Op`]'s form).
fn ops_json(ops: &[Op]) -> String {
    serde_json::to_string(ops).expect("ops always serialise")
}

fn pairs(flat: Vec<String>) -> HashMap<String, String> {
    let mut fields = HashMap::with_capacity(flat.len() / 2);
    let mut flat = flat.into_iter();
    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
        fields.insert(k, v);
    }
    fields
}

fn field<T: FromStr>(fields: &HashMap<String, String>, name: &str) -> Option<T> {
    fields.get(name)?.parse().ok()
}

/// A stock counter, shown as the memory store shows its sums: below zero as zero. Moves of
/// different buckets applied out of order take one below zero for a moment; only a log that
/// breaks the stock invariant (which the audit reports) leaves it there.
fn units(fields: &HashMap<String, String>, name: &str) -> Option<u32> {
    let units: i64 = field(fields, name)?;
    Some(u32::try_from(units.max(0)).unwrap_or(u32::MAX))
}

fn campaign_view(id: &str, flat: Vec<String>) -> Result<Option<CampaignView>, ReadModelError> {
    if flat.is_empty() {
        return Ok(None);
    }
    let f = pairs(flat);
    let view = (|| {
        Some(CampaignView {
            campaign_id: id.parse().ok()?,
            store_id: field(&f, "store")?,
            sku: f.get("sku")?.clone(),
            title: f.get("title")?.clone(),
            price_cents: Cents::new(field(&f, "price")?),
            quota: field(&f, "quota")?,
            per_user_limit: field(&f, "limit")?,
            starts_at: timestamp(field(&f, "starts")?),
            ends_at: timestamp(field(&f, "ends")?),
            payment_timeout_seconds: field(&f, "timeout")?,
            closed_at: field(&f, "closed").map(timestamp),
            stock: Stock {
                total: units(&f, "total")?,
                available: units(&f, "available")?,
                reserved: units(&f, "reserved")?,
                sold: units(&f, "sold")?,
            },
        })
    })();
    view.map(Some).ok_or_else(|| corrupt("campaign", id))
}

/// An order as `groupbuy_order` returns it: id, order fields, payment fields, payment id.
type OrderReply = (String, Vec<String>, Vec<String>, String);

fn order_of(reply: OrderReply) -> Result<OrderView, ReadModelError> {
    let (id, order, payment, payment_id) = reply;
    let o = pairs(order);
    let p = pairs(payment);
    let view = (|| {
        let order_id: OrderId = id.parse().ok()?;
        let fields = OrderFields {
            user_id: field(&o, "user")?,
            campaign_id: field(&o, "campaign")?,
            quantity: field(&o, "quantity")?,
            amount_cents: Cents::new(field(&o, "amount")?),
            status: unsnake(o.get("status")?)?,
            reason: o.get("reason").map_or("", String::as_str),
            created_at: field(&o, "created")?,
            updated_at: field(&o, "updated")?,
        };
        let payment = if payment_id.is_empty() {
            None
        } else {
            let payment_id: PaymentId = payment_id.parse().ok()?;
            Some(if p.is_empty() {
                // Requested by the order, not yet answered.
                (
                    PaymentView {
                        payment_id,
                        status: domain::payment::PaymentStatus::Pending,
                        amount_cents: fields.amount_cents,
                    },
                    fields.updated_at,
                )
            } else {
                (
                    PaymentView {
                        payment_id,
                        status: unsnake(p.get("status")?)?,
                        amount_cents: fields.amount_cents,
                    },
                    field(&p, "updated")?,
                )
            })
        };
        Some(order_view(order_id, &fields, payment))
    })();
    view.ok_or_else(|| corrupt("order", &id))
}

/// Every status an order can be in: a listing of all or of a campaign's orders merges their
/// sets.
const ORDER_STATUSES: [OrderStatus; 5] = [
    OrderStatus::Pending,
    OrderStatus::AwaitingPayment,
    OrderStatus::Confirmed,
    OrderStatus::Rejected,
    OrderStatus::Cancelled,
];

/// What an order listing walks: the sorted sets it merges, and the campaign and status it
/// must still filter by. A customer's orders are few (a limit per campaign bounds them), so
/// their one set is filtered; all orders and a campaign's are many, so they have a set per
/// status.
#[derive(Debug, PartialEq)]
struct OrderIndex {
    sets: Vec<String>,
    campaign: Option<CampaignId>,
    status: Option<String>,
}

fn order_index(filter: &OrderFilter) -> OrderIndex {
    let status = filter.status.map(|s| snake(&s));
    let by_status = |prefix: String| match &status {
        Some(s) => vec![format!("{prefix}{s}")],
        None => ORDER_STATUSES
            .iter()
            .map(|s| format!("{prefix}{}", snake(s)))
            .collect(),
    };
    match (filter.user_id, filter.campaign_id) {
        (Some(u), campaign) => OrderIndex {
            sets: vec![format!("u:{u}")],
            campaign,
            status,
        },
        (None, Some(c)) => OrderIndex {
            sets: by_status(format!("cos:{c}:")),
            campaign: None,
            status: None,
        },
        (None, None) => OrderIndex {
            sets: by_status("os:".to_owned()),
            campaign: None,
            status: None,
        },
    }
}

impl RedisProjections {
    /// The last version of each of `stream_ids` the live version applied, read by the Redis
    /// `function` (`groupbuy_applied` answers 0 when no version is live, `groupbuy_shown`
    /// fails with [`ReadModelError::Missing`]).
    async fn versions_in_live(
        &self,
        stream_ids: &[String],
        function: &str,
    ) -> Result<Vec<u64>, ReadModelError> {
        let mut versions = vec![0; stream_ids.len()];
        for name in ProjectionName::ALL {
            let (at, streams): (Vec<usize>, Vec<&String>) = stream_ids
                .iter()
                .enumerate()
                .filter(|(_, s)| name.reads(s))
                .unzip();
            if streams.is_empty() {
                continue;
            }
            let found: Vec<u64> = self
                .call(function, true, name, streams)
                .await
                .map_err(unanswered(name))?;
            for (i, version) in at.into_iter().zip(found) {
                versions[i] = version;
            }
        }
        Ok(versions)
    }
}

#[async_trait]
impl ReadModel for RedisProjections {
    async fn campaign(&self, id: CampaignId) -> Result<Option<CampaignView>, ReadModelError> {
        let id = id.to_string();
        let flat: Vec<String> = self
            .call("groupbuy_campaign", true, ProjectionName::Campaigns, &id)
            .await
            .map_err(unanswered(ProjectionName::Campaigns))?;
        campaign_view(&id, flat)
    }

    async fn campaigns(
        &self,
        store_id: Option<StoreId>,
        status: Option<CampaignStatus>,
        now: Timestamp,
    ) -> Result<Vec<CampaignView>, ReadModelError> {
        let index = store_id.map_or_else(|| "c".to_owned(), |s| format!("cs:{s}"));
        let found: Vec<(String, Vec<String>)> = self
            .call(
                "groupbuy_campaigns",
                true,
                ProjectionName::Campaigns,
                (index, CAMPAIGNS_SCAN_MAX),
            )
            .await
            .map_err(unanswered(ProjectionName::Campaigns))?;
        let mut views = Vec::new();
        for (id, flat) in found {
            if let Some(view) = campaign_view(&id, flat)? {
                if status.is_none_or(|s| view.status(now) == s) {
                    views.push(view);
                }
            }
            if views.len() == CAMPAIGNS_LIST_MAX {
                break;
            }
        }
        Ok(views)
    }

    async fn order(&self, id: OrderId) -> Result<Option<OrderView>, ReadModelError> {
        let reply: Option<OrderReply> = self
            .call(
                "groupbuy_order",
                true,
                ProjectionName::Orders,
                id.to_string(),
            )
            .await
            .map_err(unanswered(ProjectionName::Orders))?;
        reply.map(order_of).transpose()
    }

    async fn funnel(&self, id: CampaignId) -> Result<Funnel, ReadModelError> {
        let counts: Vec<(String, i64)> = self
            .call(
                "groupbuy_funnel",
                true,
                ProjectionName::Orders,
                id.to_string(),
            )
            .await
            .map_err(unanswered(ProjectionName::Orders))?;
        Ok(Funnel::from_counts(
            counts.iter().map(|(field, n)| (field.as_str(), *n)),
        ))
    }

    async fn orders(
        &self,
        filter: &OrderFilter,
        after: Option<OrderId>,
        limit: usize,
    ) -> Result<OrderPage, ReadModelError> {
        let limit = limit.clamp(1, ORDERS_PAGE_MAX);
        let index = order_index(filter);
        let (found, more): (Vec<OrderReply>, u8) = self
            .call(
                "groupbuy_orders",
                true,
                ProjectionName::Orders,
                (
                    after.map(|a| a.to_string()).unwrap_or_default(),
                    limit,
                    index.campaign.map(|c| c.to_string()).unwrap_or_default(),
                    index.status.unwrap_or_default(),
                    index.sets,
                ),
            )
            .await
            .map_err(unanswered(ProjectionName::Orders))?;
        let items = found
            .into_iter()
            .map(order_of)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if more == 1 {
            items.last().map(|o| o.order_id)
        } else {
            None
        };
        Ok(OrderPage { items, next })
    }

    async fn applied_version(&self, stream_id: &str) -> Result<u64, ReadModelError> {
        let versions = self.applied_version_each(&[stream_id.to_owned()]).await?;
        Ok(versions.first().copied().unwrap_or(0))
    }

    async fn applied_version_each(
        &self,
        stream_ids: &[String],
    ) -> Result<Vec<u64>, ReadModelError> {
        self.versions_in_live(stream_ids, "groupbuy_applied").await
    }

    async fn applied_versions(&self, stream_ids: &[String]) -> Result<Vec<u64>, ReadModelError> {
        self.versions_in_live(stream_ids, "groupbuy_shown").await
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn ping(&self) -> Result<(), ReadModelError> {
        let _: String = self
            .conn
            .query(&::redis::cmd("PING"))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn rebuild_error(name: ProjectionName, version: u32, error: RedisError) -> RebuildError {
    match error.code() {
        Some("LEASE_LOST") => RebuildError::LeaseLost { name, version },
        Some("BUSY") => RebuildError::Busy(name),
        _ => RebuildError::Store(unavailable(error)),
    }
}

fn millis(lease: Duration) -> u64 {
    u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl ProjectionStore for RedisProjections {
    async fn apply(
        &self,
        name: ProjectionName,
        change: &Change,
    ) -> Result<ApplyOutcome, ReadModelError> {
        let (live, applied): (String, u8) = self
            .call(
                "groupbuy_apply",
                false,
                name,
                (
                    self.tick_key(name),
                    &change.stream_id,
                    change.version,
                    change.position,
                    ops_json(&change.ops),
                ),
            )
            .await
            .map_err(unavailable)?;
        self.changed_here();
        Ok(ApplyOutcome {
            live: live.parse().ok(),
            applied: applied == 1,
        })
    }

    async fn apply_all(
        &self,
        name: ProjectionName,
        changes: &[Change],
    ) -> Result<Vec<ApplyOutcome>, ReadModelError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = self.fcall("groupbuy_apply_all", false, name);
        cmd.arg(self.tick_key(name));
        for change in changes {
            cmd.arg(&change.stream_id)
                .arg(change.version)
                .arg(change.position)
                .arg(ops_json(&change.ops));
        }
        let reply: Vec<::redis::Value> = self.query(&cmd).await.map_err(unavailable)?;
        self.changed_here();
        let mut reply = reply.into_iter();
        let live: String = match reply.next() {
            Some(value) => ::redis::from_redis_value(&value).map_err(unavailable)?,
            None => String::new(),
        };
        let live = live.parse().ok();
        let applied = reply
            .map(|value| ::redis::from_redis_value::<u8>(&value).map(|a| a == 1))
            .collect::<Result<Vec<bool>, RedisError>>()
            .map_err(unavailable)?;
        Ok(applied
            .into_iter()
            .map(|applied| ApplyOutcome { live, applied })
            .collect())
    }

    async fn skip(
        &self,
        name: ProjectionName,
        stream_id: &str,
        version: u64,
    ) -> Result<(), ReadModelError> {
        let _: u8 = self
            .call("groupbuy_skip", false, name, (stream_id, version))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn versions(&self) -> Result<Vec<ProjectionVersion>, ReadModelError> {
        let mut versions = Vec::new();
        for name in ProjectionName::ALL {
            let found: Vec<(u32, String, u64, u64)> = self
                .query(&self.fcall("groupbuy_versions", true, name))
                .await
                .map_err(unavailable)?;
            for (version, status, position, events) in found {
                let status = match status.as_str() {
                    "live" => VersionStatus::Live,
                    "building" => VersionStatus::Building,
                    _ => continue,
                };
                versions.push(ProjectionVersion {
                    name,
                    version,
                    status,
                    position,
                    events,
                });
            }
        }
        versions.sort_by_key(|v| (v.name, v.version));
        Ok(versions)
    }

    async fn begin_rebuild(
        &self,
        name: ProjectionName,
        lease: Duration,
    ) -> Result<u32, RebuildError> {
        let started: Vec<u32> = self
            .call("groupbuy_begin", false, name, millis(lease))
            .await
            .map_err(|e| rebuild_error(name, 0, e))?;
        let (&version, abandoned) = started
            .split_first()
            .ok_or_else(|| RebuildError::Store(corrupt("rebuild start", name.as_str())))?;
        for old in abandoned {
            tracing::warn!(projection = %name, version = old, "removing a version whose rebuild was abandoned");
            self.drop_version(name, *old).await?;
        }
        Ok(version)
    }

    async fn rebuild_apply(
        &self,
        name: ProjectionName,
        version: u32,
        changes: &[Change],
        lease: Duration,
    ) -> Result<(), RebuildError> {
        let mut cmd = self.fcall("groupbuy_rebuild", false, name);
        cmd.arg(version).arg(millis(lease));
        for change in changes {
            cmd.arg(&change.stream_id)
                .arg(change.version)
                .arg(change.position)
                .arg(ops_json(&change.ops));
        }
        let _: u8 = self
            .query(&cmd)
            .await
            .map_err(|e| rebuild_error(name, version, e))?;
        Ok(())
    }

    async fn finish_rebuild(
        &self,
        name: ProjectionName,
        version: u32,
    ) -> Result<Option<u32>, RebuildError> {
        let replaced: String = self
            .call(
                "groupbuy_finish",
                false,
                name,
                (version, self.tick_key(name)),
            )
            .await
            .map_err(|e| rebuild_error(name, version, e))?;
        Ok(replaced.parse().ok())
    }

    async fn abandon_rebuild(
        &self,
        name: ProjectionName,
        version: u32,
    ) -> Result<(), ReadModelError> {
        let _: u8 = self
            .call("groupbuy_abandon", false, name, version)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn drop_version(&self, name: ProjectionName, version: u32) -> Result<(), ReadModelError> {
        let still_used = self
            .versions()
            .await?
            .iter()
            .any(|v| v.name == name && v.version == version);
        if still_used {
            return Ok(());
        }
        let root = self.root(name, version);
        let pattern = format!("{root}:*");
        let mut cursor: u64 = 0;
        loop {
            // In a cluster, on the master of the projection's slot, where all its keys are.
            let (next, keys): (u64, Vec<String>) = self
                .conn
                .query_at(
                    &root,
                    ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(DROP_BATCH),
                )
                .await
                .map_err(unavailable)?;
            if !keys.is_empty() {
                let _: u64 = self
                    .conn
                    .query(::redis::cmd("UNLINK").arg(&keys))
                    .await
                    .map_err(unavailable)?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let _: u64 = self
            .conn
            .query(
                ::redis::cmd("SREM")
                    .arg(format!("{}:versions", self.base(name)))
                    .arg(version),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_is_named_for_its_text() {
        let ours = Library::this_build();
        assert_eq!(Library::of(FUNCTIONS).name, ours.name);
        assert!(ours
            .source
            .starts_with(&format!("#!lua name={}\n", ours.name)));
        assert!(!ours.source.contains(BUILD_MARKER));
        assert_eq!(
            ours.function("groupbuy_orders"),
            format!("groupbuy_orders_{}", ours.build)
        );
        let changed = Library::of(&FUNCTIONS.replace("local function", "local  function"));
        assert_ne!(changed.build, ours.build);
    }

    #[test]
    fn ops_reach_lua_with_numbers_as_strings_and_without_nulls() {
        let order_id: OrderId = "01JD0000000000000000000000".parse().unwrap();
        let json = ops_json(&[Op::OrderStatus {
            order_id,
            status: OrderStatus::Confirmed,
            reason: String::new(),
            payment_id: None,
            at: 1_732_000_000_123_456_789,
        }]);
        let sent: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            sent,
            serde_json::json!([{
                "op": "order_status",
                "order_id": "01JD0000000000000000000000",
                "status": "confirmed",
                "reason": "",
                "at": "1732000000123456789",
            }])
        );
    }

    #[test]
    fn a_listing_walks_the_sets_that_hold_its_orders() {
        let user: domain::UserId = "01JD0000000000000000000001".parse().unwrap();
        let campaign: CampaignId = "01JD0000000000000000000002".parse().unwrap();
        let filter = OrderFilter {
            user_id: Some(user),
            campaign_id: Some(campaign),
            status: Some(OrderStatus::Confirmed),
        };
        assert_eq!(
            order_index(&filter),
            OrderIndex {
                sets: vec![format!("u:{user}")],
                campaign: Some(campaign),
                status: Some("confirmed".into()),
            }
        );
        let filter = OrderFilter {
            campaign_id: Some(campaign),
            status: Some(OrderStatus::Rejected),
            ..Default::default()
        };
        assert_eq!(
            order_index(&filter).sets,
            vec![format!("cos:{campaign}:rejected")]
        );
        let all = order_index(&OrderFilter::default());
        assert_eq!(all.sets.len(), ORDER_STATUSES.len());
        assert!(all.sets.contains(&"os:awaiting_payment".to_owned()));
        assert_eq!((all.campaign, all.status), (None, None));
    }
}
