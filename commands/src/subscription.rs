//! The subscription runtime sagas and projections consume the bus through.
//!
//! A [`Subscription`] runs one durable consumer and hands the events of its deliveries (each
//! a batch of consecutive events of the log) to a [`Handler`], a batch at a time:
//!
//! - **Bounded work.** At most `max_in_flight` deliveries are held at once, spread over
//!   `lanes` workers; the bus holds back the rest.
//! - **Batches that grow with the load.** A lane whose handler takes batches takes every
//!   delivery that waited for it (at most 16) and hands their events over as one batch; when
//!   that batch cannot be handled at once, each delivery is handled on its own as below.
//! - **Per-stream order**, with [`Ordering::PerStream`]: deliveries are handled in the order
//!   they came, one batch at a time, and a failing batch is retried in place (holding back what
//!   follows) rather than sent back to the bus. A delivery with an event whose predecessor has
//!   not been handled yet (one redelivered after a crash, say) is sent back to wait for it, for
//!   at most `gap_wait`. With [`Ordering::Unordered`], deliveries are handled in parallel lanes.
//! - **Dedupe.** Before handling, the [`Dedupe`] store is asked whether this consumer is
//!   done with each event already; afterwards the events are recorded. Store the record with
//!   the handler's own effects where you can (then a crash between the two cannot repeat an
//!   effect); otherwise handlers must tolerate the rare repeat, which the deterministic event
//!   ids of command handling make harmless.
//! - **Retries with backoff, then a dead letter.** A failing (or panicking) batch is retried
//!   with exponential backoff; after `max_attempts` its events are handled one by one, each
//!   retried the same way, and an event that still fails goes to the bus's dead letters with
//!   the reason, an error is logged, the dead-letter counter moves, and the consumer goes on.
//!   A body that is not a batch of events is dead-lettered at once.
//! - **One trace.** Each event is handled in a span of its own, a child of the span that
//!   recorded it; the handler sees the event with its metadata naming that span, so what it
//!   does for the event continues the trace.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use schemas::{Envelope, EventHead};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;
use ulid::Ulid;

use crate::bus::{Bus, ConsumerOptions, Deliveries, Delivery, Letter, Topic};

/// Why a handler could not handle an event; it is retried, then dead-lettered.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// What a subscription does with each event.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one event. Return an error to have it retried.
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError>;

    /// Handles several events at once, in order: all of them, or an error, after which they
    /// are handled again (so handling must be idempotent, as it is for redeliveries anyway).
    /// Handlers that gain from batching (one round trip for many events) override it.
    async fn handle_batch(&self, events: &[&Envelope]) -> Result<(), HandlerError> {
        for event in events {
            self.handle(event).await?;
        }
        Ok(())
    }

    /// Whether the handler has anything to do with an event; the others are acknowledged
    /// without being read whole, deduplicated, recorded or handled. All by default.
    fn wants(&self, _event: &EventHead<'_>) -> bool {
        true
    }

    /// The topic of the mirror it reads ([`Topic`]), so that the bus delivers it only the
    /// messages of that topic; `None`, by default, for every message. The events it wants must
    /// all be of that topic.
    fn topic(&self) -> Option<Topic> {
        None
    }

    /// Whether the runtime should hand it whole batches ([`Handler::handle_batch`]), falling
    /// back to one event at a time only when a batch keeps failing. False by default: events
    /// go one by one to [`Handler::handle`], and a failure retries only its own event.
    fn handles_batches(&self) -> bool {
        false
    }
}

/// Whether events of one stream must be handled in version order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ordering {
    /// In version order, one at a time per stream. Order holds within one process: run one
    /// consumer process per durable consumer (a second one is a hot standby at best).
    PerStream,
    /// In any order, as many at once as there are lanes.
    Unordered,
}

/// How a subscription runs.
#[derive(Clone, Debug)]
pub struct SubscriptionOptions {
    /// The durable consumer.
    pub consumer: ConsumerOptions,
    /// Order per stream or not.
    pub ordering: Ordering,
    /// Workers handling deliveries at once.
    pub lanes: usize,
    /// Handler attempts before a delivery is dead-lettered.
    pub max_attempts: u32,
    /// The pause before the first retry; it doubles with every attempt.
    pub first_backoff: Duration,
    /// The longest pause between retries.
    pub max_backoff: Duration,
    /// How long an event waits for its stream's previous event before it is handled anyway
    /// (with an error logged): longer than the bus's ack wait, so a predecessor lost in a
    /// crash has time to come back.
    pub gap_wait: Duration,
}

