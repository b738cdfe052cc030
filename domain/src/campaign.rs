//! A campaign: a group-buy deal on one drink SKU, and the stock it sells.
//!
//! Stock and the per-user limit live in the same aggregate on purpose: both are checked by one
//! decision against one stream version, so "never oversold" and "never over the limit" hold
//! under any concurrency without a second lock. The campaign remembers every reservation by
//! order id, which makes reserve, release and sell idempotent per order: a saga step that is
//! delivered twice decides nothing the second time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::check_text;
use crate::limits::{
    CAMPAIGN_TOTAL_UNITS_MAX, ORDER_QUANTITY_UNITS_MAX, PAYMENT_TIMEOUT_S_MAX,
    PAYMENT_TIMEOUT_S_MIN, PER_USER_LIMIT_UNITS_MAX, PRICE_CENTS_MAX, SALES_WINDOW_DAYS_MAX,
    SKU_CHARS_MAX, TITLE_CHARS_MAX,
};
use crate::order::CancelReason;
use crate::store::Store;
use crate::{Aggregate, CampaignId, Cents, DomainError, OrderId, StoreId, Timestamp, UserId};

/// Units of a campaign by where they are. `available + reserved + sold == total` always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// Every unit the campaign ever had: quota plus replenishments.
    pub total: u32,
    /// Units nobody holds.
    pub available: u32,
    /// Units held for orders awaiting payment.
    pub reserved: u32,
    /// Units paid for.
    pub sold: u32,
}

impl Stock {
    /// Whether the units add up. Holds at every version of every campaign.
    pub fn is_consistent(&self) -> bool {
        u64::from(self.available) + u64::from(self.reserved) + u64::from(self.sold)
            == u64::from(self.total)
    }
}

/// Where a campaign stands at a given instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    /// Before its sales window.
    Scheduled,
    /// Within its sales window and not closed: taking orders.
    Open,
    /// Closed by an operator, or past its sales window.
    Closed,
}

/// What happened to the units an order reserved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Held for the order, awaiting payment.
    Reserved,
    /// Paid for.
    Sold,
    /// Given back to the campaign.
    Released,
}

/// Units one order took from a campaign.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The customer who ordered.
    pub user_id: UserId,
    /// How many units.
    pub quantity: u32,
    /// Where they are now.
    pub state: ReservationState,
}

/// A campaign as its events left it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    /// Which campaign.
    pub campaign_id: CampaignId,
    /// The store that publishes it.
    pub store_id: StoreId,
    /// The drink on sale.
    pub sku: String,
    /// Headline shown to customers.
    pub title: String,
    /// Deal price per unit.
    pub price_cents: Cents,
    /// Stock the campaign was created with; replenishments add to `stock.total` only.
    pub quota: u32,
    /// Most live (reserved or sold) units one user may hold.
    pub per_user_limit: u32,
    /// Start of the sales window, inclusive.
    pub starts_at: Timestamp,
    /// End of the sales window, exclusive.
    pub ends_at: Timestamp,
    /// How long a customer has to pay once units are reserved.
    pub payment_timeout_seconds: u32,
    /// When an operator closed it, if one did.
    pub closed_at: Option<Timestamp>,
    /// When it was created.
    pub created_at: Timestamp,
    /// Its units.
    pub stock: Stock,
    /// Live (reserved or sold) units per user.
    pub holdings: BTreeMap<UserId, u32>,
    /// Every reservation ever made, by order.
    pub reservations: BTreeMap<OrderId, Reservation>,
}

impl CampaignStatus {
    /// The one rule for where a campaign stands at `now`: closed once an operator closed it or
    /// its window ended, scheduled before the window, open within it.
    pub fn at(
        now: Timestamp,
        starts_at: Timestamp,
        ends_at: Timestamp,
        closed_at: Option<Timestamp>,
    ) -> CampaignStatus {
        if closed_at.is_some() || now >= ends_at {
            CampaignStatus::Closed
        } else if now < starts_at {
            CampaignStatus::Scheduled
        } else {
            CampaignStatus::Open
        }
    }
}

