//! What a run found: rates, latencies, answers, and the checks; for people and for machines.
//!
//! Client-side numbers (sent, accepted, the accept latency, the decide latency of waited
//! answers) are measured by this process. Decisions and confirmations are read from the
//! orders' `created_at` and `updated_at`, which the server stamps with one clock: no clock of
//! ours is compared with the server's.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use ulid::Ulid;

use super::api::{Order, OrderStatus, Stock};
use super::checks::{self, Check};
use super::drive::{self, Latencies, Load};
use super::scan::Snapshot;
use super::setup::Sale;
use super::LoadgenArgs;

/// How many orders were pending, and how long the drain took.
pub struct Pending {
    /// This run's orders pending right after the load.
    pub at_load_end: u64,
    /// This run's orders pending after the drain.
    pub after_drain: u64,
    /// How long the drain waited.
    pub drain: Duration,
}

/// Everything a run found. `--json` prints it as is.
#[derive(Debug, Serialize)]
pub struct Report {
    /// What was run, against what.
    pub config: Config,
    /// From the first order due to the last answer, in seconds.
    pub load_s: f64,
    /// Whether the load stopped at [`super::ORDERS_MAX`] orders before its duration.
    pub capped_at_orders_max: bool,
    /// Orders sent.
    pub orders_sent: u64,
    /// Orders answered 202.
    pub accepted: u64,
    /// Accepted orders a second over the load.
    pub accepted_per_s: f64,
    /// This run's orders that left `pending`.
    pub decided: u64,
    /// Decided orders a second, from the first placement to the last decision (server
    /// clock). An order that has moved past its decision (confirmed, cancelled) counts at its
    /// last change, so this is a lower bound when there are such orders. `None` with no
    /// decided order.
    pub decided_per_s: Option<f64>,
    /// Decided orders whose last change was the decision (awaiting payment or rejected): for
    /// these `updated_at` is the decision time; the others have moved on since.
    pub decided_at_last_change: u64,
    /// This run's confirmed orders.
    pub confirmed: u64,
    /// Confirmed orders a second, from the first placement to the last confirmation.
    pub confirmed_per_s: Option<f64>,
    /// This run's orders still pending when the load ended.
    pub pending_at_load_end: u64,
    /// This run's orders still pending after the drain.
    pub pending_after_drain: u64,
    /// How long the drain waited, in seconds.
    pub drain_s: f64,
    /// This run's orders by status and reason, as listed after the drain.
    pub statuses: Vec<StatusCount>,
    /// Answers to `POST /v1/orders` by HTTP status and problem code.
    pub answers: Vec<AnswerCount>,
    /// Orders that got no readable answer, by kind (`timeout`, `connect`, ...).
    pub transport_errors: BTreeMap<&'static str, u64>,
    /// The latency histograms.
    pub latency: LatencyReport,
    /// The campaign's stock after the drain.
    pub stock: Stock,
    /// The invariants, checked through the API.
    pub checks: Vec<Check>,
    /// Whether no check failed.
    pub ok: bool,
}

/// What was run, against what.
#[derive(Debug, Serialize)]
pub struct Config {
    /// The deployment.
    pub base_url: String,
    /// The campaign ordered from.
    pub campaign_id: Ulid,
    /// Whether this run created it.
    pub campaign_created: bool,
    /// Its status before the load (`open`, or why every order was rejected).
    pub campaign_status: String,
    /// The campaign's most units per customer.
    pub per_user_limit: u32,
    /// Customers registered.
    pub customers: u32,
    /// Connections (requests in flight at most).
    pub connections: u32,
    /// Orders a second on a fixed schedule; 0: as fast as possible.
    pub rate_per_s: u32,
    /// How long orders were placed for, in seconds.
    pub duration_s: u64,
    /// Units per order.
    pub quantity: u32,
    /// The `Prefer: wait` sent, in seconds; 0: none.
    pub wait_s: u64,
    /// The longest the drain could wait, in seconds.
    pub drain_max_s: u64,
}

/// Orders in one status (and reason).
#[derive(Debug, Serialize)]
pub struct StatusCount {
    /// The status.
    pub status: OrderStatus,
    /// Why, for rejected and cancelled orders.
    pub reason: Option<String>,
    /// How many.
    pub count: u64,
}

/// Answers of one HTTP status (and problem code).
#[derive(Debug, Serialize)]
pub struct AnswerCount {
    /// The HTTP status.
    pub status: u16,
    /// The problem's `code`, for problem+json answers.
    pub code: Option<String>,
    /// How many.
    pub count: u64,
}

