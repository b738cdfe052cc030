//! `/readyz` names the dependency that is down and answers 503 until it is back. (NATS going
//! down and coming back is in `mirror.rs`, beside the relay's own recovery.)

use std::time::Duration;

use gateway::app::ReadModels;
use harness::servers::OwnRedis;
use harness::{expect_json, spawn_app, spawn_app_tuned, Backend, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

/// `/readyz`: its status and body.
async fn readiness(app: &TestApp) -> (StatusCode, Value) {
    let response = app
        .send(reqwest::Method::GET, "/readyz", None, None, None)
        .await;
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Polls `/readyz` until `accept` takes its answer; panics after 20 s.
async fn readiness_until(app: &TestApp, accept: impl Fn(StatusCode, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readiness(app).await;
        if accept(status, &body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readiness never came to that: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_not_ready_and_redis_back_empty_is_not_ready_until_rebuilt() {
    let mut redis = OwnRedis::start().await;
    let url = redis.url();
    let app = spawn_app_tuned(Backend::Postgres, |settings| {
        settings.read_models = ReadModels::Redis {
            url,
            prefix: "readiness".into(),
        };
    })
    .await;
    let (status, ready) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["read_models"], "up");
    assert_eq!(ready["projections"]["orders"]["status"], "live");

    redis.kill().await;
    let (status, ready) = readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    assert_eq!(ready["checks"]["read_models"], "down");
    assert_eq!(ready["checks"]["event_log"], "up", "only Redis is down");

    // Back, with nothing in it: reachable, but the read models are gone.
    redis.restart().await;
    let ready = readiness_until(&app, |status, body| {
        status == StatusCode::SERVICE_UNAVAILABLE && body["checks"]["read_models"] == "up"
    })
    .await;
    assert_eq!(ready["projections"]["campaigns"]["status"], "missing");
    assert_eq!(ready["projections"]["orders"]["status"], "missing");

    for name in ["campaigns", "orders"] {
        expect_json(
            app.post(
                &format!("/v1/admin/projections/{name}/rebuild"),
                OPERATOR_TOKEN,
                None,
                &json!({}),
            )
            .await,
            StatusCode::ACCEPTED,
        )
        .await;
    }
    readiness_until(&app, |status, _| status == StatusCode::OK).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_log_that_cannot_be_reached_is_not_ready() {
    let app = spawn_app(Backend::Postgres).await;
    let (status, ready) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["checks"]["event_log"], "up");

    // The database goes away under the running app, its connections with it.
    let name = app.db.as_ref().unwrap().name.clone();
    let mut admin = sqlx::PgConnection::connect(&harness::db::admin_url())
        .await
        .unwrap();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
    let ready = readiness_until(&app, |status, _| status == StatusCode::SERVICE_UNAVAILABLE).await;
    assert_eq!(ready["checks"]["event_log"], "down", "{ready}");
    assert_eq!(ready["checks"]["bus"], "up", "only Postgres is down");
    // The liveness probe does not depend on it.
    let live = app
        .send(reqwest::Method::GET, "/healthz", None, None, None)
        .await;
    assert_eq!(live.status(), StatusCode::OK);
}
