//! Appends per second on this machine's Postgres: raw log appends, alone and group-committed,
//! and whole commands. Creates a scratch database and drops it afterwards.
//!
//! `cargo bench -p groupbuy-commands --bench append_throughput`
//! (`GROUPBUY_BENCH_PG` overrides the server, default `postgres://postgres@127.0.0.1:5432/postgres`.)
//! Each scenario runs three times; the table shows the median.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use commands::group_commit::{GroupCommit, GroupCommitOptions};
use commands::handler::{Context, HandlerOptions};
use commands::log::postgres::{PgEventLog, PgLogOptions};
use commands::{stream_id, AppendRequest, CommandHandler, EventLog, NewEvent, StreamAppend};
use domain::campaign::CampaignEvent;
use domain::order::{OrderAggregate, OrderCommand};
use domain::{CampaignId, Cents, OrderId, UserId};
use schemas::Metadata;
use sqlx::{Connection, PgConnection};
use ulid::Ulid;

const RUNS: usize = 3;

fn closed_event() -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        event: schemas::encode(&CampaignEvent::CampaignClosed { at: Utc::now() }).unwrap(),
        metadata: Metadata {
            actor: Some("bench".into()),
            ..Default::default()
        },
    }
}

/// One writer appends `count` single-event transactions to one stream.
async fn one_stream_sequential(log: Arc<PgEventLog>, count: u64) -> f64 {
    let stream = format!("campaign-{}", Ulid::new());
    let started = Instant::now();
    for version in 0..count {
        let request = AppendRequest {
            streams: vec![StreamAppend {
                stream_id: stream.clone(),
                expected_version: version,
                events: vec![closed_event()],
            }],
            idempotency: None,
        };
        log.append(request).await.unwrap();
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// `writers` tasks each append single-event transactions to their own stream.
async fn many_streams(log: Arc<dyn EventLog>, writers: u64, per_writer: u64) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let stream = format!("campaign-{}", Ulid::new());
                for version in 0..per_writer {
                    let request = AppendRequest {
                        streams: vec![StreamAppend {
                            stream_id: stream.clone(),
                            expected_version: version,
                            events: vec![closed_event()],
                        }],
                        idempotency: None,
                    };
                    log.append(request).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (writers * per_writer) as f64 / started.elapsed().as_secs_f64()
}

/// One writer appends batches of `batch` events to one stream: events per second.
async fn one_stream_batched(log: Arc<PgEventLog>, batches: u64, batch: u64) -> f64 {
    let stream = format!("campaign-{}", Ulid::new());
    let started = Instant::now();
    for i in 0..batches {
        let request = AppendRequest {
            streams: vec![StreamAppend {
                stream_id: stream.clone(),
                expected_version: i * batch,
                events: (0..batch).map(|_| closed_event()).collect(),
            }],
            idempotency: None,
        };
        log.append(request).await.unwrap();
    }
    (batches * batch) as f64 / started.elapsed().as_secs_f64()
}

fn context<S>() -> Context<'static, S> {
    Context::new(Metadata {
        actor: Some("bench".into()),
        ..Default::default()
    })
}

/// `writers` tasks place orders (each order its own stream) through the command handler.
async fn place_orders(log: Arc<dyn EventLog>, writers: u64, per_writer: u64) -> f64 {
    let handler = CommandHandler::new(log, HandlerOptions::default());
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let handler = handler.clone();
            tokio::spawn(async move {
                for _ in 0..per_writer {
                    let order_id = OrderId::from_ulid(Ulid::new());
                    let place = OrderCommand::Place {
                        order_id,
                        user_id: UserId::from_ulid(Ulid::new()),
                        campaign_id: CampaignId::from_ulid(Ulid::new()),
                        quantity: 1,
                        unit_price_cents: Cents::new(100),
                        now: Utc::now(),
                    };
                    let stream = stream_id::<OrderAggregate>(order_id);
                    handler
                        .execute::<OrderAggregate>(&stream, &place, &context())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    (writers * per_writer) as f64 / started.elapsed().as_secs_f64()
}

/// Runs a scenario [`RUNS`] times and prints a table row with the median.
async fn report<F, Fut>(label: &str, unit: &str, mut run: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        runs.push(run().await);
    }
    runs.sort_by(f64::total_cmp);
    println!("| {label} | {:.0} | {unit} |", runs[RUNS / 2]);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: there they only
    // need to build. Measuring is for `cargo bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("not measuring: run with `cargo bench`");
        return Ok(());
    }
    let admin = std::env::var("GROUPBUY_BENCH_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("gbbench_{}", Ulid::new().to_string().to_lowercase());
    let mut conn = PgConnection::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let url = format!(
        "{}/{name}",
        admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(server, _)| server)
    );
    let options = PgLogOptions {
        pool_connections_max: 40,
        statement_timeout: Duration::from_secs(60),
        ..Default::default()
    };
    let log = Arc::new(PgEventLog::connect(&url, &options).await?);
    log.migrate().await?;

    println!("| scenario | median of {RUNS} | unit |");
    println!("|---|---:|---|");
    report(
        "log: one stream, one writer, 1 event per append",
        "appends/s",
        || one_stream_sequential(Arc::clone(&log), 2_000),
    )
    .await;
    let group_committed: Arc<dyn EventLog> = Arc::new(GroupCommit::new(
        log.clone() as Arc<dyn EventLog>,
        GroupCommitOptions::default(),
    ));
    report(
        "log: 32 streams, 32 writers, 1 event per append",
        "appends/s",
        || many_streams(log.clone(), 32, 200),
    )
    .await;
    report(
        "log: 32 streams, 32 writers, 1 event per append, group commit",
        "appends/s",
        || many_streams(Arc::clone(&group_committed), 32, 200),
    )
    .await;
    report(
        "log: 256 streams, 256 writers, 1 event per append, group commit",
        "appends/s",
        || many_streams(Arc::clone(&group_committed), 256, 50),
    )
    .await;
    report(
        "log: one stream, one writer, 100 events per append",
        "events/s",
        || one_stream_batched(Arc::clone(&log), 200, 100),
    )
    .await;
    report(
        "commands: place order, 32 writers, one stream each",
        "commands/s",
        || place_orders(log.clone(), 32, 100),
    )
    .await;
    report(
        "commands: place order, 256 writers, one stream each, group commit",
        "commands/s",
        || place_orders(Arc::clone(&group_committed), 256, 50),
    )
    .await;

    drop(group_committed);
    drop(log);
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await?;
    Ok(())
}
