//! Cold-start benchmark of `lazypull run`: the time from invoking `lazypull run --rm IMAGE` to
//! the container's first line of output, for the realistic python-shaped image on loopback,
//! against a full pull of the same image (`skopeo copy` + `umoci raw unpack` + `runc run`)
//! measured in the same run. docs/design.md section 6 targets >= 3x on loopback.
//!
//! `cargo build --release -p lazypull && cargo run --release -p lazypull-benches --bin run-bench
//! [-- --runs N | --quick | --demo]` (root, FUSE, overlayfs; Debian packages docker-registry,
//! runc, skopeo, umoci, busybox-static; `LAZYPULL_BIN` overrides the binary's path).
//!
//! The image: the five layers of `lazypull_tests::images::realistic_layers` (~22,000 files,
//! ~430 MB of tar) plus a busybox layer whose `/entry.sh` reads every file an
//! `import numpy, pandas` reads (~320 files, ~90 MB, most of it three large shared objects) and
//! then prints `entry: N files` and the `sha256sum` of the last one. It is pushed to a real
//! docker-registry twice: as eStargz (`bench/estargz:v1`, 4 MiB chunks, no prefetch landmark,
//! as `ctr-remote images convert --estargz` writes it without a profile) and as plain gzip
//! (`bench/gzip:v1`). Every contender talks to the registry through a counting proxy, which
//! gives the bytes each one fetched.
//!
//! Each run of each contender starts cold: a fresh lazypull `--root` (empty chunk cache, no
//! daemon) or a fresh directory for the full pull, and `sync; echo 3 > drop_caches` just before
//! the timer starts. The contenders, interleaved run by run:
//!
//! - `lazypull run`, eStargz, with the daemon started by `run` itself (what a user sees first);
//! - the same with the daemon already running (started by `lazypull images` before the timer);
//! - the same without background fill, which leaves only what the workload needed fetched;
//! - `lazypull run` of the plain gzip image (whole layers fetched and verified, no laziness);
//! - the full pull: `skopeo copy docker://... oci:DIR` (layers in parallel), `umoci raw unpack`
//!   into a bundle, a `config.json` from `runc spec` with the image's command, environment and
//!   working directory (host network, as `lazypull run` defaults to), and `runc run`.
//!
//! Every container must print the same two lines; the benchmark fails if one differs.
//! `--quick` is one run of each; `--demo` is one run of the first, third and last contenders
//! and a short summary (what `make demo` shows).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lazypull_benches::timed::{
    check_interrupted, on_ctrl_c, run_checked, run_timed, tail, vm_hwm, INTERRUPTED,
};
use lazypull_benches::{drop_caches, is_root, lazypull_binary, load_average, median};
use lazypull_fs::estargz::{write_estargz, WriterOptions};
use lazypull_tests::images::{entry_point_files, realistic_layers};
use lazypull_tests::runnable::{busybox_layer, runnable_config, BUSYBOX};
use lazypull_tests::util::find_in_path;
use lazypull_tests::{CountingProxy, Digest, ImageSpec, Layer, Lazypull, TestRegistry};

const USAGE: &str = "\
run-bench: time from `lazypull run` to the container's first output line, against a full pull
(skopeo copy + umoci raw unpack + runc run) of the same image, on a registry on loopback.

Usage: run-bench [--runs N | --quick | --demo]

  --runs N   runs of each contender, each from a cold state (default 3); medians are reported
  --quick    one run of each contender (same as --runs 1)
  --demo     one run of lazypull (eStargz; with and without background fill) and one full
             pull, and a short summary
  -h, --help this text

Needs root, /dev/fuse, overlayfs and the Debian packages docker-registry, runc, skopeo, umoci
and busybox-static. Build lazypull first: cargo build --release -p lazypull
(LAZYPULL_BIN overrides target/release/lazypull).";

