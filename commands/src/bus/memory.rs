//! The embedded bus: messages and consumer positions in process memory, gone with the
//! process.
//!
//! It keeps JetStream's semantics where consumers can tell: events travel in the same
//! batches, a batch is not stored twice, a durable consumer goes on from where it stopped when
//! it subscribes again, a negatively acknowledged delivery comes back after its delay with its
//! delivery count raised, and dead letters are kept for inspection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    batches, decode, Acker, Bus, BusError, ConsumerOptions, Deliveries, Delivery, Letter,
    Published, StoredLetter, Topic,
};
use crate::log::{LogCursor, RecordedEvent};

/// A bus in memory.
#[derive(Clone)]
pub struct MemoryBus {
    shared: Arc<Shared>,
    partitions: u16,
}

impl Default for MemoryBus {
    /// One partition: the embedded default is one process, which consumes every partition.
    fn default() -> Self {
        MemoryBus::with_partitions(1)
    }
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
    /// Moves on every publish and every negative ack, waking consumers.
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    messages: Vec<Message>,
    /// Message ids stored, as JetStream's duplicate window would hold them (for ever here).
    message_ids: HashSet<String>,
    consumers: HashMap<String, ConsumerState>,
    dead_letters: Vec<StoredLetter>,
    /// Dead letters stored so far, removed ones included: the last one's number.
    dead_letters_stored: u64,
}

struct Message {
    subject: String,
    /// Where the relay published it; `None` for a raw message (of a test).
    partition: Option<u16>,
    topic: Option<Topic>,
    payload: Bytes,
    cursor: Option<LogCursor>,
}

#[derive(Default)]
struct ConsumerState {
    /// Index of the next message never delivered.
    next: usize,
    /// Deliveries to make again: (due, message index, deliveries so far).
    redeliver: Vec<(Instant, usize, u64)>,
}

/// Acknowledges a delivery of the memory bus.
pub(crate) struct MemoryAcker {
    shared: Arc<Shared>,
    consumer: String,
    index: usize,
    delivered: u64,
}

