//! The test harness: real services, isolated per test.
//!
//! - [`TestDb`] creates a fresh Postgres database per test, migrates it, and drops it when the
//!   test ends (pass or fail), so tests run in parallel and leave nothing behind.
//! - [`TestStreams`] gives a test JetStream streams and subjects of its own, deleted when the
//!   test ends.
//! - [`TestRedis`] gives a test a Redis key prefix of its own, cleared when the test ends.
//! - [`process`] helps tests that run a server of their own (to kill it) or capture logs;
//!   [`servers`] are NATS and Redis servers of a test's own.
//! - [`spawn_app`] starts the real gateway on port 0 against such a database (or the embedded
//!   log) and hands back a client for it.
//!
//! Logs stay quiet unless `TEST_LOG` is set.
pub mod app;
pub mod bus;
pub mod db;
pub mod process;
pub mod redis;
pub mod servers;

pub use app::{
    expect_json, expect_problem, spawn_app, spawn_app_configured, spawn_app_tuned, spawn_app_with,
    Backend, TestApp, OPERATOR_TOKEN, WEBHOOK_SECRET,
};
pub use bus::TestStreams;
pub use db::TestDb;
pub use redis::TestRedis;

/// Installs a tracing subscriber once, writing to the test output when `TEST_LOG` is set.
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let filter = tracing_subscriber::EnvFilter::try_from_env("TEST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .init();
        }
    });
}
