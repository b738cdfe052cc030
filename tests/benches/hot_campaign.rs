//! A flash sale on one hot campaign, through the real HTTP gateway on the real services
//! (Postgres, JetStream, the saga, the simulated payment provider answering at once).
//!
//! `cargo bench -p groupbuy-tests --bench hot_campaign`
//!
//! `clients` customers each place orders back to back for the run's duration, every one with
//! `Prefer: wait=10`, so a request returns when the saga has decided the order (reserved and
//! awaiting payment, confirmed, or rejected). Reported: decided orders per second, the decision
//! latency each customer saw (p50 / p99), and how long the last orders took to be confirmed.
//! Each configuration runs three times; the table shows medians.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway::app::Payments;
use harness::{spawn_app_configured, Backend, TestApp, OPERATOR_TOKEN};
use serde_json::{json, Value};

const RUNS: usize = 3;

struct Run {
    decided_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    confirmed: usize,
    settle_ms: f64,
}

async fn campaign(app: &TestApp) -> Value {
    let store = app.create_store().await;
    let now = chrono::Utc::now();
    let body = json!({
        "store_id": store["store_id"], "sku": "HOT-1", "title": "The hot one",
        "price_cents": 500, "quota": 1_000_000, "per_user_limit": 10_000,
        "starts_at": now - chrono::Duration::minutes(1),
        "ends_at": now + chrono::Duration::hours(1),
        "payment_timeout_seconds": 600,
    });
    let response = app.post("/v1/campaigns", OPERATOR_TOKEN, None, &body).await;
    response.json().await.unwrap()
}

async fn run(clients: usize, seconds: u64) -> Run {
    let app = Arc::new(
        spawn_app_configured(
            Backend::Postgres,
            // The engine is measured here, not the rate limits.
            gateway::overload::Limits {
                rate_limits: gateway::rate_limit::RateLimits::NONE,
                ..Default::default()
            },
            Payments::Simulated {
                delay: Duration::ZERO,
                failure_rate: 0.0,
            },
        )
        .await,
    );
    let campaign = Arc::new(campaign(&app).await);
    let mut tokens = Vec::new();
    for i in 0..clients {
        tokens.push(app.create_user(&format!("buyer {i}")).await.1);
    }
    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let (app, campaign) = (Arc::clone(&app), Arc::clone(&campaign));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut ids = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    let response = app
                        .client
                        .post(format!("{}/v1/orders", app.address))
                        .bearer_auth(&token)
                        .header("Idempotency-Key", ulid::Ulid::new().to_string())
                        .header("Prefer", "wait=10")
                        .json(&json!({"campaign_id": campaign["campaign_id"], "quantity": 1}))
                        .send()
                        .await
                        .unwrap();
                    let order: Value = response.json().await.unwrap();
                    assert_ne!(order["status"], "pending", "not decided in 10 s: {order}");
                    latencies.push(sent.elapsed().as_secs_f64() * 1e3);
                    ids.push((
                        token.clone(),
                        order["order_id"].as_str().unwrap().to_owned(),
                    ));
                }
                (latencies, ids)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut orders = Vec::new();
    for task in tasks {
        let (l, o) = task.await.unwrap();
        latencies.extend(l);
        orders.extend(o);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    // Every order goes on to confirmed; time how long the last one takes after the load.
    let load_ended = Instant::now();
    let mut confirmed = 0;
    for (token, id) in &orders {
        let final_order = app.wait_for_status(token, id, "confirmed").await;
        assert_eq!(final_order["status"], "confirmed");
        confirmed += 1;
    }
    Run {
        decided_per_second: orders.len() as f64 / elapsed,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        confirmed,
        settle_ms: load_ended.elapsed().as_secs_f64() * 1e3,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: there they only
    // need to build. Measuring is for `cargo bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("not measuring: run with `cargo bench`");
        return;
    }
    println!("| clients, 10 s each | decided orders/s | decision p50 | decision p99 | confirmed | last confirmed after load |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let configurations: Vec<usize> = match std::env::var("BENCH_CLIENTS") {
        Ok(list) => list
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect(),
        Err(_) => vec![16, 64],
    };
    for clients in configurations {
        let mut runs = Vec::new();
        for _ in 0..RUNS {
            runs.push(run(clients, 10).await);
        }
        let pick = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {clients} | {:.0} | {:.1} ms | {:.1} ms | {:.0} | {:.0} ms |",
            pick(|r| r.decided_per_second),
            pick(|r| r.p50_ms),
            pick(|r| r.p99_ms),
            pick(|r| r.confirmed as f64),
            pick(|r| r.settle_ms),
        );
    }
}
