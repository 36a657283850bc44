//! Hostile images through the real `lazypull mount`, a real registry and real FUSE.
//!
//! Every image here is hand-made by an attacker who controls the blob and the manifest: TOCs
//! that are not bound to the manifest, chunk digests reused with other sizes, absurd chunk
//! sizes, TOCs that decompress to hundreds of MiB, device nodes and setuid files, overlong
//! names, whiteouts of `.` and `..`, and truncated blobs. The tests assert the safe outcome
//! (the data served is the real, verified content or nothing; the daemon neither crashes nor
//! balloons; errors say what is wrong) and that the daemon keeps serving a well-formed image
//! afterwards. Every wait is bounded, so a daemon that spins or hangs fails a test instead of
//! hanging it.

mod common;

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;

use common::hostile::{
    assert_no_panic, daemon_peak_rss, estargz_blob, estargz_blob_with_chunks, estargz_toc_json,
    gzip_layer, gzip_toc_bomb, mount_ok, push_layers, read_bounded, rewrite_estargz_toc, sha,
    toc_entries, toc_entry, try_mount, within, zstd_toc_bomb, Control,
};
use common::{build_tar, lazypull, zstd_chunked_layer, E};
use lazypull_tests::{random_bytes, Lazypull, TestRegistry};
use serde_json::{json, Value};

const EIO: i32 = 5;
const EACCES: i32 = 13;
const MIB: u64 = 1 << 20;

