//! The subscription runtime sagas and projections consume the bus through.
//!
//! A [`Subscription`] runs one durable consumer and hands its deliveries to a [`Handler`]:
//!
//! - **Bounded work.** At most `max_in_flight` deliveries are held at once, spread over
//!   `lanes` workers; the bus holds back the rest.
//! - **Per-stream order**, with [`Ordering::PerStream`]: every event of one stream goes to the
//!   same lane, which handles one delivery at a time, and a handler failure is retried in the
//!   lane (holding back the stream's later events) rather than sent back to the bus. An event
//!   whose predecessor has not been handled yet (one redelivered after a crash, say) is sent
//!   back to wait for it, for at most `gap_wait`.
//! - **Dedupe.** Before handling, the [`Dedupe`] store is asked whether this consumer is
//!   done with the event already; afterwards the event is recorded. Store the record with
//!   the handler's own effects where you can (then a crash between the two cannot repeat an
//!   effect); otherwise handlers must tolerate the rare repeat, which the deterministic event
//!   ids of command handling make harmless.
//! - **Retries with backoff, then a dead letter.** A failing (or panicking) handler is
//!   retried with exponential backoff; after `max_attempts` the delivery goes to the bus's
//!   dead letters with the reason, an error is logged, the dead-letter counter moves, and
//!   the consumer goes on. A body that is not an event is dead-lettered at once.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use schemas::Envelope;
use sqlx::PgPool;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::Instrument;
use ulid::Ulid;

use crate::bus::{Bus, ConsumerOptions, Delivery};

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
    async fn handle_batch(&self, events: &[Envelope]) -> Result<(), HandlerError> {
        for event in events {
            self.handle(event).await?;
        }
        Ok(())
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
    /// Records that `consumer` is done with `event`.
    async fn record(&self, consumer: &str, event: &Envelope) -> Result<(), DedupeError>;
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
    /// Deliveries sent back to wait for an earlier event of their stream.
    pub early: AtomicU64,
    /// Deliveries given up on and dead-lettered.
    pub dead_lettered: AtomicU64,
}

impl SubscriptionStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, AtomicOrdering::Relaxed);
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

    /// Consumes until `shutdown` resolves, subscribing again whenever the subscription
    /// breaks. Deliveries already taken are handled before it returns.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let runtime = self.shared;
        let options = &runtime.options;
        let in_flight = Arc::new(Semaphore::new(options.consumer.max_in_flight.max(1)));
        let (lanes, workers): (Vec<_>, Vec<_>) = (0..options.lanes.max(1))
            .map(|_| {
                let (send, mut receive) =
                    mpsc::unbounded_channel::<(Delivery, OwnedSemaphorePermit)>();
                let runtime = Arc::clone(&runtime);
                let worker = tokio::spawn(async move {
                    while let Some((delivery, _permit)) = receive.recv().await {
                        runtime.process(delivery).await;
                    }
                });
                (send, worker)
            })
            .unzip();
        let mut round_robin = 0usize;
        'subscribe: loop {
            let subscribed = tokio::select! {
                _ = &mut shutdown => break 'subscribe,
                subscribed = runtime.bus.subscribe(&options.consumer) => subscribed,
            };
            let mut deliveries = match subscribed {
                Ok(deliveries) => deliveries,
                Err(error) => {
                    tracing::warn!(consumer = %options.consumer.name, %error, "cannot subscribe");
                    tokio::select! {
                        _ = &mut shutdown => break 'subscribe,
                        _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => continue 'subscribe,
                    }
                }
            };
            loop {
                let permit = tokio::select! {
                    _ = &mut shutdown => break 'subscribe,
                    permit = Arc::clone(&in_flight).acquire_owned() => {
                        permit.expect("the semaphore is never closed")
                    }
                };
                let delivery = tokio::select! {
                    _ = &mut shutdown => break 'subscribe,
                    delivery = deliveries.next() => delivery,
                };
                let delivery = match delivery {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => {
                        tracing::warn!(consumer = %options.consumer.name, %error, "subscription broke; subscribing again");
                        break;
                    }
                    None => break,
                };
                let lane = match options.ordering {
                    Ordering::PerStream => {
                        let mut hasher = std::collections::hash_map::DefaultHasher::new();
                        stream_key(&delivery).hash(&mut hasher);
                        (hasher.finish() % lanes.len() as u64) as usize
                    }
                    Ordering::Unordered => {
                        round_robin = round_robin.wrapping_add(1);
                        round_robin % lanes.len()
                    }
                };
                lanes[lane]
                    .send((delivery, permit))
                    .expect("lane workers live as long as their senders");
            }
            tokio::select! {
                _ = &mut shutdown => break 'subscribe,
                _ = tokio::time::sleep(RESUBSCRIBE_AFTER) => {}
            }
        }
        drop(lanes);
        for worker in workers {
            let _ = worker.await;
        }
    }
}

