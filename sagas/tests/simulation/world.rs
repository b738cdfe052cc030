//! One run of the simulation: the actors, the seeded scheduler that picks which of them moves
//! next, the simulated clock, and the faults.
//!
//! What runs is production code wherever it can run under this scheduler:
//!
//! - the command handler ([`CommandHandler::execute`]) for customers placing and cancelling
//!   orders and for the payment provider's answers ([`sagas::payments::settle`]);
//! - the campaign writers ([`CampaignWriter::decide_batch`]): the batch decisions with
//!   [`domain::saga::advance`], their holdings and stock caches, transfers between buckets,
//!   and their reloads after conflicts;
//! - the memory event log, the memory deadlines, and the projections
//!   ([`ProjectionConsumer`] into [`MemoryProjections`]), and at the end the audit.
//!
//! Re-implemented here, as thin drivers around that code, because in production they spawn
//! tasks or read the wall clock: the saga's glue of `OrderSaga::advance_all` (group the
//! triggers by order and by campaign, hand them to the writers, ask for payments, schedule and
//! clear deadlines), the subscription runtime's delivery loop (its duplicate and gap checks,
//! ack and redelivery), the relay (publishing the log in order, in messages of a few events),
//! the deadline worker's poll, and the payment provider.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use chrono::TimeZone;
use commands::handler::{Context, Executed, HandlerOptions};
use commands::log::memory::MemoryEventLog;
use commands::subscription::{Dedupe, Handler, Seen};
use commands::{stream_id, CommandError, CommandHandler, EventLog, LogCursor};
use domain::campaign::{CampaignAggregate, CampaignCommand, NewCampaign};
use domain::order::{CancelReason, OrderAggregate, OrderCommand};
use domain::store::Store;
use domain::{Aggregate, CampaignId, Cents, OrderId, PaymentId, StoreId, Timestamp, UserId};
use projections::{MemoryProjections, ProjectionConsumer, ProjectionName, ReadModel};
use sagas::campaign_writer::{
    load_orders, CampaignWriter, OrderState, WakeUp, Woken, WriterOptions,
};
use sagas::deadlines::{Deadlines, MemoryDeadlines, CLAIM, CLAIM_BATCH};
use sagas::order_saga::OrderSaga;
use sagas::payments::{settle, Outcome};
use schemas::{Envelope, Metadata};
use ulid::Ulid;

use crate::executor::{run_step, runtime};
use crate::faults::{FaultyLog, LogFaults, Plant, SimRng};
use crate::invariants::Model;

/// Steps of a run kept for the report of a failure, unless `GROUPBUY_SIM_TRACE_STEPS` says.
const TRACE_STEPS_MAX: usize = 40;

/// Rounds of the quiet phase before a run that will not settle counts as stuck.
const QUIET_ROUNDS_MAX: u32 = 50;

/// Deliveries to the projections in one quiet round.
const QUIET_DELIVERIES_MAX: usize = 10_000;

/// Steps between comparisons of the read model with a fresh fold of the log (when the
/// projections have caught up): the audit replays the whole log, so not after every step.
const READ_MODEL_CHECK_EVERY_STEPS: u32 = 8;

/// Await points a crash is picked among: a writer's batch that reloads after conflicts has a
/// dozen or so (two per log call), a command a handful.
const CRASH_POINTS_MAX: u64 = 16;

/// The price of a unit in every campaign.
const PRICE_CENTS: u64 = 1_250;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The seed: every choice of the run follows from it.
    pub seed: u64,
    /// Steps before the quiet phase.
    pub steps: u32,
    /// A bug to plant, if any.
    pub plant: Plant,
}

/// A run that kept every invariant.
#[derive(Debug, PartialEq, Eq)]
pub struct Passed {
    /// Events in the log at the end.
    pub events: u64,
    /// Orders placed.
    pub orders: usize,
    /// A digest of every step taken, to tell two runs of one seed apart.
    pub digest: u64,
}

/// A run that broke an invariant (or panicked).
#[derive(Debug)]
pub struct Failure {
    /// At which step (the quiet phase counts on after the last one).
    pub step: u32,
    /// What broke.
    pub what: String,
    /// What the seed made of the world.
    pub world: String,
    /// The last steps, oldest first.
    pub trace: Vec<String>,
}

/// The steps taken so far, shared with the runner so that a panic still has them.
#[derive(Default)]
pub struct Trace {
    /// What the seed made of the world: instances, campaigns, fault rates.
    pub world: String,
    /// The last steps.
    pub last: VecDeque<String>,
    /// The step being taken.
    pub step: u32,
    digest: std::collections::hash_map::DefaultHasher,
}