/// A self-contained part of a test (own registry and daemon).
type Part = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs every part (each in its own task, so one failing part does not hide the others) and
/// fails with the list of parts that failed.
async fn run_parts(parts: Vec<(&'static str, Part)>) {
    let mut failed = Vec::new();
    for (name, part) in parts {
        if let Err(e) = tokio::spawn(part).await {
            let msg = match e.try_into_panic() {
                Ok(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into()),
                Err(e) => e.to_string(),
            };
            let short: String = msg.chars().take(1500).collect();
            failed.push(format!("part ({name}): {short}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} part(s) failed:\n{}",
        failed.len(),
        failed.join("\n---\n")
    );
}

fn daemon() -> Lazypull {
    lazypull(&["--background-fill", "false"])
}

/// A daemon that also serves its metrics, and the port they are on.
fn daemon_with_metrics() -> (Lazypull, u16) {
    let port = lazypull_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    (
        lazypull(&["--background-fill", "false", "--metrics-address", &addr]),
        port,
    )
}

/// The value of the sample of `name` whose labels include every `labels` pair (`key="v"`).
fn metric(port: u16, name: &str, labels: &[&str]) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // HTTP/1.0: a plain body, no chunked encoding to undo.
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Blocking work inside the multi-threaded test runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn stderr_of(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )
}

/// What a failed command said, without its progress lines, with the registry's address and
/// every `sha256:<hex>` replaced by placeholders, so that a search for a word or a number
/// cannot match the image reference, a port or a digest by chance.
fn error_text(out: &std::process::Output, registry: &TestRegistry) -> String {
    let text = stderr_of(out)
        .lines()
        .filter(|l| !l.starts_with("started the lazypull daemon") && !l.starts_with("resolving "))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(&registry.host(), "<registry>");
    eprintln!("mount error: {text}");
    let mut clean = String::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("sha256:") {
        clean.push_str(&rest[..at]);
        clean.push_str("<sha256>");
        let after = &rest[at + 7..];
        let hex = after.bytes().take_while(u8::is_ascii_hexdigit).count();
        rest = &after[hex..];
    }
    clean.push_str(rest);
    clean
}

/// Reads `name` under `dir` (at most `expected.len() + 64 KiB`) and asserts it is exactly
/// `expected`.
fn assert_reads(lp: &Lazypull, dir: &Path, name: &str, expected: &[u8]) {
    let got = read_bounded(&dir.join(name), expected.len() as u64 + 65536, 60);
    match got {
        Ok(got) => assert!(
            got == expected,
            "{name} reads back {} bytes with sha256 {}, expected {} bytes with sha256 {}\ndaemon log:\n{}",
            got.len(),
            sha(&got),
            expected.len(),
            sha(expected),
            lp.log()
        ),
        Err(e) => panic!(
            "{name} (expected {} bytes) cannot be read: {e}\ndaemon log:\n{}",
            expected.len(),
            lp.log()
        ),
    }
}

fn assert_log_contains(lp: &Lazypull, needle: &str) {
    let log = lp.log();
    assert!(log.contains(needle), "daemon log lacks {needle:?}:\n{log}");
}

/// Asserts the daemon is alive and did not abort on an allocation.
fn assert_daemon_alive(lp: &Lazypull) {
    let log = lp.log();
    assert!(
        !log.contains("memory allocation"),
        "the daemon failed an allocation:\n{log}"
    );
    assert_no_panic(lp);
    assert!(lp.daemon_running(), "the daemon is gone:\n{log}");
}

fn assert_peak_below(lp: &Lazypull, limit: u64) {
    let peak = daemon_peak_rss(lp);
    assert!(peak > 0, "no daemon to measure:\n{}", lp.log());
    eprintln!("daemon peak RSS (VmHWM): {} MiB", peak / MIB);
    assert!(
        peak < limit,
        "daemon peak RSS (VmHWM) {} MiB, limit {} MiB\ndaemon log:\n{}",
        peak / MIB,
        limit / MIB,
        lp.log()
    );
}

// ---------------------------------------------------------------------------------------------
// 1. A TOC that the manifest does not bind is never trusted.

#[tokio::test(flavor = "multi_thread")]
async fn unannotated_estargz_toc_is_never_trusted() {
    run_parts(vec![
        ("a: untampered eStargz", Box::pin(unannotated_untampered())),
        ("b: tampered eStargz", Box::pin(unannotated_tampered())),
        ("c: unannotated zstd:chunked", Box::pin(unannotated_zstd())),
    ])
    .await;
}

async fn unannotated_untampered() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/unannotated-a-control").await;
    let hello = b"hello from the real layer\n".to_vec();
    let filler = random_bytes(300_000, 11);
    let tar = build_tar(vec![
        E::Dir("etc", 0o755),
        E::File("hello.txt", 0o644, hello.clone()),
        E::File("etc/filler.bin", 0o644, filler.clone()),
    ]);
    let (_, image) = push_layers(
        &registry,
        "hostile/unannotated-a",
        vec![gzip_layer(estargz_blob(&tar), None)],
    )
    .await;
    let (lp, port) = daemon_with_metrics();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let _m = mount_ok(&lp, &image, mnt.path(), 60);
        assert_reads(&lp, mnt.path(), "hello.txt", &hello);
        assert_reads(&lp, mnt.path(), "etc/filler.bin", &filler);
        assert_log_contains(&lp, "not bound to the manifest");
        assert_eq!(
            metric(
                port,
                "lazypull_refused_tocs_total",
                &[r#"cause="unbound""#, r#"format="estargz""#]
            ),
            Some(1.0),
            "the refused TOC is not counted"
        );
        control.assert_still_serving(&lp);
    });
}

/// An attacker eStargz blob of exactly `size` bytes: `hello.txt` with `hello`, an extra file
/// `attacker-only.txt`, and random padding sized to match.
fn attacker_blob_of_size(size: usize, hello: &[u8]) -> Vec<u8> {
    let build = |pad: usize, extra: usize| {
        let mut evil = b"planted by the attacker\n".to_vec();
        evil.resize(evil.len() + extra, b'!');
        estargz_blob(&build_tar(vec![
            E::Dir("etc", 0o755),
            E::File("hello.txt", 0o644, hello.to_vec()),
            E::File("attacker-only.txt", 0o644, evil),
            E::File("etc/filler.bin", 0o644, random_bytes(pad, 77)),
        ]))
    };
    for extra in 0..16 {
        // Start from an estimate, then walk: stored deflate blocks grow by about one byte per
        // input byte.
        let mut pad = 200_000usize;
        for _ in 0..4 {
            let got = build(pad, extra).len();
            pad = (pad as i64 + size as i64 - got as i64).max(1) as usize;
        }
        for p in pad.saturating_sub(40)..pad + 40 {
            let blob = build(p, extra);
            if blob.len() == size {
                return blob;
            }
        }
    }
    panic!("found no attacker blob of exactly {size} bytes");
}

async fn unannotated_tampered() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/unannotated-b-control").await;
    let hello = random_bytes(3000, 21);
    let tar = build_tar(vec![
        E::Dir("etc", 0o755),
        E::File("hello.txt", 0o644, hello.clone()),
        E::File("etc/filler.bin", 0o644, random_bytes(200_000, 22)),
    ]);
    let blob = estargz_blob(&tar);
    let attacker_hello = random_bytes(3000, 31);
    let attacker = attacker_blob_of_size(blob.len(), &attacker_hello);
    assert_eq!(attacker.len(), blob.len());
    assert_ne!(attacker, blob);
    let (pushed, image) = push_layers(
        &registry,
        "hostile/unannotated-b",
        vec![gzip_layer(blob, None)],
    )
    .await;
    // A registry (or proxy) serving other bytes under the digest the manifest names.
    std::fs::write(registry.blob_data_path(&pushed.layer_digests[0]), &attacker).unwrap();

    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let (out, _m) = try_mount(&lp, &image, mnt.path(), 60);
        if out.status.success() {
            let names: Vec<String> = within("listing the mount", 30, {
                let d = mnt.path().to_path_buf();
                move || {
                    std::fs::read_dir(d)
                        .map(|rd| {
                            rd.filter_map(|e| e.ok())
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default()
                }
            });
            assert!(
                !names.iter().any(|n| n == "attacker-only.txt"),
                "the attacker-only file is visible through the mount: {names:?}"
            );
            let got = read_bounded(&mnt.path().join("hello.txt"), 1 << 20, 30);
            assert!(
                !matches!(&got, Ok(g) if *g == attacker_hello),
                "hello.txt serves the attacker's bytes"
            );
        }
        let msg = error_text(&out, &registry);
        assert!(
            !out.status.success(),
            "mounting a layer whose blob does not match its digest succeeded\ndaemon log:\n{}",
            lp.log()
        );
        assert!(
            msg.contains("digest"),
            "the mount error does not mention the digest: {msg}"
        );
        control.assert_still_serving(&lp);
    });
}