impl SubscriptionOptions {
    /// Defaults for the consumer `name`: per-stream order, 16 lanes, 5 attempts.
    pub fn new(name: impl Into<String>) -> Self {
        let consumer = ConsumerOptions::new(name);
        SubscriptionOptions {
            gap_wait: consumer.ack_wait * 3,
            consumer,
            ordering: Ordering::PerStream,
            lanes: 16,
            max_attempts: 5,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(16));
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What a [`Dedupe`] store knows about an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Not handled yet, and next in its stream (as far as the store tracks order).
    New,
    /// Handled (or dead-lettered) already.
    Done,
    /// Not handled, but an earlier event of its stream is not handled either: the store is
    /// done with the stream up to `done_to`.
    Early {
        /// The last version of the stream the consumer is done with.
        done_to: u64,
    },
}

/// The dedupe store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("dedupe store: {0}")]
pub struct DedupeError(String);

impl DedupeError {
    /// A failure of a dedupe store, with the reason.
    pub fn new(reason: impl Into<String>) -> Self {
        DedupeError(reason.into())
    }
}

/// What a consumer is done with, for consumer-side dedupe.
#[async_trait]
pub trait Dedupe: Send + Sync + 'static {
    /// Whether `consumer` is done with `event`.
    async fn seen(&self, consumer: &str, event: &Envelope) -> Result<Seen, DedupeError>;
    /// [`Dedupe::seen`] of each of `events`, each of a different stream; stores that can
    /// answer in one go (one round trip for a batch).
    async fn seen_all(
        &self,
        consumer: &str,
        events: &[&Envelope],
    ) -> Result<Vec<Seen>, DedupeError> {
        let mut seen = Vec::with_capacity(events.len());
        for event in events {
            seen.push(self.seen(consumer, event).await?);
        }
        Ok(seen)
    }
    /// Records that `consumer` is done with `event`.
    async fn record(&self, consumer: &str, event: &Envelope) -> Result<(), DedupeError>;
    /// Records that `consumer` is done with `events`; stores that can, do it in one go.
    async fn record_all(&self, consumer: &str, events: &[&Envelope]) -> Result<(), DedupeError> {
        for event in events {
            self.record(consumer, event).await?;
        }
        Ok(())
    }
    /// Whether answers rely on events of a stream being recorded in version order (so the
    /// subscription must use [`Ordering::PerStream`]).
    fn needs_stream_order(&self) -> bool;
}

/// Dedupe by (stream, version) in memory: the last version of each stream a consumer is
/// done with.
#[derive(Default)]
pub struct MemoryStreamVersions {
    versions: Mutex<HashMap<(String, String), u64>>,
}

impl MemoryStreamVersions {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

fn by_version(done_to: u64, version: u64) -> Seen {
    if version <= done_to {
        Seen::Done
    } else if version == done_to + 1 {
        Seen::New
    } else {
        Seen::Early { done_to }
    }
}

#[async_trait]
impl Dedupe for MemoryStreamVersions {
    async fn seen(&self, consumer: &str, event: &Envelope) -> Result<Seen, DedupeError> {
        let versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let done_to = versions
            .get(&(consumer.to_owned(), event.stream_id.clone()))
            .copied()
            .unwrap_or(0);
        Ok(by_version(done_to, event.stream_version))
    }

    async fn record(&self, consumer: &str, event: &Envelope) -> Result<(), DedupeError> {
        let mut versions = self.versions.lock().unwrap_or_else(|p| p.into_inner());
        let done_to = versions
            .entry((consumer.to_owned(), event.stream_id.clone()))
            .or_default();
        *done_to = (*done_to).max(event.stream_version);
        Ok(())
    }

    fn needs_stream_order(&self) -> bool {
        true
    }
}

/// Dedupe by (stream, version) in Postgres (`consumer_stream_versions`): survives restarts.
///
/// Writes go to Postgres and to an in-process cache that answers repeat questions about a
/// stream without a round trip. They commit asynchronously (no wait for the WAL flush): a
/// Postgres crash can forget the last fraction of a second of records, and those events are
/// then handled once more, the same window a consumer crash between handling and recording
/// leaves, which handlers tolerate anyway. Under a saturating write load this is what lets a
/// consumer keep up (see docs/adr/0005-jetstream-mirror.md). The cache assumes one process consumes each durable consumer
/// at a time, which per-stream order needs anyway (see [`Ordering::PerStream`]).
pub struct PgStreamVersions {
    pool: PgPool,
    cache: Mutex<HashMap<(String, String), u64>>,
}

/// Streams a [`PgStreamVersions`] cache holds before it starts over.
const VERSION_CACHE_MAX: usize = 100_000;

impl PgStreamVersions {
    /// A store in the database of `pool` (migrated by the event log).
    pub fn new(pool: PgPool) -> Self {
        PgStreamVersions {
            pool,
            cache: Mutex::default(),
        }
    }

    fn cached(&self, key: &(String, String)) -> Option<u64> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).copied()
    }

    fn remember(&self, key: (String, String), done_to: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERSION_CACHE_MAX && !cache.contains_key(&key) {
            cache.clear();
        }
        let entry = cache.entry(key).or_default();
        *entry = (*entry).max(done_to);
    }
}

fn dedupe_error(error: sqlx::Error) -> DedupeError {
    DedupeError(error.to_string())
}

