//! Rate limits, load shedding and request timeouts for the API routes.
//!
//! A request over the instance's rate limit is answered 429 with `Retry-After` first (see
//! [`crate::rate_limit`]; the per-customer limit is checked with the caller's token).
//! When more requests are in flight than the instance is sized for, new ones are answered at
//! once with 503 and `Retry-After` instead of queueing behind the others: in a flash sale,
//! latency that grows without bound helps nobody. Every request also has a deadline. The health
//! probes sit outside this layer so that an overloaded instance still answers them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;
use crate::rate_limit::{Limiter, RateLimits};

/// How much one instance takes on at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests served at once; more are shed with 503.
    pub in_flight_requests_max: usize,
    /// Longest a request may take before it is answered with 503.
    pub request_timeout: Duration,
    /// Requests a second, per customer and for everyone together.
    pub rate_limits: RateLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            in_flight_requests_max: 1_024,
            request_timeout: Duration::from_secs(30),
            rate_limits: RateLimits::default(),
        }
    }
}

/// The shared state of the layer.
#[derive(Clone)]
pub struct Overload {
    permits: Arc<Semaphore>,
    rate: Arc<Limiter>,
    limits: Limits,
}

impl Overload {
    /// A layer state for these limits.
    pub fn new(limits: Limits) -> Overload {
        Overload {
            permits: Arc::new(Semaphore::new(limits.in_flight_requests_max)),
            rate: Arc::new(Limiter::new(RateLimits {
                per_customer: None,
                ..limits.rate_limits
            })),
            limits,
        }
    }
}

/// Sheds the request when the instance is full, and times it out when it runs too long. A
/// command cut off by the timeout may still commit; a retry with the same Idempotency-Key
/// then replays it instead of applying it twice.
pub async fn guard(State(overload): State<Overload>, request: Request, next: Next) -> Response {
    if let Err(limited) = overload.rate.check_global() {
        return limited.into_response();
    }
    let Ok(_permit) = overload.permits.clone().try_acquire_owned() else {
        tracing::warn!("request shed: too many in flight");
        metrics::counter!("groupbuy_shed_total", "reason" => "overloaded").increment(1);
        return ApiError::Unavailable {
            code: "overloaded",
            detail: "too many requests in flight, retry shortly".into(),
            retry_after_s: 1,
        }
        .into_response();
    };
    match tokio::time::timeout(overload.limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                timeout_ms = overload.limits.request_timeout.as_millis() as u64,
                "request timed out"
            );
            metrics::counter!("groupbuy_shed_total", "reason" => "timeout").increment(1);
            ApiError::Unavailable {
                code: "request_timeout",
                detail: format!(
                    "the request took longer than {} ms",
                    overload.limits.request_timeout.as_millis()
                ),
                retry_after_s: 1,
            }
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::StatusCode;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;

    fn slow_app(limits: Limits) -> Router {
        Router::new()
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    "done"
                }),
            )
            .route("/fast", get(|| async { "done" }))
            .layer(axum::middleware::from_fn_with_state(
                Overload::new(limits),
                guard,
            ))
    }

    async fn call(app: Router, path: &str) -> Response {
        app.oneshot(Request::builder().uri(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_over_its_deadline_is_answered_503_with_retry_after() {
        let limits = Limits {
            request_timeout: Duration::from_millis(10),
            ..Limits::default()
        };
        let response = call(slow_app(limits), "/slow").await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        assert_eq!(
            call(slow_app(limits), "/fast").await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn requests_past_the_in_flight_limit_are_shed_while_earlier_ones_finish() {
        let limits = Limits {
            in_flight_requests_max: 1,
            request_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let app = slow_app(limits);
        let first = tokio::spawn(call(app.clone(), "/slow"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = call(app.clone(), "/fast").await;
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(first.await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            call(app, "/fast").await.status(),
            StatusCode::OK,
            "the permit came back"
        );
    }
}
