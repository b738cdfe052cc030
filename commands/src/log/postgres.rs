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

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use schemas::{Envelope, Metadata, Registry};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use ulid::Ulid;
use uuid::Uuid;

use super::{
    check_request, AppendRequest, Appended, EventLog, LogCursor, LogError, RecordedEvent, Snapshot,
};
use crate::idempotency::{
    Begin, ClaimOptions, IdempotencyClaim, IdempotencyKey, StoredResponse, IDEMPOTENCY_KEY_TTL_S,
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
}

const INSERT_EVENTS: &str = "
INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, data, metadata)
SELECT e.event_id, e.stream_id, e.stream_version, e.event_type, e.schema_version, e.data, e.metadata
FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::jsonb[], $7::jsonb[], $8::bigint[])
     WITH ORDINALITY AS e(event_id, stream_id, stream_version, event_type, schema_version, data, metadata,
                          follows_version, ord)
WHERE e.follows_version = 0
   OR EXISTS (SELECT 1 FROM events p WHERE p.stream_id = e.stream_id AND p.stream_version = e.follows_version)
ORDER BY e.ord
RETURNING global_position, transaction_id::text";

const SELECT_EVENT: &str = "SELECT global_position, event_id, stream_id, stream_version, event_type, \
     schema_version, data, metadata, recorded_at, transaction_id::text AS transaction_id FROM events";

impl PgEventLog {
    /// Connects a pool to `url`.
    pub async fn connect(url: &str, options: &PgLogOptions) -> Result<PgEventLog, LogError> {
        let statement_timeout_ms = options.statement_timeout.as_millis().to_string();
        let connect = PgConnectOptions::from_str(url)?
            .application_name("groupbuy")
            .options([("statement_timeout", statement_timeout_ms.as_str())]);
        let pool = PgPoolOptions::new()
            .max_connections(options.pool_connections_max)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await?;
        Ok(PgEventLog::new(pool))
    }

