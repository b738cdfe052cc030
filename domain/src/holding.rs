//! A customer's holding in one campaign: the live units they hold and which of their orders
//! holds them. Stream `holding-<campaign id>-<user id>`.
//!
//! The per-user limit is decided here, against this stream's version, so it stays exact
//! however many writers sell the campaign: two reservations of one customer race on this
//! stream and one of them decides again. Reserve, release and sell are idempotent per order.
//! The state is bounded by the limit: released orders leave it, and a customer cannot hold
//! more live orders than units.

use imbl::OrdMap;
use serde::{Deserialize, Serialize};

use crate::limits::ORDER_QUANTITY_UNITS_MAX;
use crate::order::CancelReason;
use crate::{Aggregate, CampaignId, DomainError, OrderId, Timestamp, UserId};

/// Where an order's units are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Held for the order, awaiting payment.
    Reserved,
    /// Paid for.
    Sold,
}

/// Units one live order holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// How many.
    pub quantity: u32,
    /// Where they are.
    pub state: ReservationState,
}

/// A customer's holding in a campaign, as its events left it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// Live (reserved or sold) units.
    pub live_units: u32,
    /// Live orders and what they hold. Released orders are gone. A persistent map: a clone
    /// shares its tree and a change copies only the path it touches, so the campaign writer,
    /// which decides each batch on copies of its customers' holdings, pays the same for a
    /// customer with a thousand live orders as for one with one. It serializes as the map it
    /// is, by order id, as a `BTreeMap` does.
    pub orders: OrdMap<OrderId, Held>,
}

impl Holding {
    /// Where `order_id`'s units are; `None` when it holds none (never reserved, or released).
    pub fn of(&self, order_id: OrderId) -> Option<ReservationState> {
        self.orders.get(&order_id).map(|held| held.state)
    }
}

/// What can be asked of a holding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldingCommand {
    /// Holds units for an order within the customer's limit. Whether the campaign is open and
    /// has the units is the writer's to check; the limit is this stream's.
    Reserve {
        /// The order.
        order_id: OrderId,
        /// The campaign.
        campaign_id: CampaignId,
        /// The customer.
        user_id: UserId,
        /// Units.
        quantity: u32,
        /// The bucket the units come from.
        bucket: u32,
        /// The campaign's per-user limit.
        per_user_limit: u32,
        /// Now.
        now: Timestamp,
    },
    /// Gives an order's reserved units back.
    Release {
        /// The order.
        order_id: OrderId,
        /// The campaign.
        campaign_id: CampaignId,
        /// The customer.
        user_id: UserId,
        /// The bucket they go back to.
        bucket: u32,
        /// Why.
        reason: CancelReason,
        /// Now.
        now: Timestamp,
    },
    /// Turns an order's reserved units into sold ones.
    Sell {
        /// The order.
        order_id: OrderId,
        /// The campaign.
        campaign_id: CampaignId,
        /// The customer.
        user_id: UserId,
        /// Now.
        now: Timestamp,
    },
}

/// What a holding records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum HoldingEvent {
    /// Units were held for an order.
    UnitsReserved {
        /// The order.
        order_id: OrderId,
        /// The campaign.
        campaign_id: CampaignId,
        /// The customer.
        user_id: UserId,
        /// Units.
        quantity: u32,
        /// The bucket they came from.
        bucket: u32,
        /// When.
        at: Timestamp,
    },
    /// An order's reserved units went back to the campaign.
    UnitsReleased {
        /// The order.
        order_id: OrderId,
        /// The campaign.
        campaign_id: CampaignId,
        /// The customer.
        user_id: UserId,
        /// Units.
        quantity: u32,
        /// The bucket they went back to.
        bucket: u32,
        /// Why.
        reason: CancelReason,
        /// When.
        at: Timestamp,
    },
    /// An order's reserved units were paid for.
    UnitsSold {
        /// The order.
        order_id: OrderId,
        /// The campaign.
        campaign_id: CampaignId,
        /// The customer.
        user_id: UserId,
        /// Units.
        quantity: u32,
        /// When.
        at: Timestamp,
    },
}

