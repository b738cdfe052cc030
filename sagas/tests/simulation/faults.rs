//! The seeded randomness of a run, and the event log the actors see: the real
//! [`MemoryEventLog`] behind a wrapper that adds await points (where an actor may crash),
//! appends refused before storing, and replies lost after storing.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use commands::idempotency::{IdempotencyKey, IdempotencyRecord, Recorded};
use commands::log::memory::MemoryEventLog;
use commands::{AppendRequest, Appended, EventLog, LogCursor, LogError, RecordedEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::executor::AwaitPoint;

/// The one source of randomness of a run (and a second one, for the log, derived from it):
/// the same seed makes the same choices in the same order.
pub struct SimRng(StdRng);

impl SimRng {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> Self {
        SimRng(StdRng::seed_from_u64(seed))
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.0.gen_bool(p.min(1.0))
    }

    /// A number in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.gen_range(0..n)
    }

    /// A number in `low..=high`.
    pub fn between(&mut self, low: u64, high: u64) -> u64 {
        self.0.gen_range(low..=high)
    }

    /// A rate in `0..=max`.
    pub fn rate(&mut self, max: f64) -> f64 {
        self.0.gen_range(0.0..=max)
    }

    /// 128 random bits, for ids.
    pub fn bits(&mut self) -> u128 {
        self.0.gen()
    }
}

/// A deliberately wrong variant of the system, to prove the simulation finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plant {
    /// The system as it is.
    Nothing,
    /// A bucket's `StockMoved` gives back twice the units its releases freed, as a writer that
    /// applied each release twice to its counter would record.
    ReleaseTwice,
}

/// What the log does wrong, and how often; changed by the world between phases of a run.
pub struct LogFaults {
    rng: SimRng,
    /// An append fails before anything is stored.
    pub refuse_append: f64,
    /// An append is stored and its reply is lost: the caller sees an error.
    pub lose_reply: f64,
    /// A read fails.
    pub fail_read: f64,
    /// The planted bug, if any.
    pub plant: Plant,
    /// Conflicts since the world last looked, for its trace: which stream, at which version
    /// the append expected it, and where it was.
    pub conflicts: Vec<String>,
}

impl LogFaults {
    /// No faults yet, choices from `seed`.
    pub fn new(seed: u64, plant: Plant) -> Self {
        LogFaults {
            rng: SimRng::new(seed ^ 0x5eed_10c5),
            refuse_append: 0.0,
            lose_reply: 0.0,
            fail_read: 0.0,
            plant,
            conflicts: Vec::new(),
        }
    }

    /// The rates, for the report of a failure.
    pub fn rates(&self) -> [(&'static str, f64); 3] {
        [
            ("refuse_append", self.refuse_append),
            ("lose_reply", self.lose_reply),
            ("fail_read", self.fail_read),
        ]
    }

    /// Turns every fault off, for the quiet end of a run.
    pub fn calm(&mut self) {
        self.refuse_append = 0.0;
        self.lose_reply = 0.0;
        self.fail_read = 0.0;
    }
}

/// The log every actor appends to and reads from.
pub struct FaultyLog {
    inner: Arc<MemoryEventLog>,
    faults: Arc<Mutex<LogFaults>>,
    replies_lost: bool,
}

impl FaultyLog {
    /// `inner` with `faults`; with `replies_lost`, some stored appends answer with an error.
    pub fn new(
        inner: Arc<MemoryEventLog>,
        faults: Arc<Mutex<LogFaults>>,
        replies_lost: bool,
    ) -> Self {
        FaultyLog {
            inner,
            faults,
            replies_lost,
        }
    }

    fn roll(&self, pick: impl Fn(&LogFaults) -> f64) -> bool {
        let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        let p = pick(&faults);
        faults.rng.chance(p)
    }

    fn plant(&self) -> Plant {
        self.faults.lock().unwrap_or_else(|p| p.into_inner()).plant
    }

