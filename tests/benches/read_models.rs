//! Replay and rebuild rates over a large log, with the peak memory of each.
//!
//! `cargo bench -p groupbuy-tests --bench read_models` (BENCH_EVENTS, default 1 000 000;
//! BENCH_RUNS, default 3)
//!
//! Writes a log of BENCH_EVENTS events straight into a fresh Postgres database: campaigns, and
//! orders that go the saga's way (placed, reserved, payment requested, then paid, confirmed and
//! sold, or one in ten failed, cancelled and released), each step in its own append, in the
//! order the saga would take them. Then runs the release `groupbuy` binary under
//! `/usr/bin/time` on it:
//!
//! - `groupbuy audit` on the log alone (the replay);
//! - `groupbuy projections rebuild orders` and `... campaigns` into Redis;
//! - `groupbuy audit` comparing the rebuilt Redis read models with a fresh fold.
//!
//! Reported per command: median wall time, events per second and peak resident memory.

use std::process::Command;
use std::time::Instant;

use commands::{AppendRequest, EventLog, NewEvent, StreamAppend};
use domain::campaign::{CampaignCreated, CampaignEvent};
use domain::order::{CancelReason, OrderEvent};
use domain::payment::PaymentEvent;
use domain::{CampaignId, Cents, OrderId, PaymentId, StoreId, UserId};
use harness::{TestDb, TestRedis};
use ulid::Ulid;

/// Orders written per round (three appends).
const ORDERS_PER_ROUND: usize = 250;
const CAMPAIGNS: usize = 20;
const USERS: usize = 50_000;

fn event<E: serde::Serialize>(e: &E) -> NewEvent {
    NewEvent {
        event_id: Ulid::new(),
        event: schemas::encode(e).expect("valid event"),
        metadata: Default::default(),
    }
}

struct Streams {
    appends: Vec<StreamAppend>,
}

impl Streams {
    fn new() -> Self {
        Streams {
            appends: Vec::new(),
        }
    }

    fn push(&mut self, stream_id: String, after: u64, events: Vec<NewEvent>) {
        self.appends.push(StreamAppend {
            stream_id,
            expected_version: after,
            events,
        });
    }

    fn count(&self) -> usize {
        self.appends.iter().map(|a| a.events.len()).sum()
    }
}

async fn append(log: &dyn EventLog, streams: Streams) -> usize {
    let count = streams.count();
    log.append(AppendRequest {
        streams: streams.appends,
        idempotency: None,
    })
    .await
    .expect("append");
    count
}

/// Writes about `target` events; returns how many.
async fn seed(log: &dyn EventLog, target: usize) -> usize {
    let now = chrono::Utc::now();
    let campaigns: Vec<CampaignId> = (0..CAMPAIGNS)
        .map(|_| CampaignId::from_ulid(Ulid::new()))
        .collect();
    let mut versions = [1u64; CAMPAIGNS];
    let mut streams = Streams::new();
    for id in &campaigns {
        let created = CampaignEvent::CampaignCreated(CampaignCreated {
            campaign_id: *id,
            store_id: StoreId::from_ulid(Ulid::new()),
            sku: "LAGER-500".into(),
            title: "Lager crate".into(),
            price_cents: Cents::new(900),
            quota: 10_000_000,
            per_user_limit: 100_000,
            starts_at: now - chrono::Duration::hours(1),
            ends_at: now + chrono::Duration::days(30),
            payment_timeout_seconds: 600,
            stock_buckets: 1,
            created_at: now,
        });
        streams.push(format!("campaign-{id}"), 0, vec![event(&created)]);
    }
    let mut written = append(log, streams).await;
    let users: Vec<UserId> = (0..USERS).map(|_| UserId::from_ulid(Ulid::new())).collect();
    let mut round = 0usize;
    while written < target {
        let c = round % CAMPAIGNS;
        let campaign_id = campaigns[c];
        let orders: Vec<(OrderId, UserId, bool)> = (0..ORDERS_PER_ROUND)
            .map(|i| {
                let user = users[(round * ORDERS_PER_ROUND + i) % USERS];
                (OrderId::from_ulid(Ulid::new()), user, i % 10 == 9)
            })
            .collect();
        let amount = Cents::new(900);
        // Placed and reserved.
        let mut placed = Streams::new();
        let mut held = Vec::new();
        for (order_id, user_id, _) in &orders {
            placed.push(
                format!("order-{order_id}"),
                0,
                vec![event(&OrderEvent::OrderPlaced {
                    order_id: *order_id,
                    user_id: *user_id,
                    campaign_id,
                    quantity: 1,
                    unit_price_cents: amount,
                    amount_cents: amount,
                    placed_at: now,
                })],
            );
            held.push(event(&CampaignEvent::StockReserved {
                order_id: *order_id,
                user_id: *user_id,
                quantity: 1,
                at: now,
            }));
        }
        let held_count = held.len() as u64;
        placed.push(format!("campaign-{campaign_id}"), versions[c], held);
        versions[c] += held_count;
        written += append(log, placed).await;
        // Payment requested and answered.
        let mut asked = Streams::new();
        for (order_id, _, fails) in &orders {
            let payment_id = PaymentId::from_ulid(order_id.ulid());
            asked.push(
                format!("order-{order_id}"),
                1,
                vec![event(&OrderEvent::OrderAwaitingPayment {
                    payment_id,
                    deadline: now + chrono::Duration::minutes(10),
                    at: now,
                })],
            );
            let answer = if *fails {
                event(&PaymentEvent::PaymentFailed {
                    provider_reference: "psp".into(),
                    at: now,
                })
            } else {
                event(&PaymentEvent::PaymentSucceeded {
                    provider_reference: "psp".into(),
                    at: now,
                })
            };
            asked.push(
                format!("payment-{payment_id}"),
                0,
                vec![
                    event(&PaymentEvent::PaymentRequested {
                        payment_id,
                        order_id: *order_id,
                        amount_cents: amount,
                        deadline: now + chrono::Duration::minutes(10),
                        at: now,
                    }),
                    answer,
                ],
            );
        }
        written += append(log, asked).await;
        // Confirmed and sold, or cancelled and released.
        let mut settled = Streams::new();
        let mut stock = Vec::new();
        for (order_id, user_id, fails) in &orders {
            let payment_id = PaymentId::from_ulid(order_id.ulid());
            let (order_event, stock_event) = if *fails {
                (
                    OrderEvent::OrderCancelled {
                        reason: CancelReason::PaymentFailed,
                        at: now,
                    },
                    CampaignEvent::StockReleased {
                        order_id: *order_id,
                        user_id: *user_id,
                        quantity: 1,
                        reason: CancelReason::PaymentFailed,
                        at: now,
                    },
                )
            } else {
                (
                    OrderEvent::OrderConfirmed {
                        payment_id,
                        at: now,
                    },
                    CampaignEvent::StockSold {
                        order_id: *order_id,
                        user_id: *user_id,
                        quantity: 1,
                        at: now,
                    },
                )
            };
            settled.push(format!("order-{order_id}"), 2, vec![event(&order_event)]);
            stock.push(event(&stock_event));
        }
        let stock_count = stock.len() as u64;
        settled.push(format!("campaign-{campaign_id}"), versions[c], stock);
        versions[c] += stock_count;
        written += append(log, settled).await;
        round += 1;
    }
    written
}

