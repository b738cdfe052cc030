use chrono::TimeZone;
use ulid::Ulid;

use super::*;
use crate::scenario::given;

fn at(seconds: i64) -> Timestamp {
    chrono::Utc
        .timestamp_opt(1_700_000_000 + seconds, 0)
        .unwrap()
}

fn campaign_id() -> CampaignId {
    CampaignId::from_ulid(Ulid::from_parts(1, 10))
}

fn user_id() -> UserId {
    UserId::from_ulid(Ulid::from_parts(2, 1))
}

fn order(n: u64) -> OrderId {
    OrderId::from_ulid(Ulid::from_parts(3, n.into()))
}

const LIMIT: u32 = 3;

fn reserve(n: u64, quantity: u32) -> HoldingCommand {
    HoldingCommand::Reserve {
        order_id: order(n),
        campaign_id: campaign_id(),
        user_id: user_id(),
        quantity,
        bucket: 0,
        per_user_limit: LIMIT,
        now: at(10),
    }
}

fn reserved(n: u64, quantity: u32) -> HoldingEvent {
    HoldingEvent::UnitsReserved {
        order_id: order(n),
        campaign_id: campaign_id(),
        user_id: user_id(),
        quantity,
        bucket: 0,
        at: at(10),
    }
}

fn release(n: u64) -> HoldingCommand {
    HoldingCommand::Release {
        order_id: order(n),
        campaign_id: campaign_id(),
        user_id: user_id(),
        bucket: 1,
        reason: CancelReason::Customer,
        now: at(20),
    }
}

fn released(n: u64, quantity: u32) -> HoldingEvent {
    HoldingEvent::UnitsReleased {
        order_id: order(n),
        campaign_id: campaign_id(),
        user_id: user_id(),
        quantity,
        bucket: 1,
        reason: CancelReason::Customer,
        at: at(20),
    }
}

fn sell(n: u64) -> HoldingCommand {
    HoldingCommand::Sell {
        order_id: order(n),
        campaign_id: campaign_id(),
        user_id: user_id(),
        now: at(30),
    }
}

fn sold(n: u64, quantity: u32) -> HoldingEvent {
    HoldingEvent::UnitsSold {
        order_id: order(n),
        campaign_id: campaign_id(),
        user_id: user_id(),
        quantity,
        at: at(30),
    }
}

#[test]
fn given_nothing_when_units_are_reserved_then_the_order_holds_them() {
    let state = given::<HoldingAggregate>([])
        .when(reserve(1, 2))
        .then([reserved(1, 2)]);
    assert_eq!(state.live_units, 2);
    assert_eq!(state.of(order(1)), Some(ReservationState::Reserved));
}

#[test]
fn given_an_order_holding_units_when_reserved_again_then_nothing_happens() {
    given::<HoldingAggregate>([reserved(1, 2)])
        .when(reserve(1, 2))
        .then_nothing();
}

#[test]
fn given_units_held_when_an_order_would_go_past_the_limit_then_limit_exceeded() {
    given::<HoldingAggregate>([reserved(1, 2)])
        .when(reserve(2, 2))
        .then_err(DomainError::LimitExceeded);
}

#[test]
fn given_sold_units_when_an_order_would_go_past_the_limit_then_limit_exceeded() {
    given::<HoldingAggregate>([reserved(1, 3), sold(1, 3)])
        .when(reserve(2, 1))
        .then_err(DomainError::LimitExceeded);
}

#[test]
fn given_released_units_when_reserving_again_then_the_limit_counts_only_live_units() {
    given::<HoldingAggregate>([reserved(1, 3), released(1, 3)])
        .when(reserve(2, 3))
        .then([reserved(2, 3)]);
}

#[test]
fn given_nothing_when_reserving_zero_units_then_invalid_input() {
    given::<HoldingAggregate>([])
        .when(reserve(1, 0))
        .then_err(DomainError::InvalidInput {
            field: "quantity",
            problem: "must be between 1 and 10000",
        });
}

#[test]
fn given_reserved_units_when_released_then_they_leave_the_holding() {
    let state = given::<HoldingAggregate>([reserved(1, 2)])
        .when(release(1))
        .then([released(1, 2)]);
    assert_eq!(state.live_units, 0);
    assert_eq!(state.of(order(1)), None);
}

#[test]
fn given_an_order_that_holds_nothing_when_released_then_nothing_happens() {
    given::<HoldingAggregate>([reserved(1, 2), released(1, 2)])
        .when(release(1))
        .then_nothing();
    given::<HoldingAggregate>([])
        .when(release(1))
        .then_nothing();
}

#[test]
fn given_sold_units_when_released_then_reservation_sold() {
    given::<HoldingAggregate>([reserved(1, 2), sold(1, 2)])
        .when(release(1))
        .then_err(DomainError::ReservationSold);
}

#[test]
fn given_reserved_units_when_sold_then_they_stay_live_as_sold() {
    let state = given::<HoldingAggregate>([reserved(1, 2)])
        .when(sell(1))
        .then([sold(1, 2)]);
    assert_eq!(state.live_units, 2);
    assert_eq!(state.of(order(1)), Some(ReservationState::Sold));
}

#[test]
fn given_sold_units_when_sold_again_then_nothing_happens() {
    given::<HoldingAggregate>([reserved(1, 2), sold(1, 2)])
        .when(sell(1))
        .then_nothing();
}

#[test]
fn given_an_order_that_holds_nothing_when_sold_then_reservation_not_found() {
    given::<HoldingAggregate>([])
        .when(sell(1))
        .then_err(DomainError::ReservationNotFound);
}

#[test]
#[should_panic(expected = "released without a reservation")]
fn evolving_a_release_of_nothing_is_a_bug_not_a_clamp() {
    HoldingAggregate::evolve(Holding::default(), &released(1, 2));
}

#[test]
fn a_holding_serializes_as_a_map_by_order_id_as_its_snapshots_always_have() {
    let order_id = OrderId::from_ulid(Ulid::from_parts(3, 1));
    let holding = Holding {
        live_units: 2,
        orders: OrdMap::from(vec![(
            order_id,
            Held {
                quantity: 2,
                state: ReservationState::Reserved,
            },
        )]),
    };
    let json = serde_json::to_value(&holding).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "live_units": 2,
            "orders": { order_id.to_string(): { "quantity": 2, "state": "reserved" } },
        })
    );
    assert_eq!(serde_json::from_value::<Holding>(json).unwrap(), holding);
}
