//! A customer. The API token itself is never stored: only its SHA-256, hex-encoded, which the
//! gateway compares against the hash of the token a request presents.

use serde::{Deserialize, Serialize};

use crate::error::check_text;
use crate::limits::NAME_CHARS_MAX;
use crate::{Aggregate, DomainError, Timestamp, UserId};

/// A registered customer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Who.
    pub user_id: UserId,
    /// Display name.
    pub name: String,
    /// Hex SHA-256 of the user's API token.
    pub token_sha256: String,
    /// When the user was registered.
    pub registered_at: Timestamp,
}

/// What can be asked of a user stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserCommand {
    /// Registers a new customer with the hash of a freshly issued token.
    Register {
        /// The new user's id.
        user_id: UserId,
        /// Display name.
        name: String,
        /// Hex SHA-256 of the issued token.
        token_sha256: String,
        /// Now.
        now: Timestamp,
    },
}

/// What a user stream records.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum UserEvent {
    /// A customer was registered.
    UserRegistered(User),
}

/// The user aggregate.
#[derive(Debug)]
pub struct UserAggregate;

impl Aggregate for UserAggregate {
    const CATEGORY: &'static str = "user";
    type State = Option<User>;
    type Command = UserCommand;
    type Event = UserEvent;

    fn decide(state: &Option<User>, command: &UserCommand) -> Result<Vec<UserEvent>, DomainError> {
        match command {
            UserCommand::Register {
                user_id,
                name,
                token_sha256,
                now,
            } => {
                if state.is_some() {
                    return Err(DomainError::UserAlreadyExists);
                }
                check_text("name", name, NAME_CHARS_MAX)?;
                Ok(vec![UserEvent::UserRegistered(User {
                    user_id: *user_id,
                    name: name.trim().to_owned(),
                    token_sha256: token_sha256.clone(),
                    registered_at: *now,
                })])
            }
        }
    }

    fn evolve(_state: Option<User>, event: &UserEvent) -> Option<User> {
        match event {
            UserEvent::UserRegistered(user) => Some(user.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::given;
    use chrono::TimeZone;
    use ulid::Ulid;

    fn register(name: &str) -> UserCommand {
        UserCommand::Register {
            user_id: UserId::from_ulid(Ulid::from_parts(1, 1)),
            name: name.to_owned(),
            token_sha256: "ab".repeat(32),
            now: chrono::Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        }
    }

    fn registered(name: &str) -> UserEvent {
        UserEvent::UserRegistered(User {
            user_id: UserId::from_ulid(Ulid::from_parts(1, 1)),
            name: name.to_owned(),
            token_sha256: "ab".repeat(32),
            registered_at: chrono::Utc.timestamp_opt(1_700_000_000, 0).unwrap(),
        })
    }

    #[test]
    fn given_no_user_when_registered_then_user_registered_with_trimmed_name() {
        given::<UserAggregate>([])
            .when(register("  Ada "))
            .then([registered("Ada")]);
    }

    #[test]
    fn given_a_user_when_registered_again_then_user_already_exists() {
        given::<UserAggregate>([registered("Ada")])
            .when(register("Ada"))
            .then_err(DomainError::UserAlreadyExists);
    }

    #[test]
    fn given_no_user_when_registered_with_a_blank_name_then_invalid_input() {
        given::<UserAggregate>([])
            .when(register("   "))
            .then_err(DomainError::InvalidInput {
                field: "name",
                problem: "must not be empty",
            });
    }

    #[test]
    fn given_no_user_when_registered_with_a_too_long_name_then_invalid_input() {
        given::<UserAggregate>([])
            .when(register(&"x".repeat(NAME_CHARS_MAX + 1)))
            .then_err(DomainError::InvalidInput {
                field: "name",
                problem: "is too long",
            });
    }
}
