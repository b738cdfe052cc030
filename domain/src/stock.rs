//! A stock bucket: a share of a campaign's available units in a stream of its own, so that
//! several writers (one per instance) sell the same campaign without fighting over one stream.
//!
//! Bucket 0 is the campaign's own stream ([`crate::campaign::Campaign::available_units`]), and
//! holds every unit when the campaign is created. Buckets 1 and up (`stock-<campaign>-<n>`)
//! start empty and are filled by transfers from a bucket that has units, when their writer
//! runs out: units move, they are never created here, so the campaign's total stays in one
//! place. A reservation takes units from the writer's bucket and a release gives them back to
//! it; the customer's [`crate::holding::Holding`] records which order holds how many.

use serde::{Deserialize, Serialize};

use crate::campaign::StockMove;
use crate::limits::STOCK_BUCKETS_MAX;
use crate::{Aggregate, DomainError, Timestamp};

/// A bucket as its events left it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockBucket {
    /// Units in the bucket that nobody holds.
    pub available_units: u32,
    /// Units sold by decisions recorded on this bucket (see
    /// [`crate::campaign::Campaign::sold_units`]).
    pub sold_units: u32,
}

/// What can be asked of a bucket stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StockBucketCommand {
    /// Records what a writer's decision took for reservations and gave back for releases.
    Move(StockMove),
    /// Gives units to another bucket.
    TransferOut {
        /// The bucket that gets them.
        to_bucket: u32,
        /// How many.
        units: u32,
        /// Now.
        now: Timestamp,
    },
    /// Takes units another bucket gave.
    TransferIn {
        /// The bucket that gave them.
        from_bucket: u32,
        /// How many.
        units: u32,
        /// Now.
        now: Timestamp,
    },
}

/// What a bucket stream records. The same event types as the campaign's own bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum StockBucketEvent {
    /// Units taken for reservations, given back by releases, and sold.
    StockMoved {
        /// Units taken.
        reserved: u32,
        /// Units given back.
        released: u32,
        /// Reserved units paid for.
        sold: u32,
        /// When.
        at: Timestamp,
    },
    /// Units went to another bucket.
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
}

/// The stock bucket aggregate: stream `stock-<campaign id>-<bucket>`, bucket 1 and up.
#[derive(Debug)]
pub struct StockBucketAggregate;

impl Aggregate for StockBucketAggregate {
    const CATEGORY: &'static str = "stock";
    type State = StockBucket;
    type Command = StockBucketCommand;
    type Event = StockBucketEvent;

    fn decide(
        state: &StockBucket,
        command: &StockBucketCommand,
    ) -> Result<Vec<StockBucketEvent>, DomainError> {
        match *command {
            StockBucketCommand::Move(stock_move) => {
                if stock_move.is_empty() {
                    return Ok(vec![]);
                }
                stock_move.apply_to(state.available_units)?;
                Ok(vec![StockBucketEvent::StockMoved {
                    reserved: stock_move.reserved,
                    released: stock_move.released,
                    sold: stock_move.sold,
                    at: stock_move.now,
                }])
            }
            StockBucketCommand::TransferOut {
                to_bucket,
                units,
                now,
            } => {
                check_transfer(to_bucket, units)?;
                if units > state.available_units {
                    return Err(DomainError::SoldOut);
                }
                Ok(vec![StockBucketEvent::StockTransferredOut {
                    to_bucket,
                    units,
                    at: now,
                }])
            }
            StockBucketCommand::TransferIn {
                from_bucket,
                units,
                now,
            } => {
                check_transfer(from_bucket, units)?;
                Ok(vec![StockBucketEvent::StockTransferredIn {
                    from_bucket,
                    units,
                    at: now,
                }])
            }
        }
    }

    fn evolve(mut state: StockBucket, event: &StockBucketEvent) -> StockBucket {
        let available = u64::from(state.available_units);
        let after = match event {
            StockBucketEvent::StockMoved {
                reserved,
                released,
                sold,
                ..
            } => {
                state.sold_units = state
                    .sold_units
                    .checked_add(*sold)
                    .expect("unit count overflow");
                (available + u64::from(*released)).checked_sub(u64::from(*reserved))
            }
            StockBucketEvent::StockTransferredOut { units, .. } => {
                available.checked_sub(u64::from(*units))
            }
            StockBucketEvent::StockTransferredIn { units, .. } => {
                Some(available + u64::from(*units))
            }
        };
        state.available_units = after
            .and_then(|units| u32::try_from(units).ok())
            .unwrap_or_else(|| panic!("bucket units out of range after {event:?}"));
        state
    }
}

