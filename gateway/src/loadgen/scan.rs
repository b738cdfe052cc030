//! After the load: wait for the orders to be decided, then read them and the stock back as
//! the operator.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;
use ulid::Ulid;

use super::api::{Api, Campaign, Order, OrderStatus, ORDERS_PAGE_MAX};
use super::checks::{self, Check};
use super::setup::Sale;
use super::ORDERS_MAX;

/// Most pages one listing reads: five times what a run can place, so a campaign shared with
/// other traffic is still read whole, and a listing that never ends is cut off.
const LISTING_PAGES_MAX: u64 = 5 * ORDERS_MAX / ORDERS_PAGE_MAX as u64;
/// How often the drain asks whether anything is still pending.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How many times the stock and the orders are read until they agree. Orders move on after
/// the drain (a payment times out, fails, succeeds), and the read models of the campaign and
/// of the orders are updated one after the other, so one reading can catch them between two
/// steps; a real violation shows in every reading.
const SNAPSHOT_ATTEMPTS_MAX: u32 = 5;
/// The pause between two readings.
const SNAPSHOT_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Reads every page of the campaign's orders (only `status` ones, if given), newest first,
/// and keeps the ones this run placed.
async fn orders_of(
    api: &Api,
    campaign_id: Ulid,
    status: Option<OrderStatus>,
    placed: &HashSet<Ulid>,
) -> anyhow::Result<Vec<Order>> {
    let mut orders = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..LISTING_PAGES_MAX {
        let page = api
            .orders(campaign_id, status, cursor.as_deref(), ORDERS_PAGE_MAX)
            .await?;
        orders.extend(
            page.items
                .into_iter()
                .filter(|o| placed.contains(&o.order_id)),
        );
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(orders),
        }
    }
    bail!(
        "campaign {campaign_id} lists more than {} orders; stopped reading",
        LISTING_PAGES_MAX * ORDERS_PAGE_MAX as u64
    )
}

/// How many of this run's orders the listing shows still `pending`.
pub async fn pending_of(
    api: &Api,
    campaign_id: Ulid,
    placed: &HashSet<Ulid>,
) -> anyhow::Result<u64> {
    let pending = orders_of(api, campaign_id, Some(OrderStatus::Pending), placed).await?;
    Ok(pending.len() as u64)
}

/// Waits until the campaign lists no pending order, or `limit` is up; how long it waited.
pub async fn drain(
    api: &Api,
    campaign_id: Ulid,
    limit: Duration,
    progress: bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let spinner = if progress {
        indicatif::ProgressBar::new_spinner()
    } else {
        indicatif::ProgressBar::hidden()
    };
    spinner.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} draining [{elapsed_precise}]: waiting for every order to leave pending",
        )
        .expect("the template is valid"),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    let waited = loop {
        let page = api
            .orders(campaign_id, Some(OrderStatus::Pending), None, 1)
            .await?;
        if page.items.is_empty() || started.elapsed() >= limit {
            break started.elapsed();
        }
        tokio::time::sleep(DRAIN_POLL).await;
    };
    spinner.finish_and_clear();
    Ok(waited)
}

/// The campaign and this run's orders, read back together, with the checks judged on them.
pub struct Snapshot {
    /// The campaign as read after the orders.
    pub campaign: Campaign,
    /// This run's orders as listed.
    pub orders: Vec<Order>,
    /// The checks, judged on this reading.
    pub checks: Vec<Check>,
}

/// Reads the stock, the orders, and the stock again, until the stock did not move while the
/// orders were read and the checks hold, or [`SNAPSHOT_ATTEMPTS_MAX`] readings were made;
/// the last reading.
pub async fn settled(
    api: &Api,
    sale: &Sale,
    placed: &HashSet<Ulid>,
    drained: bool,
) -> anyhow::Result<Snapshot> {
    let campaign_id = sale.campaign_id();
    let mut attempt = 1;
    loop {
        let before = api.campaign(campaign_id).await?;
        let orders = orders_of(api, campaign_id, None, placed).await?;
        let campaign = api.campaign(campaign_id).await?;
        let checks = checks::run(&checks::Inputs {
            stock: campaign.stock,
            per_user_limit: campaign.per_user_limit,
            orders: &orders,
            accepted: placed.len(),
            created: sale.created,
            drained,
        });
        let steady = before.stock == campaign.stock;
        if (steady && checks::all_hold(&checks)) || attempt == SNAPSHOT_ATTEMPTS_MAX {
            return Ok(Snapshot {
                campaign,
                orders,
                checks,
            });
        }
        attempt += 1;
        tokio::time::sleep(SNAPSHOT_RETRY_PAUSE).await;
    }
}
