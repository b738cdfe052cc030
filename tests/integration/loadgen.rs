//! `groupbuy loadgen` against the real application: a short flash sale that sells out.

use clap::Parser;
use gateway::cli::{Cli, Command};
use gateway::loadgen::checks::Outcome;
use gateway::loadgen::{LoadgenArgs, OrderStatus};
use harness::{spawn_app_tuned, Backend, OPERATOR_TOKEN};

/// Units on sale: fewer than the customers want (40 customers, 2 each), so the sale sells out
/// and some orders are rejected for stock, others for the limit.
const QUOTA: i64 = 50;

/// The flags of `groupbuy loadgen <flags>`, parsed as the binary parses them.
fn loadgen_args(flags: &[&str]) -> LoadgenArgs {
    let cli =
        Cli::try_parse_from(["groupbuy", "loadgen"].iter().chain(flags)).expect("the flags parse");
    let Command::Loadgen(args) = cli.command else {
        panic!("parsed as another subcommand");
    };
    args
}

#[tokio::test]
async fn a_short_flash_sale_sells_out_and_keeps_every_invariant() {
    // The external payment provider (the harness default) leaves every order that got units
    // awaiting payment, so the reserved units can be counted exactly.
    let app = spawn_app_tuned(Backend::Embedded, |settings| {
        // Forty customers ordering back to back are far over a person's rate.
        settings.limits.rate_limits = gateway::rate_limit::RateLimits::NONE;
    })
    .await;
    let quota = QUOTA.to_string();
    let args = loadgen_args(&[
        "--base-url",
        &app.address,
        "--operator-token",
        OPERATOR_TOKEN,
        "--quota",
        &quota,
        "--per-user-limit",
        "2",
        "--customers",
        "40",
        "--connections",
        "8",
        "--duration",
        "2",
        "--drain-seconds",
        "20",
        "--quiet",
    ]);

    let report = gateway::loadgen::run(args)
        .await
        .expect("the run completes");
    let text = report.to_string();

    assert!(report.ok, "a check failed:\n{text}");
    for check in &report.checks {
        assert_eq!(check.outcome, Outcome::Ok, "{check:?}\n{text}");
    }
    assert!(
        report.accepted > QUOTA as u64 * 2,
        "too few orders to sell out:\n{text}"
    );
    assert!(report.transport_errors.is_empty(), "{text}");
    assert_eq!(report.answers.len(), 1, "only 202 answers:\n{text}");
    assert_eq!(report.answers[0].status, 202);
    assert_eq!(report.answers[0].count, report.accepted);
    assert_eq!(report.latency.accept.count, report.accepted);
    // The sampler followed orders into the read model while the load ran.
    assert!(report.latency.shown.count > 0, "{text}");
    assert!(text.contains("shown (sampled)"), "{text}");

    // Every accepted order was found in the scan, and every one was decided.
    let listed: u64 = report.statuses.iter().map(|s| s.count).sum();
    assert_eq!(report.accepted, listed, "{text}");
    assert_eq!(report.pending_after_drain, 0, "{text}");
    assert_eq!(report.decided, report.accepted, "{text}");

    // Sold out: every unit reserved, one per order awaiting payment.
    assert_eq!(report.stock.total, QUOTA);
    assert_eq!(report.stock.available, 0, "{text}");
    assert_eq!(report.stock.reserved, QUOTA, "{text}");
    assert_eq!(report.stock.sold, 0);
    let awaiting: u64 = report
        .statuses
        .iter()
        .filter(|s| s.status == OrderStatus::AwaitingPayment)
        .map(|s| s.count)
        .sum();
    assert_eq!(awaiting, QUOTA as u64, "{text}");

    // The rest were rejected, each with its reason; the stock ran out before every customer
    // reached the limit.
    let rejected: Vec<_> = report
        .statuses
        .iter()
        .filter(|s| s.status == OrderStatus::Rejected)
        .collect();
    assert_eq!(
        rejected.iter().map(|s| s.count).sum::<u64>(),
        report.accepted - QUOTA as u64,
        "{text}"
    );
    for s in &rejected {
        assert!(
            matches!(s.reason.as_deref(), Some("sold_out" | "limit_exceeded")),
            "a rejection without its reason: {s:?}"
        );
    }
    assert!(
        rejected
            .iter()
            .any(|s| s.reason.as_deref() == Some("sold_out")),
        "{text}"
    );
}

#[tokio::test]
async fn a_wrong_operator_token_is_one_clear_error_naming_the_url() {
    let app = spawn_app_tuned(Backend::Embedded, |_| {}).await;
    let args = loadgen_args(&[
        "--base-url",
        &app.address,
        "--operator-token",
        "not-the-token",
        "--quiet",
    ]);
    let error = gateway::loadgen::run(args)
        .await
        .expect_err("the run fails");
    let error = format!("{error:#}");
    assert!(
        error.contains(&format!("POST {}/v1/stores", app.address)),
        "{error}"
    );
    assert!(error.contains("401"), "{error}");
    assert!(error.contains("--operator-token"), "{error}");
}
