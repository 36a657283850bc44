//! Filesystem benchmark: the real `lazypull` binary serving the realistic image
//! (`lazypull_tests::images`, ~22,000 files, ~410 MB in 5 layers) from a real docker-registry on
//! loopback, against the same work done the classic way, each pair measured in the same run.
//!
//! `cargo build --release -p lazypull && cargo run --release -p lazypull-benches --bin fs-bench
//! [-- --runs N]` (root, FUSE, overlayfs; `LAZYPULL_BIN` overrides the binary's path).
//!
//! - Cold start: mount the image lazily (no background fill, fresh cache) and read the
//!   entry-point files of an `import numpy, pandas` in import order, without and with a
//!   prefetch landmark; against downloading every (plain gzip) layer blob with curl, unpacking
//!   it with `tar -xzf`, and reading the same files. Time and bytes served by the registry
//!   (counted by a proxy in front of it).
//! - Warm sequential read: a 256 MiB file (64 chunks) and a 3 MiB file (one chunk; read 50
//!   times) of a fully cached layer, against the same files on the local disk; page cache
//!   dropped before each read. Both should be served by FUSE passthrough once cached.
//! - Metadata walk: readdir + lstat of every entry of the mounted image against the same layers
//!   extracted to local disk and stacked with overlayfs; cold and warm.
//! - Memory: resident set of the daemon (`lazypull serve`, which serves the mounts) after
//!   mounting the image, after the import workload, and after the metadata walks, against 300
//!   bytes per entry + 8 MiB per layer.
//!
//! Absolute numbers drift on a shared machine; the ratios measured in one run are what to
//! compare (docs/design.md section 6 gives the targets).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lazypull_benches::{arg, drop_caches, lazypull_binary, load_average, median, mib_per_sec};
use lazypull_fs::estargz::{parse_footer, write_estargz, Footer, WriterOptions};
use lazypull_tests::images::{entry_point_files, realistic_layers};
use lazypull_tests::{
    random_bytes, CountingProxy, Digest, ImageSpec, Layer, Lazypull, TestRegistry,
};

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
const ESTARGZ_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const BIG: usize = 256 << 20;
const SMALL: usize = 3 << 20;
const SMALL_READS: usize = 50;

fn main() {
    let runs = arg("--runs").unwrap_or(3).max(1) as usize;
    let Some(bin) = lazypull_binary("fs-bench") else {
        std::process::exit(2);
    };
    if !drop_caches() {
        eprintln!("fs-bench: cannot drop the page cache (not root?); cold figures will be warm");
    }
    println!("load average at start: {}", load_average());
    bench(&bin, runs);
    println!(
        "load average at the end: {} (other work on the machine skews the absolute figures)",
        load_average()
    );
}

/// The prepared registry content.
struct Images {
    registry: TestRegistry,
    proxy: CountingProxy,
    /// Uncompressed layers of the realistic image.
    tars: Vec<Vec<u8>>,
    /// eStargz blob bytes (no prefetch landmark) and with the entry points prefetched.
    estargz_bytes: u64,
    prefetch_bytes: u64,
    /// Compressed TOC bytes (TOC member + footer) of the eStargz image.
    toc_bytes: u64,
    /// Plain gzip blobs: digests and total size.
    full_digests: Vec<Digest>,
    full_bytes: u64,
    /// The warm-read image's files.
    big: Vec<u8>,
    small: Vec<u8>,
}

fn bench(bin: &Path, runs: usize) {
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let images = prepare(&rt);
    let entry = entry_point_files();
    let tar_bytes: u64 = images.tars.iter().map(|t| t.len() as u64).sum();
    let (files, layers) = (count_entries(&images.tars), images.tars.len());
    println!(
        "realistic image: {layers} layers, {files} tar entries, {} MB of tar; eStargz {} MB \
         (TOCs {:.1} MB; with prefetch landmark {} MB), plain gzip {} MB; {} entry-point files; \
         {runs} runs, medians",
        tar_bytes / 1_000_000,
        images.estargz_bytes / 1_000_000,
        images.toc_bytes as f64 / 1e6,
        images.prefetch_bytes / 1_000_000,
        images.full_bytes / 1_000_000,
        entry.len(),
    );
    let memory = cold_start(bin, runs, &images, &entry);
    warm_read(bin, runs, &images);
    metadata_walk_and_memory(bin, runs, &images, files, memory);
}

