//! Idempotency-Key records: one per (caller, key), written in the same transaction as the
//! events the request appended (or alone, for a request that appended nothing), so a retry
//! gets the same answer and no second effect.
//!
//! A request that starts a stream (placing an order) can keep its record in its first event
//! instead of a record of its own ([`Keeping::InFirstEvent`]): that event's id is derived from
//! the key ([`key_event_id`]), so the log's unique event ids refuse a second use of the key in
//! the very statement that stores the events, and a later request finds the key through that
//! event and answers from the events ([`Answer::Appended`]). See
//! docs/adr/0004-idempotency-keys-in-the-append-transaction.md.
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

/// What a request records under its key: which request it was, and what it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The key.
    pub key: IdempotencyKey,
    /// The SHA-256 of the request (route and body) that used it, in hex.
    pub request_sha256: String,
    /// The answer, or where it will be found.
    pub keeping: Keeping,
}

/// Where the log keeps a key's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Keeping {
    /// A record of its own, with the response: for a request that appended nothing, or whose
    /// answer cannot be made again from its events.
    Apart(StoredResponse),
    /// In the append's first event, which must start its stream and carry [`key_event_id`] as
    /// its id and the request's hash in its metadata: the answer is made again from the
    /// events. Where the key was used before and has expired (the derived id is taken by an
    /// old event), the log records the same events under a fresh id for the first one, and the
    /// key apart with the response `fallback`.
    InFirstEvent {
        /// The response to record should the key have to be kept apart.
        fallback: StoredResponse,
    },
}

/// Where a caller lets the log keep its key's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepIn {
    /// Always apart, with the response.
    Apart,
    /// In the first event when the command starts its stream: the caller makes its answer
    /// again from the events ([`Answer::Appended`]).
    FirstEvent,
}

/// The id of the event that records `key` ([`Keeping::InFirstEvent`]): the first 128 bits of
/// a SHA-256 of the scope and the key, so every request with the key derives the same id.
pub fn key_event_id(key: &IdempotencyKey) -> ulid::Ulid {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"groupbuy idempotency key\n");
    hasher.update(key.scope.as_bytes());
    hasher.update(b"\n");
    hasher.update(key.key.as_bytes());
    let digest = hasher.finalize();
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    ulid::Ulid::from_bytes(id)
}

/// What a later request finds under a key.
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    /// The SHA-256 of the request that used the key, in hex.
    pub request_sha256: String,
    /// What it was answered.
    pub answer: Answer,
}

/// The answer a recorded request got.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    /// As it was sent ([`Keeping::Apart`]).
    Response(StoredResponse),
    /// To be made again from the events its append started a stream with
    /// ([`Keeping::InFirstEvent`]), in version order.
    Appended(Vec<schemas::Envelope>),
}

impl Recorded {
    /// What a later request with the same key is answered: the recorded answer when it is
    /// the same request, or the word that it is not.
    pub fn answer_to(&self, request_sha256: &str) -> Prior {
        if self.request_sha256 == request_sha256 {
            Prior::Same(self.answer.clone())
        } else {
            Prior::Different
        }
    }
}

/// How a request relates to the one that used its key first.
#[derive(Clone, Debug, PartialEq)]
pub enum Prior {
    /// The same request: replay this answer.
    Same(Answer),
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
