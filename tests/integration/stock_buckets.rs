//! A campaign's stock over several buckets, sold by the writers of several instances at once:
//! never oversold, never over a customer's limit, and no unit left in a bucket while orders are
//! turned away. Directly against both logs, and through the API with two instances.

use std::collections::HashMap;
use std::sync::Arc;

use commands::handler::{Context, HandlerOptions};
use commands::subscription::Handler;
use commands::{stream_id, CommandHandler, EventLog};
use domain::campaign::{Campaign, CampaignAggregate, CampaignCommand, NewCampaign};
use domain::holding::{HoldingAggregate, ReservationState};
use domain::order::{OrderAggregate, OrderCommand};
use domain::{Aggregate, CampaignId, Cents, OrderId, StoreId, UserId};
use gateway::app::{Mirror, ReadModels, Storage};
use harness::{expect_json, spawn_app_tuned, Backend, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use sagas::campaign_writer::{
    other_buckets, CampaignWriter, OrderState, WakeUp, Woken, WriterOptions,
};
use sagas::deadlines::MemoryDeadlines;
use sagas::order_saga::OrderSaga;
use sagas::payments::External;
use schemas::{Envelope, Metadata};
use serde_json::{json, Value};
use ulid::Ulid;

on_both_logs!(
    writers_of_two_instances_sell_exactly_the_quota_across_buckets,
    one_batch_takes_from_another_bucket_as_often_as_its_orders_need,
    writers_that_drew_the_same_home_bucket_part_after_conflicting,
);

const QUOTA: u32 = 50;
const LIMIT: u32 = 3;
const BUCKETS: u32 = 4;

async fn create_campaign(handler: &CommandHandler) -> CampaignId {
    create_campaign_with(handler, QUOTA, LIMIT, BUCKETS).await
}

/// Opens a campaign (of a new store) straight into the log through `handler`.
pub(crate) async fn create_campaign_with(
    handler: &CommandHandler,
    quota: u32,
    per_user_limit: u32,
    stock_buckets: u32,
) -> CampaignId {
    let now = chrono::Utc::now();
    let campaign_id = CampaignId::from_ulid(Ulid::new());
    let create = CampaignCommand::Create(NewCampaign {
        campaign_id,
        store: Some(domain::store::Store {
            store_id: StoreId::from_ulid(Ulid::new()),
            name: "Corner".into(),
            region: "north".into(),
            created_at: now,
        }),
        sku: "STOUT".into(),
        title: "Stout".into(),
        price_cents: 700,
        quota,
        per_user_limit,
        starts_at: now - chrono::Duration::minutes(1),
        ends_at: now + chrono::Duration::hours(1),
        payment_timeout_seconds: 600,
        stock_buckets,
        now,
    });
    handler
        .execute::<CampaignAggregate>(
            &stream_id::<CampaignAggregate>(campaign_id),
            &create,
            &Context::new(Metadata::default()),
        )
        .await
        .unwrap();
    campaign_id
}

/// Places a one-unit order of `user_id` straight into the log; its `OrderPlaced`.
async fn place(handler: &CommandHandler, campaign_id: CampaignId, user_id: UserId) -> Envelope {
    let order_id = OrderId::from_ulid(Ulid::new());
    let place = OrderCommand::Place {
        order_id,
        user_id,
        campaign_id,
        quantity: 1,
        unit_price_cents: Cents::new(700),
        now: chrono::Utc::now(),
    };
    let stream = stream_id::<OrderAggregate>(order_id);
    let mut context = Context::new(Metadata::default());
    context.new_stream = true;
    handler
        .execute::<OrderAggregate>(&stream, &place, &context)
        .await
        .unwrap();
    let log = handler.log();
    log.read_stream(&stream, 0, 1)
        .await
        .unwrap()
        .remove(0)
        .envelope
}

/// A saga of its own instance, whose writers start from bucket `home`.
fn instance(log: &Arc<dyn EventLog>, home: u32) -> OrderSaga {
    OrderSaga::with_writers(
        CommandHandler::new(Arc::clone(log), HandlerOptions::default()),
        Arc::new(External),
        Arc::new(MemoryDeadlines::new()),
        WriterOptions {
            home_bucket: Some(home),
            ..WriterOptions::default()
        },
    )
}

async fn writers_of_two_instances_sell_exactly_the_quota_across_buckets(log: Arc<dyn EventLog>) {
    let handler = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
    let campaign_id = create_campaign(&handler).await;
    // 40 customers order 4 units each, one at a time: 160 units asked of 50, and each
    // customer asks for more than the limit.
    let customers: Vec<UserId> = (0..40).map(|_| UserId::from_ulid(Ulid::new())).collect();
    let mut placed: Vec<Envelope> = Vec::new();
    for _ in 0..4 {
        for user_id in &customers {
            placed.push(place(&handler, campaign_id, *user_id).await);
        }
    }
    // Neither instance's writer starts in bucket 0, where every unit is: both move units in,
    // and race each other for the same customers' holdings.
    let (first, second) = (instance(&log, 1), instance(&log, 3));
    let (even, odd): (Vec<Envelope>, Vec<Envelope>) = placed
        .chunks(2)
        .map(|pair| (pair[0].clone(), pair[1].clone()))
        .unzip();
    let deliveries = |saga: OrderSaga, events: Vec<Envelope>| async move {
        // Several batches, as a consumer would take them, each retried as the runtime would.
        for batch in events.chunks(16) {
            let batch: Vec<&Envelope> = batch.iter().collect();
            let mut attempts = 0;
            while let Err(error) = saga.handle_batch(&batch).await {
                attempts += 1;
                assert!(attempts < 20, "a batch keeps failing: {error}");
            }
        }
    };
    tokio::join!(deliveries(first, even), deliveries(second, odd));

    // Every unit went to an order, none twice, and nobody holds more than the limit.
    let mut reserved_by: HashMap<UserId, u32> = HashMap::new();
    for user_id in &customers {
        let holding = handler
            .load::<HoldingAggregate>(&stream_id::<HoldingAggregate>(format!(
                "{campaign_id}-{user_id}"
            )))
            .await
            .unwrap()
            .state;
        assert!(holding.live_units <= LIMIT, "{user_id} holds {holding:?}");
        assert!(holding
            .orders
            .values()
            .all(|h| h.state == ReservationState::Reserved));
        reserved_by.insert(*user_id, holding.live_units);
    }
    assert_eq!(
        reserved_by.values().sum::<u32>(),
        QUOTA,
        "sold exactly the quota"
    );
    // No unit was left in a bucket while orders were turned away.
    let campaign: Campaign = handler
        .load::<CampaignAggregate>(&stream_id::<CampaignAggregate>(campaign_id))
        .await
        .unwrap()
        .state
        .unwrap();
    let others = other_buckets(log.as_ref(), &campaign).await.unwrap();
    let stock = campaign.stock(&others);
    assert_eq!(
        (stock.available, stock.reserved, stock.sold),
        (0, QUOTA, 0),
        "{stock:?}"
    );
    // The writers' buckets started empty and bucket 0 sold nothing itself: every unit sold
    // was moved out of bucket 0 into theirs (and maybe on between them).
    let moved = |stream: String, event_type: &'static str| {
        let log = Arc::clone(&log);
        async move {
            log.read_stream(&stream, 0, 1_000)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.envelope.event_type == event_type)
                .map(|e| e.envelope.data["units"].as_u64().unwrap())
                .sum::<u64>()
        }
    };
    let out_of_bucket_0 = moved(
        stream_id::<CampaignAggregate>(campaign_id),
        "StockTransferredOut",
    )
    .await;
    assert_eq!(out_of_bucket_0, u64::from(QUOTA));
    let into_homes = moved(format!("stock-{campaign_id}-1"), "StockTransferredIn").await
        + moved(format!("stock-{campaign_id}-3"), "StockTransferredIn").await;
    assert!(into_homes >= u64::from(QUOTA), "{into_homes}");
    // Every order was decided: awaiting its payment, or rejected.
    let mut statuses: HashMap<String, u32> = HashMap::new();
    for event in &placed {
        let order = handler
            .load::<OrderAggregate>(&event.stream_id)
            .await
            .unwrap()
            .state
            .unwrap();
        *statuses.entry(format!("{:?}", order.status)).or_default() += 1;
    }
    assert_eq!(
        statuses.get("AwaitingPayment"),
        Some(&QUOTA),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.get("Rejected"),
        Some(&(160 - QUOTA)),
        "{statuses:?}"
    );
    // And the audit, which checks the buckets against the holdings after every transaction,
    // finds nothing.
    let report = projections::audit::audit(
        log.as_ref(),
        None,
        &projections::audit::AuditOptions::default(),
        &|_| {},
    )
    .await
    .unwrap();
    assert!(report.ok, "{:?}", report.violations);
}

