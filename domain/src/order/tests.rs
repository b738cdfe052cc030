use chrono::TimeZone;
use ulid::Ulid;

use super::*;
use crate::scenario::given;

fn at(seconds: i64) -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000 + seconds, 0)
        .unwrap()
}

fn payment(n: u64) -> PaymentId {
    PaymentId::from_ulid(Ulid::from_parts(4, n.into()))
}

fn place(quantity: u32, unit_price_cents: u64) -> OrderCommand {
    OrderCommand::Place {
        order_id: OrderId::from_ulid(Ulid::from_parts(3, 1)),
        user_id: UserId::from_ulid(Ulid::from_parts(2, 1)),
        campaign_id: CampaignId::from_ulid(Ulid::from_parts(1, 1)),
        quantity,
        unit_price_cents: Cents::new(unit_price_cents),
        now: at(0),
    }
}

fn placed() -> OrderEvent {
    OrderEvent::OrderPlaced {
        order_id: OrderId::from_ulid(Ulid::from_parts(3, 1)),
        user_id: UserId::from_ulid(Ulid::from_parts(2, 1)),
        campaign_id: CampaignId::from_ulid(Ulid::from_parts(1, 1)),
        quantity: 2,
        unit_price_cents: Cents::new(1_250),
        amount_cents: Cents::new(2_500),
        placed_at: at(0),
    }
}

fn awaiting(n: u64) -> OrderEvent {
    OrderEvent::OrderAwaitingPayment {
        payment_id: payment(n),
        deadline: at(600),
        at: at(1),
    }
}

fn confirmed() -> OrderEvent {
    OrderEvent::OrderConfirmed {
        payment_id: payment(1),
        at: at(2),
    }
}

fn rejected() -> OrderEvent {
    OrderEvent::OrderRejected {
        reason: RejectReason::SoldOut,
        at: at(1),
    }
}

fn cancelled() -> OrderEvent {
    OrderEvent::OrderCancelled {
        reason: CancelReason::Customer,
        at: at(2),
    }
}

fn await_payment(n: u64) -> OrderCommand {
    OrderCommand::AwaitPayment {
        payment_id: payment(n),
        deadline: at(600),
        now: at(1),
    }
}

fn confirm(n: u64) -> OrderCommand {
    OrderCommand::Confirm {
        payment_id: payment(n),
        now: at(2),
    }
}

fn reject() -> OrderCommand {
    OrderCommand::Reject {
        reason: RejectReason::SoldOut,
        now: at(1),
    }
}

fn cancel() -> OrderCommand {
    OrderCommand::Cancel {
        reason: CancelReason::Customer,
        now: at(2),
    }
}

// --- place ---

#[test]
fn given_nothing_when_placed_then_order_placed_pending_with_its_amount() {
    let order = given::<OrderAggregate>([])
        .when(place(2, 1_250))
        .then([placed()])
        .unwrap();
    assert_eq!(order.status, OrderStatus::Pending);
    assert_eq!(order.amount_cents, Cents::new(2_500));
}

#[test]
fn given_an_order_when_placed_again_then_order_already_exists() {
    given::<OrderAggregate>([placed()])
        .when(place(2, 1_250))
        .then_err(DomainError::OrderAlreadyExists);
}

#[test]
fn given_nothing_when_placed_for_zero_units_then_invalid_input() {
    given::<OrderAggregate>([])
        .when(place(0, 1_250))
        .then_err(DomainError::InvalidInput {
            field: "quantity",
            problem: "must be between 1 and 10000",
        });
}

#[test]
fn given_nothing_when_placed_for_an_amount_that_overflows_then_invalid_input() {
    given::<OrderAggregate>([])
        .when(place(10, u64::MAX / 2))
        .then_err(DomainError::InvalidInput {
            field: "quantity",
            problem: "makes the amount too large",
        });
}

#[test]
fn given_nothing_when_any_step_but_place_then_order_not_found() {
    for command in [reject(), await_payment(1), confirm(1), cancel()] {
        given::<OrderAggregate>([])
            .when(command)
            .then_err(DomainError::OrderNotFound);
    }
}

// --- reject ---

#[test]
fn given_a_pending_order_when_rejected_then_order_rejected_with_its_reason() {
    let order = given::<OrderAggregate>([placed()])
        .when(reject())
        .then([rejected()])
        .unwrap();
    assert_eq!(
        (order.status, order.rejection),
        (OrderStatus::Rejected, Some(RejectReason::SoldOut))
    );
}

#[test]
fn given_a_rejected_order_when_rejected_again_then_nothing_happens() {
    given::<OrderAggregate>([placed(), rejected()])
        .when(reject())
        .then_nothing();
}