#[async_trait]
impl Dedupe for PgStreamVersions {
    async fn seen(&self, consumer: &str, event: &Envelope) -> Result<Seen, DedupeError> {
        let key = (consumer.to_owned(), event.stream_id.clone());
        if let Some(done_to) = self.cached(&key) {
            return Ok(by_version(done_to, event.stream_version));
        }
        let done_to: Option<i64> = sqlx::query_scalar(
            "SELECT stream_version FROM consumer_stream_versions \
             WHERE consumer = $1 AND stream_id = $2",
        )
        .bind(consumer)
        .bind(&event.stream_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(dedupe_error)?;
        let done_to = done_to.map_or(0, |v| u64::try_from(v).unwrap_or(0));
        self.remember(key, done_to);
        Ok(by_version(done_to, event.stream_version))
    }

    async fn record(&self, consumer: &str, event: &Envelope) -> Result<(), DedupeError> {
        // Committed without waiting for the WAL flush (see the type's docs): the CTE sets
        // synchronous_commit for this statement's own transaction only.
        sqlx::query(
            "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
             INSERT INTO consumer_stream_versions (consumer, stream_id, stream_version) \
             SELECT $1, $2, $3 FROM relaxed ON CONFLICT (consumer, stream_id) DO UPDATE \
             SET stream_version = GREATEST(consumer_stream_versions.stream_version, EXCLUDED.stream_version)",
        )
        .bind(consumer)
        .bind(&event.stream_id)
        .bind(i64::try_from(event.stream_version).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await
        .map_err(dedupe_error)?;
        self.remember(
            (consumer.to_owned(), event.stream_id.clone()),
            event.stream_version,
        );
        Ok(())
    }

    async fn record_all(&self, consumer: &str, events: &[&Envelope]) -> Result<(), DedupeError> {
        if events.is_empty() {
            return Ok(());
        }
        // The latest version of each stream, sorted so that two consumers never lock rows in
        // different orders.
        let mut latest: HashMap<&str, u64> = HashMap::new();
        for event in events {
            let v = latest.entry(event.stream_id.as_str()).or_default();
            *v = (*v).max(event.stream_version);
        }
        let mut latest: Vec<(&str, u64)> = latest.into_iter().collect();
        latest.sort_unstable();
        sqlx::query(
            "WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) \
             INSERT INTO consumer_stream_versions (consumer, stream_id, stream_version) \
             SELECT $1, s, v FROM relaxed, UNNEST($2::text[], $3::bigint[]) AS u(s, v) \
             ON CONFLICT (consumer, stream_id) DO UPDATE \
             SET stream_version = GREATEST(consumer_stream_versions.stream_version, EXCLUDED.stream_version)",
        )
        .bind(consumer)
        .bind(latest.iter().map(|(s, _)| *s).collect::<Vec<_>>())
        .bind(
            latest
                .iter()
                .map(|(_, v)| i64::try_from(*v).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
        )
        .execute(&self.pool)
        .await
        .map_err(dedupe_error)?;
        for (stream, version) in latest {
            self.remember((consumer.to_owned(), stream.to_owned()), version);
        }
        Ok(())
    }

    fn needs_stream_order(&self) -> bool {
        true
    }
}

/// Dedupe by event id over the most recent `capacity` events, in memory: for handlers that
/// are idempotent on their own and only want redeliveries filtered cheaply.
pub struct RecentEventIds {
    capacity: usize,
    recent: Mutex<(HashSet<Ulid>, VecDeque<Ulid>)>,
}

impl RecentEventIds {
    /// A store remembering the last `capacity` event ids.
    pub fn new(capacity: usize) -> Self {
        RecentEventIds {
            capacity: capacity.max(1),
            recent: Mutex::default(),
        }
    }
}

#[async_trait]
impl Dedupe for RecentEventIds {
    async fn seen(&self, _consumer: &str, event: &Envelope) -> Result<Seen, DedupeError> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        Ok(if recent.0.contains(&event.event_id) {
            Seen::Done
        } else {
            Seen::New
        })
    }

    async fn record(&self, _consumer: &str, event: &Envelope) -> Result<(), DedupeError> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let (ids, order) = &mut *recent;
        if ids.insert(event.event_id) {
            order.push_back(event.event_id);
            if order.len() > self.capacity {
                if let Some(oldest) = order.pop_front() {
                    ids.remove(&oldest);
                }
            }
        }
        Ok(())
    }

    fn needs_stream_order(&self) -> bool {
        false
    }
}

/// Counters of a subscription, for tests, metrics and logs.
#[derive(Debug, Default)]
pub struct SubscriptionStats {
    /// Events handled.
    pub handled: AtomicU64,
    /// Deliveries of events the consumer was done with, acknowledged without handling.
    pub duplicates: AtomicU64,
    /// Handler failures that were retried.
    pub retries: AtomicU64,
    /// Events sent back to wait for an earlier event of their stream.
    pub early: AtomicU64,
    /// Deliveries given up on and dead-lettered.
    pub dead_lettered: AtomicU64,
}

impl SubscriptionStats {
    fn bump(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, AtomicOrdering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(AtomicOrdering::Relaxed)
    }
}

/// A durable consumer and its handler.
pub struct Subscription {
    shared: Arc<Runtime>,
}

struct Runtime {
    bus: Arc<dyn Bus>,
    options: SubscriptionOptions,
    dedupe: Arc<dyn Dedupe>,
    handler: Arc<dyn Handler>,
    stats: Arc<SubscriptionStats>,
    /// Streams whose next event is waiting for an earlier one, since when.
    waiting: Mutex<HashMap<String, Instant>>,
}

/// Pause before subscribing again after the subscription broke.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(500);
/// Most deliveries a lane takes at once, when its handler takes batches: what waited while it
/// handled the last ones, so batches grow with the load.
const GROUP_DELIVERIES_MAX: usize = 16;
/// Pause before an event that arrived ahead of its stream's previous event comes back.
const EARLY_RETRY: Duration = Duration::from_millis(250);

impl Subscription {
    /// A subscription that has not started.
    ///
    /// # Panics
    /// When `dedupe` needs stream order and `options` does not keep it: that combination
    /// would skip events.
    pub fn new(
        bus: Arc<dyn Bus>,
        options: SubscriptionOptions,
        dedupe: Arc<dyn Dedupe>,
        handler: Arc<dyn Handler>,
    ) -> Subscription {
        assert!(
            !(dedupe.needs_stream_order() && options.ordering == Ordering::Unordered),
            "dedupe by stream version needs Ordering::PerStream"
        );
        let mut options = options;
        options.consumer.topic = handler.topic();
        Subscription {
            shared: Arc::new(Runtime {
                bus,
                options,
                dedupe,
                handler,
                stats: Arc::default(),
                waiting: Mutex::default(),
            }),
        }
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<SubscriptionStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Consumes every partition until `shutdown` resolves, subscribing again whenever the
    /// subscription breaks. Deliveries already taken are handled before it returns. For a
    /// process that is alone on its bus (the embedded default, or a read model of its own).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let runtime = self.shared;
        let lanes = Lanes::start(&runtime);
        let in_flight = Arc::new(Semaphore::new(
            runtime.options.consumer.max_in_flight.max(1),
        ));
        read(
            &runtime,
            &runtime.options.consumer,
            &lanes,
            None,
            &in_flight,
            shutdown,
        )
        .await;
        lanes.finish().await;
    }

