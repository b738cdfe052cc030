//! The groupbuy HTTP gateway, and the roles the `groupbuy` binary composes.
//!
//! - [`app::Application`] builds storage, the mirror, the read models and their consumers,
//!   the saga, and serves [`app::router`] until told to stop.
//! - [`routes`] implements API.md, one module per resource; [`error::ApiError`] is every
//!   failure as problem+json; [`auth::Caller`] is who is calling; [`idempotency`] gives every
//!   POST its Idempotency-Key semantics; [`parse_errors`] turns the requests hyper refuses
//!   before routing into problem+json too.
//! - [`overload`] and [`rate_limit`] answer 429 and 503 instead of letting latency grow;
//!   [`metrics`] serves `/metrics`; [`openapi`] serves the OpenAPI document generated from
//!   the routes, and a browser for it at `/docs`; [`console`] serves the operator console
//!   at `/console`.
//! - [`cli`] is the command line: `serve`, `migrate`, `projections`, `audit`; [`config`]
//!   layers a file under the environment and flags, and holds the profiles.
//! - [`loadgen`] is `groupbuy loadgen`, a flash sale driven against any deployment over HTTP.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod console;
pub mod dead_letters_cli;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod ids;
pub mod loadgen;
pub mod metrics;
pub mod openapi;
pub mod overload;
pub mod parse_errors;
pub mod rate_limit;
pub mod reply;
pub mod roles;
pub mod routes;
pub mod state;
pub mod telemetry;
pub mod views;
