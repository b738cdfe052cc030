//! The `groupbuy` command line: subcommands and their flags, each also settable from the
//! environment.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{builder::TypedValueParser, Args, Parser, Subcommand};
use commands::group_commit::GroupCommitOptions;
use commands::log::postgres::{PgEventLog, PgLogOptions};
use commands::relay::RelayOptions;

use commands::bus::jetstream::JetStreamSettings;

use crate::app::{Application, Mirror, Payments, ReadModels, Settings, StartupError, Storage};
use crate::overload::Limits;
use crate::rate_limit::{Bucket, RateLimits};
use crate::roles::{Role, Roles};
use crate::telemetry::{Otlp, OtlpProtocol};
use sagas::sweeper::Sweep;

/// The version `--version` prints: the crate's, and the git commit the binary was built from
/// (`-modified` when the tree had uncommitted changes).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("GROUPBUY_GIT_COMMIT"),
    ")"
);

/// The relay's linger on NATS when none is set: on a flash sale it cut the Postgres
/// transactions an order costs by a third and NATS's CPU by about a quarter against 5 ms
/// (docs/benchmarks.md).
const RELAY_LINGER_ON_NATS: Duration = Duration::from_millis(20);

/// groupbuy: an event-sourced order and stock backend for drinks group-buying.
#[derive(Parser)]
#[command(name = "groupbuy", version = VERSION)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// A file of `NAME=value` settings, named like the environment variables; the
    /// environment and flags override it.
    #[arg(long, global = true, env = "GROUPBUY_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// How logs are written: `text` for people, `json` for log collectors.
    #[arg(
        long,
        global = true,
        env = "GROUPBUY_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Where to export traces: an OpenTelemetry collector's OTLP/HTTP base URL, like
    /// `http://collector:4318`. Unset, nothing is exported.
    #[arg(long, global = true, env = "GROUPBUY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How traces are encoded for the collector.
    #[arg(
        long,
        global = true,
        env = "GROUPBUY_OTLP_PROTOCOL",
        default_value = "http-protobuf"
    )]
    pub otlp_protocol: OtlpProtocol,
}

impl Cli {
    /// Where traces go, if anywhere.
    pub fn otlp(&self) -> Option<Otlp> {
        self.otlp_endpoint.as_ref().map(|endpoint| Otlp {
            endpoint: endpoint.clone(),
            protocol: self.otlp_protocol,
        })
    }
}

/// How logs are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Runs the HTTP gateway and the background roles.
    Serve(Box<ServeArgs>),
    /// Brings the Postgres schema up to date and exits.
    Migrate(MigrateArgs),
    /// Operates the Redis read models.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Replays the whole log against the invariants (and compares the Redis read models with a
    /// fresh fold); exits non-zero on any violation.
    Audit(AuditArgs),
    /// Prints the events of one stream of the log, or one order's whole history (its events
    /// and those of its payment and reservation, in log order).
    Events(EventsArgs),
    /// Lists, shows, replays and discards what consumers gave up on, through a running
    /// instance's API (either bus).
    DeadLetters(crate::dead_letters_cli::DeadLettersArgs),
    /// Drives a flash sale against a running deployment over HTTP, and reports rates,
    /// latencies and the stock invariants; exits non-zero when a check fails.
    Loadgen(crate::loadgen::LoadgenArgs),
    /// Prints the shell's completion script for groupbuy (`source <(groupbuy completions
    /// bash)`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

/// `groupbuy projections ...`.
#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Builds a new version of a read model (`campaigns` or `orders`) from the log, switches
    /// queries to it once it has caught up, and removes the old one; serving instances keep
    /// answering throughout.
    Rebuild(RebuildArgs),
    /// Lists every version of every read model with its position and lag.
    List(StoresArgs),
}

/// Where the log and the read models are.
#[derive(Args)]
pub struct StoresArgs {
    /// PostgreSQL URL of the event log.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Redis URL of the read models.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: String,
    /// First part of every read-model key.
    #[arg(long, env = "GROUPBUY_REDIS_PREFIX", default_value = "groupbuy")]
    pub redis_prefix: String,
}

