//! Read models of groupbuy, built from the event log, and the queries served from them.
//!
//! - [`ops`]: what each event does to a read model, as store-neutral operations, written
//!   once and run by every store.
//! - [`read_model::ReadModel`]: the queries of the HTTP API (campaigns with their stock,
//!   orders with their payment, each customer's and each campaign's orders, paged).
//! - [`store::ProjectionStore`]: live applies and versions for rebuilds, with
//!   [`redis_store::RedisProjections`] (shared by every instance) and
//!   [`memory::MemoryProjections`] (the embedded default, and the audit's fresh fold).
//! - [`consumer::ProjectionConsumer`]: a projection fed by the subscription runtime; the
//!   record of what it applied is stored atomically with the data, so redelivery never counts
//!   twice.
//! - [`rebuild`]: a new version built from the log, caught up with live events and switched
//!   to atomically while queries go on.
//! - [`audit`]: the whole log replayed against the invariants, and the read models compared
//!   with a fresh fold.

pub mod audit;
pub mod consumer;
pub mod memory;
pub mod ops;
pub mod read_model;
pub mod rebuild;
pub mod redis_store;
pub mod store;

pub use consumer::ProjectionConsumer;
pub use memory::MemoryProjections;
pub use ops::ProjectionName;
pub use read_model::{
    CampaignView, Funnel, OrderFilter, OrderPage, OrderView, PaymentView, ReadModel,
};
pub use redis_store::RedisProjections;
pub use store::{ProjectionStore, ProjectionVersion, RebuildError, VersionStatus};