/// Runs `groupbuy args..` under /usr/bin/time; returns (seconds, peak RSS in MiB, stdout).
fn timed(binary: &str, args: &[&str], env: &[(&str, &str)]) -> (f64, f64, String) {
    let started = Instant::now();
    let output = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("peak-rss-kib %M")
        .arg(binary)
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("/usr/bin/time runs");
    let seconds = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let kib: f64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("peak-rss-kib "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in: {stderr}"));
    (
        seconds,
        kib / 1024.0,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let target: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let build = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "groupbuy-gateway",
            "--bin",
            "groupbuy",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .expect("cargo builds the binary");
    assert!(build.success());
    let binary = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/release/groupbuy");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (db, redis, events) = runtime.block_on(async {
        let db = TestDb::new().await;
        let redis = TestRedis::new();
        let started = Instant::now();
        let events = seed(db.log().as_ref(), target).await;
        let seconds = started.elapsed().as_secs_f64();
        // Settle the table as autovacuum would, so it does not run during the measurements.
        sqlx::query("VACUUM ANALYZE events")
            .execute(db.log().pool())
            .await
            .expect("vacuum");
        println!(
            "seeded {events} events in {seconds:.1} s ({:.0} events/s)",
            events as f64 / seconds
        );
        (db, redis, events)
    });
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("REDIS_URL", redis.url.as_str()),
        ("GROUPBUY_REDIS_PREFIX", redis.prefix.as_str()),
    ];
    let without_redis = [("DATABASE_URL", db.url.as_str())];
    println!("| command | median wall | events/s | peak RSS |");
    println!("|---|---:|---:|---:|");
    let report =
        |label: &str, args: &[&str], env: &[(&str, &str)], runs: usize, check: &dyn Fn(&str)| {
            let mut seconds = Vec::new();
            let mut memory = Vec::new();
            for _ in 0..runs {
                let (s, m, out) = timed(binary, args, env);
                check(&out);
                seconds.push(s);
                memory.push(m);
            }
            let s = median(seconds);
            println!(
                "| {label} | {s:.1} s | {:.0} | {:.0} MiB |",
                events as f64 / s,
                median(memory)
            );
        };
    let passes = |out: &str| assert!(out.contains("\"ok\": true"), "the audit failed: {out}");
    report(
        "audit, log only (replay)",
        &["audit", "--json"],
        &without_redis,
        runs,
        &passes,
    );
    report(
        "rebuild orders",
        &["projections", "rebuild", "orders", "--quiet"],
        &env,
        runs,
        &|_| {},
    );
    report(
        "rebuild campaigns",
        &["projections", "rebuild", "campaigns", "--quiet"],
        &env,
        runs,
        &|_| {},
    );
    report(
        "audit, with read models compared",
        &["audit", "--json"],
        &env,
        1,
        &passes,
    );
    drop(runtime);
    drop(redis);
    drop(db);
}
