//! The groupbuy HTTP gateway, and the roles the `groupbuy` binary composes.
//!
//! - [`app::Application`] builds storage, the read model and its projector, and serves
//!   [`app::router`] until told to stop.
//! - [`routes`] implements API.md, one module per resource; [`error::ApiError`] is every
//!   failure as problem+json; [`auth::Caller`] is who is calling; [`idempotency`] gives every
//!   POST its Idempotency-Key semantics.
//! - [`cli`] is the command line: `serve`, `migrate`.

pub mod app;
pub mod auth;
pub mod cli;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod ids;
pub mod overload;
pub mod reply;
pub mod routes;
pub mod state;
pub mod views;