/// Builds and pushes: the realistic image as eStargz (4 MiB chunks) without and with the
/// entry points as prefetch landmark, as plain gzip, and the warm-read image.
fn prepare(rt: &tokio::runtime::Runtime) -> Images {
    let start = Instant::now();
    let tars = realistic_layers(1);
    let entry = entry_point_files();
    let big = random_bytes(BIG, 11);
    let small = random_bytes(SMALL, 12);
    let warm_tar = {
        let mut b = tar::Builder::new(Vec::with_capacity(BIG + SMALL + 4096));
        for (name, data) in [("big.bin", &big), ("small.bin", &small)] {
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, &data[..]).expect("tar");
        }
        b.into_inner().expect("tar")
    };
    let (plain, lazy, prefetch, warm) = std::thread::scope(|s| {
        let plain: Vec<_> = tars
            .iter()
            .map(|t| s.spawn(move || (lazypull_tests::gzip(t), Digest::sha256_of(t))))
            .collect();
        let lazy: Vec<_> = tars
            .iter()
            .map(|t| s.spawn(move || estargz(t, None, flate2::Compression::default())))
            .collect();
        let entry = &entry;
        let prefetch: Vec<_> = tars
            .iter()
            .map(|t| {
                s.spawn(move || estargz(t, Some(entry.clone()), flate2::Compression::default()))
            })
            .collect();
        let warm_tar = &warm_tar;
        let warm = s.spawn(move || estargz(warm_tar, None, flate2::Compression::fast()));
        let join = |hs: Vec<std::thread::ScopedJoinHandle<'_, Layer>>| -> Vec<Layer> {
            hs.into_iter().map(|h| h.join().expect("convert")).collect()
        };
        let plain: Vec<Layer> = plain
            .into_iter()
            .map(|h| {
                let (data, diff_id) = h.join().expect("gzip");
                Layer {
                    data,
                    media_type: None,
                    diff_id,
                    annotations: BTreeMap::new(),
                }
            })
            .collect();
        (
            plain,
            join(lazy),
            join(prefetch),
            warm.join().expect("convert"),
        )
    });
    let sum = |ls: &[Layer]| ls.iter().map(|l| l.data.len() as u64).sum::<u64>();
    let (estargz_bytes, prefetch_bytes, full_bytes) = (sum(&lazy), sum(&prefetch), sum(&plain));
    let toc_bytes = lazy
        .iter()
        .map(|l| match parse_footer(&l.data) {
            Ok((Footer::Estargz { toc_offset } | Footer::Legacy { toc_offset }, _)) => {
                l.data.len() as u64 - toc_offset
            }
            _ => 0,
        })
        .sum();
    let registry = TestRegistry::plain();
    let pusher = registry.pusher();
    let full_digests = rt.block_on(async {
        let spec = |ls| ImageSpec::new(ls, "linux", "amd64");
        pusher
            .push_image_with("bench/realistic", "lazy", &spec(lazy))
            .await;
        pusher
            .push_image_with("bench/realistic", "prefetch", &spec(prefetch))
            .await;
        pusher
            .push_image_with("bench/warm", "v1", &spec(vec![warm]))
            .await;
        pusher
            .push_image_with("bench/realistic", "full", &spec(plain))
            .await
            .layer_digests
    });
    println!("prepared and pushed the images in {:?}", start.elapsed());
    let proxy = CountingProxy::start(&registry.host());
    Images {
        registry,
        proxy,
        tars,
        estargz_bytes,
        prefetch_bytes,
        toc_bytes,
        full_digests,
        full_bytes,
        big,
        small,
    }
}

fn estargz(tar: &[u8], prefetch: Option<Vec<String>>, level: flate2::Compression) -> Layer {
    let mut out = Vec::with_capacity(tar.len() / 2);
    let opts = WriterOptions {
        prefetch,
        level,
        ..WriterOptions::default()
    };
    let w = write_estargz(tar, &mut out, &opts).expect("eStargz conversion");
    Layer {
        data: out,
        media_type: Some(ESTARGZ_MEDIA_TYPE.to_string()),
        diff_id: w.diff_id,
        annotations: BTreeMap::from([(TOC_ANNOTATION.to_string(), w.toc_digest.to_string())]),
    }
}

fn count_entries(tars: &[Vec<u8>]) -> usize {
    tars.iter()
        .map(|t| {
            tar::Archive::new(&t[..])
                .entries()
                .map(|e| e.count())
                .unwrap_or(0)
        })
        .sum()
}

