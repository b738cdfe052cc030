//! The single writer of a hot campaign: every saga wake-up for the campaign's orders, decided
//! in memory and appended in batches.
//!
//! Within an instance, wake-ups for one campaign queue to one [`CampaignWriter`] task. It
//! takes every queued wake-up (up to [`WriterOptions::batch_orders_max`]), runs
//! [`domain::saga::advance`] for each against state it keeps in memory (the campaign's terms,
//! its bucket of stock, the customers' holdings), and appends everything those wake-ups decided
//! in one atomic append: the holdings' reservations, one `StockMoved` for the bucket, the
//! orders' new states (an order's move to awaiting payment is its payment's request) and the
//! payments' timeouts and refunds. Every stream of that
//! append is at the version the writer decided on, so the log's unique `(stream, version)`
//! rule still settles every race: with another instance's writer, a customer's cancel or a
//! payment's answer. A conflict reloads what the batch read and decides it again, a bounded
//! number of times.
//!
//! Nothing here grows with the sale: the campaign and its buckets are counters, a holding is
//! bounded by the per-user limit, and the holdings this writer remembers are capped
//! ([`WriterOptions::holdings_cached_max`]).
//!
//! A campaign's stock may be spread over several buckets (`stock_buckets`). Each writer has a
//! home bucket, a hash of a number the instance drew, so that writers of different instances
//! mostly append to different streams; two that drew the same home conflict on it, and the one
//! that conflicts moves to the home its next number gives, until they part. When its bucket cannot cover an order it moves units in from the bucket
//! that has the most, in the same append; only when every bucket is empty is an order
//! rejected as sold out. See docs/adr/0010-flash-sale-engine.md.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use commands::{
    stream_id, AppendRequest, CommandHandler, EventLog, LogError, NewEvent, RecordedEvent,
    StreamAppend,
};
use domain::campaign::{Campaign, CampaignAggregate, CampaignCommand, StockMove};
use domain::holding::{Holding, HoldingAggregate};
use domain::order::{Order, OrderAggregate, OrderEvent, OrderStatus};
use domain::payment::{Payment, PaymentAggregate, PaymentStatus};
use domain::saga::{advance, payment_id_of, Bucket, Next, OrderFacts, Wake};
use domain::stock::{StockBucket, StockBucketAggregate, StockBucketCommand};
use domain::{Aggregate, CampaignId, Cents, DomainError, OrderId, PaymentId, Timestamp, UserId};
use schemas::Metadata;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use ulid::Ulid;

use crate::order_saga::SagaError;

/// How campaign writers batch and bound themselves.
#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Most wake-ups decided in one append.
    pub batch_orders_max: usize,
    /// Wake-ups waiting for a writer before callers wait for room.
    pub queue_orders_max: usize,
    /// Appends of one batch after conflicts, before its wake-ups fail (and are retried by
    /// their subscription).
    pub conflict_attempts_max: u32,
    /// Holdings one writer remembers; past it, it starts over and reads them again.
    pub holdings_cached_max: usize,
    /// A writer with nothing to do for this long stops; the next wake-up starts it again.
    pub idle_stop: Duration,
    /// The bucket this instance's writers sell from first. `None` (the default) picks one
    /// per instance and campaign at random, so that the writers of several instances append
    /// to different buckets.
    pub home_bucket: Option<u32>,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            batch_orders_max: 256,
            queue_orders_max: 20_000,
            conflict_attempts_max: 8,
            holdings_cached_max: 100_000,
            idle_stop: Duration::from_secs(60),
            home_bucket: None,
        }
    }
}

/// Orders whose streams one read loads at most (about a dozen events each).
const LOAD_ORDERS_MAX: usize = 200;

/// An order as the log has it, with the versions its streams are at.
#[derive(Clone, Debug, Default)]
pub struct OrderState {
    /// The order; `None` when the log has no such order.
    pub order: Option<Order>,
    /// Version of `order-<id>`.
    pub order_version: u64,
    /// The payment, once requested.
    pub payment: Option<Payment>,
    /// Version of `payment-<id>`.
    pub payment_version: u64,
}

impl OrderState {
    /// An order as its `OrderPlaced` event shows it: nothing has happened to it since, as far
    /// as the trigger tells (the append checks it).
    pub fn placed(order: Order) -> OrderState {
        OrderState {
            order: Some(order),
            order_version: 1,
            ..OrderState::default()
        }
    }
}

/// Reads orders with their payments, a bounded number of orders per read.
pub async fn load_orders(
    log: &dyn EventLog,
    order_ids: &[OrderId],
) -> Result<HashMap<OrderId, OrderState>, LogError> {
    let mut states = HashMap::with_capacity(order_ids.len());
    for chunk in order_ids.chunks(LOAD_ORDERS_MAX) {
        let streams: Vec<String> = chunk
            .iter()
            .flat_map(|&id| {
                [
                    stream_id::<OrderAggregate>(id),
                    stream_id::<PaymentAggregate>(payment_id_of(id)),
                ]
            })
            .collect();
        let events = read_all_of(log, &streams).await?;
        for &id in chunk {
            let order = fold::<OrderAggregate>(&events, &stream_id::<OrderAggregate>(id))?;
            let payment = fold_from::<PaymentAggregate>(
                &events,
                &stream_id::<PaymentAggregate>(payment_id_of(id)),
                order.0.as_ref().and_then(Payment::requested_by),
            )?;
            states.insert(
                id,
                OrderState {
                    order: order.0,
                    order_version: order.1,
                    payment: payment.0,
                    payment_version: payment.1,
                },
            );
        }
    }
    Ok(states)
}

