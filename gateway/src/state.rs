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
    /// Writes made through this instance that the read model may not show yet, by caller; a
    /// caller's queries wait for that caller's writes, so callers read what they just wrote.
    pub recent_writes: RecentWrites,
    /// Prices of campaigns, which never change: placing an order reads them here.
    pub prices: Prices,
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
    /// What this process runs, for readiness.
    pub roles: crate::roles::Roles,
    /// The consumers dead letters are replayed to, by name.
    pub dead_letter_consumers: crate::routes::dead_letters::Consumers,
    /// Becomes true when the process starts to shut down: streams that would otherwise never
    /// end (a live sale) end then, so the graceful shutdown does not wait on them.
    pub closing: Arc<watch::Sender<bool>>,
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
        self.run(stream_id, command, metadata, key, render, false)
            .await
    }

    /// [`AppState::execute`] for a command that starts the stream of an id just minted (a
    /// new order): decided without reading the log first.
    pub async fn create<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        metadata: Metadata,
        key: Option<&KeyContext>,
        render: &(dyn Fn(&A::State) -> Reply + Send + Sync),
    ) -> Result<Executed<A>, ApiError> {
        self.run(stream_id, command, metadata, key, render, true)
            .await
    }

    async fn run<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        metadata: Metadata,
        key: Option<&KeyContext>,
        render: &(dyn Fn(&A::State) -> Reply + Send + Sync),
        new_stream: bool,
    ) -> Result<Executed<A>, ApiError> {
        let respond = |state: &A::State| render(state).to_stored();
        let mut context = Context::new(metadata);
        context.new_stream = new_stream;
        context.idempotency = key.map(|key| Idempotent {
            key: key.key(),
            request_sha256: key.request_sha256(),
            respond: &respond,
            keep_in: key.keep_in(),
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
        let shown_in = projections::ProjectionName::of_stream(stream_id);
        if let (Some(_), Some(projection)) = (&executed.appended, shown_in) {
            // The catalog is everyone's: an operator's campaign is read by customers, and
            // such writes are rare. An order is its customer's own.
            let scope = match projection {
                projections::ProjectionName::Campaigns => Some(EVERYONE),
                projections::ProjectionName::Orders => context.metadata.actor.as_deref(),
            };
            if let Some(scope) = scope {
                self.recent_writes.wrote(scope, stream_id, executed.version);
            }
        }
        Ok(executed)
    }

    /// Waits (bounded) until the read model shows every write `caller` made through this
    /// instance, and every change to the catalog made through it, so a caller reads what they
    /// just wrote and everyone reads a campaign as soon as it is published. Other callers'
    /// orders are not waited for.
    pub async fn caught_up(&self, caller: &Caller) {
        for scope in [EVERYONE.to_owned(), caller.scope()] {
            self.caught_up_with(&scope).await;
        }
    }

    async fn caught_up_with(&self, scope: &str) {
        let pending = self.recent_writes.pending(scope);
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
                self.recent_writes.shown(scope, &pending, &lagging);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot tell whether the read model shows recent writes");
            }
        }
    }
}

/// Writes made through this instance that the read model may not show yet: per caller and
/// stream, the latest version written. An entry goes once a query of that caller saw it
/// applied. Bounded: past [`PENDING_MAX`] streams it starts over, and reads may then miss a
/// write for a moment.
#[derive(Default)]
pub struct RecentWrites(Mutex<Pending>);

#[derive(Default)]
struct Pending {
    by_caller: HashMap<String, HashMap<String, u64>>,
    streams: usize,
}

/// The scope of writes every caller waits for: the catalog's.
const EVERYONE: &str = "*";

/// Streams remembered at once, over all callers.
const PENDING_MAX: usize = 10_000;

impl RecentWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wrote(&self, caller: &str, stream_id: &str, version: u64) {
        let mut pending = self.lock();
        if pending.streams >= PENDING_MAX {
            tracing::warn!("too many writes not yet shown by the read model; forgetting them");
            *pending = Pending::default();
        }
        let streams = pending.by_caller.entry(caller.to_owned()).or_default();
        let latest = streams.entry(stream_id.to_owned()).or_default();
        let new = *latest == 0;
        *latest = (*latest).max(version);
        if new {
            pending.streams += 1;
        }
    }

    fn pending(&self, caller: &str) -> Vec<(String, u64)> {
        self.lock()
            .by_caller
            .get(caller)
            .map(|streams| streams.iter().map(|(s, v)| (s.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// Forgets the writes of `asked` that are not in `lagging` (unless written again since).
    fn shown(&self, caller: &str, asked: &[(String, u64)], lagging: &[(String, u64)]) {
        let mut pending = self.lock();
        let Some(streams) = pending.by_caller.get_mut(caller) else {
            return;
        };
        let mut forgotten = 0;
        for (stream_id, version) in asked {
            if lagging.iter().any(|(s, _)| s == stream_id) {
                continue;
            }
            if streams
                .get(stream_id)
                .is_some_and(|latest| latest <= version)
            {
                streams.remove(stream_id);
                forgotten += 1;
            }
        }
        if streams.is_empty() {
            pending.by_caller.remove(caller);
        }
        pending.streams = pending.streams.saturating_sub(forgotten);
    }
}

/// Prices of campaigns by id. A campaign's price is set when it is created and never changes,
/// so a price once read is right for good; placing an order needs no read model and no log
/// read for it. Bounded: past [`PRICES_MAX`] campaigns it starts over.
#[derive(Default)]
pub struct Prices(Mutex<HashMap<domain::CampaignId, domain::Cents>>);

/// Campaign prices remembered at once.
const PRICES_MAX: usize = 10_000;

impl Prices {
    /// The price of `campaign_id`, read from the log the first time.
    pub async fn of(
        &self,
        handler: &commands::CommandHandler,
        campaign_id: domain::CampaignId,
    ) -> Result<domain::Cents, ApiError> {
        if let Some(price) = self.lock().get(&campaign_id) {
            return Ok(*price);
        }
        let stream = commands::stream_id::<domain::campaign::CampaignAggregate>(campaign_id);
        let price = handler
            .load::<domain::campaign::CampaignAggregate>(&stream)
            .await?
            .state
            .map(|c| c.price_cents)
            .ok_or(domain::DomainError::CampaignNotFound)?;
        let mut prices = self.lock();
        if prices.len() >= PRICES_MAX {
            prices.clear();
        }
        prices.insert(campaign_id, price);
        Ok(price)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<domain::CampaignId, domain::Cents>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
