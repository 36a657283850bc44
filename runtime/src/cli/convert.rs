//! `lazypull convert SRC DST`: the command line and progress display around
//! [`crate::convert::convert_image`]. Needs no daemon.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lazypull_fetcher::{BlobPush, Platform};
use parking_lot::Mutex;

use crate::config::Settings;
use crate::convert::{
    convert_image, read_prefetch_list, ConvertOptions, ConvertReport, Format, LayerInfo,
    LayerOptions, LayerSummary, Location, Phase, Platforms, Reporter,
};
use crate::daemon::human_bytes;

/// Rewrite an image's layers as eStargz (or zstd:chunked) so it can be pulled lazily, and
/// push the result.
///
/// SRC and DST are registry references or OCI layouts (`oci:DIR[:TAG]`). A multi-platform
/// image is converted for every platform (a new index) unless --platform picks one. Files in
/// --prefetch-list are placed first in each layer, followed by `.prefetch.landmark`, so
/// they are fetched before anything else when the image is mounted; without a list the layers
/// carry `.no.prefetch.landmark`. Converted layers remain ordinary tar+gzip (tar+zstd) blobs
/// that every runtime can pull. Needs no daemon.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source image: a registry reference, or `oci:DIR[:TAG]` for an OCI image layout.
    source: String,
    /// Destination: a registry reference with a tag, or `oci:DIR[:TAG]`.
    destination: String,
    /// Layer format to write.
    #[arg(long, value_enum, default_value_t = Format::Estargz)]
    format: Format,
    /// File listing paths to prefetch (one per line, `#` comments), put first in each layer.
    #[arg(long, value_name = "FILE")]
    prefetch_list: Option<PathBuf>,
    /// Largest chunk of a file, the unit of lazy fetching (bytes; K, M suffixes allowed; at
    /// most 16M, the largest chunk readers accept) [default: 4M].
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// Compression level: gzip 0-9 [default: 6], zstd 1-22.
    #[arg(long, value_name = "N")]
    level: Option<i32>,
    /// Convert only this platform of a multi-platform image (OS/ARCH[/VARIANT]); the result is
    /// a single-platform image.
    #[arg(long, conflicts_with = "all_platforms")]
    platform: Option<String>,
    /// Convert every platform of a multi-platform image (the default).
    #[arg(long)]
    all_platforms: bool,
    /// Layers converted at the same time [default: the number of cores].
    #[arg(short, long, value_name = "N")]
    jobs: Option<usize>,
    /// Print only the digest of the result.
    #[arg(short, long)]
    quiet: bool,
}

/// Parses `4194304`, `4M`, `4MiB`, `512k`.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, mult) = [
        ("kib", 1u64 << 10),
        ("mib", 1 << 20),
        ("gib", 1 << 30),
        ("k", 1 << 10),
        ("m", 1 << 20),
        ("g", 1 << 30),
    ]
    .iter()
    .find_map(|(suffix, m)| {
        lower
            .strip_suffix(suffix)
            .map(|n| (n.trim().to_string(), *m))
    })
    .unwrap_or((lower.clone(), 1));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected bytes, optionally with K or M"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))?;
    if v == 0 {
        return Err("the chunk size must be more than 0".into());
    }
    Ok(v)
}

/// Runs `lazypull convert`.
pub async fn run(s: &Settings, args: ConvertArgs) -> Result<u8> {
    let src = Location::parse(&args.source)?;
    let dst = Location::parse(&args.destination)?;
    let platforms = match &args.platform {
        Some(p) => Platforms::One(p.parse::<Platform>().map_err(anyhow::Error::msg)?),
        None => Platforms::All,
    };
    if let Some(l) = args.level {
        let range = match args.format {
            Format::Estargz => 0..=9,
            Format::ZstdChunked => 1..=22,
        };
        if !range.contains(&l) {
            bail!(
                "--level {l} is out of range for {}: {}-{}",
                args.format,
                range.start(),
                range.end()
            );
        }
    }
    let prefetch = match &args.prefetch_list {
        Some(p) => Some(read_prefetch_list(p)?),
        None => None,
    };
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let cancel = Arc::new(AtomicBool::new(false));
    let opts = ConvertOptions {
        layer: LayerOptions {
            format: args.format,
            chunk_size: args.chunk_size,
            level: args.level,
            prefetch,
        },
        platforms,
        jobs,
        work_dir: work_dir(s),
        cancel: cancel.clone(),
    };
    let reporter: Arc<dyn Reporter> = if args.quiet {
        Arc::new(Silent)
    } else if std::io::stderr().is_terminal() {
        Arc::new(Bars::default())
    } else {
        Arc::new(Lines::default())
    };
    let registry = super::registry(s);
    let job = convert_image(&registry, &src, &dst, &opts, reporter.clone());
    let report = tokio::select! {
        r = job => r.with_context(|| format!("converting {src} to {dst}"))?,
        _ = tokio::signal::ctrl_c() => {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            // Give running conversions a moment to notice before the temporary files go.
            tokio::time::sleep(Duration::from_millis(200)).await;
            bail!("interrupted; nothing was tagged at {dst}");
        }
    };
    if !args.quiet {
        if std::io::stderr().is_terminal() {
            // The bars leave the cursor at the end of the last one.
            eprintln!();
        }
        summary(&src, &dst, &report);
    }
    println!("{}", report.digest);
    Ok(0)
}

