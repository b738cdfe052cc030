//! The event log contract, held against both implementations, and the late-commit guarantee
//! of the Postgres log.

use std::sync::Arc;
use std::time::Duration;

use commands::group_commit::{GroupCommit, GroupCommitOptions};
use commands::idempotency::{
    key_event_id, Answer, IdempotencyKey, IdempotencyRecord, Keeping, Recorded, StoredResponse,
};
use commands::log::memory::MemoryEventLog;
use commands::log::postgres::PgEventLog;
use commands::log::Snapshot;
use commands::{AppendRequest, EventLog, LogCursor, LogError, NewEvent, StreamAppend};
use domain::campaign::CampaignEvent;
use harness::TestDb;
use schemas::Metadata;
use ulid::Ulid;

/// Runs a contract test on both logs, alone and behind a group commit.
macro_rules! on_every_log {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use std::sync::Arc;

            #[tokio::test]
            async fn memory() {
                super::$name(Arc::new(commands::log::memory::MemoryEventLog::new())).await;
            }

            #[tokio::test]
            async fn postgres() {
                let db = harness::TestDb::new().await;
                super::$name(db.log()).await;
            }

            #[tokio::test]
            async fn memory_group_committed() {
                let log = Arc::new(commands::log::memory::MemoryEventLog::new());
                super::$name(super::group_committed(log)).await;
            }

            #[tokio::test]
            async fn postgres_group_committed() {
                let db = harness::TestDb::new().await;
                super::$name(super::group_committed(db.log())).await;
            }
        }
    )*};
}

fn group_committed(log: Arc<dyn EventLog>) -> Arc<dyn EventLog> {
    Arc::new(GroupCommit::new(log, GroupCommitOptions::default()))
}

on_every_log!(
    appended_events_read_back_in_version_order_with_their_envelope,
    an_append_at_a_stale_version_conflicts_and_stores_nothing,
    an_expected_version_ahead_of_the_stream_conflicts_instead_of_leaving_a_gap,
    a_multi_stream_append_stores_all_streams_or_none,
    resending_an_append_that_was_stored_is_a_no_op,
    the_global_log_is_read_in_pages_without_gaps_or_repeats,
    a_snapshot_is_replaced_only_by_a_newer_one,
    an_idempotency_key_is_recorded_once_and_found_again,
    expired_idempotency_keys_are_swept_oldest_first_within_the_limit,
    an_append_records_its_idempotency_key_atomically,
    a_batch_gives_each_append_its_own_outcome,
    a_key_kept_in_its_first_event_is_found_through_its_events,
    a_key_kept_apart_holds_off_an_event_that_would_record_it,
    many_concurrent_appends_each_get_their_own_outcome,
    an_empty_or_oversized_append_is_refused,
    local_appends_wake_readers,
    several_streams_are_read_in_one_call,
);

fn stream() -> String {
    format!("campaign-{}", Ulid::new())
}

fn event(seconds: i64) -> NewEvent {
    let at = chrono::DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap();
    NewEvent {
        event_id: Ulid::new(),
        event: schemas::encode(&CampaignEvent::CampaignClosed { at }).unwrap(),
        metadata: Metadata {
            actor: Some("test".into()),
            trace_id: Some("0af7651916cd43dd8448eb211c80319c".into()),
            ..Default::default()
        },
    }
}

fn append(stream_id: &str, expected_version: u64, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest {
        streams: vec![StreamAppend {
            stream_id: stream_id.to_owned(),
            expected_version,
            events,
        }],
        idempotency: None,
    }
}

async fn appended_events_read_back_in_version_order_with_their_envelope(log: Arc<dyn EventLog>) {
    let s = stream();
    let events = vec![event(1), event(2), event(3)];
    let ids: Vec<Ulid> = events.iter().map(|e| e.event_id).collect();
    let appended = log.append(append(&s, 0, events.clone())).await.unwrap();
    assert!(!appended.replayed);

    let read = log.read_stream(&s, 0, 100).await.unwrap();
    assert_eq!(
        read.iter().map(|r| r.envelope.event_id).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(
        read.iter()
            .map(|r| r.envelope.stream_version)
            .collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(read.last().unwrap().cursor, appended.last);
    let first = &read[0].envelope;
    assert_eq!(first.event_type, "CampaignClosed");
    assert_eq!(first.schema_version, 1);
    assert_eq!(first.data, events[0].event.data);
    assert_eq!(first.metadata, events[0].metadata);
    schemas::Registry::global()
        .validate_envelope(&serde_json::to_value(first).unwrap())
        .unwrap();

    let tail = log.read_stream(&s, 2, 100).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].envelope.stream_version, 3);
    assert!(log.read_stream(&stream(), 0, 100).await.unwrap().is_empty());
}

