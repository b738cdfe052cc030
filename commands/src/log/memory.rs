//! The embedded event log: everything in process memory, gone when the process ends.
//!
//! It keeps the Postgres log's semantics exactly (expected versions, atomic multi-stream
//! appends, idempotent re-sends, Idempotency-Key records), so the embedded default behaves like
//! production; the shared test suite in `tests/integration/event_log.rs` holds both to it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use async_trait::async_trait;
use schemas::Envelope;
use tokio::sync::watch;
use ulid::Ulid;

use super::{
    check_request, keep_apart_if_reused, AppendRequest, Appended, EventLog, LogCursor, LogError,
    RecordedEvent, Snapshot,
};
use crate::idempotency::{
    Answer, IdempotencyKey, IdempotencyRecord, Keeping, Recorded, StoredResponse,
    IDEMPOTENCY_KEY_TTL_S,
};

/// An event log in memory.
pub struct MemoryEventLog {
    inner: Mutex<Inner>,
    appends: watch::Sender<u64>,
    identity: Ulid,
}

#[derive(Default)]
struct Inner {
    /// Every event in global order; index `i` holds position `i + 1`.
    events: Vec<RecordedEvent>,
    /// Indexes into `events`, per stream, in version order.
    streams: HashMap<String, Vec<usize>>,
    event_ids: HashMap<Ulid, usize>,
    snapshots: HashMap<String, Snapshot>,
    keys: HashMap<IdempotencyKey, KeyRecord>,
    transactions: u64,
}

struct KeyRecord {
    request_sha256: String,
    answer: KeptAnswer,
    created_at: Instant,
}

/// A key's answer as the log keeps it.
enum KeptAnswer {
    /// The response, kept apart.
    Response(StoredResponse),
    /// The events (indexes into `Inner::events`) the request started its stream with.
    Events(Vec<usize>),
}

impl KeyRecord {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.created_at).as_secs() >= IDEMPOTENCY_KEY_TTL_S
    }
}