    /// Consumes the partitions `assignment` grants, one durable consumer each
    /// (`<name>-p<partition>`), until `shutdown` resolves. A partition taken away is let go
    /// cleanly: no new deliveries, those already taken handled and acknowledged, those the
    /// bus sent meanwhile handed back; then it leaves [`Assignment::running`], and the lease
    /// can go to another instance.
    pub async fn run_partitioned(
        self,
        mut assignment: Assignment,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let runtime = self.shared;
        let lanes = Arc::new(Lanes::start(&runtime));
        let mut readers: HashMap<u16, PartitionReader> = HashMap::new();
        loop {
            let granted = assignment.granted.borrow_and_update().clone();
            for &partition in &granted {
                readers
                    .entry(partition)
                    .or_insert_with(|| PartitionReader::start(&runtime, &lanes, partition));
            }
            for (partition, reader) in &mut readers {
                if !granted.contains(partition) {
                    reader.stop();
                }
            }
            readers.retain(|_, reader| !reader.task.is_finished());
            assignment
                .running
                .send_replace(readers.keys().copied().collect());
            metrics::gauge!("groupbuy_subscription_partitions", "consumer" => runtime.name().to_owned())
                .set(readers.len() as f64);
            tokio::select! {
                _ = &mut shutdown => break,
                changed = assignment.granted.changed() => {
                    if changed.is_err() {
                        // The leases are gone with their keeper: hold nothing.
                        assignment.granted = watch::channel(BTreeSet::new()).1;
                    }
                }
                // Look again for readers that finished letting go.
                _ = tokio::time::sleep(REAP_EVERY) => {}
            }
        }
        for reader in readers.values_mut() {
            reader.stop();
        }
        for (_, reader) in readers {
            let _ = reader.task.await;
        }
        assignment.running.send_replace(BTreeSet::new());
        if let Ok(lanes) = Arc::try_unwrap(lanes) {
            lanes.finish().await;
        }
    }
}

/// The partitions a subscription may consume, and what it tells back.
pub struct Assignment {
    /// The partitions this process holds the lease of now.
    pub granted: watch::Receiver<BTreeSet<u16>>,
    /// The partitions the subscription still consumes: one stays here, after it left
    /// `granted`, until its deliveries are handled, and its lease may go only then.
    pub running: watch::Sender<BTreeSet<u16>>,
}

/// How often a partitioned subscription looks for partitions it finished letting go.
const REAP_EVERY: Duration = Duration::from_millis(100);
/// Longest a reader letting go of a partition waits for the deliveries it took to be handled.
pub const LET_GO_WAIT: Duration = Duration::from_secs(30);
/// How long a reader letting go of a partition hands back the deliveries still coming.
const HAND_BACK_FOR: Duration = Duration::from_millis(200);
/// How long a delivery handed back waits before the bus delivers it again, to the partition's
/// next holder: longer than [`HAND_BACK_FOR`].
const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

/// The workers that handle deliveries, each in order.
struct Lanes {
    senders: Vec<mpsc::UnboundedSender<(Delivery, OwnedSemaphorePermit)>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    round_robin: AtomicU64,
    ordering: Ordering,
}

impl Lanes {
    fn start(runtime: &Arc<Runtime>) -> Lanes {
        let (senders, workers) = (0..runtime.options.lanes.max(1))
            .map(|_| {
                let (send, mut receive) =
                    mpsc::unbounded_channel::<(Delivery, OwnedSemaphorePermit)>();
                let runtime = Arc::clone(runtime);
                let worker = tokio::spawn(async move {
                    let taken = metrics::histogram!(
                        "groupbuy_subscription_batch_deliveries",
                        "consumer" => runtime.name().to_owned()
                    );
                    let mut group = Vec::new();
                    while receive.recv_many(&mut group, runtime.group_size()).await > 0 {
                        taken.record(group.len() as f64);
                        // The permits go with the deliveries, once they are handled.
                        let (deliveries, _permits): (Vec<Delivery>, Vec<_>) =
                            group.drain(..).unzip();
                        runtime.process_all(deliveries).await;
                    }
                });
                (send, worker)
            })
            .unzip();
        Lanes {
            senders,
            workers,
            round_robin: AtomicU64::new(0),
            ordering: runtime.options.ordering,
        }
    }

