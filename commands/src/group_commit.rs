//! Group commit: appends from many concurrent callers gathered into one transaction.
//!
//! A flash sale sends thousands of small appends a second at the log: one `OrderPlaced` per
//! request, and the saga's decisions. One transaction each would spend the database on
//! commits (a WAL flush each); gathered, one commit carries hundreds of them. [`GroupCommit`]
//! wraps any [`EventLog`] and sends every append through one committer task:
//!
//! - While transactions run, new appends queue. When one is done (by default two run at once,
//!   [`GroupCommitOptions::transactions_in_flight`]), the committer takes every queued append
//!   (at most [`GroupCommitOptions::batch_requests_max`] requests and
//!   [`GroupCommitOptions::batch_events_max`] events), optionally waits
//!   [`GroupCommitOptions::linger`] for more, and commits them together with
//!   [`EventLog::append_batch`]. Under light load a batch is one append and waits for nothing;
//!   under heavy load batches grow by themselves. A second transaction in flight means an
//!   append arriving mid-commit waits for less than a whole transaction before its own.
//! - Each caller gets its own outcome: its own conflict, its own Idempotency-Key record, its
//!   own error. A failed transaction fails every append of the batch with
//!   [`LogError::BatchFailed`], which is safe to retry: nothing of the batch was stored.
//! - Two appends that write the same stream (or record the same key) never share a batch,
//!   nor run in two transactions at once: the later waits for the earlier's transaction to
//!   end, so it can follow the earlier one's events.
//! - The queue is bounded ([`GroupCommitOptions::queue_requests_max`]): past it, callers wait
//!   for room, which is how back-pressure reaches the request handlers.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};

use crate::idempotency::{IdempotencyKey, IdempotencyRecord, Recorded};
use crate::log::{AppendRequest, Appended, EventLog, LogCursor, LogError, RecordedEvent, Snapshot};

/// How a group commit gathers appends.
#[derive(Clone, Debug)]
pub struct GroupCommitOptions {
    /// Most appends in one transaction.
    pub batch_requests_max: usize,
    /// Most events in one transaction (an append larger than this goes alone).
    pub batch_events_max: usize,
    /// How long the committer waits for more appends once it has one, when the batch is not
    /// full. Zero: take what is queued and go.
    pub linger: Duration,
    /// Appends waiting for a transaction before callers wait for room.
    pub queue_requests_max: usize,
    /// Transactions running at once. With more than one, a new transaction starts while
    /// another commits, so a caller waits for less than a whole transaction before its own;
    /// appends that write a stream or key in common still never run at once, and keep their
    /// order.
    pub transactions_in_flight: usize,
}

impl Default for GroupCommitOptions {
    fn default() -> Self {
        GroupCommitOptions {
            batch_requests_max: 1_000,
            batch_events_max: 10_000,
            linger: Duration::ZERO,
            queue_requests_max: 20_000,
            transactions_in_flight: 2,
        }
    }
}

/// An append waiting for its transaction.
struct Queued {
    request: AppendRequest,
    reply: oneshot::Sender<Result<Appended, LogError>>,
}

/// An [`EventLog`] whose appends are group-committed; everything else goes straight through.
pub struct GroupCommit {
    inner: Arc<dyn EventLog>,
    queue: mpsc::Sender<Queued>,
}

impl GroupCommit {
    /// Wraps `inner` and starts the committer task on the current tokio runtime; the task
    /// ends when the wrapper is dropped.
    pub fn new(inner: Arc<dyn EventLog>, options: GroupCommitOptions) -> GroupCommit {
        let (queue, queued) = mpsc::channel(options.queue_requests_max.max(1));
        tokio::spawn(commit(Arc::clone(&inner), queued, options));
        GroupCommit { inner, queue }
    }

    /// The log it commits to.
    pub fn inner(&self) -> &Arc<dyn EventLog> {
        &self.inner
    }
}

/// The committer: up to [`GroupCommitOptions::transactions_in_flight`] transactions at once,
/// each carrying the appends that queued while the others ran.
async fn commit(
    log: Arc<dyn EventLog>,
    mut queued: mpsc::Receiver<Queued>,
    options: GroupCommitOptions,
) {
    let requests_max = options.batch_requests_max.max(1);
    let slots = options.transactions_in_flight.max(1);
    // Appends not yet in a transaction, in arrival order; those that overlap an earlier one
    // (in a transaction or still here) wait for it.
    let mut held: VecDeque<Queued> = VecDeque::new();
    // What the running transactions write, by transaction.
    let mut in_flight: HashMap<u64, Footprint> = HashMap::new();
    let mut running = FuturesUnordered::new();
    let mut next_id = 0u64;
    let mut open = true;
    loop {
        while held.len() < requests_max * 2 {
            match queued.try_recv() {
                Ok(next) => held.push_back(next),
                Err(_) => break,
            }
        }
        if running.len() < slots && !held.is_empty() {
            if !options.linger.is_zero() && held.len() < requests_max {
                let deadline = tokio::time::Instant::now() + options.linger;
                while held.len() < requests_max {
                    match tokio::time::timeout_at(deadline, queued.recv()).await {
                        Ok(Some(next)) => held.push_back(next),
                        _ => break,
                    }
                }
            }
            let (batch, footprint) = take_batch(
                &mut held,
                in_flight.values(),
                requests_max,
                options.batch_events_max,
            );
            if !batch.is_empty() {
                let id = next_id;
                next_id += 1;
                in_flight.insert(id, footprint);
                running.push(run_batch(Arc::clone(&log), batch, id));
                continue;
            }
        }
        if !open && held.is_empty() && running.is_empty() {
            return;
        }
        tokio::select! {
            Some(done) = running.next(), if !running.is_empty() => {
                in_flight.remove(&done);
            }
            next = queued.recv(), if open && held.len() < requests_max * 2 => match next {
                Some(next) => held.push_back(next),
                None => open = false,
            },
        }
    }
}

