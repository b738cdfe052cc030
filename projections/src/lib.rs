//! Read models of groupbuy, built from the event log, and the queries served from them.
//!
//! - [`read_model::ReadModel`] is what the gateway queries: campaigns with their stock, orders
//!   with their payment, each customer's and each campaign's orders, paged.
//! - [`memory::MemoryReadModel`] keeps those views in process memory.
//! - [`projector::run`] tails the global log into a read model, in log order, and publishes
//!   the position it reached so a caller can wait to read its own writes.
//!
//! Applying an event is idempotent by position: an event at or before the model's position
//! is skipped, so a redelivered event never counts twice.

pub mod memory;
pub mod projector;
pub mod read_model;

pub use memory::MemoryReadModel;
pub use read_model::{CampaignView, OrderFilter, OrderPage, OrderView, PaymentView, ReadModel};
