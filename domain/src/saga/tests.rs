use std::collections::BTreeMap;

use chrono::TimeZone;
use proptest::prelude::*;

use super::*;
use crate::campaign::{CampaignAggregate, CampaignCreated, CampaignEvent};
use crate::holding::Held;
use crate::order::Order;
use crate::payment::Payment;
use crate::{CampaignId, Cents, StoreId, UserId};

fn at(seconds: i64) -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000 + seconds, 0)
        .unwrap()
}

fn order(status: OrderStatus) -> Order {
    order_of(1, 1, 2, status)
}

fn order_of(n: u64, user: u64, quantity: u32, status: OrderStatus) -> Order {
    Order {
        order_id: OrderId::from_ulid(ulid::Ulid::from_parts(1, n.into())),
        user_id: UserId::from_ulid(ulid::Ulid::from_parts(2, user.into())),
        campaign_id: campaign_id(),
        quantity,
        unit_price_cents: Cents::new(500),
        amount_cents: Cents::new(500 * u64::from(quantity)),
        status,
        rejection: None,
        cancellation: None,
        payment_id: None,
        payment_deadline: None,
        created_at: at(0),
        updated_at: at(0),
    }
}

fn campaign_id() -> CampaignId {
    CampaignId::from_ulid(ulid::Ulid::from_parts(1, 3))
}

fn cancelled(reason: CancelReason) -> Order {
    Order {
        cancellation: Some(reason),
        ..order(OrderStatus::Cancelled)
    }
}

fn payment(status: PaymentStatus) -> Payment {
    let o = order(OrderStatus::Pending);
    Payment {
        payment_id: payment_id_of(o.order_id),
        order_id: o.order_id,
        amount_cents: o.amount_cents,
        deadline: at(60),
        status,
        provider_reference: None,
        updated_at: None,
    }
}

fn step(
    order: &Order,
    held: Option<ReservationState>,
    payment_status: Option<PaymentStatus>,
    now: i64,
) -> Plan {
    let payment = payment_status.map(payment);
    plan(order, held, None, payment.as_ref(), 60, at(now))
}

// --- plan ---

#[test]
fn a_placed_order_reserves_then_awaits_its_payment() {
    let pending = order(OrderStatus::Pending);
    assert_eq!(
        step(&pending, None, None, 1),
        Plan::Act(Action::ReserveStock)
    );
    assert_eq!(
        step(&pending, Some(ReservationState::Reserved), None, 1),
        Plan::Act(Action::AwaitPayment {
            payment_id: payment_id_of(pending.order_id),
            deadline: at(61),
        })
    );
    // An older log requested the payment in a stream of its own before the order moved: the
    // order awaits that payment, with its deadline.
    assert_eq!(
        step(
            &pending,
            Some(ReservationState::Reserved),
            Some(PaymentStatus::Pending),
            5
        ),
        Plan::Act(Action::AwaitPayment {
            payment_id: payment_id_of(pending.order_id),
            deadline: at(60),
        })
    );
}

#[test]
fn a_placed_order_whose_reservation_was_refused_is_rejected_for_that_reason() {
    let pending = order(OrderStatus::Pending);
    for reason in [
        RejectReason::SoldOut,
        RejectReason::LimitExceeded,
        RejectReason::CampaignNotOpen,
    ] {
        assert_eq!(
            plan(&pending, None, Some(reason), None, 60, at(1)),
            Plan::Act(Action::RejectOrder(reason))
        );
    }
}

#[test]
fn an_awaiting_order_waits_for_its_deadline_then_times_the_payment_out() {
    let awaiting = order(OrderStatus::AwaitingPayment);
    let reserved = Some(ReservationState::Reserved);
    let pending = Some(PaymentStatus::Pending);
    assert_eq!(
        step(&awaiting, reserved, pending, 59),
        Plan::WaitUntil(at(60))
    );
    assert_eq!(
        step(&awaiting, reserved, pending, 60),
        Plan::Act(Action::TimeOutPayment)
    );
    assert_eq!(
        step(&awaiting, reserved, Some(PaymentStatus::TimedOut), 61),
        Plan::Act(Action::CancelOrder(CancelReason::PaymentTimeout))
    );
}