/// Flags of `groupbuy projections rebuild`.
#[derive(Args)]
pub struct RebuildArgs {
    /// `campaigns` or `orders`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub name: Option<projections::ProjectionName>,
    /// Every read model, one after the other.
    #[arg(long)]
    pub all: bool,
    /// Where the log and the read models are.
    #[command(flatten)]
    pub stores: StoresArgs,
    /// No progress bar (for scripts and logs).
    #[arg(long)]
    pub quiet: bool,
}

/// Flags of `groupbuy audit`.
#[derive(Args)]
pub struct AuditArgs {
    /// PostgreSQL URL of the event log.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Redis URL of the read models to compare; unset: the log alone is audited.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// First part of every read-model key.
    #[arg(long, env = "GROUPBUY_REDIS_PREFIX", default_value = "groupbuy")]
    pub redis_prefix: String,
    /// Print the report as JSON (API.md's AuditReport) instead of for a human.
    #[arg(long)]
    pub json: bool,
    /// Seconds an order may sit between saga steps before it counts as inconsistent.
    #[arg(long, default_value_t = 120)]
    pub settle_seconds: u64,
    /// Seconds an order may stay pending, or awaiting payment past its deadline, before it
    /// counts as stuck.
    #[arg(long, default_value_t = 300)]
    pub stuck_after_seconds: u64,
}

