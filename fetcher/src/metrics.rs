//! Prometheus metrics of registry traffic, registered once in the process's default registry
//! (the daemon serves `prometheus::gather()`). Recording is a few atomic operations per
//! request, nothing per byte.

use std::sync::LazyLock;

use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};

/// Why bytes were fetched: the question operators ask first ("is it reading on demand, or
/// filling in the background?").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A process was blocked on the read.
    OnDemand = 0,
    /// Read-ahead and the layer's prefetch list.
    Prefetch = 1,
    /// Background fill of the rest of the layer.
    Background = 2,
    /// The layer's table of contents.
    Toc = 3,
}

impl Reason {
    /// Every reason, in index order.
    pub const ALL: [Reason; 4] = [
        Reason::OnDemand,
        Reason::Prefetch,
        Reason::Background,
        Reason::Toc,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::OnDemand => "on_demand",
            Reason::Prefetch => "prefetch",
            Reason::Background => "background",
            Reason::Toc => "toc",
        }
    }
}

/// The fetcher's metric handles.
pub struct FetchMetrics {
    /// `lazypull_registry_fetched_bytes_total{host,reason}`.
    pub bytes: IntCounterVec,
    /// `lazypull_registry_requests_total{host,reason}`.
    pub requests: IntCounterVec,
    /// `lazypull_registry_request_errors_total{host}`.
    pub errors: IntCounterVec,
    /// `lazypull_registry_request_duration_seconds{host}`.
    pub latency: HistogramVec,
}

static METRICS: LazyLock<FetchMetrics> = LazyLock::new(|| FetchMetrics {
    bytes: register_int_counter_vec!(
        "lazypull_registry_fetched_bytes_total",
        "Blob bytes received from registries by ranged reads, by host and reason.",
        &["host", "reason"]
    )
    .expect("metric registers once"),
    requests: register_int_counter_vec!(
        "lazypull_registry_requests_total",
        "Ranged blob requests sent to registries, by host and reason.",
        &["host", "reason"]
    )
    .expect("metric registers once"),
    errors: register_int_counter_vec!(
        "lazypull_registry_request_errors_total",
        "Ranged blob requests that failed after retries, by host.",
        &["host"]
    )
    .expect("metric registers once"),
    latency: register_histogram_vec!(
        "lazypull_registry_request_duration_seconds",
        "Time from sending a ranged blob request to having its whole body, by host.",
        &["host"],
        vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("metric registers once"),
});

/// The process-wide fetcher metrics.
pub fn fetch_metrics() -> &'static FetchMetrics {
    &METRICS
}
