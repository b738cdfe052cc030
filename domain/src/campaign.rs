//! A campaign: a group-buy deal on one drink SKU, and the first bucket of the stock it sells.
//!
//! The campaign's state is its terms and three counters, whatever the size of the sale: the
//! units it ever had (`total_units`), the units of its own bucket nobody holds
//! (`available_units`), and the units its writer's decisions sold (`sold_units`). What each order and each customer holds lives in the customer's
//! [`crate::holding::Holding`] of the campaign, and units may be spread over more buckets
//! ([`crate::stock::StockBucket`]) so several writers can sell at once without fighting over one
//! stream. A writer decides many orders against these counters in memory and records what they
//! took from the bucket, and gave back to it, as one [`CampaignEvent::StockMoved`]. See
//! docs/adr/0010-flash-sale-engine.md.

use serde::{Deserialize, Serialize};

use crate::error::check_text;
use crate::limits::{
    CAMPAIGN_TOTAL_UNITS_MAX, PAYMENT_TIMEOUT_S_MAX, PAYMENT_TIMEOUT_S_MIN,
    PER_USER_LIMIT_UNITS_MAX, PRICE_CENTS_MAX, SALES_WINDOW_DAYS_MAX, SKU_CHARS_MAX,
    STOCK_BUCKETS_MAX, TITLE_CHARS_MAX,
};
use crate::order::CancelReason;
use crate::store::Store;
use crate::{Aggregate, CampaignId, Cents, DomainError, OrderId, StoreId, Timestamp, UserId};

/// Units of a campaign by where they are, over all its buckets and holdings, as the read
/// model shows them. `available + reserved + sold == total` always.
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
    /// How many buckets its stock may be spread over: this stream is bucket 0, buckets 1 and
    /// up are [`crate::stock::StockBucket`] streams that take units from the others.
    pub stock_buckets: u32,
    /// Every unit the campaign ever had: quota plus replenishments.
    pub total_units: u32,
    /// Units in this stream's bucket that nobody holds.
    pub available_units: u32,
    /// Units sold by decisions recorded on this bucket. Sales leave a bucket's available
    /// units alone (the units left it when they were reserved); counting them here lets the
    /// campaign's stock be told from its buckets alone: whatever is neither available nor
    /// sold in any bucket is reserved.
    pub sold_units: u32,
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
    /// The campaign's units by where they are, over this bucket and `others` (the campaign's
    /// other buckets, as their streams stand).
    pub fn stock<'a>(
        &self,
        others: impl IntoIterator<Item = &'a crate::stock::StockBucket>,
    ) -> Stock {
        let (mut available, mut sold) =
            (u64::from(self.available_units), u64::from(self.sold_units));
        for bucket in others {
            available += u64::from(bucket.available_units);
            sold += u64::from(bucket.sold_units);
        }
        let total = u64::from(self.total_units);
        let reserved = total
            .checked_sub(available + sold)
            .expect("more units available and sold than the campaign ever had");
        let units = |n: u64| u32::try_from(n).expect("at most the total");
        Stock {
            total: self.total_units,
            available: units(available),
            reserved: units(reserved),
            sold: units(sold),
        }
    }

    /// Where the campaign stands at `now`.
    pub fn status(&self, now: Timestamp) -> CampaignStatus {
        CampaignStatus::at(now, self.starts_at, self.ends_at, self.closed_at)
    }

    /// Panics when the campaign breaks one of its invariants: that can only be a bug or a
    /// corrupted log, and carrying on would sell what does not exist.
    fn assert_invariants(&self) {
        assert!(
            u64::from(self.available_units) + u64::from(self.sold_units)
                <= u64::from(self.total_units),
            "bucket 0 counts {} units available and {} sold of {} in all",
            self.available_units,
            self.sold_units,
            self.total_units
        );
        assert!(
            self.total_units <= CAMPAIGN_TOTAL_UNITS_MAX,
            "total over the limit"
        );
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
    /// How many buckets the stock may be spread over, 1 to [`STOCK_BUCKETS_MAX`].
    pub stock_buckets: u32,
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
    /// Records what a writer's decision took from this bucket for reservations and gave back
    /// to it for releases.
    Move(StockMove),
    /// Gives units of this bucket to another bucket of the campaign.
    TransferOut {
        /// The bucket that gets them.
        to_bucket: u32,
        /// How many.
        units: u32,
        /// Now.
        now: Timestamp,
    },
    /// Takes units another bucket of the campaign gave.
    TransferIn {
        /// The bucket that gave them.
        from_bucket: u32,
        /// How many.
        units: u32,
        /// Now.
        now: Timestamp,
    },
}

/// Units that one decision took out of a bucket, put back into it, and sold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StockMove {
    /// Units taken for reservations.
    pub reserved: u32,
    /// Units given back by releases.
    pub released: u32,
    /// Reserved units that were paid for.
    pub sold: u32,
    /// Now.
    pub now: Timestamp,
}

impl StockMove {
    /// Whether it moves nothing.
    pub fn is_empty(&self) -> bool {
        self.reserved == 0 && self.released == 0 && self.sold == 0
    }