/// Flags of `groupbuy events`.
#[derive(Args)]
pub struct EventsArgs {
    /// The stream, `<category>-<id>`: `order-<order id>`, `payment-<payment id>`,
    /// `holding-<campaign id>-<user id>`, `campaign-<campaign id>`, ...
    #[arg(required_unless_present = "order", conflicts_with = "order")]
    pub stream_id: Option<String>,
    /// The history of this order instead of one stream.
    #[arg(long)]
    pub order: Option<String>,
    /// The first version of the stream to print.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub from_version: u64,
    /// Most events of the stream to print.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub limit: u64,
    /// One JSON envelope a line, for machines, instead of one line of text an event.
    #[arg(long)]
    pub json: bool,
    /// PostgreSQL URL of the event log.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// Flags of `groupbuy serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// `dev` accepts anything; `prod` refuses to start without the real services, with the
    /// simulated payment provider, or with secrets that are unset, short or examples.
    #[arg(long, env = "GROUPBUY_PROFILE", default_value = "dev")]
    pub profile: crate::config::Profile,
    /// The roles this process runs, comma-separated: any of gateway, relay, saga,
    /// projections, deadlines. Apart from all of them (the default), only on the shared
    /// services (DATABASE_URL, NATS_URL, REDIS_URL).
    #[arg(
        long,
        env = "GROUPBUY_ROLES",
        value_delimiter = ',',
        default_value = "gateway,relay,saga,projections,deadlines"
    )]
    pub roles: Vec<Role>,
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
    /// NATS URL of the JetStream mirror of the log, or the URLs of several servers of one
    /// cluster separated by commas. Unset: an embedded, in-process mirror.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// First token of the JetStream subjects (and of the stream names, upper-cased).
    #[arg(long, env = "GROUPBUY_NATS_PREFIX", default_value = "groupbuy")]
    pub nats_prefix: String,
    /// Partitions the JetStream mirror carries the log in. Instances share each consumer a
    /// partition at a time, so this bounds how many can share it; every instance of a
    /// deployment needs the same number, changed only with a drain (see
    /// docs/adr/0012-partitions-by-campaign-and-customer.md).
    #[arg(
        long,
        env = "GROUPBUY_PARTITIONS",
        default_value_t = commands::bus::partition::PARTITIONS_DEFAULT,
        value_parser = clap::value_parser!(u16).range(1..=i64::from(commands::bus::partition::PARTITIONS_MAX))
    )]
    pub partitions: u16,
    /// How many servers of a JetStream cluster keep each of the mirror's streams (1 to 5, at
    /// most the cluster's size). Raising it on a running deployment replicates the streams.
    #[arg(
        long,
        env = "GROUPBUY_NATS_REPLICAS",
        default_value_t = 1,
        value_parser = clap::value_parser!(u8).range(1..=5)
    )]
    pub nats_replicas: u8,
    /// How the relay compresses the messages it publishes on JetStream: `lz4` (about a fifth
    /// of the bytes), or `none` while instances of a build older than compression still
    /// consume the bus. Consumers read either.
    #[arg(
        long,
        env = "GROUPBUY_MIRROR_COMPRESSION",
        default_value = "lz4",
        value_parser = clap::builder::PossibleValuesParser::new(["lz4", "none"])
            .map(|text: String| text.parse::<commands::bus::Compression>().expect("a possible value"))
    )]
    pub mirror_compression: commands::bus::Compression,
    /// Redis URL of the read models, shared by every instance. Unset: read models in this
    /// instance's memory, built from the log at start. Needs DATABASE_URL.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// First part of every read-model key in Redis.
    #[arg(long, env = "GROUPBUY_REDIS_PREFIX", default_value = "groupbuy")]
    pub redis_prefix: String,
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
    /// How long an order may wait (pending past its placement, or awaiting payment past its
    /// deadline) before the sweeper wakes the saga for it, in seconds.
    #[arg(
        long,
        env = "GROUPBUY_SWEEP_STUCK_AFTER_SECONDS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86_400)
    )]
    pub sweep_stuck_after_seconds: u64,
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
    /// How long the log's committer waits for more appends once it has one and the batch is
    /// not full, in microseconds. Fuller transactions only when appends arrive faster than
    /// transactions end; every append waits that much longer (docs/benchmarks.md: on a flash
    /// sale it costs more than it saves, so the default is 0).
    #[arg(
        long,
        env = "GROUPBUY_GROUP_COMMIT_LINGER_US",
        default_value_t = 0,
        value_parser = clap::value_parser!(u64).range(0..=100_000)
    )]
    pub group_commit_linger_us: u64,
    /// How long the relay lets events gather after a read that did not fill a batch, in
    /// milliseconds, before it reads and publishes again; by default 20 on NATS and 5 on the
    /// embedded bus. Each read goes out in a message per partition, and a JetStream message
    /// costs the broker and every consumer about the same whatever it carries: longer makes
    /// fewer, fuller messages, and under a steady load every event reaches its consumers up
    /// to that much later. An event after a quiet spell goes out at once (docs/benchmarks.md).
    #[arg(
        long,
        env = "GROUPBUY_RELAY_LINGER_MS",
        value_parser = clap::value_parser!(u64).range(0..=1_000)
    )]
    pub relay_linger_ms: Option<u64>,
    /// API requests served at once; more are answered 503 with Retry-After.
    #[arg(long, env = "GROUPBUY_IN_FLIGHT_REQUESTS_MAX", default_value_t = 1_024)]
    pub in_flight_requests_max: usize,
    /// Longest an API request may take, in milliseconds, before it is answered 503.
    #[arg(long, env = "GROUPBUY_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,
    /// Requests a second one customer may send, sustained; more are answered 429. 0: no limit.
    #[arg(
        long,
        env = "GROUPBUY_RATE_LIMIT_CUSTOMER_PER_SECOND",
        default_value_t = 20
    )]
    pub rate_limit_customer_per_second: u32,
    /// Requests one customer may send at once after a quiet spell.
    #[arg(long, env = "GROUPBUY_RATE_LIMIT_CUSTOMER_BURST", default_value_t = 40)]
    pub rate_limit_customer_burst: u32,
    /// Requests a second this instance takes from everyone together; more are answered 429.
    /// 0: no limit.
    #[arg(
        long,
        env = "GROUPBUY_RATE_LIMIT_GLOBAL_PER_SECOND",
        default_value_t = 5_000
    )]
    pub rate_limit_global_per_second: u32,
    /// Requests this instance takes at once after a quiet spell.
    #[arg(
        long,
        env = "GROUPBUY_RATE_LIMIT_GLOBAL_BURST",
        default_value_t = 10_000
    )]
    pub rate_limit_global_burst: u32,
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
#[derive(Args)]
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
                partitions: self.partitions,
                replicas: usize::from(self.nats_replicas),
                compression: self.mirror_compression,
                ..JetStreamSettings::new(url)
            }),
            None => Mirror::Embedded,
        };
        // A JetStream message costs far more than one of the embedded bus, so fuller ones pay.
        let relay_linger = match (self.relay_linger_ms, &mirror) {
            (Some(ms), _) => Duration::from_millis(ms),
            (None, Mirror::JetStream(_)) => RELAY_LINGER_ON_NATS,
            (None, Mirror::Embedded) => RelayOptions::default().linger,
        };
        let operator_token = self.operator_token.clone().unwrap_or_else(|| {
            let token = format!("op_{:032x}", rand::random::<u128>());
            // Printed, not logged: it is the only way to learn it, and it dies with the process.
            eprintln!(
                "GROUPBUY_OPERATOR_TOKEN is not set; this run's operator token is {token}\n\
                 the console, signed in: http://{}/console#token={token}",
                self.http_addr
            );
            token
        });
        let token_secret = match &self.token_secret {
            Some(secret) => secret.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        let read_models = match &self.redis_url {
            Some(url) => ReadModels::Redis {
                url: url.clone(),
                prefix: self.redis_prefix.clone(),
            },
            None => ReadModels::Embedded,
        };
        Settings {
            roles: Roles::of(self.roles.iter().copied()).unwrap_or_default(),
            http_addr: self.http_addr,
            operator_token,
            token_secret,
            storage,
            relay: RelayOptions {
                linger: relay_linger,
                ..RelayOptions::default()
            },
            group_commit: GroupCommitOptions {
                linger: Duration::from_micros(self.group_commit_linger_us),
                ..GroupCommitOptions::default()
            },
            mirror,
            read_models,
            rebuild: Default::default(),
            heal_read_models_every: Some(Duration::from_secs(5)),
            sweep: Some(Sweep {
                stuck_after: Duration::from_secs(self.sweep_stuck_after_seconds),
                ..Sweep::default()
            }),
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
                rate_limits: RateLimits {
                    per_customer: Some(Bucket {
                        per_second: self.rate_limit_customer_per_second,
                        burst: self.rate_limit_customer_burst,
                    }),
                    global: Some(Bucket {
                        per_second: self.rate_limit_global_per_second,
                        burst: self.rate_limit_global_burst,
                    }),
                },
            },
        }
    }
}