async fn one_batch_takes_from_another_bucket_as_often_as_its_orders_need(log: Arc<dyn EventLog>) {
    let handler = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
    let campaign_id = create_campaign_with(&handler, 20, 1, 2).await;
    let mut placed = Vec::new();
    for _ in 0..20 {
        placed.push(place(&handler, campaign_id, UserId::from_ulid(Ulid::new())).await);
    }
    // One batch of 20 orders from a writer whose bucket is empty: its first move takes half
    // of the other bucket's 20 units, and the orders after the tenth need more of them.
    let placed: Vec<&Envelope> = placed.iter().collect();
    instance(&log, 1).handle_batch(&placed).await.unwrap();
    let campaign: Campaign = handler
        .load::<CampaignAggregate>(&stream_id::<CampaignAggregate>(campaign_id))
        .await
        .unwrap()
        .state
        .unwrap();
    let others = other_buckets(log.as_ref(), &campaign).await.unwrap();
    let stock = campaign.stock(&others);
    assert_eq!(
        (stock.available, stock.reserved),
        (0, 20),
        "every unit went to an order, none was left behind: {stock:?}"
    );
}

/// Two instances' writers whose homes (a hash of a number each instance drew) are the same
/// bucket conflict on it in every batch, each deciding on the other's last append; the one
/// that conflicts moves home, so after a few batches they append to different buckets.
async fn writers_that_drew_the_same_home_bucket_part_after_conflicting(log: Arc<dyn EventLog>) {
    let handler = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
    let campaign_id = create_campaign_with(&handler, 1_000, 1_000, 2).await;
    let writer = |instance| {
        let handler = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
        CampaignWriter::detached(handler, campaign_id, WriterOptions::default(), instance)
    };
    // 0 and 2 have the same home of two buckets, whatever the campaign's id.
    let (mut first, mut second) = (writer(0), writer(2));
    // A customer each, so that the writers meet only on the stock.
    let customers = [
        UserId::from_ulid(Ulid::new()),
        UserId::from_ulid(Ulid::new()),
    ];
    let mut homes = Vec::new();
    for _ in 0..12 {
        for (writer, user) in [(&mut first, customers[0]), (&mut second, customers[1])] {
            let placed = place(&handler, campaign_id, user).await;
            let event = schemas::from_envelope(&placed).unwrap();
            let order = OrderAggregate::evolve(None, &event).unwrap();
            let mut wake_ups = [WakeUp {
                order_id: order.order_id,
                state: OrderState::placed(order),
                cause: Metadata::default(),
                caused_at: None,
            }];
            let outcomes = writer.decide_batch(&mut wake_ups, &chrono::Utc::now).await;
            assert!(
                matches!(outcomes[..], [Ok(Woken::Waiting { .. })]),
                "{outcomes:?}"
            );
        }
        homes.push((first.home_bucket().unwrap(), second.home_bucket().unwrap()));
    }
    assert_eq!(homes[0].0, homes[0].1, "they started at the same home");
    let (last_first, last_second) = *homes.last().unwrap();
    assert_ne!(last_first, last_second, "they never parted: {homes:?}");
}