    /// Wraps an existing pool.
    pub fn new(pool: PgPool) -> PgEventLog {
        PgEventLog {
            pool,
            appends: watch::channel(0).0,
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

#[async_trait]
impl EventLog for PgEventLog {
    async fn append(&self, request: AppendRequest) -> Result<Appended, LogError> {
        let count = check_request(&request)?;
        let mut event_ids = Vec::with_capacity(count);
        let mut stream_ids = Vec::with_capacity(count);
        let mut versions = Vec::with_capacity(count);
        let mut types = Vec::with_capacity(count);
        let mut schema_versions = Vec::with_capacity(count);
        let mut data = Vec::with_capacity(count);
        let mut metadata = Vec::with_capacity(count);
        let mut follows = Vec::with_capacity(count);
        for stream in &request.streams {
            let expected = i64::try_from(stream.expected_version)
                .map_err(|_| LogError::InvalidAppend("expected version out of range"))?;
            for (offset, event) in stream.events.iter().enumerate() {
                event_ids.push(Uuid::from(event.event_id));
                stream_ids.push(stream.stream_id.as_str());
                versions.push(expected + offset as i64 + 1);
                types.push(event.event.event_type.as_str());
                schema_versions.push(event.event.schema_version as i32);
                data.push(&event.event.data);
                metadata.push(serde_json::to_value(&event.metadata).expect("metadata serializes"));
                follows.push(if offset == 0 { expected } else { 0 });
            }
        }

        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(INSERT_EVENTS)
            .bind(&event_ids)
            .bind(&stream_ids)
            .bind(&versions)
            .bind(&types)
            .bind(&schema_versions)
            .bind(&data)
            .bind(&metadata)
            .bind(&follows)
            .fetch_all(&mut *tx)
            .await;
        let conflict = || {
            let first = &request.streams[0];
            LogError::Conflict {
                stream_id: first.stream_id.clone(),
                expected_version: first.expected_version,
            }
        };
        let rows = match inserted {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                tx.rollback().await?;
                // Either another writer took a version, or this very append was sent before
                // and committed (the client did not hear back). Only the second is a success.
                let stored = self.cursors_of(&event_ids).await?;
                return match stored.iter().max() {
                    Some(&last) if stored.len() == count => Ok(Appended {
                        last,
                        replayed: true,
                    }),
                    _ => Err(conflict()),
                };
            }
            Err(e) => return Err(e.into()),
        };
        if rows.len() != count {
            // An expected version ahead of the stream: refused rather than leaving a gap.
            tx.rollback().await?;
            return Err(conflict());
        }
        if let Some((claim, response)) = &request.idempotency {
            let done = complete_claim(&mut *tx, claim, response).await?;
            if !done {
                tx.rollback().await?;
                return Err(LogError::ClaimLost);
            }
        }
        tx.commit().await?;
        self.appends.send_modify(|n| *n += 1);
        let last = rows
            .iter()
            .map(|row| cursor_of(row, 0, 1))
            .collect::<Result<Vec<_>, _>>()?;
        let last = last.into_iter().max().expect("count > 0");
        Ok(Appended {
            last,
            replayed: false,
        })
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
        let sql = format!(
            "{SELECT_EVENT} WHERE (transaction_id, global_position) > ($1::bigint::text::xid8, $2) \
             AND transaction_id < pg_snapshot_xmin(pg_current_snapshot()) \
             ORDER BY events.transaction_id, events.global_position LIMIT $3"
        );
        // Qualified on purpose: a bare `transaction_id` here would name the text column of the
        // select list, sorting xids as strings ("100" before "99"), which both reorders the
        // log and defeats the index (every read sorted the whole rest of the table).
        let rows = sqlx::query(&sql)
            .bind(after.transaction_id as i64)
            .bind(after.global_position as i64)
            .bind(limit.min(super::READ_EVENTS_MAX) as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(recorded_event).collect()
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

    async fn begin_idempotent(
        &self,
        key: &IdempotencyKey,
        request_sha256: &str,
        options: ClaimOptions,
    ) -> Result<Begin, LogError> {
        let claim = IdempotencyClaim {
            key: key.clone(),
            claim_id: Ulid::new(),
        };
        // Takes the key when it is new, expired, or held by a claim whose lease ran out (a
        // crashed request) for the same body.
        let claimed = sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request_sha256, claim_id, locked_until) \
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) \
             ON CONFLICT (scope, key) DO UPDATE SET request_sha256 = EXCLUDED.request_sha256, \
               claim_id = EXCLUDED.claim_id, locked_until = EXCLUDED.locked_until, response_status = NULL, \
               response_headers = NULL, response_body = NULL, created_at = now(), completed_at = NULL \
             WHERE idempotency_keys.created_at < now() - make_interval(secs => $6) \
                OR (idempotency_keys.response_status IS NULL AND idempotency_keys.locked_until <= now() \
                    AND idempotency_keys.request_sha256 = EXCLUDED.request_sha256) \
             RETURNING claim_id",
        )
        .bind(&key.scope)
        .bind(&key.key)
        .bind(request_sha256)
        .bind(Uuid::from(claim.claim_id))
        .bind(options.lease.as_secs_f64())
        .bind(IDEMPOTENCY_KEY_TTL_S as f64)
        .fetch_optional(&self.pool)
        .await?;
        if claimed.is_some() {
            return Ok(Begin::Claimed(claim));
        }
        let row = sqlx::query(
            "SELECT request_sha256, response_status, response_headers, response_body \
             FROM idempotency_keys WHERE scope = $1 AND key = $2",
        )
        .bind(&key.scope)
        .bind(&key.key)
        .fetch_optional(&self.pool)
        .await?;
        // The holder abandoned the key between the two statements: the client may retry.
        let Some(row) = row else {
            return Ok(Begin::InFlight);
        };
        if row.get::<String, _>(0) != request_sha256 {
            return Ok(Begin::Mismatch);
        }
        let Some(status) = row.get::<Option<i16>, _>(1) else {
            return Ok(Begin::InFlight);
        };
        let headers: serde_json::Value = row
            .get::<Option<serde_json::Value>, _>(2)
            .unwrap_or_default();
        let headers: Vec<(String, String)> = serde_json::from_value(headers)
            .map_err(|e| LogError::Corrupt(format!("idempotency headers: {e}")))?;
        Ok(Begin::Completed(StoredResponse {
            status: status as u16,
            headers,
            body: row.get::<Option<Vec<u8>>, _>(3).unwrap_or_default(),
        }))
    }

    async fn complete_idempotent(
        &self,
        claim: &IdempotencyClaim,
        response: &StoredResponse,
    ) -> Result<(), LogError> {
        if complete_claim(&self.pool, claim, response).await? {
            Ok(())
        } else {
            Err(LogError::ClaimLost)
        }
    }

    async fn abandon_idempotent(&self, claim: &IdempotencyClaim) -> Result<(), LogError> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND claim_id = $3 AND response_status IS NULL",
        )
        .bind(&claim.key.scope)
        .bind(&claim.key.key)
        .bind(Uuid::from(claim.claim_id))
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

/// Records a response under a claim; false when the claim no longer owns the key.
async fn complete_claim<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    claim: &IdempotencyClaim,
    response: &StoredResponse,
) -> Result<bool, LogError> {
    let headers = serde_json::to_value(&response.headers).expect("headers serialize");
    let done = sqlx::query(
        "UPDATE idempotency_keys SET response_status = $4, response_headers = $5, response_body = $6, \
         completed_at = now() WHERE scope = $1 AND key = $2 AND claim_id = $3 AND response_status IS NULL",
    )
    .bind(&claim.key.scope)
    .bind(&claim.key.key)
    .bind(Uuid::from(claim.claim_id))
    .bind(response.status as i16)
    .bind(headers)
    .bind(&response.body)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
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
