//! The order saga: through the API on both backends, and directly against the log with the
//! worker killed between every pair of steps.

use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use commands::handler::{Context, HandlerOptions};
use commands::idempotency::{IdempotencyKey, IdempotencyRecord, Recorded};
use commands::log::Snapshot;
use commands::subscription::Handler;
use commands::{
    stream_id, AppendRequest, Appended, CommandHandler, EventLog, LogCursor, LogError,
    RecordedEvent,
};
use domain::campaign::CampaignAggregate;
use domain::holding::{HoldingAggregate, ReservationState};
use domain::order::{OrderAggregate, OrderCommand, OrderStatus};
use domain::payment::{PaymentAggregate, PaymentStatus};
use domain::saga::payment_id_of;
use domain::{CampaignId, Cents, OrderId, UserId};
use gateway::app::Payments;
use harness::{
    expect_json, expect_problem, spawn_app_configured, Backend, TestApp, OPERATOR_TOKEN,
    WEBHOOK_SECRET,
};
use reqwest::StatusCode;
use sagas::deadlines::MemoryDeadlines;
use sagas::order_saga::{OrderSaga, Progress};
use sagas::payments::{settle, External, Outcome};
use schemas::Metadata;
use serde_json::{json, Value};
use ulid::Ulid;

on_both_backends!(
    a_paid_order_is_confirmed_and_its_units_sold_once,
    the_webhook_checks_signature_time_and_payment,
    a_failed_payment_cancels_the_order_and_releases_its_units,
    an_unanswered_payment_is_cancelled_at_its_deadline,
    a_customer_cancel_releases_and_a_late_success_is_refunded,
    the_customer_follows_an_order_live_until_it_is_settled,
);

// --- through the API ---

pub(crate) async fn place(app: &TestApp, token: &str, campaign: &Value, quantity: u32) -> Value {
    let key = Ulid::new().to_string();
    let body = json!({"campaign_id": campaign["campaign_id"], "quantity": quantity});
    expect_json(
        app.post("/v1/orders", token, Some(&key), &body).await,
        StatusCode::ACCEPTED,
    )
    .await
}

pub(crate) async fn campaign(
    app: &TestApp,
    quota: u32,
    limit: u32,
    payment_timeout_seconds: u32,
) -> Value {
    let store = app.create_store().await;
    let now = chrono::Utc::now();
    let body = json!({
        "store_id": store["store_id"], "sku": "LAGER-500", "title": "Lager crate",
        "price_cents": 900, "quota": quota, "per_user_limit": limit,
        "starts_at": now - chrono::Duration::minutes(1),
        "ends_at": now + chrono::Duration::hours(1),
        "payment_timeout_seconds": payment_timeout_seconds,
    });
    expect_json(
        app.post("/v1/campaigns", OPERATOR_TOKEN, None, &body).await,
        StatusCode::CREATED,
    )
    .await
}

async fn stock(app: &TestApp, campaign: &Value) -> Value {
    let path = format!(
        "/v1/campaigns/{}",
        campaign["campaign_id"].as_str().unwrap()
    );
    app.operator_get(&path).await["stock"].clone()
}

pub(crate) fn paid(order: &Value, status: &str) -> Value {
    json!({
        "payment_id": order["payment"]["payment_id"],
        "status": status,
        "provider_reference": format!("psp-{}", order["order_id"].as_str().unwrap()),
    })
}

/// The provider pays the order `awaiting` shows (as its customer `token` reads it) through
/// the signed webhook, and the saga confirms it.
pub(crate) async fn pay(app: &TestApp, token: &str, awaiting: &Value) -> Value {
    let answer = app
        .webhook(&paid(awaiting, "succeeded"), now(), WEBHOOK_SECRET)
        .await;
    expect_json(answer, StatusCode::OK).await;
    let id = awaiting["order_id"].as_str().unwrap();
    app.wait_for_status(token, id, "confirmed").await
}

pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn a_paid_order_is_confirmed_and_its_units_sold_once(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 10, 3, 600).await;
    let placed = place(&app, &ada, &campaign, 2).await;
    let id = placed["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    assert_eq!(
        stock(&app, &campaign).await,
        json!({"total": 10, "available": 8, "reserved": 2, "sold": 0})
    );
    let answer = expect_json(
        app.webhook(&paid(&awaiting, "succeeded"), now(), WEBHOOK_SECRET)
            .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(answer["status"], "succeeded");
    let confirmed = app.wait_for_status(&ada, id, "confirmed").await;
    assert_eq!(confirmed["payment"]["status"], "succeeded");
    assert_eq!(confirmed["reason"], Value::Null);
    let sold = json!({"total": 10, "available": 8, "reserved": 0, "sold": 2});
    wait_for_stock(&app, &campaign, &sold).await;

    // The provider delivers the same answer again, and a contrary one: no effect.
    let events = match app.db {
        Some(_) => app.event_count().await,
        None => 0,
    };
    for status in ["succeeded", "failed"] {
        let again = app
            .webhook(&paid(&awaiting, status), now(), WEBHOOK_SECRET)
            .await;
        assert_eq!(again.status(), StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    if app.db.is_some() {
        assert_eq!(app.event_count().await, events);
    }
    assert_eq!(stock(&app, &campaign).await, sold);
}

async fn wait_for_stock(app: &TestApp, campaign: &Value, expected: &Value) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let stock = stock(app, campaign).await;
        if &stock == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stock {stock} never became {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn the_webhook_checks_signature_time_and_payment(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 10, 3, 600).await;
    let placed = place(&app, &ada, &campaign, 1).await;
    let id = placed["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    let body = paid(&awaiting, "succeeded");
    let url = format!("{}/v1/payments/webhook", app.address);
    let unsigned = app.client.post(&url).json(&body).send().await.unwrap();
    expect_problem(unsigned, StatusCode::BAD_REQUEST, "signature_missing").await;
    let malformed = app
        .client
        .post(&url)
        .header("X-Groupbuy-Signature", "t=abc")
        .json(&body)
        .send()
        .await
        .unwrap();
    expect_problem(malformed, StatusCode::BAD_REQUEST, "signature_malformed").await;
    let forged = app.webhook(&body, now(), b"not-the-secret").await;
    expect_problem(forged, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let stale = app.webhook(&body, now() - 301, WEBHOOK_SECRET).await;
    expect_problem(stale, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let future = app.webhook(&body, now() + 301, WEBHOOK_SECRET).await;
    expect_problem(future, StatusCode::UNAUTHORIZED, "invalid_signature").await;
    let unknown = json!({"payment_id": Ulid::new().to_string(), "status": "succeeded", "provider_reference": "x"});
    let unknown = app.webhook(&unknown, now(), WEBHOOK_SECRET).await;
    expect_problem(unknown, StatusCode::NOT_FOUND, "payment_not_found").await;
    let odd =
        json!({"payment_id": body["payment_id"], "status": "maybe", "provider_reference": "x"});
    assert_eq!(
        app.webhook(&odd, now(), WEBHOOK_SECRET).await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // Nothing of that moved the order.
    let read = app.wait_for_status(&ada, id, "awaiting_payment").await;
    assert_eq!(read["payment"]["status"], "pending");
}

async fn a_failed_payment_cancels_the_order_and_releases_its_units(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 10, 3, 600).await;
    let placed = place(&app, &ada, &campaign, 3).await;
    let id = placed["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    let answer = app
        .webhook(&paid(&awaiting, "failed"), now(), WEBHOOK_SECRET)
        .await;
    assert_eq!(answer.status(), StatusCode::OK);
    let cancelled = app.wait_for_status(&ada, id, "cancelled").await;
    assert_eq!(cancelled["reason"], "payment_failed");
    assert_eq!(cancelled["payment"]["status"], "failed");
    let full = json!({"total": 10, "available": 10, "reserved": 0, "sold": 0});
    wait_for_stock(&app, &campaign, &full).await;
    // The units are free again: the same customer can order up to the limit.
    let again = place(&app, &ada, &campaign, 3).await;
    let again_id = again["order_id"].as_str().unwrap();
    app.wait_for_status(&ada, again_id, "awaiting_payment")
        .await;
}

async fn an_unanswered_payment_is_cancelled_at_its_deadline(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 5, 5, 1).await;
    let placed = place(&app, &ada, &campaign, 4).await;
    let id = placed["order_id"].as_str().unwrap();
    app.wait_for_status(&ada, id, "awaiting_payment").await;
    let cancelled = app.wait_for_status(&ada, id, "cancelled").await;
    assert_eq!(cancelled["reason"], "payment_timeout");
    assert_eq!(cancelled["payment"]["status"], "timed_out");
    wait_for_stock(
        &app,
        &campaign,
        &json!({"total": 5, "available": 5, "reserved": 0, "sold": 0}),
    )
    .await;
}

async fn a_customer_cancel_releases_and_a_late_success_is_refunded(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 10, 3, 600).await;
    let placed = place(&app, &ada, &campaign, 2).await;
    let id = placed["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    assert_eq!(app.cancel(&ada, id).await.status(), StatusCode::ACCEPTED);
    let full = json!({"total": 10, "available": 10, "reserved": 0, "sold": 0});
    wait_for_stock(&app, &campaign, &full).await;
    // The money arrives anyway: it goes back, and the order stays cancelled.
    let late = app
        .webhook(&paid(&awaiting, "succeeded"), now(), WEBHOOK_SECRET)
        .await;
    assert_eq!(late.status(), StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let order = expect_json(
            app.get(&format!("/v1/orders/{id}"), &ada).await,
            StatusCode::OK,
        )
        .await;
        assert_eq!(order["status"], "cancelled");
        assert_eq!(order["reason"], "customer");
        if order["payment"]["status"] == "refunded" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never refunded: {order}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stock(&app, &campaign).await, full);
}

async fn the_customer_follows_an_order_live_until_it_is_settled(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    let campaign = campaign(&app, 10, 3, 600).await;
    let placed = place(&app, &ada, &campaign, 1).await;
    let id = placed["order_id"].as_str().unwrap();
    let path = format!("/v1/orders/{id}/events");
    expect_problem(
        app.get(&path, &bob).await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    let mut live = app.get(&path, &ada).await;
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    let answer = app
        .webhook(&paid(&awaiting, "succeeded"), now(), WEBHOOK_SECRET)
        .await;
    assert_eq!(answer.status(), StatusCode::OK);
    // Read the stream to its end: it closes once the order is confirmed and paid.
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(chunk) = live.chunk().await.unwrap() {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    })
    .await;
    assert!(read.is_ok(), "the stream did not end: {text}");
    let statuses: Vec<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(|data| serde_json::from_str::<Value>(data.trim()).unwrap())
        .map(|order| order["status"].as_str().unwrap().to_owned())
        .collect();
    assert!(text.contains("event: order"), "{text}");
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("confirmed"),
        "{statuses:?}"
    );
    // It began with the order as it was when the customer subscribed, before the payment.
    assert_ne!(statuses[0], "confirmed", "{statuses:?}");
}

fn simulated() -> Payments {
    Payments::Simulated {
        delay: Duration::from_millis(30),
        failure_rate: 0.0,
    }
}

#[tokio::test]
async fn prefer_wait_holds_the_answer_until_the_simulated_provider_settled() {
    for backend in [Backend::Embedded, Backend::Postgres] {
        let app = spawn_app_configured(backend, Default::default(), simulated()).await;
        let (_, ada) = app.create_user("Ada").await;
        let campaign = campaign(&app, 10, 3, 600).await;
        let key = Ulid::new().to_string();
        let body = json!({"campaign_id": campaign["campaign_id"], "quantity": 1});
        let send = || {
            app.client
                .post(format!("{}/v1/orders", app.address))
                .bearer_auth(&ada)
                .header("Idempotency-Key", &key)
                .header("Prefer", "wait=10")
                .json(&body)
                .send()
        };
        let order = expect_json(send().await.unwrap(), StatusCode::ACCEPTED).await;
        assert_ne!(order["status"], "pending", "{backend:?}: {order}");
        let id = order["order_id"].as_str().unwrap();
        app.wait_for_status(&ada, id, "confirmed").await;
        // A replay answers what the first request answered, not the order as it was placed
        // nor as it is now.
        let replay = send().await.unwrap();
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        let replayed = expect_json(replay, StatusCode::ACCEPTED).await;
        assert_eq!(replayed, order, "{backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_orders_from_sixty_customers_sell_exactly_the_quota() {
    for backend in [Backend::Embedded, Backend::Postgres] {
        let app = Arc::new(spawn_app_configured(backend, Default::default(), simulated()).await);
        let campaign = Arc::new(campaign(&app, 50, 2, 600).await);
        let mut customers = Vec::new();
        for i in 0..60 {
            customers.push(app.create_user(&format!("customer {i}")).await);
        }
        let customers = Arc::new(customers);
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (app, campaign, customers) = (app.clone(), campaign.clone(), customers.clone());
                tokio::spawn(async move {
                    let (user_id, token) = &customers[i % 60];
                    let order = place(&app, token, &campaign, 1).await;
                    (user_id.clone(), token.clone(), order)
                })
            })
            .collect();
        let mut placed = Vec::new();
        for task in tasks {
            placed.push(task.await.unwrap());
        }
        let mut confirmed_per_customer = std::collections::HashMap::<String, u32>::new();
        let mut confirmed = 0;
        for (user_id, token, order) in &placed {
            let id = order["order_id"].as_str().unwrap();
            let last = final_state(&app, token, id).await;
            match last["status"].as_str().unwrap() {
                "confirmed" => {
                    confirmed += 1;
                    *confirmed_per_customer.entry(user_id.clone()).or_default() += 1;
                }
                "rejected" => assert!(
                    ["sold_out", "limit_exceeded"].contains(&last["reason"].as_str().unwrap()),
                    "{last}"
                ),
                other => panic!("{backend:?}: order {id} ended {other}"),
            }
        }
        assert_eq!(confirmed, 50, "{backend:?}");
        assert!(
            confirmed_per_customer.values().all(|n| *n <= 2),
            "{backend:?}: {confirmed_per_customer:?}"
        );
        assert_eq!(
            stock(&app, &campaign).await,
            json!({"total": 50, "available": 0, "reserved": 0, "sold": 50}),
            "{backend:?}"
        );
    }
}

/// Polls an order until it is confirmed, rejected or cancelled.
async fn final_state(app: &TestApp, token: &str, id: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let order = expect_json(
            app.get(&format!("/v1/orders/{id}"), token).await,
            StatusCode::OK,
        )
        .await;
        if ["confirmed", "rejected", "cancelled"].contains(&order["status"].as_str().unwrap()) {
            return order;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never final: {order}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// --- the saga killed between every pair of steps ---

/// A log whose process dies at its `kill_at`-th append: before storing it, or just after
/// (the append is stored, its caller never hears).
struct DyingLog {
    inner: Arc<dyn EventLog>,
    appends: AtomicUsize,
    kill_at: usize,
    after_storing: bool,
}

impl DyingLog {
    async fn append_one(&self, request: AppendRequest) -> Result<Appended, LogError> {
        let n = self.appends.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        if n != self.kill_at {
            return self.inner.append(request).await;
        }
        if self.after_storing {
            self.inner.append(request).await?;
        }
        Err(LogError::InvalidAppend("the worker died here"))
    }
}

#[async_trait]
impl EventLog for DyingLog {
    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, LogError>> {
        let mut outcomes = Vec::new();
        for request in requests {
            outcomes.push(self.append_one(request).await);
        }
        outcomes
    }
    async fn read_streams(
        &self,
        ids: &[String],
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.read_streams(ids, limit).await
    }
    async fn read_stream(
        &self,
        s: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.read_stream(s, after, limit).await
    }
    async fn read_all(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.read_all(after, limit).await
    }
    async fn head(&self) -> Result<u64, LogError> {
        self.inner.head().await
    }
    async fn count_after(&self, after: u64, categories: &[&str]) -> Result<u64, LogError> {
        self.inner.count_after(after, categories).await
    }
    async fn load_snapshot(&self, s: &str) -> Result<Option<Snapshot>, LogError> {
        self.inner.load_snapshot(s).await
    }
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), LogError> {
        self.inner.save_snapshot(snapshot).await
    }
    async fn find_idempotent(&self, k: &IdempotencyKey) -> Result<Option<Recorded>, LogError> {
        self.inner.find_idempotent(k).await
    }
    async fn expire_idempotency_keys(
        &self,
        older_than: Duration,
        limit: usize,
    ) -> Result<u64, LogError> {
        self.inner.expire_idempotency_keys(older_than, limit).await
    }
    async fn identity(&self) -> Result<String, LogError> {
        self.inner.identity().await
    }
    async fn amend_idempotent(&self, record: IdempotencyRecord) -> Result<(), LogError> {
        self.inner.amend_idempotent(record).await
    }
    fn appends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.appends()
    }
}

/// A campaign and an order placed on it by a new customer, straight into the log.
pub(crate) async fn placed_order(log: &Arc<dyn EventLog>) -> (CampaignId, OrderId, UserId) {
    let handler = CommandHandler::new(Arc::clone(log), HandlerOptions::default());
    let now = chrono::Utc::now();
    let campaign_id = crate::stock_buckets::create_campaign_with(&handler, 5, 5, 1).await;
    let order_id = OrderId::from_ulid(Ulid::new());
    let user_id = UserId::from_ulid(Ulid::new());
    let place = OrderCommand::Place {
        order_id,
        user_id,
        campaign_id,
        quantity: 2,
        unit_price_cents: Cents::new(700),
        now,
    };
    handler
        .execute::<OrderAggregate>(
            &stream_id::<OrderAggregate>(order_id),
            &place,
            &Context::new(Metadata::default()),
        )
        .await
        .unwrap();
    (campaign_id, order_id, user_id)
}

/// A fresh worker: its own handler (no cached state) over `log`.
fn worker(log: Arc<dyn EventLog>) -> OrderSaga {
    OrderSaga::new(
        CommandHandler::new(log, HandlerOptions::default()),
        Arc::new(External),
        Arc::new(MemoryDeadlines::new()),
    )
}

/// Runs the whole paid path (advance, the provider's success, advance) with a worker that dies
/// at the `kill_at`-th append, restarting a fresh worker after every death.
async fn paid_path_with_a_death(
    log: Arc<dyn EventLog>,
    order_id: OrderId,
    kill_at: usize,
    after_storing: bool,
) -> (usize, usize) {
    let dying = Arc::new(DyingLog {
        inner: Arc::clone(&log),
        appends: AtomicUsize::new(0),
        kill_at,
        after_storing,
    });
    let mut deaths = 0;
    let advance = |expect: fn(Progress) -> bool| {
        let dying: Arc<dyn EventLog> = dying.clone();
        let log = Arc::clone(&log);
        async move {
            match worker(Arc::clone(&dying))
                .advance(order_id, &Metadata::default())
                .await
            {
                Ok(progress) => assert!(expect(progress), "{progress:?}"),
                Err(_) => {
                    // Restarted: a new worker resumes from the log.
                    let progress = worker(log)
                        .advance(order_id, &Metadata::default())
                        .await
                        .unwrap();
                    assert!(expect(progress), "{progress:?}");
                    return 1;
                }
            }
            0
        }
    };
    deaths += advance(|p| matches!(p, Progress::Waiting(_))).await;
    let payments = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
    settle(
        &payments,
        payment_id_of(order_id),
        Outcome::Succeeded,
        "psp-1",
        Metadata::default(),
    )
    .await
    .unwrap();
    deaths += advance(|p| p == Progress::Done).await;
    (deaths, dying.appends.load(AtomicOrdering::SeqCst))
}

async fn count(log: &Arc<dyn EventLog>, stream: &str, event_type: &str) -> usize {
    log.read_stream(stream, 0, 1_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.envelope.event_type == event_type)
        .count()
}

async fn the_saga_killed_between_every_pair_of_steps_reaches_the_same_end(log: Arc<dyn EventLog>) {
    // The clean run takes this many appends; a death at each of them is tried, both before
    // and after the append is stored.
    let (_, clean_order, _) = placed_order(&log).await;
    let (deaths, appends) =
        paid_path_with_a_death(Arc::clone(&log), clean_order, usize::MAX, false).await;
    assert_eq!(deaths, 0);
    assert_eq!(
        appends, 2,
        "two wake-ups, each taking its steps in one append"
    );

    for kill_at in 1..=appends {
        for after_storing in [false, true] {
            let (campaign_id, order_id, user_id) = placed_order(&log).await;
            let (deaths, _) =
                paid_path_with_a_death(Arc::clone(&log), order_id, kill_at, after_storing).await;
            assert_eq!(deaths, 1, "the worker died once (at append {kill_at})");
            let handler = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
            let order = handler
                .load::<OrderAggregate>(&stream_id::<OrderAggregate>(order_id))
                .await
                .unwrap()
                .state
                .unwrap();
            assert_eq!(order.status, OrderStatus::Confirmed, "kill at {kill_at}");
            let holding_stream = stream_id::<HoldingAggregate>(format!("{campaign_id}-{user_id}"));
            let holding = handler
                .load::<HoldingAggregate>(&holding_stream)
                .await
                .unwrap()
                .state;
            assert_eq!(holding.of(order_id), Some(ReservationState::Sold));
            assert_eq!(count(&log, &holding_stream, "UnitsReserved").await, 1);
            assert_eq!(count(&log, &holding_stream, "UnitsSold").await, 1);
            let campaign = handler
                .load::<CampaignAggregate>(&stream_id::<CampaignAggregate>(campaign_id))
                .await
                .unwrap()
                .state
                .unwrap();
            assert_eq!(campaign.stock([]).sold, 2, "kill at {kill_at}");
            assert_eq!(campaign.stock([]).reserved, 0, "kill at {kill_at}");
            let payment_stream = stream_id::<PaymentAggregate>(payment_id_of(order_id));
            // The order's move to awaiting payment was the request: the payment's stream
            // holds only the provider's answer.
            assert_eq!(count(&log, &payment_stream, "PaymentRequested").await, 0);
            assert_eq!(count(&log, &payment_stream, "PaymentSucceeded").await, 1);
            let payment = sagas::payments::load(&handler, payment_id_of(order_id))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(payment.status, PaymentStatus::Succeeded);
            // Each of the four steps is one event by the saga.
            let order_stream = stream_id::<OrderAggregate>(order_id);
            let mut by_saga = Vec::new();
            for stream in [&order_stream, &holding_stream, &payment_stream] {
                for e in log.read_stream(stream, 0, 1_000).await.unwrap() {
                    if e.envelope.metadata.actor.as_deref() == Some("saga:order") {
                        by_saga.push(e.envelope.event_type);
                    }
                }
            }
            by_saga.sort();
            assert_eq!(
                by_saga,
                [
                    "OrderAwaitingPayment",
                    "OrderConfirmed",
                    "UnitsReserved",
                    "UnitsSold"
                ],
                "kill at {kill_at}"
            );
        }
    }
}

async fn duplicated_and_reordered_deliveries_change_nothing(log: Arc<dyn EventLog>) {
    let (campaign_id, order_id, user_id) = placed_order(&log).await;
    paid_path_with_a_death(Arc::clone(&log), order_id, usize::MAX, false).await;
    // The order's own streams, read directly: the global log's watermark is server-wide.
    let streams = [
        stream_id::<CampaignAggregate>(campaign_id),
        stream_id::<HoldingAggregate>(format!("{campaign_id}-{user_id}")),
        stream_id::<OrderAggregate>(order_id),
        stream_id::<PaymentAggregate>(payment_id_of(order_id)),
    ];
    let mut events = Vec::new();
    for stream in &streams {
        events.extend(log.read_stream(stream, 0, 1_000).await.unwrap());
    }
    let stored = events.len();
    // Every event twice, newest first, to a fresh worker.
    events.sort_by_key(|e| e.envelope.global_position);
    let saga = worker(Arc::clone(&log));
    for event in events.iter().rev().chain(events.iter()) {
        saga.handle(&event.envelope).await.unwrap();
    }
    let mut after = 0;
    for stream in &streams {
        after += log.read_stream(stream, 0, 1_000).await.unwrap().len();
    }
    assert_eq!(after, stored);
}

on_both_logs!(
    the_saga_killed_between_every_pair_of_steps_reaches_the_same_end,
    duplicated_and_reordered_deliveries_change_nothing,
);
