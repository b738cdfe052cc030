//! Command handling: load, decide, append with the expected version, retry on conflict.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use domain::{Aggregate, DomainError};
use rand::Rng;
use schemas::Metadata;
use ulid::Ulid;

use crate::idempotency::{
    key_event_id, IdempotencyKey, IdempotencyRecord, KeepIn, Keeping, StoredResponse,
};
use crate::log::{AppendRequest, Appended, EventLog, LogError, NewEvent, Snapshot, StreamAppend};

/// Events read per round trip while loading a stream.
const LOAD_PAGE_EVENTS: usize = 1_000;
/// Folded states kept in memory; past this the cache starts over.
const STATE_CACHE_STREAMS_MAX: usize = 1_024;

/// Tuning of the command handler.
#[derive(Clone, Debug)]
pub struct HandlerOptions {
    /// Attempts after the first one when another writer appended first.
    pub conflict_retries_max: u32,
    /// First backoff ceiling; each retry doubles it up to `backoff_max`, and the actual sleep is
    /// uniform in `[0, ceiling]` (full jitter) so that colliding writers spread out.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_max: Duration,
    /// A snapshot is saved each time a stream grows past another multiple of this.
    pub snapshot_every_events: u64,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        HandlerOptions {
            conflict_retries_max: 10,
            backoff_base: Duration::from_millis(2),
            backoff_max: Duration::from_millis(200),
            snapshot_every_events: 100,
        }
    }
}

/// A command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The business rules refused it.
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Other writers kept winning the race for the stream until retries ran out.
    #[error("stream {stream_id} is too busy, gave up after {attempts} attempts")]
    Contention {
        /// The contended stream.
        stream_id: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The log failed or refused.
    #[error(transparent)]
    Log(#[from] LogError),
}

/// A stream folded into its aggregate's state.
#[derive(Debug)]
pub struct Loaded<A: Aggregate> {
    /// The state.
    pub state: A::State,
    /// The version of the last event folded; 0 for an empty stream.
    pub version: u64,
}

/// What executing a command did.
#[derive(Debug)]
pub struct Executed<A: Aggregate> {
    /// The state after the command.
    pub state: A::State,
    /// The stream version after the command.
    pub version: u64,
    /// What was decided; empty when the command was already done.
    pub events: Vec<A::Event>,
    /// Where the events landed; `None` when nothing was appended.
    pub appended: Option<Appended>,
}

/// How one command is recorded.
pub struct Context<'a, S> {
    /// Tracing and causation for every event the command appends.
    pub metadata: Metadata,
    /// The command's id. Event ids derive from it, so retrying the same command (after a lost
    /// response, or by a redelivered saga step) stores its events once.
    pub command_id: Ulid,
    /// An Idempotency-Key to record with the append, with the response for the new state.
    pub idempotency: Option<Idempotent<'a, S>>,
    /// The stream is new (its id was just minted, as a new order's): decide on the empty
    /// state without reading the log. Should it exist after all, the append conflicts and the
    /// retry reads it.
    pub new_stream: bool,
}

/// An Idempotency-Key and how to build the response it records.
pub struct Idempotent<'a, S> {
    /// The key.
    pub key: &'a IdempotencyKey,
    /// The SHA-256 of the request, in hex.
    pub request_sha256: &'a str,
    /// The response for the state after the command.
    pub respond: &'a (dyn Fn(&S) -> StoredResponse + Send + Sync),
    /// Where the log may keep the record: in the first event only where the caller makes its
    /// answer again from the events, and only when the command starts its stream.
    pub keep_in: KeepIn,
}

impl<S> Context<'_, S> {
    /// A context with a fresh command id and no Idempotency-Key.
    pub fn new(metadata: Metadata) -> Self {
        Context {
            metadata,
            command_id: Ulid::new(),
            idempotency: None,
            new_stream: false,
        }
    }
}

/// The id of the `index`-th event a command appends.
pub fn event_id(command_id: Ulid, index: usize) -> Ulid {
    Ulid::from_parts(
        command_id.timestamp_ms(),
        command_id.random().wrapping_add(index as u128),
    )
}

/// Loads aggregates and executes commands against the event log.
///
/// Commands for the same stream in this process take turns (one lock per stream), so local
/// writers never race each other into conflicts; writers in other processes still do, and the
/// log's unique (stream, version) constraint settles those. The state a command leaves behind
/// is cached, so the next command on a hot stream reads only the events appended since
/// (usually none) instead of parsing its snapshot again.
#[derive(Clone)]
pub struct CommandHandler {
    log: Arc<dyn EventLog>,
    options: HandlerOptions,
    local: Arc<Local>,
}

