//! Which topic of the mirror an event travels in: the events of the categories that consumers
//! read together travel in messages of their own, on subjects of their own
//! (`<prefix>.events.<partition>.<topic>`), so that a consumer is delivered only the messages
//! of the topic it reads ([`crate::subscription::Handler::topic`]) rather than every message,
//! to read through for the few events it wants. In a sale, a third of the events are the
//! customers' holdings, which no consumer reads, and the campaigns projection wants one event
//! in about seventy (docs/adr/0012, "Topics").
//!
//! The table is fixed, like the partition of a stream: a change of it takes a drained mirror,
//! as a message in flight must reach the consumers of its events' new topic.

/// A topic of the mirror.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// Orders and their payments (`order`, `payment`): the order saga and the orders
    /// projection.
    Orders,
    /// Campaigns and their stock buckets (`campaign`, `stock`): the campaigns projection.
    Campaigns,
    /// Every other category (the customers' holdings, users, stores): read by no consumer
    /// today, kept in the mirror for any that comes.
    Other,
}

impl Topic {
    /// The topic of the events of streams of `category`.
    pub fn of(category: &str) -> Topic {
        match category {
            "order" | "payment" => Topic::Orders,
            "campaign" | "stock" => Topic::Campaigns,
            _ => Topic::Other,
        }
    }

    /// The topic of the events of `stream_id` (`<category>-<id>`).
    pub fn of_stream(stream_id: &str) -> Topic {
        Topic::of(stream_id.split_once('-').map_or(stream_id, |(c, _)| c))
    }

    /// Its name, the last token of its subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Orders => "orders",
            Topic::Campaigns => "campaigns",
            Topic::Other => "other",
        }
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_category_travels_with_those_read_with_it() {
        assert_eq!(Topic::of_stream("order-01JD"), Topic::Orders);
        assert_eq!(Topic::of_stream("payment-01JD"), Topic::Orders);
        assert_eq!(Topic::of_stream("campaign-01JD"), Topic::Campaigns);
        assert_eq!(Topic::of_stream("stock-01JD-2"), Topic::Campaigns);
        for other in ["holding-01JD-01JE", "user-01JD", "store-01JD", "oddity"] {
            assert_eq!(Topic::of_stream(other), Topic::Other, "{other}");
        }
    }
}
