//! `groupbuy serve` killed (`SIGKILL`) in the middle of a flash sale, while group commits and
//! the saga's batches are in flight, then started again: no accepted order is lost, none is
//! stored twice, every order is decided, and the audit finds nothing wrong.

use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::process::{free_port, serve_command, wait_until_listening};
use harness::{TestDb, TestRedis, TestStreams};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ulid::Ulid;

const OPERATOR: &str = "crash-test-operator-token";

/// The deployment's services, and how to start an instance of it on `port`.
struct Deployment {
    db: TestDb,
    streams: TestStreams,
    redis: TestRedis,
    port: u16,
}

impl Deployment {
    fn start(&self) -> Child {
        let binary = env!("CARGO_BIN_EXE_groupbuy-under-test");
        serve_command(binary, self.port, &self.db, &self.streams, &self.redis)
            .env("GROUPBUY_OPERATOR_TOKEN", OPERATOR)
            // The same key after the restart, so customers' tokens still work.
            .env("GROUPBUY_TOKEN_SECRET", "crash-test-token-secret")
            .spawn()
            .expect("the server under test starts")
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

async fn ready(deployment: &Deployment, client: &reqwest::Client) {
    wait_until_listening(deployment.port, "groupbuy").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ready = client.get(deployment.url("/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post(client: &reqwest::Client, url: &str, token: &str, body: &Value) -> Value {
    let response = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap()
}

/// What the customers were told: the order each Idempotency-Key placed, by key.
type Answers = Arc<Mutex<HashMap<String, String>>>;

/// One customer ordering back to back until `stop`; a request that got no answer (the server
/// died under it) is sent again with its key until it gets one.
async fn customer(
    client: reqwest::Client,
    url: String,
    token: String,
    campaign_id: String,
    answers: Answers,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let body = json!({"campaign_id": campaign_id, "quantity": 1});
    while !*stop.borrow() {
        let key = Ulid::new().to_string();
        loop {
            let sent = client
                .post(&url)
                .bearer_auth(&token)
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    let order: Value = response.json().await.unwrap();
                    let id = order["order_id"].as_str().unwrap().to_owned();
                    let mut answers = answers.lock().unwrap();
                    let earlier = answers.insert(key.clone(), id.clone());
                    assert!(earlier.is_none_or(|e| e == id), "one key, two orders");
                    break;
                }
                // Refused while it starts (503), or the connection died: the same key again.
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_batch_loses_no_accepted_order_and_stores_none_twice() {
    let deployment = Deployment {
        db: TestDb::new().await,
        streams: TestStreams::new(),
        redis: TestRedis::new(),
        port: free_port(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut server = deployment.start();
    ready(&deployment, &client).await;
    let store = post(
        &client,
        &deployment.url("/v1/stores"),
        OPERATOR,
        &json!({"name": "Corner", "region": "north"}),
    )
    .await;
    let now = chrono::Utc::now();
    let campaign = post(
        &client,
        &deployment.url("/v1/campaigns"),
        OPERATOR,
        &json!({
            "store_id": store["store_id"], "sku": "IPA", "title": "IPA", "price_cents": 900,
            "quota": 100_000, "per_user_limit": 10_000,
            "starts_at": now - chrono::Duration::minutes(1),
            "ends_at": now + chrono::Duration::hours(1), "payment_timeout_seconds": 600,
        }),
    )
    .await;
    let campaign_id = campaign["campaign_id"].as_str().unwrap().to_owned();
    let answers: Answers = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut customers = Vec::new();
    for i in 0..24 {
        let user = post(
            &client,
            &deployment.url("/v1/users"),
            OPERATOR,
            &json!({ "name": format!("customer {i}") }),
        )
        .await;
        customers.push(tokio::spawn(customer(
            client.clone(),
            deployment.url("/v1/orders"),
            user["token"].as_str().unwrap().to_owned(),
            campaign_id.clone(),
            Arc::clone(&answers),
            stopped.clone(),
        )));
    }
    // Orders pour in, are committed in batches and decided by the saga in batches; then the
    // process dies with all of that in flight.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let before_the_kill = answers.lock().unwrap().len();
    assert!(before_the_kill > 0, "orders were placed before the kill");
    server.kill().unwrap();
    server.wait().unwrap();
    let mut server = deployment.start();
    ready(&deployment, &client).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.send(true).unwrap();
    for customer in customers {
        customer.await.unwrap();
    }

    // Every answer names an order the log holds once, and the log holds no other order.
    let answers = answers.lock().unwrap().clone();
    let answered: HashSet<String> = answers.values().cloned().collect();
    assert_eq!(answered.len(), answers.len(), "two keys, one order");
    let placed: Vec<String> = sqlx::query_scalar(
        "SELECT split_part(stream_id, '-', 2) FROM events WHERE event_type = 'OrderPlaced'",
    )
    .fetch_all(deployment.db.log().pool())
    .await
    .unwrap();
    let stored: HashSet<String> = placed.iter().cloned().collect();
    assert_eq!(stored.len(), placed.len(), "an order placed twice");
    assert_eq!(stored, answered, "the log and the answers differ");

    // Every order is decided, and the audit finds the log and the read models consistent.
    let pending = deployment.url(&format!(
        "/v1/orders?campaign_id={campaign_id}&status=pending&limit=1"
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let page: Value = client
            .get(&pending)
            .bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if page["items"].as_array().unwrap().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "orders stay pending"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report: Value = client
        .get(deployment.url("/v1/admin/audit"))
        .bearer_auth(OPERATOR)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["ok"], true, "{report}");
    server.kill().unwrap();
    server.wait().unwrap();
}