async fn unannotated_zstd() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/unannotated-c-control").await;
    let hello = b"hello from zstd\n".to_vec();
    let data = random_bytes(250_000, 41);
    let tar = build_tar(vec![
        E::Dir("usr", 0o755),
        E::File("hello.txt", 0o644, hello.clone()),
        E::File("usr/data.bin", 0o644, data.clone()),
    ]);
    let mut layer = zstd_chunked_layer(&tar);
    layer.annotations.clear();
    let (_, image) = push_layers(&registry, "hostile/unannotated-c", vec![layer]).await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let _m = mount_ok(&lp, &image, mnt.path(), 60);
        assert_reads(&lp, mnt.path(), "hello.txt", &hello);
        assert_reads(&lp, mnt.path(), "usr/data.bin", &data);
        assert_log_contains(&lp, "not bound to the manifest");
        control.assert_still_serving(&lp);
    });
}

// ---------------------------------------------------------------------------------------------
// 2. A chunk digest names content of one size only.

#[tokio::test(flavor = "multi_thread")]
async fn chunk_digest_reused_with_another_size_is_never_sliced() {
    run_parts(vec![
        (
            "a: within one layer",
            Box::pin(digest_reused_within_layer()),
        ),
        ("b: across images", Box::pin(digest_reused_across_images())),
    ])
    .await;
}

/// Sets `name`'s `digest` and `chunkDigest` to `digest`.
fn claim_digest(toc: &mut Value, name: &str, digest: &Value) {
    let e = toc_entry(toc, name);
    e["digest"] = digest.clone();
    e["chunkDigest"] = digest.clone();
}

async fn digest_reused_within_layer() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/reuse-a-control").await;
    let a = b"twelve bytes".to_vec();
    assert_eq!(a.len(), 12);
    let b = random_bytes(4096, 51);
    let c = b"five!".to_vec();
    let tar = build_tar(vec![
        E::File("a.txt", 0o644, a.clone()),
        E::File("b.bin", 0o644, b.clone()),
        E::File("c.txt", 0o644, c.clone()),
    ]);
    let (blob, toc_digest) = rewrite_estargz_toc(&estargz_blob(&tar), |toc| {
        let d = toc_entry(toc, "a.txt")["chunkDigest"].clone();
        assert!(d.is_string(), "a.txt has no chunkDigest: {toc}");
        claim_digest(toc, "b.bin", &d);
        claim_digest(toc, "c.txt", &d);
    });
    let (_, image) = push_layers(
        &registry,
        "hostile/reuse-a",
        vec![gzip_layer(blob, Some(&toc_digest))],
    )
    .await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let _m = mount_ok(&lp, &image, mnt.path(), 60);
        // Read a.txt first, so its chunk is cached when b.bin and c.txt ask for the same digest.
        let read = |name: &str| read_bounded(&mnt.path().join(name), 1 << 20, 60);
        let got: Vec<_> = ["a.txt", "b.bin", "c.txt"].map(read).into();
        assert_daemon_alive(&lp);
        for ((name, want), got) in [("a.txt", &a), ("b.bin", &b), ("c.txt", &c)]
            .iter()
            .zip(got)
        {
            match got {
                Ok(g) => assert!(
                    g == **want,
                    "{name} reads back {} bytes, sha256 {} (real: {} bytes, {})",
                    g.len(),
                    sha(&g),
                    want.len(),
                    sha(want)
                ),
                Err(e) => panic!("{name} cannot be read: {e}\ndaemon log:\n{}", lp.log()),
            }
        }
        assert_log_contains(&lp, "TOC is unusable");
        control.assert_still_serving(&lp);
    });
}

