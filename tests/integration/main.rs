//! Integration tests: one binary, a module per capability, real Postgres.

mod command_handling;
mod event_log;