impl Trace {
    fn push(&mut self, line: String) {
        line.hash(&mut self.digest);
        let kept = std::env::var("GROUPBUY_SIM_TRACE_STEPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(TRACE_STEPS_MAX);
        if self.last.len() >= kept {
            self.last.pop_front();
        }
        self.last.push_back(format!("#{} {line}", self.step));
    }
}

/// How often each fault strikes in this run, chosen by the seed.
#[derive(Clone, Copy, Debug, Default)]
struct Rates {
    /// An actor crashes at one of its await points.
    crash: f64,
    /// A delivered message is delivered again.
    duplicate: f64,
    /// A delivery takes some message other than the oldest.
    reorder: f64,
    /// The relay publishes and dies before recording how far it got.
    relay_crash: f64,
    /// The clock jumps forward.
    clock_jump: f64,
    /// A payment is refused.
    payment_fails: f64,
    /// A payment is never answered.
    payment_never: f64,
    /// A payment is answered late (around its deadline).
    payment_late: f64,
    /// A payment is answered twice.
    payment_twice: f64,
    /// A payment is answered, then contradicted.
    payment_contrary: f64,
}

impl Rates {
    fn of(rng: &mut SimRng) -> Rates {
        Rates {
            crash: rng.rate(0.25),
            duplicate: rng.rate(0.3),
            reorder: rng.rate(0.5),
            relay_crash: rng.rate(0.2),
            clock_jump: rng.rate(0.05),
            payment_fails: rng.rate(0.5),
            payment_never: rng.rate(0.3),
            payment_late: rng.rate(0.4),
            payment_twice: rng.rate(0.3),
            payment_contrary: rng.rate(0.2),
        }
    }
}

/// A campaign on sale.
#[derive(Clone, Copy, Debug)]
struct Terms {
    campaign_id: CampaignId,
    per_user_limit: u32,
}

/// One instance's saga: its command handler and its campaign writers, all lost in a crash.
struct SagaInstance {
    handler: CommandHandler,
    instance: u64,
    writers: BTreeMap<CampaignId, CampaignWriter>,
}

/// An answer the payment provider will give.
#[derive(Clone, Debug)]
struct Answer {
    due: Timestamp,
    payment_id: PaymentId,
    outcome: Outcome,
    reference: String,
}

/// What woke the saga for one order.
struct Trigger {
    order_id: OrderId,
    placed: Option<OrderState>,
}

/// A place order request that may have been stored (the reply was lost), to send again.
#[derive(Clone, Copy)]
struct PlaceRequest {
    command_id: Ulid,
    order_id: OrderId,
    user_id: UserId,
    campaign_id: CampaignId,
    quantity: u32,
    at: Timestamp,
}

/// Everything of one run.
pub struct World {
    runtime: tokio::runtime::Runtime,
    rng: SimRng,
    rates: Rates,
    now: Timestamp,
    inner: Arc<MemoryEventLog>,
    log: Arc<dyn EventLog>,
    /// The same log as the saga instances see it.
    saga_log: Arc<dyn EventLog>,
    faults: Arc<Mutex<LogFaults>>,
    campaigns: Vec<Terms>,
    users: Vec<UserId>,
    orders_max: usize,
    /// The customers' side: orders the gateway answered as placed, and requests to re-send.
    gateway: CommandHandler,
    accepted: Vec<OrderId>,
    resend: Vec<PlaceRequest>,
    placed: usize,
    sagas: Vec<SagaInstance>,
    writer_options: WriterOptions,
    handler_options: HandlerOptions,
    deadlines: Arc<MemoryDeadlines>,
    provider: CommandHandler,
    asked: BTreeSet<PaymentId>,
    answers: Vec<Answer>,
    relay_cursor: LogCursor,
    saga_queue: Vec<Vec<Envelope>>,
    projection_queues: Vec<Vec<Vec<Envelope>>>,
    store: Arc<MemoryProjections>,
    consumers: Vec<ProjectionConsumer>,
    model: Model,
    trace: Arc<Mutex<Trace>>,
}

impl World {
    /// A world for `config`, its campaigns created.
    pub fn new(config: &Config, trace: Arc<Mutex<Trace>>) -> Result<World, String> {
        let mut rng = SimRng::new(config.seed);
        let rates = Rates::of(&mut rng);
        let faults = Arc::new(Mutex::new(LogFaults::new(config.seed, config.plant)));
        {
            let mut faults = faults.lock().unwrap_or_else(|p| p.into_inner());
            faults.refuse_append = rng.rate(0.15);
            faults.lose_reply = rng.rate(0.1);
            faults.fail_read = rng.rate(0.05);
        }
        let inner = Arc::new(MemoryEventLog::new());
        let log: Arc<dyn EventLog> = Arc::new(FaultyLog::new(inner.clone(), faults.clone(), true));
        let saga_log: Arc<dyn EventLog> =
            Arc::new(FaultyLog::new(inner.clone(), faults.clone(), true));
        let now = chrono::Utc
            .with_ymd_and_hms(2020, 1, 1, 12, 0, 0)
            .single()
            .ok_or("the epoch")?;
        let users = (0..rng.between(2, 6))
            .map(|_| UserId::from_ulid(Ulid(rng.bits())))
            .collect();
        let handler_options = HandlerOptions {
            // Snapshots are saved by a task the runtime runs between steps; often, so that
            // loads from them are exercised.
            snapshot_every_events: rng.between(2, 40),
            ..HandlerOptions::default()
        };
        let instances = rng.between(1, 2);
        let sagas = (0..instances)
            .map(|_| SagaInstance::new(&saga_log, &handler_options, rng.bits() as u64))
            .collect();
        let writer_options = WriterOptions {
            holdings_cached_max: rng.between(1, 8) as usize,
            // The default attempts (8): with two or fewer, a batch whose trigger brings a stale
            // order and whose writer has a stale bucket spends one attempt on each and gives
            // up, every time it is delivered (seed 1445 with 2), because a writer reloads what
            // conflicted only before its next attempt, and there is none after the last.
            ..WriterOptions::default()
        };
        let store = Arc::new(MemoryProjections::new());
        let consumers = ProjectionName::ALL
            .iter()
            .map(|&name| ProjectionConsumer::new(name, store.clone()))
            .collect();
        let mut world = World {
            runtime: runtime(),
            orders_max: rng.between(4, 24) as usize,
            rng,
            rates,
            now,
            gateway: CommandHandler::new(log.clone(), handler_options.clone()),
            provider: CommandHandler::new(log.clone(), handler_options.clone()),
            inner,
            log,
            saga_log,
            faults,
            campaigns: Vec::new(),
            users,
            accepted: Vec::new(),
            resend: Vec::new(),
            placed: 0,
            sagas,
            writer_options,
            handler_options,
            deadlines: Arc::new(MemoryDeadlines::new()),
            asked: BTreeSet::new(),
            answers: Vec::new(),
            relay_cursor: LogCursor::default(),
            saga_queue: Vec::new(),
            projection_queues: vec![Vec::new(); ProjectionName::ALL.len()],
            store,
            consumers,
            model: Model::default(),
            trace,
        };
        let mut buckets = Vec::new();
        for _ in 0..world.rng.between(1, 2) {
            buckets.push(world.create_campaign()?);
        }
        let described =
            format!(
            "{} saga instance(s), campaigns with {buckets:?} bucket(s), {} customers, up to {} \
             orders, {:?}, {:?}",
            world.sagas.len(),
            world.users.len(),
            world.orders_max,
            world.rates,
            world.faults.lock().unwrap_or_else(|p| p.into_inner()).rates(),
        );
        world.trace().world = described;
        Ok(world)
    }

