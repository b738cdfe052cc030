//! The operator reads the log: any stream page by page, and one order's whole history.

use harness::{expect_json, expect_problem, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::Value;

use crate::order_saga::{campaign, pay, place};

on_both_backends!(
    an_order_s_history_tells_its_whole_story_in_log_order,
    a_stream_reads_page_by_page
);

async fn an_order_s_history_tells_its_whole_story_in_log_order(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let sale = campaign(&app, 10, 3, 600).await;
    // Another order of the same customer: its reservation shares her holding's stream.
    let other = place(&app, &ada, &sale, 1).await;
    app.wait_for_status(
        &ada,
        other["order_id"].as_str().unwrap(),
        "awaiting_payment",
    )
    .await;
    let order = place(&app, &ada, &sale, 2).await;
    let id = order["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, id, "awaiting_payment").await;
    pay(&app, &ada, &awaiting).await;

    let path = format!("/v1/admin/orders/{id}/history");
    let history = app.operator_get(&path).await;
    let events = history["events"].as_array().unwrap();
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "OrderPlaced",
            "OrderAwaitingPayment",
            "UnitsReserved",
            "PaymentSucceeded",
            "OrderConfirmed",
            "UnitsSold"
        ],
        "{history}"
    );
    let positions: Vec<u64> = events
        .iter()
        .map(|e| e["global_position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    // The order's and its payment's streams, and of the shared holding only what is its.
    let own = [format!("order-{id}"), format!("payment-{id}")];
    assert!(
        events
            .iter()
            .all(|e| own.iter().any(|s| e["stream_id"] == *s) || e["data"]["order_id"] == id),
        "{history}"
    );
    // Who did what: the customer placed it, the provider paid, the saga did the rest.
    let actors: Vec<&str> = events
        .iter()
        .map(|e| e["metadata"]["actor"].as_str().unwrap_or(""))
        .collect();
    assert!(actors[0].starts_with("user:"), "{actors:?}");
    assert_eq!(
        actors.iter().filter(|a| **a == "saga:order").count(),
        4,
        "{actors:?}"
    );

    // Only the operator reads it, and an order that does not exist has none.
    let refused = app.get(&path, &ada).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let unknown = format!("/v1/admin/orders/{}/history", ulid::Ulid::new());
    expect_problem(
        app.get(&unknown, OPERATOR_TOKEN).await,
        StatusCode::NOT_FOUND,
        "order_not_found",
    )
    .await;
}

async fn a_stream_reads_page_by_page(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let sale = campaign(&app, 10, 3, 600).await;
    let order = place(&app, &ada, &sale, 1).await;
    let id = order["order_id"].as_str().unwrap();
    app.wait_for_status(&ada, id, "awaiting_payment").await;
    assert_eq!(app.cancel(&ada, id).await.status(), StatusCode::ACCEPTED);
    app.wait_for_status(&ada, id, "cancelled").await;

    let page = |from: u64| {
        let app = &app;
        async move {
            let path = format!("/v1/admin/streams/order-{id}/events?from_version={from}&limit=2");
            app.operator_get(&path).await
        }
    };
    let first = page(1).await;
    let versions = |page: &Value| -> Vec<u64> {
        page["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["stream_version"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(versions(&first), [1, 2], "{first}");
    assert_eq!(first["next_from_version"], 3);
    assert_eq!(first["events"][0]["event_type"], "OrderPlaced");
    let second = page(3).await;
    assert_eq!(versions(&second), [3], "{second}");
    assert_eq!(second["next_from_version"], Value::Null);
    assert_eq!(second["events"][0]["event_type"], "OrderCancelled");

    for bad in ["from_version=0", "limit=0", "limit=1001", "after=3"] {
        let path = format!("/v1/admin/streams/order-{id}/events?{bad}");
        expect_problem(
            app.get(&path, OPERATOR_TOKEN).await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        )
        .await;
    }
    for missing in [
        format!("order-{}", ulid::Ulid::new()),
        "nonsense".into(),
        "Order-x".into(),
    ] {
        let path = format!("/v1/admin/streams/{missing}/events");
        expect_problem(
            app.get(&path, OPERATOR_TOKEN).await,
            StatusCode::NOT_FOUND,
            "stream_not_found",
        )
        .await;
    }
}

#[tokio::test]
async fn the_cli_prints_a_stream_and_an_order_s_history() {
    use gateway::cli::{event_lines, EventsArgs};
    let app = harness::spawn_app(harness::Backend::Postgres).await;
    let (_, ada) = app.create_user("Ada").await;
    let sale = campaign(&app, 10, 3, 600).await;
    let order = place(&app, &ada, &sale, 1).await;
    let id = order["order_id"].as_str().unwrap();
    app.wait_for_status(&ada, id, "awaiting_payment").await;
    assert_eq!(app.cancel(&ada, id).await.status(), StatusCode::ACCEPTED);
    app.wait_for_status(&ada, id, "cancelled").await;
    let log = app.db.as_ref().unwrap().log();
    let args = |stream: Option<String>, order: Option<&str>, json: bool| EventsArgs {
        stream_id: stream,
        order: order.map(str::to_owned),
        from_version: 2,
        limit: 1_000,
        json,
        database_url: String::new(),
    };

    let lines = event_lines(&*log, &args(Some(format!("order-{id}")), None, false))
        .await
        .unwrap();
    assert_eq!(lines.len(), 2, "from version 2: {lines:?}");
    assert!(lines[0].contains(&format!("order-{id} v2")), "{lines:?}");
    assert!(
        lines[1].contains("OrderCancelled") && lines[1].contains("user:"),
        "{lines:?}"
    );

    let history = event_lines(&*log, &args(None, Some(id), true))
        .await
        .unwrap();
    let types: Vec<String> = history
        .iter()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["event_type"].to_string())
        .collect();
    assert_eq!(types.first().map(String::as_str), Some("\"OrderPlaced\""));
    assert!(types.iter().any(|t| t == "\"UnitsReleased\""), "{types:?}");

    let unknown = event_lines(
        &*log,
        &args(None, Some(&ulid::Ulid::new().to_string()), false),
    )
    .await;
    assert!(unknown
        .unwrap_err()
        .to_string()
        .contains("the log has no order"));
}

on_both_backends!(a_campaign_is_told_as_it_stood_at_any_point_of_the_log);

async fn a_campaign_is_told_as_it_stood_at_any_point_of_the_log(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let sale = campaign(&app, 10, 3, 600).await;
    let campaign_id = sale["campaign_id"].as_str().unwrap();
    let created = app
        .operator_get(&format!("/v1/admin/streams/campaign-{campaign_id}/events"))
        .await;
    let created_at = created["events"][0]["global_position"].as_u64().unwrap();
    let order = place(&app, &ada, &sale, 2).await;
    app.wait_for_status(
        &ada,
        order["order_id"].as_str().unwrap(),
        "awaiting_payment",
    )
    .await;

    let as_of = |at: String| {
        let app = &app;
        async move {
            let path = format!("/v1/admin/campaigns/{campaign_id}?as_of={at}");
            app.get(&path, OPERATOR_TOKEN).await
        }
    };
    let then = expect_json(as_of(created_at.to_string()).await, StatusCode::OK).await;
    assert_eq!(then["global_position"], created_at);
    assert_eq!(
        then["campaign"]["stock"],
        serde_json::json!({"total": 10, "available": 10, "reserved": 0, "sold": 0}),
        "{then}"
    );
    let now = app
        .operator_get(&format!("/v1/admin/campaigns/{campaign_id}"))
        .await;
    assert_eq!(
        now["campaign"]["stock"],
        serde_json::json!({"total": 10, "available": 8, "reserved": 2, "sold": 0}),
        "{now}"
    );
    assert_eq!(now["campaign"]["title"], sale["title"]);
    let by_time = now["recorded_at"].as_str().unwrap().replace('+', "%2B");
    let same = expect_json(as_of(by_time).await, StatusCode::OK).await;
    assert_eq!(same["campaign"]["stock"], now["campaign"]["stock"]);

    let before = as_of("2000-01-01T00:00:00Z".into()).await;
    expect_problem(before, StatusCode::NOT_FOUND, "campaign_not_found").await;
    let nonsense = as_of("yesterday".into()).await;
    expect_problem(nonsense, StatusCode::BAD_REQUEST, "invalid_query").await;
    let refused = app
        .get(&format!("/v1/admin/campaigns/{campaign_id}"), &ada)
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
}
