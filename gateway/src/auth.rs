//! Who is calling: the operator (one configured token) or a customer (a token issued by
//! `POST /v1/users`, of which only the SHA-256 is stored, in the user's event).

use std::collections::HashMap;
use std::sync::Mutex;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use domain::user::UserAggregate;
use domain::UserId;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::state::AppState;

/// Customers whose token hashes are kept in memory; past this the cache starts over.
const USER_CACHE_ENTRIES_MAX: usize = 100_000;
/// Customer tokens start with this, followed by the user id and a secret part.
const TOKEN_PREFIX: &str = "gb_";

/// The authenticated caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The shop's operator.
    Operator,
    /// A customer.
    Customer(UserId),
}

impl Caller {
    /// 403 unless the operator.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Customer(_) => Err(ApiError::Forbidden("only the operator may do this")),
        }
    }

    /// The customer, or 403.
    pub fn require_customer(&self) -> Result<UserId, ApiError> {
        match self {
            Caller::Customer(user) => Ok(*user),
            Caller::Operator => Err(ApiError::Forbidden("only customers may do this")),
        }
    }

    /// The scope of this caller's Idempotency-Keys, and the actor in event metadata.
    pub fn scope(&self) -> String {
        match self {
            Caller::Operator => "operator".to_owned(),
            Caller::Customer(user) => format!("user:{user}"),
        }
    }
}

/// Token checks and issuance.
pub struct Auth {
    operator_token_sha256: [u8; 32],
    token_secret: Vec<u8>,
    users: Mutex<HashMap<UserId, [u8; 32]>>,
}

impl Auth {
    /// Checks tokens against the operator token; issues customer tokens with `token_secret`.
    pub fn new(operator_token: &str, token_secret: Vec<u8>) -> Auth {
        Auth {
            operator_token_sha256: sha256(operator_token),
            token_secret,
            users: Mutex::new(HashMap::new()),
        }
    }

    /// The token of a customer. Derived from the user id with a keyed hash, so a replayed
    /// `POST /v1/users` can answer with the same token without it being stored anywhere.
    pub fn issue(&self, user_id: UserId) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.token_secret).expect("any key length works");
        mac.update(user_id.to_string().as_bytes());
        format!(
            "{TOKEN_PREFIX}{user_id}_{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }

    /// The hex SHA-256 of a token, as stored in the user's event.
    pub fn token_sha256(token: &str) -> String {
        hex::encode(sha256(token))
    }

    async fn authenticate(&self, token: &str, state: &AppState) -> Result<Caller, ApiError> {
        let presented = sha256(token);
        if presented == self.operator_token_sha256 {
            return Ok(Caller::Operator);
        }
        let user_id: UserId = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .and_then(|(id, _)| id.parse().ok())
            .ok_or(ApiError::Unauthorized)?;
        let cached = self
            .users
            .lock()
            .expect("not poisoned")
            .get(&user_id)
            .copied();
        let stored = match cached {
            Some(hash) => hash,
            None => {
                let stream = commands::stream_id::<UserAggregate>(user_id);
                let user = state
                    .handler
                    .load::<UserAggregate>(&stream)
                    .await?
                    .state
                    .ok_or(ApiError::Unauthorized)?;
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&user.token_sha256, &mut hash).map_err(|_| {
                    ApiError::Internal(format!("user {user_id} has a malformed token hash"))
                })?;
                let mut users = self.users.lock().expect("not poisoned");
                if users.len() >= USER_CACHE_ENTRIES_MAX {
                    users.clear();
                }
                users.insert(user_id, hash);
                hash
            }
        };
        // Comparing digests leaks nothing useful through timing: the attacker does not choose
        // the digest's bytes.
        if presented == stored {
            Ok(Caller::Customer(user_id))
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 512)
            .ok_or(ApiError::Unauthorized)?;
        let caller = state.auth.authenticate(token, state).await?;
        if let Caller::Customer(user) = caller {
            state.customer_rate.check_customer(user)?;
        }
        Ok(caller)
    }
}
