use chrono::TimeZone;
use ulid::Ulid;

use super::*;
use crate::order::Order;
use crate::scenario::given;

fn at(seconds: i64) -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000 + seconds, 0)
        .unwrap()
}

const DEADLINE: i64 = 600;

fn order(n: u64) -> OrderId {
    OrderId::from_ulid(Ulid::from_parts(3, n.into()))
}

fn requested() -> PaymentEvent {
    PaymentEvent::PaymentRequested {
        payment_id: PaymentId::from_ulid(Ulid::from_parts(4, 1)),
        order_id: order(1),
        amount_cents: Cents::new(2_500),
        deadline: at(DEADLINE),
        at: at(0),
    }
}

fn succeed(now: i64) -> PaymentCommand {
    PaymentCommand::Succeed {
        provider_reference: "psp-1".into(),
        now: at(now),
    }
}

fn succeeded(now: i64) -> PaymentEvent {
    PaymentEvent::PaymentSucceeded {
        provider_reference: "psp-1".into(),
        at: at(now),
    }
}

fn fail() -> PaymentCommand {
    PaymentCommand::Fail {
        provider_reference: "psp-1".into(),
        now: at(10),
    }
}

fn failed() -> PaymentEvent {
    PaymentEvent::PaymentFailed {
        provider_reference: "psp-1".into(),
        at: at(10),
    }
}

fn timed_out() -> PaymentEvent {
    PaymentEvent::PaymentTimedOut { at: at(DEADLINE) }
}

fn refund() -> PaymentCommand {
    PaymentCommand::Refund { now: at(900) }
}

fn refunded() -> PaymentEvent {
    PaymentEvent::PaymentRefunded { at: at(900) }
}

// --- the request: the order's, or an older log's `PaymentRequested` ---

fn awaiting_order() -> Order {
    Order {
        order_id: order(1),
        user_id: crate::UserId::from_ulid(Ulid::from_parts(5, 1)),
        campaign_id: crate::CampaignId::from_ulid(Ulid::from_parts(6, 1)),
        quantity: 1,
        unit_price_cents: Cents::new(2_500),
        amount_cents: Cents::new(2_500),
        status: crate::order::OrderStatus::AwaitingPayment,
        rejection: None,
        cancellation: None,
        payment_id: Some(PaymentId::from_ulid(Ulid::from_parts(4, 1))),
        payment_deadline: Some(at(DEADLINE)),
        created_at: at(0),
        updated_at: at(0),
    }
}

#[test]
fn an_order_awaiting_payment_requested_the_payment_an_older_log_recorded_on_its_own() {
    let from_the_order = Payment::requested_by(&awaiting_order()).unwrap();
    let from_the_stream = PaymentAggregate::evolve(None, &requested()).unwrap();
    assert_eq!(from_the_order, from_the_stream);
    assert_eq!(from_the_order.status, PaymentStatus::Pending);
    // An older stream folded onto the order's request stays the same payment.
    assert_eq!(
        PaymentAggregate::evolve(Some(from_the_order.clone()), &requested()),
        Some(from_the_order)
    );
}

#[test]
fn an_order_that_never_awaited_payment_requested_none() {
    let placed = Order {
        status: crate::order::OrderStatus::Pending,
        payment_id: None,
        payment_deadline: None,
        ..awaiting_order()
    };
    assert_eq!(Payment::requested_by(&placed), None);
}

#[test]
fn the_answers_fold_onto_the_payment_its_order_requested() {
    let requested = Payment::requested_by(&awaiting_order());
    let decided = PaymentAggregate::decide(&requested, &succeed(5)).unwrap();
    assert_eq!(decided, [succeeded(5)]);
    let paid = PaymentAggregate::evolve(requested, &succeeded(5)).unwrap();
    assert_eq!(paid.status, PaymentStatus::Succeeded);
    assert_eq!(paid.provider_reference.as_deref(), Some("psp-1"));
    assert_eq!(paid.updated_at, Some(at(5)));
}

#[test]
fn given_nothing_when_settled_then_payment_not_found() {
    for command in [
        succeed(1),
        fail(),
        PaymentCommand::TimeOut { now: at(DEADLINE) },
        refund(),
    ] {
        given::<PaymentAggregate>([])
            .when(command)
            .then_err(DomainError::PaymentNotFound);
    }
}

// --- succeed ---

