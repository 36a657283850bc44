//! Cold-start benchmark: how much sooner a container prints its first line when started lazily
//! by lazypull than after a full pull, over a realistic link, for workloads of different shape.
//!
//! `cargo build --release -p lazypull && cargo run --release -p lazypull-benches --bin coldstart
//! [-- --profile wan --workload all --runs 5]` (`make bench-coldstart`; `make bench-quick` is
//! `--quick`). Root, FUSE, overlayfs, `ip`/`tc` (iproute2) and the Debian packages
//! docker-registry, runc, containerd, podman and busybox-static; modes whose tool is missing are
//! reported as skipped.
//!
//! **Network.** The images are pushed to a registry on loopback, then served by a second
//! docker-registry in its own network namespace behind a veth pair shaped with `tbf` at the
//! profile's rate. Clients reach it through a delaying TCP proxy on 127.0.0.1 (one RTT per
//! connection set-up, RTT/2 each way per byte, pipelined) and a counting HTTP proxy on the
//! host side of the veth (bytes and requests). The achieved rate and RTT are measured and
//! printed before the first run.
//!
//! **Workloads** (built offline; busybox's `/entry.sh` reads the workload's files and prints
//! `entry: N files` and a `sha256sum` line):
//! - `python`: the python-data-shaped image of the test suite (5 layers, ~22,000 files,
//!   ~430 MB of tar); the entry point reads what `import numpy, pandas` reads (~320 files);
//! - `fullread`: the same layers, the entry point reads every regular file in name order and
//!   prints `read every file` and their sha256: whether lazy pulling is ever slower than a
//!   full pull;
//! - `compiler`: the host's gcc 12 with binutils and libc6-dev (Debian packages, ~45 of them),
//!   compiling and running hello.c;
//! - `large`: 1 GiB of incompressible files in 4 layers, the entry point reads 3 MiB (< 1%);
//! - `tiny`: busybox alone, the overhead floor.
//!
//! Each is pushed as plain gzip, eStargz and zstd:chunked; then one `lazypull run` of the
//! eStargz image (on loopback, not timed) records what the entry point opens (`lazypull stats
//! --accessed`), and the image is pushed once more as eStargz with that prefetch list. The
//! recorded files also give the lower bound ("ideal").
//!
//! **Modes**, each run from a cold state (fresh containerd / podman / lazypull roots, so no
//! cache of any tool survives; page cache dropped just before the timer starts):
//! containerd full pull + `ctr run`; `podman run` (full pull); podman partial pull of
//! zstd:chunked; `lazypull run` of each format; `lazypull rpull` + `ctr run --snapshotter
//! lazypull`; `podman run` through the lazypull layer store; `lazypull run` of the eStargz
//! image (no prefetch list) after an earlier start on the same root learned its profile and
//! image, cache and daemon were removed (`lazypull-learned`); and on a fresh root after
//! another root learned the profile and published it with `lazypull profile push`, so the
//! timed start finds it in the registry (`lazypull-published`, on an eStargz manifest of its
//! own so the published profile reaches no other mode).
//!
//! **Output**: a markdown table per profile (median and min-max over the runs of the time to
//! the first line, time to exit, MB and requests served by the registry, peak RSS of the
//! lazypull daemon, speed-up against containerd's full pull measured in the same run) and the
//! lower bound ("ideal": the bytes the entry point reads at the link rate plus four round
//! trips), written with an SVG bar chart to `target/bench/`. At the end the harness checks it
//! left no namespace, mount or process behind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Output};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use lazypull_benches::chart::{bar_chart, Bar};
use lazypull_benches::shaping::{self, DelayProxy, Profile, ShapedRegistry};
use lazypull_benches::timed::{
    check_interrupted, on_ctrl_c, run_checked, run_timed, tail, vm_hwm, Timed,
};
use lazypull_benches::{drop_caches, is_root, lazypull_binary, load_average, median};
use lazypull_fs::estargz::{write_estargz, WriterOptions};
use lazypull_fs::zstd_chunked::{self, write_zstd_chunked};
use lazypull_tests::containerd::{TestContainerd, NAMESPACE};
use lazypull_tests::images::{entry_point_files, realistic_layers};
use lazypull_tests::podman::{layer_store_options, Podman, PARTIAL_PULLS};
use lazypull_tests::runnable::{busybox_layer, runnable_config};
use lazypull_tests::util::find_in_path;
use lazypull_tests::{CountingProxy, Digest, ImageSpec, Layer, Lazypull, TestRegistry};

const USAGE: &str = "\
coldstart: time from starting a container to its first output line, lazypull against full
pulls (containerd, podman), over a shaped link to a real registry.

Usage: coldstart [--profile lan|wan|slow|all]... [--workload python|fullread|compiler|large|tiny|all]...
                 [--mode NAME]... [--runs N] [--quick] [--out DIR]

  --profile P   network profile (default wan): lan 1 Gbit/s 1 ms RTT, wan 200 Mbit/s 20 ms,
                slow 50 Mbit/s 60 ms; repeat or `all`
  --workload W  python (python-data-shaped, ~430 MB of tar), fullread (the same image,
                every file read and hashed), compiler (gcc compiling hello.c), large
                (1 GiB, reads < 1%), tiny (busybox); repeat or `all` (default all)
  --mode M      only these modes (repeatable): containerd, podman, podman-partial,
                lazypull-gzip, lazypull-estargz, lazypull-prefetch, lazypull-learned,
                lazypull-published, lazypull-zstd, lazypull-rpull, podman-store
                (default all)
  --runs N      runs of each mode, each from a cold state (default 5); median, min, max
  --quick       one workload (python), one profile (wan), one run: the CI smoke test
  --out DIR     where the table and chart go (default target/bench)
  -h, --help    this text

Needs root, /dev/fuse, overlayfs, iproute2 (ip, tc) and the Debian packages docker-registry,
runc and busybox-static; containerd and podman modes are skipped when those are missing.
Build lazypull first: cargo build --release -p lazypull (LAZYPULL_BIN overrides the path).";

