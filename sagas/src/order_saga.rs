//! The order saga: a process manager that moves every order to a final state.
//!
//! Woken by an order placed or cancelled, a payment's answer, or the payment's deadline, it
//! hands the order to its campaign's [`CampaignWriter`](crate::campaign_writer), which takes
//! every step [`domain::saga::advance`] plans for it, in memory, and appends them with the
//! saga's record in one atomic append, batched with the other orders of the campaign that woke
//! at the same time. The saga then schedules the payment's deadline and asks the provider for
//! the money, or clears the deadline of an order that is done.
//!
//! The saga takes many triggers at once from the mirror ([`Handler::handle_batch`]): the
//! `OrderPlaced` events of a flash sale carry the order whole, so they reach the writer without
//! a read, and a whole batch of them is decided in one append.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use commands::bus::Topic;
use commands::subscription::{Handler, HandlerError};
use commands::{CommandError, CommandHandler, LogError};
use domain::order::{OrderAggregate, OrderEvent};
use domain::{Aggregate, CampaignId, DomainError, OrderId, Timestamp};
use schemas::{Envelope, EventHead, Metadata};
use sha2::{Digest, Sha256};
use ulid::Ulid;

use crate::campaign_writer::{
    load_orders, CampaignWriters, OrderState, WakeUp, Woken, WriterOptions,
};
use crate::deadlines::{DeadlineError, Deadlines};
use crate::payments::PaymentProvider;

/// An id derived from `what`, the same every time: for settlements and for the events of
/// decisions taken again at the same stream version.
pub fn derived_id(what: &str) -> Ulid {
    let digest = Sha256::digest(what.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    Ulid::from_bytes(bytes)
}

/// The saga failed to move an order on; the trigger is retried.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SagaError {
    /// The log failed.
    #[error("event log: {0}")]
    Log(String),
    /// The deadline store failed.
    #[error("{0}")]
    Deadline(String),
    /// A decision broke a business rule the plan should have kept (a bug), or the order's
    /// campaign is missing (a corrupt log).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Other writers kept winning the race for one of the batch's streams.
    #[error("stream {stream_id} is too busy, gave up after {attempts} attempts")]
    Contention {
        /// The contended stream.
        stream_id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The campaign's writer could not take the wake-up.
    #[error("campaign writer: {0}")]
    Writer(String),
}

impl From<LogError> for SagaError {
    fn from(error: LogError) -> Self {
        SagaError::Log(error.to_string())
    }
}

impl From<CommandError> for SagaError {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(error) => SagaError::Domain(error),
            CommandError::Contention {
                stream_id,
                attempts,
            } => SagaError::Contention {
                stream_id,
                attempts,
            },
            CommandError::Log(error) => error.into(),
        }
    }
}

impl From<DeadlineError> for SagaError {
    fn from(error: DeadlineError) -> Self {
        SagaError::Deadline(error.to_string())
    }
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
    writers: CampaignWriters,
    payments: Arc<dyn PaymentProvider>,
    deadlines: Arc<dyn Deadlines>,
}

/// What woke the saga for one order.
struct Trigger {
    order_id: OrderId,
    /// The order whole, when the trigger was its `OrderPlaced`.
    placed: Option<OrderState>,
    cause: Metadata,
    /// When what woke the saga was recorded.
    caused_at: Option<Timestamp>,
}

impl OrderSaga {
    /// A saga that appends through `handler`'s log.
    pub fn new(
        handler: CommandHandler,
        payments: Arc<dyn PaymentProvider>,
        deadlines: Arc<dyn Deadlines>,
    ) -> Self {
        Self::with_writers(handler, payments, deadlines, WriterOptions::default())
    }

    /// A saga whose campaign writers run with `options`.
    pub fn with_writers(
        handler: CommandHandler,
        payments: Arc<dyn PaymentProvider>,
        deadlines: Arc<dyn Deadlines>,
        options: WriterOptions,
    ) -> Self {
        OrderSaga {
            writers: CampaignWriters::new(handler.clone(), options),
            handler,
            payments,
            deadlines,
        }
    }

    /// Moves `order_id` on as far as it can go now. `cause` is the metadata of what woke the
    /// saga; its trace continues into the steps.
    pub async fn advance(
        &self,
        order_id: OrderId,
        cause: &Metadata,
    ) -> Result<Progress, SagaError> {
        let trigger = Trigger {
            order_id,
            placed: None,
            cause: cause.clone(),
            caused_at: None,
        };
        let mut progress = self.advance_all(vec![trigger]).await?;
        Ok(progress.pop().map_or(Progress::Unknown, |(_, p)| p))
    }