async fn digest_reused_across_images() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/reuse-b-control").await;
    let a = b"twelve bytes".to_vec();
    let tar1 = build_tar(vec![E::File("a.txt", 0o644, a.clone())]);
    let blob1 = estargz_blob(&tar1);
    let toc1: Value = serde_json::from_slice(&estargz_toc_json(&blob1)).unwrap();
    let a_digest = toc1["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "a.txt")
        .unwrap()["chunkDigest"]
        .clone();
    assert_eq!(a_digest, json!(format!("sha256:{}", sha(&a))));
    let (_, image1) = push_layers(
        &registry,
        "hostile/reuse-b1",
        vec![common::estargz_layer(&tar1, None).0],
    )
    .await;

    let b = random_bytes(4096, 52);
    let other = b"an honest neighbour\n".to_vec();
    let tar2 = build_tar(vec![
        E::File("b.bin", 0o644, b.clone()),
        E::File("other.txt", 0o644, other.clone()),
    ]);
    let (blob2, toc_digest2) = rewrite_estargz_toc(&estargz_blob(&tar2), |toc| {
        claim_digest(toc, "b.bin", &a_digest)
    });
    let (_, image2) = push_layers(
        &registry,
        "hostile/reuse-b2",
        vec![gzip_layer(blob2, Some(&toc_digest2))],
    )
    .await;

    let lp = daemon();
    let (mnt1, mnt2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    blocking(|| {
        let _m1 = mount_ok(&lp, &image1, mnt1.path(), 60);
        assert_reads(&lp, mnt1.path(), "a.txt", &a);
        let _m2 = mount_ok(&lp, &image2, mnt2.path(), 60);
        match read_bounded(&mnt2.path().join("b.bin"), 1 << 20, 60) {
            Ok(got) => panic!(
                "b.bin, whose TOC claims a.txt's 12-byte chunk for 4096 bytes, read back {} bytes (sha256 {})\ndaemon log:\n{}",
                got.len(),
                sha(&got),
                lp.log()
            ),
            Err(e) => assert_eq!(e.raw_os_error(), Some(EIO), "b.bin: {e}\n{}", lp.log()),
        }
        assert_daemon_alive(&lp);
        assert_reads(&lp, mnt2.path(), "other.txt", &other);
        assert_reads(&lp, mnt1.path(), "a.txt", &a);
        control.assert_still_serving(&lp);
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Sizes a TOC declares are checked before anything is allocated for them.

#[tokio::test(flavor = "multi_thread")]
async fn absurd_chunk_sizes_are_refused_before_allocation() {
    run_parts(vec![
        (
            "a: 2^40-byte chunk",
            Box::pin(absurd_chunk(1u64 << 40, "a")),
        ),
        (
            "b: (2^63+1)-byte chunk",
            Box::pin(absurd_chunk((1u64 << 63) + 1, "b")),
        ),
        (
            "c: 1.25 GiB chunk of a 1.3 MB member",
            Box::pin(inflated_chunk()),
        ),
    ])
    .await;
}

/// Sets the size of single-chunk file `name` (and its chunk) to `size`.
fn claim_size(toc: &mut Value, name: &str, size: u64) {
    let e = toc_entry(toc, name);
    assert!(e["offset"].is_u64(), "{name} has no data: {e}");
    e["size"] = json!(size);
    if e.get("chunkSize").is_some() {
        e["chunkSize"] = json!(size);
    }
}

async fn absurd_chunk(size: u64, tag: &'static str) {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, &format!("hostile/absurd-{tag}-control")).await;
    let big = random_bytes(64 << 10, 61);
    let other = b"a valid neighbour\n".to_vec();
    let tar = build_tar(vec![
        E::File("big.bin", 0o644, big.clone()),
        E::File("other.txt", 0o644, other.clone()),
    ]);
    let (blob, toc_digest) =
        rewrite_estargz_toc(&estargz_blob(&tar), |toc| claim_size(toc, "big.bin", size));
    let (_, image) = push_layers(
        &registry,
        &format!("hostile/absurd-{tag}"),
        vec![gzip_layer(blob, Some(&toc_digest))],
    )
    .await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let _m = mount_ok(&lp, &image, mnt.path(), 60);
        // Bounded: a read that spins is given up on, and the neighbour's read below tells
        // whether the daemon still answers.
        let path = mnt.path().join("big.bin");
        let big_read = common::hostile::try_within(30, move || {
            read_bounded_untimed(&path, (64 << 10) + 65536)
        });
        let other_read = common::hostile::try_within(30, {
            let p = mnt.path().join("other.txt");
            move || read_bounded_untimed(&p, 1 << 20)
        });
        let log = lp.log();
        let (aborted, panicked, alive) = (
            log.contains("memory allocation"),
            log.contains("panicked"),
            lp.daemon_running(),
        );
        assert!(
            !aborted && !panicked && alive && other_read.is_some(),
            "after reading a file whose TOC claims {size} bytes: allocation failure in the log: {aborted}, panic in the log: {panicked}, daemon running: {alive}, a valid neighbour read within 30 s: {}, big.bin read within 30 s: {}\ndaemon log:\n{log}",
            other_read.is_some(),
            big_read.is_some()
        );
        match other_read.unwrap() {
            Ok(got) => assert!(
                got == other,
                "other.txt reads back {} bytes, sha256 {}",
                got.len(),
                sha(&got)
            ),
            Err(e) => panic!("other.txt cannot be read: {e}\ndaemon log:\n{}", lp.log()),
        }
        match big_read {
            None => panic!("reading big.bin (claimed {size} bytes) did not finish within 30 s"),
            Some(Ok(got)) => assert!(
                got == big,
                "big.bin (claimed {size} bytes) reads back {} bytes, sha256 {} (real: {})",
                got.len(),
                sha(&got),
                sha(&big)
            ),
            Some(Err(e)) => panic!(
                "big.bin (claimed {size} bytes) cannot be read: {e}\ndaemon log:\n{}",
                lp.log()
            ),
        }
        assert_log_contains(&lp, "TOC is unusable");
        assert_peak_below(&lp, 400 * MIB);
        control.assert_still_serving(&lp);
    });
}

fn read_bounded_untimed(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    f.take(max).read_to_end(&mut out)?;
    Ok(out)
}

async fn inflated_chunk() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/inflated-control").await;
    let big = random_bytes(1_300_000, 62);
    let other = b"a valid neighbour\n".to_vec();
    let tar = build_tar(vec![
        E::File("big.bin", 0o644, big.clone()),
        E::File("other.txt", 0o644, other.clone()),
    ]);
    // 4 MiB chunks: big.bin is one chunk in one ~1.3 MB gzip member.
    let (blob, toc_digest) = rewrite_estargz_toc(&estargz_blob_with_chunks(&tar, 4 << 20), |toc| {
        claim_size(toc, "big.bin", 1_342_177_280)
    });
    let (_, image) = push_layers(
        &registry,
        "hostile/inflated",
        vec![gzip_layer(blob, Some(&toc_digest))],
    )
    .await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let _m = mount_ok(&lp, &image, mnt.path(), 60);
        let got = read_bounded(&mnt.path().join("big.bin"), 2 << 20, 60);
        assert_daemon_alive(&lp);
        assert_peak_below(&lp, 400 * MIB);
        match got {
            Ok(got) => assert!(
                got == big,
                "big.bin (claimed 1.25 GiB) reads back {} bytes, sha256 {} (real: {})",
                got.len(),
                sha(&got),
                sha(&big)
            ),
            Err(e) => panic!(
                "big.bin (claimed 1.25 GiB) cannot be read: {e}\ndaemon log:\n{}",
                lp.log()
            ),
        }
        assert_reads(&lp, mnt.path(), "other.txt", &other);
        assert_log_contains(&lp, "TOC is unusable");
        control.assert_still_serving(&lp);
    });
}