    /// Creates a campaign, fault-free: the run is about what follows.
    fn create_campaign(&mut self) -> Result<u32, String> {
        let campaign_id = CampaignId::from_ulid(Ulid(self.rng.bits()));
        let per_user_limit = self.rng.between(1, 4) as u32;
        let stock_buckets = self.rng.between(1, 3) as u32;
        let new = NewCampaign {
            campaign_id,
            store: Some(Store {
                store_id: StoreId::from_ulid(Ulid(self.rng.bits())),
                name: "Simulated".into(),
                region: "sim".into(),
                created_at: self.now,
            }),
            sku: "sim-drink".into(),
            title: "A simulated sale".into(),
            price_cents: PRICE_CENTS,
            quota: self.rng.between(2, 24) as u32,
            per_user_limit,
            starts_at: self.now - chrono::Duration::hours(1),
            // Some sales end during the run: later orders are rejected as not open.
            ends_at: self.now + chrono::Duration::seconds(self.rng.between(120, 7_200) as i64),
            payment_timeout_seconds: self.rng.between(10, 120) as u32,
            stock_buckets,
            now: self.now,
        };
        let handler = CommandHandler::new(self.inner.clone(), self.handler_options.clone());
        let context = Context {
            metadata: Metadata::default(),
            command_id: Ulid(self.rng.bits()),
            idempotency: None,
            new_stream: true,
        };
        let stream = stream_id::<CampaignAggregate>(campaign_id);
        let created = run_step(
            &self.runtime,
            handler.execute::<CampaignAggregate>(&stream, &CampaignCommand::Create(new), &context),
            None,
        )
        .ok_or("creating a campaign crashed")?;
        created.map_err(|e| format!("creating a campaign: {e}"))?;
        self.campaigns.push(Terms {
            campaign_id,
            per_user_limit,
        });
        Ok(stock_buckets)
    }

    /// Runs the steps, then the quiet phase, checking the invariants after every step.
    pub fn run(mut self, steps: u32) -> Result<Passed, Failure> {
        for step in 0..steps {
            self.trace().step = step;
            let line = self.step();
            let line = self.with_conflicts(line);
            self.trace().push(line);
            self.check(step)?;
        }
        self.quiet(steps)?;
        let digest = self.trace().digest.finish();
        Ok(Passed {
            events: self.model.events,
            orders: self.placed,
            digest,
        })
    }

    /// A step's line with the conflicts its appends met.
    fn with_conflicts(&self, line: String) -> String {
        let conflicts = std::mem::take(
            &mut self
                .faults
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .conflicts,
        );
        if conflicts.is_empty() {
            return line;
        }
        format!("{line} (conflicts: {})", conflicts.join("; "))
    }

    fn trace(&self) -> std::sync::MutexGuard<'_, Trace> {
        self.trace.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, step: u32, what: String) -> Failure {
        let mut trace: Vec<String> = self.trace().last.iter().cloned().collect();
        if std::env::var_os("GROUPBUY_SIM_LOG").is_some() {
            trace.extend(self.dump_log());
        }
        let world = self.trace().world.clone();
        Failure {
            step,
            what,
            world,
            trace,
        }
    }

