//! The order saga, pure: its plan (the next step, from where the order, its reservation and
//! its payment stand) and [`advance`] (every step a wake-up takes, decided in memory). The saga
//! keeps no stream of its own: where an order stands is in the order, its holding and its
//! payment, and each step it took is the event it appended there.
//!
//! The plan is level-triggered: it looks at the aggregates, not at the event that woke the
//! saga, so a duplicated, reordered or replayed trigger leads to the same next step. The order
//! moves first and the stock follows (confirm, then sell; cancel, then release), so a
//! customer's cancel racing a payment can never leave units sold for a cancelled order.
//!
//! [`advance`] takes every step that can be taken now on copies of the order, the customer's
//! holding and the payment, and the campaign's bucket, and hands back the events; the caller
//! appends all of them in one atomic append at the versions it loaded. So a wake-up's steps happen together or not at all, and
//! one writer can decide the steps of many orders in one append.

use serde::{Deserialize, Serialize};

use crate::campaign::{Campaign, CampaignStatus};
use crate::holding::{Holding, HoldingAggregate, HoldingCommand, HoldingEvent, ReservationState};
use crate::order::{
    CancelReason, Order, OrderAggregate, OrderCommand, OrderEvent, OrderStatus, RejectReason,
};
use crate::payment::{Payment, PaymentAggregate, PaymentCommand, PaymentEvent, PaymentStatus};
use crate::{Aggregate, DomainError, OrderId, PaymentId, Timestamp};

/// A step of the order saga. Each is taken at most once per order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStep {
    /// Reserve the units and the customer's quota.
    ReserveStock,
    /// The reservation was refused: reject the order.
    RejectOrder,
    /// Ask for the money. No longer a step of its own: the order's move to awaiting payment
    /// is the request. Kept so that older logs' saga records still read.
    RequestPayment,
    /// Move the order to awaiting payment.
    AwaitPayment,
    /// The deadline passed with no answer: time the payment out.
    TimeOutPayment,
    /// Paid: confirm the order.
    ConfirmOrder,
    /// Confirmed: the reserved units become sold.
    SellStock,
    /// Payment failed or timed out: cancel the order.
    CancelOrder,
    /// Cancelled: give the reserved units back.
    ReleaseStock,
    /// Money arrived for a cancelled order: give it back.
    RefundPayment,
}

impl SagaStep {
    /// Its name in events and ids.
    pub fn name(self) -> &'static str {
        match self {
            SagaStep::ReserveStock => "reserve_stock",
            SagaStep::RejectOrder => "reject_order",
            SagaStep::RequestPayment => "request_payment",
            SagaStep::AwaitPayment => "await_payment",
            SagaStep::TimeOutPayment => "time_out_payment",
            SagaStep::ConfirmOrder => "confirm_order",
            SagaStep::SellStock => "sell_stock",
            SagaStep::CancelOrder => "cancel_order",
            SagaStep::ReleaseStock => "release_stock",
            SagaStep::RefundPayment => "refund_payment",
        }
    }
}

/// What the saga should do next for one order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Take this step.
    Act(Action),
    /// Nothing to do before the payment deadline (or an outside answer).
    WaitUntil(Timestamp),
    /// The order is final and everything that follows from it is done.
    Done,
}

/// A step with what it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Reserve; a refusal is handed back to [`plan`], which rejects the order.
    ReserveStock,
    /// Reject the order.
    RejectOrder(RejectReason),
    /// Move the order to awaiting payment, which requests its payment.
    AwaitPayment {
        /// The payment (the order's id, see [`payment_id_of`]).
        payment_id: PaymentId,
        /// Its deadline.
        deadline: Timestamp,
    },
    /// Time the payment out.
    TimeOutPayment,
    /// Confirm the order.
    ConfirmOrder(PaymentId),
    /// Sell the reserved units.
    SellStock,
    /// Cancel the order.
    CancelOrder(CancelReason),
    /// Release the reserved units.
    ReleaseStock(CancelReason),
    /// Refund the payment.
    RefundPayment,
}

impl Action {
    /// The step this action is.
    pub fn step(self) -> SagaStep {
        match self {
            Action::ReserveStock => SagaStep::ReserveStock,
            Action::RejectOrder(_) => SagaStep::RejectOrder,
            Action::AwaitPayment { .. } => SagaStep::AwaitPayment,
            Action::TimeOutPayment => SagaStep::TimeOutPayment,
            Action::ConfirmOrder(_) => SagaStep::ConfirmOrder,
            Action::SellStock => SagaStep::SellStock,
            Action::CancelOrder(_) => SagaStep::CancelOrder,
            Action::ReleaseStock(_) => SagaStep::ReleaseStock,
            Action::RefundPayment => SagaStep::RefundPayment,
        }
    }
}

