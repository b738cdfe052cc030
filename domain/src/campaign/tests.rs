use chrono::{Duration, TimeZone};
use ulid::Ulid;

use super::*;
use crate::scenario::given;

fn at(seconds: i64) -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000 + seconds, 0)
        .unwrap()
}

const STARTS: i64 = 100;
const ENDS: i64 = 10_000;

fn campaign_id() -> CampaignId {
    CampaignId::from_ulid(Ulid::from_parts(1, 10))
}

fn store() -> Store {
    Store {
        store_id: StoreId::from_ulid(Ulid::from_parts(1, 20)),
        name: "Corner Cellar".into(),
        region: "north".into(),
        created_at: at(0),
    }
}

fn new_campaign() -> NewCampaign {
    NewCampaign {
        campaign_id: campaign_id(),
        store: Some(store()),
        sku: "IPA-330".into(),
        title: "Hazy IPA six-pack".into(),
        price_cents: 1_250,
        quota: 10,
        per_user_limit: 3,
        starts_at: at(STARTS),
        ends_at: at(ENDS),
        payment_timeout_seconds: 600,
        stock_buckets: 1,
        now: at(0),
    }
}

fn created() -> CampaignEvent {
    created_with(10, 3)
}

fn created_with(quota: u32, per_user_limit: u32) -> CampaignEvent {
    CampaignEvent::CampaignCreated(CampaignCreated {
        campaign_id: campaign_id(),
        store_id: store().store_id,
        sku: "IPA-330".into(),
        title: "Hazy IPA six-pack".into(),
        price_cents: Cents::new(1_250),
        quota,
        per_user_limit,
        starts_at: at(STARTS),
        ends_at: at(ENDS),
        payment_timeout_seconds: 600,
        stock_buckets: 1,
        created_at: at(0),
    })
}

fn in_buckets(stock_buckets: u32) -> CampaignEvent {
    let CampaignEvent::CampaignCreated(created) = created() else {
        unreachable!()
    };
    CampaignEvent::CampaignCreated(CampaignCreated {
        stock_buckets,
        ..created
    })
}

fn moved(reserved: u32, released: u32) -> CampaignEvent {
    CampaignEvent::StockMoved {
        reserved,
        released,
        sold: 0,
        at: at(500),
    }
}

fn move_stock(reserved: u32, released: u32) -> CampaignCommand {
    CampaignCommand::Move(StockMove {
        reserved,
        released,
        sold: 0,
        now: at(500),
    })
}

fn user(n: u64) -> UserId {
    UserId::from_ulid(Ulid::from_parts(2, n.into()))
}

fn order(n: u64) -> OrderId {
    OrderId::from_ulid(Ulid::from_parts(3, n.into()))
}

fn invalid(field: &'static str, problem: &'static str) -> DomainError {
    DomainError::InvalidInput { field, problem }
}

// --- create ---

#[test]
fn given_nothing_when_created_then_campaign_created_with_full_stock() {
    let state = given::<CampaignAggregate>([])
        .when(CampaignCommand::Create(new_campaign()))
        .then([created()]);
    let campaign = state.expect("created");
    assert_eq!((campaign.total_units, campaign.available_units), (10, 10));
    assert_eq!(campaign.stock_buckets, 1);
    assert_eq!(campaign.status(at(0)), CampaignStatus::Scheduled);
    assert_eq!(campaign.status(at(STARTS)), CampaignStatus::Open);
    assert_eq!(campaign.status(at(ENDS)), CampaignStatus::Closed);
}

#[test]
fn given_a_campaign_when_created_again_then_campaign_already_exists() {
    given::<CampaignAggregate>([created()])
        .when(CampaignCommand::Create(new_campaign()))
        .then_err(DomainError::CampaignAlreadyExists);
}

#[test]
fn given_nothing_when_created_for_an_unknown_store_then_store_not_found() {
    let new = NewCampaign {
        store: None,
        ..new_campaign()
    };
    given::<CampaignAggregate>([])
        .when(CampaignCommand::Create(new))
        .then_err(DomainError::StoreNotFound);
}

