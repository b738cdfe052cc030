//! Rate limits: a token bucket per customer, and one for the whole instance.
//!
//! Both are GCRA buckets (governor): `per_second` requests a second on average, with bursts
//! of up to `burst`. A request over either is answered 429 `rate_limited` with `Retry-After`,
//! the whole seconds until the bucket lets one through again, before any work is done. The
//! instance bucket takes every API request; the customer bucket takes a customer's requests
//! once their token is checked, so nobody can spend another customer's allowance.

use std::num::NonZeroU32;

use domain::UserId;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;

/// Customers whose buckets are kept before idle ones are dropped.
const TRACKED_CUSTOMERS_MAX: usize = 100_000;

/// One token bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Requests a second, sustained.
    pub per_second: u32,
    /// Requests at once after a quiet spell.
    pub burst: u32,
}

impl Bucket {
    fn quota(self) -> Option<Quota> {
        let per_second = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst).unwrap_or(per_second);
        Some(Quota::per_second(per_second).allow_burst(burst))
    }
}

/// The limits of one instance; `None` turns a bucket off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Per customer.
    pub per_customer: Option<Bucket>,
    /// For all requests to the API together.
    pub global: Option<Bucket>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_customer: Some(Bucket {
                per_second: 20,
                burst: 40,
            }),
            global: Some(Bucket {
                per_second: 5_000,
                burst: 10_000,
            }),
        }
    }
}

impl RateLimits {
    /// No limits at all: for benchmarks and tests that measure something else.
    pub const NONE: RateLimits = RateLimits {
        per_customer: None,
        global: None,
    };
}

/// The buckets.
pub struct Limiter {
    customers: Option<DefaultKeyedRateLimiter<UserId>>,
    global: Option<DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl Limiter {
    /// Empty buckets for `limits`.
    pub fn new(limits: RateLimits) -> Limiter {
        Limiter {
            customers: limits
                .per_customer
                .and_then(Bucket::quota)
                .map(RateLimiter::keyed),
            global: limits
                .global
                .and_then(Bucket::quota)
                .map(RateLimiter::direct),
            clock: DefaultClock::default(),
        }
    }

    /// Takes a request from the instance's bucket, or says how long to wait.
    pub fn check_global(&self) -> Result<(), ApiError> {
        match &self.global {
            Some(limiter) => limiter
                .check()
                .map_err(|until| self.limited(until.wait_time_from(self.clock.now()), "global")),
            None => Ok(()),
        }
    }

    /// Takes a request from `customer`'s bucket, or says how long to wait.
    pub fn check_customer(&self, customer: UserId) -> Result<(), ApiError> {
        let Some(limiter) = &self.customers else {
            return Ok(());
        };
        if limiter.len() > TRACKED_CUSTOMERS_MAX {
            limiter.retain_recent();
        }
        limiter
            .check_key(&customer)
            .map_err(|until| self.limited(until.wait_time_from(self.clock.now()), "customer"))
    }

    fn limited(&self, wait: std::time::Duration, scope: &'static str) -> ApiError {
        let retry_after_s = u32::try_from(wait.as_secs_f64().ceil() as u64)
            .unwrap_or(u32::MAX)
            .max(1);
        tracing::debug!(scope, retry_after_s, "request rate limited");
        metrics::counter!("groupbuy_rate_limited_total", "scope" => scope).increment(1);
        let whose = if scope == "customer" {
            "this customer"
        } else {
            "this service"
        };
        ApiError::TooManyRequests {
            detail: format!("too many requests for {whose}; retry in {retry_after_s} s"),
            retry_after_s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(per_second: u32, burst: u32) -> Option<Bucket> {
        Some(Bucket { per_second, burst })
    }

    #[test]
    fn a_customer_over_the_burst_is_told_when_to_retry_and_others_are_not_held_back() {
        let limiter = Limiter::new(RateLimits {
            per_customer: bucket(1, 2),
            global: None,
        });
        let ada = UserId::from_ulid(ulid::Ulid::new());
        let bob = UserId::from_ulid(ulid::Ulid::new());
        assert!(limiter.check_customer(ada).is_ok());
        assert!(limiter.check_customer(ada).is_ok());
        match limiter.check_customer(ada) {
            Err(ApiError::TooManyRequests { retry_after_s, .. }) => assert_eq!(retry_after_s, 1),
            other => panic!("expected 429, got {other:?}"),
        }
        assert!(
            limiter.check_customer(bob).is_ok(),
            "buckets are per customer"
        );
    }

    #[test]
    fn the_instance_bucket_takes_everyone_and_a_zero_rate_turns_it_off() {
        let limiter = Limiter::new(RateLimits {
            per_customer: None,
            global: bucket(1, 1),
        });
        assert!(limiter.check_global().is_ok());
        assert!(limiter.check_global().is_err());
        let off = Limiter::new(RateLimits {
            per_customer: bucket(0, 0),
            global: bucket(0, 0),
        });
        for _ in 0..100 {
            assert!(off.check_global().is_ok());
            assert!(off
                .check_customer(UserId::from_ulid(ulid::Ulid::new()))
                .is_ok());
        }
    }
}