impl Campaign {
    /// Where the campaign stands at `now`.
    pub fn status(&self, now: Timestamp) -> CampaignStatus {
        CampaignStatus::at(now, self.starts_at, self.ends_at, self.closed_at)
    }

    /// Live units `user` holds.
    pub fn holding_of(&self, user: UserId) -> u32 {
        self.holdings.get(&user).copied().unwrap_or(0)
    }

    /// Panics when the campaign breaks one of its invariants: that can only be a bug or a
    /// corrupted log, and carrying on would sell what does not exist.
    fn assert_invariants(&self) {
        assert!(
            self.stock.is_consistent(),
            "stock does not add up: {:?}",
            self.stock
        );
        assert!(
            self.stock.total <= CAMPAIGN_TOTAL_UNITS_MAX,
            "total over the limit"
        );
        if let Some((user, held)) = self
            .holdings
            .iter()
            .find(|(_, held)| **held > self.per_user_limit)
        {
            panic!(
                "user {user} holds {held} units over the limit {}",
                self.per_user_limit
            );
        }
    }
}

/// The terms of a new campaign, with the store looked up by the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewCampaign {
    /// The new campaign's id.
    pub campaign_id: CampaignId,
    /// The store, as loaded by the caller; `None` when there is no such store.
    pub store: Option<Store>,
    /// The drink.
    pub sku: String,
    /// Headline.
    pub title: String,
    /// Deal price per unit.
    pub price_cents: u64,
    /// Initial stock.
    pub quota: u32,
    /// Most live units per user.
    pub per_user_limit: u32,
    /// Start of the sales window.
    pub starts_at: Timestamp,
    /// End of the sales window.
    pub ends_at: Timestamp,
    /// Payment window once units are reserved.
    pub payment_timeout_seconds: u32,
    /// Now.
    pub now: Timestamp,
}

/// What can be asked of a campaign stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CampaignCommand {
    /// Publishes a new campaign.
    Create(NewCampaign),
    /// Adds units to the stock.
    Replenish {
        /// Units to add.
        quantity: u32,
        /// Now.
        now: Timestamp,
    },
    /// Stops taking orders. Live reservations still run to payment or release.
    Close {
        /// Now.
        now: Timestamp,
    },
    /// Holds units for an order, within stock and the user's limit.
    Reserve {
        /// The order that wants the units.
        order_id: OrderId,
        /// Its customer.
        user_id: UserId,
        /// How many units.
        quantity: u32,
        /// Now, to check the sales window.
        now: Timestamp,
    },
    /// Gives an order's reserved units back.
    Release {
        /// The order whose units go back.
        order_id: OrderId,
        /// Why the order gave them up.
        reason: CancelReason,
        /// Now.
        now: Timestamp,
    },
    /// Turns an order's reserved units into sold ones.
    Sell {
        /// The paid order.
        order_id: OrderId,
        /// Now.
        now: Timestamp,
    },
}

/// The terms a campaign was created with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignCreated {
    /// Which campaign.
    pub campaign_id: CampaignId,
    /// Publishing store.
    pub store_id: StoreId,
    /// The drink.
    pub sku: String,
    /// Headline.
    pub title: String,
    /// Deal price per unit.
    pub price_cents: Cents,
    /// Initial stock.
    pub quota: u32,
    /// Most live units per user.
    pub per_user_limit: u32,
    /// Start of the sales window.
    pub starts_at: Timestamp,
    /// End of the sales window.
    pub ends_at: Timestamp,
    /// Payment window.
    pub payment_timeout_seconds: u32,
    /// When.
    pub created_at: Timestamp,
}

