//! Chaos: a flash sale on three instances while a seeded schedule of faults hits them, then
//! the invariants checked through the API and the audit.
//!
//! The deployment is real Postgres (a database of the run's own), and a NATS server (or a
//! three-node JetStream cluster keeping three replicas of each stream) and a Redis server (or
//! a three-master Redis Cluster) the run starts itself ([`OwnNats`], [`OwnRedis`]), so it can
//! kill them without touching the machine's. Three `groupbuy serve` processes share it: two run every role, the
//! third runs the relay, the saga, the projections and the deadlines but no HTTP API, so
//! killing it kills a saga and a projector that serve no customer. Payments are simulated and
//! a share of them fail, so orders are cancelled and their units released and sold again
//! while the faults land.
//!
//! The seed picks the faults and when they land: `kill -9` of the relay's leader, of a
//! follower or of the worker, NATS killed and started again on its store (every node, or one
//! node of the cluster), Redis flushed (or the cluster's master of the orders read model
//! killed and started again, empty), and every Postgres backend of the deployment
//! terminated. What the system does between them is
//! not deterministic (three processes and the kernel schedule it), so a seed replays the
//! schedule, not the interleaving; [`Verdict`] names the seed of a failed run.
//!
//! After the sale every fault is repaired, the customers' unanswered requests are sent again
//! with their Idempotency-Keys until answered, and the run waits until every order is final.
//! Then: no accepted order lost, none stored twice, stock balances and matches the orders'
//! units, nobody over the per-user limit, every order final, and the audit (the log's
//! invariants, stuck orders, and the read models against a fresh fold) clean.
//!
//! `cargo test -p groupbuy-tests --test chaos` runs two short runs. The long mode runs many
//! seeds and prints a table:
//! `GROUPBUY_CHAOS_SEEDS=20 cargo test -p groupbuy-tests --test chaos -- --ignored --nocapture many_seeds`;
//! `GROUPBUY_CHAOS_SEED=<seed>` with `replay` runs one seed with every kind of fault.
//! `GROUPBUY_CHAOS_NATS_NODES=3` runs the long mode on a JetStream cluster, and
//! `GROUPBUY_CHAOS_REDIS_MASTERS=3` on a Redis Cluster, where the faults
//! also kill one node at a time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::loadgen::checks::{self, Outcome};
use gateway::loadgen::{Order, OrderPage, Stock};
use harness::bus::unique_settings;
use harness::process::{free_port, serve_command};
use harness::servers::{OwnNats, OwnRedis};
use harness::{TestDb, TestRedis, TestStreams};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use ulid::Ulid;

const OPERATOR: &str = "chaos-operator-token-0123456789";
const TOKEN_SECRET: &str = "chaos-token-secret-0123456789";
/// The instances' roles: two serve the API, the third only works behind it.
const ROLES: [&str; 3] = [
    "gateway,relay,saga,projections,deadlines",
    "gateway,relay,saga,projections,deadlines",
    "relay,saga,projections,deadlines",
];
/// The instances customers and the checks talk to.
const GATEWAYS: [usize; 2] = [0, 1];
const CUSTOMERS: usize = 12;
const QUOTA: u32 = 40;
const PER_USER_LIMIT: u32 = 4;
/// Short, so that orders whose payment answer died with an instance time out within the run.
const PAYMENT_TIMEOUT_S: u32 = 3;
const PAYMENT_FAILURE_RATE: &str = "0.2";

/// What can go wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fault {
    /// `kill -9` of the instance whose relay publishes the log, started again later.
    KillLeader,
    /// `kill -9` of an instance whose relay stands by.
    KillFollower,
    /// `kill -9` of the instance that runs no API: a saga and a projector.
    KillWorker,
    /// NATS killed and started again on its store: every node of a cluster.
    RestartNats,
    /// One node of the NATS cluster killed and started again on its store.
    KillNatsNode,
    /// The Redis Cluster's master of the orders read model killed and started again, empty:
    /// the projection rebuilds from the log what that master held.
    KillRedisMaster,
    /// Redis loses every key.
    FlushRedis,
    /// Every Postgres backend of the deployment terminated.
    TerminateBackends,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::KillLeader,
        Fault::KillFollower,
        Fault::KillWorker,
        Fault::RestartNats,
        Fault::FlushRedis,
        Fault::TerminateBackends,
    ];
}