/// Every event of `streams`, by stream, in version order.
async fn read_all_of(
    log: &dyn EventLog,
    streams: &[String],
) -> Result<HashMap<String, Vec<RecordedEvent>>, LogError> {
    let mut by_stream: HashMap<String, Vec<RecordedEvent>> = HashMap::new();
    let page_max = commands::log::READ_EVENTS_MAX;
    let page = log.read_streams(streams, page_max).await?;
    let full = page.len() == page_max;
    for event in page {
        by_stream
            .entry(event.envelope.stream_id.clone())
            .or_default()
            .push(event);
    }
    if full {
        // A full page may have cut streams short: read each on from where it got to (rare:
        // the streams read here hold a handful of events each).
        for stream in streams {
            loop {
                let have = by_stream.get(stream).map_or(0, Vec::len) as u64;
                let tail = log.read_stream(stream, have, page_max).await?;
                let done = tail.len() < page_max;
                by_stream.entry(stream.clone()).or_default().extend(tail);
                if done {
                    break;
                }
            }
        }
    }
    Ok(by_stream)
}

/// Folds the events of `stream` after `version` onto `state`, the stream's state at `version`.
async fn read_on<A: Aggregate>(
    log: &dyn EventLog,
    stream: &str,
    mut state: A::State,
    mut version: u64,
) -> Result<(A::State, u64), LogError> {
    let page_max = commands::log::READ_EVENTS_MAX;
    loop {
        let page = log.read_stream(stream, version, page_max).await?;
        (state, version) = fold_onto::<A>(stream, state, version, &page)?;
        if page.len() < page_max {
            return Ok((state, version));
        }
    }
}

/// Folds one stream of `events`: its state and version.
fn fold<A: Aggregate>(
    events: &HashMap<String, Vec<RecordedEvent>>,
    stream: &str,
) -> Result<(A::State, u64), LogError> {
    fold_from::<A>(events, stream, A::State::default())
}

/// Folds one stream of `events` whose history starts at `origin` (a payment's, at the payment
/// its order requested).
fn fold_from<A: Aggregate>(
    events: &HashMap<String, Vec<RecordedEvent>>,
    stream: &str,
    origin: A::State,
) -> Result<(A::State, u64), LogError> {
    let recorded = events.get(stream).map_or(&[][..], Vec::as_slice);
    fold_onto::<A>(stream, origin, 0, recorded)
}

/// Applies `recorded`, the events of `stream` that follow `version`, to `state`.
fn fold_onto<A: Aggregate>(
    stream: &str,
    mut state: A::State,
    mut version: u64,
    recorded: &[RecordedEvent],
) -> Result<(A::State, u64), LogError> {
    for recorded in recorded {
        assert_eq!(
            recorded.envelope.stream_version,
            version + 1,
            "stream {stream} is not contiguous"
        );
        let event: A::Event = schemas::from_envelope(&recorded.envelope)?;
        state = A::evolve(state, &event);
        version = recorded.envelope.stream_version;
    }
    Ok((state, version))
}

/// One saga wake-up for one order, as a writer takes it.
#[derive(Clone, Debug)]
pub struct WakeUp {
    /// The order.
    pub order_id: OrderId,
    /// The order as the caller read it (or as its `OrderPlaced` showed it).
    pub state: OrderState,
    /// What woke the saga: its trace continues into the events, and it is their cause.
    pub cause: Metadata,
    /// When that happened, when known: the saga's step durations count from it.
    pub caused_at: Option<Timestamp>,
}

/// Where a wake-up left its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Woken {
    /// The log has no such order.
    Unknown,
    /// Waiting for the payment's answer or its deadline.
    Waiting {
        /// The deadline.
        deadline: Timestamp,
        /// The payment still to be answered, to ask the provider for: `None` when it was
        /// answered (a success after a cancel is refunded at once, so this is rare).
        pending: Option<(PaymentId, Cents)>,
    },
    /// Final, with every compensation done.
    Done,
}

type Reply = oneshot::Sender<Result<Woken, SagaError>>;

/// Every writer of this instance, one per campaign with work.
pub struct CampaignWriters {
    handler: CommandHandler,
    options: WriterOptions,
    /// Picks each writer's home bucket: writers of different instances mostly start at
    /// different buckets.
    instance: u64,
    writers: Mutex<HashMap<CampaignId, mpsc::Sender<(WakeUp, Reply)>>>,
}

impl CampaignWriters {
    /// Writers that append through `handler`'s log.
    pub fn new(handler: CommandHandler, options: WriterOptions) -> Self {
        // Exported at zero from the start, so that the first conflict shows as a rise.
        metrics::counter!("groupbuy_campaign_writer_conflicts_total").increment(0);
        CampaignWriters {
            handler,
            options,
            instance: rand::random(),
            writers: Mutex::default(),
        }
    }