/// An order's payment has the order's id: one payment per order, found without a lookup.
pub fn payment_id_of(order_id: OrderId) -> PaymentId {
    PaymentId::from_ulid(order_id.ulid())
}

/// The next step for `order`, given where its units are (in the customer's holding), why the
/// campaign refused to reserve them (when it just did), its payment (the one it requested,
/// folded with its answers: [`Payment::requested_by`]), the campaign's payment timeout and the
/// time.
pub fn plan(
    order: &Order,
    held: Option<ReservationState>,
    refused: Option<RejectReason>,
    payment: Option<&Payment>,
    payment_timeout_seconds: u32,
    now: Timestamp,
) -> Plan {
    let payment_status = payment.map(|p| p.status);
    // A pending payment times out at its deadline, whatever the order did meanwhile.
    let wait_for_payment = |payment: &Payment| {
        if now >= payment.deadline {
            Plan::Act(Action::TimeOutPayment)
        } else {
            Plan::WaitUntil(payment.deadline)
        }
    };
    match order.status {
        OrderStatus::Pending => match (held, payment) {
            (None, _) => match refused {
                Some(reason) => Plan::Act(Action::RejectOrder(reason)),
                None => Plan::Act(Action::ReserveStock),
            },
            (Some(_), None) => Plan::Act(Action::AwaitPayment {
                payment_id: payment_id_of(order.order_id),
                deadline: now + chrono::Duration::seconds(i64::from(payment_timeout_seconds)),
            }),
            // Requested by an older log's `PaymentRequested` before the order moved.
            (Some(_), Some(payment)) => Plan::Act(Action::AwaitPayment {
                payment_id: payment.payment_id,
                deadline: payment.deadline,
            }),
        },
        OrderStatus::AwaitingPayment => match payment {
            None => Plan::Done,
            Some(payment) => match payment.status {
                PaymentStatus::Pending => wait_for_payment(payment),
                PaymentStatus::Succeeded => Plan::Act(Action::ConfirmOrder(payment.payment_id)),
                PaymentStatus::Failed => {
                    Plan::Act(Action::CancelOrder(CancelReason::PaymentFailed))
                }
                PaymentStatus::TimedOut => {
                    Plan::Act(Action::CancelOrder(CancelReason::PaymentTimeout))
                }
                PaymentStatus::Refunded => Plan::Done,
            },
        },
        OrderStatus::Confirmed => match held {
            Some(ReservationState::Reserved) => Plan::Act(Action::SellStock),
            _ => Plan::Done,
        },
        OrderStatus::Rejected => Plan::Done,
        OrderStatus::Cancelled => {
            let reason = order.cancellation.unwrap_or(CancelReason::Customer);
            if held == Some(ReservationState::Reserved) {
                return Plan::Act(Action::ReleaseStock(reason));
            }
            match (payment_status, payment) {
                (Some(PaymentStatus::Succeeded), _) => Plan::Act(Action::RefundPayment),
                (Some(PaymentStatus::Pending), Some(payment)) => wait_for_payment(payment),
                _ => Plan::Done,
            }
        }
    }
}

/// The most steps one wake-up takes. The longest path takes five (time out, cancel, release,
/// and a refund of a late success is a wake-up of its own); reaching this means a bug.
pub const STEPS_MAX: usize = 12;

/// What one wake-up decides on for one order: copies of the order, the customer's holding in
/// the campaign and the payment, which [`advance`] moves on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OrderFacts {
    /// The order; `None` when it is not (yet) in the log.
    pub order: Option<Order>,
    /// The customer's holding in the order's campaign.
    pub holding: Holding,
    /// The order's payment, once requested: [`Payment::requested_by`] the order, folded with
    /// its stream's answers.
    pub payment: Option<Payment>,
}

/// A campaign's bucket as the writer deciding on it sees it.
#[derive(Clone, Copy, Debug)]
pub struct Bucket<'a> {
    /// The campaign: its terms, its window, whether it is closed.
    pub campaign: &'a Campaign,
    /// Which bucket.
    pub bucket: u32,
    /// Units in it that nobody holds, as the decisions so far left them.
    pub available_units: u32,
    /// Whether other buckets may still have units: then a reservation this bucket cannot
    /// cover asks for a transfer instead of rejecting the order as sold out.
    pub more_elsewhere: bool,
}

