//! Building and running the application: storage, mirror, read models and their consumers,
//! the saga, the router.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use commands::bus::jetstream::{JetStreamBus, JetStreamSettings};
use commands::bus::memory::MemoryBus;
use commands::bus::{Bus, BusError};
use commands::group_commit::{GroupCommit, GroupCommitOptions};
use commands::handler::HandlerOptions;
use commands::lease::PgPartitionLeases;
use commands::log::memory::MemoryEventLog;
use commands::log::postgres::{PgEventLog, PgLogOptions};
use commands::relay::postgres::PgRelayLeases;
use commands::relay::{MemoryRelayLeases, Relay, RelayLeases, RelayOptions};
use commands::subscription::{
    Handler, Ordering, RecentEventIds, Subscription, SubscriptionOptions,
};
use commands::{CommandHandler, EventLog, LogError};
use projections::read_model::ReadModelError;
use projections::rebuild::RebuildOptions;
use projections::{
    MemoryProjections, ProjectionConsumer, ProjectionName, ProjectionStore, RedisProjections,
    VersionStatus,
};
use sagas::deadlines::{Deadlines, MemoryDeadlines, PgDeadlines};
use sagas::order_saga::OrderSaga;
use sagas::payments::{External, PaymentProvider, Simulated};
use sagas::sweeper::{Sweep, Sweeper};
use sqlx::postgres::PgConnectOptions;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::extract::BODY_BYTES_MAX;
use crate::overload::{self, Limits, Overload};
use crate::roles::{Role, Roles};
use crate::routes::dead_letters::{self, Consumers};
use crate::routes::{admin, campaigns, health, history, orders, payments, sales, stores, users};
use crate::state::{AppState, Shared};

/// Where events are stored.
#[derive(Clone, Debug)]
pub enum Storage {
    /// In process memory: volatile, for demos and tests.
    Embedded,
    /// PostgreSQL at this URL.
    Postgres {
        /// Connection URL.
        url: String,
        /// Pool settings.
        options: PgLogOptions,
    },
}

/// Where the log is mirrored for sagas and projections.
#[derive(Clone, Debug)]
pub enum Mirror {
    /// An in-process bus: volatile, one instance only.
    Embedded,
    /// NATS JetStream.
    JetStream(JetStreamSettings),
}

/// Where the read models live.
#[derive(Clone, Debug)]
pub enum ReadModels {
    /// In this instance's memory: built from the log at start, then kept up from the mirror.
    Embedded,
    /// Redis, shared by every instance.
    Redis {
        /// Connection URL.
        url: String,
        /// First part of every key, so deployments (and tests) can share one Redis.
        prefix: String,
    },
}

/// Which payment provider the saga asks.
#[derive(Clone, Debug)]
pub enum Payments {
    /// Answers by itself after `delay`, failing a `failure_rate` share: for demos and tests.
    Simulated {
        /// How long it takes to answer.
        delay: Duration,
        /// The share of payments it fails, 0 to 1.
        failure_rate: f64,
    },
    /// A real provider, answering through the signed webhook.
    External,
}

