//! Idempotency-Key records: one per (caller, key), written in the same transaction as the
//! events the request appended (or alone, for a request that appended nothing), so a retry
//! gets the same answer and no second effect.
//!
//! There is no claim taken before the work and no lease: a request that dies before its
//! append leaves nothing behind, and its retry runs again at once. Two requests with the same
//! key racing on different instances both do their (side-effect free) work, and the log lets
//! exactly one of them record: the other finds the key taken ([`crate::LogError::KeyTaken`])
//! and answers with what the winner recorded. See docs/adr/0010-flash-sale-engine.md.

/// How long a key is remembered after it was first used.
pub const IDEMPOTENCY_KEY_TTL_S: u64 = 24 * 60 * 60;

/// A key, scoped to the caller that sent it: two customers may use the same key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IdempotencyKey {
    /// Who sent it (`operator`, `user:<id>`, `payment_provider`).
    pub scope: String,
    /// The client's key.
    pub key: String,
}

/// A response as it was sent, to be replayed byte for byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers worth replaying (`Location`, `Content-Type`).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// What is recorded under a key: which request used it, and what it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The key.
    pub key: IdempotencyKey,
    /// The SHA-256 of the request (route and body) that used it, in hex.
    pub request_sha256: String,
    /// The answer it got.
    pub response: StoredResponse,
}

impl IdempotencyRecord {
    /// What a later request with the same key is answered: the recorded response when it is
    /// the same request, or the word that it is not.
    pub fn answer_to(&self, request_sha256: &str) -> Prior {
        if self.request_sha256 == request_sha256 {
            Prior::Same(self.response.clone())
        } else {
            Prior::Different
        }
    }
}

/// How a request relates to the one that used its key first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prior {
    /// The same request: replay this response.
    Same(StoredResponse),
    /// Another request used the key.
    Different,
}

/// How the expiry sweep of Idempotency-Keys runs.
#[derive(Clone, Debug)]
pub struct KeySweep {
    /// How often it looks for expired keys.
    pub every: std::time::Duration,
    /// Most keys removed by one statement.
    pub batch: usize,
    /// Pause between two full batches, so a large backlog is removed without hogging the
    /// database.
    pub pause: std::time::Duration,
}

impl Default for KeySweep {
    fn default() -> Self {
        KeySweep {
            every: std::time::Duration::from_secs(60),
            batch: 1_000,
            pause: std::time::Duration::from_millis(100),
        }
    }
}

/// Until `stop`, removes the Idempotency-Keys older than [`IDEMPOTENCY_KEY_TTL_S`] from `log`,
/// in batches of `sweep.batch`, counting them in `groupbuy_idempotency_keys_expired_total`.
/// Any number of instances may run it: each statement removes what it finds.
pub async fn sweep_expired(
    log: std::sync::Arc<dyn crate::EventLog>,
    sweep: KeySweep,
    stop: impl std::future::Future<Output = ()>,
) {
    let ttl = std::time::Duration::from_secs(IDEMPOTENCY_KEY_TTL_S);
    let mut ticks = tokio::time::interval(sweep.every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = ticks.tick() => {}
        }
        loop {
            match log.expire_idempotency_keys(ttl, sweep.batch).await {
                Ok(removed) => {
                    metrics::counter!("groupbuy_idempotency_keys_expired_total").increment(removed);
                    if removed < sweep.batch as u64 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot remove expired Idempotency-Keys; trying later");
                    break;
                }
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(sweep.pause) => {}
            }
        }
    }
}