fn check_transfer(other: u32, units: u32) -> Result<(), DomainError> {
    if other >= STOCK_BUCKETS_MAX {
        return Err(DomainError::InvalidInput {
            field: "bucket",
            problem: "must be a bucket of the campaign",
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

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::scenario::given;

    fn at(seconds: i64) -> Timestamp {
        chrono::Utc
            .timestamp_opt(1_700_000_000 + seconds, 0)
            .unwrap()
    }

    fn filled(units: u32) -> StockBucketEvent {
        StockBucketEvent::StockTransferredIn {
            from_bucket: 0,
            units,
            at: at(1),
        }
    }

    fn moved(reserved: u32, released: u32) -> StockBucketCommand {
        StockBucketCommand::Move(StockMove {
            reserved,
            released,
            sold: 0,
            now: at(2),
        })
    }

    #[test]
    fn given_an_empty_bucket_when_units_are_transferred_in_then_it_holds_them() {
        let state = given::<StockBucketAggregate>([])
            .when(StockBucketCommand::TransferIn {
                from_bucket: 0,
                units: 7,
                now: at(1),
            })
            .then([filled(7)]);
        assert_eq!(state.available_units, 7);
    }

    #[test]
    fn given_a_bucket_when_a_decision_takes_gives_back_and_sells_units_then_stock_moved() {
        let decision = StockBucketCommand::Move(StockMove {
            reserved: 4,
            released: 2,
            sold: 1,
            now: at(2),
        });
        let state = given::<StockBucketAggregate>([filled(5)])
            .when(decision)
            .then([StockBucketEvent::StockMoved {
                reserved: 4,
                released: 2,
                sold: 1,
                at: at(2),
            }]);
        assert_eq!((state.available_units, state.sold_units), (3, 1));
    }

    #[test]
    fn given_a_bucket_when_a_decision_takes_more_than_it_holds_then_sold_out() {
        given::<StockBucketAggregate>([filled(5)])
            .when(moved(6, 0))
            .then_err(DomainError::SoldOut);
    }

    #[test]
    fn given_a_bucket_when_nothing_moves_then_nothing_happens() {
        given::<StockBucketAggregate>([filled(5)])
            .when(moved(0, 0))
            .then_nothing();
    }

    #[test]
    fn given_a_bucket_when_it_gives_more_than_it_holds_then_sold_out() {
        given::<StockBucketAggregate>([filled(5)])
            .when(StockBucketCommand::TransferOut {
                to_bucket: 2,
                units: 6,
                now: at(3),
            })
            .then_err(DomainError::SoldOut);
    }

    #[test]
    fn given_a_bucket_when_it_gives_units_away_then_it_holds_fewer() {
        let state = given::<StockBucketAggregate>([filled(5)])
            .when(StockBucketCommand::TransferOut {
                to_bucket: 2,
                units: 2,
                now: at(3),
            })
            .then([StockBucketEvent::StockTransferredOut {
                to_bucket: 2,
                units: 2,
                at: at(3),
            }]);
        assert_eq!(state.available_units, 3);
    }

    #[test]
    fn given_a_bucket_when_a_transfer_moves_nothing_then_invalid_input() {
        given::<StockBucketAggregate>([filled(5)])
            .when(StockBucketCommand::TransferOut {
                to_bucket: 2,
                units: 0,
                now: at(3),
            })
            .then_err(DomainError::InvalidInput {
                field: "units",
                problem: "must be at least 1",
            });
    }

    #[test]
    #[should_panic(expected = "bucket units out of range")]
    fn evolving_a_move_the_bucket_cannot_cover_is_a_bug_not_a_clamp() {
        StockBucketAggregate::evolve(
            StockBucket {
                available_units: 1,
                sold_units: 0,
            },
            &StockBucketEvent::StockMoved {
                reserved: 2,
                released: 0,
                sold: 0,
                at: at(1),
            },
        );
    }
}