/// What a campaign stream records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum CampaignEvent {
    /// The campaign was published.
    CampaignCreated(CampaignCreated),
    /// Units were added.
    StockReplenished {
        /// Units added.
        quantity: u32,
        /// When.
        at: Timestamp,
    },
    /// An operator closed the campaign.
    CampaignClosed {
        /// When.
        at: Timestamp,
    },
    /// Units were held for an order.
    StockReserved {
        /// The order.
        order_id: OrderId,
        /// Its customer.
        user_id: UserId,
        /// Units held.
        quantity: u32,
        /// When.
        at: Timestamp,
    },
    /// An order's held units went back to available.
    StockReleased {
        /// The order.
        order_id: OrderId,
        /// Its customer.
        user_id: UserId,
        /// Units released.
        quantity: u32,
        /// Why.
        reason: CancelReason,
        /// When.
        at: Timestamp,
    },
    /// An order's held units were paid for.
    StockSold {
        /// The order.
        order_id: OrderId,
        /// Its customer.
        user_id: UserId,
        /// Units sold.
        quantity: u32,
        /// When.
        at: Timestamp,
    },
}

/// The campaign aggregate.
#[derive(Debug)]
pub struct CampaignAggregate;

impl Aggregate for CampaignAggregate {
    const CATEGORY: &'static str = "campaign";
    type State = Option<Campaign>;
    type Command = CampaignCommand;
    type Event = CampaignEvent;

    fn decide(
        state: &Option<Campaign>,
        command: &CampaignCommand,
    ) -> Result<Vec<CampaignEvent>, DomainError> {
        let campaign = match (state, command) {
            (None, CampaignCommand::Create(new)) => return create(new),
            (Some(_), CampaignCommand::Create(_)) => {
                return Err(DomainError::CampaignAlreadyExists)
            }
            (None, _) => return Err(DomainError::CampaignNotFound),
            (Some(campaign), _) => campaign,
        };
        match *command {
            CampaignCommand::Create(_) => unreachable!("handled above"),
            CampaignCommand::Replenish { quantity, now } => replenish(campaign, quantity, now),
            CampaignCommand::Close { now } => Ok(if campaign.closed_at.is_some() {
                vec![]
            } else {
                vec![CampaignEvent::CampaignClosed { at: now }]
            }),
            CampaignCommand::Reserve {
                order_id,
                user_id,
                quantity,
                now,
            } => reserve(campaign, order_id, user_id, quantity, now),
            CampaignCommand::Release {
                order_id,
                reason,
                now,
            } => {
                let reservation = campaign
                    .reservations
                    .get(&order_id)
                    .ok_or(DomainError::ReservationNotFound)?;
                match reservation.state {
                    ReservationState::Released => Ok(vec![]),
                    ReservationState::Sold => Err(DomainError::ReservationSold),
                    ReservationState::Reserved => Ok(vec![CampaignEvent::StockReleased {
                        order_id,
                        user_id: reservation.user_id,
                        quantity: reservation.quantity,
                        reason,
                        at: now,
                    }]),
                }
            }
            CampaignCommand::Sell { order_id, now } => {
                let reservation = campaign
                    .reservations
                    .get(&order_id)
                    .ok_or(DomainError::ReservationNotFound)?;
                match reservation.state {
                    ReservationState::Sold => Ok(vec![]),
                    ReservationState::Released => Err(DomainError::ReservationReleased),
                    ReservationState::Reserved => Ok(vec![CampaignEvent::StockSold {
                        order_id,
                        user_id: reservation.user_id,
                        quantity: reservation.quantity,
                        at: now,
                    }]),
                }
            }
        }
    }