/// Everything the application needs to start.
#[derive(Clone)]
pub struct Settings {
    /// What this process runs; apart from all of them, only on the shared services.
    pub roles: Roles,
    /// Where to listen; port 0 picks a free one.
    pub http_addr: SocketAddr,
    /// The operator's bearer token.
    pub operator_token: String,
    /// Key customer tokens are derived with.
    pub token_secret: Vec<u8>,
    /// Where events are stored.
    pub storage: Storage,
    /// How concurrent appends are gathered into transactions.
    pub group_commit: GroupCommitOptions,
    /// How the relay mirrors the log.
    pub relay: RelayOptions,
    /// Where the log is mirrored.
    pub mirror: Mirror,
    /// Where the read models live.
    pub read_models: ReadModels,
    /// How operator rebuilds of read models run.
    pub rebuild: RebuildOptions,
    /// How often the instance looks for read models with no live version (a flushed or
    /// restarted Redis) and rebuilds them itself, one instance at a time under the rebuild's
    /// lease; `None`: only at start-up, and then by the operator.
    pub heal_read_models_every: Option<Duration>,
    /// How the sweeper looks for orders that wait past a bound and wakes the saga for them;
    /// `None`: no sweeper.
    pub sweep: Option<Sweep>,
    /// The payment provider.
    pub payments: Payments,
    /// The key payment webhooks are signed with.
    pub webhook_secret: Vec<u8>,
    /// How long queries wait to read the caller's own writes.
    pub read_your_writes_timeout: Duration,
    /// Load shedding and request timeouts.
    pub limits: Limits,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets stay out of debug output, and so out of logs.
        f.debug_struct("Settings")
            .field("http_addr", &self.http_addr)
            .field("operator_token", &"<redacted>")
            .field("token_secret", &"<redacted>")
            .field("webhook_secret", &"<redacted>")
            .field("payments", &self.payments)
            .field(
                "storage",
                &matches!(self.storage, Storage::Postgres { .. })
                    .then_some("postgres")
                    .unwrap_or("embedded"),
            )
            .field(
                "mirror",
                &matches!(self.mirror, Mirror::JetStream(_))
                    .then_some("jetstream")
                    .unwrap_or("embedded"),
            )
            .field(
                "read_models",
                &matches!(self.read_models, ReadModels::Redis { .. })
                    .then_some("redis")
                    .unwrap_or("embedded"),
            )
            .finish()
    }
}