/// Manifest annotation carrying an eStargz layer's TOC digest.
const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// eStargz layers are ordinary gzip layers.
const ESTARGZ_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The two images, as repository paths under the registry host.
const ESTARGZ_IMAGE: &str = "bench/estargz:v1";
const GZIP_IMAGE: &str = "bench/gzip:v1";
/// Seed of the realistic image's content.
const SEED: u64 = 1;
fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("run-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match bench(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("run-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Options {
    runs: usize,
    demo: bool,
}

/// Parses the flags; `Ok(None)` for `--help`.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>> {
    let mut opts = Options {
        runs: 3,
        demo: false,
    };
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => opts.runs = 1,
            "--demo" => {
                opts.demo = true;
                opts.runs = 1;
            }
            "--runs" => {
                let v = inline
                    .or_else(|| args.next())
                    .ok_or_else(|| anyhow!("--runs needs a number"))?;
                opts.runs = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => bail!("--runs needs a positive number, not {v:?}"),
                };
            }
            _ => bail!("unknown argument {a:?}"),
        }
    }
    Ok(Some(opts))
}

/// One way of starting the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    /// `lazypull run` of the eStargz image; `run` starts the daemon.
    Lazy,
    /// The same with the daemon already running.
    LazyDaemonUp,
    /// The same as `Lazy` with `--background-fill false`.
    LazyNoFill,
    /// `lazypull run` of the plain gzip image (whole-layer fetch).
    Gzip,
    /// skopeo copy + umoci raw unpack + runc run.
    FullPull,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Lazy => "lazypull run, eStargz (daemon started by `run`)",
            Mode::LazyDaemonUp => "lazypull run, eStargz (daemon already running)",
            Mode::LazyNoFill => "lazypull run, eStargz, `--background-fill false`",
            Mode::Gzip => "lazypull run, plain gzip (whole layers)",
            Mode::FullPull => "full pull: skopeo copy + umoci unpack + runc run",
        }
    }
}

/// What one container start measured.
#[derive(Debug, Clone)]
struct Sample {
    /// From invoking the first command to the container's first output line.
    first_line: Duration,
    /// From invoking the first command to its exit.
    exit: Duration,
    /// Body bytes the registry served by the first line and by the exit.
    bytes_first: u64,
    bytes_exit: u64,
    /// The lazypull daemon's peak resident set (VmHWM) at the container's exit.
    peak_rss: Option<u64>,
    /// Full pull only: end of `skopeo copy`, end of the unpack.
    phases: Option<(Duration, Duration)>,
    /// The container's output.
    output: String,
}

fn bench(opts: &Options) -> Result<()> {
    preflight()?;
    let Some(bin) = lazypull_binary("run-bench") else {
        bail!("no lazypull binary (see above)");
    };
    let rt = tokio::runtime::Runtime::new().context("starting a tokio runtime")?;
    on_ctrl_c(&rt, "run-bench");
    println!("{}", machine_facts());
    println!("load average at start: {}", load_average());

    let prepared = prepare(&rt)?;
    check_interrupted()?;
    let modes: &[Mode] = if opts.demo {
        &[Mode::Lazy, Mode::LazyNoFill, Mode::FullPull]
    } else {
        &[
            Mode::Lazy,
            Mode::LazyDaemonUp,
            Mode::LazyNoFill,
            Mode::Gzip,
            Mode::FullPull,
        ]
    };
    let mut samples: BTreeMap<Mode, Vec<Sample>> = BTreeMap::new();
    for run in 1..=opts.runs {
        for &mode in modes {
            check_interrupted()?;
            let sample = match mode {
                Mode::FullPull => full_pull(&prepared.proxy),
                _ => lazypull_run(&bin, &prepared.proxy, mode),
            }
            .with_context(|| format!("run {run}, {}", mode.label()))?;
            check_output(&prepared, mode, &sample)?;
            eprintln!(
                "run {run}/{}: {:50} first line {:6.2} s, exit {:6.2} s, {:7.1} MB fetched",
                opts.runs,
                mode.label(),
                sample.first_line.as_secs_f64(),
                sample.exit.as_secs_f64(),
                sample.bytes_exit as f64 / 1e6
            );
            samples.entry(mode).or_default().push(sample);
        }
    }
    // Every contender must have printed exactly what the full pull's container printed.
    let reference = samples[&Mode::FullPull][0].output.clone();
    for (mode, ss) in &samples {
        for s in ss {
            if s.output != reference {
                bail!(
                    "{} printed {:?}, the full pull's container {:?}: the image content differs",
                    mode.label(),
                    s.output,
                    reference
                );
            }
        }
    }
    report(opts, &prepared, &mut samples);
    println!(
        "load average at the end: {} (other work on the machine skews the absolute figures)",
        load_average()
    );
    Ok(())
}