    /// Hands a delivery of `partition` (`None`: of any) to its lane. With per-stream order
    /// a partition's deliveries all go to one lane, in the order they came: a partition holds
    /// every event of its streams.
    fn send(&self, partition: Option<u16>, delivery: Delivery, permit: OwnedSemaphorePermit) {
        let lane = match (self.ordering, partition) {
            (Ordering::PerStream, None) => 0,
            (Ordering::PerStream, Some(partition)) => usize::from(partition) % self.senders.len(),
            (Ordering::Unordered, _) => {
                let n = self.round_robin.fetch_add(1, AtomicOrdering::Relaxed);
                (n % self.senders.len() as u64) as usize
            }
        };
        self.senders[lane]
            .send((delivery, permit))
            .expect("lane workers live as long as their senders");
    }

    /// Waits for the workers to handle what they were handed.
    async fn finish(self) {
        drop(self.senders);
        for worker in self.workers {
            let _ = worker.await;
        }
    }
}

/// The task reading one partition's durable consumer.
struct PartitionReader {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl PartitionReader {
    fn start(runtime: &Arc<Runtime>, lanes: &Arc<Lanes>, partition: u16) -> PartitionReader {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = Arc::clone(runtime);
        let lanes = Arc::clone(lanes);
        let task = tokio::spawn(async move {
            let consumer = ConsumerOptions {
                name: format!("{}-p{partition}", runtime.options.consumer.name),
                partition: Some(partition),
                ..runtime.options.consumer.clone()
            };
            let max_in_flight = runtime.options.consumer.max_in_flight.max(1);
            let in_flight = Arc::new(Semaphore::new(max_in_flight));
            read(
                &runtime,
                &consumer,
                &lanes,
                Some(partition),
                &in_flight,
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            // Let go only once every delivery taken is handled and acknowledged, or once a
            // stuck handler has had long enough: the bus delivers what it holds again.
            let all = u32::try_from(max_in_flight).unwrap_or(u32::MAX);
            if tokio::time::timeout(LET_GO_WAIT, in_flight.acquire_many(all))
                .await
                .is_err()
            {
                tracing::warn!(consumer = %runtime.name(), partition, "deliveries of a partition let go of are still being handled; letting go anyway");
            }
        });
        PartitionReader {
            stop: Some(stop),
            task,
        }
    }

    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Reads the durable consumer `consumer`, handing each delivery to its lane under a permit of
/// `in_flight`, subscribing again whenever the subscription breaks, until `stop` resolves.
/// Deliveries the bus sent that were not taken yet are handed back to it then.
async fn read(
    runtime: &Arc<Runtime>,
    consumer: &ConsumerOptions,
    lanes: &Lanes,
    partition: Option<u16>,
    in_flight: &Arc<Semaphore>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut deliveries = loop {
        let subscribed = tokio::select! {
            _ = &mut stop => return,
            subscribed = runtime.bus.subscribe(consumer) => subscribed,
        };
        let mut deliveries = match subscribed {
            Ok(deliveries) => deliveries,
            Err(error) => {
                tracing::warn!(consumer = %consumer.name, %error, "cannot subscribe");
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => continue,
                }
            }
        };
        if take(
            &mut deliveries,
            consumer,
            lanes,
            partition,
            in_flight,
            &mut stop,
        )
        .await
        {
            break deliveries;
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
        }
    };
    // What the bus sent for a partition let go and nobody took goes back rather than wait for
    // the ack wait. It comes back after a delay: sooner, it would come back to this reader,
    // which still pulls until it is dropped.
    if partition.is_some() {
        let until = Instant::now() + HAND_BACK_FOR;
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(until, deliveries.next()).await {
            retry(&delivery, HAND_BACK_DELAY, &consumer.name).await;
        }
    }
}

/// Takes deliveries into their lanes until `stop` resolves (true) or the subscription breaks
/// (false).
async fn take(
    deliveries: &mut Box<dyn Deliveries>,
    consumer: &ConsumerOptions,
    lanes: &Lanes,
    partition: Option<u16>,
    in_flight: &Arc<Semaphore>,
    stop: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> bool {
    loop {
        let permit = tokio::select! {
            _ = &mut *stop => return true,
            permit = Arc::clone(in_flight).acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let delivery = tokio::select! {
            _ = &mut *stop => return true,
            delivery = deliveries.next() => delivery,
        };
        match delivery {
            Some(Ok(delivery)) => lanes.send(partition, delivery, permit),
            Some(Err(error)) => {
                tracing::warn!(consumer = %consumer.name, %error, "subscription broke; subscribing again");
                return false;
            }
            None => return false,
        }
    }
}

impl Runtime {
    fn name(&self) -> &str {
        &self.options.consumer.name
    }

    /// Deliveries a lane takes at once: the handler gets their events as one batch when it
    /// takes batches.
    fn group_size(&self) -> usize {
        if self.handler.handles_batches() {
            GROUP_DELIVERIES_MAX
        } else {
            1
        }
    }

    /// Handles deliveries that waited in one lane, in order: their events as one batch (one
    /// dedupe question, one handler call, for many messages); when that cannot be (a poison
    /// message, an event early for its stream, a failing batch) each on its own, as
    /// [`Runtime::process`] does.
    async fn process_all(&self, deliveries: Vec<Delivery>) {
        if deliveries.len() < 2 {
            for delivery in deliveries {
                self.process(delivery).await;
            }
            return;
        }
        let mut read = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match delivery.events_where(|head| self.handler.wants(head)) {
                Ok(events) => read.push((delivery, events)),
                Err(reason) => self.give_up_message(&delivery, &reason).await,
            }
        }
        let wanted: Vec<&Envelope> = read.iter().flat_map(|(_, events)| events).collect();
        let handled = match self.fresh(&wanted).await {
            Ok(Fresh::Ready(fresh)) => {
                let handled = fresh.is_empty() || self.handle_at_once(&fresh).await;
                if handled {
                    // Else each delivery on its own counts its own.
                    let duplicates = (wanted.len() - fresh.len()) as u64;
                    SubscriptionStats::add(&self.stats.duplicates, duplicates);
                }
                handled
            }
            Ok(Fresh::Early(_)) => false,
            Err(error) => {
                tracing::debug!(consumer = %self.name(), %error, "cannot check a group of deliveries for duplicates");
                false
            }
        };
        for (delivery, _) in read {
            if handled {
                ack(&delivery, self.name()).await;
            } else {
                self.process(delivery).await;
            }
        }
    }

    /// A span for each event, and the event as the handler sees it in that span.
    fn in_spans<'e>(
        &self,
        events: &[&'e Envelope],
    ) -> (Vec<tracing::Span>, Vec<Cow<'e, Envelope>>) {
        let spans: Vec<tracing::Span> = events
            .iter()
            .map(|event| crate::trace::event_span(self.name(), event))
            .collect();
        let handled = events
            .iter()
            .zip(&spans)
            .map(|(event, span)| as_handled_in(event, span))
            .collect();
        (spans, handled)
    }

    /// One try at handling `events` (of several deliveries) as one batch; whether it worked.
    /// The events stay to be handled delivery by delivery when it did not: those it did
    /// handle are duplicates by then.
    async fn handle_at_once(&self, events: &[&Envelope]) -> bool {
        // The events' spans stay open while the batch is handled.
        let (_spans, handled) = self.in_spans(events);
        let handled: Vec<&Envelope> = handled.iter().map(AsRef::as_ref).collect();
        let span = tracing::debug_span!("batch", consumer = %self.name(), events = events.len());
        match self.attempt(&handled).instrument(span).await {
            Ok(()) => {
                self.done_with(events).await;
                SubscriptionStats::add(&self.stats.handled, events.len() as u64);
                true
            }
            Err(error) => {
                tracing::debug!(consumer = %self.name(), events = events.len(), %error, "a batch of several deliveries failed; handling each on its own");
                false
            }
        }
    }

    async fn process(&self, delivery: Delivery) {
        let events = match delivery.events_where(|head| self.handler.wants(head)) {
            Ok(events) => events,
            Err(reason) => return self.give_up_message(&delivery, &reason).await,
        };
        let wanted: Vec<&Envelope> = events.iter().collect();
        let fresh = match self.fresh(&wanted).await {
            Ok(Fresh::Ready(fresh)) => fresh,
            Ok(Fresh::Early(count)) => {
                SubscriptionStats::add(&self.stats.early, count);
                return retry(&delivery, EARLY_RETRY, self.name()).await;
            }
            Err(error) => {
                tracing::warn!(consumer = %self.name(), %error, "cannot check for duplicates; delivering later");
                return retry(&delivery, self.options.first_backoff, self.name()).await;
            }
        };
        SubscriptionStats::add(&self.stats.duplicates, (wanted.len() - fresh.len()) as u64);
        if !fresh.is_empty() {
            self.handle(&delivery, &fresh).await;
        }
        ack(&delivery, self.name()).await;
    }

    /// The events of a delivery this consumer is not done with, in order; or how many wait
    /// for an earlier event of their stream that has not come yet.
    async fn fresh<'e>(&self, events: &[&'e Envelope]) -> Result<Fresh<'e>, DedupeError> {
        // The store answers for the first event of each stream, all at once. Versions taken
        // earlier in this delivery count as done for the events after them; a stream whose
        // first events were done already is asked about again.
        let mut firsts: Vec<&Envelope> = Vec::new();
        let mut streams: HashSet<&str> = HashSet::new();
        for &event in events {
            if streams.insert(event.stream_id.as_str()) {
                firsts.push(event);
            }
        }
        let answers = self.dedupe.seen_all(self.name(), &firsts).await?;
        if answers.len() != firsts.len() {
            return Err(DedupeError::new(format!(
                "the dedupe store answered for {} of {} events",
                answers.len(),
                firsts.len()
            )));
        }
        let mut answers: HashMap<&str, Seen> = firsts
            .iter()
            .map(|event| event.stream_id.as_str())
            .zip(answers)
            .collect();
        let mut not_done = Vec::with_capacity(events.len());
        let mut taken: HashMap<&str, u64> = HashMap::new();
        let mut early = 0u64;
        let mut gap = None;
        for &event in events {
            let stream = event.stream_id.as_str();
            let seen = match (taken.get(stream), answers.remove(stream)) {
                (Some(&done_to), _) => by_version(done_to, event.stream_version),
                (None, Some(seen)) => seen,
                (None, None) => self.dedupe.seen(self.name(), event).await?,
            };
            match seen {
                Seen::Done => continue,
                Seen::New => {}
                Seen::Early { done_to } => {
                    early += 1;
                    gap.get_or_insert((event, done_to));
                }
            }
            taken.insert(stream, event.stream_version);
            not_done.push(event);
        }
        if let Some((event, done_to)) = gap {
            if !self.wait_for_predecessor(event, done_to) {
                return Ok(Fresh::Early(early));
            }
        }
        Ok(Fresh::Ready(not_done))
    }

