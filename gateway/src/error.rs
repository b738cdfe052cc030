//! Every way a request can fail, and the problem+json answer for each (RFC 9457).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use commands::{CommandError, LogError};
use domain::DomainError;
use serde::Serialize;

use crate::reply::Reply;

/// A request failed. Each variant documents its status; internal details are logged once,
/// never sent to the client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed (bad JSON, bad header, bad query).
    #[error("{detail}")]
    BadRequest {
        /// Stable code.
        code: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// 401: no credentials, or credentials that match nobody.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// 401: a payment webhook whose signature is wrong or too old.
    #[error("{0}")]
    InvalidSignature(&'static str),
    /// 403: authenticated, but this role may not do this.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404: no such resource (or not one the caller may see).
    #[error("{what} not found")]
    NotFound {
        /// Stable code.
        code: &'static str,
        /// What was looked for.
        what: &'static str,
    },
    /// 405: the path exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409: the request conflicts with the resource's state.
    #[error("{detail}")]
    Conflict {
        /// Stable code.
        code: &'static str,
        /// Why.
        detail: String,
    },
    /// 409 `idempotency_key_in_use`, with `Retry-After`: a request with the same
    /// Idempotency-Key is still running on this instance.
    #[error("a request with this Idempotency-Key is still in progress")]
    KeyInUse {
        /// Seconds after which a retry may find the first request done.
        retry_after_s: u32,
    },
    /// 413: the body is over the limit.
    #[error("request body is larger than {limit_bytes} bytes")]
    PayloadTooLarge {
        /// The limit.
        limit_bytes: usize,
    },
    /// 415: a body whose Content-Type says it is not JSON.
    #[error("request bodies are JSON; Content-Type {content_type:?} is not")]
    UnsupportedMediaType {
        /// The Content-Type sent.
        content_type: String,
    },
    /// 422: well-formed, but not acceptable.
    #[error("{detail}")]
    Unprocessable {
        /// Stable code.
        code: &'static str,
        /// Why.
        detail: String,
    },
    /// 429: the caller (or everyone together) sent more than the rate limits allow.
    #[error("{detail}")]
    TooManyRequests {
        /// Why.
        detail: String,
        /// Seconds after which a retry may succeed.
        retry_after_s: u32,
    },
    /// 503: a dependency is down or a stream is too busy; retry later.
    #[error("{detail}")]
    Unavailable {
        /// Stable code.
        code: &'static str,
        /// Why.
        detail: String,
        /// Seconds after which a retry may succeed.
        retry_after_s: u32,
    },
    /// 500: a bug or an unexpected failure. Logged with its cause; the client sees a generic text.
    #[error("internal error")]
    Internal(String),
}

/// An error, as RFC 9457 problem details.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Problem<'a> {
    /// `urn:groupbuy:problem:<code>`.
    r#type: String,
    /// The reason phrase of the HTTP status.
    title: &'a str,
    /// The HTTP status.
    status: u16,
    /// What went wrong, for a person.
    detail: String,
    /// What went wrong, for a program: a stable snake_case code.
    code: &'a str,
}