/// Root, /dev/fuse and the tools, each missing one named with the package that provides it.
fn preflight() -> Result<()> {
    if !is_root() {
        bail!("needs root (FUSE and overlayfs mounts, runc, dropping the page cache)");
    }
    let mut missing = Vec::new();
    for (tool, package) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
        ("runc", "runc"),
    ] {
        if find_in_path(tool).is_none() {
            missing.push(format!("{tool} (apt-get install {package})"));
        }
    }
    if !Path::new(BUSYBOX).exists() {
        missing.push(format!("{BUSYBOX} (apt-get install busybox-static)"));
    }
    if !missing.is_empty() {
        bail!("missing: {}", missing.join(", "));
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: `modprobe fuse` (and apt-get install fuse3)");
    }
    Ok(())
}

/// CPU, cores, memory, kernel and tool versions, on a few lines.
fn machine_facts() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0.0, |kb| kb as f64 / (1 << 20) as f64);
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let version = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(str::to_string)
            })
            .unwrap_or_else(|| format!("{tool} ?"))
    };
    format!(
        "machine: {nproc} cores ({cpu}), {mem_gib:.1} GiB RAM, kernel {}\ntools: {}; {}; {}",
        read("/proc/sys/kernel/osrelease").trim(),
        version("runc"),
        version("skopeo"),
        version("umoci"),
    )
}

/// The registry with both images, the counting proxy in front of it, and figures about the
/// image.
struct Prepared {
    /// Kept alive for the proxy; killed on drop.
    _registry: TestRegistry,
    proxy: CountingProxy,
    layers: usize,
    tar_entries: usize,
    tar_bytes: u64,
    estargz_bytes: u64,
    gzip_bytes: u64,
    entry_files: usize,
    entry_bytes: u64,
}

/// Builds the image, converts it to eStargz and gzip in parallel, and pushes both.
fn prepare(rt: &tokio::runtime::Runtime) -> Result<Prepared> {
    let start = Instant::now();
    let entry = entry_point_files();
    let mut tars = realistic_layers(SEED);
    tars.push(busybox_layer(&entry));
    let (estargz, gzip) = std::thread::scope(|s| -> Result<(Vec<Layer>, Vec<Layer>)> {
        let lazy: Vec<_> = tars.iter().map(|t| s.spawn(|| estargz_layer(t))).collect();
        let plain: Vec<_> = tars
            .iter()
            .map(|t| {
                s.spawn(|| Layer {
                    data: lazypull_tests::gzip(t),
                    media_type: None,
                    diff_id: Digest::sha256_of(t),
                    annotations: BTreeMap::new(),
                })
            })
            .collect();
        let lazy = lazy
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("eStargz conversion panicked"))?
            })
            .collect::<Result<Vec<_>>>()?;
        let plain = plain
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("gzip compression panicked")))
            .collect::<Result<Vec<_>>>()?;
        Ok((lazy, plain))
    })?;
    let sum = |ls: &[Layer]| ls.iter().map(|l| l.data.len() as u64).sum::<u64>();
    let (estargz_bytes, gzip_bytes) = (sum(&estargz), sum(&gzip));
    let (tar_entries, entry_bytes) = count_entries(&tars, &entry);
    let registry = TestRegistry::plain();
    let pusher = registry.pusher();
    rt.block_on(async {
        for (repo, layers) in [("bench/estargz", estargz), ("bench/gzip", gzip)] {
            let mut spec = ImageSpec::new(layers, "linux", "amd64");
            spec.config = runnable_config();
            pusher.push_image_with(repo, "v1", &spec).await;
        }
    });
    let proxy = CountingProxy::start(&registry.host());
    let prepared = Prepared {
        _registry: registry,
        proxy,
        layers: tars.len(),
        tar_entries,
        tar_bytes: tars.iter().map(|t| t.len() as u64).sum(),
        estargz_bytes,
        gzip_bytes,
        entry_files: entry.len(),
        entry_bytes,
    };
    println!(
        "image: {} layers (realistic python-shaped image + busybox entry point), {} tar entries, \
         {:.0} MB of tar; eStargz {:.0} MB, plain gzip {:.0} MB; the entry point reads {} files, \
         {:.1} MB; built, converted and pushed in {:.0} s",
        prepared.layers,
        prepared.tar_entries,
        prepared.tar_bytes as f64 / 1e6,
        prepared.estargz_bytes as f64 / 1e6,
        prepared.gzip_bytes as f64 / 1e6,
        prepared.entry_files,
        prepared.entry_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(prepared)
}

