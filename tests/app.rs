//! The real application on port 0, with a client for it.

use std::sync::Arc;
use std::time::Duration;

use gateway::app::{Application, Mirror, Payments, ReadModels, Settings, Storage};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::bus::TestStreams;
use crate::db::TestDb;
use crate::redis::TestRedis;

/// The operator token every test app is configured with.
pub const OPERATOR_TOKEN: &str = "test-operator-token";
/// The key test apps check payment webhooks with.
pub const WEBHOOK_SECRET: &[u8] = b"test-webhook-secret";

/// Which event log the app runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// The in-process default.
    Embedded,
    /// The real services: a fresh Postgres database, JetStream streams and a Redis key prefix
    /// of its own.
    Postgres,
}

/// A running application.
pub struct TestApp {
    /// `http://127.0.0.1:<port>`.
    pub address: String,
    /// A client with a timeout.
    pub client: reqwest::Client,
    /// The database, when running on Postgres.
    pub db: Option<TestDb>,
    /// The JetStream mirror, when running on the real services.
    pub streams: Option<TestStreams>,
    /// The Redis read models, when running on the real services.
    pub redis: Option<TestRedis>,
    /// The log's mirror the application consumes.
    pub bus: Option<Arc<dyn commands::bus::Bus>>,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// Starts the application on a free port.
pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, gateway::overload::Limits::default()).await
}

/// Starts the application with these load limits (and the external payment provider: orders
/// wait for a webhook that only the test sends).
pub async fn spawn_app_with(backend: Backend, limits: gateway::overload::Limits) -> TestApp {
    spawn_app_configured(backend, limits, Payments::External).await
}

/// Starts the application with these load limits and payment provider.
pub async fn spawn_app_configured(
    backend: Backend,
    limits: gateway::overload::Limits,
    payments: Payments,
) -> TestApp {
    spawn_app_tuned(backend, move |settings| {
        settings.limits = limits;
        settings.payments = payments;
    })
    .await
}