/// A stream's folded state at a version, of whichever aggregate the stream belongs to.
type CachedState = (u64, Box<dyn Any + Send + Sync>);

#[derive(Default)]
struct Local {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
    states: Mutex<HashMap<String, CachedState>>,
}

impl Local {
    fn lock_for(&self, stream_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = locks.get(stream_id).and_then(Weak::upgrade) {
            return lock;
        }
        if locks.len() >= STATE_CACHE_STREAMS_MAX {
            locks.retain(|_, lock| lock.strong_count() > 0);
        }
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(stream_id.to_owned(), Arc::downgrade(&lock));
        lock
    }

    fn cached<A: Aggregate>(&self, stream_id: &str) -> Option<(A::State, u64)> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let (version, state) = states.get(stream_id)?;
        state
            .downcast_ref::<A::State>()
            .map(|state| (state.clone(), *version))
    }

    fn remember<A: Aggregate>(&self, stream_id: &str, version: u64, state: &A::State) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        match states.get(stream_id) {
            Some((cached, _)) if *cached >= version => return,
            None if states.len() >= STATE_CACHE_STREAMS_MAX => states.clear(),
            _ => {}
        }
        states.insert(stream_id.to_owned(), (version, Box::new(state.clone())));
    }
}

impl CommandHandler {
    /// A handler over a log.
    pub fn new(log: Arc<dyn EventLog>, options: HandlerOptions) -> Self {
        CommandHandler {
            log,
            options,
            local: Arc::default(),
        }
    }

    /// The log this handler writes to.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// Folds a stream: from its snapshot if one of the current shape exists, then its tail.
    pub async fn load<A: Aggregate>(&self, stream_id: &str) -> Result<Loaded<A>, CommandError> {
        self.load_from::<A>(stream_id, A::State::default()).await
    }

    /// Folds a stream whose history starts before its first event, at `origin` (a payment's
    /// stream starts with its first answer, folded onto the payment its order requested).
    pub async fn load_from<A: Aggregate>(
        &self,
        stream_id: &str,
        origin: A::State,
    ) -> Result<Loaded<A>, CommandError> {
        let (state, version) = match self.local.cached::<A>(stream_id) {
            Some(cached) => cached,
            None => self.load_snapshot::<A>(stream_id, origin).await?,
        };
        let loaded = self.fold_tail::<A>(stream_id, state, version).await?;
        self.local
            .remember::<A>(stream_id, loaded.version, &loaded.state);
        Ok(loaded)
    }

    async fn load_snapshot<A: Aggregate>(
        &self,
        stream_id: &str,
        origin: A::State,
    ) -> Result<(A::State, u64), CommandError> {
        Ok(match self.log.load_snapshot(stream_id).await? {
            Some(snapshot) if snapshot.state_version == A::STATE_VERSION => {
                match serde_json::from_value::<A::State>(snapshot.state) {
                    Ok(state) => (state, snapshot.stream_version),
                    Err(error) => {
                        tracing::warn!(%stream_id, %error, "unreadable snapshot ignored");
                        (origin, 0)
                    }
                }
            }
            _ => (origin, 0),
        })
    }

    /// Applies the events after `version` to `state`.
    async fn fold_tail<A: Aggregate>(
        &self,
        stream_id: &str,
        mut state: A::State,
        mut version: u64,
    ) -> Result<Loaded<A>, CommandError> {
        loop {
            let page = self
                .log
                .read_stream(stream_id, version, LOAD_PAGE_EVENTS)
                .await?;
            for recorded in &page {
                let envelope = &recorded.envelope;
                assert_eq!(
                    envelope.stream_version,
                    version + 1,
                    "stream {stream_id} is not contiguous"
                );
                let event: A::Event = schemas::from_envelope(envelope).map_err(LogError::from)?;
                state = A::evolve(state, &event);
                version = envelope.stream_version;
            }
            if page.len() < LOAD_PAGE_EVENTS {
                return Ok(Loaded { state, version });
            }
        }
    }

    /// Loads the stream, decides the command, and appends what was decided with the version it
    /// was decided at. When another writer got there first, it loads and decides again, up to
    /// `conflict_retries_max` times, sleeping a jittered, growing backoff in between.
    pub async fn execute<A: Aggregate>(
        &self,
        stream_id: &str,
        command: &A::Command,
        context: &Context<'_, A::State>,
    ) -> Result<Executed<A>, CommandError> {
        self.execute_from::<A>(stream_id, &A::State::default(), command, context)
            .await
    }