#[test]
fn given_an_order_awaiting_payment_when_rejected_then_order_not_ready() {
    given::<OrderAggregate>([placed(), awaiting(1)])
        .when(reject())
        .then_err(DomainError::OrderNotReady);
}

#[test]
fn given_a_cancelled_order_when_rejected_then_order_already_final() {
    given::<OrderAggregate>([placed(), cancelled()])
        .when(reject())
        .then_err(DomainError::OrderAlreadyFinal);
}

// --- await payment ---

#[test]
fn given_a_pending_order_when_payment_is_requested_then_order_awaits_payment() {
    let order = given::<OrderAggregate>([placed()])
        .when(await_payment(1))
        .then([awaiting(1)])
        .unwrap();
    assert_eq!(order.status, OrderStatus::AwaitingPayment);
    assert_eq!(order.payment_id, Some(payment(1)));
}

#[test]
fn given_an_order_awaiting_a_payment_when_the_same_payment_is_requested_then_nothing_happens() {
    given::<OrderAggregate>([placed(), awaiting(1)])
        .when(await_payment(1))
        .then_nothing();
}

#[test]
fn given_an_order_awaiting_a_payment_when_another_payment_is_requested_then_order_not_ready() {
    given::<OrderAggregate>([placed(), awaiting(1)])
        .when(await_payment(2))
        .then_err(DomainError::OrderNotReady);
}

#[test]
fn given_a_cancelled_order_when_payment_is_requested_then_order_already_final() {
    given::<OrderAggregate>([placed(), cancelled()])
        .when(await_payment(1))
        .then_err(DomainError::OrderAlreadyFinal);
}

// --- confirm ---

#[test]
fn given_an_order_awaiting_payment_when_confirmed_then_order_confirmed() {
    let order = given::<OrderAggregate>([placed(), awaiting(1)])
        .when(confirm(1))
        .then([confirmed()])
        .unwrap();
    assert_eq!(order.status, OrderStatus::Confirmed);
}

#[test]
fn given_an_order_awaiting_payment_when_confirmed_with_another_payment_then_order_not_ready() {
    given::<OrderAggregate>([placed(), awaiting(1)])
        .when(confirm(2))
        .then_err(DomainError::OrderNotReady);
}

#[test]
fn given_a_confirmed_order_when_confirmed_again_then_nothing_happens() {
    given::<OrderAggregate>([placed(), awaiting(1), confirmed()])
        .when(confirm(1))
        .then_nothing();
}

#[test]
fn given_a_pending_order_when_confirmed_then_order_not_ready() {
    given::<OrderAggregate>([placed()])
        .when(confirm(1))
        .then_err(DomainError::OrderNotReady);
}

#[test]
fn given_a_cancelled_order_when_confirmed_then_order_already_final() {
    given::<OrderAggregate>([placed(), awaiting(1), cancelled()])
        .when(confirm(1))
        .then_err(DomainError::OrderAlreadyFinal);
}

// --- cancel ---

#[test]
fn given_a_pending_order_when_cancelled_then_order_cancelled() {
    let order = given::<OrderAggregate>([placed()])
        .when(cancel())
        .then([cancelled()])
        .unwrap();
    assert_eq!(
        (order.status, order.cancellation),
        (OrderStatus::Cancelled, Some(CancelReason::Customer))
    );
}

#[test]
fn given_an_order_awaiting_payment_when_cancelled_then_order_cancelled() {
    given::<OrderAggregate>([placed(), awaiting(1)])
        .when(cancel())
        .then([cancelled()]);
}

#[test]
fn given_a_final_order_when_cancelled_then_order_already_final() {
    for history in [
        vec![placed(), awaiting(1), confirmed()],
        vec![placed(), rejected()],
        vec![placed(), cancelled()],
    ] {
        given::<OrderAggregate>(history)
            .when(cancel())
            .then_err(DomainError::OrderAlreadyFinal);
    }
}

#[test]
fn a_campaign_refusal_maps_to_the_rejection_reason_customers_see() {
    assert_eq!(
        RejectReason::for_refusal(&DomainError::SoldOut),
        Some(RejectReason::SoldOut)
    );
    assert_eq!(
        RejectReason::for_refusal(&DomainError::LimitExceeded),
        Some(RejectReason::LimitExceeded)
    );
    assert_eq!(
        RejectReason::for_refusal(&DomainError::CampaignNotOpen),
        Some(RejectReason::CampaignNotOpen)
    );
    assert_eq!(
        RejectReason::for_refusal(&DomainError::CampaignNotFound),
        None
    );
}

#[test]
#[should_panic(expected = "changed after it was final")]
fn evolving_an_event_after_a_final_one_is_a_bug() {
    OrderAggregate::fold(&[placed(), rejected(), awaiting(1)]);
}