/// A run: its seed, how long customers order, which faults may land, and how many NATS
/// servers (more than one: a JetStream cluster with a replica of each stream on every node)
/// and Redis masters (more than one: a Redis Cluster) the deployment runs.
struct Plan {
    seed: u64,
    sale: Duration,
    faults: Vec<Fault>,
    nats_nodes: usize,
    redis_masters: usize,
}

/// One fault of the schedule: when it lands after the sale starts, and how long what it
/// killed stays down.
#[derive(Clone, Copy, Debug)]
struct Scheduled {
    at: Duration,
    fault: Fault,
    down: Duration,
}

impl Plan {
    /// The faults, drawn from the seed: one every 1.5 to 3.5 s from about the first second,
    /// dealt from a shuffled deck of the plan's kinds, so that a sale long enough lands each
    /// kind before any lands twice.
    fn schedule(&self) -> Vec<Scheduled> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut at = Duration::from_millis(rng.gen_range(500..1_500));
        let mut schedule = Vec::new();
        let mut deck: Vec<Fault> = Vec::new();
        while at + Duration::from_secs(1) < self.sale {
            if deck.is_empty() {
                deck = self.faults.clone();
                deck.shuffle(&mut rng);
            }
            schedule.push(Scheduled {
                at,
                fault: deck.pop().expect("refilled"),
                down: Duration::from_millis(rng.gen_range(200..2_000)),
            });
            at += Duration::from_millis(rng.gen_range(1_500..3_500));
        }
        schedule
    }
}

/// What a run found. Clean when every count of harm is zero and the audit passed.
#[derive(Debug, Default)]
struct Verdict {
    seed: u64,
    faults: BTreeMap<String, usize>,
    accepted: usize,
    confirmed: usize,
    /// Answered orders the campaign's listing does not hold.
    lost: usize,
    /// Orders stored that no answer named: a request stored twice.
    duplicated: usize,
    /// Stock that does not balance, or units held that the stock does not show.
    oversold: usize,
    /// Customers over the per-user limit.
    breaches: usize,
    /// Orders still pending or awaiting payment after the drain.
    not_final: usize,
    /// The audit's violations (a failed audit call counts as one).
    audit: usize,
    details: Vec<String>,
    took: Duration,
}

impl Verdict {
    fn is_clean(&self) -> bool {
        self.lost + self.duplicated + self.oversold + self.breaches + self.not_final + self.audit
            == 0
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} accepted ({} confirmed), lost {}, duplicated {}, oversold {}, \
             breaches {}, not final {}, audit violations {}; faults {:?}; {:.0} s",
            self.seed,
            self.accepted,
            self.confirmed,
            self.lost,
            self.duplicated,
            self.oversold,
            self.breaches,
            self.not_final,
            self.audit,
            self.faults,
            self.took.as_secs_f64()
        )?;
        for detail in &self.details {
            write!(f, "\n  {detail}")?;
        }
        if !self.is_clean() {
            write!(
                f,
                "\n  replay the schedule: GROUPBUY_CHAOS_SEED={} cargo test -p groupbuy-tests \
                 --test chaos -- --ignored --nocapture replay",
                self.seed
            )?;
        }
        Ok(())
    }
}

/// A `groupbuy serve` of the deployment.
struct Instance {
    port: u16,
    roles: &'static str,
    process: Option<Child>,
}

/// The services, the instances, and a client for them. Fields drop in this order: the
/// streams and keys are cleaned up while their servers still run.
struct Deployment {
    instances: Vec<Instance>,
    client: reqwest::Client,
    streams: TestStreams,
    keys: TestRedis,
    db: TestDb,
    nats: OwnNats,
    redis: OwnRedis,
}

