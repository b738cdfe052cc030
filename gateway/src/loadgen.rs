//! `groupbuy loadgen`: a flash sale driven against any deployment, over HTTP only.
//!
//! It talks to the server the way customers and an operator do, through the contract of
//! API.md and nothing else, so it can point at an older build or a remote fleet. The stages,
//! in the order the data flows:
//!
//! - [`setup`]: a campaign (created, or the one `--campaign` names) and customers registered
//!   through `POST /v1/users`.
//! - [`drive`]: `--connections` workers place orders for `--duration` seconds, as fast as they
//!   can or on a fixed schedule, each keeping its own tallies and histograms.
//! - [`scan`]: the operator waits for the placed orders to leave `pending`, then reads every
//!   order of the campaign back.
//! - [`checks`]: the stock invariants and the per-user limit, judged from what the API shows.
//! - [`report`]: the [`Report`], for people ([`std::fmt::Display`]) or machines (JSON).
//!
//! [`run`] is the whole of it without the command line, so tests call it directly. Errors are
//! `anyhow` with the URL and the step that failed: this is a client program whose errors only
//! ever reach the person running it.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use ulid::Ulid;

mod api;
pub mod checks;
mod drive;
pub mod report;
mod scan;
mod setup;

pub use api::{Order, OrderPage, OrderStatus, Stock};
pub use report::Report;

use crate::routes::orders::PREFER_WAIT_MAX_SECONDS;

/// Customers one run registers at most: each costs a request and a token held in memory.
pub const CUSTOMERS_MAX: u32 = 10_000;
/// Connections (and so concurrent requests) one run opens at most.
pub const CONNECTIONS_MAX: u32 = 1_024;
/// The fastest fixed schedule, in orders a second.
pub const RATE_MAX_PER_S: u32 = 100_000;
/// The longest load, in seconds.
pub const DURATION_MAX_S: u64 = 3_600;
/// The longest wait for orders to leave `pending` after the load, in seconds.
pub const DRAIN_MAX_S: u64 = 3_600;
/// Orders one run places at most, whatever the rate and duration: every accepted order's id
/// is kept until the scan, so this bounds the memory a run takes.
pub const ORDERS_MAX: u64 = 2_000_000;
/// How long a request may take, in seconds, on top of the `Prefer: wait` it asks for.
pub const REQUEST_TIMEOUT_S: u64 = 30;
/// How long opening a connection may take, in seconds.
const CONNECT_TIMEOUT_S: u64 = 5;

/// Flags of `groupbuy loadgen`. Only the operator token is also read from the environment:
/// it is a secret, better kept off the command line.
#[derive(Args, Clone)]
pub struct LoadgenArgs {
    /// The deployment's base URL (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base_url: reqwest::Url,
    /// Other instances of the same deployment to place orders on as well (repeat the flag):
    /// the connections are spread over `--base-url` and these. They must share the token
    /// secret (`GROUPBUY_TOKEN_SECRET`), so the customers' tokens work on each.
    #[arg(long = "also-base-url")]
    pub also_base_urls: Vec<reqwest::Url>,
    /// The operator's bearer token: it sets up the sale and reads every order back.
    #[arg(long, env = "GROUPBUY_OPERATOR_TOKEN", hide_env_values = true)]
    pub operator_token: String,
    /// Order from this existing campaign instead of creating one.
    #[arg(long)]
    pub campaign: Option<Ulid>,
    /// Units of the campaign this run creates.
    #[arg(long, default_value_t = 1_000_000)]
    pub quota: u32,
    /// The most units one customer may hold, in the campaign this run creates.
    #[arg(long, default_value_t = 10_000)]
    pub per_user_limit: u32,
    /// The unit price of the campaign this run creates, in cents.
    #[arg(long, default_value_t = 1_250)]
    pub price_cents: u64,
    /// How long customers have to pay, in the campaign this run creates.
    #[arg(long, default_value_t = 600)]
    pub payment_timeout_seconds: u32,
    /// How many stock buckets the campaign this run creates spreads its units over: about as
    /// many as instances that take its orders.
    #[arg(long, default_value_t = 1)]
    pub stock_buckets: u32,
    /// Customers to register; orders are spread evenly over them.
    #[arg(long, default_value_t = 200)]
    pub customers: u32,
    /// Connections, and so requests in flight at most.
    #[arg(long, default_value_t = 64)]
    pub connections: u32,
    /// Orders a second on a fixed schedule; 0: as fast as the connections allow.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Seconds to place orders for.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Units per order.
    #[arg(long, default_value_t = 1)]
    pub quantity: u32,
    /// Send `Prefer: wait=N` with every order, so its answer shows the stock decision; 0: no.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// Seconds to wait after the load for every order to leave `pending`.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// No progress on standard error.
    #[arg(long)]
    pub quiet: bool,
}