#[test]
fn given_nothing_when_created_with_bad_terms_then_each_is_refused_with_its_field() {
    let cases: Vec<(NewCampaign, DomainError)> = vec![
        (
            NewCampaign {
                sku: " ".into(),
                ..new_campaign()
            },
            invalid("sku", "must not be empty"),
        ),
        (
            NewCampaign {
                title: "t".repeat(201),
                ..new_campaign()
            },
            invalid("title", "is too long"),
        ),
        (
            NewCampaign {
                price_cents: 0,
                ..new_campaign()
            },
            invalid("price_cents", "must be between 1 and 100000000"),
        ),
        (
            NewCampaign {
                price_cents: PRICE_CENTS_MAX + 1,
                ..new_campaign()
            },
            invalid("price_cents", "must be between 1 and 100000000"),
        ),
        (
            NewCampaign {
                quota: 0,
                ..new_campaign()
            },
            invalid("quota", "must be between 1 and 10000000"),
        ),
        (
            NewCampaign {
                per_user_limit: 0,
                ..new_campaign()
            },
            invalid("per_user_limit", "must be between 1 and 10000"),
        ),
        (
            NewCampaign {
                payment_timeout_seconds: 0,
                ..new_campaign()
            },
            invalid("payment_timeout_seconds", "must be between 1 and 86400"),
        ),
        (
            NewCampaign {
                ends_at: at(STARTS),
                ..new_campaign()
            },
            invalid("ends_at", "must be after starts_at"),
        ),
        (
            NewCampaign {
                starts_at: at(-500),
                ends_at: at(-10),
                ..new_campaign()
            },
            invalid("ends_at", "must be in the future"),
        ),
        (
            NewCampaign {
                ends_at: at(STARTS) + Duration::days(367),
                ..new_campaign()
            },
            invalid("ends_at", "must be at most 366 days after starts_at"),
        ),
        (
            NewCampaign {
                stock_buckets: 0,
                ..new_campaign()
            },
            invalid("stock_buckets", "must be between 1 and 64"),
        ),
        (
            NewCampaign {
                stock_buckets: 65,
                ..new_campaign()
            },
            invalid("stock_buckets", "must be between 1 and 64"),
        ),
    ];
    for (new, error) in cases {
        given::<CampaignAggregate>([])
            .when(CampaignCommand::Create(new))
            .then_err(error);
    }
}

// --- replenish ---

#[test]
fn given_a_campaign_when_replenished_then_total_and_available_grow() {
    let state = given::<CampaignAggregate>([created(), moved(2, 0)])
        .when(CampaignCommand::Replenish {
            quantity: 5,
            now: at(1),
        })
        .then([CampaignEvent::StockReplenished {
            quantity: 5,
            at: at(1),
        }]);
    let campaign = state.unwrap();
    assert_eq!((campaign.total_units, campaign.available_units), (15, 13));
}

#[test]
fn given_no_campaign_when_replenished_then_campaign_not_found() {
    given::<CampaignAggregate>([])
        .when(CampaignCommand::Replenish {
            quantity: 5,
            now: at(1),
        })
        .then_err(DomainError::CampaignNotFound);
}

#[test]
fn given_a_closed_campaign_when_replenished_then_campaign_closed() {
    given::<CampaignAggregate>([created(), CampaignEvent::CampaignClosed { at: at(1) }])
        .when(CampaignCommand::Replenish {
            quantity: 5,
            now: at(2),
        })
        .then_err(DomainError::CampaignClosed);
}

#[test]
fn given_a_campaign_when_replenished_with_nothing_then_invalid_input() {
    given::<CampaignAggregate>([created()])
        .when(CampaignCommand::Replenish {
            quantity: 0,
            now: at(1),
        })
        .then_err(invalid("quantity", "must be at least 1"));
}

#[test]
fn given_a_campaign_when_replenished_past_the_total_limit_then_invalid_input() {
    given::<CampaignAggregate>([created()])
        .when(CampaignCommand::Replenish {
            quantity: CAMPAIGN_TOTAL_UNITS_MAX,
            now: at(1),
        })
        .then_err(invalid(
            "quantity",
            "would take the campaign over 10000000 units in total",
        ));
}

// --- close ---

#[test]
fn given_an_open_campaign_when_closed_then_campaign_closed_and_no_longer_open() {
    let state = given::<CampaignAggregate>([created()])
        .when(CampaignCommand::Close { now: at(200) })
        .then([CampaignEvent::CampaignClosed { at: at(200) }]);
    assert_eq!(state.unwrap().status(at(300)), CampaignStatus::Closed);
}

#[test]
fn given_a_closed_campaign_when_closed_again_then_nothing_happens() {
    given::<CampaignAggregate>([created(), CampaignEvent::CampaignClosed { at: at(1) }])
        .when(CampaignCommand::Close { now: at(2) })
        .then_nothing();
}

#[test]
fn given_no_campaign_when_closed_then_campaign_not_found() {
    given::<CampaignAggregate>([])
        .when(CampaignCommand::Close { now: at(2) })
        .then_err(DomainError::CampaignNotFound);
}

// --- the bucket: moves and transfers ---

#[test]
fn given_a_campaign_when_a_decision_takes_and_gives_back_units_then_stock_moved() {
    let state = given::<CampaignAggregate>([created(), moved(4, 0)])
        .when(move_stock(3, 1))
        .then([moved(3, 1)]);
    let campaign = state.unwrap();
    assert_eq!((campaign.total_units, campaign.available_units), (10, 4));
}

