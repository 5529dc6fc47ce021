//! OpenTelemetry traces over OTLP/HTTP (protobuf), shared by the broker and the ingestor.
//!
//! Off unless `telemetry.otlp_endpoint` is set. Off means no tracer exists at all: the hot
//! paths test one `Option` and create nothing. A message is traced from the broker's inbound
//! PUBLISH through NATS (a W3C `traceparent` header on the NATS message) to the ingestor's
//! Kafka produce (a child span, and a `traceparent` header on the Kafka record).

use std::borrow::Cow;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};

use crate::settings::InvalidSetting;

pub use opentelemetry::trace::{Span as SpanTrait, SpanKind, Status};
pub use opentelemetry_sdk::trace::Span;

/// The W3C trace-context header, on NATS messages and Kafka records alike.
pub const TRACEPARENT: &str = "traceparent";

/// `[telemetry]` of both binaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector, e.g. `http://127.0.0.1:4318` (`/v1/traces` is appended unless
    /// the URL already names a path). Unset: no traces, no cost.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans; empty: the binary's name.
    pub service_name: String,
    /// Share of new traces kept (0.0..=1.0). The ingestor follows the broker's decision for
    /// messages that carry a `traceparent`, and uses this ratio for those that don't.
    pub sampling_ratio: f64,
    /// `text` (default) or `json`: one JSON object per log line.
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: String::new(),
            sampling_ratio: 1.0,
            log_format: LogFormat::Text,
        }
    }
}

impl TelemetryConfig {
    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(InvalidSetting::new(
                "telemetry.sampling_ratio",
                format!("{} is not between 0.0 and 1.0", self.sampling_ratio),
            ));
        }
        if let Some(url) = &self.otlp_endpoint {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(InvalidSetting::new(
                    "telemetry.otlp_endpoint",
                    format!("{url:?} must be an http:// or https:// URL (OTLP/HTTP)"),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter for {endpoint}: {reason}")]
pub struct OtelError {
    endpoint: String,
    reason: String,
}

/// The tracer of one process. Dropping it does not flush: call [`Tracing::shutdown`].
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let after_scheme = trimmed.split_once("://").map_or(trimmed, |(_, rest)| rest);
    if after_scheme.contains('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

impl Tracing {
    /// `None` when tracing is off. Must run outside a Tokio runtime: the exporter's blocking
    /// HTTP client owns a runtime of its own. `instance` becomes `service.instance.id` (node
    /// id, ingestor id).
    pub fn init(
        config: &TelemetryConfig,
        default_service: &str,
        instance: &str,
    ) -> Result<Option<Tracing>, OtelError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let url = traces_url(endpoint);
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OtelError {
                endpoint: url,
                reason: e.to_string(),
            })?;
        let service = if config.service_name.is_empty() {
            default_service.to_owned()
        } else {
            config.service_name.clone()
        };
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attribute(KeyValue::new("service.instance.id", instance.to_owned()))
            .with_attribute(KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION").to_owned(),
            ))
            .build();
        // The batch processor's queue is bounded (2048 spans by default): under more load
        // than the collector takes, spans are dropped, never memory grown.
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(Cow::Owned(default_service.to_owned()));
        Ok(Some(Tracing { provider, tracer }))
    }

    /// A new root span (sampled or not, by the ratio).
    pub fn root(&self, name: &'static str, kind: SpanKind, attributes: Vec<KeyValue>) -> Span {
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start(&self.tracer)
    }

    /// A span whose parent is the remote span named by `traceparent` (a root span if it is
    /// absent or malformed).
    pub fn child_of(
        &self,
        traceparent: Option<&[u8]>,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let parent = traceparent
            .and_then(parse_traceparent)
            .map_or_else(Context::new, |sc| {
                Context::new().with_remote_span_context(sc)
            });
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &parent)
    }

    /// Flushes the spans still queued (bounded) and stops the exporter. Call it outside a
    /// Tokio runtime, like [`Tracing::init`].
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown_with_timeout(Duration::from_secs(5)) {
            eprintln!("OpenTelemetry shutdown: {e}");
        }
    }
}

static GLOBAL: std::sync::OnceLock<Tracing> = std::sync::OnceLock::new();

/// Makes `tracing` the process's tracer (the first call wins).
pub fn install(tracing: Tracing) {
    let _ = GLOBAL.set(tracing);
}

/// The process's tracer; `None` (one atomic load) when tracing is off.
pub fn global() -> Option<&'static Tracing> {
    GLOBAL.get()
}

/// Flushes the process's tracer, if any; call outside a Tokio runtime.
pub fn shutdown_global() {
    if let Some(t) = GLOBAL.get() {
        t.shutdown();
    }
}

/// The `traceparent` value of a span, if it is sampled (an unsampled trace is not
/// propagated: the next hop then makes no span for it either, with its parent-based sampler).
pub fn traceparent(span: &Span) -> Option<String> {
    use opentelemetry::trace::Span as _;
    let sc = span.span_context();
    if !sc.is_valid() || !sc.is_sampled() {
        return None;
    }
    Some(format_traceparent(sc))
}

pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{:032x}-{:016x}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Parses a W3C `traceparent` (version 00, or a later version read as 00 says to).
pub fn parse_traceparent(value: &[u8]) -> Option<SpanContext> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let mut parts = text.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2
        || version == "ff"
        || (version == "00" && parts.next().is_some())
        || trace_id.len() != 32
        || span_id.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !(hex(version) && hex(trace_id) && hex(span_id) && hex(flags)) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 0x01),
        true,
        TraceState::NONE,
    );
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trip() {
        let raw = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(raw.as_bytes()).expect("valid");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(format_traceparent(&sc), raw);
        let unsampled =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .expect("valid");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn traces_url_appends_the_signal_path() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/custom"), "http://c:4318/custom");
    }

    #[test]
    fn validation() {
        let mut c = TelemetryConfig::default();
        assert!(c.validate().is_ok());
        c.sampling_ratio = 1.5;
        assert_eq!(c.validate().unwrap_err().key, "telemetry.sampling_ratio");
        c.sampling_ratio = 0.5;
        c.otlp_endpoint = Some("collector:4317".into());
        assert_eq!(c.validate().unwrap_err().key, "telemetry.otlp_endpoint");
    }

    #[test]
    fn off_without_endpoint() {
        let t = Tracing::init(&TelemetryConfig::default(), "x", "1").expect("init");
        assert!(t.is_none());
    }
}
