//! The OpenAPI document (`/openapi.json`) against the running gateway and against API.md.
//!
//! Schemathesis, from PyPI, reads the document and sends requests generated from it to every
//! operation: valid ones, invalid ones, and chains that follow the document's links (a created
//! campaign is read, replenished and ordered from). It fails on any server error, any answer
//! whose status, content type, headers or body the document does not describe, any invalid
//! request that is accepted, and any operation that answers without the bearer token. The one
//! check left out is `positive_data_acceptance`: some rules cannot be written in JSON Schema
//! (a sale that ends after it starts, ids that exist, a signature over the body), so a valid
//! document still describes requests the API refuses.
//!
//! `scripts/test` installs schemathesis into `target/schemathesis` and points
//! `GROUPBUY_SCHEMATHESIS` at it; without it these tests fail rather than skip.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use gateway::app::Payments;
use harness::{expect_json, spawn_app_tuned, Backend, TestApp, OPERATOR_TOKEN};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Requests generated per operation and phase: enough to reach every documented answer in
/// well under a minute per backend.
const EXAMPLES_PER_OPERATION: u32 = 40;
/// The live sale streams until the client leaves: a fuzzer waiting for the end of the body
/// would only time out. tests/integration/console.rs checks it.
const LIVE_SALE: &str = "/sale/live$";
/// A fixed seed, so that a failure in CI can be replayed.
const SEED: u64 = 20_261_129;

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("GROUPBUY_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/schemathesis/bin/schemathesis")
        });
    assert!(
        path.exists(),
        "schemathesis is not installed at {}: run scripts/test, which installs it",
        path.display()
    );
    path
}

/// An app whose payments settle by themselves within 50 ms (so that followed orders reach a
/// final state and their event streams end), with no rate limits to turn the generator away.
async fn app(backend: Backend) -> TestApp {
    spawn_app_tuned(backend, |settings| {
        settings.payments = Payments::Simulated {
            delay: Duration::from_millis(50),
            failure_rate: 0.25,
        };
        settings.limits.rate_limits = gateway::rate_limit::RateLimits {
            per_customer: None,
            global: None,
        };
    })
    .await
}

/// Ids that exist, for the generator to draw from: without them nearly every generated id
/// would be unknown, and only the 404 answers would be checked.
async fn seed(app: &TestApp, customer: &str) -> Vec<String> {
    let campaign = app.create_campaign(100_000, 10_000).await;
    let order = expect_json(
        app.post(
            "/v1/orders",
            customer,
            Some("contract-seed"),
            &json!({"campaign_id": campaign["campaign_id"], "quantity": 1}),
        )
        .await,
        StatusCode::ACCEPTED,
    )
    .await;
    vec![
        campaign["store_id"].as_str().unwrap().to_owned(),
        campaign["campaign_id"].as_str().unwrap().to_owned(),
        order["order_id"].as_str().unwrap().to_owned(),
    ]
}

