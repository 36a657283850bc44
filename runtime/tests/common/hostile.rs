//! Hand-made hostile layers for the tests that mount them: eStargz blobs whose TOC was
//! rewritten (keeping the data members, so a whole-layer fetch still extracts the real tar),
//! TOC "bombs" that decompress to far more than they declare, and the small helpers to push
//! them and to watch the daemon (bounded reads, peak memory) without ever hanging a test.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use flate2::Compression;
use lazypull_fs::estargz::{write_estargz, Footer, WriterOptions, TOC_TAR_NAME};
use lazypull_tests::{Digest, ImageSpec, Layer, Lazypull, PushedImage, TestRegistry};
use serde_json::Value;
use sha2::Digest as _;

use super::{ESTARGZ_MEDIA_TYPE, TOC_ANNOTATION};

/// zstd:chunked annotation with the digest of the compressed TOC.
pub const ZSTD_CHECKSUM_ANNOTATION: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// zstd:chunked annotation `offset:compressedLen:uncompressedLen:type` of the TOC.
pub const ZSTD_POSITION_ANNOTATION: &str = "io.github.containers.zstd-chunked.manifest-position";

/// Size of the eStargz footer.
const ESTARGZ_FOOTER: usize = 51;

/// What a bomb decompresses to: far above any sane TOC and above the reader's 256 MiB cap.
pub const BOMB_BYTES: usize = 300 << 20;

/// What a bomb's TOC declares (tar header size, or the annotation's uncompressed length).
pub const BOMB_DECLARED: usize = 100;

/// An eStargz blob of `tar` with `chunk_size`-byte chunks (no prefetch landmark).
pub fn estargz_blob_with_chunks(tar: &[u8], chunk_size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let opts = WriterOptions {
        chunk_size,
        ..WriterOptions::default()
    };
    write_estargz(tar, &mut out, &opts).unwrap();
    out
}

/// An eStargz blob of `tar` with 1 MiB chunks, as `estargz_layer` writes it.
pub fn estargz_blob(tar: &[u8]) -> Vec<u8> {
    estargz_blob_with_chunks(tar, 1 << 20)
}

/// Blob offset of the TOC member of an eStargz blob, from its footer.
pub fn estargz_toc_offset(blob: &[u8]) -> usize {
    match lazypull_fs::estargz::parse_footer(blob).unwrap() {
        (Footer::Estargz { toc_offset }, ESTARGZ_FOOTER) => toc_offset as usize,
        other => panic!("not an eStargz footer: {other:?}"),
    }
}

/// The TOC JSON of an eStargz blob (the `stargz.index.json` entry of its TOC member).
pub fn estargz_toc_json(blob: &[u8]) -> Vec<u8> {
    let member = &blob[estargz_toc_offset(blob)..blob.len() - ESTARGZ_FOOTER];
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(member));
    let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(&*entry.path_bytes(), TOC_TAR_NAME.as_bytes());
    let mut json = Vec::new();
    entry.read_to_end(&mut json).unwrap();
    json
}

/// A ustar header for the TOC entry claiming `size` bytes.
fn toc_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(TOC_TAR_NAME).unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_cksum();
    h
}

/// A TOC member as the writer makes it: gzip of the TOC tar entry holding `json`, its padding
/// and the end-of-archive blocks.
pub fn estargz_toc_member(json: &[u8]) -> Vec<u8> {
    let mut tar = toc_header(json.len() as u64).as_bytes().to_vec();
    tar.extend_from_slice(json);
    tar.resize(tar.len().div_ceil(512) * 512 + 1024, 0);
    lazypull_tests::util::gzip(&tar)
}

/// The 51-byte eStargz footer pointing at `toc_offset`.
pub fn estargz_footer(toc_offset: u64) -> Vec<u8> {
    let mut f = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
    f.extend_from_slice(&26u16.to_le_bytes());
    f.extend_from_slice(b"SG");
    f.extend_from_slice(&22u16.to_le_bytes());
    f.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    f.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(f.len(), ESTARGZ_FOOTER);
    f
}

/// Rewrites the TOC of a valid eStargz `blob`: `edit` changes the JSON, which is written as a
/// new TOC member at the same offset, followed by a new footer. The data members are kept, so
/// the tar stream of the files is unchanged. Returns the new blob and the SHA-256 of the new
/// TOC JSON (what a hostile author puts in the toc.digest annotation).
pub fn rewrite_estargz_toc(blob: &[u8], edit: impl FnOnce(&mut Value)) -> (Vec<u8>, Digest) {
    let toc_offset = estargz_toc_offset(blob);
    let mut toc: Value = serde_json::from_slice(&estargz_toc_json(blob)).unwrap();
    edit(&mut toc);
    let json = serde_json::to_vec(&toc).unwrap();
    let mut out = blob[..toc_offset].to_vec();
    out.extend_from_slice(&estargz_toc_member(&json));
    out.extend_from_slice(&estargz_footer(toc_offset as u64));
    (out, Digest::sha256_of(&json))
}

