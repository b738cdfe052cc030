//! What every request handler shares.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use commands::handler::{Context, Idempotent};
use commands::idempotency::IdempotencyClaim;
use commands::{CommandHandler, Executed, LogCursor};
use domain::Aggregate;
use projections::ReadModel;
use schemas::Metadata;
use tokio::sync::watch;

use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::reply::Reply;

/// Shared state, cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The parts of the application a request can use.
pub struct Shared {
    /// Executes commands against the event log.
    pub handler: CommandHandler,
    /// Answers queries.
    pub read_model: Arc<dyn ReadModel>,
    /// Checks and issues tokens.
    pub auth: Auth,
    /// The cursor of the latest append this instance made; queries wait for the read model to
    /// reach it so a caller reads its own writes.
    pub last_append: watch::Sender<LogCursor>,
    /// The longest a query waits for that.
    pub read_your_writes_timeout: Duration,
    /// The key payment webhooks are signed with.
    pub webhook_secret: Vec<u8>,
    /// The log's mirror, for readiness.
    pub bus: Arc<dyn commands::bus::Bus>,
    /// What this instance's relay is doing, for readiness.
    pub relay: watch::Receiver<commands::relay::RelayStatus>,
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Event metadata for a request.
pub fn metadata(caller: &Caller, trace_id: &str, idempotency_key: Option<&str>) -> Metadata {
    let request_id = ulid::Ulid::new().to_string();
    Metadata {
        trace_id: Some(trace_id.to_owned()),
        correlation_id: Some(request_id.clone()),
        causation_id: Some(request_id),
        idempotency_key: idempotency_key.map(str::to_owned),
        actor: Some(caller.scope()),
    }
}

impl AppState {
    /// Wraps the shared parts.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }

    /// Executes a command; when a claim is given, the reply `render` makes of the new state is
    /// recorded for it in the same transaction as the events.
    pub async fn execute<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        metadata: Metadata,
        claim: Option<&IdempotencyClaim>,
        render: &(dyn Fn(&A::State) -> Reply + Send + Sync),
    ) -> Result<Executed<A>, ApiError> {
        let respond = |state: &A::State| render(state).to_stored();
        let mut context = Context::new(metadata);
        context.idempotency = claim.map(|claim| Idempotent {
            claim,
            respond: &respond,
        });
        let executed = self
            .handler
            .execute::<A>(stream_id, command, &context)
            .await?;
        if let Some(appended) = &executed.appended {
            self.last_append.send_if_modified(|last| {
                let moved = appended.last > *last;
                *last = (*last).max(appended.last);
                moved
            });
        }
        Ok(executed)
    }

    /// Waits (bounded) until the read model holds every append this instance made.
    pub async fn caught_up(&self) {
        let target = *self.last_append.borrow();
        if !projections::read_model::wait_for(
            self.read_model.as_ref(),
            target,
            self.read_your_writes_timeout,
        )
        .await
        {
            tracing::warn!(?target, "read model lagging; answering from what it has");
        }
    }
}
