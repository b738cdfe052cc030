//! The event log in PostgreSQL, the source of truth.
//!
//! - Appends insert every event of every stream in one statement inside one transaction.
//!   Version conflicts are found by the unique `(stream_id, stream_version)` constraint, never
//!   by reading first; the first event of each stream also requires its predecessor version to
//!   exist, so a stale-ahead expected version cannot leave a gap.
//! - The global read order is `(transaction_id, global_position)`, and a read only returns
//!   events of transactions older than the oldest one still running (the snapshot's `xmin`).
//!   A transaction that took an early position but commits late therefore holds readers back
//!   instead of being skipped. See `docs/adr/0002-global-log-order.md`.
//! - The events this process committed are kept in memory until the global log's reader (the
//!   relay) takes them, so that it reads from the database only their cursors and the events
//!   other processes committed (`super::committed`).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use schemas::{Envelope, Metadata, Registry};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use ulid::Ulid;
use uuid::Uuid;

use super::committed::Committed;
use super::{
    check_request, keep_apart_if_reused, AppendRequest, Appended, EventLog, LogCursor, LogError,
    RecordedEvent, Snapshot,
};
use crate::idempotency::{
    key_event_id, Answer, IdempotencyKey, IdempotencyRecord, Keeping, Recorded, StoredResponse,
    IDEMPOTENCY_KEY_TTL_S,
};

/// Connection settings for the Postgres log.
#[derive(Clone, Debug)]
pub struct PgLogOptions {
    /// Most connections the pool opens.
    pub pool_connections_max: u32,
    /// How long a caller waits for a free connection.
    pub acquire_timeout: Duration,
    /// Server-side limit on any one statement.
    pub statement_timeout: Duration,
}

impl Default for PgLogOptions {
    fn default() -> Self {
        PgLogOptions {
            pool_connections_max: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(15),
        }
    }
}

/// The event log on a Postgres database.
pub struct PgEventLog {
    pool: PgPool,
    appends: watch::Sender<u64>,
    committed: Committed,
}

/// Inserts the events of a whole group commit; a row whose stream's predecessor version is
/// missing (an expected version ahead of the stream) is filtered out, and so is the event that
/// would record an Idempotency-Key (`$9`, `$10`) which a live record kept apart holds. `{conflicts}` is empty
/// on the quick path, where any taken stream version or event id fails the statement; on the
/// careful path it is `ON CONFLICT DO NOTHING`, and such a row is skipped instead. Either
/// way the caller finds the requests that lost a row and takes the rest of their rows out again
/// before committing.
///
/// The predecessor is looked up by a scalar subquery, not `EXISTS`: the server may plan an
/// `EXISTS` as a hashed subplan, which reads the whole log into a hash table on every insert.
/// It is the cheapest plan while the log is nearly empty, and a prepared statement keeps its
/// generic plan for the life of the connection, so a deployment whose first sale started on a
/// young log read its whole log once a batch, more each batch.
const INSERT_EVENTS: &str = "
INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, data, metadata)
SELECT e.event_id, e.stream_id, e.stream_version, e.event_type, e.schema_version, e.data::json,
       e.metadata::json
FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::text[], $7::text[], $8::bigint[],
            $9::text[], $10::text[])
     WITH ORDINALITY AS e(event_id, stream_id, stream_version, event_type, schema_version, data, metadata,
                          follows_version, key_scope, key, ord)
WHERE (e.follows_version = 0
       OR (SELECT true FROM events p WHERE p.stream_id = e.stream_id AND p.stream_version = e.follows_version))
  AND (e.key IS NULL
       OR (SELECT true FROM idempotency_keys k WHERE k.scope = e.key_scope AND k.key = e.key
           AND k.created_at >= now() - make_interval(secs => $11::float8)) IS NULL)
ORDER BY e.ord
{conflicts}
RETURNING event_id, global_position, transaction_id::text, recorded_at";

/// Records the Idempotency-Keys of a group commit kept apart. A key whose event (`$8`,
/// [`key_event_id`]) records it, live, is left alone and not returned; so is, on the careful
/// path, a key recorded apart already (and not expired), which on the quick path fails the
/// statement.
const INSERT_KEYS: &str = "
INSERT INTO idempotency_keys (scope, key, request_sha256, response_status, response_headers, response_body)
SELECT u.scope, u.key, u.request_sha256, u.status, u.headers, u.body
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::smallint[], $5::jsonb[], $6::bytea[], $8::uuid[])
     AS u(scope, key, request_sha256, status, headers, body, key_event)
WHERE (SELECT true FROM events e WHERE e.event_id = u.key_event
       AND e.recorded_at >= now() - make_interval(secs => $7::float8)) IS NULL
{conflicts}
RETURNING scope, key";

