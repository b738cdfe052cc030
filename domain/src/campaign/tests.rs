use chrono::{Duration, TimeZone};
use proptest::prelude::*;
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

fn user(n: u64) -> UserId {
    UserId::from_ulid(Ulid::from_parts(2, n.into()))
}

fn order(n: u64) -> OrderId {
    OrderId::from_ulid(Ulid::from_parts(3, n.into()))
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
        created_at: at(0),
    })
}

fn reserve(order_n: u64, user_n: u64, quantity: u32) -> CampaignCommand {
    CampaignCommand::Reserve {
        order_id: order(order_n),
        user_id: user(user_n),
        quantity,
        now: at(500),
    }
}

fn reserved(order_n: u64, user_n: u64, quantity: u32) -> CampaignEvent {
    CampaignEvent::StockReserved {
        order_id: order(order_n),
        user_id: user(user_n),
        quantity,
        at: at(500),
    }
}

fn released(order_n: u64, user_n: u64, quantity: u32) -> CampaignEvent {
    CampaignEvent::StockReleased {
        order_id: order(order_n),
        user_id: user(user_n),
        quantity,
        reason: CancelReason::Customer,
        at: at(600),
    }
}

fn sold(order_n: u64, user_n: u64, quantity: u32) -> CampaignEvent {
    CampaignEvent::StockSold {
        order_id: order(order_n),
        user_id: user(user_n),
        quantity,
        at: at(700),
    }
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
    assert_eq!(
        campaign.stock,
        Stock {
            total: 10,
            available: 10,
            reserved: 0,
            sold: 0
        }
    );
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
    let state = given::<CampaignAggregate>([created(), reserved(1, 1, 2)])
        .when(CampaignCommand::Replenish {
            quantity: 5,
            now: at(1),
        })
        .then([CampaignEvent::StockReplenished {
            quantity: 5,
            at: at(1),
        }]);
    assert_eq!(
        state.unwrap().stock,
        Stock {
            total: 15,
            available: 13,
            reserved: 2,
            sold: 0
        }
    );
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

// --- reserve ---

#[test]
fn given_an_open_campaign_when_stock_is_reserved_then_units_move_to_reserved() {
    let state = given::<CampaignAggregate>([created()])
        .when(reserve(1, 1, 2))
        .then([reserved(1, 1, 2)]);
    let campaign = state.unwrap();
    assert_eq!(
        campaign.stock,
        Stock {
            total: 10,
            available: 8,
            reserved: 2,
            sold: 0
        }
    );
    assert_eq!(campaign.holding_of(user(1)), 2);
}

#[test]
fn given_an_order_already_reserved_when_reserved_again_then_nothing_happens() {
    given::<CampaignAggregate>([created(), reserved(1, 1, 2)])
        .when(reserve(1, 1, 2))
        .then_nothing();
}

#[test]
fn given_an_order_already_released_when_reserved_again_then_nothing_happens() {
    given::<CampaignAggregate>([created(), reserved(1, 1, 2), released(1, 1, 2)])
        .when(reserve(1, 1, 2))
        .then_nothing();
}

#[test]
fn given_an_open_campaign_when_reserving_zero_units_then_invalid_input() {
    given::<CampaignAggregate>([created()])
        .when(reserve(1, 1, 0))
        .then_err(invalid("quantity", "must be between 1 and 10000"));
}

#[test]
fn given_a_scheduled_campaign_when_stock_is_reserved_then_campaign_not_open() {
    let early = CampaignCommand::Reserve {
        order_id: order(1),
        user_id: user(1),
        quantity: 1,
        now: at(STARTS - 1),
    };
    given::<CampaignAggregate>([created()])
        .when(early)
        .then_err(DomainError::CampaignNotOpen);
}

#[test]
fn given_an_ended_campaign_when_stock_is_reserved_then_campaign_not_open() {
    let late = CampaignCommand::Reserve {
        order_id: order(1),
        user_id: user(1),
        quantity: 1,
        now: at(ENDS),
    };
    given::<CampaignAggregate>([created()])
        .when(late)
        .then_err(DomainError::CampaignNotOpen);
}

#[test]
fn given_a_closed_campaign_when_stock_is_reserved_then_campaign_not_open() {
    given::<CampaignAggregate>([created(), CampaignEvent::CampaignClosed { at: at(150) }])
        .when(reserve(1, 1, 1))
        .then_err(DomainError::CampaignNotOpen);
}

#[test]
fn given_a_user_holding_units_when_they_reserve_past_the_limit_then_limit_exceeded() {
    given::<CampaignAggregate>([created(), reserved(1, 1, 2)])
        .when(reserve(2, 1, 2))
        .then_err(DomainError::LimitExceeded);
}

#[test]
fn given_a_user_holding_sold_units_when_they_reserve_past_the_limit_then_limit_exceeded() {
    given::<CampaignAggregate>([created(), reserved(1, 1, 3), sold(1, 1, 3)])
        .when(reserve(2, 1, 1))
        .then_err(DomainError::LimitExceeded);
}

#[test]
fn given_a_user_whose_units_were_released_when_they_reserve_again_then_the_limit_counts_only_live_units(
) {
    given::<CampaignAggregate>([created(), reserved(1, 1, 3), released(1, 1, 3)])
        .when(reserve(2, 1, 3))
        .then([reserved(2, 1, 3)]);
}

#[test]
fn given_too_few_units_left_when_stock_is_reserved_then_sold_out() {
    given::<CampaignAggregate>([
        created(),
        reserved(1, 1, 3),
        reserved(2, 2, 3),
        reserved(3, 3, 3),
    ])
    .when(reserve(4, 4, 2))
    .then_err(DomainError::SoldOut);
}

#[test]
fn given_no_campaign_when_stock_is_reserved_then_campaign_not_found() {
    given::<CampaignAggregate>([])
        .when(reserve(1, 1, 1))
        .then_err(DomainError::CampaignNotFound);
}

// --- release ---

#[test]
fn given_a_reservation_when_released_then_units_return_to_available() {
    let release = CampaignCommand::Release {
        order_id: order(1),
        reason: CancelReason::Customer,
        now: at(600),
    };
    let state = given::<CampaignAggregate>([created(), reserved(1, 1, 2)])
        .when(release)
        .then([released(1, 1, 2)]);
    let campaign = state.unwrap();
    assert_eq!(
        campaign.stock,
        Stock {
            total: 10,
            available: 10,
            reserved: 0,
            sold: 0
        }
    );
    assert_eq!(campaign.holding_of(user(1)), 0);
}

#[test]
fn given_a_released_reservation_when_released_again_then_nothing_happens() {
    let release = CampaignCommand::Release {
        order_id: order(1),
        reason: CancelReason::Customer,
        now: at(601),
    };
    given::<CampaignAggregate>([created(), reserved(1, 1, 2), released(1, 1, 2)])
        .when(release)
        .then_nothing();
}

#[test]
fn given_a_sold_reservation_when_released_then_reservation_sold() {
    let release = CampaignCommand::Release {
        order_id: order(1),
        reason: CancelReason::Customer,
        now: at(800),
    };
    given::<CampaignAggregate>([created(), reserved(1, 1, 2), sold(1, 1, 2)])
        .when(release)
        .then_err(DomainError::ReservationSold);
}

#[test]
fn given_no_reservation_when_released_then_reservation_not_found() {
    let release = CampaignCommand::Release {
        order_id: order(9),
        reason: CancelReason::Customer,
        now: at(800),
    };
    given::<CampaignAggregate>([created()])
        .when(release)
        .then_err(DomainError::ReservationNotFound);
}

// --- sell ---

#[test]
fn given_a_reservation_when_sold_then_units_move_to_sold() {
    let state = given::<CampaignAggregate>([created(), reserved(1, 1, 2)])
        .when(CampaignCommand::Sell {
            order_id: order(1),
            now: at(700),
        })
        .then([sold(1, 1, 2)]);
    let campaign = state.unwrap();
    assert_eq!(
        campaign.stock,
        Stock {
            total: 10,
            available: 8,
            reserved: 0,
            sold: 2
        }
    );
    assert_eq!(campaign.holding_of(user(1)), 2);
}

#[test]
fn given_a_sold_reservation_when_sold_again_then_nothing_happens() {
    given::<CampaignAggregate>([created(), reserved(1, 1, 2), sold(1, 1, 2)])
        .when(CampaignCommand::Sell {
            order_id: order(1),
            now: at(701),
        })
        .then_nothing();
}

#[test]
fn given_a_released_reservation_when_sold_then_reservation_released() {
    given::<CampaignAggregate>([created(), reserved(1, 1, 2), released(1, 1, 2)])
        .when(CampaignCommand::Sell {
            order_id: order(1),
            now: at(701),
        })
        .then_err(DomainError::ReservationReleased);
}

#[test]
fn given_no_reservation_when_sold_then_reservation_not_found() {
    given::<CampaignAggregate>([created()])
        .when(CampaignCommand::Sell {
            order_id: order(1),
            now: at(701),
        })
        .then_err(DomainError::ReservationNotFound);
}

#[test]
#[should_panic(expected = "unit count underflow")]
fn evolving_a_reservation_the_stock_cannot_cover_is_a_bug_not_a_clamp() {
    CampaignAggregate::fold(&[created_with(1, 5), reserved(1, 1, 2)]);
}

// --- properties ---

/// One step a random client might take against a campaign.
#[derive(Clone, Debug)]
enum Step {
    Reserve {
        order: u64,
        user: u64,
        quantity: u32,
    },
    Release {
        order: u64,
    },
    Sell {
        order: u64,
    },
    Replenish {
        quantity: u32,
    },
    Close,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0..40u64, 0..6u64, 0..5u32).prop_map(|(order, user, quantity)| Step::Reserve { order, user, quantity }),
        3 => (0..40u64).prop_map(|order| Step::Release { order }),
        3 => (0..40u64).prop_map(|order| Step::Sell { order }),
        1 => (0..4u32).prop_map(|quantity| Step::Replenish { quantity }),
        1 => Just(Step::Close),
    ]
}