impl Deployment {
    async fn start(plan: &Plan) -> Deployment {
        let nats = OwnNats::cluster(plan.nats_nodes).await;
        let redis = OwnRedis::cluster(plan.redis_masters).await;
        let streams = TestStreams {
            settings: unique_settings(&nats.url()),
        };
        let keys = TestRedis {
            url: redis.url(),
            prefix: format!("chaos{}", Ulid::new().to_string().to_lowercase()),
        };
        let mut deployment = Deployment {
            db: TestDb::new().await,
            nats,
            redis,
            streams,
            keys,
            instances: ROLES
                .iter()
                .map(|&roles| Instance {
                    port: free_port(),
                    roles,
                    process: None,
                })
                .collect(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        for i in 0..deployment.instances.len() {
            deployment.launch(i);
        }
        deployment.all_ready().await;
        deployment
    }

    fn launch(&mut self, i: usize) {
        let binary = env!("CARGO_BIN_EXE_groupbuy-under-test");
        let instance = &self.instances[i];
        let process = serve_command(binary, instance.port, &self.db, &self.streams, &self.keys)
            .env("GROUPBUY_ROLES", instance.roles)
            .env("GROUPBUY_NATS_REPLICAS", self.nats.nodes().to_string())
            .env("GROUPBUY_OPERATOR_TOKEN", OPERATOR)
            .env("GROUPBUY_TOKEN_SECRET", TOKEN_SECRET)
            .env("GROUPBUY_PAYMENT_PROVIDER", "simulated")
            .env("GROUPBUY_SIMULATED_PAYMENT_DELAY_MS", "200")
            .env(
                "GROUPBUY_SIMULATED_PAYMENT_FAILURE_RATE",
                PAYMENT_FAILURE_RATE,
            )
            .spawn()
            .expect("the server under test starts");
        self.instances[i].process = Some(process);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut process) = self.instances[i].process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    fn url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.instances[i].port)
    }