/// Manifest annotation carrying an eStargz layer's TOC digest.
const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// eStargz layers are ordinary gzip layers.
const GZIP_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Dependent round trips no client can avoid: connection, manifest, config and TOC, data.
const IDEAL_ROUND_TRIPS: u32 = 4;

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("coldstart: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    shaping::cleanup_leftovers();
    let result = bench(&opts);
    let left = leftovers();
    if !left.is_empty() {
        eprintln!("coldstart: left behind: {}", left.join(", "));
    }
    match result {
        Ok(()) if left.is_empty() => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("coldstart: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the command line asked for.
#[derive(Debug, Clone)]
struct Options {
    profiles: Vec<Profile>,
    workloads: Vec<Workload>,
    modes: Vec<Mode>,
    runs: usize,
    out: PathBuf,
}

/// Parses the flags; `Ok(None)` for `--help`.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Options>> {
    let (mut profiles, mut workloads, mut modes) = (Vec::new(), Vec::new(), Vec::new());
    let mut runs = 5;
    let mut quick = false;
    let mut out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| anyhow!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--quick" => quick = true,
            "--profile" => match value()?.as_str() {
                "all" => profiles.extend(shaping::PROFILES),
                v => profiles.push(
                    shaping::profile(v)
                        .ok_or_else(|| anyhow!("unknown profile {v:?}: lan, wan, slow or all"))?,
                ),
            },
            "--workload" => match value()?.as_str() {
                "all" => workloads.extend(Workload::ALL),
                v => workloads.push(Workload::parse(v).ok_or_else(|| {
                    anyhow!(
                        "unknown workload {v:?}: python, fullread, compiler, large, tiny or all"
                    )
                })?),
            },
            "--mode" => {
                let v = value()?;
                modes.push(
                    Mode::ALL
                        .into_iter()
                        .find(|m| m.name() == v)
                        .ok_or_else(|| anyhow!("unknown mode {v:?} (see --help)"))?,
                );
            }
            "--runs" => {
                let v = value()?;
                runs = match v.parse::<usize>() {
                    Ok(n) if n > 0 => n,
                    _ => bail!("--runs needs a positive number, not {v:?}"),
                };
            }
            "--out" => out = PathBuf::from(value()?),
            _ => bail!("unknown argument {a:?}"),
        }
    }
    if quick {
        profiles = vec![shaping::profile("wan").expect("wan profile")];
        workloads = vec![Workload::Python];
        runs = 1;
    }
    if profiles.is_empty() {
        profiles.push(shaping::profile("wan").expect("wan profile"));
    }
    if workloads.is_empty() {
        workloads.extend(Workload::ALL);
    }
    if modes.is_empty() {
        modes.extend(Mode::ALL);
    }
    profiles.dedup_by_key(|p| p.name);
    workloads.dedup();
    modes.dedup();
    Ok(Some(Options {
        profiles,
        workloads,
        modes,
        runs,
        out,
    }))
}

/// The shape of what the container does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    Python,
    FullRead,
    Compiler,
    Large,
    Tiny,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::Python,
        Workload::FullRead,
        Workload::Compiler,
        Workload::Large,
        Workload::Tiny,
    ];

    fn parse(s: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == s)
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Python => "python",
            Workload::FullRead => "fullread",
            Workload::Compiler => "compiler",
            Workload::Large => "large",
            Workload::Tiny => "tiny",
        }
    }

    /// The image config: busybox's `/entry.sh` reading its list, or the compiler's script.
    fn config(self) -> serde_json::Value {
        let mut config = runnable_config();
        match self {
            Workload::Compiler => {
                config["Cmd"] = serde_json::json!(["/bin/sh", "/compile.sh"]);
                config["Env"] = serde_json::json!(["PATH=/usr/bin:/bin"]);
            }
            Workload::FullRead => {
                config["Cmd"] = serde_json::json!(["/bin/sh", "/fullread.sh"]);
            }
            _ => {}
        }
        config
    }

    /// What the container prints first.
    fn first_line(self, entry_files: usize) -> String {
        match self {
            Workload::Compiler => COMPILER_FIRST_LINE.to_string(),
            Workload::FullRead => FULL_READ_FIRST_LINE.to_string(),
            _ => format!("entry: {entry_files} files"),
        }
    }

    /// The layers (uncompressed tars, base first) and the files the entry point reads (empty
    /// when not known before a run).
    fn build(self) -> Result<(Vec<Vec<u8>>, Vec<String>)> {
        Ok(match self {
            Workload::Python => {
                let entry = entry_point_files();
                let mut tars = realistic_layers(1);
                tars.push(busybox_layer(&entry));
                (tars, entry)
            }
            Workload::FullRead => {
                let mut tars = realistic_layers(1);
                tars.push(busybox_layer(&[]));
                let mut b = tar::Builder::new(Vec::new());
                append_file(&mut b, "fullread.sh", FULL_READ_SH.as_bytes(), 0o755);
                tars.push(b.into_inner().context("tar into memory")?);
                (tars, Vec::new())
            }
            Workload::Compiler => {
                let toolchain = host_toolchain_layer()?;
                let entry = vec!["compile.sh".to_string()];
                let mut b = tar::Builder::new(Vec::new());
                append_file(&mut b, "src/hello.c", HELLO_C.as_bytes(), 0o644);
                append_file(&mut b, "compile.sh", COMPILE_SH.as_bytes(), 0o755);
                let program = b.into_inner().context("tar into memory")?;
                (vec![toolchain, busybox_layer(&entry), program], Vec::new())
            }
            Workload::Large => {
                // 4 layers x 16 files x 16 MiB of random bytes; reads one file's first 3 MiB
                // worth: a 3 MiB file of its own in the last data layer.
                let mut tars: Vec<Vec<u8>> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..4u64)
                        .map(|l| {
                            s.spawn(move || {
                                let mut b = tar::Builder::new(Vec::with_capacity(257 << 20));
                                for f in 0..16u64 {
                                    let data = lazypull_tests::random_bytes(16 << 20, l * 100 + f);
                                    append_file(
                                        &mut b,
                                        &format!("data/l{l}/blob{f:02}.bin"),
                                        &data,
                                        0o644,
                                    );
                                }
                                if l == 3 {
                                    let small = lazypull_tests::random_bytes(3 << 20, 999);
                                    append_file(&mut b, "data/model/weights.bin", &small, 0o644);
                                    append_file(
                                        &mut b,
                                        "data/model/config.json",
                                        b"{\"n\":1}\n",
                                        0o644,
                                    );
                                }
                                b.into_inner().expect("tar into memory")
                            })
                        })
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().expect("tar thread"))
                        .collect()
                });
                let entry = vec![
                    "data/model/config.json".to_string(),
                    "data/model/weights.bin".to_string(),
                ];
                tars.push(busybox_layer(&entry));
                (tars, entry)
            }
            Workload::Tiny => {
                let entry = vec!["entry.list".to_string()];
                (vec![busybox_layer(&entry)], entry)
            }
        })
    }
}