    /// Handles fresh events: as a batch when the handler takes batches, retried; then (or
    /// else) one by one, each retried, dead-lettering those that keep failing. Records every
    /// event it is done with.
    async fn handle(&self, delivery: &Delivery, events: &[&Envelope]) {
        let (spans, handled) = self.in_spans(events);
        let handled: Vec<&Envelope> = handled.iter().map(AsRef::as_ref).collect();
        if self.handler.handles_batches() && events.len() > 1 {
            let span =
                tracing::debug_span!("batch", consumer = %self.name(), events = events.len());
            if self.retrying(delivery, &handled, &span).await.is_ok() {
                self.done_with(events).await;
                SubscriptionStats::add(&self.stats.handled, events.len() as u64);
                return;
            }
            // The batch keeps failing: find the events that do, one at a time.
        }
        for ((event, handled), span) in events.iter().zip(&handled).zip(&spans) {
            match self
                .retrying(delivery, std::slice::from_ref(handled), span)
                .await
            {
                Ok(()) => {
                    self.done_with(&[event]).await;
                    SubscriptionStats::bump(&self.stats.handled);
                }
                Err(reason) => self.give_up_event(delivery, event, &reason).await,
            }
        }
    }

    /// Handles `events` in `span`, retrying with backoff; why it gave up, after
    /// `max_attempts`.
    async fn retrying(
        &self,
        delivery: &Delivery,
        events: &[&Envelope],
        span: &tracing::Span,
    ) -> Result<(), String> {
        let attempts = self.options.max_attempts.max(1);
        for attempt in 1..=attempts {
            let error = match self.attempt(events).instrument(span.clone()).await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if attempt == attempts {
                return Err(format!("handler failed {attempt} times; last: {error}"));
            }
            SubscriptionStats::bump(&self.stats.retries);
            tracing::warn!(
                consumer = %self.name(), events = events.len(), first = %events[0].event_id,
                stream = %events[0].stream_id, attempt, delivered = delivery.delivered, %error,
                "handler failed; retrying"
            );
            let _ = delivery.in_progress().await;
            tokio::time::sleep(self.options.backoff(attempt)).await;
        }
        unreachable!("the last attempt returns")
    }

