//! Traces exported over OTLP: one trace runs from the caller's HTTP request through the events
//! it records, the saga's steps and the read models' updates.
//!
//! A test binary of its own: it installs the process's subscriber with an OTLP exporter, as
//! `groupbuy` does with `GROUPBUY_OTLP_ENDPOINT`, and sends the spans to a collector it runs
//! itself (OTLP/HTTP with JSON bodies).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use gateway::app::Payments;
use gateway::cli::LogFormat;
use gateway::telemetry::{Otlp, OtlpProtocol};
use harness::process::Captured;
use harness::{expect_json, spawn_app_tuned, Backend};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// What the collector received: one OTLP `ExportTraceServiceRequest` per export.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Value>>>);

impl Received {
    /// Every span received, flattened.
    fn spans(&self) -> Vec<Span> {
        let exports = self.0.lock().unwrap();
        exports
            .iter()
            .flat_map(|export| {
                export["resourceSpans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .flat_map(|resource| {
                resource["scopeSpans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .flat_map(|scope| scope["spans"].as_array().cloned().unwrap_or_default())
            .map(|span| Span {
                trace_id: span["traceId"].as_str().unwrap_or_default().to_lowercase(),
                span_id: span["spanId"].as_str().unwrap_or_default().to_lowercase(),
                parent_span_id: span["parentSpanId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_lowercase(),
                name: span["name"].as_str().unwrap_or_default().to_owned(),
                attributes: span["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let value = &a["value"];
                        let text = value["stringValue"]
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| value.to_string());
                        (a["key"].as_str().unwrap_or_default().to_owned(), text)
                    })
                    .collect(),
            })
            .collect()
    }
}

#[derive(Clone, Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP collector on a thread and runtime of its own, so it outlives the app's.
fn start_collector() -> (String, Received) {
    let received = Received::default();
    let (address, ready) = std::sync::mpsc::channel();
    let store = received.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            address.send(listener.local_addr().unwrap()).unwrap();
            let app = Router::new().route(
                "/v1/traces",
                post(move |body: axum::body::Bytes| {
                    let store = store.clone();
                    async move {
                        let export: Value =
                            serde_json::from_slice(&body).expect("the exporter sends OTLP JSON");
                        store.0.lock().unwrap().push(export);
                        axum::Json(json!({}))
                    }
                }),
            );
            // Exports of many spans are larger than axum's default body limit.
            let app = app.layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024));
            axum::serve(listener, app).await.unwrap();
        });
    });
    let address = ready.recv().unwrap();
    (format!("http://{address}"), received)
}

