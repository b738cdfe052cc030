//! Read models: the store contract (memory, Redis and a Redis Cluster), operator rebuilds, the
//! audit.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::Duration;

use commands::log::{NewEvent, StreamAppend};
use commands::{AppendRequest, EventLog};
use domain::campaign::CampaignEvent;
use domain::order::OrderEvent;
use domain::{CampaignId, OrderId, UserId};
use harness::{expect_json, expect_problem, spawn_app_tuned, Backend, TestApp, OPERATOR_TOKEN};
use projections::ops::{Change, Op};
use projections::redis_store::{Library, FUNCTIONS};
use projections::{ProjectionName, ProjectionStore, ReadModel, RebuildError, VersionStatus};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ulid::Ulid;

// --- the store contract, on memory, on Redis and on a Redis Cluster ---

macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn memory() {
                let store = std::sync::Arc::new(projections::MemoryProjections::unbuilt());
                super::$name(store).await;
            }

            #[tokio::test]
            async fn redis() {
                let redis = harness::TestRedis::new();
                super::$name(std::sync::Arc::new(redis.connect().await)).await;
            }

            #[tokio::test]
            async fn redis_cluster() {
                let cluster = harness::servers::OwnRedis::cluster(3).await;
                let redis = harness::TestRedis::on(&cluster.url());
                super::$name(std::sync::Arc::new(redis.connect().await)).await;
            }
        }
    )*};
}

on_every_store!(
    a_redelivered_event_changes_nothing,
    a_rebuild_takes_live_events_in_order_and_switches_at_once,
    a_rebuild_that_stops_renewing_its_lease_is_replaced,
    a_reader_waiting_for_its_writes_hears_at_once_that_no_version_is_live,
    a_campaigns_funnel_follows_its_orders_and_counts_each_event_once,
    a_campaigns_stock_adds_its_buckets_moves_in_whatever_order_they_come,
    an_orders_payment_is_pending_until_its_first_answer_starts_its_record,
    an_orders_status_follows_its_events_and_its_time_only_moves_forward,
    every_order_listing_pages_through_its_orders_newest_first,
);

const LEASE: Duration = Duration::from_secs(30);