/// Memory of the daemon seen during the first cold-start run: `(VmRSS, RssAnon)`.
#[derive(Default)]
struct Memory {
    after_mount: (u64, u64),
    after_workload: (u64, u64),
    after_idle: (u64, u64),
}

fn cold_start(bin: &Path, runs: usize, images: &Images, entry: &[String]) -> Memory {
    let proxy = &images.proxy;
    let mut memory = Memory::default();
    let mut lazy = Samples::default();
    let mut pre = Samples::default();
    let mut full = Samples::default();
    let mut details = Vec::new();
    for run in 0..runs {
        for (tag, samples) in [("lazy", &mut lazy), ("prefetch", &mut pre)] {
            drop_caches();
            let mnt = tempfile::tempdir().expect("tempdir");
            let mut lp = Lazypull::new(bin, &["--background-fill", "false"]);
            proxy.reset();
            let image = format!("{}/bench/realistic:{tag}", proxy.host());
            let start = Instant::now();
            lp.mount(&image, mnt.path());
            let mounted = start.elapsed();
            let mount_bytes = proxy.total_body_bytes();
            if run == 0 && tag == "lazy" {
                memory.after_mount = lp.daemon_memory();
            }
            let (read, per_file) = read_files(mnt.path(), entry);
            let total = start.elapsed();
            samples.push(total, proxy.total_body_bytes(), mounted, read);
            if run == 0 {
                details.push((tag, mount_bytes, per_file, range_stats(&proxy.requests())));
            }
            if run == 0 && tag == "lazy" {
                memory.after_workload = lp.daemon_memory();
                std::thread::sleep(Duration::from_secs(5));
                memory.after_idle = lp.daemon_memory();
            }
            lp.umount(mnt.path());
        }

        drop_caches();
        let dir = tempfile::tempdir().expect("tempdir");
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).expect("mkdir");
        proxy.reset();
        let start = Instant::now();
        let blobs = download(&proxy.url(), &images.full_digests, dir.path());
        let fetched = start.elapsed();
        for blob in &blobs {
            run_ok(
                Command::new("tar")
                    .arg("-xzf")
                    .arg(blob)
                    .arg("-C")
                    .arg(&rootfs),
            );
        }
        let (read, _) = read_files(&rootfs, entry);
        full.push(start.elapsed(), proxy.total_body_bytes(), fetched, read);
    }
    let entry_bytes = lazy.read_bytes;
    println!(
        "cold start: mount + read {} entry-point files ({} MB) in import order; registry on \
         loopback behind a counting proxy",
        entry.len(),
        entry_bytes / 1_000_000
    );
    let (l, p, f) = (lazy.total(), pre.total(), full.total());
    println!(
        "  lazypull, no prefetch     {:7.2} s  (mount {:.2} s)  {:7.1} MB from the registry",
        l.as_secs_f64(),
        lazy.first().as_secs_f64(),
        lazy.bytes() as f64 / 1e6
    );
    println!(
        "  lazypull, prefetch list   {:7.2} s  (mount {:.2} s)  {:7.1} MB from the registry",
        p.as_secs_f64(),
        pre.first().as_secs_f64(),
        pre.bytes() as f64 / 1e6
    );
    println!(
        "  full pull: curl + tar -xzf {:6.2} s  (download {:.2} s) {:6.1} MB from the registry",
        f.as_secs_f64(),
        full.first().as_secs_f64(),
        full.bytes() as f64 / 1e6
    );
    println!(
        "  speed-up over the full pull: {:.2}x without prefetch, {:.2}x with (target >= 3x on \
         loopback); bytes: {:.1}% and {:.1}% of the full pull's",
        f.as_secs_f64() / l.as_secs_f64(),
        f.as_secs_f64() / p.as_secs_f64(),
        lazy.bytes() as f64 * 100.0 / full.bytes().max(1) as f64,
        pre.bytes() as f64 * 100.0 / full.bytes().max(1) as f64,
    );
    for (tag, mount_bytes, mut per_file, ranges) in details {
        let sum: Duration = per_file.iter().map(|f| f.1).sum();
        per_file.sort_by_key(|f| std::cmp::Reverse(f.1));
        let pct = |p: usize| per_file[(per_file.len() - 1) * (100 - p) / 100].1;
        let slowest: Vec<String> = per_file
            .iter()
            .take(4)
            .map(|(i, t, n)| {
                let name = entry[*i].rsplit('/').next().unwrap_or_default();
                format!(
                    "{name} ({:.1} MB) {:.0} ms",
                    *n as f64 / 1e6,
                    t.as_secs_f64() * 1e3
                )
            })
            .collect();
        println!(
            "  run 1, {tag}: per-file read p50 {:.1} ms, p90 {:.1} ms, max {:.0} ms, sum {:.2} s; \
             slowest: {}",
            pct(50).as_secs_f64() * 1e3,
            pct(90).as_secs_f64() * 1e3,
            per_file[0].1.as_secs_f64() * 1e3,
            sum.as_secs_f64(),
            slowest.join(", ")
        );
        println!(
            "  run 1, {tag}: the mount fetched {:.1} MB; {} blob range requests for {:.1} MB in all, \
             {:.1} MB of it distinct ({:.1} MB requested more than once; {} requests repeat an \
             earlier range exactly)",
            mount_bytes as f64 / 1e6,
            ranges.requests,
            ranges.requested as f64 / 1e6,
            ranges.distinct as f64 / 1e6,
            (ranges.requested - ranges.distinct) as f64 / 1e6,
            ranges.repeats
        );
    }
    memory
}

