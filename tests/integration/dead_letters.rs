//! The operator lists, reads, replays and discards what consumers gave up on, the same on
//! JetStream and on the embedded bus.

use bytes::Bytes;
use commands::bus::Letter;
use harness::{expect_json, expect_problem, TestApp, OPERATOR_TOKEN};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::order_saga::{campaign, place};

on_both_backends!(
    dead_letters_are_listed_read_replayed_and_discarded,
    a_letter_that_cannot_be_replayed_stays
);

/// Stores a dead letter of `consumer` with `payload`, as a consumer giving up would.
pub(crate) async fn plant(app: &TestApp, consumer: &str, payload: Vec<u8>, reason: &str) {
    let letter = Letter {
        subject: "events.log",
        event: None,
        payload: Bytes::from(payload),
    };
    let bus = app.bus.as_ref().expect("an application of this process");
    bus.dead_letter(consumer, letter, reason).await.unwrap();
}

/// Asks for the letter at `path` to be replayed.
async fn replay(app: &TestApp, path: &str) -> reqwest::Response {
    let path = format!("{path}/replay");
    app.send(Method::POST, &path, Some(OPERATOR_TOKEN), None, None)
        .await
}

/// The envelope of `order_id`'s `OrderPlaced`, as the bus carries it.
pub(crate) async fn order_placed(app: &TestApp, order_id: &str) -> Value {
    let path = format!("/v1/admin/streams/order-{order_id}/events");
    let page = app.operator_get(&path).await;
    page["events"][0].clone()
}

/// An order of Ada's awaiting payment: her user id and token, its id and its `OrderPlaced`
/// envelope.
async fn awaiting_order(app: &TestApp) -> (String, String, String, Value) {
    let (customer, ada) = app.create_user("Ada").await;
    let sale = campaign(app, 10, 3, 600).await;
    let order = place(app, &ada, &sale, 1).await;
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    app.wait_for_status(&ada, &order_id, "awaiting_payment")
        .await;
    let placed = order_placed(app, &order_id).await;
    (customer, ada, order_id, placed)
}

async fn dead_letters_are_listed_read_replayed_and_discarded(app: TestApp) {
    let (_, ada, order_id, placed) = awaiting_order(&app).await;
    assert_eq!(placed["event_type"], "OrderPlaced");

    let empty = app.operator_get("/v1/admin/dead-letters").await;
    assert_eq!(empty["dead_letters"], Value::Array(vec![]), "{empty}");
    let one_event = serde_json::to_vec(&placed).unwrap();
    plant(&app, "order-saga", one_event.clone(), "timed out").await;
    plant(&app, "projection-orders", one_event, "Redis went away").await;
    plant(&app, "order-saga", b"{not json".to_vec(), "not a batch").await;

    // Paged, oldest first.
    let first = app.operator_get("/v1/admin/dead-letters?limit=2").await;
    let letters = first["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{first}");
    assert_eq!(letters[0]["consumer"], "order-saga");
    assert_eq!(letters[0]["reason"], "timed out");
    assert_eq!(letters[0]["events"][0]["event_id"], placed["event_id"]);
    assert_eq!(letters[1]["consumer"], "projection-orders");
    let after = first["next_after"].as_u64().expect("a next page");
    let rest = app
        .operator_get(&format!("/v1/admin/dead-letters?after={after}"))
        .await;
    let poison = &rest["dead_letters"][0];
    assert_eq!(poison["body"], "{not json", "{rest}");
    assert_eq!(poison["events"], Value::Null);
    assert_eq!(rest["next_after"], Value::Null);

    // One letter, read whole.
    let saga_letter = letters[0]["id"].as_u64().unwrap();
    let shown = app
        .operator_get(&format!("/v1/admin/dead-letters/{saga_letter}"))
        .await;
    assert_eq!(shown["events"][0]["data"], placed["data"]);

    // Handed back to their consumers: the saga and the orders projection take their
    // events again (both have acted on them already, so nothing changes) and the letters go.
    for letter in letters {
        let id = letter["id"].as_u64().unwrap();
        let path = format!("/v1/admin/dead-letters/{id}");
        let replayed = expect_json(replay(&app, &path).await, StatusCode::OK).await;
        assert_eq!(replayed["consumer"], letter["consumer"]);
        assert_eq!(replayed["events"], 1);
        let gone = app.get(&path, OPERATOR_TOKEN).await;
        expect_problem(gone, StatusCode::NOT_FOUND, "dead_letter_not_found").await;
    }
    let order_now = app
        .wait_for_status(&ada, &order_id, "awaiting_payment")
        .await;
    assert_eq!(order_now["quantity"], 1);

    // The poison message cannot be replayed; it is discarded instead.
    let poison_id = poison["id"].as_u64().unwrap();
    let path = format!("/v1/admin/dead-letters/{poison_id}");
    let replay = replay(&app, &path).await;
    expect_problem(
        replay,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unreadable_dead_letter",
    )
    .await;
    let discarded = app
        .send(Method::DELETE, &path, Some(OPERATOR_TOKEN), None, None)
        .await;
    assert_eq!(discarded.status(), StatusCode::NO_CONTENT);
    let again = app
        .send(Method::DELETE, &path, Some(OPERATOR_TOKEN), None, None)
        .await;
    expect_problem(again, StatusCode::NOT_FOUND, "dead_letter_not_found").await;
    let none = app.operator_get("/v1/admin/dead-letters").await;
    assert_eq!(none["dead_letters"], Value::Array(vec![]), "{none}");
}