/// Starts the application with the test defaults (external payments), changed by `tune`.
pub async fn spawn_app_tuned(backend: Backend, tune: impl FnOnce(&mut Settings)) -> TestApp {
    crate::init_tracing();
    let db = match backend {
        Backend::Embedded => None,
        Backend::Postgres => Some(TestDb::new().await),
    };
    let storage = match &db {
        None => Storage::Embedded,
        Some(db) => Storage::Postgres {
            url: db.url.clone(),
            options: commands::log::postgres::PgLogOptions {
                pool_connections_max: 8,
                ..Default::default()
            },
        },
    };
    let streams = db.as_ref().map(|_| TestStreams::new());
    let mirror = match &streams {
        None => Mirror::Embedded,
        Some(streams) => Mirror::JetStream(streams.settings.clone()),
    };
    let redis = db.as_ref().map(|_| TestRedis::new());
    let read_models = match &redis {
        None => ReadModels::Embedded,
        Some(redis) => ReadModels::Redis {
            url: redis.url.clone(),
            prefix: redis.prefix.clone(),
        },
    };
    let mut settings = Settings {
        roles: Default::default(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        operator_token: OPERATOR_TOKEN.into(),
        token_secret: b"test-token-secret".to_vec(),
        storage,
        group_commit: Default::default(),
        relay: Default::default(),
        mirror,
        read_models,
        rebuild: Default::default(),
        heal_read_models_every: None,
        sweep: None,
        payments: Payments::External,
        webhook_secret: WEBHOOK_SECRET.to_vec(),
        read_your_writes_timeout: Duration::from_secs(2),
        limits: Default::default(),
    };
    tune(&mut settings);
    let app = Application::build(settings)
        .await
        .expect("the application starts");
    let address = format!("http://{}", app.local_addr());
    let bus = Some(app.bus());
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    TestApp {
        address,
        client,
        db,
        streams,
        redis,
        bus,
        stop: Some(stop),
        served: Some(served),
    }
}

impl TestApp {
    /// Sends a request with an optional bearer token, Idempotency-Key and JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Response {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.address));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        request.send().await.expect("the request is answered")
    }

    /// POST with a JSON body.
    pub async fn post(&self, path: &str, token: &str, key: Option<&str>, body: &Value) -> Response {
        self.send(reqwest::Method::POST, path, Some(token), key, Some(body))
            .await
    }

    /// Polls `path` as `token` until it answers 200 with a body `done` accepts, and returns
    /// it; panics after 20 s. For reads of what other callers wrote: a query waits only for
    /// its caller's own writes, so others' show a moment later.
    pub async fn get_until(&self, path: &str, token: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let response = self.get(path, token).await;
            if response.status() == StatusCode::OK {
                let body: Value = response.json().await.unwrap();
                if done(&body) {
                    return body;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never showed what was expected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls an order until it has `status`, and returns it; panics after 20 s. Asked by
    /// anyone but the customer who placed it (the operator), the order is not found until the
    /// read model has applied it: a query waits only for the caller's own writes.
    pub async fn wait_for_status(&self, token: &str, order_id: &str, status: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let response = self.get(&format!("/v1/orders/{order_id}"), token).await;
            if response.status() == StatusCode::NOT_FOUND && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let order = expect_json(response, StatusCode::OK).await;
            if order["status"] == status {
                return order;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "order {order_id} never reached {status}: {order}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends a payment webhook signed with [`WEBHOOK_SECRET`] at `t` (unix seconds).
    pub async fn webhook(&self, body: &Value, t: i64, secret: &[u8]) -> Response {
        use hmac::Mac;
        let raw = serde_json::to_vec(body).unwrap();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(&raw);
        let signature = format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()));
        self.client
            .post(format!("{}/v1/payments/webhook", self.address))
            .header("X-Groupbuy-Signature", signature)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .expect("the request is answered")
    }

    /// The customer (or operator) behind `token` cancels `order_id`.
    pub async fn cancel(&self, token: &str, order_id: &str) -> Response {
        let path = format!("/v1/orders/{order_id}/cancel");
        self.send(reqwest::Method::POST, &path, Some(token), None, None)
            .await
    }

    /// GET.
    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.send(reqwest::Method::GET, path, Some(token), None, None)
            .await
    }

    /// GET as the operator, which must answer 200: the JSON body.
    pub async fn operator_get(&self, path: &str) -> Value {
        expect_json(self.get(path, OPERATOR_TOKEN).await, StatusCode::OK).await
    }

    /// `/metrics`, as Prometheus text.
    pub async fn metrics(&self) -> String {
        let response = self
            .send(reqwest::Method::GET, "/metrics", None, None, None)
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        response.text().await.unwrap()
    }

    /// Creates a store as the operator; returns its body.
    pub async fn create_store(&self) -> Value {
        let response = self
            .post(
                "/v1/stores",
                OPERATOR_TOKEN,
                None,
                &json!({"name": "Corner Cellar", "region": "north"}),
            )
            .await;
        expect_json(response, StatusCode::CREATED).await
    }

    /// Creates an open campaign; returns its body.
    pub async fn create_campaign(&self, quota: u32, per_user_limit: u32) -> Value {
        let store = self.create_store().await;
        let now = chrono::Utc::now();
        let body = json!({
            "store_id": store["store_id"],
            "sku": "IPA-330",
            "title": "Hazy IPA six-pack",
            "price_cents": 1250,
            "quota": quota,
            "per_user_limit": per_user_limit,
            "starts_at": now - chrono::Duration::minutes(1),
            "ends_at": now + chrono::Duration::hours(1),
            "payment_timeout_seconds": 600,
        });
        expect_json(
            self.post("/v1/campaigns", OPERATOR_TOKEN, None, &body)
                .await,
            StatusCode::CREATED,
        )
        .await
    }

    /// Registers a customer; returns (user id, token).
    pub async fn create_user(&self, name: &str) -> (String, String) {
        let body = expect_json(
            self.post("/v1/users", OPERATOR_TOKEN, None, &json!({ "name": name }))
                .await,
            StatusCode::CREATED,
        )
        .await;
        (
            body["user_id"].as_str().unwrap().to_owned(),
            body["token"].as_str().unwrap().to_owned(),
        )
    }

    /// How many events the log holds (Postgres only).
    pub async fn event_count(&self) -> i64 {
        let db = self
            .db
            .as_ref()
            .expect("event_count needs the Postgres backend");
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(db.log().pool())
            .await
            .unwrap()
    }

    /// Stops the application gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.unwrap().unwrap();
        }
    }
}

impl TestApp {
    /// A client of a deployment that another process serves at `address`
    /// (`http://127.0.0.1:<port>`).
    pub fn at(address: String) -> TestApp {
        TestApp {
            address,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            db: None,
            streams: None,
            redis: None,
            bus: None,
            stop: None,
            served: None,
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Asserts the status and returns the JSON body, showing the body when the status differs.
pub async fn expect_json(response: Response, status: StatusCode) -> Value {
    let actual = response.status();
    let text = response.text().await.unwrap();
    assert_eq!(actual, status, "unexpected status, body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
}

/// Asserts a problem+json answer with this status and code; returns the problem.
pub async fn expect_problem(response: Response, status: StatusCode, code: &str) -> Value {
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let problem = expect_json(response, status).await;
    assert_eq!(content_type, "application/problem+json");
    assert_eq!(problem["code"], code, "problem: {problem}");
    assert_eq!(problem["status"], status.as_u16());
    for field in ["type", "title", "detail"] {
        assert!(
            problem[field].is_string(),
            "problem without {field}: {problem}"
        );
    }
    problem
}
