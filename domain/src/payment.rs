//! A payment: requested for an order, then settled by the provider's word or by its deadline.
//!
//! The request is the order's own `OrderAwaitingPayment`, which names the payment and its
//! deadline, and the order holds the amount: so the payment's stream starts with the first
//! answer, and its state is folded onto the payment its order requested
//! ([`Payment::requested_by`]). Logs written before that start the stream with
//! `PaymentRequested`, which folds to the same payment.
//!
//! A success that arrives after the deadline is still recorded: the customer's money was taken,
//! and the saga owes them a refund. That is why `TimedOut -> Succeeded -> Refunded` is a path.

use serde::{Deserialize, Serialize};

use crate::error::check_text;
use crate::limits::PROVIDER_REFERENCE_CHARS_MAX;
use crate::order::Order;
use crate::{Aggregate, Cents, DomainError, OrderId, PaymentId, Timestamp};

/// Where a payment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentStatus {
    /// Requested, no answer yet.
    Pending,
    /// The provider took the money.
    Succeeded,
    /// The provider refused.
    Failed,
    /// No answer before the deadline.
    TimedOut,
    /// The money went back.
    Refunded,
}

/// A payment as its events left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// Which payment.
    pub payment_id: PaymentId,
    /// For which order.
    pub order_id: OrderId,
    /// How much.
    pub amount_cents: Cents,
    /// When it times out.
    pub deadline: Timestamp,
    /// Where it stands.
    pub status: PaymentStatus,
    /// The provider's id for it, once the provider answered.
    pub provider_reference: Option<String>,
    /// When it last changed: `None` until the provider or the deadline answered.
    pub updated_at: Option<Timestamp>,
}

impl Payment {
    /// The payment `order` requested when it went to awaiting payment, pending: what its
    /// stream's answers are folded onto. `None` for an order that never asked for one.
    pub fn requested_by(order: &Order) -> Option<Payment> {
        Some(Payment {
            payment_id: order.payment_id?,
            order_id: order.order_id,
            amount_cents: order.amount_cents,
            deadline: order.payment_deadline?,
            status: PaymentStatus::Pending,
            provider_reference: None,
            updated_at: None,
        })
    }
}

/// What can be asked of a payment stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PaymentCommand {
    /// The provider says it succeeded.
    Succeed {
        /// The provider's id for it.
        provider_reference: String,
        /// Now.
        now: Timestamp,
    },
    /// The provider says it failed.
    Fail {
        /// The provider's id for it.
        provider_reference: String,
        /// Now.
        now: Timestamp,
    },
    /// The deadline fired.
    TimeOut {
        /// Now.
        now: Timestamp,
    },
    /// Gives the money back.
    Refund {
        /// Now.
        now: Timestamp,
    },
}

/// What a payment stream records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum PaymentEvent {
    /// Payment was requested. No longer written: the order's `OrderAwaitingPayment` is the
    /// request; kept so that older logs still fold.
    PaymentRequested {
        /// Which payment.
        payment_id: PaymentId,
        /// For which order.
        order_id: OrderId,
        /// How much.
        amount_cents: Cents,
        /// When it times out.
        deadline: Timestamp,
        /// When.
        at: Timestamp,
    },
    /// The provider took the money.
    PaymentSucceeded {
        /// The provider's id.
        provider_reference: String,
        /// When.
        at: Timestamp,
    },
    /// The provider refused.
    PaymentFailed {
        /// The provider's id.
        provider_reference: String,
        /// When.
        at: Timestamp,
    },
    /// Nobody paid in time.
    PaymentTimedOut {
        /// When.
        at: Timestamp,
    },
    /// The money went back to the customer.
    PaymentRefunded {
        /// When.
        at: Timestamp,
    },
}

/// The payment aggregate.
#[derive(Debug)]
pub struct PaymentAggregate;

impl Aggregate for PaymentAggregate {
    const CATEGORY: &'static str = "payment";
    // 2: no `requested_at`; `updated_at` only once answered.
    const STATE_VERSION: u32 = 2;
    type State = Option<Payment>;
    type Command = PaymentCommand;
    type Event = PaymentEvent;

