//! Before the load: the campaign to sell from and the customers who buy.

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use ulid::Ulid;

use super::api::{Api, Campaign, Customer};
use super::LoadgenArgs;

/// Customers registered at once: enough to make setup quick, few enough not to be a load
/// test of its own.
const REGISTRATIONS_IN_FLIGHT_MAX: usize = 16;

/// What the load runs against.
pub struct Sale {
    /// This run's id: it names the store, campaign and customers, and starts every
    /// Idempotency-Key, so runs never collide.
    pub run_id: Ulid,
    /// The campaign as it was before the load.
    pub campaign: Campaign,
    /// Whether this run created the campaign, so that every order of it is this run's.
    pub created: bool,
    /// The customers, in the order orders are spread over them.
    pub customers: Vec<Customer>,
}

impl Sale {
    /// The campaign's id.
    pub fn campaign_id(&self) -> Ulid {
        self.campaign.campaign_id
    }
}

/// Creates (or reads) the campaign, and registers the customers.
pub async fn sale(api: &Api, args: &LoadgenArgs, progress: bool) -> anyhow::Result<Sale> {
    let run_id = crate::ids::new_ulid();
    let (campaign, created) = match args.campaign {
        Some(id) => (
            api.campaign(id)
                .await
                .with_context(|| format!("reading campaign {id}"))?,
            false,
        ),
        None => (
            create_campaign(api, args, run_id)
                .await
                .context("creating the campaign")?,
            true,
        ),
    };
    let bar = if progress {
        indicatif::ProgressBar::new(args.customers.into())
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "registering customers {wide_bar} {human_pos}/{human_len}",
        )
        .expect("the template is valid"),
    );
    let customers: Vec<Customer> = futures::stream::iter(0..args.customers)
        .map(|i| {
            let name = format!("loadgen {run_id} customer {i}");
            async move { api.register(&name).await }
        })
        .buffered(REGISTRATIONS_IN_FLIGHT_MAX)
        .inspect_ok(|_| bar.inc(1))
        .try_collect()
        .await
        .context("registering the customers")?;
    bar.finish_and_clear();
    Ok(Sale {
        run_id,
        campaign,
        created,
        customers,
    })
}

/// A store and a campaign on it, open for a day.
async fn create_campaign(api: &Api, args: &LoadgenArgs, run_id: Ulid) -> anyhow::Result<Campaign> {
    let store_id = api.create_store(&format!("loadgen {run_id}")).await?;
    let now = chrono::Utc::now();
    let mut terms = serde_json::json!({
        "store_id": store_id,
        "sku": "LOADGEN",
        "title": format!("groupbuy loadgen {run_id}"),
        "price_cents": args.price_cents,
        "quota": args.quota,
        "per_user_limit": args.per_user_limit,
        // A minute early: a server whose clock is behind ours would otherwise see a campaign
        // that has not started and reject every order as `campaign_not_open`.
        "starts_at": now - chrono::Duration::minutes(1),
        "ends_at": now + chrono::Duration::days(1),
        "payment_timeout_seconds": args.payment_timeout_seconds,
    });
    // Only when asked for: a deployment from before stock buckets refuses the field.
    if args.stock_buckets > 1 {
        terms["stock_buckets"] = args.stock_buckets.into();
    }
    api.create_campaign(&terms).await
}