#[test]
fn given_a_campaign_in_buckets_its_stock_is_told_from_every_bucket() {
    let sold = CampaignEvent::StockMoved {
        reserved: 0,
        released: 0,
        sold: 2,
        at: at(600),
    };
    let campaign = CampaignAggregate::fold(&[created(), moved(5, 1), sold]).unwrap();
    let other = crate::stock::StockBucket {
        available_units: 0,
        sold_units: 1,
    };
    assert_eq!(
        campaign.stock([&other]),
        Stock {
            total: 10,
            available: 6,
            reserved: 1,
            sold: 3
        }
    );
}

#[test]
fn given_a_campaign_when_a_decision_takes_more_than_its_bucket_holds_then_sold_out() {
    given::<CampaignAggregate>([created(), moved(8, 0)])
        .when(move_stock(3, 0))
        .then_err(DomainError::SoldOut);
}

#[test]
fn given_a_campaign_when_a_decision_moves_nothing_then_nothing_happens() {
    given::<CampaignAggregate>([created()])
        .when(move_stock(0, 0))
        .then_nothing();
}

#[test]
fn given_no_campaign_when_stock_moves_then_campaign_not_found() {
    given::<CampaignAggregate>([])
        .when(move_stock(1, 0))
        .then_err(DomainError::CampaignNotFound);
}

#[test]
fn given_a_campaign_in_buckets_when_it_gives_units_to_another_then_its_bucket_shrinks() {
    let state = given::<CampaignAggregate>([in_buckets(4)])
        .when(CampaignCommand::TransferOut {
            to_bucket: 2,
            units: 6,
            now: at(1),
        })
        .then([CampaignEvent::StockTransferredOut {
            to_bucket: 2,
            units: 6,
            at: at(1),
        }]);
    let campaign = state.unwrap();
    assert_eq!((campaign.total_units, campaign.available_units), (10, 4));
}

#[test]
fn given_a_campaign_in_buckets_when_it_takes_units_back_then_its_bucket_grows() {
    let out = CampaignEvent::StockTransferredOut {
        to_bucket: 2,
        units: 6,
        at: at(1),
    };
    let state = given::<CampaignAggregate>([in_buckets(4), out])
        .when(CampaignCommand::TransferIn {
            from_bucket: 2,
            units: 5,
            now: at(2),
        })
        .then([CampaignEvent::StockTransferredIn {
            from_bucket: 2,
            units: 5,
            at: at(2),
        }]);
    assert_eq!(state.unwrap().available_units, 9);
}

#[test]
fn given_a_campaign_in_buckets_when_it_gives_more_than_it_holds_then_sold_out() {
    given::<CampaignAggregate>([in_buckets(4)])
        .when(CampaignCommand::TransferOut {
            to_bucket: 1,
            units: 11,
            now: at(1),
        })
        .then_err(DomainError::SoldOut);
}

#[test]
fn given_a_campaign_when_a_transfer_names_no_other_bucket_then_invalid_input() {
    for (stock_buckets, other) in [(1, 1), (4, 0), (4, 4)] {
        given::<CampaignAggregate>([in_buckets(stock_buckets)])
            .when(CampaignCommand::TransferOut {
                to_bucket: other,
                units: 1,
                now: at(1),
            })
            .then_err(invalid("bucket", "must be another bucket of the campaign"));
    }
}

#[test]
fn given_a_campaign_in_buckets_when_a_transfer_moves_nothing_then_invalid_input() {
    given::<CampaignAggregate>([in_buckets(4)])
        .when(CampaignCommand::TransferIn {
            from_bucket: 1,
            units: 0,
            now: at(1),
        })
        .then_err(invalid("units", "must be at least 1"));
}

#[test]
fn events_recorded_before_holdings_still_fold_into_the_bucket() {
    let reserved = CampaignEvent::StockReserved {
        order_id: order(1),
        user_id: user(1),
        quantity: 3,
        at: at(500),
    };
    let released = CampaignEvent::StockReleased {
        order_id: order(1),
        user_id: user(1),
        quantity: 1,
        reason: CancelReason::Customer,
        at: at(600),
    };
    let sold = CampaignEvent::StockSold {
        order_id: order(2),
        user_id: user(1),
        quantity: 2,
        at: at(700),
    };
    let campaign = CampaignAggregate::fold(&[created(), reserved, released, sold]).unwrap();
    assert_eq!(
        campaign.stock([]),
        Stock {
            total: 10,
            available: 8,
            reserved: 0,
            sold: 2
        }
    );
}

#[test]
#[should_panic(expected = "unit count underflow")]
fn evolving_a_move_the_bucket_cannot_cover_is_a_bug_not_a_clamp() {
    CampaignAggregate::fold(&[created(), moved(11, 0)]);
}
