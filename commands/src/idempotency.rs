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
