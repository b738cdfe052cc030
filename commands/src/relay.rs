//! The outbox relay: mirrors the global log into the [`Bus`], in order, exactly one relay at
//! a time across all instances.
//!
//! Every `serve` instance runs a [`Relay`]; the one that holds the [`RelayLease`] publishes,
//! the others stand by and try to take the lease every `standby_poll`. The leader:
//!
//! 1. reads the checkpoint, and goes back further if the bus lost messages past it
//!    ([`Bus::published`]);
//! 2. reads a batch of the global log after its cursor ([`EventLog::read_all`], which never
//!    skips a late commit);
//! 3. publishes the whole batch with every publish in flight, and waits for the acks;
//! 4. saves the cursor of the batch's last event as the checkpoint, then repeats.
//!
//! Killed anywhere, it loses nothing: the next leader starts from the checkpoint, which is
//! never past an acknowledged publish. What was published after the checkpoint is published
//! again under the same message ids; JetStream drops those within its duplicate window and
//! consumers deduplicate the rest.
//!
//! On Postgres the lease is a session advisory lock held on a connection of its own, and
//! the checkpoint is written on that same connection: when the leader's process dies, its
//! connection closes, the lock is released, and a standby takes over within one poll.

pub mod postgres;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{watch, Mutex, OwnedMutexGuard};

use crate::bus::{Bus, BusError, Published};
use crate::log::{EventLog, LogCursor, LogError};

/// How the relay paces itself.
#[derive(Clone, Debug)]
pub struct RelayOptions {
    /// Events read and published per batch; all of a batch's publishes are in flight at once.
    pub batch_events: usize,
    /// How long the leader waits for a local append before reading the log again; bounds how
    /// late it sees appends made by other instances.
    pub poll_interval: Duration,
    /// Under a steady stream of appends, how long after a read that did not fill a batch the
    /// leader lets events gather before it reads again. A read's events go out in a message
    /// per partition, and a message costs the broker and every consumer about as much
    /// whatever it carries: without a pause, a busy log goes out in many messages of a few
    /// events each.
    pub linger: Duration,
    /// How often a standby tries to take the lease.
    pub standby_poll: Duration,
    /// Pause after a failure before trying again.
    pub retry_after_error: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_events: 1_000,
            poll_interval: Duration::from_millis(20),
            linger: Duration::from_millis(5),
            standby_poll: Duration::from_secs(1),
            retry_after_error: Duration::from_secs(1),
        }
    }
}

/// What a relay is doing, for health checks, metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStatus {
    /// Whether this relay holds the lease and publishes.
    pub leader: bool,
    /// The cursor of the last event this relay published and checkpointed.
    pub position: LogCursor,
    /// Events this relay has published since it started.
    pub published: u64,
}

/// The relay failed; it gives up the lease and tries again.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading the log or the checkpoint failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// Publishing failed.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The right to be the one active relay, with the checkpoint that goes with it.
#[async_trait]
pub trait RelayLease: Send {
    /// Where publishing should resume: after this cursor.
    async fn checkpoint(&mut self) -> Result<LogCursor, LogError>;
    /// Records that everything up to `cursor` is published. Fails once the lease is lost.
    async fn save(&mut self, cursor: LogCursor) -> Result<(), LogError>;
    /// Checks the lease is still held; an error means it is lost.
    async fn keep_alive(&mut self) -> Result<(), LogError>;
}

/// Where relays take their lease.
#[async_trait]
pub trait RelayLeases: Send + Sync + 'static {
    /// The lease, if no other relay holds it.
    async fn try_acquire(&self) -> Result<Option<Box<dyn RelayLease>>, LogError>;
}

/// Leases for relays of one process, over the embedded log.
#[derive(Clone, Default)]
pub struct MemoryRelayLeases {
    checkpoint: Arc<Mutex<LogCursor>>,
}

impl MemoryRelayLeases {
    /// A lease that no relay holds yet, with an empty checkpoint.
    pub fn new() -> Self {
        MemoryRelayLeases::default()
    }
}

#[async_trait]
impl RelayLeases for MemoryRelayLeases {
    async fn try_acquire(&self) -> Result<Option<Box<dyn RelayLease>>, LogError> {
        Ok(Arc::clone(&self.checkpoint)
            .try_lock_owned()
            .ok()
            .map(|guard| Box::new(MemoryRelayLease(guard)) as Box<dyn RelayLease>))
    }
}

struct MemoryRelayLease(OwnedMutexGuard<LogCursor>);

