//! The `groupbuy` command line: subcommands and their flags, each also settable from the
//! environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use commands::log::postgres::{PgEventLog, PgLogOptions};

use commands::bus::jetstream::JetStreamSettings;

use crate::app::{Application, Mirror, Payments, Settings, StartupError, Storage};
use crate::overload::Limits;

/// groupbuy: an event-sourced order and stock backend for drinks group-buying.
#[derive(Debug, Parser)]
#[command(name = "groupbuy", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Runs the HTTP gateway and the background roles.
    Serve(Box<ServeArgs>),
    /// Brings the Postgres schema up to date and exits.
    Migrate(MigrateArgs),
}

/// Flags of `groupbuy serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "GROUPBUY_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Bearer token of the operator. A random one is generated (and printed) when unset.
    #[arg(long, env = "GROUPBUY_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: Option<String>,
    /// Key customer tokens are derived with; every instance of one deployment needs the same.
    #[arg(long, env = "GROUPBUY_TOKEN_SECRET", hide_env_values = true)]
    pub token_secret: Option<String>,
    /// PostgreSQL URL of the event log. Unset: the embedded, volatile log.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// NATS URL of the JetStream mirror of the log. Unset: an embedded, in-process mirror.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// First token of the JetStream subjects (and of the stream names, upper-cased).
    #[arg(long, env = "GROUPBUY_NATS_PREFIX", default_value = "groupbuy")]
    pub nats_prefix: String,
    /// Redis URL of the read models (not used by this version yet).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Which payment provider the saga asks: `simulated` (answers by itself) or `external`
    /// (answers through the signed webhook).
    #[arg(long, env = "GROUPBUY_PAYMENT_PROVIDER", default_value = "simulated")]
    pub payment_provider: PaymentProviderArg,
    /// How long the simulated provider takes to answer, in milliseconds.
    #[arg(
        long,
        env = "GROUPBUY_SIMULATED_PAYMENT_DELAY_MS",
        default_value_t = 500
    )]
    pub simulated_payment_delay_ms: u64,
    /// The share of payments the simulated provider fails, 0 to 1.
    #[arg(
        long,
        env = "GROUPBUY_SIMULATED_PAYMENT_FAILURE_RATE",
        default_value_t = 0.0
    )]
    pub simulated_payment_failure_rate: f64,
    /// Key the payment provider signs webhooks with. A random one (so no webhook is accepted)
    /// when unset.
    #[arg(long, env = "GROUPBUY_PAYMENT_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Most Postgres connections this instance opens.
    #[arg(long, env = "GROUPBUY_PG_CONNECTIONS_MAX", default_value_t = 16)]
    pub pg_connections_max: u32,
    /// API requests served at once; more are answered 503 with Retry-After.
    #[arg(long, env = "GROUPBUY_IN_FLIGHT_REQUESTS_MAX", default_value_t = 1_024)]
    pub in_flight_requests_max: usize,
    /// Longest an API request may take, in milliseconds, before it is answered 503.
    #[arg(long, env = "GROUPBUY_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
}

/// The payment providers `serve` can use.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PaymentProviderArg {
    /// Answers by itself after a delay.
    Simulated,
    /// Answers through the signed webhook.
    External,
}

/// Flags of `groupbuy migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// PostgreSQL URL of the event log.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

impl ServeArgs {
    /// The settings these flags describe.
    pub fn settings(&self) -> Settings {
        let storage = match &self.database_url {
            Some(url) => Storage::Postgres {
                url: url.clone(),
                options: PgLogOptions {
                    pool_connections_max: self.pg_connections_max,
                    ..PgLogOptions::default()
                },
            },
            None => Storage::Embedded,
        };
        let mirror = match &self.nats_url {
            Some(url) => Mirror::JetStream(JetStreamSettings {
                prefix: self.nats_prefix.clone(),
                ..JetStreamSettings::new(url)
            }),
            None => Mirror::Embedded,
        };
        let operator_token = self.operator_token.clone().unwrap_or_else(|| {
            let token = format!("op_{:032x}", rand::random::<u128>());
            // Printed, not logged: it is the only way to learn it, and it dies with the process.
            eprintln!("GROUPBUY_OPERATOR_TOKEN is not set; this run's operator token is {token}");
            token
        });
        let token_secret = match &self.token_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        Settings {
            http_addr: self.http_addr,
            operator_token,
            token_secret,
            storage,
            mirror,
            payments: match self.payment_provider {
                PaymentProviderArg::Simulated => Payments::Simulated {
                    delay: Duration::from_millis(self.simulated_payment_delay_ms),
                    failure_rate: self.simulated_payment_failure_rate.clamp(0.0, 1.0),
                },
                PaymentProviderArg::External => Payments::External,
            },
            webhook_secret: match &self.webhook_secret {
                Some(secret) => secret.as_bytes().to_vec(),
                None => rand::random::<[u8; 32]>().to_vec(),
            },
            read_your_writes_timeout: Duration::from_secs(2),
            limits: Limits {
                in_flight_requests_max: self.in_flight_requests_max,
                request_timeout: Duration::from_millis(self.request_timeout_ms),
            },
        }
    }
}

/// Runs `groupbuy serve` until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), StartupError> {
    let settings = args.settings();
    match &settings.storage {
        Storage::Embedded => tracing::warn!(
            "DATABASE_URL is not set: running on the EMBEDDED in-process event log and read models; \
             everything is lost when this process stops"
        ),
        Storage::Postgres { .. } => tracing::info!("event log on PostgreSQL"),
    }
    if args.token_secret.is_none() && args.database_url.is_some() {
        tracing::warn!("GROUPBUY_TOKEN_SECRET is not set: replayed POST /v1/users answers differ across restarts");
    }
    if matches!(args.payment_provider, PaymentProviderArg::External)
        && args.webhook_secret.is_none()
    {
        tracing::warn!(
            "GROUPBUY_PAYMENT_PROVIDER is external but GROUPBUY_PAYMENT_WEBHOOK_SECRET is not set: \
             no webhook can be verified, so every payment will time out"
        );
    }
    match &settings.mirror {
        Mirror::Embedded => tracing::warn!(
            "NATS_URL is not set: the log is mirrored to an EMBEDDED in-process bus; run one instance only"
        ),
        Mirror::JetStream(_) => tracing::info!("log mirrored to NATS JetStream"),
    }
    if args.redis_url.is_some() {
        tracing::warn!("REDIS_URL is accepted but not used by this version yet");
    }
    let app = Application::build(settings).await?;
    tracing::info!(addr = %app.local_addr(), "listening");
    app.run_until(shutdown_signal())
        .await
        .map_err(|source| StartupError::Bind {
            addr: args.http_addr,
            source,
        })?;
    tracing::info!("stopped");
    Ok(())
}

/// Runs `groupbuy migrate`.
pub async fn migrate(args: MigrateArgs) -> Result<(), StartupError> {
    let log = PgEventLog::connect(&args.database_url, &PgLogOptions::default()).await?;
    log.migrate().await?;
    tracing::info!("migrations applied");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}