/// The full-read workload: every regular file of the image, in name order, hashed (what a
/// workload that reads everything costs; the digest, printed second, checks every mode read
/// the same bytes). Files runtimes add or bind-mount (/etc, /run, ...) are left out.
const FULL_READ_SH: &str = "set -e -o pipefail\n\
d=$(busybox find / -xdev -type f ! -path '/etc/*' ! -path '/run/*' ! -path '/tmp/*' \\\n\
  ! -path '/dev/*' ! -path '/proc/*' ! -path '/sys/*' -print0 | busybox sort -z | xargs -0 cat | sha256sum)\n\
echo 'read every file'\n\
echo \"$d\"\n";
const FULL_READ_FIRST_LINE: &str = "read every file";

/// The compiler workload's program and what it prints first.
const HELLO_C: &str = "#include <stdio.h>\n#include <string.h>\n\
int main(void) {\n\
    const char *msg = \"compiled and ran hello.c\";\n\
    printf(\"%s\\n%zu bytes\\n\", msg, strlen(msg));\n\
    return 0;\n\
}\n";
const COMPILER_FIRST_LINE: &str = "compiled and ran hello.c";
/// Compiles and runs it: gcc reads its driver, cc1, as, ld, headers, crt objects and libc.
const COMPILE_SH: &str = "set -e\ncd /tmp\ngcc-12 -O1 -o hello /src/hello.c\n./hello\n";

/// Debian packages of the host's gcc 12 and everything it needs to compile and link a C
/// program, found with `apt-cache depends --recurse` among the installed packages.
fn toolchain_packages() -> Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            "gcc-12",
            "libc6-dev",
        ])
        .output()
        .context("running apt-cache (the compiler workload packs the host's gcc)")?;
    let mut wanted: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<') && !l.is_empty())
        .map(str::to_string)
        .collect();
    wanted.sort();
    wanted.dedup();
    let out = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev} ${Package}\\n"])
        .args(&wanted)
        .output()
        .context("running dpkg-query")?;
    let installed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ii"))
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    if !installed.iter().any(|p| p == "gcc-12") {
        bail!("the compiler workload packs the host's gcc: apt-get install -y gcc-12 libc6-dev");
    }
    Ok(installed)
}

/// A layer of the host's gcc 12 toolchain (files of the packages of [`toolchain_packages`],
/// with `lib` and `lib64` as the merged-/usr symlinks Debian 12 has).
fn host_toolchain_layer() -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let packages = toolchain_packages()?;
    let out = Command::new("dpkg-query")
        .arg("-L")
        .args(&packages)
        .output()
        .context("running dpkg-query -L")?;
    let mut b = tar::Builder::new(Vec::new());
    for (name, target) in [("lib", "usr/lib"), ("lib64", "usr/lib64")] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_link(&mut h, name, target).context("tar append")?;
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut dirs = std::collections::BTreeSet::new();
    let mut entries: Vec<(String, std::fs::Metadata, PathBuf)> = Vec::new();
    for listed in String::from_utf8_lossy(&out.stdout).lines() {
        let listed = Path::new(listed);
        let (Some(parent), Some(name)) = (listed.parent(), listed.file_name()) else {
            continue;
        };
        // Through merged-/usr directory symlinks (/lib -> usr/lib) to the real place.
        let Ok(parent) = parent.canonicalize() else {
            continue;
        };
        let real = parent.join(name);
        let Ok(meta) = std::fs::symlink_metadata(&real) else {
            continue;
        };
        let Ok(rel) = real.strip_prefix("/") else {
            continue;
        };
        let rel = rel.to_string_lossy().into_owned();
        // Directories come from the files' parents; the merged-/usr top-level links (bin, lib,
        // lib64, ...) from the fixed list above, so that busybox's /bin stays a directory.
        let top_level_link = meta.file_type().is_symlink() && !rel.contains('/');
        if meta.is_dir() || top_level_link || !seen.insert(rel.clone()) {
            continue;
        }
        let mut dir = Path::new(&rel).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            if !dirs.insert(d.to_string_lossy().into_owned()) {
                break;
            }
            dir = d.parent();
        }
        entries.push((rel, meta, real));
    }
    for d in dirs {
        if d == "lib" || d == "lib64" {
            continue;
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_data(&mut h, format!("{d}/"), &[][..])
            .context("tar append")?;
    }
    for (rel, meta, real) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_mode(meta.permissions().mode() & 0o7777);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&real).context("reading a symlink")?;
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &rel, &target).context("tar append")?;
        } else if meta.is_file() {
            let data = std::fs::read(&real).with_context(|| format!("reading {rel}"))?;
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, &rel, &data[..])
                .context("tar append")?;
        }
    }
    b.into_inner().context("tar into memory")
}

/// Appends a regular file (root, fixed mtime) to an in-memory tar.
fn append_file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, path, data).expect("tar append");
}

/// How an image's layers are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Format {
    Gzip,
    Estargz,
    EstargzPrefetch,
    /// The eStargz layers under a manifest of their own, so a profile published for it (keyed
    /// by manifest digest) reaches no other mode.
    EstargzPublished,
    ZstdChunked,
}

