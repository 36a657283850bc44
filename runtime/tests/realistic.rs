//! The realistic image (`lazypull_tests::images`: ~22,000 files, ~410 MB in 5 layers, shaped like
//! a python data image) through the real binary, registry and FUSE:
//!
//! - laziness: mounted without background fill, reading one small file fetches a tiny share
//!   of the image from the registry (counted by a proxy in front of it);
//! - correctness: a second mount, once background fill has made it complete, equals a plain
//!   extraction of the same layers, entry by entry.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Lazypull, ESTARGZ_MEDIA_TYPE, TOC_ANNOTATION};
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
    let expected_dir = tempfile::tempdir().unwrap();
    let expected_path = expected_dir.path().to_path_buf();
    let expected = std::thread::spawn(move || {
        apply_layers(&tars, &expected_path);
        describe_tree(&expected_path)
    });

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
    let mut lp = Lazypull::new(&["--background-fill", "false"]);
    let small = "etc/os-release";
    let (mounted, content) = tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        let mounted = proxy.total_body_bytes();
        (mounted, std::fs::read(mnt.path().join(small)).unwrap())
    });
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
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
    drop(lp);

    let expected = tokio::task::block_in_place(|| expected.join().unwrap());
    assert_eq!(
        content,
        std::fs::read(expected_dir.path().join(small)).unwrap(),
        "{small} differs"
    );
    assert!(expected.len() > 20_000, "{} entries", expected.len());

    // (a) Correctness: a second mount (own root and cache), filled completely, then compared.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = Lazypull::new(&[]);
    let image = format!("{}/lazy/realistic:v1", registry.host());
    let fill = Instant::now();
    let actual = tokio::task::block_in_place(|| {
        lp.mount(&image, mnt.path());
        lp.wait_complete(Duration::from_secs(120));
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
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
    eprintln!("total {:?}", start.elapsed());
}
