//! What deciding, caching and snapshotting a campaign costs with 1 000 and with 1 000 000
//! orders behind it: the campaign writer's state is counters, so the two sizes cost the same.
//! For comparison, the same operations on the state of the design before (every reservation
//! and every customer's units in the campaign, cloned on each decision and serialised whole in
//! each snapshot), emulated by its two maps.
//!
//! A customer's holding is the other state a writer decides on: it copies the holding of each
//! customer of a batch from its cache, and decides on the copy. It is timed with 1 and with
//! 1 000 live orders, beside the same copy of the `BTreeMap` it was before.
//!
//! `cargo bench -p groupbuy-sagas --bench campaign_state`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use chrono::{TimeZone, Utc};
use domain::campaign::{Campaign, CampaignAggregate, CampaignCreated, CampaignEvent};
use domain::holding::{Held, Holding, ReservationState};
use domain::order::{Order, OrderStatus};
use domain::saga::{advance, Bucket, OrderFacts};
use domain::{Aggregate, CampaignId, Cents, OrderId, StoreId, UserId};
use ulid::Ulid;

/// Operations timed per measurement; the median of [`RUNS`] measurements is reported.
const OPERATIONS: u32 = 2_000;
const RUNS: usize = 7;

/// A campaign that has decided `orders` orders, in batches of 256, as its writer left it.
fn campaign_after(orders: u64) -> Campaign {
    let at = Utc.timestamp_opt(1_700_000_000, 0).unwrap();
    let quota = 10_000_000;
    let mut events = vec![CampaignEvent::CampaignCreated(CampaignCreated {
        campaign_id: CampaignId::from_ulid(Ulid::from_parts(1, 1)),
        store_id: StoreId::from_ulid(Ulid::from_parts(1, 2)),
        sku: "IPA".into(),
        title: "IPA".into(),
        price_cents: Cents::new(500),
        quota,
        per_user_limit: 5,
        starts_at: at,
        ends_at: at + chrono::Duration::days(30),
        payment_timeout_seconds: 600,
        stock_buckets: 1,
        created_at: at,
    })];
    let mut left = orders;
    while left > 0 {
        let batch = left.min(256) as u32;
        events.push(CampaignEvent::StockMoved {
            reserved: batch,
            released: 0,
            sold: batch / 2,
            at,
        });
        left -= u64::from(batch);
    }
    CampaignAggregate::fold(&events).expect("created")
}

/// The previous design's per-order and per-customer maps for `orders` orders.
type Before = (BTreeMap<OrderId, (UserId, u32, u8)>, BTreeMap<UserId, u32>);

fn before_after(orders: u64) -> Before {
    let mut reservations = BTreeMap::new();
    let mut holdings = BTreeMap::new();
    for n in 0..orders {
        let user = UserId::from_ulid(Ulid::from_parts(2, u128::from(n / 3)));
        reservations.insert(
            OrderId::from_ulid(Ulid::from_parts(3, n.into())),
            (user, 1, 0),
        );
        *holdings.entry(user).or_insert(0) += 1;
    }
    (reservations, holdings)
}

/// Nanoseconds per call of `op`, the median of several measurements.
fn time(mut op: impl FnMut()) -> f64 {
    let mut runs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..OPERATIONS {
                op();
            }
            started.elapsed().as_nanos() as f64 / f64::from(OPERATIONS)
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn new_order(campaign: &Campaign, n: u64) -> Order {
    let at = Utc.timestamp_opt(1_700_000_100, 0).unwrap();
    Order {
        order_id: OrderId::from_ulid(Ulid::from_parts(9, n.into())),
        user_id: UserId::from_ulid(Ulid::from_parts(8, n.into())),
        campaign_id: campaign.campaign_id,
        quantity: 1,
        unit_price_cents: Cents::new(500),
        amount_cents: Cents::new(500),
        status: OrderStatus::Pending,
        rejection: None,
        cancellation: None,
        payment_id: None,
        payment_deadline: None,
        created_at: at,
        updated_at: at,
    }
}

fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: there they only
    // need to build. Measuring is for `cargo bench`.
    if !std::env::args().any(|arg| arg == "--bench") {
        eprintln!("not measuring: run with `cargo bench`");
        return;
    }
    let now = Utc.timestamp_opt(1_700_000_100, 0).unwrap();
    println!(
        "| orders behind the campaign | decide one order | cache (clone) | snapshot (serialise) |"
    );
    println!("|---:|---:|---:|---:|");
    for orders in [1_000u64, 1_000_000] {
        let campaign = campaign_after(orders);
        let mut n = 0;
        let decide = time(|| {
            n += 1;
            let mut facts = OrderFacts {
                order: Some(new_order(&campaign, n)),
                holding: Holding::default(),
                payment: None,
            };
            let mut bucket = Bucket {
                campaign: &campaign,
                bucket: 0,
                available_units: campaign.available_units,
                more_elsewhere: false,
            };
            black_box(advance(&mut facts, &mut bucket, now).expect("decides"));
        });
        let cache = time(|| {
            black_box(campaign.clone());
        });
        let snapshot = time(|| {
            black_box(serde_json::to_vec(&campaign).expect("serialises"));
        });
        println!("| {orders} | {decide:.0} ns | {cache:.0} ns | {snapshot:.0} ns |");
    }
    println!();
    println!(
        "The design before, emulated by its maps of every reservation and every customer's units:"
    );
    println!();
    println!("| orders behind the campaign | cache (clone) | snapshot (serialise) |");
    println!("|---:|---:|---:|");
    for orders in [1_000u64, 1_000_000] {
        let before = before_after(orders);
        let runs_for = |orders: u64| if orders > 10_000 { 3 } else { OPERATIONS };
        let timed = |op: &mut dyn FnMut()| {
            let count = runs_for(orders);
            let started = Instant::now();
            for _ in 0..count {
                op();
            }
            started.elapsed().as_nanos() as f64 / f64::from(count)
        };
        let cache = timed(&mut || {
            black_box(before.clone());
        });
        let snapshot = timed(&mut || {
            let reservations: Vec<_> = before.0.iter().collect();
            black_box(serde_json::to_vec(&(reservations, &before.1)).expect("serialises"));
        });
        println!("| {orders} | {cache:.0} ns | {snapshot:.0} ns |");
    }
    println!();
    println!("A customer's holding, copied for a batch and then holding one more order:");
    println!();
    println!("| live orders of the customer | holding (persistent map) | a `BTreeMap` of them |");
    println!("|---:|---:|---:|");
    let held = Held {
        quantity: 1,
        state: ReservationState::Reserved,
    };
    for orders in [1u64, 1_000] {
        let ids = (0..orders).map(|n| OrderId::from_ulid(Ulid::from_parts(3, n.into())));
        let holding = Holding {
            live_units: orders as u32,
            orders: ids.clone().map(|id| (id, held)).collect(),
        };
        let map: BTreeMap<OrderId, Held> = ids.map(|id| (id, held)).collect();
        let next = OrderId::from_ulid(Ulid::from_parts(4, 1));
        let persistent = time(|| {
            let mut copy = holding.clone();
            copy.orders.insert(next, held);
            black_box(copy);
        });
        let tree = time(|| {
            let mut copy = map.clone();
            copy.insert(next, held);
            black_box(copy);
        });
        println!("| {orders} | {persistent:.0} ns | {tree:.0} ns |");
    }
}