/// An eStargz layer (default 4 MiB chunks, no prefetch landmark) with its TOC annotation.
fn estargz_layer(tar: &[u8]) -> Result<Layer> {
    let mut out = Vec::with_capacity(tar.len() / 2);
    let w = write_estargz(tar, &mut out, &WriterOptions::default())
        .map_err(|e| anyhow!("eStargz conversion: {e}"))?;
    Ok(Layer {
        data: out,
        media_type: Some(ESTARGZ_MEDIA_TYPE.to_string()),
        diff_id: w.diff_id,
        annotations: BTreeMap::from([(TOC_ANNOTATION.to_string(), w.toc_digest.to_string())]),
    })
}

/// Tar entries over all layers, and the bytes of the `entry` files in the merged image (the
/// last layer holding a path wins).
fn count_entries(tars: &[Vec<u8>], entry: &[String]) -> (usize, u64) {
    let wanted: HashSet<&str> = entry.iter().map(String::as_str).collect();
    let mut sizes: HashMap<String, u64> = HashMap::new();
    let mut count = 0;
    for t in tars {
        let mut ar = tar::Archive::new(&t[..]);
        let Ok(entries) = ar.entries() else { continue };
        for e in entries.flatten() {
            count += 1;
            let Ok(path) = e.path() else { continue };
            let path = path.to_string_lossy();
            let path = path.trim_start_matches("./");
            if wanted.contains(path) {
                sizes.insert(path.to_string(), e.size());
            }
        }
    }
    (count, sizes.values().sum())
}

/// The container must print `entry: N files` then a `sha256sum` line of the last file.
fn check_output(prepared: &Prepared, mode: Mode, s: &Sample) -> Result<()> {
    let want = format!("entry: {} files", prepared.entry_files);
    let mut lines = s.output.lines();
    if lines.next() != Some(want.as_str()) || lines.next().is_none_or(|l| l.len() < 64) {
        bail!(
            "{}: the container printed {:?}, expected {want:?} and a sha256sum line",
            mode.label(),
            s.output
        );
    }
    Ok(())
}

