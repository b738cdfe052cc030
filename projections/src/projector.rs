//! Tails the global log into a read model.

use std::sync::Arc;
use std::time::Duration;

use commands::EventLog;

use crate::memory::MemoryReadModel;

/// Events read per batch.
const BATCH_EVENTS: usize = 1_000;
/// How long to wait for a local append before polling again; bounds how late a read model
/// sees appends made by other instances.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Pause after a failed read before trying again.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Keeps `model` up to date with `log` until `shutdown` resolves.
pub async fn run(
    log: Arc<dyn EventLog>,
    model: Arc<MemoryReadModel>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut appends = log.appends();
    loop {
        let cursor = *crate::ReadModel::position(model.as_ref()).borrow();
        let batch = tokio::select! {
            _ = &mut shutdown => return,
            batch = log.read_all(cursor, BATCH_EVENTS) => batch,
        };
        let wait = match batch {
            Ok(batch) if batch.len() == BATCH_EVENTS => {
                apply(&model, &batch);
                continue;
            }
            Ok(batch) => {
                apply(&model, &batch);
                POLL_INTERVAL
            }
            Err(error) => {
                tracing::warn!(%error, "projector could not read the log");
                RETRY_AFTER_ERROR
            }
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::timeout(wait, appends.changed()) => {}
        }
    }
}

fn apply(model: &MemoryReadModel, batch: &[commands::RecordedEvent]) {
    if let Err(error) = model.apply(batch) {
        // The log validated these events on the way out; failing here is a bug in this crate.
        panic!("read model cannot apply an event the log accepted: {error}");
    }
}
