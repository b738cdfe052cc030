//! The load: `--connections` workers placing orders until `--duration` is up.
//!
//! Orders are numbered from one shared counter. Order `n` goes to customer `n % customers`,
//! carries the Idempotency-Key `<run id>-<n>`, and on a fixed schedule is due `n / rate`
//! seconds after the start. A worker takes the next number, waits until it is due, sends it
//! and waits for the answer; so there are never more requests in flight than workers.
//!
//! On a schedule, latency is measured from when the order was due, not from when it went out:
//! a server that stalls holds every worker, the orders due meanwhile go out late, and their
//! latency shows the stall instead of hiding it (coordinated omission). As fast as possible,
//! an order is due when its worker is free, so there the two are the same.
//!
//! Each worker keeps its own [`Tally`] (histograms, counts, placed ids) and they are merged
//! once at the end: no lock is waited for per request. The only shared writes are a few
//! relaxed atomic counters, for the order numbers and the progress line, and the newest
//! accepted order, behind a lock a worker only tries (it skips the write when it is taken).
//!
//! Meanwhile a sampler follows the newest accepted order into the read model every
//! [`LAG_SAMPLE_EVERY`]: it asks for the order as the operator (who placed nothing, so the
//! answer waits for no write) until it shows. The time from its 202 to its showing is how far
//! the orders read model is behind under the load. When the load's time is up, a sample that
//! has not shown yet counts as its wait so far, so the drain that follows starts on time.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use tokio::time::Instant;
use ulid::Ulid;

use super::api::{Api, Customer, OrderStatus, PlacedOrder, Problem};
use super::setup::Sale;
use super::{LoadgenArgs, ORDERS_MAX};

/// The longest latency a histogram tells apart, in microseconds (an hour); longer ones are
/// counted as an hour.
pub const LATENCY_MAX_US: u64 = 3_600_000_000;
/// Significant digits the histograms keep: latencies are exact to 0.1 %.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// How often the progress line is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);
/// How often the sampler follows an order into the read model.
const LAG_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// How often it asks whether the order shows.
const LAG_POLL: Duration = Duration::from_millis(2);

/// Latencies in microseconds. `u32` counts are plenty (a run places at most
/// [`ORDERS_MAX`] orders) and halve the memory of `u64` ones: each worker holds two
/// histograms of about 94 KiB.
pub type Latencies = Histogram<u32>;

/// An empty histogram of latencies.
pub fn latencies() -> Latencies {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGNIFICANT_DIGITS)
        .expect("the bounds are valid")
}

/// Records a latency, counting one over [`LATENCY_MAX_US`] as the maximum.
pub fn record(histogram: &mut Latencies, latency: Duration) {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    histogram.saturating_record(us.min(LATENCY_MAX_US));
}

/// When orders are sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Each worker sends its next order as soon as it has the answer to the last.
    AsFastAsPossible,
    /// Orders are due at a fixed rate, whatever the answers do.
    Fixed {
        /// Orders a second; never 0.
        per_s: u32,
    },
}

impl Schedule {
    /// The schedule `--rate` asks for.
    pub fn of(rate_per_s: u32) -> Schedule {
        match rate_per_s {
            0 => Schedule::AsFastAsPossible,
            per_s => Schedule::Fixed { per_s },
        }
    }

    /// How long after the start order `n` is due; `None` when it is due whenever a worker
    /// is free.
    pub fn due_after(self, n: u64) -> Option<Duration> {
        match self {
            Schedule::AsFastAsPossible => None,
            Schedule::Fixed { per_s } => {
                let nanos = u128::from(n) * 1_000_000_000 / u128::from(per_s);
                Some(Duration::from_nanos(
                    u64::try_from(nanos).unwrap_or(u64::MAX),
                ))
            }
        }
    }
}

