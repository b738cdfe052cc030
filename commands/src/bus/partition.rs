//! Which partition of the mirror a stream's events travel in (docs/adr/0012).
//!
//! The relay publishes each event on `<prefix>.events.<partition>.<topic>` (the topic: see
//! [`super::topic`]), and every consumer is one durable consumer per partition, leased by one
//! instance at a time ([`crate::lease`]). A stream's events all travel in one partition, so
//! one instance handles them, in order. The partition is a pure function of the stream id:
//!
//! - an order's and its payment's streams (`order-<id>`, `payment-<id>`): the 16-bit key the
//!   gateway wrote into the order's id when it minted it ([`order_ulid`]), the key of its
//!   campaign and customer;
//! - a customer's holding in a campaign (`holding-<campaign>-<user>`): that same key, so the
//!   orders of one customer in one campaign wake one instance's writer, which alone decides
//!   them against the holding;
//! - a campaign and its stock buckets (`campaign-<id>`, `stock-<id>-<bucket>`): the campaign's
//!   hash plus the bucket, so a campaign's buckets spread over partitions as its customers do;
//! - any other stream: its hash.
//!
//! An order minted before keys were written has random bits there: it maps to some partition,
//! always the same one, just not its customer's. That costs a writer conflict now and then,
//! never correctness: the log's expected versions decide every race.

use domain::{CampaignId, UserId};
use ulid::Ulid;

/// Partitions of a deployment unless configured: up to four instances share each consumer.
/// More partitions cost every instance: the relay sends a message per partition it has events
/// for, and each costs the broker and every consumer about the same whatever it carries. One
/// instance on a flash sale spent about a tenth more CPU an order on 4 partitions than on 1,
/// and two thirds more on 16 (docs/benchmarks.md, "Partitions").
pub const PARTITIONS_DEFAULT: u16 = 4;
/// Most partitions a deployment may have.
pub const PARTITIONS_MAX: u16 = 1_024;

/// Where the key sits in an order's ULID: bits 79..64, the top of its random part.
const KEY_SHIFT: u32 = 64;

/// FNV-1a, 64 bits: fixed for ever (every instance and every version must agree), unlike
/// Rust's randomised `Hash`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// A hash folded to 16 bits.
fn key16(parts: &[&[u8]]) -> u16 {
    let hash = fnv1a(parts);
    (hash ^ (hash >> 16) ^ (hash >> 32) ^ (hash >> 48)) as u16
}

/// The key of a customer's orders in a campaign, from the ids' text.
fn customer_key(campaign: &str, user: &str) -> u16 {
    key16(&[campaign.as_bytes(), b"/", user.as_bytes()])
}

/// `ulid` with the key of `campaign` and `user` written into bits 79..64: a new order's id.
/// Its time and the rest of its random bits are kept.
pub fn order_ulid(ulid: Ulid, campaign: CampaignId, user: UserId) -> Ulid {
    let key = customer_key(&campaign.to_string(), &user.to_string());
    let bits = ulid.0 & !(0xffff_u128 << KEY_SHIFT) | (u128::from(key) << KEY_SHIFT);
    Ulid(bits)
}

/// The 16-bit key of a stream (see the module's docs).
pub fn stream_key(stream_id: &str) -> u16 {
    let Some((category, id)) = stream_id.split_once('-') else {
        return key16(&[stream_id.as_bytes()]);
    };
    match category {
        "order" | "payment" => match id.parse::<Ulid>() {
            Ok(ulid) => (ulid.0 >> KEY_SHIFT) as u16,
            Err(_) => key16(&[stream_id.as_bytes()]),
        },
        "holding" => match id.split_once('-') {
            Some((campaign, user)) => customer_key(campaign, user),
            None => key16(&[stream_id.as_bytes()]),
        },
        "campaign" => key16(&[id.as_bytes()]),
        "stock" => match id.rsplit_once('-').map(|(c, b)| (c, b.parse::<u16>())) {
            Some((campaign, Ok(bucket))) => key16(&[campaign.as_bytes()]).wrapping_add(bucket),
            _ => key16(&[stream_id.as_bytes()]),
        },
        _ => key16(&[stream_id.as_bytes()]),
    }
}

/// The partition of `stream_id` among `partitions` (at least 1).
pub fn partition_of(stream_id: &str, partitions: u16) -> u16 {
    stream_key(stream_id) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u64) -> (CampaignId, UserId) {
        (
            CampaignId::from_ulid(Ulid::from_parts(1_700_000_000_000, n.into())),
            UserId::from_ulid(Ulid::from_parts(1_700_000_000_001, (n * 7 + 3).into())),
        )
    }

    #[test]
    fn an_orders_streams_travel_with_its_customers_holding() {
        for n in 0..200 {
            let (campaign, user) = ids(n);
            let minted = Ulid::from_parts(1_700_000_123_456, u128::from(n) * 0x1_0001 + 99);
            let order = order_ulid(minted, campaign, user);
            assert_eq!(
                order.timestamp_ms(),
                minted.timestamp_ms(),
                "the time is kept"
            );
            assert_eq!(
                order.0 & 0xffff_ffff_ffff_ffff,
                minted.0 & 0xffff_ffff_ffff_ffff,
                "the low random bits are kept"
            );
            let holding = format!("holding-{campaign}-{user}");
            for partitions in [1, 3, 16, 64, PARTITIONS_MAX] {
                let p = partition_of(&holding, partitions);
                assert_eq!(partition_of(&format!("order-{order}"), partitions), p);
                assert_eq!(partition_of(&format!("payment-{order}"), partitions), p);
                assert!(p < partitions);
            }
        }
    }

    #[test]
    fn customers_and_buckets_spread_over_the_partitions() {
        let (one, _) = ids(0);
        let mut customers = [0u32; 16];
        for n in 0..1_600 {
            let (_, user) = ids(n);
            customers[usize::from(partition_of(&format!("holding-{one}-{user}"), 16))] += 1;
        }
        // 100 a partition on average; a fair hash keeps every one well away from 0 and 200.
        assert!(
            customers.iter().all(|&n| (50..150).contains(&n)),
            "{customers:?}"
        );
        let (campaign, _) = ids(5);
        let home = partition_of(&format!("campaign-{campaign}"), 16);
        for bucket in 1..16u16 {
            assert_eq!(
                partition_of(&format!("stock-{campaign}-{bucket}"), 16),
                (home + bucket) % 16,
                "bucket {bucket} sits {bucket} partitions after the campaign"
            );
        }
    }

    #[test]
    fn any_stream_id_has_a_partition_and_always_the_same() {
        for stream in [
            "store-01HX",
            "user-01HY",
            "order-not-a-ulid",
            "holding-only",
            "stock-x-y",
            "nocategory",
            "",
        ] {
            let p = partition_of(stream, 16);
            assert!(p < 16);
            assert_eq!(partition_of(stream, 16), p);
        }
        assert_eq!(partition_of("order-x", 0), 0, "no partitions reads as one");
    }
}
