//! Money in integer minor units. There is no floating point money anywhere in groupbuy.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of money in minor units (cents), never negative.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Cents(u64);

impl Cents {
    /// Zero cents.
    pub const ZERO: Cents = Cents(0);

    /// Wraps a count of minor units.
    pub const fn new(cents: u64) -> Self {
        Self(cents)
    }

    /// The count of minor units.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The price of `quantity` units at this unit price, or `None` on overflow.
    pub fn times(self, quantity: u32) -> Option<Cents> {
        self.0.checked_mul(u64::from(quantity)).map(Cents)
    }
}

impl fmt::Display for Cents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} cents", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_total_is_the_unit_price_times_the_quantity() {
        assert_eq!(Cents::new(1_250).times(3), Some(Cents::new(3_750)));
    }

    #[test]
    fn a_line_total_that_overflows_is_none_rather_than_wrapped() {
        assert_eq!(Cents::new(u64::MAX).times(2), None);
    }
}