async fn an_append_at_a_stale_version_conflicts_and_stores_nothing(log: Arc<dyn EventLog>) {
    let s = stream();
    log.append(append(&s, 0, vec![event(1)])).await.unwrap();
    let error = log
        .append(append(&s, 0, vec![event(2), event(3)]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            LogError::Conflict {
                expected_version: 0,
                ..
            }
        ),
        "{error}"
    );
    assert_eq!(log.read_stream(&s, 0, 100).await.unwrap().len(), 1);
    log.append(append(&s, 1, vec![event(2)])).await.unwrap();
    assert_eq!(log.read_stream(&s, 0, 100).await.unwrap().len(), 2);
}

async fn an_expected_version_ahead_of_the_stream_conflicts_instead_of_leaving_a_gap(
    log: Arc<dyn EventLog>,
) {
    let s = stream();
    log.append(append(&s, 0, vec![event(1)])).await.unwrap();
    let error = log.append(append(&s, 5, vec![event(2)])).await.unwrap_err();
    assert!(matches!(error, LogError::Conflict { .. }), "{error}");
    assert_eq!(log.read_stream(&s, 0, 100).await.unwrap().len(), 1);
}

async fn a_multi_stream_append_stores_all_streams_or_none(log: Arc<dyn EventLog>) {
    let (a, b) = (stream(), stream());
    log.append(append(&b, 0, vec![event(1)])).await.unwrap();
    let both = |b_expected| AppendRequest {
        streams: vec![
            StreamAppend {
                stream_id: a.clone(),
                expected_version: 0,
                events: vec![event(2)],
            },
            StreamAppend {
                stream_id: b.clone(),
                expected_version: b_expected,
                events: vec![event(3)],
            },
        ],
        idempotency: None,
    };
    assert!(matches!(
        log.append(both(0)).await,
        Err(LogError::Conflict { .. })
    ));
    assert!(
        log.read_stream(&a, 0, 10).await.unwrap().is_empty(),
        "a half-applied append"
    );

    let appended = log.append(both(1)).await.unwrap();
    let (ra, rb) = (
        log.read_stream(&a, 0, 10).await.unwrap(),
        log.read_stream(&b, 0, 10).await.unwrap(),
    );
    assert_eq!((ra.len(), rb.len()), (1, 2));
    assert_eq!(
        ra[0].cursor.transaction_id, rb[1].cursor.transaction_id,
        "one transaction"
    );
    assert_eq!(rb[1].cursor, appended.last);
}

async fn resending_an_append_that_was_stored_is_a_no_op(log: Arc<dyn EventLog>) {
    let s = stream();
    let events = vec![event(1), event(2)];
    let first = log.append(append(&s, 0, events.clone())).await.unwrap();
    let again = log.append(append(&s, 0, events.clone())).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.last, first.last);
    assert_eq!(log.read_stream(&s, 0, 10).await.unwrap().len(), 2);
    assert_eq!(
        read_settled(log.as_ref(), LogCursor::default(), 2)
            .await
            .len(),
        2
    );

    // The same ids mixed with new ones are not a re-send: that is a conflict.
    let mixed = vec![events[0].clone(), event(3)];
    assert!(matches!(
        log.append(append(&s, 2, mixed)).await,
        Err(LogError::Conflict { .. })
    ));
}

