//! A response as data: what handlers return, what idempotency stores and replays.

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use commands::idempotency::StoredResponse;
use serde::Serialize;

/// Status, headers worth replaying, and a body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers besides the content type.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Content type of the body.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
    /// Whether this reply supersedes the one its append recorded under the request's
    /// Idempotency-Key, so that a replay answers with it ([`Reply::superseding_recorded`]).
    pub supersedes_recorded: bool,
}

impl Reply {
    /// A JSON body.
    pub fn json(status: StatusCode, body: &impl Serialize) -> Reply {
        Reply::json_with_type(status, body, "application/json")
    }

    /// A JSON body with another JSON media type (problem+json).
    pub fn json_with_type(
        status: StatusCode,
        body: &impl Serialize,
        content_type: &'static str,
    ) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            content_type,
            body: serde_json::to_vec(body).expect("response bodies serialize"),
            supersedes_recorded: false,
        }
    }

    /// Marks a reply made after the append that recorded the request's first answer (an
    /// order shown as the saga left it, after `Prefer: wait`): this is what the client gets,
    /// so it is what a replay must answer.
    pub fn superseding_recorded(mut self) -> Reply {
        self.supersedes_recorded = true;
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Reply {
        self.headers.push((name, value));
        self
    }

    /// The form idempotency stores.
    pub fn to_stored(&self) -> StoredResponse {
        let mut headers = vec![(
            header::CONTENT_TYPE.to_string(),
            self.content_type.to_owned(),
        )];
        headers.extend(
            self.headers
                .iter()
                .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_owned()))),
        );
        StoredResponse {
            status: self.status.as_u16(),
            headers,
            body: self.body.clone(),
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        for (name, value) in self.headers {
            headers.append(name, value);
        }
        response
    }
}

/// A stored response replayed, marked as such.
pub fn replay(stored: StoredResponse) -> Response {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let headers = response.headers_mut();
    for (name, value) in stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.append(name, value);
        }
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}