/// The TOC entries (mutable) of a TOC JSON value.
pub fn toc_entries(toc: &mut Value) -> &mut Vec<Value> {
    toc["entries"].as_array_mut().unwrap()
}

/// The first TOC entry named `name` (regular file or first chunk).
pub fn toc_entry<'a>(toc: &'a mut Value, name: &str) -> &'a mut Value {
    toc_entries(toc)
        .iter_mut()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no TOC entry {name}"))
}

/// A gzip (eStargz) layer of `blob` with its real diff id and, when given, the toc.digest
/// annotation.
pub fn gzip_layer(blob: Vec<u8>, toc_digest: Option<&Digest>) -> Layer {
    let layer = Layer::new(blob).with_media_type(ESTARGZ_MEDIA_TYPE);
    match toc_digest {
        Some(d) => layer.with_annotation(TOC_ANNOTATION, &d.to_string()),
        None => layer,
    }
}

/// Pushes `layers` (base first) as `repo:v1` (linux/amd64); returns what was pushed and the
/// image reference to mount.
pub async fn push_layers(
    registry: &TestRegistry,
    repo: &str,
    layers: Vec<Layer>,
) -> (PushedImage, String) {
    let pushed = registry
        .pusher()
        .push_image_with(repo, "v1", &ImageSpec::new(layers, "linux", "amd64"))
        .await;
    (pushed, format!("{}/{repo}:v1", registry.host()))
}

/// SHA-256 of whatever `r` yields, streamed.
fn sha256_of_reader(mut r: impl Read) -> Digest {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(h.finalize()))
        .parse()
        .unwrap()
}

/// A zstd skippable frame holding `payload`.
fn skippable(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x50, 0x2a, 0x4d, 0x18];
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// zstd:chunked TOC bomb: a zstd:chunked layer of `tar` whose TOC frame is replaced by a zstd
/// frame that decompresses to [`BOMB_BYTES`] of JSON-ish bytes (an unterminated TOC followed by
/// spaces), while the manifest-position annotation declares [`BOMB_DECLARED`] uncompressed
/// bytes and the manifest-checksum annotation is the correct digest of the new frame. The data
/// frames are kept (a whole-layer fetch skips the skippable frames and gets the real tar).
pub fn zstd_toc_bomb(tar: &[u8]) -> Layer {
    let mut blob = Vec::new();
    let opts = lazypull_fs::zstd_chunked::writer::WriterOptions {
        level: 3,
        ..Default::default()
    };
    let w = lazypull_fs::zstd_chunked::write_zstd_chunked(tar, &mut blob, &opts).unwrap();
    let data_end = (w.toc.offset - 8) as usize;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.write_all(br#"{"version":1,"entries":["#).unwrap();
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..BOMB_BYTES >> 20 {
        enc.write_all(&spaces).unwrap();
    }
    let compressed = enc.finish().unwrap();
    let mut out = blob[..data_end].to_vec();
    let toc_offset = out.len() as u64 + 8;
    out.extend_from_slice(&skippable(&compressed));
    // 64-byte footer: TOC position, type 1, no tar-split, magic.
    let mut footer = Vec::new();
    for v in [
        toc_offset,
        compressed.len() as u64,
        BOMB_DECLARED as u64,
        1,
        0,
        0,
        0,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(b"GNUlInUx");
    out.extend_from_slice(&skippable(&footer));
    let position = format!("{toc_offset}:{}:{BOMB_DECLARED}:1", compressed.len());
    Layer::new(out)
        .with_media_type(lazypull_tests::MEDIA_TYPE_OCI_LAYER_ZSTD)
        .with_diff_id(w.diff_id)
        .with_annotation(ZSTD_POSITION_ANNOTATION, &position)
        .with_annotation(
            ZSTD_CHECKSUM_ANNOTATION,
            &Digest::sha256_of(&compressed).to_string(),
        )
}

/// gzip (eStargz) TOC bomb: an eStargz layer of `tar` whose TOC member is one gzip member
/// holding a `stargz.index.json` entry whose header claims [`BOMB_DECLARED`] bytes (an
/// unterminated TOC padded with spaces, the digest in the annotation is that of these bytes),
/// followed by [`BOMB_BYTES`] of zeros in the same member.
pub fn gzip_toc_bomb(tar: &[u8]) -> Layer {
    let blob = estargz_blob(tar);
    let toc_offset = estargz_toc_offset(&blob);
    let mut json = br#"{"version":1,"entries":["#.to_vec();
    json.resize(BOMB_DECLARED, b' ');
    let mut head = toc_header(BOMB_DECLARED as u64).as_bytes().to_vec();
    head.extend_from_slice(&json);
    head.resize(1024, 0);
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(&head).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BOMB_BYTES >> 20 {
        enc.write_all(&zeros).unwrap();
    }
    let member = enc.finish().unwrap();
    let mut out = blob[..toc_offset].to_vec();
    out.extend_from_slice(&member);
    out.extend_from_slice(&estargz_footer(toc_offset as u64));
    // The real diff id, streamed (Layer::new would hold all 300 MiB in memory).
    let diff_id = sha256_of_reader(flate2::read::MultiGzDecoder::new(&out[..]));
    Layer {
        data: out,
        media_type: Some(ESTARGZ_MEDIA_TYPE.to_string()),
        diff_id,
        annotations: [(
            TOC_ANNOTATION.to_string(),
            Digest::sha256_of(&json).to_string(),
        )]
        .into_iter()
        .collect(),
    }
}

/// Runs `f` on its own thread and waits at most `secs` for it; panics naming `what` when it
/// does not finish (the thread is left behind, blocked; dropping the driver later kills the
/// daemon and unblocks it).
pub fn within<T: Send + 'static>(
    what: &str,
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {secs} s (the daemon hangs or spins)"),
    }
}