    async fn note_conflicts(&self, outcomes: &[Result<Appended, LogError>]) {
        for outcome in outcomes {
            if let Err(LogError::Conflict {
                stream_id,
                expected_version,
            }) = outcome
            {
                let at = self
                    .inner
                    .read_stream(stream_id, 0, usize::MAX)
                    .await
                    .map_or(0, |events| events.len());
                let mut faults = self.faults.lock().unwrap_or_else(|p| p.into_inner());
                faults.conflicts.push(format!(
                    "{stream_id} expected v{expected_version}, at v{at}"
                ));
            }
        }
    }

    async fn read_point(&self) -> Result<(), LogError> {
        AwaitPoint::default().await;
        if self.roll(|f| f.fail_read) {
            return Err(unreachable_log("read failed"));
        }
        Ok(())
    }
}

fn unreachable_log(why: &str) -> LogError {
    LogError::Unreachable {
        at: "simulation".into(),
        why: why.into(),
    }
}

/// The planted bug: doubles the units a bucket's move gives back.
fn release_twice(request: &mut AppendRequest) {
    for stream in &mut request.streams {
        for event in &mut stream.events {
            if event.event.event_type != "StockMoved" {
                continue;
            }
            if let Some(released) = event.event.data.get_mut("released") {
                let units = released.as_u64().unwrap_or(0);
                *released = serde_json::Value::from(units * 2);
            }
        }
    }
}

#[async_trait]
impl EventLog for FaultyLog {
    async fn append_batch(
        &self,
        mut requests: Vec<AppendRequest>,
    ) -> Vec<Result<Appended, LogError>> {
        // A crash here loses the decision before it is stored.
        AwaitPoint::default().await;
        if self.roll(|f| f.refuse_append) {
            return requests
                .iter()
                .map(|_| Err(LogError::BatchFailed("simulated: refused".into())))
                .collect();
        }
        if self.plant() == Plant::ReleaseTwice {
            requests.iter_mut().for_each(release_twice);
        }
        let outcomes = self.inner.append_batch(requests).await;
        self.note_conflicts(&outcomes).await;
        // A crash here loses the reply of a stored append.
        AwaitPoint::default().await;
        if self.replies_lost && self.roll(|f| f.lose_reply) {
            return outcomes
                .iter()
                .map(|_| Err(unreachable_log("stored, but the reply was lost")))
                .collect();
        }
        outcomes
    }

    async fn read_streams(
        &self,
        stream_ids: &[String],
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.read_point().await?;
        self.inner.read_streams(stream_ids, limit).await
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.read_point().await?;
        self.inner
            .read_stream(stream_id, after_version, limit)
            .await
    }

    async fn read_all(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.read_point().await?;
        self.inner.read_all(after, limit).await
    }

    async fn load_snapshot(
        &self,
        stream_id: &str,
    ) -> Result<Option<commands::log::Snapshot>, LogError> {
        self.read_point().await?;
        self.inner.load_snapshot(stream_id).await
    }

    async fn save_snapshot(&self, snapshot: commands::log::Snapshot) -> Result<(), LogError> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, LogError> {
        self.inner.find_idempotent(key).await
    }

    async fn amend_idempotent(&self, record: IdempotencyRecord) -> Result<(), LogError> {
        self.inner.amend_idempotent(record).await
    }

    fn appends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.appends()
    }

    async fn head(&self) -> Result<u64, LogError> {
        self.inner.head().await
    }

    async fn count_after(&self, after: u64, categories: &[&str]) -> Result<u64, LogError> {
        self.inner.count_after(after, categories).await
    }

    async fn expire_idempotency_keys(
        &self,
        older_than: std::time::Duration,
        limit: usize,
    ) -> Result<u64, LogError> {
        self.inner.expire_idempotency_keys(older_than, limit).await
    }

    async fn identity(&self) -> Result<String, LogError> {
        self.inner.identity().await
    }
}