/// What the blob range requests of one run asked for.
struct RangeStats {
    requests: usize,
    /// Requests for exactly the same blob range as an earlier one.
    repeats: usize,
    requested: u64,
    distinct: u64,
}

/// Sums the `Range` requests per blob and their union (parses `bytes=a-b[,c-d...]`).
fn range_stats(requests: &[lazypull_tests::RecordedRequest]) -> RangeStats {
    let mut per_blob: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut stats = RangeStats {
        repeats: 0,
        requests: 0,
        requested: 0,
        distinct: 0,
    };
    for r in requests {
        let Some(spec) = r.range.as_deref().and_then(|v| v.strip_prefix("bytes=")) else {
            continue;
        };
        stats.requests += 1;
        if !seen.insert((r.path.as_str(), spec)) {
            stats.repeats += 1;
        }
        for part in spec.split(',') {
            let Some((a, b)) = part.trim().split_once('-') else {
                continue;
            };
            if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
                stats.requested += b + 1 - a;
                per_blob.entry(&r.path).or_default().push((a, b + 1));
            }
        }
    }
    for ranges in per_blob.values_mut() {
        ranges.sort_unstable();
        let mut end = 0u64;
        for &(a, b) in ranges.iter() {
            if b > end {
                stats.distinct += b - a.max(end);
                end = b;
            }
        }
    }
    stats
}

/// Per-run figures of one contender.
#[derive(Default)]
struct Samples {
    total: Vec<Duration>,
    bytes: Vec<u64>,
    first: Vec<Duration>,
    read_bytes: u64,
}

impl Samples {
    fn push(&mut self, total: Duration, bytes: u64, first: Duration, read_bytes: u64) {
        self.total.push(total);
        self.bytes.push(bytes);
        self.first.push(first);
        self.read_bytes = read_bytes;
    }
    fn total(&mut self) -> Duration {
        median(&mut self.total)
    }
    fn first(&mut self) -> Duration {
        median(&mut self.first)
    }
    fn bytes(&mut self) -> u64 {
        self.bytes.sort_unstable();
        self.bytes[self.bytes.len() / 2]
    }
}

/// Reads `files` under `root` one after another, whole, as an importer does; returns the bytes
/// and, per file, `(index, time, bytes)`.
fn read_files(root: &Path, files: &[String]) -> (u64, Vec<(usize, Duration, u64)>) {
    let mut buf = vec![0u8; 1 << 20];
    let per_file: Vec<(usize, Duration, u64)> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let start = Instant::now();
            let n = read_seq(&root.join(f), &mut buf);
            (i, start.elapsed(), n)
        })
        .collect();
    (per_file.iter().map(|f| f.2).sum(), per_file)
}

/// Reads a file front to back in `buf`-sized reads; returns its length.
fn read_seq(path: &Path, buf: &mut [u8]) -> u64 {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut n = 0u64;
    loop {
        match f.read(buf) {
            Ok(0) => return n,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read {}: {e}", path.display()),
        }
    }
}

/// Downloads the blobs in parallel with curl (as a runtime pulls layers concurrently).
fn download(url: &str, digests: &[Digest], dir: &Path) -> Vec<PathBuf> {
    let children: Vec<(PathBuf, std::process::Child)> = digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let out = dir.join(format!("layer{i}.tar.gz"));
            let child = Command::new("curl")
                .args(["-sf", "-o"])
                .arg(&out)
                .arg(format!("{url}/v2/bench/realistic/blobs/{d}"))
                .spawn()
                .expect("curl not found: apt-get install curl");
            (out, child)
        })
        .collect();
    children
        .into_iter()
        .map(|(out, mut child)| {
            let status = child.wait().expect("curl");
            assert!(status.success(), "curl failed: {status}");
            out
        })
        .collect()
}

