//! The log's mirror: the outbox relay and the subscription runtime, on the embedded bus and
//! on the machine's real NATS JetStream.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use commands::bus::jetstream::{JetStreamBus, JetStreamSettings};
use commands::bus::memory::MemoryBus;
use commands::bus::{
    header, Bus, BusError, ConsumerOptions, Deliveries, Letter, Published, StoredLetter, Topic,
};
use commands::lease::PgPartitionLeases;
use commands::log::memory::MemoryEventLog;
use commands::relay::postgres::PgRelayLeases;
use commands::relay::{MemoryRelayLeases, Relay, RelayLeases, RelayOptions, RelayStatus};
use commands::subscription::{
    Dedupe, Handler, HandlerError, MemoryStreamVersions, PgStreamVersions, Subscription,
    SubscriptionOptions, SubscriptionStats,
};
use commands::trace::TraceParent;
use commands::{AppendRequest, EventLog, NewEvent, RecordedEvent, StreamAppend};
use domain::campaign::CampaignEvent;
use harness::servers::OwnNats;
use harness::{TestDb, TestStreams};
use schemas::{Envelope, Metadata};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ulid::Ulid;

/// Runs a test on the embedded log and bus, and on Postgres with the machine's JetStream.
macro_rules! on_both_mirrors {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::Rig::embedded()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                super::$name(super::Rig::real(super::fast_settings()).await).await;
            }
        }
    )*};
}

on_both_mirrors!(
    every_event_reaches_a_subscriber_once_in_stream_order,
    a_relay_killed_between_publish_and_checkpoint_loses_nothing_and_repeats_no_effect,
    a_poison_event_is_dead_lettered_and_the_consumer_goes_on,
    deliveries_that_queue_up_reach_a_batch_handler_together,
    a_failing_batch_of_several_deliveries_is_handled_one_delivery_at_a_time,
    a_consumer_of_a_topic_is_delivered_that_topics_messages_only,
);

// --- the rig: a log, a bus, relay leases and a dedupe store that belong together ---

enum Mirror {
    Memory(MemoryBus),
    JetStream(Box<JetStreamBus>, Box<TestStreams>),
}

struct Rig {
    log: Arc<dyn EventLog>,
    bus: Arc<dyn Bus>,
    leases: Arc<dyn RelayLeases>,
    dedupe: Arc<dyn Dedupe>,
    mirror: Mirror,
    db: Option<TestDb>,
    stop: watch::Sender<bool>,
}

/// Streams of the test's own on the machine's NATS, with a duplicate window so short that
/// what a relay publishes again reaches consumers again: the tests then prove consumer-side
/// dedupe, which has to hold past any window.
fn fast_settings() -> JetStreamSettings {
    JetStreamSettings {
        duplicate_window: Duration::from_millis(100),
        ..harness::bus::unique_settings(&harness::bus::nats_url())
    }
}

impl Rig {
    fn embedded() -> Rig {
        harness::init_tracing();
        let bus = MemoryBus::new();
        Rig {
            log: Arc::new(MemoryEventLog::new()),
            bus: Arc::new(bus.clone()),
            leases: Arc::new(MemoryRelayLeases::new()),
            dedupe: Arc::new(MemoryStreamVersions::new()),
            mirror: Mirror::Memory(bus),
            db: None,
            stop: watch::channel(false).0,
        }
    }

