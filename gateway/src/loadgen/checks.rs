//! The invariants a sale must keep, judged from what the API shows once the load is over.
//!
//! Each check is a pure function of the campaign's stock and the run's orders as listed, so
//! it can be tested without a server. A check that cannot be judged yet (orders still
//! pending) says so instead of passing.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;
use ulid::Ulid;

use super::api::{Order, Stock};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It holds.
    Ok,
    /// It does not: the run fails.
    Failed,
    /// It could not be judged; the detail says why.
    Skipped,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Outcome::Ok => "ok",
            Outcome::Failed => "FAILED",
            Outcome::Skipped => "skipped",
        })
    }
}

/// One check and what it found.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: &'static str,
    /// How it came out.
    pub outcome: Outcome,
    /// The numbers behind the outcome.
    pub detail: String,
}

impl Check {
    fn new(name: &'static str, holds: bool, detail: String) -> Check {
        Check {
            name,
            outcome: if holds { Outcome::Ok } else { Outcome::Failed },
            detail,
        }
    }
}

/// What the checks look at.
pub struct Inputs<'a> {
    /// The campaign's stock after the load.
    pub stock: Stock,
    /// The campaign's most units per customer.
    pub per_user_limit: u32,
    /// This run's orders as the listing shows them.
    pub orders: &'a [Order],
    /// Orders the server accepted (answered 202) in this run.
    pub accepted: usize,
    /// Whether this run created the campaign, so no one else's orders hold its units.
    pub created: bool,
    /// Whether every order of this run had left `pending` when the stock was read.
    pub drained: bool,
}

/// Every check, in the order they are reported.
pub fn run(inputs: &Inputs<'_>) -> Vec<Check> {
    vec![
        stock_balances(inputs.stock),
        every_accepted_order_is_listed(inputs),
        held_units_match_the_stock(inputs),
        no_customer_is_over_the_limit(inputs),
    ]
}

/// Whether every check passed (skipped ones do not fail a run).
pub fn all_hold(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.outcome != Outcome::Failed)
}

/// Units the orders hold: those awaiting payment or confirmed, times their quantity.
fn held_units<'a>(orders: impl IntoIterator<Item = &'a Order>) -> i64 {
    orders
        .into_iter()
        .filter(|o| o.status.holds_units())
        .map(|o| i64::from(o.quantity))
        .sum()
}

fn stock_balances(stock: Stock) -> Check {
    let Stock {
        total,
        available,
        reserved,
        sold,
    } = stock;
    Check::new(
        "stock balances",
        available + reserved + sold == total && available >= 0 && reserved >= 0 && sold >= 0,
        format!("{available} available + {reserved} reserved + {sold} sold, of {total} in total"),
    )
}

fn every_accepted_order_is_listed(inputs: &Inputs<'_>) -> Check {
    let listed = inputs.orders.len();
    Check::new(
        "every accepted order is listed",
        listed == inputs.accepted,
        format!(
            "{listed} of {} accepted orders found in the campaign's listing",
            inputs.accepted
        ),
    )
}

fn held_units_match_the_stock(inputs: &Inputs<'_>) -> Check {
    const NAME: &str = "units held match the stock";
    let held = held_units(inputs.orders);
    let Stock {
        total,
        reserved,
        sold,
        ..
    } = inputs.stock;
    if !inputs.drained {
        return Check {
            name: NAME,
            outcome: Outcome::Skipped,
            detail: format!(
                "orders of this run were still pending: {held} units held, {reserved} reserved + {sold} sold"
            ),
        };
    }
    if inputs.created {
        Check::new(
            NAME,
            held == reserved + sold,
            format!("{held} units held by this run's orders, {reserved} reserved + {sold} sold"),
        )
    } else {
        // Others may hold units of a campaign this run did not create: ours are only a part.
        Check::new(
            NAME,
            held <= reserved + sold && reserved + sold <= total,
            format!(
                "{held} units held by this run's orders <= {reserved} reserved + {sold} sold <= {total} in total"
            ),
        )
    }
}

