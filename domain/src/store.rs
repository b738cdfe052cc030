//! A store: a shop in a region that publishes campaigns.

use serde::{Deserialize, Serialize};

use crate::error::check_text;
use crate::limits::NAME_CHARS_MAX;
use crate::{Aggregate, DomainError, StoreId, Timestamp};

/// A shop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Store {
    /// Which store.
    pub store_id: StoreId,
    /// Its name.
    pub name: String,
    /// The region it serves.
    pub region: String,
    /// When it was created.
    pub created_at: Timestamp,
}

/// What can be asked of a store stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreCommand {
    /// Opens a new store.
    Create {
        /// The new store's id.
        store_id: StoreId,
        /// Its name.
        name: String,
        /// Its region.
        region: String,
        /// Now.
        now: Timestamp,
    },
}

/// What a store stream records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum StoreEvent {
    /// A store was created.
    StoreCreated(Store),
}

/// The store aggregate.
#[derive(Debug)]
pub struct StoreAggregate;

impl Aggregate for StoreAggregate {
    const CATEGORY: &'static str = "store";
    type State = Option<Store>;
    type Command = StoreCommand;
    type Event = StoreEvent;

    fn decide(
        state: &Option<Store>,
        command: &StoreCommand,
    ) -> Result<Vec<StoreEvent>, DomainError> {
        match command {
            StoreCommand::Create {
                store_id,
                name,
                region,
                now,
            } => {
                if state.is_some() {
                    return Err(DomainError::StoreAlreadyExists);
                }
                check_text("name", name, NAME_CHARS_MAX)?;
                check_text("region", region, NAME_CHARS_MAX)?;
                Ok(vec![StoreEvent::StoreCreated(Store {
                    store_id: *store_id,
                    name: name.trim().to_owned(),
                    region: region.trim().to_owned(),
                    created_at: *now,
                })])
            }
        }
    }

    fn evolve(_state: Option<Store>, event: &StoreEvent) -> Option<Store> {
        match event {
            StoreEvent::StoreCreated(store) => Some(store.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::given;
    use chrono::TimeZone;
    use ulid::Ulid;

    fn now() -> Timestamp {
        chrono::Utc.timestamp_opt(1_700_000_000, 0).unwrap()
    }

    fn create(name: &str, region: &str) -> StoreCommand {
        StoreCommand::Create {
            store_id: StoreId::from_ulid(Ulid::from_parts(1, 2)),
            name: name.to_owned(),
            region: region.to_owned(),
            now: now(),
        }
    }

    fn created() -> StoreEvent {
        StoreEvent::StoreCreated(Store {
            store_id: StoreId::from_ulid(Ulid::from_parts(1, 2)),
            name: "Corner Cellar".to_owned(),
            region: "north".to_owned(),
            created_at: now(),
        })
    }

    #[test]
    fn given_no_store_when_created_then_store_created() {
        given::<StoreAggregate>([])
            .when(create("Corner Cellar", " north"))
            .then([created()]);
    }

    #[test]
    fn given_a_store_when_created_again_then_store_already_exists() {
        given::<StoreAggregate>([created()])
            .when(create("Corner Cellar", "north"))
            .then_err(DomainError::StoreAlreadyExists);
    }

    #[test]
    fn given_no_store_when_created_without_a_region_then_invalid_input() {
        given::<StoreAggregate>([])
            .when(create("Corner Cellar", ""))
            .then_err(DomainError::InvalidInput {
                field: "region",
                problem: "must not be empty",
            });
    }

    #[test]
    fn given_no_store_when_created_with_a_control_character_then_invalid_input() {
        given::<StoreAggregate>([])
            .when(create("Corner\u{0}Cellar", "north"))
            .then_err(DomainError::InvalidInput {
                field: "name",
                problem: "must not contain control characters",
            });
    }
}