    /// Every event of the log, one a line, for a replay with `GROUPBUY_SIM_LOG` set.
    fn dump_log(&self) -> Vec<String> {
        let events = run_step(
            &self.runtime,
            self.inner.read_all(LogCursor::default(), usize::MAX),
            None,
        );
        let Some(Ok(events)) = events else {
            return vec!["the log could not be read".into()];
        };
        events
            .iter()
            .map(|e| {
                let e = &e.envelope;
                format!(
                    "log {} {} v{} {} {}",
                    e.global_position, e.stream_id, e.stream_version, e.event_type, e.data
                )
            })
            .collect()
    }

    /// Folds what the step appended and checks every invariant.
    fn check(&mut self, step: u32) -> Result<(), Failure> {
        let folded = run_step(&self.runtime, self.model.catch_up(&self.inner), None)
            .unwrap_or_else(|| Err("the model crashed".into()));
        let checked = folded.and_then(|()| self.model.check());
        let lost = self
            .accepted
            .iter()
            .find(|id| self.model.order(**id).is_none());
        match (checked, lost) {
            (Err(what), _) => return Err(self.fail(step, what)),
            (Ok(()), Some(id)) => {
                return Err(self.fail(step, format!("order {id} accepted but lost")))
            }
            (Ok(()), None) => {}
        }
        if step % READ_MODEL_CHECK_EVERY_STEPS == 0 && self.projections_caught_up() {
            self.check_read_model(step)?;
        }
        Ok(())
    }

    /// Whether the projections have applied every event of the log: nothing unpublished,
    /// nothing undelivered.
    fn projections_caught_up(&self) -> bool {
        let unpublished = run_step(
            &self.runtime,
            self.inner.read_all(self.relay_cursor, 1),
            None,
        )
        .is_none_or(|read| read.map_or(true, |events| !events.is_empty()));
        !unpublished && self.projection_queues.iter().all(Vec::is_empty)
    }

    /// The read model equals a fresh fold of the log: the audit's comparison, whose other
    /// findings (orders a saga is still moving on) count only once the run is quiet.
    fn check_read_model(&self, step: u32) -> Result<(), Failure> {
        let report = self.audit(step)?;
        let mismatches: Vec<String> = report
            .violations
            .iter()
            .filter(|v| v.kind == "read_model_mismatch")
            .take(3)
            .map(|v| format!("{} in {}: {}", v.kind, v.stream_id, v.detail))
            .collect();
        if mismatches.is_empty() {
            return Ok(());
        }
        Err(self.fail(
            step,
            format!(
                "the read model differs from the log: {}",
                mismatches.join("; ")
            ),
        ))
    }

    fn audit(&self, step: u32) -> Result<projections::audit::AuditReport, Failure> {
        let read_model: &dyn ReadModel = self.store.as_ref();
        run_step(
            &self.runtime,
            projections::audit::audit(
                self.inner.as_ref(),
                Some(read_model),
                &projections::audit::AuditOptions::default(),
                &|_| {},
            ),
            None,
        )
        .ok_or_else(|| self.fail(step, "the audit crashed".into()))?
        .map_err(|e| self.fail(step, format!("the audit failed: {e}")))
    }

    /// One step: the clock moves, then one actor, picked by the seed.
    fn step(&mut self) -> String {
        self.now += chrono::Duration::milliseconds(self.rng.between(0, 1_500) as i64);
        if self.rng.chance(self.rates.clock_jump) {
            let jump = self.rng.between(20, 400);
            self.now += chrono::Duration::seconds(jump as i64);
            return format!("clock jumps {jump} s");
        }
        match self.rng.below(100) {
            0..=14 => self.place(),
            15..=19 => self.cancel(),
            20..=34 => {
                let events = self.rng.between(1, 6) as usize;
                self.relay(events)
            }
            35..=54 => self.deliver_to_saga(),
            55..=69 => self.deliver_to_projection(),
            70..=84 => self.answer_payment(),
            85..=94 => self.fire_deadlines(),
            95..=96 => self.operate(),
            _ => "idle".into(),
        }
    }

    /// The await point at which the next step crashes, if it does: any of the first
    /// [`CRASH_POINTS_MAX`] (a step that ends before it does not crash).
    fn crash_point(&mut self) -> Option<u32> {
        self.rng
            .chance(self.rates.crash)
            .then(|| self.rng.between(1, CRASH_POINTS_MAX) as u32)
    }

    /// A customer places an order: sometimes over the limit, sometimes on a sale that ended
    /// or sold out; sometimes again, a request whose reply was lost.
    fn place(&mut self) -> String {
        let request = match self.resend.pop() {
            Some(request) if self.rng.chance(0.5) => request,
            other => {
                self.resend.extend(other);
                if self.placed >= self.orders_max {
                    return "no more orders".into();
                }
                self.placed += 1;
                let terms = self.campaigns[self.rng.below(self.campaigns.len())];
                PlaceRequest {
                    command_id: Ulid(self.rng.bits()),
                    order_id: OrderId::from_ulid(Ulid(self.rng.bits())),
                    user_id: self.users[self.rng.below(self.users.len())],
                    campaign_id: terms.campaign_id,
                    quantity: self.rng.between(1, u64::from(terms.per_user_limit) + 1) as u32,
                    at: self.now,
                }
            }
        };
        self.send_place(request)
    }