    /// Moves many orders on at once: each campaign's orders in one decision of its writer.
    async fn advance_all(
        &self,
        triggers: Vec<Trigger>,
    ) -> Result<Vec<(OrderId, Progress)>, SagaError> {
        // One wake-up per order; an `OrderPlaced` among its triggers spares a read.
        let mut by_order: HashMap<OrderId, Trigger> = HashMap::with_capacity(triggers.len());
        for trigger in triggers {
            match by_order.get_mut(&trigger.order_id) {
                Some(known) if known.placed.is_none() => known.placed = trigger.placed,
                Some(_) => {}
                None => {
                    by_order.insert(trigger.order_id, trigger);
                }
            }
        }
        let unread: Vec<OrderId> = by_order
            .values()
            .filter(|t| t.placed.is_none())
            .map(|t| t.order_id)
            .collect();
        let mut read = load_orders(self.handler.log().as_ref(), &unread).await?;
        let mut by_campaign: HashMap<CampaignId, Vec<WakeUp>> = HashMap::new();
        let mut progress = Vec::with_capacity(by_order.len());
        for (order_id, trigger) in by_order {
            let state = match trigger.placed {
                Some(state) => state,
                None => read.remove(&order_id).unwrap_or_default(),
            };
            let Some(campaign_id) = state.order.as_ref().map(|o| o.campaign_id) else {
                progress.push((order_id, Progress::Unknown));
                continue;
            };
            by_campaign.entry(campaign_id).or_default().push(WakeUp {
                order_id,
                state,
                cause: trigger.cause,
                caused_at: trigger.caused_at,
            });
        }
        let decided = futures::future::join_all(by_campaign.into_iter().map(
            |(campaign_id, wake_ups)| async move {
                let ids: Vec<OrderId> = wake_ups.iter().map(|w| w.order_id).collect();
                let outcomes = self.writers.wake(campaign_id, wake_ups).await;
                ids.into_iter().zip(outcomes).collect::<Vec<_>>()
            },
        ))
        .await;
        let mut due = Vec::new();
        let mut done = Vec::new();
        let mut first_error = None;
        for (order_id, outcome) in decided.into_iter().flatten() {
            match outcome {
                Ok(Woken::Unknown) => progress.push((order_id, Progress::Unknown)),
                Ok(Woken::Done) => {
                    done.push(order_id);
                    progress.push((order_id, Progress::Done));
                }
                Ok(Woken::Waiting { deadline, pending }) => {
                    due.push((order_id, deadline));
                    if let Some((payment_id, amount)) = pending {
                        // Again after a restart too: providers take repeated requests.
                        self.payments.request(payment_id, amount).await;
                    }
                    progress.push((order_id, Progress::Waiting(deadline)));
                }
                Err(error) => {
                    tracing::debug!(%order_id, %error, "the saga could not move an order on");
                    first_error.get_or_insert(error);
                }
            }
        }
        self.deadlines.schedule_many(&due).await?;
        self.deadlines.clear_many(&done).await?;
        match first_error {
            // Every wake-up is idempotent, so the whole trigger batch is retried.
            Some(error) => Err(error),
            None => Ok(progress),
        }
    }

    /// Wakes the saga for `order_ids`, with no event to say why: their deadlines fell due, or
    /// the [`crate::sweeper`] found them waiting too long. Each takes whatever step its order,
    /// holding and payment allow, which is none for an order that is not due.
    pub async fn wake(&self, order_ids: &[OrderId]) -> Result<(), SagaError> {
        let mut cause = Metadata::default();
        if let Some(trace) = commands::trace::recorded_in(
            &tracing::Span::current(),
            Some(commands::trace::TraceParent::root()),
        ) {
            trace.stamp(&mut cause);
        }
        let triggers = order_ids
            .iter()
            .map(|&order_id| Trigger {
                order_id,
                placed: None,
                cause: cause.clone(),
                caused_at: None,
            })
            .collect();
        self.advance_all(triggers).await.map(|_| ())
    }

    /// Whether `event` wakes the saga: events that come from outside the saga (a placed or
    /// cancelled order, a provider's answer). What the saga's own steps append needs no
    /// wake-up: it goes on planning after each step.
    fn wakes(event: &EventHead<'_>) -> bool {
        matches!(
            (event.category(), event.event_type),
            ("order", "OrderPlaced" | "OrderCancelled")
                | ("payment", "PaymentSucceeded" | "PaymentFailed")
        )
    }

    /// The order an event wakes the saga for, with the order whole when the event placed it.
    fn trigger_of(event: &Envelope) -> Option<Trigger> {
        if !Self::wakes(&event.head()) {
            return None;
        }
        let (category, id) = event.stream_id.split_once('-')?;
        let cause = || Metadata {
            causation_id: Some(event.event_id.to_string()),
            ..event.metadata.clone()
        };
        match (category, event.event_type.as_str()) {
            ("order", "OrderPlaced") => {
                let placed: OrderEvent = schemas::from_envelope(event).ok()?;
                let order = OrderAggregate::evolve(None, &placed)?;
                Some(Trigger {
                    order_id: order.order_id,
                    placed: (event.stream_version == 1).then(|| OrderState::placed(order)),
                    cause: cause(),
                    caused_at: Some(event.recorded_at),
                })
            }
            ("order", "OrderCancelled") | ("payment", "PaymentSucceeded" | "PaymentFailed") => {
                Some(Trigger {
                    order_id: id.parse().ok()?,
                    placed: None,
                    cause: cause(),
                    caused_at: Some(event.recorded_at),
                })
            }
            _ => None,
        }
    }

    /// The order an event wakes the saga for, if any.
    pub fn order_of(event: &Envelope) -> Option<OrderId> {
        Self::trigger_of(event).map(|t| t.order_id)
    }
}

/// The saga as a subscription handler.
#[async_trait]
impl Handler for OrderSaga {
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        self.handle_batch(&[event]).await
    }

    async fn handle_batch(&self, events: &[&Envelope]) -> Result<(), HandlerError> {
        let triggers: Vec<Trigger> = events
            .iter()
            .copied()
            .filter_map(Self::trigger_of)
            .collect();
        if triggers.is_empty() {
            return Ok(());
        }
        self.advance_all(triggers).await?;
        Ok(())
    }

    fn wants(&self, event: &EventHead<'_>) -> bool {
        Self::wakes(event)
    }

    fn topic(&self) -> Option<Topic> {
        Some(Topic::Orders)
    }

    fn handles_batches(&self) -> bool {
        true
    }
}