    /// Hands `wake_ups` of orders of `campaign_id` to its writer, and waits for their
    /// outcomes, in the same order.
    pub async fn wake(
        &self,
        campaign_id: CampaignId,
        wake_ups: Vec<WakeUp>,
    ) -> Vec<Result<Woken, SagaError>> {
        let mut outcomes = Vec::with_capacity(wake_ups.len());
        for wake_up in wake_ups {
            let (reply, outcome) = oneshot::channel();
            self.send(campaign_id, wake_up, reply).await;
            outcomes.push(outcome);
        }
        let mut results = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            results.push(outcome.await.unwrap_or_else(|_| {
                Err(SagaError::Writer(
                    "the campaign's writer stopped".to_owned(),
                ))
            }));
        }
        results
    }

    async fn send(&self, campaign_id: CampaignId, wake_up: WakeUp, reply: Reply) {
        let mut job = (wake_up, reply);
        // A writer that stopped (idle) refuses the job; start another and hand it over.
        for _ in 0..2 {
            let queue = self.queue_of(campaign_id);
            match queue.send(job).await {
                Ok(()) => return,
                Err(mpsc::error::SendError(refused)) => {
                    job = refused;
                    let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
                    if writers
                        .get(&campaign_id)
                        .is_some_and(|q| q.same_channel(&queue))
                    {
                        writers.remove(&campaign_id);
                    }
                }
            }
        }
        let _ = job.1.send(Err(SagaError::Writer(
            "no writer took the wake-up".to_owned(),
        )));
    }

    fn queue_of(&self, campaign_id: CampaignId) -> mpsc::Sender<(WakeUp, Reply)> {
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = writers.get(&campaign_id).filter(|q| !q.is_closed()) {
            return queue.clone();
        }
        let (queue, jobs) = mpsc::channel(self.options.queue_orders_max.max(1));
        let writer = CampaignWriter::new(
            self.handler.clone(),
            campaign_id,
            self.options.clone(),
            self.instance,
        );
        tokio::spawn(writer.run(jobs));
        writers.insert(campaign_id, queue.clone());
        queue
    }
}

/// The writer of one campaign in this instance.
pub struct CampaignWriter {
    handler: CommandHandler,
    campaign_id: CampaignId,
    options: WriterOptions,
    instance: u64,
    /// Known once loaded.
    stock: Option<Stock>,
    /// Holdings by customer, with their stream versions.
    holdings: HashMap<UserId, (Holding, u64)>,
    /// Customers whose remembered holding may be behind its stream (a batch of theirs
    /// conflicted): read on from the remembered version before they are decided on again.
    stale: HashSet<UserId>,
}

/// The campaign and this writer's bucket, as the log last had them.
#[derive(Clone, Debug)]
struct Stock {
    campaign: Campaign,
    campaign_version: u64,
    home: u32,
    /// The home bucket's available and sold units and stream version (for bucket 0, the
    /// campaign's).
    home_available: u32,
    home_sold: u32,
    home_version: u64,
}

/// Every stream a batch appends to, in the order first touched: its expected version and
/// its events.
#[derive(Default)]
struct Appends {
    streams: HashMap<String, (u64, Vec<(schemas::EncodedEvent, Metadata)>)>,
    order: Vec<String>,
}

impl Appends {
    /// Adds `events` to `stream`; `expected_version` counts only for the stream's first
    /// events of the batch.
    fn add<E: serde::Serialize>(
        &mut self,
        stream: String,
        expected_version: u64,
        events: &[E],
        metadata: &Metadata,
    ) -> Result<(), LogError> {
        if events.is_empty() {
            return Ok(());
        }
        if !self.streams.contains_key(&stream) {
            self.order.push(stream.clone());
        }
        let (_, appended) = self
            .streams
            .entry(stream)
            .or_insert_with(|| (expected_version, Vec::new()));
        for event in events {
            appended.push((schemas::encode(event)?, metadata.clone()));
        }
        Ok(())
    }

    /// The version `stream` will be at after the batch, given it was at `version` before.
    fn version_after(&self, stream: &str, version: u64) -> u64 {
        self.streams
            .get(stream)
            .map_or(version, |(expected, events)| expected + events.len() as u64)
    }

    fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The append, with the orders' events before their payments', the holdings' and the
    /// buckets': within a transaction the order moves before the stock, as between two. Within
    /// each kind, streams go in the order of their ids, so that two writers (of two instances)
    /// appending to the same streams insert their rows, and wait on each other's, in the same
    /// order: in opposite orders, each would wait for the other's unique index entries until
    /// the database broke the deadlock, a second later.
    fn into_request(mut self) -> AppendRequest {
        let rank = |stream: &str| match stream.split_once('-').map(|(c, _)| c) {
            Some("order") => 0,
            Some("payment") => 1,
            Some("holding") => 2,
            _ => 3,
        };
        self.order
            .sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
        let mut request = AppendRequest::default();
        for stream_id in self.order {
            let (expected_version, events) = self.streams.remove(&stream_id).expect("listed");
            let events = events
                .into_iter()
                .map(|(event, metadata)| NewEvent {
                    event_id: Ulid::new(),
                    event,
                    metadata,
                })
                .collect();
            request.streams.push(StreamAppend {
                stream_id,
                expected_version,
                events,
            });
        }
        request
    }
}

/// The stream of bucket `bucket` of a campaign: the campaign's own for bucket 0.
pub fn bucket_stream(campaign_id: CampaignId, bucket: u32) -> String {
    if bucket == 0 {
        stream_id::<CampaignAggregate>(campaign_id)
    } else {
        stream_id::<StockBucketAggregate>(format!("{campaign_id}-{bucket}"))
    }
}

/// The stream of `user_id`'s holding in `campaign_id`.
pub fn holding_stream(campaign_id: CampaignId, user_id: UserId) -> String {
    stream_id::<HoldingAggregate>(format!("{campaign_id}-{user_id}"))
}