/// Commits one batch and tells each caller its outcome; resolves to the batch's id.
async fn run_batch(log: Arc<dyn EventLog>, batch: Vec<Queued>, id: u64) -> u64 {
    let (requests, replies): (Vec<_>, Vec<_>) =
        batch.into_iter().map(|q| (q.request, q.reply)).unzip();
    metrics::histogram!("groupbuy_group_commit_appends").record(requests.len() as f64);
    metrics::histogram!("groupbuy_group_commit_events").record(
        requests
            .iter()
            .map(AppendRequest::event_count)
            .sum::<usize>() as f64,
    );
    let started = std::time::Instant::now();
    let outcomes = log.append_batch(requests).await;
    metrics::histogram!("groupbuy_group_commit_seconds").record(started.elapsed().as_secs_f64());
    for (reply, outcome) in replies.into_iter().zip(outcomes) {
        // A caller that gave up waiting has nobody to tell.
        let _ = reply.send(outcome);
    }
    id
}

/// The streams and Idempotency-Keys a set of appends writes.
#[derive(Default)]
struct Footprint {
    streams: HashSet<String>,
    keys: HashSet<IdempotencyKey>,
}

impl Footprint {
    fn overlaps(&self, request: &AppendRequest) -> bool {
        request
            .idempotency
            .as_ref()
            .is_some_and(|record| self.keys.contains(&record.key))
            || request
                .streams
                .iter()
                .any(|stream| self.streams.contains(&stream.stream_id))
    }

    fn add(&mut self, request: &AppendRequest) {
        if let Some(record) = &request.idempotency {
            self.keys.insert(record.key.clone());
        }
        self.streams
            .extend(request.streams.iter().map(|s| s.stream_id.clone()));
    }
}

/// The next batch from the front of `held`, and what it writes: appends that overlap neither
/// a running transaction nor an append before them, within the limits. The first eligible
/// append always goes, however large.
fn take_batch<'a>(
    held: &mut VecDeque<Queued>,
    running: impl Iterator<Item = &'a Footprint> + Clone,
    requests_max: usize,
    events_max: usize,
) -> (Vec<Queued>, Footprint) {
    let mut batch: Vec<Queued> = Vec::new();
    let mut taken = Footprint::default();
    // What the appends left behind write: a later append to one of their streams waits too,
    // so appends to one stream keep their order.
    let mut skipped_footprint = Footprint::default();
    let mut skipped = VecDeque::new();
    let mut events = 0;
    while let Some(next) = held.pop_front() {
        let size = next.request.event_count();
        let fits = batch.is_empty() || events + size <= events_max;
        let overlaps = taken.overlaps(&next.request)
            || skipped_footprint.overlaps(&next.request)
            || running.clone().any(|f| f.overlaps(&next.request));
        if fits && !overlaps {
            events += size;
            taken.add(&next.request);
            batch.push(next);
            if batch.len() == requests_max {
                break;
            }
        } else {
            skipped_footprint.add(&next.request);
            skipped.push_back(next);
        }
    }
    while let Some(s) = skipped.pop_back() {
        held.push_front(s);
    }
    (batch, taken)
}

#[async_trait]
impl EventLog for GroupCommit {
    async fn append(&self, request: AppendRequest) -> Result<Appended, LogError> {
        let (reply, outcome) = oneshot::channel();
        self.queue
            .send(Queued { request, reply })
            .await
            .map_err(|_| LogError::BatchFailed("the committer has stopped".into()))?;
        outcome
            .await
            .map_err(|_| LogError::BatchFailed("the committer has stopped".into()))?
    }

    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, LogError>> {
        futures::future::join_all(requests.into_iter().map(|r| self.append(r))).await
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner
            .read_stream(stream_id, after_version, limit)
            .await
    }

    async fn read_streams(
        &self,
        stream_ids: &[String],
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.read_streams(stream_ids, limit).await
    }

    async fn read_all(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.inner.read_all(after, limit).await
    }

    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, LogError> {
        self.inner.load_snapshot(stream_id).await
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), LogError> {
        self.inner.save_snapshot(snapshot).await
    }

    async fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, LogError> {
        self.inner.find_idempotent(key).await
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

    async fn amend_idempotent(&self, record: IdempotencyRecord) -> Result<(), LogError> {
        self.inner.amend_idempotent(record).await
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.inner.appends()
    }

    async fn head(&self) -> Result<u64, LogError> {
        self.inner.head().await
    }

    async fn count_after(&self, after: u64, categories: &[&str]) -> Result<u64, LogError> {
        self.inner.count_after(after, categories).await
    }

    async fn ping(&self) -> Result<(), LogError> {
        self.inner.ping().await
    }
}