/// The latency histograms, summarised.
#[derive(Debug, Serialize)]
pub struct LatencyReport {
    /// From an order due to its 202 answer (client clock).
    pub accept: Summary,
    /// From an order due to a waited answer that was no longer pending (client clock); `None`
    /// without `--wait`.
    pub decide_client: Option<Summary>,
    /// From `created_at` to `updated_at` of the orders awaiting payment or rejected (server
    /// clock).
    pub decide_server: Summary,
    /// From `created_at` to `updated_at` of the confirmed orders (server clock).
    pub confirm_server: Summary,
    /// From a 202 to the order's showing in the orders read model, for the newest accepted
    /// order every 250 ms of the load (client clock): how far the read model is behind. A
    /// sample not shown when the load's time is up counts as its wait until then.
    pub shown: Summary,
}

/// One histogram, summarised.
#[derive(Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// The percentiles; absent when nothing was recorded.
    #[serde(flatten)]
    pub ms: Option<Percentiles>,
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p99_9_ms: f64,
    /// The largest value.
    pub max_ms: f64,
}

impl Summary {
    /// The summary of a histogram of microseconds.
    pub fn of(histogram: &Latencies) -> Summary {
        let ms = |us: u64| us as f64 / 1_000.0;
        Summary {
            count: histogram.len(),
            ms: (!histogram.is_empty()).then(|| Percentiles {
                p50_ms: ms(histogram.value_at_quantile(0.5)),
                p90_ms: ms(histogram.value_at_quantile(0.9)),
                p99_ms: ms(histogram.value_at_quantile(0.99)),
                p99_9_ms: ms(histogram.value_at_quantile(0.999)),
                max_ms: ms(histogram.max()),
            }),
        }
    }
}

/// What the orders' server-side timestamps say.
pub struct Decisions {
    /// Orders no longer pending.
    pub decided: u64,
    /// Confirmed orders.
    pub confirmed: u64,
    /// Decided orders a second (see [`Report::decided_per_s`]).
    pub decided_per_s: Option<f64>,
    /// Confirmed orders a second.
    pub confirmed_per_s: Option<f64>,
    /// Decide latencies of the orders whose last change was the decision.
    pub decide: Latencies,
    /// Confirm latencies.
    pub confirm: Latencies,
    /// Orders by status and reason.
    pub statuses: BTreeMap<(OrderStatus, Option<String>), u64>,
}

/// Reads decisions, confirmations and their latencies off the orders' timestamps.
pub fn decisions(orders: &[Order]) -> Decisions {
    let mut decide = drive::latencies();
    let mut confirm = drive::latencies();
    let mut statuses: BTreeMap<(OrderStatus, Option<String>), u64> = BTreeMap::new();
    let first_placed = orders.iter().map(|o| o.created_at).min();
    let (mut decided, mut confirmed) = (0, 0);
    let (mut last_decided, mut last_confirmed) = (None, None);
    for order in orders {
        *statuses
            .entry((order.status, order.reason.clone()))
            .or_default() += 1;
        // `updated_at` never goes back on the server; a negative span would be its bug, and
        // is counted as no time rather than dropped.
        let took = (order.updated_at - order.created_at)
            .to_std()
            .unwrap_or_default();
        if order.status == OrderStatus::Pending {
            continue;
        }
        decided += 1;
        last_decided = last_decided.max(Some(order.updated_at));
        match order.status {
            OrderStatus::AwaitingPayment | OrderStatus::Rejected => {
                drive::record(&mut decide, took)
            }
            OrderStatus::Confirmed => {
                confirmed += 1;
                last_confirmed = last_confirmed.max(Some(order.updated_at));
                drive::record(&mut confirm, took);
            }
            _ => {}
        }
    }
    Decisions {
        decided,
        confirmed,
        decided_per_s: first_placed.and_then(|from| per_second(decided, from, last_decided)),
        confirmed_per_s: first_placed.and_then(|from| per_second(confirmed, from, last_confirmed)),
        decide,
        confirm,
        statuses,
    }
}

/// `count` over the time from `from` to `to`; `None` when there is nothing to divide.
fn per_second(count: u64, from: DateTime<Utc>, to: Option<DateTime<Utc>>) -> Option<f64> {
    let seconds = (to? - from).to_std().ok()?.as_secs_f64();
    (count > 0 && seconds > 0.0).then(|| count as f64 / seconds)
}

