//! Identifiers: one newtype per kind of thing, all ULIDs, so an order id can never be passed
//! where a campaign id is expected.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// A string that is not a ULID was given where an id was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid ULID: {0:?}")]
pub struct InvalidId(pub String);

/// Parses the canonical text of a ULID: 26 Crockford base-32 characters whose first is 0 to
/// 7, since 26 characters carry 130 bits for the ULID's 128. Decoders that drop the two extra
/// bits would read `8…` as `0…`, one id with several spellings.
fn parse_ulid(s: &str) -> Result<Ulid, InvalidId> {
    if !s.starts_with(|c: char| ('0'..='7').contains(&c)) {
        return Err(InvalidId(s.to_owned()));
    }
    Ulid::from_string(s).map_err(|_| InvalidId(s.to_owned()))
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Ulid);

        impl $name {
            /// Wraps an already generated ULID.
            pub const fn from_ulid(ulid: Ulid) -> Self {
                Self(ulid)
            }

            /// The ULID inside.
            pub const fn ulid(self) -> Ulid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_ulid(s).map(Self)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = InvalidId;

            fn try_from(s: &str) -> Result<Self, Self::Error> {
                s.parse()
            }
        }
    };
}

ulid_id!(
    /// A customer.
    UserId
);
ulid_id!(
    /// A shop in a region.
    StoreId
);
ulid_id!(
    /// A group-buy deal, and the stream that holds its stock.
    CampaignId
);
ulid_id!(
    /// A customer's order.
    OrderId
);
ulid_id!(
    /// A payment request sent to the provider for one order.
    PaymentId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_prints_as_the_ulid_it_was_parsed_from() {
        let text = "01J9ZQ4Q7Y8M2R0B6WQJ3K5N1T";
        let id: OrderId = text.parse().unwrap();
        assert_eq!(id.to_string(), text);
    }

    #[test]
    fn a_ulid_past_128_bits_is_rejected_not_read_as_another() {
        let largest = "7ZZZZZZZZZZZZZZZZZZZZZZZZZ";
        assert_eq!(largest.parse::<CampaignId>().unwrap().to_string(), largest);
        for overflowing in ["80000000000000000000000000", "Z1J9ZQ4Q7Y8M2R0B6WQJ3K5N1T"] {
            assert_eq!(
                overflowing.parse::<CampaignId>(),
                Err(InvalidId(overflowing.to_owned()))
            );
        }
    }

    #[test]
    fn a_string_that_is_not_a_ulid_is_rejected() {
        assert_eq!(
            CampaignId::try_from("campaign-1"),
            Err(InvalidId("campaign-1".to_owned()))
        );
    }
}