/// What a wake-up did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Advanced {
    /// Events for the order's stream.
    pub order: Vec<OrderEvent>,
    /// Events for the customer's holding.
    pub holding: Vec<HoldingEvent>,
    /// Events for the payment's stream.
    pub payment: Vec<PaymentEvent>,
    /// Units taken from the bucket.
    pub reserved_units: u32,
    /// Units given back to the bucket.
    pub released_units: u32,
    /// Reserved units sold.
    pub sold_units: u32,
    /// The steps taken, in order; empty when there was nothing to do.
    pub steps: Vec<SagaStep>,
    /// Where the order stands now.
    pub next: Next,
}

/// Where a wake-up left an order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Next {
    /// No such order.
    #[default]
    Unknown,
    /// Waiting for the payment's answer, or its deadline at this instant.
    WaitUntil(Timestamp),
    /// Final, with every compensation done.
    Done,
}

/// The outcome of [`advance`].
#[derive(Clone, Debug, PartialEq)]
pub enum Wake {
    /// These steps were taken (in `facts` and the bucket).
    Advanced(Advanced),
    /// The bucket has fewer units than the order needs, and others may have some: move
    /// units into it and advance again. Nothing was changed.
    NeedsUnits(u32),
}

/// Takes every step the saga can take now for one order, in memory: plans, decides the step
/// on its aggregate, applies the events, and plans again, until the order waits or is done.
/// `facts` and `bucket` are moved on only when the whole wake-up succeeds.
///
/// A reservation is refused, and the order rejected, when the campaign is not open, when the
/// customer would go over the limit, or when the bucket is short and no other bucket may
/// help. Any other refusal is a bug in the plan and comes back as an error, changing nothing.
pub fn advance(
    facts: &mut OrderFacts,
    bucket: &mut Bucket<'_>,
    now: Timestamp,
) -> Result<Wake, DomainError> {
    let Some(order) = facts.order.clone() else {
        return Ok(Wake::Advanced(Advanced::default()));
    };
    // The holding is moved on in place, not copied: a customer's holding has an entry per live
    // order, and a wake-up changes only its own order's entry and the live units, which are
    // put back when the wake-up does not go through.
    let order_id = order.order_id;
    let kept = (
        facts.holding.live_units,
        facts.holding.orders.get(&order_id).copied(),
    );
    let woken = advance_in_place(order, facts, bucket, now);
    if !matches!(woken, Ok(Wake::Advanced(_))) {
        let (live_units, held) = kept;
        facts.holding.live_units = live_units;
        match held {
            Some(held) => facts.holding.orders.insert(order_id, held),
            None => facts.holding.orders.remove(&order_id),
        };
    }
    woken
}

