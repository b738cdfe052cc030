//! Logs and traces: the process's `tracing` subscriber, optional OTLP export, and the span
//! every HTTP request runs in.
//!
//! Logs are human-readable lines by default and one JSON object per line on request; either way
//! each line inside a request or an event's handling carries the span's fields, `trace_id`
//! among them. With an OTLP endpoint configured, spans are also exported to it (OTLP over HTTP,
//! protobuf or JSON) through a batching exporter on a thread of its own: a request continues
//! the caller's `traceparent`, and the saga and the read models continue the request's span
//! through the events it recorded ([`commands::trace`]).

use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::Response;
use commands::trace::{self, TraceParent};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::cli::LogFormat;

/// Longest one export to the collector may take.
const OTLP_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// How spans leave the process.
#[derive(Clone, Debug)]
pub struct Otlp {
    /// The collector's OTLP/HTTP base URL, like `http://collector:4318`; spans go to
    /// `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// The encoding.
    pub protocol: OtlpProtocol,
}

/// The encoding of OTLP over HTTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtlpProtocol {
    /// `application/x-protobuf`: what collectors expect by default.
    HttpProtobuf,
    /// `application/json`.
    HttpJson,
}

/// The installed subscriber's exporter, if any. Call [`Telemetry::shutdown`] once the work is
/// done, outside any async runtime, so the last spans are sent.
#[must_use = "spans still queued are lost unless it is shut down"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Setting up logs or the exporter failed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a malformed endpoint, say).
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// Another subscriber is installed already.
    #[error("logging: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// The log filter when `RUST_LOG` is unset: `info`, without the notices Postgres sends while
/// migrations run ("relation ... already exists, skipping").
pub const DEFAULT_DIRECTIVES: &str = "info,sqlx::postgres::notice=warn";

/// Installs the process's subscriber: logs filtered by `RUST_LOG` (default
/// [`DEFAULT_DIRECTIVES`]) in `format` on standard error, so that what a command prints on
/// standard output (`audit --json`) stays clean, and, with `otlp`, every span exported there.
/// Call it before any async runtime starts: the exporter's HTTP client blocks on a thread of
/// its own.
pub fn init(format: LogFormat, otlp: Option<&Otlp>) -> Result<Telemetry, TelemetryError> {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| DEFAULT_DIRECTIVES.to_owned());
    // Colours only for a person at a terminal: not in files, pipes or log collectors, and
    // never when NO_COLOR is set (no-color.org).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    install(format, otlp, &directives, colour, std::io::stderr)
}

/// [`init`] with the filter's directives (`RUST_LOG` syntax), whether text lines may carry
/// colour codes, and where log lines go given.
pub fn install<W>(
    format: LogFormat,
    otlp: Option<&Otlp>,
    directives: &str,
    colour: bool,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'writer> tracing_subscriber::fmt::MakeWriter<'writer> + Send + Sync + 'static,
{
    // One filter in front of both: what is logged is what is exported. (As a per-layer filter
    // on the OpenTelemetry layer it lost most spans: their contexts were found, their ends
    // were not.)
    let filter =
        EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(DEFAULT_DIRECTIVES));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(colour)
            .with_writer(writer)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .boxed(),
    };
    let provider = otlp.map(provider).transpose()?;
    let spans = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("groupbuy")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()?;
    Ok(Telemetry { provider })
}

fn provider(otlp: &Otlp) -> Result<SdkTracerProvider, TelemetryError> {
    let protocol = match otlp.protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_endpoint(format!("{}/v1/traces", otlp.endpoint.trim_end_matches('/')))
        .with_timeout(OTLP_EXPORT_TIMEOUT)
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        // A caller that does not record its trace is not overruled; new traces are recorded.
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .with_resource(Resource::builder().with_service_name("groupbuy").build())
        .build())
}

impl Telemetry {
    /// Sends what is still queued and stops the exporter.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("groupbuy: could not flush traces: {error}");
            }
        }
    }
}

/// The trace a request belongs to, as the events it records carry it: set by [`traced`],
/// read through the [`crate::extract::Trace`] extractor.
#[derive(Clone, Copy, Debug)]
pub struct RequestTrace(pub TraceParent);

/// Runs every request in a `request` span that continues the caller's `traceparent` (or starts
/// a trace), hands the handlers the trace to record in event metadata, and logs the outcome at
/// debug level.
pub async fn traced(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = crate::metrics::route_template(&request);
    let caller = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        route,
        trace_id = tracing::field::Empty,
    );
    if let Some(caller) = caller {
        trace::continue_trace(&span, caller);
    }
    // The span's own ids when spans are exported; otherwise the caller's trace (or a new one),
    // continued from a span id of this request's own.
    let recorded = trace::context_of(&span)
        .unwrap_or_else(|| caller.map_or_else(TraceParent::root, |c| c.child()));
    span.record("trace_id", recorded.trace_id_hex());
    request.extensions_mut().insert(RequestTrace(recorded));
    async move {
        let response = next.run(request).await;
        tracing::debug!(
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_millis() as u64,
            "answered"
        );
        response
    }
    .instrument(span)
    .await
}
