//! Every event type has a schema, every schema has an event type, and every event the domain
//! can produce validates and comes back unchanged.

use std::collections::BTreeSet;

use chrono::TimeZone;
use domain::campaign::{CampaignCreated, CampaignEvent};
use domain::holding::HoldingEvent;
use domain::order::{CancelReason, OrderEvent, RejectReason};
use domain::payment::PaymentEvent;
use domain::saga::{OrderSagaEvent, SagaStep};
use domain::stock::StockBucketEvent;
use domain::store::{Store, StoreEvent};
use domain::user::{User, UserEvent};
use domain::{CampaignId, Cents, OrderId, PaymentId, StoreId, Timestamp, UserId};
use schemas::registry::{Registry, EVENT_SCHEMAS};
use serde::de::DeserializeOwned;
use serde::Serialize;
use ulid::Ulid;

fn at() -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000, 123_000_000)
        .unwrap()
}

fn id(n: u8) -> Ulid {
    Ulid::from_parts(1_700_000_000_000, u128::from(n))
}

/// Decodes a stored payload and serializes it again, tagged.
type RoundTrip = fn(&str, u32, serde_json::Value) -> serde_json::Value;
/// An event type, a tagged event of that type, and how to bring it back from the log.
type Sample = (&'static str, serde_json::Value, RoundTrip);

fn sample<E: Serialize + DeserializeOwned>(event_type: &'static str, event: &E) -> Sample {
    (
        event_type,
        serde_json::to_value(event).unwrap(),
        round_trip::<E>,
    )
}

/// One sample of every event type the domain defines. The exhaustive matches in `type_of_*`
/// stop this file compiling when a variant is added without being listed here.
fn samples() -> Vec<Sample> {
    let (order, user, campaign, payment) = (
        OrderId::from_ulid(id(1)),
        UserId::from_ulid(id(2)),
        CampaignId::from_ulid(id(3)),
        PaymentId::from_ulid(id(4)),
    );
    let user_registered = UserEvent::UserRegistered(User {
        user_id: user,
        name: "Ada".into(),
        token_sha256: "0f".repeat(32),
        registered_at: at(),
    });
    let store_created = StoreEvent::StoreCreated(Store {
        store_id: StoreId::from_ulid(id(5)),
        name: "Corner Cellar".into(),
        region: "north".into(),
        created_at: at(),
    });
    let mut out = vec![
        sample(type_of_user(&user_registered), &user_registered),
        sample(type_of_store(&store_created), &store_created),
    ];
    for e in [
        CampaignEvent::CampaignCreated(CampaignCreated {
            campaign_id: campaign,
            store_id: StoreId::from_ulid(id(5)),
            sku: "IPA-330".into(),
            title: "Hazy IPA".into(),
            price_cents: Cents::new(1250),
            quota: 100,
            per_user_limit: 2,
            starts_at: at(),
            ends_at: at() + chrono::Duration::hours(1),
            payment_timeout_seconds: 600,
            stock_buckets: 4,
            created_at: at(),
        }),
        CampaignEvent::StockReplenished {
            quantity: 5,
            at: at(),
        },
        CampaignEvent::CampaignClosed { at: at() },
        CampaignEvent::StockMoved {
            reserved: 7,
            released: 2,
            sold: 3,
            at: at(),
        },
        CampaignEvent::StockTransferredOut {
            to_bucket: 3,
            units: 10,
            at: at(),
        },
        CampaignEvent::StockTransferredIn {
            from_bucket: 1,
            units: 4,
            at: at(),
        },
        CampaignEvent::StockReserved {
            order_id: order,
            user_id: user,
            quantity: 2,
            at: at(),
        },
        CampaignEvent::StockReleased {
            order_id: order,
            user_id: user,
            quantity: 2,
            reason: CancelReason::PaymentTimeout,
            at: at(),
        },
        CampaignEvent::StockSold {
            order_id: order,
            user_id: user,
            quantity: 2,
            at: at(),
        },
    ] {
        out.push(sample(type_of_campaign(&e), &e));
    }
    for e in [
        StockBucketEvent::StockMoved {
            reserved: 1,
            released: 0,
            sold: 0,
            at: at(),
        },
        StockBucketEvent::StockTransferredOut {
            to_bucket: 0,
            units: 1,
            at: at(),
        },
        StockBucketEvent::StockTransferredIn {
            from_bucket: 0,
            units: 8,
            at: at(),
        },
    ] {
        out.push(sample(type_of_bucket(&e), &e));
    }
    for e in [
        HoldingEvent::UnitsReserved {
            order_id: order,
            campaign_id: campaign,
            user_id: user,
            quantity: 2,
            bucket: 1,
            at: at(),
        },
        HoldingEvent::UnitsReleased {
            order_id: order,
            campaign_id: campaign,
            user_id: user,
            quantity: 2,
            bucket: 0,
            reason: CancelReason::PaymentFailed,
            at: at(),
        },
        HoldingEvent::UnitsSold {
            order_id: order,
            campaign_id: campaign,
            user_id: user,
            quantity: 2,
            at: at(),
        },
    ] {
        out.push(sample(type_of_holding(&e), &e));
    }
    for e in [
        OrderEvent::OrderPlaced {
            order_id: order,
            user_id: user,
            campaign_id: campaign,
            quantity: 2,
            unit_price_cents: Cents::new(1250),
            amount_cents: Cents::new(2500),
            placed_at: at(),
        },
        OrderEvent::OrderRejected {
            reason: RejectReason::LimitExceeded,
            at: at(),
        },
        OrderEvent::OrderAwaitingPayment {
            payment_id: payment,
            deadline: at(),
            at: at(),
        },
        OrderEvent::OrderConfirmed {
            payment_id: payment,
            at: at(),
        },
        OrderEvent::OrderCancelled {
            reason: CancelReason::Customer,
            at: at(),
        },
    ] {
        out.push(sample(type_of_order(&e), &e));
    }
    for e in [
        PaymentEvent::PaymentRequested {
            payment_id: payment,
            order_id: order,
            amount_cents: Cents::new(2500),
            deadline: at(),
            at: at(),
        },
        PaymentEvent::PaymentSucceeded {
            provider_reference: "psp-1".into(),
            at: at(),
        },
        PaymentEvent::PaymentFailed {
            provider_reference: "psp-1".into(),
            at: at(),
        },
        PaymentEvent::PaymentTimedOut { at: at() },
        PaymentEvent::PaymentRefunded { at: at() },
    ] {
        out.push(sample(type_of_payment(&e), &e));
    }
    let all_steps = [
        SagaStep::ReserveStock,
        SagaStep::RejectOrder,
        SagaStep::RequestPayment,
        SagaStep::AwaitPayment,
        SagaStep::TimeOutPayment,
        SagaStep::ConfirmOrder,
        SagaStep::SellStock,
        SagaStep::CancelOrder,
        SagaStep::ReleaseStock,
        SagaStep::RefundPayment,
    ];
    for step in all_steps {
        let e = OrderSagaEvent::OrderSagaStepTaken {
            order_id: order,
            step,
            at: at(),
        };
        out.push(sample(type_of_saga(&e), &e));
    }
    let e = OrderSagaEvent::OrderSagaAdvanced {
        order_id: order,
        steps: all_steps.to_vec(),
        at: at(),
    };
    out.push(sample(type_of_saga(&e), &e));
    out
}

fn type_of_saga(e: &OrderSagaEvent) -> &'static str {
    match e {
        OrderSagaEvent::OrderSagaAdvanced { .. } => "OrderSagaAdvanced",
        OrderSagaEvent::OrderSagaStepTaken { .. } => "OrderSagaStepTaken",
    }
}