    /// Sends a place order request through the gateway's handler.
    fn send_place(&mut self, request: PlaceRequest) -> String {
        let command = OrderCommand::Place {
            order_id: request.order_id,
            user_id: request.user_id,
            campaign_id: request.campaign_id,
            quantity: request.quantity,
            unit_price_cents: Cents::new(PRICE_CENTS),
            now: request.at,
        };
        let context = Context {
            metadata: Metadata {
                actor: Some(format!("customer:{}", request.user_id)),
                ..Metadata::default()
            },
            command_id: request.command_id,
            idempotency: None,
            new_stream: true,
        };
        let outcome = self.gateway_executes::<OrderAggregate>(
            &stream_id::<OrderAggregate>(request.order_id),
            &command,
            &context,
        );
        let what = format!(
            "place {} x{} by {}",
            request.order_id, request.quantity, request.user_id
        );
        match outcome {
            Some(Ok(_)) => {
                self.accepted.push(request.order_id);
                format!("{what}: accepted")
            }
            Some(Err(error)) => {
                self.resend.push(request);
                format!("{what}: {error}")
            }
            None => {
                self.resend.push(request);
                format!("{what}: the gateway crashed")
            }
        }
    }

    /// An operator replenishes a campaign, or (rarely) closes it: the writers of other
    /// buckets learn of it by reading the campaign's stream again.
    fn operate(&mut self) -> String {
        let terms = self.campaigns[self.rng.below(self.campaigns.len())];
        let command = if self.rng.chance(0.25) {
            CampaignCommand::Close { now: self.now }
        } else {
            CampaignCommand::Replenish {
                quantity: self.rng.between(1, 5) as u32,
                now: self.now,
            }
        };
        let context = self.command_by("operator");
        let outcome = self.gateway_executes::<CampaignAggregate>(
            &stream_id::<CampaignAggregate>(terms.campaign_id),
            &command,
            &context,
        );
        let what = format!("operator: {command:?} on {}", terms.campaign_id);
        match outcome {
            Some(Ok(_)) => format!("{what}: done"),
            Some(Err(error)) => format!("{what}: {error}"),
            None => format!("{what}: the gateway crashed"),
        }
    }

    /// The gateway's handler executes `command`, perhaps crashing at one of its await
    /// points: then `None`, and the gateway starts again with nothing in memory.
    fn gateway_executes<A: Aggregate>(
        &mut self,
        stream: &str,
        command: &A::Command,
        context: &Context<'_, A::State>,
    ) -> Option<Result<Executed<A>, CommandError>> {
        let crash = self.crash_point();
        let outcome = run_step(
            &self.runtime,
            self.gateway.execute::<A>(stream, command, context),
            crash,
        );
        if outcome.is_none() {
            self.gateway = CommandHandler::new(self.log.clone(), self.handler_options.clone());
        }
        outcome
    }

