//! Orders through the HTTP API: placing, reading, listing, cancelling, and Idempotency-Key.

use harness::{expect_json, expect_problem, spawn_app, Backend, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

on_both_backends!(
    a_customer_places_an_order_that_is_pending_with_its_amount,
    the_same_key_and_body_replays_the_first_answer,
    the_same_key_with_another_body_is_refused,
    an_order_needs_an_idempotency_key_a_customer_and_a_campaign,
    customers_see_only_their_own_orders,
    orders_are_listed_newest_first_in_pages,
    the_owner_cancels_an_order_once,
);

async fn place(
    app: &TestApp,
    token: &str,
    campaign: &Value,
    quantity: u32,
    key: &str,
) -> reqwest::Response {
    app.post(
        "/v1/orders",
        token,
        Some(key),
        &json!({"campaign_id": campaign["campaign_id"], "quantity": quantity}),
    )
    .await
}

async fn a_customer_places_an_order_that_is_pending_with_its_amount(app: TestApp) {
    let (user_id, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    let response = place(&app, &token, &campaign, 2, "order-1").await;
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let order = expect_json(response, StatusCode::ACCEPTED).await;
    assert_eq!(
        location,
        format!("/v1/orders/{}", order["order_id"].as_str().unwrap())
    );
    assert_eq!(order["status"], "pending");
    assert_eq!(order["reason"], Value::Null);
    assert_eq!(order["payment"], Value::Null);
    assert_eq!(order["amount_cents"], 2500);
    assert_eq!(order["user_id"], user_id.as_str());
    assert_eq!(order["quantity"], 2);
    // The saga reserves the units and asks for payment; the order waits for the provider.
    let id = order["order_id"].as_str().unwrap();
    let read = app.wait_for_status(&token, id, "awaiting_payment").await;
    for field in [
        "order_id",
        "user_id",
        "campaign_id",
        "quantity",
        "amount_cents",
        "created_at",
    ] {
        assert_eq!(read[field], order[field], "{field}");
    }
    assert_eq!(read["payment"]["payment_id"], order["order_id"]);
    assert_eq!(read["payment"]["status"], "pending");
    assert_eq!(read["payment"]["amount_cents"], 2500);
}

async fn the_same_key_and_body_replays_the_first_answer(app: TestApp) {
    let (_, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    let first = place(&app, &token, &campaign, 1, "same-key").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first_location = first.headers()["location"].clone();
    let first_body = first.bytes().await.unwrap();
    let again = place(&app, &token, &campaign, 1, "same-key").await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], first_location);
    // Byte for byte, though the log keeps a placement's key in its event and makes the
    // answer again from it.
    assert_eq!(again.bytes().await.unwrap(), first_body);
    let first: Value = serde_json::from_slice(&first_body).unwrap();
    let orders = expect_json(app.get("/v1/orders", &token).await, StatusCode::OK).await;
    assert_eq!(
        orders["items"].as_array().unwrap().len(),
        1,
        "one order, not two"
    );

    // Keys are scoped per caller: another customer's identical key is a new order.
    let (_, other) = app.create_user("Bob").await;
    let theirs = expect_json(
        place(&app, &other, &campaign, 1, "same-key").await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_ne!(theirs["order_id"], first["order_id"]);
}

async fn the_same_key_with_another_body_is_refused(app: TestApp) {
    let (_, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    expect_json(
        place(&app, &token, &campaign, 1, "k").await,
        StatusCode::ACCEPTED,
    )
    .await;
    expect_problem(
        place(&app, &token, &campaign, 2, "k").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
}

async fn an_order_needs_an_idempotency_key_a_customer_and_a_campaign(app: TestApp) {
    let (_, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    let body = json!({"campaign_id": campaign["campaign_id"], "quantity": 1});
    expect_problem(
        app.post("/v1/orders", &token, None, &body).await,
        StatusCode::BAD_REQUEST,
        "idempotency_key_required",
    )
    .await;
    expect_problem(
        app.post("/v1/orders", OPERATOR_TOKEN, Some("op"), &body)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let unknown = json!({"campaign_id": ulid::Ulid::new().to_string(), "quantity": 1});
    expect_problem(
        app.post("/v1/orders", &token, Some("u"), &unknown).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "campaign_not_found",
    )
    .await;
    for (quantity, code) in [
        (json!(0), "invalid_input"),
        (json!(-3), "invalid_body"),
        (json!(100_000), "invalid_input"),
    ] {
        let body = json!({"campaign_id": campaign["campaign_id"], "quantity": quantity});
        let key = format!("q{quantity}");
        expect_problem(
            app.post("/v1/orders", &token, Some(&key), &body).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            code,
        )
        .await;
    }
}

async fn customers_see_only_their_own_orders(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    let campaign = app.create_campaign(10, 3).await;
    let order = expect_json(
        place(&app, &ada, &campaign, 1, "a").await,
        StatusCode::ACCEPTED,
    )
    .await;
    let path = format!("/v1/orders/{}", order["order_id"].as_str().unwrap());
    expect_problem(
        app.get(&path, &bob).await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
    // The operator sees every order, once the read model shows it.
    app.get_until(&path, OPERATOR_TOKEN, |_| true).await;
    let bobs = expect_json(app.get("/v1/orders", &bob).await, StatusCode::OK).await;
    assert_eq!(bobs, json!({"items": [], "next_cursor": null}));
    expect_problem(
        app.get(&format!("/v1/orders/{}", ulid::Ulid::new()), &ada)
            .await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
}

async fn orders_are_listed_newest_first_in_pages(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    let first_campaign = app.create_campaign(100, 50).await;
    let second_campaign = app.create_campaign(100, 50).await;
    let mut placed = Vec::new();
    for i in 0..5 {
        let order = expect_json(
            place(&app, &ada, &first_campaign, 1, &format!("a{i}")).await,
            StatusCode::ACCEPTED,
        )
        .await;
        placed.push(order["order_id"].as_str().unwrap().to_owned());
    }
    expect_json(
        place(&app, &bob, &second_campaign, 1, "b").await,
        StatusCode::ACCEPTED,
    )
    .await;
    placed.reverse();

    let mut seen = Vec::new();
    let mut path = "/v1/orders?limit=2".to_owned();
    loop {
        let page = expect_json(app.get(&path, &ada).await, StatusCode::OK).await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(
            items
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/orders?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, placed);

    // The operator sees every customer's orders, once the read model shows them.
    app.get_until("/v1/orders?limit=200", OPERATOR_TOKEN, |all| {
        all["items"].as_array().unwrap().len() == 6
    })
    .await;
    let second = format!(
        "/v1/orders?campaign_id={}",
        second_campaign["campaign_id"].as_str().unwrap()
    );
    let of_second = app.operator_get(&second).await;
    assert_eq!(of_second["items"].as_array().unwrap().len(), 1);
    // The saga reserves each order and asks for payment; nobody pays in this test.
    for order_id in &placed {
        app.wait_for_status(&ada, order_id, "awaiting_payment")
            .await;
    }
    let awaiting = expect_json(
        app.get("/v1/orders?status=awaiting_payment", &ada).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(awaiting["items"].as_array().unwrap().len(), 5);
    let confirmed = expect_json(
        app.get("/v1/orders?status=confirmed", &ada).await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(confirmed["items"], json!([]));

    for (query, code) in [
        ("limit=0", "invalid_query"),
        ("limit=201", "invalid_query"),
        ("limit=x", "invalid_query"),
        ("cursor=zzz", "invalid_cursor"),
        ("status=lost", "invalid_query"),
    ] {
        expect_problem(
            app.get(&format!("/v1/orders?{query}"), &ada).await,
            StatusCode::BAD_REQUEST,
            code,
        )
        .await;
    }
}

async fn the_owner_cancels_an_order_once(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    let campaign = app.create_campaign(10, 3).await;
    let order = expect_json(
        place(&app, &ada, &campaign, 1, "a").await,
        StatusCode::ACCEPTED,
    )
    .await;
    let cancel = format!("/v1/orders/{}/cancel", order["order_id"].as_str().unwrap());
    let post = |token: &str| {
        let (app, cancel, token) = (&app, cancel.clone(), token.to_owned());
        async move {
            app.send(reqwest::Method::POST, &cancel, Some(&token), None, None)
                .await
        }
    };
    expect_problem(post(&bob).await, StatusCode::NOT_FOUND, "order_not_found").await;
    expect_problem(
        post(OPERATOR_TOKEN).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let cancelled = expect_json(post(&ada).await, StatusCode::ACCEPTED).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["reason"], "customer");
    expect_problem(
        post(&ada).await,
        StatusCode::CONFLICT,
        "order_already_final",
    )
    .await;
    let read = expect_json(
        app.get(
            &format!("/v1/orders/{}", order["order_id"].as_str().unwrap()),
            &ada,
        )
        .await,
        StatusCode::OK,
    )
    .await;
    assert_eq!(read["status"], "cancelled");
}

#[tokio::test]
async fn the_same_key_sent_many_times_at_once_places_one_order() {
    for backend in [Backend::Embedded, Backend::Postgres] {
        let app = spawn_app(backend).await;
        let (_, token) = app.create_user("Ada").await;
        let campaign = app.create_campaign(10, 3).await;
        let body = json!({"campaign_id": campaign["campaign_id"], "quantity": 1});
        let answers = futures::future::join_all(
            (0..12).map(|_| app.post("/v1/orders", &token, Some("same-key"), &body)),
        )
        .await;
        // Each answer is the order (first or replayed) or, while the first still runs on
        // this instance, 409 idempotency_key_in_use; never a second order.
        let mut orders = std::collections::HashSet::new();
        for answer in answers {
            match answer.status() {
                StatusCode::ACCEPTED => {
                    let order: Value = answer.json().await.unwrap();
                    orders.insert(order["order_id"].as_str().unwrap().to_owned());
                }
                StatusCode::CONFLICT => {
                    assert_eq!(answer.headers()["retry-after"], "1");
                    let problem: Value = answer.json().await.unwrap();
                    assert_eq!(problem["code"], "idempotency_key_in_use");
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(orders.len(), 1, "{orders:?}");
        let listed = expect_json(app.get("/v1/orders", &token).await, StatusCode::OK).await;
        assert_eq!(listed["items"].as_array().unwrap().len(), 1);
        // Once it has finished, the key replays the order.
        let again = app
            .post("/v1/orders", &token, Some("same-key"), &body)
            .await;
        assert_eq!(again.status(), StatusCode::ACCEPTED);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        let again: Value = again.json().await.unwrap();
        assert!(orders.contains(again["order_id"].as_str().unwrap()));
    }
}

#[tokio::test]
async fn requests_that_are_refused_append_nothing() {
    let app = spawn_app(Backend::Postgres).await;
    let (_, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    let before = app.event_count().await;
    let refused = [
        app.post(
            "/v1/orders",
            &token,
            Some("1"),
            &json!({"campaign_id": campaign["campaign_id"], "quantity": 0}),
        )
        .await,
        app.post(
            "/v1/orders",
            &token,
            Some("2"),
            &json!({"campaign_id": "nope", "quantity": 1}),
        )
        .await,
        app.post(
            "/v1/orders",
            &token,
            None,
            &json!({"campaign_id": campaign["campaign_id"], "quantity": 1}),
        )
        .await,
        app.post(
            "/v1/stores",
            OPERATOR_TOKEN,
            None,
            &json!({"name": "", "region": "x"}),
        )
        .await,
        app.post(
            "/v1/stores",
            &token,
            None,
            &json!({"name": "x", "region": "x"}),
        )
        .await,
        app.post(
            "/v1/users",
            OPERATOR_TOKEN,
            None,
            &json!({"name": "x", "admin": true}),
        )
        .await,
    ];
    for response in refused {
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    assert_eq!(app.event_count().await, before);
}

#[tokio::test]
async fn the_callers_trace_id_and_idempotency_key_reach_the_event_metadata() {
    let app = spawn_app(Backend::Postgres).await;
    let (user_id, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .client
        .post(format!("{}/v1/orders", app.address))
        .bearer_auth(&token)
        .header("Idempotency-Key", "traced")
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"campaign_id": campaign["campaign_id"], "quantity": 1}))
        .send()
        .await
        .unwrap();
    let order = expect_json(response, StatusCode::ACCEPTED).await;
    let stream = format!("order-{}", order["order_id"].as_str().unwrap());
    let metadata: Value = sqlx::query_scalar("SELECT metadata FROM events WHERE stream_id = $1")
        .bind(&stream)
        .fetch_one(app.db.as_ref().unwrap().log().pool())
        .await
        .unwrap();
    assert_eq!(metadata["trace_id"], trace_id);
    // Without an exporter the request continues the caller's trace from a span of its own.
    let span_id = metadata["span_id"].as_str().expect("the recording span");
    assert!(
        span_id.len() == 16 && span_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{span_id}"
    );
    assert_ne!(
        span_id, "00f067aa0ba902b7",
        "the caller's span is the parent, not this one"
    );
    assert_eq!(metadata["idempotency_key"], "traced");
    assert_eq!(metadata["actor"], format!("user:{user_id}"));
}

#[tokio::test]
async fn a_key_whose_batch_failed_runs_again_and_places_one_order() {
    let app = spawn_app(Backend::Postgres).await;
    let (_, token) = app.create_user("Ada").await;
    let campaign = app.create_campaign(10, 3).await;
    let body = json!({"campaign_id": campaign["campaign_id"], "quantity": 1});
    let pool = app.db.as_ref().unwrap().log().pool().clone();
    // The database refuses every new event for a moment: the group commit's transaction fails
    // as a whole.
    sqlx::query("ALTER TABLE events ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
        .execute(&pool)
        .await
        .unwrap();
    let failed = app.post("/v1/orders", &token, Some("retried"), &body).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(failed.headers().contains_key("retry-after"));
    sqlx::query("ALTER TABLE events DROP CONSTRAINT refuse_all")
        .execute(&pool)
        .await
        .unwrap();
    // Nothing of the failed batch was stored, the key included: the retry places the order.
    let placed = app.post("/v1/orders", &token, Some("retried"), &body).await;
    assert_eq!(placed.status(), StatusCode::ACCEPTED);
    assert!(!placed.headers().contains_key("idempotent-replayed"));
    let placed: Value = placed.json().await.unwrap();
    let again = app.post("/v1/orders", &token, Some("retried"), &body).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["order_id"], placed["order_id"]);
    let listed = expect_json(app.get("/v1/orders", &token).await, StatusCode::OK).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
}
