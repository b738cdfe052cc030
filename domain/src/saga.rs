//! The order saga, pure: its own state (the steps it took for one order) and its plan (the
//! next step, from where the order, its reservation and its payment stand).
//!
//! The plan is level-triggered: it looks at the aggregates, not at the event that woke the
//! saga, so a duplicated, reordered or replayed trigger leads to the same next step, and a saga
//! that died between two steps finds the second one still to do. The order moves first and the
//! stock follows (confirm, then sell; cancel, then release), so a customer's cancel racing a
//! payment can never leave units sold for a cancelled order.

use serde::{Deserialize, Serialize};

use crate::campaign::{Reservation, ReservationState};
use crate::order::{CancelReason, Order, OrderStatus, RejectReason};
use crate::payment::{Payment, PaymentStatus};
use crate::{Aggregate, DomainError, OrderId, PaymentId, Timestamp};

/// A step of the order saga. Each is taken at most once per order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStep {
    /// Reserve the units and the customer's quota.
    ReserveStock,
    /// The reservation was refused: reject the order.
    RejectOrder,
    /// Ask for the money.
    RequestPayment,
    /// Move the order to awaiting payment.
    AwaitPayment,
    /// The deadline passed with no answer: time the payment out.
    TimeOutPayment,
    /// Paid: confirm the order.
    ConfirmOrder,
    /// Confirmed: the reserved units become sold.
    SellStock,
    /// Payment failed or timed out: cancel the order.
    CancelOrder,
    /// Cancelled: give the reserved units back.
    ReleaseStock,
    /// Money arrived for a cancelled order: give it back.
    RefundPayment,
}

impl SagaStep {
    /// Its name in events and ids.
    pub fn name(self) -> &'static str {
        match self {
            SagaStep::ReserveStock => "reserve_stock",
            SagaStep::RejectOrder => "reject_order",
            SagaStep::RequestPayment => "request_payment",
            SagaStep::AwaitPayment => "await_payment",
            SagaStep::TimeOutPayment => "time_out_payment",
            SagaStep::ConfirmOrder => "confirm_order",
            SagaStep::SellStock => "sell_stock",
            SagaStep::CancelOrder => "cancel_order",
            SagaStep::ReleaseStock => "release_stock",
            SagaStep::RefundPayment => "refund_payment",
        }
    }
}

/// What the saga should do next for one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Take this step.
    Act(Action),
    /// Nothing to do before the payment deadline (or an outside answer).
    WaitUntil(Timestamp),
    /// The order is final and everything that follows from it is done.
    Done,
}

/// A step with what it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reserve; a refusal becomes [`Action::RejectOrder`].
    ReserveStock,
    /// Reject the order.
    RejectOrder(RejectReason),
    /// Request payment, timing out at `deadline`.
    RequestPayment {
        /// The payment's id (the order's, see [`payment_id_of`]).
        payment_id: PaymentId,
        /// When it times out.
        deadline: Timestamp,
    },
    /// Move the order to awaiting payment.
    AwaitPayment {
        /// The payment.
        payment_id: PaymentId,
        /// Its deadline.
        deadline: Timestamp,
    },
    /// Time the payment out.
    TimeOutPayment,
    /// Confirm the order.
    ConfirmOrder(PaymentId),
    /// Sell the reserved units.
    SellStock,
    /// Cancel the order.
    CancelOrder(CancelReason),
    /// Release the reserved units.
    ReleaseStock(CancelReason),
    /// Refund the payment.
    RefundPayment,
}

impl Action {
    /// The step this action is.
    pub fn step(self) -> SagaStep {
        match self {
            Action::ReserveStock => SagaStep::ReserveStock,
            Action::RejectOrder(_) => SagaStep::RejectOrder,
            Action::RequestPayment { .. } => SagaStep::RequestPayment,
            Action::AwaitPayment { .. } => SagaStep::AwaitPayment,
            Action::TimeOutPayment => SagaStep::TimeOutPayment,
            Action::ConfirmOrder(_) => SagaStep::ConfirmOrder,
            Action::SellStock => SagaStep::SellStock,
            Action::CancelOrder(_) => SagaStep::CancelOrder,
            Action::ReleaseStock(_) => SagaStep::ReleaseStock,
            Action::RefundPayment => SagaStep::RefundPayment,
        }
    }
}

/// An order's payment has the order's id: one payment per order, found without a lookup.
pub fn payment_id_of(order_id: OrderId) -> PaymentId {
    PaymentId::from_ulid(order_id.ulid())
}

