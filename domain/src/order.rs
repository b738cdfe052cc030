//! An order, as the saga drives it: placed, then rejected or awaiting payment, then confirmed
//! or cancelled. Confirmed, rejected and cancelled are final.

use serde::{Deserialize, Serialize};

use crate::limits::ORDER_QUANTITY_UNITS_MAX;
use crate::{Aggregate, CampaignId, Cents, DomainError, OrderId, PaymentId, Timestamp, UserId};

/// Where an order stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed; stock not decided yet.
    Pending,
    /// Stock reserved and payment requested.
    AwaitingPayment,
    /// Paid. Final.
    Confirmed,
    /// Refused by the stock decision. Final.
    Rejected,
    /// Cancelled after placing. Final.
    Cancelled,
}

impl OrderStatus {
    /// Whether the order can still change.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OrderStatus::Confirmed | OrderStatus::Rejected | OrderStatus::Cancelled
        )
    }
}

/// Why the stock decision refused an order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not enough units.
    SoldOut,
    /// Over the per-user limit.
    LimitExceeded,
    /// Outside the sales window, or closed.
    CampaignNotOpen,
}

impl RejectReason {
    /// The rejection a campaign's refusal to reserve stands for, if it stands for one.
    pub fn for_refusal(error: &DomainError) -> Option<RejectReason> {
        match error {
            DomainError::SoldOut => Some(RejectReason::SoldOut),
            DomainError::LimitExceeded => Some(RejectReason::LimitExceeded),
            DomainError::CampaignNotOpen | DomainError::CampaignClosed => {
                Some(RejectReason::CampaignNotOpen)
            }
            _ => None,
        }
    }
}

/// Why an order was cancelled, and so why its units were released.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The customer asked.
    Customer,
    /// The provider said the payment failed.
    PaymentFailed,
    /// Nobody paid before the deadline.
    PaymentTimeout,
}

/// An order as its events left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Which order.
    pub order_id: OrderId,
    /// Whose.
    pub user_id: UserId,
    /// For which campaign.
    pub campaign_id: CampaignId,
    /// Units ordered.
    pub quantity: u32,
    /// Unit price when the order was placed.
    pub unit_price_cents: Cents,
    /// What the customer pays.
    pub amount_cents: Cents,
    /// Where it stands.
    pub status: OrderStatus,
    /// Set when rejected.
    pub rejection: Option<RejectReason>,
    /// Set when cancelled.
    pub cancellation: Option<CancelReason>,
    /// Set once payment was requested.
    pub payment_id: Option<PaymentId>,
    /// When the payment times out, once requested.
    pub payment_deadline: Option<Timestamp>,
    /// When it was placed.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// What can be asked of an order stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderCommand {
    /// A customer places an order; the unit price comes from the campaign.
    Place {
        /// The new order's id.
        order_id: OrderId,
        /// The customer.
        user_id: UserId,
        /// The campaign.
        campaign_id: CampaignId,
        /// Units wanted.
        quantity: u32,
        /// The campaign's price per unit.
        unit_price_cents: Cents,
        /// Now.
        now: Timestamp,
    },
    /// The stock decision refused the order.
    Reject {
        /// Why.
        reason: RejectReason,
        /// Now.
        now: Timestamp,
    },
    /// Stock is reserved and payment was requested.
    AwaitPayment {
        /// The payment requested.
        payment_id: PaymentId,
        /// When it times out.
        deadline: Timestamp,
        /// Now.
        now: Timestamp,
    },
    /// The payment succeeded.
    Confirm {
        /// The payment that succeeded.
        payment_id: PaymentId,
        /// Now.
        now: Timestamp,
    },
    /// The order is called off.
    Cancel {
        /// Why.
        reason: CancelReason,
        /// Now.
        now: Timestamp,
    },
}

/// What an order stream records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderEvent {
    /// A customer placed the order.
    OrderPlaced {
        /// Which order.
        order_id: OrderId,
        /// Whose.
        user_id: UserId,
        /// For which campaign.
        campaign_id: CampaignId,
        /// Units ordered.
        quantity: u32,
        /// Price per unit.
        unit_price_cents: Cents,
        /// Price of the order.
        amount_cents: Cents,
        /// When.
        placed_at: Timestamp,
    },
    /// The stock decision refused it.
    OrderRejected {
        /// Why.
        reason: RejectReason,
        /// When.
        at: Timestamp,
    },
    /// Stock was reserved and payment requested.
    OrderAwaitingPayment {
        /// The payment requested.
        payment_id: PaymentId,
        /// When it times out.
        deadline: Timestamp,
        /// When.
        at: Timestamp,
    },
    /// It was paid for.
    OrderConfirmed {
        /// The payment.
        payment_id: PaymentId,
        /// When.
        at: Timestamp,
    },
    /// It was called off.
    OrderCancelled {
        /// Why.
        reason: CancelReason,
        /// When.
        at: Timestamp,
    },
}

/// The order aggregate.
#[derive(Debug)]
pub struct OrderAggregate;