#[test]
fn a_paid_order_is_confirmed_before_its_units_are_sold() {
    let reserved = Some(ReservationState::Reserved);
    let paid = Some(PaymentStatus::Succeeded);
    let awaiting = order(OrderStatus::AwaitingPayment);
    assert_eq!(
        step(&awaiting, reserved, paid, 5),
        Plan::Act(Action::ConfirmOrder(payment_id_of(awaiting.order_id)))
    );
    let confirmed = order(OrderStatus::Confirmed);
    assert_eq!(
        step(&confirmed, reserved, paid, 5),
        Plan::Act(Action::SellStock)
    );
    assert_eq!(
        step(&confirmed, Some(ReservationState::Sold), paid, 5),
        Plan::Done
    );
}

#[test]
fn a_failed_payment_cancels_the_order_then_releases_its_units() {
    let reserved = Some(ReservationState::Reserved);
    let failed = Some(PaymentStatus::Failed);
    assert_eq!(
        step(&order(OrderStatus::AwaitingPayment), reserved, failed, 5),
        Plan::Act(Action::CancelOrder(CancelReason::PaymentFailed))
    );
    let cancelled = cancelled(CancelReason::PaymentFailed);
    assert_eq!(
        step(&cancelled, reserved, failed, 5),
        Plan::Act(Action::ReleaseStock(CancelReason::PaymentFailed))
    );
    assert_eq!(step(&cancelled, None, failed, 5), Plan::Done);
}

#[test]
fn a_customer_cancel_releases_and_a_late_success_is_refunded() {
    let by_customer = cancelled(CancelReason::Customer);
    let reserved = Some(ReservationState::Reserved);
    assert_eq!(
        step(&by_customer, reserved, Some(PaymentStatus::Pending), 5),
        Plan::Act(Action::ReleaseStock(CancelReason::Customer))
    );
    // Released, the payment still open: it times out at its deadline like any other.
    assert_eq!(
        step(&by_customer, None, Some(PaymentStatus::Pending), 5),
        Plan::WaitUntil(at(60))
    );
    assert_eq!(
        step(&by_customer, None, Some(PaymentStatus::Succeeded), 5),
        Plan::Act(Action::RefundPayment)
    );
    assert_eq!(
        step(&by_customer, None, Some(PaymentStatus::Refunded), 5),
        Plan::Done
    );
    // Cancelled before anything was reserved: nothing to undo.
    assert_eq!(step(&by_customer, None, None, 5), Plan::Done);
}

#[test]
fn a_success_after_the_timeout_is_refunded() {
    let timed_out = cancelled(CancelReason::PaymentTimeout);
    assert_eq!(
        step(&timed_out, None, Some(PaymentStatus::Succeeded), 90),
        Plan::Act(Action::RefundPayment)
    );
}

#[test]
fn a_rejected_order_is_done() {
    assert_eq!(
        step(&order(OrderStatus::Rejected), None, None, 1),
        Plan::Done
    );
}

// --- advance: every step of a wake-up, in memory ---

fn campaign_with(quota: u32, per_user_limit: u32) -> Campaign {
    CampaignAggregate::fold(&[CampaignEvent::CampaignCreated(CampaignCreated {
        campaign_id: campaign_id(),
        store_id: StoreId::from_ulid(ulid::Ulid::from_parts(1, 4)),
        sku: "IPA".into(),
        title: "IPA".into(),
        price_cents: Cents::new(500),
        quota,
        per_user_limit,
        starts_at: at(0),
        ends_at: at(10_000),
        payment_timeout_seconds: 60,
        stock_buckets: 1,
        created_at: at(0),
    })])
    .unwrap()
}

fn facts(order: Order) -> OrderFacts {
    OrderFacts {
        order: Some(order),
        ..OrderFacts::default()
    }
}

fn bucket(campaign: &Campaign, available_units: u32) -> Bucket<'_> {
    Bucket {
        campaign,
        bucket: 0,
        available_units,
        more_elsewhere: false,
    }
}