async fn schemathesis_finds_nothing_to_fault(backend: Backend) {
    let schemathesis = schemathesis();
    let app = app(backend).await;
    let (_, customer) = app.create_user("Schemathesis").await;
    let ids = seed(&app, &customer).await;
    let dir = std::env::temp_dir().join(format!("groupbuy-contract-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            r#"
headers = {{ Authorization = "Bearer {OPERATOR_TOKEN}" }}
generation.dictionaries.string = {{ dictionary = "ids", probability = 0.5 }}

[dictionaries.ids]
values = {ids:?}

# Where the answer to well-formed data depends on what is stored, which no schema can say (an
# id that names nothing, a key used before with another body, `ends_at` before `starts_at`),
# 422 is a right answer too. Everywhere else, data the document allows must be accepted.
[[operations]]
include-path-regex = "^/v1/(users|stores|campaigns|orders)"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# Orders are the customer's.
[[operations]]
include-tag = "orders"
headers = {{ Authorization = "Bearer {customer}" }}
"#
        ),
    )
    .unwrap();
    let output = tokio::process::Command::new(&schemathesis)
        .current_dir(&dir)
        .arg("--config-file")
        .arg(&config)
        .arg("--no-color")
        .arg("run")
        .arg(format!("{}/openapi.json", app.address))
        .args(["--checks", "all"])
        .args(["--max-examples", &EXAMPLES_PER_OPERATION.to_string()])
        .args(["--seed", &SEED.to_string()])
        .args(["--request-timeout", "20"])
        .args(["--exclude-path-regex", LIVE_SALE])
        .args(["--generation-database", "none"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(dir.join("junit.xml"))
        // One worker: hypothesis's lambda-source cache is not thread-safe, and two workers
        // fail now and then with "AST constructor recursion depth mismatch".
        .args(["--workers", "1"])
        .kill_on_drop(true)
        .output()
        .await
        .expect("schemathesis runs");
    let junit = std::fs::read_to_string(dir.join("junit.xml")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // It tested every operation of the document but the one that serves the document and
    // the live sale.
    let document: Value = app.operator_get("/openapi.json").await;
    let mut expected = operations(&document);
    expected.remove("GET /openapi.json");
    expected.remove("GET /v1/admin/campaigns/{id}/sale/live");
    let tested: BTreeSet<String> = junit
        .split("<testcase name=\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        // Operations are `METHOD /path`; the report also has a case for the stateful phase.
        .filter(|name| name.contains(" /"))
        .map(str::to_owned)
        .collect();
    assert_eq!(tested, expected, "the operations schemathesis tested");
    let audit = app.operator_get("/v1/admin/audit").await;
    assert_eq!(
        audit["violations"],
        json!([]),
        "after schemathesis: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_to_fault_embedded() {
    schemathesis_finds_nothing_to_fault(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_to_fault_on_the_real_services() {
    schemathesis_finds_nothing_to_fault(Backend::Postgres).await;
}

/// `METHOD /path` of every operation in an OpenAPI document.
pub(crate) fn operations(document: &Value) -> BTreeSet<String> {
    document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .filter(|m| ["get", "post", "put", "patch", "delete"].contains(&m.as_str()))
                .map(move |method| format!("{} {path}", method.to_uppercase()))
        })
        .collect()
}

/// `METHOD /path` of every endpoint in API.md's table (`GET /a, /b` lists two).
fn api_md_endpoints(api_md: &str) -> BTreeSet<String> {
    let mut endpoints = BTreeSet::new();
    for line in api_md.lines() {
        let Some(cell) = line.strip_prefix("| ").and_then(|l| l.split(" |").next()) else {
            continue;
        };
        let Some((method, paths)) = cell.split_once(' ') else {
            continue;
        };
        if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method) {
            continue;
        }
        for path in paths.split(", ") {
            endpoints.insert(format!("{method} {}", path.trim()));
        }
    }
    endpoints
}

#[tokio::test]
async fn the_document_lists_every_endpoint_of_api_md() {
    let api_md = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/API.md"),
    )
    .expect("API.md is in ../shared beside the project");
    let promised = api_md_endpoints(&api_md);
    assert!(
        promised.len() >= 19,
        "API.md's table was read: {promised:?}"
    );
    let app = harness::spawn_app(Backend::Embedded).await;
    let document: Value = app.operator_get("/openapi.json").await;
    let documented = operations(&document);
    let missing: Vec<_> = promised.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "API.md endpoints the document leaves out: {missing:?}"
    );
    // And nothing in the document that the router does not serve.
    for operation in &documented {
        let (method, path) = operation.split_once(' ').unwrap();
        let path = path
            .replace("{id}", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
            .replace("{name}", "orders");
        let response = app
            .client
            .request(method.parse().unwrap(), format!("{}{path}", app.address))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !body.contains("route_not_found"),
            "{operation} is documented but not routed: {status} {body}"
        );
    }
    assert_eq!(document["openapi"], "3.1.0");
    let limits = &document["components"]["schemas"];
    // The documented bounds are the domain's.
    for (schema, field, bound, value) in [
        (
            "CreateCampaign",
            "price_cents",
            "maximum",
            domain::limits::PRICE_CENTS_MAX,
        ),
        (
            "CreateCampaign",
            "quota",
            "maximum",
            domain::limits::CAMPAIGN_TOTAL_UNITS_MAX.into(),
        ),
        (
            "CreateCampaign",
            "per_user_limit",
            "maximum",
            domain::limits::PER_USER_LIMIT_UNITS_MAX.into(),
        ),
        (
            "CreateCampaign",
            "payment_timeout_seconds",
            "minimum",
            domain::limits::PAYMENT_TIMEOUT_S_MIN.into(),
        ),
        (
            "CreateCampaign",
            "payment_timeout_seconds",
            "maximum",
            domain::limits::PAYMENT_TIMEOUT_S_MAX.into(),
        ),
        (
            "CreateCampaign",
            "sku",
            "maxLength",
            domain::limits::SKU_CHARS_MAX as u64,
        ),
        (
            "CreateCampaign",
            "title",
            "maxLength",
            domain::limits::TITLE_CHARS_MAX as u64,
        ),
        (
            "Replenish",
            "quantity",
            "maximum",
            domain::limits::CAMPAIGN_TOTAL_UNITS_MAX.into(),
        ),
        (
            "PlaceOrder",
            "quantity",
            "maximum",
            domain::limits::ORDER_QUANTITY_UNITS_MAX.into(),
        ),
        (
            "CreateUser",
            "name",
            "maxLength",
            domain::limits::NAME_CHARS_MAX as u64,
        ),
        (
            "CreateStore",
            "name",
            "maxLength",
            domain::limits::NAME_CHARS_MAX as u64,
        ),
        (
            "CreateStore",
            "region",
            "maxLength",
            domain::limits::NAME_CHARS_MAX as u64,
        ),
        (
            "PaymentAnswer",
            "provider_reference",
            "maxLength",
            domain::limits::PROVIDER_REFERENCE_CHARS_MAX as u64,
        ),
    ] {
        assert_eq!(
            limits[schema]["properties"][field][bound],
            json!(value),
            "{schema}.{field}.{bound}"
        );
    }
}