    /// Waits until every instance answers `/readyz` with 200. An instance may take a while
    /// to listen: on a cluster that is electing a leader it asks for its streams again.
    async fn all_ready(&self) {
        for i in 0..self.instances.len() {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let ready = self.client.get(self.url(i, "/readyz")).send().await;
                if ready.is_ok_and(|r| r.status() == StatusCode::OK) {
                    break;
                }
                assert!(Instant::now() < deadline, "instance {i} never ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// An operator request to the first gateway that answers.
    async fn operator(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for &i in &GATEWAYS {
                let mut request = self
                    .client
                    .request(method.clone(), self.url(i, path))
                    .bearer_auth(OPERATOR);
                if let Some(body) = body {
                    request = request.json(body);
                }
                if let Ok(response) = request.send().await {
                    if response.status().is_success() {
                        return response.json().await.unwrap();
                    }
                }
            }
            assert!(Instant::now() < deadline, "{method} {path} never answered");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The instance whose relay leads, if one says so.
    async fn leader(&self) -> Option<usize> {
        for &i in &GATEWAYS {
            if self.instances[i].process.is_none() {
                continue;
            }
            let relay = self
                .client
                .get(self.url(i, "/v1/admin/relay"))
                .bearer_auth(OPERATOR)
                .send()
                .await;
            if let Ok(response) = relay {
                if let Ok(body) = response.json::<Value>().await {
                    if body["role"] == "leader" {
                        return Some(i);
                    }
                }
            }
        }
        // Neither gateway leads: the worker does, or nobody has taken the lease yet.
        Some(2).filter(|&i| self.instances[i].process.is_some())
    }

    /// Lands `fault`, keeps what it killed down for `down`, and brings it back.
    async fn strike(&mut self, fault: Fault, down: Duration, rng: &mut StdRng) {
        match fault {
            Fault::KillLeader | Fault::KillFollower | Fault::KillWorker => {
                let leader = self.leader().await;
                let victim = match fault {
                    Fault::KillLeader => leader.unwrap_or(0),
                    Fault::KillWorker => 2,
                    _ => {
                        let followers: Vec<usize> =
                            (0..ROLES.len()).filter(|&i| Some(i) != leader).collect();
                        followers[rng.gen_range(0..followers.len())]
                    }
                };
                self.kill(victim);
                tokio::time::sleep(down).await;
                self.launch(victim);
            }
            Fault::RestartNats => {
                self.nats.kill().await;
                tokio::time::sleep(down).await;
                self.nats.restart().await;
            }
            Fault::KillNatsNode => {
                let node = rng.gen_range(0..self.nats.nodes());
                self.nats.kill_node(node).await;
                tokio::time::sleep(down).await;
                self.nats.restart_node(node).await;
            }
            Fault::KillRedisMaster => {
                let orders = format!("{}:rm:{{orders}}:live", self.keys.prefix);
                let node = self.redis.node_of(&orders).await;
                self.redis.kill_node(node).await;
                tokio::time::sleep(down).await;
                self.redis.restart_node(node).await;
            }
            Fault::FlushRedis => {
                for url in self.redis.node_urls() {
                    let client = redis::Client::open(url).unwrap();
                    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
                }
            }
            Fault::TerminateBackends => {
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                )
                .execute(self.db.log().pool())
                .await
                .unwrap();
            }
        }
    }

    fn stop(&mut self) {
        for i in 0..self.instances.len() {
            self.kill(i);
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What customers were told: the order each Idempotency-Key placed.
type Answers = Arc<Mutex<HashMap<String, Ulid>>>;

/// A customer ordering one or two units every 100 to 300 ms until `stop`, and cancelling one
/// accepted order in ten. A request without an answer (its instance died under it, or it
/// was refused while the deployment recovers) is sent again with its key, to the other
/// gateway, until it is answered; so is a cancel. Any other refusal fails the run.
async fn customer(
    client: reqwest::Client,
    urls: Vec<String>,
    token: String,
    campaign_id: Ulid,
    answers: Answers,
    seed: u64,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut turn = 0usize;
    while !*stop.borrow() {
        let key = Ulid::new().to_string();
        let body = json!({"campaign_id": campaign_id, "quantity": rng.gen_range(1..=2)});
        let order_id = loop {
            turn += 1;
            let sent = client
                .post(format!("{}/v1/orders", urls[turn % urls.len()]))
                .bearer_auth(&token)
                .header("Idempotency-Key", &key)
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) if response.status() == StatusCode::ACCEPTED => {
                    let order: Value = response.json().await.unwrap();
                    break order["order_id"].as_str().unwrap().parse::<Ulid>().unwrap();
                }
                Ok(response) if is_refused_for_good(response.status()) => {
                    let status = response.status();
                    panic!("order refused: {status} {}", response.text().await.unwrap());
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let earlier = answers.lock().unwrap().insert(key, order_id);
        assert!(earlier.is_none_or(|e| e == order_id), "one key, two orders");
        if rng.gen_ratio(1, 10) {
            cancel(&client, &urls, &token, order_id).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..300))).await;
    }
}

async fn cancel(client: &reqwest::Client, urls: &[String], token: &str, order_id: Ulid) {
    for turn in 0.. {
        let sent = client
            .post(format!(
                "{}/v1/orders/{order_id}/cancel",
                urls[turn % urls.len()]
            ))
            .bearer_auth(token)
            .send()
            .await;
        match sent {
            // Cancelled, or already past cancelling (409): either is an answer.
            Ok(response) if response.status().is_success() => return,
            Ok(response) if response.status() == StatusCode::CONFLICT => return,
            Ok(response) if is_refused_for_good(response.status()) => {
                let status = response.status();
                panic!(
                    "cancel refused: {status} {}",
                    response.text().await.unwrap()
                );
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A client error other than "busy, try again" (409 key in use, 429): a bug, not a fault.
/// A 404 is one too: while a read model is missing the API answers 503, never "not found".
fn is_refused_for_good(status: StatusCode) -> bool {
    status.is_client_error()
        && status != StatusCode::CONFLICT
        && status != StatusCode::TOO_MANY_REQUESTS
}

/// Runs `plan` and judges it.
async fn run(plan: &Plan) -> Verdict {
    let started = Instant::now();
    let deployment = Arc::new(tokio::sync::RwLock::new(Deployment::start(plan).await));
    let campaign_id = {
        let d = deployment.read().await;
        let store = d
            .operator(
                reqwest::Method::POST,
                "/v1/stores",
                Some(&json!({"name": "Chaos corner", "region": "north"})),
            )
            .await;
        let now = chrono::Utc::now();
        let campaign = d
            .operator(
                reqwest::Method::POST,
                "/v1/campaigns",
                Some(&json!({
                    "store_id": store["store_id"], "sku": "IPA", "title": "IPA",
                    "price_cents": 900, "quota": QUOTA, "per_user_limit": PER_USER_LIMIT,
                    "starts_at": now - chrono::Duration::minutes(1),
                    "ends_at": now + chrono::Duration::hours(1),
                    "payment_timeout_seconds": PAYMENT_TIMEOUT_S,
                })),
            )
            .await;
        campaign["campaign_id"]
            .as_str()
            .unwrap()
            .parse::<Ulid>()
            .unwrap()
    };
    let answers: Answers = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut customers = Vec::new();
    let (client, urls) = {
        let d = deployment.read().await;
        let urls: Vec<String> = GATEWAYS.iter().map(|&i| d.url(i, "")).collect();
        (d.client.clone(), urls)
    };
    for i in 0..CUSTOMERS {
        let user = deployment
            .read()
            .await
            .operator(
                reqwest::Method::POST,
                "/v1/users",
                Some(&json!({"name": format!("customer {i}")})),
            )
            .await;
        customers.push(tokio::spawn(customer(
            client.clone(),
            urls.clone(),
            user["token"].as_str().unwrap().to_owned(),
            campaign_id,
            Arc::clone(&answers),
            plan.seed.wrapping_mul(31).wrapping_add(i as u64),
            stopped.clone(),
        )));
    }

    let mut verdict = Verdict {
        seed: plan.seed,
        ..Verdict::default()
    };
    let sale_started = Instant::now();
    let mut rng = StdRng::seed_from_u64(plan.seed);
    for scheduled in plan.schedule() {
        let wait = scheduled.at.saturating_sub(sale_started.elapsed());
        tokio::time::sleep(wait).await;
        *verdict
            .faults
            .entry(format!("{:?}", scheduled.fault))
            .or_default() += 1;
        deployment
            .write()
            .await
            .strike(scheduled.fault, scheduled.down, &mut rng)
            .await;
    }
    tokio::time::sleep(plan.sale.saturating_sub(sale_started.elapsed())).await;
    stop.send(true).unwrap();
    // Every fault is repaired by now; the customers' last requests get their answers.
    deployment.read().await.all_ready().await;
    for customer in customers {
        tokio::time::timeout(Duration::from_secs(60), customer)
            .await
            .expect("every request is answered once the faults are over")
            .expect("no customer was refused for good");
    }
    let deployment = deployment.read().await;
    judge(&deployment, campaign_id, &answers, &mut verdict).await;
    verdict.took = started.elapsed();
    verdict
}

/// Waits for every order to be final, then counts what went wrong.
async fn judge(deployment: &Deployment, campaign_id: Ulid, answers: &Answers, v: &mut Verdict) {
    let answers = answers.lock().unwrap().clone();
    v.accepted = answers.len();
    let answered: HashSet<Ulid> = answers.values().copied().collect();
    if answered.len() != answers.len() {
        v.duplicated += answers.len() - answered.len();
        v.details.push("two keys answered with one order".into());
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let orders = loop {
        let orders = listing(deployment, campaign_id).await;
        let open = orders.iter().filter(|o| !is_final(o)).count();
        if open == 0 && orders.len() >= answered.len() || Instant::now() > deadline {
            break orders;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let listed: HashSet<Ulid> = orders.iter().map(|o| o.order_id).collect();
    v.lost = answered.difference(&listed).count();
    v.duplicated += listed.difference(&answered).count();
    v.confirmed = orders
        .iter()
        .filter(|o| o.status == gateway::loadgen::OrderStatus::Confirmed)
        .count();
    v.not_final = orders.iter().filter(|o| !is_final(o)).count();

    // The two read models apply the log on their own: the orders can all show final while
    // the campaign's stock has yet to apply the last sales.
    caught_up(deployment).await;
    let campaign = deployment
        .operator(
            reqwest::Method::GET,
            &format!("/v1/campaigns/{campaign_id}"),
            None,
        )
        .await;
    let stock: Stock = serde_json::from_value(campaign["stock"].clone()).unwrap();
    let checked = checks::run(&checks::Inputs {
        stock,
        per_user_limit: PER_USER_LIMIT,
        orders: &orders,
        accepted: answered.len(),
        created: true,
        drained: v.not_final == 0,
    });
    for check in checked.iter().filter(|c| c.outcome == Outcome::Failed) {
        v.details.push(format!("{}: {}", check.name, check.detail));
        match check.name {
            "no customer over the per-user limit" => v.breaches += 1,
            "every accepted order is listed" => {}
            _ => v.oversold += 1,
        }
    }

    // Every order is final and the read models have applied the whole log: nothing is in
    // motion, so an order's compensations count as due after a second (the default of two
    // minutes would let a confirmed order whose units were never sold pass).
    let report = deployment
        .operator(
            reqwest::Method::GET,
            "/v1/admin/audit?settle_seconds=1&stuck_after_seconds=60",
            None,
        )
        .await;
    if report["ok"] != true {
        let violations = report["violations"].as_array().map_or(1, Vec::len);
        v.audit = violations.max(1);
        v.details.push(format!("audit: {}", report["violations"]));
    }
}

/// Waits (30 s at most) until every live read model has applied the whole log.
async fn caught_up(deployment: &Deployment) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let projections = deployment
            .operator(reqwest::Method::GET, "/v1/admin/projections", None)
            .await;
        let live: Vec<&Value> = projections["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"] == "live")
            .collect();
        if live.len() == 2 && live.iter().all(|p| p["lag"] == 0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_final(order: &Order) -> bool {
    !matches!(
        order.status,
        gateway::loadgen::OrderStatus::Pending | gateway::loadgen::OrderStatus::AwaitingPayment
    )
}

/// Every order of the campaign, as the operator lists them.
async fn listing(deployment: &Deployment, campaign_id: Ulid) -> Vec<Order> {
    let mut orders = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/orders?campaign_id={campaign_id}&limit=200");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page: OrderPage =
            serde_json::from_value(deployment.operator(reqwest::Method::GET, &path, None).await)
                .unwrap();
        orders.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return orders,
        }
    }
}

fn seed_from_env(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|s| {
        s.parse()
            .unwrap_or_else(|_| panic!("{name} is a number, not {s:?}"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_keeps_its_invariants_while_instances_are_killed_and_nats_restarts() {
    let verdict = run(&Plan {
        seed: 11,
        sale: Duration::from_secs(14),
        faults: vec![
            Fault::KillLeader,
            Fault::KillFollower,
            Fault::KillWorker,
            Fault::RestartNats,
        ],
        nats_nodes: 1,
        redis_masters: 1,
    })
    .await;
    println!("{verdict}");
    assert!(verdict.accepted > 0, "{verdict}");
    assert!(verdict.is_clean(), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_keeps_its_invariants_while_redis_is_flushed_and_backends_are_terminated() {
    let verdict = run(&Plan {
        seed: 12,
        sale: Duration::from_secs(12),
        faults: vec![
            Fault::FlushRedis,
            Fault::TerminateBackends,
            Fault::KillLeader,
        ],
        nats_nodes: 1,
        redis_masters: 1,
    })
    .await;
    println!("{verdict}");
    assert!(verdict.accepted > 0, "{verdict}");
    assert!(verdict.is_clean(), "{verdict}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_keeps_its_invariants_on_clusters_while_their_nodes_die() {
    let verdict = run(&Plan {
        seed: 13,
        sale: Duration::from_secs(14),
        faults: vec![
            Fault::KillNatsNode,
            Fault::KillRedisMaster,
            Fault::KillNatsNode,
            Fault::KillLeader,
        ],
        nats_nodes: 3,
        redis_masters: 3,
    })
    .await;
    println!("{verdict}");
    assert!(verdict.accepted > 0, "{verdict}");
    assert!(verdict.faults.contains_key("KillNatsNode"), "{verdict}");
    assert!(verdict.faults.contains_key("KillRedisMaster"), "{verdict}");
    assert!(verdict.is_clean(), "{verdict}");
}

/// One seed, every kind of fault: `GROUPBUY_CHAOS_SEED` (default 1), `GROUPBUY_CHAOS_SALE_S`
/// (default 15), `GROUPBUY_CHAOS_NATS_NODES` and `GROUPBUY_CHAOS_REDIS_MASTERS` (default 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long mode; run with --ignored"]
async fn replay() {
    let verdict = run(&Plan {
        seed: seed_from_env("GROUPBUY_CHAOS_SEED").unwrap_or(1),
        sale: Duration::from_secs(seed_from_env("GROUPBUY_CHAOS_SALE_S").unwrap_or(15)),
        faults: faults(nats_nodes(), redis_masters()),
        nats_nodes: nats_nodes(),
        redis_masters: redis_masters(),
    })
    .await;
    println!("{verdict}");
    assert!(verdict.is_clean(), "{verdict}");
}

/// Many seeds, every kind of fault, one after another, and a table of what they found:
/// `GROUPBUY_CHAOS_SEEDS` runs (default 10) from `GROUPBUY_CHAOS_SEED` (default 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the long mode; run with --ignored"]
async fn many_seeds() {
    let first = seed_from_env("GROUPBUY_CHAOS_SEED").unwrap_or(1);
    let runs = seed_from_env("GROUPBUY_CHAOS_SEEDS").unwrap_or(10);
    let sale = Duration::from_secs(seed_from_env("GROUPBUY_CHAOS_SALE_S").unwrap_or(15));
    let mut verdicts = Vec::new();
    for seed in first..first + runs {
        let verdict = run(&Plan {
            seed,
            sale,
            faults: faults(nats_nodes(), redis_masters()),
            nats_nodes: nats_nodes(),
            redis_masters: redis_masters(),
        })
        .await;
        println!("{verdict}");
        verdicts.push(verdict);
    }
    println!("{}", table(&verdicts));
    assert!(verdicts.iter().all(Verdict::is_clean), "a run failed");
}

/// The NATS servers of the long mode: `GROUPBUY_CHAOS_NATS_NODES`, default 1.
fn nats_nodes() -> usize {
    seed_from_env("GROUPBUY_CHAOS_NATS_NODES").map_or(1, |n| n.try_into().unwrap())
}

/// The Redis masters of the long mode: `GROUPBUY_CHAOS_REDIS_MASTERS`, default 1.
fn redis_masters() -> usize {
    seed_from_env("GROUPBUY_CHAOS_REDIS_MASTERS").map_or(1, |n| n.try_into().unwrap())
}

/// Every kind of fault, and on a cluster one node killed at a time as well.
fn faults(nats_nodes: usize, redis_masters: usize) -> Vec<Fault> {
    let mut faults = Fault::ALL.to_vec();
    if nats_nodes > 1 {
        faults.push(Fault::KillNatsNode);
    }
    if redis_masters > 1 {
        faults.push(Fault::KillRedisMaster);
    }
    faults
}

/// The long mode's table, in Markdown.
fn table(verdicts: &[Verdict]) -> String {
    let sum = |f: fn(&Verdict) -> usize| verdicts.iter().map(f).sum::<usize>();
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    for verdict in verdicts {
        for (fault, n) in &verdict.faults {
            *faults.entry(fault.as_str()).or_default() += n;
        }
    }
    format!(
        "| runs | faults | orders | confirmed | lost | duplicated | oversold | breaches | \
         not final | audit failures |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n\
         | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        verdicts.len(),
        faults
            .iter()
            .map(|(f, n)| format!("{f} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        sum(|v| v.accepted),
        sum(|v| v.confirmed),
        sum(|v| v.lost),
        sum(|v| v.duplicated),
        sum(|v| v.oversold),
        sum(|v| v.breaches),
        sum(|v| v.not_final),
        verdicts.iter().filter(|v| v.audit > 0).count(),
    )
}

#[test]
fn a_schedule_deals_every_kind_of_fault_before_any_twice() {
    for seed in 0..50 {
        let plan = Plan {
            seed,
            sale: Duration::from_secs(60),
            faults: Fault::ALL.to_vec(),
            nats_nodes: 1,
            redis_masters: 1,
        };
        let schedule = plan.schedule();
        assert!(
            schedule.len() >= Fault::ALL.len(),
            "seed {seed}: {schedule:?}"
        );
        let first: HashSet<Fault> = schedule[..Fault::ALL.len()]
            .iter()
            .map(|s| s.fault)
            .collect();
        assert_eq!(first.len(), Fault::ALL.len(), "seed {seed}: {schedule:?}");
        assert_eq!(plan.schedule().len(), schedule.len(), "seed {seed} replays");
    }
}