fn advanced(wake: Result<Wake, DomainError>) -> Advanced {
    match wake {
        Ok(Wake::Advanced(advanced)) => advanced,
        other => panic!("expected the order to move on, got {other:?}"),
    }
}

#[test]
fn a_placed_order_is_reserved_and_awaits_payment_in_one_wake_up() {
    let campaign = campaign_with(10, 3);
    let placed = order(OrderStatus::Pending);
    let mut facts = facts(placed.clone());
    let mut bucket = bucket(&campaign, 10);
    let moved = advanced(advance(&mut facts, &mut bucket, at(5)));
    assert_eq!(
        moved.steps,
        [SagaStep::ReserveStock, SagaStep::AwaitPayment]
    );
    assert_eq!((moved.reserved_units, moved.released_units), (2, 0));
    assert_eq!(bucket.available_units, 8);
    assert_eq!(moved.next, Next::WaitUntil(at(65)));
    assert_eq!(moved.holding.len(), 1);
    // The order's move is the request: the payment's stream starts with its first answer.
    assert!(moved.payment.is_empty());
    assert_eq!(
        moved.order,
        [OrderEvent::OrderAwaitingPayment {
            payment_id: payment_id_of(placed.order_id),
            deadline: at(65),
            at: at(5),
        }]
    );
    assert_eq!(
        facts.holding.of(placed.order_id),
        Some(ReservationState::Reserved)
    );
    let order = facts.order.unwrap();
    assert_eq!(order.status, OrderStatus::AwaitingPayment);
    assert_eq!(facts.payment, Payment::requested_by(&order));
    assert_eq!(facts.payment.unwrap().status, PaymentStatus::Pending);
}

#[test]
fn an_order_the_stock_cannot_cover_is_rejected_sold_out() {
    let campaign = campaign_with(10, 3);
    let mut facts = facts(order(OrderStatus::Pending));
    let mut bucket = bucket(&campaign, 1);
    let moved = advanced(advance(&mut facts, &mut bucket, at(5)));
    assert_eq!(moved.steps, [SagaStep::RejectOrder]);
    assert_eq!(
        moved.order,
        [OrderEvent::OrderRejected {
            reason: RejectReason::SoldOut,
            at: at(5)
        }]
    );
    assert!(moved.holding.is_empty() && moved.payment.is_empty());
    assert_eq!(moved.next, Next::Done);
    assert_eq!(bucket.available_units, 1);
}

#[test]
fn an_order_a_short_bucket_cannot_cover_asks_for_units_when_other_buckets_may_have_some() {
    let campaign = campaign_with(10, 3);
    let placed = order(OrderStatus::Pending);
    let mut facts = facts(placed.clone());
    let mut bucket = Bucket {
        more_elsewhere: true,
        ..bucket(&campaign, 1)
    };
    assert_eq!(
        advance(&mut facts, &mut bucket, at(5)),
        Ok(Wake::NeedsUnits(2))
    );
    assert_eq!(facts.order, Some(placed), "nothing changed");
    assert_eq!(facts.holding, Holding::default(), "nothing changed");
    assert_eq!(bucket.available_units, 1);
}

#[test]
fn an_order_over_the_customers_limit_is_rejected_limit_exceeded() {
    let campaign = campaign_with(10, 3);
    let mut facts = facts(order(OrderStatus::Pending));
    let other = OrderId::from_ulid(ulid::Ulid::from_parts(9, 9));
    facts.holding = Holding {
        live_units: 2,
        orders: imbl::OrdMap::from(vec![(
            other,
            Held {
                quantity: 2,
                state: ReservationState::Sold,
            },
        )]),
    };
    let moved = advanced(advance(&mut facts, &mut bucket(&campaign, 10), at(5)));
    assert_eq!(
        moved.order,
        [OrderEvent::OrderRejected {
            reason: RejectReason::LimitExceeded,
            at: at(5)
        }]
    );
}

#[test]
fn an_order_outside_the_sales_window_is_rejected_campaign_not_open() {
    let campaign = campaign_with(10, 3);
    let mut facts = facts(order(OrderStatus::Pending));
    let moved = advanced(advance(&mut facts, &mut bucket(&campaign, 10), at(20_000)));
    assert_eq!(
        moved.order,
        [OrderEvent::OrderRejected {
            reason: RejectReason::CampaignNotOpen,
            at: at(20_000)
        }]
    );
}

