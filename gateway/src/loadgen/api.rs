//! The load generator's side of API.md: one HTTP client, and the few bodies it reads.
//!
//! The bodies are declared here rather than borrowed from [`crate::views`]: the server may be
//! another build, so only the fields the contract promises are read, and unknown ones (or an
//! unknown status) are tolerated.

use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::{DateTime, Utc};
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use ulid::Ulid;

use super::{LoadgenArgs, CONNECT_TIMEOUT_S};

/// Orders per page of a listing: the most API.md allows.
pub const ORDERS_PAGE_MAX: usize = 200;

/// The client every request of a run goes through, and the operator's credentials.
pub struct Api {
    client: reqwest::Client,
    base: Url,
    operator: HeaderValue,
}

impl Api {
    /// A client with a connection pool sized for `--connections`, and a timeout on every
    /// request.
    pub fn new(args: &LoadgenArgs) -> anyhow::Result<Api> {
        let client = reqwest::Client::builder()
            // The workers never have more requests in flight than connections; keeping that
            // many idle ones means no request of the load waits for a handshake.
            .pool_max_idle_per_host(args.connections as usize)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(Duration::from_secs(CONNECT_TIMEOUT_S))
            .timeout(args.request_timeout())
            .tcp_nodelay(true)
            .user_agent(concat!("groupbuy-loadgen/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        let mut base = args.base_url.clone();
        // Paths are joined onto the base, so a deployment under a prefix (`http://host/shop`)
        // keeps it.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Api {
            client,
            base,
            operator: bearer(&args.operator_token).context("--operator-token")?,
        })
    }

    /// The absolute URL of `path`.
    pub fn url(&self, path: &str) -> Url {
        self.base.join(path).expect("paths are relative and valid")
    }

    /// The absolute URL of `path` on each instance orders go to: `--base-url` first, then
    /// every `--also-base-url`.
    pub fn urls_on_every_instance(args: &LoadgenArgs, path: &str) -> Vec<Url> {
        std::iter::once(&args.base_url)
            .chain(&args.also_base_urls)
            .map(|base| {
                let mut base = base.clone();
                if !base.path().ends_with('/') {
                    base.set_path(&format!("{}/", base.path()));
                }
                base.join(path).expect("paths are relative and valid")
            })
            .collect()
    }

    /// The client, for the load's own requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// A request as the operator.
    fn operator(&self, method: Method, url: &Url) -> RequestBuilder {
        self.client
            .request(method, url.clone())
            .header(AUTHORIZATION, self.operator.clone())
    }

    /// Creates a store for the run; its id.
    pub async fn create_store(&self, name: &str) -> anyhow::Result<Ulid> {
        #[derive(Deserialize)]
        struct Created {
            store_id: Ulid,
        }
        let url = self.url("v1/stores");
        let body = serde_json::json!({"name": name, "region": "loadgen"});
        let created: Created = expect(
            self.operator(Method::POST, &url).json(&body),
            StatusCode::CREATED,
        )
        .await?;
        Ok(created.store_id)
    }

    /// Creates a campaign.
    pub async fn create_campaign(&self, terms: &serde_json::Value) -> anyhow::Result<Campaign> {
        let url = self.url("v1/campaigns");
        expect(
            self.operator(Method::POST, &url).json(terms),
            StatusCode::CREATED,
        )
        .await
    }

    /// One campaign, as the operator reads it.
    pub async fn campaign(&self, id: Ulid) -> anyhow::Result<Campaign> {
        let url = self.url(&format!("v1/campaigns/{id}"));
        expect(self.operator(Method::GET, &url), StatusCode::OK).await
    }

    /// Registers a customer.
    pub async fn register(&self, name: &str) -> anyhow::Result<Customer> {
        #[derive(Deserialize)]
        struct Registered {
            token: String,
        }
        let url = self.url("v1/users");
        let body = serde_json::json!({ "name": name });
        let registered: Registered = expect(
            self.operator(Method::POST, &url).json(&body),
            StatusCode::CREATED,
        )
        .await?;
        Ok(Customer {
            authorization: bearer(&registered.token)
                .with_context(|| format!("the token POST {url} gave"))?,
        })
    }

    /// Whether order `id` shows in the orders read model, asked as the operator. The
    /// operator placed nothing, so the answer waits for no write; no answer is a no.
    pub async fn order_shows(&self, id: Ulid) -> bool {
        let url = self.url(&format!("v1/orders/{id}"));
        let answer = self.operator(Method::GET, &url).send().await;
        answer.is_ok_and(|response| response.status() == StatusCode::OK)
    }