const KEY_CONFLICTS: &str =
    "ON CONFLICT (scope, key) DO UPDATE SET request_sha256 = EXCLUDED.request_sha256,
    response_status = EXCLUDED.response_status, response_headers = EXCLUDED.response_headers,
    response_body = EXCLUDED.response_body, created_at = now()
WHERE idempotency_keys.created_at < now() - make_interval(secs => $7::float8)";

/// How a group commit's inserts treat rows that break a unique constraint.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Plain inserts: cheaper by a third, and right whenever nothing conflicts (nearly
    /// always, with one writer per hot stream).
    Quick,
    /// `ON CONFLICT` on every row, after the quick path met a conflict.
    Careful,
}

/// The live events among `$1` (ids derived from Idempotency-Keys), each followed by the other
/// events its append gave its stream, in version order: the event's columns as
/// [`SELECT_EVENT`] has them, then the id of the event that records the key.
const SELECT_KEY_EVENTS: &str = "SELECT e.*, k.event_id FROM events k CROSS JOIN LATERAL \
     (SELECT global_position, event_id, stream_id, stream_version, event_type, schema_version, \
      data, metadata, recorded_at, transaction_id::text AS transaction_id FROM events e \
      WHERE e.stream_id = k.stream_id AND e.transaction_id = k.transaction_id OFFSET 0) e \
     WHERE k.event_id = ANY($1) AND k.recorded_at >= now() - make_interval(secs => $2) \
     ORDER BY k.event_id, e.stream_version";

/// The recorded keys among `$1` and `$2`, each looked up by its primary key (the `OFFSET 0`
/// keeps the lookup per key: joined freely, a plan made while the table was small scans every
/// key of the last day by `created_at` instead, for as long as the connection lives).
const SELECT_KEYS: &str =
    "SELECT k.scope, k.key, k.request_sha256, k.response_status, k.response_headers, \
     k.response_body FROM UNNEST($1::text[], $2::text[]) AS u(scope, key) \
     CROSS JOIN LATERAL (SELECT * FROM idempotency_keys k WHERE k.scope = u.scope \
     AND k.key = u.key AND k.created_at >= now() - make_interval(secs => $3) OFFSET 0) k";

/// The next events of the global log after the cursor `($1, $2)`, at most `$3`: only those of
/// transactions older than the oldest one still running, in `(transaction_id, global_position)`
/// order. Qualified on purpose: a bare `transaction_id` would name the text column of a select
/// list, sorting xids as strings ("100" before "99"), which both reorders the log and defeats
/// the index (every read sorted the whole rest of the table).
const NEXT_IN_LOG_ORDER: &str = "WHERE (transaction_id, global_position) > \
     ($1::bigint::text::xid8, $2) AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
     ORDER BY events.transaction_id, events.global_position LIMIT $3";

const SELECT_EVENT: &str = "SELECT global_position, event_id, stream_id, stream_version, event_type, \
     schema_version, data, metadata, recorded_at, transaction_id::text AS transaction_id FROM events";

/// An event's data or metadata as the JSON text its column keeps.
fn to_json<T: serde::Serialize>(value: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

/// The innermost cause of a failed connection, which names what went wrong ("Connection
/// refused (os error 111)"), without the layers that only repeat it.
fn cause_of(error: &sqlx::Error) -> String {
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        _ => cause.to_string(),
    }
}

/// How long a pooled connection sits idle before it is checked on its way out of the pool.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Postgres' SQLSTATE for a unique violation.
const UNIQUE_VIOLATION: &str = "23505";

