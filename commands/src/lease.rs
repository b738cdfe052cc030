//! Partitions of a consumer shared among instances: each partition is consumed by the one
//! instance that holds its lease (docs/adr/0012-partitions-by-campaign-and-customer.md).
//!
//! On Postgres a lease is a session advisory lock, `(hashtext('groupbuy.partitions:' ||
//! consumer), partition)`, held on a connection of the keeper's own, as the relay holds its
//! lease: when an instance dies its connection closes and its partitions are free. Each
//! keeper also holds a member lock on that connection, `(same class, MEMBER_BASE + a random
//! number)`, so every keeper can count the live members of its consumer in `pg_locks`
//! without a table or a heartbeat. Every `tick` (half a second) a keeper aims at `ceil(partitions /
//! members)` partitions: it lets go of its surplus (once its subscription has finished with
//! them, see [`Assignment`]) and takes free ones, so the partitions rebalance when an
//! instance comes or goes.

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::subscription::{Assignment, LET_GO_WAIT};

/// Member locks take the second key from here up; partitions sit below it.
const MEMBER_BASE: i32 = 1 << 20;
/// How often a keeper looks at its leases unless configured: two small queries on its own
/// connection, often enough that an instance that joins gets its share within about a second.
pub const TICK_DEFAULT: Duration = Duration::from_millis(500);

/// Keeps the leases of one consumer's partitions on Postgres.
#[derive(Clone, Debug)]
pub struct PgPartitionLeases {
    connect: PgConnectOptions,
    consumer: String,
    partitions: u16,
    tick: Duration,
}

impl PgPartitionLeases {
    /// Leases of `partitions` partitions of `consumer` on the database `connect` reaches.
    pub fn new(connect: PgConnectOptions, consumer: impl Into<String>, partitions: u16) -> Self {
        PgPartitionLeases {
            connect,
            consumer: consumer.into(),
            partitions: partitions.max(1),
            tick: TICK_DEFAULT,
        }
    }

    /// Looks at its leases every `tick` instead.
    pub fn with_tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// Starts keeping leases: the assignment to run a subscription with. The keeper stops,
    /// and its leases go, once the subscription is done with the assignment (drops it).
    pub fn start(self) -> Assignment {
        let (granted, granted_rx) = watch::channel(BTreeSet::new());
        let (running, running_rx) = watch::channel(BTreeSet::new());
        tokio::spawn(self.keep(granted, running_rx));
        Assignment {
            granted: granted_rx,
            running,
        }
    }

    async fn keep(
        self,
        granted: watch::Sender<BTreeSet<u16>>,
        mut running: watch::Receiver<BTreeSet<u16>>,
    ) {
        let mut session: Option<Session> = None;
        loop {
            if session.is_none() {
                match Session::open(&self).await {
                    Ok(opened) => session = Some(opened),
                    Err(error) => {
                        tracing::warn!(consumer = %self.consumer, %error, "cannot reach the partition leases");
                    }
                }
            }
            if let Some(open) = session.as_mut() {
                if let Err(error) = open.balance(&self, &granted, &mut running).await {
                    // The locks went with the connection: consume nothing until they are
                    // taken again.
                    tracing::warn!(consumer = %self.consumer, %error, "lost the partition leases");
                    granted.send_replace(BTreeSet::new());
                    session = None;
                }
            }
            // The subscription is gone: so are the leases, with the connection.
            if running.has_changed().is_err() {
                return;
            }
            tokio::time::sleep(self.tick).await;
        }
    }
}

/// A keeper's connection, with the locks it holds.
struct Session {
    connection: PgConnection,
    member: i32,
    held: BTreeSet<u16>,
}

impl Session {
    async fn open(leases: &PgPartitionLeases) -> Result<Session, sqlx::Error> {
        // Not pooled: the locks must go when the keeper does.
        let mut connection = PgConnection::connect_with(&leases.connect).await?;
        loop {
            let member = MEMBER_BASE + rand::random::<i32>().rem_euclid(i32::MAX - MEMBER_BASE);
            if try_lock(&mut connection, &leases.consumer, member).await? {
                return Ok(Session {
                    connection,
                    member,
                    held: BTreeSet::new(),
                });
            }
        }
    }