impl ServeArgs {
    /// Why the profile refuses these flags; `None` when it accepts them.
    pub fn profile_problem(&self) -> Option<String> {
        if self.profile == crate::config::Profile::Dev {
            return None;
        }
        if matches!(self.payment_provider, PaymentProviderArg::Simulated) {
            return Some(
                "the prod profile takes real payments: set GROUPBUY_PAYMENT_PROVIDER=external"
                    .into(),
            );
        }
        crate::config::prod_problem(
            &[
                ("GROUPBUY_OPERATOR_TOKEN", self.operator_token.as_deref()),
                ("GROUPBUY_TOKEN_SECRET", self.token_secret.as_deref()),
                (
                    "GROUPBUY_PAYMENT_WEBHOOK_SECRET",
                    self.webhook_secret.as_deref(),
                ),
            ],
            &[
                ("DATABASE_URL", self.database_url.is_some()),
                ("NATS_URL", self.nats_url.is_some()),
                ("REDIS_URL", self.redis_url.is_some()),
            ],
        )
    }
}

/// Runs `groupbuy serve` until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> Result<(), StartupError> {
    if let Some(problem) = args.profile_problem() {
        return Err(StartupError::Config(problem));
    }
    let settings = args.settings();
    tracing::info!(profile = ?args.profile, ?settings, "starting");
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
    match (&settings.read_models, &settings.storage) {
        (ReadModels::Redis { .. }, Storage::Embedded) => {
            return Err(StartupError::Config(
                "REDIS_URL needs DATABASE_URL: read models in Redis would outlive an embedded log"
                    .into(),
            ))
        }
        (ReadModels::Redis { .. }, _) => tracing::info!("read models in Redis"),
        (ReadModels::Embedded, Storage::Postgres { .. }) => tracing::info!(
            "REDIS_URL is not set: read models in this instance's memory, built from the log at start"
        ),
        (ReadModels::Embedded, Storage::Embedded) => {}
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

/// An operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Something could not be reached.
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// The rebuild failed; the live version stays.
    #[error("rebuild: {0}")]
    Rebuild(#[from] projections::RebuildError),
    /// The audit could not finish.
    #[error("audit: {0}")]
    Audit(#[from] projections::audit::AuditError),
    /// The read models could not be read.
    #[error("read models: {0}")]
    ReadModels(#[from] projections::read_model::ReadModelError),
    /// The log could not be read.
    #[error("event log: {0}")]
    Log(#[from] commands::LogError),
    /// The command cannot do what it was asked.
    #[error("{0}")]
    Usage(String),
}

async fn open_stores(
    database_url: &str,
) -> Result<std::sync::Arc<dyn commands::EventLog>, StartupError> {
    let log = PgEventLog::connect(database_url, &PgLogOptions::default()).await?;
    log.migrate().await?;
    Ok(std::sync::Arc::new(log))
}

/// A progress bar's style from `template`, whose `{rate}` is events a second as a whole number
/// (indicatif's own `{per_sec}` shows fractions of an event).
fn progress_style(template: &str) -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template(template)
        .expect("the template is valid")
        .with_key(
            "rate",
            |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.0} events/s", state.per_sec());
            },
        )
}

/// Runs `groupbuy projections rebuild`, with a progress bar on stderr.
pub async fn rebuild(args: RebuildArgs) -> Result<(), OperatorError> {
    let log = open_stores(&args.stores.database_url).await?;
    let store =
        projections::RedisProjections::connect(&args.stores.redis_url, &args.stores.redis_prefix)
            .await?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(log.head().await?)
    };
    bar.set_style(progress_style(
        "{msg} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events, {rate}, ETA {eta}",
    ));
    let names = match args.name {
        Some(name) => vec![name],
        None => projections::ProjectionName::ALL.to_vec(),
    };
    for name in names {
        bar.reset();
        bar.set_message(format!("rebuilding {name}"));
        let report = projections::rebuild::rebuild(
            log.as_ref(),
            &store,
            name,
            &Default::default(),
            &|p: &projections::rebuild::Progress| {
                bar.set_length(p.head);
                bar.set_position(p.read.min(p.head));
            },
        )
        .await?;
        bar.finish_and_clear();
        println!(
            "{} version {} is live (replaced {}): {} events in {:.1} s, {:.0} events/s",
            report.name,
            report.version,
            report
                .replaced
                .map_or_else(|| "nothing".to_owned(), |v| format!("version {v}")),
            report.read,
            report.elapsed.as_secs_f64(),
            report.rate()
        );
    }
    Ok(())
}

