//! Shared by the `lazypull` binary's integration tests: generated tar layers, eStargz
//! conversion, and a driver for the binary under a private `--root` that cleans up after
//! itself (mounts and the mount server), also when a test fails.
#![allow(dead_code)]

pub mod hostile;

use lazypull_fs::estargz::{write_estargz, WriterOptions};
use lazypull_tests::{random_bytes, ImageSpec, Layer, PushedImage, TestRegistry};

/// Manifest annotation carrying the TOC digest.
pub const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
/// eStargz layers are ordinary gzip layers.
pub const ESTARGZ_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A tar entry to generate.
pub enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, u32, Vec<u8>),
    FileOwned(&'a str, u32, u64, u64, Vec<u8>),
    Xattr(&'a str, &'a str, &'a [u8], Vec<u8>),
    Symlink(&'a str, &'a str),
    Hardlink(&'a str, &'a str),
    Char(&'a str, u32, u32),
    Block(&'a str, u32, u32),
    Fifo(&'a str),
}

pub fn build_tar(entries: Vec<E<'_>>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (path, data): (&str, Vec<u8>) = match e {
            E::Dir(p, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(mode);
                (p, vec![])
            }
            E::File(p, mode, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                (p, data)
            }
            E::FileOwned(p, mode, uid, gid, data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(mode);
                h.set_uid(uid);
                h.set_gid(gid);
                (p, data)
            }
            E::Xattr(p, name, value, data) => {
                let key = format!("SCHILY.xattr.{name}");
                b.append_pax_extensions([(key.as_str(), value)]).unwrap();
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                (p, data)
            }
            E::Symlink(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(target).unwrap();
                (p, vec![])
            }
            E::Hardlink(p, target) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_link_name(target).unwrap();
                (p, vec![])
            }
            E::Char(p, maj, min) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_mode(0o666);
                h.set_device_major(maj).unwrap();
                h.set_device_minor(min).unwrap();
                (p, vec![])
            }
            E::Block(p, maj, min) => {
                h.set_entry_type(tar::EntryType::Block);
                h.set_mode(0o660);
                h.set_device_major(maj).unwrap();
                h.set_device_minor(min).unwrap();
                (p, vec![])
            }
            E::Fifo(p) => {
                h.set_entry_type(tar::EntryType::Fifo);
                h.set_mode(0o644);
                (p, vec![])
            }
        };
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// Converts a tar to an eStargz layer for the pusher, with its TOC digest annotation.
pub fn estargz_layer(tar: &[u8], prefetch: Option<Vec<String>>) -> (Layer, u64) {
    let mut out = Vec::new();
    let opts = WriterOptions {
        chunk_size: 1 << 20,
        prefetch,
        ..WriterOptions::default()
    };
    let w = write_estargz(tar, &mut out, &opts).unwrap();
    let size = out.len() as u64;
    let layer = Layer::new(out)
        .with_media_type(ESTARGZ_MEDIA_TYPE)
        .with_diff_id(w.diff_id)
        .with_annotation(TOC_ANNOTATION, &w.toc_digest.to_string());
    (layer, size)
}

/// Converts a tar to a zstd:chunked layer for the pusher, with the annotations that locate
/// its TOC.
pub fn zstd_chunked_layer(tar: &[u8]) -> Layer {
    let mut out = Vec::new();
    let opts = lazypull_fs::zstd_chunked::writer::WriterOptions {
        level: 3,
        ..Default::default()
    };
    let w = lazypull_fs::zstd_chunked::write_zstd_chunked(tar, &mut out, &opts).unwrap();
    let mut layer = Layer::new(out)
        .with_media_type(lazypull_tests::MEDIA_TYPE_OCI_LAYER_ZSTD)
        .with_diff_id(w.diff_id);
    for (k, v) in w.annotations() {
        layer = layer.with_annotation(&k, &v);
    }
    layer
}

/// Converts `tars` (base first) to eStargz and pushes them as `repo:v1` (linux/amd64);
/// returns what was pushed and the eStargz blobs.
pub async fn push_estargz(
    registry: &TestRegistry,
    repo: &str,
    tars: &[&[u8]],
) -> (PushedImage, Vec<Vec<u8>>) {
    let layers: Vec<Layer> = tars.iter().map(|t| estargz_layer(t, None).0).collect();
    let blobs = layers.iter().map(|l| l.data.clone()).collect();
    let pushed = registry
        .pusher()
        .push_image_with(repo, "v1", &ImageSpec::new(layers, "linux", "amd64"))
        .await;
    (pushed, blobs)
}

pub use lazypull_tests::Lazypull;

/// The `lazypull` binary under test, with its own root, socket and daemon.
pub fn lazypull(extra: &[&str]) -> Lazypull {
    Lazypull::new(env!("CARGO_BIN_EXE_lazypull"), extra)
}

/// Size of the sample file that spans several chunks (more than 16 MiB, four of the
/// default 4 MiB chunks).
pub const BIG: usize = (17 << 20) + 12_345;

/// The base layer of the sample image: every entry type, ownership, modes, xattrs, a long
/// path, and paths the top layer deletes or hides.
pub fn sample_base_layer() -> Vec<u8> {
    let text: Vec<u8> = (0..120_000)
        .flat_map(|i| format!("line {i}: compressible text for the chunker\n").into_bytes())
        .collect();
    build_tar(vec![
        E::Dir("etc", 0o755),
        E::File("etc/hosts", 0o644, b"127.0.0.1 localhost\n".to_vec()),
        E::FileOwned("etc/shadow", 0o640, 0, 42, b"root:*:19000::::::\n".to_vec()),
        E::FileOwned("etc/owned", 0o600, 1000, 1000, b"someone else's\n".to_vec()),
        E::Dir("usr", 0o755),
        E::Dir("usr/bin", 0o755),
        E::File("usr/bin/tool", 0o4755, random_bytes(200_000, 101)),
        E::Hardlink("usr/bin/tool-link", "usr/bin/tool"),
        E::Symlink("bin", "usr/bin"),
        E::Symlink("dangling", "../nowhere/at/all"),
        E::Dir("tmp", 0o1777),
        E::File("empty", 0o600, vec![]),
        E::File("one", 0o644, b"1".to_vec()),
        E::File("big.bin", 0o644, random_bytes(BIG, 102)),
        E::File("exact-4m.bin", 0o644, random_bytes(4 << 20, 103)),
        E::File("text.log", 0o644, text),
        E::Xattr("labelled", "user.lazypull.test", b"hello", b"has an xattr".to_vec()),
        E::Dir("dev", 0o755),
        E::Char("dev/null", 1, 3),
        E::Block("dev/loop0", 7, 0),
        E::Fifo("dev/pipe"),
        E::Dir("a", 0o755),
        E::File("a/x", 0o644, b"deleted above".to_vec()),
        E::File("a/keep", 0o644, b"kept".to_vec()),
        E::Dir("d", 0o700),
        E::File("d/z", 0o644, b"hidden by opaque dir".to_vec()),
        E::Dir("d/sub", 0o755),
        E::File("d/sub/deeper", 0o644, b"also hidden".to_vec()),
        E::Dir("gone", 0o755),
        E::File("gone/file", 0o644, b"whole dir whited out".to_vec()),
        E::File(
            "deep/very/long/path/that/goes/on/and/on/beyond/one/hundred/characters/in/total/length/file.txt",
            0o644,
            b"long".to_vec(),
        ),
    ])
}

/// The top layer: whiteouts (a file and a whole directory), an opaque directory, an
/// overwritten file, a new file with a hard link.
pub fn sample_top_layer() -> Vec<u8> {
    build_tar(vec![
        E::Dir("a", 0o755),
        E::File("a/.wh.x", 0o644, vec![]),
        E::File(".wh.gone", 0o644, vec![]),
        E::Dir("d", 0o755),
        E::File("d/.wh..wh..opq", 0o644, vec![]),
        E::File("d/new", 0o644, b"new in opaque dir".to_vec()),
        E::File("etc/hosts", 0o644, b"10.0.0.1 changed\n".to_vec()),
        E::File("top-only", 0o755, random_bytes(3 << 20, 104)),
        E::Hardlink("top-link", "top-only"),
    ])
}

#[allow(unused_imports)]
pub use lazypull_tests::runnable::{busybox_layer, runnable_config};

/// SHA-256 of `data` in hex, as `sha256sum` prints it (the entry point's output).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

/// The realistic python-shaped image made runnable: its 7 layers and a busybox entry point
/// that reads the first `read` files of [`lazypull_tests::images::entry_point_files`].
pub struct RealisticImage {
    /// Layer tars, base first (the entry point's layer last).
    pub tars: Vec<Vec<u8>>,
    /// What the entry point prints.
    pub expected: String,
    /// Total size of the files the entry point reads.
    pub read_bytes: u64,
}

/// Builds [`RealisticImage`]; the expected output is computed from a plain extraction.
pub fn realistic_image(read: usize) -> RealisticImage {
    let files = lazypull_tests::images::entry_point_files();
    let mut tars = lazypull_tests::images::realistic_layers(7);
    let merged = tempfile::tempdir().unwrap();
    lazypull_tests::tree::apply_layers(&tars, merged.path());
    // The busybox layer's `bin` directory replaces the base's `bin -> usr/bin` symlink, as
    // overlayfs does (the tar-based reference extraction cannot do that).
    tars.push(busybox_layer(&files[..read]));
    let last = std::fs::read(merged.path().join(&files[read - 1])).unwrap();
    let expected = format!(
        "entry: {read} files\n{}  /{}\n",
        sha256_hex(&last),
        files[read - 1]
    );
    let read_bytes = files[..read]
        .iter()
        .map(|f| std::fs::metadata(merged.path().join(f)).map_or(0, |m| m.len()))
        .sum();
    RealisticImage {
        tars,
        expected,
        read_bytes,
    }
}
