//! The payment provider, and the one way its answer enters the log.
//!
//! The saga asks a [`PaymentProvider`] for money once the order awaits its payment in the log
//! (that event is the request). The provider answers later, through [`settle`]: the webhook
//! (`POST /v1/payments/webhook`) for the [`External`] provider, a timer for the [`Simulated`]
//! one. A settlement's command id derives from what was said, so a repeated delivery of the
//! same answer has one effect.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use commands::handler::Context;
use commands::{stream_id, CommandError, CommandHandler, Executed};
use domain::order::OrderAggregate;
use domain::payment::{Payment, PaymentAggregate, PaymentCommand};
use domain::{Cents, OrderId, PaymentId};
use schemas::Metadata;
use tracing::Instrument;

/// What the provider said about a payment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The money was taken.
    Succeeded,
    /// It was refused.
    Failed,
}

/// Where payments are asked for.
#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// Asks for `amount` under `payment_id`. Called again for a payment still pending after a
    /// restart, so it must tolerate repeats.
    async fn request(&self, payment_id: PaymentId, amount: Cents);
}

/// A provider outside: it answers through the signed webhook, so asking does nothing here.
#[derive(Clone, Copy, Debug, Default)]
pub struct External;

#[async_trait]
impl PaymentProvider for External {
    async fn request(&self, _payment_id: PaymentId, _amount: Cents) {}
}

/// A provider for demos and tests: answers after `delay`, failing a `failure_rate` share of
/// payments.
pub struct Simulated {
    handler: CommandHandler,
    delay: Duration,
    failure_rate: f64,
    asked: Arc<Mutex<HashSet<PaymentId>>>,
}

impl Simulated {
    /// A simulated provider that settles through `handler`.
    pub fn new(handler: CommandHandler, delay: Duration, failure_rate: f64) -> Self {
        Simulated {
            handler,
            delay,
            failure_rate: failure_rate.clamp(0.0, 1.0),
            asked: Arc::default(),
        }
    }
}

#[async_trait]
impl PaymentProvider for Simulated {
    async fn request(&self, payment_id: PaymentId, _amount: Cents) {
        if !self
            .asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(payment_id)
        {
            return;
        }
        let outcome = if rand::random::<f64>() < self.failure_rate {
            Outcome::Failed
        } else {
            Outcome::Succeeded
        };
        let (handler, delay, asked) = (self.handler.clone(), self.delay, Arc::clone(&self.asked));
        // A child of the saga step that asked: the answer joins the order's trace, as a
        // provider that propagates trace context would.
        let span = tracing::info_span!("simulated_payment", %payment_id);
        let answer = async move {
            tokio::time::sleep(delay).await;
            let reference = format!("sim-{payment_id}");
            let mut metadata = Metadata {
                actor: Some("payment_provider:simulated".into()),
                ..Metadata::default()
            };
            if let Some(here) = commands::trace::context_of(&tracing::Span::current()) {
                here.stamp(&mut metadata);
            }
            if let Err(error) = settle(&handler, payment_id, outcome, &reference, metadata).await {
                tracing::warn!(%payment_id, %error, "the simulated provider could not settle");
            }
            asked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&payment_id);
        };
        tokio::spawn(answer.instrument(span));
    }
}

/// The payment as the log has it: the one its order requested (an order's payment has the
/// order's id), folded with its stream's answers; `None` when no order requested it.
pub async fn load(
    handler: &CommandHandler,
    payment_id: PaymentId,
) -> Result<Option<Payment>, CommandError> {
    let requested = requested(handler, payment_id).await?;
    let stream = stream_id::<PaymentAggregate>(payment_id);
    Ok(handler
        .load_from::<PaymentAggregate>(&stream, requested)
        .await?
        .state)
}

/// The payment the order of `payment_id` requested, if it did.
async fn requested(
    handler: &CommandHandler,
    payment_id: PaymentId,
) -> Result<Option<Payment>, CommandError> {
    let order_id = OrderId::from_ulid(payment_id.ulid());
    let order = handler
        .load::<OrderAggregate>(&stream_id::<OrderAggregate>(order_id))
        .await?
        .state;
    Ok(order.as_ref().and_then(Payment::requested_by))
}

/// Records the provider's answer for a payment, on the payment its order requested. The
/// command id derives from the payment, the outcome and the provider's reference, so a
/// repeated answer is stored once; a contrary answer after a final one is refused by the
/// payment ([`domain::DomainError`]), and an answer for a payment no order requested with
/// `PaymentNotFound`.
pub async fn settle(
    handler: &CommandHandler,
    payment_id: PaymentId,
    outcome: Outcome,
    provider_reference: &str,
    metadata: Metadata,
) -> Result<Executed<PaymentAggregate>, CommandError> {
    let now = chrono::Utc::now();
    let command = match outcome {
        Outcome::Succeeded => PaymentCommand::Succeed {
            provider_reference: provider_reference.to_owned(),
            now,
        },
        Outcome::Failed => PaymentCommand::Fail {
            provider_reference: provider_reference.to_owned(),
            now,
        },
    };
    let what = format!(
        "settle:{payment_id}:{}:{provider_reference}",
        match outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
        }
    );
    let context = Context {
        metadata,
        command_id: crate::order_saga::derived_id(&what),
        idempotency: None,
        new_stream: false,
    };
    let requested = requested(handler, payment_id).await?;
    handler
        .execute_from::<PaymentAggregate>(
            &stream_id::<PaymentAggregate>(payment_id),
            &requested,
            &command,
            &context,
        )
        .await
}
