//! Operating the binary: configuration layers, profiles, and secrets kept out of logs.
//!
//! A test binary of its own: its tests change the process's environment and install a global
//! log subscriber, which the other tests must not share. Tests that touch the environment take
//! [`ENV`] first.

use std::io::Write;
use std::sync::Mutex;

use clap::Parser;
use gateway::cli::{Cli, Command};
use harness::process::Captured;
use harness::{expect_json, Backend, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::json;

static ENV: Mutex<()> = Mutex::new(());

fn serve_args(args: &[&str]) -> gateway::cli::ServeArgs {
    let cli = Cli::try_parse_from(["groupbuy", "serve"].iter().chain(args)).unwrap();
    match cli.command {
        Command::Serve(args) => *args,
        _ => unreachable!("parsed serve"),
    }
}

#[test]
fn a_file_sits_under_the_environment_and_flags_over_both() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    let dir = std::env::temp_dir().join(format!("groupbuy-config-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("groupbuy.env");
    let mut file = std::fs::File::create(&path).unwrap();
    writeln!(file, "# a comment, then a blank line\n").unwrap();
    writeln!(file, "GROUPBUY_HTTP_ADDR=127.0.0.1:7001").unwrap();
    writeln!(file, "GROUPBUY_NATS_PREFIX = from-file").unwrap();
    writeln!(file, "GROUPBUY_REDIS_PREFIX=from-file").unwrap();
    drop(file);
    std::env::set_var("GROUPBUY_NATS_PREFIX", "from-env");
    std::env::remove_var("GROUPBUY_HTTP_ADDR");
    std::env::remove_var("GROUPBUY_REDIS_PREFIX");

    let args = ["--config".into(), path.clone().into_os_string()];
    assert_eq!(gateway::config::file_from(args), Some(path.clone()));
    let applied = gateway::config::apply(&path).unwrap();
    assert_eq!(applied, ["GROUPBUY_HTTP_ADDR", "GROUPBUY_REDIS_PREFIX"]);

    let from_layers = serve_args(&[]);
    assert_eq!(
        from_layers.http_addr.to_string(),
        "127.0.0.1:7001",
        "the file"
    );
    assert_eq!(
        from_layers.nats_prefix, "from-env",
        "the environment over the file"
    );
    let flagged = serve_args(&["--redis-prefix", "from-flag"]);
    assert_eq!(flagged.redis_prefix, "from-flag", "a flag over both");
    assert_eq!(
        serve_args(&[]).simulated_payment_delay_ms,
        500,
        "the default under all"
    );

    for name in [
        "GROUPBUY_HTTP_ADDR",
        "GROUPBUY_NATS_PREFIX",
        "GROUPBUY_REDIS_PREFIX",
    ] {
        std::env::remove_var(name);
    }
    std::fs::write(&path, "GROUPBUY_HTTP_ADDR=1\nGROUPBUY_HTTP_ADRR=2\n").unwrap();
    let typo = gateway::config::apply(&path).unwrap_err().to_string();
    assert!(
        typo.contains(":2: GROUPBUY_HTTP_ADRR is not a groupbuy setting"),
        "{typo}"
    );
    std::fs::write(&path, "just words\n").unwrap();
    assert!(gateway::config::read(&path).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_relay_lingers_longer_on_nats_than_embedded_unless_told() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    for name in ["NATS_URL", "GROUPBUY_RELAY_LINGER_MS"] {
        std::env::remove_var(name);
    }
    let token = ["--operator-token", "an-operator-token-of-length"];
    let linger = |args: &[&str]| {
        let args: Vec<&str> = token.iter().chain(args).copied().collect();
        serve_args(&args).settings().relay.linger.as_millis()
    };
    let nats = ["--nats-url", "nats://127.0.0.1:4222"];
    assert_eq!(linger(&[]), 5, "the embedded bus's messages cost little");
    assert_eq!(linger(&nats), 20, "fuller JetStream messages pay");
    let told: Vec<&str> = nats
        .iter()
        .chain(&["--relay-linger-ms", "0"])
        .copied()
        .collect();
    assert_eq!(linger(&told), 0);
    assert!(
        Cli::try_parse_from(["groupbuy", "serve", "--relay-linger-ms", "1001"]).is_err(),
        "past a second is refused"
    );
}

#[test]
fn the_prod_profile_refuses_default_empty_short_and_example_secrets() {
    let _env = ENV.lock().unwrap_or_else(|p| p.into_inner());
    for name in [
        "GROUPBUY_OPERATOR_TOKEN",
        "GROUPBUY_TOKEN_SECRET",
        "GROUPBUY_PAYMENT_WEBHOOK_SECRET",
        "GROUPBUY_PAYMENT_PROVIDER",
        "DATABASE_URL",
        "NATS_URL",
        "REDIS_URL",
        "GROUPBUY_PROFILE",
    ] {
        std::env::remove_var(name);
    }
    let services = [
        "--database-url",
        "postgres://db/groupbuy",
        "--nats-url",
        "nats://nats:4222",
        "--redis-url",
        "redis://redis:6379",
        "--payment-provider",
        "external",
    ];
    let good = "a-long-random-secret-0123456789";
    let with = |operator: Option<&str>, token: &str, webhook: &str| {
        let mut args: Vec<&str> = vec!["--profile", "prod"];
        args.extend(services);
        if let Some(operator) = operator {
            args.extend(["--operator-token", operator]);
        }
        args.extend(["--token-secret", token, "--webhook-secret", webhook]);
        serve_args(&args).profile_problem()
    };
    assert_eq!(
        with(Some(good), good, good),
        None,
        "a proper prod configuration starts"
    );
    let unset = with(None, good, good).expect("refused");
    assert!(
        unset.contains("GROUPBUY_OPERATOR_TOKEN must be set"),
        "{unset}"
    );
    let empty = with(Some(good), "  ", good).expect("refused");
    assert!(
        empty.contains("GROUPBUY_TOKEN_SECRET must be set"),
        "{empty}"
    );
    let short = with(Some(good), good, "short").expect("refused");
    assert!(
        short.contains("GROUPBUY_PAYMENT_WEBHOOK_SECRET is too short"),
        "{short}"
    );
    let example = with(Some("test-operator-token"), good, good).expect("refused");
    assert!(example.contains("example value"), "{example}");

    let embedded = serve_args(&[
        "--profile",
        "prod",
        "--operator-token",
        good,
        "--token-secret",
        good,
        "--webhook-secret",
        good,
        "--payment-provider",
        "external",
    ])
    .profile_problem()
    .expect("refused");
    assert!(
        embedded.contains("DATABASE_URL, NATS_URL, REDIS_URL"),
        "{embedded}"
    );
    let simulated = serve_args(&["--profile", "prod"])
        .profile_problem()
        .expect("refused");
    assert!(
        simulated.contains("GROUPBUY_PAYMENT_PROVIDER=external"),
        "{simulated}"
    );
    assert_eq!(
        serve_args(&[]).profile_problem(),
        None,
        "dev takes anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    const OPERATOR: &str = "canary-operator-7f3a9c1e5b";
    const TOKENS: &str = "canary-token-secret-2d8e4b6a";
    const WEBHOOK: &str = "canary-webhook-secret-9c1f3e7d";
    let captured = Captured::default();
    let writer = captured.clone();
    // The binary's own log setup, writing here.
    let _telemetry = gateway::telemetry::install(
        gateway::cli::LogFormat::Json,
        None,
        "debug",
        false,
        move || writer.clone(),
    )
    .expect("the first subscriber of this process");

    // What serve logs at start, through the same code.
    let args = serve_args(&[
        "--operator-token",
        OPERATOR,
        "--token-secret",
        TOKENS,
        "--webhook-secret",
        WEBHOOK,
    ]);
    let settings = args.settings();
    tracing::info!(?settings, "starting");

    let app = harness::spawn_app_tuned(Backend::Postgres, |s| {
        s.operator_token = OPERATOR.into();
        s.token_secret = TOKENS.as_bytes().to_vec();
        s.webhook_secret = WEBHOOK.as_bytes().to_vec();
    })
    .await;
    let user = expect_json(
        app.post("/v1/users", OPERATOR, None, &json!({"name": "Ada"}))
            .await,
        StatusCode::CREATED,
    )
    .await;
    let customer = user["token"].as_str().unwrap().to_owned();
    let store = expect_json(
        app.post(
            "/v1/stores",
            OPERATOR,
            None,
            &json!({"name": "Cellar", "region": "north"}),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let now = chrono::Utc::now();
    let campaign = expect_json(
        app.post(
            "/v1/campaigns",
            OPERATOR,
            None,
            &json!({
                "store_id": store["store_id"], "sku": "ALE", "title": "Ale",
                "price_cents": 700, "quota": 10, "per_user_limit": 2,
                "starts_at": now - chrono::Duration::minutes(1),
                "ends_at": now + chrono::Duration::hours(1),
                "payment_timeout_seconds": 600,
            }),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let key = ulid::Ulid::new().to_string();
    let order = expect_json(
        app.post(
            "/v1/orders",
            &customer,
            Some(&key),
            &json!({"campaign_id": campaign["campaign_id"], "quantity": 1}),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    let order_id = order["order_id"].as_str().unwrap();
    let order = app
        .wait_for_status(&customer, order_id, "awaiting_payment")
        .await;
    let answer = json!({
        "payment_id": order["payment"]["payment_id"],
        "status": "succeeded",
        "provider_reference": "psp-1",
    });
    let t = now.timestamp();
    // A forged signature, then the real one.
    let forged = app.webhook(&answer, t, b"not-the-secret").await;
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    let paid = app.webhook(&answer, t, WEBHOOK.as_bytes()).await;
    assert_eq!(paid.status(), StatusCode::OK);
    app.wait_for_status(&customer, order_id, "confirmed").await;
    // Wrong tokens, the operator's endpoints, the probes.
    assert_eq!(
        app.get("/v1/orders", &format!("{customer}x"))
            .await
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.get("/v1/orders", OPERATOR_TOKEN).await.status(),
        StatusCode::UNAUTHORIZED
    );
    for path in [
        "/v1/admin/projections",
        "/v1/admin/audit",
        "/readyz",
        "/metrics",
    ] {
        assert_eq!(
            app.get(path, OPERATOR).await.status(),
            StatusCode::OK,
            "{path}"
        );
    }
    app.stop().await;

    let logs = captured.text();
    assert!(
        logs.lines().count() > 20,
        "the run logged: {} lines",
        logs.lines().count()
    );
    assert!(logs.contains("starting"), "the start-up line was captured");
    for secret in [OPERATOR, TOKENS, WEBHOOK, customer.as_str()] {
        let leaked: Vec<&str> = logs.lines().filter(|l| l.contains(secret)).collect();
        assert!(leaked.is_empty(), "a secret reached the logs: {leaked:?}");
    }
}

#[test]
fn the_command_line_names_its_build_completes_itself_and_rebuilds_everything() {
    // The version names the commit the binary was built from.
    let version = Cli::try_parse_from(["groupbuy", "--version"])
        .err()
        .unwrap()
        .to_string();
    assert!(version.contains(gateway::cli::VERSION), "{version}");
    let commit = gateway::cli::VERSION.split(['(', ')']).nth(1).unwrap();
    assert!(
        commit == "unknown" || commit.trim_end_matches("-modified").len() == 12,
        "{commit}"
    );
    // Completions know the subcommands.
    let bash = String::from_utf8(gateway::cli::completions(clap_complete::Shell::Bash)).unwrap();
    assert!(bash.contains("_groupbuy") && bash.contains("projections") && bash.contains("events"));
    // Rebuild one read model or all of them, not both and not neither.
    let stores = [
        "--database-url",
        "postgres://db/x",
        "--redis-url",
        "redis://r",
    ];
    let rebuild = |args: &[&str]| {
        let argv = ["groupbuy", "projections", "rebuild"]
            .iter()
            .chain(args)
            .chain(&stores);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Projections(gateway::cli::ProjectionsCommand::Rebuild(args)) => {
                (args.name.map(|n| n.as_str()), args.all)
            }
            _ => unreachable!("parsed a rebuild"),
        })
    };
    assert_eq!(rebuild(&["--all"]).unwrap(), (None, true));
    assert_eq!(rebuild(&["orders"]).unwrap(), (Some("orders"), false));
    assert!(rebuild(&[]).is_err());
    assert!(rebuild(&["orders", "--all"]).is_err());
}

#[tokio::test]
async fn unreachable_services_are_named_with_their_address_and_cause_once() {
    use commands::log::postgres::{PgEventLog, PgLogOptions};
    let port = harness::process::free_port();
    let url = format!("postgres://postgres:secret-password@127.0.0.1:{port}/groupbuy");
    let error = PgEventLog::connect(&url, &PgLogOptions::default())
        .await
        .err()
        .expect("nothing listens there")
        .to_string();
    assert!(
        error.contains(&format!("PostgreSQL at 127.0.0.1:{port}"))
            && error.to_lowercase().contains("refused")
            && !error.contains("secret-password"),
        "{error}"
    );
    let redis = format!("redis://:secret-password@127.0.0.1:{port}");
    let error = projections::RedisProjections::connect(&redis, "groupbuy")
        .await
        .err()
        .expect("nothing listens there")
        .to_string();
    assert!(
        error.contains(&format!("Redis at 127.0.0.1:{port}"))
            && error.to_lowercase().contains("refused")
            && !error.contains("secret-password"),
        "{error}"
    );
    // The layers of an error that repeat their cause are printed once.
    let chain = [
        "event log: database error: pool timed out".to_owned(),
        "database error: pool timed out".to_owned(),
        "pool timed out".to_owned(),
        "while connecting to 10.0.0.1:5432".to_owned(),
    ];
    assert_eq!(
        gateway::cli::error_chain(&chain),
        "event log: database error: pool timed out: while connecting to 10.0.0.1:5432"
    );
}