    /// A command's context: `actor` sends it, to a stream that exists, with a fresh id.
    fn command_by<S>(&mut self, actor: &str) -> Context<'static, S> {
        Context {
            metadata: Metadata {
                actor: Some(actor.into()),
                ..Metadata::default()
            },
            command_id: Ulid(self.rng.bits()),
            idempotency: None,
            new_stream: false,
        }
    }

    /// A customer cancels one of their orders.
    fn cancel(&mut self) -> String {
        if self.accepted.is_empty() {
            return "nothing to cancel".into();
        }
        let order_id = self.accepted[self.rng.below(self.accepted.len())];
        let command = OrderCommand::Cancel {
            reason: CancelReason::Customer,
            now: self.now,
        };
        let context = self.command_by("customer");
        let outcome = self.gateway_executes::<OrderAggregate>(
            &stream_id::<OrderAggregate>(order_id),
            &command,
            &context,
        );
        match outcome {
            Some(Ok(_)) => format!("cancel {order_id}: done"),
            Some(Err(error)) => format!("cancel {order_id}: {error}"),
            None => format!("cancel {order_id}: the gateway crashed"),
        }
    }

    /// The relay publishes the log's next events, in order, as one message to every
    /// consumer; it may die before recording how far it got, and publish them again.
    fn relay(&mut self, events: usize) -> String {
        let read = run_step(
            &self.runtime,
            self.inner.read_all(self.relay_cursor, events),
            None,
        );
        let batch = match read {
            Some(Ok(batch)) if !batch.is_empty() => batch,
            _ => return "relay: nothing new".into(),
        };
        let message: Vec<Envelope> = batch.iter().map(|e| e.envelope.clone()).collect();
        let last = batch.last().map(|e| e.cursor).unwrap_or(self.relay_cursor);
        let (first, end) = (
            message[0].global_position,
            message[message.len() - 1].global_position,
        );
        self.saga_queue.push(message.clone());
        for queue in &mut self.projection_queues {
            queue.push(message.clone());
        }
        if self.rng.chance(self.rates.relay_crash) {
            return format!("relay: published {first}..={end}, crashed before its checkpoint");
        }
        self.relay_cursor = last;
        format!("relay: published {first}..={end}")
    }

    /// Which queued message a consumer gets: the oldest, or (reordered) any.
    fn pick(&mut self, queued: usize) -> usize {
        if self.rng.chance(self.rates.reorder) {
            self.rng.below(queued)
        } else {
            0
        }
    }

    /// One saga instance takes one message.
    fn deliver_to_saga(&mut self) -> String {
        if self.saga_queue.is_empty() {
            return "saga: nothing to deliver".into();
        }
        let index = self.pick(self.saga_queue.len());
        let message = self.saga_queue[index].clone();
        let triggers = message.iter().filter_map(trigger_of).collect();
        let first = message[0].global_position;
        let instance = self.rng.below(self.sagas.len());
        let crash = self.crash_point();
        let what = format!("saga {instance}: message at {first}");
        match self.wake(instance, triggers, crash) {
            Ok(line) => {
                if self.rng.chance(self.rates.duplicate) {
                    return format!("{what}: {line}, delivered again later");
                }
                self.saga_queue.remove(index);
                format!("{what}: {line}")
            }
            Err(line) => format!("{what}: {line}, redelivered later"),
        }
    }

    /// Runs the saga's glue for `triggers` on instance `index`; a crash loses the instance's
    /// memory.
    fn wake(
        &mut self,
        index: usize,
        triggers: Vec<Trigger>,
        crash: Option<u32>,
    ) -> Result<String, String> {
        let now = self.now;
        let saga = &mut self.sagas[index];
        let outcome = run_step(
            &self.runtime,
            wake_saga(
                saga,
                &self.saga_log,
                self.deadlines.as_ref(),
                &self.writer_options,
                triggers,
                now,
            ),
            crash,
        );
        let Some((asked, result)) = outcome else {
            self.sagas[index] = SagaInstance::new(
                &self.saga_log,
                &self.handler_options,
                self.rng.bits() as u64,
            );
            return Err("crashed".into());
        };
        for (payment_id, _) in &asked {
            self.ask_provider(*payment_id);
        }
        result.map(|woken| format!("{woken} woken, {} payments asked", asked.len()))
    }

    /// The provider hears a request: it decides now when and what it will answer.
    fn ask_provider(&mut self, payment_id: PaymentId) {
        if !self.asked.insert(payment_id) || self.rng.chance(self.rates.payment_never) {
            return;
        }
        let outcome = if self.rng.chance(self.rates.payment_fails) {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        };
        let delay_s = if self.rng.chance(self.rates.payment_late) {
            self.rng.between(10, 240)
        } else {
            self.rng.between(0, 3)
        };
        let due = self.now + chrono::Duration::seconds(delay_s as i64);
        let answer = Answer {
            due,
            payment_id,
            outcome,
            reference: format!("sim-{payment_id}"),
        };
        if self.rng.chance(self.rates.payment_twice) {
            let again = self.rng.between(0, 120) as i64;
            self.answers.push(Answer {
                due: due + chrono::Duration::seconds(again),
                ..answer.clone()
            });
        }
        if self.rng.chance(self.rates.payment_contrary) {
            let later = self.rng.between(0, 120) as i64;
            self.answers.push(Answer {
                due: due + chrono::Duration::seconds(later),
                outcome: match outcome {
                    Outcome::Failed => Outcome::Succeeded,
                    Outcome::Succeeded => Outcome::Failed,
                },
                reference: format!("sim-{payment_id}-again"),
                payment_id,
            });
        }
        self.answers.push(answer);
    }

    /// One projection takes one message, as the subscription runtime hands it over: events
    /// it is done with are skipped, and a message with an event whose predecessor has not
    /// been applied waits for a redelivery.
    fn deliver_to_projection(&mut self) -> String {
        let queues: Vec<usize> = (0..self.projection_queues.len())
            .filter(|&i| !self.projection_queues[i].is_empty())
            .collect();
        if queues.is_empty() {
            return "projections: nothing to deliver".into();
        }
        let queue = queues[self.rng.below(queues.len())];
        let index = self.pick(self.projection_queues[queue].len());
        let message = self.projection_queues[queue][index].clone();
        let name = ProjectionName::ALL[queue];
        let crash = self.rng.chance(self.rates.crash);
        let consumer = &self.consumers[queue];
        let handled = run_step(&self.runtime, project(consumer, name, &message), None)
            .unwrap_or_else(|| Err("crashed".into()));
        let first = message[0].global_position;
        let what = format!("projection {name}: message at {first}");
        match handled {
            Ok(applied) if crash => {
                self.consumers[queue] = ProjectionConsumer::new(name, self.store.clone());
                format!("{what}: {applied} applied, crashed before its ack")
            }
            Ok(applied) => {
                if !self.rng.chance(self.rates.duplicate) {
                    self.projection_queues[queue].remove(index);
                }
                format!("{what}: {applied} applied")
            }
            Err(why) => format!("{what}: {why}"),
        }
    }

    /// The provider gives one answer that is due.
    fn answer_payment(&mut self) -> String {
        let due: Vec<usize> = (0..self.answers.len())
            .filter(|&i| self.answers[i].due <= self.now)
            .collect();
        if due.is_empty() {
            return "provider: nothing due".into();
        }
        let index = due[self.rng.below(due.len())];
        let crash = self.crash_point();
        self.answer(index, crash)
    }

    fn answer(&mut self, index: usize, crash: Option<u32>) -> String {
        let answer = self.answers[index].clone();
        let metadata = Metadata {
            actor: Some("payment_provider:simulation".into()),
            ..Metadata::default()
        };
        let outcome = run_step(
            &self.runtime,
            settle(
                &self.provider,
                answer.payment_id,
                answer.outcome,
                &answer.reference,
                metadata,
            ),
            crash,
        );
        let what = format!("provider: {:?} {}", answer.outcome, answer.payment_id);
        match outcome {
            Some(Ok(_)) => {
                self.answers.remove(index);
                format!("{what}: recorded")
            }
            Some(Err(CommandError::Domain(refused))) => {
                self.answers.remove(index);
                format!("{what}: refused ({refused})")
            }
            Some(Err(error)) => format!("{what}: {error}, sent again later"),
            None => {
                self.provider = CommandHandler::new(self.log.clone(), self.handler_options.clone());
                format!("{what}: crashed, sent again later")
            }
        }
    }

    /// The deadline worker's poll: claims what is due and wakes the saga for it.
    fn fire_deadlines(&mut self) -> String {
        let claimed = run_step(
            &self.runtime,
            self.deadlines.claim_due(self.now, CLAIM_BATCH),
            None,
        );
        let mut due = match claimed {
            Some(Ok(due)) if !due.is_empty() => due,
            _ => return "deadlines: none due".into(),
        };
        // The memory store hands them out in hash order; the simulation needs one order.
        due.sort();
        let count = due.len();
        let triggers = due
            .into_iter()
            .map(|order_id| Trigger {
                order_id,
                placed: None,
            })
            .collect();
        let instance = self.rng.below(self.sagas.len());
        let crash = self.crash_point();
        match self.wake(instance, triggers, crash) {
            Ok(line) => format!("deadlines: {count} due, saga {instance}: {line}"),
            Err(line) => format!("deadlines: {count} due, saga {instance}: {line}"),
        }
    }

    /// No more customers and no more faults: everything in flight is delivered, every answer
    /// given, the clock moved past every deadline, until nothing moves. Then every order
    /// must be final, and the audit (with the read model) must pass.
    fn quiet(&mut self, steps: u32) -> Result<(), Failure> {
        self.rates = Rates {
            payment_fails: self.rates.payment_fails,
            ..Rates::default()
        };
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).calm();
        let mut step = steps;
        for _ in 0..QUIET_ROUNDS_MAX {
            let before = (self.model.events, self.saga_queue.len(), self.answers.len());
            let mut lines = Vec::new();
            for request in std::mem::take(&mut self.resend) {
                lines.push(self.send_place(request));
            }
            while run_step(
                &self.runtime,
                self.inner.read_all(self.relay_cursor, 1),
                None,
            )
            .is_some_and(|r| r.is_ok_and(|b| !b.is_empty()))
            {
                lines.push(self.relay(64));
            }
            for _ in 0..self.saga_queue.len() {
                lines.push(self.deliver_to_saga());
            }
            // Bounded: a message that never applies leaves the round unsettled, reported below.
            for _ in 0..QUIET_DELIVERIES_MAX {
                if self.projection_queues.iter().all(Vec::is_empty) {
                    break;
                }
                lines.push(self.deliver_to_projection());
            }
            if let Some(latest) = self.answers.iter().map(|a| a.due).max() {
                self.now = self.now.max(latest);
            }
            while !self.answers.is_empty() {
                lines.push(self.answer(0, None));
            }
            self.now += chrono::Duration::from_std(CLAIM).unwrap_or_default()
                + chrono::Duration::seconds(300);
            lines.push(self.fire_deadlines());
            for line in lines {
                let line = self.with_conflicts(line);
                self.trace().step = step;
                self.trace().push(format!("quiet: {line}"));
            }
            self.check(step)?;
            step += 1;
            let after = (self.model.events, self.saga_queue.len(), self.answers.len());
            let caught_up = self.projection_queues.iter().all(Vec::is_empty)
                && self.saga_queue.is_empty()
                && self.answers.is_empty();
            if before == after && caught_up && self.model.open_orders() == 0 {
                return self.final_checks(step);
            }
        }
        Err(self.fail(
            step,
            format!(
                "did not settle in {QUIET_ROUNDS_MAX} quiet rounds: {} orders open",
                self.model.open_orders()
            ),
        ))
    }

    fn final_checks(&mut self, step: u32) -> Result<(), Failure> {
        self.model
            .check_quiet()
            .map_err(|what| self.fail(step, what))?;
        let report = self.audit(step)?;
        if !report.ok {
            let found: Vec<String> = report
                .violations
                .iter()
                .take(5)
                .map(|v| format!("{} in {}: {}", v.kind, v.stream_id, v.detail))
                .collect();
            return Err(self.fail(step, format!("the audit found: {}", found.join("; "))));
        }
        Ok(())
    }
}

