//! The embedded bus: messages and consumer positions in process memory, gone with the
//! process.
//!
//! It keeps JetStream's semantics where consumers can tell: messages are deduplicated by
//! event id, a durable consumer goes on from where it stopped when it subscribes again, a
//! negatively acknowledged delivery comes back after its delay with its delivery count raised,
//! and dead letters are kept for inspection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;
use ulid::Ulid;

use super::{
    decode, encode, Acker, Bus, BusError, ConsumerOptions, Deliveries, Delivery, Published,
};
use crate::log::{LogCursor, RecordedEvent};

/// A bus in memory.
#[derive(Clone, Default)]
pub struct MemoryBus {
    shared: Arc<Shared>,
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
    event_ids: HashSet<Ulid>,
    consumers: HashMap<String, ConsumerState>,
    dead_letters: Vec<DeadLetter>,
}

struct Message {
    category: String,
    subject: String,
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

/// A delivery a consumer gave up on.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The consumer.
    pub consumer: String,
    /// The subject it was delivered on.
    pub subject: String,
    /// The message body.
    pub payload: Bytes,
    /// Why the consumer gave up.
    pub reason: String,
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

    /// The dead letters so far, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        lock(&self.shared.inner).dead_letters.clone()
    }

    /// Messages stored so far.
    pub fn len(&self) -> usize {
        lock(&self.shared.inner).messages.len()
    }

    /// Whether nothing was published yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Publishes a raw body on a category's subject, as a foreign or broken publisher
    /// would; for tests of poison messages.
    pub fn publish_raw(&self, category: &str, payload: Bytes) {
        let mut inner = lock(&self.shared.inner);
        inner.messages.push(Message {
            category: category.to_owned(),
            subject: format!("events.{category}.raw"),
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
        let encoded = events
            .iter()
            .map(|event| Ok((event, encode(event)?)))
            .collect::<Result<Vec<_>, BusError>>()?;
        let mut inner = lock(&self.shared.inner);
        for (event, payload) in encoded {
            if !inner.event_ids.insert(event.envelope.event_id) {
                continue;
            }
            let category = event.envelope.category().to_owned();
            inner.messages.push(Message {
                subject: format!("events.{category}.{}", event.envelope.stream_id),
                category,
                payload,
                cursor: Some(event.cursor),
            });
        }
        drop(inner);
        self.shared.changed.send_modify(|n| *n += 1);
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
        delivery: &Delivery,
        reason: &str,
    ) -> Result<(), BusError> {
        lock(&self.shared.inner).dead_letters.push(DeadLetter {
            consumer: consumer.to_owned(),
            subject: delivery.subject.clone(),
            payload: delivery.payload.clone(),
            reason: reason.to_owned(),
        });
        Ok(())
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
        } else {
            let wanted = |m: &Message| {
                self.options
                    .category
                    .as_deref()
                    .is_none_or(|c| c == m.category)
            };
            match messages[state.next..].iter().position(wanted) {
                Some(offset) => {
                    let index = state.next + offset;
                    state.next = index + 1;
                    (index, 1)
                }
                None => {
                    state.next = messages.len();
                    return Err(state.redeliver.iter().map(|(at, _, _)| *at).min());
                }
            }
        };
        let message = &messages[index];
        Ok(Delivery {
            event: decode(&message.payload),
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