    /// One page of a campaign's orders, newest first, as the operator lists them.
    pub async fn orders(
        &self,
        campaign_id: Ulid,
        status: Option<OrderStatus>,
        cursor: Option<&str>,
        limit: usize,
    ) -> anyhow::Result<OrderPage> {
        let mut url = self.url("v1/orders");
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("campaign_id", &campaign_id.to_string());
            if let Some(status) = status {
                query.append_pair("status", status.as_str());
            }
            if let Some(cursor) = cursor {
                query.append_pair("cursor", cursor);
            }
            query.append_pair("limit", &limit.to_string());
        }
        expect(self.operator(Method::GET, &url), StatusCode::OK).await
    }
}

/// `Bearer <token>`, kept out of debug output.
fn bearer(token: &str) -> anyhow::Result<HeaderValue> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| anyhow!("the token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Sends a setup or scan request and reads its body, or says which URL failed and why: the
/// server unreachable, a status other than `expected` (with the problem's code and detail,
/// and a hint for a 401), or a body that is not what API.md describes.
async fn expect<T: DeserializeOwned>(
    request: RequestBuilder,
    expected: StatusCode,
) -> anyhow::Result<T> {
    let (client, request) = request.build_split();
    let request = request.context("building a request")?;
    let what = format!("{} {}", request.method(), request.url());
    let response = client
        .execute(request)
        .await
        .with_context(|| format!("{what}: no answer"))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .with_context(|| format!("{what}: the answer broke off"))?;
    if status != expected {
        let why = match serde_json::from_slice::<Problem>(&bytes) {
            Ok(p) => format!(
                "{} {}",
                p.code.unwrap_or_default(),
                p.detail.unwrap_or_default()
            ),
            Err(_) => String::from_utf8_lossy(&bytes).chars().take(200).collect(),
        };
        let hint = if status == StatusCode::UNAUTHORIZED {
            " (is --operator-token the server's GROUPBUY_OPERATOR_TOKEN?)"
        } else {
            ""
        };
        return Err(anyhow!(
            "{what}: answered {status}, expected {expected}: {}{hint}",
            why.trim()
        ));
    }
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{what}: the {status} answer is not the body API.md describes"))
}

/// A registered customer, as the load uses them.
pub struct Customer {
    /// `Bearer <their token>`.
    pub authorization: HeaderValue,
}

/// A campaign, with what the load needs of it.
#[derive(Clone, Debug, Deserialize)]
pub struct Campaign {
    /// Its id.
    pub campaign_id: Ulid,
    /// The most units one customer may hold.
    pub per_user_limit: u32,
    /// `scheduled`, `open` or `closed`: only an open one sells.
    pub status: String,
    /// Its units.
    pub stock: Stock,
}

/// A campaign's units, as signed numbers so that a negative one is reported, not refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct Stock {
    /// Every unit the campaign ever had.
    pub total: i64,
    /// Units nobody holds.
    pub available: i64,
    /// Units held for orders awaiting payment.
    pub reserved: i64,
    /// Units paid for.
    pub sold: i64,
}

/// Where an order stands, as API.md names the states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Placed; stock not decided yet.
    Pending,
    /// Stock reserved, payment requested.
    AwaitingPayment,
    /// Paid.
    Confirmed,
    /// Refused by the stock decision.
    Rejected,
    /// Cancelled after placing.
    Cancelled,
    /// A state this build does not know (a newer server).
    #[serde(other)]
    Unknown,
}

impl OrderStatus {
    /// The name API.md gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::AwaitingPayment => "awaiting_payment",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Unknown => "unknown",
        }
    }

    /// Whether the order's units count against the stock and the customer's limit.
    pub fn holds_units(self) -> bool {
        matches!(self, OrderStatus::AwaitingPayment | OrderStatus::Confirmed)
    }
}

/// An order, with what the report needs of it.
#[derive(Clone, Debug, Deserialize)]
pub struct Order {
    /// Its id.
    pub order_id: Ulid,
    /// Who placed it.
    pub user_id: Ulid,
    /// Units.
    pub quantity: u32,
    /// Where it stands.
    pub status: OrderStatus,
    /// Why it was rejected or cancelled.
    pub reason: Option<String>,
    /// When it was placed, by the server's clock.
    pub created_at: DateTime<Utc>,
    /// When it last changed, by the server's clock.
    pub updated_at: DateTime<Utc>,
}

/// A page of orders.
#[derive(Debug, Deserialize)]
pub struct OrderPage {
    /// The orders, newest first.
    pub items: Vec<Order>,
    /// Where the next page starts; `None` on the last.
    pub next_cursor: Option<String>,
}

/// What the load reads of the answer to `POST /v1/orders`.
#[derive(Debug, Deserialize)]
pub struct PlacedOrder {
    /// The new order's id.
    pub order_id: Ulid,
    /// `pending`, or with `Prefer: wait` as far as the saga got.
    pub status: OrderStatus,
}

/// What the load reads of a problem+json answer.
#[derive(Debug, Deserialize)]
pub struct Problem {
    /// The stable code.
    pub code: Option<String>,
    /// What went wrong.
    pub detail: Option<String>,
}