impl SagaInstance {
    fn new(log: &Arc<dyn EventLog>, options: &HandlerOptions, instance: u64) -> SagaInstance {
        SagaInstance {
            handler: CommandHandler::new(log.clone(), options.clone()),
            instance,
            writers: BTreeMap::new(),
        }
    }
}

/// What an event wakes the saga for, as `OrderSaga` reads it: the order whole when the event
/// placed it.
fn trigger_of(event: &Envelope) -> Option<Trigger> {
    let order_id = OrderSaga::order_of(event)?;
    let placed = (event.event_type == "OrderPlaced" && event.stream_version == 1)
        .then(|| schemas::from_envelope(event).ok())
        .flatten()
        .and_then(|placed| {
            <OrderAggregate as domain::Aggregate>::evolve(None, &placed).map(OrderState::placed)
        });
    Some(Trigger { order_id, placed })
}

/// The saga's glue, as `OrderSaga::advance_all` does it: one wake-up per order, each
/// campaign's orders to its writer in one batch, then payments asked for, deadlines
/// scheduled and cleared. Returns the payments to ask for and how many orders woke.
async fn wake_saga(
    saga: &mut SagaInstance,
    log: &Arc<dyn EventLog>,
    deadlines: &MemoryDeadlines,
    options: &WriterOptions,
    triggers: Vec<Trigger>,
    now: Timestamp,
) -> (Vec<(PaymentId, Cents)>, Result<usize, String>) {
    let mut by_order: BTreeMap<OrderId, Option<OrderState>> = BTreeMap::new();
    for trigger in triggers {
        let known = by_order.entry(trigger.order_id).or_default();
        if known.is_none() {
            *known = trigger.placed;
        }
    }
    let unread: Vec<OrderId> = by_order
        .iter()
        .filter(|(_, placed)| placed.is_none())
        .map(|(id, _)| *id)
        .collect();
    let mut read = match load_orders(log.as_ref(), &unread).await {
        Ok(read) => read,
        Err(error) => return (Vec::new(), Err(format!("loading orders: {error}"))),
    };
    let mut by_campaign: BTreeMap<CampaignId, Vec<WakeUp>> = BTreeMap::new();
    for (order_id, placed) in by_order {
        let state = placed.unwrap_or_else(|| read.remove(&order_id).unwrap_or_default());
        let Some(campaign_id) = state.order.as_ref().map(|o| o.campaign_id) else {
            continue;
        };
        by_campaign.entry(campaign_id).or_default().push(WakeUp {
            order_id,
            state,
            cause: Metadata::default(),
            caused_at: None,
        });
    }
    let clock = move || now;
    let (mut due, mut done, mut asked) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_error = None;
    let mut woken = 0;
    for (campaign_id, mut wake_ups) in by_campaign {
        let writer = saga.writers.entry(campaign_id).or_insert_with(|| {
            CampaignWriter::detached(
                saga.handler.clone(),
                campaign_id,
                options.clone(),
                saga.instance,
            )
        });
        let outcomes = writer.decide_batch(&mut wake_ups, &clock).await;
        for (wake_up, outcome) in wake_ups.iter().zip(outcomes) {
            match outcome {
                Ok(Woken::Unknown) => {}
                Ok(Woken::Done) => done.push(wake_up.order_id),
                Ok(Woken::Waiting { deadline, pending }) => {
                    due.push((wake_up.order_id, deadline));
                    asked.extend(pending);
                }
                Err(error) => {
                    first_error.get_or_insert(error.to_string());
                }
            }
            woken += 1;
        }
    }
    let scheduled = async {
        deadlines
            .schedule_many(&due)
            .await
            .map_err(|e| e.to_string())?;
        deadlines.clear_many(&done).await.map_err(|e| e.to_string())
    }
    .await;
    let result = match (first_error, scheduled) {
        (Some(error), _) | (None, Err(error)) => Err(error),
        (None, Ok(())) => Ok(woken),
    };
    (asked, result)
}