    /// One try at a batch, a panic caught as a failure.
    async fn attempt(&self, events: &[&Envelope]) -> Result<(), String> {
        match AssertUnwindSafe(self.handler.handle_batch(events))
            .catch_unwind()
            .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(panic) => Err(panic_message(panic.as_ref())),
        }
    }

    /// Whether an early event should be handled now: only once it has waited `gap_wait`.
    fn wait_for_predecessor(&self, event: &Envelope, done_to: u64) -> bool {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let since = *waiting
            .entry(event.stream_id.clone())
            .or_insert_with(Instant::now);
        if since.elapsed() < self.options.gap_wait {
            return false;
        }
        waiting.remove(&event.stream_id);
        tracing::error!(
            consumer = %self.name(), stream = %event.stream_id, done_to,
            version = event.stream_version,
            "events of this stream never arrived; handling the next one anyway"
        );
        true
    }

    async fn done_with(&self, events: &[&Envelope]) {
        if let Err(error) = self.dedupe.record_all(self.name(), events).await {
            // The effect is there; a redelivery would run the handler once more.
            tracing::warn!(consumer = %self.name(), %error, "cannot record handled events");
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if !waiting.is_empty() {
            for event in events {
                waiting.remove(&event.stream_id);
            }
        }
    }

    /// Dead-letters one event the handler keeps failing on; the consumer is then done with it.
    async fn give_up_event(&self, delivery: &Delivery, event: &Envelope, reason: &str) {
        tracing::error!(
            consumer = %self.name(), subject = %delivery.subject, event_id = %event.event_id,
            stream = %event.stream_id, %reason, "dead-lettering an event"
        );
        let letter = match Letter::of_event(delivery, event) {
            Ok(letter) => letter,
            Err(_) => Letter::of_message(delivery),
        };
        if let Err(error) = self.bus.dead_letter(self.name(), letter, reason).await {
            // Never drop an event that could not be dead-lettered: deliver it again later
            // (its batch's other events are done by then and skipped as duplicates).
            tracing::warn!(consumer = %self.name(), %error, "cannot store a dead letter");
            return retry(delivery, self.options.max_backoff, self.name()).await;
        }
        // Done with it, so the stream's later events go on.
        self.done_with(&[event]).await;
        SubscriptionStats::bump(&self.stats.dead_lettered);
    }

    /// Dead-letters a message whose body is not a batch of events.
    async fn give_up_message(&self, delivery: &Delivery, reason: &str) {
        tracing::error!(
            consumer = %self.name(), subject = %delivery.subject, %reason,
            "dead-lettering a message"
        );
        let letter = Letter::of_message(delivery);
        if let Err(error) = self.bus.dead_letter(self.name(), letter, reason).await {
            tracing::warn!(consumer = %self.name(), %error, "cannot store a dead letter");
            return retry(delivery, self.options.max_backoff, self.name()).await;
        }
        SubscriptionStats::bump(&self.stats.dead_lettered);
        if let Err(error) = delivery.terminate().await {
            tracing::warn!(consumer = %self.name(), %error, "cannot terminate a dead-lettered delivery");
        }
    }
}

/// What a delivery holds for the handler.
enum Fresh<'e> {
    /// These events, in order.
    Ready(Vec<&'e Envelope>),
    /// This many events wait for earlier ones of their stream.
    Early(u64),
}

/// `event` as a consumer handles it: its metadata names `span`, the span it is handled in,
/// when OpenTelemetry tracks spans, so what the handler records for it continues that span.
/// Without them it is the event as it came: copying every event a consumer handles was about
/// a tenth of what reading them cost.
fn as_handled_in<'e>(event: &'e Envelope, span: &tracing::Span) -> Cow<'e, Envelope> {
    match crate::trace::context_of(span) {
        Some(here) => {
            let mut event = event.clone();
            here.stamp(&mut event.metadata);
            Cow::Owned(event)
        }
        None => Cow::Borrowed(event),
    }
}

async fn ack(delivery: &Delivery, consumer: &str) {
    if let Err(error) = delivery.ack().await {
        // It comes back after the ack wait, and dedupe drops it.
        tracing::warn!(%consumer, %error, "cannot acknowledge a delivery");
    }
}

async fn retry(delivery: &Delivery, after: Duration, consumer: &str) {
    if let Err(error) = delivery.retry_after(after).await {
        tracing::warn!(%consumer, %error, "cannot send a delivery back; it returns after the ack wait");
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("handler panicked: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let options = SubscriptionOptions {
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            ..SubscriptionOptions::new("t")
        };
        let pauses: Vec<_> = (1..=5).map(|a| options.backoff(a).as_millis()).collect();
        assert_eq!(pauses, [100, 200, 400, 500, 500]);
        assert_eq!(options.backoff(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn versions_tell_done_next_and_early_apart() {
        assert_eq!(by_version(0, 1), Seen::New);
        assert_eq!(by_version(3, 3), Seen::Done);
        assert_eq!(by_version(3, 1), Seen::Done);
        assert_eq!(by_version(3, 4), Seen::New);
        assert_eq!(by_version(3, 6), Seen::Early { done_to: 3 });
    }
}
