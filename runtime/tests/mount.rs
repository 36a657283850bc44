//! `lazypull mount` end to end: real registry, real FUSE, real overlayfs, the real binary.
//!
//! Images are built here from generated files, converted to eStargz, pushed to a registry the
//! test starts, mounted lazily, and compared entry by entry with a plain extraction of the same
//! layers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use lazypull_fs::estargz::{write_estargz, WriterOptions};
use lazypull_tests::tree::{apply_layers, describe_tree, diff_trees};
use lazypull_tests::{random_bytes, CountingProxy, ImageSpec, Layer, TestRegistry};

const TOC_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";
const ESTARGZ_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A tar entry to generate.
enum E<'a> {
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

fn build_tar(entries: Vec<E<'_>>) -> Vec<u8> {
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
fn estargz_layer(tar: &[u8], prefetch: Option<Vec<String>>) -> (Layer, u64) {
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

/// The binary under a private `--root`; stops its mount server and any mount on drop.
struct Lazypull {
    root: tempfile::TempDir,
    extra: Vec<String>,
    mounted: Vec<PathBuf>,
}

impl Lazypull {
    fn new(extra: &[&str]) -> Lazypull {
        Lazypull {
            root: tempfile::tempdir().unwrap(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            mounted: Vec::new(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let hosts = self.root.path().join("no-hosts");
        Command::new(env!("CARGO_BIN_EXE_lazypull"))
            .arg("--root")
            .arg(self.root.path())
            .arg("--hosts-dir")
            .arg(&hosts)
            .args(&self.extra)
            .args(args)
            .env("RUST_LOG", "info")
            .output()
            .unwrap()
    }

    fn mount(&mut self, image: &str, dir: &Path) {
        let out = self.cmd(&["mount", image, dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "mount failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.mounted.push(dir.to_path_buf());
    }

    fn umount(&mut self, dir: &Path) {
        let out = self.cmd(&["umount", dir.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "umount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted.retain(|d| d != dir);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("mount-server.log")).unwrap_or_default()
    }

    fn wait_complete(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let out = self.cmd(&["mounts"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("\tcomplete") {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "layers not complete: {text}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn server_running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.root.path().join("mount.sock")).is_ok()
    }
}

impl Drop for Lazypull {
    fn drop(&mut self) {
        for d in self.mounted.clone() {
            let _ = self.cmd(&["umount", d.to_str().unwrap()]);
        }
        // Whatever is still mounted under the root or the test dirs goes, lazily.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let root = self.root.path().to_string_lossy().into_owned();
        for line in mounts.lines() {
            if let Some(mp) = line.split_whitespace().nth(4) {
                if mp.starts_with(&root) || self.mounted.iter().any(|d| d.to_str() == Some(mp)) {
                    let _ = Command::new("umount").arg("-l").arg(mp).status();
                }
            }
        }
        let start = Instant::now();
        while self.server_running() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn read_all_files(root: &Path) -> usize {
    let mut n = 0;
    for (p, info) in describe_tree(root) {
        if info.kind == "file" {
            std::fs::read(root.join(&p)).unwrap();
            n += 1;
        }
    }
    n
}

fn base_layer() -> Vec<u8> {
    build_tar(vec![
        E::Dir("etc", 0o755),
        E::File("etc/hosts", 0o644, b"127.0.0.1 localhost\n".to_vec()),
        E::FileOwned("etc/shadow", 0o640, 0, 42, b"root:*:19000::::::\n".to_vec()),
        E::Dir("usr", 0o755),
        E::Dir("usr/bin", 0o755),
        E::File("usr/bin/tool", 0o4755, random_bytes(200_000, 1)),
        E::Hardlink("usr/bin/tool-link", "usr/bin/tool"),
        E::Symlink("bin", "usr/bin"),
        E::File("empty", 0o600, vec![]),
        E::File("one", 0o644, b"1".to_vec()),
        E::File("big.bin", 0o644, random_bytes(17 << 20, 2)),
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
        E::File(
            "deep/very/long/path/that/goes/on/and/on/beyond/one/hundred/characters/in/total/length/file.txt",
            0o644,
            b"long".to_vec(),
        ),
    ])
}

fn top_layer() -> Vec<u8> {
    build_tar(vec![
        E::Dir("a", 0o755),
        E::File("a/.wh.x", 0o644, vec![]),
        E::Dir("d", 0o755),
        E::File("d/.wh..wh..opq", 0o644, vec![]),
        E::File("d/new", 0o644, b"new in opaque dir".to_vec()),
        E::File("etc/hosts", 0o644, b"10.0.0.1 changed\n".to_vec()),
        E::File("top-only", 0o755, random_bytes(3 << 20, 3)),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn mounted_image_equals_extracted_layers() {
    let registry = TestRegistry::plain();
    let (base, top) = (base_layer(), top_layer());
    let (l1, _) = estargz_layer(&base, None);
    let (l2, _) = estargz_layer(&top, None);
    registry
        .pusher()
        .push_image_with(
            "lazy/app",
            "v1",
            &ImageSpec::new(vec![l1, l2], "linux", "amd64"),
        )
        .await;

    let expected_dir = tempfile::tempdir().unwrap();
    apply_layers(&[base, top], expected_dir.path());
    let expected = describe_tree(expected_dir.path());

    let mnt = tempfile::tempdir().unwrap();
    let mut lp = Lazypull::new(&["--background-fill", "false"]);
    let image = format!("{}/lazy/app:v1", registry.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let actual = tokio::task::block_in_place(|| describe_tree(mnt.path()));
    let diffs = diff_trees(&expected, &actual);
    assert!(
        diffs.is_empty(),
        "mount differs from extraction:\n{}",
        diffs.join("\n")
    );
    assert!(expected.len() > 20);
    // Hard links share an inode through the mount, too.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(mnt.path().join("usr/bin/tool")).unwrap();
    let b = std::fs::metadata(mnt.path().join("usr/bin/tool-link")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);

    tokio::task::block_in_place(|| lp.umount(mnt.path()));
    // The server exits with its last mount, leaving no mounts behind.
    let start = Instant::now();
    while lp.server_running() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !lp.server_running(),
        "mount server still running after the last umount"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(lp.root.path().to_str().unwrap()),
        "layer mounts left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reading_one_small_file_fetches_little_and_fill_makes_it_local() {
    let mut registry = TestRegistry::plain();
    let tar = build_tar(vec![
        E::Dir("data", 0o755),
        E::File("data/huge.bin", 0o644, random_bytes(40 << 20, 7)),
        E::File("data/other.bin", 0o644, random_bytes(10 << 20, 8)),
        E::File("hello.txt", 0o644, b"hello, lazily\n".to_vec()),
    ]);
    let (layer, blob_size) = estargz_layer(&tar, None);
    registry
        .pusher()
        .push_image_with(
            "lazy/big",
            "v1",
            &ImageSpec::new(vec![layer], "linux", "amd64"),
        )
        .await;
    let proxy = CountingProxy::start(&registry.host());

    // Laziness: no background fill, read one small file.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = Lazypull::new(&["--background-fill", "false"]);
    let image = format!("{}/lazy/big:v1", proxy.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let hello = std::fs::read(mnt.path().join("hello.txt")).unwrap();
    assert_eq!(hello, b"hello, lazily\n");
    let fetched = proxy.total_body_bytes();
    assert!(
        fetched * 20 < blob_size,
        "fetched {fetched} of {blob_size} bytes to read one small file"
    );
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
    drop(lp);

    // Background fill: the layer becomes complete, then reads work with the registry gone.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = Lazypull::new(&[]);
    tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        lp.wait_complete(Duration::from_secs(60));
    });
    registry.kill();
    drop(proxy);
    let expected_dir = tempfile::tempdir().unwrap();
    apply_layers(&[tar], expected_dir.path());
    let diffs = tokio::task::block_in_place(|| {
        diff_trees(
            &describe_tree(expected_dir.path()),
            &describe_tree(mnt.path()),
        )
    });
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert_eq!(
        tokio::task::block_in_place(|| read_all_files(mnt.path())),
        3
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_chunk_gives_eio_for_its_file_only() {
    let registry = TestRegistry::plain();
    let good = random_bytes(300_000, 21);
    let victim = random_bytes(300_000, 22);
    let tar = build_tar(vec![
        E::File("good.bin", 0o644, good.clone()),
        E::File("victim.bin", 0o644, victim.clone()),
    ]);
    let (layer, _) = estargz_layer(&tar, None);
    let blob = layer_bytes(&layer);
    let pushed = registry
        .pusher()
        .push_image_with(
            "lazy/corrupt",
            "v1",
            &ImageSpec::new(vec![layer], "linux", "amd64"),
        )
        .await;
    // Flip a byte inside victim.bin's compressed data (found through our own reader's TOC).
    let toc = lazypull_fs::estargz::open_toc(
        &blob,
        0,
        blob.len() as u64,
        None,
        &lazypull_fs::estargz::ReaderConfig::default(),
    )
    .unwrap();
    let node = toc.layer.resolve("victim.bin").unwrap();
    let chunk = toc.layer.chunks(node)[0];
    let path = registry.blob_data_path(&pushed.layer_digests[0]);
    let mut stored = std::fs::read(&path).unwrap();
    let at = (chunk.blob_offset + chunk.blob_len / 2) as usize;
    stored[at] ^= 0xff;
    std::fs::write(&path, &stored).unwrap();

    let mnt = tempfile::tempdir().unwrap();
    let mut lp = Lazypull::new(&["--background-fill", "false"]);
    let image = format!("{}/lazy/corrupt:v1", registry.host());
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let err = std::fs::read(mnt.path().join("victim.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert_eq!(std::fs::read(mnt.path().join("good.bin")).unwrap(), good);
    assert!(
        lp.log().contains("verification"),
        "no log of the bad chunk:\n{}",
        lp.log()
    );
}

fn libc_eio() -> i32 {
    5
}

fn layer_bytes(layer: &Layer) -> Vec<u8> {
    layer.data.clone()
}