async fn the_global_log_is_read_in_pages_without_gaps_or_repeats(log: Arc<dyn EventLog>) {
    let streams: Vec<String> = (0..5).map(|_| stream()).collect();
    let mut expected = Vec::new();
    for round in 0..4u64 {
        for s in &streams {
            let e = event(round as i64);
            expected.push(e.event_id);
            log.append(append(s, round, vec![e])).await.unwrap();
        }
    }
    let mut cursor = LogCursor::default();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < expected.len() && tokio::time::Instant::now() < deadline {
        let page = log.read_all(cursor, 3).await.unwrap();
        if page.is_empty() {
            // Settling behind another test's open transaction; see `read_settled`.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        assert!(page.len() <= 3);
        for r in &page {
            assert!(r.cursor > cursor, "cursors only move forward");
            cursor = r.cursor;
            seen.push(r.envelope.event_id);
        }
    }
    assert_eq!(seen, expected);
}

async fn a_snapshot_is_replaced_only_by_a_newer_one(log: Arc<dyn EventLog>) {
    let s = stream();
    let snapshot = |version: u64| Snapshot {
        stream_id: s.clone(),
        stream_version: version,
        state_version: 1,
        state: serde_json::json!({ "version": version }),
    };
    assert_eq!(log.load_snapshot(&s).await.unwrap(), None);
    log.save_snapshot(snapshot(200)).await.unwrap();
    log.save_snapshot(snapshot(100)).await.unwrap();
    assert_eq!(log.load_snapshot(&s).await.unwrap(), Some(snapshot(200)));
    log.save_snapshot(snapshot(300)).await.unwrap();
    assert_eq!(log.load_snapshot(&s).await.unwrap(), Some(snapshot(300)));
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey {
        scope: "user:01TEST".into(),
        key: format!("{k}-{}", Ulid::new()),
    }
}

fn response(status: u16) -> StoredResponse {
    StoredResponse {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: br#"{"ok":true}"#.to_vec(),
    }
}

fn record(k: &IdempotencyKey, request_sha256: &str, status: u16) -> IdempotencyRecord {
    IdempotencyRecord {
        key: k.clone(),
        request_sha256: request_sha256.into(),
        keeping: Keeping::Apart(response(status)),
    }
}

/// What a key recorded apart by [`record`] is found to hold.
fn found(request_sha256: &str, status: u16) -> Recorded {
    Recorded {
        request_sha256: request_sha256.into(),
        answer: Answer::Response(response(status)),
    }
}

/// An append that records a key and nothing else: the answer of a request that was refused.
fn key_only(record: IdempotencyRecord) -> AppendRequest {
    AppendRequest {
        streams: vec![],
        idempotency: Some(record),
    }
}

fn taken(outcome: Result<commands::Appended, LogError>) -> Recorded {
    match outcome {
        Err(LogError::KeyTaken(record)) => *record,
        other => panic!("expected the key to be taken, got {other:?}"),
    }
}

async fn expired_idempotency_keys_are_swept_oldest_first_within_the_limit(log: Arc<dyn EventLog>) {
    let keys: Vec<IdempotencyKey> = (0..3).map(|i| key(&format!("sweep-{i}"))).collect();
    for k in &keys {
        log.append(key_only(record(k, "hash-a", 201)))
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let hour = std::time::Duration::from_secs(3_600);
    assert_eq!(log.expire_idempotency_keys(hour, 10).await.unwrap(), 0);
    // Older than nothing, all are expired: the oldest two go first.
    let zero = std::time::Duration::ZERO;
    assert_eq!(log.expire_idempotency_keys(zero, 2).await.unwrap(), 2);
    assert_eq!(log.find_idempotent(&keys[0]).await.unwrap(), None);
    assert_eq!(log.find_idempotent(&keys[1]).await.unwrap(), None);
    assert!(log.find_idempotent(&keys[2]).await.unwrap().is_some());
    // A swept key is free for a new request.
    log.append(key_only(record(&keys[0], "hash-b", 201)))
        .await
        .unwrap();
    assert_eq!(
        log.find_idempotent(&keys[0]).await.unwrap(),
        Some(found("hash-b", 201))
    );
}

async fn an_idempotency_key_is_recorded_once_and_found_again(log: Arc<dyn EventLog>) {
    let k = key("record");
    assert_eq!(log.find_idempotent(&k).await.unwrap(), None);
    log.append(key_only(record(&k, "hash-a", 422)))
        .await
        .unwrap();
    assert_eq!(
        log.find_idempotent(&k).await.unwrap(),
        Some(found("hash-a", 422))
    );

    // The key is taken: by the same request (a retry) or another, the first record stands.
    let again = taken(log.append(key_only(record(&k, "hash-a", 201))).await);
    assert_eq!(again, found("hash-a", 422));
    let other_body = taken(log.append(key_only(record(&k, "hash-b", 201))).await);
    assert_eq!(other_body.request_sha256, "hash-a");

    // Another caller's key of the same name is independent.
    let other_caller = IdempotencyKey {
        scope: "user:02OTHER".into(),
        key: k.key.clone(),
    };
    log.append(key_only(record(&other_caller, "hash-b", 201)))
        .await
        .unwrap();
    assert_eq!(
        log.find_idempotent(&k).await.unwrap().unwrap().answer,
        Answer::Response(response(422))
    );
}

async fn an_append_records_its_idempotency_key_atomically(log: Arc<dyn EventLog>) {
    let s = stream();
    let k = key("append");
    let mut request = append(&s, 0, vec![event(1)]);
    request.idempotency = Some(record(&k, "h", 202));
    log.append(request).await.unwrap();
    assert_eq!(
        log.find_idempotent(&k).await.unwrap(),
        Some(found("h", 202))
    );

    // A conflicting append records no key: the retry runs again.
    let k2 = key("conflict");
    let mut conflicting = append(&s, 0, vec![event(2)]);
    conflicting.idempotency = Some(record(&k2, "h", 202));
    assert!(matches!(
        log.append(conflicting).await,
        Err(LogError::Conflict { .. })
    ));
    assert_eq!(log.find_idempotent(&k2).await.unwrap(), None);

    // An append under a key that is taken stores nothing, and says what the key holds.
    let mut late = append(&s, 1, vec![event(3)]);
    late.idempotency = Some(record(&k, "h", 202));
    assert_eq!(taken(log.append(late).await), found("h", 202));
    assert_eq!(log.read_stream(&s, 0, 10).await.unwrap().len(), 1);
}

async fn a_batch_gives_each_append_its_own_outcome(log: Arc<dyn EventLog>) {
    let (fresh, stale, resent, keyed) = (stream(), stream(), stream(), stream());
    log.append(append(&stale, 0, vec![event(1)])).await.unwrap();
    let stored_before = vec![event(2)];
    let first = log
        .append(append(&resent, 0, stored_before.clone()))
        .await
        .unwrap();
    let used = key("used");
    log.append(key_only(record(&used, "h", 201))).await.unwrap();
    let new_key = key("new");

    let mut under_used_key = append(&keyed, 0, vec![event(3)]);
    under_used_key.idempotency = Some(record(&used, "h", 202));
    let outcomes = log
        .append_batch(vec![
            append(&fresh, 0, vec![event(4), event(5)]),
            append(&stale, 0, vec![event(6)]),
            append(&resent, 0, stored_before),
            under_used_key,
            key_only(record(&new_key, "h", 422)),
            append(&fresh, 2, vec![]),
        ])
        .await;
    assert_eq!(outcomes.len(), 6);
    let mut outcomes = outcomes.into_iter();
    let appended = outcomes.next().unwrap().unwrap();
    assert!(!appended.replayed);
    assert!(matches!(
        outcomes.next().unwrap(),
        Err(LogError::Conflict { .. })
    ));
    let again = outcomes.next().unwrap().unwrap();
    assert!(again.replayed);
    assert_eq!(again.last, first.last);
    assert_eq!(
        taken(outcomes.next().unwrap()).answer,
        Answer::Response(response(201))
    );
    outcomes.next().unwrap().unwrap();
    assert!(matches!(
        outcomes.next().unwrap(),
        Err(LogError::InvalidAppend(_))
    ));

    // Each append stored exactly what its own outcome says.
    assert_eq!(log.read_stream(&fresh, 0, 10).await.unwrap().len(), 2);
    assert_eq!(log.read_stream(&stale, 0, 10).await.unwrap().len(), 1);
    assert_eq!(log.read_stream(&resent, 0, 10).await.unwrap().len(), 1);
    assert!(log.read_stream(&keyed, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        log.find_idempotent(&new_key).await.unwrap(),
        Some(found("h", 422))
    );
}

/// An append that starts `stream_id` with two events and keeps `k` in the first.
fn keyed_start(stream_id: &str, k: &IdempotencyKey, request_sha256: &str) -> AppendRequest {
    let mut first = event(1);
    first.event_id = key_event_id(k);
    first.metadata.request_sha256 = Some(request_sha256.into());
    let mut request = append(stream_id, 0, vec![first, event(2)]);
    request.idempotency = Some(IdempotencyRecord {
        key: k.clone(),
        request_sha256: request_sha256.into(),
        keeping: Keeping::InFirstEvent {
            fallback: response(202),
        },
    });
    request
}

async fn a_key_kept_in_its_first_event_is_found_through_its_events(log: Arc<dyn EventLog>) {
    let (s, other) = (stream(), stream());
    let k = key("in-event");
    let (a, b) = ("a".repeat(64), "b".repeat(64));
    log.append(keyed_start(&s, &k, &a)).await.unwrap();
    let stored: Vec<_> = log
        .read_stream(&s, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.envelope)
        .collect();
    assert_eq!(stored.len(), 2);
    let recorded = log.find_idempotent(&k).await.unwrap().expect("recorded");
    assert_eq!(recorded.request_sha256, a);
    assert_eq!(recorded.answer, Answer::Appended(stored));

    // Another request with the key finds those events and stores nothing: one that would
    // start a stream, and one that would record a refusal.
    assert_eq!(
        taken(log.append(keyed_start(&other, &k, &b)).await),
        recorded
    );
    assert!(log.read_stream(&other, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        taken(log.append(key_only(record(&k, &b, 422))).await),
        recorded
    );

    // An answer that changed after the append (`Prefer: wait`) is kept apart and found first,
    // but only the same request may change it.
    log.amend_idempotent(record(&k, &b, 200)).await.unwrap();
    assert_eq!(log.find_idempotent(&k).await.unwrap(), Some(recorded));
    log.amend_idempotent(record(&k, &a, 200)).await.unwrap();
    assert_eq!(log.find_idempotent(&k).await.unwrap(), Some(found(&a, 200)));

    // Only an event that starts its stream, with the key's id, may record it.
    let mut late = keyed_start(&s, &key("late"), &a);
    late.streams[0].expected_version = 2;
    assert!(matches!(
        log.append(late).await,
        Err(LogError::InvalidAppend(_))
    ));
    let mut unnamed = keyed_start(&stream(), &key("unnamed"), &a);
    unnamed.streams[0].events[0].event_id = Ulid::new();
    assert!(matches!(
        log.append(unnamed).await,
        Err(LogError::InvalidAppend(_))
    ));
}

async fn a_key_kept_apart_holds_off_an_event_that_would_record_it(log: Arc<dyn EventLog>) {
    let s = stream();
    let k = key("apart-first");
    let a = "a".repeat(64);
    log.append(key_only(record(&k, &a, 422))).await.unwrap();
    assert_eq!(
        taken(log.append(keyed_start(&s, &k, &a)).await),
        found(&a, 422)
    );
    assert!(log.read_stream(&s, 0, 10).await.unwrap().is_empty());
}

async fn many_concurrent_appends_each_get_their_own_outcome(log: Arc<dyn EventLog>) {
    // 200 writers: each appends to a stream of its own, and every fourth also races another
    // writer for a shared stream at version 0, where exactly one of each pair can win.
    let shared: Vec<String> = (0..25).map(|_| stream()).collect();
    let own: Vec<String> = (0..200).map(|_| stream()).collect();
    let tasks = own.iter().enumerate().map(|(i, s)| {
        let log = Arc::clone(&log);
        let racing = (i % 4 == 0).then(|| shared[i / 8].clone());
        let s = s.clone();
        async move {
            let mine = log.append(append(&s, 0, vec![event(i as i64)])).await;
            let race = match racing {
                Some(r) => Some(log.append(append(&r, 0, vec![event(i as i64)])).await),
                None => None,
            };
            (mine, race)
        }
    });
    let results = futures::future::join_all(tasks).await;
    for (mine, _) in &results {
        assert!(!mine.as_ref().unwrap().replayed);
    }
    let wins = results
        .iter()
        .filter_map(|(_, race)| race.as_ref())
        .filter(|r| r.is_ok())
        .count();
    let losses = results
        .iter()
        .filter_map(|(_, race)| race.as_ref())
        .filter(|r| matches!(r, Err(LogError::Conflict { .. })))
        .count();
    assert_eq!((wins, losses), (25, 25));
    for s in own.iter().chain(&shared) {
        assert_eq!(log.read_stream(s, 0, 10).await.unwrap().len(), 1, "{s}");
    }
}

async fn several_streams_are_read_in_one_call(log: Arc<dyn EventLog>) {
    let (a, b, missing) = (stream(), stream(), stream());
    log.append(append(&a, 0, vec![event(1), event(2)]))
        .await
        .unwrap();
    log.append(append(&b, 0, vec![event(3)])).await.unwrap();
    let read = log
        .read_streams(&[b.clone(), missing, a.clone(), b.clone()], 100)
        .await
        .unwrap();
    let mut expected = vec![(a.clone(), 1), (a.clone(), 2), (b.clone(), 1)];
    expected.sort();
    assert_eq!(
        read.iter()
            .map(|r| (r.envelope.stream_id.clone(), r.envelope.stream_version))
            .collect::<Vec<_>>(),
        expected
    );
    assert_eq!(log.read_streams(&[a, b], 2).await.unwrap().len(), 2);
}

async fn an_empty_or_oversized_append_is_refused(log: Arc<dyn EventLog>) {
    let s = stream();
    assert!(matches!(
        log.append(append(&s, 0, vec![])).await,
        Err(LogError::InvalidAppend(_))
    ));
    let many: Vec<NewEvent> = (0..=commands::log::APPEND_EVENTS_MAX)
        .map(|i| event(i as i64))
        .collect();
    assert!(matches!(
        log.append(append(&s, 0, many)).await,
        Err(LogError::InvalidAppend(_))
    ));
    assert!(log.read_stream(&s, 0, 10).await.unwrap().is_empty());
}

async fn local_appends_wake_readers(log: Arc<dyn EventLog>) {
    let mut appends = log.appends();
    let before = *appends.borrow_and_update();
    log.append(append(&stream(), 0, vec![event(1)]))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(1), appends.changed())
        .await
        .unwrap()
        .unwrap();
    assert!(*appends.borrow() > before);
}

// --- the late-commit guarantee (Postgres only: in memory every append is settled at once) ---

/// Reads from `after` until `count` events came back. The watermark is the oldest running
/// writing transaction of the whole server, so a transaction another test holds open in its
/// own database delays this reader too (never makes it skip): hence a bounded wait, not a
/// single read.
async fn read_settled(
    log: &dyn EventLog,
    after: LogCursor,
    count: usize,
) -> Vec<commands::RecordedEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let read = log.read_all(after, 1_000).await.unwrap();
        if read.len() >= count || tokio::time::Instant::now() > deadline {
            assert_eq!(read.len(), count, "events never settled");
            return read;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts an event inside `tx` the way an append does, without committing.
async fn insert_uncommitted(tx: &mut sqlx::PgConnection, stream_id: &str, e: &NewEvent) {
    sqlx::query(
        "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, data, metadata) \
         VALUES ($1, $2, 1, $3, $4, $5, $6)",
    )
    .bind(uuid::Uuid::from(e.event_id))
    .bind(stream_id)
    .bind(&e.event.event_type)
    .bind(e.event.schema_version as i32)
    .bind(&e.event.data)
    .bind(serde_json::to_value(&e.metadata).unwrap())
    .execute(tx)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_reader_never_passes_a_transaction_that_commits_late_and_delivers_it_after_commit() {
    let db = TestDb::new().await;
    let log = db.log();
    let early = event(1);
    log.append(append(&stream(), 0, vec![early.clone()]))
        .await
        .unwrap();
    let reader = read_settled(log.as_ref(), LogCursor::default(), 1).await[0].cursor;

    // A writer takes the next position and holds its transaction open...
    let late = event(2);
    let mut open = log.pool().begin().await.unwrap();
    insert_uncommitted(&mut open, &stream(), &late).await;

    // ...while later writers commit behind it.
    let mut later = Vec::new();
    for i in 0..20 {
        let e = event(10 + i);
        later.push(e.event_id);
        log.append(append(&stream(), 0, vec![e])).await.unwrap();
    }
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT global_position FROM events ORDER BY global_position")
            .fetch_all(log.pool())
            .await
            .unwrap();
    assert_eq!(
        positions.len(),
        21,
        "the late event is not visible, the later ones are"
    );

    // The reader must not move past the open transaction, however often it polls.
    for _ in 0..3 {
        assert!(
            log.read_all(reader, 100).await.unwrap().is_empty(),
            "read past an open transaction"
        );
    }

    open.commit().await.unwrap();
    let rest = read_settled(log.as_ref(), reader, 21).await;
    let ids: Vec<Ulid> = rest.iter().map(|r| r.envelope.event_id).collect();
    let mut expected = vec![late.event_id];
    expected.extend(later);
    assert_eq!(
        ids, expected,
        "the late commit comes first, then everything after it, once each"
    );
    assert!(rest[0].envelope.global_position < rest[1].envelope.global_position);
}

/// The Postgres log reads the events its own process committed from memory, and the others
/// from the database: a reader sees the same events in the same order either way, pages that
/// mix both included, and an event it took from memory is read from the database next time.
#[tokio::test]
async fn events_committed_here_read_back_as_the_database_holds_them() {
    let db = TestDb::new().await;
    let process = || PgEventLog::new(db.log().pool().clone());
    let (here, elsewhere, reader) = (process(), process(), process());
    let (ours, theirs) = (stream(), stream());
    for version in 0..5 {
        let seconds = version as i64;
        here.append(append(
            &ours,
            2 * version,
            vec![event(seconds), event(seconds)],
        ))
        .await
        .unwrap();
        elsewhere
            .append(append(&theirs, version, vec![event(seconds)]))
            .await
            .unwrap();
    }
    let from_database = read_settled(&reader, LogCursor::default(), 15).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut paged = Vec::new();
    while paged.len() < from_database.len() && tokio::time::Instant::now() < deadline {
        let after = paged
            .last()
            .map_or(LogCursor::default(), |e: &commands::RecordedEvent| e.cursor);
        let page = here.read_all(after, 4).await.unwrap();
        if page.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        paged.extend(page);
    }
    assert_eq!(
        paged, from_database,
        "paged through memory and the database"
    );
    assert_eq!(
        here.read_all(LogCursor::default(), 100).await.unwrap(),
        from_database,
        "read again, from the database"
    );
}

#[tokio::test]
async fn a_reader_moves_on_once_an_open_transaction_rolls_back() {
    let db = TestDb::new().await;
    let log = db.log();
    let mut open = log.pool().begin().await.unwrap();
    insert_uncommitted(&mut open, &stream(), &event(1)).await;
    let after = event(2);
    log.append(append(&stream(), 0, vec![after.clone()]))
        .await
        .unwrap();
    assert!(log
        .read_all(LogCursor::default(), 100)
        .await
        .unwrap()
        .is_empty());
    open.rollback().await.unwrap();
    let read = read_settled(log.as_ref(), LogCursor::default(), 1).await;
    assert_eq!(
        read.iter().map(|r| r.envelope.event_id).collect::<Vec<_>>(),
        vec![after.event_id]
    );
}

#[tokio::test]
async fn the_global_log_orders_transactions_by_number_not_by_their_digits() {
    // Transaction ids 9, 10, 99 and 100 sort 10, 100, 9, 99 as text. Ordered so, the log
    // reads out of order, and a reader paging by cursor skips events.
    let db = TestDb::new().await;
    let log = db.log();
    let s = stream();
    for (version, xid) in [(1, 9), (2, 10), (3, 99), (4, 100)] {
        let e = event(version);
        sqlx::query(
            "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, \
             data, metadata, transaction_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::bigint::text::xid8)",
        )
        .bind(uuid::Uuid::from(e.event_id))
        .bind(&s)
        .bind(version)
        .bind(&e.event.event_type)
        .bind(e.event.schema_version as i32)
        .bind(&e.event.data)
        .bind(serde_json::to_value(&e.metadata).unwrap())
        .bind(xid)
        .execute(log.pool())
        .await
        .unwrap();
    }
    let mut cursor = LogCursor::default();
    let mut read = Vec::new();
    for _ in 0..10 {
        let page = log.read_all(cursor, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        cursor = last.cursor;
        read.push((last.cursor.transaction_id, last.envelope.stream_version));
    }
    assert_eq!(read, [(9, 1), (10, 2), (99, 3), (100, 4)]);
}

#[tokio::test]
async fn a_stored_event_that_breaks_its_schema_is_refused_on_read() {
    let db = TestDb::new().await;
    let log = db.log();
    let s = stream();
    log.append(append(&s, 0, vec![event(1)])).await.unwrap();
    sqlx::query("UPDATE events SET data = '{\"at\": \"not a time\"}'")
        .execute(log.pool())
        .await
        .unwrap();
    let error = log.read_stream(&s, 0, 10).await.unwrap_err();
    assert!(matches!(error, LogError::Schema(_)), "{error}");
}

/// A key is remembered for a day: used again after its event expired, it is a new request,
/// and the log keeps it apart (the old event holds the id derived from the key). The memory
/// log's clock cannot be moved, so this is the Postgres log's alone.
#[tokio::test]
async fn a_key_whose_event_expired_is_used_again_and_kept_apart() {
    let db = TestDb::new().await;
    let log = db.log();
    let (s, again) = (stream(), stream());
    let k = key("expired-in-event");
    log.append(keyed_start(&s, &k, &"a".repeat(64)))
        .await
        .unwrap();
    sqlx::query("UPDATE events SET recorded_at = now() - interval '25 hours' WHERE event_id = $1")
        .bind(uuid::Uuid::from(key_event_id(&k)))
        .execute(log.pool())
        .await
        .unwrap();
    assert_eq!(log.find_idempotent(&k).await.unwrap(), None);

    let b = "b".repeat(64);
    let appended = log.append(keyed_start(&again, &k, &b)).await.unwrap();
    assert!(!appended.replayed);
    let stored = log.read_stream(&again, 0, 10).await.unwrap();
    assert_eq!(stored.len(), 2);
    assert_ne!(stored[0].envelope.event_id, key_event_id(&k));
    assert_eq!(stored[0].envelope.metadata.request_sha256, None);
    assert_eq!(log.find_idempotent(&k).await.unwrap(), Some(found(&b, 202)));
}

/// A request recording its key apart and one keeping it in its event, racing: each checks
/// for the other's record, and neither statement could see the other's uncommitted row. The
/// key's lock makes the event wait for the record apart to commit, and then see it.
#[tokio::test]
async fn an_event_that_would_record_a_key_waits_for_a_record_apart_in_flight() {
    let db = TestDb::new().await;
    let log = db.log();
    let (s, k, a) = (stream(), key("racing"), "a".repeat(64));
    // What an append that records the key apart does, held open.
    let mut apart = log.pool().begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('groupbuy.idempotency'), $1)")
        .bind(PgEventLog::key_lock(&k))
        .execute(&mut *apart)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO idempotency_keys (scope, key, request_sha256, response_status, \
         response_headers, response_body) VALUES ($1, $2, $3, 422, '[]', '')",
    )
    .bind(&k.scope)
    .bind(&k.key)
    .bind(&a)
    .execute(&mut *apart)
    .await
    .unwrap();

    let racing = tokio::spawn({
        let (log, s, k, a) = (Arc::clone(&log), s.clone(), k.clone(), a.clone());
        async move { log.append(keyed_start(&s, &k, &a)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!racing.is_finished(), "the event waits for the key's lock");
    apart.commit().await.unwrap();
    let recorded = taken(racing.await.unwrap());
    assert_eq!(recorded.request_sha256, a);
    assert!(log.read_stream(&s, 0, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_memory_log_satisfies_the_same_contract_from_many_tasks() {
    // Sixteen writers race on one stream; exactly one wins each version.
    let log: Arc<dyn EventLog> = Arc::new(MemoryEventLog::new());
    let s = stream();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (log, s) = (Arc::clone(&log), s.clone());
        tasks.push(tokio::spawn(async move {
            log.append(append(&s, 0, vec![event(i)])).await.is_ok()
        }));
    }
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
}

#[tokio::test]
async fn a_failed_group_commit_fails_every_append_of_it_and_stores_nothing() {
    let db = TestDb::new().await;
    let log = db.log();
    let (good, bad) = (stream(), stream());
    let k = key("failed-batch");
    let mut keyed = append(&good, 0, vec![event(1)]);
    keyed.idempotency = Some(record(&k, "h", 202));
    // The database refuses a schema version of 0 (a CHECK constraint): the whole transaction
    // fails, not just the append that carried it.
    let mut broken = event(2);
    broken.event.schema_version = 0;
    let outcomes = log
        .append_batch(vec![keyed.clone(), append(&bad, 0, vec![broken])])
        .await;
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, Err(LogError::BatchFailed(_)))),
        "{outcomes:?}"
    );
    assert!(log.read_stream(&good, 0, 10).await.unwrap().is_empty());
    assert_eq!(log.find_idempotent(&k).await.unwrap(), None);

    // Nothing was lost: the same append goes through on its own.
    log.append(keyed).await.unwrap();
    assert_eq!(log.read_stream(&good, 0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_appends_share_transactions() {
    let db = TestDb::new().await;
    let log = group_committed(db.log());
    let streams: Vec<String> = (0..200).map(|_| stream()).collect();
    let appended = futures::future::join_all(
        streams
            .iter()
            .map(|s| log.append(append(s, 0, vec![event(1)]))),
    )
    .await;
    let mut transactions: Vec<u64> = appended
        .into_iter()
        .map(|a| a.unwrap().last.transaction_id)
        .collect();
    transactions.sort_unstable();
    transactions.dedup();
    assert!(
        transactions.len() < streams.len(),
        "every append had a transaction of its own"
    );
    for s in &streams {
        assert_eq!(log.read_stream(s, 0, 10).await.unwrap().len(), 1);
    }
}

/// With several transactions in flight, appends to one stream still commit one after the
/// other, in the order they were sent: each of a chain sent at once, expecting the version the
/// previous one leaves, succeeds, while appends to other streams interleave with them.
async fn chained_appends_to_one_stream_keep_their_order(log: Arc<dyn EventLog>) {
    let hot = stream();
    let others: Vec<String> = (0..50).map(|_| stream()).collect();
    let mut requests = Vec::new();
    for (i, other) in others.iter().enumerate() {
        requests.push(append(&hot, i as u64, vec![event(i as i64)]));
        requests.push(append(other, 0, vec![event(i as i64)]));
    }
    // Each append is polled once, in order, so they queue in the order they were sent (a
    // `join_all` of this many would start them in any order).
    let mut appends: Vec<_> = requests
        .into_iter()
        .map(|r| futures::future::maybe_done(log.append(r)))
        .collect();
    for append in appends.iter_mut() {
        let _ = futures::poll!(append);
    }
    let mut appended = Vec::new();
    for mut append in appends {
        (&mut append).await;
        appended.push(std::pin::Pin::new(&mut append).take_output().unwrap());
    }
    for (i, outcome) in appended.iter().enumerate() {
        assert!(outcome.is_ok(), "append {i}: {outcome:?}");
    }
    let read = log.read_stream(&hot, 0, 100).await.unwrap();
    assert_eq!(read.len(), others.len());
    let hot_positions: Vec<_> = appended
        .iter()
        .step_by(2)
        .map(|a| a.as_ref().unwrap().last)
        .collect();
    assert!(
        hot_positions.windows(2).all(|w| w[0] < w[1]),
        "the chain committed in the order it was sent"
    );
}

#[tokio::test]
async fn chained_appends_keep_their_order_through_a_group_commit() {
    let db = TestDb::new().await;
    for options in [
        GroupCommitOptions::default(),
        GroupCommitOptions {
            transactions_in_flight: 8,
            batch_requests_max: 4,
            ..GroupCommitOptions::default()
        },
    ] {
        let memory: Arc<dyn EventLog> = Arc::new(MemoryEventLog::new());
        for log in [memory, db.log()] {
            let log: Arc<dyn EventLog> = Arc::new(GroupCommit::new(log, options.clone()));
            chained_appends_to_one_stream_keep_their_order(log).await;
        }
    }
}

/// A prepared statement keeps its generic plan for as long as its connection lives, and a plan
/// made while the log was nearly empty is the one a young deployment's first sale runs on. With
/// the server made to use generic plans from the first execution, appends that extend their
/// streams (the case that looks up a predecessor) and lookups of Idempotency-Keys, planned on
/// an empty log, read neither table whole as the log grows.
#[tokio::test]
async fn appends_planned_on_an_empty_log_never_read_the_whole_log() {
    use commands::log::postgres::{PgEventLog, PgLogOptions};
    let db = TestDb::new().await;
    let generic = format!(
        "{}?options=-c%20plan_cache_mode%3Dforce_generic_plan",
        db.url
    );
    let options = PgLogOptions {
        pool_connections_max: 1,
        ..PgLogOptions::default()
    };
    let log = PgEventLog::connect(&generic, &options).await.unwrap();

    let streams: Vec<String> = (0..20).map(|_| stream()).collect();
    let mut inserted = 0;
    for round in 0..5u64 {
        let keys: Vec<IdempotencyKey> = streams.iter().map(|s| key(s)).collect();
        let requests = streams
            .iter()
            .zip(&keys)
            .enumerate()
            .map(|(i, (s, k))| {
                let mut request = append(s, round, vec![event(i as i64)]);
                request.idempotency = Some(record(k, "h", 202));
                request
            })
            .collect();
        for outcome in log.append_batch(requests).await {
            outcome.unwrap();
        }
        inserted += streams.len() as i64;
        assert!(log.find_idempotent(&keys[0]).await.unwrap().is_some());
    }

    // A backend reports its table statistics when it exits; the migrations scanned the tables
    // while they were empty, so any row read by a scan was read by the appends.
    log.pool().close().await;
    let stats = db.log().pool().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (events_inserted, events_scanned, keys_by_age): (i64, i64, i64) = loop {
        let seen: (i64, i64, i64) = sqlx::query_as(
            "SELECT t.n_tup_ins, t.seq_tup_read, i.idx_scan \
             FROM pg_stat_user_tables t, pg_stat_user_indexes i \
             WHERE t.relname = 'events' AND i.indexrelname = 'idempotency_keys_created_at'",
        )
        .fetch_one(&stats)
        .await
        .unwrap();
        if seen.0 >= inserted || tokio::time::Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        events_inserted, inserted,
        "the statistics were not reported"
    );
    assert_eq!(events_scanned, 0, "an append read the whole log");
    assert_eq!(keys_by_age, 0, "a key lookup read every recent key");
}