/// Starting the application failed.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The event log could not be reached.
    #[error("event log: {0}")]
    Log(#[from] LogError),
    /// The database schema could not be brought up to date.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The bus could not be reached.
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    /// The configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
    /// The read models could not be reached.
    #[error("read models: {0}")]
    ReadModels(#[from] ReadModelError),
}

/// A built application, bound to its port, not yet serving.
pub struct Application {
    roles: Roles,
    listener: TcpListener,
    state: AppState,
    relay: Relay,
    /// Each projection's subscription, with its consumer's name.
    projectors: Vec<(String, Subscription)>,
    saga: Subscription,
    consumption: Consumption,
    deadlines: Arc<dyn Deadlines>,
    order_saga: Arc<OrderSaga>,
    limits: Limits,
    heal_read_models_every: Option<Duration>,
    sweep: Option<Sweep>,
    rebuild: RebuildOptions,
}

/// The event log and the stores that live beside it.
pub struct Opened {
    /// The log.
    pub log: Arc<dyn EventLog>,
    /// Where relays take their lease.
    pub leases: Arc<dyn RelayLeases>,
    /// The saga's payment deadlines.
    pub deadlines: Arc<dyn Deadlines>,
    /// Where instances lease the partitions of shared consumers: the log's database, or
    /// `None` for the embedded log, whose one process consumes every partition.
    pub partition_leases: Option<PgConnectOptions>,
}

/// Connects (and migrates) the configured event log, with the stores that go with it. Its
/// appends are group-committed: concurrent appends share a transaction.
pub async fn open_log(
    storage: &Storage,
    group_commit: &GroupCommitOptions,
) -> Result<Opened, StartupError> {
    let group_committed = |log: Arc<dyn EventLog>| -> Arc<dyn EventLog> {
        Arc::new(GroupCommit::new(log, group_commit.clone()))
    };
    Ok(match storage {
        Storage::Embedded => Opened {
            log: group_committed(Arc::new(MemoryEventLog::new())),
            leases: Arc::new(MemoryRelayLeases::new()),
            deadlines: Arc::new(MemoryDeadlines::new()),
            partition_leases: None,
        },
        Storage::Postgres { url, options } => {
            let log = PgEventLog::connect(url, options).await?;
            log.migrate().await?;
            let leases = PgRelayLeases::new((*log.pool().connect_options()).clone(), "events");
            let deadlines = PgDeadlines::new(log.pool().clone());
            Opened {
                partition_leases: Some((*log.pool().connect_options()).clone()),
                log: group_committed(Arc::new(log)),
                leases: Arc::new(leases),
                deadlines: Arc::new(deadlines),
            }
        }
    })
}

/// Connects the configured read-model store. Embedded stores start with no versions: the
/// application builds them from the log before it serves.
pub async fn open_read_models(
    read_models: &ReadModels,
) -> Result<Arc<dyn ProjectionStore>, StartupError> {
    Ok(match read_models {
        ReadModels::Embedded => Arc::new(MemoryProjections::unbuilt()),
        ReadModels::Redis { url, prefix } => {
            Arc::new(RedisProjections::connect(url, prefix).await?)
        }
    })
}

/// Whether each process needs projection consumers of its own: read models in memory are one
/// process's own, so on a shared mirror each process consumes every event into its own, with a
/// consumer that goes away once the process does.
fn own_projection_consumers(read_models: &ReadModels, mirror: &Mirror) -> bool {
    matches!(read_models, ReadModels::Embedded) && matches!(mirror, Mirror::JetStream(_))
}

/// How this process's subscriptions consume the bus.
struct Consumption {
    /// Where shared consumers lease their partitions; `None`: this process consumes them all.
    partition_leases: Option<PgConnectOptions>,
    /// How many partitions the bus publishes in.
    partitions: u16,
    /// Whether the projections' consumers are this process's own (never shared).
    own_projection_consumers: bool,
}

impl Consumption {
    /// Runs `subscription` of the consumer `name`, which instances share, until `stop`: over
    /// the partitions this instance leases, or over all of them when there are no leases (the
    /// embedded log).
    fn run_shared(
        &self,
        subscription: Subscription,
        name: &str,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        match &self.partition_leases {
            Some(connect) => {
                let leases = PgPartitionLeases::new(connect.clone(), name, self.partitions);
                tokio::spawn(subscription.run_partitioned(leases.start(), stop))
            }
            None => tokio::spawn(subscription.run(stop)),
        }
    }
}

/// The subscriptions feeding each projection of `store` from `bus`, with their consumers'
/// names.
fn projectors(
    bus: &Arc<dyn Bus>,
    store: &Arc<dyn ProjectionStore>,
    read_models: &ReadModels,
    mirror: &Mirror,
) -> Vec<(String, Subscription)> {
    let own_consumer = own_projection_consumers(read_models, mirror);
    ProjectionName::ALL
        .into_iter()
        .map(|name| {
            let consumer = Arc::new(ProjectionConsumer::new(name, Arc::clone(store)));
            let mut options = SubscriptionOptions::new(consumer.consumer_name());
            if own_consumer {
                options.consumer.name = format!("{}-{}", options.consumer.name, ulid::Ulid::new());
                options.consumer.inactive_threshold = Some(Duration::from_secs(600));
            }
            let name = consumer.consumer_name();
            let subscription =
                Subscription::new(Arc::clone(bus), options, consumer.clone(), consumer);
            (name, subscription)
        })
        .collect()
}

/// Builds, from the log, every projection that has no live version yet (a new deployment,
/// an embedded store, a flushed Redis), before the application serves.
async fn build_missing(
    log: &Arc<dyn EventLog>,
    store: &Arc<dyn ProjectionStore>,
    options: &RebuildOptions,
) -> Result<(), StartupError> {
    let versions = store.versions().await?;
    for name in ProjectionName::ALL {
        let live = versions
            .iter()
            .any(|v| v.name == name && v.status == VersionStatus::Live);
        if live {
            continue;
        }
        tracing::info!(projection = %name, "no live version of this read model: building it from the log");
        match projections::rebuild::rebuild(log.as_ref(), store.as_ref(), name, options, &|_| {})
            .await
        {
            Ok(_) => {}
            // Another instance is building it; its switch makes it live for everyone.
            Err(projections::RebuildError::Busy(_)) => {
                tracing::info!(projection = %name, "another instance is building this read model");
            }
            Err(projections::RebuildError::Store(error)) => return Err(error.into()),
            Err(projections::RebuildError::Log(error)) => return Err(error.into()),
            Err(error) => {
                tracing::warn!(projection = %name, %error, "could not build this read model; rebuild it");
            }
        }
    }
    Ok(())
}

/// Every `every`, until `stop`, builds the read models that lost their live version while the
/// instance served (Redis flushed, or restarted with nothing on disk), as at start-up: queries
/// answer 503 meanwhile, and the rebuild's lease keeps it to one instance at a time.
async fn heal_read_models(
    log: Arc<dyn EventLog>,
    store: Arc<dyn ProjectionStore>,
    options: RebuildOptions,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    commands::periodic::every(every, stop, || async {
        if let Err(error) = build_missing(&log, &store, &options).await {
            tracing::warn!(%error, "cannot tell whether the read models need a rebuild");
        }
    })
    .await;
}

/// Connects the configured mirror.
pub async fn open_bus(mirror: &Mirror) -> Result<Arc<dyn Bus>, StartupError> {
    Ok(match mirror {
        Mirror::Embedded => Arc::new(MemoryBus::new()),
        Mirror::JetStream(settings) => Arc::new(JetStreamBus::connect(settings.clone()).await?),
    })
}

impl Application {
    /// Opens storage, builds the read model and binds the listener.
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        let roles = settings.roles.clone();
        let embedded = matches!(settings.storage, Storage::Embedded)
            || matches!(settings.mirror, Mirror::Embedded)
            || matches!(settings.read_models, ReadModels::Embedded);
        if !roles.are_all() && embedded {
            return Err(StartupError::Config(format!(
                "--roles {roles}: a process that runs only some roles shares the others' work \
                 through the log, the bus and the read models, so it needs DATABASE_URL, \
                 NATS_URL and REDIS_URL; the embedded default runs every role in one process"
            )));
        }
        let Opened {
            log,
            leases,
            deadlines,
            partition_leases,
        } = open_log(&settings.storage, &settings.group_commit).await?;
        let bus = open_bus(&settings.mirror).await?;
        let bus_partitions = bus.partitions();
        // Refuses a mirror that holds another deployment's log, before anything is consumed.
        bus.bind_log(&log.identity().await?).await?;
        let relay = Relay::new(
            Arc::clone(&log),
            Arc::clone(&bus),
            leases,
            settings.relay.clone(),
        );
        let handler = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
        let provider: Arc<dyn PaymentProvider> = match settings.payments {
            Payments::Simulated {
                delay,
                failure_rate,
            } => Arc::new(Simulated::new(handler.clone(), delay, failure_rate)),
            Payments::External => Arc::new(External),
        };
        let order_saga = Arc::new(OrderSaga::new(
            handler.clone(),
            provider,
            Arc::clone(&deadlines),
        ));
        let saga = Subscription::new(
            Arc::clone(&bus),
            SubscriptionOptions {
                ordering: Ordering::Unordered,
                ..SubscriptionOptions::new("order-saga")
            },
            Arc::new(RecentEventIds::new(100_000)),
            order_saga.clone(),
        );
        crate::metrics::handle();
        let store = open_read_models(&settings.read_models).await?;
        if roles.runs(Role::Projections) {
            build_missing(&log, &store, &settings.rebuild).await?;
        }
        let projectors = projectors(&bus, &store, &settings.read_models, &settings.mirror);
        let consumers = std::iter::once((Role::Saga, "order-saga".to_owned(), saga.stats()))
            .chain(
                projectors
                    .iter()
                    .map(|(name, p)| (Role::Projections, name.clone(), p.stats())),
            )
            .filter(|(role, _, _)| roles.runs(*role))
            .map(|(_, name, stats)| (name, stats))
            .collect();
        // Any instance can hand a dead letter back to its consumer: the handlers work on the
        // deployment's shared log and read models.
        let dead_letter_consumers = Consumers::new(
            std::iter::once((
                "order-saga".to_owned(),
                order_saga.clone() as Arc<dyn Handler>,
            ))
            .chain(ProjectionName::ALL.into_iter().map(|name| {
                let consumer = ProjectionConsumer::new(name, Arc::clone(&store));
                (
                    consumer.consumer_name(),
                    Arc::new(consumer) as Arc<dyn Handler>,
                )
            }))
            .collect(),
        );
        let state = AppState::new(Shared {
            handler,
            read_model: store,
            rebuild: settings.rebuild.clone(),
            audits: Arc::new(tokio::sync::Semaphore::new(1)),
            auth: Auth::new(&settings.operator_token, settings.token_secret.clone()),
            customer_rate: crate::rate_limit::Limiter::new(crate::rate_limit::RateLimits {
                global: None,
                ..settings.limits.rate_limits
            }),
            consumers,
            recent_writes: Default::default(),
            prices: Default::default(),
            in_flight: Default::default(),
            read_your_writes_timeout: settings.read_your_writes_timeout,
            webhook_secret: settings.webhook_secret.clone(),
            bus,
            relay: relay.status(),
            roles: roles.clone(),
            dead_letter_consumers,
            closing: Arc::new(watch::channel(false).0),
        });
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.http_addr,
                source,
            })?;
        Ok(Application {
            roles,
            listener,
            state,
            relay,
            consumption: Consumption {
                partition_leases,
                partitions: bus_partitions,
                own_projection_consumers: own_projection_consumers(
                    &settings.read_models,
                    &settings.mirror,
                ),
            },
            projectors,
            saga,
            deadlines,
            order_saga,
            limits: settings.limits,
            heal_read_models_every: settings.heal_read_models_every,
            sweep: settings.sweep,
            rebuild: settings.rebuild,
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The relay's status: whether this instance publishes the log, and how far.
    pub fn relay_status(&self) -> watch::Receiver<commands::relay::RelayStatus> {
        self.relay.status()
    }

    /// The log's mirror (for tests that plant what a consumer would have given up on).
    pub fn bus(&self) -> Arc<dyn Bus> {
        Arc::clone(&self.state.bus)
    }

    /// Serves until `shutdown` resolves, then stops taking connections, lets requests in
    /// flight finish, and stops the projections, the relay, the saga and the deadline worker.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let wait_stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let runs = |role| self.roles.runs(role);
        let mut tasks = Vec::new();
        if runs(Role::Projections) {
            for (name, projector) in self.projectors {
                let stop = wait_stop(stopped.clone());
                tasks.push(if self.consumption.own_projection_consumers {
                    tokio::spawn(projector.run(stop))
                } else {
                    self.consumption.run_shared(projector, &name, stop)
                });
            }
            if let Some(every) = self.heal_read_models_every {
                tasks.push(tokio::spawn(heal_read_models(
                    Arc::clone(self.state.handler.log()),
                    Arc::clone(&self.state.read_model),
                    self.rebuild.clone(),
                    every,
                    wait_stop(stopped.clone()),
                )));
            }
        }
        if runs(Role::Relay) {
            tasks.push(tokio::spawn(self.relay.run(wait_stop(stopped.clone()))));
        }
        if runs(Role::Saga) {
            let stop = wait_stop(stopped.clone());
            tasks.push(self.consumption.run_shared(self.saga, "order-saga", stop));
        }
        if runs(Role::Deadlines) {
            let order_saga = self.order_saga;
            if let Some(sweep) = self.sweep {
                let read_model: Arc<dyn projections::ReadModel> = self.state.read_model.clone();
                let sweeper = Sweeper::new(
                    read_model,
                    Arc::clone(&self.deadlines),
                    Arc::clone(&order_saga),
                    sweep,
                );
                tasks.push(tokio::spawn(sweeper.run(wait_stop(stopped.clone()))));
            }
            tasks.push(tokio::spawn(sagas::deadlines::run(
                self.deadlines,
                move |order_ids| {
                    let order_saga = Arc::clone(&order_saga);
                    // Deadlines start a trace of their own; the steps they take continue it.
                    let span = tracing::info_span!("payment_deadlines", orders = order_ids.len());
                    let fired = async move {
                        if let Err(error) = order_saga.wake(&order_ids).await {
                            tracing::warn!(%error, "the saga could not act on due deadlines");
                        }
                    };
                    fired.instrument(span)
                },
                wait_stop(stopped.clone()),
            )));
        }
        if runs(Role::Gateway) {
            tasks.push(tokio::spawn(commands::idempotency::sweep_expired(
                Arc::clone(self.state.handler.log()),
                Default::default(),
                wait_stop(stopped.clone()),
            )));
        }
        tracing::info!(roles = %self.roles, "serving");
        let listener = crate::parse_errors::ProblemListener(self.listener);
        let closing = Arc::clone(&self.state.closing);
        let shutdown = async move {
            shutdown.await;
            closing.send_replace(true);
        };
        let app = router(self.state, self.limits, runs(Role::Gateway));
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        let _ = stop.send(true);
        for task in tasks {
            let _ = task.await;
        }
        served
    }
}