/// The next step for `order`, given its campaign's reservation for it, its payment, the
/// campaign's payment timeout and the time.
pub fn plan(
    order: &Order,
    reservation: Option<&Reservation>,
    payment: Option<&Payment>,
    payment_timeout_seconds: u32,
    now: Timestamp,
) -> Plan {
    let held = reservation.map(|r| r.state);
    let payment_status = payment.map(|p| p.status);
    // A pending payment times out at its deadline, whatever the order did meanwhile.
    let wait_for_payment = |payment: &Payment| {
        if now >= payment.deadline {
            Plan::Act(Action::TimeOutPayment)
        } else {
            Plan::WaitUntil(payment.deadline)
        }
    };
    match order.status {
        OrderStatus::Pending => match (held, payment) {
            (None, _) => Plan::Act(Action::ReserveStock),
            (Some(ReservationState::Released), _) => Plan::Done,
            (Some(_), None) => Plan::Act(Action::RequestPayment {
                payment_id: payment_id_of(order.order_id),
                deadline: now + chrono::Duration::seconds(i64::from(payment_timeout_seconds)),
            }),
            (Some(_), Some(payment)) => Plan::Act(Action::AwaitPayment {
                payment_id: payment.payment_id,
                deadline: payment.deadline,
            }),
        },
        OrderStatus::AwaitingPayment => match payment {
            None => Plan::Done,
            Some(payment) => match payment.status {
                PaymentStatus::Pending => wait_for_payment(payment),
                PaymentStatus::Succeeded => Plan::Act(Action::ConfirmOrder(payment.payment_id)),
                PaymentStatus::Failed => {
                    Plan::Act(Action::CancelOrder(CancelReason::PaymentFailed))
                }
                PaymentStatus::TimedOut => {
                    Plan::Act(Action::CancelOrder(CancelReason::PaymentTimeout))
                }
                PaymentStatus::Refunded => Plan::Done,
            },
        },
        OrderStatus::Confirmed => match held {
            Some(ReservationState::Reserved) => Plan::Act(Action::SellStock),
            _ => Plan::Done,
        },
        OrderStatus::Rejected => Plan::Done,
        OrderStatus::Cancelled => {
            let reason = order.cancellation.unwrap_or(CancelReason::Customer);
            if held == Some(ReservationState::Reserved) {
                return Plan::Act(Action::ReleaseStock(reason));
            }
            match (payment_status, payment) {
                (Some(PaymentStatus::Succeeded), _) => Plan::Act(Action::RefundPayment),
                (Some(PaymentStatus::Pending), Some(payment)) => wait_for_payment(payment),
                _ => Plan::Done,
            }
        }
    }
}

/// The saga's own record for one order: the steps it took.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderSaga {
    /// The order.
    pub order_id: OrderId,
    /// Steps taken, in order.
    pub steps: Vec<SagaStep>,
    /// When the first step was taken.
    pub started_at: Timestamp,
    /// When the last one was.
    pub updated_at: Timestamp,
}

/// What can be asked of a saga stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderSagaCommand {
    /// Record that a step was taken.
    Record {
        /// The order.
        order_id: OrderId,
        /// The step.
        step: SagaStep,
        /// Now.
        now: Timestamp,
    },
}

/// What a saga stream records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderSagaEvent {
    /// The saga took a step for the order.
    OrderSagaStepTaken {
        /// The order.
        order_id: OrderId,
        /// The step.
        step: SagaStep,
        /// When.
        at: Timestamp,
    },
}

/// The order saga's stream: `ordersaga-<order id>`.
#[derive(Debug)]
pub struct OrderSagaAggregate;

impl Aggregate for OrderSagaAggregate {
    const CATEGORY: &'static str = "ordersaga";
    type State = Option<OrderSaga>;
    type Command = OrderSagaCommand;
    type Event = OrderSagaEvent;

    fn decide(
        state: &Option<OrderSaga>,
        command: &OrderSagaCommand,
    ) -> Result<Vec<OrderSagaEvent>, DomainError> {
        let OrderSagaCommand::Record {
            order_id,
            step,
            now,
        } = *command;
        if state.as_ref().is_some_and(|s| s.steps.contains(&step)) {
            return Ok(vec![]);
        }
        Ok(vec![OrderSagaEvent::OrderSagaStepTaken {
            order_id,
            step,
            at: now,
        }])
    }

    fn evolve(state: Option<OrderSaga>, event: &OrderSagaEvent) -> Option<OrderSaga> {
        let OrderSagaEvent::OrderSagaStepTaken { order_id, step, at } = event;
        let mut saga = state.unwrap_or(OrderSaga {
            order_id: *order_id,
            steps: Vec::new(),
            started_at: *at,
            updated_at: *at,
        });
        saga.steps.push(*step);
        saga.updated_at = *at;
        Some(saga)
    }
}

#[cfg(test)]
mod tests;