/// One `lazypull run --rm` from a fresh root.
fn lazypull_run(bin: &Path, proxy: &CountingProxy, mode: Mode) -> Result<Sample> {
    let extra: &[&str] = match mode {
        Mode::LazyNoFill => &["--background-fill", "false"],
        _ => &[],
    };
    let image = match mode {
        Mode::Gzip => format!("{}/{GZIP_IMAGE}", proxy.host()),
        _ => format!("{}/{ESTARGZ_IMAGE}", proxy.host()),
    };
    let lp = Lazypull::new(bin, extra);
    if mode == Mode::LazyDaemonUp {
        let out = lp.cmd(&["images"]);
        if !out.status.success() {
            bail!(
                "starting the daemon with `lazypull images` failed: {}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                tail(&lp.log(), 20)
            );
        }
    }
    let stderr = tempfile::NamedTempFile::new().context("temp file")?;
    let mut cmd = lp.command();
    cmd.args(["run", "--rm", &image]);
    drop_caches();
    proxy.reset();
    let start = Instant::now();
    let timed = run_timed(cmd, start, stderr.path(), || proxy.total_body_bytes());
    let bytes_exit = proxy.total_body_bytes();
    let peak_rss = lp.daemon_pid().and_then(vm_hwm);
    let explain = || {
        format!(
            "lazypull run --rm {image}; its stderr:\n{}\ndaemon log ({}):\n{}",
            tail(
                &std::fs::read_to_string(stderr.path()).unwrap_or_default(),
                20
            ),
            lp.root.path().join("lazypull.log").display(),
            tail(&lp.log(), 30)
        )
    };
    let timed = match timed {
        Err(e) if INTERRUPTED.load(Ordering::SeqCst) => return Err(e),
        t => t.with_context(explain)?,
    };
    if !timed.status.success() {
        bail!("exited with {}: {}", timed.status, explain());
    }
    let first_line = timed
        .first_line
        .ok_or_else(|| anyhow!("the container printed nothing: {}", explain()))?;
    if !lp.shutdown() {
        eprintln!("run-bench: the lazypull daemon did not stop within 20 s; killing it");
    }
    Ok(Sample {
        first_line,
        exit: timed.exit,
        bytes_first: timed.bytes_first,
        bytes_exit,
        peak_rss,
        phases: None,
        output: timed.stdout,
    })
}

/// The classic way: pull everything, unpack it, then run.
fn full_pull(proxy: &CountingProxy) -> Result<Sample> {
    let dir = tempfile::tempdir().context("temp dir")?;
    let layout = dir.path().join("oci");
    let bundle = dir.path().join("bundle");
    let container = RuncContainer {
        root: dir.path().join("runc"),
        id: format!("run-bench-{}", std::process::id()),
    };
    let image = format!("docker://{}/{GZIP_IMAGE}", proxy.host());
    drop_caches();
    proxy.reset();
    let start = Instant::now();
    run_checked(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(&image)
            .arg(format!("oci:{}:v1", layout.display())),
    )?;
    let pulled = start.elapsed();
    std::fs::create_dir(&bundle).context("creating the bundle directory")?;
    run_checked(
        Command::new("umoci")
            .args(["raw", "unpack", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(bundle.join("rootfs")),
    )?;
    let unpacked = start.elapsed();
    write_runtime_spec(&bundle, &image_config(&layout)?)?;
    let mut cmd = Command::new("runc");
    cmd.arg("--root")
        .arg(&container.root)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&container.id);
    let stderr = dir.path().join("runc.stderr");
    let timed = run_timed(cmd, start, &stderr, || proxy.total_body_bytes());
    let explain = || {
        format!(
            "runc run; its stderr:\n{}",
            tail(&std::fs::read_to_string(&stderr).unwrap_or_default(), 20)
        )
    };
    let timed = match timed {
        Err(e) if INTERRUPTED.load(Ordering::SeqCst) => return Err(e),
        t => t.with_context(explain)?,
    };
    if !timed.status.success() {
        bail!("exited with {}: {}", timed.status, explain());
    }
    let first_line = timed
        .first_line
        .ok_or_else(|| anyhow!("the container printed nothing: {}", explain()))?;
    Ok(Sample {
        first_line,
        exit: timed.exit,
        bytes_first: timed.bytes_first,
        bytes_exit: proxy.total_body_bytes(),
        peak_rss: None,
        phases: Some((pulled, unpacked)),
        output: timed.stdout,
    })
}

/// The `config` section of the image config in an OCI layout (first manifest of its index).
fn image_config(layout: &Path) -> Result<serde_json::Value> {
    let blob = |digest: &serde_json::Value| -> Result<serde_json::Value> {
        let d = digest.as_str().context("descriptor without a digest")?;
        let hex = d.strip_prefix("sha256:").context("digest not sha256")?;
        let path = layout.join("blobs/sha256").join(hex);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&bytes).with_context(|| format!("parsing {}", path.display()))
    };
    let index_path = layout.join("index.json");
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&index_path).with_context(|| format!("reading {}", index_path.display()))?,
    )?;
    let manifest = blob(&index["manifests"][0]["digest"])?;
    let config = blob(&manifest["config"]["digest"])?;
    Ok(config["config"].clone())
}

