//! What an event does to a read model, as a short list of store-neutral operations.
//!
//! Each projection turns an event into [`Op`]s here, once; the memory store and the Redis
//! store only execute them. Both stores therefore fold the log the same way, and the
//! in-memory fold the audit compares against is the Redis fold by construction.
//!
//! Ops are written so the result does not depend on how events of *different* streams
//! interleave (projections handle streams in parallel lanes): an order's payment lives in its
//! own record, joined when the order is read, and `updated_at` only ever moves forward.

use commands::bus::Topic;
use domain::campaign::CampaignEvent;
use domain::order::{OrderEvent, OrderStatus};
use domain::payment::{PaymentEvent, PaymentStatus};
use domain::stock::StockBucketEvent;
use domain::{CampaignId, Cents, OrderId, PaymentId, StoreId, Timestamp, UserId};
use schemas::{Envelope, SchemaError};
use serde::Serialize;

/// The read models, each fed by its own consumer and rebuilt on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProjectionName {
    /// Campaigns with their stock.
    Campaigns,
    /// Orders with their payment, by customer and by campaign.
    Orders,
}

impl ProjectionName {
    /// Every projection.
    pub const ALL: [ProjectionName; 2] = [ProjectionName::Campaigns, ProjectionName::Orders];

    /// The name operators use.
    pub fn as_str(self) -> &'static str {
        match self {
            ProjectionName::Campaigns => "campaigns",
            ProjectionName::Orders => "orders",
        }
    }

    /// The stream categories it reads.
    pub fn categories(self) -> &'static [&'static str] {
        match self {
            ProjectionName::Campaigns => &["campaign", "stock"],
            ProjectionName::Orders => &["order", "payment"],
        }
    }

    /// The topic of the mirror its events travel in: that of each of its categories.
    pub fn topic(self) -> Topic {
        match self {
            ProjectionName::Campaigns => Topic::Campaigns,
            ProjectionName::Orders => Topic::Orders,
        }
    }

    /// Whether it reads events of `stream_id`.
    pub fn reads(self, stream_id: &str) -> bool {
        let category = stream_id.split_once('-').map_or(stream_id, |(c, _)| c);
        self.categories().contains(&category)
    }

    /// The projection that holds views of `stream_id`, if any.
    pub fn of_stream(stream_id: &str) -> Option<ProjectionName> {
        Self::ALL.into_iter().find(|p| p.reads(stream_id))
    }

    /// Its index in [`ProjectionName::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ProjectionName {
    type Err = UnknownProjection;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| UnknownProjection(s.to_owned()))
    }
}

/// A name that is not a projection.
#[derive(Debug, thiserror::Error)]
#[error("no projection is called {0:?}; there are campaigns and orders")]
pub struct UnknownProjection(pub String);

/// One change to a read model. Times are nanoseconds since the Unix epoch.
///
/// It serializes as the Redis store's Lua functions read it: every number a string (Lua's
/// numbers are doubles, too narrow for nanoseconds), no field that is absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A new campaign, with its full stock available.
    Campaign {
        /// Which.
        campaign_id: CampaignId,
        /// Publishing store.
        store_id: StoreId,
        /// The drink.
        sku: String,
        /// Headline.
        title: String,
        /// Deal price.
        #[serde(serialize_with = "lua::cents")]
        price_cents: Cents,
        /// Initial stock.
        #[serde(serialize_with = "lua::number")]
        quota: u32,
        /// Per-user limit.
        #[serde(serialize_with = "lua::number")]
        per_user_limit: u32,
        /// Window start.
        #[serde(serialize_with = "lua::number")]
        starts_at: i64,
        /// Window end.
        #[serde(serialize_with = "lua::number")]
        ends_at: i64,
        /// Payment window.
        #[serde(serialize_with = "lua::number")]
        payment_timeout_seconds: u32,
    },
    /// Units moved between the stock's buckets.
    Stock {
        /// Which campaign.
        campaign_id: CampaignId,
        /// Change of `total`.
        #[serde(serialize_with = "lua::number")]
        total: i64,
        /// Change of `available`.
        #[serde(serialize_with = "lua::number")]
        available: i64,
        /// Change of `reserved`.
        #[serde(serialize_with = "lua::number")]
        reserved: i64,
        /// Change of `sold`.
        #[serde(serialize_with = "lua::number")]
        sold: i64,
    },
    /// An operator closed the campaign.
    Close {
        /// Which campaign.
        campaign_id: CampaignId,
        /// When.
        #[serde(serialize_with = "lua::number")]
        at: i64,
    },
    /// A new order, pending.
    Order {
        /// Which.
        order_id: OrderId,
        /// Whose.
        user_id: UserId,
        /// For which campaign.
        campaign_id: CampaignId,
        /// Units.
        #[serde(serialize_with = "lua::number")]
        quantity: u32,
        /// Price.
        #[serde(serialize_with = "lua::cents")]
        amount_cents: Cents,
        /// When placed.
        #[serde(serialize_with = "lua::number")]
        at: i64,
    },
    /// An order moved on.
    OrderStatus {
        /// Which.
        order_id: OrderId,
        /// Where it stands now.
        status: OrderStatus,
        /// Why it was rejected or cancelled; empty otherwise.
        reason: String,
        /// Its payment, when this change requested one.
        #[serde(skip_serializing_if = "Option::is_none")]
        payment_id: Option<PaymentId>,
        /// When.
        #[serde(serialize_with = "lua::number")]
        at: i64,
    },
    /// A payment was answered (or, in an older log, requested in its own stream).
    Payment {
        /// Which.
        payment_id: PaymentId,
        /// Its order and amount, on an older log's request.
        #[serde(
            skip_serializing_if = "Option::is_none",
            serialize_with = "lua::requested"
        )]
        requested: Option<(OrderId, Cents)>,
        /// Where it stands now.
        status: PaymentStatus,
        /// When.
        #[serde(serialize_with = "lua::number")]
        at: i64,
    },
}

