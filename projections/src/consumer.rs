//! A projection as a consumer of the subscription runtime: its handler and its dedupe are
//! one, because the record of what it applied is written by the same atomic store call as
//! the data (see [`ProjectionStore::apply`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use commands::bus::Topic;
use commands::subscription::{Dedupe, DedupeError, Handler, HandlerError, Seen};
use schemas::{Envelope, EventHead};

use crate::ops::{Change, ProjectionName};
use crate::store::ProjectionStore;

/// Streams whose last applied version the consumer remembers before it starts over.
const REMEMBERED_STREAMS_MAX: usize = 100_000;

/// Feeds one projection from the bus. Use it as both the [`Handler`] and the [`Dedupe`] of a
/// subscription with per-stream order.
pub struct ProjectionConsumer {
    name: ProjectionName,
    store: Arc<dyn ProjectionStore>,
    remembered: Mutex<Remembered>,
}

/// What this process last applied per stream, so most dedupe questions need no round trip.
/// It is only ever behind the store (other processes, or a rebuild, may have moved it), and
/// anything it cannot answer for sure goes to the store.
#[derive(Default)]
struct Remembered {
    live: Option<u32>,
    versions: HashMap<String, u64>,
}

impl ProjectionConsumer {
    /// A consumer for projection `name` writing to `store`.
    pub fn new(name: ProjectionName, store: Arc<dyn ProjectionStore>) -> Self {
        ProjectionConsumer {
            name,
            store,
            remembered: Mutex::default(),
        }
    }

    /// The durable consumer name for this projection.
    pub fn consumer_name(&self) -> String {
        format!("projection-{}", self.name)
    }

    fn remember(&self, live: Option<u32>, stream_id: &str, version: u64) {
        let mut remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        if remembered.live != live || remembered.versions.len() >= REMEMBERED_STREAMS_MAX {
            remembered.versions.clear();
            remembered.live = live;
        }
        if live.is_some() {
            let done = remembered.versions.entry(stream_id.to_owned()).or_default();
            *done = (*done).max(version);
        }
    }

    /// What can be said of `event` without asking the store: it is new to a projection that
    /// does not read its stream; done stays done; and next is safe, as the store applies
    /// atomically and skips what it holds. An event that looks early is for the store.
    fn remembered_seen(&self, event: &Envelope) -> Option<Seen> {
        if !self.name.reads(&event.stream_id) {
            return Some(Seen::New);
        }
        let done_to = self.remembered(&event.stream_id)?;
        match by_version(done_to, event.stream_version) {
            seen @ (Seen::Done | Seen::New) => Some(seen),
            Seen::Early { .. } => None,
        }
    }

    fn remembered(&self, stream_id: &str) -> Option<u64> {
        let remembered = self.remembered.lock().unwrap_or_else(|p| p.into_inner());
        remembered.versions.get(stream_id).copied()
    }
}

fn by_version(done_to: u64, version: u64) -> Seen {
    if version <= done_to {
        Seen::Done
    } else if version == done_to + 1 {
        Seen::New
    } else {
        Seen::Early { done_to }
    }
}

#[async_trait]
impl Handler for ProjectionConsumer {
    async fn handle(&self, event: &Envelope) -> Result<(), HandlerError> {
        self.handle_batch(&[event]).await
    }

    /// Applies a batch in one store call (one Redis round trip).
    async fn handle_batch(&self, events: &[&Envelope]) -> Result<(), HandlerError> {
        let mut changes = Vec::with_capacity(events.len());
        for event in events {
            if let Some(change) = Change::of(self.name, event)? {
                changes.push(change);
            }
        }
        let outcomes = self.store.apply_all(self.name, &changes).await?;
        for (change, outcome) in changes.iter().zip(outcomes) {
            self.remember(outcome.live, &change.stream_id, change.version);
        }
        Ok(())
    }

    fn wants(&self, event: &EventHead<'_>) -> bool {
        self.name.reads(event.stream_id)
    }

    fn topic(&self) -> Option<Topic> {
        Some(self.name.topic())
    }

    fn handles_batches(&self) -> bool {
        true
    }
}

#[async_trait]
impl Dedupe for ProjectionConsumer {
    async fn seen(&self, _consumer: &str, event: &Envelope) -> Result<Seen, DedupeError> {
        if let Some(seen) = self.remembered_seen(event) {
            return Ok(seen);
        }
        let done_to = self
            .store
            .applied_version(&event.stream_id)
            .await
            .map_err(|e| DedupeError::new(e.to_string()))?;
        Ok(by_version(done_to, event.stream_version))
    }

    /// Answers what this process remembers at once, and asks the store about the rest in one
    /// call.
    async fn seen_all(
        &self,
        _consumer: &str,
        events: &[&Envelope],
    ) -> Result<Vec<Seen>, DedupeError> {
        let mut seen = Vec::with_capacity(events.len());
        let mut ask = Vec::new();
        for (i, event) in events.iter().enumerate() {
            seen.push(self.remembered_seen(event).unwrap_or_else(|| {
                ask.push(i);
                Seen::New
            }));
        }
        if ask.is_empty() {
            return Ok(seen);
        }
        let streams: Vec<String> = ask.iter().map(|&i| events[i].stream_id.clone()).collect();
        let done = self
            .store
            .applied_version_each(&streams)
            .await
            .map_err(|e| DedupeError::new(e.to_string()))?;
        for (&i, done_to) in ask.iter().zip(done) {
            seen[i] = by_version(done_to, events[i].stream_version);
        }
        Ok(seen)
    }

    async fn record(&self, _consumer: &str, event: &Envelope) -> Result<(), DedupeError> {
        if !self.name.reads(&event.stream_id)
            || self
                .remembered(&event.stream_id)
                .is_some_and(|done| done >= event.stream_version)
        {
            // Nothing to record, or the apply recorded it with its effects.
            return Ok(());
        }
        // Dead-lettered: done with it, with no effect, so the stream goes on.
        self.store
            .skip(self.name, &event.stream_id, event.stream_version)
            .await
            .map_err(|e| DedupeError::new(e.to_string()))
    }

    fn needs_stream_order(&self) -> bool {
        true
    }
}