impl Report {
    /// Puts a run's parts together.
    pub(super) fn new(
        args: &LoadgenArgs,
        sale: &Sale,
        load: Load,
        pending: Pending,
        snapshot: Snapshot,
    ) -> Report {
        let decisions = decisions(&snapshot.orders);
        let tally = load.tally;
        let accepted = load.placed.len() as u64;
        let ok = checks::all_hold(&snapshot.checks);
        Report {
            config: Config {
                base_url: args.base_url.to_string(),
                campaign_id: sale.campaign_id(),
                campaign_created: sale.created,
                campaign_status: sale.campaign.status.clone(),
                per_user_limit: snapshot.campaign.per_user_limit,
                customers: args.customers,
                connections: args.connections,
                rate_per_s: args.rate,
                duration_s: args.duration,
                quantity: args.quantity,
                wait_s: args.wait,
                drain_max_s: args.drain_seconds,
            },
            load_s: load.elapsed.as_secs_f64(),
            capped_at_orders_max: load.capped,
            orders_sent: tally.sent,
            accepted,
            accepted_per_s: accepted as f64 / load.elapsed.as_secs_f64().max(1e-9),
            decided: decisions.decided,
            decided_per_s: decisions.decided_per_s,
            decided_at_last_change: decisions.decide.len(),
            confirmed: decisions.confirmed,
            confirmed_per_s: decisions.confirmed_per_s,
            pending_at_load_end: pending.at_load_end,
            pending_after_drain: pending.after_drain,
            drain_s: pending.drain.as_secs_f64(),
            statuses: decisions
                .statuses
                .into_iter()
                .map(|((status, reason), count)| StatusCount {
                    status,
                    reason,
                    count,
                })
                .collect(),
            answers: tally
                .answers
                .into_iter()
                .map(|((status, code), count)| AnswerCount {
                    status,
                    code,
                    count,
                })
                .collect(),
            transport_errors: tally.transport_errors,
            latency: LatencyReport {
                accept: Summary::of(&tally.accept),
                decide_client: (args.wait > 0).then(|| Summary::of(&tally.decide)),
                decide_server: Summary::of(&decisions.decide),
                confirm_server: Summary::of(&decisions.confirm),
                shown: Summary::of(&load.shown),
            },
            stock: snapshot.campaign.stock,
            checks: snapshot.checks,
            ok,
        }
    }
}

/// A rate for people: one decimal, or `-` when there is none.
fn rate(per_s: Option<f64>) -> String {
    per_s.map_or_else(|| "-".to_owned(), |r| format!("{r:.1}/s"))
}

impl fmt::Display for Summary {
    /// `count p50 p90 p99 p99.9 max`, in milliseconds with three decimals (microseconds), in
    /// the columns of the latency table's header.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>9}", self.count)?;
        match &self.ms {
            Some(p) => {
                for ms in [p.p50_ms, p.p90_ms, p.p99_ms, p.p99_9_ms, p.max_ms] {
                    write!(f, " {ms:>10.3}")?;
                }
                Ok(())
            }
            None => write!(f, " {:>10}", "-"),
        }
    }
}