fn stream_key(delivery: &Delivery) -> &str {
    match &delivery.event {
        Ok(event) => &event.stream_id,
        Err(_) => &delivery.subject,
    }
}

impl Runtime {
    fn name(&self) -> &str {
        &self.options.consumer.name
    }

    async fn process(&self, delivery: Delivery) {
        let event = match &delivery.event {
            Ok(event) => event,
            Err(reason) => {
                let reason = reason.clone();
                return self.give_up(&delivery, &reason).await;
            }
        };
        let span = crate::trace::event_span(self.name(), event);
        self.process_event(&delivery, event).instrument(span).await;
    }

    /// Handles a delivered event: once, in its stream's order, retried and at last
    /// dead-lettered when the handler keeps failing.
    async fn process_event(&self, delivery: &Delivery, event: &Envelope) {
        match self.dedupe.seen(self.name(), event).await {
            Ok(Seen::Done) => {
                SubscriptionStats::bump(&self.stats.duplicates);
                return ack(delivery, self.name()).await;
            }
            Ok(Seen::Early { done_to }) => {
                if !self.wait_for_predecessor(event, done_to) {
                    SubscriptionStats::bump(&self.stats.early);
                    return retry(delivery, EARLY_RETRY, self.name()).await;
                }
            }
            Ok(Seen::New) => {}
            Err(error) => {
                tracing::warn!(consumer = %self.name(), %error, "cannot check for duplicates; delivering later");
                return retry(delivery, self.options.first_backoff, self.name()).await;
            }
        }
        let mut attempt = 1;
        loop {
            let outcome = AssertUnwindSafe(self.handler.handle(event))
                .catch_unwind()
                .await;
            let error = match outcome {
                Ok(Ok(())) => break,
                Ok(Err(error)) => error.to_string(),
                Err(panic) => panic_message(panic.as_ref()),
            };
            if attempt >= self.options.max_attempts {
                let reason = format!("handler failed {attempt} times; last: {error}");
                return self.give_up(delivery, &reason).await;
            }
            SubscriptionStats::bump(&self.stats.retries);
            tracing::warn!(
                consumer = %self.name(), event_id = %event.event_id, stream = %event.stream_id,
                attempt, delivered = delivery.delivered, %error, "handler failed; retrying"
            );
            let _ = delivery.in_progress().await;
            tokio::time::sleep(self.options.backoff(attempt)).await;
            attempt += 1;
        }
        self.done_with(event).await;
        SubscriptionStats::bump(&self.stats.handled);
        ack(delivery, self.name()).await;
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

    async fn done_with(&self, event: &Envelope) {
        if let Err(error) = self.dedupe.record(self.name(), event).await {
            // The effect is there; a redelivery would run the handler once more.
            tracing::warn!(consumer = %self.name(), event_id = %event.event_id, %error, "cannot record a handled event");
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if !waiting.is_empty() {
            waiting.remove(&event.stream_id);
        }
    }

    async fn give_up(&self, delivery: &Delivery, reason: &str) {
        let event_id = delivery.event.as_ref().ok().map(|e| e.event_id);
        tracing::error!(
            consumer = %self.name(), subject = %delivery.subject, ?event_id, %reason,
            "dead-lettering a delivery"
        );
        if let Err(error) = self.bus.dead_letter(self.name(), delivery, reason).await {
            // Never drop a message that could not be dead-lettered: deliver it again later.
            tracing::warn!(consumer = %self.name(), %error, "cannot store a dead letter");
            return retry(delivery, self.options.max_backoff, self.name()).await;
        }
        if let Ok(event) = &delivery.event {
            // Done with it, so the stream's later events go on.
            self.done_with(event).await;
        }
        SubscriptionStats::bump(&self.stats.dead_lettered);
        if let Err(error) = delivery.terminate().await {
            tracing::warn!(consumer = %self.name(), %error, "cannot terminate a dead-lettered delivery");
        }
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
