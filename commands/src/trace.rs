//! One trace from the HTTP request to everything its events set off.
//!
//! The gateway continues the caller's W3C `traceparent` (or starts a trace) and records the
//! trace id and its own span id in the metadata of the events it appends. The relay carries
//! them into JetStream headers (`traceparent`), and the subscription runtime handles every
//! event in an [`event_span`] that continues the span which recorded it; the saga records its
//! steps' events from inside that span, so their handlers continue it in turn.
//!
//! Spans are `tracing` spans. When the binary installs an OpenTelemetry layer (OTLP export),
//! [`continue_trace`] makes them children of the remote span and [`context_of`] reads the ids
//! OpenTelemetry gave them; without that layer both do nothing, and the ids in the metadata are
//! the ones the work came with.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use schemas::{Envelope, Metadata};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A W3C trace context: the trace, and the span that work continues from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The trace: 128 bits, never 0.
    pub trace_id: u128,
    /// The parent span: 64 bits, never 0.
    pub span_id: u64,
    /// Whether the caller records this trace.
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace, with a span of its own.
    pub fn root() -> TraceParent {
        TraceParent {
            trace_id: nonzero(rand::random()),
            span_id: nonzero(rand::random()),
            sampled: true,
        }
    }

    /// Reads a `traceparent` header (W3C Trace Context, version 00, or a later version read
    /// as 00 demands); `None` when it is not one, and the caller starts a new trace.
    pub fn parse(header: &str) -> Option<TraceParent> {
        let mut parts = header.trim().split('-');
        let version = parts.next().filter(|v| is_hex(v, 2) && *v != "ff")?;
        let trace_id = parts.next().filter(|t| is_hex(t, 32))?;
        let span_id = parts.next().filter(|s| is_hex(s, 16))?;
        let flags = parts.next().filter(|f| is_hex(f, 2))?;
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id = u128::from_str_radix(trace_id, 16)
            .ok()
            .filter(|t| *t != 0)?;
        let span_id = u64::from_str_radix(span_id, 16).ok().filter(|s| *s != 0)?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id_hex(),
            self.span_id_hex(),
            u8::from(self.sampled)
        )
    }

    /// The trace id as event metadata and logs carry it: 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as event metadata carries it: 16 lowercase hex digits.
    pub fn span_id_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    /// The same trace, continued from a new span of this process.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            span_id: nonzero(rand::random()),
            ..*self
        }
    }

    /// The span that recorded an event, from its metadata; `None` for events recorded without
    /// one.
    pub fn of(metadata: &Metadata) -> Option<TraceParent> {
        let trace_id = metadata.trace_id.as_deref().filter(|t| is_hex(t, 32))?;
        let span_id = metadata.span_id.as_deref().filter(|s| is_hex(s, 16))?;
        Some(TraceParent {
            trace_id: u128::from_str_radix(trace_id, 16)
                .ok()
                .filter(|t| *t != 0)?,
            span_id: u64::from_str_radix(span_id, 16).ok().filter(|s| *s != 0)?,
            sampled: true,
        })
    }

    /// Writes this trace context into event metadata.
    pub fn stamp(&self, metadata: &mut Metadata) {
        metadata.trace_id = Some(self.trace_id_hex());
        metadata.span_id = Some(self.span_id_hex());
    }
}

fn nonzero<T: Default + PartialEq + From<u8>>(value: T) -> T {
    if value == T::default() {
        T::from(1)
    } else {
        value
    }
}

fn is_hex(text: &str, digits: usize) -> bool {
    text.len() == digits
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Makes `span` a child of the remote span `parent` in OpenTelemetry. Call it before the span
/// is first entered. Without an OpenTelemetry layer it does nothing.
pub fn continue_trace(span: &Span, parent: TraceParent) {
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let remote = SpanContext::new(
        TraceId::from(parent.trace_id),
        SpanId::from(parent.span_id),
        flags,
        true,
        TraceState::default(),
    );
    // Fails only without an OpenTelemetry layer, or for a span filtered out: nothing to join.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The trace context OpenTelemetry gave `span`; `None` without an OpenTelemetry layer. This
/// starts the span, so set its parent first.
pub fn context_of(span: &Span) -> Option<TraceParent> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| TraceParent {
        trace_id: u128::from_be_bytes(span_context.trace_id().to_bytes()),
        span_id: u64::from_be_bytes(span_context.span_id().to_bytes()),
        sampled: span_context.is_sampled(),
    })
}

/// What to record in the metadata of events appended inside `span`, which continues `came_with`:
/// the span's own context when OpenTelemetry tracks it, else the one the work came with.
pub fn recorded_in(span: &Span, came_with: Option<TraceParent>) -> Option<TraceParent> {
    context_of(span).or(came_with)
}

/// The span `consumer` handles `event` in: a child of the span that recorded the event, so the
/// request's trace goes on through sagas and projections.
pub fn event_span(consumer: &str, event: &Envelope) -> Span {
    let span = tracing::info_span!(
        "event",
        consumer,
        event_type = %event.event_type,
        stream_id = %event.stream_id,
        stream_version = event.stream_version,
        trace_id = event.metadata.trace_id.as_deref().unwrap_or(""),
    );
    if let Some(parent) = TraceParent::of(&event.metadata) {
        continue_trace(&span, parent);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_w3c_traceparent_is_read_and_written_back_the_same() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = TraceParent::parse(header).unwrap();
        assert_eq!(parent.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(parent.span_id, 0x00f067aa0ba902b7);
        assert!(parent.sampled);
        assert_eq!(parent.header(), header);
        let unsampled = TraceParent::parse(&header.replace("-01", "-00")).unwrap();
        assert!(!unsampled.sampled);
        // A later version may carry more fields.
        assert!(TraceParent::parse(&format!("{}-more", header.replacen("00", "01", 1))).is_some());
    }

    #[test]
    fn anything_but_a_traceparent_starts_a_new_trace() {
        for header in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ] {
            assert_eq!(TraceParent::parse(header), None, "{header:?}");
        }
    }

    #[test]
    fn metadata_carries_the_trace_and_the_span_that_recorded_the_event() {
        let parent = TraceParent::root();
        let mut metadata = Metadata::default();
        assert_eq!(TraceParent::of(&metadata), None);
        parent.stamp(&mut metadata);
        assert_eq!(TraceParent::of(&metadata), Some(parent));
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
        metadata.span_id = None;
        assert_eq!(
            TraceParent::of(&metadata),
            None,
            "a trace id alone names no span"
        );
    }

    #[test]
    fn without_an_opentelemetry_layer_spans_have_no_context_of_their_own() {
        let span = tracing::info_span!("test");
        continue_trace(&span, TraceParent::root());
        assert_eq!(context_of(&span), None);
        let came_with = Some(TraceParent::root());
        assert_eq!(recorded_in(&span, came_with), came_with);
    }
}