// ---------------------------------------------------------------------------------------------
// 4. A TOC is decompressed only up to the size it declares.

#[tokio::test(flavor = "multi_thread")]
async fn toc_bombs_stop_at_the_declared_size() {
    run_parts(vec![
        ("a: zstd:chunked bomb", Box::pin(toc_bomb(true))),
        ("b: eStargz gzip bomb", Box::pin(toc_bomb(false))),
    ])
    .await;
}

async fn toc_bomb(zstd: bool) {
    let registry = TestRegistry::plain();
    let tag = if zstd { "zstd" } else { "gzip" };
    let control = Control::push(&registry, &format!("hostile/bomb-{tag}-control")).await;
    let hello = b"under the bomb\n".to_vec();
    let data = random_bytes(100_000, 71);
    let tar = build_tar(vec![
        E::Dir("srv", 0o755),
        E::File("hello.txt", 0o644, hello.clone()),
        E::File("srv/data.bin", 0o644, data.clone()),
    ]);
    let layer = if zstd {
        zstd_toc_bomb(&tar)
    } else {
        gzip_toc_bomb(&tar)
    };
    let (_, image) = push_layers(&registry, &format!("hostile/bomb-{tag}"), vec![layer]).await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let (out, _m) = try_mount(&lp, &image, mnt.path(), 60);
        assert_daemon_alive(&lp);
        assert_peak_below(&lp, 200 * MIB);
        assert_log_contains(&lp, "TOC is unusable");
        if out.status.success() {
            assert_reads(&lp, mnt.path(), "hello.txt", &hello);
            assert_reads(&lp, mnt.path(), "srv/data.bin", &data);
        } else {
            // Only the gzip bomb may fail the whole fetch (its tar stream ends in the bomb's
            // zeros); the zstd one's skippable frames are invisible to a whole fetch.
            assert!(
                !zstd,
                "the zstd:chunked bomb's whole-layer fallback failed: {}\ndaemon log:\n{}",
                stderr_of(&out),
                lp.log()
            );
            assert!(
                !stderr_of(&out).trim().is_empty(),
                "the failing mount says nothing"
            );
        }
        assert_peak_below(&lp, 200 * MIB);
        control.assert_still_serving(&lp);
    });
}