impl LoadgenArgs {
    /// Why these flags cannot make a run; `None` when they can.
    fn problem(&self) -> Option<String> {
        for url in std::iter::once(&self.base_url).chain(&self.also_base_urls) {
            let scheme = url.scheme();
            if scheme != "http" {
                return Some(format!(
                    "{url}: only http URLs are supported, not {scheme}: the load generator is built without TLS"
                ));
            }
        }
        let ranges: [(&str, u64, u64, u64); 7] = [
            (
                "--customers",
                self.customers.into(),
                1,
                CUSTOMERS_MAX.into(),
            ),
            (
                "--connections",
                self.connections.into(),
                1,
                CONNECTIONS_MAX.into(),
            ),
            ("--rate", self.rate.into(), 0, RATE_MAX_PER_S.into()),
            ("--duration", self.duration, 1, DURATION_MAX_S),
            (
                "--quantity",
                self.quantity.into(),
                1,
                domain::limits::ORDER_QUANTITY_UNITS_MAX.into(),
            ),
            ("--wait", self.wait, 0, PREFER_WAIT_MAX_SECONDS),
            ("--drain-seconds", self.drain_seconds, 0, DRAIN_MAX_S),
        ];
        ranges
            .into_iter()
            .find(|(_, value, low, high)| !(low..=high).contains(&value))
            .map(|(flag, value, low, high)| {
                format!("{flag} {value} is out of range: {low} to {high}")
            })
    }

    /// How long one request may take before it counts as a timeout.
    fn request_timeout(&self) -> Duration {
        Duration::from_secs(REQUEST_TIMEOUT_S + self.wait)
    }

    /// Whether progress goes to standard error: not for machines, and not into a file.
    fn shows_progress(&self) -> bool {
        !self.json && !self.quiet && std::io::stderr().is_terminal()
    }
}

/// Runs a whole load: set up, drive, drain, scan, check. The report says what happened;
/// `Err` only when the run could not be made (a bad flag, an unreachable server, a wrong
/// token, an answer that breaks the contract).
pub async fn run(args: LoadgenArgs) -> anyhow::Result<Report> {
    if let Some(problem) = args.problem() {
        bail!(problem);
    }
    let api = api::Api::new(&args)?;
    let progress = args.shows_progress();
    let sale = setup::sale(&api, &args, progress).await?;
    let load = drive::drive(&api, &args, &sale, progress).await?;
    let pending_at_load_end = scan::pending_of(&api, sale.campaign_id(), &load.placed)
        .await
        .context("counting the orders still pending when the load ended")?;
    let drain = scan::drain(
        &api,
        sale.campaign_id(),
        Duration::from_secs(args.drain_seconds),
        progress,
    )
    .await
    .context("waiting for the orders to leave pending")?;
    let pending_after_drain = scan::pending_of(&api, sale.campaign_id(), &load.placed)
        .await
        .context("counting the orders still pending after the drain")?;
    let snapshot = scan::settled(&api, &sale, &load.placed, pending_after_drain == 0)
        .await
        .context("reading the campaign and its orders back")?;
    Ok(Report::new(
        &args,
        &sale,
        load,
        report::Pending {
            at_load_end: pending_at_load_end,
            after_drain: pending_after_drain,
            drain,
        },
        snapshot,
    ))
}

/// Runs `groupbuy loadgen`: the load, then the report on standard output. Returns whether
/// every check passed.
pub async fn command(args: LoadgenArgs) -> anyhow::Result<bool> {
    let json = args.json;
    let report = run(args).await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report always serialises")
        );
    } else {
        print!("{report}");
    }
    Ok(report.ok)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    fn problem(flags: &[&str]) -> Option<String> {
        let all = ["loadgen", "--operator-token", "t"].iter().chain(flags);
        Flags::try_parse_from(all)
            .expect("the flags parse")
            .args
            .problem()
    }

    #[test]
    fn the_defaults_make_a_run() {
        assert_eq!(problem(&[]), None);
    }

    #[test]
    fn flags_past_their_limits_are_refused_by_name() {
        assert_eq!(
            problem(&["--connections", "5000"]).as_deref(),
            Some("--connections 5000 is out of range: 1 to 1024")
        );
        assert_eq!(
            problem(&["--customers", "0"]).as_deref(),
            Some("--customers 0 is out of range: 1 to 10000")
        );
        assert!(problem(&["--wait", "21"]).is_some());
        assert!(problem(&["--duration", "0"]).is_some());
        assert!(problem(&["--quantity", "10001"]).is_some());
    }

    #[test]
    fn only_plain_http_is_spoken() {
        let problem = problem(&["--base-url", "https://shop.example"]).expect("refused");
        assert!(problem.contains("only http URLs"), "{problem}");
    }
}
