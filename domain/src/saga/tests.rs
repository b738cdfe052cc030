use chrono::TimeZone;

use super::*;
use crate::campaign::Reservation;
use crate::order::Order;
use crate::payment::Payment;
use crate::{CampaignId, Cents, UserId};

fn at(seconds: i64) -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000 + seconds, 0)
        .unwrap()
}

fn order(status: OrderStatus) -> Order {
    Order {
        order_id: OrderId::from_ulid(ulid::Ulid::from_parts(1, 1)),
        user_id: UserId::from_ulid(ulid::Ulid::from_parts(1, 2)),
        campaign_id: CampaignId::from_ulid(ulid::Ulid::from_parts(1, 3)),
        quantity: 2,
        unit_price_cents: Cents::new(500),
        amount_cents: Cents::new(1000),
        status,
        rejection: None,
        cancellation: None,
        payment_id: None,
        payment_deadline: None,
        created_at: at(0),
        updated_at: at(0),
    }
}

fn cancelled(reason: CancelReason) -> Order {
    Order {
        cancellation: Some(reason),
        ..order(OrderStatus::Cancelled)
    }
}

fn held(state: ReservationState) -> Reservation {
    Reservation {
        user_id: UserId::from_ulid(ulid::Ulid::from_parts(1, 2)),
        quantity: 2,
        state,
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
        requested_at: at(1),
        updated_at: at(1),
    }
}

fn step(
    order: &Order,
    reservation: Option<ReservationState>,
    payment_status: Option<PaymentStatus>,
    now: i64,
) -> Plan {
    let reservation = reservation.map(held);
    let payment = payment_status.map(payment);
    plan(order, reservation.as_ref(), payment.as_ref(), 60, at(now))
}

#[test]
fn a_placed_order_reserves_then_requests_payment_then_awaits_it() {
    let pending = order(OrderStatus::Pending);
    assert_eq!(
        step(&pending, None, None, 1),
        Plan::Act(Action::ReserveStock)
    );
    assert_eq!(
        step(&pending, Some(ReservationState::Reserved), None, 1),
        Plan::Act(Action::RequestPayment {
            payment_id: payment_id_of(pending.order_id),
            deadline: at(61),
        })
    );
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
    assert_eq!(
        step(&cancelled, Some(ReservationState::Released), failed, 5),
        Plan::Done
    );
}

#[test]
fn a_customer_cancel_releases_and_a_late_success_is_refunded() {
    let by_customer = cancelled(CancelReason::Customer);
    let reserved = Some(ReservationState::Reserved);
    let released = Some(ReservationState::Released);
    assert_eq!(
        step(&by_customer, reserved, Some(PaymentStatus::Pending), 5),
        Plan::Act(Action::ReleaseStock(CancelReason::Customer))
    );
    // Released, the payment still open: it times out at its deadline like any other.
    assert_eq!(
        step(&by_customer, released, Some(PaymentStatus::Pending), 5),
        Plan::WaitUntil(at(60))
    );
    assert_eq!(
        step(&by_customer, released, Some(PaymentStatus::Succeeded), 5),
        Plan::Act(Action::RefundPayment)
    );
    assert_eq!(
        step(&by_customer, released, Some(PaymentStatus::Refunded), 5),
        Plan::Done
    );
    // Cancelled before anything was reserved: nothing to undo.
    assert_eq!(step(&by_customer, None, None, 5), Plan::Done);
}

#[test]
fn a_success_after_the_timeout_is_refunded() {
    let timed_out = cancelled(CancelReason::PaymentTimeout);
    assert_eq!(
        step(
            &timed_out,
            Some(ReservationState::Released),
            Some(PaymentStatus::Succeeded),
            90
        ),
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

#[test]
fn the_saga_records_each_step_once() {
    let order_id = order(OrderStatus::Pending).order_id;
    let record = |step| OrderSagaCommand::Record {
        order_id,
        step,
        now: at(1),
    };
    let events = OrderSagaAggregate::decide(&None, &record(SagaStep::ReserveStock)).unwrap();
    let state = OrderSagaAggregate::fold(&events);
    assert_eq!(state.as_ref().unwrap().steps, [SagaStep::ReserveStock]);
    assert!(
        OrderSagaAggregate::decide(&state, &record(SagaStep::ReserveStock))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        OrderSagaAggregate::decide(&state, &record(SagaStep::RequestPayment))
            .unwrap()
            .len(),
        1
    );
}