/// The HTTP routes of API.md, with the API itself only when the process runs the `gateway`
/// role (the probes, the metrics and the OpenAPI document always). The API routes are shed
/// and timed out under `limits`; the health probes are not, so an overloaded instance still
/// answers them.
pub fn router(state: AppState, limits: Limits, gateway: bool) -> Router {
    let api = Router::new()
        .route("/v1/users", post(users::create))
        .route("/v1/stores", post(stores::create))
        .route(
            "/v1/campaigns",
            post(campaigns::create).get(campaigns::list),
        )
        .route("/v1/campaigns/{id}", get(campaigns::get))
        .route("/v1/campaigns/{id}/replenish", post(campaigns::replenish))
        .route("/v1/campaigns/{id}/close", post(campaigns::close))
        .route("/v1/orders", post(orders::place).get(orders::list))
        .route("/v1/orders/{id}", get(orders::get))
        .route("/v1/orders/{id}/cancel", post(orders::cancel))
        .route("/v1/orders/{id}/events", get(orders::events))
        .route("/v1/payments/webhook", post(payments::webhook))
        .route("/v1/admin/projections", get(admin::projections))
        .route("/v1/admin/projections/{name}/rebuild", post(admin::rebuild))
        .route(
            "/v1/admin/streams/{stream_id}/events",
            get(history::stream_events),
        )
        .route("/v1/admin/orders/{id}/history", get(history::order_history))
        .route("/v1/admin/campaigns/{id}", get(history::campaign_as_of))
        .route("/v1/admin/campaigns/{id}/sale", get(sales::get))
        .route("/v1/admin/campaigns/{id}/sale/live", get(sales::live))
        .route("/v1/admin/relay", get(admin::relay))
        .route("/v1/admin/dead-letters", get(dead_letters::list))
        .route(
            "/v1/admin/dead-letters/{id}",
            get(dead_letters::show).delete(dead_letters::discard),
        )
        .route(
            "/v1/admin/dead-letters/{id}/replay",
            post(dead_letters::replay),
        )
        .layer(axum::middleware::from_fn_with_state(
            Overload::new(limits),
            overload::guard,
        ));
    let api = if gateway {
        api
            // Outside the request timeout: an audit replays the whole log. One at a time.
            .route("/v1/admin/audit", get(admin::audit))
            .merge(crate::console::routes())
    } else {
        Router::new()
    };
    Router::new()
        .merge(api)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/openapi.json", get(crate::openapi::document))
        .merge(crate::openapi::browser())
        .fallback(|| async {
            ApiError::NotFound {
                code: "route_not_found",
                what: "route",
            }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(axum::middleware::from_fn(crate::telemetry::traced))
        .with_state(state)
}