fn type_of_bucket(e: &StockBucketEvent) -> &'static str {
    match e {
        StockBucketEvent::StockMoved { .. } => "StockMoved",
        StockBucketEvent::StockTransferredOut { .. } => "StockTransferredOut",
        StockBucketEvent::StockTransferredIn { .. } => "StockTransferredIn",
    }
}

fn type_of_holding(e: &HoldingEvent) -> &'static str {
    match e {
        HoldingEvent::UnitsReserved { .. } => "UnitsReserved",
        HoldingEvent::UnitsReleased { .. } => "UnitsReleased",
        HoldingEvent::UnitsSold { .. } => "UnitsSold",
    }
}

fn type_of_user(e: &UserEvent) -> &'static str {
    match e {
        UserEvent::UserRegistered(_) => "UserRegistered",
    }
}

fn type_of_store(e: &StoreEvent) -> &'static str {
    match e {
        StoreEvent::StoreCreated(_) => "StoreCreated",
    }
}

fn type_of_campaign(e: &CampaignEvent) -> &'static str {
    match e {
        CampaignEvent::CampaignCreated(_) => "CampaignCreated",
        CampaignEvent::StockReplenished { .. } => "StockReplenished",
        CampaignEvent::CampaignClosed { .. } => "CampaignClosed",
        CampaignEvent::StockMoved { .. } => "StockMoved",
        CampaignEvent::StockTransferredOut { .. } => "StockTransferredOut",
        CampaignEvent::StockTransferredIn { .. } => "StockTransferredIn",
        CampaignEvent::StockReserved { .. } => "StockReserved",
        CampaignEvent::StockReleased { .. } => "StockReleased",
        CampaignEvent::StockSold { .. } => "StockSold",
    }
}