    /// Lets go of the surplus, takes free partitions up to this member's share, and says
    /// which it holds.
    async fn balance(
        &mut self,
        leases: &PgPartitionLeases,
        granted: &watch::Sender<BTreeSet<u16>>,
        running: &mut watch::Receiver<BTreeSet<u16>>,
    ) -> Result<(), sqlx::Error> {
        let members: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND classid = hashtext('groupbuy.partitions:' || $1)::oid \
               AND objsubid = 2 AND objid >= $2::int4::oid",
        )
        .bind(&leases.consumer)
        .bind(MEMBER_BASE)
        .fetch_one(&mut self.connection)
        .await?;
        let share = share(leases.partitions, members);
        // This member's own order of preference, so members start on different partitions.
        let first = (self.member - MEMBER_BASE).rem_euclid(i32::from(leases.partitions)) as u16;
        let preference: Vec<u16> = (0..leases.partitions)
            .map(|i| (first + i) % leases.partitions)
            .collect();
        let surplus: Vec<u16> = preference
            .iter()
            .rev()
            .copied()
            .filter(|p| self.held.contains(p))
            .take(self.held.len().saturating_sub(share))
            .collect();
        if !surplus.is_empty() {
            self.let_go(leases, &surplus, granted, running).await?;
        }
        for &partition in &preference {
            if self.held.len() >= share {
                break;
            }
            if self.held.contains(&partition) {
                continue;
            }
            if try_lock(&mut self.connection, &leases.consumer, i32::from(partition)).await? {
                self.held.insert(partition);
            }
        }
        if *granted.borrow() != self.held {
            tracing::info!(consumer = %leases.consumer, members, partitions = ?self.held, "partition leases");
            granted.send_replace(self.held.clone());
        }
        Ok(())
    }

    /// Takes `partitions` from the subscription, waits until it has finished with them, and
    /// unlocks them.
    async fn let_go(
        &mut self,
        leases: &PgPartitionLeases,
        partitions: &[u16],
        granted: &watch::Sender<BTreeSet<u16>>,
        running: &mut watch::Receiver<BTreeSet<u16>>,
    ) -> Result<(), sqlx::Error> {
        for partition in partitions {
            self.held.remove(partition);
        }
        granted.send_replace(self.held.clone());
        let finished = running.wait_for(|now| partitions.iter().all(|p| !now.contains(p)));
        if tokio::time::timeout(LET_GO_WAIT, finished).await.is_err() {
            tracing::warn!(consumer = %leases.consumer, ?partitions, "the subscription did not let go of partitions in time; unlocking them anyway");
        }
        for &partition in partitions {
            sqlx::query("SELECT pg_advisory_unlock(hashtext('groupbuy.partitions:' || $1), $2)")
                .bind(&leases.consumer)
                .bind(i32::from(partition))
                .execute(&mut self.connection)
                .await?;
        }
        Ok(())
    }
}

/// Takes the lock `key` of `consumer`'s class (a partition, or a member) on `connection`,
/// unless another session holds it.
async fn try_lock(
    connection: &mut PgConnection,
    consumer: &str,
    key: i32,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('groupbuy.partitions:' || $1), $2)")
        .bind(consumer)
        .bind(key)
        .fetch_one(connection)
        .await
}

/// The partitions each of `members` members aims at.
fn share(partitions: u16, members: i64) -> usize {
    let members = usize::try_from(members.max(1)).unwrap_or(usize::MAX);
    usize::from(partitions).div_ceil(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_member_aims_at_its_share_rounded_up() {
        assert_eq!(share(12, 1), 12);
        assert_eq!(share(12, 2), 6);
        assert_eq!(share(12, 5), 3);
        assert_eq!(share(12, 0), 12, "a member always counts itself");
        assert_eq!(share(1, 3), 1);
    }
}