/// Temporary files go under `<root>/tmp` when it can be created (the root is sized for image
/// data), else under `$TMPDIR`.
fn work_dir(s: &Settings) -> PathBuf {
    let dir = s.root.join("tmp");
    match std::fs::create_dir_all(&dir) {
        Ok(()) => dir,
        Err(_) => std::env::temp_dir(),
    }
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-3)
}

fn summary(src: &Location, dst: &Location, r: &ConvertReport) {
    let cpu = match r.cpu_time {
        Some(c) => format!(
            ", {:.0} MB/s per CPU second ({:.1} CPU s)",
            mb_per_s(r.tar_bytes, c),
            c.as_secs_f64()
        ),
        None => String::new(),
    };
    eprintln!(
        "converted {src} -> {dst}: {} image(s), {} layer(s); {} of tar ({} compressed in, {} out) \
         in {:.1} s ({:.0} MB/s of tar{cpu})",
        r.images,
        r.layers,
        human_bytes(r.tar_bytes),
        human_bytes(r.source_bytes),
        human_bytes(r.blob_bytes),
        r.elapsed.as_secs_f64(),
        mb_per_s(r.tar_bytes, r.elapsed),
    );
    eprintln!("{dst}: {} ({})", r.digest, r.media_type);
}

fn short(d: &lazypull_fetcher::Digest) -> String {
    let s = d.to_string();
    s.chars().take(19).collect()
}

/// No progress output (`--quiet`).
struct Silent;

impl Reporter for Silent {
    fn begin(&self, _: &[LayerInfo]) {}
    fn phase(&self, _: usize, _: Phase, _: u64) {}
    fn progress(&self, _: usize, _: u64) {}
    fn layer_done(&self, _: usize, _: &LayerSummary) {}
    fn note(&self, _: &str) {}
}

/// Plain lines on stderr, for logs and pipes: one line per layer and phase.
#[derive(Default)]
struct Lines {
    layers: Mutex<Vec<LayerInfo>>,
}

impl Lines {
    fn tag(&self, i: usize) -> String {
        let layers = self.layers.lock();
        let d = layers.get(i).map(|l| short(&l.digest)).unwrap_or_default();
        format!("[{}/{}] {d}", i + 1, layers.len())
    }
}

impl Reporter for Lines {
    fn begin(&self, layers: &[LayerInfo]) {
        *self.layers.lock() = layers.to_vec();
        let total: u64 = layers.iter().map(|l| l.size).sum();
        eprintln!(
            "converting {} layer(s), {} compressed",
            layers.len(),
            human_bytes(total)
        );
    }

    fn phase(&self, i: usize, phase: Phase, total: u64) {
        let what = match phase {
            Phase::Queued => return,
            Phase::Download => "fetching",
            Phase::Convert => "converting",
            Phase::Upload => "pushing",
        };
        eprintln!("{}: {what} {}", self.tag(i), human_bytes(total));
    }

    fn progress(&self, _: usize, _: u64) {}

    fn layer_done(&self, i: usize, s: &LayerSummary) {
        let pushed = match s.pushed {
            BlobPush::Exists => ", already at the destination",
            BlobPush::Mounted => ", mounted",
            BlobPush::Uploaded => "",
        };
        eprintln!(
            "{}: done: {} of tar in {:.1} s ({:.0} MB/s) -> {} ({}){pushed}",
            self.tag(i),
            human_bytes(s.tar_size),
            s.convert_time.as_secs_f64(),
            mb_per_s(s.tar_size, s.convert_time),
            s.digest,
            human_bytes(s.size)
        );
    }

    fn note(&self, message: &str) {
        eprintln!("{message}");
    }
}

/// One progress bar per layer on a terminal.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<Vec<ProgressBar>>,
}

impl Reporter for Bars {
    fn begin(&self, layers: &[LayerInfo]) {
        self.multi.set_draw_target(ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{prefix} {msg:<11} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let mut bars = self.bars.lock();
        for (i, l) in layers.iter().enumerate() {
            let b = self.multi.add(ProgressBar::new(l.size));
            b.set_style(style.clone());
            b.set_prefix(format!("[{}/{}] {}", i + 1, layers.len(), short(&l.digest)));
            b.set_message("waiting");
            bars.push(b);
        }
    }

    fn phase(&self, i: usize, phase: Phase, total: u64) {
        if let Some(b) = self.bars.lock().get(i) {
            b.set_message(match phase {
                Phase::Queued => "waiting",
                Phase::Download => "fetching",
                Phase::Convert => "converting",
                Phase::Upload => "pushing",
            });
            b.set_length(total);
            b.reset();
        }
    }

    fn progress(&self, i: usize, done: u64) {
        if let Some(b) = self.bars.lock().get(i) {
            b.set_position(done);
        }
    }

    fn layer_done(&self, i: usize, s: &LayerSummary) {
        if let Some(b) = self.bars.lock().get(i) {
            // A finished bar shows the result, not a transfer rate (a blob already at the
            // destination "transfers" in no time).
            if let Ok(style) =
                ProgressStyle::with_template("{prefix} {msg:<11} [{bar:30}] {total_bytes:>10}")
            {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_length(s.size);
            b.set_position(s.size);
            b.finish_with_message(match s.pushed {
                BlobPush::Exists => "present",
                BlobPush::Mounted => "mounted",
                BlobPush::Uploaded => "done",
            });
        }
    }

    fn note(&self, message: &str) {
        let _ = self.multi.println(message);
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4194304"), Ok(4 << 20));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert!(parse_size("0").is_err());
        assert!(parse_size("four").is_err());
    }
}
