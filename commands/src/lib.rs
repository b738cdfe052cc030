//! The write side of groupbuy: the event log and command handling.
//!
//! - [`log::EventLog`] is the append-only log, with two implementations behind one trait:
//!   [`log::postgres::PgEventLog`] (the source of truth in production) and
//!   [`log::memory::MemoryEventLog`] (the embedded, volatile default). One test suite runs
//!   against both.
//! - [`handler::CommandHandler`] loads an aggregate (snapshot plus tail), decides, and appends
//!   with the expected version, retrying with jitter when another writer got there first.
//! - [`relay`] mirrors the log into the [`bus`] (JetStream, or in process), one active relay
//!   among all instances; [`subscription`] is the runtime sagas and projections consume it
//!   through: durable consumers, per-stream order, dedupe, retries and dead letters;
//!   [`lease`] shares a consumer's partitions among instances.
//! - [`trace`] carries one trace from the request through the events it records to everything
//!   that handles them.
//! - [`idempotency`] holds the Idempotency-Key records the gateway completes in the same
//!   transaction as the append.

pub mod bus;
pub mod group_commit;
pub mod handler;
pub mod idempotency;
pub mod lease;
pub mod log;
pub mod periodic;
pub mod relay;
pub mod subscription;
pub mod trace;

pub use handler::{CommandError, CommandHandler, Executed};
pub use log::{
    AppendRequest, Appended, EventLog, LogCursor, LogError, NewEvent, RecordedEvent, StreamAppend,
};

/// The stream id of an aggregate: `<category>-<id>`.
pub fn stream_id<A: domain::Aggregate>(id: impl std::fmt::Display) -> String {
    format!("{}-{id}", A::CATEGORY)
}