impl Format {
    fn tag(self) -> &'static str {
        match self {
            Format::Gzip => "gzip",
            Format::Estargz => "estargz",
            Format::EstargzPrefetch => "estargz-prefetch",
            Format::EstargzPublished => "estargz-published",
            Format::ZstdChunked => "zstd-chunked",
        }
    }

    /// One layer in this format; `prefetch` is the entry point's file list.
    fn layer(self, tar: &[u8], prefetch: &[String]) -> Result<Layer> {
        let diff_id = Digest::sha256_of(tar);
        Ok(match self {
            Format::Gzip => Layer {
                data: lazypull_tests::gzip(tar),
                media_type: Some(GZIP_MEDIA_TYPE.to_string()),
                diff_id,
                annotations: BTreeMap::new(),
            },
            Format::Estargz | Format::EstargzPrefetch | Format::EstargzPublished => {
                let opts = WriterOptions {
                    prefetch: (self == Format::EstargzPrefetch).then(|| prefetch.to_vec()),
                    ..WriterOptions::default()
                };
                let mut out = Vec::with_capacity(tar.len() / 2);
                let w = write_estargz(tar, &mut out, &opts)
                    .map_err(|e| anyhow!("eStargz conversion: {e}"))?;
                Layer {
                    data: out,
                    media_type: Some(GZIP_MEDIA_TYPE.to_string()),
                    diff_id: w.diff_id,
                    annotations: BTreeMap::from([(
                        TOC_ANNOTATION.to_string(),
                        w.toc_digest.to_string(),
                    )]),
                }
            }
            Format::ZstdChunked => {
                let opts = zstd_chunked::writer::WriterOptions {
                    level: 3,
                    ..Default::default()
                };
                let mut out = Vec::with_capacity(tar.len() / 2);
                let w = write_zstd_chunked(tar, &mut out, &opts)
                    .map_err(|e| anyhow!("zstd:chunked conversion: {e}"))?;
                let mut layer = Layer::new(out)
                    .with_media_type(lazypull_tests::MEDIA_TYPE_OCI_LAYER_ZSTD)
                    .with_diff_id(w.diff_id);
                for (k, v) in w.annotations() {
                    layer = layer.with_annotation(&k, &v);
                }
                layer
            }
        })
    }
}

/// One way of starting the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Containerd,
    Podman,
    PodmanPartial,
    LazyGzip,
    LazyEstargz,
    LazyPrefetch,
    LazyLearned,
    LazyPublished,
    LazyZstd,
    LazyRpull,
    PodmanStore,
}

impl Mode {
    const ALL: [Mode; 11] = [
        Mode::Containerd,
        Mode::Podman,
        Mode::PodmanPartial,
        Mode::LazyGzip,
        Mode::LazyEstargz,
        Mode::LazyPrefetch,
        Mode::LazyLearned,
        Mode::LazyPublished,
        Mode::LazyZstd,
        Mode::LazyRpull,
        Mode::PodmanStore,
    ];

    fn name(self) -> &'static str {
        match self {
            Mode::Containerd => "containerd",
            Mode::Podman => "podman",
            Mode::PodmanPartial => "podman-partial",
            Mode::LazyGzip => "lazypull-gzip",
            Mode::LazyEstargz => "lazypull-estargz",
            Mode::LazyPrefetch => "lazypull-prefetch",
            Mode::LazyLearned => "lazypull-learned",
            Mode::LazyPublished => "lazypull-published",
            Mode::LazyZstd => "lazypull-zstd",
            Mode::LazyRpull => "lazypull-rpull",
            Mode::PodmanStore => "podman-store",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Containerd => "containerd: ctr pull + ctr run (gzip)",
            Mode::Podman => "podman run (full pull, gzip)",
            Mode::PodmanPartial => "podman run, partial pull (zstd:chunked)",
            Mode::LazyGzip => "lazypull run (gzip: whole layers)",
            Mode::LazyEstargz => "lazypull run (eStargz)",
            Mode::LazyPrefetch => "lazypull run (eStargz + prefetch list)",
            Mode::LazyLearned => "lazypull run (eStargz, profile learned by an earlier start)",
            Mode::LazyPublished => {
                "lazypull run on a fresh node (eStargz, profile learned elsewhere, from the registry)"
            }
            Mode::LazyZstd => "lazypull run (zstd:chunked)",
            Mode::LazyRpull => {
                "lazypull rpull + ctr run --snapshotter lazypull (eStargz + prefetch)"
            }
            Mode::PodmanStore => "podman run via lazypull layer store (eStargz + prefetch)",
        }
    }

    fn format(self) -> Format {
        match self {
            Mode::Containerd | Mode::Podman | Mode::LazyGzip => Format::Gzip,
            Mode::PodmanPartial | Mode::LazyZstd => Format::ZstdChunked,
            Mode::LazyEstargz | Mode::LazyLearned => Format::Estargz,
            Mode::LazyPublished => Format::EstargzPublished,
            Mode::LazyPrefetch | Mode::LazyRpull | Mode::PodmanStore => Format::EstargzPrefetch,
        }
    }

    fn is_lazypull(self) -> bool {
        !matches!(self, Mode::Containerd | Mode::Podman | Mode::PodmanPartial)
    }

    /// Why this mode cannot run here, if it cannot.
    fn missing_tool(self) -> Option<String> {
        let need: &[&str] = match self {
            Mode::Containerd | Mode::LazyRpull => &["containerd", "ctr"],
            Mode::Podman | Mode::PodmanPartial | Mode::PodmanStore => &["podman"],
            _ => &[],
        };
        need.iter()
            .find(|b| find_in_path(b).is_none())
            .map(|b| format!("`{b}` not installed"))
    }
}

/// What one container start measured.
#[derive(Debug, Clone)]
struct Sample {
    first_line: Duration,
    exit: Duration,
    bytes: u64,
    requests: usize,
    peak_rss: Option<u64>,
}

/// One workload's images in the registry.
struct Built {
    workload: Workload,
    /// Compressed bytes per format.
    sizes: BTreeMap<Format, u64>,
    /// Bytes of the files the entry point reads.
    read_bytes: u64,
    /// The same files, gzip-compressed one by one: the least that must cross the link.
    read_compressed: u64,
    /// What the container prints first.
    first_line: String,
    /// What the recorded run printed: every mode must print the same.
    output: String,
}

impl Built {
    fn repo(&self, format: Format) -> String {
        format!("coldstart/{}:{}", self.workload.name(), format.tag())
    }
}