async fn a_letter_that_cannot_be_replayed_stays(app: TestApp) {
    let (customer, ada, _, placed) = awaiting_order(&app).await;

    // A consumer this deployment does not have.
    plant(
        &app,
        "projection-gone",
        serde_json::to_vec(&placed).unwrap(),
        "x",
    )
    .await;
    let letters = app.operator_get("/v1/admin/dead-letters").await;
    let id = letters["dead_letters"][0]["id"].as_u64().unwrap();
    let path = format!("/v1/admin/dead-letters/{id}");
    let replay = replay(&app, &path).await;
    expect_problem(replay, StatusCode::CONFLICT, "unknown_consumer").await;
    app.operator_get(&path).await;

    // Only the operator sees them; ids that name no letter are not found.
    let forbidden = app.get("/v1/admin/dead-letters", &ada).await;
    assert_eq!(forbidden.status(), StatusCode::FORBIDDEN, "{customer}");
    for bad in ["0", "x", "-1", "+1", "99999999999999999999"] {
        let response = app
            .get(&format!("/v1/admin/dead-letters/{bad}"), OPERATOR_TOKEN)
            .await;
        expect_problem(response, StatusCode::NOT_FOUND, "dead_letter_not_found").await;
    }
    let bad_page = app
        .get("/v1/admin/dead-letters?limit=0", OPERATOR_TOKEN)
        .await;
    expect_problem(bad_page, StatusCode::BAD_REQUEST, "invalid_query").await;
}

on_both_backends!(the_command_line_reaches_dead_letters_through_the_api);

async fn the_command_line_reaches_dead_letters_through_the_api(app: TestApp) {
    use clap::Parser;
    use gateway::cli::{Cli, Command};
    let run = |args: &[&str]| {
        let argv = [
            "groupbuy",
            "dead-letters",
            "--base-url",
            &app.address,
            "--operator-token",
            OPERATOR_TOKEN,
        ]
        .into_iter()
        .chain(args.iter().copied());
        let Command::DeadLetters(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!("parsed dead-letters")
        };
        gateway::dead_letters_cli::command(args)
    };
    assert_eq!(run(&["list"]).await.unwrap(), "no dead letters\n");
    plant(&app, "order-saga", b"{not json".to_vec(), "not a batch").await;
    let listed = run(&["list"]).await.unwrap();
    assert!(
        listed.contains("order-saga")
            && listed.contains("(unreadable body)")
            && listed.contains("not a batch"),
        "{listed}"
    );
    let id = listed.split_whitespace().next().unwrap().to_owned();
    let shown = run(&["show", &id]).await.unwrap();
    assert!(shown.contains("\"body\": \"{not json\""), "{shown}");
    let refused = run(&["replay", &id]).await.unwrap_err().to_string();
    assert!(refused.starts_with("422"), "{refused}");
    assert_eq!(
        run(&["discard", &id]).await.unwrap(),
        format!("discarded dead letter {id}\n")
    );
    let gone = run(&["show", &id]).await.unwrap_err().to_string();
    assert!(gone.contains("404") && gone.contains("not found"), "{gone}");
}