fn warm_read(bin: &Path, runs: usize, images: &Images) {
    let local = tempfile::tempdir().expect("tempdir");
    std::fs::write(local.path().join("big.bin"), &images.big).expect("write");
    std::fs::write(local.path().join("small.bin"), &images.small).expect("write");
    run_ok(&mut Command::new("sync"));
    let mnt = tempfile::tempdir().expect("tempdir");
    let mut lp = Lazypull::new(bin, &[]);
    lp.mount(
        &format!("{}/bench/warm:v1", images.registry.host()),
        mnt.path(),
    );
    lp.wait_complete(Duration::from_secs(300));
    let mut buf = vec![0u8; 1 << 20];
    let (mut big_m, mut big_l, mut small_m, mut small_l) = (vec![], vec![], vec![], vec![]);
    let timed = |path: &Path, buf: &mut [u8], expect: usize| {
        drop_caches();
        let start = Instant::now();
        let n = read_seq(path, buf);
        let t = start.elapsed();
        assert_eq!(n, expect as u64, "{}", path.display());
        t
    };
    for _ in 0..runs {
        big_m.push(timed(&mnt.path().join("big.bin"), &mut buf, BIG));
        big_l.push(timed(&local.path().join("big.bin"), &mut buf, BIG));
        let (mut m, mut l) = (Duration::ZERO, Duration::ZERO);
        for _ in 0..SMALL_READS {
            m += timed(&mnt.path().join("small.bin"), &mut buf, SMALL);
            l += timed(&local.path().join("small.bin"), &mut buf, SMALL);
        }
        small_m.push(m);
        small_l.push(l);
    }
    assert_eq!(
        std::fs::read(mnt.path().join("small.bin")).expect("read"),
        images.small
    );
    let (bm, bl) = (median(&mut big_m), median(&mut big_l));
    let (sm, sl) = (median(&mut small_m), median(&mut small_l));
    let small_total = (SMALL * SMALL_READS) as u64;
    println!(
        "warm sequential read, layer fully cached, 1 MiB reads, page cache dropped before each:"
    );
    println!(
        "  {} MiB file ({} chunks):      mount {:7.1} MiB/s, local disk {:7.1} MiB/s, ratio {:.2} \
         (target >= 0.90)",
        BIG >> 20,
        BIG >> 22,
        mib_per_sec(BIG as u64, bm),
        mib_per_sec(BIG as u64, bl),
        bl.as_secs_f64() / bm.as_secs_f64()
    );
    println!(
        "  {} MiB file x{SMALL_READS} (one chunk):  mount {:7.1} MiB/s, local disk {:7.1} MiB/s, ratio {:.2}",
        SMALL >> 20,
        mib_per_sec(small_total, sm),
        mib_per_sec(small_total, sl),
        sl.as_secs_f64() / sm.as_secs_f64()
    );
    lp.umount(mnt.path());
}