impl Default for MemoryEventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryEventLog {
    /// An empty log.
    pub fn new() -> Self {
        MemoryEventLog {
            inner: Mutex::new(Inner::default()),
            appends: watch::channel(0).0,
            identity: Ulid::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-applied append: appends check
        // everything first and only then push. So a poisoned lock is still consistent.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    /// One request, atomically: everything is checked before anything is stored.
    fn append(&mut self, mut request: AppendRequest) -> Result<Appended, LogError> {
        let count = check_request(&request)?;
        let now = Instant::now();
        if let Some(record) = &request.idempotency {
            if let Some(taken) = self.keys.get(&record.key).filter(|k| !k.expired(now)) {
                return Err(LogError::KeyTaken(Box::new(self.recorded(taken))));
            }
        }
        keep_apart_if_reused(&mut request, |id| self.event_ids.contains_key(id));
        let stored: Vec<usize> = request
            .streams
            .iter()
            .flat_map(|s| &s.events)
            .filter_map(|e| self.event_ids.get(&e.event_id).copied())
            .collect();
        if count > 0 && stored.len() == count {
            let last = stored
                .iter()
                .map(|&i| self.events[i].cursor)
                .max()
                .expect("count > 0");
            return Ok(Appended {
                last,
                replayed: true,
            });
        }
        for stream in &request.streams {
            let version = self
                .streams
                .get(&stream.stream_id)
                .map_or(0, |v| v.len() as u64);
            // Some but not all events stored means this is not a re-send of the same append,
            // so it is treated like any other write that lost the race.
            if version != stream.expected_version || !stored.is_empty() {
                return Err(LogError::Conflict {
                    stream_id: stream.stream_id.clone(),
                    expected_version: stream.expected_version,
                });
            }
        }

        self.transactions += 1;
        let transaction_id = self.transactions;
        let recorded_at = chrono::Utc::now();
        let mut last = LogCursor::default();
        let first = self.events.len();
        let first_stream_events = request.streams.first().map_or(0, |s| s.events.len());
        for stream in request.streams {
            for (offset, event) in stream.events.into_iter().enumerate() {
                let index = self.events.len();
                let cursor = LogCursor {
                    transaction_id,
                    global_position: index as u64 + 1,
                };
                let envelope = Envelope {
                    event_id: event.event_id,
                    stream_id: stream.stream_id.clone(),
                    stream_version: stream.expected_version + offset as u64 + 1,
                    global_position: cursor.global_position,
                    event_type: event.event.event_type,
                    schema_version: event.event.schema_version,
                    recorded_at,
                    metadata: event.metadata,
                    data: event.event.data,
                };
                self.events.push(RecordedEvent { cursor, envelope });
                self.event_ids.insert(event.event_id, index);
                self.streams
                    .entry(stream.stream_id.clone())
                    .or_default()
                    .push(index);
                last = cursor;
            }
        }
        if let Some(record) = request.idempotency {
            let answer = match record.keeping {
                Keeping::Apart(response) => KeptAnswer::Response(response),
                Keeping::InFirstEvent { .. } => {
                    KeptAnswer::Events((first..first + first_stream_events).collect())
                }
            };
            self.keys.insert(
                record.key,
                KeyRecord {
                    request_sha256: record.request_sha256,
                    answer,
                    created_at: now,
                },
            );
        }
        Ok(Appended {
            last,
            replayed: false,
        })
    }
}

impl Inner {
    fn recorded(&self, kept: &KeyRecord) -> Recorded {
        Recorded {
            request_sha256: kept.request_sha256.clone(),
            answer: match &kept.answer {
                KeptAnswer::Response(response) => Answer::Response(response.clone()),
                KeptAnswer::Events(indexes) => Answer::Appended(
                    indexes
                        .iter()
                        .map(|&i| self.events[i].envelope.clone())
                        .collect(),
                ),
            },
        }
    }
}

#[async_trait]
impl EventLog for MemoryEventLog {
    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, LogError>> {
        let mut inner = self.lock();
        let outcomes: Vec<_> = requests
            .into_iter()
            .map(|request| inner.append(request))
            .collect();
        drop(inner);
        if outcomes
            .iter()
            .any(|o| o.as_ref().is_ok_and(|a| !a.replayed))
        {
            self.appends.send_modify(|n| *n += 1);
        }
        outcomes
    }

    async fn read_streams(
        &self,
        stream_ids: &[String],
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let inner = self.lock();
        let mut ids: Vec<&String> = stream_ids.iter().collect();
        ids.sort();
        ids.dedup();
        Ok(ids
            .into_iter()
            .filter_map(|id| inner.streams.get(id))
            .flatten()
            .take(limit.min(super::READ_EVENTS_MAX))
            .map(|&i| inner.events[i].clone())
            .collect())
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let inner = self.lock();
        let Some(indexes) = inner.streams.get(stream_id) else {
            return Ok(vec![]);
        };
        let skip = usize::try_from(after_version).unwrap_or(usize::MAX);
        Ok(indexes
            .iter()
            .skip(skip)
            .take(limit.min(super::READ_EVENTS_MAX))
            .map(|&i| inner.events[i].clone())
            .collect())
    }

    async fn read_all(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let inner = self.lock();
        // Appends are atomic under the lock, so every stored event is settled, and positions
        // follow transactions: the position alone orders the log.
        let start = usize::try_from(after.global_position).unwrap_or(usize::MAX);
        Ok(inner
            .events
            .iter()
            .skip(start)
            .take(limit.min(super::READ_EVENTS_MAX))
            .cloned()
            .collect())
    }

    async fn head(&self) -> Result<u64, LogError> {
        Ok(self.lock().events.len() as u64)
    }

    async fn count_after(&self, after: u64, categories: &[&str]) -> Result<u64, LogError> {
        let inner = self.lock();
        let start = usize::try_from(after).unwrap_or(usize::MAX);
        Ok(inner
            .events
            .iter()
            .skip(start)
            .filter(|e| categories.contains(&e.envelope.category()))
            .count() as u64)
    }

    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, LogError> {
        Ok(self.lock().snapshots.get(stream_id).cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), LogError> {
        let mut inner = self.lock();
        let newer_stored = inner
            .snapshots
            .get(&snapshot.stream_id)
            .is_some_and(|s| s.stream_version >= snapshot.stream_version);
        if !newer_stored {
            inner.snapshots.insert(snapshot.stream_id.clone(), snapshot);
        }
        Ok(())
    }

    async fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, LogError> {
        let inner = self.lock();
        Ok(inner
            .keys
            .get(key)
            .filter(|k| !k.expired(Instant::now()))
            .map(|k| inner.recorded(k)))
    }

    async fn expire_idempotency_keys(
        &self,
        older_than: std::time::Duration,
        limit: usize,
    ) -> Result<u64, LogError> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut expired: Vec<(Instant, IdempotencyKey)> = inner
            .keys
            .iter()
            .filter(|(_, k)| now.duration_since(k.created_at) > older_than)
            .map(|(key, k)| (k.created_at, key.clone()))
            .collect();
        expired.sort_by_key(|(created_at, _)| *created_at);
        expired.truncate(limit);
        for (_, key) in &expired {
            inner.keys.remove(key);
        }
        Ok(expired.len() as u64)
    }

    async fn identity(&self) -> Result<String, LogError> {
        Ok(self.identity.to_string())
    }

    async fn amend_idempotent(&self, record: IdempotencyRecord) -> Result<(), LogError> {
        let mut inner = self.lock();
        let Keeping::Apart(response) = record.keeping else {
            return Err(LogError::InvalidAppend("an amended answer is kept apart"));
        };
        if let Some(stored) = inner
            .keys
            .get_mut(&record.key)
            .filter(|k| !k.expired(Instant::now()) && k.request_sha256 == record.request_sha256)
        {
            stored.answer = KeptAnswer::Response(response);
        }
        Ok(())
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.appends.subscribe()
    }
}
