//! JetStream streams per test.

use std::time::Duration;

use commands::bus::jetstream::{JetStreamBus, JetStreamSettings};

/// The NATS server tests use. `GROUPBUY_TEST_NATS` overrides it; the default is the
/// machine's local server.
pub fn nats_url() -> String {
    std::env::var("GROUPBUY_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Settings for streams and subjects no other test uses: a unique prefix, and a short
/// retention so that streams a crashed test leaves behind go away on their own.
pub fn unique_settings(url: &str) -> JetStreamSettings {
    JetStreamSettings {
        prefix: format!("t{}", ulid::Ulid::new().to_string().to_lowercase()),
        max_age: Duration::from_secs(3600),
        ..JetStreamSettings::new(url)
    }
}

/// A JetStream mirror of a test's own, deleted when this value is dropped.
pub struct TestStreams {
    /// Its settings.
    pub settings: JetStreamSettings,
}

impl TestStreams {
    /// Settings for a test's own streams on the machine's NATS server.
    pub fn new() -> TestStreams {
        crate::init_tracing();
        TestStreams {
            settings: unique_settings(&nats_url()),
        }
    }

    /// Connects a bus to them, creating them on first use.
    pub async fn connect(&self) -> JetStreamBus {
        let url = &self.settings.url;
        JetStreamBus::connect(self.settings.clone())
            .await
            .unwrap_or_else(|e| {
                panic!("cannot set up JetStream for the test at {url} (is NATS running?): {e}")
            })
    }
}

impl Default for TestStreams {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestStreams {
    fn drop(&mut self) {
        let settings = self.settings.clone();
        // Its own thread and runtime: the test's runtime may be shutting down.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            runtime.block_on(async {
                let connect = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(2))
                    .connect(&settings.url);
                if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), connect).await
                {
                    let context = async_nats::jetstream::new(client);
                    let _ = context.delete_stream(settings.events_stream()).await;
                    let _ = context.delete_stream(settings.dead_letter_stream()).await;
                }
            });
        })
        .join();
    }
}
