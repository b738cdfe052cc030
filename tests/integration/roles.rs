//! Each role in a process of its own, on the real services: together they are one deployment
//! that places, pays, cancels and times out orders.

use std::process::{Child, Command};
use std::time::Duration;

use harness::process::{free_port, serve_command, wait_until_listening};
use harness::{expect_json, expect_problem, TestApp, TestDb, TestRedis, TestStreams};
use harness::{OPERATOR_TOKEN, WEBHOOK_SECRET};
use reqwest::StatusCode;
use serde_json::Value;

use crate::order_saga::{campaign, pay, place};

const ROLES: [&str; 5] = ["gateway", "relay", "saga", "projections", "deadlines"];

/// A process of the deployment, running `role`, killed when dropped.
struct Process {
    role: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(role: &'static str, db: &TestDb, streams: &TestStreams, redis: &TestRedis) -> Process {
    let port = free_port();
    let binary = env!("CARGO_BIN_EXE_groupbuy-under-test");
    let child = serve_command(binary, port, db, streams, redis)
        .args(["--roles", role])
        .env("GROUPBUY_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("GROUPBUY_TOKEN_SECRET", "roles-test-token-secret")
        .env(
            "GROUPBUY_PAYMENT_WEBHOOK_SECRET",
            std::str::from_utf8(WEBHOOK_SECRET).unwrap(),
        )
        .spawn()
        .expect("the server under test starts");
    Process { role, port, child }
}

/// Waits until `process` is ready, and returns its readiness.
async fn ready(process: &Process, client: &reqwest::Client) -> Value {
    wait_until_listening(process.port, process.role).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let url = format!("http://127.0.0.1:{}/readyz", process.port);
        if let Ok(response) = client.get(url).send().await {
            if response.status() == StatusCode::OK {
                return response.json().await.unwrap();
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the {} process never got ready",
            process.role
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_in_a_process_of_its_own_makes_one_deployment() {
    let (db, streams, redis) = (TestDb::new().await, TestStreams::new(), TestRedis::new());
    let mut processes: Vec<Process> = ROLES
        .into_iter()
        .map(|role| start(role, &db, &streams, &redis))
        .collect();
    let client = reqwest::Client::new();
    for process in &processes {
        let readiness = ready(process, &client).await;
        assert_eq!(readiness["roles"], serde_json::json!([process.role]));
        let relay = &readiness["relay"]["role"];
        match process.role {
            "relay" => assert_eq!(relay, "leader", "{readiness}"),
            _ => assert_eq!(relay, "not_run", "{readiness}"),
        }
    }
    let at = |role: &str| {
        let process = processes.iter().find(|p| p.role == role).unwrap();
        TestApp::at(format!("http://127.0.0.1:{}", process.port))
    };
    let app = at("gateway");
    // Only the gateway serves the API.
    let elsewhere = at("saga").get("/v1/campaigns", OPERATOR_TOKEN).await;
    expect_problem(elsewhere, StatusCode::NOT_FOUND, "route_not_found").await;

    let (_, ada) = app.create_user("Ada").await;
    let sale = campaign(&app, 10, 5, 600).await;
    // Paid: the gateway takes the webhook, the saga confirms, the projections show it.
    let order = place(&app, &ada, &sale, 1).await;
    let id = order["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    pay(&app, &ada, &awaiting).await;
    // Cancelled by the customer: the saga releases the units.
    let order = place(&app, &ada, &sale, 2).await;
    let id = order["order_id"].as_str().unwrap();
    app.wait_for_status(&ada, id, "awaiting_payment").await;
    assert_eq!(app.cancel(&ada, id).await.status(), StatusCode::ACCEPTED);
    let cancelled = app.wait_for_status(&ada, id, "cancelled").await;
    assert_eq!(cancelled["reason"], "customer", "{cancelled}");
    // Never paid: the deadlines process times the payment out.
    let hurried = campaign(&app, 10, 5, 1).await;
    let order = place(&app, &ada, &hurried, 1).await;
    let id = order["order_id"].as_str().unwrap();
    let timed_out = app.wait_for_status(&ada, id, "cancelled").await;
    assert_eq!(timed_out["reason"], "payment_timeout", "{timed_out}");
    let stock = expect_json(
        app.get(
            &format!("/v1/campaigns/{}", sale["campaign_id"].as_str().unwrap()),
            &ada,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(stock["stock"]["sold"], 1, "{stock}");

    // The saga runs nowhere else: without its process, orders wait; a new one takes them on.
    processes.retain(|p| p.role != "saga");
    let order = place(&app, &ada, &sale, 1).await;
    let id = order["order_id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let waiting = expect_json(
        app.get(&format!("/v1/orders/{id}"), &ada).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(waiting["status"], "pending", "{waiting}");
    let saga = start("saga", &db, &streams, &redis);
    ready(&saga, &client).await;
    app.wait_for_status(&ada, id, "awaiting_payment").await;
}

#[tokio::test]
async fn roles_apart_refuse_the_embedded_default() {
    let output = Command::new(env!("CARGO_BIN_EXE_groupbuy-under-test"))
        .args(["serve", "--roles", "gateway,saga"])
        .env_clear()
        .env("GROUPBUY_HTTP_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--roles gateway,saga") && stderr.contains("DATABASE_URL"),
        "{stderr}"
    );
}
