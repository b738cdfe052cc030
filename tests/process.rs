//! Servers a test runs itself, so it can kill them, and what a test captures of the logs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A free port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `groupbuy serve` (the test binary at `binary`) of the deployment on `db`, `streams` and
/// `redis`, listening on `port`: the environment cleared but for these services, the external
/// payment provider, no rate limits, and only errors logged, to nowhere. Callers add the
/// operator token, the secrets and the flags of their own.
pub fn serve_command(
    binary: &str,
    port: u16,
    db: &crate::TestDb,
    streams: &crate::TestStreams,
    redis: &crate::TestRedis,
) -> std::process::Command {
    let mut command = std::process::Command::new(binary);
    command
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GROUPBUY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", &streams.settings.url)
        .env("GROUPBUY_NATS_PREFIX", &streams.settings.prefix)
        .env("REDIS_URL", &redis.url)
        .env("GROUPBUY_REDIS_PREFIX", &redis.prefix)
        .env("GROUPBUY_PAYMENT_PROVIDER", "external")
        .env("GROUPBUY_RATE_LIMIT_CUSTOMER_PER_SECOND", "0")
        .env("GROUPBUY_RATE_LIMIT_GLOBAL_PER_SECOND", "0")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    command
}

/// Waits until something listens on `port`; panics naming `what` after 10 s.
pub async fn wait_until_listening(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every log line, as written: a `MakeWriter` for a subscriber (clone it into the closure).
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// What was written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("log lines are UTF-8")
    }
}

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