/// An order reserved and awaiting payment, as one wake-up leaves it.
fn awaiting(campaign: &Campaign) -> (OrderFacts, u32) {
    let mut facts = facts(order(OrderStatus::Pending));
    let mut bucket = bucket(campaign, 10);
    advanced(advance(&mut facts, &mut bucket, at(5)));
    (facts, bucket.available_units)
}

fn paid(facts: &mut OrderFacts, status: PaymentStatus) {
    let payment = facts.payment.as_mut().unwrap();
    payment.status = status;
}

#[test]
fn a_paid_order_is_confirmed_and_its_units_sold_in_one_wake_up() {
    let campaign = campaign_with(10, 3);
    let (mut facts, available) = awaiting(&campaign);
    paid(&mut facts, PaymentStatus::Succeeded);
    let mut bucket = bucket(&campaign, available);
    let moved = advanced(advance(&mut facts, &mut bucket, at(10)));
    assert_eq!(moved.steps, [SagaStep::ConfirmOrder, SagaStep::SellStock]);
    assert_eq!(moved.next, Next::Done);
    assert_eq!(
        (moved.reserved_units, moved.released_units, moved.sold_units),
        (0, 0, 2)
    );
    let order_id = facts.order.as_ref().unwrap().order_id;
    assert_eq!(facts.holding.of(order_id), Some(ReservationState::Sold));
    assert_eq!(bucket.available_units, 8);
}

#[test]
fn a_failed_payment_cancels_the_order_and_gives_its_units_back_in_one_wake_up() {
    let campaign = campaign_with(10, 3);
    let (mut facts, available) = awaiting(&campaign);
    paid(&mut facts, PaymentStatus::Failed);
    let mut bucket = bucket(&campaign, available);
    let moved = advanced(advance(&mut facts, &mut bucket, at(10)));
    assert_eq!(moved.steps, [SagaStep::CancelOrder, SagaStep::ReleaseStock]);
    assert_eq!(moved.released_units, 2);
    assert_eq!(bucket.available_units, 10);
    assert_eq!(facts.holding.live_units, 0);
    assert_eq!(moved.next, Next::Done);
}

#[test]
fn an_unpaid_order_waits_then_is_timed_out_cancelled_and_released() {
    let campaign = campaign_with(10, 3);
    let (mut facts, available) = awaiting(&campaign);
    let mut bucket = bucket(&campaign, available);
    let early = advanced(advance(&mut facts, &mut bucket, at(30)));
    assert!(early.steps.is_empty());
    assert_eq!(early.next, Next::WaitUntil(at(65)));
    let late = advanced(advance(&mut facts, &mut bucket, at(65)));
    assert_eq!(
        late.steps,
        [
            SagaStep::TimeOutPayment,
            SagaStep::CancelOrder,
            SagaStep::ReleaseStock
        ]
    );
    assert_eq!(late.released_units, 2);
    assert_eq!(
        facts.order.unwrap().cancellation,
        Some(CancelReason::PaymentTimeout)
    );
}

#[test]
fn a_customer_cancel_is_released_and_a_late_success_refunded() {
    let campaign = campaign_with(10, 3);
    let (mut facts, available) = awaiting(&campaign);
    let order = facts.order.as_mut().unwrap();
    order.status = OrderStatus::Cancelled;
    order.cancellation = Some(CancelReason::Customer);
    let mut bucket = bucket(&campaign, available);
    let released = advanced(advance(&mut facts, &mut bucket, at(10)));
    assert_eq!(released.steps, [SagaStep::ReleaseStock]);
    assert_eq!(released.next, Next::WaitUntil(at(65)));
    paid(&mut facts, PaymentStatus::Succeeded);
    let refunded = advanced(advance(&mut facts, &mut bucket, at(20)));
    assert_eq!(refunded.steps, [SagaStep::RefundPayment]);
    assert_eq!(refunded.next, Next::Done);
    assert_eq!(bucket.available_units, 10);
}

