//! The operator's tools: the console and the endpoints behind it (a sale's stock and order
//! funnel, now and live; the relay as this process sees it), the page itself driven in a real
//! browser (Debian's Chromium, headless, over WebDriver), and the dashboards and alert rules
//! under deploy/.

use std::path::PathBuf;
use std::time::Duration;

use harness::{expect_json, expect_problem, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::order_saga::{campaign, pay, place};

on_both_backends!(
    a_customer_is_refused_by_every_operator_endpoint,
    a_sales_funnel_counts_each_order_where_it_stands,
    the_relay_says_whether_it_leads_and_how_far_behind_it_is,
    the_console_shows_a_sale_in_a_real_browser,
);

/// Every operation under `/v1/admin/` in the OpenAPI document answers a customer 403, so
/// the console (which only calls these, and the public catalog) shows a customer nothing.
async fn a_customer_is_refused_by_every_operator_endpoint(app: TestApp) {
    let (_, customer) = app.create_user("Eve").await;
    let document = app.operator_get("/openapi.json").await;
    let admin: Vec<String> = crate::contract::operations(&document)
        .into_iter()
        .filter(|operation| operation.contains(" /v1/admin/"))
        .collect();
    assert!(admin.len() >= 12, "{admin:?}");
    let ulid = ulid::Ulid::new().to_string();
    for operation in admin {
        let (method, template) = operation.split_once(' ').unwrap();
        // Ids of the right shape, so that nothing but the caller can be refused.
        let path = template
            .replace("{stream_id}", &format!("order-{ulid}"))
            .replace("{name}", "orders")
            .replace(
                "{id}",
                if template.contains("dead-letters") {
                    "1"
                } else {
                    &ulid
                },
            );
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let answer = app.send(method, &path, Some(&customer), None, None).await;
        let problem = expect_problem(answer, StatusCode::FORBIDDEN, "forbidden").await;
        assert_eq!(problem["status"], 403, "{operation}: {problem}");
    }
}

fn sale_path(campaign: &Value) -> String {
    format!(
        "/v1/admin/campaigns/{}/sale",
        campaign["campaign_id"].as_str().unwrap()
    )
}

/// A sale of 3 units, limit 2: one order paid, one refused for want of stock, one cancelled.
async fn a_sale_with_every_outcome(app: &TestApp) -> Value {
    let sale = campaign(app, 3, 2, 600).await;
    let (_, ada) = app.create_user("Ada").await;
    let (_, bob) = app.create_user("Bob").await;
    let (_, cy) = app.create_user("Cy").await;
    let paid = place(app, &ada, &sale, 2).await;
    let paid = paid["order_id"].as_str().unwrap();
    let awaiting = app.wait_for_status(&ada, paid, "awaiting_payment").await;
    pay(app, &ada, &awaiting).await;
    let cancelled = place(app, &cy, &sale, 1).await;
    let cancelled = cancelled["order_id"].as_str().unwrap();
    app.wait_for_status(&cy, cancelled, "awaiting_payment")
        .await;
    assert_eq!(
        app.cancel(&cy, cancelled).await.status(),
        StatusCode::ACCEPTED
    );
    app.wait_for_status(&cy, cancelled, "cancelled").await;
    let refused = place(app, &bob, &sale, 2).await;
    let refused = refused["order_id"].as_str().unwrap();
    app.wait_for_status(&bob, refused, "rejected").await;
    sale
}

async fn a_sales_funnel_counts_each_order_where_it_stands(app: TestApp) {
    let sale = a_sale_with_every_outcome(&app).await;
    let path = sale_path(&sale);
    let now = app
        .get_until(&path, OPERATOR_TOKEN, |s| {
            s["orders"]["placed"] == 3 && s["orders"]["pending"] == 0
        })
        .await;
    assert_eq!(
        now["orders"],
        json!({
            "placed": 3, "pending": 0, "awaiting_payment": 0, "confirmed": 1,
            "rejected": {"sold_out": 1}, "cancelled": {"customer": 1},
        }),
        "{now}"
    );
    assert_eq!(now["campaign"]["campaign_id"], sale["campaign_id"]);
    assert_eq!(
        now["campaign"]["stock"],
        json!({"total": 3, "available": 1, "reserved": 0, "sold": 2})
    );

    // Live: the same sale as Server-Sent Events, the first one at once.
    let live = app
        .get(&format!("{path}/live?interval_ms=200"), OPERATOR_TOKEN)
        .await;
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.headers()["content-type"], "text/event-stream");
    let events = first_events(live, 2).await;
    for (name, data) in &events {
        assert_eq!(name, "sale");
        assert_eq!(data["orders"], now["orders"]);
    }
    assert!(
        events[1].1["at"].as_str() > events[0].1["at"].as_str(),
        "each event carries its own time: {events:?}"
    );

    // Only the operator watches; a campaign that is not there is not found; the interval
    // is bounded.
    let (_, customer) = app.create_user("Eve").await;
    expect_problem(
        app.get(&path, &customer).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    let nowhere = format!("/v1/admin/campaigns/{}/sale", ulid::Ulid::new());
    for unknown in [nowhere.clone(), format!("{nowhere}/live")] {
        expect_problem(
            app.get(&unknown, OPERATOR_TOKEN).await,
            StatusCode::NOT_FOUND,
            "campaign_not_found",
        )
        .await;
    }
    for query in ["interval_ms=10", "interval_ms=600000", "every=1"] {
        expect_problem(
            app.get(&format!("{path}/live?{query}"), OPERATOR_TOKEN)
                .await,
            StatusCode::BAD_REQUEST,
            "invalid_query",
        )
        .await;
    }

    // A live sale never ends by itself, but it does not hold up a shutdown.
    let mut watching = app.get(&format!("{path}/live"), OPERATOR_TOKEN).await;
    assert!(watching.chunk().await.unwrap().is_some());
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the shutdown ends the live stream instead of waiting for it");
    let rest = tokio::time::timeout(Duration::from_secs(10), async {
        while watching.chunk().await.ok().flatten().is_some() {}
    });
    rest.await.expect("the stream ended");
}

/// The first `count` Server-Sent Events of `response`: their names and JSON data.
async fn first_events(mut response: reqwest::Response, count: usize) -> Vec<(String, Value)> {
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("the stream goes on");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start().to_owned())
            };
            if let (Some(name), Some(data)) = (field("event:"), field("data:")) {
                events.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}

