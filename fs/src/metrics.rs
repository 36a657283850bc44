//! Prometheus metrics of the layer filesystem, registered once in the process's default
//! registry. Operation handles are resolved once, so timing an operation costs one clock read
//! and one histogram observation (tens of nanoseconds against microseconds per FUSE request).

use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter_vec, Histogram, HistogramVec,
    IntCounterVec,
};

/// FUSE operations that are timed.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// LOOKUP.
    Lookup = 0,
    /// GETATTR.
    Getattr,
    /// READLINK.
    Readlink,
    /// OPEN.
    Open,
    /// READ (until the reply, network waits included).
    Read,
    /// RELEASE.
    Release,
    /// OPENDIR.
    Opendir,
    /// READDIR.
    Readdir,
    /// READDIRPLUS.
    Readdirplus,
    /// STATFS.
    Statfs,
    /// GETXATTR.
    Getxattr,
    /// LISTXATTR.
    Listxattr,
    /// ACCESS.
    Access,
}

const OP_NAMES: [&str; 13] = [
    "lookup",
    "getattr",
    "readlink",
    "open",
    "read",
    "release",
    "opendir",
    "readdir",
    "readdirplus",
    "statfs",
    "getxattr",
    "listxattr",
    "access",
];

struct FsMetrics {
    ops: Vec<Histogram>,
    network_wait: Histogram,
}

static METRICS: LazyLock<FsMetrics> = LazyLock::new(|| {
    let vec: HistogramVec = register_histogram_vec!(
        "lazypull_fuse_operation_duration_seconds",
        "Time to answer FUSE requests, by operation (the _count series counts them).",
        &["op"],
        vec![
            0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.0025, 0.005, 0.01,
            0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0
        ]
    )
    .expect("metric registers once");
    FsMetrics {
        ops: OP_NAMES
            .iter()
            .map(|n| vec.with_label_values(&[n]))
            .collect(),
        network_wait: register_histogram!(
            "lazypull_read_network_wait_seconds",
            "How long on-demand chunk reads waited for the registry (cache misses only).",
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0
            ]
        )
        .expect("metric registers once"),
    }
});

/// Times one operation; observed when dropped.
pub struct OpTimer {
    op: Op,
    start: Instant,
}

impl OpTimer {
    /// Starts timing `op`.
    pub fn new(op: Op) -> OpTimer {
        OpTimer {
            op,
            start: Instant::now(),
        }
    }
}

impl Drop for OpTimer {
    fn drop(&mut self) {
        if let Some(h) = METRICS.ops.get(self.op as usize) {
            h.observe(self.start.elapsed().as_secs_f64());
        }
    }
}

/// Records how long an on-demand read waited for the registry.
pub fn observe_network_wait(secs: f64) {
    METRICS.network_wait.observe(secs);
}

/// `lazypull_refused_tocs_total{format, cause}`: TOCs that were not trusted for a lazy mount,
/// so their layer was fetched whole and verified against the layer digest instead.
static REFUSED_TOCS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "lazypull_refused_tocs_total",
        "TOCs not used for a lazy mount (the layer is fetched whole and verified instead), by \
         format and cause (unbound: no digest annotation ties the TOC to the manifest; invalid: \
         malformed, inconsistent or beyond the reader's limits).",
        &["format", "cause"]
    )
    .expect("metric registers once")
});

/// Why a TOC was refused, for [`count_refused_toc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TocRefusal {
    /// Nothing ties the TOC to the manifest: no digest annotation.
    Unbound,
    /// The TOC is malformed, inconsistent, or beyond the reader's limits.
    Invalid,
}

/// Counts a TOC that was refused (`format`: `estargz` or `zstd_chunked`).
pub fn count_refused_toc(format: &str, why: TocRefusal) {
    let cause = match why {
        TocRefusal::Unbound => "unbound",
        TocRefusal::Invalid => "invalid",
    };
    REFUSED_TOCS.with_label_values(&[format, cause]).inc();
}