    /// [`CommandHandler::execute`] on a stream whose history starts at `origin`
    /// ([`CommandHandler::load_from`]).
    pub async fn execute_from<A: Aggregate>(
        &self,
        stream_id: &str,
        origin: &A::State,
        command: &A::Command,
        context: &Context<'_, A::State>,
    ) -> Result<Executed<A>, CommandError> {
        let attempts = self.options.conflict_retries_max + 1;
        let lock = self.local.lock_for(stream_id);
        let _turn = lock.lock().await;
        for attempt in 0..attempts {
            // First try the state this process cached, without a round trip: the append's
            // expected version makes a stale cache a conflict, and the retry reads the tail.
            // Refusals and no-ops are only trusted on a fresh read.
            let optimistic = (attempt == 0)
                .then(|| match context.new_stream {
                    true => Some((origin.clone(), 0)),
                    false => self.local.cached::<A>(stream_id),
                })
                .flatten()
                .and_then(|(state, version)| {
                    let events = A::decide(&state, command).ok()?;
                    (!events.is_empty()).then_some((Loaded { state, version }, events))
                });
            let (loaded, events) = match optimistic {
                Some(decided) => decided,
                None => {
                    let loaded = self.load_from::<A>(stream_id, origin.clone()).await?;
                    let events = A::decide(&loaded.state, command)?;
                    (loaded, events)
                }
            };
            if events.is_empty() {
                return Ok(Executed {
                    state: loaded.state,
                    version: loaded.version,
                    events,
                    appended: None,
                });
            }
            let state = events.iter().fold(loaded.state, A::evolve);
            let version = loaded.version + events.len() as u64;
            let mut new_events = Vec::with_capacity(events.len());
            for (index, event) in events.iter().enumerate() {
                new_events.push(NewEvent {
                    event_id: event_id(context.command_id, index),
                    event: schemas::encode(event).map_err(LogError::from)?,
                    metadata: context.metadata.clone(),
                });
            }
            let idempotency = context.idempotency.as_ref().map(|i| {
                let response = (i.respond)(&state);
                let keeping = match (i.keep_in, loaded.version) {
                    (KeepIn::FirstEvent, 0) => {
                        let first = &mut new_events[0];
                        first.event_id = key_event_id(i.key);
                        first.metadata.request_sha256 = Some(i.request_sha256.to_owned());
                        Keeping::InFirstEvent { fallback: response }
                    }
                    _ => Keeping::Apart(response),
                };
                IdempotencyRecord {
                    key: i.key.clone(),
                    request_sha256: i.request_sha256.to_owned(),
                    keeping,
                }
            });
            let request = AppendRequest {
                streams: vec![StreamAppend {
                    stream_id: stream_id.to_owned(),
                    expected_version: loaded.version,
                    events: new_events,
                }],
                idempotency,
            };
            match self.log.append(request).await {
                Ok(appended) => {
                    // A replayed append means the events were stored before, maybe after
                    // more events: the state here is not known to be the stream's.
                    if !appended.replayed {
                        self.snapshot_if_due::<A>(stream_id, loaded.version, version, &state);
                        self.local.remember::<A>(stream_id, version, &state);
                    }
                    return Ok(Executed {
                        state,
                        version,
                        events,
                        appended: Some(appended),
                    });
                }
                Err(LogError::Conflict { .. }) if attempt + 1 < attempts => {
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
                Err(LogError::Conflict { .. }) => break,
                Err(error) => return Err(error.into()),
            }
        }
        Err(CommandError::Contention {
            stream_id: stream_id.to_owned(),
            attempts,
        })
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .options
            .backoff_base
            .saturating_mul(1 << attempt.min(16))
            .min(self.options.backoff_max);
        rand::thread_rng().gen_range(Duration::ZERO..=ceiling)
    }

    /// Saves a snapshot in the background when the stream went from version `before` to
    /// `after` across a multiple of `snapshot_every_events`. Losing one costs a longer load,
    /// never correctness. For writers that append without [`CommandHandler::execute`].
    pub fn snapshot_if_due<A: Aggregate>(
        &self,
        stream_id: &str,
        before: u64,
        after: u64,
        state: &A::State,
    ) {
        let every = self.options.snapshot_every_events.max(1);
        if before / every == after / every {
            return;
        }
        let snapshot = Snapshot {
            stream_id: stream_id.to_owned(),
            stream_version: after,
            state_version: A::STATE_VERSION,
            state: serde_json::to_value(state).expect("aggregate state serializes"),
        };
        let log = Arc::clone(&self.log);
        tokio::spawn(async move {
            if let Err(error) = log.save_snapshot(snapshot).await {
                tracing::warn!(%error, "snapshot not saved");
            }
        });
    }
}
