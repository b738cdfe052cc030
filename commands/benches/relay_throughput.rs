//! The mirror on this machine's Postgres and NATS: how fast the relay publishes a backlog, how
//! fast a subscription consumes it, and the append-to-consumer lag under a steady write load.
//! Every run gets a scratch database and JetStream streams of its own, removed afterwards.
//!
//! `cargo bench -p groupbuy-commands --bench relay_throughput`
//! (`GROUPBUY_BENCH_PG` and `GROUPBUY_BENCH_NATS` override the servers.) Each scenario runs
//! three times; the table shows the median.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use commands::bus::jetstream::{JetStreamBus, JetStreamSettings};
use commands::bus::Bus;
use commands::log::postgres::{PgEventLog, PgLogOptions};
use commands::relay::postgres::PgRelayLeases;
use commands::relay::{Relay, RelayOptions};
use commands::subscription::{
    Dedupe, Handler, HandlerError, MemoryStreamVersions, PgStreamVersions, Subscription,
    SubscriptionOptions,
};
use commands::{AppendRequest, EventLog, NewEvent, StreamAppend};
use domain::campaign::CampaignEvent;
use schemas::{Envelope, Metadata};
use sqlx::{Connection, PgConnection};
use tokio::sync::{watch, Mutex};
use ulid::Ulid;

const RUNS: usize = 3;
const BACKLOG: u64 = 100_000;

fn closed_event() -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        event: schemas::encode(&CampaignEvent::CampaignClosed { at: Utc::now() }).unwrap(),
        metadata: Metadata::default(),
    }
}

/// A scratch database and streams.
struct Scratch {
    admin: String,
    database: String,
    log: Arc<PgEventLog>,
    bus: JetStreamBus,
}

