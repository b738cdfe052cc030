//! Prometheus metrics, served at `/metrics`.
//!
//! Names (every one starts with `groupbuy_`; label sets in braces):
//!
//! - `http_requests_total{route,method,status}` and
//!   `http_request_duration_seconds{route,method,status}` (histogram): every request, by route
//!   template, not by path, so ids do not multiply the series.
//! - `orders_placed_total{campaign_id}`, `orders_confirmed_total{campaign_id}`,
//!   `orders_rejected_total{campaign_id,reason}`, `orders_cancelled_total{campaign_id,reason}`:
//!   the sale, counted by the instance that took the step.
//! - `saga_step_duration_seconds{step}` (histogram): each saga step, its command included.
//! - `relay_leader`, `relay_published_total`, `relay_lag_events`: whether this instance
//!   publishes the log, how much it published, how far behind the log's head it is.
//! - `projection_position{projection}`, `projection_lag_events{projection}`: the live read
//!   models and the events of their streams still to apply.
//! - `subscription_events_total{consumer,outcome}`: per consumer, events `handled`,
//!   `duplicate`, `retried`, `early` and `dead_lettered`.
//! - `subscription_batch_deliveries{consumer}` (histogram): deliveries a consumer's lane took
//!   at once, their events handled as one batch.
//! - `subscription_partitions{consumer}`: the partitions of a shared consumer this instance
//!   consumes now (its leases, ADR 0012).
//! - `rate_limited_total{scope}` (`customer`, `global`) and `shed_total{reason}`
//!   (`overloaded`, `timeout`): requests turned away.
//!
//! The recorder is global to the process; gauges that describe other components are read
//! when `/metrics` is scraped.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use commands::subscription::SubscriptionStats;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

/// Histogram buckets of every `*_seconds` metric: 1 ms to 30 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Longest a scrape waits for the log to count lag.
const LAG_TIMEOUT: Duration = Duration::from_secs(2);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
            .expect("the buckets are not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed")
    })
}

/// The route a request matched, as its template (`/v1/orders/{id}`), so that ids do not
/// multiply label values; `unmatched` for paths no route serves.
pub fn route_template(request: &Request) -> String {
    request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned()
}

/// Counts and times every request by route template, method and status.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = route_template(&request);
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    let labels = [
        ("route", route),
        ("method", method),
        ("status", response.status().as_u16().to_string()),
    ];
    metrics::counter!("groupbuy_http_requests_total", &labels).increment(1);
    metrics::histogram!("groupbuy_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A consumer's counters, to publish on scrape.
pub type Consumers = Vec<(String, Arc<SubscriptionStats>)>;

/// `GET /metrics`: Prometheus text.
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "metrics",
    tag = "operations",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    refresh(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle().render(),
    )
}

async fn refresh(state: &AppState) {
    let log = state.handler.log();
    let relay = *state.relay.borrow();
    metrics::gauge!("groupbuy_relay_leader").set(if relay.leader { 1.0 } else { 0.0 });
    metrics::counter!("groupbuy_relay_published_total").absolute(relay.published);
    if relay.leader {
        if let Ok(Ok(head)) = tokio::time::timeout(LAG_TIMEOUT, log.head()).await {
            let lag = head.saturating_sub(relay.position.global_position);
            metrics::gauge!("groupbuy_relay_lag_events").set(lag as f64);
        }
    }
    if let Ok(Ok(versions)) = tokio::time::timeout(LAG_TIMEOUT, state.read_model.versions()).await {
        for v in versions
            .iter()
            .filter(|v| v.status == projections::VersionStatus::Live)
        {
            let name = v.name.as_str();
            metrics::gauge!("groupbuy_projection_position", "projection" => name)
                .set(v.position as f64);
            let lag = log.count_after(v.position, v.name.categories());
            if let Ok(Ok(lag)) = tokio::time::timeout(LAG_TIMEOUT, lag).await {
                metrics::gauge!("groupbuy_projection_lag_events", "projection" => name)
                    .set(lag as f64);
            }
        }
    }
    for (consumer, stats) in &state.consumers {
        for (outcome, counter) in [
            ("handled", &stats.handled),
            ("duplicate", &stats.duplicates),
            ("retried", &stats.retries),
            ("early", &stats.early),
            ("dead_lettered", &stats.dead_lettered),
        ] {
            metrics::counter!(
                "groupbuy_subscription_events_total",
                "consumer" => consumer.clone(),
                "outcome" => outcome
            )
            .absolute(SubscriptionStats::get(counter));
        }
    }
}