impl PgEventLog {
    /// Connects a pool to `url`. One connection is tried first, so that a database that
    /// cannot be reached is reported at once, by address and cause, rather than as a pool
    /// that timed out.
    pub async fn connect(url: &str, options: &PgLogOptions) -> Result<PgEventLog, LogError> {
        use sqlx::{ConnectOptions, Connection};
        let statement_timeout_ms = options.statement_timeout.as_millis().to_string();
        let connect = PgConnectOptions::from_str(url)?
            .application_name("groupbuy")
            .options([("statement_timeout", statement_timeout_ms.as_str())]);
        let first = tokio::time::timeout(options.acquire_timeout, connect.connect()).await;
        let unreachable = |why: String| LogError::Unreachable {
            at: format!("{}:{}", connect.get_host(), connect.get_port()),
            why,
        };
        match first {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
            }
            Ok(Err(error)) => return Err(unreachable(cause_of(&error))),
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {} s",
                    options.acquire_timeout.as_secs()
                )))
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_connections_max)
            .acquire_timeout(options.acquire_timeout)
            // sqlx pings a connection (a round trip to the server) each time it leaves the
            // pool, and again each time it comes back. A busy log takes a connection for
            // every statement, so only one that sat idle for a while is pinged on the way
            // out: that is the one a restarted or unreachable server may have broken.
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_BEFORE_PING {
                        sqlx::Connection::ping(connection).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(connect)
            .await?;
        Ok(PgEventLog::new(pool))
    }

    /// Wraps an existing pool.
    pub fn new(pool: PgPool) -> PgEventLog {
        PgEventLog {
            pool,
            appends: watch::channel(0).0,
            committed: Committed::default(),
        }
    }

    /// Brings the schema up to date. Safe to run from several instances at once: sqlx takes
    /// an advisory lock around migrations.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        sqlx::migrate!("./migrations").run(&self.pool).await
    }

    /// The pool, for health checks and for tests that need raw SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The next `limit` events of the global log after `after`, read whole from the database.
    async fn read_all_rows(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!("{SELECT_EVENT} {NEXT_IN_LOG_ORDER}");
        let rows = sqlx::query(&sql)
            .bind(after.transaction_id as i64)
            .bind(after.global_position as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded_event).collect()
    }

    /// The next `limit` events of the global log after `after`: their cursors from the
    /// database, the events this process committed from memory, the others read whole.
    async fn read_all_kept(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql =
            format!("SELECT global_position, transaction_id::text FROM events {NEXT_IN_LOG_ORDER}");
        let cursors = sqlx::query(&sql)
            .bind(after.transaction_id as i64)
            .bind(after.global_position as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| cursor_of(row, 0, 1))
            .collect::<Result<Vec<_>, _>>()?;
        let positions: Vec<u64> = cursors.iter().map(|c| c.global_position).collect();
        let mut events = self.committed.take(&positions);
        let missing: Vec<i64> = (positions.iter().zip(&events))
            .filter(|(_, kept)| kept.is_none())
            .map(|(&position, _)| position as i64)
            .collect();
        if !missing.is_empty() {
            let sql = format!("{SELECT_EVENT} WHERE global_position = ANY($1)");
            let mut read: std::collections::HashMap<u64, RecordedEvent> = sqlx::query(&sql)
                .bind(&missing)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| recorded_event(row).map(|e| (e.cursor.global_position, e)))
                .collect::<Result<_, _>>()?;
            for (position, slot) in positions.iter().zip(&mut events) {
                if slot.is_none() {
                    *slot = read.remove(position);
                }
            }
        }
        events
            .into_iter()
            .zip(&cursors)
            .map(|(event, cursor)| {
                event.ok_or_else(|| {
                    LogError::Corrupt(format!("event at {cursor:?} listed but not read"))
                })
            })
            .collect()
    }

    async fn cursors_of(&self, event_ids: &[Uuid]) -> Result<Vec<LogCursor>, LogError> {
        let rows = sqlx::query(
            "SELECT global_position, transaction_id::text FROM events WHERE event_id = ANY($1)",
        )
        .bind(event_ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|row| cursor_of(row, 0, 1)).collect()
    }
}

/// A row the insert stored.
struct StoredRow {
    event_id: Uuid,
    cursor: LogCursor,
    recorded_at: chrono::DateTime<chrono::Utc>,
}

/// One request of a group commit on its way through the transaction.
struct Pending {
    /// Its place in the batch, and so of its outcome.
    index: usize,
    request: AppendRequest,
    /// Its events' ids, in order.
    event_ids: Vec<Uuid>,
    /// Rows of it the insert stored.
    stored: Vec<StoredRow>,
    /// Whether its key, if it has one, was recorded (and kept: a request that lost a row
    /// takes its key out again).
    key_recorded: bool,
    /// Whether its key was recorded already by another request.
    key_taken: bool,
    /// The first of its streams that lost a row, with the version it expected.
    lost: Option<(String, u64)>,
}

impl Pending {
    fn complete(&self) -> bool {
        self.stored.len() == self.event_ids.len()
    }

    /// Its key's record and response, when they are kept apart.
    fn key_apart(&self) -> Option<(&IdempotencyRecord, &StoredResponse)> {
        let record = self.request.idempotency.as_ref()?;
        match &record.keeping {
            Keeping::Apart(response) => Some((record, response)),
            Keeping::InFirstEvent { .. } => None,
        }
    }

    /// Its key, when its first event records it.
    fn key_in_event(&self) -> Option<&IdempotencyKey> {
        self.request
            .idempotency
            .as_ref()
            .filter(|r| matches!(r.keeping, Keeping::InFirstEvent { .. }))
            .map(|r| &r.key)
    }