/// Runs `groupbuy projections list`.
pub async fn list_projections(args: StoresArgs) -> Result<(), OperatorError> {
    let log = open_stores(&args.database_url).await?;
    let store = projections::RedisProjections::connect(&args.redis_url, &args.redis_prefix).await?;
    println!(
        "{:<10} {:>8} {:<9} {:>12} {:>10}",
        "NAME", "VERSION", "STATUS", "POSITION", "LAG"
    );
    for v in projections::ProjectionStore::versions(&store).await? {
        let lag = log.count_after(v.position, v.name.categories()).await?;
        println!(
            "{:<10} {:>8} {:<9} {:>12} {:>10}",
            v.name.as_str(),
            v.version,
            v.status.as_str(),
            v.position,
            lag
        );
    }
    Ok(())
}

/// An error and its causes, outermost first, as one line: each cause once, a cause whose text
/// the line already holds left out ("event log: database error: x" and then "x" reads as the
/// first alone).
pub fn error_chain(chain: &[String]) -> String {
    let mut line = String::new();
    for message in chain {
        if line.contains(message.as_str()) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(message);
    }
    line
}

/// The completion script of `groupbuy` for `shell`.
pub fn completions(shell: clap_complete::Shell) -> Vec<u8> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "groupbuy", &mut script);
    script
}

