//! Wire formats of groupbuy events, and the only place event JSON is written or read.
//!
//! - [`registry::Registry`] holds a compiled JSON Schema for every event type and version
//!   (the files under `schemas/events/`), validates payloads, and upcasts old versions.
//! - [`codec`] turns a domain event into `(type, schema version, data)` and back, validating
//!   on the way out and on the way in, so nothing unvalidated is appended or trusted.
//! - [`envelope::Envelope`] is an event as it travels: id, stream, version, global position,
//!   type, schema version, recorded time and [`envelope::Metadata`] around the payload.

pub mod codec;
pub mod envelope;
pub mod registry;

pub use codec::{decode, encode, from_envelope, EncodedEvent};
pub use envelope::{Envelope, EventHead, Metadata};
pub use registry::{Registry, SchemaError};
