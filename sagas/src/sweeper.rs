//! The sweeper: no order stays stuck.
//!
//! An order moves on when something wakes the saga for it: its `OrderPlaced` or a payment's
//! answer arriving through the mirror, or its payment deadline falling due. An order whose
//! trigger was dead-lettered, or whose deadline was lost (an instance died between the append
//! that left it awaiting payment and the deadline's row), would wait for ever. The sweeper
//! finds such orders and wakes the saga for them ([`OrderSaga::wake`]). The saga plans from the
//! log, so waking an order that was not stuck after all (the read model lagging behind) takes
//! no step, and waking an order that awaits its payment schedules its deadline again.
//!
//! It finds them through the orders read model's status indexes, by placement time (order ids
//! are ULIDs, which sort by time):
//!
//! - `pending` orders placed more than [`Sweep::stuck_after`] ago: a pending order is decided
//!   within milliseconds, so each of these is stuck;
//! - `awaiting_payment` orders placed more than [`Sweep::stuck_after`] ago whose deadline is
//!   missing, or overdue by more than [`Sweep::stuck_after`]. Most of them are waiting for
//!   their payment as they should, so each sweep goes on from where the last one stopped,
//!   from the newest to the oldest, and starts again at the newest after the oldest.
//!
//! Each sweep examines at most [`Sweep::batch`] orders of each status, one sweep every
//! [`Sweep::every`]: the sweeper's load is bounded whatever the backlog. Any number of
//! instances may sweep: a wake-up is idempotent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::order::OrderStatus;
use domain::{OrderId, Timestamp};
use projections::read_model::ReadModelError;
use projections::{OrderFilter, ReadModel};
use ulid::Ulid;

use crate::deadlines::{DeadlineError, Deadlines};
use crate::order_saga::{OrderSaga, SagaError};

/// How the sweeper runs.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// How often it looks.
    pub every: Duration,
    /// How long an order may wait, past its placement or its deadline, before it counts as
    /// stuck. Keep it below the audit's bound, so the sweeper moves an order on before the
    /// audit reports it.
    pub stuck_after: Duration,
    /// Most orders of each status examined by one sweep.
    pub batch: usize,
}

