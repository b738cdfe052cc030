//! Payment deadlines, persisted so they survive restarts and fire on whichever instance is
//! alive.
//!
//! The saga schedules a deadline whenever it ends up waiting on a pending payment, and clears
//! it when the order is done. A worker on every instance claims due deadlines (a claim lasts
//! [`CLAIM`], so a dead instance's claims come back) and hands them to the saga. Firing one
//! twice is harmless: the saga's steps are idempotent, so exactly one timeout takes effect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use domain::{OrderId, Timestamp};
use sqlx::PgPool;

/// How long a claimed deadline is left to the instance that claimed it.
pub const CLAIM: Duration = Duration::from_secs(30);

/// The deadline store failed.
#[derive(Debug, thiserror::Error)]
#[error("deadlines: {0}")]
pub struct DeadlineError(String);

impl From<sqlx::Error> for DeadlineError {
    fn from(error: sqlx::Error) -> Self {
        DeadlineError(error.to_string())
    }
}

/// Where deadlines are kept.
#[async_trait]
pub trait Deadlines: Send + Sync + 'static {
    /// Wake the saga for each order at its instant (replacing an earlier deadline of the
    /// order).
    async fn schedule_many(&self, due: &[(OrderId, Timestamp)]) -> Result<(), DeadlineError>;
    /// These orders need no wake-up any more.
    async fn clear_many(&self, order_ids: &[OrderId]) -> Result<(), DeadlineError>;
    /// Wake the saga for `order_id` at `due`.
    async fn schedule(&self, order_id: OrderId, due: Timestamp) -> Result<(), DeadlineError> {
        self.schedule_many(&[(order_id, due)]).await
    }
    /// The order needs no wake-up any more.
    async fn clear(&self, order_id: OrderId) -> Result<(), DeadlineError> {
        self.clear_many(&[order_id]).await
    }
    /// Claims up to `limit` deadlines due at `now`.
    async fn claim_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OrderId>, DeadlineError>;
    /// When each of `order_ids` that has a deadline is due; orders without one are left out.
    async fn due_at(
        &self,
        order_ids: &[OrderId],
    ) -> Result<HashMap<OrderId, Timestamp>, DeadlineError>;
}

/// Deadlines in memory, for the embedded default.
#[derive(Default)]
pub struct MemoryDeadlines {
    due: Mutex<HashMap<OrderId, (Timestamp, Timestamp)>>,
}

impl MemoryDeadlines {
    /// No deadlines.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Deadlines for MemoryDeadlines {
    async fn schedule_many(&self, due: &[(OrderId, Timestamp)]) -> Result<(), DeadlineError> {
        let mut all = self.due.lock().unwrap_or_else(|p| p.into_inner());
        for &(order_id, due) in due {
            let claimed_until = all.get(&order_id).map_or(Timestamp::MIN_UTC, |d| d.1);
            all.insert(order_id, (due, claimed_until));
        }
        Ok(())
    }

    async fn clear_many(&self, order_ids: &[OrderId]) -> Result<(), DeadlineError> {
        let mut all = self.due.lock().unwrap_or_else(|p| p.into_inner());
        for order_id in order_ids {
            all.remove(order_id);
        }
        Ok(())
    }

    async fn claim_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OrderId>, DeadlineError> {
        let mut all = self.due.lock().unwrap_or_else(|p| p.into_inner());
        let claim_until = now + chrono::Duration::from_std(CLAIM).expect("a small duration");
        let mut claimed = Vec::new();
        for (order_id, (due, claimed_until)) in all.iter_mut() {
            if claimed.len() == limit {
                break;
            }
            if *due <= now && *claimed_until <= now {
                *claimed_until = claim_until;
                claimed.push(*order_id);
            }
        }
        Ok(claimed)
    }

    async fn due_at(
        &self,
        order_ids: &[OrderId],
    ) -> Result<HashMap<OrderId, Timestamp>, DeadlineError> {
        let all = self.due.lock().unwrap_or_else(|p| p.into_inner());
        Ok(order_ids
            .iter()
            .filter_map(|id| all.get(id).map(|(due, _)| (*id, *due)))
            .collect())
    }
}

/// Deadlines in Postgres (`saga_deadlines`).
#[derive(Clone)]
pub struct PgDeadlines {
    pool: PgPool,
}

impl PgDeadlines {
    /// Deadlines in the database of `pool` (migrated by the event log).
    pub fn new(pool: PgPool) -> Self {
        PgDeadlines { pool }
    }
}

#[async_trait]
impl Deadlines for PgDeadlines {
    async fn schedule_many(&self, due: &[(OrderId, Timestamp)]) -> Result<(), DeadlineError> {
        if due.is_empty() {
            return Ok(());
        }
        // Sorted, so that two instances scheduling overlapping batches lock rows in the same
        // order and cannot deadlock.
        let mut due = due.to_vec();
        due.sort_unstable_by_key(|(order_id, _)| *order_id);
        due.dedup_by_key(|(order_id, _)| *order_id);
        sqlx::query(
            "INSERT INTO saga_deadlines (order_id, due_at) \
             SELECT * FROM UNNEST($1::text[], $2::timestamptz[]) \
             ON CONFLICT (order_id) DO UPDATE SET due_at = EXCLUDED.due_at",
        )
        .bind(due.iter().map(|(o, _)| o.to_string()).collect::<Vec<_>>())
        .bind(due.iter().map(|(_, d)| *d).collect::<Vec<_>>())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn clear_many(&self, order_ids: &[OrderId]) -> Result<(), DeadlineError> {
        if order_ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM saga_deadlines WHERE order_id = ANY($1)")
            .bind(order_ids.iter().map(|o| o.to_string()).collect::<Vec<_>>())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn claim_due(&self, now: Timestamp, limit: usize) -> Result<Vec<OrderId>, DeadlineError> {
        let claim_until = now + chrono::Duration::from_std(CLAIM).expect("a small duration");
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE saga_deadlines SET claimed_until = $2 WHERE order_id IN ( \
               SELECT order_id FROM saga_deadlines \
               WHERE due_at <= $1 AND claimed_until <= $1 \
               ORDER BY due_at LIMIT $3 FOR UPDATE SKIP LOCKED) \
             RETURNING order_id",
        )
        .bind(now)
        .bind(claim_until)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        Ok(ids.iter().filter_map(|id| id.parse().ok()).collect())
    }

    async fn due_at(
        &self,
        order_ids: &[OrderId],
    ) -> Result<HashMap<OrderId, Timestamp>, DeadlineError> {
        if order_ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(String, Timestamp)> =
            sqlx::query_as("SELECT order_id, due_at FROM saga_deadlines WHERE order_id = ANY($1)")
                .bind(order_ids.iter().map(|o| o.to_string()).collect::<Vec<_>>())
                .fetch_all(&self.pool)
                .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, due)| Some((id.parse().ok()?, due)))
            .collect())
    }
}

/// How often the worker looks for due deadlines.
pub const POLL: Duration = Duration::from_millis(200);

/// Deadlines claimed per poll.
pub const CLAIM_BATCH: usize = 500;

/// Fires due deadlines through `fire`, a claimed batch at a time, until `shutdown` resolves.
pub async fn run<F, Fut>(
    deadlines: Arc<dyn Deadlines>,
    fire: F,
    shutdown: impl std::future::Future<Output = ()>,
) where
    F: Fn(Vec<OrderId>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    tokio::pin!(shutdown);
    loop {
        match deadlines.claim_due(chrono::Utc::now(), CLAIM_BATCH).await {
            Ok(due) if !due.is_empty() => fire(due).await,
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot read due deadlines"),
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}