impl<'a> Problem<'a> {
    /// The problem for `status`, with its stable `code` and a `detail` for a person.
    pub fn new(status: StatusCode, code: &'a str, detail: String) -> Problem<'a> {
        Problem {
            r#type: format!("urn:groupbuy:problem:{code}"),
            title: status.canonical_reason().unwrap_or("error"),
            status: status.as_u16(),
            detail,
            code,
        }
    }
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::InvalidSignature(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict { .. } | ApiError::KeyInUse { .. } => StatusCode::CONFLICT,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. }
            | ApiError::NotFound { code, .. }
            | ApiError::Conflict { code, .. }
            | ApiError::Unprocessable { code, .. }
            | ApiError::Unavailable { code, .. } => code,
            ApiError::Unauthorized => "unauthorized",
            ApiError::InvalidSignature(_) => "invalid_signature",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::KeyInUse { .. } => "idempotency_key_in_use",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::TooManyRequests { .. } => "rate_limited",
            ApiError::Internal(_) => "internal_error",
        }
    }

    /// A 422 for a field the domain refused.
    pub fn invalid(detail: impl Into<String>) -> ApiError {
        ApiError::Unprocessable {
            code: "invalid_input",
            detail: detail.into(),
        }
    }

    /// The problem+json answer, as a reply that can also be stored for idempotent replays.
    pub fn to_reply(&self) -> Reply {
        let status = self.status();
        if let ApiError::Internal(cause) = self {
            tracing::error!(%cause, "request failed");
        }
        let problem = Problem::new(status, self.code(), self.to_string());
        let mut reply = Reply::json_with_type(status, &problem, "application/problem+json");
        if let ApiError::Unavailable { retry_after_s, .. }
        | ApiError::TooManyRequests { retry_after_s, .. }
        | ApiError::KeyInUse { retry_after_s } = self
        {
            reply
                .headers
                .push((header::RETRY_AFTER, HeaderValue::from(*retry_after_s)));
        }
        if let ApiError::Unauthorized = self {
            reply
                .headers
                .push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        reply
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.to_reply().into_response()
    }
}

impl From<DomainError> for ApiError {
    fn from(error: DomainError) -> Self {
        let code = error.code();
        let detail = error.to_string();
        match error {
            DomainError::InvalidInput { .. } => ApiError::Unprocessable { code, detail },
            DomainError::StoreNotFound | DomainError::CampaignNotFound => {
                ApiError::Unprocessable { code, detail }
            }
            DomainError::OrderNotFound => ApiError::NotFound {
                code,
                what: "order",
            },
            DomainError::PaymentNotFound => ApiError::NotFound {
                code,
                what: "payment",
            },
            DomainError::ReservationNotFound => ApiError::Conflict { code, detail },
            DomainError::UserAlreadyExists
            | DomainError::StoreAlreadyExists
            | DomainError::CampaignAlreadyExists
            | DomainError::OrderAlreadyExists
            | DomainError::CampaignClosed
            | DomainError::CampaignNotOpen
            | DomainError::SoldOut
            | DomainError::LimitExceeded
            | DomainError::ReservationReleased
            | DomainError::ReservationSold
            | DomainError::OrderAlreadyFinal
            | DomainError::OrderNotReady
            | DomainError::PaymentAlreadyFinal
            | DomainError::DeadlineNotReached
            | DomainError::NothingToRefund => ApiError::Conflict { code, detail },
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(e) => e.into(),
            CommandError::Contention { .. } => ApiError::Unavailable {
                code: "stream_busy",
                detail: "too many concurrent changes to this resource, retry shortly".into(),
                retry_after_s: 1,
            },
            CommandError::Log(e) => e.into(),
        }
    }
}

impl From<LogError> for ApiError {
    fn from(error: LogError) -> Self {
        match error {
            // Only a request under an Idempotency-Key meets this, and `idempotency` answers
            // it with the recorded response before this error could be sent.
            LogError::KeyTaken(_) => ApiError::KeyInUse { retry_after_s: 1 },
            LogError::BatchFailed(_) => ApiError::Unavailable {
                code: "database_unavailable",
                detail: "the event log could not store this change, retry shortly".into(),
                retry_after_s: 1,
            },
            LogError::Database(e) if is_unavailable(&e) => ApiError::Unavailable {
                code: "database_unavailable",
                detail: "the event log is unavailable, retry shortly".into(),
                retry_after_s: 2,
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<projections::read_model::ReadModelError> for ApiError {
    fn from(error: projections::read_model::ReadModelError) -> Self {
        use projections::read_model::ReadModelError;
        match error {
            // Never a 404: what the read model lacks may well exist.
            ReadModelError::Missing(_) => ApiError::Unavailable {
                code: "read_model_rebuilding",
                detail: error.to_string(),
                retry_after_s: 5,
            },
            ReadModelError::Unavailable(_) => ApiError::Unavailable {
                code: "read_model_unavailable",
                detail: error.to_string(),
                retry_after_s: 1,
            },
        }
    }
}

fn is_unavailable(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}
