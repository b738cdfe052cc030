//! Integration tests: one binary, a module per capability, real Postgres.

/// Runs an app test on the embedded default and on a fresh Postgres database: both must
/// behave the same.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name(harness::spawn_app(harness::Backend::Embedded).await).await;
            }

            #[tokio::test]
            async fn postgres() {
                super::$name(harness::spawn_app(harness::Backend::Postgres).await).await;
            }
        }
    )*};
}

/// Runs a contract test against the in-memory log and against a fresh Postgres database.
macro_rules! on_both_logs {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$name(std::sync::Arc::new(commands::log::memory::MemoryEventLog::new())).await;
            }

            #[tokio::test]
            async fn postgres() {
                let db = harness::TestDb::new().await;
                super::$name(db.log()).await;
            }
        }
    )*};
}

mod api_catalog;
mod api_input;
mod api_orders;
mod command_handling;
mod console;
mod contract;
mod crash;
mod dead_letters;
mod event_log;
mod history;
mod loadgen;
mod mirror;
mod order_saga;
mod read_models;
mod readiness;
mod roles;
mod stock_buckets;
mod sweeper;