impl MemoryAcker {
    pub(crate) fn redeliver_after(&self, delay: Duration) {
        let mut inner = lock(&self.shared.inner);
        inner
            .consumers
            .entry(self.consumer.clone())
            .or_default()
            .redeliver
            .push((Instant::now() + delay, self.index, self.delivered));
        drop(inner);
        self.shared.changed.send_modify(|n| *n += 1);
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Every critical section leaves `Inner` consistent before anything can panic.
    inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBus {
    /// An empty bus.
    pub fn new() -> Self {
        MemoryBus::default()
    }

    /// An empty bus publishing in `partitions` partitions (at least 1).
    pub fn with_partitions(partitions: u16) -> Self {
        MemoryBus {
            shared: Arc::default(),
            partitions: partitions.max(1),
        }
    }

    /// Messages stored so far.
    pub fn len(&self) -> usize {
        lock(&self.shared.inner).messages.len()
    }

    /// Whether nothing was published yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Events in the messages stored so far (repeats included); poison messages count none.
    pub fn events_stored(&self) -> usize {
        lock(&self.shared.inner)
            .messages
            .iter()
            .filter_map(|m| decode(&m.payload).ok())
            .map(|events| events.len())
            .sum()
    }

    /// Publishes a raw body, as a foreign or broken publisher would; for tests of poison
    /// messages.
    pub fn publish_raw(&self, payload: Bytes) {
        let mut inner = lock(&self.shared.inner);
        inner.messages.push(Message {
            subject: "events.raw".into(),
            partition: None,
            topic: None,
            payload,
            cursor: None,
        });
        drop(inner);
        self.shared.changed.send_modify(|n| *n += 1);
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BusError> {
        let batches = batches(events, self.partitions)?;
        let mut inner = lock(&self.shared.inner);
        for batch in batches {
            if !inner.message_ids.insert(batch.id()) {
                continue;
            }
            inner.messages.push(Message {
                subject: format!("events.{}.{}", batch.partition, batch.topic),
                partition: Some(batch.partition),
                topic: Some(batch.topic),
                payload: batch.payload,
                cursor: Some(batch.resume),
            });
        }
        drop(inner);
        self.shared.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    fn partitions(&self) -> u16 {
        self.partitions
    }

    async fn bind_log(&self, _log_id: &str) -> Result<(), BusError> {
        // In memory, the bus is the process's own: it never holds another log's events.
        Ok(())
    }

    async fn published(&self) -> Result<Published, BusError> {
        let inner = lock(&self.shared.inner);
        Ok(match inner.messages.iter().rev().find_map(|m| m.cursor) {
            Some(cursor) => Published::UpTo(cursor),
            None => Published::Nothing,
        })
    }

    async fn subscribe(&self, options: &ConsumerOptions) -> Result<Box<dyn Deliveries>, BusError> {
        lock(&self.shared.inner)
            .consumers
            .entry(options.name.clone())
            .or_default();
        Ok(Box::new(MemoryDeliveries {
            shared: Arc::clone(&self.shared),
            changed: self.shared.changed.subscribe(),
            options: options.clone(),
        }))
    }

    async fn dead_letter(
        &self,
        consumer: &str,
        letter: Letter<'_>,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut inner = lock(&self.shared.inner);
        inner.dead_letters_stored += 1;
        let id = inner.dead_letters_stored;
        inner.dead_letters.push(StoredLetter {
            id,
            consumer: consumer.to_owned(),
            subject: letter.subject.to_owned(),
            reason: reason.to_owned(),
            stored_at: chrono::Utc::now(),
            payload: letter.payload,
        });
        Ok(())
    }

    async fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, BusError> {
        Ok(lock(&self.shared.inner)
            .dead_letters
            .iter()
            .filter(|letter| letter.id > after)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn dead_letter_at(&self, id: u64) -> Result<Option<StoredLetter>, BusError> {
        Ok(lock(&self.shared.inner)
            .dead_letters
            .iter()
            .find(|letter| letter.id == id)
            .cloned())
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, BusError> {
        let mut inner = lock(&self.shared.inner);
        let before = inner.dead_letters.len();
        inner.dead_letters.retain(|letter| letter.id != id);
        Ok(inner.dead_letters.len() < before)
    }

    async fn ping(&self) -> Result<(), BusError> {
        Ok(())
    }
}

struct MemoryDeliveries {
    shared: Arc<Shared>,
    changed: watch::Receiver<u64>,
    options: ConsumerOptions,
}

impl MemoryDeliveries {
    /// The next delivery due now, or when the next redelivery falls due.
    fn take(&self) -> Result<Delivery, Option<Instant>> {
        let mut inner = lock(&self.shared.inner);
        let Inner {
            messages,
            consumers,
            ..
        } = &mut *inner;
        let state = consumers.entry(self.options.name.clone()).or_default();
        // A consumer of one partition or topic passes over the others' messages (and raw
        // ones).
        let (partition, topic) = (self.options.partition, self.options.topic);
        while messages.get(state.next).is_some_and(|m| {
            partition.is_some_and(|p| m.partition != Some(p))
                || topic.is_some_and(|t| m.topic != Some(t))
        }) {
            state.next += 1;
        }
        let now = Instant::now();
        let due = state
            .redeliver
            .iter()
            .enumerate()
            .filter(|(_, (at, _, _))| *at <= now)
            .min_by_key(|(_, (at, _, _))| *at)
            .map(|(i, _)| i);
        let (index, delivered) = if let Some(i) = due {
            let (_, index, delivered) = state.redeliver.swap_remove(i);
            (index, delivered + 1)
        } else if state.next < messages.len() {
            state.next += 1;
            (state.next - 1, 1)
        } else {
            return Err(state.redeliver.iter().map(|(at, _, _)| *at).min());
        };
        let message = &messages[index];
        Ok(Delivery {
            refused: None,
            subject: message.subject.clone(),
            payload: message.payload.clone(),
            delivered,
            acker: Acker::Memory(MemoryAcker {
                shared: Arc::clone(&self.shared),
                consumer: self.options.name.clone(),
                index,
                delivered,
            }),
        })
    }
}

#[async_trait]
impl Deliveries for MemoryDeliveries {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            self.changed.borrow_and_update();
            let wake_at = match self.take() {
                Ok(delivery) => return Some(Ok(delivery)),
                Err(wake_at) => wake_at,
            };
            let changed = self.changed.changed();
            match wake_at {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, changed).await;
                }
                None => changed.await.ok()?,
            }
        }
    }
}
