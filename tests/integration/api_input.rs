//! Bad input anywhere is a 4xx problem+json with a useful detail, never a 500.

use harness::{expect_problem, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::json;

on_both_backends!(
    malformed_json_is_a_400_and_the_wrong_shape_a_422_on_every_post,
    a_body_over_the_limit_is_a_413,
    unknown_routes_and_methods_are_problems_too,
    a_malformed_idempotency_key_is_a_400,
);

async fn post_raw(app: &TestApp, path: &str, body: &'static str) -> reqwest::Response {
    app.client
        .post(format!("{}{path}", app.address))
        .bearer_auth(OPERATOR_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn malformed_json_is_a_400_and_the_wrong_shape_a_422_on_every_post(app: TestApp) {
    let campaign = app.create_campaign(5, 1).await;
    let id = campaign["campaign_id"].as_str().unwrap();
    let replenish = format!("/v1/campaigns/{id}/replenish");
    for path in [
        "/v1/users",
        "/v1/stores",
        "/v1/campaigns",
        replenish.as_str(),
    ] {
        for body in ["{", "[1,", "", "not json"] {
            let problem = expect_problem(
                post_raw(&app, path, body).await,
                StatusCode::BAD_REQUEST,
                "malformed_json",
            )
            .await;
            assert!(!problem["detail"].as_str().unwrap().is_empty());
        }
        let problem = expect_problem(
            post_raw(&app, path, r#"{"unexpected": 1}"#).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
        assert!(
            problem["detail"].as_str().unwrap().contains("unexpected"),
            "{problem}"
        );
        expect_problem(
            post_raw(&app, path, "[]").await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        )
        .await;
    }
}

async fn a_body_over_the_limit_is_a_413(app: TestApp) {
    let huge = json!({ "name": "x".repeat(gateway::extract::BODY_BYTES_MAX) });
    expect_problem(
        app.post("/v1/users", OPERATOR_TOKEN, None, &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
}

async fn unknown_routes_and_methods_are_problems_too(app: TestApp) {
    expect_problem(
        app.get("/v1/nothing-here", OPERATOR_TOKEN).await,
        StatusCode::NOT_FOUND,
        "route_not_found",
    )
    .await;
    let delete = app
        .send(
            reqwest::Method::DELETE,
            "/v1/orders",
            Some(OPERATOR_TOKEN),
            None,
            None,
        )
        .await;
    expect_problem(delete, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
}

async fn a_malformed_idempotency_key_is_a_400(app: TestApp) {
    let long = "k".repeat(256);
    for key in [long.as_str(), "has space"] {
        expect_problem(
            app.post(
                "/v1/stores",
                OPERATOR_TOKEN,
                Some(key),
                &json!({"name": "a", "region": "b"}),
            )
            .await,
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
        )
        .await;
    }
}

#[tokio::test]
async fn a_full_instance_sheds_api_requests_with_503_and_retry_after_but_answers_probes() {
    let limits = gateway::overload::Limits {
        in_flight_requests_max: 0,
        ..Default::default()
    };
    let app = harness::spawn_app_with(harness::Backend::Embedded, limits).await;
    let response = app.get("/v1/campaigns", OPERATOR_TOKEN).await;
    assert_eq!(response.headers()["retry-after"], "1");
    expect_problem(response, StatusCode::SERVICE_UNAVAILABLE, "overloaded").await;
    let live = app
        .send(reqwest::Method::GET, "/healthz", None, None, None)
        .await;
    assert_eq!(live.status(), StatusCode::OK);
}
