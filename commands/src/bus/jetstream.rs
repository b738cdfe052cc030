//! The production bus: NATS JetStream.
//!
//! Two streams, both declared here in full so the code is the one place their configuration
//! lives (see docs/adr/0005-jetstream-mirror.md):
//!
//! - `<PREFIX>_EVENTS` holds the mirror of the log, in batches of one partition's events of one
//!   topic, on the subject `<prefix>.events.<partition>.<topic>` (earlier versions published
//!   on `<prefix>.events.<partition>`, before that every batch on `<prefix>.events.log`, and
//!   before that one event a message on `<prefix>.events.<category>.<stream id>`: a consumer
//!   of every event still reads them all);
//! - `<PREFIX>_DEAD_LETTERS` holds what consumers gave up on, on
//!   `<prefix>.dead.<consumer>`.
//!
//! Durability: the streams use file storage with [`JetStreamSettings::replicas`] replicas (one
//! by default; three on a JetStream cluster keep the mirror through the loss of a node). A
//! server acknowledges a publish once the message is written to the store (on a quorum of the
//! replicas), *before* it is fsynced, so a crash of the machines (not of a process) can lose
//! the last acknowledged messages. The relay checks for that when it takes over: when the
//! stream ends before the relay's checkpoint it publishes again from where the stream ends
//! ([`Bus::published`]).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::header::{HeaderMap, NATS_MESSAGE_ID};
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self as js, Context};
use async_trait::async_trait;
use futures::StreamExt;

use super::{
    batches, format_cursor, header, parse_cursor, Acker, Bus, BusError, ConsumerOptions,
    Deliveries, Delivery, Letter, Published, StoredLetter, Topic,
};
use crate::log::RecordedEvent;
use crate::trace::TraceParent;

/// Where the mirror lives and how it keeps messages.
#[derive(Clone, Debug)]
pub struct JetStreamSettings {
    /// The NATS server, e.g. `nats://127.0.0.1:4222`, or several servers of one cluster
    /// separated by commas; the client also learns the cluster's other servers from the one
    /// it reaches.
    pub url: String,
    /// First token of every subject, and (upper-cased) of the stream names. Tests use a
    /// prefix of their own.
    pub prefix: String,
    /// How long JetStream remembers message ids to drop re-published events.
    pub duplicate_window: Duration,
    /// How long the mirror keeps events. The Postgres log keeps them for ever; a consumer
    /// that falls further behind than this rebuilds from the log.
    pub max_age: Duration,
    /// How many partitions the log is published in (see [`crate::bus::partition`]). Changed
    /// only with a drain: a stream's events in flight must not cross partitions.
    pub partitions: u16,
    /// How many servers of a JetStream cluster keep each stream (1 to 5; at most the number
    /// of servers). Durable consumers take the stream's count.
    pub replicas: usize,
    /// How published bodies are compressed. Consumers read either.
    pub compression: super::Compression,
}