/// Runs `groupbuy events`: prints the stream's events, or the order's history, one a line.
pub async fn events(args: EventsArgs) -> Result<(), OperatorError> {
    let log = open_stores(&args.database_url).await?;
    for line in event_lines(log.as_ref(), &args).await? {
        println!("{line}");
    }
    Ok(())
}

/// What `groupbuy events` prints for `args`, read from `log`.
pub async fn event_lines(
    log: &dyn commands::EventLog,
    args: &EventsArgs,
) -> Result<Vec<String>, OperatorError> {
    let events = match (&args.order, &args.stream_id) {
        (Some(order), _) => {
            let order_id: domain::OrderId = order
                .parse()
                .map_err(|_| OperatorError::Usage(format!("{order} is not an order id")))?;
            crate::routes::history::history(log, order_id)
                .await?
                .ok_or_else(|| OperatorError::Usage(format!("the log has no order {order_id}")))?
        }
        (None, Some(stream)) => {
            let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
            log.read_stream(stream, args.from_version - 1, limit)
                .await?
        }
        (None, None) => return Err(OperatorError::Usage("name a stream or an order".into())),
    };
    Ok(events
        .iter()
        .map(|event| {
            let e = &event.envelope;
            if args.json {
                serde_json::to_string(e).expect("an envelope serializes")
            } else {
                format!(
                    "{:>9}  {} v{}  {}  {}  {}  {}",
                    e.global_position,
                    e.stream_id,
                    e.stream_version,
                    e.recorded_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    e.event_type,
                    e.metadata.actor.as_deref().unwrap_or("-"),
                    e.data
                )
            }
        })
        .collect())
}

/// Runs `groupbuy audit`; returns whether the log and read models passed.
pub async fn audit(args: AuditArgs) -> Result<bool, OperatorError> {
    let log = open_stores(&args.database_url).await?;
    let store = match &args.redis_url {
        Some(url) => Some(projections::RedisProjections::connect(url, &args.redis_prefix).await?),
        None => None,
    };
    let bar = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(log.head().await?)
    };
    bar.set_style(progress_style(
        "auditing [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} events, {rate}",
    ));
    let report = projections::audit::audit(
        log.as_ref(),
        store.as_ref().map(|s| s as &dyn projections::ReadModel),
        &projections::audit::AuditOptions {
            settle: Duration::from_secs(args.settle_seconds),
            stuck_after: Duration::from_secs(args.stuck_after_seconds),
            ..Default::default()
        },
        &|read| bar.set_position(read),
    )
    .await?;
    bar.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report always serialises")
        );
    } else {
        println!(
            "{} events in {} streams checked at {}{}",
            report.events_read,
            report.streams_read,
            report.checked_at.to_rfc3339(),
            if store.is_some() {
                ", read models compared"
            } else {
                ""
            },
        );
        for v in &report.violations {
            println!("VIOLATION {:<20} {:<34} {}", v.kind, v.stream_id, v.detail);
        }
        if report.violations_omitted > 0 {
            println!("... and {} more", report.violations_omitted);
        }
        if report.views_in_flight > 0 {
            println!(
                "{} views skipped: their events were still being applied",
                report.views_in_flight
            );
        }
        println!("{}", if report.ok { "OK" } else { "FAILED" });
    }
    Ok(report.ok)
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
