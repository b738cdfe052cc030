//! Load, decide, append, retry: the command handler against both logs.

use std::sync::Arc;

use chrono::Utc;
use commands::handler::{Context, HandlerOptions};
use commands::{stream_id, CommandError, CommandHandler, EventLog};
use domain::campaign::{CampaignAggregate, CampaignCommand, NewCampaign, Stock, StockMove};
use domain::store::Store;
use domain::{Aggregate, CampaignId, DomainError, StoreId};
use harness::TestDb;
use schemas::Metadata;
use ulid::Ulid;

fn new_campaign(id: CampaignId, quota: u32, per_user_limit: u32) -> CampaignCommand {
    let now = Utc::now();
    CampaignCommand::Create(NewCampaign {
        campaign_id: id,
        store: Some(Store {
            store_id: StoreId::from_ulid(Ulid::new()),
            name: "Corner Cellar".into(),
            region: "north".into(),
            created_at: now,
        }),
        sku: "IPA-330".into(),
        title: "Hazy IPA".into(),
        price_cents: 1250,
        quota,
        per_user_limit,
        starts_at: now - chrono::Duration::minutes(1),
        ends_at: now + chrono::Duration::hours(1),
        payment_timeout_seconds: 600,
        stock_buckets: 1,
        now,
    })
}

/// A writer's decision taking `reserved` units and giving back `released` ones.
fn move_stock(reserved: u32, released: u32) -> CampaignCommand {
    CampaignCommand::Move(StockMove {
        reserved,
        released,
        sold: 0,
        now: Utc::now(),
    })
}

/// One unit reserved.
fn reserve_one() -> CampaignCommand {
    move_stock(1, 0)
}

fn context<S>() -> Context<'static, S> {
    Context::new(Metadata {
        actor: Some("test".into()),
        ..Default::default()
    })
}

async fn create_campaign(handler: &CommandHandler, quota: u32, limit: u32) -> String {
    let id = CampaignId::from_ulid(Ulid::new());
    let stream = stream_id::<CampaignAggregate>(id);
    handler
        .execute::<CampaignAggregate>(&stream, &new_campaign(id, quota, limit), &context())
        .await
        .unwrap();
    stream
}

/// 64 writers take units of one campaign at once: every one succeeds after retries, versions
/// stay contiguous, and the units add up.
async fn concurrent_conflicting_commands_all_land_in_contiguous_versions(log: Arc<dyn EventLog>) {
    const WRITERS: u32 = 64;
    let options = HandlerOptions {
        conflict_retries_max: 64,
        ..HandlerOptions::default()
    };
    let handler = CommandHandler::new(Arc::clone(&log), options);
    let stream = create_campaign(&handler, 1_000, 5).await;

    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let (handler, stream) = (handler.clone(), stream.clone());
        tasks.push(tokio::spawn(async move {
            let reserve = reserve_one();
            handler
                .execute::<CampaignAggregate>(&stream, &reserve, &context())
                .await
                .map(|_| ())
        }));
    }
    for task in tasks {
        task.await
            .unwrap()
            .expect("every writer lands within its retries");
    }

    let events = log.read_stream(&stream, 0, 10_000).await.unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.envelope.stream_version).collect();
    assert_eq!(versions, (1..=u64::from(WRITERS) + 1).collect::<Vec<_>>());
    let loaded = handler.load::<CampaignAggregate>(&stream).await.unwrap();
    let stock = loaded.state.unwrap().stock([]);
    assert_eq!(
        stock,
        Stock {
            total: 1_000,
            available: 1_000 - WRITERS,
            reserved: WRITERS,
            sold: 0
        }
    );
}

#[tokio::test]
async fn concurrent_conflicting_commands_on_postgres() {
    let db = TestDb::with_pool(32).await;
    concurrent_conflicting_commands_all_land_in_contiguous_versions(db.log()).await;
}

#[tokio::test]
async fn concurrent_conflicting_commands_in_memory() {
    concurrent_conflicting_commands_all_land_in_contiguous_versions(Arc::new(
        commands::log::memory::MemoryEventLog::new(),
    ))
    .await;
}