#[test]
fn a_wake_up_for_an_order_not_in_the_log_does_nothing() {
    let campaign = campaign_with(10, 3);
    let moved = advanced(advance(
        &mut OrderFacts::default(),
        &mut bucket(&campaign, 10),
        at(1),
    ));
    assert_eq!(moved.next, Next::Unknown);
    assert!(moved.steps.is_empty());
}

#[test]
fn a_finished_order_wakes_up_to_nothing() {
    let campaign = campaign_with(10, 3);
    let (mut facts, available) = awaiting(&campaign);
    paid(&mut facts, PaymentStatus::Succeeded);
    let mut bucket = bucket(&campaign, available);
    advanced(advance(&mut facts, &mut bucket, at(10)));
    let again = advanced(advance(&mut facts, &mut bucket, at(11)));
    assert!(again.steps.is_empty() && again.order.is_empty());
    assert_eq!(again.next, Next::Done);
}

// --- the invariants, over many orders and outcomes ---

/// What happens to an order after it is placed.
#[derive(Clone, Copy, Debug)]
enum Fate {
    Paid,
    Failed,
    CancelledByCustomer,
    TimedOut,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        Just(Fate::Paid),
        Just(Fate::Failed),
        Just(Fate::CancelledByCustomer),
        Just(Fate::TimedOut),
    ]
}

proptest! {
    /// Many customers order at random quantities; orders meet random fates in a random
    /// interleaving. At every step the bucket plus the holdings add up to the quota, and no
    /// customer holds more live units than the limit.
    #[test]
    fn stock_and_the_per_user_limit_hold_whatever_orders_do(
        quota in 1u32..40,
        per_user_limit in 1u32..6,
        orders in proptest::collection::vec((0u64..6, 1u32..4, fate()), 1..60),
        order_of_fates in proptest::collection::vec(any::<prop::sample::Index>(), 0..60),
    ) {
        let campaign = campaign_with(quota, per_user_limit);
        let mut available = quota;
        let mut holdings: BTreeMap<u64, Holding> = BTreeMap::new();
        let mut placed: Vec<(OrderFacts, u64, Fate)> = Vec::new();
        let check = |available: u32, holdings: &BTreeMap<u64, Holding>| {
            let held: u32 = holdings.values().map(|h| h.live_units).sum();
            assert_eq!(available + held, quota, "units do not add up");
            for holding in holdings.values() {
                assert!(holding.live_units <= per_user_limit, "over the limit");
            }
        };
        let wake = |facts: &mut OrderFacts, user: u64, available: &mut u32, holdings: &mut BTreeMap<u64, Holding>, now: i64| {
            facts.holding = holdings.get(&user).cloned().unwrap_or_default();
            let mut bucket = bucket(&campaign, *available);
            advanced(advance(facts, &mut bucket, at(now)));
            *available = bucket.available_units;
            holdings.insert(user, facts.holding.clone());
        };
        for (n, (user, quantity, fate)) in orders.iter().enumerate() {
            let mut facts = facts(order_of(n as u64, *user, *quantity, OrderStatus::Pending));
            wake(&mut facts, *user, &mut available, &mut holdings, 5);
            check(available, &holdings);
            placed.push((facts, *user, *fate));
        }
        let mut pending: Vec<usize> = (0..placed.len()).collect();
        for index in order_of_fates {
            if pending.is_empty() {
                break;
            }
            let i = pending.remove(index.index(pending.len()));
            let (facts, user, fate) = &mut placed[i];
            let Some(order) = facts.order.as_mut() else { continue };
            if order.status != OrderStatus::AwaitingPayment {
                continue;
            }
            let now = match fate {
                Fate::Paid | Fate::Failed => {
                    let status = if matches!(fate, Fate::Paid) { PaymentStatus::Succeeded } else { PaymentStatus::Failed };
                    paid(facts, status);
                    10
                }
                Fate::CancelledByCustomer => {
                    order.status = OrderStatus::Cancelled;
                    order.cancellation = Some(CancelReason::Customer);
                    10
                }
                Fate::TimedOut => 100,
            };
            wake(facts, *user, &mut available, &mut holdings, now);
            check(available, &holdings);
        }
    }
}
