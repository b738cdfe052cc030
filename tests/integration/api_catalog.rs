//! Users, stores and campaigns through the HTTP API.

use harness::{expect_json, expect_problem, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::json;

on_both_backends!(
    the_operator_registers_a_customer_whose_token_works,
    only_the_operator_creates_users_stores_and_campaigns,
    a_campaign_is_created_read_and_listed_with_its_stock,
    campaigns_are_filtered_by_store_and_status,
    replenishing_adds_stock_and_closing_stops_the_campaign,
    a_campaign_refers_to_a_store_that_exists,
    campaign_terms_outside_the_limits_are_refused_with_the_field,
    an_unknown_campaign_is_not_found,
    a_replayed_registration_returns_the_same_token,
    readiness_and_liveness_answer,
);

async fn the_operator_registers_a_customer_whose_token_works(app: TestApp) {
    let (user_id, token) = app.create_user("Ada").await;
    assert!(token.starts_with("gb_") && token.contains(&user_id));
    let campaign = app.create_campaign(5, 1).await;
    let path = format!(
        "/v1/campaigns/{}",
        campaign["campaign_id"].as_str().unwrap()
    );
    expect_json(app.get(&path, &token).await, StatusCode::OK).await;

    let forged = format!("gb_{user_id}_{}", "0".repeat(64));
    expect_problem(
        app.get(&path, &forged).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    expect_problem(
        app.get(&path, "nonsense").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    let anonymous = app
        .send(reqwest::Method::GET, &path, None, None, None)
        .await;
    expect_problem(anonymous, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

async fn only_the_operator_creates_users_stores_and_campaigns(app: TestApp) {
    let (_, customer) = app.create_user("Ada").await;
    let store = app.create_store().await;
    for (path, body) in [
        ("/v1/users", json!({"name": "Eve"})),
        ("/v1/stores", json!({"name": "x", "region": "y"})),
        ("/v1/campaigns", json!({"store_id": store["store_id"]})),
    ] {
        expect_problem(
            app.post(path, &customer, None, &body).await,
            StatusCode::FORBIDDEN,
            "forbidden",
        )
        .await;
    }
}

async fn a_campaign_is_created_read_and_listed_with_its_stock(app: TestApp) {
    let (_, customer) = app.create_user("Ada").await;
    let created = app.create_campaign(40, 2).await;
    assert_eq!(created["status"], "open");
    assert_eq!(created["quota"], 40);
    assert_eq!(created["price_cents"], 1250);
    assert_eq!(
        created["stock"],
        json!({"total": 40, "available": 40, "reserved": 0, "sold": 0})
    );
    let id = created["campaign_id"].as_str().unwrap();
    assert_eq!(id.len(), 26, "ids are ULIDs");

    let read = expect_json(
        app.get(&format!("/v1/campaigns/{id}"), &customer).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(read, created);
    let list = expect_json(app.get("/v1/campaigns", &customer).await, StatusCode::OK).await;
    assert_eq!(list["items"], json!([created]));
}

async fn campaigns_are_filtered_by_store_and_status(app: TestApp) {
    let open = app.create_campaign(10, 1).await;
    let store = app.create_store().await;
    let now = chrono::Utc::now();
    let scheduled = expect_json(
        app.post(
            "/v1/campaigns",
            OPERATOR_TOKEN,
            None,
            &json!({
                "store_id": store["store_id"], "sku": "STOUT", "title": "Winter stout", "price_cents": 900,
                "quota": 10, "per_user_limit": 1, "starts_at": now + chrono::Duration::days(1),
                "ends_at": now + chrono::Duration::days(2), "payment_timeout_seconds": 60,
            }),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    assert_eq!(scheduled["status"], "scheduled");

    let ids = |body: serde_json::Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["campaign_id"].as_str().unwrap().to_owned())
            .collect()
    };
    let by_store = format!(
        "/v1/campaigns?store_id={}",
        store["store_id"].as_str().unwrap()
    );
    let listed = app.operator_get(&by_store).await;
    assert_eq!(
        ids(listed),
        vec![scheduled["campaign_id"].as_str().unwrap()]
    );
    let listed = app.operator_get("/v1/campaigns?status=open").await;
    assert_eq!(ids(listed), vec![open["campaign_id"].as_str().unwrap()]);
    expect_problem(
        app.get("/v1/campaigns?status=sleeping", OPERATOR_TOKEN)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    expect_problem(
        app.get("/v1/campaigns?store_id=nope", OPERATOR_TOKEN).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_input",
    )
    .await;
}

async fn replenishing_adds_stock_and_closing_stops_the_campaign(app: TestApp) {
    let campaign = app.create_campaign(10, 1).await;
    let id = campaign["campaign_id"].as_str().unwrap();
    let replenished = expect_json(
        app.post(
            &format!("/v1/campaigns/{id}/replenish"),
            OPERATOR_TOKEN,
            None,
            &json!({"quantity": 5}),
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(
        replenished["stock"],
        json!({"total": 15, "available": 15, "reserved": 0, "sold": 0})
    );
    assert_eq!(replenished["quota"], 10);

    let close = |key: &'static str| {
        let app = &app;
        async move {
            app.send(
                reqwest::Method::POST,
                &format!("/v1/campaigns/{id}/close"),
                Some(OPERATOR_TOKEN),
                Some(key),
                None,
            )
            .await
        }
    };
    let closed = expect_json(close("close-1").await, StatusCode::OK).await;
    assert_eq!(closed["status"], "closed");
    let again = expect_json(close("close-2").await, StatusCode::OK).await;
    assert_eq!(again["status"], "closed", "closing twice is not an error");
    expect_problem(
        app.post(
            &format!("/v1/campaigns/{id}/replenish"),
            OPERATOR_TOKEN,
            None,
            &json!({"quantity": 5}),
        )
        .await,
        StatusCode::CONFLICT,
        "campaign_closed",
    )
    .await;
}

async fn a_campaign_refers_to_a_store_that_exists(app: TestApp) {
    let now = chrono::Utc::now();
    let body = json!({
        "store_id": ulid::Ulid::new().to_string(), "sku": "IPA", "title": "IPA", "price_cents": 100,
        "quota": 1, "per_user_limit": 1, "starts_at": now, "ends_at": now + chrono::Duration::hours(1),
        "payment_timeout_seconds": 60,
    });
    expect_problem(
        app.post("/v1/campaigns", OPERATOR_TOKEN, None, &body).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "store_not_found",
    )
    .await;
}

async fn campaign_terms_outside_the_limits_are_refused_with_the_field(app: TestApp) {
    let store = app.create_store().await;
    let now = chrono::Utc::now();
    let base = json!({
        "store_id": store["store_id"], "sku": "IPA", "title": "IPA", "price_cents": 100,
        "quota": 10, "per_user_limit": 1, "starts_at": now, "ends_at": now + chrono::Duration::hours(1),
        "payment_timeout_seconds": 60,
    });
    for (field, value, code, mentions) in [
        ("quota", json!(0), "invalid_input", "quota"),
        ("price_cents", json!(0), "invalid_input", "price_cents"),
        (
            "per_user_limit",
            json!(0),
            "invalid_input",
            "per_user_limit",
        ),
        (
            "ends_at",
            json!(now - chrono::Duration::hours(1)),
            "invalid_input",
            "ends_at",
        ),
        (
            "payment_timeout_seconds",
            json!(0),
            "invalid_input",
            "payment_timeout_seconds",
        ),
        ("quota", json!(-1), "invalid_body", "u32"),
        ("quota", json!(1.5), "invalid_body", "u32"),
        ("price_cents", json!("12"), "invalid_body", "u64"),
        ("starts_at", json!("tomorrow"), "invalid_body", "input"),
        ("sku", json!(""), "invalid_input", "sku"),
    ] {
        let mut body = base.clone();
        body[field] = value;
        let problem = expect_problem(
            app.post("/v1/campaigns", OPERATOR_TOKEN, None, &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
        )
        .await;
        assert!(
            problem["detail"].as_str().unwrap().contains(mentions),
            "{field}: {problem}"
        );
    }
}

async fn an_unknown_campaign_is_not_found(app: TestApp) {
    let missing = ulid::Ulid::new();
    for path in [
        format!("/v1/campaigns/{missing}"),
        "/v1/campaigns/not-an-id".to_owned(),
    ] {
        expect_problem(
            app.get(&path, OPERATOR_TOKEN).await,
            StatusCode::NOT_FOUND,
            "campaign_not_found",
        )
        .await;
    }
    expect_problem(
        app.post(
            &format!("/v1/campaigns/{missing}/replenish"),
            OPERATOR_TOKEN,
            None,
            &json!({"quantity": 1}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "campaign_not_found",
    )
    .await;
}

async fn a_replayed_registration_returns_the_same_token(app: TestApp) {
    let ada = json!({"name": "Ada"});
    let register = || app.post("/v1/users", OPERATOR_TOKEN, Some("register-ada"), &ada);
    let first = register().await;
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first = expect_json(first, StatusCode::CREATED).await;
    let second = register().await;
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    assert_eq!(expect_json(second, StatusCode::CREATED).await, first);
    if let Some(db) = &app.db {
        // The token is nowhere in the database, not even in the stored idempotent response.
        let token = first["token"].as_str().unwrap();
        let hits: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM events WHERE data::text LIKE '%' || $1 || '%') + \
             (SELECT count(*) FROM idempotency_keys WHERE position(convert_to($1, 'UTF8') in response_body) > 0)",
        )
        .bind(token)
        .fetch_one(db.log().pool())
        .await
        .unwrap();
        assert_eq!(hits, 0);
    }
}

async fn readiness_and_liveness_answer(app: TestApp) {
    let live = app
        .send(reqwest::Method::GET, "/healthz", None, None, None)
        .await;
    assert_eq!(expect_json(live, StatusCode::OK).await["status"], "ok");
    let ready = app
        .send(reqwest::Method::GET, "/readyz", None, None, None)
        .await;
    let ready = expect_json(ready, StatusCode::OK).await;
    assert_eq!(ready["checks"]["event_log"], "up");
    assert_eq!(ready["checks"]["bus"], "up");
    assert!(["leader", "standby"].contains(&ready["relay"]["role"].as_str().unwrap()));
}