fn metadata_walk_and_memory(
    bin: &Path,
    runs: usize,
    images: &Images,
    files: usize,
    memory: Memory,
) {
    // The baseline: the same layers extracted to local disk, stacked with overlayfs.
    let base = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let mut lower = Vec::new();
    for (i, tar) in images.tars.iter().enumerate() {
        let dir = base.path().join(format!("layer{i}"));
        extract_for_overlay(tar, &dir);
        lower.push(dir);
    }
    let merged = base.path().join("merged");
    std::fs::create_dir(&merged).expect("mkdir");
    let lowerdir: Vec<String> = lower
        .iter()
        .rev()
        .map(|p| p.display().to_string())
        .collect();
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lowerdir.join(":")))
            .arg(&merged),
    );
    let overlay = MountGuard(merged.clone());
    println!(
        "metadata walk (readdir + lstat of every entry), {} layers extracted for overlayfs in {:?}:",
        lower.len(),
        start.elapsed()
    );

    let mnt = tempfile::tempdir().expect("tempdir");
    let mut lp = Lazypull::new(bin, &["--background-fill", "false"]);
    lp.mount(
        &format!("{}/bench/realistic:lazy", images.registry.host()),
        mnt.path(),
    );
    let rss_mounted = lp.daemon_memory();
    drop_caches();
    let (cold_m, n_m) = timed_walk(mnt.path());
    let (cold_l, n_l) = timed_walk(&merged);
    assert_eq!(
        n_m, n_l,
        "the mount and the overlay have different entry counts"
    );
    let (mut warm_m, mut warm_l) = (vec![], vec![]);
    for _ in 0..runs.max(3) {
        warm_m.push(timed_walk(mnt.path()).0);
        warm_l.push(timed_walk(&merged).0);
    }
    let (wm, wl) = (median(&mut warm_m), median(&mut warm_l));
    println!(
        "  cold: mount {:7.1} ms, overlayfs on local disk {:7.1} ms ({n_m} entries)",
        cold_m.as_secs_f64() * 1e3,
        cold_l.as_secs_f64() * 1e3
    );
    println!(
        "  warm: mount {:7.1} ms, overlayfs on local disk {:7.1} ms, ratio {:.2} (target <= 1.5)",
        wm.as_secs_f64() * 1e3,
        wl.as_secs_f64() * 1e3,
        wm.as_secs_f64() / wl.as_secs_f64()
    );
    let rss_walked = lp.daemon_memory();
    lp.umount(mnt.path());
    drop(overlay);

    let layers = images.tars.len() as u64;
    let budget = 300 * files as u64 + layers * (8 << 20);
    println!(
        "daemon memory (VmRSS), {files} entries in {layers} layers; budget 300 B/entry + \
         8 MiB/layer = {:.1} MiB:",
        budget as f64 / (1 << 20) as f64
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    for (what, (rss, anon)) in [
        ("after mount", memory.after_mount),
        ("after the import workload", memory.after_workload),
        ("same, 5 s later", memory.after_idle),
        ("after mount (2nd daemon)", rss_mounted),
        ("after the metadata walks", rss_walked),
    ] {
        println!(
            "  {what:26} {:6.1} MiB (anon {:6.1} MiB) = {:5.0} B/entry, {:.2}x budget; \
             (RSS - 8 MiB/layer)/entries = {:.0} B",
            mib(rss),
            mib(anon),
            rss as f64 / files as f64,
            rss as f64 / budget as f64,
            (rss as f64 - (layers * (8 << 20)) as f64).max(0.0) / files as f64
        );
    }
}

/// Walks `root` (not crossing mounts, not following symlinks), lstat-ing every entry.
fn timed_walk(root: &Path) -> (Duration, usize) {
    fn walk(dir: &Path, dev: u64, n: &mut usize) {
        use std::os::unix::fs::MetadataExt;
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let path = e.expect("dir entry").path();
            let m = std::fs::symlink_metadata(&path).expect("lstat");
            *n += 1;
            if m.is_dir() && m.dev() == dev {
                walk(&path, dev, n);
            }
        }
    }
    use std::os::unix::fs::MetadataExt;
    let start = Instant::now();
    let dev = std::fs::metadata(root).expect("stat root").dev();
    let mut n = 0;
    walk(root, dev, &mut n);
    (start.elapsed(), n)
}

/// Unpacks a layer as an overlayfs lower directory: `.wh.NAME` becomes a 0/0 character device,
/// `.wh..wh..opq` the `trusted.overlay.opaque` xattr of its directory.
fn extract_for_overlay(tar: &[u8], dest: &Path) {
    std::fs::create_dir_all(dest).expect("mkdir");
    let mut ar = tar::Archive::new(tar);
    ar.set_preserve_permissions(true);
    ar.set_preserve_ownerships(true);
    ar.set_overwrite(true);
    for e in ar.entries().expect("tar entries") {
        let mut e = e.expect("tar entry");
        let path = e.path().expect("path").into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = dest.join(path.parent().unwrap_or(Path::new("")));
        match name.as_deref() {
            Some(".wh..wh..opq") => {
                std::fs::create_dir_all(&parent).expect("mkdir");
                xattr::set(&parent, "trusted.overlay.opaque", b"y").expect("opaque xattr");
            }
            Some(n) if n.starts_with(".wh.") => {
                std::fs::create_dir_all(&parent).expect("mkdir");
                run_ok(
                    Command::new("mknod")
                        .arg(parent.join(&n[4..]))
                        .args(["c", "0", "0"]),
                );
            }
            _ => {
                e.unpack_in(dest).expect("unpack");
            }
        }
    }
}

/// Unmounts (lazily if busy) on drop.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