/// The holding aggregate.
#[derive(Debug)]
pub struct HoldingAggregate;

impl Aggregate for HoldingAggregate {
    const CATEGORY: &'static str = "holding";
    type State = Holding;
    type Command = HoldingCommand;
    type Event = HoldingEvent;

    fn decide(state: &Holding, command: &HoldingCommand) -> Result<Vec<HoldingEvent>, DomainError> {
        match *command {
            HoldingCommand::Reserve {
                order_id,
                campaign_id,
                user_id,
                quantity,
                bucket,
                per_user_limit,
                now,
            } => {
                if state.orders.contains_key(&order_id) {
                    // Decided before; deciding it again must not hold more units.
                    return Ok(vec![]);
                }
                if !(1..=ORDER_QUANTITY_UNITS_MAX).contains(&quantity) {
                    return Err(DomainError::InvalidInput {
                        field: "quantity",
                        problem: "must be between 1 and 10000",
                    });
                }
                if u64::from(state.live_units) + u64::from(quantity) > u64::from(per_user_limit) {
                    return Err(DomainError::LimitExceeded);
                }
                Ok(vec![HoldingEvent::UnitsReserved {
                    order_id,
                    campaign_id,
                    user_id,
                    quantity,
                    bucket,
                    at: now,
                }])
            }
            HoldingCommand::Release {
                order_id,
                campaign_id,
                user_id,
                bucket,
                reason,
                now,
            } => match state.orders.get(&order_id) {
                // Never reserved, or released already.
                None => Ok(vec![]),
                Some(held) if held.state == ReservationState::Sold => {
                    Err(DomainError::ReservationSold)
                }
                Some(held) => Ok(vec![HoldingEvent::UnitsReleased {
                    order_id,
                    campaign_id,
                    user_id,
                    quantity: held.quantity,
                    bucket,
                    reason,
                    at: now,
                }]),
            },
            HoldingCommand::Sell {
                order_id,
                campaign_id,
                user_id,
                now,
            } => match state.orders.get(&order_id) {
                None => Err(DomainError::ReservationNotFound),
                Some(held) if held.state == ReservationState::Sold => Ok(vec![]),
                Some(held) => Ok(vec![HoldingEvent::UnitsSold {
                    order_id,
                    campaign_id,
                    user_id,
                    quantity: held.quantity,
                    at: now,
                }]),
            },
        }
    }

    fn evolve(mut state: Holding, event: &HoldingEvent) -> Holding {
        match event {
            HoldingEvent::UnitsReserved {
                order_id, quantity, ..
            } => {
                let previous = state.orders.insert(
                    *order_id,
                    Held {
                        quantity: *quantity,
                        state: ReservationState::Reserved,
                    },
                );
                assert!(previous.is_none(), "order {order_id} reserved twice");
                state.live_units = state
                    .live_units
                    .checked_add(*quantity)
                    .expect("unit count overflow");
            }
            HoldingEvent::UnitsReleased {
                order_id, quantity, ..
            } => {
                let held = state
                    .orders
                    .remove(order_id)
                    .unwrap_or_else(|| panic!("order {order_id} released without a reservation"));
                assert_eq!(
                    held.state,
                    ReservationState::Reserved,
                    "released sold units"
                );
                assert_eq!(
                    held.quantity, *quantity,
                    "order {order_id} quantity differs"
                );
                state.live_units = state
                    .live_units
                    .checked_sub(*quantity)
                    .expect("unit count underflow");
            }
            HoldingEvent::UnitsSold {
                order_id, quantity, ..
            } => {
                let held = state
                    .orders
                    .get_mut(order_id)
                    .unwrap_or_else(|| panic!("order {order_id} sold without a reservation"));
                assert_eq!(held.state, ReservationState::Reserved, "sold twice");
                assert_eq!(
                    held.quantity, *quantity,
                    "order {order_id} quantity differs"
                );
                held.state = ReservationState::Sold;
            }
        }
        state
    }
}

#[cfg(test)]
mod tests;