impl Aggregate for OrderAggregate {
    const CATEGORY: &'static str = "order";
    type State = Option<Order>;
    type Command = OrderCommand;
    type Event = OrderEvent;

    fn decide(
        state: &Option<Order>,
        command: &OrderCommand,
    ) -> Result<Vec<OrderEvent>, DomainError> {
        let order = match (state, command) {
            (None, OrderCommand::Place { .. }) => return place(command),
            (Some(_), OrderCommand::Place { .. }) => return Err(DomainError::OrderAlreadyExists),
            (None, _) => return Err(DomainError::OrderNotFound),
            (Some(order), _) => order,
        };
        use OrderStatus::*;
        match (*command, order.status) {
            (OrderCommand::Place { .. }, _) => unreachable!("handled above"),
            (OrderCommand::Reject { reason, now }, Pending) => {
                Ok(vec![OrderEvent::OrderRejected { reason, at: now }])
            }
            (OrderCommand::Reject { .. }, Rejected) => Ok(vec![]),
            (OrderCommand::Reject { .. }, AwaitingPayment) => Err(DomainError::OrderNotReady),
            (
                OrderCommand::AwaitPayment {
                    payment_id,
                    deadline,
                    now,
                },
                Pending,
            ) => Ok(vec![OrderEvent::OrderAwaitingPayment {
                payment_id,
                deadline,
                at: now,
            }]),
            (OrderCommand::AwaitPayment { payment_id, .. }, AwaitingPayment) => {
                if order.payment_id == Some(payment_id) {
                    Ok(vec![])
                } else {
                    Err(DomainError::OrderNotReady)
                }
            }
            (OrderCommand::Confirm { payment_id, now }, AwaitingPayment) => {
                if order.payment_id == Some(payment_id) {
                    Ok(vec![OrderEvent::OrderConfirmed {
                        payment_id,
                        at: now,
                    }])
                } else {
                    Err(DomainError::OrderNotReady)
                }
            }
            (OrderCommand::Confirm { .. }, Confirmed) => Ok(vec![]),
            (OrderCommand::Confirm { .. }, Pending) => Err(DomainError::OrderNotReady),
            (OrderCommand::Cancel { reason, now }, Pending | AwaitingPayment) => {
                Ok(vec![OrderEvent::OrderCancelled { reason, at: now }])
            }
            (_, Confirmed | Rejected | Cancelled) => Err(DomainError::OrderAlreadyFinal),
        }
    }

    fn evolve(state: Option<Order>, event: &OrderEvent) -> Option<Order> {
        if let OrderEvent::OrderPlaced {
            order_id,
            user_id,
            campaign_id,
            quantity,
            unit_price_cents,
            amount_cents,
            placed_at,
        } = *event
        {
            assert!(state.is_none(), "order {order_id} placed twice");
            return Some(Order {
                order_id,
                user_id,
                campaign_id,
                quantity,
                unit_price_cents,
                amount_cents,
                status: OrderStatus::Pending,
                rejection: None,
                cancellation: None,
                payment_id: None,
                payment_deadline: None,
                created_at: placed_at,
                updated_at: placed_at,
            });
        }
        let mut order =
            state.unwrap_or_else(|| panic!("event on an order never placed: {event:?}"));
        assert!(
            !order.status.is_final(),
            "order {} changed after it was final",
            order.order_id
        );
        match *event {
            OrderEvent::OrderPlaced { .. } => unreachable!("handled above"),
            OrderEvent::OrderRejected { reason, at } => {
                order.status = OrderStatus::Rejected;
                order.rejection = Some(reason);
                order.updated_at = at;
            }
            OrderEvent::OrderAwaitingPayment {
                payment_id,
                deadline,
                at,
            } => {
                order.status = OrderStatus::AwaitingPayment;
                order.payment_id = Some(payment_id);
                order.payment_deadline = Some(deadline);
                order.updated_at = at;
            }
            OrderEvent::OrderConfirmed { at, .. } => {
                order.status = OrderStatus::Confirmed;
                order.updated_at = at;
            }
            OrderEvent::OrderCancelled { reason, at } => {
                order.status = OrderStatus::Cancelled;
                order.cancellation = Some(reason);
                order.updated_at = at;
            }
        }
        Some(order)
    }
}

fn place(command: &OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
    let OrderCommand::Place {
        order_id,
        user_id,
        campaign_id,
        quantity,
        unit_price_cents,
        now,
    } = *command
    else {
        unreachable!("only called with Place")
    };
    if !(1..=ORDER_QUANTITY_UNITS_MAX).contains(&quantity) {
        return Err(DomainError::InvalidInput {
            field: "quantity",
            problem: "must be between 1 and 10000",
        });
    }
    let amount_cents = unit_price_cents
        .times(quantity)
        .ok_or(DomainError::InvalidInput {
            field: "quantity",
            problem: "makes the amount too large",
        })?;
    Ok(vec![OrderEvent::OrderPlaced {
        order_id,
        user_id,
        campaign_id,
        quantity,
        unit_price_cents,
        amount_cents,
        placed_at: now,
    }])
}

#[cfg(test)]
mod tests;