    /// Moves a committed request's events out, as the log now records them.
    fn take_recorded(&mut self) -> Vec<RecordedEvent> {
        let rows: std::collections::HashMap<Uuid, &StoredRow> =
            self.stored.iter().map(|row| (row.event_id, row)).collect();
        let mut recorded = Vec::with_capacity(self.stored.len());
        for stream in std::mem::take(&mut self.request.streams) {
            for (offset, event) in stream.events.into_iter().enumerate() {
                let row = rows[&Uuid::from(event.event_id)];
                recorded.push(RecordedEvent {
                    cursor: row.cursor,
                    envelope: Envelope {
                        event_id: event.event_id,
                        stream_id: stream.stream_id.clone(),
                        stream_version: stream.expected_version + offset as u64 + 1,
                        global_position: row.cursor.global_position,
                        event_type: event.event.event_type,
                        schema_version: event.event.schema_version,
                        recorded_at: row.recorded_at,
                        metadata: event.metadata,
                        data: event.event.data,
                    },
                });
            }
        }
        recorded
    }

    /// Notes the first stream of this request whose events the insert did not all store.
    fn note_lost(&mut self) {
        let stored: std::collections::HashSet<Uuid> =
            self.stored.iter().map(|row| row.event_id).collect();
        self.lost = self
            .request
            .streams
            .iter()
            .find(|s| {
                s.events
                    .iter()
                    .any(|e| !stored.contains(&Uuid::from(e.event_id)))
            })
            .map(|s| (s.stream_id.clone(), s.expected_version));
    }
}