impl JetStreamSettings {
    /// The defaults for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        JetStreamSettings {
            url: url.into(),
            prefix: "groupbuy".into(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::from_secs(7 * 24 * 3600),
            partitions: super::partition::PARTITIONS_DEFAULT,
            replicas: 1,
            compression: super::Compression::default(),
        }
    }

    fn stream_name(&self, suffix: &str) -> String {
        let prefix: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect();
        format!("{prefix}_{suffix}")
    }

    /// The name of the stream that mirrors the log.
    pub fn events_stream(&self) -> String {
        self.stream_name("EVENTS")
    }

    /// The name of the dead-letter stream.
    pub fn dead_letter_stream(&self) -> String {
        self.stream_name("DEAD_LETTERS")
    }

    /// The subject the batches of `topic` in partition `partition` are published on.
    pub fn events_subject(&self, partition: u16, topic: Topic) -> String {
        format!("{}.events.{partition}.{topic}", self.prefix)
    }

    /// What a consumer of `partition` and `topic` reads (`None`: every one).
    fn filter_subject(&self, partition: Option<u16>, topic: Option<Topic>) -> String {
        let partition = partition.map_or_else(|| "*".to_owned(), |p| p.to_string());
        match topic {
            Some(topic) => format!("{}.events.{partition}.{topic}", self.prefix),
            None if partition == "*" => format!("{}.events.>", self.prefix),
            None => format!("{}.events.{partition}.*", self.prefix),
        }
    }

    /// The subject of a consumer's dead letters.
    pub fn dead_letter_subject(&self, consumer: &str) -> String {
        format!("{}.dead.{consumer}", self.prefix)
    }

    /// The configuration of the stream that mirrors the log.
    pub fn events_config(&self) -> stream::Config {
        stream::Config {
            name: self.events_stream(),
            description: Some(EVENTS_DESCRIPTION.into()),
            subjects: vec![format!("{}.events.>", self.prefix)],
            storage: StorageType::File,
            num_replicas: self.replicas,
            // Consumers keep their own position; messages go when they are old, not when
            // consumed, so a new consumer or a rebuild can start from any retained point.
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_age: self.max_age,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }

    /// The configuration of the dead-letter stream.
    pub fn dead_letter_config(&self) -> stream::Config {
        stream::Config {
            name: self.dead_letter_stream(),
            description: Some("groupbuy: events consumers gave up on".into()),
            subjects: vec![format!("{}.dead.>", self.prefix)],
            storage: StorageType::File,
            num_replicas: self.replicas,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }
}

/// How many times a connected bus asks for a change to its streams before it gives up.
const SETTLE_ATTEMPTS: u32 = 6;
/// How long a subscription waits for a new replicated consumer to elect its leader.
const CONSUMER_LEADER_WAIT: Duration = Duration::from_secs(5);
/// How often it asks meanwhile.
const CONSUMER_LEADER_POLL: Duration = Duration::from_millis(50);

/// The events stream's description before a log is bound to it.
const EVENTS_DESCRIPTION: &str = "groupbuy: mirror of the event log";

/// The events stream's description once log `log_id` is bound to it.
fn bound_description(log_id: &str) -> String {
    format!("{EVENTS_DESCRIPTION} {log_id}")
}

/// The log a description names, if any.
fn log_of_description(description: &str) -> Option<&str> {
    description
        .strip_prefix(EVENTS_DESCRIPTION)?
        .strip_prefix(' ')
        .filter(|id| !id.is_empty())
}

/// The log's mirror in JetStream.
#[derive(Clone)]
pub struct JetStreamBus {
    client: async_nats::Client,
    context: Context,
    settings: JetStreamSettings,
    /// The log it mirrors, once bound ([`Bus::bind_log`]).
    log_id: Arc<OnceLock<String>>,
}

/// The servers a `url` setting lists, separated by commas.
fn servers(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .collect()
}

/// `url` with any `user:password@` taken out of each server, fit for messages and logs.
fn without_credentials(url: &str) -> String {
    servers(url)
        .into_iter()
        .map(|server| match (server.find("://"), server.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}{}", &server[..scheme + 3], &server[at + 1..])
            }
            (None, Some(at)) => server[at + 1..].to_owned(),
            _ => server.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl JetStreamBus {
    /// Connects and creates (or updates to the configuration in code) both streams. The
    /// client reconnects on its own after the server goes away.
    pub async fn connect(settings: JetStreamSettings) -> Result<JetStreamBus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("groupbuy")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .connect(servers(&settings.url))
            .await
            .map_err(BusError::unavailable)?;
        let bus = JetStreamBus {
            context: js::new(client.clone()),
            client,
            settings,
            log_id: Arc::default(),
        };
        if let Err(error) = bus
            .settled("set up the streams", || bus.ensure_streams())
            .await
        {
            // The client retries in the background, so a server that cannot be reached shows
            // only as a request that timed out: say which server.
            if bus.client.connection_state() != async_nats::connection::State::Connected {
                return Err(BusError::Unavailable(format!(
                    "cannot reach NATS at {}: not connected ({error})",
                    without_credentials(&bus.settings.url)
                )));
            }
            return Err(error);
        }
        Ok(bus)
    }

    /// Runs `step`, a change to the streams' configuration, again while it times out on a
    /// connected client: a cluster decides on a stream's configuration by vote, so instances
    /// starting together, or a leader being elected, can make a request time out that the
    /// cluster then carries out. Asking again settles it.
    async fn settled<T, F, Fut>(&self, what: &str, mut step: F) -> Result<T, BusError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, BusError>>,
    {
        let mut attempt = 1;
        loop {
            match step().await {
                Err(BusError::Unavailable(error))
                    if attempt < SETTLE_ATTEMPTS
                        && self.client.connection_state()
                            == async_nats::connection::State::Connected =>
                {
                    tracing::warn!(%error, attempt, "cannot {what} yet; trying again");
                    tokio::time::sleep(Duration::from_millis(250) * attempt).await;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// [`Bus::bind_log`], asked once.
    async fn bind_log_once(&self, log_id: &str) -> Result<(), BusError> {
        let name = self.settings.events_stream();
        let mut stream = self
            .context
            .get_stream(&name)
            .await
            .map_err(BusError::unavailable)?;
        let info = stream.info().await.map_err(BusError::unavailable)?.clone();
        let described = info
            .config
            .description
            .as_deref()
            .and_then(log_of_description)
            .map(str::to_owned);
        // A stream from before logs had identities: its newest message may still tell.
        let theirs = match described.clone() {
            Some(theirs) => Some(theirs),
            None if info.state.last_sequence > 0 => stream
                .get_raw_message(info.state.last_sequence)
                .await
                .ok()
                .and_then(|m| m.headers.get(header::LOG_ID).map(|v| v.as_str().to_owned())),
            None => None,
        };
        if let Some(theirs) = theirs.filter(|theirs| theirs != log_id) {
            return Err(BusError::ForeignLog {
                stream: name,
                theirs,
                ours: log_id.to_owned(),
            });
        }
        if described.is_none() {
            let mut config = info.config;
            config.description = Some(bound_description(log_id));
            self.context
                .update_stream(config)
                .await
                .map_err(BusError::unavailable)?;
        }
        if self.log_id.set(log_id.to_owned()).is_err()
            && self.log_id.get().map(String::as_str) != Some(log_id)
        {
            return Err(BusError::ForeignLog {
                stream: name,
                theirs: self.log_id.get().cloned().unwrap_or_default(),
                ours: log_id.to_owned(),
            });
        }
        Ok(())
    }

    async fn ensure_streams(&self) -> Result<(), BusError> {
        for mut config in [
            self.settings.events_config(),
            self.settings.dead_letter_config(),
        ] {
            // The description names the log a stream mirrors: keep it.
            if let Ok(mut existing) = self.context.get_stream(&config.name).await {
                let info = existing.info().await.map_err(BusError::unavailable)?;
                if info.config.description.is_some() {
                    config.description = info.config.description.clone();
                }
            }
            self.context
                .create_or_update_stream(config)
                .await
                .map_err(BusError::unavailable)?;
        }
        Ok(())
    }

    /// The settings it was connected with.
    pub fn settings(&self) -> &JetStreamSettings {
        &self.settings
    }

    /// The JetStream context, for tests and tools that inspect the streams.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Deletes both streams and everything in them; for tests that clean up after
    /// themselves.
    pub async fn delete_streams(&self) -> Result<(), BusError> {
        for name in [
            self.settings.events_stream(),
            self.settings.dead_letter_stream(),
        ] {
            self.context
                .delete_stream(&name)
                .await
                .map_err(BusError::unavailable)?;
        }
        Ok(())
    }

    fn headers(&self, batch: &super::Batch<'_>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, batch.id());
        if let Some(log_id) = self.log_id.get() {
            headers.insert(header::LOG_ID, log_id.as_str());
        }
        headers.insert(header::EVENTS, batch.events.len().to_string());
        headers.insert(header::FIRST_CURSOR, format_cursor(batch.first()));
        headers.insert(header::LOG_CURSOR, format_cursor(batch.resume));
        let (trace_ids, first) = batch.traces();
        if !trace_ids.is_empty() {
            headers.insert(header::TRACE_IDS, trace_ids.join(" "));
        }
        if let Some(trace) = first {
            headers.insert(header::TRACEPARENT, trace.header());
        }
        headers
    }
}

#[async_trait]
impl Bus for JetStreamBus {
    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BusError> {
        // Send every batch first and collect the acks after, so they are all in flight at
        // once; JetStream stores them in the order they were sent.
        let batches = batches(events, self.settings.partitions)?;
        let mut acks = Vec::with_capacity(batches.len());
        for batch in &batches {
            let mut headers = self.headers(batch);
            // JSON envelopes repeat their keys, ids and metadata: compressed, a message
            // costs the server, the relay and every consumer a fifth of the bytes.
            let payload = match self.settings.compression {
                super::Compression::Lz4 => {
                    headers.insert(header::ENCODING, super::LZ4);
                    super::compress(&batch.payload)
                }
                super::Compression::None => batch.payload.clone(),
            };
            let message = PublishMessage::build().payload(payload).headers(headers);
            let ack = self
                .context
                .send_publish(
                    self.settings.events_subject(batch.partition, batch.topic),
                    message,
                )
                .await
                .map_err(BusError::unavailable)?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await.map_err(BusError::unavailable)?;
        }
        Ok(())
    }

    fn partitions(&self) -> u16 {
        self.settings.partitions
    }

    async fn published(&self) -> Result<Published, BusError> {
        let stream = self
            .context
            .get_stream(self.settings.events_stream())
            .await
            .map_err(BusError::unavailable)?;
        let info = stream.get_info().await.map_err(BusError::unavailable)?;
        let last = info.state.last_sequence;
        if last == 0 {
            return Ok(Published::Nothing);
        }
        let Ok(message) = stream.get_raw_message(last).await else {
            return Ok(Published::Unknown);
        };
        Ok(message
            .headers
            .get(header::LOG_CURSOR)
            .and_then(|value| parse_cursor(value.as_str()))
            .map_or(Published::Unknown, Published::UpTo))
    }

    async fn bind_log(&self, log_id: &str) -> Result<(), BusError> {
        self.settled("bind the log to its stream", || self.bind_log_once(log_id))
            .await
    }

    async fn subscribe(&self, options: &ConsumerOptions) -> Result<Box<dyn Deliveries>, BusError> {
        let stream = self
            .context
            .get_stream(self.settings.events_stream())
            .await
            .map_err(BusError::unavailable)?;
        let filter_subject = self
            .settings
            .filter_subject(options.partition, options.topic);
        // A durable consumer keeps the filter it was made with: a consumer of a topic has a
        // name of its own, apart from one of every topic (or of an older build).
        let durable = match options.topic {
            Some(topic) => format!("{}-{topic}", options.name),
            None => options.name.clone(),
        };
        let config = pull::Config {
            durable_name: Some(durable.clone()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            // The subscription runtime decides when to give up (and dead-letters); the
            // server keeps redelivering until then.
            max_deliver: -1,
            max_ack_pending: i64::try_from(options.max_in_flight).unwrap_or(i64::MAX),
            filter_subject,
            inactive_threshold: options.inactive_threshold.unwrap_or_default(),
            ..Default::default()
        };
        let mut consumer: js::consumer::Consumer<pull::Config> = stream
            .get_or_create_consumer(&durable, config)
            .await
            .map_err(BusError::unavailable)?;
        if self.settings.replicas > 1 {
            led(&mut consumer).await;
        }
        let messages = consumer
            .stream()
            .max_messages_per_batch(options.max_in_flight.clamp(1, 1_000))
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await
            .map_err(BusError::unavailable)?;
        Ok(Box::new(JetStreamDeliveries {
            messages,
            log_id: Arc::clone(&self.log_id),
        }))
    }

    async fn dead_letter(
        &self,
        consumer: &str,
        letter: Letter<'_>,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        if let Some(event) = letter.event {
            // One dead letter per consumer and event, however often it is reported.
            headers.insert(NATS_MESSAGE_ID, format!("{consumer}:{}", event.event_id));
            headers.insert(header::EVENT_TYPE, event.event_type.as_str());
            headers.insert(header::STREAM, event.stream_id.as_str());
            headers.insert(header::STREAM_VERSION, event.stream_version.to_string());
            if let Some(trace) = TraceParent::of(&event.metadata) {
                headers.insert(header::TRACEPARENT, trace.header());
            }
        }
        headers.insert(header::DEAD_CONSUMER, consumer);
        headers.insert(header::DEAD_SUBJECT, letter.subject);
        // Header values are one line.
        headers.insert(header::DEAD_REASON, reason.replace(['\r', '\n'], " "));
        self.context
            .publish_with_headers(
                self.settings.dead_letter_subject(consumer),
                headers,
                letter.payload,
            )
            .await
            .map_err(BusError::unavailable)?
            .await
            .map_err(BusError::unavailable)?;
        Ok(())
    }

    async fn dead_letters_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredLetter>, BusError> {
        let mut stream = self.dead_letter_stream().await?;
        let state = &stream.info().await.map_err(BusError::unavailable)?.state;
        let (first, last) = (state.first_sequence, state.last_sequence);
        let mut letters = Vec::new();
        // Discarded letters leave gaps in the sequence; each costs one lookup.
        let mut sequence = (after + 1).max(first);
        while letters.len() < limit && sequence <= last {
            if let Some(letter) = letter_at(&stream, sequence).await? {
                letters.push(letter);
            }
            sequence += 1;
        }
        Ok(letters)
    }

    async fn dead_letter_at(&self, id: u64) -> Result<Option<StoredLetter>, BusError> {
        letter_at(&self.dead_letter_stream().await?, id).await
    }

    async fn discard_dead_letter(&self, id: u64) -> Result<bool, BusError> {
        let stream = self.dead_letter_stream().await?;
        if letter_at(&stream, id).await?.is_none() {
            return Ok(false);
        }
        stream
            .delete_message(id)
            .await
            .map_err(BusError::unavailable)
    }

    async fn ping(&self) -> Result<(), BusError> {
        // Known down: say so at once, rather than wait for a flush that waits for a
        // reconnection (probes would take their whole timeout through a NATS outage).
        let state = self.client.connection_state();
        if state != async_nats::connection::State::Connected {
            return Err(BusError::unavailable(format!(
                "not connected to NATS ({state:?}); reconnecting"
            )));
        }
        self.client.flush().await.map_err(BusError::unavailable)?;
        self.context
            .get_stream(self.settings.events_stream())
            .await
            .map_err(BusError::unavailable)?;
        Ok(())
    }
}

impl JetStreamBus {
    async fn dead_letter_stream(&self) -> Result<js::stream::Stream, BusError> {
        self.context
            .get_stream(self.settings.dead_letter_stream())
            .await
            .map_err(BusError::unavailable)
    }
}

/// The dead letter at `sequence` of the dead-letter stream, if there is one.
async fn letter_at(
    stream: &js::stream::Stream,
    sequence: u64,
) -> Result<Option<StoredLetter>, BusError> {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(error) => return Err(BusError::unavailable(error)),
    };
    let header = |name: &str| {
        message
            .headers
            .get(name)
            .map_or_else(String::new, |v| v.as_str().to_owned())
    };
    Ok(Some(StoredLetter {
        id: message.sequence,
        consumer: header(header::DEAD_CONSUMER),
        subject: header(header::DEAD_SUBJECT),
        reason: header(header::DEAD_REASON),
        stored_at: chrono::DateTime::from_timestamp(
            message.time.unix_timestamp(),
            message.time.nanosecond(),
        )
        .unwrap_or_default(),
        payload: message.payload,
    }))
}

struct JetStreamDeliveries {
    messages: pull::Stream,
    log_id: Arc<OnceLock<String>>,
}

#[async_trait]
impl Deliveries for JetStreamDeliveries {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        let message = match self.messages.next().await? {
            Ok(message) => message,
            Err(error) => return Some(Err(BusError::unavailable(error))),
        };
        let delivered = message
            .info()
            .map(|info| u64::try_from(info.delivered).unwrap_or(1))
            .unwrap_or(1);
        let (message, acker) = message.split();
        let theirs = message
            .headers
            .as_ref()
            .and_then(|h| h.get(header::LOG_ID))
            .map(|v| v.as_str());
        let encoding = message
            .headers
            .as_ref()
            .and_then(|h| h.get(header::ENCODING))
            .map(|v| v.as_str());
        let (payload, unreadable) = match super::body_of(encoding, message.payload.clone()) {
            Ok(body) => (body, None),
            Err(why) => (message.payload.clone(), Some(why)),
        };
        let refused = match (theirs, self.log_id.get()) {
            // Another deployment's event: delivered as a message nobody can read, so the
            // consumer dead-letters it instead of applying it.
            (Some(theirs), Some(ours)) if theirs != ours => {
                tracing::error!(
                    subject = %message.subject, theirs, ours,
                    "a message of another event log reached this deployment: two deployments \
                     share one NATS server and stream prefix"
                );
                Some(format!(
                    "a message of event log {theirs}, not of this deployment's log {ours}"
                ))
            }
            _ => unreadable,
        };
        Some(Ok(Delivery {
            refused,
            subject: message.subject.to_string(),
            payload,
            delivered,
            acker: Acker::JetStream(acker),
        }))
    }
}

/// Waits (at most [`CONSUMER_LEADER_WAIT`]) until a replicated consumer has a leader. A pull
/// sent to a consumer whose leader is not elected yet (one just created on a cluster) gets
/// no answer and no heartbeat, and the client notices only after two missed heartbeats: on the
/// clusters this stalled a new consumer's partition for 10 s (docs/benchmarks.md). A consumer
/// still without a leader is pulled anyway, as before.
async fn led(consumer: &mut js::consumer::Consumer<pull::Config>) {
    let deadline = tokio::time::Instant::now() + CONSUMER_LEADER_WAIT;
    while tokio::time::Instant::now() < deadline {
        let leader = consumer
            .info()
            .await
            .ok()
            .and_then(|info| info.cluster.as_ref())
            .and_then(|cluster| cluster.leader.clone());
        if leader.is_some() {
            return;
        }
        tokio::time::sleep(CONSUMER_LEADER_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::{servers, without_credentials};

    #[test]
    fn server_urls_lose_their_credentials_in_messages() {
        assert_eq!(
            without_credentials("nats://u:pw@nats:4222"),
            "nats://nats:4222"
        );
        assert_eq!(without_credentials("tok@nats:4222"), "nats:4222");
        assert_eq!(without_credentials("nats://nats:4222"), "nats://nats:4222");
        assert_eq!(
            without_credentials("nats://u:pw@a:4222, nats://b:4222"),
            "nats://a:4222,nats://b:4222"
        );
    }

    #[test]
    fn a_url_setting_lists_the_servers_of_a_cluster() {
        assert_eq!(servers("nats://a:4222"), ["nats://a:4222"]);
        assert_eq!(
            servers("nats://a:4222, nats://b:4222,,nats://c:4222 "),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
    }
}
