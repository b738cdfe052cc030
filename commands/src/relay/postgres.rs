//! The relay lease on Postgres: a session advisory lock on a connection of its own.

use async_trait::async_trait;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, Row};

use super::{RelayLease, RelayLeases};
use crate::log::{LogCursor, LogError};

/// Leases for the relay named `name` (one lock and one checkpoint per name).
#[derive(Clone)]
pub struct PgRelayLeases {
    connect: PgConnectOptions,
    name: String,
}

impl PgRelayLeases {
    /// Leases on the database `connect` reaches; take the options of the log's pool
    /// (`pool.connect_options()`).
    pub fn new(connect: PgConnectOptions, name: impl Into<String>) -> Self {
        PgRelayLeases {
            connect,
            name: name.into(),
        }
    }
}

#[async_trait]
impl RelayLeases for PgRelayLeases {
    async fn try_acquire(&self) -> Result<Option<Box<dyn RelayLease>>, LogError> {
        // Not a pooled connection: a pool would keep the connection, and the lock, alive
        // after the relay that took it is gone.
        let mut connection = PgConnection::connect_with(&self.connect).await?;
        let locked: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtextextended('groupbuy.relay:' || $1, 0))",
        )
        .bind(&self.name)
        .fetch_one(&mut connection)
        .await?;
        if !locked {
            connection.close().await.ok();
            return Ok(None);
        }
        Ok(Some(Box::new(PgRelayLease {
            connection,
            name: self.name.clone(),
        })))
    }
}

struct PgRelayLease {
    connection: PgConnection,
    name: String,
}

#[async_trait]
impl RelayLease for PgRelayLease {
    async fn checkpoint(&mut self) -> Result<LogCursor, LogError> {
        let row = sqlx::query(
            "SELECT transaction_id::text, global_position FROM relay_checkpoints WHERE name = $1",
        )
        .bind(&self.name)
        .fetch_optional(&mut self.connection)
        .await?;
        let Some(row) = row else {
            return Ok(LogCursor::default());
        };
        let transaction_id: String = row.try_get(0)?;
        let global_position: i64 = row.try_get(1)?;
        Ok(LogCursor {
            transaction_id: transaction_id
                .parse()
                .map_err(|_| LogError::Corrupt(format!("relay checkpoint {transaction_id}")))?,
            global_position: u64::try_from(global_position)
                .map_err(|_| LogError::Corrupt(format!("relay checkpoint {global_position}")))?,
        })
    }

    async fn save(&mut self, cursor: LogCursor) -> Result<(), LogError> {
        // Written on the lock's own connection: if the lock is gone, so is the connection,
        // and a relay that lost the lease cannot move the checkpoint.
        sqlx::query(
            "INSERT INTO relay_checkpoints (name, transaction_id, global_position) \
             VALUES ($1, $2::bigint::text::xid8, $3) \
             ON CONFLICT (name) DO UPDATE SET transaction_id = EXCLUDED.transaction_id, \
               global_position = EXCLUDED.global_position, updated_at = clock_timestamp()",
        )
        .bind(&self.name)
        .bind(i64::try_from(cursor.transaction_id).unwrap_or(i64::MAX))
        .bind(i64::try_from(cursor.global_position).unwrap_or(i64::MAX))
        .execute(&mut self.connection)
        .await?;
        Ok(())
    }

    async fn keep_alive(&mut self) -> Result<(), LogError> {
        self.connection.ping().await?;
        Ok(())
    }
}