    async fn real(settings: JetStreamSettings) -> Rig {
        let db = TestDb::with_pool(16).await;
        let streams = TestStreams {
            settings: settings.clone(),
        };
        let bus = streams.connect().await;
        let pool = db.log().pool().clone();
        Rig {
            log: db.log(),
            bus: Arc::new(bus.clone()),
            leases: Arc::new(PgRelayLeases::new(
                (*pool.connect_options()).clone(),
                "events",
            )),
            dedupe: Arc::new(PgStreamVersions::new(pool)),
            mirror: Mirror::JetStream(Box::new(bus), Box::new(streams)),
            db: Some(db),
            stop: watch::channel(false).0,
        }
    }

    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.subscribe();
        async move {
            let _ = stop.wait_for(|s| *s).await;
        }
    }

    fn relay_options() -> RelayOptions {
        RelayOptions {
            poll_interval: Duration::from_millis(10),
            standby_poll: Duration::from_millis(100),
            retry_after_error: Duration::from_millis(50),
            ..RelayOptions::default()
        }
    }

    /// Starts a relay on this rig's lease (with `bus` in place of the rig's when given).
    fn relay(&self, bus: Option<Arc<dyn Bus>>) -> (watch::Receiver<RelayStatus>, JoinHandle<()>) {
        let relay = Relay::new(
            Arc::clone(&self.log),
            bus.unwrap_or_else(|| Arc::clone(&self.bus)),
            Arc::clone(&self.leases),
            Self::relay_options(),
        );
        let status = relay.status();
        (status, tokio::spawn(relay.run(self.stopped())))
    }

    /// Starts a subscription of `handler` as the consumer `name`.
    fn subscribe(
        &self,
        name: &str,
        handler: Arc<dyn Handler>,
        tune: impl FnOnce(&mut SubscriptionOptions),
    ) -> Arc<SubscriptionStats> {
        let mut options = SubscriptionOptions::new(name);
        options.consumer.ack_wait = Duration::from_secs(2);
        options.gap_wait = Duration::from_secs(6);
        options.first_backoff = Duration::from_millis(10);
        tune(&mut options);
        let subscription = Subscription::new(
            Arc::clone(&self.bus),
            options,
            Arc::clone(&self.dedupe),
            handler,
        );
        let stats = subscription.stats();
        tokio::spawn(subscription.run(self.stopped()));
        stats
    }

    /// Publishes a body that is not an event on the log's subject.
    async fn publish_garbage(&self) {
        match &self.mirror {
            Mirror::Memory(bus) => bus.publish_raw(Bytes::from_static(b"{not json")),
            Mirror::JetStream(bus, streams) => {
                let subject = streams.settings.events_subject(0, Topic::Campaigns);
                bus.context()
                    .publish(subject, Bytes::from_static(b"{not json"))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    }

    /// The reasons of the dead letters stored so far.
    async fn dead_letter_reasons(&self) -> Vec<String> {
        let letters = self.bus.dead_letters_after(0, 10_000).await.unwrap();
        letters.into_iter().map(|letter| letter.reason).collect()
    }

    /// Messages the bus stores for the log (duplicates included).
    async fn stored_messages(&self) -> u64 {
        match &self.mirror {
            Mirror::Memory(bus) => bus.len() as u64,
            Mirror::JetStream(bus, streams) => {
                let stream = bus
                    .context()
                    .get_stream(streams.settings.events_stream())
                    .await
                    .unwrap();
                stream.get_info().await.unwrap().state.messages
            }
        }
    }

    /// Events in the messages the bus stores for the log (duplicates included).
    async fn stored_events(&self) -> u64 {
        match &self.mirror {
            Mirror::Memory(bus) => bus.events_stored() as u64,
            Mirror::JetStream(bus, streams) => {
                let stream = bus
                    .context()
                    .get_stream(streams.settings.events_stream())
                    .await
                    .unwrap();
                let last = stream.get_info().await.unwrap().state.last_sequence;
                let mut events = 0;
                for sequence in 1..=last {
                    let message = stream.get_raw_message(sequence).await.unwrap();
                    let encoding = message.headers.get(header::ENCODING).map(|v| v.as_str());
                    let body = commands::bus::body_of(encoding, message.payload).unwrap();
                    let batch: Vec<Envelope> = serde_json::from_slice(&body).unwrap();
                    events += batch.len() as u64;
                }
                events
            }
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

// --- writing events ---

fn event(n: i64) -> NewEvent {
    let at = chrono::DateTime::from_timestamp(1_700_000_000 + n, 0).unwrap();
    NewEvent {
        event_id: Ulid::new(),
        event: schemas::encode(&CampaignEvent::CampaignClosed { at }).unwrap(),
        metadata: Metadata {
            trace_id: Some(format!("{:032x}", rand::random::<u128>())),
            span_id: Some(format!("{:016x}", rand::random::<u64>() | 1)),
            ..Default::default()
        },
    }
}

/// `writers` tasks append `per_writer` events each, one event per append, round-robin over
/// `streams_per_writer` streams of their own. Returns the ids appended.
async fn write_concurrently(
    log: &Arc<dyn EventLog>,
    writers: usize,
    streams_per_writer: usize,
    per_writer: usize,
) -> Vec<Ulid> {
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let log = Arc::clone(log);
            tokio::spawn(async move {
                let streams: Vec<String> = (0..streams_per_writer)
                    .map(|_| format!("campaign-{}", Ulid::new()))
                    .collect();
                let mut versions = vec![0u64; streams_per_writer];
                let mut ids = Vec::with_capacity(per_writer);
                for i in 0..per_writer {
                    let s = i % streams_per_writer;
                    let event = event(i as i64);
                    ids.push(event.event_id);
                    log.append(AppendRequest {
                        streams: vec![StreamAppend {
                            stream_id: streams[s].clone(),
                            expected_version: versions[s],
                            events: vec![event],
                        }],
                        idempotency: None,
                    })
                    .await
                    .expect("each writer owns its streams, so nothing conflicts");
                    versions[s] += 1;
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    ids
}

/// The relay publishes the events of each topic in messages of their own, and a consumer of a
/// topic is delivered those only: not the events of the categories it does not read.
async fn a_consumer_of_a_topic_is_delivered_that_topics_messages_only(rig: Rig) {
    for category in ["order", "holding", "campaign", "payment"] {
        rig.log
            .append(AppendRequest {
                streams: vec![StreamAppend {
                    stream_id: format!("{category}-{}", Ulid::new()),
                    expected_version: 0,
                    events: vec![event(0)],
                }],
                idempotency: None,
            })
            .await
            .unwrap();
    }
    let events = settled(rig.log.as_ref(), 4).await;
    rig.bus.publish(&events).await.unwrap();
    let categories = |deliveries: Box<dyn Deliveries>, count: usize| async move {
        let mut deliveries = deliveries;
        let mut seen = Vec::new();
        while seen.len() < count {
            let delivery = tokio::time::timeout(Duration::from_secs(10), deliveries.next())
                .await
                .expect("a delivery comes")
                .unwrap()
                .unwrap();
            for event in delivery.events().unwrap() {
                seen.push(event.category().to_owned());
            }
            delivery.ack().await.unwrap();
        }
        let more = tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await;
        assert!(more.is_err(), "nothing else comes");
        seen.sort();
        seen
    };
    let orders = rig
        .bus
        .subscribe(&ConsumerOptions {
            topic: Some(Topic::Orders),
            ..ConsumerOptions::new("orders")
        })
        .await
        .unwrap();
    assert_eq!(categories(orders, 2).await, ["order", "payment"]);
    let campaigns = rig
        .bus
        .subscribe(&ConsumerOptions {
            topic: Some(Topic::Campaigns),
            ..ConsumerOptions::new("campaigns")
        })
        .await
        .unwrap();
    assert_eq!(categories(campaigns, 1).await, ["campaign"]);
    let every = rig
        .bus
        .subscribe(&ConsumerOptions::new("every"))
        .await
        .unwrap();
    assert_eq!(
        categories(every, 4).await,
        ["campaign", "holding", "order", "payment"]
    );
}

// --- a handler that records what it saw ---

#[derive(Default)]
struct Recorder {
    seen: Mutex<Seen>,
    changed: watch::Sender<usize>,
    /// Fails every time on these events.
    poison: Vec<Ulid>,
    /// Takes this long over each event, so that deliveries queue up behind it.
    pause: Duration,
}

#[derive(Default)]
struct Seen {
    /// How many times each event was handled.
    times: HashMap<Ulid, u32>,
    /// Versions per stream in the order handled.
    streams: BTreeMap<String, Vec<u64>>,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        tokio::time::sleep(self.pause).await;
        if self.poison.contains(&event.event_id) {
            return Err("this event always fails".into());
        }
        let count = {
            let mut seen = self.seen.lock().unwrap();
            *seen.times.entry(event.event_id).or_default() += 1;
            seen.streams
                .entry(event.stream_id.clone())
                .or_default()
                .push(event.stream_version);
            seen.times.len()
        };
        self.changed.send_replace(count);
        Ok(())
    }
}

impl Recorder {
    fn poisoned(poison: Vec<Ulid>) -> Arc<Recorder> {
        Arc::new(Recorder {
            poison,
            ..Recorder::default()
        })
    }

    /// Waits until `count` distinct events were handled.
    async fn wait_for(&self, count: usize, within: Duration) {
        let mut changed = self.changed.subscribe();
        let reached = tokio::time::timeout(within, changed.wait_for(|n| *n >= count)).await;
        let got = *self.changed.borrow();
        assert!(
            reached.is_ok(),
            "only {got} of {count} events arrived within {within:?}"
        );
    }

    /// Checks every id was handled exactly once and nothing else was, and that every stream
    /// was handled in version order with no version missing.
    fn assert_exactly_once_in_order(&self, ids: &[Ulid]) {
        let seen = self.seen.lock().unwrap();
        let repeated: Vec<_> = seen.times.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            repeated.is_empty(),
            "{} events handled more than once, e.g. {:?}",
            repeated.len(),
            &repeated[..repeated.len().min(3)]
        );
        let missing: Vec<_> = ids
            .iter()
            .filter(|id| !seen.times.contains_key(id))
            .collect();
        assert!(
            missing.is_empty(),
            "never handled: {} events",
            missing.len()
        );
        assert_eq!(
            seen.times.len(),
            ids.len(),
            "handled events nobody appended"
        );
        for (stream, versions) in &seen.streams {
            let expected: Vec<u64> = (1..=versions.len() as u64).collect();
            assert_eq!(versions, &expected, "stream {stream} out of order");
        }
    }
}

/// A [`Recorder`] that takes batches, and notes how big each one it was handed was.
struct BatchRecorder {
    recorder: Recorder,
    /// The number of events of each batch it was handed, failed ones too.
    sizes: Mutex<Vec<usize>>,
    /// Fails every batch of more events than this.
    refuses_more_than: usize,
}

impl BatchRecorder {
    fn new(pause: Duration, refuses_more_than: usize) -> Arc<BatchRecorder> {
        Arc::new(BatchRecorder {
            recorder: Recorder {
                pause,
                ..Recorder::default()
            },
            sizes: Mutex::default(),
            refuses_more_than,
        })
    }

    fn sizes(&self) -> Vec<usize> {
        self.sizes.lock().unwrap().clone()
    }
}

#[async_trait]
impl Handler for BatchRecorder {
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        self.handle_batch(&[event]).await
    }

    async fn handle_batch(&self, events: &[&Envelope]) -> Result<(), HandlerError> {
        self.sizes.lock().unwrap().push(events.len());
        tokio::time::sleep(self.recorder.pause).await;
        if events.len() > self.refuses_more_than {
            return Err(format!("{} events are too many at once", events.len()).into());
        }
        for event in events {
            self.recorder.handle(event).await?;
        }
        Ok(())
    }

    fn handles_batches(&self) -> bool {
        true
    }
}

impl Rig {
    /// Appends `count` events over a few streams and publishes each in a message of its own,
    /// all at once. Returns their ids.
    async fn publish_one_event_a_message(&self, count: usize) -> Vec<Ulid> {
        let ids = write_concurrently(&self.log, 2, 3, count / 2).await;
        let mut events = Vec::new();
        while events.len() < ids.len() {
            let after = events
                .last()
                .map_or_else(commands::LogCursor::default, |e: &RecordedEvent| e.cursor);
            events.extend(self.log.read_all(after, 1_000).await.unwrap());
        }
        for event in &events {
            self.bus.publish(std::slice::from_ref(event)).await.unwrap();
        }
        ids
    }
}

fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    SubscriptionStats::get(counter)
}

// --- the tests on both mirrors ---

async fn every_event_reaches_a_subscriber_once_in_stream_order(rig: Rig) {
    let recorder = Arc::new(Recorder::default());
    rig.subscribe("orderly", recorder.clone(), |_| {});
    let (status, _relay) = rig.relay(None);
    let ids = write_concurrently(&rig.log, 8, 5, 125).await;
    recorder.wait_for(ids.len(), Duration::from_secs(30)).await;
    recorder.assert_exactly_once_in_order(&ids);
    assert!(status.borrow().leader);
    // The relay reports after its checkpoint, which may come a moment after delivery.
    let total = ids.len() as u64;
    wait_until(
        || status.borrow().published == total,
        "the relay reports every event",
    )
    .await;
}

async fn deliveries_that_queue_up_reach_a_batch_handler_together(rig: Rig) {
    let ids = rig.publish_one_event_a_message(300).await;
    // Slow enough that deliveries wait in the lane while it handles a batch.
    let recorder = BatchRecorder::new(Duration::from_millis(10), usize::MAX);
    let stats = rig.subscribe("together", recorder.clone(), |_| {});
    recorder
        .recorder
        .wait_for(ids.len(), Duration::from_secs(30))
        .await;
    recorder.recorder.assert_exactly_once_in_order(&ids);
    let sizes = recorder.sizes();
    assert!(
        sizes.iter().any(|&n| n > 1),
        "every batch held one message's event: {sizes:?}"
    );
    assert!(sizes.len() < ids.len(), "{} batches", sizes.len());
    // The runtime counts a batch once the handler returned.
    let total = ids.len() as u64;
    wait_until(|| get(&stats.handled) == total, "every event counted").await;
    assert_eq!(get(&stats.retries), 0);
}

async fn a_failing_batch_of_several_deliveries_is_handled_one_delivery_at_a_time(rig: Rig) {
    let ids = rig.publish_one_event_a_message(100).await;
    let recorder = BatchRecorder::new(Duration::from_millis(10), 1);
    let stats = rig.subscribe("one-by-one", recorder.clone(), |_| {});
    recorder
        .recorder
        .wait_for(ids.len(), Duration::from_secs(30))
        .await;
    recorder.recorder.assert_exactly_once_in_order(&ids);
    let refused = recorder.sizes().iter().filter(|&&n| n > 1).count();
    assert!(refused > 0, "no batch of several deliveries was tried");
    let total = ids.len() as u64;
    wait_until(|| get(&stats.handled) == total, "every event counted").await;
    assert_eq!(get(&stats.dead_lettered), 0);
    // Each message on its own holds one event, which the handler takes at the first try.
    assert_eq!(get(&stats.retries), 0);
}

/// A bus that stores what it is given and then fails, as a relay killed after its publishes
/// were acknowledged and before it saved its checkpoint would.
struct KilledAfterPublish {
    inner: Arc<dyn Bus>,
    kills_left: AtomicU32,
}

#[async_trait]
impl Bus for KilledAfterPublish {
    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BusError> {
        self.inner.publish(events).await?;
        let killed = self
            .kills_left
            .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok();
        if killed {
            // Outlive the duplicate window, so the next relay's repeats reach consumers.
            tokio::time::sleep(Duration::from_millis(150)).await;
            return Err(BusError::Unavailable("killed before the checkpoint".into()));
        }
        Ok(())
    }

    fn partitions(&self) -> u16 {
        self.inner.partitions()
    }

    async fn published(&self) -> Result<Published, BusError> {
        self.inner.published().await
    }

    async fn bind_log(&self, log_id: &str) -> Result<(), BusError> {
        self.inner.bind_log(log_id).await
    }

    async fn subscribe(&self, options: &ConsumerOptions) -> Result<Box<dyn Deliveries>, BusError> {
        self.inner.subscribe(options).await
    }

    async fn dead_letter(
        &self,
        consumer: &str,
        letter: Letter<'_>,
        reason: &str,
    ) -> Result<(), BusError> {
        self.inner.dead_letter(consumer, letter, reason).await
    }

    async fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, BusError> {
        self.inner.dead_letters_after(after, limit).await
    }

    async fn dead_letter_at(&self, id: u64) -> Result<Option<StoredLetter>, BusError> {
        self.inner.dead_letter_at(id).await
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, BusError> {
        self.inner.discard_dead_letter(id).await
    }

    async fn ping(&self) -> Result<(), BusError> {
        self.inner.ping().await
    }
}

async fn a_relay_killed_between_publish_and_checkpoint_loses_nothing_and_repeats_no_effect(
    rig: Rig,
) {
    let recorder = Arc::new(Recorder::default());
    let stats = rig.subscribe("effects", recorder.clone(), |_| {});
    let ids = write_concurrently(&rig.log, 4, 3, 100).await;
    // Five relays in a row die after publishing and before checkpointing; a sixth succeeds.
    let killer = Arc::new(KilledAfterPublish {
        inner: Arc::clone(&rig.bus),
        kills_left: AtomicU32::new(5),
    });
    let (status, _relay) = rig.relay(Some(killer.clone()));
    wait_until(
        || status.borrow().position.global_position == ids.len() as u64,
        "a relay survives to checkpoint everything",
    )
    .await;
    assert_eq!(killer.kills_left.load(AtomicOrdering::SeqCst), 0);
    let more = write_concurrently(&rig.log, 2, 2, 50).await;
    recorder
        .wait_for(ids.len() + more.len(), Duration::from_secs(30))
        .await;
    let all: Vec<Ulid> = ids.into_iter().chain(more).collect();
    recorder.assert_exactly_once_in_order(&all);
    wait_until(
        || status.borrow().position.global_position == all.len() as u64,
        "the relay checkpoints the whole log",
    )
    .await;
    // Whatever the bus stored more than once was dropped by the consumer's dedupe.
    let stored = rig.stored_events().await;
    assert_eq!(
        stored - all.len() as u64,
        get(&stats.duplicates),
        "every repeated event was recognised as a duplicate"
    );
    if let Mirror::JetStream(..) = rig.mirror {
        assert!(
            stored > all.len() as u64,
            "JetStream's window let the repeats through"
        );
    }
}

async fn a_poison_event_is_dead_lettered_and_the_consumer_goes_on(rig: Rig) {
    let first = write_concurrently(&rig.log, 2, 2, 20).await;
    let poison = first[7];
    let recorder = Recorder::poisoned(vec![poison]);
    let stats = rig.subscribe("careful", recorder.clone(), |o| o.max_attempts = 3);
    let (_status, _relay) = rig.relay(None);
    recorder
        .wait_for(first.len() - 1, Duration::from_secs(30))
        .await;
    rig.publish_garbage().await;
    let later = write_concurrently(&rig.log, 2, 2, 20).await;
    recorder
        .wait_for(first.len() - 1 + later.len(), Duration::from_secs(30))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while get(&stats.dead_lettered) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let handled: Vec<Ulid> = first
        .iter()
        .chain(&later)
        .copied()
        .filter(|id| *id != poison)
        .collect();
    {
        let seen = recorder.seen.lock().unwrap();
        assert!(!seen.times.contains_key(&poison));
        assert!(handled.iter().all(|id| seen.times.get(id) == Some(&1)));
    }
    assert_eq!(get(&stats.dead_lettered), 2);
    assert_eq!(get(&stats.retries), 2, "the poison event was tried 3 times");
    let reasons = rig.dead_letter_reasons().await;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains("handler failed 3 times") && reasons[0].contains("always fails"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("not an event envelope"), "{reasons:?}");
}

// --- Postgres and JetStream only ---

/// Holds a transaction open with one event in it.
async fn hold_open(db: &TestDb) -> (sqlx::PgConnection, Ulid) {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut connection).await.unwrap();
    let held = event(0);
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, data, metadata) \
         VALUES ($1, $2, 1, $3, $4, $5, $6)",
    )
    .bind(uuid::Uuid::from(held.event_id))
    .bind(format!("campaign-{}", Ulid::new()))
    .bind(&held.event.event_type)
    .bind(held.event.schema_version as i32)
    .bind(&held.event.data)
    .bind(serde_json::to_value(&held.metadata).unwrap())
    .execute(&mut connection)
    .await
    .unwrap();
    (connection, held.event_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_behind_an_open_transaction_arrive_once_each_in_stream_order() {
    let rig = Rig::real(fast_settings()).await;
    let recorder = Arc::new(Recorder::default());
    let stats = rig.subscribe("ten-thousand", recorder.clone(), |o| {
        o.consumer.max_in_flight = 512;
    });
    let (status, _relay) = rig.relay(None);
    let (mut held, held_id) = hold_open(rig.db.as_ref().unwrap()).await;
    let ids = write_concurrently(&rig.log, 16, 25, 625).await;
    assert_eq!(ids.len(), 10_000);
    // Everything committed after the open transaction began, so none of it may pass it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        status.borrow().published,
        0,
        "the relay passed an open transaction"
    );
    assert_eq!(*recorder.changed.borrow(), 0);
    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    recorder.wait_for(10_001, Duration::from_secs(120)).await;
    let all: Vec<Ulid> = std::iter::once(held_id).chain(ids).collect();
    recorder.assert_exactly_once_in_order(&all);
    assert_eq!(get(&stats.dead_lettered), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_relay_takes_over_within_seconds_when_the_leader_dies() {
    let rig = Rig::real(fast_settings()).await;
    let recorder = Arc::new(Recorder::default());
    rig.subscribe("takeover", recorder.clone(), |_| {});
    let (first_status, first) = rig.relay(None);
    wait_until(|| first_status.borrow().leader, "the first relay leads").await;
    let (second_status, _second) = rig.relay(None);
    let before = write_concurrently(&rig.log, 4, 2, 50).await;
    recorder
        .wait_for(before.len(), Duration::from_secs(30))
        .await;
    assert!(first_status.borrow().leader);
    assert!(!second_status.borrow().leader, "two relays lead at once");
    assert_eq!(second_status.borrow().published, 0);

    // The leader dies: its task is dropped mid-flight, and with it the lock's connection.
    first.abort();
    let _ = first.await;
    let died = tokio::time::Instant::now();
    wait_until(|| second_status.borrow().leader, "the standby takes over").await;
    let took = died.elapsed();
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");

    let after = write_concurrently(&rig.log, 4, 2, 50).await;
    let all: Vec<Ulid> = before.into_iter().chain(after).collect();
    recorder.wait_for(all.len(), Duration::from_secs(30)).await;
    recorder.assert_exactly_once_in_order(&all);
    wait_until(
        || second_status.borrow().published >= 200,
        "the new leader reports what it published",
    )
    .await;
}

/// One instance of a shared consumer: its subscription over the partitions it leases.
struct Instance {
    stats: Arc<SubscriptionStats>,
    running: watch::Receiver<std::collections::BTreeSet<u16>>,
    stop: watch::Sender<bool>,
}

impl Rig {
    /// Starts an instance of the consumer `name`, leasing its share of `partitions`; what it
    /// handles goes to `recorder`, which every instance shares, so that it sees each stream's
    /// events in the order they were handled whichever instance handled them.
    fn instance(&self, name: &str, partitions: u16, recorder: &Arc<Recorder>) -> Instance {
        let connect = (*self
            .db
            .as_ref()
            .expect("on Postgres")
            .log()
            .pool()
            .connect_options())
        .clone();
        let assignment = PgPartitionLeases::new(connect, name, partitions)
            .with_tick(Duration::from_millis(100))
            .start();
        let running = assignment.running.subscribe();
        let mut options = SubscriptionOptions::new(name);
        options.consumer.ack_wait = Duration::from_secs(2);
        let subscription = Subscription::new(
            Arc::clone(&self.bus),
            options,
            Arc::clone(&self.dedupe),
            recorder.clone(),
        );
        let stats = subscription.stats();
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(subscription.run_partitioned(assignment, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Instance {
            stats,
            running,
            stop,
        }
    }
}

/// Whether `instances` hold `share` partitions each, none of them twice.
fn shared_out(instances: &[&Instance], share: usize) -> bool {
    let mut all = std::collections::BTreeSet::new();
    instances.iter().all(|instance| {
        let running = instance.running.borrow();
        running.len() == share && running.iter().all(|p| all.insert(*p))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_a_consumer_a_partition_at_a_time_and_rebalance_under_load() {
    let partitions = 6;
    let rig = Rig::real(JetStreamSettings {
        partitions,
        ..fast_settings()
    })
    .await;
    // Slow enough that each instance holds deliveries it has not taken yet when it lets go.
    let recorder = Arc::new(Recorder {
        pause: Duration::from_millis(1),
        ..Recorder::default()
    });
    let first = rig.instance("shared", partitions, &recorder);
    let second = rig.instance("shared", partitions, &recorder);
    wait_until(
        || shared_out(&[&first, &second], 3),
        "three partitions each",
    )
    .await;
    let (_status, _relay) = rig.relay(None);
    let before = write_concurrently(&rig.log, 4, 10, 50).await;
    recorder
        .wait_for(before.len(), Duration::from_secs(30))
        .await;
    recorder.assert_exactly_once_in_order(&before);
    for instance in [&first, &second] {
        assert!(get(&instance.stats.handled) > 0, "an instance idled");
        // One consumer a partition: nothing came early, nothing came twice.
        assert_eq!(get(&instance.stats.early), 0);
        assert_eq!(get(&instance.stats.duplicates), 0);
    }

    // A third instance joins while events flow: the others let go of a partition each, which
    // it takes, and nothing is lost, repeated or reordered on the way.
    let writing = {
        let log = Arc::clone(&rig.log);
        tokio::spawn(async move { write_concurrently(&log, 4, 10, 250).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = rig.instance("shared", partitions, &recorder);
    let during = writing.await.unwrap();
    wait_until(
        || shared_out(&[&first, &second, &third], 2),
        "two partitions each",
    )
    .await;
    let mut all: Vec<Ulid> = before.iter().chain(&during).copied().collect();
    recorder.wait_for(all.len(), Duration::from_secs(30)).await;

    // The first instance goes: the others take its partitions and all that follows.
    let _ = first.stop.send(true);
    wait_until(
        || shared_out(&[&second, &third], 3),
        "three partitions each again",
    )
    .await;
    let handled_by_first = get(&first.stats.handled);
    let after = write_concurrently(&rig.log, 4, 10, 50).await;
    all.extend(after);
    recorder.wait_for(all.len(), Duration::from_secs(30)).await;
    recorder.assert_exactly_once_in_order(&all);
    assert_eq!(
        get(&first.stats.handled),
        handled_by_first,
        "a stopped instance handled more"
    );
    assert!(
        get(&third.stats.handled) > 0,
        "the instance that joined idled"
    );
    for instance in [&first, &second, &third] {
        assert_eq!(get(&instance.stats.duplicates), 0);
    }
}

/// The first `count` events of the log, once they are all below the watermark.
async fn settled(log: &dyn EventLog, count: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = log.read_all(Default::default(), count).await.unwrap();
        if events.len() == count {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "events never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until(condition: impl Fn() -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_and_consumers_resume_after_nats_is_killed_and_restarted() {
    let mut nats = OwnNats::start().await;
    let rig = Rig::real(harness::bus::unique_settings(&nats.url())).await;
    let recorder = Arc::new(Recorder::default());
    let stats = rig.subscribe("survivor", recorder.clone(), |_| {});
    let (status, _relay) = rig.relay(None);
    let before = write_concurrently(&rig.log, 4, 4, 50).await;
    recorder
        .wait_for(before.len(), Duration::from_secs(30))
        .await;

    nats.kill().await;
    // The log takes appends while the mirror is down.
    let during = write_concurrently(&rig.log, 4, 4, 50).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.restart().await;
    let after = write_concurrently(&rig.log, 4, 4, 50).await;

    let all: Vec<Ulid> = before.into_iter().chain(during).chain(after).collect();
    recorder.wait_for(all.len(), Duration::from_secs(60)).await;
    recorder.assert_exactly_once_in_order(&all);
    let total = all.len() as u64;
    wait_until(
        || status.borrow().position.global_position == total,
        "the relay checkpoints the whole log",
    )
    .await;
    assert_eq!(get(&stats.dead_lettered), 0);
}

#[tokio::test]
async fn jetstream_messages_carry_batches_of_events_with_their_cursors() {
    // One partition: every event in one message.
    let rig = Rig::real(JetStreamSettings {
        partitions: 1,
        ..harness::bus::unique_settings(&harness::bus::nats_url())
    })
    .await;
    let ids = write_concurrently(&rig.log, 1, 1, 3).await;
    // The watermark is server-wide: another test's open transaction may hold it back a while.
    let mut events = settled(rig.log.as_ref(), 3).await;
    // Two requests' traces, the first request's in two events: each trace id once, in order.
    let first = TraceParent::root();
    let second = TraceParent::root();
    first.stamp(&mut events[0].envelope.metadata);
    second.stamp(&mut events[1].envelope.metadata);
    first.child().stamp(&mut events[2].envelope.metadata);
    rig.bus.publish(&events).await.unwrap();
    let Mirror::JetStream(bus, streams) = &rig.mirror else {
        unreachable!()
    };
    let stream = bus
        .context()
        .get_stream(streams.settings.events_stream())
        .await
        .unwrap();
    assert_eq!(rig.stored_messages().await, 1, "three events, one message");
    let message = stream.get_raw_message(1).await.unwrap();
    let h = |name: &str| {
        message
            .headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", message.headers))
            .to_string()
    };
    let msg_id = message.headers.get(async_nats::header::NATS_MESSAGE_ID);
    assert_eq!(msg_id.unwrap().as_str(), format!("{}-{}", ids[0], ids[2]));
    assert_eq!(h(header::EVENTS), "3");
    let cursor = |c: commands::LogCursor| format!("{}:{}", c.transaction_id, c.global_position);
    assert_eq!(h(header::FIRST_CURSOR), cursor(events[0].cursor));
    assert_eq!(h(header::LOG_CURSOR), cursor(events[2].cursor));
    assert_eq!(
        h(header::TRACE_IDS),
        format!("{} {}", first.trace_id_hex(), second.trace_id_hex())
    );
    assert_eq!(h(header::TRACEPARENT), first.header());
    assert_eq!(
        message.subject.as_str(),
        streams.settings.events_subject(0, Topic::Campaigns)
    );
    // Compressed on the wire, and said so.
    assert_eq!(h(header::ENCODING), commands::bus::LZ4);
    let json = commands::bus::body_of(Some(commands::bus::LZ4), message.payload.clone()).unwrap();
    assert!(message.payload.len() < json.len(), "the body is compressed");
    let body: Vec<Envelope> = serde_json::from_slice(&json).unwrap();
    let envelopes: Vec<Envelope> = events.iter().map(|e| e.envelope.clone()).collect();
    assert_eq!(
        body, envelopes,
        "each event whole, with its trace in its metadata"
    );
    // Published again: JetStream drops the repeat by message id.
    rig.bus.publish(&events).await.unwrap();
    assert_eq!(rig.stored_messages().await, 1);
    assert_eq!(
        rig.bus.published().await.unwrap(),
        Published::UpTo(events[2].cursor)
    );
}

#[tokio::test]
async fn a_relay_republishes_what_jetstream_lost_past_its_checkpoint() {
    let rig = Rig::real(fast_settings()).await;
    let recorder = Arc::new(Recorder::default());
    let (status, relay) = rig.relay(None);
    let ids = write_concurrently(&rig.log, 2, 2, 50).await;
    wait_until(|| status.borrow().published == 100, "the relay publishes").await;
    relay.abort();
    let _ = relay.await;
    // The mirror loses everything it stored (its store is gone, as after a crash of a
    // server that had not synced), though the relay's checkpoint says it was published.
    let Mirror::JetStream(bus, streams) = &rig.mirror else {
        unreachable!()
    };
    bus.context()
        .delete_stream(streams.settings.events_stream())
        .await
        .unwrap();
    let restored = streams.connect().await;
    assert_eq!(restored.published().await.unwrap(), Published::Nothing);
    let (status, _relay) = rig.relay(None);
    rig.subscribe("after-loss", recorder.clone(), |_| {});
    recorder.wait_for(ids.len(), Duration::from_secs(30)).await;
    recorder.assert_exactly_once_in_order(&ids);
    wait_until(
        || status.borrow().published == 100,
        "the new leader publishes everything again",
    )
    .await;
}

#[tokio::test]
async fn the_embedded_bus_redelivers_what_a_consumer_sends_back() {
    let bus = MemoryBus::new();
    let log: Arc<dyn EventLog> = Arc::new(MemoryEventLog::new());
    write_concurrently(&log, 1, 1, 2).await;
    let first_two = log.read_all(Default::default(), 10).await.unwrap();
    bus.publish(&first_two).await.unwrap();
    bus.publish(&first_two).await.unwrap();
    assert_eq!(bus.len(), 1, "the same batch is stored once");
    write_concurrently(&log, 1, 1, 1).await;
    let third = log.read_all(first_two[1].cursor, 10).await.unwrap();
    bus.publish(&third).await.unwrap();
    let mut deliveries = bus.subscribe(&ConsumerOptions::new("c")).await.unwrap();
    let first = deliveries.next().await.unwrap().unwrap();
    assert_eq!(first.delivered, 1);
    assert_eq!(first.events().unwrap().len(), 2);
    first.retry_after(Duration::from_millis(50)).await.unwrap();
    let second = deliveries.next().await.unwrap().unwrap();
    assert_eq!(second.events().unwrap().len(), 1);
    let again = deliveries.next().await.unwrap().unwrap();
    assert_eq!(
        again.events().unwrap()[0].event_id,
        first_two[0].envelope.event_id
    );
    assert_eq!(again.delivered, 2);
    // A new subscription of the same durable consumer goes on where it stopped.
    drop(deliveries);
    bus.publish(&[]).await.unwrap();
    let mut resumed = bus.subscribe(&ConsumerOptions::new("c")).await.unwrap();
    let nothing = tokio::time::timeout(Duration::from_millis(100), resumed.next()).await;
    assert!(nothing.is_err(), "a durable consumer does not start over");
}

/// A whole application on `db`, mirrored to `mirror`, with in-memory read models.
fn app_settings(db: &TestDb, mirror: JetStreamSettings) -> gateway::app::Settings {
    use gateway::app::{Mirror, Payments, ReadModels, Settings, Storage};
    Settings {
        roles: Default::default(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        operator_token: "operator".into(),
        token_secret: b"secret".to_vec(),
        storage: Storage::Postgres {
            url: db.url.clone(),
            options: Default::default(),
        },
        group_commit: Default::default(),
        relay: Default::default(),
        mirror: Mirror::JetStream(mirror),
        read_models: ReadModels::Embedded,
        rebuild: Default::default(),
        heal_read_models_every: None,
        sweep: None,
        payments: Payments::External,
        webhook_secret: b"webhook".to_vec(),
        read_your_writes_timeout: Duration::from_secs(2),
        limits: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_the_bus_down_while_nats_is_and_up_when_it_is_back() {
    use gateway::app::Application;
    let mut nats = OwnNats::start().await;
    let db = TestDb::new().await;
    let settings = app_settings(&db, harness::bus::unique_settings(&nats.url()));
    let app = Application::build(settings).await.unwrap();
    let url = format!("http://{}/readyz", app.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let readiness = || async {
        let response = client.get(&url).send().await.unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap();
        (status, body["checks"]["bus"].as_str().unwrap().to_owned())
    };
    assert_eq!(readiness().await, (200, "up".to_owned()));
    nats.kill().await;
    assert_eq!(readiness().await, (503, "down".to_owned()));
    nats.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while readiness().await != (200, "up".to_owned()) {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    let _ = served.await;
}

#[tokio::test]
async fn consumers_read_plain_and_compressed_messages_and_refuse_an_unknown_encoding() {
    let log = MemoryEventLog::new();
    for n in 0..2 {
        log.append(AppendRequest {
            streams: vec![StreamAppend {
                stream_id: format!("campaign-{}", Ulid::new()),
                expected_version: 0,
                events: vec![event(n)],
            }],
            idempotency: None,
        })
        .await
        .unwrap();
    }
    let events = settled(&log, 2).await;
    // A relay of a build that does not compress, then one that does, on the same streams.
    let mut streams = TestStreams::new();
    streams.settings.compression = commands::bus::Compression::None;
    streams.connect().await.publish(&events[..1]).await.unwrap();
    streams.settings.compression = commands::bus::Compression::Lz4;
    let bus = streams.connect().await;
    bus.publish(&events[1..]).await.unwrap();
    let stream = bus
        .context()
        .get_stream(streams.settings.events_stream())
        .await
        .unwrap();
    let encoding = |sequence: u64| {
        let stream = stream.clone();
        async move {
            let message = stream.get_raw_message(sequence).await.unwrap();
            message
                .headers
                .get(header::ENCODING)
                .map(|v| v.as_str().to_owned())
        }
    };
    assert_eq!(encoding(1).await, None);
    assert_eq!(encoding(2).await.as_deref(), Some(commands::bus::LZ4));
    // And one in an encoding no build writes.
    let mut unknown = async_nats::HeaderMap::new();
    unknown.insert(header::ENCODING, "zstd");
    unknown.insert(async_nats::header::NATS_MESSAGE_ID, "unknown-1");
    let body = serde_json::to_vec(&[events[0].envelope.clone()]).unwrap();
    bus.context()
        .publish_with_headers(
            streams.settings.events_subject(0, Topic::Campaigns),
            unknown,
            body.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let mut deliveries = bus.subscribe(&ConsumerOptions::new("c")).await.unwrap();
    for expected in &events {
        let delivery = deliveries.next().await.unwrap().unwrap();
        let read = delivery.events().unwrap();
        assert_eq!(read, vec![expected.envelope.clone()]);
    }
    let unreadable = deliveries.next().await.unwrap().unwrap();
    let reason = unreadable.events().unwrap_err();
    assert!(reason.contains("cannot read: zstd"), "{reason}");
}

#[tokio::test]
async fn a_bus_bound_to_one_log_refuses_another_and_hands_over_its_messages_as_unreadable() {
    let streams = TestStreams::new();
    let first = streams.connect().await;
    first.bind_log("log-a").await.unwrap();
    let log = MemoryEventLog::new();
    log.append(AppendRequest {
        streams: vec![StreamAppend {
            stream_id: format!("campaign-{}", Ulid::new()),
            expected_version: 0,
            events: vec![event(1)],
        }],
        idempotency: None,
    })
    .await
    .unwrap();
    let events = settled(&log, 1).await;
    first.publish(&events).await.unwrap();
    let stream = first
        .context()
        .get_stream(streams.settings.events_stream())
        .await
        .unwrap();
    let message = stream.get_raw_message(1).await.unwrap();
    assert_eq!(
        message.headers.get(header::LOG_ID).unwrap().as_str(),
        "log-a"
    );

    // Another deployment on the same streams is refused, naming both logs.
    let second = streams.connect().await;
    let refused = second.bind_log("log-b").await.unwrap_err();
    assert!(
        matches!(&refused, BusError::ForeignLog { theirs, ours, .. } if theirs == "log-a" && ours == "log-b"),
        "{refused}"
    );
    // Connecting again keeps the stream's identity; the same log binds again.
    let again = streams.connect().await;
    again.bind_log("log-a").await.unwrap();

    // A message of another log that got in anyway reaches consumers as one nobody can read,
    // which the subscription runtime dead-letters.
    let mut foreign = async_nats::HeaderMap::new();
    foreign.insert(header::LOG_ID, "log-b");
    foreign.insert(async_nats::header::NATS_MESSAGE_ID, "foreign-1");
    let body = serde_json::to_vec(&[events[0].envelope.clone()]).unwrap();
    again
        .context()
        .publish_with_headers(
            streams.settings.events_subject(0, Topic::Campaigns),
            foreign,
            body.into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let mut deliveries = again.subscribe(&ConsumerOptions::new("c")).await.unwrap();
    let own = deliveries.next().await.unwrap().unwrap();
    assert_eq!(own.events().unwrap().len(), 1);
    let other = deliveries.next().await.unwrap().unwrap();
    let reason = other.events().unwrap_err();
    assert!(
        reason.contains("log-b") && reason.contains("log-a"),
        "{reason}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_deployment_on_the_same_nats_prefix_refuses_to_start() {
    use gateway::app::Application;
    let first = harness::spawn_app(harness::Backend::Postgres).await;
    first.create_user("Ada").await;
    let shared = first.streams.as_ref().unwrap().settings.clone();
    let other = TestDb::new().await;
    let settings = app_settings(&other, shared);
    let Err(refused) = Application::build(settings).await else {
        panic!("a second deployment started on the first one's streams");
    };
    let theirs = first.db.as_ref().unwrap().log().identity().await.unwrap();
    let ours = other.log().identity().await.unwrap();
    assert_ne!(theirs, ours);
    let message = refused.to_string();
    assert!(
        message.contains(&theirs)
            && message.contains(&ours)
            && message.contains("GROUPBUY_NATS_PREFIX"),
        "{message}"
    );
    // The first deployment goes on.
    let (_, bob) = first.create_user("Bob").await;
    assert!(!bob.is_empty());
}