impl PgEventLog {
    /// Runs one group commit's transaction over `pending` (valid, non-overlapping requests),
    /// filling in what each stored. Requests that lost a row, or whose key was taken, have
    /// their other rows taken out again before the commit.
    async fn commit_batch(&self, pending: &mut [Pending]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin_with(Self::opening(pending)).await?;
        match Self::insert_all(&mut tx, pending, Path::Quick).await {
            Ok(()) => {}
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
                sqlx::query("ROLLBACK TO SAVEPOINT quick")
                    .execute(&mut *tx)
                    .await?;
                for p in pending.iter_mut() {
                    p.stored.clear();
                    (p.key_recorded, p.key_taken) = (false, false);
                }
                Self::insert_all(&mut tx, pending, Path::Careful).await?;
            }
            Err(e) => return Err(e),
        }
        Self::take_out_broken(&mut tx, pending).await?;
        tx.commit().await?;
        for p in pending.iter_mut().filter(|p| !p.complete()) {
            p.note_lost();
            p.stored.clear();
            p.key_recorded = false;
        }
        Ok(())
    }

    /// The advisory lock of an Idempotency-Key while an append records it: the pair
    /// `(hashtext('groupbuy.idempotency'), key_lock(key))`.
    pub fn key_lock(key: &IdempotencyKey) -> i32 {
        let id = key_event_id(key).to_bytes();
        i32::from_be_bytes([id[0], id[1], id[2], id[3]])
    }

    /// What opens a group commit's transaction, in one round trip: `BEGIN`, a lock on each
    /// request's Idempotency-Key, and the savepoint of the quick path (after the locks: rolling
    /// back to it would let go of locks taken after it).
    ///
    /// The locks are transaction-scoped advisory locks, `(hashtext('groupbuy.idempotency'),
    /// key_lock(key))`, taken in the order of their hashes: shared for a key its first event
    /// records, exclusive for one kept apart. A key's record apart and its event are checked
    /// each against the other (`INSERT_KEYS`, `INSERT_EVENTS`), and neither statement can see
    /// the other's uncommitted row; with the locks taken before either, the second of two
    /// racing requests waits for the first to commit, and then sees it. Events that record
    /// keys never wait on each other: the unique event id decides between them. The hashes
    /// are numbers, so the statement is written out rather than bound.
    fn opening(pending: &[Pending]) -> String {
        use std::fmt::Write;
        let mut locks: Vec<(i32, bool)> = pending
            .iter()
            .filter_map(|p| p.request.idempotency.as_ref())
            .map(|r| {
                (
                    Self::key_lock(&r.key),
                    matches!(r.keeping, Keeping::Apart(_)),
                )
            })
            .collect();
        locks.sort_unstable();
        let mut sql = String::from("BEGIN;");
        for (i, (hash, exclusive)) in locks.iter().enumerate() {
            let _ = write!(
                sql,
                "{} pg_advisory_xact_lock{}(hashtext('groupbuy.idempotency'), {hash})",
                if i == 0 { " SELECT" } else { "," },
                if *exclusive { "" } else { "_shared" },
            );
        }
        if !locks.is_empty() {
            sql.push(';');
        }
        sql.push_str(" SAVEPOINT quick");
        sql
    }

    /// Inserts every request's key and events, noting what each stored.
    async fn insert_all(
        tx: &mut sqlx::PgConnection,
        pending: &mut [Pending],
        path: Path,
    ) -> Result<(), sqlx::Error> {
        Self::insert_keys(tx, pending, path).await?;
        Self::insert_events(tx, pending, path).await?;
        for p in pending.iter_mut().filter(|p| p.key_in_event().is_some()) {
            p.key_recorded = p.complete();
        }
        Ok(())
    }

    async fn insert_keys(
        tx: &mut sqlx::PgConnection,
        pending: &mut [Pending],
        path: Path,
    ) -> Result<(), sqlx::Error> {
        let keyed: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].key_apart().is_some())
            .collect();
        if keyed.is_empty() {
            return Ok(());
        }
        let records: Vec<(&IdempotencyRecord, &StoredResponse)> = keyed
            .iter()
            .filter_map(|&i| pending[i].key_apart())
            .collect();
        let sql = INSERT_KEYS.replace(
            "{conflicts}",
            if path == Path::Careful {
                KEY_CONFLICTS
            } else {
                ""
            },
        );
        let query = sqlx::query_as(&sql)
            .bind(
                records
                    .iter()
                    .map(|(r, _)| r.key.scope.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                records
                    .iter()
                    .map(|(r, _)| r.key.key.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                records
                    .iter()
                    .map(|(r, _)| r.request_sha256.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                records
                    .iter()
                    .map(|(_, response)| response.status as i16)
                    .collect::<Vec<_>>(),
            )
            .bind(
                records
                    .iter()
                    .map(|(_, response)| Json(&response.headers))
                    .collect::<Vec<_>>(),
            )
            .bind(
                records
                    .iter()
                    .map(|(_, response)| response.body.as_slice())
                    .collect::<Vec<_>>(),
            )
            .bind(IDEMPOTENCY_KEY_TTL_S as f64)
            .bind(
                records
                    .iter()
                    .map(|(r, _)| Uuid::from(key_event_id(&r.key)))
                    .collect::<Vec<_>>(),
            );
        let recorded: Vec<(String, String)> = query.fetch_all(&mut *tx).await?;
        for &i in &keyed {
            let key = &pending[i].key_apart().expect("kept apart").0.key;
            let won = recorded
                .iter()
                .any(|(scope, k)| *scope == key.scope && *k == key.key);
            pending[i].key_recorded = won;
            pending[i].key_taken = !won;
        }
        Ok(())
    }

    async fn insert_events(
        tx: &mut sqlx::PgConnection,
        pending: &mut [Pending],
        path: Path,
    ) -> Result<(), sqlx::Error> {
        let mut event_ids = Vec::new();
        let mut stream_ids = Vec::new();
        let mut versions = Vec::new();
        let mut types = Vec::new();
        let mut schema_versions = Vec::new();
        let mut data = Vec::new();
        let mut metadata = Vec::new();
        let mut follows = Vec::new();
        let mut key_scopes = Vec::new();
        let mut keys = Vec::new();
        let mut owner = std::collections::HashMap::new();
        for (slot, p) in pending.iter().enumerate() {
            if p.key_taken {
                continue;
            }
            let key = p.key_in_event();
            for (index, stream) in p.request.streams.iter().enumerate() {
                let expected = stream.expected_version as i64;
                for (offset, event) in stream.events.iter().enumerate() {
                    let records_key = key.filter(|_| index == 0 && offset == 0);
                    key_scopes.push(records_key.map(|k| k.scope.as_str()));
                    keys.push(records_key.map(|k| k.key.as_str()));
                    let id = Uuid::from(event.event_id);
                    owner.insert(id, slot);
                    event_ids.push(id);
                    stream_ids.push(stream.stream_id.as_str());
                    versions.push(expected + offset as i64 + 1);
                    types.push(event.event.event_type.as_str());
                    schema_versions.push(event.event.schema_version as i32);
                    data.push(to_json(&event.event.data)?);
                    metadata.push(to_json(&event.metadata)?);
                    follows.push(if offset == 0 { expected } else { 0 });
                }
            }
        }
        if event_ids.is_empty() {
            return Ok(());
        }
        let sql = INSERT_EVENTS.replace(
            "{conflicts}",
            if path == Path::Careful {
                "ON CONFLICT DO NOTHING"
            } else {
                ""
            },
        );
        let rows = sqlx::query(&sql)
            .bind(&event_ids)
            .bind(&stream_ids)
            .bind(&versions)
            .bind(&types)
            .bind(&schema_versions)
            .bind(&data)
            .bind(&metadata)
            .bind(&follows)
            .bind(&key_scopes)
            .bind(&keys)
            .bind(IDEMPOTENCY_KEY_TTL_S as f64)
            .fetch_all(&mut *tx)
            .await?;
        for row in &rows {
            let event_id: Uuid = row.get(0);
            let cursor = cursor_of(row, 1, 2).map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
            pending[owner[&event_id]].stored.push(StoredRow {
                event_id,
                cursor,
                recorded_at: row.get(3),
            });
        }
        Ok(())
    }

    /// Takes out again the rows of requests that lost a row, or recorded a key without all
    /// their events: every request is all or nothing.
    async fn take_out_broken(
        tx: &mut sqlx::PgConnection,
        pending: &[Pending],
    ) -> Result<(), sqlx::Error> {
        let broken: Vec<&Pending> = pending
            .iter()
            .filter(|p| !p.complete() && (p.key_recorded || !p.stored.is_empty()))
            .collect();
        let positions: Vec<i64> = broken
            .iter()
            .flat_map(|p| p.stored.iter().map(|row| row.cursor.global_position as i64))
            .collect();
        if !positions.is_empty() {
            sqlx::query("DELETE FROM events WHERE global_position = ANY($1)")
                .bind(&positions)
                .execute(&mut *tx)
                .await?;
        }
        let keys: Vec<&IdempotencyKey> = broken
            .iter()
            .filter(|p| p.key_recorded)
            .filter_map(|p| p.key_apart().map(|(r, _)| &r.key))
            .collect();
        if !keys.is_empty() {
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE (scope, key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
            )
            .bind(keys.iter().map(|k| k.scope.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|k| k.key.as_str()).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    /// What is recorded under `key`, unless it expired: the record kept apart, if any (a
    /// refusal, an amended answer, or a use after the key's event expired), else the events
    /// whose first records the key.
    async fn recorded(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, LogError> {
        let row = sqlx::query(SELECT_KEYS)
            .bind(vec![key.scope.as_str()])
            .bind(vec![key.key.as_str()])
            .bind(IDEMPOTENCY_KEY_TTL_S as f64)
            .fetch_optional(&self.pool)
            .await?;
        if let Some(row) = row {
            return record_of(&row).map(Some);
        }
        let rows = sqlx::query(SELECT_KEY_EVENTS)
            .bind(vec![Uuid::from(key_event_id(key))])
            .bind(IDEMPOTENCY_KEY_TTL_S as f64)
            .fetch_all(&self.pool)
            .await?;
        let events = rows
            .iter()
            .map(|row| recorded_event(row).map(|e| e.envelope))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(first) = events.first() else {
            return Ok(None);
        };
        let request_sha256 = first.metadata.request_sha256.clone().ok_or_else(|| {
            LogError::Corrupt(format!(
                "event {} records an Idempotency-Key without its request's hash",
                first.event_id
            ))
        })?;
        Ok(Some(Recorded {
            request_sha256,
            answer: Answer::Appended(events),
        }))
    }

    /// Whether the event that would record the key of `p` is taken, by an earlier use of the
    /// key that has expired (a live one is found by [`PgEventLog::recorded`]).
    async fn key_event_taken(&self, p: &Pending) -> Result<bool, LogError> {
        let Some(key) = p.key_in_event() else {
            return Ok(false);
        };
        let id = Uuid::from(key_event_id(key));
        Ok(!self.cursors_of(&[id]).await?.is_empty())
    }

    /// The outcome of a request the transaction did not store: a re-send of an append stored
    /// before, a key taken, or a conflict.
    async fn outcome_of_unstored(&self, p: &Pending) -> Result<Appended, LogError> {
        if let Some(record) = &p.request.idempotency {
            if p.key_taken || p.key_in_event().is_some() {
                match self.recorded(&record.key).await? {
                    Some(taken) => return Err(LogError::KeyTaken(Box::new(taken))),
                    // Expired (or removed) since the insert looked: nothing was stored.
                    None if p.key_taken => {
                        return Err(LogError::BatchFailed(
                            "idempotency key changed hands".into(),
                        ))
                    }
                    // A key kept in the event lost its row to something else.
                    None => {}
                }
            }
        }
        let stored = self.cursors_of(&p.event_ids).await?;
        match stored.iter().max() {
            Some(&last) if stored.len() == p.event_ids.len() => Ok(Appended {
                last,
                replayed: true,
            }),
            _ => {
                let first = &p.request.streams[0];
                let (stream_id, expected_version) = p
                    .lost
                    .clone()
                    .unwrap_or_else(|| (first.stream_id.clone(), first.expected_version));
                Err(LogError::Conflict {
                    stream_id,
                    expected_version,
                })
            }
        }
    }
}

#[async_trait]
impl EventLog for PgEventLog {
    async fn append_batch(&self, requests: Vec<AppendRequest>) -> Vec<Result<Appended, LogError>> {
        let mut outcomes: Vec<Option<Result<Appended, LogError>>> =
            requests.iter().map(|_| None).collect();
        let mut pending: Vec<Pending> = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            if let Err(error) = check_request(&request) {
                outcomes[index] = Some(Err(error));
                continue;
            }
            if request
                .streams
                .iter()
                .any(|s| i64::try_from(s.expected_version).is_err())
            {
                outcomes[index] = Some(Err(LogError::InvalidAppend(
                    "expected version out of range",
                )));
                continue;
            }
            if let Some(earlier) = pending.iter().find(|p| p.request.overlaps(&request)) {
                // One statement cannot see an earlier request's rows: refuse rather than
                // misjudge (the group commit never puts such requests together).
                let stream_id = earlier.request.streams.first().map(|s| s.stream_id.clone());
                outcomes[index] = Some(Err(LogError::Conflict {
                    stream_id: stream_id.unwrap_or_default(),
                    expected_version: request.streams.first().map_or(0, |s| s.expected_version),
                }));
                continue;
            }
            pending.push(Pending {
                index,
                event_ids: request
                    .streams
                    .iter()
                    .flat_map(|s| s.events.iter().map(|e| Uuid::from(e.event_id)))
                    .collect(),
                request,
                stored: Vec::new(),
                key_recorded: false,
                key_taken: false,
                lost: None,
            });
        }
        if !pending.is_empty() {
            match self.commit_batch(&mut pending).await {
                Ok(()) => {
                    if pending
                        .iter()
                        .any(|p| p.complete() && !p.event_ids.is_empty())
                    {
                        self.committed.keep(
                            pending
                                .iter_mut()
                                .filter(|p| p.complete())
                                .flat_map(Pending::take_recorded),
                        );
                        self.appends.send_modify(|n| *n += 1);
                    }
                    let mut again = Vec::new();
                    for p in &pending {
                        let stored =
                            p.complete() && (p.key_recorded || p.request.idempotency.is_none());
                        outcomes[p.index] = Some(if stored {
                            Ok(Appended {
                                last: p
                                    .stored
                                    .iter()
                                    .map(|row| row.cursor)
                                    .max()
                                    .unwrap_or_default(),
                                replayed: false,
                            })
                        } else {
                            match self.outcome_of_unstored(p).await {
                                Err(LogError::Conflict { .. })
                                    if self.key_event_taken(p).await.unwrap_or(false) =>
                                {
                                    // The key was used before and expired, and its old event
                                    // holds the id: keep the key apart this time.
                                    let mut request = p.request.clone();
                                    keep_apart_if_reused(&mut request, |_| true);
                                    again.push((p.index, request));
                                    continue;
                                }
                                outcome => outcome,
                            }
                        });
                    }
                    if !again.is_empty() {
                        let (slots, requests): (Vec<usize>, Vec<AppendRequest>) =
                            again.into_iter().unzip();
                        let retried = self.append_batch(requests).await;
                        for (slot, outcome) in slots.into_iter().zip(retried) {
                            outcomes[slot] = Some(outcome);
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, requests = pending.len(), "a group commit failed; nothing of it was stored");
                    for p in &pending {
                        outcomes[p.index] = Some(Err(LogError::BatchFailed(error.to_string())));
                    }
                }
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("every request has an outcome"))
            .collect()
    }

    async fn read_streams(
        &self,
        stream_ids: &[String],
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!(
            "{SELECT_EVENT} WHERE stream_id = ANY($1) ORDER BY stream_id, stream_version LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(stream_ids)
            .bind(limit.min(super::READ_EVENTS_MAX) as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded_event).collect()
    }

    async fn read_stream(
        &self,
        stream_id: &str,
        after_version: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let sql = format!("{SELECT_EVENT} WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version LIMIT $3");
        let rows = sqlx::query(&sql)
            .bind(stream_id)
            .bind(i64::try_from(after_version).unwrap_or(i64::MAX))
            .bind(limit.min(super::READ_EVENTS_MAX) as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded_event).collect()
    }

    async fn read_all(
        &self,
        after: LogCursor,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let limit = limit.min(super::READ_EVENTS_MAX);
        if self.committed.is_empty() {
            return self.read_all_rows(after, limit).await;
        }
        self.read_all_kept(after, limit).await
    }

    async fn load_snapshot(&self, stream_id: &str) -> Result<Option<Snapshot>, LogError> {
        let row = sqlx::query(
            "SELECT stream_version, state_version, state FROM snapshots WHERE stream_id = $1",
        )
        .bind(stream_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|row| Snapshot {
            stream_id: stream_id.to_owned(),
            stream_version: row.get::<i64, _>(0) as u64,
            state_version: row.get::<i32, _>(1) as u32,
            state: row.get(2),
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), LogError> {
        sqlx::query(
            "INSERT INTO snapshots (stream_id, stream_version, state_version, state) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (stream_id) DO UPDATE SET stream_version = EXCLUDED.stream_version, \
             state_version = EXCLUDED.state_version, state = EXCLUDED.state, taken_at = now() \
             WHERE snapshots.stream_version < EXCLUDED.stream_version",
        )
        .bind(&snapshot.stream_id)
        .bind(snapshot.stream_version as i64)
        .bind(snapshot.state_version as i32)
        .bind(&snapshot.state)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn find_idempotent(&self, key: &IdempotencyKey) -> Result<Option<Recorded>, LogError> {
        self.recorded(key).await
    }

    async fn expire_idempotency_keys(
        &self,
        older_than: std::time::Duration,
        limit: usize,
    ) -> Result<u64, LogError> {
        let removed = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (scope, key) IN (\
             SELECT scope, key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) \
             ORDER BY created_at LIMIT $2)",
        )
        .bind(older_than.as_secs_f64())
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(removed.rows_affected())
    }

    async fn identity(&self) -> Result<String, LogError> {
        Ok(sqlx::query_scalar("SELECT log_id FROM log_identity")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn amend_idempotent(&self, record: IdempotencyRecord) -> Result<(), LogError> {
        let Keeping::Apart(response) = &record.keeping else {
            return Err(LogError::InvalidAppend("an amended answer is kept apart"));
        };
        // A key kept apart has its answer replaced; a key its event records (live, by the same
        // request) gets the amended answer kept apart, which is found first.
        sqlx::query(
            "WITH amended AS (UPDATE idempotency_keys SET response_status = $4, \
             response_headers = $5, response_body = $6 WHERE scope = $1 AND key = $2 \
             AND request_sha256 = $3 AND created_at >= now() - make_interval(secs => $7) \
             RETURNING 1) \
             INSERT INTO idempotency_keys (scope, key, request_sha256, response_status, \
             response_headers, response_body) SELECT $1, $2, $3, $4, $5, $6 \
             WHERE NOT EXISTS (SELECT 1 FROM amended) \
             AND EXISTS (SELECT 1 FROM events e WHERE e.event_id = $8 \
             AND e.recorded_at >= now() - make_interval(secs => $7) \
             AND e.metadata->>'request_sha256' = $3) ON CONFLICT (scope, key) DO NOTHING",
        )
        .bind(&record.key.scope)
        .bind(&record.key.key)
        .bind(&record.request_sha256)
        .bind(response.status as i16)
        .bind(Json(&response.headers))
        .bind(&response.body)
        .bind(IDEMPOTENCY_KEY_TTL_S as f64)
        .bind(Uuid::from(key_event_id(&record.key)))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn appends(&self) -> watch::Receiver<u64> {
        self.appends.subscribe()
    }

    async fn head(&self) -> Result<u64, LogError> {
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events")
            .fetch_one(&self.pool)
            .await?;
        Ok(head.unsigned_abs())
    }

    async fn count_after(&self, after: u64, categories: &[&str]) -> Result<u64, LogError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events \
             WHERE global_position > $1 AND split_part(stream_id, '-', 1) = ANY($2)",
        )
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(categories)
        .fetch_one(&self.pool)
        .await?;
        Ok(count.unsigned_abs())
    }

    async fn ping(&self) -> Result<(), LogError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

fn record_of(row: &PgRow) -> Result<Recorded, LogError> {
    let headers: serde_json::Value = row.get(4);
    let headers: Vec<(String, String)> = serde_json::from_value(headers)
        .map_err(|e| LogError::Corrupt(format!("idempotency headers: {e}")))?;
    Ok(Recorded {
        request_sha256: row.get(2),
        answer: Answer::Response(StoredResponse {
            status: row.get::<i16, _>(3) as u16,
            headers,
            body: row.get(5),
        }),
    })
}

fn cursor_of(row: &PgRow, position: usize, transaction: usize) -> Result<LogCursor, LogError> {
    let transaction_id: String = row.get(transaction);
    Ok(LogCursor {
        transaction_id: transaction_id
            .parse()
            .map_err(|_| LogError::Corrupt(format!("transaction id {transaction_id:?}")))?,
        global_position: row.get::<i64, _>(position) as u64,
    })
}

/// Reads a row back, validating its payload at the stored schema version and upcasting it to
/// the current one: what leaves the log is always valid, current-version data.
fn recorded_event(row: &PgRow) -> Result<RecordedEvent, LogError> {
    let cursor = cursor_of(row, 0, 9)?;
    let event_type: String = row.get(4);
    let stored_version = row.get::<i32, _>(5) as u32;
    let data = Registry::global().upcast(&event_type, stored_version, row.get(6))?;
    let metadata: Metadata = serde_json::from_value(row.get(7)).map_err(|e| {
        LogError::Corrupt(format!(
            "metadata at position {}: {e}",
            cursor.global_position
        ))
    })?;
    Ok(RecordedEvent {
        cursor,
        envelope: Envelope {
            event_id: Ulid::from(row.get::<Uuid, _>(1)),
            stream_id: row.get(2),
            stream_version: row.get::<i64, _>(3) as u64,
            global_position: cursor.global_position,
            schema_version: Registry::global().current_version(&event_type)?,
            event_type,
            recorded_at: row.get(8),
            metadata,
            data,
        },
    })
}
