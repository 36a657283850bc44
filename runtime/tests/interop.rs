//! Interoperability: lazypull reads eStargz written by an independent writer.
//!
//! A two-layer image of plain gzip layers is built from generated tars and pushed to a real
//! registry; a real containerd then pulls it and stargz-snapshotter's
//! `ctr-remote images convert --oci --estargz` (the Go `estargz` package) converts it, and the
//! result is pushed back under another name. lazypull must verify the converted layers' TOCs
//! against the manifest annotations, and its lazy mount must equal a plain extraction of the
//! original tars, entry by entry.
//!
//! containerd and ctr-remote come from Debian (`containerd`, `stargz-snapshotter`); the test
//! fails with an install hint when they are missing (CI installs them).

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Output;

use common::{
    lazypull, sample_base_layer, sample_top_layer, BIG, ESTARGZ_MEDIA_TYPE, TOC_ANNOTATION,
};
use lazypull_fs::estargz::{open_toc, Prefetch, ReaderConfig};
use lazypull_tests::tree::{apply_layers, describe_tree, diff_trees};
use lazypull_tests::{Digest, ImageSpec, Layer, TestContainerd, TestRegistry};

#[test]
fn mounts_estargz_converted_by_ctr_remote() {
    // First, so that a machine without containerd/ctr-remote fails at once with the hint.
    let containerd = TestContainerd::start();
    let registry = TestRegistry::plain();
    let host = registry.host();
    let plain_ref = format!("{host}/interop/plain:v1");
    let esgz_ref = format!("{host}/interop/esgz:v1");

    let (base, top) = (sample_base_layer(), sample_top_layer());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pushed = rt.block_on(registry.pusher().push_image_with(
        "interop/plain",
        "v1",
        &ImageSpec::new(
            vec![
                Layer::new(lazypull_tests::gzip(&base)),
                Layer::new(lazypull_tests::gzip(&top)),
            ],
            "linux",
            "amd64",
        ),
    ));
    drop(rt);

    // The independent writer: containerd pulls the plain image, ctr-remote converts it.
    let out = containerd.ctr_remote(&[
        "images",
        "pull",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &plain_ref,
    ]);
    check("ctr-remote images pull", &out, &containerd);
    let out = containerd.ctr_remote(&[
        "images",
        "convert",
        "--oci",
        "--estargz",
        "--platform",
        "linux/amd64",
        &plain_ref,
        &esgz_ref,
    ]);
    check(
        "ctr-remote images convert --oci --estargz",
        &out,
        &containerd,
    );
    let out = containerd.ctr_remote(&[
        "images",
        "push",
        "--plain-http",
        "--platform",
        "linux/amd64",
        &esgz_ref,
    ]);
    check("ctr-remote images push", &out, &containerd);

    let mut lp = lazypull(&["--background-fill", "false", "--insecure-registry", &host]);

    // The converted manifest: gzip layers, new blobs, each with a TOC digest annotation.
    let out = lp.cmd(&["inspect", &esgz_ref, "--platform", "linux/amd64"]);
    assert!(
        out.status.success(),
        "lazypull inspect {esgz_ref}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = summary["layers"].as_array().expect("layers array").clone();
    assert_eq!(layers.len(), 2, "converted image layers: {summary:#}");
    let blobs = tempfile::tempdir().unwrap();
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(
            layer["mediaType"].as_str(),
            Some(ESTARGZ_MEDIA_TYPE),
            "layer {i}: {layer:#}"
        );
        assert_ne!(
            digest,
            pushed.layer_digests[i].to_string(),
            "layer {i} was not converted"
        );
        let toc_digest: Digest = layer["annotations"][TOC_ANNOTATION]
            .as_str()
            .unwrap_or_else(|| panic!("layer {i} lacks the {TOC_ANNOTATION} annotation: {layer:#}"))
            .parse()
            .unwrap();
        assert!(
            layer["annotations"]["io.containers.estargz.uncompressed-size"].is_string(),
            "layer {i} lacks the uncompressed-size annotation: {layer:#}"
        );

        // lazypull's reader parses the Go writer's footer and TOC and verifies the TOC digest.
        let path = blobs.path().join(format!("layer{i}"));
        let out = lp.cmd(&["fetch", &esgz_ref, digest, "-o", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "lazypull fetch {digest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let blob = std::fs::read(&path).unwrap();
        let toc = open_toc(
            &blob,
            0,
            blob.len() as u64,
            Some(&toc_digest),
            &ReaderConfig::default(),
        )
        .unwrap_or_else(|e| panic!("layer {i} ({digest}) from ctr-remote: {e}"));
        assert_eq!(toc.toc_digest, toc_digest);
        // ctr-remote convert without a record file marks the layer "nothing to prefetch".
        assert_eq!(toc.prefetch, Prefetch::None, "layer {i}");
        if i == 0 {
            let node = toc.layer.resolve("big.bin").expect("big.bin in the TOC");
            let chunks = toc.layer.chunks(node);
            assert!(
                chunks.len() >= 2,
                "big.bin ({BIG} bytes) should span several chunks: {chunks:?}"
            );
            assert_eq!(chunks.iter().map(|c| c.size).sum::<u64>(), BIG as u64);
        }
    }

    // The lazy mount equals a plain extraction of the original tars.
    let expected_dir = tempfile::tempdir().unwrap();
    apply_layers(&[base, top], expected_dir.path());
    let expected = describe_tree(expected_dir.path());
    let mnt = tempfile::tempdir().unwrap();
    lp.mount(&esgz_ref, mnt.path());
    let actual = describe_tree(mnt.path());
    let diffs = diff_trees(&expected, &actual);
    assert!(
        diffs.is_empty(),
        "mount of the ctr-remote eStargz image differs from the extraction:\n{}\nserver log:\n{}",
        diffs.join("\n"),
        lp.log()
    );
    assert!(expected.len() > 25, "{} entries", expected.len());
    for (a, b) in [
        ("usr/bin/tool", "usr/bin/tool-link"),
        ("top-only", "top-link"),
    ] {
        let a = std::fs::metadata(mnt.path().join(a)).unwrap();
        let b = std::fs::metadata(mnt.path().join(b)).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard links share an inode");
        assert_eq!(a.nlink(), 2);
    }
    lp.umount(mnt.path());
}

/// Panics with the command's output unless it succeeded.
fn check(what: &str, out: &Output, cd: &TestContainerd) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}\ncontainerd log tail:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        cd.log_tail(30)
    );
}