fn bench(opts: &Options) -> Result<()> {
    preflight()?;
    let Some(bin) = lazypull_binary("coldstart") else {
        bail!("no lazypull binary (see above)");
    };
    let rt = tokio::runtime::Runtime::new().context("starting a tokio runtime")?;
    on_ctrl_c(&rt, "coldstart");
    println!("{}", machine_facts());
    println!("load average at start: {}", load_average());

    // Build and push every image to a registry on loopback; the shaped one serves its storage.
    let registry = TestRegistry::plain();
    let mut built = Vec::new();
    for &w in &opts.workloads {
        built.push(build_and_push(&rt, &registry, &bin, w)?);
        check_interrupted()?;
    }
    let probe = probe_blob(&rt, &registry);
    let mut markdown = String::new();
    let mut bars = Vec::new();
    for &profile in &opts.profiles {
        let table = bench_profile(opts, &bin, &registry, &built, &probe, profile, &mut bars)?;
        println!("\n{table}");
        markdown.push_str(&table);
        markdown.push('\n');
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let md = opts.out.join("coldstart.md");
    std::fs::write(&md, &markdown).with_context(|| format!("writing {}", md.display()))?;
    let svg = opts.out.join("coldstart.svg");
    bar_chart(
        &svg,
        "Time to the container's first output line (median, s)",
        &bars,
    )
    .with_context(|| format!("writing {}", svg.display()))?;
    println!("wrote {} and {}", md.display(), svg.display());
    println!(
        "load average at the end: {} (other work on the machine skews the absolute figures)",
        load_average()
    );
    Ok(())
}

/// A 16 MiB blob for measuring the link rate.
fn probe_blob(rt: &tokio::runtime::Runtime, registry: &TestRegistry) -> (String, String) {
    let data = lazypull_tests::random_bytes(16 << 20, 4242);
    let layer = Layer::new(lazypull_tests::gzip(&data));
    let digest = Digest::sha256_of(&layer.data).to_string();
    let spec = ImageSpec::new(vec![layer], "linux", "amd64");
    rt.block_on(
        registry
            .pusher()
            .push_image_with("coldstart/probe", "v1", &spec),
    );
    ("coldstart/probe".to_string(), digest)
}

/// Builds one workload's layers, converts them to every format (layers in parallel) and
/// pushes them; records the entry point's accesses with one lazypull run of the eStargz image
/// (on loopback) and pushes eStargz with that prefetch list.
fn build_and_push(
    rt: &tokio::runtime::Runtime,
    registry: &TestRegistry,
    bin: &Path,
    workload: Workload,
) -> Result<Built> {
    let start = Instant::now();
    let (tars, known_entry) = workload.build()?;
    let repo = format!("coldstart/{}", workload.name());
    let push = |format: Format, prefetch: &[String]| -> Result<u64> {
        let layers = std::thread::scope(|s| -> Result<Vec<Layer>> {
            let hs: Vec<_> = tars
                .iter()
                .map(|t| s.spawn(|| format.layer(t, prefetch)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().map_err(|_| anyhow!("conversion panicked"))?)
                .collect()
        })?;
        let size = layers.iter().map(|l| l.data.len() as u64).sum();
        let mut spec = ImageSpec::new(layers, "linux", "amd64");
        spec.config = workload.config();
        rt.block_on(
            registry
                .pusher()
                .push_image_with(&repo, format.tag(), &spec),
        );
        if format == Format::Estargz {
            // The same layers under another manifest: what a mode publishes for it stays there.
            spec.annotations.insert(
                "org.example.coldstart.variant".to_string(),
                Format::EstargzPublished.tag().to_string(),
            );
            rt.block_on(registry.pusher().push_image_with(
                &repo,
                Format::EstargzPublished.tag(),
                &spec,
            ));
        }
        check_interrupted()?;
        Ok(size)
    };
    let mut sizes = BTreeMap::new();
    for format in [Format::Gzip, Format::Estargz, Format::ZstdChunked] {
        sizes.insert(format, push(format, &[])?);
    }
    sizes.insert(Format::EstargzPublished, sizes[&Format::Estargz]);
    let image = format!("{}/{repo}:{}", registry.host(), Format::Estargz.tag());
    let (recorded, output) = record(bin, &image)?;
    sizes.insert(
        Format::EstargzPrefetch,
        push(Format::EstargzPrefetch, &recorded)?,
    );
    let (read_bytes, read_compressed) = read_bytes(&tars, &recorded);
    let tar_bytes: u64 = tars.iter().map(|t| t.len() as u64).sum();
    println!(
        "workload {}: {} layers, {:.0} MB of tar (gzip {:.0} MB, eStargz {:.0} MB, zstd:chunked \
         {:.0} MB); a recorded run opened {} files, {:.1} MB ({:.1} MB gzip-compressed); built \
         and pushed in {:.0} s",
        workload.name(),
        tars.len(),
        tar_bytes as f64 / 1e6,
        sizes[&Format::Gzip] as f64 / 1e6,
        sizes[&Format::Estargz] as f64 / 1e6,
        sizes[&Format::ZstdChunked] as f64 / 1e6,
        recorded.len(),
        read_bytes as f64 / 1e6,
        read_compressed as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    let built = Built {
        workload,
        sizes,
        read_bytes,
        read_compressed,
        first_line: workload.first_line(known_entry.len()),
        output,
    };
    if built.output.lines().next() != Some(built.first_line.as_str()) {
        bail!(
            "workload {}: the recorded run printed {:?}, expected {:?} first",
            workload.name(),
            built.output,
            built.first_line
        );
    }
    Ok(built)
}

/// Runs `image` once with lazypull (no background fill) and returns the files it opened, in
/// order (`lazypull stats --accessed`), and what the container printed.
fn record(bin: &Path, image: &str) -> Result<(Vec<String>, String)> {
    let lp = Lazypull::new(bin, &["--background-fill", "false"]);
    let out = lp.cmd(&["run", "--rm", image]);
    if !out.status.success() {
        bail!(
            "recording run of {image} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            tail(&lp.log(), 20)
        );
    }
    let list = lp.cmd(&["stats", "--accessed", image]);
    lp.shutdown();
    if !list.status.success() {
        bail!(
            "lazypull stats --accessed {image} failed: {}",
            String::from_utf8_lossy(&list.stderr).trim()
        );
    }
    let files: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if files.is_empty() {
        bail!("the recording run of {image} opened no file of the image");
    }
    Ok((files, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Bytes of the `entry` files in the merged image (the last layer holding a path wins), as
/// stored and gzip-compressed one by one: what the entry point reads, and the least a client
/// must move over the link to give it that (a compressed chunk per file, no neighbours).
fn read_bytes(tars: &[Vec<u8>], entry: &[String]) -> (u64, u64) {
    use std::io::{Read, Write};
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for t in tars {
        let mut ar = tar::Archive::new(&t[..]);
        let Ok(entries) = ar.entries() else { continue };
        for mut e in entries.flatten() {
            let Ok(path) = e.path() else { continue };
            let path = path.to_string_lossy().trim_start_matches("./").to_string();
            if entry.contains(&path) {
                let mut data = Vec::new();
                if e.read_to_end(&mut data).is_ok() {
                    files.insert(path, data);
                }
            }
        }
    }
    let raw = files.values().map(|d| d.len() as u64).sum();
    let compressed = std::thread::scope(|s| {
        let hs: Vec<_> = files
            .values()
            .map(|d| {
                s.spawn(move || {
                    let mut enc = flate2::write::GzEncoder::new(
                        Vec::with_capacity(d.len() / 2),
                        flate2::Compression::default(),
                    );
                    let _ = enc.write_all(d);
                    enc.finish().map_or(d.len(), |c| c.len()) as u64
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    (raw, compressed)
}

/// Every mode and workload over one profile; returns the markdown table and adds the chart's
/// bars.
fn bench_profile(
    opts: &Options,
    bin: &Path,
    registry: &TestRegistry,
    built: &[Built],
    probe: &(String, String),
    profile: Profile,
    bars: &mut Vec<Bar>,
) -> Result<String> {
    let shaped = ShapedRegistry::start(&registry.storage_dir(), profile)?;
    let counting = CountingProxy::start(&shaped.registry_addr());
    let delay = DelayProxy::start(&counting.host(), profile.rtt)?;
    let host = delay.host();
    let (rate, rtt) = shaping::measure(&host, &probe.0, &probe.1)?;
    println!(
        "\nprofile {}: configured {:.0} Mbit/s, {} ms RTT; measured {:.0} Mbit/s, and {:.1} ms \
         for a first request on a new connection (handshake + request: 2 RTT)",
        profile.name,
        profile.rate_bits_per_sec as f64 / 1e6,
        profile.rtt.as_millis(),
        rate / 1e6,
        rtt.as_secs_f64() * 1e3
    );
    let mut samples: BTreeMap<(Workload, Mode), Vec<Sample>> = BTreeMap::new();
    let mut skipped: Vec<(Mode, String)> = Vec::new();
    for m in &opts.modes {
        if let Some(why) = m.missing_tool() {
            skipped.push((*m, why));
        }
    }
    for run in 1..=opts.runs {
        for b in built {
            for &mode in &opts.modes {
                if skipped.iter().any(|(m, _)| *m == mode) {
                    continue;
                }
                check_interrupted()?;
                let image = format!("{host}/{}", b.repo(mode.format()));
                let (sample, output) =
                    run_mode(bin, mode, &image, &counting).with_context(|| {
                        format!(
                            "profile {}, workload {}, run {run}: {}",
                            profile.name,
                            b.workload.name(),
                            mode.label()
                        )
                    })?;
                check_output(b, mode, &output)?;
                eprintln!(
                    "{} run {run}/{} {:8} {:60} first line {:7.2} s, exit {:7.2} s, {:7.1} MB, \
                     {:5} requests",
                    profile.name,
                    opts.runs,
                    b.workload.name(),
                    mode.label(),
                    sample.first_line.as_secs_f64(),
                    sample.exit.as_secs_f64(),
                    sample.bytes as f64 / 1e6,
                    sample.requests
                );
                samples.entry((b.workload, mode)).or_default().push(sample);
            }
        }
    }
    drop(delay);
    drop(counting);
    drop(shaped);
    Ok(table(
        opts, profile, rate, rtt, built, &samples, &skipped, bars,
    ))
}

/// Every mode must print what the recorded run printed.
fn check_output(b: &Built, mode: Mode, output: &str) -> Result<()> {
    if output != b.output {
        bail!(
            "{} printed {output:?}, the recorded run {:?}: the image content differs",
            mode.label(),
            b.output
        );
    }
    Ok(())
}

/// Starts `image` once in `mode` from a cold state; the sample and the container's output.
fn run_mode(
    bin: &Path,
    mode: Mode,
    image: &str,
    counting: &CountingProxy,
) -> Result<(Sample, String)> {
    let stderr = tempfile::NamedTempFile::new().context("temp file")?;
    let id = format!("coldstart-{}", std::process::id());
    let host = image.split('/').next().unwrap_or_default().to_string();
    // Set-up outside the timer: a fresh tool state, and the daemons a user keeps running.
    let (timed, logs, peak_rss) = match mode {
        Mode::Containerd => {
            let c = TestContainerd::start();
            let pull = c.ctr_command(&["images", "pull", "--plain-http", image]);
            let run = c.ctr_command(&["run", "--rm", image, &id]);
            let start = cold_start(counting);
            let timed = pull_then_run(pull, run, start, stderr.path(), counting)?;
            (timed, c.log_tail(20), None)
        }
        Mode::Podman | Mode::PodmanPartial => {
            let options = if mode == Mode::PodmanPartial {
                PARTIAL_PULLS
            } else {
                ""
            };
            let p = Podman::new(std::slice::from_ref(&host), options);
            let run = p.command(&["run", "--rm", "--network", "none", image]);
            let start = cold_start(counting);
            let timed = run_timed(run, start, stderr.path(), || counting.total_body_bytes())?;
            (timed, String::new(), None)
        }
        Mode::LazyGzip
        | Mode::LazyEstargz
        | Mode::LazyPrefetch
        | Mode::LazyZstd
        | Mode::LazyLearned
        | Mode::LazyPublished => {
            let lp = Lazypull::new(bin, &[]);
            if mode == Mode::LazyLearned {
                learn_profile(&lp, image)?;
            }
            if mode == Mode::LazyPublished {
                // Another node learns and publishes; this one starts with nothing but the
                // registry.
                let learner = Lazypull::new(bin, &[]);
                learn_profile(&learner, image)?;
                started(
                    learner.cmd(&["profile", "push", image]),
                    "publishing the learned profile",
                )?;
            }
            let mut run = lp.command();
            run.args(["run", "--rm", image]);
            let start = cold_start(counting);
            let timed = run_timed(run, start, stderr.path(), || counting.total_body_bytes());
            let rss = lp.daemon_pid().and_then(vm_hwm);
            let log = tail(&lp.log(), 30);
            lp.shutdown();
            (timed?, log, rss)
        }
        Mode::LazyRpull => {
            let lp = Lazypull::new(bin, &[]);
            started(lp.cmd(&["images"]), "starting the lazypull daemon")?;
            let c =
                TestContainerd::start_with_proxy_snapshotter("lazypull", &lp.snapshotter_socket());
            let mut pull = lp.command();
            pull.arg("rpull")
                .arg("--containerd-address")
                .arg(c.socket())
                .args(["--namespace", NAMESPACE, "--plain-http", image]);
            let run = c.ctr_command(&["run", "--rm", "--snapshotter", "lazypull", image, &id]);
            let start = cold_start(counting);
            let timed = pull_then_run(pull, run, start, stderr.path(), counting);
            let rss = lp.daemon_pid().and_then(vm_hwm);
            let log = format!("{}\n{}", tail(&lp.log(), 20), c.log_tail(10));
            drop(c);
            lp.shutdown();
            (timed?, log, rss)
        }
        Mode::PodmanStore => {
            let store = StoreDir::new()?;
            let lp = Lazypull::new(bin, &["--layer-store", &store.path().to_string_lossy()]);
            started(lp.cmd(&["ps"]), "starting the lazypull daemon")?;
            let p = Podman::new(
                std::slice::from_ref(&host),
                &layer_store_options(&store.path()),
            );
            let run = p.command(&["run", "--rm", "--network", "none", image]);
            let start = cold_start(counting);
            let timed = run_timed(run, start, stderr.path(), || counting.total_body_bytes());
            let rss = lp.daemon_pid().and_then(vm_hwm);
            let log = tail(&lp.log(), 30);
            drop(p);
            lp.shutdown();
            drop(store);
            (timed?, log, rss)
        }
    };
    let requests = counting.requests().len();
    let explain = || {
        format!(
            "its stderr:\n{}\nlogs:\n{logs}",
            tail(
                &std::fs::read_to_string(stderr.path()).unwrap_or_default(),
                20
            )
        )
    };
    if !timed.status.success() {
        bail!("exited with {}: {}", timed.status, explain());
    }
    let first_line = timed
        .first_line
        .ok_or_else(|| anyhow!("the container printed nothing: {}", explain()))?;
    Ok((
        Sample {
            first_line,
            exit: timed.exit,
            bytes: counting.total_body_bytes(),
            requests,
            peak_rss,
        },
        timed.stdout,
    ))
}

/// An earlier start of `image` under `lp`'s root, outside the timer: it leaves the learned
/// profile in `<root>/profiles` and nothing else (image removed, daemon stopped, chunk cache
/// and local copies deleted), so the timed start is cold but for the profile.
fn learn_profile(lp: &Lazypull, image: &str) -> Result<()> {
    let out = lp.cmd(&["run", "--rm", image]);
    if !out.status.success() {
        bail!(
            "the learning start of {image} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // The daemon saves the profile whenever reads pause, so wait until it has not changed
    // for a while after the container's end (a pause mid-run saved an early, shorter one).
    let profiles = lp.root.path().join("profiles");
    let exited = Instant::now();
    let deadline = exited + Duration::from_secs(60);
    let settled = Duration::from_secs(4);
    loop {
        let newest = std::fs::read_dir(&profiles)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max();
        let quiet = newest.is_some_and(|m| m.elapsed().is_ok_and(|age| age >= settled));
        if quiet && exited.elapsed() >= settled {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "no profile was learned from the start of {image}:\n{}",
                tail(&lp.log(), 20)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    started(lp.cmd(&["rmi", image]), "removing the learned image")?;
    lp.shutdown();
    for dir in ["cache", "local"] {
        let _ = std::fs::remove_dir_all(lp.root.path().join(dir));
    }
    Ok(())
}

/// Drops the page cache, zeroes the registry counters and starts the clock.
fn cold_start(counting: &CountingProxy) -> Instant {
    drop_caches();
    counting.reset();
    Instant::now()
}

/// Runs `pull` to completion, then times `run` (both from `start`).
fn pull_then_run(
    mut pull: Command,
    run: Command,
    start: Instant,
    stderr: &Path,
    counting: &CountingProxy,
) -> Result<Timed> {
    run_checked(&mut pull)?;
    run_timed(run, start, stderr, || counting.total_body_bytes())
}

/// Fails with the command's stderr unless it succeeded.
fn started(out: Output, what: &str) -> Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The layer store's mount point, detached on drop even when the daemon died without
/// unmounting it.
struct StoreDir(tempfile::TempDir);

impl StoreDir {
    fn new() -> Result<StoreDir> {
        Ok(StoreDir(tempfile::tempdir().context("temp dir")?))
    }

    fn path(&self) -> PathBuf {
        self.0.path().join("store")
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let p = self.path();
        if mount_points().iter().any(|m| Path::new(m) == p) {
            let _ = Command::new("umount").arg("-l").arg(&p).status();
        }
    }
}

/// Every mount point (field 5 of mountinfo).
fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .collect()
}

/// What the run left behind: benchmark namespaces and links, FUSE or overlay mounts under the
/// temp dir, and daemons the harness started.
fn leftovers() -> Vec<String> {
    let mut left = shaping::leftovers();
    let tmp = std::env::temp_dir().to_string_lossy().into_owned();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for l in info.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let (Some(mp), Some(fs)) = (f.get(4), f.iter().skip_while(|x| **x != "-").nth(1)) {
            if mp.starts_with(&tmp) && (fs.starts_with("fuse") || *fs == "overlay") {
                left.push(format!("mount {mp} ({fs})"));
            }
        }
    }
    for name in ["docker-registry", "containerd", "lazypull"] {
        let out = Command::new("pgrep").args(["-f", "-a", name]).output();
        if let Ok(out) = out {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let is_ours = line.contains("lazypull-containerd-")
                    || (name == "lazypull"
                        && (line.contains(" serve") || line.contains(" fuse-keeper")))
                    || (name == "docker-registry" && line.contains(&tmp));
                if is_ours {
                    left.push(format!("process {line}"));
                }
            }
        }
    }
    left
}

/// Median, min and max of one figure.
fn spread(samples: &[Sample], f: impl Fn(&Sample) -> Duration) -> (Duration, Duration, Duration) {
    let mut v: Vec<Duration> = samples.iter().map(f).collect();
    let m = median(&mut v);
    (m, v[0], v[v.len() - 1])
}

/// The markdown table of one profile, and its bars for the chart.
#[allow(clippy::too_many_arguments)]
fn table(
    opts: &Options,
    profile: Profile,
    rate: f64,
    rtt: Duration,
    built: &[Built],
    samples: &BTreeMap<(Workload, Mode), Vec<Sample>>,
    skipped: &[(Mode, String)],
    bars: &mut Vec<Bar>,
) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "### Profile `{}`: {:.0} Mbit/s, {} ms RTT (measured: {:.0} Mbit/s, {:.1} ms for a first \
         request on a new connection); {} run(s) each, median (min-max)\n",
        profile.name,
        profile.rate_bits_per_sec as f64 / 1e6,
        profile.rtt.as_millis(),
        rate / 1e6,
        rtt.as_secs_f64() * 1e3,
        opts.runs
    );
    let _ = writeln!(
        t,
        "| workload | mode | first line (s) | exit (s) | speed-up vs containerd | MB fetched | \
         requests | daemon peak RSS (MB) |\n|---|---|---|---|---|---|---|---|"
    );
    let secs = |(m, lo, hi): (Duration, Duration, Duration)| {
        format!(
            "{:.2} ({:.2}-{:.2})",
            m.as_secs_f64(),
            lo.as_secs_f64(),
            hi.as_secs_f64()
        )
    };
    for b in built {
        let w = b.workload;
        let baseline = samples
            .get(&(w, Mode::Containerd))
            .map(|s| spread(s, |s| s.first_line).0);
        let mut best_lazy: Option<Duration> = None;
        for &mode in &opts.modes {
            let Some(ss) = samples.get(&(w, mode)) else {
                continue;
            };
            let first = spread(ss, |s| s.first_line);
            if mode.is_lazypull() {
                best_lazy = Some(best_lazy.map_or(first.0, |b| b.min(first.0)));
            }
            let ratio = baseline
                .map(|b| format!("{:.2}x", b.as_secs_f64() / first.0.as_secs_f64()))
                .unwrap_or_else(|| "-".into());
            let mut bytes: Vec<u64> = ss.iter().map(|s| s.bytes).collect();
            bytes.sort_unstable();
            let mut reqs: Vec<usize> = ss.iter().map(|s| s.requests).collect();
            reqs.sort_unstable();
            let rss = ss
                .iter()
                .filter_map(|s| s.peak_rss)
                .max()
                .map(|r| format!("{:.0}", r as f64 / 1e6))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {ratio} | {:.1} of {:.0} | {} | {rss} |",
                w.name(),
                mode.label(),
                secs(first),
                secs(spread(ss, |s| s.exit)),
                bytes[bytes.len() / 2] as f64 / 1e6,
                b.sizes[&mode.format()] as f64 / 1e6,
                reqs[reqs.len() / 2],
            );
            bars.push(Bar {
                group: format!("{} / {}", w.name(), profile.name),
                series: mode.name().to_string(),
                value: first.0.as_secs_f64(),
            });
        }
        let ideal = Duration::from_secs_f64(b.read_compressed as f64 * 8.0 / rate)
            + profile.rtt * IDEAL_ROUND_TRIPS;
        bars.push(Bar {
            group: format!("{} / {}", w.name(), profile.name),
            series: "ideal (lower bound)".to_string(),
            value: ideal.as_secs_f64(),
        });
        let vs = best_lazy
            .map(|l| {
                format!(
                    "best lazypull mode {:.2}x of it",
                    l.as_secs_f64() / ideal.as_secs_f64()
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            t,
            "| {} | ideal: the {:.1} MB a recorded run opened, {:.1} MB compressed, at the \
             measured rate + {IDEAL_ROUND_TRIPS} RTT | {:.2} | | {vs} | | | |",
            w.name(),
            b.read_bytes as f64 / 1e6,
            b.read_compressed as f64 / 1e6,
            ideal.as_secs_f64()
        );
    }
    for (m, why) in skipped {
        let _ = writeln!(t, "\nskipped: {} ({why})", m.label());
    }
    t
}

/// Root, /dev/fuse and the tools every mode needs, each missing one named with its package.
fn preflight() -> Result<()> {
    if !is_root() {
        bail!("needs root (network namespaces, FUSE mounts, overlayfs, runc)");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing: load the fuse module (modprobe fuse)");
    }
    let mut missing = Vec::new();
    for (bin, pkg) in [
        ("docker-registry", "docker-registry"),
        ("runc", "runc"),
        ("ip", "iproute2"),
        ("tc", "iproute2"),
    ] {
        if find_in_path(bin).is_none() {
            missing.push(pkg);
        }
    }
    if !Path::new(lazypull_tests::runnable::BUSYBOX).exists() {
        missing.push("busybox-static");
    }
    if !missing.is_empty() {
        missing.dedup();
        bail!("missing tools: apt-get install -y {}", missing.join(" "));
    }
    Ok(())
}

/// CPU, memory, kernel and tool versions: the context the figures need.
fn machine_facts() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let version = |cmd: &str, arg: &str| {
        Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_else(|| "not installed".into())
    };
    format!(
        "machine: {} cores ({cpu}), kernel {}; {}; {}; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        version("uname", "-r"),
        version("containerd", "--version"),
        version("podman", "--version"),
        version("runc", "--version"),
    )
}