#[async_trait]
impl RelayLease for MemoryRelayLease {
    async fn checkpoint(&mut self) -> Result<LogCursor, LogError> {
        Ok(*self.0)
    }

    async fn save(&mut self, cursor: LogCursor) -> Result<(), LogError> {
        *self.0 = cursor;
        Ok(())
    }

    async fn keep_alive(&mut self) -> Result<(), LogError> {
        Ok(())
    }
}

/// Mirrors a log into a bus while it holds the lease.
pub struct Relay {
    log: Arc<dyn EventLog>,
    bus: Arc<dyn Bus>,
    leases: Arc<dyn RelayLeases>,
    options: RelayOptions,
    status: watch::Sender<RelayStatus>,
}

impl Relay {
    /// A relay that has not started.
    pub fn new(
        log: Arc<dyn EventLog>,
        bus: Arc<dyn Bus>,
        leases: Arc<dyn RelayLeases>,
        options: RelayOptions,
    ) -> Relay {
        Relay {
            log,
            bus,
            leases,
            options,
            status: watch::channel(RelayStatus::default()).0,
        }
    }

    /// Its status, updated after every checkpoint.
    pub fn status(&self) -> watch::Receiver<RelayStatus> {
        self.status.subscribe()
    }

    /// Stands by, leads when it gets the lease, and stands by again when leading fails,
    /// until `shutdown` resolves. Dropping the future drops the lease.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let pause = match self.leases.try_acquire().await {
                Ok(Some(lease)) => {
                    tracing::info!("relay: took the lease, publishing the log");
                    self.status.send_modify(|s| s.leader = true);
                    let led = self.lead(lease, &mut shutdown).await;
                    self.status.send_modify(|s| s.leader = false);
                    match led {
                        Ok(()) => return,
                        Err(error) => {
                            tracing::warn!(%error, "relay: gave up the lease after a failure");
                            self.options.retry_after_error
                        }
                    }
                }
                Ok(None) => self.options.standby_poll,
                Err(error) => {
                    tracing::warn!(%error, "relay: cannot reach the lease");
                    self.options.retry_after_error
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Publishes until `shutdown` (Ok) or a failure (Err).
    async fn lead(
        &self,
        mut lease: Box<dyn RelayLease>,
        shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
    ) -> Result<(), RelayError> {
        let mut cursor = self.resume_point(lease.as_mut()).await?;
        self.status.send_modify(|s| s.position = cursor);
        let mut appends = self.log.appends();
        let mut batch = Vec::new();
        loop {
            if batch.is_empty() {
                appends.borrow_and_update();
                batch = tokio::select! {
                    _ = &mut *shutdown => return Ok(()),
                    batch = self.log.read_all(cursor, self.options.batch_events) => batch?,
                };
            }
            let Some(last) = batch.last().map(|event| event.cursor) else {
                lease.keep_alive().await?;
                tokio::select! {
                    _ = &mut *shutdown => return Ok(()),
                    _ = tokio::time::timeout(self.options.poll_interval, appends.changed()) => {}
                }
                continue;
            };
            // Read the next batch while this one's acks come back; after a batch that did not
            // fill, once more events have gathered.
            let linger = if batch.len() < self.options.batch_events {
                self.options.linger
            } else {
                Duration::ZERO
            };
            let read_next = async {
                tokio::time::sleep(linger).await;
                appends.borrow_and_update();
                self.log.read_all(last, self.options.batch_events).await
            };
            let (published, next) = tokio::join!(self.bus.publish(&batch), read_next);
            published?;
            lease.save(last).await?;
            cursor = last;
            let count = batch.len() as u64;
            self.status.send_modify(|s| {
                s.position = last;
                s.published += count;
            });
            // A busy log never waits, so look for a shutdown here too.
            tokio::select! {
                biased;
                _ = &mut *shutdown => return Ok(()),
                _ = std::future::ready(()) => {}
            }
            batch = next?;
        }
    }

    /// The checkpoint, or where the bus ends when it lost messages the checkpoint covers.
    async fn resume_point(&self, lease: &mut dyn RelayLease) -> Result<LogCursor, RelayError> {
        let checkpoint = lease.checkpoint().await?;
        let resume = match self.bus.published().await? {
            Published::UpTo(end) if end < checkpoint => end,
            Published::Nothing if checkpoint != LogCursor::default() => LogCursor::default(),
            _ => checkpoint,
        };
        if resume != checkpoint {
            tracing::warn!(
                ?checkpoint,
                ?resume,
                "relay: the bus ends before the checkpoint (it lost messages); publishing again from where it ends"
            );
        }
        Ok(resume)
    }
}
