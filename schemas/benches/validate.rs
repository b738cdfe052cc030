//! What checking an event against its schema costs: every append checks each new event, and
//! every read of the log (the relay's above all) checks each stored one. Times `validate` on an
//! `OrderPlaced` and an `OrderAwaitingPayment` as the log holds them, and on a broken one,
//! which has to name its problems.
//!
//! `cargo bench -p groupbuy-schemas --bench validate`

use std::hint::black_box;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use domain::order::OrderEvent;
use domain::{CampaignId, Cents, OrderId, PaymentId, UserId};
use schemas::Registry;
use ulid::Ulid;

/// Checks timed per measurement; the median of [`RUNS`] measurements is reported.
const CHECKS: u32 = 20_000;
const RUNS: usize = 7;

fn median_ns(mut run: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..CHECKS {
                run();
            }
            started.elapsed().as_nanos() as f64 / f64::from(CHECKS)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn main() {
    let at = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let id = |n| Ulid::from_parts(n, 1);
    let placed = schemas::encode(&OrderEvent::OrderPlaced {
        order_id: OrderId::from_ulid(id(1)),
        user_id: UserId::from_ulid(id(2)),
        campaign_id: CampaignId::from_ulid(id(3)),
        quantity: 2,
        unit_price_cents: Cents::new(1_250),
        amount_cents: Cents::new(2_500),
        placed_at: at,
    })
    .unwrap();
    let awaiting = schemas::encode(&OrderEvent::OrderAwaitingPayment {
        payment_id: PaymentId::from_ulid(id(4)),
        deadline: at,
        at,
    })
    .unwrap();
    let mut broken = placed.data.clone();
    broken["quantity"] = "two".into();

    let registry = Registry::global();
    println!("validate, median of {RUNS} runs of {CHECKS}:");
    for (name, event_type, data) in [
        ("OrderPlaced", &placed.event_type, &placed.data),
        ("OrderAwaitingPayment", &awaiting.event_type, &awaiting.data),
        ("OrderPlaced, broken", &placed.event_type, &broken),
    ] {
        let ns = median_ns(|| {
            let _ = black_box(registry.validate(event_type, 1, black_box(data)));
        });
        println!("  {name:<24} {ns:>8.0} ns");
    }
}