    /// The bucket's available units after the move, or `SoldOut` when it takes more than
    /// the bucket has.
    pub fn apply_to(&self, available: u32) -> Result<u32, DomainError> {
        u64::from(available)
            .checked_add(u64::from(self.released))
            .and_then(|units| units.checked_sub(u64::from(self.reserved)))
            .and_then(|units| u32::try_from(units).ok())
            .ok_or(DomainError::SoldOut)
    }
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
    /// How many buckets the stock may be spread over (1 before schema version 2).
    pub stock_buckets: u32,
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
    /// A writer's decision took units out of this bucket for reservations, put units back for
    /// releases, and sold reserved units. Which orders and customers hold them is in their
    /// holdings.
    StockMoved {
        /// Units taken for reservations.
        reserved: u32,
        /// Units given back by releases.
        released: u32,
        /// Reserved units paid for.
        sold: u32,
        /// When.
        at: Timestamp,
    },
    /// Units of this bucket went to another bucket.
    StockTransferredOut {
        /// The bucket that got them.
        to_bucket: u32,
        /// How many.
        units: u32,
        /// When.
        at: Timestamp,
    },
    /// Units came from another bucket.
    StockTransferredIn {
        /// The bucket that gave them.
        from_bucket: u32,
        /// How many.
        units: u32,
        /// When.
        at: Timestamp,
    },
    /// Units were held for an order. Recorded before holdings existed; read, never decided.
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
    /// An order's held units went back to available. Recorded before holdings existed; read,
    /// never decided.
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
    /// An order's held units were paid for. Recorded before holdings existed; read, never
    /// decided.
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
    // 2: counters instead of every reservation and holding.
    const STATE_VERSION: u32 = 2;
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
            CampaignCommand::Move(stock_move) => {
                if stock_move.is_empty() {
                    return Ok(vec![]);
                }
                stock_move.apply_to(campaign.available_units)?;
                Ok(vec![CampaignEvent::StockMoved {
                    reserved: stock_move.reserved,
                    released: stock_move.released,
                    sold: stock_move.sold,
                    at: stock_move.now,
                }])
            }
            CampaignCommand::TransferOut {
                to_bucket,
                units,
                now,
            } => {
                check_transfer(campaign, to_bucket, units)?;
                if units > campaign.available_units {
                    return Err(DomainError::SoldOut);
                }
                Ok(vec![CampaignEvent::StockTransferredOut {
                    to_bucket,
                    units,
                    at: now,
                }])
            }
            CampaignCommand::TransferIn {
                from_bucket,
                units,
                now,
            } => {
                check_transfer(campaign, from_bucket, units)?;
                Ok(vec![CampaignEvent::StockTransferredIn {
                    from_bucket,
                    units,
                    at: now,
                }])
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
                    stock_buckets: created.stock_buckets,
                    total_units: created.quota,
                    available_units: created.quota,
                    sold_units: 0,
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
                campaign.total_units = add(campaign.total_units, *quantity);
                campaign.available_units = add(campaign.available_units, *quantity);
            }
            CampaignEvent::CampaignClosed { at } => campaign.closed_at = Some(*at),
            CampaignEvent::StockMoved {
                reserved,
                released,
                sold,
                ..
            } => {
                campaign.available_units = sub(add(campaign.available_units, *released), *reserved);
                campaign.sold_units = add(campaign.sold_units, *sold);
            }
            CampaignEvent::StockTransferredOut { units, .. } => {
                campaign.available_units = sub(campaign.available_units, *units);
            }
            CampaignEvent::StockTransferredIn { units, .. } => {
                campaign.available_units = add(campaign.available_units, *units);
            }
            CampaignEvent::StockReserved { quantity, .. } => {
                campaign.available_units = sub(campaign.available_units, *quantity);
            }
            CampaignEvent::StockReleased { quantity, .. } => {
                campaign.available_units = add(campaign.available_units, *quantity);
            }
            CampaignEvent::StockSold { quantity, .. } => {
                campaign.sold_units = add(campaign.sold_units, *quantity);
            }
        }
        campaign.assert_invariants();
        Some(campaign)
    }
}

/// A transfer names another bucket of the campaign and moves at least one unit.
fn check_transfer(campaign: &Campaign, other: u32, units: u32) -> Result<(), DomainError> {
    if other == 0 || other >= campaign.stock_buckets {
        return Err(DomainError::InvalidInput {
            field: "bucket",
            problem: "must be another bucket of the campaign",
        });
    }
    if units == 0 {
        return Err(DomainError::InvalidInput {
            field: "units",
            problem: "must be at least 1",
        });
    }
    Ok(())
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
    if !(1..=STOCK_BUCKETS_MAX).contains(&new.stock_buckets) {
        return invalid("stock_buckets", "must be between 1 and 64");
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
        stock_buckets: new.stock_buckets,
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
    if u64::from(campaign.total_units) + u64::from(quantity) > u64::from(CAMPAIGN_TOTAL_UNITS_MAX) {
        return Err(DomainError::InvalidInput {
            field: "quantity",
            problem: "would take the campaign over 10000000 units in total",
        });
    }
    Ok(vec![CampaignEvent::StockReplenished { quantity, at: now }])
}

fn add(a: u32, b: u32) -> u32 {
    a.checked_add(b).expect("unit count overflow")
}

fn sub(a: u32, b: u32) -> u32 {
    a.checked_sub(b).expect("unit count underflow")
}

#[cfg(test)]
mod tests;