fn no_customer_is_over_the_limit(inputs: &Inputs<'_>) -> Check {
    let mut by_customer: HashMap<Ulid, Vec<&Order>> = HashMap::new();
    for order in inputs.orders {
        by_customer.entry(order.user_id).or_default().push(order);
    }
    let most = by_customer
        .values()
        .map(|orders| held_units(orders.iter().copied()))
        .max()
        .unwrap_or(0);
    let limit = i64::from(inputs.per_user_limit);
    let over = by_customer
        .values()
        .filter(|orders| held_units(orders.iter().copied()) > limit)
        .count();
    Check::new(
        "no customer over the per-user limit",
        over == 0,
        format!(
            "at most {most} units held by one customer, limit {limit}; {over} customers over it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::super::api::OrderStatus;
    use super::*;

    fn order(user: Ulid, status: OrderStatus, quantity: u32) -> Order {
        let now = chrono::Utc::now();
        Order {
            order_id: Ulid::new(),
            user_id: user,
            quantity,
            status,
            reason: None,
            created_at: now,
            updated_at: now,
        }
    }

    fn stock(total: i64, available: i64, reserved: i64, sold: i64) -> Stock {
        Stock {
            total,
            available,
            reserved,
            sold,
        }
    }

    fn outcomes(inputs: &Inputs<'_>) -> Vec<(&'static str, Outcome)> {
        run(inputs)
            .into_iter()
            .map(|c| (c.name, c.outcome))
            .collect()
    }

    #[test]
    fn a_sold_out_sale_whose_orders_hold_the_reserved_units_passes() {
        let (ada, bob) = (Ulid::new(), Ulid::new());
        let orders = [
            order(ada, OrderStatus::AwaitingPayment, 2),
            order(bob, OrderStatus::Confirmed, 1),
            order(bob, OrderStatus::Rejected, 1),
            order(ada, OrderStatus::Cancelled, 2),
        ];
        let inputs = Inputs {
            stock: stock(3, 0, 2, 1),
            per_user_limit: 2,
            orders: &orders,
            accepted: 4,
            created: true,
            drained: true,
        };
        let checks = run(&inputs);
        assert!(all_hold(&checks), "{checks:?}");
        assert!(checks.iter().all(|c| c.outcome == Outcome::Ok));
    }

    #[test]
    fn units_that_do_not_add_up_fail_the_balance() {
        let inputs = Inputs {
            stock: stock(10, 5, 3, 1),
            per_user_limit: 2,
            orders: &[],
            accepted: 0,
            created: false,
            drained: true,
        };
        let checks = run(&inputs);
        assert_eq!(checks[0].outcome, Outcome::Failed);
        assert_eq!(
            checks[0].detail,
            "5 available + 3 reserved + 1 sold, of 10 in total"
        );
        assert!(!all_hold(&checks));
    }

    #[test]
    fn negative_available_units_fail_the_balance_even_when_they_add_up() {
        let inputs = Inputs {
            stock: stock(10, -1, 11, 0),
            per_user_limit: 20,
            orders: &[],
            accepted: 0,
            created: false,
            drained: true,
        };
        assert_eq!(run(&inputs)[0].outcome, Outcome::Failed);
    }

    #[test]
    fn an_accepted_order_missing_from_the_listing_fails() {
        let orders = [order(Ulid::new(), OrderStatus::Rejected, 1)];
        let inputs = Inputs {
            stock: stock(10, 10, 0, 0),
            per_user_limit: 2,
            orders: &orders,
            accepted: 2,
            created: true,
            drained: true,
        };
        assert_eq!(
            outcomes(&inputs)[1],
            ("every accepted order is listed", Outcome::Failed)
        );
    }

    #[test]
    fn units_reserved_for_nobody_fail_on_a_campaign_of_this_run() {
        let orders = [order(Ulid::new(), OrderStatus::AwaitingPayment, 1)];
        let inputs = Inputs {
            stock: stock(10, 8, 2, 0),
            per_user_limit: 2,
            orders: &orders,
            accepted: 1,
            created: true,
            drained: true,
        };
        assert_eq!(
            outcomes(&inputs)[2],
            ("units held match the stock", Outcome::Failed)
        );
    }

    #[test]
    fn others_may_hold_units_of_a_campaign_this_run_did_not_create() {
        let orders = [order(Ulid::new(), OrderStatus::AwaitingPayment, 1)];
        let mut inputs = Inputs {
            stock: stock(10, 8, 2, 0),
            per_user_limit: 2,
            orders: &orders,
            accepted: 1,
            created: false,
            drained: true,
        };
        assert_eq!(outcomes(&inputs)[2].1, Outcome::Ok);
        // But not fewer units than this run's orders hold.
        inputs.stock = stock(10, 10, 0, 0);
        assert_eq!(outcomes(&inputs)[2].1, Outcome::Failed);
    }

    #[test]
    fn held_units_are_not_judged_while_orders_are_pending() {
        let orders = [order(Ulid::new(), OrderStatus::Pending, 1)];
        let inputs = Inputs {
            stock: stock(10, 9, 1, 0),
            per_user_limit: 2,
            orders: &orders,
            accepted: 1,
            created: true,
            drained: false,
        };
        let checks = run(&inputs);
        assert_eq!(checks[2].outcome, Outcome::Skipped);
        assert!(all_hold(&checks), "a skipped check does not fail the run");
    }

    #[test]
    fn a_customer_holding_more_than_the_limit_fails() {
        let (ada, bob) = (Ulid::new(), Ulid::new());
        let orders = [
            order(ada, OrderStatus::AwaitingPayment, 2),
            order(ada, OrderStatus::Confirmed, 1),
            order(bob, OrderStatus::Confirmed, 2),
            // Rejected and cancelled orders hold nothing.
            order(bob, OrderStatus::Rejected, 2),
            order(bob, OrderStatus::Cancelled, 2),
        ];
        let inputs = Inputs {
            stock: stock(10, 5, 2, 3),
            per_user_limit: 2,
            orders: &orders,
            accepted: 5,
            created: true,
            drained: true,
        };
        let check = &run(&inputs)[3];
        assert_eq!(check.outcome, Outcome::Failed);
        assert_eq!(
            check.detail,
            "at most 3 units held by one customer, limit 2; 1 customers over it"
        );
    }
}
