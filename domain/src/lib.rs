//! The business model of groupbuy, pure: no I/O, no clock, no randomness.
//!
//! Every aggregate is a pair of functions, `decide(&State, &Command) -> Result<Vec<Event>,
//! DomainError>` and `evolve(State, &Event) -> State`, bundled by the [`Aggregate`] trait so the
//! command layer can load, decide and append any of them the same way. Time, ids and lookups
//! (the store a campaign belongs to, the price of a campaign) arrive inside the command.
//!
//! The aggregates:
//! - [`user::User`]: a customer and the hash of their API token.
//! - [`store::Store`]: a shop in a region.
//! - [`campaign::Campaign`]: a group-buy deal, its total units and the units of its first stock
//!   bucket; [`stock::StockBucket`]: more buckets, for several writers at once.
//! - [`holding::Holding`]: a customer's live units in one campaign, by order, where the
//!   per-user limit is decided.
//! - [`order::Order`]: a customer's order as the saga moves it to a final state.
//! - [`payment::Payment`]: a payment request and what the provider (or the deadline) said.
//! - [`saga::plan`]: the order saga's next step, from where the order, its reservation and
//!   its payment stand; and [`saga::advance`], every step a wake-up takes, decided in memory
//!   for one atomic append.
//!
//! [`scenario`] holds the given/when/then harness used by every decide test.

pub mod aggregate;
pub mod campaign;
pub mod error;
pub mod holding;
pub mod ids;
pub mod limits;
pub mod money;
pub mod order;
pub mod payment;
pub mod saga;
pub mod scenario;
pub mod stock;
pub mod store;
pub mod user;

pub use aggregate::Aggregate;
pub use error::DomainError;
pub use ids::{CampaignId, OrderId, PaymentId, StoreId, UserId};
pub use money::Cents;

/// Every instant in the domain is UTC; the edges parse and print RFC 3339.
pub type Timestamp = chrono::DateTime<chrono::Utc>;