fn type_of_order(e: &OrderEvent) -> &'static str {
    match e {
        OrderEvent::OrderPlaced { .. } => "OrderPlaced",
        OrderEvent::OrderRejected { .. } => "OrderRejected",
        OrderEvent::OrderAwaitingPayment { .. } => "OrderAwaitingPayment",
        OrderEvent::OrderConfirmed { .. } => "OrderConfirmed",
        OrderEvent::OrderCancelled { .. } => "OrderCancelled",
    }
}

fn type_of_payment(e: &PaymentEvent) -> &'static str {
    match e {
        PaymentEvent::PaymentRequested { .. } => "PaymentRequested",
        PaymentEvent::PaymentSucceeded { .. } => "PaymentSucceeded",
        PaymentEvent::PaymentFailed { .. } => "PaymentFailed",
        PaymentEvent::PaymentTimedOut { .. } => "PaymentTimedOut",
        PaymentEvent::PaymentRefunded { .. } => "PaymentRefunded",
    }
}

/// Decodes a stored payload as `E` and serializes it again, tagged.
fn round_trip<E: Serialize + DeserializeOwned>(
    event_type: &str,
    version: u32,
    data: serde_json::Value,
) -> serde_json::Value {
    let event: E = schemas::decode(event_type, version, data).unwrap();
    serde_json::to_value(&event).unwrap()
}

#[test]
fn every_event_type_has_a_schema_and_every_schema_an_event_type() {
    let event_types: BTreeSet<&str> = samples().iter().map(|(t, _, _)| *t).collect();
    let registered: BTreeSet<&str> = EVENT_SCHEMAS.iter().map(|s| s.event_type).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("events");
    let files: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    let registered_files: BTreeSet<String> = EVENT_SCHEMAS
        .iter()
        .map(|s| format!("{}.v{}.json", s.event_type, s.schema_version))
        .collect();
    assert_eq!(
        event_types, registered,
        "event types and registered schemas differ"
    );
    assert_eq!(
        files, registered_files,
        "schema files and the registry table differ"
    );
}

#[test]
fn every_serialized_event_validates_and_decodes_back_to_itself() {
    for (event_type, tagged, round_trip) in samples() {
        let encoded = schemas::encode(&tagged).unwrap_or_else(|e| panic!("{event_type}: {e}"));
        assert_eq!(encoded.event_type, event_type);
        let again = round_trip(&encoded.event_type, encoded.schema_version, encoded.data);
        assert_eq!(again, tagged, "{event_type} changed on the way through");
    }
}