    fn evolve(state: Option<Campaign>, event: &CampaignEvent) -> Option<Campaign> {
        let mut campaign = match (state, event) {
            (None, CampaignEvent::CampaignCreated(created)) => {
                let campaign = Campaign {
                    campaign_id: created.campaign_id,
                    store_id: created.store_id,
                    sku: created.sku.clone(),
                    title: created.title.clone(),
                    price_cents: created.price_cents,
                    quota: created.quota,
                    per_user_limit: created.per_user_limit,
                    starts_at: created.starts_at,
                    ends_at: created.ends_at,
                    payment_timeout_seconds: created.payment_timeout_seconds,
                    closed_at: None,
                    created_at: created.created_at,
                    stock: Stock {
                        total: created.quota,
                        available: created.quota,
                        reserved: 0,
                        sold: 0,
                    },
                    holdings: BTreeMap::new(),
                    reservations: BTreeMap::new(),
                };
                campaign.assert_invariants();
                return Some(campaign);
            }
            (Some(_), CampaignEvent::CampaignCreated(_)) => panic!("campaign created twice"),
            (None, event) => panic!("event on a campaign that was never created: {event:?}"),
            (Some(campaign), _) => campaign,
        };
        match event {
            CampaignEvent::CampaignCreated(_) => unreachable!("handled above"),
            CampaignEvent::StockReplenished { quantity, .. } => {
                campaign.stock.total = add(campaign.stock.total, *quantity);
                campaign.stock.available = add(campaign.stock.available, *quantity);
            }
            CampaignEvent::CampaignClosed { at } => campaign.closed_at = Some(*at),
            CampaignEvent::StockReserved {
                order_id,
                user_id,
                quantity,
                ..
            } => {
                campaign.stock.available = sub(campaign.stock.available, *quantity);
                campaign.stock.reserved = add(campaign.stock.reserved, *quantity);
                let held = campaign.holdings.entry(*user_id).or_insert(0);
                *held = add(*held, *quantity);
                let previous = campaign.reservations.insert(
                    *order_id,
                    Reservation {
                        user_id: *user_id,
                        quantity: *quantity,
                        state: ReservationState::Reserved,
                    },
                );
                assert!(previous.is_none(), "order {order_id} reserved twice");
            }
            CampaignEvent::StockReleased {
                order_id, quantity, ..
            } => {
                let reservation = take_reserved(&mut campaign, *order_id, *quantity);
                reservation.state = ReservationState::Released;
                let user_id = reservation.user_id;
                campaign.stock.reserved = sub(campaign.stock.reserved, *quantity);
                campaign.stock.available = add(campaign.stock.available, *quantity);
                let held = campaign
                    .holdings
                    .get_mut(&user_id)
                    .expect("a reservation has a holder");
                *held = sub(*held, *quantity);
                if *held == 0 {
                    campaign.holdings.remove(&user_id);
                }
            }
            CampaignEvent::StockSold {
                order_id, quantity, ..
            } => {
                take_reserved(&mut campaign, *order_id, *quantity).state = ReservationState::Sold;
                campaign.stock.reserved = sub(campaign.stock.reserved, *quantity);
                campaign.stock.sold = add(campaign.stock.sold, *quantity);
            }
        }
        campaign.assert_invariants();
        Some(campaign)
    }
}