/// What one worker (or, merged, the whole load) saw.
pub struct Tally {
    /// Orders sent.
    pub sent: u64,
    /// Latency of every 202 answer.
    pub accept: Latencies,
    /// Latency of the 202 answers to `Prefer: wait` that were no longer `pending`.
    pub decide: Latencies,
    /// Answers by HTTP status and problem code.
    pub answers: BTreeMap<(u16, Option<String>), u64>,
    /// Requests that got no (readable) answer, by kind.
    pub transport_errors: BTreeMap<&'static str, u64>,
    /// The ids of the accepted orders.
    pub placed: Vec<Ulid>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            sent: 0,
            accept: latencies(),
            decide: latencies(),
            answers: BTreeMap::new(),
            transport_errors: BTreeMap::new(),
            placed: Vec::new(),
        }
    }

    /// Adds another worker's tally to this one.
    pub fn merge(&mut self, other: Tally) {
        self.sent += other.sent;
        self.accept
            .add(&other.accept)
            .expect("histograms of the same bounds add up");
        self.decide
            .add(&other.decide)
            .expect("histograms of the same bounds add up");
        for (answer, count) in other.answers {
            *self.answers.entry(answer).or_default() += count;
        }
        for (kind, count) in other.transport_errors {
            *self.transport_errors.entry(kind).or_default() += count;
        }
        self.placed.extend(other.placed);
    }

    fn record(&mut self, answer: Answer, latency: Duration, waited: bool, shared: &Shared) {
        match answer {
            Answer::Accepted(order) => {
                record(&mut self.accept, latency);
                if waited && order.status != OrderStatus::Pending {
                    record(&mut self.decide, latency);
                }
                *self
                    .answers
                    .entry((StatusCode::ACCEPTED.as_u16(), None))
                    .or_default() += 1;
                self.placed.push(order.order_id);
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut newest) = shared.newest.try_lock() {
                    *newest = Some((order.order_id, Instant::now()));
                }
            }
            Answer::Refused { status, code } => {
                *self.answers.entry((status, code)).or_default() += 1;
                shared.refused.fetch_add(1, Ordering::Relaxed);
            }
            Answer::Failed(kind) => {
                *self.transport_errors.entry(kind).or_default() += 1;
                shared.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The load, once every worker is done.
pub struct Load {
    /// From the first order due to the last answer.
    pub elapsed: Duration,
    /// Whether the load stopped at [`ORDERS_MAX`] before its duration was up.
    pub capped: bool,
    /// Everything the workers saw, merged.
    pub tally: Tally,
    /// The ids of the accepted orders: only these count in the scan.
    pub placed: HashSet<Ulid>,
    /// From a sampled order's 202 to its showing in the orders read model.
    pub shown: Latencies,
}

/// What the answer to one order was.
enum Answer {
    /// 202: placed.
    Accepted(PlacedOrder),
    /// Any other status, with the problem's code when the body is problem+json.
    Refused { status: u16, code: Option<String> },
    /// No answer, or one that could not be read: the kind of failure.
    Failed(&'static str),
}

/// What every worker reads, and the counters they share.
struct Shared {
    client: reqwest::Client,
    /// Where orders go: one URL per instance.
    urls: Vec<Url>,
    /// Each customer's `Authorization` value, in the order orders are spread over them.
    authorizations: Vec<HeaderValue>,
    body: Bytes,
    prefer: Option<HeaderValue>,
    key_prefix: String,
    schedule: Schedule,
    start: Instant,
    end: Instant,
    next: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    /// The newest accepted order and when its answer came, for the lag sampler.
    newest: std::sync::Mutex<Option<(Ulid, Instant)>>,
}

/// Places orders over `--connections` workers for `--duration` seconds.
pub async fn drive(
    api: &Api,
    args: &LoadgenArgs,
    sale: &Sale,
    progress: bool,
) -> anyhow::Result<Load> {
    let body = serde_json::to_vec(&serde_json::json!({
        "campaign_id": sale.campaign_id(),
        "quantity": args.quantity,
    }))
    .expect("a JSON value serialises");
    let start = Instant::now();
    let shared = Arc::new(Shared {
        client: api.client().clone(),
        urls: Api::urls_on_every_instance(args, "v1/orders"),
        authorizations: sale
            .customers
            .iter()
            .map(|c: &Customer| c.authorization.clone())
            .collect(),
        body: Bytes::from(body),
        prefer: (args.wait > 0).then(|| {
            HeaderValue::try_from(format!("wait={}", args.wait)).expect("digits are a value")
        }),
        key_prefix: format!("loadgen-{}", sale.run_id),
        schedule: Schedule::of(args.rate),
        start,
        end: start + Duration::from_secs(args.duration),
        next: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        newest: std::sync::Mutex::new(None),
    });
    let mut workers = tokio::task::JoinSet::new();
    for index in 0..args.connections as usize {
        workers.spawn(worker(Arc::clone(&shared), index));
    }
    let bar = load_bar(progress, args.duration);
    let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
    let mut tally = Tally::new();
    let mut capped = false;
    let workers_done = async {
        loop {
            tokio::select! {
                done = workers.join_next() => match done {
                    Some(result) => {
                        let (worker_tally, worker_capped) =
                            result.context("a load worker failed")?;
                        tally.merge(worker_tally);
                        capped |= worker_capped;
                    }
                    None => return anyhow::Ok(start.elapsed()),
                },
                _ = ticks.tick() => show(&bar, &shared),
            }
        }
    };
    let (elapsed, shown) = tokio::join!(workers_done, sample_lag(api, &shared));
    let elapsed = elapsed?;
    bar.finish_and_clear();
    // The ids move into a set once, for the scan's look-ups; the tally keeps none.
    let placed: HashSet<Ulid> = std::mem::take(&mut tally.placed).into_iter().collect();
    Ok(Load {
        elapsed,
        capped,
        tally,
        placed,
        shown,
    })
}

/// Follows the newest accepted order into the orders read model every [`LAG_SAMPLE_EVERY`]
/// until the load's time is up; the time from each sampled order's 202 to its showing. Each
/// sample is followed on its own, so one order slow to show does not thin out the samples.
async fn sample_lag(api: &Api, shared: &Shared) -> Latencies {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut shown = latencies();
    let mut following = FuturesUnordered::new();
    let mut ticks = tokio::time::interval(LAG_SAMPLE_EVERY);
    let mut last = None;
    loop {
        tokio::select! {
            _ = ticks.tick(), if Instant::now() < shared.end => {
                let newest = *shared.newest.lock().expect("not poisoned");
                if let Some((order_id, answered)) = newest.filter(|(id, _)| last != Some(*id)) {
                    last = Some(order_id);
                    following.push(until_shown(api, order_id, answered, shared.end));
                }
            }
            Some(took) = following.next() => record(&mut shown, took),
            else => return shown,
        }
    }
}

/// How long after `answered` order `order_id` shows in the read model; at `end`, how long it
/// has waited so far.
async fn until_shown(api: &Api, order_id: Ulid, answered: Instant, end: Instant) -> Duration {
    loop {
        // Any answer but 200 (404, or 503 while a read model is rebuilt) is not yet.
        if api.order_shows(order_id).await || Instant::now() >= end {
            return answered.elapsed();
        }
        tokio::time::sleep(LAG_POLL).await;
    }
}

/// One worker: takes the next order number until the time (or [`ORDERS_MAX`]) is up. Returns
/// its tally, and whether it stopped at the cap.
async fn worker(shared: Arc<Shared>, index: usize) -> (Tally, bool) {
    // Connections are spread over the instances orders go to.
    let url = &shared.urls[index % shared.urls.len()];
    let mut tally = Tally::new();
    let idempotency_key = HeaderName::from_static("idempotency-key");
    let prefer = HeaderName::from_static("prefer");
    loop {
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        if n >= ORDERS_MAX {
            return (tally, true);
        }
        let due = match shared.schedule.due_after(n) {
            Some(offset) => shared.start + offset,
            None => Instant::now(),
        };
        if due >= shared.end {
            return (tally, false);
        }
        tokio::time::sleep_until(due).await;
        let customers = shared.authorizations.len() as u64;
        let authorization = &shared.authorizations[(n % customers) as usize];
        let mut request = shared
            .client
            .post(url.clone())
            .header(AUTHORIZATION, authorization.clone())
            .header(
                idempotency_key.clone(),
                HeaderValue::try_from(format!("{}-{n}", shared.key_prefix))
                    .expect("a ULID and digits are a value"),
            )
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(shared.body.clone());
        if let Some(wait) = &shared.prefer {
            request = request.header(prefer.clone(), wait.clone());
        }
        tally.sent += 1;
        shared.sent.fetch_add(1, Ordering::Relaxed);
        let answer = place(request).await;
        tally.record(answer, due.elapsed(), shared.prefer.is_some(), &shared);
    }
}

/// Sends one order and reads what the answer says.
async fn place(request: reqwest::RequestBuilder) -> Answer {
    let response = match request.send().await {
        Ok(response) => response,
        Err(e) => return Answer::Failed(failure_kind(&e)),
    };
    let status = response.status();
    let problem = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/problem+json"));
    let bytes = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => return Answer::Failed(failure_kind(&e)),
    };
    if status == StatusCode::ACCEPTED {
        return match serde_json::from_slice::<PlacedOrder>(&bytes) {
            Ok(order) => Answer::Accepted(order),
            // Placed, but which order is unknown: the scan will find one more than accepted.
            Err(_) => Answer::Failed("unreadable_202"),
        };
    }
    let code = if problem {
        serde_json::from_slice::<Problem>(&bytes)
            .ok()
            .and_then(|p| p.code)
    } else {
        None
    };
    Answer::Refused {
        status: status.as_u16(),
        code,
    }
}

/// A name for what kind of transport failure `e` is.
fn failure_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else if e.is_request() {
        "request"
    } else {
        "other"
    }
}

fn load_bar(progress: bool, duration_s: u64) -> indicatif::ProgressBar {
    if !progress {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(duration_s * 1_000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("load [{elapsed_precise}] {bar:30} {msg}")
            .expect("the template is valid"),
    );
    bar
}

fn show(bar: &indicatif::ProgressBar, shared: &Shared) {
    if bar.is_hidden() {
        return;
    }
    let elapsed = shared.start.elapsed();
    let accepted = shared.accepted.load(Ordering::Relaxed);
    bar.set_position(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
    bar.set_message(format!(
        "sent {} · accepted {accepted} ({:.0}/s) · refused {} · errors {}",
        shared.sent.load(Ordering::Relaxed),
        accepted as f64 / elapsed.as_secs_f64().max(1e-3),
        shared.refused.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_schedule_spaces_orders_evenly_from_the_start() {
        let schedule = Schedule::of(4);
        assert_eq!(schedule.due_after(0), Some(Duration::ZERO));
        assert_eq!(schedule.due_after(1), Some(Duration::from_millis(250)));
        assert_eq!(schedule.due_after(10), Some(Duration::from_millis(2_500)));
    }

    #[test]
    fn a_fixed_schedule_does_not_drift_over_many_orders() {
        // 3 a second is not a whole number of nanoseconds apart; computing each time from
        // the start, not by adding intervals, keeps order 3 000 000 at exactly 1 000 000 s.
        let schedule = Schedule::of(3);
        assert_eq!(
            schedule.due_after(3_000_000),
            Some(Duration::from_secs(1_000_000))
        );
        assert_eq!(
            schedule.due_after(1),
            Some(Duration::from_nanos(333_333_333))
        );
    }

    #[test]
    fn rate_zero_sends_whenever_a_worker_is_free() {
        assert_eq!(Schedule::of(0), Schedule::AsFastAsPossible);
        assert_eq!(Schedule::AsFastAsPossible.due_after(42), None);
    }

    #[test]
    fn a_latency_past_the_histogram_counts_as_its_maximum() {
        let mut histogram = latencies();
        record(&mut histogram, Duration::from_secs(2 * 3_600));
        record(&mut histogram, Duration::from_micros(1_500));
        assert_eq!(histogram.len(), 2);
        assert!(histogram.max() >= LATENCY_MAX_US);
        assert!(histogram.max() <= LATENCY_MAX_US + LATENCY_MAX_US / 1_000);
    }

    #[test]
    fn merged_tallies_add_up() {
        let mut one = Tally::new();
        let mut two = Tally::new();
        record(&mut one.accept, Duration::from_millis(1));
        record(&mut two.accept, Duration::from_millis(3));
        one.answers.insert((202, None), 1);
        two.answers.insert((202, None), 1);
        two.answers.insert((429, Some("rate_limited".into())), 5);
        two.transport_errors.insert("timeout", 2);
        one.placed.push(Ulid::new());
        two.placed.push(Ulid::new());
        one.sent = 1;
        two.sent = 8;
        one.merge(two);
        assert_eq!(one.sent, 9);
        assert_eq!(one.accept.len(), 2);
        assert_eq!(one.answers[&(202, None)], 2);
        assert_eq!(one.answers[&(429, Some("rate_limited".into()))], 5);
        assert_eq!(one.transport_errors["timeout"], 2);
        assert_eq!(one.placed.len(), 2);
    }
}