// ---------------------------------------------------------------------------------------------
// 5. Device nodes and setuid bits in an image give no privilege.

#[tokio::test(flavor = "multi_thread")]
async fn mounts_are_nosuid_and_nodev() {
    run_parts(vec![
        (
            "a: one layer (FUSE on the target)",
            Box::pin(nosuid_nodev(false)),
        ),
        (
            "b: two layers (overlayfs over FUSE layers)",
            Box::pin(nosuid_nodev(true)),
        ),
    ])
    .await;
}

async fn nosuid_nodev(two_layers: bool) {
    let registry = TestRegistry::plain();
    let tag = if two_layers { "two" } else { "one" };
    let control = Control::push(&registry, &format!("hostile/nodev-{tag}-control")).await;
    let su = random_bytes(10_000, 81);
    let devices = vec![E::Dir("dev", 0o755), E::Char("dev/zero", 1, 5)];
    let setuid = vec![E::Dir("bin", 0o755), E::File("bin/su", 0o4755, su.clone())];
    let layers = if two_layers {
        vec![
            common::estargz_layer(&build_tar(devices), None).0,
            common::estargz_layer(&build_tar(setuid), None).0,
        ]
    } else {
        let mut all = devices;
        all.extend(setuid);
        vec![common::estargz_layer(&build_tar(all), None).0]
    };
    let (_, image) = push_layers(&registry, &format!("hostile/nodev-{tag}"), layers).await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let _m = mount_ok(&lp, &image, mnt.path(), 60);
        let zero = mnt.path().join("dev/zero");
        let meta = std::fs::symlink_metadata(&zero).unwrap();
        assert_eq!(meta.rdev(), libc_makedev(1, 5), "dev/zero is not char 1:5");
        let opened = within("reading dev/zero", 30, move || {
            use std::io::Read;
            let mut f = std::fs::File::open(&zero)?;
            let mut buf = [0xaau8; 16];
            let n = f.read(&mut buf)?;
            Ok::<usize, std::io::Error>(n)
        });
        match opened {
            Ok(n) => panic!("the image's dev/zero opened and read {n} bytes through the mount"),
            Err(e) => assert_eq!(e.raw_os_error(), Some(EACCES), "dev/zero: {e}"),
        }
        let su_meta = std::fs::symlink_metadata(mnt.path().join("bin/su")).unwrap();
        assert_eq!(su_meta.mode() & 0o7777, 0o4755, "bin/su lost its mode");
        assert_reads(&lp, mnt.path(), "bin/su", &su);

        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let target = mnt.path().display().to_string();
        let mut checked_target = false;
        let mut fuse_mounts = 0;
        for line in mountinfo.lines() {
            // Field 5 is the mount point, field 6 the per-mount options; the file system
            // type follows the " - " separator.
            let fields: Vec<&str> = line.split_whitespace().collect();
            let mount_point = fields[4];
            let options: Vec<&str> = fields[5].split(',').collect();
            let fstype = line
                .split(" - ")
                .nth(1)
                .and_then(|t| t.split_whitespace().next())
                .unwrap_or("");
            let is_target = mount_point == target;
            let is_layer = fstype == "fuse.lazypull"
                && (is_target || Path::new(mount_point).starts_with(lp.root.path()));
            if is_target || is_layer {
                for flag in ["nosuid", "nodev"] {
                    assert!(
                        options.contains(&flag),
                        "{mount_point} ({fstype}) is mounted without {flag}: {line}"
                    );
                }
                checked_target |= is_target;
                fuse_mounts += usize::from(is_layer);
            }
        }
        assert!(checked_target, "{target} is not in mountinfo");
        let want = if two_layers { 2 } else { 1 };
        assert!(
            fuse_mounts >= want,
            "{fuse_mounts} fuse.lazypull mounts found, expected at least {want}"
        );
        assert_no_panic(&lp);
        control.assert_still_serving(&lp);
    });
}

