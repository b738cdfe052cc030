//! The events this process committed to the Postgres log, kept in memory until a reader of
//! the global log takes them.
//!
//! The relay reads every event of the log once, right after it commits; most of them were
//! committed by the same process a few milliseconds earlier, which still holds them. So the
//! log keeps what it committed, and [`read_all`](super::EventLog::read_all) asks the
//! database only which events come next (their cursors, in the global read order that never
//! passes a late commit), takes the ones it holds from here and reads the whole rows of the
//! others (events other instances committed, or ones that left here).
//!
//! An event is kept only once its transaction has committed, exactly as the database stores
//! it (the payload was validated at its current schema version when it was encoded), and it
//! leaves when a reader takes it. A process that is not the relay's leader never has its
//! events taken, so at most [`COMMITTED_KEPT_MAX`] are kept and the oldest go first: a reader
//! finds what is not here in the database.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::RecordedEvent;

/// Most events kept; about a second of a flash sale's appends.
pub const COMMITTED_KEPT_MAX: usize = 20_000;

/// Committed events by global position.
#[derive(Default)]
pub(crate) struct Committed {
    events: Mutex<BTreeMap<u64, RecordedEvent>>,
}

impl Committed {
    /// Keeps `events`, committed just now, dropping the oldest kept past the bound.
    pub(crate) fn keep(&self, events: impl IntoIterator<Item = RecordedEvent>) {
        let mut kept = self.events.lock().expect("not poisoned");
        for event in events {
            kept.insert(event.cursor.global_position, event);
        }
        while kept.len() > COMMITTED_KEPT_MAX {
            kept.pop_first();
        }
    }

    /// Whether nothing is kept.
    pub(crate) fn is_empty(&self) -> bool {
        self.events.lock().expect("not poisoned").is_empty()
    }

    /// Takes the kept events at `positions`: one entry per position, `None` where it is not
    /// kept.
    pub(crate) fn take(&self, positions: &[u64]) -> Vec<Option<RecordedEvent>> {
        let mut kept = self.events.lock().expect("not poisoned");
        positions
            .iter()
            .map(|position| kept.remove(position))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::LogCursor;
    use schemas::{Envelope, Metadata};

    fn at(position: u64) -> RecordedEvent {
        RecordedEvent {
            cursor: LogCursor {
                transaction_id: 1,
                global_position: position,
            },
            envelope: Envelope {
                event_id: ulid::Ulid::new(),
                stream_id: "campaign-1".into(),
                stream_version: position,
                global_position: position,
                event_type: "CampaignPublished".into(),
                schema_version: 1,
                recorded_at: chrono::Utc::now(),
                metadata: Metadata::default(),
                data: serde_json::Value::Null,
            },
        }
    }

    #[test]
    fn an_event_is_taken_once() {
        let committed = Committed::default();
        committed.keep([at(1), at(2)]);
        let taken = committed.take(&[2, 3]);
        assert_eq!(taken[0].as_ref().map(|e| e.cursor.global_position), Some(2));
        assert!(taken[1].is_none(), "never kept");
        assert!(committed.take(&[2])[0].is_none(), "taken already");
        assert!(!committed.is_empty(), "1 is still kept");
    }

    #[test]
    fn past_the_bound_the_oldest_go_first() {
        let committed = Committed::default();
        committed.keep((1..=COMMITTED_KEPT_MAX as u64 + 2).map(at));
        let taken = committed.take(&[1, 2, 3, COMMITTED_KEPT_MAX as u64 + 2]);
        assert!(taken[0].is_none() && taken[1].is_none());
        assert!(taken[2].is_some() && taken[3].is_some());
    }
}