/// A second instance of `first`'s deployment: the same database, mirror and read models.
async fn another_instance(first: &TestApp) -> TestApp {
    let db = first.db.as_ref().unwrap();
    let streams = first.streams.as_ref().unwrap();
    let redis = first.redis.as_ref().unwrap();
    spawn_app_tuned(Backend::Embedded, |settings| {
        settings.storage = Storage::Postgres {
            url: db.url.clone(),
            options: commands::log::postgres::PgLogOptions {
                pool_connections_max: 8,
                ..Default::default()
            },
        };
        settings.mirror = Mirror::JetStream(streams.settings.clone());
        settings.read_models = ReadModels::Redis {
            url: redis.url.clone(),
            prefix: redis.prefix.clone(),
        };
        settings.limits.rate_limits = gateway::rate_limit::RateLimits::NONE;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_taking_orders_at_once_sell_exactly_the_quota() {
    let first = spawn_app_tuned(Backend::Postgres, |settings| {
        settings.limits.rate_limits = gateway::rate_limit::RateLimits::NONE;
    })
    .await;
    let second = another_instance(&first).await;
    let store = first.create_store().await;
    let now = chrono::Utc::now();
    let campaign = expect_json(
        first
            .post(
                "/v1/campaigns",
                OPERATOR_TOKEN,
                None,
                &json!({
                    "store_id": store["store_id"], "sku": "LAGER", "title": "Lager",
                    "price_cents": 500, "quota": 30, "per_user_limit": 2,
                    "starts_at": now - chrono::Duration::minutes(1),
                    "ends_at": now + chrono::Duration::hours(1),
                    "payment_timeout_seconds": 600, "stock_buckets": 2,
                }),
            )
            .await,
        StatusCode::CREATED,
    )
    .await;
    let mut customers = Vec::new();
    for i in 0..20 {
        customers.push(first.create_user(&format!("customer {i}")).await.1);
    }
    // Every customer orders four single units at once, two through each instance.
    let body = json!({"campaign_id": campaign["campaign_id"], "quantity": 1});
    let body = &body;
    let mut orders = Vec::new();
    for token in &customers {
        for i in 0..4 {
            let app = if i % 2 == 0 { &first } else { &second };
            orders.push(async move {
                let key = Ulid::new().to_string();
                expect_json(
                    app.post("/v1/orders", token, Some(&key), body).await,
                    StatusCode::ACCEPTED,
                )
                .await
            });
        }
    }
    let placed: Vec<Value> = futures::future::join_all(orders).await;
    assert_eq!(placed.len(), 80);
    // Both instances' sagas decide; wait until the read model shows every order decided.
    let path = format!(
        "/v1/orders?campaign_id={}&limit=200",
        campaign["campaign_id"].as_str().unwrap()
    );
    first
        .get_until(&path, OPERATOR_TOKEN, |page| {
            let items = page["items"].as_array().unwrap();
            items.len() == placed.len() && items.iter().all(|o| o["status"] != "pending")
        })
        .await;
    let mut by_customer: HashMap<String, u32> = HashMap::new();
    let mut awaiting = 0;
    for order in &placed {
        let id = order["order_id"].as_str().unwrap();
        let order = first.operator_get(&format!("/v1/orders/{id}")).await;
        match order["status"].as_str().unwrap() {
            "awaiting_payment" => {
                awaiting += 1;
                *by_customer
                    .entry(order["user_id"].as_str().unwrap().to_owned())
                    .or_default() += 1;
            }
            "rejected" => assert!(
                ["sold_out", "limit_exceeded"].contains(&order["reason"].as_str().unwrap()),
                "{order}"
            ),
            other => panic!("order {id} ended {other}"),
        }
    }
    assert_eq!(awaiting, 30, "every unit reserved, none twice");
    assert!(by_customer.values().all(|n| *n <= 2), "{by_customer:?}");
    let read = first
        .operator_get(&format!(
            "/v1/campaigns/{}",
            campaign["campaign_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        read["stock"],
        json!({"total": 30, "available": 0, "reserved": 30, "sold": 0})
    );
    let report = first.operator_get("/v1/admin/audit").await;
    assert_eq!(report["ok"], true, "{report}");
    drop(second);
}