/// What the test saw through the API and in the log.
struct Run {
    /// `metadata` of the order's events, by type.
    order_events: HashMap<String, Value>,
    /// `metadata` of the customer's `UnitsReserved`.
    reserved: Value,
    /// `metadata` of the campaign's `StockMoved` that took the order's units.
    moved: Value,
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";

async fn order_with_a_traceparent() -> Run {
    let app = spawn_app_tuned(Backend::Postgres, |settings| {
        settings.payments = Payments::Simulated {
            delay: Duration::from_millis(20),
            failure_rate: 0.0,
        };
    })
    .await;
    let (_, customer) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 2).await;
    let response = app
        .client
        .post(format!("{}/v1/orders", app.address))
        .bearer_auth(&customer)
        .header("Idempotency-Key", "traced-order")
        .header("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01"))
        .json(&json!({"campaign_id": campaign["campaign_id"], "quantity": 1}))
        .send()
        .await
        .unwrap();
    let order = expect_json(response, StatusCode::ACCEPTED).await;
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    app.wait_for_status(&customer, &order_id, "confirmed").await;
    let pool = app.db.as_ref().unwrap().log().pool().clone();
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT event_type, metadata FROM events WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(format!("order-{order_id}"))
    .fetch_all(&pool)
    .await
    .unwrap();
    let reserved: Value = sqlx::query_scalar(
        "SELECT metadata FROM events WHERE stream_id LIKE 'holding-%' AND event_type = 'UnitsReserved'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let moved: Value = sqlx::query_scalar(
        "SELECT metadata FROM events WHERE stream_id = $1 AND event_type = 'StockMoved' \
         ORDER BY stream_version LIMIT 1",
    )
    .bind(format!(
        "campaign-{}",
        campaign["campaign_id"].as_str().unwrap()
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    // Let the read models apply the last events (their spans close when they are done).
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.stop().await;
    Run {
        order_events: rows.into_iter().collect(),
        reserved,
        moved,
    }
}

#[test]
fn one_trace_runs_from_the_request_through_the_saga_and_the_read_models() {
    let (collector, received) = start_collector();
    let logs = Captured::default();
    let writer = logs.clone();
    let telemetry = gateway::telemetry::install(
        LogFormat::Json,
        Some(&Otlp {
            endpoint: collector,
            protocol: OtlpProtocol::HttpJson,
        }),
        "info,gateway=debug",
        false,
        move || writer.clone(),
    )
    .expect("the first subscriber of this process");
    let run = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(order_with_a_traceparent());
    // Outside the runtime, as `groupbuy` does: sends every span still queued.
    telemetry.shutdown();

    let spans: Vec<Span> = received
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE_ID)
        .collect();
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();

    // The request continues the caller's span.
    let request = spans
        .iter()
        .find(|s| {
            s.name == "request"
                && s.attributes.get("route").map(String::as_str) == Some("/v1/orders")
        })
        .unwrap_or_else(|| panic!("no request span in the caller's trace: {spans:#?}"));
    assert_eq!(request.parent_span_id, CALLER_SPAN_ID);

    // The order's events name the trace and the span that recorded them.
    let placed = &run.order_events["OrderPlaced"];
    assert_eq!(placed["trace_id"], TRACE_ID);
    assert_eq!(
        placed["span_id"],
        request.span_id.as_str(),
        "OrderPlaced was recorded by the request"
    );

    // The saga and both read models handled OrderPlaced as children of the request.
    let handled = |consumer: &str, event_type: &str| {
        spans
            .iter()
            .filter(|s| {
                s.name == "event"
                    && s.attributes.get("consumer").map(String::as_str) == Some(consumer)
                    && s.attributes.get("event_type").map(String::as_str) == Some(event_type)
            })
            .collect::<Vec<_>>()
    };
    for consumer in ["order-saga", "projection-orders"] {
        let spans_of = handled(consumer, "OrderPlaced");
        assert!(
            spans_of.iter().any(|s| s.parent_span_id == request.span_id),
            "{consumer} handled OrderPlaced outside the request's span: {spans_of:#?}"
        );
    }

    // The saga's steps run inside its handling, and their events name the steps' span: the
    // wake-up that reserved the units also moved the order to await its payment.
    let steps: Vec<&Span> = spans.iter().filter(|s| s.name == "saga_step").collect();
    let reserve = steps
        .iter()
        .find(|s| s.attributes.get("step").map(String::as_str) == Some("reserve_stock"))
        .unwrap_or_else(|| panic!("no reserve_stock step in the trace: {steps:#?}"));
    assert_eq!(
        reserve.attributes.get("steps").map(String::as_str),
        Some("reserve_stock,await_payment")
    );
    let reserve_parent = by_id[reserve.parent_span_id.as_str()];
    assert_eq!(reserve_parent.name, "event");
    assert_eq!(run.reserved["trace_id"], TRACE_ID);
    assert_eq!(run.reserved["span_id"], reserve.span_id.as_str());
    assert_eq!(run.moved["span_id"], reserve.span_id.as_str());
    // The campaign read model applied the stock's move as a child of that step.
    assert!(
        handled("projection-campaigns", "StockMoved")
            .iter()
            .any(|s| s.parent_span_id == reserve.span_id),
        "the campaigns read model did not continue the step's span"
    );

    // The simulated provider's answer, and the saga's confirmation after it, stay in the trace.
    let confirmed = &run.order_events["OrderConfirmed"];
    assert_eq!(confirmed["trace_id"], TRACE_ID);
    assert!(spans.iter().any(|s| s.name == "simulated_payment"));
    let confirming = by_id
        .get(confirmed["span_id"].as_str().unwrap())
        .unwrap_or_else(|| {
            panic!("OrderConfirmed names a span that was not exported: {confirmed}")
        });
    assert_eq!(confirming.name, "saga_step");

    // Every span of the trace hangs off the caller's: no orphans.
    for span in &spans {
        assert!(
            span.parent_span_id == CALLER_SPAN_ID
                || by_id.contains_key(span.parent_span_id.as_str()),
            "{} has a parent that was not exported: {span:?}",
            span.name
        );
    }

    // Log lines written inside the request carry its trace id.
    let logs = logs.text();
    let answered: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"answered\"") && l.contains(TRACE_ID))
        .collect();
    assert!(
        !answered.is_empty(),
        "no log line of the request names its trace:\n{logs}"
    );
}