/// Every entry of `dir` as the kernel lists it, `.` and `..` included (`ls -1fa`: unsorted,
/// nothing hidden), within 30 s.
fn list_all(dir: &Path) -> Vec<String> {
    let path = dir.to_path_buf();
    let out = within("ls -1fa", 30, move || {
        std::process::Command::new("ls")
            .arg("-1fa")
            .arg(&path)
            .output()
            .unwrap()
    });
    assert!(
        out.status.success(),
        "ls -1fa {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xfffff000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffffff00) << 12)
        | (minor & 0xff)
}

// ---------------------------------------------------------------------------------------------
// 6. Names the kernel cannot take.

#[tokio::test(flavor = "multi_thread")]
async fn overlong_names_are_refused_with_a_clear_error() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/overlong-control").await;
    let first = b"first sibling\n".to_vec();
    let last = b"last sibling\n".to_vec();
    let long = format!("dir/{}", "n".repeat(5000));
    let tar_with = |name: &str| {
        build_tar(vec![
            E::Dir("dir", 0o755),
            E::File("dir/a-first.txt", 0o644, first.clone()),
            E::File(name, 0o644, b"named too long\n".to_vec()),
            E::File("dir/z-last.txt", 0o644, last.clone()),
        ])
    };
    // (a) A real tar entry (GNU long name) in a plain gzip layer: the whole-layer path meets
    // it. (b) Only the eStargz TOC names it (the tar holds a short name): the lazy path meets
    // it, refuses the TOC and takes the whole layer, whose names are all valid.
    let plain = lazypull_tests::Layer::new(lazypull_tests::util::gzip(&tar_with(&long)))
        .with_media_type(lazypull_tests::MEDIA_TYPE_OCI_LAYER_GZIP);
    let (toc_only, toc_digest) =
        rewrite_estargz_toc(&estargz_blob(&tar_with("dir/short-name")), |toc| {
            toc_entry(toc, "dir/short-name")["name"] = json!(long.as_str());
        });
    let variants = [
        ("hostile/overlong-tar", plain),
        (
            "hostile/overlong-toc",
            gzip_layer(toc_only, Some(&toc_digest)),
        ),
    ];
    for (repo, layer) in variants {
        let (_, image) = push_layers(&registry, repo, vec![layer]).await;
        let lp = daemon();
        let mnt = tempfile::tempdir().unwrap();
        blocking(|| {
            let (out, _m) = try_mount(&lp, &image, mnt.path(), 60);
            assert_daemon_alive(&lp);
            if out.status.success() {
                let dir = mnt.path().join("dir");
                let listed = within("listing dir", 30, move || {
                    std::fs::read_dir(dir).and_then(|rd| {
                        rd.map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                            .collect::<std::io::Result<Vec<String>>>()
                    })
                });
                let names = listed.unwrap_or_else(|e| {
                    panic!(
                        "{repo}: the mount of a layer with a 5000-byte name succeeded but dir/ cannot be listed: {e}\ndaemon log:\n{}",
                        lp.log()
                    )
                });
                for want in ["a-first.txt", "z-last.txt"] {
                    assert!(
                        names.iter().any(|n| n == want),
                        "{repo}: dir/ lists {names:?}, without {want}"
                    );
                }
                assert!(
                    names.iter().all(|n| n.len() <= 255),
                    "{repo}: an overlong name is listed"
                );
                assert_reads(&lp, mnt.path(), "dir/a-first.txt", &first);
                assert_reads(&lp, mnt.path(), "dir/z-last.txt", &last);
            } else {
                let msg = error_text(&out, &registry);
                assert!(
                    msg.contains("255"),
                    "{repo}: the mount error does not name the 255-byte limit: {msg}"
                );
                assert!(
                    msg.len() < 4000,
                    "{repo}: the error repeats the 5000-byte name: {} bytes",
                    msg.len()
                );
            }
            control.assert_still_serving(&lp);
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_whiteouts_are_refused() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/dotwh-control").await;
    let keep = b"kept from the base\n".to_vec();
    let new = b"added on top\n".to_vec();
    let base = build_tar(vec![
        E::Dir("d", 0o755),
        E::File("d/keep.txt", 0o644, keep.clone()),
        E::Dir("d/sub", 0o755),
    ]);
    let top = build_tar(vec![
        E::Dir("d", 0o755),
        E::File("d/new.txt", 0o644, new.clone()),
        E::File("d/wh-dot", 0o644, vec![]),
        E::File("d/wh-dotdot", 0o644, vec![]),
    ]);
    let (top_blob, top_digest) = rewrite_estargz_toc(&estargz_blob(&top), |toc| {
        toc_entry(toc, "d/wh-dot")["name"] = json!("d/.wh..");
        toc_entry(toc, "d/wh-dotdot")["name"] = json!("d/.wh...");
        assert!(toc_entries(toc).iter().any(|e| e["name"] == "d/.wh..."));
    });
    let (_, image) = push_layers(
        &registry,
        "hostile/dotwh",
        vec![
            common::estargz_layer(&base, None).0,
            gzip_layer(top_blob, Some(&top_digest)),
        ],
    )
    .await;
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let (out, _m) = try_mount(&lp, &image, mnt.path(), 60);
        assert_daemon_alive(&lp);
        if out.status.success() {
            // Each layer's own FUSE mount (what overlayfs reads) and the merged view.
            let mut dirs: Vec<std::path::PathBuf> = lp
                .mounts_under_root()
                .into_iter()
                .map(|mp| Path::new(&mp).join("d"))
                .filter(|d| d.is_dir())
                .collect();
            assert!(!dirs.is_empty(), "no layer mount has d/");
            dirs.push(mnt.path().join("d"));
            dirs.push(mnt.path().to_path_buf());
            for path in dirs {
                let names = list_all(&path);
                for dot in [".", ".."] {
                    assert_eq!(
                        names.iter().filter(|n| *n == dot).count(),
                        1,
                        "{} lists {dot:?} other than once: {names:?}",
                        path.display()
                    );
                }
            }
            let names = list_all(&mnt.path().join("d"));
            for want in [".", "..", "keep.txt", "new.txt", "sub"] {
                assert_eq!(
                    names.iter().filter(|n| *n == want).count(),
                    1,
                    "the merged d/ lists {want:?} other than once: {names:?}"
                );
            }
            assert_reads(&lp, mnt.path(), "d/keep.txt", &keep);
            assert_reads(&lp, mnt.path(), "d/new.txt", &new);
            let sub = std::fs::symlink_metadata(mnt.path().join("d/sub")).unwrap();
            assert!(sub.is_dir(), "d/sub is no longer a directory");
        } else {
            let msg = error_text(&out, &registry);
            assert!(
                msg.contains(".wh.."),
                "the mount error does not name the whiteout entry: {msg}"
            );
        }
        control.assert_still_serving(&lp);
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_blob_is_reported_as_truncated() {
    let registry = TestRegistry::plain();
    let control = Control::push(&registry, "hostile/halved-control").await;
    let tar = build_tar(vec![
        E::File("one.bin", 0o644, random_bytes(1_000_000, 91)),
        E::File("two.bin", 0o644, random_bytes(1_000_000, 92)),
    ]);
    let gz = lazypull_tests::util::gzip(&tar);
    let layer = lazypull_tests::Layer::new(gz.clone())
        .with_media_type(lazypull_tests::MEDIA_TYPE_OCI_LAYER_GZIP);
    let (pushed, image) = push_layers(&registry, "hostile/halved", vec![layer]).await;
    let stored = registry.blob_data_path(&pushed.layer_digests[0]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&stored)
        .unwrap();
    f.set_len(gz.len() as u64 / 2).unwrap();
    drop(f);
    let lp = daemon();
    let mnt = tempfile::tempdir().unwrap();
    blocking(|| {
        let (out, _m) = try_mount(&lp, &image, mnt.path(), 90);
        let msg = error_text(&out, &registry);
        assert!(
            !out.status.success(),
            "mounting a layer whose blob is half its size succeeded"
        );
        assert!(
            !msg.contains("cannot reach"),
            "a truncated blob is reported as an unreachable registry: {msg}"
        );
        assert!(
            msg.contains("truncated"),
            "the mount error does not say the blob is truncated: {msg}"
        );
        assert_daemon_alive(&lp);
        control.assert_still_serving(&lp);
    });
}