/// `config.json` for `runc run`: `runc spec`'s default, with the image's entrypoint + cmd,
/// environment and working directory, no terminal, a writable root, and the host's network
/// (as `lazypull run` defaults to).
fn write_runtime_spec(bundle: &Path, image: &serde_json::Value) -> Result<()> {
    run_checked(Command::new("runc").args(["spec", "--bundle"]).arg(bundle))?;
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let strings = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v.as_array().cloned().unwrap_or_default()
    };
    let mut args = strings(&image["Entrypoint"]);
    args.extend(strings(&image["Cmd"]));
    if args.is_empty() {
        bail!("the image has neither Entrypoint nor Cmd");
    }
    let process = &mut spec["process"];
    process["terminal"] = false.into();
    process["args"] = args.into();
    if let Some(env) = image["Env"].as_array() {
        process["env"] = env.clone().into();
    }
    if let Some(cwd) = image["WorkingDir"].as_str().filter(|w| !w.is_empty()) {
        process["cwd"] = cwd.into();
    }
    spec["root"]["readonly"] = false.into();
    if let Some(ns) = spec["linux"]["namespaces"].as_array_mut() {
        ns.retain(|n| n["type"] != "network");
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// A runc container of the full pull: deleted (forcibly) on drop, run or not.
struct RuncContainer {
    root: PathBuf,
    id: String,
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        if self.root.is_dir() {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&self.root)
                .args(["delete", "--force", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Median, min and max of one figure of the samples.
fn stats(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> (Duration, Duration, Duration) {
    let mut v: Vec<Duration> = samples.iter().map(f).collect();
    let m = median(&mut v);
    (m, v[0], v[v.len() - 1])
}

/// Median of a byte figure.
fn median_bytes(samples: &[Sample], f: impl Fn(&Sample) -> u64) -> u64 {
    let mut v: Vec<u64> = samples.iter().map(f).collect();
    v.sort_unstable();
    v[v.len() / 2]
}

/// Prints the markdown table, the verdict and (in demo mode) the one-sentence summary.
fn report(opts: &Options, prepared: &Prepared, samples: &mut BTreeMap<Mode, Vec<Sample>>) {
    let full = stats(&samples[&Mode::FullPull], |s| s.first_line).0;
    let secs = |d: Duration| format!("{:.2}", d.as_secs_f64());
    let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
    println!();
    println!(
        "Time from invoking the command to the container's first output line (`entry: {} \
         files`, printed after reading {:.0} MB), registry on loopback, each run from a cold \
         state (fresh root or directory, page cache dropped); {} run(s) each, median (min-max):",
        prepared.entry_files,
        prepared.entry_bytes as f64 / 1e6,
        opts.runs
    );
    println!();
    println!(
        "| mode | first line, s | exit, s | MB fetched by first line / by exit | daemon peak RSS, \
         MiB | speed-up vs full pull |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (mode, ss) in samples.iter() {
        let (m, lo, hi) = stats(ss, |s| s.first_line);
        let first = if ss.len() > 1 {
            format!("{} ({}-{})", secs(m), secs(lo), secs(hi))
        } else {
            secs(m)
        };
        let exit = secs(stats(ss, |s| s.exit).0);
        let bytes = format!(
            "{} / {}",
            mb(median_bytes(ss, |s| s.bytes_first)),
            mb(median_bytes(ss, |s| s.bytes_exit))
        );
        let rss = match ss.iter().filter_map(|s| s.peak_rss).max() {
            Some(b) => format!("{:.0}", b as f64 / (1 << 20) as f64),
            None => "-".into(),
        };
        let speedup = if *mode == Mode::FullPull {
            "1.00x (baseline)".to_string()
        } else {
            format!("{:.2}x", full.as_secs_f64() / m.as_secs_f64())
        };
        println!(
            "| {} | {first} | {exit} | {bytes} | {rss} | {speedup} |",
            mode.label()
        );
    }
    println!();
    let phases: Vec<(Duration, Duration)> = samples[&Mode::FullPull]
        .iter()
        .filter_map(|s| s.phases)
        .collect();
    if !phases.is_empty() {
        let mut pull: Vec<Duration> = phases.iter().map(|p| p.0).collect();
        let mut unpack: Vec<Duration> = phases.iter().map(|p| p.1 - p.0).collect();
        let (pull, unpack) = (median(&mut pull), median(&mut unpack));
        println!(
            "full pull, median phases: skopeo copy {} s, umoci raw unpack {} s, then runc run to \
             the first line {} s",
            secs(pull),
            secs(unpack),
            secs(full.saturating_sub(pull + unpack))
        );
    }
    let full_bytes = median_bytes(&samples[&Mode::FullPull], |s| s.bytes_exit);
    let verdicts: Vec<String> = samples
        .iter()
        .filter(|(m, _)| **m != Mode::FullPull)
        .map(|(mode, ss)| {
            let ratio = full.as_secs_f64() / stats(ss, |s| s.first_line).0.as_secs_f64();
            format!(
                "{}: {ratio:.2}x ({}; {:.0}% of the full pull's bytes)",
                mode.label(),
                if ratio >= 3.0 { "met" } else { "NOT met" },
                median_bytes(ss, |s| s.bytes_first) as f64 * 100.0 / full_bytes.max(1) as f64
            )
        })
        .collect();
    println!(
        "speed-up to the first line against the full pull (target >= 3x on loopback):\n  {}",
        verdicts.join("\n  ")
    );
    if opts.demo {
        let summary = |mode: Mode| {
            let ss = &samples[&mode];
            let t = stats(ss, |s| s.first_line).0;
            (
                t,
                full.as_secs_f64() / t.as_secs_f64(),
                median_bytes(ss, |s| s.bytes_first),
            )
        };
        let faster = |ratio: f64| {
            if ratio >= 1.0 {
                format!("{ratio:.1}x faster")
            } else {
                format!("{:.1}x slower", 1.0 / ratio)
            }
        };
        let (t, ratio, bytes) = summary(Mode::Lazy);
        println!();
        println!(
            "The container printed its first line after {:.1} s with `lazypull run` vs {:.1} s \
             with a full pull ({}); lazypull had fetched {:.0} MB of the {:.0} MB a full pull \
             downloads.",
            t.as_secs_f64(),
            full.as_secs_f64(),
            faster(ratio),
            bytes as f64 / 1e6,
            full_bytes as f64 / 1e6
        );
        if samples.contains_key(&Mode::LazyNoFill) {
            let (t, ratio, bytes) = summary(Mode::LazyNoFill);
            println!(
                "With `--background-fill false` (only what the container reads is fetched): \
                 {:.1} s ({}), {:.0} MB fetched.",
                t.as_secs_f64(),
                faster(ratio),
                bytes as f64 / 1e6
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<Options>> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags() {
        let o = |runs, demo| Some(Options { runs, demo });
        assert_eq!(parse(&[]).unwrap(), o(3, false));
        assert_eq!(parse(&["--runs", "5"]).unwrap(), o(5, false));
        assert_eq!(parse(&["--runs=2"]).unwrap(), o(2, false));
        assert_eq!(parse(&["--quick"]).unwrap(), o(1, false));
        assert_eq!(parse(&["--demo"]).unwrap(), o(1, true));
        assert_eq!(parse(&["--help"]).unwrap(), None);
        assert!(parse(&["--runs"]).is_err());
        assert!(parse(&["--runs", "0"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
