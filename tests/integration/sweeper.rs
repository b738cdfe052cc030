//! The sweeper wakes the saga for orders that wait past its bound, and for no others.

use std::sync::Arc;
use std::time::Duration;

use commands::handler::HandlerOptions;
use commands::subscription::Handler;
use commands::{stream_id, CommandHandler, EventLog};
use domain::order::{OrderAggregate, OrderStatus};
use domain::payment::PaymentAggregate;
use domain::saga::payment_id_of;
use domain::OrderId;
use projections::consumer::ProjectionConsumer;
use projections::memory::MemoryProjections;
use projections::ops::ProjectionName;
use projections::store::ProjectionStore;
use projections::ReadModel;
use sagas::deadlines::{Deadlines, MemoryDeadlines};
use sagas::order_saga::OrderSaga;
use sagas::payments::External;
use sagas::sweeper::{Sweep, Sweeper, Swept};

use crate::order_saga::placed_order;

on_both_logs!(orders_that_wait_past_the_bound_are_moved_on_and_no_others);

async fn orders_that_wait_past_the_bound_are_moved_on_and_no_others(log: Arc<dyn EventLog>) {
    // An order whose OrderPlaced never reached the saga (dead-lettered, say).
    let (_, order_id, _) = placed_order(&log).await;
    let deadlines = Arc::new(MemoryDeadlines::new());
    let saga = Arc::new(OrderSaga::new(
        CommandHandler::new(Arc::clone(&log), HandlerOptions::default()),
        Arc::new(External),
        Arc::clone(&deadlines) as Arc<dyn Deadlines>,
    ));
    let read_model = Arc::new(MemoryProjections::new());
    let sweeper = Sweeper::new(
        Arc::clone(&read_model) as Arc<dyn ReadModel>,
        Arc::clone(&deadlines) as Arc<dyn Deadlines>,
        saga,
        Sweep {
            stuck_after: Duration::from_secs(60),
            ..Sweep::default()
        },
    );
    let now = chrono::Utc::now();
    let later = now + chrono::Duration::minutes(2);
    let status = || async { order_status(&log, order_id).await };

    project(&log, &read_model, order_id).await;
    assert_eq!(
        read_model.order(order_id).await.unwrap().unwrap().status,
        OrderStatus::Pending
    );
    // Within the bound, a pending order is left alone.
    let swept = sweeper.sweep_once(now).await.unwrap();
    assert_eq!(swept, Swept::default());
    assert_eq!(status().await, OrderStatus::Pending);
    // Past it, the saga reserves its stock and asks for its money.
    let swept = sweeper.sweep_once(later).await.unwrap();
    assert_eq!(swept.pending, (1, 1));
    assert_eq!(status().await, OrderStatus::AwaitingPayment);
    let deadline = due(&deadlines, order_id)
        .await
        .expect("the saga set a deadline");

    // Awaiting its payment with its deadline ahead, it waits as it should.
    project(&log, &read_model, order_id).await;
    let swept = sweeper.sweep_once(later).await.unwrap();
    assert_eq!(swept.awaiting_payment, (1, 0));
    // Its deadline lost (an instance died before writing it): woken, its deadline is back.
    deadlines.clear(order_id).await.unwrap();
    let swept = sweeper.sweep_once(later).await.unwrap();
    assert_eq!(swept.awaiting_payment, (1, 1));
    assert_eq!(due(&deadlines, order_id).await, Some(deadline));
    assert_eq!(status().await, OrderStatus::AwaitingPayment);
    // A deadline long overdue that nobody fired: woken, the order's own deadline rules.
    let overdue = now - chrono::Duration::minutes(5);
    deadlines.schedule(order_id, overdue).await.unwrap();
    let swept = sweeper.sweep_once(later).await.unwrap();
    assert_eq!(swept.awaiting_payment, (1, 1));
    assert_eq!(due(&deadlines, order_id).await, Some(deadline));
}

/// Brings the orders read model up to the order's streams in the log. (They are read
/// directly: the global log's watermark is server-wide, so other tests' transactions could
/// hold a read of the whole log back.)
async fn project(log: &Arc<dyn EventLog>, read_model: &Arc<MemoryProjections>, order_id: OrderId) {
    let mut events = Vec::new();
    for stream in [
        stream_id::<OrderAggregate>(order_id),
        stream_id::<PaymentAggregate>(payment_id_of(order_id)),
    ] {
        let read = log.read_stream(&stream, 0, 100).await.unwrap();
        events.extend(read.into_iter().map(|e| e.envelope));
    }
    events.sort_by_key(|e| e.global_position);
    let store = Arc::clone(read_model) as Arc<dyn ProjectionStore>;
    ProjectionConsumer::new(ProjectionName::Orders, store)
        .handle_batch(&events.iter().collect::<Vec<_>>())
        .await
        .unwrap();
}

async fn order_status(log: &Arc<dyn EventLog>, order_id: OrderId) -> OrderStatus {
    let handler = CommandHandler::new(Arc::clone(log), HandlerOptions::default());
    let order = handler
        .load::<OrderAggregate>(&stream_id::<OrderAggregate>(order_id))
        .await
        .unwrap();
    order.state.unwrap().status
}

async fn due(deadlines: &MemoryDeadlines, order_id: OrderId) -> Option<domain::Timestamp> {
    deadlines
        .due_at(&[order_id])
        .await
        .unwrap()
        .get(&order_id)
        .copied()
}

#[tokio::test]
async fn postgres_deadlines_say_when_each_order_is_due() {
    let db = harness::TestDb::new().await;
    let deadlines = sagas::deadlines::PgDeadlines::new(db.log().pool().clone());
    let (a, b, c) = (order(), order(), order());
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let later = now + chrono::Duration::minutes(10);
    deadlines
        .schedule_many(&[(a, now), (b, later)])
        .await
        .unwrap();
    let due = deadlines.due_at(&[a, b, c]).await.unwrap();
    assert_eq!(due.len(), 2, "{due:?}");
    assert_eq!((due[&a], due[&b]), (now, later));
    assert_eq!(deadlines.claim_due(now, 10).await.unwrap(), [a]);
    deadlines.clear(a).await.unwrap();
    assert_eq!(deadlines.due_at(&[a, b]).await.unwrap().len(), 1);
    assert!(deadlines.due_at(&[]).await.unwrap().is_empty());
}

fn order() -> OrderId {
    OrderId::from_ulid(ulid::Ulid::new())
}