fn create(new: &NewCampaign) -> Result<Vec<CampaignEvent>, DomainError> {
    let Some(store) = &new.store else {
        return Err(DomainError::StoreNotFound);
    };
    check_text("sku", &new.sku, SKU_CHARS_MAX)?;
    check_text("title", &new.title, TITLE_CHARS_MAX)?;
    let invalid = |field, problem| Err(DomainError::InvalidInput { field, problem });
    if !(1..=PRICE_CENTS_MAX).contains(&new.price_cents) {
        return invalid("price_cents", "must be between 1 and 100000000");
    }
    if !(1..=CAMPAIGN_TOTAL_UNITS_MAX).contains(&new.quota) {
        return invalid("quota", "must be between 1 and 10000000");
    }
    if !(1..=PER_USER_LIMIT_UNITS_MAX).contains(&new.per_user_limit) {
        return invalid("per_user_limit", "must be between 1 and 10000");
    }
    if !(PAYMENT_TIMEOUT_S_MIN..=PAYMENT_TIMEOUT_S_MAX).contains(&new.payment_timeout_seconds) {
        return invalid("payment_timeout_seconds", "must be between 1 and 86400");
    }
    if new.ends_at <= new.starts_at {
        return invalid("ends_at", "must be after starts_at");
    }
    if new.ends_at <= new.now {
        return invalid("ends_at", "must be in the future");
    }
    if new.ends_at - new.starts_at > chrono::Duration::days(SALES_WINDOW_DAYS_MAX) {
        return invalid("ends_at", "must be at most 366 days after starts_at");
    }
    Ok(vec![CampaignEvent::CampaignCreated(CampaignCreated {
        campaign_id: new.campaign_id,
        store_id: store.store_id,
        sku: new.sku.trim().to_owned(),
        title: new.title.trim().to_owned(),
        price_cents: Cents::new(new.price_cents),
        quota: new.quota,
        per_user_limit: new.per_user_limit,
        starts_at: new.starts_at,
        ends_at: new.ends_at,
        payment_timeout_seconds: new.payment_timeout_seconds,
        created_at: new.now,
    })])
}

fn replenish(
    campaign: &Campaign,
    quantity: u32,
    now: Timestamp,
) -> Result<Vec<CampaignEvent>, DomainError> {
    if campaign.closed_at.is_some() {
        return Err(DomainError::CampaignClosed);
    }
    if quantity == 0 {
        return Err(DomainError::InvalidInput {
            field: "quantity",
            problem: "must be at least 1",
        });
    }
    if u64::from(campaign.stock.total) + u64::from(quantity) > u64::from(CAMPAIGN_TOTAL_UNITS_MAX) {
        return Err(DomainError::InvalidInput {
            field: "quantity",
            problem: "would take the campaign over 10000000 units in total",
        });
    }
    Ok(vec![CampaignEvent::StockReplenished { quantity, at: now }])
}

fn reserve(
    campaign: &Campaign,
    order_id: OrderId,
    user_id: UserId,
    quantity: u32,
    now: Timestamp,
) -> Result<Vec<CampaignEvent>, DomainError> {
    if campaign.reservations.contains_key(&order_id) {
        // This order was decided before; deciding it again must not hold more units.
        return Ok(vec![]);
    }
    if !(1..=ORDER_QUANTITY_UNITS_MAX).contains(&quantity) {
        return Err(DomainError::InvalidInput {
            field: "quantity",
            problem: "must be between 1 and 10000",
        });
    }
    if campaign.status(now) != CampaignStatus::Open {
        return Err(DomainError::CampaignNotOpen);
    }
    if u64::from(campaign.holding_of(user_id)) + u64::from(quantity)
        > u64::from(campaign.per_user_limit)
    {
        return Err(DomainError::LimitExceeded);
    }
    if campaign.stock.available < quantity {
        return Err(DomainError::SoldOut);
    }
    Ok(vec![CampaignEvent::StockReserved {
        order_id,
        user_id,
        quantity,
        at: now,
    }])
}

fn take_reserved(campaign: &mut Campaign, order_id: OrderId, quantity: u32) -> &mut Reservation {
    let reservation = campaign
        .reservations
        .get_mut(&order_id)
        .unwrap_or_else(|| panic!("order {order_id} has no reservation"));
    assert_eq!(
        reservation.state,
        ReservationState::Reserved,
        "order {order_id} is not reserved"
    );
    assert_eq!(
        reservation.quantity, quantity,
        "order {order_id} quantity differs"
    );
    reservation
}

fn add(a: u32, b: u32) -> u32 {
    a.checked_add(b).expect("unit count overflow")
}

fn sub(a: u32, b: u32) -> u32 {
    a.checked_sub(b).expect("unit count underflow")
}

#[cfg(test)]
mod tests;
