//! The order saga: a process manager that moves every order to a final state.
//!
//! Woken by an order placed or cancelled, a payment's answer, or the payment's deadline, it
//! loads the order, the campaign's reservation for it and the payment, asks
//! [`domain::saga::plan`] for the next step, records in its own stream (`ordersaga-<order id>`)
//! that it takes it, takes it, and plans again, until the order is done or waits on its payment.
//!
//! Every step is a command with an id derived from the order and the step, so a step taken
//! again (after a crash between two steps, a redelivered trigger, a replay) appends nothing:
//! its events are already stored under the same ids, or the aggregate finds nothing left to do.
//! Reservation, release, sale and refund are each idempotent per order in their aggregates, so
//! none of them can happen twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use commands::handler::Context;
use commands::subscription::{Handler, HandlerError};
use commands::{stream_id, trace, CommandError, CommandHandler};
use domain::campaign::{CampaignAggregate, CampaignCommand};
use domain::order::{OrderAggregate, OrderCommand, RejectReason};
use domain::payment::{PaymentAggregate, PaymentCommand};
use domain::saga::{payment_id_of, plan, Action, OrderSagaAggregate, OrderSagaCommand, Plan};
use domain::{OrderId, Timestamp};
use schemas::{Envelope, Metadata};
use sha2::{Digest, Sha256};
use tracing::Instrument;
use ulid::Ulid;

use crate::deadlines::Deadlines;
use crate::payments::PaymentProvider;

/// Most steps one wake-up takes; the longest path (reserve, request, await, confirm, sell)
/// takes five, so reaching this means steps are not taking effect.
const STEPS_MAX: usize = 12;

/// An id derived from `what`, the same every time: for saga steps and settlements.
pub fn derived_id(what: &str) -> Ulid {
    let digest = Sha256::digest(what.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Ulid::from_bytes(bytes)
}

/// The saga failed to move an order on; the trigger is retried.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// A command failed for a reason other than the business rules.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The deadline store failed.
    #[error(transparent)]
    Deadline(#[from] crate::deadlines::DeadlineError),
    /// An order refers to a campaign that does not exist (a corrupt log).
    #[error("order {0} refers to a missing campaign")]
    MissingCampaign(OrderId),
    /// Steps kept being planned without taking effect.
    #[error("order {0}: no progress after {STEPS_MAX} steps")]
    Stuck(OrderId),
}

/// Where an order stands after the saga moved it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// No such order (yet).
    Unknown,
    /// Waiting for the payment's answer or its deadline.
    Waiting(Timestamp),
    /// Final, with every compensation done.
    Done,
}

/// Runs the order saga.
pub struct OrderSaga {
    handler: CommandHandler,
    payments: Arc<dyn PaymentProvider>,
    deadlines: Arc<dyn Deadlines>,
    /// One wake-up per order at a time in this process.
    turns: Mutex<HashMap<OrderId, Weak<tokio::sync::Mutex<()>>>>,
}

impl OrderSaga {
    /// A saga that commands through `handler`.
    pub fn new(
        handler: CommandHandler,
        payments: Arc<dyn PaymentProvider>,
        deadlines: Arc<dyn Deadlines>,
    ) -> Self {
        OrderSaga {
            handler,
            payments,
            deadlines,
            turns: Mutex::default(),
        }
    }