#[tokio::test]
async fn a_refused_command_appends_nothing_and_says_why() {
    let db = TestDb::new().await;
    let handler = CommandHandler::new(db.log(), HandlerOptions::default());
    let stream = create_campaign(&handler, 2, 2).await;
    let error = handler
        .execute::<CampaignAggregate>(&stream, &move_stock(3, 0), &context())
        .await
        .unwrap_err();
    assert!(
        matches!(error, CommandError::Domain(DomainError::SoldOut)),
        "{error}"
    );
    assert_eq!(db.log().read_stream(&stream, 0, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn executing_the_same_command_again_stores_its_events_once() {
    let db = TestDb::new().await;
    let handler = CommandHandler::new(db.log(), HandlerOptions::default());
    let stream = create_campaign(&handler, 10, 2).await;
    let replenish = CampaignCommand::Replenish {
        quantity: 5,
        now: Utc::now(),
    };
    let ctx = context();
    let first = handler
        .execute::<CampaignAggregate>(&stream, &replenish, &ctx)
        .await
        .unwrap();
    // The caller did not hear back and sends the very same command (same command id) again.
    let again = handler
        .execute::<CampaignAggregate>(&stream, &replenish, &ctx)
        .await
        .unwrap();
    assert!(again.appended.unwrap().replayed);
    assert!(!first.appended.unwrap().replayed);
    let stock = handler
        .load::<CampaignAggregate>(&stream)
        .await
        .unwrap()
        .state
        .unwrap()
        .total_units;
    assert_eq!(stock, 15, "replenished once");
}

#[tokio::test]
async fn a_long_stream_loads_from_its_snapshot_to_the_same_state_as_a_full_fold() {
    let db = TestDb::new().await;
    let log = db.log();
    let handler = CommandHandler::new(
        log.clone(),
        HandlerOptions {
            snapshot_every_events: 50,
            ..Default::default()
        },
    );
    let stream = create_campaign(&handler, 1_000, 1).await;
    for _ in 0..120 {
        let reserve = reserve_one();
        handler
            .execute::<CampaignAggregate>(&stream, &reserve, &context())
            .await
            .unwrap();
    }
    // Snapshots are written in the background; wait for the one at version 100.
    let mut snapshot = None;
    for _ in 0..100 {
        snapshot = log.load_snapshot(&stream).await.unwrap();
        if snapshot.as_ref().is_some_and(|s| s.stream_version >= 100) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let snapshot = snapshot.expect("a snapshot was saved");
    assert!(snapshot.stream_version >= 100 && snapshot.stream_version <= 121);

    let loaded = handler.load::<CampaignAggregate>(&stream).await.unwrap();
    let events = log.read_stream(&stream, 0, 10_000).await.unwrap();
    let full: Vec<_> = events
        .iter()
        .map(|e| schemas::from_envelope(&e.envelope).unwrap())
        .collect::<Vec<_>>();
    assert_eq!(loaded.version, 121);
    assert_eq!(loaded.state, CampaignAggregate::fold(&full));

    // A snapshot of another shape is ignored rather than misread.
    sqlx::query("UPDATE snapshots SET state_version = 999, state = '{\"garbage\": true}'")
        .execute(log.pool())
        .await
        .unwrap();
    let reloaded = handler.load::<CampaignAggregate>(&stream).await.unwrap();
    assert_eq!(reloaded.state, loaded.state);
}

#[tokio::test]
async fn commands_for_one_stream_in_one_process_take_turns_instead_of_conflicting() {
    let db = TestDb::new().await;
    // No retries at all: any conflict between these writers would fail a command.
    let options = HandlerOptions {
        conflict_retries_max: 0,
        ..HandlerOptions::default()
    };
    let handler = CommandHandler::new(db.log(), options);
    let stream = create_campaign(&handler, 100, 1).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (handler, stream) = (handler.clone(), stream.clone());
            tokio::spawn(async move {
                let reserve = reserve_one();
                handler
                    .execute::<CampaignAggregate>(&stream, &reserve, &context())
                    .await
                    .map(|_| ())
            })
        })
        .collect();
    for task in tasks {
        task.await
            .unwrap()
            .expect("no local writer conflicts with another");
    }
    let stock = handler
        .load::<CampaignAggregate>(&stream)
        .await
        .unwrap()
        .state
        .unwrap()
        .stock([]);
    assert_eq!(stock.reserved, 32);
}

/// A handler decides first on the state it cached, without reading the log. When another
/// instance appended meanwhile, that first decision conflicts and is made again on the fresh
/// stream; a refusal on a cached state is checked against the fresh stream before it stands.
#[tokio::test]
async fn a_stale_cached_state_costs_a_retry_never_a_wrong_decision() {
    let db = TestDb::new().await;
    let log: Arc<dyn EventLog> = db.log();
    let here = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
    let elsewhere = CommandHandler::new(Arc::clone(&log), HandlerOptions::default());
    let stream = create_campaign(&here, 3, 3).await;
    here.execute::<CampaignAggregate>(&stream, &reserve_one(), &context())
        .await
        .unwrap();
    // Another instance takes the other two units; `here` still caches version 2.
    for _ in 0..2 {
        elsewhere
            .execute::<CampaignAggregate>(&stream, &reserve_one(), &context())
            .await
            .unwrap();
    }
    // The cached state has units left, the stream has none: the append conflicts, and the
    // decision made again on the fresh stream refuses.
    let refused = here
        .execute::<CampaignAggregate>(&stream, &reserve_one(), &context())
        .await;
    assert!(
        matches!(refused, Err(CommandError::Domain(DomainError::SoldOut))),
        "{refused:?}"
    );
    // A release elsewhere; `here` caches the sold-out state, which would refuse. A refusal
    // on a cached state is not trusted: the fresh stream has the released unit.
    elsewhere
        .execute::<CampaignAggregate>(&stream, &move_stock(0, 1), &context())
        .await
        .unwrap();
    let executed = here
        .execute::<CampaignAggregate>(&stream, &reserve_one(), &context())
        .await
        .unwrap();
    assert_eq!(executed.version, 6);
    let stock = executed.state.unwrap().stock([]);
    assert_eq!(stock.available, 0);
    assert_eq!(stock.reserved, 3);
    let events = log.read_stream(&stream, 0, 100).await.unwrap();
    let versions: Vec<u64> = events.iter().map(|e| e.envelope.stream_version).collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
}