/// How [`Op`]'s fields serialize for the Lua functions.
mod lua {
    use domain::{Cents, OrderId};
    use serde::ser::{SerializeTuple, Serializer};

    pub(super) fn number<S: Serializer>(
        number: &impl std::fmt::Display,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(number)
    }

    pub(super) fn cents<S: Serializer>(cents: &Cents, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&cents.get())
    }

    /// Only called when there is one (`skip_serializing_if`): `[order id, amount]`.
    pub(super) fn requested<S: Serializer>(
        requested: &Option<(OrderId, Cents)>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let Some((order_id, amount)) = requested else {
            return serializer.serialize_none();
        };
        let mut pair = serializer.serialize_tuple(2)?;
        pair.serialize_element(order_id)?;
        pair.serialize_element(&amount.get().to_string())?;
        pair.end()
    }
}

/// Nanoseconds since the Unix epoch, the precision events carry.
pub fn nanos(at: Timestamp) -> i64 {
    at.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

/// The time `nanos` stands for.
pub fn timestamp(nanos: i64) -> Timestamp {
    chrono::DateTime::from_timestamp_nanos(nanos)
}

/// One event as a projection applies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// Its stream.
    pub stream_id: String,
    /// Its version in the stream; the projection's dedupe key.
    pub version: u64,
    /// Its global position; how far the projection got.
    pub position: u64,
    /// What it does.
    pub ops: Vec<Op>,
}

impl Change {
    /// What `envelope` does to `projection`; `None` when the projection does not read it.
    pub fn of(
        projection: ProjectionName,
        envelope: &Envelope,
    ) -> Result<Option<Change>, SchemaError> {
        if !projection.reads(&envelope.stream_id) {
            return Ok(None);
        }
        Ok(Some(Change {
            stream_id: envelope.stream_id.clone(),
            version: envelope.stream_version,
            position: envelope.global_position,
            ops: ops(envelope)?,
        }))
    }
}

/// The ops of one event of a campaign, stock bucket, order or payment stream; none for other
/// streams, and none for events whose stream id does not name their aggregate.
pub fn ops(envelope: &Envelope) -> Result<Vec<Op>, SchemaError> {
    let Some((_, id)) = envelope.stream_id.split_once('-') else {
        return Ok(Vec::new());
    };
    if envelope.category() == "stock" {
        // `stock-<campaign id>-<bucket>`
        let Some(campaign_id) = id
            .split_once('-')
            .and_then(|(c, _)| ulid::Ulid::from_string(c).ok())
        else {
            return Ok(Vec::new());
        };
        let event: StockBucketEvent = schemas::from_envelope(envelope)?;
        return Ok(bucket_ops(CampaignId::from_ulid(campaign_id), event));
    }
    let Ok(id) = ulid::Ulid::from_string(id) else {
        return Ok(Vec::new());
    };
    Ok(match envelope.category() {
        "campaign" => campaign_ops(CampaignId::from_ulid(id), schemas::from_envelope(envelope)?),
        "order" => vec![order_op(
            OrderId::from_ulid(id),
            schemas::from_envelope(envelope)?,
        )],
        "payment" => vec![payment_op(
            PaymentId::from_ulid(id),
            schemas::from_envelope(envelope)?,
        )],
        _ => Vec::new(),
    })
}

