//! Extractors that turn every malformed input into a 4xx problem, never a 500 or a plain-text
//! rejection.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use commands::trace::TraceParent;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::telemetry::RequestTrace;

/// Largest request body accepted, in bytes. Every body of this API is a small JSON object.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest Idempotency-Key accepted.
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 255;

/// The raw body of a request, at most [`BODY_BYTES_MAX`]. Kept raw so that idempotency can
/// hash exactly what was sent. Every body of this API is JSON whatever its Content-Type says
/// (curl labels `-d` bodies as a form): a body that is not JSON is refused when parsed.
pub struct RawJson(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge {
                        limit_bytes: BODY_BYTES_MAX,
                    }
                } else {
                    ApiError::BadRequest {
                        code: "unreadable_body",
                        detail: rejection.body_text(),
                    }
                }
            })?;
        Ok(RawJson(bytes))
    }
}

impl RawJson {
    /// Parses the body: 400 for what is not JSON at all, 422 for JSON of the wrong shape
    /// (unknown or missing fields, wrong types, numbers out of range), with serde's own words
    /// and position in the detail.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.0.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest {
                code: "malformed_json",
                detail: "request body must be a JSON object".into(),
            });
        }
        // Syntax first, shape second: serde alone reports `[1,` as a type error because it
        // meets the wrong type before the missing bracket.
        let value: serde_json::Value =
            serde_json::from_slice(&self.0).map_err(|e| ApiError::BadRequest {
                code: "malformed_json",
                detail: e.to_string(),
            })?;
        serde_json::from_value(value).map_err(|e| ApiError::Unprocessable {
            code: "invalid_body",
            detail: e.to_string(),
        })
    }
}

/// Parses a query string: 400 with the reason when it does not fit.
pub fn query<T: DeserializeOwned>(parts_query: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(parts_query.unwrap_or("")).map_err(|e| ApiError::BadRequest {
        code: "invalid_query",
        detail: e.to_string(),
    })
}

/// Parses an id from the path; an id that cannot exist is simply not found.
pub fn path_id<T: std::str::FromStr>(
    raw: &str,
    code: &'static str,
    what: &'static str,
) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound { code, what })
}

/// Parses an id given in a body or query field.
pub fn field_id<T: std::str::FromStr>(raw: &str, field: &str) -> Result<T, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::invalid(format!("{field} is not a valid id")))
}

/// The request's Idempotency-Key header, if any, checked for shape.
pub struct IdempotencyKeyHeader(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKeyHeader {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else {
            return Ok(IdempotencyKeyHeader(None));
        };
        let bad = || ApiError::BadRequest {
            code: "invalid_idempotency_key",
            detail: "Idempotency-Key must be 1 to 255 visible ASCII characters".into(),
        };
        let key = value.to_str().map_err(|_| bad())?;
        if key.is_empty()
            || key.len() > IDEMPOTENCY_KEY_CHARS_MAX
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(bad());
        }
        Ok(IdempotencyKeyHeader(Some(key.to_owned())))
    }
}

/// The trace this request belongs to, to record in the metadata of the events it appends:
/// continued from the caller's W3C `traceparent`, or new ([`crate::telemetry::traced`]).
pub struct Trace(pub TraceParent);

impl<S: Send + Sync> FromRequestParts<S> for Trace {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Behind `traced` every request has one; a router built without it still gets a trace.
        Ok(Trace(
            parts
                .extensions
                .get::<RequestTrace>()
                .map_or_else(TraceParent::root, |t| t.0),
        ))
    }
}