    fn decide(
        state: &Option<Payment>,
        command: &PaymentCommand,
    ) -> Result<Vec<PaymentEvent>, DomainError> {
        let Some(payment) = state else {
            return Err(DomainError::PaymentNotFound);
        };
        use PaymentStatus::*;
        match (command, payment.status) {
            (
                PaymentCommand::Succeed {
                    provider_reference,
                    now,
                },
                Pending | TimedOut,
            ) => {
                check_text(
                    "provider_reference",
                    provider_reference,
                    PROVIDER_REFERENCE_CHARS_MAX,
                )?;
                Ok(vec![PaymentEvent::PaymentSucceeded {
                    provider_reference: provider_reference.clone(),
                    at: *now,
                }])
            }
            (PaymentCommand::Succeed { .. }, Succeeded | Refunded) => Ok(vec![]),
            (PaymentCommand::Succeed { .. }, Failed) => Err(DomainError::PaymentAlreadyFinal),
            (
                PaymentCommand::Fail {
                    provider_reference,
                    now,
                },
                Pending,
            ) => {
                check_text(
                    "provider_reference",
                    provider_reference,
                    PROVIDER_REFERENCE_CHARS_MAX,
                )?;
                Ok(vec![PaymentEvent::PaymentFailed {
                    provider_reference: provider_reference.clone(),
                    at: *now,
                }])
            }
            // The order is already cancelled for want of payment; a failure confirms it.
            (PaymentCommand::Fail { .. }, Failed | TimedOut) => Ok(vec![]),
            (PaymentCommand::Fail { .. }, Succeeded | Refunded) => {
                Err(DomainError::PaymentAlreadyFinal)
            }
            (PaymentCommand::TimeOut { now }, Pending) => {
                if *now < payment.deadline {
                    Err(DomainError::DeadlineNotReached)
                } else {
                    Ok(vec![PaymentEvent::PaymentTimedOut { at: *now }])
                }
            }
            // Settled before the deadline fired: nothing times out.
            (PaymentCommand::TimeOut { .. }, _) => Ok(vec![]),
            (PaymentCommand::Refund { now }, Succeeded) => {
                Ok(vec![PaymentEvent::PaymentRefunded { at: *now }])
            }
            (PaymentCommand::Refund { .. }, Refunded) => Ok(vec![]),
            (PaymentCommand::Refund { .. }, Pending | Failed | TimedOut) => {
                Err(DomainError::NothingToRefund)
            }
        }
    }

    fn evolve(state: Option<Payment>, event: &PaymentEvent) -> Option<Payment> {
        if let PaymentEvent::PaymentRequested {
            payment_id,
            order_id,
            amount_cents,
            deadline,
            ..
        } = *event
        {
            // An older log: the stream starts with the request, which is also the payment the
            // order requested when the fold started from it.
            assert!(
                state.as_ref().is_none_or(
                    |p| p.status == PaymentStatus::Pending && p.payment_id == payment_id
                ),
                "payment {payment_id} requested twice"
            );
            return Some(Payment {
                payment_id,
                order_id,
                amount_cents,
                deadline,
                status: PaymentStatus::Pending,
                provider_reference: None,
                updated_at: None,
            });
        }
        let mut payment = state.unwrap_or_else(|| {
            panic!("an answer folded without the payment its order requested: {event:?}")
        });
        match event {
            PaymentEvent::PaymentRequested { .. } => unreachable!("handled above"),
            PaymentEvent::PaymentSucceeded {
                provider_reference,
                at,
            } => {
                assert!(matches!(
                    payment.status,
                    PaymentStatus::Pending | PaymentStatus::TimedOut
                ));
                payment.status = PaymentStatus::Succeeded;
                payment.provider_reference = Some(provider_reference.clone());
                payment.updated_at = Some(*at);
            }
            PaymentEvent::PaymentFailed {
                provider_reference,
                at,
            } => {
                assert_eq!(payment.status, PaymentStatus::Pending);
                payment.status = PaymentStatus::Failed;
                payment.provider_reference = Some(provider_reference.clone());
                payment.updated_at = Some(*at);
            }
            PaymentEvent::PaymentTimedOut { at } => {
                assert_eq!(payment.status, PaymentStatus::Pending);
                payment.status = PaymentStatus::TimedOut;
                payment.updated_at = Some(*at);
            }
            PaymentEvent::PaymentRefunded { at } => {
                assert_eq!(payment.status, PaymentStatus::Succeeded);
                payment.status = PaymentStatus::Refunded;
                payment.updated_at = Some(*at);
            }
        }
        Some(payment)
    }
}

#[cfg(test)]
mod tests;
