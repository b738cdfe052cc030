//! What every request handler shares.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use commands::handler::{Context, Idempotent};
use commands::trace::TraceParent;
use commands::{CommandHandler, Executed};
use domain::Aggregate;
use projections::rebuild::RebuildOptions;
use projections::ProjectionStore;
use schemas::Metadata;
use tokio::sync::{watch, Semaphore};

use crate::auth::{Auth, Caller};
use crate::error::ApiError;
use crate::idempotency::{InFlight, KeyContext};
use crate::reply::Reply;

/// Shared state, cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

/// The parts of the application a request can use.
pub struct Shared {
    /// Executes commands against the event log.
    pub handler: CommandHandler,
    /// The read models: queries, and for operators their versions and rebuilds.
    pub read_model: Arc<dyn ProjectionStore>,
    /// How rebuilds run.
    pub rebuild: RebuildOptions,
    /// Audits running at once (one).
    pub audits: Arc<Semaphore>,
    /// Checks and issues tokens.
    pub auth: Auth,
    /// Each customer's rate limit.
    pub customer_rate: crate::rate_limit::Limiter,
    /// The counters of this instance's consumers, for `/metrics`.
    pub consumers: crate::metrics::Consumers,
    /// Writes made through this instance that the read model may not show yet; queries wait
    /// for them, so callers read what was just written.
    pub recent_writes: RecentWrites,
    /// The longest a query waits for that.
    pub read_your_writes_timeout: Duration,
    /// Idempotency-Keys of requests running on this instance.
    pub in_flight: InFlight,
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
pub fn metadata(caller: &Caller, trace: &TraceParent, idempotency_key: Option<&str>) -> Metadata {
    let request_id = ulid::Ulid::new().to_string();
    let mut metadata = Metadata {
        correlation_id: Some(request_id.clone()),
        causation_id: Some(request_id),
        idempotency_key: idempotency_key.map(str::to_owned),
        actor: Some(caller.scope()),
        ..Metadata::default()
    };
    trace.stamp(&mut metadata);
    metadata
}

impl AppState {
    /// Wraps the shared parts.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }

    /// Executes a command; under an Idempotency-Key, the reply `render` makes of the new state
    /// is recorded under the key in the same transaction as the events.
    pub async fn execute<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        metadata: Metadata,
        key: Option<&KeyContext>,
        render: &(dyn Fn(&A::State) -> Reply + Send + Sync),
    ) -> Result<Executed<A>, ApiError> {
        let respond = |state: &A::State| render(state).to_stored();
        let mut context = Context::new(metadata);
        context.idempotency = key.map(|key| Idempotent {
            key: key.key(),
            request_sha256: key.request_sha256(),
            respond: &respond,
        });
        let executed = self
            .handler
            .execute::<A>(stream_id, command, &context)
            .await;
        if let Some(key) = key {
            let replayed = executed
                .as_ref()
                .is_ok_and(|e| e.appended.as_ref().is_none_or(|a| a.replayed));
            key.appended(&executed, replayed);
        }
        let executed = executed?;
        let shown_in_read_model = projections::ProjectionName::of_stream(stream_id).is_some();
        if executed.appended.is_some() && shown_in_read_model {
            self.recent_writes.wrote(stream_id, executed.version);
        }
        Ok(executed)
    }

    /// Waits (bounded) until the read model shows every write made through this instance,
    /// so any caller reads what was just written here.
    pub async fn caught_up(&self) {
        let pending = self.recent_writes.pending();
        if pending.is_empty() {
            return;
        }
        match projections::read_model::wait_for_all(
            self.read_model.as_ref(),
            pending.clone(),
            self.read_your_writes_timeout,
        )
        .await
        {
            Ok(lagging) => {
                if let Some((stream_id, version)) = lagging.first() {
                    tracing::warn!(%stream_id, version, lagging = lagging.len(), "read model lagging; answering from what it has");
                }
                self.recent_writes.shown(&pending, &lagging);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot tell whether the read model shows recent writes");
            }
        }
    }
}

/// Writes made through this instance that the read model may not show yet: per stream, the
/// latest version written. An entry goes once a query saw it applied. Bounded: past
/// [`PENDING_MAX`] streams it starts over, and reads may then miss a write for a moment.
#[derive(Default)]
pub struct RecentWrites(Mutex<HashMap<String, u64>>);

/// Streams remembered at once.
const PENDING_MAX: usize = 10_000;

impl RecentWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wrote(&self, stream_id: &str, version: u64) {
        let mut pending = self.lock();
        if pending.len() >= PENDING_MAX && !pending.contains_key(stream_id) {
            tracing::warn!("too many writes not yet shown by the read model; forgetting them");
            pending.clear();
        }
        let latest = pending.entry(stream_id.to_owned()).or_default();
        *latest = (*latest).max(version);
    }

    fn pending(&self) -> Vec<(String, u64)> {
        self.lock().iter().map(|(s, v)| (s.clone(), *v)).collect()
    }

    /// Forgets the writes of `asked` that are not in `lagging` (unless written again since).
    fn shown(&self, asked: &[(String, u64)], lagging: &[(String, u64)]) {
        let mut pending = self.lock();
        for (stream_id, version) in asked {
            if lagging.iter().any(|(s, _)| s == stream_id) {
                continue;
            }
            if pending
                .get(stream_id)
                .is_some_and(|latest| latest <= version)
            {
                pending.remove(stream_id);
            }
        }
    }
}
