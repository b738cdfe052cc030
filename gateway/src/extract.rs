//! Extractors that turn every malformed input into a 4xx problem, never a 500 or a plain-text
//! rejection.

use std::fmt;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use commands::trace::TraceParent;
use serde::de::{self, DeserializeOwned, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::ApiError;
use crate::telemetry::RequestTrace;

/// Largest request body accepted, in bytes. Every body of this API is a small JSON object.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest Idempotency-Key accepted.
pub const IDEMPOTENCY_KEY_CHARS_MAX: usize = 255;

/// The raw body of a request, at most [`BODY_BYTES_MAX`]. Kept raw so that idempotency can
/// hash exactly what was sent. Every body of this API is JSON: a Content-Type other than
/// `application/json` or `application/*+json` is refused with 415 before the body is read
/// (none at all is taken as JSON), and a body that is not JSON is refused when parsed.
pub struct RawJson(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(content_type) = request.headers().get(axum::http::header::CONTENT_TYPE) {
            if !is_json(content_type.as_bytes()) {
                return Err(ApiError::UnsupportedMediaType {
                    content_type: String::from_utf8_lossy(content_type.as_bytes()).into_owned(),
                });
            }
        }
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

/// Whether a Content-Type names JSON: `application/json` or `application/<anything>+json`,
/// with any parameters (`; charset=utf-8`), in any case.
fn is_json(content_type: &[u8]) -> bool {
    let Ok(content_type) = std::str::from_utf8(content_type) else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|subtype| subtype.ends_with("+json") && !subtype.contains('/'))
}

impl RawJson {
    /// Parses the body: 400 for what is not JSON at all or names a field twice (serde would
    /// keep the last silently), 422 for JSON of the wrong shape (unknown or missing fields,
    /// wrong types, numbers out of range), with serde's own words and position in the detail.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.0.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest {
                code: "malformed_json",
                detail: "request body must be a JSON object".into(),
            });
        }
        // Syntax first, shape second: serde alone reports `[1,` as a type error because it
        // meets the wrong type before the missing bracket.
        let Unique(value) = serde_json::from_slice(&self.0).map_err(|e| ApiError::BadRequest {
            code: if e.is_data() {
                "duplicate_field"
            } else {
                "malformed_json"
            },
            detail: e.to_string(),
        })?;
        serde_json::from_value(value).map_err(|e| ApiError::Unprocessable {
            code: "invalid_body",
            detail: e.to_string(),
        })
    }
}

/// A JSON value in which no object names a field twice.
struct Unique(serde_json::Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!("duplicate field `{key}`")));
            }
            let Unique(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
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