    fn turn(&self, order_id: OrderId) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(turn) = turns.get(&order_id).and_then(Weak::upgrade) {
            return turn;
        }
        turns.retain(|_, turn| turn.strong_count() > 0);
        let turn = Arc::new(tokio::sync::Mutex::new(()));
        turns.insert(order_id, Arc::downgrade(&turn));
        turn
    }

    /// Moves `order_id` on as far as it can go now. `cause` is the metadata of what woke the
    /// saga; its trace continues into the steps.
    pub async fn advance(
        &self,
        order_id: OrderId,
        cause: &Metadata,
    ) -> Result<Progress, SagaError> {
        let turn = self.turn(order_id);
        let _turn = turn.lock().await;
        for _ in 0..STEPS_MAX {
            let order = self
                .handler
                .load::<OrderAggregate>(&stream_id::<OrderAggregate>(order_id))
                .await?
                .state;
            let Some(order) = order else {
                return Ok(Progress::Unknown);
            };
            let campaign = self
                .handler
                .load::<CampaignAggregate>(&stream_id::<CampaignAggregate>(order.campaign_id))
                .await?
                .state
                .ok_or(SagaError::MissingCampaign(order_id))?;
            let payment_id = payment_id_of(order_id);
            let payment = self
                .handler
                .load::<PaymentAggregate>(&stream_id::<PaymentAggregate>(payment_id))
                .await?
                .state;
            let now = chrono::Utc::now();
            let next = plan(
                &order,
                campaign.reservations.get(&order_id),
                payment.as_ref(),
                campaign.payment_timeout_seconds,
                now,
            );
            match next {
                Plan::Done => {
                    self.deadlines.clear(order_id).await?;
                    return Ok(Progress::Done);
                }
                Plan::WaitUntil(deadline) => {
                    self.deadlines.schedule(order_id, deadline).await?;
                    if let Some(payment) = &payment {
                        // Again after a restart too: providers take repeated requests.
                        self.payments
                            .request(payment.payment_id, payment.amount_cents)
                            .await;
                    }
                    return Ok(Progress::Waiting(deadline));
                }
                Plan::Act(action) => {
                    let span =
                        tracing::info_span!("saga_step", step = action.step().name(), %order_id);
                    self.take(order_id, &order, action, now, cause)
                        .instrument(span)
                        .await?;
                }
            }
        }
        Err(SagaError::Stuck(order_id))
    }

    /// Records one step and takes it.
    async fn take(
        &self,
        order_id: OrderId,
        order: &domain::order::Order,
        action: Action,
        now: Timestamp,
        cause: &Metadata,
    ) -> Result<(), SagaError> {
        let step = action.step();
        let run = StepRun {
            handler: &self.handler,
            order_id,
            step,
            cause,
        };
        let payment_id = payment_id_of(order_id);
        let campaign_id = order.campaign_id;
        let started = std::time::Instant::now();
        let outcome = Outcome::of(&action);
        self.record(order_id, step, now, cause).await?;
        let done = match action {
            Action::ReserveStock => {
                let reserved = run
                    .on::<CampaignAggregate>(
                        campaign_id,
                        CampaignCommand::Reserve {
                            order_id,
                            user_id: order.user_id,
                            quantity: order.quantity,
                            now,
                        },
                    )
                    .await;
                match reserved {
                    Err(CommandError::Domain(refusal)) => match RejectReason::for_refusal(&refusal)
                    {
                        Some(reason) => {
                            let rejecting = StepRun {
                                step: domain::saga::SagaStep::RejectOrder,
                                ..run
                            };
                            self.record(order_id, rejecting.step, now, cause).await?;
                            let rejected = rejecting
                                .on::<OrderAggregate>(
                                    order_id,
                                    OrderCommand::Reject { reason, now },
                                )
                                .await;
                            if rejected.is_ok() {
                                Outcome::Rejected(reason).count(campaign_id);
                            }
                            rejected
                        }
                        None => Err(CommandError::Domain(refusal)),
                    },
                    other => other,
                }
            }
            Action::RejectOrder(reason) => {
                run.on::<OrderAggregate>(order_id, OrderCommand::Reject { reason, now })
                    .await
            }
            Action::RequestPayment {
                payment_id,
                deadline,
            } => {
                run.on::<PaymentAggregate>(
                    payment_id,
                    PaymentCommand::Request {
                        payment_id,
                        order_id,
                        amount_cents: order.amount_cents,
                        deadline,
                        now,
                    },
                )
                .await
            }
            Action::AwaitPayment {
                payment_id,
                deadline,
            } => {
                run.on::<OrderAggregate>(
                    order_id,
                    OrderCommand::AwaitPayment {
                        payment_id,
                        deadline,
                        now,
                    },
                )
                .await
            }
            Action::TimeOutPayment => {
                run.on::<PaymentAggregate>(payment_id, PaymentCommand::TimeOut { now })
                    .await
            }
            Action::ConfirmOrder(payment_id) => {
                run.on::<OrderAggregate>(order_id, OrderCommand::Confirm { payment_id, now })
                    .await
            }
            Action::SellStock => {
                run.on::<CampaignAggregate>(campaign_id, CampaignCommand::Sell { order_id, now })
                    .await
            }
            Action::CancelOrder(reason) => {
                run.on::<OrderAggregate>(order_id, OrderCommand::Cancel { reason, now })
                    .await
            }
            Action::ReleaseStock(reason) => {
                run.on::<CampaignAggregate>(
                    campaign_id,
                    CampaignCommand::Release {
                        order_id,
                        reason,
                        now,
                    },
                )
                .await
            }
            Action::RefundPayment => {
                run.on::<PaymentAggregate>(payment_id, PaymentCommand::Refund { now })
                    .await
            }
        };
        metrics::histogram!("groupbuy_saga_step_duration_seconds", "step" => step.name())
            .record(started.elapsed().as_secs_f64());
        match done {
            Ok(()) => {
                if let Some(outcome) = outcome {
                    outcome.count(campaign_id);
                }
            }
            // The state moved on between planning and acting (a customer's cancel, a payment's
            // answer): plan again from the new state.
            Err(CommandError::Domain(error)) => {
                tracing::debug!(%order_id, step = step.name(), %error, "step overtaken; planning again");
            }
            Err(error) => return Err(error.into()),
        }
        Ok(())
    }

    /// Records in the saga's stream that it takes `step`, before taking it: a worker that dies
    /// in between finds the same step planned again, and the record is not repeated.
    async fn record(
        &self,
        order_id: OrderId,
        step: domain::saga::SagaStep,
        now: Timestamp,
        cause: &Metadata,
    ) -> Result<(), SagaError> {
        self.handler
            .execute::<OrderSagaAggregate>(
                &stream_id::<OrderSagaAggregate>(order_id),
                &OrderSagaCommand::Record {
                    order_id,
                    step,
                    now,
                },
                &step_context(order_id, &format!("record:{}", step.name()), cause),
            )
            .await?;
        Ok(())
    }

    /// The order an event wakes the saga for: events that come from outside the saga (a
    /// placed or cancelled order, a provider's answer). What the saga's own steps append needs
    /// no wake-up: the saga goes on planning after each step, and after a crash the trigger it
    /// had not acknowledged yet is delivered again.
    pub fn order_of(event: &Envelope) -> Option<OrderId> {
        let (category, id) = event.stream_id.split_once('-')?;
        let wakes = matches!(
            (category, event.event_type.as_str()),
            ("order", "OrderPlaced" | "OrderCancelled")
                | ("payment", "PaymentSucceeded" | "PaymentFailed")
        );
        if wakes {
            id.parse().ok()
        } else {
            None
        }
    }
}