/// Runs `f` on its own thread and waits at most `secs` for it; `None` when it does not
/// finish (the thread is left behind, blocked).
pub fn try_within<T: Send + 'static>(
    secs: u64,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

/// Reads at most `max` bytes of `path` (never trusting the size `stat` reports, which a
/// hostile TOC controls), within `secs`.
pub fn read_bounded(path: &Path, max: u64, secs: u64) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    within(&format!("reading {}", path.display()), secs, move || {
        let f = std::fs::File::open(&p)?;
        let mut out = Vec::new();
        f.take(max).read_to_end(&mut out)?;
        Ok(out)
    })
}

/// Runs a `lazypull` command to completion within `secs` (killed and panics otherwise).
pub fn lazypull_within(lp: &Lazypull, args: &[&str], secs: u64) -> Output {
    let mut child = lp
        .command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "lazypull {args:?} did not finish within {secs} s; stderr: {}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                lp.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Detaches a mount point (lazily) on drop if it is still mounted: for `lazypull mount`s run
/// outside the driver's bookkeeping (expected failures, mounts under a timeout).
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if is_mount_point(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Whether `dir` is a mount point (per `/proc/self/mountinfo`).
pub fn is_mount_point(dir: &Path) -> bool {
    let d = dir.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(d.as_str()))
}

/// `lazypull mount IMAGE DIR` within `secs`; returns the command's output and a guard that
/// detaches the mount if it was made.
pub fn try_mount(lp: &Lazypull, image: &str, dir: &Path, secs: u64) -> (Output, MountGuard) {
    let out = lazypull_within(lp, &["mount", image, &dir.display().to_string()], secs);
    (out, MountGuard(dir.to_path_buf()))
}

/// `lazypull mount IMAGE DIR` within `secs`, asserting success.
pub fn mount_ok(lp: &Lazypull, image: &str, dir: &Path, secs: u64) -> MountGuard {
    let (out, guard) = try_mount(lp, image, dir, secs);
    assert!(
        out.status.success(),
        "lazypull mount {image} failed ({}): {}\ndaemon log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        lp.log()
    );
    guard
}

/// The daemon's peak resident set (`VmHWM`) in bytes, 0 when it is not running.
pub fn daemon_peak_rss(lp: &Lazypull) -> u64 {
    lp.daemon_pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A well-formed image pushed next to the hostile ones: mounting it and reading its file back
/// proves the daemon still serves.
pub struct Control {
    /// Image reference.
    pub image: String,
    /// The content of its `control.bin`.
    pub content: Vec<u8>,
}

impl Control {
    /// Pushes the control image as `repo:v1`.
    pub async fn push(registry: &TestRegistry, repo: &str) -> Control {
        let content = lazypull_tests::random_bytes(150_000, 4242);
        let tar = super::build_tar(vec![super::E::File("control.bin", 0o644, content.clone())]);
        let (layer, _) = super::estargz_layer(&tar, None);
        let (_, image) = push_layers(registry, repo, vec![layer]).await;
        Control { image, content }
    }

    /// Asserts the daemon is up, never panicked, and mounts and serves the control image.
    pub fn assert_still_serving(&self, lp: &Lazypull) {
        assert!(lp.daemon_running(), "the daemon died:\n{}", lp.log());
        let dir = tempfile::tempdir().unwrap();
        let _guard = mount_ok(lp, &self.image, dir.path(), 60);
        let got = read_bounded(&dir.path().join("control.bin"), 1 << 20, 60)
            .expect("reading the control image");
        assert!(
            got == self.content,
            "the control image reads back wrong ({} bytes)",
            got.len()
        );
        assert_no_panic(lp);
    }
}

/// Asserts the daemon log shows no panic.
pub fn assert_no_panic(lp: &Lazypull) {
    let log = lp.log();
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// SHA-256 hex of `data`.
pub fn sha(data: &[u8]) -> String {
    super::sha256_hex(data)
}