impl Default for Sweep {
    fn default() -> Self {
        Sweep {
            every: Duration::from_secs(10),
            stuck_after: Duration::from_secs(60),
            batch: 500,
        }
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Pending orders examined, and woken.
    pub pending: (usize, usize),
    /// Orders awaiting payment examined, and woken.
    pub awaiting_payment: (usize, usize),
}

/// A sweep failed; the next one tries again.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The read model cannot list orders.
    #[error(transparent)]
    ReadModel(#[from] ReadModelError),
    /// The deadlines cannot be read.
    #[error(transparent)]
    Deadlines(#[from] DeadlineError),
    /// The saga could not wake the orders.
    #[error(transparent)]
    Saga(#[from] SagaError),
}

/// Finds stuck orders and wakes the saga for them.
pub struct Sweeper {
    read_model: Arc<dyn ReadModel>,
    deadlines: Arc<dyn Deadlines>,
    saga: Arc<OrderSaga>,
    sweep: Sweep,
    /// Where the walk over orders awaiting payment goes on: older than this order.
    awaiting_after: Mutex<Option<OrderId>>,
}

impl Sweeper {
    /// A sweeper over the orders of `read_model`, waking `saga`.
    pub fn new(
        read_model: Arc<dyn ReadModel>,
        deadlines: Arc<dyn Deadlines>,
        saga: Arc<OrderSaga>,
        sweep: Sweep,
    ) -> Self {
        Sweeper {
            read_model,
            deadlines,
            saga,
            sweep,
            awaiting_after: Mutex::new(None),
        }
    }

    /// Sweeps every [`Sweep::every`] until `stop`, counting in
    /// `groupbuy_sweeper_orders_examined_total` and `groupbuy_sweeper_orders_woken_total`
    /// (by `status`).
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        commands::periodic::every(self.sweep.every, stop, || async {
            if let Err(error) = self.sweep_once(chrono::Utc::now()).await {
                tracing::warn!(%error, "cannot sweep for stuck orders; trying again later");
            }
        })
        .await;
    }

    /// One sweep at `now`.
    pub async fn sweep_once(&self, now: Timestamp) -> Result<Swept, SweepError> {
        let bound =
            chrono::Duration::from_std(self.sweep.stuck_after).unwrap_or(chrono::Duration::MAX);
        let placed_before = placed_before(now - bound);
        let pending = self.pending(placed_before).await?;
        let awaiting_payment = self.awaiting_payment(placed_before, now - bound).await?;
        Ok(Swept {
            pending,
            awaiting_payment,
        })
    }

    async fn pending(&self, placed_before: OrderId) -> Result<(usize, usize), SweepError> {
        let page = self
            .read_model
            .orders(
                &filter(OrderStatus::Pending),
                Some(placed_before),
                self.sweep.batch,
            )
            .await?;
        let stuck: Vec<OrderId> = page.items.iter().map(|o| o.order_id).collect();
        self.wake("pending", page.items.len(), &stuck).await?;
        Ok((page.items.len(), stuck.len()))
    }

    async fn awaiting_payment(
        &self,
        placed_before: OrderId,
        overdue_before: Timestamp,
    ) -> Result<(usize, usize), SweepError> {
        let from = self
            .awaiting_after
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|&after| after < placed_before)
            .unwrap_or(placed_before);
        let page = self
            .read_model
            .orders(
                &filter(OrderStatus::AwaitingPayment),
                Some(from),
                self.sweep.batch,
            )
            .await?;
        let ids: Vec<OrderId> = page.items.iter().map(|o| o.order_id).collect();
        let due = self.deadlines.due_at(&ids).await?;
        let stuck: Vec<OrderId> = ids
            .iter()
            .copied()
            .filter(|id| due.get(id).is_none_or(|&due| due < overdue_before))
            .collect();
        self.wake("awaiting_payment", ids.len(), &stuck).await?;
        // The walk goes on past this page next time, or starts again at the newest.
        *self
            .awaiting_after
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = page.next;
        Ok((ids.len(), stuck.len()))
    }

    /// Wakes the saga for `stuck`, of the `examined` orders in `status`.
    async fn wake(
        &self,
        status: &'static str,
        examined: usize,
        stuck: &[OrderId],
    ) -> Result<(), SweepError> {
        metrics::counter!("groupbuy_sweeper_orders_examined_total", "status" => status)
            .increment(examined as u64);
        if stuck.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            status,
            orders = stuck.len(),
            first = %stuck[0],
            "orders waited past the sweeper's bound; waking the saga for them"
        );
        self.saga.wake(stuck).await?;
        metrics::counter!("groupbuy_sweeper_orders_woken_total", "status" => status)
            .increment(stuck.len() as u64);
        Ok(())
    }
}

fn filter(status: OrderStatus) -> OrderFilter {
    OrderFilter {
        status: Some(status),
        ..OrderFilter::default()
    }
}

/// The greatest order id of the millisecond before `at`: the orders older than it were placed
/// before `at`.
fn placed_before(at: Timestamp) -> OrderId {
    let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    OrderId::from_ulid(Ulid::from_parts(ms.saturating_sub(1), u128::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_id_sorts_after_every_order_of_the_millisecond_before_and_none_after() {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
        let cutoff = placed_before(at);
        let before = Ulid::from_parts(1_700_000_000_122, u128::MAX >> 49);
        let same = Ulid::from_parts(1_700_000_000_123, 0);
        assert!(OrderId::from_ulid(before) < cutoff);
        assert!(OrderId::from_ulid(same) > cutoff);
        // The Redis indexes compare the ids' text: it sorts the same way.
        assert!(before.to_string() < cutoff.to_string());
        assert!(same.to_string() > cutoff.to_string());
    }
}
