//! Bad input anywhere is a 4xx problem+json with a useful detail, never a 500.

use harness::{expect_problem, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::json;

on_both_backends!(
    malformed_json_is_a_400_and_the_wrong_shape_a_422_on_every_post,
    a_body_over_the_limit_is_a_413,
    unknown_routes_and_methods_are_problems_too,
    a_malformed_idempotency_key_is_a_400,
    a_field_named_twice_is_a_400_and_nothing_is_placed,
    a_body_that_says_it_is_not_json_is_a_415,
    an_id_past_128_bits_names_nothing,
    an_empty_cursor_is_the_first_page,
    requests_hyper_refuses_before_routing_are_problems_too,
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

async fn a_field_named_twice_is_a_400_and_nothing_is_placed(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 8).await;
    let id = campaign["campaign_id"].as_str().unwrap();
    let body = format!(r#"{{"campaign_id": "{id}", "quantity": 1, "quantity": 7}}"#);
    let response = app
        .client
        .post(format!("{}/v1/orders", app.address))
        .bearer_auth(&ada)
        .header("Idempotency-Key", "twice")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let problem = expect_problem(response, StatusCode::BAD_REQUEST, "duplicate_field").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("quantity"),
        "{problem}"
    );
    // Nested objects are held to it too.
    expect_problem(
        post_raw(&app, "/v1/users", r#"{"name": "a", "x": {"y": 1, "y": 2}}"#).await,
        StatusCode::BAD_REQUEST,
        "duplicate_field",
    )
    .await;
    let orders = app.get("/v1/orders", &ada).await;
    let orders: serde_json::Value = orders.json().await.unwrap();
    assert_eq!(orders["items"], json!([]));
}

async fn a_body_that_says_it_is_not_json_is_a_415(app: TestApp) {
    let send = |content_type: Option<&'static str>| {
        let mut request = app
            .client
            .post(format!("{}/v1/users", app.address))
            .bearer_auth(OPERATOR_TOKEN)
            .body(r#"{"name": "Ada"}"#);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send()
    };
    for refused in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "multipart/form-data; boundary=x",
    ] {
        let problem = expect_problem(
            send(Some(refused)).await.unwrap(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        )
        .await;
        assert!(problem["detail"].as_str().unwrap().contains(refused));
    }
    for accepted in [
        None,
        Some("application/json"),
        Some("Application/JSON; charset=utf-8"),
        Some("application/merge-patch+json"),
    ] {
        let response = send(accepted).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED, "{accepted:?}");
    }
}

async fn an_id_past_128_bits_names_nothing(app: TestApp) {
    let campaign = app.create_campaign(10, 1).await;
    let id = campaign["campaign_id"].as_str().unwrap();
    assert!(id.starts_with('0'), "{id}");
    // The same 128 bits with one of the two bits a ULID does not have set.
    let alias = format!("8{}", &id[1..]);
    expect_problem(
        app.get(&format!("/v1/campaigns/{alias}"), OPERATOR_TOKEN)
            .await,
        StatusCode::NOT_FOUND,
        "campaign_not_found",
    )
    .await;
    let (_, ada) = app.create_user("Ada").await;
    expect_problem(
        app.post(
            "/v1/orders",
            &ada,
            Some("alias"),
            &json!({"campaign_id": alias, "quantity": 1}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_input",
    )
    .await;
}

async fn an_empty_cursor_is_the_first_page(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    app.post(
        "/v1/orders",
        &ada,
        Some("one"),
        &json!({"campaign_id": campaign["campaign_id"], "quantity": 1}),
    )
    .await;
    let first = app.get("/v1/orders?cursor=", &ada).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first: serde_json::Value = first.json().await.unwrap();
    assert_eq!(first["items"].as_array().unwrap().len(), 1, "{first}");
}

/// Sends `request` as raw bytes and reads the answer until the server closes.
async fn raw_exchange(app: &TestApp, request: &[u8]) -> (String, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    // The server closes after a refusal; one that answered and kept the connection is a fail.
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .unwrap_or_else(|_| panic!("the connection stayed open: {answer:?}"))
    .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole response");
    let body = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    (head.to_owned(), body)
}

async fn requests_hyper_refuses_before_routing_are_problems_too(app: TestApp) {
    let many_headers: Vec<u8> = (0..200)
        .flat_map(|i| format!("x-{i}: a\r\n").into_bytes())
        .collect();
    // (Headers too large in bytes are refused or not depending on how the reads fall, so
    // they are left to the unit tests of `parse_errors`.)
    let cases: [(Vec<u8>, u16, &str); 3] = [
        (
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
        (
            [
                &b"GET /healthz HTTP/1.1\r\nhost: x\r\n"[..],
                &many_headers,
                b"\r\n",
            ]
            .concat(),
            431,
            "headers_too_large",
        ),
        (
            b"NOT HTTP AT ALL\r\n\r\n".to_vec(),
            400,
            "malformed_request",
        ),
    ];
    for (request, status, code) in cases {
        let (head, problem) = raw_exchange(&app, &request).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
        assert!(
            head.contains("content-type: application/problem+json"),
            "{head}"
        );
        assert_eq!(problem["status"], status);
        assert_eq!(problem["code"], code, "{problem}");
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
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"groupbuy_shed_total{reason="overloaded"}"#),
        "{metrics}"
    );
}

/// An embedded app where each customer may send 3 requests at once, then 1 a second.
async fn app_with_customer_rate_of_1_a_second_and_burst_of_3() -> TestApp {
    use gateway::rate_limit::{Bucket, RateLimits};
    harness::spawn_app_tuned(harness::Backend::Embedded, |settings| {
        settings.limits.rate_limits = RateLimits {
            per_customer: Some(Bucket {
                per_second: 1,
                burst: 3,
            }),
            global: None,
        };
    })
    .await
}

#[tokio::test]
async fn a_customer_over_their_rate_is_answered_429_with_retry_after_and_others_are_not() {
    let app = app_with_customer_rate_of_1_a_second_and_burst_of_3().await;
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    for _ in 0..3 {
        assert_eq!(app.get("/v1/orders", &ada).await.status(), StatusCode::OK);
    }
    let limited = app.get("/v1/orders", &ada).await;
    assert_eq!(limited.headers()["retry-after"], "1");
    expect_problem(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_eq!(app.get("/v1/orders", &bob).await.status(), StatusCode::OK);
    for _ in 0..5 {
        let operator = app.get("/v1/orders", OPERATOR_TOKEN).await;
        assert_eq!(
            operator.status(),
            StatusCode::OK,
            "the operator has no customer bucket"
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(
        app.get("/v1/orders", &ada).await.status(),
        StatusCode::OK,
        "the bucket refills"
    );
}

#[tokio::test]
async fn past_the_instance_rate_everyone_is_answered_429_but_probes_are_not() {
    use gateway::rate_limit::{Bucket, RateLimits};
    let app = harness::spawn_app_tuned(harness::Backend::Embedded, |settings| {
        settings.limits.rate_limits = RateLimits {
            per_customer: None,
            global: Some(Bucket {
                per_second: 1,
                burst: 2,
            }),
        };
    })
    .await;
    for _ in 0..2 {
        assert_eq!(
            app.get("/v1/campaigns", OPERATOR_TOKEN).await.status(),
            StatusCode::OK
        );
    }
    let limited = app.get("/v1/campaigns", OPERATOR_TOKEN).await;
    assert!(limited.headers().contains_key("retry-after"));
    expect_problem(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    let live = app
        .send(reqwest::Method::GET, "/healthz", None, None, None)
        .await;
    assert_eq!(live.status(), StatusCode::OK);
    let metrics = app.metrics().await;
    assert!(
        metrics.contains(r#"groupbuy_rate_limited_total{scope="global"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn metrics_are_served_as_prometheus_text_with_business_labels() {
    let app = app_with_customer_rate_of_1_a_second_and_burst_of_3().await;
    let (_, ada) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 5).await;
    let campaign_id = campaign["campaign_id"].as_str().unwrap();
    let key = ulid::Ulid::new().to_string();
    let body = json!({"campaign_id": campaign_id, "quantity": 1});
    let order = app.post("/v1/orders", &ada, Some(&key), &body).await;
    assert_eq!(order.status(), StatusCode::ACCEPTED);
    let order: serde_json::Value = order.json().await.unwrap();
    app.wait_for_status(
        OPERATOR_TOKEN,
        order["order_id"].as_str().unwrap(),
        "awaiting_payment",
    )
    .await;
    // Paid: confirmed.
    let paid = app
        .webhook(
            &json!({
                "payment_id": order["order_id"], "status": "succeeded",
                "provider_reference": "psp-metrics",
            }),
            chrono::Utc::now().timestamp(),
            harness::WEBHOOK_SECRET,
        )
        .await;
    assert_eq!(paid.status(), StatusCode::OK);
    app.wait_for_status(
        OPERATOR_TOKEN,
        order["order_id"].as_str().unwrap(),
        "confirmed",
    )
    .await;
    // Over the limit of 5 with the unit Ada holds: rejected.
    let over = json!({"campaign_id": campaign_id, "quantity": 5});
    let rejected: serde_json::Value = app
        .post("/v1/orders", &ada, Some("metrics-over"), &over)
        .await
        .json()
        .await
        .unwrap();
    app.wait_for_status(
        OPERATOR_TOKEN,
        rejected["order_id"].as_str().unwrap(),
        "rejected",
    )
    .await;
    // Cancelled by Ada.
    let cancelled: serde_json::Value = app
        .post("/v1/orders", &ada, Some("metrics-cancel"), &body)
        .await
        .json()
        .await
        .unwrap();
    let cancelled_id = cancelled["order_id"].as_str().unwrap();
    app.wait_for_status(OPERATOR_TOKEN, cancelled_id, "awaiting_payment")
        .await;
    // Ada's burst of 3 is spent: wait for the bucket to refill one.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    let cancel = app
        .post(
            &format!("/v1/orders/{cancelled_id}/cancel"),
            &ada,
            None,
            &json!({}),
        )
        .await;
    assert_eq!(cancel.status(), StatusCode::ACCEPTED);
    // Spend the rest of Ada's burst, and one more.
    while app.get("/v1/orders", &ada).await.status() != StatusCode::TOO_MANY_REQUESTS {}

    let response = app
        .send(reqwest::Method::GET, "/metrics", None, None, None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = response.text().await.unwrap();
    for expected in [
        r#"groupbuy_http_requests_total{route="/v1/orders",method="POST",status="202"}"#.to_owned(),
        r#"groupbuy_http_request_duration_seconds_bucket{route="/v1/orders/{id}",method="GET",status="200",le="#.to_owned(),
        format!(r#"groupbuy_orders_placed_total{{campaign_id="{campaign_id}"}} 3"#),
        format!(r#"groupbuy_orders_confirmed_total{{campaign_id="{campaign_id}"}} 1"#),
        format!(
            r#"groupbuy_orders_rejected_total{{campaign_id="{campaign_id}",reason="limit_exceeded"}} 1"#
        ),
        format!(
            r#"groupbuy_orders_cancelled_total{{campaign_id="{campaign_id}",reason="customer"}} 1"#
        ),
        r#"groupbuy_saga_step_duration_seconds_bucket{step="reserve_stock",le="#.to_owned(),
        r#"groupbuy_subscription_events_total{consumer="order-saga",outcome="handled"}"#.to_owned(),
        r#"groupbuy_projection_lag_events{projection="orders"}"#.to_owned(),
        r#"groupbuy_relay_leader"#.to_owned(),
        r#"groupbuy_rate_limited_total{scope="customer"}"#.to_owned(),
    ] {
        assert!(text.contains(&expected), "no {expected} in:\n{text}");
    }
}