#[test]
fn a_payload_that_breaks_its_schema_is_refused_with_the_path_of_the_problem() {
    let bad = serde_json::json!({"type": "StockReserved", "data": {
        "order_id": "not-a-ulid", "user_id": id(2).to_string(), "quantity": 0, "at": "yesterday"}});
    let error = schemas::encode(&bad).unwrap_err().to_string();
    for needle in ["/order_id", "/quantity", "/at"] {
        assert!(error.contains(needle), "{needle} missing from: {error}");
    }
}

#[test]
fn a_campaign_created_before_buckets_reads_back_as_one_bucket() {
    let v1 = serde_json::json!({
        "campaign_id": id(3).to_string(), "store_id": id(5).to_string(), "sku": "IPA",
        "title": "IPA", "price_cents": 100, "quota": 10, "per_user_limit": 2,
        "starts_at": "2026-01-01T00:00:00Z", "ends_at": "2026-01-02T00:00:00Z",
        "payment_timeout_seconds": 60, "created_at": "2026-01-01T00:00:00Z"
    });
    let event: CampaignEvent = schemas::decode("CampaignCreated", 1, v1).unwrap();
    let CampaignEvent::CampaignCreated(created) = event else {
        panic!("{event:?}")
    };
    assert_eq!(created.stock_buckets, 1);
    assert_eq!(created.quota, 10);
}

#[test]
fn an_unknown_field_in_a_stored_payload_is_refused() {
    let data = serde_json::json!({"at": "2026-01-01T00:00:00Z", "extra": 1});
    let error = schemas::decode::<PaymentEvent>("PaymentTimedOut", 1, data).unwrap_err();
    assert!(
        matches!(error, schemas::SchemaError::Invalid { .. }),
        "{error}"
    );
}

/// A campaign's `CampaignClosed` with this metadata.
fn closed_with(metadata: schemas::Metadata) -> schemas::Envelope {
    schemas::Envelope {
        event_id: id(9),
        stream_id: format!("campaign-{}", id(3)),
        stream_version: 1,
        global_position: 1,
        event_type: "CampaignClosed".into(),
        schema_version: 1,
        recorded_at: at(),
        metadata,
        data: serde_json::json!({"at": "2026-01-01T00:00:00Z"}),
    }
}

#[test]
fn an_envelope_with_its_metadata_validates_and_a_broken_one_does_not() {
    let envelope = closed_with(schemas::Metadata {
        actor: Some("operator".into()),
        ..Default::default()
    });
    assert_eq!(envelope.category(), "campaign");
    let mut value = serde_json::to_value(&envelope).unwrap();
    Registry::global().validate_envelope(&value).unwrap();
    value["stream_version"] = serde_json::json!(0);
    assert!(Registry::global().validate_envelope(&value).is_err());
}

#[test]
fn an_envelope_may_carry_the_span_that_recorded_it_or_not() {
    let envelope = |span_id: Option<&str>| {
        closed_with(schemas::Metadata {
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            span_id: span_id.map(str::to_owned),
            ..Default::default()
        })
    };
    let registry = Registry::global();
    let without = serde_json::to_value(envelope(None)).unwrap();
    assert!(
        without["metadata"].get("span_id").is_none(),
        "events without a span are written as before"
    );
    registry.validate_envelope(&without).unwrap();
    let with = serde_json::to_value(envelope(Some("00f067aa0ba902b7"))).unwrap();
    registry.validate_envelope(&with).unwrap();
    let round: schemas::Envelope = serde_json::from_value(with).unwrap();
    assert_eq!(round.metadata.span_id.as_deref(), Some("00f067aa0ba902b7"));
    let malformed = serde_json::to_value(envelope(Some("not-a-span"))).unwrap();
    assert!(registry.validate_envelope(&malformed).is_err());
}