async fn a_reader_waiting_for_its_writes_hears_at_once_that_no_version_is_live(
    store: Arc<dyn ProjectionStore>,
) {
    let order = format!("order-{}", Ulid::new());
    // No version will show the write until a rebuild makes one live: waiting the whole
    // timeout (a minute here) would only delay the 503.
    let waited = projections::read_model::wait_for_all(
        store.as_ref(),
        vec![(order.clone(), 1)],
        Duration::from_secs(60),
    );
    let waited = tokio::time::timeout(Duration::from_secs(30), waited)
        .await
        .expect("told before the timeout");
    assert!(
        matches!(
            waited,
            Err(projections::read_model::ReadModelError::Missing(
                ProjectionName::Orders
            ))
        ),
        "{waited:?}"
    );
    // A consumer's dedupe still reads version 0 and goes on.
    assert_eq!(store.applied_version(&order).await.unwrap(), 0);
    live(store.as_ref()).await;
    let shown = projections::read_model::wait_for_all(
        store.as_ref(),
        vec![(order.clone(), 0)],
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert!(shown.is_empty());
}

/// Gives the store an empty live version of every projection.
async fn live(store: &dyn ProjectionStore) {
    for name in ProjectionName::ALL {
        let version = store.begin_rebuild(name, LEASE).await.unwrap();
        store.finish_rebuild(name, version).await.unwrap();
    }
}

fn created(campaign_id: CampaignId, quota: u32) -> Change {
    let now = chrono::Utc::now();
    Change {
        stream_id: format!("campaign-{campaign_id}"),
        version: 1,
        position: 1,
        ops: vec![Op::Campaign {
            campaign_id,
            store_id: domain::StoreId::from_ulid(Ulid::new()),
            sku: "LAGER".into(),
            title: "Lager".into(),
            price_cents: domain::Cents::new(500),
            quota,
            per_user_limit: 5,
            starts_at: projections::ops::nanos(now),
            ends_at: projections::ops::nanos(now + chrono::Duration::hours(1)),
            payment_timeout_seconds: 60,
        }],
    }
}

fn reserved(campaign_id: CampaignId, version: u64, units: i64) -> Change {
    Change {
        stream_id: format!("campaign-{campaign_id}"),
        version,
        position: version,
        ops: vec![Op::Stock {
            campaign_id,
            total: 0,
            available: -units,
            reserved: units,
            sold: 0,
        }],
    }
}

async fn stock(store: &dyn ProjectionStore, id: CampaignId) -> domain::campaign::Stock {
    store
        .campaign(id)
        .await
        .unwrap()
        .expect("the campaign")
        .stock
}

/// The changes of one order's stream, in order: placed in `campaign_id`, then each status.
fn order_changes(
    campaign_id: CampaignId,
    order_id: OrderId,
    statuses: &[(domain::order::OrderStatus, &str)],
) -> Vec<Change> {
    let stream_id = format!("order-{order_id}");
    let placed = Op::Order {
        order_id,
        user_id: UserId::from_ulid(Ulid::new()),
        campaign_id,
        quantity: 1,
        amount_cents: domain::Cents::new(500),
        at: 1,
    };
    let moved = statuses.iter().map(|(status, reason)| Op::OrderStatus {
        order_id,
        status: *status,
        reason: (*reason).into(),
        payment_id: None,
        at: 2,
    });
    std::iter::once(placed)
        .chain(moved)
        .enumerate()
        .map(|(i, op)| Change {
            stream_id: stream_id.clone(),
            version: i as u64 + 1,
            position: i as u64 + 1,
            ops: vec![op],
        })
        .collect()
}

async fn a_campaigns_funnel_follows_its_orders_and_counts_each_event_once(
    store: Arc<dyn ProjectionStore>,
) {
    use domain::order::OrderStatus::*;
    live(store.as_ref()).await;
    let (sale, other) = (
        CampaignId::from_ulid(Ulid::new()),
        CampaignId::from_ulid(Ulid::new()),
    );
    let order = || OrderId::from_ulid(Ulid::new());
    let mut changes = Vec::new();
    changes.extend(order_changes(
        sale,
        order(),
        &[(AwaitingPayment, ""), (Confirmed, "")],
    ));
    changes.extend(order_changes(sale, order(), &[(Rejected, "sold_out")]));
    changes.extend(order_changes(sale, order(), &[(Rejected, "sold_out")]));
    changes.extend(order_changes(
        sale,
        order(),
        &[(AwaitingPayment, ""), (Cancelled, "payment_timeout")],
    ));
    changes.extend(order_changes(sale, order(), &[(AwaitingPayment, "")]));
    changes.extend(order_changes(sale, order(), &[]));
    changes.extend(order_changes(other, order(), &[]));
    let name = ProjectionName::Orders;
    store.apply_all(name, &changes).await.unwrap();
    // Redelivered, each event counts once.
    store.apply_all(name, &changes).await.unwrap();

    let funnel = store.funnel(sale).await.unwrap();
    assert_eq!(
        funnel,
        projections::Funnel {
            pending: 1,
            awaiting_payment: 1,
            confirmed: 1,
            rejected: [("sold_out".to_owned(), 2)].into(),
            cancelled: [("payment_timeout".to_owned(), 1)].into(),
        }
    );
    assert_eq!(funnel.placed(), 6);
    assert_eq!(store.funnel(other).await.unwrap().placed(), 1);
    let unknown = CampaignId::from_ulid(Ulid::new());
    assert_eq!(
        store.funnel(unknown).await.unwrap(),
        projections::Funnel::default()
    );
}

/// Each listing (all orders, a campaign's, a customer's, each by status too) shows exactly its
/// orders, newest first, page by page, whatever status each order reached.
async fn every_order_listing_pages_through_its_orders_newest_first(
    store: Arc<dyn ProjectionStore>,
) {
    use domain::order::OrderStatus::{self, *};
    use projections::read_model::OrderFilter;
    live(store.as_ref()).await;
    let campaigns = [(); 2].map(|_| CampaignId::from_ulid(Ulid::new()));
    let users = [(); 2].map(|_| UserId::from_ulid(Ulid::new()));
    let paths: [&[(OrderStatus, &str)]; 4] = [
        &[],
        &[(AwaitingPayment, "")],
        &[(AwaitingPayment, ""), (Confirmed, "")],
        &[(Rejected, "sold_out")],
    ];
    // (order, campaign, user, status), for 16 orders over both campaigns and customers.
    let mut placed = Vec::new();
    let mut changes = Vec::new();
    for i in 0..16 {
        let (order_id, campaign, user) = (
            OrderId::from_ulid(Ulid::new()),
            campaigns[i % 2],
            users[i / 2 % 2],
        );
        let path = paths[i % 4];
        let mut these = order_changes(campaign, order_id, path);
        if let Op::Order { user_id, .. } = &mut these[0].ops[0] {
            *user_id = user;
        }
        changes.extend(these);
        let status = path.last().map_or(Pending, |(status, _)| *status);
        placed.push((order_id, campaign, user, status));
    }
    store
        .apply_all(ProjectionName::Orders, &changes)
        .await
        .unwrap();

    let mut filters = vec![OrderFilter::default()];
    for status in [Pending, AwaitingPayment, Confirmed, Rejected, Cancelled] {
        filters.push(OrderFilter {
            status: Some(status),
            ..Default::default()
        });
    }
    for campaign in campaigns {
        for user in users {
            filters.push(OrderFilter {
                user_id: Some(user),
                campaign_id: Some(campaign),
                ..Default::default()
            });
        }
        filters.push(OrderFilter {
            campaign_id: Some(campaign),
            ..Default::default()
        });
        filters.push(OrderFilter {
            campaign_id: Some(campaign),
            status: Some(AwaitingPayment),
            ..Default::default()
        });
    }
    for user in users {
        filters.push(OrderFilter {
            user_id: Some(user),
            status: Some(Confirmed),
            ..Default::default()
        });
    }
    for filter in filters {
        let mut expected: Vec<OrderId> = placed
            .iter()
            .filter(|(_, campaign, user, status)| {
                filter.campaign_id.is_none_or(|c| c == *campaign)
                    && filter.user_id.is_none_or(|u| u == *user)
                    && filter.status.is_none_or(|s| s == *status)
            })
            .map(|(order_id, ..)| *order_id)
            .collect();
        expected.sort_by(|a, b| b.cmp(a));
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = store.orders(&filter, after, 3).await.unwrap();
            assert!(page.items.len() <= 3, "{filter:?}");
            listed.extend(page.items.iter().map(|o| o.order_id));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        assert_eq!(listed, expected, "{filter:?}");
    }
}

/// Every status change of an order shows, and the order's time is the latest of its events'
/// times: a change stamped earlier (another instance's clock) does not move it back.
async fn an_orders_status_follows_its_events_and_its_time_only_moves_forward(
    store: Arc<dyn ProjectionStore>,
) {
    use domain::order::OrderStatus::{AwaitingPayment, Cancelled};
    live(store.as_ref()).await;
    let order_id = OrderId::from_ulid(Ulid::new());
    let mut changes = order_changes(
        CampaignId::from_ulid(Ulid::new()),
        order_id,
        &[(AwaitingPayment, ""), (Cancelled, "payment_timeout")],
    );
    for (change, stamped) in changes.iter_mut().zip([5, 3, 7]) {
        match &mut change.ops[0] {
            Op::Order { at, .. } | Op::OrderStatus { at, .. } => *at = stamped,
            op => panic!("not an order's op: {op:?}"),
        }
    }
    let mut shown = Vec::new();
    for change in &changes {
        store
            .apply_all(ProjectionName::Orders, std::slice::from_ref(change))
            .await
            .unwrap();
        let view = store.order(order_id).await.unwrap().expect("the order");
        shown.push((view.status, view.updated_at));
    }
    let at = projections::ops::timestamp;
    assert_eq!(
        shown,
        [
            (domain::order::OrderStatus::Pending, at(5)),
            (AwaitingPayment, at(5)),
            (Cancelled, at(7)),
        ]
    );
}

/// The order's move to awaiting payment is the payment's request: the payment's stream starts
/// with its first answer, which may reach the projection before or after the order's move.
async fn an_orders_payment_is_pending_until_its_first_answer_starts_its_record(
    store: Arc<dyn ProjectionStore>,
) {
    use domain::order::OrderStatus::AwaitingPayment;
    use domain::payment::PaymentStatus::{Pending, Refunded, Succeeded};
    live(store.as_ref()).await;
    let campaign_id = CampaignId::from_ulid(Ulid::new());
    let name = ProjectionName::Orders;
    let payment_of = |order_id: OrderId| domain::PaymentId::from_ulid(order_id.ulid());
    let awaiting = |order_id: OrderId| {
        let mut changes = order_changes(campaign_id, order_id, &[(AwaitingPayment, "")]);
        if let Op::OrderStatus { payment_id, .. } = &mut changes[1].ops[0] {
            *payment_id = Some(payment_of(order_id));
        }
        changes
    };
    let answer = |order_id: OrderId, version: u64, status, at| Change {
        stream_id: format!("payment-{}", payment_of(order_id)),
        version,
        position: 10 + version,
        ops: vec![Op::Payment {
            payment_id: payment_of(order_id),
            requested: None,
            status,
            at,
        }],
    };
    let amount = domain::Cents::new(500);

    // The order's move first: pending, with the order's amount, until the answer comes.
    let first = OrderId::from_ulid(Ulid::new());
    store.apply_all(name, &awaiting(first)).await.unwrap();
    assert_eq!(
        payment_shown(store.as_ref(), first).await,
        (Pending, amount)
    );
    store
        .apply_all(name, &[answer(first, 1, Succeeded, 3)])
        .await
        .unwrap();
    assert_eq!(
        payment_shown(store.as_ref(), first).await,
        (Succeeded, amount)
    );
    store
        .apply_all(name, &[answer(first, 2, Refunded, 4)])
        .await
        .unwrap();
    let view = store.order(first).await.unwrap().unwrap();
    assert_eq!(view.payment.as_ref().unwrap().status, Refunded);
    assert_eq!(view.updated_at, projections::ops::timestamp(4));

    // The answer first: the order shows it as soon as it names its payment.
    let second = OrderId::from_ulid(Ulid::new());
    store
        .apply_all(name, &[answer(second, 1, Succeeded, 3)])
        .await
        .unwrap();
    assert_eq!(store.order(second).await.unwrap(), None);
    store.apply_all(name, &awaiting(second)).await.unwrap();
    assert_eq!(
        payment_shown(store.as_ref(), second).await,
        (Succeeded, amount)
    );
}

/// The status and amount of the payment `order_id`'s view shows.
async fn payment_shown(
    store: &dyn ProjectionStore,
    order_id: OrderId,
) -> (domain::payment::PaymentStatus, domain::Cents) {
    let view = store.order(order_id).await.unwrap();
    let payment = view
        .expect("the order is there")
        .payment
        .expect("a payment");
    (payment.status, payment.amount_cents)
}

/// A change of `stream_id` that moves a campaign's units by `[total, available, reserved,
/// sold]`.
fn moved(stream_id: String, campaign_id: CampaignId, version: u64, by: [i64; 4]) -> Change {
    Change {
        stream_id,
        version,
        position: version,
        ops: vec![Op::Stock {
            campaign_id,
            total: by[0],
            available: by[1],
            reserved: by[2],
            sold: by[3],
        }],
    }
}

/// Order is kept within a stream only, so a bucket's moves may come before the campaign's
/// creation, and a sale recorded by the campaign's writer before the reservation it settles,
/// recorded in another bucket (the deterministic simulation's seeds 298 and 904).
async fn a_campaigns_stock_adds_its_buckets_moves_in_whatever_order_they_come(
    store: Arc<dyn ProjectionStore>,
) {
    live(store.as_ref()).await;
    let id = CampaignId::from_ulid(Ulid::new());
    let (campaign, bucket) = (format!("campaign-{id}"), format!("stock-{id}-1"));
    let name = ProjectionName::Campaigns;
    // Bucket 1 takes in 4 units the campaign's own bucket gave out, and reserves 2 of them,
    // which the campaign's writer then sells.
    let took_in = moved(bucket.clone(), id, 1, [0, 4, 0, 0]);
    let reserved = moved(bucket, id, 2, [0, -2, 2, 0]);
    let gave_out = moved(campaign.clone(), id, 2, [0, -4, 0, 0]);
    let sold = moved(campaign, id, 3, [0, 0, -2, 2]);

    store.apply_all(name, &[took_in]).await.unwrap();
    assert!(
        store.campaign(id).await.unwrap().is_none(),
        "moves alone make no campaign"
    );
    store
        .apply_all(name, &[created(id, 10), gave_out, sold])
        .await
        .unwrap();
    store.apply_all(name, &[reserved]).await.unwrap();
    let counted = stock(store.as_ref(), id).await;
    assert_eq!(
        (
            counted.total,
            counted.available,
            counted.reserved,
            counted.sold
        ),
        (10, 8, 0, 2),
        "{counted:?}"
    );
}

async fn a_redelivered_event_changes_nothing(store: Arc<dyn ProjectionStore>) {
    live(store.as_ref()).await;
    let id = CampaignId::from_ulid(Ulid::new());
    let name = ProjectionName::Campaigns;
    assert!(store.apply(name, &created(id, 10)).await.unwrap().applied);
    assert!(
        store
            .apply(name, &reserved(id, 2, 3))
            .await
            .unwrap()
            .applied
    );
    let again = store.apply(name, &reserved(id, 2, 3)).await.unwrap();
    assert!(!again.applied, "a redelivery is recognised");
    let counted = stock(store.as_ref(), id).await;
    assert_eq!(
        (counted.available, counted.reserved),
        (7, 3),
        "counted once"
    );
    let stream = format!("campaign-{id}");
    assert_eq!(store.applied_version(&stream).await.unwrap(), 2);
    // A dead-lettered event is recorded with no effect, so the stream goes on.
    store.skip(name, &stream, 3).await.unwrap();
    assert_eq!(store.applied_version(&stream).await.unwrap(), 3);
    assert_eq!(stock(store.as_ref(), id).await.available, 7);
}

async fn a_rebuild_takes_live_events_in_order_and_switches_at_once(
    store: Arc<dyn ProjectionStore>,
) {
    live(store.as_ref()).await;
    let name = ProjectionName::Campaigns;
    let id = CampaignId::from_ulid(Ulid::new());
    let log = [
        created(id, 10),
        reserved(id, 2, 1),
        reserved(id, 3, 2),
        reserved(id, 4, 3),
    ];
    store.apply(name, &log[0]).await.unwrap();
    store.apply(name, &log[1]).await.unwrap();
    let building = store.begin_rebuild(name, LEASE).await.unwrap();
    assert!(
        matches!(
            store.begin_rebuild(name, LEASE).await,
            Err(RebuildError::Busy(_))
        ),
        "one rebuild at a time"
    );
    // Live, while the rebuild has read nothing: the new version must skip it (its rebuild
    // reads it from the log), or it would count version 3 before 1 and 2.
    store.apply(name, &log[2]).await.unwrap();
    store
        .rebuild_apply(name, building, &log[..3], LEASE)
        .await
        .unwrap();
    // Live, with the rebuild caught up: both versions take it.
    store.apply(name, &log[3]).await.unwrap();
    let before = store.campaign(id).await.unwrap();
    assert_eq!(before.as_ref().unwrap().stock.reserved, 6);
    let replaced = store.finish_rebuild(name, building).await.unwrap();
    store.drop_version(name, replaced.unwrap()).await.unwrap();
    assert_eq!(
        store.campaign(id).await.unwrap(),
        before,
        "the new version is the same"
    );
    let versions: Vec<_> = store
        .versions()
        .await
        .unwrap()
        .into_iter()
        .filter(|v| v.name == name)
        .collect();
    assert_eq!(versions.len(), 1, "the old version is gone: {versions:?}");
    assert_eq!(
        (versions[0].version, versions[0].status, versions[0].events),
        (building, VersionStatus::Live, 4)
    );
}

async fn a_rebuild_that_stops_renewing_its_lease_is_replaced(store: Arc<dyn ProjectionStore>) {
    live(store.as_ref()).await;
    let name = ProjectionName::Orders;
    let abandoned = store
        .begin_rebuild(name, Duration::from_millis(50))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let next = store.begin_rebuild(name, LEASE).await.unwrap();
    assert!(next > abandoned);
    assert!(matches!(
        store.rebuild_apply(name, abandoned, &[], LEASE).await,
        Err(RebuildError::LeaseLost { .. })
    ));
    assert!(matches!(
        store.finish_rebuild(name, abandoned).await,
        Err(RebuildError::LeaseLost { .. })
    ));
    let versions = store.versions().await.unwrap();
    assert!(
        !versions
            .iter()
            .any(|v| v.version == abandoned && v.name == name),
        "the abandoned version was removed: {versions:?}"
    );
}

// --- through the API ---

on_both_backends!(
    operators_see_and_rebuild_read_models,
    the_audit_passes_on_a_consistent_log,
);

async fn campaign(app: &TestApp, quota: u32, limit: u32) -> Value {
    app.create_campaign(quota, limit).await
}

async fn place(app: &TestApp, token: &str, campaign: &Value, quantity: u32) -> Value {
    let body = json!({"campaign_id": campaign["campaign_id"], "quantity": quantity});
    let key = Ulid::new().to_string();
    expect_json(
        app.post("/v1/orders", token, Some(&key), &body).await,
        StatusCode::ACCEPTED,
    )
    .await
}

async fn pay(app: &TestApp, order: &Value, status: &str) {
    let body = json!({
        "payment_id": order["payment"]["payment_id"],
        "status": status,
        "provider_reference": format!("psp-{}", order["order_id"].as_str().unwrap()),
    });
    let t = chrono::Utc::now().timestamp();
    let response = app.webhook(&body, t, harness::WEBHOOK_SECRET).await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn projections_list(app: &TestApp) -> Vec<Value> {
    let body = app.operator_get("/v1/admin/projections").await;
    body["items"].as_array().unwrap().clone()
}

/// Polls the projection list until `done` holds; panics after 30 s.
async fn wait_for_projections(app: &TestApp, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let items = projections_list(app).await;
        if done(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "projections never got there: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn only_live(items: &[Value], name: &str, version: u64) -> bool {
    let of: Vec<_> = items.iter().filter(|i| i["name"] == name).collect();
    of.len() == 1 && of[0]["version"] == version && of[0]["status"] == "live" && of[0]["lag"] == 0
}

async fn operators_see_and_rebuild_read_models(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 10, 3).await;
    let order = place(&app, &ada, &campaign, 2).await;
    let order_id = order["order_id"].as_str().unwrap();
    let awaiting = app
        .wait_for_status(&ada, order_id, "awaiting_payment")
        .await;
    let items = wait_for_projections(&app, |items| {
        only_live(items, "campaigns", 1) && only_live(items, "orders", 1)
    })
    .await;
    assert!(items.iter().all(|i| i["position"].as_u64().unwrap() > 0));

    expect_problem(
        app.get("/v1/admin/projections", &ada).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    expect_problem(
        app.post(
            "/v1/admin/projections/stock/rebuild",
            OPERATOR_TOKEN,
            None,
            &json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "projection_not_found",
    )
    .await;

    let started = expect_json(
        app.post(
            "/v1/admin/projections/orders/rebuild",
            OPERATOR_TOKEN,
            None,
            &json!({}),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    assert_eq!(
        started,
        json!({"name": "orders", "version": 2, "status": "building"})
    );
    wait_for_projections(&app, |items| {
        only_live(items, "orders", 2) && only_live(items, "campaigns", 1)
    })
    .await;
    let path = format!("/v1/orders/{order_id}");
    let after = expect_json(app.get(&path, &ada).await, StatusCode::OK).await;
    assert_eq!(after, awaiting, "the rebuilt read model answers the same");
    let mine = expect_json(app.get("/v1/orders", &ada).await, StatusCode::OK).await;
    assert_eq!(mine["items"], json!([awaiting]));
}

async fn the_audit_passes_on_a_consistent_log(app: TestApp) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(&app, 10, 5).await;
    let paid = place(&app, &ada, &campaign, 1).await;
    let failed = place(&app, &ada, &campaign, 1).await;
    let cancelled = place(&app, &ada, &campaign, 1).await;
    let id = |o: &Value| o["order_id"].as_str().unwrap().to_owned();
    let paid = app
        .wait_for_status(&ada, &id(&paid), "awaiting_payment")
        .await;
    let failed = app
        .wait_for_status(&ada, &id(&failed), "awaiting_payment")
        .await;
    app.wait_for_status(&ada, &id(&cancelled), "awaiting_payment")
        .await;
    pay(&app, &paid, "succeeded").await;
    pay(&app, &failed, "failed").await;
    let cancel = format!("/v1/orders/{}/cancel", id(&cancelled));
    let key = Ulid::new().to_string();
    assert_eq!(
        app.post(&cancel, &ada, Some(&key), &json!({}))
            .await
            .status(),
        StatusCode::ACCEPTED
    );
    app.wait_for_status(&ada, &id(&paid), "confirmed").await;
    app.wait_for_status(&ada, &id(&failed), "cancelled").await;
    app.wait_for_status(&ada, &id(&cancelled), "cancelled")
        .await;

    let report = app.operator_get("/v1/admin/audit").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["violations"], json!([]));
    assert!(report["events_read"].as_u64().unwrap() >= 20, "{report}");
    assert!(report["streams_read"].as_u64().unwrap() >= 8, "{report}");
    assert!(report["checked_at"].is_string());
    // Every order is final: none is stuck, however short the bound.
    let report = app
        .operator_get("/v1/admin/audit?stuck_after_seconds=0")
        .await;
    assert_eq!(report["violations"], json!([]), "{report}");
    expect_problem(
        app.get(
            "/v1/admin/audit?stuck_after_seconds=9999999999",
            OPERATOR_TOKEN,
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    expect_problem(
        app.get("/v1/admin/audit", &ada).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
}

// --- on the real services ---

/// Waits until every order is final and every read model has caught up with the log.
async fn settle(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut open = 0;
        for status in ["pending", "awaiting_payment"] {
            let path = format!("/v1/orders?status={status}&limit=1");
            let response = app.get(&path, OPERATOR_TOKEN).await;
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                // A read model being rebuilt: nothing to tell from yet.
                open += 1;
                continue;
            }
            let page = expect_json(response, StatusCode::OK).await;
            open += page["items"].as_array().unwrap().len();
        }
        let items = projections_list(app).await;
        let caught_up = items.iter().all(|i| i["lag"] == 0 && i["status"] == "live");
        if open == 0 && caught_up {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never settled: {open} orders open, {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A call's writes to the order indexes, the funnel and the stream versions are gathered and
/// made as it ends, one command a key: when an op fails part way, what the events before it
/// applied is still made whole (listed, counted, recorded as applied), and the failing event
/// stays to be applied again.
#[tokio::test]
async fn a_call_that_fails_part_way_keeps_whole_what_it_applied_before() {
    use domain::order::OrderStatus::*;
    use projections::read_model::OrderFilter;
    let redis = harness::TestRedis::new();
    let store = redis.connect().await;
    live(&store).await;
    let name = ProjectionName::Orders;
    let version = store.versions().await.unwrap()[0].version;
    let (sale, broken) = (
        CampaignId::from_ulid(Ulid::new()),
        CampaignId::from_ulid(Ulid::new()),
    );
    // A key of the wrong type, so that writing the campaign's hash fails.
    let mut conn = redis.connection().await;
    let _: () = ::redis::cmd("SET")
        .arg(format!("{}:c:{broken}", store.root(name, version)))
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let order_id = OrderId::from_ulid(Ulid::new());
    let mut changes = order_changes(sale, order_id, &[(AwaitingPayment, "")]);
    let failing = created(broken, 10);
    changes.push(failing.clone());

    let failed = store.apply_all(name, &changes).await;
    assert!(failed.is_err(), "{failed:?}");
    let listed = store
        .orders(
            &OrderFilter {
                campaign_id: Some(sale),
                status: Some(AwaitingPayment),
                ..Default::default()
            },
            None,
            10,
        )
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1, "{listed:?}");
    assert_eq!(listed.items[0].order_id, order_id);
    let funnel = store.funnel(sale).await.unwrap();
    assert_eq!((funnel.pending, funnel.awaiting_payment), (0, 1));
    assert_eq!(
        store
            .applied_version(&format!("order-{order_id}"))
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.applied_version(&failing.stream_id).await.unwrap(), 0);
}

/// Two builds whose functions differ (a rolling upgrade) share one Redis: each loads and calls
/// a library of its own, and loading one leaves the other's in place.
#[tokio::test]
async fn builds_with_different_functions_call_their_own_libraries_side_by_side() {
    let redis = harness::TestRedis::new();
    let ours = Library::this_build();
    let theirs = Library::of(&format!("{FUNCTIONS}\n-- another build\n"));
    assert_ne!(theirs.name, ours.name);
    assert!(!theirs.source.contains("@BUILD@") && theirs.source.contains(&theirs.build));
    let mut conn = redis.connection().await;
    let loaded: String = ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&theirs.source)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(loaded, theirs.name);

    // This build connects (loading its own) and works beside the other.
    let store = redis.connect().await;
    store
        .begin_rebuild(ProjectionName::Orders, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(store.versions().await.unwrap().len(), 1);
    // The other build's library is still there, and its functions still answer.
    let base = store.base(ProjectionName::Orders);
    let found: Vec<(u32, String, u64, u64)> = ::redis::cmd("FCALL_RO")
        .arg(format!("groupbuy_versions_{}", theirs.build))
        .arg(1)
        .arg(&base)
        .arg(&base)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    let _: () = ::redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(&theirs.name)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_then_rebuilt_gives_identical_read_models() {
    let app = spawn_app_tuned(Backend::Postgres, |_| {}).await;
    let redis = app.redis.as_ref().unwrap();
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    let first = campaign(&app, 20, 4).await;
    let second = campaign(&app, 6, 5).await;
    let mut orders = Vec::new();
    for (who, campaign, quantity) in [
        (&ada, &first, 2),
        (&bob, &first, 3),
        (&ada, &second, 1),
        (&bob, &second, 5),
    ] {
        orders.push(place(&app, who, campaign, quantity).await);
    }
    for (order, (who, outcome)) in orders.iter().zip([
        (&ada, "succeeded"),
        (&bob, "failed"),
        (&ada, "succeeded"),
        (&bob, "succeeded"),
    ]) {
        let id = order["order_id"].as_str().unwrap();
        let order = app.wait_for_status(who, id, "awaiting_payment").await;
        pay(&app, &order, outcome).await;
    }
    let rejected = place(&app, &ada, &second, 5).await;
    app.wait_for_status(&ada, rejected["order_id"].as_str().unwrap(), "rejected")
        .await;
    settle(&app).await;
    let campaigns = redis.dump(ProjectionName::Campaigns).await;
    let orders_dump = redis.dump(ProjectionName::Orders).await;
    assert!(
        campaigns.len() >= 5 && orders_dump.len() >= 20,
        "{orders_dump:?}"
    );
    let listing = app.operator_get("/v1/orders").await;

    // Redis loses everything: its keys, and (as after a restart) its functions.
    redis.flush().await;
    let mut conn = redis.connection().await;
    let _: () = ::redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(&Library::this_build().name)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ready = app.get("/readyz", OPERATOR_TOKEN).await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(
        ready["projections"]["orders"]["status"], "missing",
        "{ready}"
    );

    for name in ["campaigns", "orders"] {
        let path = format!("/v1/admin/projections/{name}/rebuild");
        let started = expect_json(
            app.post(&path, OPERATOR_TOKEN, None, &json!({})).await,
            StatusCode::ACCEPTED,
        )
        .await;
        assert_eq!(started["status"], "building");
    }
    settle(&app).await;
    assert_eq!(redis.dump(ProjectionName::Campaigns).await, campaigns);
    assert_eq!(redis.dump(ProjectionName::Orders).await, orders_dump);
    let again = app.operator_get("/v1/orders").await;
    assert_eq!(again, listing);
    assert_eq!(
        app.get("/readyz", OPERATOR_TOKEN).await.status(),
        StatusCode::OK
    );
}

/// A sale's campaign and an order of it, settled in the read models; Redis then loses them.
async fn sale_then_redis_lost(app: &TestApp) -> (String, Value, String, Value) {
    let (_, ada) = app.create_user("Ada").await;
    let campaign = campaign(app, 10, 5).await;
    let order = place(app, &ada, &campaign, 2).await;
    let order_path = format!("/v1/orders/{}", order["order_id"].as_str().unwrap());
    let order = app
        .wait_for_status(
            &ada,
            order["order_id"].as_str().unwrap(),
            "awaiting_payment",
        )
        .await;
    settle_projections(app).await;
    let campaign_path = format!(
        "/v1/campaigns/{}",
        campaign["campaign_id"].as_str().unwrap()
    );
    let campaign = expect_json(app.get(&campaign_path, &ada).await, StatusCode::OK).await;
    app.redis.as_ref().unwrap().flush().await;
    (campaign_path, campaign, order_path, order)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_with_no_live_version_answers_503_never_404() {
    let app = spawn_app_tuned(Backend::Postgres, |s| s.heal_read_models_every = None).await;
    let (campaign_path, _, order_path, _) = sale_then_redis_lost(&app).await;
    for path in [
        campaign_path.as_str(),
        "/v1/campaigns",
        order_path.as_str(),
        "/v1/orders",
    ] {
        let response = app.get(path, OPERATOR_TOKEN).await;
        assert_eq!(response.headers()["retry-after"], "5", "{path}");
        expect_problem(
            response,
            StatusCode::SERVICE_UNAVAILABLE,
            "read_model_rebuilding",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_that_lost_its_live_version_is_rebuilt_without_an_operator() {
    let app = spawn_app_tuned(Backend::Postgres, |s| {
        s.heal_read_models_every = Some(Duration::from_millis(200));
    })
    .await;
    let (campaign_path, campaign, order_path, order) = sale_then_redis_lost(&app).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (path, before) in [(&campaign_path, &campaign), (&order_path, &order)] {
        loop {
            let response = app.get(path, OPERATOR_TOKEN).await;
            match response.status() {
                StatusCode::OK => {
                    let now: Value = response.json().await.unwrap();
                    assert_eq!(&now, before, "{path}");
                    break;
                }
                StatusCode::SERVICE_UNAVAILABLE => {}
                other => panic!("{path} answered {other} while its read model was rebuilt"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never came back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ready = app.get("/readyz", OPERATOR_TOKEN).await;
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_under_order_load_answers_every_query_and_ends_equal_to_a_fresh_fold() {
    let app = Arc::new(
        spawn_app_tuned(Backend::Postgres, |settings| {
            settings.payments = gateway::app::Payments::Simulated {
                delay: Duration::from_millis(20),
                failure_rate: 0.25,
            };
            // Small batches stretch the rebuild over the load.
            settings.rebuild.batch = 10;
            // Customers order back to back, over any sensible rate per customer.
            settings.limits.rate_limits = gateway::rate_limit::RateLimits::NONE;
        })
        .await,
    );
    let campaign = Arc::new(campaign(&app, 10_000, 10_000).await);
    let mut customers = Vec::new();
    for i in 0..6 {
        customers.push(app.create_user(&format!("customer {i}")).await.1);
    }
    // One more customer reads while the others order: a query waits only for its caller's
    // own writes, so the reader is not held up by the load.
    let reader = app.create_user("reader").await.1;
    // Some history for the rebuild to read.
    for token in customers.iter().chain([&reader]) {
        for _ in 0..10 {
            place(&app, token, &campaign, 1).await;
        }
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let queries = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for token in customers.clone() {
        let (app, campaign, stopped) = (app.clone(), campaign.clone(), stopped.clone());
        load.push(tokio::spawn(async move {
            // Paced, so that the load is one the read models can keep up with: a rebuild
            // goes live only once it has caught up with the log, which it never does while
            // orders come faster than it (a debug build on two cores) applies them.
            while !*stopped.borrow() {
                place(&app, &token, &campaign, 1).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    let querier = {
        let (app, campaign, stopped, queries) = (
            app.clone(),
            campaign.clone(),
            stopped.clone(),
            queries.clone(),
        );
        let token = reader.clone();
        tokio::spawn(async move {
            let campaign_path = format!(
                "/v1/campaigns/{}",
                campaign["campaign_id"].as_str().unwrap()
            );
            while !*stopped.borrow() {
                let mine = app.get("/v1/orders?limit=5", &token).await;
                assert_eq!(
                    mine.status(),
                    StatusCode::OK,
                    "a listing failed during the rebuild"
                );
                let mine: Value = mine.json().await.unwrap();
                let items = mine["items"].as_array().unwrap();
                assert!(
                    !items.is_empty(),
                    "the customer's orders vanished during the rebuild"
                );
                let one = format!("/v1/orders/{}", items[0]["order_id"].as_str().unwrap());
                assert_eq!(
                    app.get(&one, &token).await.status(),
                    StatusCode::OK,
                    "an order vanished"
                );
                let stock = app.get(&campaign_path, &token).await;
                assert_eq!(stock.status(), StatusCode::OK, "the campaign vanished");
                queries.fetch_add(3, AtomicOrdering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    for name in ["campaigns", "orders"] {
        let path = format!("/v1/admin/projections/{name}/rebuild");
        expect_json(
            app.post(&path, OPERATOR_TOKEN, None, &json!({})).await,
            StatusCode::ACCEPTED,
        )
        .await;
    }
    let building = projections_list(&app).await;
    assert!(
        building.iter().any(|i| i["status"] == "building"),
        "the rebuild overlaps the load: {building:?}"
    );
    wait_for_projections(&app, |items| {
        items.len() == 2
            && items
                .iter()
                .all(|i| i["version"] == 2 && i["status"] == "live")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    for task in load {
        task.await.unwrap();
    }
    querier
        .await
        .expect("every query during the rebuild answered");
    assert!(queries.load(AtomicOrdering::Relaxed) > 30);

    settle(&app).await;
    let report = app.operator_get("/v1/admin/audit").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["views_in_flight"], 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_reports_each_kind_of_violation_planted_in_the_log() {
    let app = spawn_app_tuned(Backend::Postgres, |_| {}).await;
    let db = app.db.as_ref().unwrap();
    let redis = app.redis.as_ref().unwrap();
    let log: Arc<dyn EventLog> = db.log();
    let (_, ada) = app.create_user("Ada").await;
    let gap = campaign(&app, 10, 5).await;
    let oversold = campaign(&app, 1, 10).await;
    let over_limit = campaign(&app, 100, 2).await;
    let tampered = campaign(&app, 10, 5).await;
    let shop = campaign(&app, 10, 5).await;
    let order = place(&app, &ada, &shop, 1).await;
    let order_id = order["order_id"].as_str().unwrap().to_owned();
    let order = app
        .wait_for_status(&ada, &order_id, "awaiting_payment")
        .await;
    settle_projections(&app).await;

    let id = |c: &Value| {
        c["campaign_id"]
            .as_str()
            .unwrap()
            .parse::<CampaignId>()
            .unwrap()
    };
    let now = chrono::Utc::now();
    let hold = |quantity| CampaignEvent::StockReserved {
        order_id: OrderId::from_ulid(Ulid::new()),
        user_id: UserId::from_ulid(Ulid::new()),
        quantity,
        at: now,
    };
    // Version 3 right after version 1: the log's own append refuses that, so straight in.
    let replenished = schemas::encode(&CampaignEvent::StockReplenished {
        quantity: 5,
        at: now,
    })
    .unwrap();
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, data, metadata) \
         VALUES ($1, $2, 3, $3, $4, $5, $6)",
    )
    .bind(uuid::Uuid::from(Ulid::new()))
    .bind(format!("campaign-{}", id(&gap)))
    .bind(&replenished.event_type)
    .bind(replenished.schema_version as i32)
    .bind(&replenished.data)
    .bind(serde_json::to_value(schemas::Metadata::default()).unwrap())
    .execute(db.log().pool())
    .await
    .unwrap();
    // Five units held of one.
    plant(&log, &format!("campaign-{}", id(&oversold)), 1, &hold(5)).await;
    // Three units for one customer, whose limit is two.
    plant(&log, &format!("campaign-{}", id(&over_limit)), 1, &hold(3)).await;
    // Confirmed, never paid.
    let payment_id = order["payment"]["payment_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let order_stream = format!("order-{order_id}");
    let order_version = log.read_stream(&order_stream, 0, 100).await.unwrap().len() as u64;
    plant(
        &log,
        &order_stream,
        order_version,
        &OrderEvent::OrderConfirmed {
            payment_id,
            at: now,
        },
    )
    .await;
    // A read model that no longer matches the log.
    let store = redis.connect().await;
    let live = store
        .versions()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.name == ProjectionName::Campaigns && v.status == VersionStatus::Live)
        .unwrap();
    let key = format!(
        "{}:c:{}",
        store.root(ProjectionName::Campaigns, live.version),
        id(&tampered)
    );
    let mut conn = redis.connection().await;
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg("title")
        .arg("Tampered")
        .query_async(&mut conn)
        .await
        .unwrap();
    app.wait_for_status(&ada, &order_id, "confirmed").await;

    let report = app.operator_get("/v1/admin/audit").await;
    assert_eq!(report["ok"], false);
    let mut found: Vec<(String, String)> = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_owned(),
                v["stream_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        ("order_inconsistent".to_owned(), order_stream.clone()),
        (
            "per_user_limit".to_owned(),
            format!("campaign-{}", id(&over_limit)),
        ),
        (
            "read_model_mismatch".to_owned(),
            format!("campaign-{}", id(&tampered)),
        ),
        (
            "stock_invariant".to_owned(),
            format!("campaign-{}", id(&oversold)),
        ),
        ("version_gap".to_owned(), format!("campaign-{}", id(&gap))),
    ];
    expected.sort();
    assert_eq!(found, expected, "{report}");

    // The command line finds the same, and says so with its exit status.
    let passed = gateway::cli::audit(gateway::cli::AuditArgs {
        database_url: db.url.clone(),
        redis_url: Some(redis.url.clone()),
        redis_prefix: redis.prefix.clone(),
        json: true,
        settle_seconds: 120,
        stuck_after_seconds: 300,
    })
    .await
    .unwrap();
    assert!(!passed);
}

/// Waits until the read models hold everything in the log.
async fn settle_projections(app: &TestApp) {
    wait_for_projections(app, |items| {
        items.iter().all(|i| i["lag"] == 0 && i["status"] == "live")
    })
    .await;
}

/// Appends `event` to `stream_id` as if the stream were at `after`, bypassing every rule.
async fn plant<E: serde::Serialize>(
    log: &Arc<dyn EventLog>,
    stream_id: &str,
    after: u64,
    event: &E,
) {
    log.append(AppendRequest {
        streams: vec![StreamAppend {
            stream_id: stream_id.to_owned(),
            expected_version: after,
            events: vec![NewEvent {
                event_id: Ulid::new(),
                event: schemas::encode(event).unwrap(),
                metadata: Default::default(),
            }],
        }],
        idempotency: None,
    })
    .await
    .unwrap();
}