/// A projection takes a message as the subscription runtime hands it over; how many events
/// it applied, or why the message waits for a redelivery.
async fn project(
    consumer: &ProjectionConsumer,
    name: ProjectionName,
    message: &[Envelope],
) -> Result<usize, String> {
    let consumer_name = consumer.consumer_name();
    let mut fresh: Vec<Envelope> = Vec::new();
    let mut taken: BTreeMap<&str, u64> = BTreeMap::new();
    for event in message.iter().filter(|e| consumer.wants(&e.head())) {
        let seen = match taken.get(event.stream_id.as_str()) {
            Some(&done_to) if event.stream_version <= done_to => Seen::Done,
            Some(&done_to) if event.stream_version == done_to + 1 => Seen::New,
            Some(&done_to) => Seen::Early { done_to },
            None => consumer
                .seen(&consumer_name, event)
                .await
                .map_err(|e| e.to_string())?,
        };
        match seen {
            Seen::Done => continue,
            Seen::New => {}
            Seen::Early { done_to } => {
                return Err(format!(
                    "{} v{} early (done to {done_to}), redelivered later",
                    event.stream_id, event.stream_version
                ))
            }
        }
        taken.insert(&event.stream_id, event.stream_version);
        fresh.push(event.clone());
    }
    if fresh.is_empty() {
        return Ok(0);
    }
    consumer
        .handle_batch(&fresh.iter().collect::<Vec<_>>())
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    let done: Vec<&Envelope> = fresh.iter().collect();
    consumer
        .record_all(&consumer_name, &done)
        .await
        .map_err(|e| e.to_string())?;
    Ok(fresh.len())
}