/// What one batch decided, before it is appended.
struct Decided {
    appends: Appends,
    outcomes: Vec<Result<Woken, SagaError>>,
    holdings: HashMap<UserId, (Holding, u64)>,
    stock: Stock,
    /// For the business counters, once appended.
    order_events: Vec<OrderEvent>,
    /// The steps taken, with when what woke them happened, for the step durations.
    steps: Vec<(domain::saga::SagaStep, Option<Timestamp>)>,
}

impl CampaignWriter {
    fn new(
        handler: CommandHandler,
        campaign_id: CampaignId,
        options: WriterOptions,
        instance: u64,
    ) -> Self {
        CampaignWriter {
            handler,
            campaign_id,
            options,
            instance,
            stock: None,
            holdings: HashMap::new(),
            stale: HashSet::new(),
        }
    }

    /// Takes batches of wake-ups until nothing came for `idle_stop`.
    async fn run(mut self, mut jobs: mpsc::Receiver<(WakeUp, Reply)>) {
        loop {
            let first = match tokio::time::timeout(self.options.idle_stop, jobs.recv()).await {
                Ok(Some(job)) => job,
                Ok(None) | Err(_) => return,
            };
            let mut batch = vec![first];
            while batch.len() < self.options.batch_orders_max.max(1) {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            let span = tracing::debug_span!("campaign_writer", campaign_id = %self.campaign_id, orders = batch.len());
            self.decide(batch).instrument(span).await;
        }
    }

    /// Decides a batch and appends it, deciding again after conflicts.
    async fn decide(&mut self, batch: Vec<(WakeUp, Reply)>) {
        let started = Instant::now();
        // One wake-up per order: a later duplicate gets the same outcome.
        let mut wake_ups: Vec<WakeUp> = Vec::with_capacity(batch.len());
        let mut replies: Vec<Vec<Reply>> = Vec::with_capacity(batch.len());
        let mut index: HashMap<OrderId, usize> = HashMap::new();
        for (wake_up, reply) in batch {
            match index.get(&wake_up.order_id) {
                Some(&i) => replies[i].push(reply),
                None => {
                    index.insert(wake_up.order_id, wake_ups.len());
                    wake_ups.push(wake_up);
                    replies.push(vec![reply]);
                }
            }
        }
        let outcomes = self
            .decide_and_append(&mut wake_ups, started, &chrono::Utc::now)
            .await;
        metrics::histogram!("groupbuy_campaign_writer_batch_orders").record(wake_ups.len() as f64);
        metrics::histogram!("groupbuy_campaign_writer_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        for (outcome, replies) in outcomes.into_iter().zip(replies) {
            for reply in replies {
                let _ = reply.send(outcome.clone());
            }
        }
    }

    /// A writer its caller drives one batch at a time, with no queue and no task of its own:
    /// for the deterministic simulation (`sagas/tests/simulation`), which runs the writer's
    /// real decisions under its own scheduler and simulated clock, and drops the writer (its
    /// caches with it) to simulate a crash.
    pub fn detached(
        handler: CommandHandler,
        campaign_id: CampaignId,
        options: WriterOptions,
        instance: u64,
    ) -> Self {
        CampaignWriter::new(handler, campaign_id, options, instance)
    }

    /// The bucket this writer appends to, once it has read the campaign.
    pub fn home_bucket(&self) -> Option<u32> {
        self.stock.as_ref().map(|stock| stock.home)
    }

    /// Decides `wake_ups` (one per order) and appends them as one batch of the queue would
    /// be, reading the time from `clock` before each attempt instead of the wall clock.
    pub async fn decide_batch(
        &mut self,
        wake_ups: &mut [WakeUp],
        clock: &(dyn Fn() -> Timestamp + Sync),
    ) -> Vec<Result<Woken, SagaError>> {
        self.decide_and_append(wake_ups, Instant::now(), clock)
            .await
    }

    async fn decide_and_append(
        &mut self,
        wake_ups: &mut [WakeUp],
        started: Instant,
        clock: &(dyn Fn() -> Timestamp + Sync),
    ) -> Vec<Result<Woken, SagaError>> {
        let failed =
            |count: usize, error: SagaError| (0..count).map(|_| Err(error.clone())).collect();
        let attempts = self.options.conflict_attempts_max.max(1);
        for attempt in 1..=attempts {
            let decided = match self.decide_once(wake_ups, clock).await {
                Ok(decided) => decided,
                Err(error) => return failed(wake_ups.len(), error),
            };
            if decided.appends.is_empty() {
                return decided.outcomes;
            }
            let Decided {
                appends,
                outcomes,
                holdings,
                stock,
                order_events,
                steps,
            } = decided;
            match self.handler.log().append(appends.into_request()).await {
                Ok(_) => {
                    self.remember(holdings, stock);
                    count(self.campaign_id, &order_events);
                    time_steps(&steps, started);
                    return outcomes;
                }
                Err(LogError::Conflict { stream_id, .. }) => {
                    tracing::debug!(campaign_id = %self.campaign_id, %stream_id, attempt, "batch conflicted; deciding it again");
                    metrics::counter!("groupbuy_campaign_writer_conflicts_total").increment(1);
                    // Forgotten at once, not at the next attempt: after the last one, the next
                    // batch must not decide on it again.
                    if let Err(error) = self.reload(wake_ups, &stream_id).await {
                        return failed(wake_ups.len(), error);
                    }
                }
                Err(error) => return failed(wake_ups.len(), error.into()),
            }
        }
        let stream_id = bucket_stream(self.campaign_id, self.stock.as_ref().map_or(0, |s| s.home));
        failed(
            wake_ups.len(),
            SagaError::Contention {
                stream_id,
                attempts,
            },
        )
    }

    /// Forgets what a conflicting batch decided on, as far as the stream that conflicted
    /// (`stream_id`) tells: a customer's holding (another instance sold to the same customer)
    /// costs one read of the batch's holdings; a bucket, one of the campaign; an order's
    /// streams (a customer's cancel, a payment's answer), one of the batch's orders.
    async fn reload(&mut self, wake_ups: &mut [WakeUp], stream_id: &str) -> Result<(), SagaError> {
        let category = stream_id.split_once('-').map_or(stream_id, |(c, _)| c);
        match category {
            "holding" => {
                // Another instance's writer sold to the same customers: their holdings are
                // read on from where this writer left them (a customer's holding stream grows
                // with their orders, so reading it whole again costs more the longer the sale).
                for wake_up in wake_ups.iter() {
                    if let Some(order) = &wake_up.state.order {
                        self.stale.insert(order.user_id);
                    }
                }
            }
            "campaign" | "stock" => {
                let home = self.stock.as_ref().map(|s| s.home);
                if home.is_some_and(|home| bucket_stream(self.campaign_id, home) == stream_id)
                    && self.options.home_bucket.is_none()
                {
                    // Another instance's writer may have picked the same home (a home is a
                    // hash of the instance): move to another, picked the same way from the
                    // next number of this instance's own sequence, so that two writers that
                    // met part after a few conflicts.
                    self.instance = next_instance(self.instance);
                }
                self.stock = None;
            }
            _ => {
                let ids: Vec<OrderId> = wake_ups.iter().map(|w| w.order_id).collect();
                let mut states = load_orders(self.handler.log().as_ref(), &ids).await?;
                for wake_up in wake_ups.iter_mut() {
                    wake_up.state = states.remove(&wake_up.order_id).unwrap_or_default();
                }
            }
        }
        Ok(())
    }

    /// Keeps what an appended batch left: its holdings and the bucket, and snapshots the home
    /// bucket's stream now and then so a new writer does not fold it from the start.
    fn remember(&mut self, holdings: HashMap<UserId, (Holding, u64)>, mut stock: Stock) {
        if self.holdings.len() + holdings.len() > self.options.holdings_cached_max {
            self.holdings.clear();
            self.stale.clear();
        }
        for user in holdings.keys() {
            self.stale.remove(user);
        }
        let before = self.stock.as_ref().map_or(0, |s| s.home_version);
        let stream = bucket_stream(self.campaign_id, stock.home);
        if stock.home == 0 {
            stock.campaign_version = stock.home_version;
            let state = Some(Campaign {
                sold_units: stock.home_sold,
                ..with_available(&stock.campaign, stock.home_available)
            });
            self.handler.snapshot_if_due::<CampaignAggregate>(
                &stream,
                before,
                stock.home_version,
                &state,
            );
        } else {
            let state = StockBucket {
                available_units: stock.home_available,
                sold_units: stock.home_sold,
            };
            self.handler.snapshot_if_due::<StockBucketAggregate>(
                &stream,
                before,
                stock.home_version,
                &state,
            );
        }
        self.holdings.extend(holdings);
        self.stock = Some(stock);
    }

    /// Decides every wake-up of the batch on copies of the writer's state.
    async fn decide_once(
        &mut self,
        wake_ups: &[WakeUp],
        clock: &(dyn Fn() -> Timestamp + Sync),
    ) -> Result<Decided, SagaError> {
        let mut stock = match &self.stock {
            Some(stock) => stock.clone(),
            None => self.load_stock().await?,
        };
        if stock.home != 0 {
            // Another bucket's writer does not see an operator's close in its own stream.
            self.refresh_terms(&mut stock).await?;
        }
        let mut holdings = self.load_holdings(wake_ups).await?;
        let now = clock();
        let mut appends = Appends::default();
        let mut outcomes = Vec::with_capacity(wake_ups.len());
        let mut order_events = Vec::new();
        let mut steps = Vec::new();
        let mut stock_move = StockMove {
            now,
            ..StockMove::default()
        };
        // Other buckets may have units until a look at all of them finds none.
        let mut more_elsewhere = stock.campaign.stock_buckets > 1;
        let mut donors: HashMap<u32, u32> = HashMap::new();
        let saga_metadata = Metadata {
            actor: Some("saga:order".into()),
            ..Metadata::default()
        };
        let mut bucket_metadata: Option<Metadata> = None;
        for wake_up in wake_ups {
            let Some(order) = &wake_up.state.order else {
                outcomes.push(Ok(Woken::Unknown));
                continue;
            };
            if order.campaign_id != self.campaign_id {
                outcomes.push(Err(SagaError::Writer(format!(
                    "order {} is not of campaign {}",
                    order.order_id, self.campaign_id
                ))));
                continue;
            }
            let user_id = order.user_id;
            // Taken out, and put back moved on below: a customer's holding is copied once a
            // batch (from the cache), not once an order.
            let (holding, holding_version) = holdings.remove(&user_id).unwrap_or_default();
            let mut facts = OrderFacts {
                order: wake_up.state.order.clone(),
                holding,
                payment: wake_up.state.payment.clone(),
            };
            // The wake-up's steps run in a span of their own under what woke it; the events
            // they record name it, so what handles them continues the trace.
            let span = tracing::info_span!(
                "saga_step",
                step = tracing::field::Empty,
                steps = tracing::field::Empty,
                order_id = %wake_up.order_id,
            );
            if let Some(parent) = commands::trace::TraceParent::of(&wake_up.cause) {
                commands::trace::continue_trace(&span, parent);
            }
            let advanced = loop {
                let mut bucket = Bucket {
                    campaign: &stock.campaign,
                    bucket: stock.home,
                    available_units: stock.home_available,
                    more_elsewhere,
                };
                match advance(&mut facts, &mut bucket, now).map_err(SagaError::Domain)? {
                    Wake::Advanced(advanced) => {
                        stock.home_available = bucket.available_units;
                        break advanced;
                    }
                    Wake::NeedsUnits(units) => {
                        let moved = self
                            .fill_home(
                                &mut stock,
                                &mut appends,
                                &mut donors,
                                units,
                                now,
                                &saga_metadata,
                            )
                            .await?;
                        more_elsewhere = moved;
                    }
                }
            };
            if let Some(first) = advanced.steps.first() {
                span.record("step", first.name());
                let names: Vec<&str> = advanced.steps.iter().map(|s| s.name()).collect();
                span.record("steps", names.join(",").as_str());
            }
            let mut metadata = Metadata {
                actor: Some("saga:order".into()),
                correlation_id: Some(wake_up.order_id.to_string()),
                ..wake_up.cause.clone()
            };
            if let Some(here) = commands::trace::context_of(&span) {
                here.stamp(&mut metadata);
            }
            let moves_stock =
                advanced.reserved_units + advanced.released_units + advanced.sold_units > 0;
            if moves_stock && bucket_metadata.is_none() {
                // A bucket's move is many orders'; it continues the first one's trace.
                bucket_metadata = Some(Metadata {
                    correlation_id: None,
                    ..metadata.clone()
                });
            }
            let order_id = wake_up.order_id;
            let state = &wake_up.state;
            appends.add(
                stream_id::<OrderAggregate>(order_id),
                state.order_version,
                &advanced.order,
                &metadata,
            )?;
            appends.add(
                stream_id::<PaymentAggregate>(payment_id_of(order_id)),
                state.payment_version,
                &advanced.payment,
                &metadata,
            )?;
            appends.add(
                holding_stream(self.campaign_id, user_id),
                holding_version,
                &advanced.holding,
                &metadata,
            )?;
            holdings.insert(
                user_id,
                (
                    std::mem::take(&mut facts.holding),
                    holding_version + advanced.holding.len() as u64,
                ),
            );
            stock_move.reserved += advanced.reserved_units;
            stock_move.released += advanced.released_units;
            stock_move.sold += advanced.sold_units;
            order_events.extend(advanced.order.iter().cloned());
            steps.extend(advanced.steps.iter().map(|&step| (step, wake_up.caused_at)));
            outcomes.push(Ok(match advanced.next {
                Next::Unknown => Woken::Unknown,
                Next::Done => Woken::Done,
                Next::WaitUntil(deadline) => Woken::Waiting {
                    deadline,
                    pending: facts
                        .payment
                        .as_ref()
                        .filter(|p| p.status == PaymentStatus::Pending)
                        .map(|p| (p.payment_id, p.amount_cents)),
                },
            }));
        }
        if !stock_move.is_empty() {
            let metadata = bucket_metadata.as_ref().unwrap_or(&saga_metadata);
            self.move_home(&mut stock, &mut appends, stock_move, metadata)?;
            stock.home_sold += stock_move.sold;
        }
        let home_stream = bucket_stream(self.campaign_id, stock.home);
        stock.home_version = appends.version_after(&home_stream, stock.home_version);
        Ok(Decided {
            appends,
            outcomes,
            holdings,
            stock,
            order_events,
            steps,
        })
    }

    /// Records the batch's move on the home bucket, checked by its aggregate.
    fn move_home(
        &self,
        stock: &mut Stock,
        appends: &mut Appends,
        stock_move: StockMove,
        metadata: &Metadata,
    ) -> Result<(), SagaError> {
        let stream = bucket_stream(self.campaign_id, stock.home);
        // The units were counted per order already; the aggregate checks the sum once more.
        let before = stock
            .home_available
            .checked_add(stock_move.reserved)
            .and_then(|u| u.checked_sub(stock_move.released))
            .expect("the batch's own moves");
        if stock.home == 0 {
            let state = Some(with_available(&stock.campaign, before));
            let events = CampaignAggregate::decide(&state, &CampaignCommand::Move(stock_move))?;
            appends.add(stream, stock.home_version, &events, metadata)?;
        } else {
            let state = StockBucket {
                available_units: before,
                sold_units: 0,
            };
            let events =
                StockBucketAggregate::decide(&state, &StockBucketCommand::Move(stock_move))?;
            appends.add(stream, stock.home_version, &events, metadata)?;
        }
        Ok(())
    }

    /// Moves units into the home bucket from the bucket with the most, in the batch's append:
    /// at least `needed`, and half of what that bucket has when that is more. False when no
    /// other bucket has units left. `donors` holds what the buckets this batch took units from
    /// have left, so a later order of the batch can take more from them.
    async fn fill_home(
        &self,
        stock: &mut Stock,
        appends: &mut Appends,
        donors: &mut HashMap<u32, u32>,
        needed: u32,
        now: Timestamp,
        metadata: &Metadata,
    ) -> Result<bool, SagaError> {
        let others: Vec<u32> = (0..stock.campaign.stock_buckets)
            .filter(|&b| b != stock.home)
            .collect();
        let streams: Vec<String> = others
            .iter()
            .filter(|b| !donors.contains_key(b))
            .map(|&b| bucket_stream(self.campaign_id, b))
            .collect();
        let events = read_all_of(self.handler.log().as_ref(), &streams).await?;
        let mut best: Option<(u32, u32, u64)> = None;
        for &b in &others {
            let stream = bucket_stream(self.campaign_id, b);
            let (available, version) = match donors.get(&b) {
                // Its expected version was set when it first gave in this batch.
                Some(&left) => (left, 0),
                None if b == 0 => {
                    let (campaign, version) = fold::<CampaignAggregate>(&events, &stream)?;
                    (campaign.map_or(0, |c| c.available_units), version)
                }
                None => {
                    let (bucket, version) = fold::<StockBucketAggregate>(&events, &stream)?;
                    (bucket.available_units, version)
                }
            };
            if available > 0 && best.is_none_or(|(_, most, _)| available > most) {
                best = Some((b, available, version));
            }
        }
        let Some((donor, available, donor_version)) = best else {
            return Ok(false);
        };
        let units = needed.max(available / 2).min(available);
        donors.insert(donor, available - units);
        let out = StockBucketCommand::TransferOut {
            to_bucket: stock.home,
            units,
            now,
        };
        let donor_stream = bucket_stream(self.campaign_id, donor);
        if donor == 0 {
            let state = Some(with_available(&stock.campaign, available));
            let events = CampaignAggregate::decide(
                &state,
                &CampaignCommand::TransferOut {
                    to_bucket: stock.home,
                    units,
                    now,
                },
            )?;
            appends.add(donor_stream, donor_version, &events, metadata)?;
        } else {
            let state = StockBucket {
                available_units: available,
                sold_units: 0,
            };
            let events = StockBucketAggregate::decide(&state, &out)?;
            appends.add(donor_stream, donor_version, &events, metadata)?;
        }
        let home_stream = bucket_stream(self.campaign_id, stock.home);
        if stock.home == 0 {
            let state = Some(with_available(&stock.campaign, stock.home_available));
            let events = CampaignAggregate::decide(
                &state,
                &CampaignCommand::TransferIn {
                    from_bucket: donor,
                    units,
                    now,
                },
            )?;
            appends.add(home_stream, stock.home_version, &events, metadata)?;
        } else {
            let events = StockBucketAggregate::decide(
                &StockBucket {
                    available_units: stock.home_available,
                    sold_units: 0,
                },
                &StockBucketCommand::TransferIn {
                    from_bucket: donor,
                    units,
                    now,
                },
            )?;
            appends.add(home_stream, stock.home_version, &events, metadata)?;
        }
        stock.home_available += units;
        metrics::counter!("groupbuy_stock_transfers_total").increment(1);
        Ok(true)
    }

    /// Loads the campaign and picks the home bucket.
    async fn load_stock(&self) -> Result<Stock, SagaError> {
        let loaded = self
            .handler
            .load::<CampaignAggregate>(&bucket_stream(self.campaign_id, 0))
            .await?;
        let campaign = loaded
            .state
            .ok_or(SagaError::Domain(DomainError::CampaignNotFound))?;
        let home = match self.options.home_bucket {
            Some(bucket) => bucket.min(campaign.stock_buckets - 1),
            None => home_bucket(self.instance, self.campaign_id, campaign.stock_buckets),
        };
        let (home_available, home_sold, home_version) = if home == 0 {
            (
                campaign.available_units,
                campaign.sold_units,
                loaded.version,
            )
        } else {
            let bucket = self
                .handler
                .load::<StockBucketAggregate>(&bucket_stream(self.campaign_id, home))
                .await?;
            (
                bucket.state.available_units,
                bucket.state.sold_units,
                bucket.version,
            )
        };
        Ok(Stock {
            campaign,
            campaign_version: loaded.version,
            home,
            home_available,
            home_sold,
            home_version,
        })
    }

    /// Reads the campaign stream's events since this writer last saw it (a close, a
    /// replenishment), for a writer whose home is another bucket.
    async fn refresh_terms(&self, stock: &mut Stock) -> Result<(), SagaError> {
        let stream = bucket_stream(self.campaign_id, 0);
        let tail = self
            .handler
            .log()
            .read_stream(&stream, stock.campaign_version, usize::MAX)
            .await?;
        let mut campaign = Some(stock.campaign.clone());
        for recorded in &tail {
            let event = schemas::from_envelope(&recorded.envelope).map_err(LogError::from)?;
            campaign = CampaignAggregate::evolve(campaign, &event);
            stock.campaign_version = recorded.envelope.stream_version;
        }
        stock.campaign = campaign.expect("a campaign stays a campaign");
        Ok(())
    }

    /// The holdings of the customers of `wake_ups`: remembered ones, those a conflict left
    /// stale read on from their remembered versions, and the rest read in one go.
    ///
    /// A remembered holding is trusted to reserve: if it is stale, the reservation appends at
    /// its old version and conflicts. It is not trusted to sell or release units it does not
    /// know of: for an order past `pending` whose reservation the cache lacks (another
    /// instance's writer made it, or this writer's own append was stored but its reply lost),
    /// the plan would take no step on the holding, nothing would conflict, and the order would
    /// end confirmed and never sold, or cancelled and never released. Such holdings are read
    /// from the log (found by the deterministic simulation, `sagas/tests/simulation`).
    async fn load_holdings(
        &self,
        wake_ups: &[WakeUp],
    ) -> Result<HashMap<UserId, (Holding, u64)>, SagaError> {
        let mut holdings = HashMap::with_capacity(wake_ups.len());
        let mut missing: HashSet<UserId> = HashSet::new();
        let mut behind: HashMap<UserId, (Holding, u64)> = HashMap::new();
        for wake_up in wake_ups {
            let Some(order) = &wake_up.state.order else {
                continue;
            };
            let user = order.user_id;
            if self.stale.contains(&user) && !missing.contains(&user) {
                if let Some(remembered) = self.holdings.get(&user) {
                    behind.entry(user).or_insert_with(|| remembered.clone());
                    continue;
                }
            }
            let known = self.holdings.get(&user).filter(|(holding, _)| {
                order.status == OrderStatus::Pending || holding.of(order.order_id).is_some()
            });
            match known {
                _ if missing.contains(&user) => {}
                Some(known) => {
                    holdings.insert(user, known.clone());
                }
                None => {
                    holdings.remove(&user);
                    missing.insert(user);
                }
            }
        }
        if !missing.is_empty() {
            let streams: Vec<String> = missing
                .iter()
                .map(|&u| holding_stream(self.campaign_id, u))
                .collect();
            let events = read_all_of(self.handler.log().as_ref(), &streams).await?;
            for user in missing {
                let loaded =
                    fold::<HoldingAggregate>(&events, &holding_stream(self.campaign_id, user))?;
                holdings.insert(user, loaded);
            }
        }
        let log = self.handler.log().as_ref();
        let caught_up = behind
            .into_iter()
            .map(|(user, (holding, version))| async move {
                let stream = holding_stream(self.campaign_id, user);
                read_on::<HoldingAggregate>(log, &stream, holding, version)
                    .await
                    .map(|loaded| (user, loaded))
            });
        holdings.extend(futures::future::try_join_all(caught_up).await?);
        Ok(holdings)
    }
}

/// The campaign's buckets other than its own stream (1 and up), as their streams stand.
pub async fn other_buckets(
    log: &dyn EventLog,
    campaign: &Campaign,
) -> Result<Vec<StockBucket>, LogError> {
    if campaign.stock_buckets <= 1 {
        return Ok(Vec::new());
    }
    let streams: Vec<String> = (1..campaign.stock_buckets)
        .map(|b| bucket_stream(campaign.campaign_id, b))
        .collect();
    let events = read_all_of(log, &streams).await?;
    streams
        .iter()
        .map(|stream| fold::<StockBucketAggregate>(&events, stream).map(|(bucket, _)| bucket))
        .collect()
}

/// The campaign with its bucket at `available` units, for deciding on it.
fn with_available(campaign: &Campaign, available: u32) -> Campaign {
    Campaign {
        available_units: available,
        ..campaign.clone()
    }
}

/// The number after `instance` in its sequence (splitmix64): where a writer whose home
/// conflicted picks its next home, deterministically for the simulation.
fn next_instance(instance: u64) -> u64 {
    let mut z = instance.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The home bucket of this instance's writer for a campaign.
fn home_bucket(instance: u64, campaign_id: CampaignId, stock_buckets: u32) -> u32 {
    if stock_buckets <= 1 {
        return 0;
    }
    let mixed = instance ^ (campaign_id.ulid().0 as u64);
    (mixed % u64::from(stock_buckets)) as u32
}

/// Times, once appended, each step a batch took: from what woke it (an order placed, a
/// payment's answer) to its append, so the histogram shows where an order spends its time; from
/// the batch's start when that is not known (a deadline).
fn time_steps(steps: &[(domain::saga::SagaStep, Option<Timestamp>)], started: Instant) {
    let now = chrono::Utc::now();
    for (step, caused_at) in steps {
        let seconds = match caused_at {
            Some(at) => (now - *at).to_std().unwrap_or_default().as_secs_f64(),
            None => started.elapsed().as_secs_f64(),
        };
        metrics::histogram!("groupbuy_saga_step_duration_seconds", "step" => step.name())
            .record(seconds);
    }
}

/// Counts, once appended, the orders a batch confirmed, rejected and cancelled.
fn count(campaign_id: CampaignId, events: &[OrderEvent]) {
    let campaign_id = campaign_id.to_string();
    for event in events {
        match event {
            OrderEvent::OrderConfirmed { .. } => {
                metrics::counter!("groupbuy_orders_confirmed_total", "campaign_id" => campaign_id.clone())
                    .increment(1);
            }
            OrderEvent::OrderRejected { reason, .. } => {
                metrics::counter!(
                    "groupbuy_orders_rejected_total",
                    "campaign_id" => campaign_id.clone(),
                    "reason" => snake(reason)
                )
                .increment(1);
            }
            OrderEvent::OrderCancelled { reason, .. } => {
                metrics::counter!(
                    "groupbuy_orders_cancelled_total",
                    "campaign_id" => campaign_id.clone(),
                    "reason" => snake(reason)
                )
                .increment(1);
            }
            _ => {}
        }
    }
}

/// The snake_case name serde gives a unit variant.
fn snake<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "unknown".into(),
    }
}