/// [`advance`], moving `facts.holding` on as it goes (even when it then fails), and the order,
/// the payment and the bucket only when the whole wake-up succeeds.
fn advance_in_place(
    mut order: Order,
    facts: &mut OrderFacts,
    bucket: &mut Bucket<'_>,
    now: Timestamp,
) -> Result<Wake, DomainError> {
    let campaign = bucket.campaign;
    let holding = &mut facts.holding;
    let mut payment = facts.payment.clone();
    let mut available = bucket.available_units;
    let mut advanced = Advanced::default();
    let mut refused = None;
    for _ in 0..STEPS_MAX {
        let next = plan(
            &order,
            holding.of(order.order_id),
            refused,
            payment.as_ref(),
            campaign.payment_timeout_seconds,
            now,
        );
        let action = match next {
            Plan::Act(action) => action,
            Plan::WaitUntil(deadline) => {
                advanced.next = Next::WaitUntil(deadline);
                break;
            }
            Plan::Done => {
                advanced.next = Next::Done;
                break;
            }
        };
        match action {
            Action::ReserveStock => {
                if campaign.status(now) != CampaignStatus::Open {
                    refused = Some(RejectReason::CampaignNotOpen);
                    continue;
                }
                let reserve = HoldingCommand::Reserve {
                    order_id: order.order_id,
                    campaign_id: campaign.campaign_id,
                    user_id: order.user_id,
                    quantity: order.quantity,
                    bucket: bucket.bucket,
                    per_user_limit: campaign.per_user_limit,
                    now,
                };
                let events = match HoldingAggregate::decide(holding, &reserve) {
                    Err(DomainError::LimitExceeded) => {
                        refused = Some(RejectReason::LimitExceeded);
                        continue;
                    }
                    other => other?,
                };
                if available < order.quantity {
                    if bucket.more_elsewhere {
                        return Ok(Wake::NeedsUnits(order.quantity));
                    }
                    refused = Some(RejectReason::SoldOut);
                    continue;
                }
                available -= order.quantity;
                advanced.reserved_units += order.quantity;
                *holding = apply::<HoldingAggregate>(
                    std::mem::take(holding),
                    events,
                    &mut advanced.holding,
                );
            }
            Action::ReleaseStock(reason) => {
                let release = HoldingCommand::Release {
                    order_id: order.order_id,
                    campaign_id: campaign.campaign_id,
                    user_id: order.user_id,
                    bucket: bucket.bucket,
                    reason,
                    now,
                };
                let events = HoldingAggregate::decide(holding, &release)?;
                let units = holding
                    .orders
                    .get(&order.order_id)
                    .map_or(0, |held| held.quantity);
                available = available.checked_add(units).expect("unit count overflow");
                advanced.released_units += units;
                *holding = apply::<HoldingAggregate>(
                    std::mem::take(holding),
                    events,
                    &mut advanced.holding,
                );
            }
            Action::SellStock => {
                let sell = HoldingCommand::Sell {
                    order_id: order.order_id,
                    campaign_id: campaign.campaign_id,
                    user_id: order.user_id,
                    now,
                };
                let events = HoldingAggregate::decide(holding, &sell)?;
                if !events.is_empty() {
                    advanced.sold_units += order.quantity;
                }
                *holding = apply::<HoldingAggregate>(
                    std::mem::take(holding),
                    events,
                    &mut advanced.holding,
                );
            }
            Action::RejectOrder(reason) => {
                order = on_order(order, OrderCommand::Reject { reason, now }, &mut advanced)?;
            }
            Action::AwaitPayment {
                payment_id,
                deadline,
            } => {
                let command = OrderCommand::AwaitPayment {
                    payment_id,
                    deadline,
                    now,
                };
                order = on_order(order, command, &mut advanced)?;
                payment = payment.or_else(|| Payment::requested_by(&order));
            }
            Action::ConfirmOrder(payment_id) => {
                order = on_order(
                    order,
                    OrderCommand::Confirm { payment_id, now },
                    &mut advanced,
                )?;
            }
            Action::CancelOrder(reason) => {
                order = on_order(order, OrderCommand::Cancel { reason, now }, &mut advanced)?;
            }
            Action::TimeOutPayment => {
                payment = on_payment(payment, PaymentCommand::TimeOut { now }, &mut advanced)?;
            }
            Action::RefundPayment => {
                payment = on_payment(payment, PaymentCommand::Refund { now }, &mut advanced)?;
            }
        }
        advanced.steps.push(action.step());
    }
    assert!(
        advanced.next != Next::Unknown,
        "order {}: no end after {STEPS_MAX} steps",
        order.order_id
    );
    facts.order = Some(order);
    facts.payment = payment;
    bucket.available_units = available;
    Ok(Wake::Advanced(advanced))
}

fn apply<A: Aggregate>(
    state: A::State,
    events: Vec<A::Event>,
    out: &mut Vec<A::Event>,
) -> A::State {
    let state = events.iter().fold(state, A::evolve);
    out.extend(events);
    state
}

fn on_order(
    order: Order,
    command: OrderCommand,
    advanced: &mut Advanced,
) -> Result<Order, DomainError> {
    let state = Some(order);
    let events = OrderAggregate::decide(&state, &command)?;
    let state = apply::<OrderAggregate>(state, events, &mut advanced.order);
    Ok(state.expect("an order stays an order"))
}

fn on_payment(
    payment: Option<Payment>,
    command: PaymentCommand,
    advanced: &mut Advanced,
) -> Result<Option<Payment>, DomainError> {
    let events = PaymentAggregate::decide(&payment, &command)?;
    Ok(apply::<PaymentAggregate>(
        payment,
        events,
        &mut advanced.payment,
    ))
}

/// What earlier versions recorded in a saga stream of its own, `ordersaga-<order id>`, with
/// each wake-up's steps. Each step's effect is an event of the order, the holding or the
/// payment, appended by `saga:order` (the actor in its metadata) and caused by what woke the
/// saga, so that record said nothing the log does not; it is no longer written, and these
/// events stay readable in old logs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum OrderSagaEvent {
    /// The saga took these steps for the order, in one append with their effects.
    OrderSagaAdvanced {
        /// The order.
        order_id: OrderId,
        /// The steps, in order.
        steps: Vec<SagaStep>,
        /// When.
        at: Timestamp,
    },
    /// The saga set out to take a step, before taking it, one append per step.
    OrderSagaStepTaken {
        /// The order.
        order_id: OrderId,
        /// The step.
        step: SagaStep,
        /// When.
        at: Timestamp,
    },
}

#[cfg(test)]
mod tests;
