//! Rebuilding a projection from the event log while queries go on (see [`crate::store`] for
//! why the switch loses nothing).

use std::time::{Duration, Instant};

use commands::{EventLog, LogCursor, RecordedEvent};

use crate::ops::{Change, ProjectionName};
use crate::store::{ProjectionStore, RebuildError};

/// How a rebuild runs.
#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// Events read from the log per batch.
    pub batch: usize,
    /// How long the rebuild's lease lasts without renewal; a rebuild that stops for longer
    /// is taken to be dead, and the next one may remove its version.
    pub lease: Duration,
}

impl Default for RebuildOptions {
    fn default() -> Self {
        RebuildOptions {
            batch: 2_000,
            lease: Duration::from_secs(30),
        }
    }
}

/// How far a rebuild got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    /// The projection.
    pub name: ProjectionName,
    /// The version being built.
    pub version: u32,
    /// Log events read so far (of every stream).
    pub read: u64,
    /// The global position reached.
    pub position: u64,
    /// The log's head when last asked: where the rebuild is heading.
    pub head: u64,
}

/// What a finished rebuild did.
#[derive(Clone, Debug, PartialEq)]
pub struct RebuildReport {
    /// The projection.
    pub name: ProjectionName,
    /// The version now live.
    pub version: u32,
    /// The version it replaced, now removed.
    pub replaced: Option<u32>,
    /// Log events read.
    pub read: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl RebuildReport {
    /// Log events read per second.
    pub fn rate(&self) -> f64 {
        self.read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Starts a rebuild of `name`: the new version exists and receives live events when this
/// returns. Finish it with [`run`].
pub async fn begin(
    store: &dyn ProjectionStore,
    name: ProjectionName,
    options: &RebuildOptions,
) -> Result<u32, RebuildError> {
    store.begin_rebuild(name, options.lease).await
}

/// Fills version `version` of `name` (from [`begin`]) from the log, switches queries to it
/// and removes the version it replaced. `progress` hears after every batch. On failure the
/// new version is given up and the live one stays.
pub async fn run(
    log: &dyn EventLog,
    store: &dyn ProjectionStore,
    name: ProjectionName,
    version: u32,
    options: &RebuildOptions,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<RebuildReport, RebuildError> {
    let started = Instant::now();
    let outcome = fill_and_switch(log, store, name, version, options, progress).await;
    match outcome {
        Ok((read, replaced)) => {
            if let Some(old) = replaced {
                store.drop_version(name, old).await?;
            }
            let report = RebuildReport {
                name,
                version,
                replaced,
                read,
                elapsed: started.elapsed(),
            };
            tracing::info!(
                projection = %name, version, ?replaced, events = read,
                rate = report.rate() as u64, "projection rebuilt and switched"
            );
            Ok(report)
        }
        Err(error) => {
            tracing::error!(projection = %name, version, %error, "rebuild failed; the live version stays");
            if let Err(abandon) = store.abandon_rebuild(name, version).await {
                tracing::warn!(projection = %name, version, error = %abandon, "cannot give up the rebuild");
            } else if let Err(drop) = store.drop_version(name, version).await {
                tracing::warn!(projection = %name, version, error = %drop, "cannot remove the failed version");
            }
            Err(error)
        }
    }
}

/// [`begin`] and [`run`] in one.
pub async fn rebuild(
    log: &dyn EventLog,
    store: &dyn ProjectionStore,
    name: ProjectionName,
    options: &RebuildOptions,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<RebuildReport, RebuildError> {
    let version = begin(store, name, options).await?;
    run(log, store, name, version, options, progress).await
}

async fn fill_and_switch(
    log: &dyn EventLog,
    store: &dyn ProjectionStore,
    name: ProjectionName,
    version: u32,
    options: &RebuildOptions,
    progress: &(dyn Fn(&Progress) + Send + Sync),
) -> Result<(u64, Option<u32>), RebuildError> {
    let batch_size = options.batch.clamp(1, commands::log::READ_EVENTS_MAX);
    let mut head = log.head().await?;
    let mut read = 0u64;
    let mut batch = log.read_all(LogCursor::default(), batch_size).await?;
    loop {
        let at_head = batch.len() < batch_size;
        let cursor = batch.last().map(|e| e.cursor);
        let changes = changes(name, &batch)?;
        read += batch.len() as u64;
        // Read the next batch while this one is applied.
        let next = async {
            match (at_head, cursor) {
                (false, Some(cursor)) => log.read_all(cursor, batch_size).await.map(Some),
                _ => Ok(None),
            }
        };
        let (applied, next) = tokio::join!(
            store.rebuild_apply(name, version, &changes, options.lease),
            next
        );
        applied?;
        let position = cursor.map_or(0, |c| c.global_position);
        if position > head {
            head = log.head().await?;
        }
        progress(&Progress {
            name,
            version,
            read,
            position,
            head: head.max(position),
        });
        match next? {
            Some(next) => batch = next,
            // Everything committed is in; what commits from now on reaches the new version
            // live, so it can take over.
            None => break,
        }
    }
    let replaced = store.finish_rebuild(name, version).await?;
    Ok((read, replaced))
}

fn changes(name: ProjectionName, batch: &[RecordedEvent]) -> Result<Vec<Change>, RebuildError> {
    let mut changes = Vec::new();
    for event in batch {
        if let Some(change) = Change::of(name, &event.envelope)? {
            changes.push(change);
        }
    }
    Ok(changes)
}
