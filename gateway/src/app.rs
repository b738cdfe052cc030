//! Building and running the application: storage, read model, projector, router.

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
use commands::handler::HandlerOptions;
use commands::log::memory::MemoryEventLog;
use commands::log::postgres::{PgEventLog, PgLogOptions};
use commands::relay::postgres::PgRelayLeases;
use commands::relay::{MemoryRelayLeases, Relay, RelayLeases, RelayOptions};
use commands::subscription::{Ordering, RecentEventIds, Subscription, SubscriptionOptions};
use commands::{CommandHandler, EventLog, LogCursor, LogError};
use projections::MemoryReadModel;
use sagas::deadlines::{Deadlines, MemoryDeadlines, PgDeadlines};
use sagas::order_saga::OrderSaga;
use sagas::payments::{External, PaymentProvider, Simulated};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower_http::trace::TraceLayer;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::extract::BODY_BYTES_MAX;
use crate::overload::{self, Limits, Overload};
use crate::routes::{campaigns, health, orders, payments, stores, users};
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
    /// Where to listen; port 0 picks a free one.
    pub http_addr: SocketAddr,
    /// The operator's bearer token.
    pub operator_token: String,
    /// Key customer tokens are derived with.
    pub token_secret: Vec<u8>,
    /// Where events are stored.
    pub storage: Storage,
    /// Where the log is mirrored.
    pub mirror: Mirror,
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
}

/// A built application, bound to its port, not yet serving.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    log: Arc<dyn EventLog>,
    read_model: Arc<MemoryReadModel>,
    relay: Relay,
    saga: Subscription,
    deadlines: Arc<dyn Deadlines>,
    order_saga: Arc<OrderSaga>,
    limits: Limits,
}

/// The event log and the stores that live beside it.
pub struct Opened {
    /// The log.
    pub log: Arc<dyn EventLog>,
    /// Where relays take their lease.
    pub leases: Arc<dyn RelayLeases>,
    /// The saga's payment deadlines.
    pub deadlines: Arc<dyn Deadlines>,
}

/// Connects (and migrates) the configured event log, with the stores that go with it.
pub async fn open_log(storage: &Storage) -> Result<Opened, StartupError> {
    Ok(match storage {
        Storage::Embedded => Opened {
            log: Arc::new(MemoryEventLog::new()),
            leases: Arc::new(MemoryRelayLeases::new()),
            deadlines: Arc::new(MemoryDeadlines::new()),
        },
        Storage::Postgres { url, options } => {
            let log = PgEventLog::connect(url, options).await?;
            log.migrate().await?;
            let leases = PgRelayLeases::new((*log.pool().connect_options()).clone(), "events");
            let deadlines = PgDeadlines::new(log.pool().clone());
            Opened {
                log: Arc::new(log),
                leases: Arc::new(leases),
                deadlines: Arc::new(deadlines),
            }
        }
    })
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
        let Opened {
            log,
            leases,
            deadlines,
        } = open_log(&settings.storage).await?;
        let bus = open_bus(&settings.mirror).await?;
        let relay = Relay::new(
            Arc::clone(&log),
            Arc::clone(&bus),
            leases,
            RelayOptions::default(),
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
        let read_model = Arc::new(MemoryReadModel::new());
        let state = AppState::new(Shared {
            handler,
            read_model: read_model.clone(),
            auth: Auth::new(&settings.operator_token, settings.token_secret.clone()),
            last_append: watch::channel(LogCursor::default()).0,
            read_your_writes_timeout: settings.read_your_writes_timeout,
            webhook_secret: settings.webhook_secret.clone(),
            bus,
            relay: relay.status(),
        });
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: settings.http_addr,
                source,
            })?;
        Ok(Application {
            listener,
            state,
            log,
            read_model,
            relay,
            saga,
            deadlines,
            order_saga,
            limits: settings.limits,
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

    /// Serves until `shutdown` resolves, then stops taking connections, lets requests in
    /// flight finish, and stops the projector and the relay.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (stop, stopped) = watch::channel(false);
        let wait_stop = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let projector = tokio::spawn(projections::projector::run(
            self.log,
            self.read_model,
            wait_stop(stopped.clone()),
        ));
        let relay = tokio::spawn(self.relay.run(wait_stop(stopped.clone())));
        let saga = tokio::spawn(self.saga.run(wait_stop(stopped.clone())));
        let order_saga = self.order_saga;
        let deadlines = tokio::spawn(sagas::deadlines::run(
            self.deadlines,
            move |order_id| {
                let order_saga = Arc::clone(&order_saga);
                async move {
                    if let Err(error) = order_saga.advance(order_id, &Default::default()).await {
                        tracing::warn!(%order_id, %error, "the saga could not act on a deadline");
                    }
                }
            },
            wait_stop(stopped.clone()),
        ));
        let served = axum::serve(self.listener, router(self.state, self.limits))
            .with_graceful_shutdown(shutdown)
            .await;
        let _ = stop.send(true);
        let _ = projector.await;
        let _ = relay.await;
        let _ = saga.await;
        let _ = deadlines.await;
        served
    }
}

/// The HTTP routes of API.md. The API routes are shed and timed out under `limits`; the
/// health probes are not, so an overloaded instance still answers them.
pub fn router(state: AppState, limits: Limits) -> Router {
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
        .layer(axum::middleware::from_fn_with_state(
            Overload::new(limits),
            overload::guard,
        ));
    Router::new()
        .merge(api)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(|| async {
            ApiError::NotFound {
                code: "route_not_found",
                what: "route",
            }
        })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}