fn campaign_ops(campaign_id: CampaignId, event: CampaignEvent) -> Vec<Op> {
    let stock = |total: u32, available: i64, reserved: i64, sold: i64| Op::Stock {
        campaign_id,
        total: i64::from(total),
        available,
        reserved,
        sold,
    };
    let op = match event {
        CampaignEvent::CampaignCreated(c) => Op::Campaign {
            campaign_id,
            store_id: c.store_id,
            sku: c.sku,
            title: c.title,
            price_cents: c.price_cents,
            quota: c.quota,
            per_user_limit: c.per_user_limit,
            starts_at: nanos(c.starts_at),
            ends_at: nanos(c.ends_at),
            payment_timeout_seconds: c.payment_timeout_seconds,
        },
        CampaignEvent::StockReplenished { quantity, .. } => {
            stock(quantity, i64::from(quantity), 0, 0)
        }
        CampaignEvent::CampaignClosed { at } => Op::Close {
            campaign_id,
            at: nanos(at),
        },
        CampaignEvent::StockMoved {
            reserved,
            released,
            sold,
            ..
        } => return moved_ops(campaign_id, reserved, released, sold),
        // Units moving between buckets stay available to the campaign.
        CampaignEvent::StockTransferredOut { .. } | CampaignEvent::StockTransferredIn { .. } => {
            return Vec::new()
        }
        CampaignEvent::StockReserved { quantity, .. } => {
            let q = i64::from(quantity);
            stock(0, -q, q, 0)
        }
        CampaignEvent::StockReleased { quantity, .. } => {
            let q = i64::from(quantity);
            stock(0, q, -q, 0)
        }
        CampaignEvent::StockSold { quantity, .. } => {
            let q = i64::from(quantity);
            stock(0, 0, -q, q)
        }
    };
    vec![op]
}

fn bucket_ops(campaign_id: CampaignId, event: StockBucketEvent) -> Vec<Op> {
    match event {
        StockBucketEvent::StockMoved {
            reserved,
            released,
            sold,
            ..
        } => moved_ops(campaign_id, reserved, released, sold),
        StockBucketEvent::StockTransferredOut { .. }
        | StockBucketEvent::StockTransferredIn { .. } => Vec::new(),
    }
}

/// A bucket's units taken for reservations, given back and sold, as the campaign's stock sees
/// them: available, reserved and sold move; the total does not.
fn moved_ops(campaign_id: CampaignId, reserved: u32, released: u32, sold: u32) -> Vec<Op> {
    let (reserved, released, sold) = (i64::from(reserved), i64::from(released), i64::from(sold));
    vec![Op::Stock {
        campaign_id,
        total: 0,
        available: released - reserved,
        reserved: reserved - released - sold,
        sold,
    }]
}

fn order_op(order_id: OrderId, event: OrderEvent) -> Op {
    let status = |status, reason: String, payment_id, at| Op::OrderStatus {
        order_id,
        status,
        reason,
        payment_id,
        at: nanos(at),
    };
    match event {
        OrderEvent::OrderPlaced {
            user_id,
            campaign_id,
            quantity,
            amount_cents,
            placed_at,
            ..
        } => Op::Order {
            order_id,
            user_id,
            campaign_id,
            quantity,
            amount_cents,
            at: nanos(placed_at),
        },
        OrderEvent::OrderRejected { reason, at } => {
            status(OrderStatus::Rejected, snake(&reason), None, at)
        }
        OrderEvent::OrderAwaitingPayment { payment_id, at, .. } => status(
            OrderStatus::AwaitingPayment,
            String::new(),
            Some(payment_id),
            at,
        ),
        OrderEvent::OrderConfirmed { at, .. } => {
            status(OrderStatus::Confirmed, String::new(), None, at)
        }
        OrderEvent::OrderCancelled { reason, at } => {
            status(OrderStatus::Cancelled, snake(&reason), None, at)
        }
    }
}

fn payment_op(payment_id: PaymentId, event: PaymentEvent) -> Op {
    let (requested, status, at) = match event {
        PaymentEvent::PaymentRequested {
            order_id,
            amount_cents,
            at,
            ..
        } => (Some((order_id, amount_cents)), PaymentStatus::Pending, at),
        PaymentEvent::PaymentSucceeded { at, .. } => (None, PaymentStatus::Succeeded, at),
        PaymentEvent::PaymentFailed { at, .. } => (None, PaymentStatus::Failed, at),
        PaymentEvent::PaymentTimedOut { at } => (None, PaymentStatus::TimedOut, at),
        PaymentEvent::PaymentRefunded { at } => (None, PaymentStatus::Refunded, at),
    };
    Op::Payment {
        payment_id,
        requested,
        status,
        at: nanos(at),
    }
}

/// The snake_case name serde gives a unit variant.
pub(crate) fn snake<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// The value of a unit variant from its snake_case name.
pub(crate) fn unsnake<T: serde::de::DeserializeOwned>(name: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_projection_reads_the_topic_its_categories_travel_in() {
        for name in ProjectionName::ALL {
            for category in name.categories() {
                assert_eq!(Topic::of(category), name.topic(), "{name}: {category}");
            }
        }
    }
}