/// The header of the latency table.
const LATENCY_HEADER: &str =
    "latency (ms)                count        p50        p90        p99      p99.9        max";

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "groupbuy loadgen against {}, campaign {} ({}, {}; at most {} units per customer)",
            c.base_url,
            c.campaign_id,
            c.campaign_status,
            if c.campaign_created {
                "created by this run"
            } else {
                "an existing one"
            },
            c.per_user_limit,
        )?;
        writeln!(
            f,
            "{} customers, {} connections, {}, {} s, quantity {} per order, {}",
            c.customers,
            c.connections,
            match c.rate_per_s {
                0 => "as fast as the connections allow".to_owned(),
                r => format!("{r} orders/s on a fixed schedule"),
            },
            c.duration_s,
            c.quantity,
            match c.wait_s {
                0 => "no Prefer: wait".to_owned(),
                w => format!("Prefer: wait={w}"),
            },
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "load       {} orders sent in {:.2} s, {} accepted ({:.1}/s){}",
            self.orders_sent,
            self.load_s,
            self.accepted,
            self.accepted_per_s,
            if self.capped_at_orders_max {
                format!("; stopped at the cap of {} orders", super::ORDERS_MAX)
            } else {
                String::new()
            },
        )?;
        writeln!(
            f,
            "decided    {} ({}{}), confirmed {} ({}), by the server's clock",
            self.decided,
            rate(self.decided_per_s),
            if self.decided > self.decided_at_last_change {
                ", a lower bound: orders past their decision count at their last change"
            } else {
                ""
            },
            self.confirmed,
            rate(self.confirmed_per_s),
        )?;
        writeln!(
            f,
            "pending    {} when the load ended, {} after draining for {:.1} s",
            self.pending_at_load_end, self.pending_after_drain, self.drain_s,
        )?;
        writeln!(f)?;
        writeln!(f, "orders by status")?;
        for s in &self.statuses {
            let name = match &s.reason {
                Some(reason) => format!("{} {reason}", s.status.as_str()),
                None => s.status.as_str().to_owned(),
            };
            writeln!(f, "  {name:<34} {:>9}", s.count)?;
        }
        writeln!(f, "answers to POST /v1/orders")?;
        for a in &self.answers {
            let name = match &a.code {
                Some(code) => format!("{} {code}", a.status),
                None => a.status.to_string(),
            };
            writeln!(f, "  {name:<34} {:>9}", a.count)?;
        }
        if self.transport_errors.is_empty() {
            writeln!(f, "transport errors: none")?;
        } else {
            writeln!(f, "transport errors")?;
            for (kind, count) in &self.transport_errors {
                writeln!(f, "  {kind:<34} {count:>9}")?;
            }
        }
        writeln!(f)?;
        writeln!(f, "{LATENCY_HEADER}")?;
        let l = &self.latency;
        writeln!(f, "  accept (client)     {}", l.accept)?;
        match &l.decide_client {
            Some(decide) => writeln!(f, "  decide (client)     {decide}")?,
            None => writeln!(f, "  decide (client)     {:>9} (only with --wait)", "-")?,
        }
        writeln!(f, "  decide (server)     {}", l.decide_server)?;
        writeln!(f, "  confirm (server)    {}", l.confirm_server)?;
        writeln!(f, "  shown (sampled)     {}", l.shown)?;
        writeln!(f)?;
        let s = &self.stock;
        writeln!(
            f,
            "stock      {} in total: {} available, {} reserved, {} sold",
            s.total, s.available, s.reserved, s.sold
        )?;
        writeln!(f, "checks")?;
        for check in &self.checks {
            writeln!(f, "  {:<8} {}: {}", check.outcome, check.name, check.detail)?;
        }
        writeln!(f, "{}", if self.ok { "OK" } else { "FAILED" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: OrderStatus, reason: Option<&str>, placed_ms: i64, changed_ms: i64) -> Order {
        let epoch = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        Order {
            order_id: Ulid::new(),
            user_id: Ulid::new(),
            quantity: 1,
            status,
            reason: reason.map(str::to_owned),
            created_at: epoch + chrono::Duration::milliseconds(placed_ms),
            updated_at: epoch + chrono::Duration::milliseconds(changed_ms),
        }
    }

    #[test]
    fn percentiles_are_milliseconds_with_microseconds_kept() {
        let mut histogram = drive::latencies();
        for us in 1..=1_000 {
            drive::record(&mut histogram, Duration::from_micros(us));
        }
        let summary = Summary::of(&histogram);
        assert_eq!(summary.count, 1_000);
        let p = summary.ms.as_ref().unwrap();
        assert_eq!(p.p50_ms, 0.5);
        assert_eq!(p.p90_ms, 0.9);
        assert_eq!(p.p99_ms, 0.99);
        assert_eq!(p.p99_9_ms, 0.999);
        assert_eq!(p.max_ms, 1.0);
        assert_eq!(
            summary.to_string(),
            "     1000      0.500      0.900      0.990      0.999      1.000"
        );
    }

    #[test]
    fn an_empty_histogram_has_no_percentiles() {
        let summary = Summary::of(&drive::latencies());
        assert_eq!(summary, Summary { count: 0, ms: None });
        assert_eq!(summary.to_string(), "        0          -");
        assert_eq!(
            serde_json::to_value(&summary).unwrap(),
            serde_json::json!({"count": 0})
        );
    }

    #[test]
    fn rates_run_from_the_first_placement_to_the_last_decision_or_confirmation() {
        let orders = [
            order(OrderStatus::AwaitingPayment, None, 0, 100),
            order(OrderStatus::Rejected, Some("sold_out"), 500, 2_000),
            order(OrderStatus::Confirmed, None, 1_000, 4_000),
            order(OrderStatus::Pending, None, 1_500, 1_500),
        ];
        let d = decisions(&orders);
        assert_eq!((d.decided, d.confirmed), (3, 1));
        // Three decided from 0 ms to 4 000 ms (the confirmed one's last change).
        assert_eq!(d.decided_per_s, Some(0.75));
        assert_eq!(d.confirmed_per_s, Some(0.25));
        // Only orders whose last change was the decision time it.
        assert_eq!(d.decide.len(), 2);
        assert_eq!(d.confirm.len(), 1);
        // 3 s, to the histogram's 0.1 %.
        let confirm_max_ms = Summary::of(&d.confirm).ms.unwrap().max_ms;
        assert!(
            (3_000.0..=3_003.0).contains(&confirm_max_ms),
            "{confirm_max_ms}"
        );
        assert_eq!(
            d.statuses,
            BTreeMap::from([
                ((OrderStatus::Pending, None), 1),
                ((OrderStatus::AwaitingPayment, None), 1),
                ((OrderStatus::Confirmed, None), 1),
                ((OrderStatus::Rejected, Some("sold_out".to_owned())), 1),
            ])
        );
    }

    #[test]
    fn with_nothing_decided_there_is_no_rate() {
        let d = decisions(&[order(OrderStatus::Pending, None, 0, 0)]);
        assert_eq!((d.decided_per_s, d.confirmed_per_s), (None, None));
        let d = decisions(&[]);
        assert_eq!((d.decided, d.decided_per_s), (0, None));
    }
}