impl Scratch {
    async fn new() -> anyhow::Result<Scratch> {
        let admin = std::env::var("GROUPBUY_BENCH_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let nats =
            std::env::var("GROUPBUY_BENCH_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
        let database = format!("gbbench_{}", Ulid::new().to_string().to_lowercase());
        let mut conn = PgConnection::connect(&admin).await?;
        sqlx::query(&format!("CREATE DATABASE {database}"))
            .execute(&mut conn)
            .await?;
        let server = admin.rsplit_once('/').map_or(admin.as_str(), |(s, _)| s);
        let options = PgLogOptions {
            pool_connections_max: 40,
            statement_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let log = Arc::new(PgEventLog::connect(&format!("{server}/{database}"), &options).await?);
        log.migrate().await?;
        let bus = JetStreamBus::connect(JetStreamSettings {
            prefix: database.clone(),
            ..JetStreamSettings::new(nats)
        })
        .await?;
        Ok(Scratch {
            admin,
            database,
            log,
            bus,
        })
    }

    fn relay(&self) -> Relay {
        Relay::new(
            self.log.clone(),
            Arc::new(self.bus.clone()),
            Arc::new(PgRelayLeases::new(
                (*self.log.pool().connect_options()).clone(),
                "events",
            )),
            RelayOptions::default(),
        )
    }

    /// `BACKLOG` events in 100-event appends over 1000 streams.
    async fn fill(&self) {
        for chunk in 0..BACKLOG / 100 {
            self.log
                .append(AppendRequest {
                    streams: vec![StreamAppend {
                        stream_id: format!("campaign-{}", Ulid::new()),
                        expected_version: 0,
                        events: (0..100).map(|_| closed_event()).collect(),
                    }],
                    idempotency: None,
                })
                .await
                .unwrap_or_else(|e| panic!("append {chunk}: {e}"));
        }
    }

    async fn drop_all(self) -> anyhow::Result<()> {
        self.bus.delete_streams().await?;
        self.log.pool().close().await;
        let mut conn = PgConnection::connect(&self.admin).await?;
        sqlx::query(&format!("DROP DATABASE {} WITH (FORCE)", self.database))
            .execute(&mut conn)
            .await?;
        Ok(())
    }
}

/// Counts events and records how long after being recorded each one arrived.
#[derive(Default)]
struct LagRecorder {
    lags_ms: Mutex<Vec<f64>>,
    count: watch::Sender<u64>,
}

#[async_trait]
impl Handler for LagRecorder {
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        let lag = (Utc::now() - event.recorded_at)
            .num_microseconds()
            .unwrap_or(0) as f64
            / 1e3;
        self.lags_ms.lock().await.push(lag);
        self.count.send_modify(|n| *n += 1);
        Ok(())
    }
}

fn subscribe(
    scratch: &Scratch,
    dedupe: Arc<dyn Dedupe>,
    stop: &watch::Sender<bool>,
) -> Arc<LagRecorder> {
    let recorder = Arc::new(LagRecorder::default());
    let mut options = SubscriptionOptions::new("bench");
    options.consumer.max_in_flight = 1_000;
    let subscription = Subscription::new(
        Arc::new(scratch.bus.clone()),
        options,
        dedupe,
        recorder.clone(),
    );
    let mut stopped = stop.subscribe();
    tokio::spawn(subscription.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    recorder
}

async fn wait_count(count: &watch::Sender<u64>, target: u64) {
    let mut rx = count.subscribe();
    rx.wait_for(|n| *n >= target).await.unwrap();
}

/// Reading a backlog back from the log, as the relay does: the relay's ceiling.
async fn read_backlog() -> f64 {
    let scratch = Scratch::new().await.unwrap();
    scratch.fill().await;
    let started = Instant::now();
    let events = read_everything(&scratch.log).await;
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    scratch.drop_all().await.unwrap();
    rate
}

async fn read_everything(log: &PgEventLog) -> Vec<commands::RecordedEvent> {
    let mut all = Vec::new();
    let mut after = Default::default();
    loop {
        let batch = log.read_all(after, 1_000).await.unwrap();
        let Some(last) = batch.last() else { break };
        after = last.cursor;
        all.extend(batch);
    }
    all
}

/// The relay publishing a backlog it finds at start.
async fn relay_backlog() -> f64 {
    let scratch = Scratch::new().await.unwrap();
    scratch.fill().await;
    let relay = scratch.relay();
    let mut status = relay.status();
    let (stop, mut stopped) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(relay.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    status.wait_for(|s| s.published >= BACKLOG).await.unwrap();
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = task.await;
    scratch.drop_all().await.unwrap();
    rate
}

/// A subscription consuming a backlog already in JetStream.
async fn consume_backlog(postgres_dedupe: bool) -> f64 {
    let scratch = Scratch::new().await.unwrap();
    scratch.fill().await;
    let events = read_everything(&scratch.log).await;
    for chunk in events.chunks(1_000) {
        scratch.bus.publish(chunk).await.unwrap();
    }
    let dedupe: Arc<dyn Dedupe> = if postgres_dedupe {
        Arc::new(PgStreamVersions::new(scratch.log.pool().clone()))
    } else {
        Arc::new(MemoryStreamVersions::new())
    };
    let (stop, _) = watch::channel(false);
    let started = Instant::now();
    let recorder = subscribe(&scratch, dedupe, &stop);
    wait_count(&recorder.count, BACKLOG).await;
    let rate = BACKLOG as f64 / started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    scratch.drop_all().await.unwrap();
    rate
}

/// Writers append for `seconds` while the relay and a subscription run; returns the append
/// rate and the lag percentiles.
async fn lag_under_load(
    writers: usize,
    seconds: u64,
    postgres_dedupe: bool,
) -> (f64, f64, f64, f64) {
    let scratch = Scratch::new().await.unwrap();
    let relay = scratch.relay();
    let (stop, _) = watch::channel(false);
    let mut stopped = stop.subscribe();
    tokio::spawn(relay.run(async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    let dedupe: Arc<dyn Dedupe> = if postgres_dedupe {
        Arc::new(PgStreamVersions::new(scratch.log.pool().clone()))
    } else {
        Arc::new(MemoryStreamVersions::new())
    };
    let recorder = subscribe(&scratch, dedupe, &stop);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let log = scratch.log.clone();
            tokio::spawn(async move {
                let stream = format!("campaign-{}", Ulid::new());
                let mut version = 0;
                while Instant::now() < deadline {
                    log.append(AppendRequest {
                        streams: vec![StreamAppend {
                            stream_id: stream.clone(),
                            expected_version: version,
                            events: vec![closed_event()],
                        }],
                        idempotency: None,
                    })
                    .await
                    .unwrap();
                    version += 1;
                }
                version
            })
        })
        .collect();
    let mut appended = 0;
    for task in tasks {
        appended += task.await.unwrap();
    }
    let rate = appended as f64 / seconds as f64;
    wait_count(&recorder.count, appended).await;
    let _ = stop.send(true);
    let mut lags = recorder.lags_ms.lock().await.clone();
    lags.sort_by(f64::total_cmp);
    let at = |q: f64| lags[((lags.len() - 1) as f64 * q).round() as usize];
    scratch.drop_all().await.unwrap();
    (rate, at(0.5), at(0.99), at(1.0))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: there they only
    // need to build. Measuring is for `cargo bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("not measuring: run with `cargo bench`");
        return Ok(());
    }
    println!("| scenario | median of {RUNS} | unit |");
    println!("|---|---:|---|");
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(read_backlog().await);
    }
    println!(
        "| log: read a {BACKLOG}-event backlog (decoded, schema-validated) | {:.0} | events/s |",
        median(runs)
    );
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(relay_backlog().await);
    }
    println!(
        "| relay: publish a {BACKLOG}-event backlog to JetStream | {:.0} | events/s |",
        median(runs)
    );
    for (label, postgres) in [("in-memory", false), ("Postgres", true)] {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(consume_backlog(postgres).await);
        }
        println!(
            "| subscription: consume {BACKLOG} events, per-stream order, {label} dedupe | {:.0} | events/s |",
            median(runs)
        );
    }
    for (label, postgres) in [("in-memory", false), ("Postgres", true)] {
        let mut results = Vec::new();
        for _ in 0..RUNS {
            results.push(lag_under_load(16, 10, postgres).await);
        }
        let pick = |f: fn(&(f64, f64, f64, f64)) -> f64| median(results.iter().map(f).collect());
        println!(
            "| under load, {label} dedupe: 16 writers, 1 event per append, 10 s | {:.0} | appends/s |",
            pick(|r| r.0)
        );
        println!(
            "| under load, {label} dedupe: append-to-consumer lag p50 / p99 / max | {:.1} / {:.1} / {:.1} | ms |",
            pick(|r| r.1),
            pick(|r| r.2),
            pick(|r| r.3)
        );
    }
    Ok(())
}
