//! Idempotency-Key records: one per (caller, key), claimed while a request runs and completed
//! with the response it produced, so a retry gets the same answer and no second effect.

use std::time::Duration;

use ulid::Ulid;

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

/// Proof that this request owns an in-flight key. Completing needs it, so a request whose
/// claim expired and was taken over by a retry cannot also record its effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// The key.
    pub key: IdempotencyKey,
    /// This claim's id.
    pub claim_id: Ulid,
}

/// What taking a key found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    /// The key is new (or expired, or abandoned): the request runs under this claim.
    Claimed(IdempotencyClaim),
    /// The first request with this key finished; here is its response.
    Completed(StoredResponse),
    /// The first request with this key is still running.
    InFlight,
    /// The key was used with a different request body.
    Mismatch,
}

/// Options for taking a key.
#[derive(Clone, Copy, Debug)]
pub struct ClaimOptions {
    /// How long a claim holds an in-flight key before a retry may take it over: longer than
    /// any request can run, so two live requests never both hold it.
    pub lease: Duration,
}

impl Default for ClaimOptions {
    fn default() -> Self {
        ClaimOptions {
            lease: Duration::from_secs(120),
        }
    }
}
