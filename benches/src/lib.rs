//! Shared helpers of lazypull's benchmarks: timing statistics printed the same way everywhere.

pub mod chart;
pub mod timed;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Median of `samples` (sorted in place).
pub fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The `p`-th percentile (0..=100) of sorted `samples`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() - 1) as f64 * p / 100.0).round() as usize;
    sorted[idx]
}

/// MiB/s for `bytes` moved in `d`.
pub fn mib_per_sec(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // Linux reports in USER_HZ, 100 on every mainstream configuration.
    Duration::from_millis(ticks * 10)
}

/// Value of the flag `name` (`--runs 5`) on the command line, if given and numeric.
pub fn arg(name: &str) -> Option<u64> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
}

/// The `lazypull` binary the benchmarks drive: `LAZYPULL_BIN`, else `target/release/lazypull`
/// of this workspace (or of `CARGO_TARGET_DIR`). Prints which one and how old it is; when it is
/// missing, says how to build it (prefixed with `bench`, the caller's name) and returns `None`.
pub fn lazypull_binary(bench: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("LAZYPULL_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
            target.join("release/lazypull")
        }
    };
    match std::fs::metadata(&path) {
        Ok(m) => {
            let age = m
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .map(|d| format!(", built {} min ago", d.as_secs() / 60))
                .unwrap_or_default();
            println!("lazypull binary: {}{age}", path.display());
            Some(path)
        }
        Err(_) => {
            eprintln!(
                "{bench}: no lazypull binary at {}: build it first with \
                 `cargo build --release -p lazypull`, or set LAZYPULL_BIN",
                path.display()
            );
            None
        }
    }
}

/// Whether this process runs as root (effective uid 0): the benchmarks mount FUSE and
/// overlayfs, drop the page cache and create network namespaces.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Writes back dirty pages and drops the page, dentry and inode caches; false when not allowed
/// (not root).
pub fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// The 1, 5 and 15 minute load averages, space-separated.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
pub mod shaping;