/// One step's commands: on any aggregate, with the step's derived command id.
#[derive(Clone, Copy)]
struct StepRun<'a> {
    handler: &'a CommandHandler,
    order_id: OrderId,
    step: domain::saga::SagaStep,
    cause: &'a Metadata,
}

impl StepRun<'_> {
    /// Executes `command` on the stream of aggregate `A` with id `id`.
    async fn on<A: domain::Aggregate>(
        &self,
        id: impl std::fmt::Display,
        command: A::Command,
    ) -> Result<(), CommandError> {
        self.handler
            .execute::<A>(
                &stream_id::<A>(id),
                &command,
                &step_context(self.order_id, self.step.name(), self.cause),
            )
            .await
            .map(|_| ())
    }
}

/// How a saga step's command is recorded: its id derives from the order and the step, and its
/// events name the step's span, so what handles them continues the trace from there.
fn step_context<S>(order_id: OrderId, name: &str, cause: &Metadata) -> Context<'static, S> {
    let mut metadata = Metadata {
        actor: Some("saga:order".into()),
        correlation_id: Some(order_id.to_string()),
        ..cause.clone()
    };
    if let Some(step) = trace::context_of(&tracing::Span::current()) {
        step.stamp(&mut metadata);
    }
    Context {
        metadata,
        command_id: derived_id(&format!("ordersaga:{order_id}:{name}")),
        idempotency: None,
    }
}

/// The saga as a subscription handler.
#[async_trait]
impl Handler for OrderSaga {
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        let Some(order_id) = Self::order_of(event) else {
            return Ok(());
        };
        let cause = Metadata {
            causation_id: Some(event.event_id.to_string()),
            ..event.metadata.clone()
        };
        self.advance(order_id, &cause).await?;
        Ok(())
    }
}

/// Where a step leaves an order, for the business counters of `/metrics`.
enum Outcome {
    Confirmed,
    Rejected(RejectReason),
    Cancelled(domain::order::CancelReason),
}

impl Outcome {
    fn of(action: &Action) -> Option<Outcome> {
        match action {
            Action::ConfirmOrder(_) => Some(Outcome::Confirmed),
            Action::RejectOrder(reason) => Some(Outcome::Rejected(*reason)),
            Action::CancelOrder(reason) => Some(Outcome::Cancelled(*reason)),
            _ => None,
        }
    }

    /// Counted by the instance that took the step; a step taken again after a crash counts
    /// again.
    fn count(&self, campaign_id: domain::CampaignId) {
        let campaign_id = campaign_id.to_string();
        match self {
            Outcome::Confirmed => {
                metrics::counter!("groupbuy_orders_confirmed_total", "campaign_id" => campaign_id)
                    .increment(1);
            }
            Outcome::Rejected(reason) => {
                metrics::counter!(
                    "groupbuy_orders_rejected_total",
                    "campaign_id" => campaign_id,
                    "reason" => snake(reason)
                )
                .increment(1);
            }
            Outcome::Cancelled(reason) => {
                metrics::counter!(
                    "groupbuy_orders_cancelled_total",
                    "campaign_id" => campaign_id,
                    "reason" => snake(reason)
                )
                .increment(1);
            }
        }
    }
}

/// The snake_case name serde gives a unit variant.
fn snake<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "unknown".into(),
    }
}
