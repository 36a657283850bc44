//! The realistic image (`lazypull_tests::images`: ~22,000 files, ~410 MB in 5 layers, shaped like
//! a python data image) through the real binary, registry and FUSE:
//!
//! - laziness: mounted without background fill, reading one small file fetches a tiny share
//!   of the image from the registry (counted by a proxy in front of it);
//! - correctness: a second mount, once background fill has made it complete, equals a plain
//!   extraction of the same layers, entry by entry.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{lazypull, Lazypull, ESTARGZ_MEDIA_TYPE, TOC_ANNOTATION};
use lazypull_fs::estargz::{write_estargz, WriterOptions};
use lazypull_tests::images::realistic_layers;
use lazypull_tests::tree::{apply_layers, describe_tree, diff_trees};
use lazypull_tests::{CountingProxy, ImageSpec, Layer, TestRegistry};

/// Converts every layer to eStargz (4 MiB chunks) in its own thread.
fn to_estargz(tars: &[Vec<u8>]) -> Vec<Layer> {
    std::thread::scope(|s| {
        let handles: Vec<_> = tars
            .iter()
            .map(|tar| {
                s.spawn(move || {
                    let mut out = Vec::with_capacity(tar.len() / 2);
                    let w = write_estargz(&tar[..], &mut out, &WriterOptions::default()).unwrap();
                    Layer {
                        data: out,
                        media_type: Some(ESTARGZ_MEDIA_TYPE.to_string()),
                        diff_id: w.diff_id,
                        annotations: BTreeMap::from([(
                            TOC_ANNOTATION.to_string(),
                            w.toc_digest.to_string(),
                        )]),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A [`Lazypull`] with one image mounted. Dropping it (also on panic) unmounts the image and
/// waits for the mount server *process* to exit before the root is removed: the server may
/// still be writing its cache after its socket is gone, and a concurrent removal of the root
/// would then leave directories behind.
struct Mounted {
    lp: Option<Lazypull>,
    dir: PathBuf,
}

impl Mounted {
    fn new(lp: Lazypull, dir: &Path) -> Mounted {
        Mounted {
            lp: Some(lp),
            dir: dir.to_path_buf(),
        }
    }

    fn lp(&mut self) -> &mut Lazypull {
        self.lp.as_mut().expect("not finished")
    }

    /// Unmounts (asserting success), waits for the server to exit, removes the root.
    fn finish(mut self) {
        let dir = self.dir.clone();
        self.lp().umount(&dir);
        self.stop();
    }

    fn stop(&mut self) {
        let Some(lp) = self.lp.take() else { return };
        let _ = lp.cmd(&["umount", &self.dir.display().to_string()]);
        lp.shutdown();
        drop(lp);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A thread joined on drop too, so a failing test does not exit while it still writes into a
/// temporary directory (which would then be left behind).
struct Joined<T>(Option<std::thread::JoinHandle<T>>);

impl<T> Joined<T> {
    fn join(mut self) -> T {
        let handle = self.0.take().expect("joined once");
        handle.join().expect("extraction thread panicked")
    }
}

impl<T> Drop for Joined<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn realistic_image_is_lazy_and_complete_mount_equals_extraction() {
    let start = Instant::now();
    let tars = realistic_layers(1);
    let layers = tokio::task::block_in_place(|| to_estargz(&tars));
    let blob_bytes: u64 = layers.iter().map(|l| l.data.len() as u64).sum();
    let tar_bytes: u64 = tars.iter().map(|t| t.len() as u64).sum();
    eprintln!(
        "realistic image: {} layers, {} MB of tar, {} MB as eStargz, generated and converted in {:?}",
        tars.len(),
        tar_bytes / 1_000_000,
        blob_bytes / 1_000_000,
        start.elapsed()
    );

    // The reference tree, extracted while the registry part runs.
    let expected = Joined(Some(std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap();
        apply_layers(&tars, dir.path());
        let tree = describe_tree(dir.path());
        (dir, tree)
    })));

    let registry = TestRegistry::plain();
    registry
        .pusher()
        .push_image_with(
            "lazy/realistic",
            "v1",
            &ImageSpec::new(layers, "linux", "amd64"),
        )
        .await;
    let proxy = CountingProxy::start(&registry.host());
    let image = format!("{}/lazy/realistic:v1", proxy.host());

    // (b) Laziness first, on a cold cache with no background fill.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&["--background-fill", "false"]);
    let small = "etc/os-release";
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let lazy = Mounted::new(lp, mnt.path());
    let mounted = proxy.total_body_bytes();
    let content = tokio::task::block_in_place(|| std::fs::read(mnt.path().join(small)).unwrap());
    let fetched = proxy.total_body_bytes();
    let requests = proxy.count(|_| true);
    eprintln!(
        "laziness: mount fetched {mounted} bytes; after reading {small} ({} bytes) the registry \
         served {fetched} bytes in {requests} requests = {:.2}% of the {blob_bytes}-byte image",
        content.len(),
        fetched as f64 * 100.0 / blob_bytes as f64
    );
    assert!(
        fetched * 20 < blob_bytes,
        "fetched {fetched} of {blob_bytes} bytes to read one small file"
    );
    tokio::task::block_in_place(|| lazy.finish());

    let (expected_dir, expected) = tokio::task::block_in_place(|| expected.join());
    assert_eq!(
        content,
        std::fs::read(expected_dir.path().join(small)).unwrap(),
        "{small} differs"
    );
    assert!(expected.len() > 20_000, "{} entries", expected.len());

    // (a) Correctness: a second mount (own root and cache), filled completely, then compared.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&[]);
    let image = format!("{}/lazy/realistic:v1", registry.host());
    let fill = Instant::now();
    tokio::task::block_in_place(|| lp.mount(&image, mnt.path()));
    let mut full = Mounted::new(lp, mnt.path());
    let actual = tokio::task::block_in_place(|| {
        full.lp().wait_complete(Duration::from_secs(120));
        eprintln!("background fill completed in {:?}", fill.elapsed());
        describe_tree(mnt.path())
    });
    let diffs = diff_trees(&expected, &actual);
    assert!(
        diffs.is_empty(),
        "{} differences between the mount and the extraction, first ones:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(40)].join("\n")
    );
    // Hard links share an inode through the mount, too.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(mnt.path().join("usr/bin/perl")).unwrap();
    let b = std::fs::metadata(mnt.path().join("usr/bin/perl5.36.0")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
    tokio::task::block_in_place(|| full.finish());
    eprintln!("total {:?}", start.elapsed());
}