async fn the_relay_says_whether_it_leads_and_how_far_behind_it_is(app: TestApp) {
    campaign(&app, 5, 1, 600).await;
    let relay = app
        .get_until("/v1/admin/relay", OPERATOR_TOKEN, |r| r["lag"] == 0)
        .await;
    assert_eq!(relay["role"], "leader", "{relay}");
    assert!(relay["head"].as_u64().unwrap() >= 2, "{relay}");
    assert_eq!(relay["position"], relay["head"], "{relay}");
    assert!(relay["published"].as_u64().unwrap() >= 2, "{relay}");
    let (_, customer) = app.create_user("Eve").await;
    expect_problem(
        app.get("/v1/admin/relay", &customer).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
}

/// A headless Chromium driven over WebDriver: its own chromedriver on a free port, its own
/// profile, both gone when it is dropped.
struct Browser {
    client: fantoccini::Client,
    _driver: tokio::process::Child,
    profile: PathBuf,
}

/// Where a program of Debian's Chromium packages is, or `GROUPBUY_<NAME>` says.
fn installed(program: &str) -> PathBuf {
    let variable = format!("GROUPBUY_{}", program.to_uppercase());
    let path = std::env::var_os(&variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(program));
    assert!(
        path.exists(),
        "{program} is not installed at {} (or ${variable}): run scripts/test, which installs it",
        path.display()
    );
    path
}

impl Browser {
    async fn open() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(installed("chromedriver"))
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let profile = std::env::temp_dir().join(format!("groupbuy-chromium-{}", ulid::Ulid::new()));
        let options = json!({
            "binary": installed("chromium"),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,1000", format!("--user-data-dir={}", profile.display()),
            ],
        });
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("goog:chromeOptions".into(), options);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            let connected = fantoccini::ClientBuilder::new(connector)
                .capabilities(capabilities.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await;
            match connected {
                Ok(client) => break client,
                Err(error) if tokio::time::Instant::now() > deadline => {
                    panic!("no WebDriver session within 20 s: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Browser {
            client,
            _driver: driver,
            profile,
        }
    }

    /// Runs `script` in the page and returns what it returns.
    async fn run(&self, script: &str, args: Vec<Value>) -> Value {
        self.client.execute(script, args).await.unwrap()
    }

    /// The page's text as a reader sees it.
    async fn text(&self) -> String {
        let text = self.run("return document.body.innerText", vec![]).await;
        text.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until `script` returns something `done` accepts, and returns it; panics with the
    /// page's text after 20 s.
    async fn until(&self, what: &str, script: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let value = self.run(script, vec![]).await;
            if done(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the console never showed {what}; it shows {value} in:\n{}",
                self.text().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the page's text contains `shown`.
    async fn shows(&self, shown: &str) {
        let script = "return document.body.innerText";
        self.until(shown, script, |t| {
            t.as_str().is_some_and(|t| t.contains(shown))
        })
        .await;
    }

    async fn click(&self, locator: fantoccini::Locator<'_>) {
        self.client
            .find(locator)
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let field = self
            .client
            .find(fantoccini::Locator::Css(css))
            .await
            .unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    /// Signs in with `token` through the console's own dialog.
    async fn sign_in(&self, token: &str) {
        self.type_into("#token", token).await;
        self.click(fantoccini::Locator::Css(
            "#sign-in-form button[type=submit]",
        ))
        .await;
    }

    /// Saves the page as `<name>.png` in `$GROUPBUY_CONSOLE_SCREENSHOTS`, when it is set.
    async fn screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("GROUPBUY_CONSOLE_SCREENSHOTS") {
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(PathBuf::from(dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    async fn close(self) {
        let _ = self.client.close().await;
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The text of each row of the read-model table, cells apart by tabs.
const PROJECTION_ROWS: &str = "return [...document.querySelectorAll('tbody tr')]\
    .map((row) => row.innerText)";

async fn the_console_shows_a_sale_in_a_real_browser(app: TestApp) {
    // Served compiled in, locked down, for anyone to load; the data asks for the token.
    let page = app
        .send(reqwest::Method::GET, "/console", None, None, None)
        .await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let policy = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(page.text().await.unwrap().contains("/console/console.js"));
    for (asset, kind) in [
        ("console.js", "text/javascript"),
        ("console.css", "text/css"),
    ] {
        let path = format!("/console/{asset}");
        let served = app
            .send(reqwest::Method::GET, &path, None, None, None)
            .await;
        assert_eq!(served.status(), StatusCode::OK, "{asset}");
        let content_type = served.headers()["content-type"].to_str().unwrap();
        assert!(content_type.starts_with(kind), "{asset}: {content_type}");
    }
    let missing = app.send(
        reqwest::Method::GET,
        "/console/secrets.txt",
        None,
        None,
        None,
    );
    expect_problem(missing.await, StatusCode::NOT_FOUND, "route_not_found").await;

    let sale = a_sale_with_every_outcome(&app).await;
    let id = sale["campaign_id"].as_str().unwrap();
    let browser = Browser::open().await;
    browser
        .client
        .goto(&format!("{}/console", app.address))
        .await
        .unwrap();

    // A customer's token is refused; the operator's opens the campaigns.
    let (_, eve) = app.create_user("Eve").await;
    browser.sign_in(&eve).await;
    browser.shows("not the operator token").await;
    assert!(!browser.text().await.contains("Lager crate"));
    browser.sign_in(OPERATOR_TOKEN).await;
    browser.shows("Lager crate").await;

    // The campaigns page refreshes itself: an order placed through the API shows in the
    // campaign's card without a reload.
    browser.shows("0 reserved").await;
    browser.run("window.stayed = true", vec![]).await;
    let (_, fay) = app.create_user("Fay").await;
    let late = place(&app, &fay, &sale, 1).await;
    let late = late["order_id"].as_str().unwrap();
    browser.shows("1 reserved").await;
    let stayed = "return window.stayed === true";
    assert_eq!(
        browser.run(stayed, vec![]).await,
        json!(true),
        "not reloaded"
    );

    // The campaign's page follows the sale live: the order cancelled through the API gives
    // its unit back in the stock on the page, without a reload.
    let card = format!("a[href='#/campaigns/{id}']");
    browser.click(fantoccini::Locator::Css(&card)).await;
    browser.shows("Awaiting payment").await;
    let stock = "return ['total', 'available', 'reserved', 'sold']\
        .map((k) => document.querySelector('.stat.' + k + ' .value')?.textContent)";
    browser
        .until("the stock with the new order", stock, |s| {
            s == &json!(["3", "0", "1", "2"])
        })
        .await;
    for shown in ["sold out", "customer", "live"] {
        browser.shows(shown).await;
    }
    browser.run("window.stayed = true", vec![]).await;
    assert_eq!(app.cancel(&fay, late).await.status(), StatusCode::ACCEPTED);
    browser
        .until("the stock after the cancel", stock, |s| {
            s == &json!(["3", "1", "0", "2"])
        })
        .await;
    assert_eq!(
        browser.run(stayed, vec![]).await,
        json!(true),
        "not reloaded"
    );
    browser.screenshot("campaign").await;

    // An order's timeline, from the log.
    browser
        .click(fantoccini::Locator::Css("a[data-nav=orders]"))
        .await;
    // The campaign's page has a form too: type only once the orders page replaced it.
    browser.shows("Order timeline").await;
    browser.type_into("main form input", late).await;
    browser
        .click(fantoccini::Locator::Css("main form button"))
        .await;
    browser.shows("OrderPlaced").await;
    browser.shows(&format!("order-{late}")).await;
    browser.screenshot("order").await;

    // Operations: a dead letter handed back to its consumer, and a rebuild that finishes.
    let placed = crate::dead_letters::order_placed(&app, late).await;
    let placed = serde_json::to_vec(&placed).unwrap();
    crate::dead_letters::plant(&app, "projection-orders", placed, "Redis went away").await;
    browser
        .click(fantoccini::Locator::Css("a[data-nav=operations]"))
        .await;
    browser.shows("Redis went away").await;
    browser.shows("leader").await;
    browser.screenshot("operations").await;
    browser
        .click(fantoccini::Locator::XPath("//button[text()='Replay']"))
        .await;
    browser.shows("No dead letters").await;
    let letters = app.get("/v1/admin/dead-letters", OPERATOR_TOKEN).await;
    assert_eq!(
        expect_json(letters, StatusCode::OK).await["dead_letters"],
        json!([])
    );

    browser
        .click(fantoccini::Locator::XPath("//button[text()='Run audit']"))
        .await;
    browser.shows("Passed: ").await;
    assert!(
        !browser.text().await.contains("null"),
        "{}",
        browser.text().await
    );
    browser
        .click(fantoccini::Locator::XPath(
            "//tr[td/b[text()='orders']]//button[text()='Rebuild']",
        ))
        .await;
    browser
        .until(
            "the rebuilt orders read model live",
            PROJECTION_ROWS,
            |rows| {
                let rows = rows.as_array().map(Vec::as_slice).unwrap_or_default();
                let rows: Vec<&str> = rows.iter().filter_map(Value::as_str).collect();
                rows.iter().any(|r| r.starts_with("orders\t2\tlive"))
                    && !rows.iter().any(|r| r.contains("building"))
            },
        )
        .await;
    browser.close().await;
}

/// The `deploy/` directory of the repository.
fn deploy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[tokio::test]
async fn the_alert_rules_are_valid_and_fire_as_their_tests_say() {
    let rules = deploy().join("prometheus");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let output = tokio::process::Command::new(installed("promtool"))
            .args(args)
            .current_dir(&rules)
            .output()
            .await
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every `groupbuy_...` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.match_indices("groupbuy_")
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_metrics_the_binary_exports() {
    let app = harness::spawn_app(harness::Backend::Postgres).await;
    a_sale_with_every_outcome(&app).await;
    let exported: std::collections::BTreeSet<String> = app
        .metrics()
        .await
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let files = [
        deploy().join("prometheus/alerts.yml"),
        deploy().join("prometheus/alerts.test.yml"),
        deploy().join("grafana/groupbuy.json"),
    ];
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let named = metric_names(&text);
        assert!(!named.is_empty(), "{} names no metric", file.display());
        let unknown: Vec<&String> = named.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{} names metrics the binary does not export: {unknown:?}; it exports {exported:?}",
            file.display()
        );
    }
}