proptest! {
    /// Whatever clients ask, in whatever order, stock adds up and nobody exceeds the limit.
    #[test]
    fn random_command_sequences_never_break_stock_or_the_per_user_limit(
        quota in 1..20u32,
        limit in 1..5u32,
        steps in proptest::collection::vec(step(), 0..80),
    ) {
        let mut state = CampaignAggregate::fold(&[created_with(quota, limit)]);
        for step in steps {
            let now = at(500);
            let command = match step {
                Step::Reserve { order: o, user: u, quantity } =>
                    CampaignCommand::Reserve { order_id: order(o), user_id: user(u), quantity, now },
                Step::Release { order: o } =>
                    CampaignCommand::Release { order_id: order(o), reason: CancelReason::PaymentTimeout, now },
                Step::Sell { order: o } => CampaignCommand::Sell { order_id: order(o), now },
                Step::Replenish { quantity } => CampaignCommand::Replenish { quantity, now },
                Step::Close => CampaignCommand::Close { now },
            };
            if let Ok(events) = CampaignAggregate::decide(&state, &command) {
                state = events.iter().fold(state, CampaignAggregate::evolve);
            }
            let campaign = state.as_ref().unwrap();
            // Checked here independently of evolve's own assertions, from the reservations.
            let live_of = |u: UserId| -> u32 {
                campaign.reservations.values()
                    .filter(|r| r.user_id == u && r.state != ReservationState::Released)
                    .map(|r| r.quantity)
                    .sum()
            };
            prop_assert!(campaign.stock.is_consistent());
            let reserved: u32 = campaign.reservations.values()
                .filter(|r| r.state == ReservationState::Reserved).map(|r| r.quantity).sum();
            let sold: u32 = campaign.reservations.values()
                .filter(|r| r.state == ReservationState::Sold).map(|r| r.quantity).sum();
            prop_assert_eq!(campaign.stock.reserved, reserved);
            prop_assert_eq!(campaign.stock.sold, sold);
            for u in 0..6 {
                prop_assert!(live_of(user(u)) <= limit);
                prop_assert_eq!(campaign.holding_of(user(u)), live_of(user(u)));
            }
        }
    }
}