#[test]
fn given_a_pending_payment_when_the_provider_succeeds_then_payment_succeeded() {
    let payment = given::<PaymentAggregate>([requested()])
        .when(succeed(5))
        .then([succeeded(5)])
        .unwrap();
    assert_eq!(payment.status, PaymentStatus::Succeeded);
    assert_eq!(payment.provider_reference.as_deref(), Some("psp-1"));
}

#[test]
fn given_a_timed_out_payment_when_the_provider_succeeds_late_then_payment_succeeded_to_be_refunded()
{
    given::<PaymentAggregate>([requested(), timed_out()])
        .when(succeed(700))
        .then([succeeded(700)]);
}

#[test]
fn given_a_succeeded_or_refunded_payment_when_the_provider_succeeds_again_then_nothing_happens() {
    given::<PaymentAggregate>([requested(), succeeded(5)])
        .when(succeed(6))
        .then_nothing();
    given::<PaymentAggregate>([requested(), succeeded(5), refunded()])
        .when(succeed(6))
        .then_nothing();
}

#[test]
fn given_a_failed_payment_when_the_provider_succeeds_then_payment_already_final() {
    given::<PaymentAggregate>([requested(), failed()])
        .when(succeed(20))
        .then_err(DomainError::PaymentAlreadyFinal);
}

#[test]
fn given_a_pending_payment_when_succeeded_without_a_reference_then_invalid_input() {
    given::<PaymentAggregate>([requested()])
        .when(PaymentCommand::Succeed {
            provider_reference: "".into(),
            now: at(5),
        })
        .then_err(DomainError::InvalidInput {
            field: "provider_reference",
            problem: "must not be empty",
        });
}

// --- fail ---

#[test]
fn given_a_pending_payment_when_the_provider_fails_then_payment_failed() {
    let payment = given::<PaymentAggregate>([requested()])
        .when(fail())
        .then([failed()])
        .unwrap();
    assert_eq!(payment.status, PaymentStatus::Failed);
}

#[test]
fn given_a_failed_or_timed_out_payment_when_the_provider_fails_then_nothing_happens() {
    given::<PaymentAggregate>([requested(), failed()])
        .when(fail())
        .then_nothing();
    given::<PaymentAggregate>([requested(), timed_out()])
        .when(fail())
        .then_nothing();
}

#[test]
fn given_a_succeeded_payment_when_the_provider_fails_then_payment_already_final() {
    given::<PaymentAggregate>([requested(), succeeded(5)])
        .when(fail())
        .then_err(DomainError::PaymentAlreadyFinal);
}

// --- time out ---

#[test]
fn given_a_pending_payment_when_its_deadline_passes_then_payment_timed_out() {
    let payment = given::<PaymentAggregate>([requested()])
        .when(PaymentCommand::TimeOut { now: at(DEADLINE) })
        .then([timed_out()])
        .unwrap();
    assert_eq!(payment.status, PaymentStatus::TimedOut);
}

#[test]
fn given_a_pending_payment_when_timed_out_before_its_deadline_then_deadline_not_reached() {
    given::<PaymentAggregate>([requested()])
        .when(PaymentCommand::TimeOut {
            now: at(DEADLINE - 1),
        })
        .then_err(DomainError::DeadlineNotReached);
}

#[test]
fn given_a_settled_payment_when_its_deadline_fires_then_nothing_happens() {
    given::<PaymentAggregate>([requested(), succeeded(5)])
        .when(PaymentCommand::TimeOut { now: at(DEADLINE) })
        .then_nothing();
}

// --- refund ---

#[test]
fn given_a_succeeded_payment_when_refunded_then_payment_refunded() {
    let payment = given::<PaymentAggregate>([requested(), timed_out(), succeeded(700)])
        .when(refund())
        .then([refunded()])
        .unwrap();
    assert_eq!(payment.status, PaymentStatus::Refunded);
}

#[test]
fn given_a_refunded_payment_when_refunded_again_then_nothing_happens() {
    given::<PaymentAggregate>([requested(), succeeded(5), refunded()])
        .when(refund())
        .then_nothing();
}

#[test]
fn given_a_payment_that_took_no_money_when_refunded_then_nothing_to_refund() {
    for history in [
        vec![requested()],
        vec![requested(), failed()],
        vec![requested(), timed_out()],
    ] {
        given::<PaymentAggregate>(history)
            .when(refund())
            .then_err(DomainError::NothingToRefund);
    }
}
