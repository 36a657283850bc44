//! `lazypull convert` through the real binary and registry: the converted image is valid
//! eStargz (every layer still an ordinary tar.gz with the same entries, diff ids and
//! annotations right), mounts lazily to the same tree as a plain extraction of the original,
//! runs, keeps every platform of an index, honours a prefetch list, reads OCI layouts and
//! zstd/plain layers, and fails clearly on bad input and refused pushes.

mod common;

use std::io::Read;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{build_tar, busybox_layer, lazypull, runnable_config, Lazypull, E, TOC_ANNOTATION};
use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::{Digest, Manifest, Reference, Registry, RegistryConfig};
use lazypull_tests::images::realistic_layers;
use lazypull_tests::podman::{Podman, PARTIAL_PULLS};
use lazypull_tests::tree::{apply_layers, describe_tree, diff_trees};
use lazypull_tests::{
    gzip, ImageSpec, Layer, ManifestFormat, RegistryAuth, TestRegistry, MEDIA_TYPE_OCI_LAYER,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
};
use serde_json::Value;

const SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A registry client that ignores the host's configuration.
fn client() -> Registry {
    Registry::new(RegistryConfig {
        hosts: HostsConfig::new(vec![]),
        credentials: CredentialStore::empty(),
        ..RegistryConfig::default()
    })
}

/// `lazypull convert ARGS`, asserting success; returns (stdout, stderr).
fn convert(lp: &Lazypull, args: &[&str]) -> (String, String) {
    let mut all = vec!["convert"];
    all.extend_from_slice(args);
    let out = lp.cmd(&all);
    assert!(
        out.status.success(),
        "lazypull {all:?} failed ({}):\n{}",
        out.status,
        stderr(&out)
    );
    (stdout(&out), stderr(&out))
}

/// An image as stored in the registry: manifest, config, and for each layer its descriptor.
struct Stored {
    digest: Digest,
    media_type: String,
    manifest: Value,
    config: Value,
}

async fn stored(reference: &str) -> Stored {
    let r: Reference = reference.parse().unwrap();
    let reg = client();
    let m = reg.fetch_manifest(&r).await.unwrap();
    let manifest: Value = serde_json::from_slice(&m.bytes).unwrap();
    let config_digest: Digest = manifest["config"]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let config = reg.fetch_blob(&r, &config_digest).await.unwrap();
    Stored {
        digest: m.digest,
        media_type: m.media_type,
        manifest,
        config: serde_json::from_slice(&config).unwrap(),
    }
}

fn layers(s: &Stored) -> Vec<Value> {
    s.manifest["layers"].as_array().unwrap().clone()
}

fn digest_of(desc: &Value) -> Digest {
    desc["digest"].as_str().unwrap().parse().unwrap()
}

/// Entry names as `tar -tzf` lists them (trailing `/` of directories dropped).
fn tar_tzf(path: &Path) -> Vec<String> {
    let out = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -tzf {} failed: {}",
        path.display(),
        stderr(&out)
    );
    stdout(&out)
        .lines()
        .map(|l| l.trim_end_matches('/').to_string())
        .collect()
}

/// Entry names of an uncompressed tar, as `tar -t` would print them.
fn tar_names(tar: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(tar);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            e.path()
                .unwrap()
                .display()
                .to_string()
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

/// sha256 and length of a gzip blob's decompressed content.
fn gunzip_digest(path: &Path) -> (Digest, u64) {
    use sha2::Digest as _;
    let mut d = flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap());
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = d.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        n += k as u64;
        h.update(&buf[..k]);
    }
    (
        Digest::from_raw(lazypull_fetcher::Algorithm::Sha256, &h.finalize()).unwrap(),
        n,
    )
}

/// Checks what every converted layer must satisfy: eStargz annotations, a valid tar.gz whose
/// entries are the source tar's plus the landmark and TOC, and config diff ids that match.
/// Returns the `tar -tzf` listing of each layer.
fn check_estargz_image(
    registry: &TestRegistry,
    image: &Stored,
    source_tars: &[Vec<u8>],
) -> Vec<Vec<String>> {
    let descs = layers(image);
    assert_eq!(descs.len(), source_tars.len());
    let diff_ids = image.config["rootfs"]["diff_ids"].as_array().unwrap();
    assert_eq!(diff_ids.len(), descs.len());
    let mut listings = Vec::new();
    for ((desc, tar), diff_id) in descs.iter().zip(source_tars).zip(diff_ids) {
        let ann = &desc["annotations"];
        assert!(
            ann[TOC_ANNOTATION]
                .as_str()
                .is_some_and(|d| d.starts_with("sha256:")),
            "{desc}"
        );
        let blob = registry.blob_data_path(&digest_of(desc));
        let (diff, len) = gunzip_digest(&blob);
        assert_eq!(
            diff_id.as_str().unwrap(),
            diff.to_string(),
            "diff id of {desc}"
        );
        assert_eq!(ann[SIZE_ANNOTATION].as_str().unwrap(), len.to_string());
        assert_eq!(
            std::fs::metadata(&blob).unwrap().len(),
            desc["size"].as_u64().unwrap()
        );
        let listing = tar_tzf(&blob);
        assert_eq!(
            listing.last().map(String::as_str),
            Some("stargz.index.json")
        );
        let mut got: Vec<String> = listing
            .iter()
            .filter(|n| {
                !matches!(
                    n.as_str(),
                    "stargz.index.json" | ".prefetch.landmark" | ".no.prefetch.landmark"
                )
            })
            .cloned()
            .collect();
        let mut want = tar_names(tar);
        got.sort();
        want.sort();
        assert_eq!(got, want, "entries of {desc}");
        listings.push(listing);
    }
    listings
}

/// Pushes `tars` gzip-compressed (in parallel threads) as `repo:tag` with the runnable config.
async fn push_gzip(registry: &TestRegistry, repo: &str, tag: &str, tars: &[Vec<u8>]) {
    let layers: Vec<Layer> = std::thread::scope(|s| {
        let hs: Vec<_> = tars
            .iter()
            .map(|t| s.spawn(move || Layer::new(gzip(t))))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut spec = ImageSpec::new(layers, "linux", "amd64");
    spec.config = runnable_config();
    registry.pusher().push_image_with(repo, tag, &spec).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn realistic_image_converts_and_mounts_like_the_original() {
    let tars = realistic_layers(3);
    let tar_bytes: u64 = tars.iter().map(|t| t.len() as u64).sum();
    let expected = {
        let tars = tars.clone();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            apply_layers(&tars, dir.path());
            describe_tree(dir.path())
        })
    };
    let registry = TestRegistry::plain();
    push_gzip(&registry, "conv/realistic", "gzip", &tars).await;
    let src = format!("{}/conv/realistic:gzip", registry.host());
    let dst = format!("{}/conv/realistic:esgz", registry.host());

    let lp = lazypull(&[]);
    let start = Instant::now();
    let (out, err) =
        tokio::task::block_in_place(|| convert(&lp, &[&src, &dst, "--format", "estargz"]));
    let took = start.elapsed();
    eprintln!("{err}");
    eprintln!(
        "converted {} MB of tar (fetch + convert + push) in {took:?}: {:.0} MB/s",
        tar_bytes / 1_000_000,
        tar_bytes as f64 / 1e6 / took.as_secs_f64()
    );
    // Plain progress lines (stderr is not a terminal), the digest on stdout.
    assert!(err.contains("[1/5]") && err.contains("converting"), "{err}");
    let image = stored(&dst).await;
    assert_eq!(out.trim(), image.digest.to_string());
    assert_eq!(
        image.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    let listings = tokio::task::block_in_place(|| check_estargz_image(&registry, &image, &tars));
    for l in &listings {
        assert_eq!(l[0], ".no.prefetch.landmark");
    }
    // The config is the original one but for the diff ids.
    let orig = stored(&src).await;
    let mut a = orig.config.clone();
    let mut b = image.config.clone();
    a["rootfs"]["diff_ids"] = Value::Null;
    b["rootfs"]["diff_ids"] = Value::Null;
    assert_eq!(a, b);

    // Mounted lazily and filled, the converted image equals a plain extraction of the original.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&[]);
    tokio::task::block_in_place(|| {
        lp.mount(&dst, mnt.path());
        lp.wait_complete(Duration::from_secs(180));
    });
    let actual = tokio::task::block_in_place(|| describe_tree(mnt.path()));
    let expected = expected.join().unwrap();
    let diffs = diff_trees(&expected, &actual);
    assert!(
        diffs.is_empty(),
        "{} differences, first ones:\n{}",
        diffs.len(),
        diffs[..diffs.len().min(30)].join("\n")
    );
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
}

/// A small image for the other tests: a data layer and busybox.
fn small_tars(tag: &str) -> Vec<Vec<u8>> {
    let data = build_tar(vec![
        E::Dir("srv", 0o755),
        E::File(
            "srv/hello.txt",
            0o644,
            format!("hello from {tag}\n").into_bytes(),
        ),
        E::Dir("usr", 0o755),
        E::Dir("usr/lib", 0o755),
        E::File(
            "usr/lib/big.bin",
            0o644,
            lazypull_tests::random_bytes(3 << 20, 5),
        ),
        E::File("usr/lib/small.txt", 0o644, b"small".to_vec()),
    ]);
    vec![data, busybox_layer(&["srv/hello.txt".to_string()])]
}

#[tokio::test(flavor = "multi_thread")]
async fn converted_image_runs_from_zstd_plain_and_docker_sources() {
    let registry = TestRegistry::plain();
    let tars = small_tars("zstd");
    // Data layer zstd-compressed, busybox layer an uncompressed tar, Docker media types.
    let zst = zstd::encode_all(&tars[0][..], 3).unwrap();
    let layers = vec![
        Layer::new(zst)
            .with_media_type(MEDIA_TYPE_OCI_LAYER_ZSTD)
            .with_diff_id(Digest::sha256_of(&tars[0])),
        Layer::new(tars[1].clone()).with_media_type(MEDIA_TYPE_OCI_LAYER),
    ];
    let mut spec = ImageSpec::new(layers, "linux", "amd64");
    spec.config = runnable_config();
    spec.format = ManifestFormat::Docker;
    registry
        .pusher()
        .push_image_with("conv/run", "src", &spec)
        .await;
    let src = format!("{}/conv/run:src", registry.host());
    let dst = format!("{}/conv/run:esgz", registry.host());
    let lp = lazypull(&[]);
    tokio::task::block_in_place(|| {
        convert(&lp, &[&src, &dst, "--chunk-size", "1M", "--level", "9"])
    });
    let image = stored(&dst).await;
    // A Docker image stays a Docker image, with Docker's gzip layer type.
    assert_eq!(
        image.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    for l in layers_of(&image) {
        assert_eq!(
            l["mediaType"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip"
        );
    }
    tokio::task::block_in_place(|| check_estargz_image(&registry, &image, &tars));

    if !(Path::new("/usr/sbin/runc").exists() || Path::new("/usr/bin/runc").exists()) {
        eprintln!("runc not installed; not running the image");
        return;
    }
    tokio::task::block_in_place(|| {
        let out = lp.cmd(&["run", "--rm", &dst]);
        assert!(out.status.success(), "{}\n{}", stderr(&out), lp.log());
        let hello = b"hello from zstd\n";
        let expected = format!(
            "entry: 1 files\n{}  /srv/hello.txt\n",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(hello))
        );
        assert_eq!(stdout(&out), expected);
        let out = lp.cmd(&["run", "--rm", &dst, "cat", "/usr/lib/small.txt"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "small");
    });
}

fn layers_of(s: &Stored) -> Vec<Value> {
    layers(s)
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_platform_index_converts_every_platform() {
    let registry = TestRegistry::plain();
    let pusher = registry.pusher();
    let amd_tars = small_tars("amd64");
    let arm_tars = small_tars("arm64");
    let mk = |tars: &[Vec<u8>], arch: &str| {
        let layers = tars.iter().map(|t| Layer::new(gzip(t))).collect();
        let mut spec = ImageSpec::new(layers, "linux", arch);
        spec.config = runnable_config();
        if arch == "arm64" {
            spec.variant = Some("v8".into());
        }
        spec
    };
    let amd = pusher
        .push_image_with("conv/multi", "amd64", &mk(&amd_tars, "amd64"))
        .await;
    let arm = pusher
        .push_image_with("conv/multi", "arm64", &mk(&arm_tars, "arm64"))
        .await;
    pusher
        .push_index(
            "conv/multi",
            "v1",
            &[
                (
                    amd.manifest_digest,
                    amd.manifest_size(),
                    "linux",
                    "amd64",
                    None,
                ),
                (
                    arm.manifest_digest,
                    arm.manifest_size(),
                    "linux",
                    "arm64",
                    Some("v8"),
                ),
            ],
        )
        .await;
    let src = format!("{}/conv/multi:v1", registry.host());
    let dst = format!("{}/conv/multi:esgz", registry.host());
    let lp = lazypull(&[]);
    let (out, err) = tokio::task::block_in_place(|| convert(&lp, &[&src, &dst]));
    assert!(err.contains("(linux/arm64/v8)"), "{err}");

    // A new index with both platforms, each an eStargz image.
    let r: Reference = dst.parse().unwrap();
    let reg = client();
    let top = reg.fetch_manifest(&r).await.unwrap();
    assert_eq!(out.trim(), top.digest.to_string());
    let Manifest::Index(index) = &top.manifest else {
        panic!("not an index: {}", top.media_type)
    };
    let platforms: Vec<String> = index
        .manifests()
        .iter()
        .map(|d| {
            let p = d.platform().as_ref().unwrap();
            format!("{}/{}/{:?}", p.os(), p.architecture(), p.variant())
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64/None", "linux/arm64/Some(\"v8\")"]);
    for (d, tars) in index.manifests().iter().zip([&amd_tars, &arm_tars]) {
        assert_ne!(d.digest().to_string(), amd.manifest_digest.to_string());
        assert_ne!(d.digest().to_string(), arm.manifest_digest.to_string());
        let child = stored(&format!("{}/conv/multi@{}", registry.host(), d.digest())).await;
        tokio::task::block_in_place(|| check_estargz_image(&registry, &child, tars));
    }

    // Converting the converted image again gives the same blobs (for these data layers; the
    // writer's output is not byte-stable for every input): the registry mounts them from the
    // source repository instead of receiving them again.
    let again = format!("{}/conv/again:esgz", registry.host());
    let (_, err) = tokio::task::block_in_place(|| convert(&lp, &[&dst, &again]));
    assert!(err.matches(", mounted").count() >= 2, "{err}");

    // --platform converts one platform into a single-platform image.
    let one = format!("{}/conv/multi:arm", registry.host());
    tokio::task::block_in_place(|| convert(&lp, &[&src, &one, "--platform", "linux/arm64"]));
    let image = stored(&one).await;
    assert_eq!(
        image.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(image.config["architecture"], "arm64");
    tokio::task::block_in_place(|| check_estargz_image(&registry, &image, &arm_tars));
    let out = lp.cmd(&["convert", &src, &one, "--platform", "linux/s390x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no image for platform linux/s390x"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prefetch_list_puts_files_first() {
    let registry = TestRegistry::plain();
    let tars = small_tars("prefetch");
    push_gzip(&registry, "conv/pf", "v1", &tars).await;
    let src = format!("{}/conv/pf:v1", registry.host());
    let dst = format!("{}/conv/pf:esgz", registry.host());
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("list");
    std::fs::write(
        &list,
        "# what the entry point reads\n/usr/lib/small.txt\n./srv/hello.txt\nnot/in/any/layer\n",
    )
    .unwrap();
    let lp = lazypull(&[]);
    tokio::task::block_in_place(|| {
        convert(
            &lp,
            &[&src, &dst, "--prefetch-list", &list.display().to_string()],
        )
    });
    let image = stored(&dst).await;
    let listings = tokio::task::block_in_place(|| check_estargz_image(&registry, &image, &tars));
    // Listed files first (after their parent directories), in list order, then the landmark.
    assert_eq!(
        listings[0][..6],
        [
            "usr",
            "usr/lib",
            "usr/lib/small.txt",
            "srv",
            "srv/hello.txt",
            ".prefetch.landmark"
        ],
        "{:?}",
        listings[0]
    );
    // A layer holding none of them says there is nothing to prefetch.
    assert_eq!(listings[1][0], ".no.prefetch.landmark");

    // The mount sees the same files.
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&[]);
    tokio::task::block_in_place(|| lp.mount(&dst, mnt.path()));
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("srv/hello.txt")).unwrap(),
        "hello from prefetch\n"
    );
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_layouts_in_and_out() {
    let registry = TestRegistry::plain();
    let tars = small_tars("layout");
    push_gzip(&registry, "conv/layout", "v1", &tars).await;
    let src = format!("{}/conv/layout:v1", registry.host());
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:esgz", dir.path().join("img").display());
    let lp = lazypull(&[]);
    tokio::task::block_in_place(|| convert(&lp, &[&src, &layout]));
    // skopeo reads (and verifies) the layout we wrote.
    if Path::new("/usr/bin/skopeo").exists() {
        let copy = dir.path().join("copy");
        let out = std::process::Command::new("skopeo")
            .args(["copy", "--quiet", &layout])
            .arg(format!("dir:{}", copy.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "skopeo: {}", stderr(&out));
    }
    // Back from the layout into the registry: re-converting eStargz keeps one TOC per layer.
    let dst = format!("{}/conv/layout:esgz", registry.host());
    tokio::task::block_in_place(|| convert(&lp, &[&layout, &dst]));
    let image = stored(&dst).await;
    let listings = tokio::task::block_in_place(|| check_estargz_image(&registry, &image, &tars));
    for l in listings {
        assert_eq!(l.iter().filter(|n| *n == "stargz.index.json").count(), 1);
    }
    // A layout name that is not there.
    let missing = format!("oci:{}:nope", dir.path().join("img").display());
    let out = lp.cmd(&["convert", &missing, &dst]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no image named \"nope\""),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_and_refused_pushes_fail_clearly() {
    let registry = TestRegistry::plain();
    push_gzip(&registry, "conv/bad", "v1", &small_tars("bad")).await;
    let src = format!("{}/conv/bad:v1", registry.host());
    let lp = lazypull(&[]);

    // Source missing.
    let missing = format!("{}/conv/nothing:here", registry.host());
    let dst = format!("{}/conv/bad:out", registry.host());
    let out = lp.cmd(&["convert", &missing, &dst]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("not found") && err.contains("conv/nothing"),
        "{err}"
    );

    // Destination pinned to a digest; an invalid name.
    let pinned = format!("{}/conv/bad@sha256:{}", registry.host(), "0".repeat(64));
    let out = lp.cmd(&["convert", &src, &pinned]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("must be a tag"), "{}", stderr(&out));
    let out = lp.cmd(&["convert", &src, "Not A Name"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid image location"),
        "{}",
        stderr(&out)
    );

    // A registry that needs credentials: refused without, accepted with them.
    let private = TestRegistry::start(RegistryAuth::htpasswd("pusher", "s3cret"));
    let dst = format!("{}/conv/private:v1", private.host());
    let out = tokio::task::block_in_place(|| lp.cmd(&["convert", &src, &dst]));
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("unauthorized to push to conv/private"),
        "{err}"
    );
    assert!(err.contains("login"), "{err}");

    let auth = tempfile::tempdir().unwrap();
    let auth_file = auth.path().join("auth.json");
    let basic = lazypull_fetcher::Credentials::new("pusher", "s3cret").basic_header_value();
    let token = basic.trim_start_matches("Basic ");
    std::fs::write(
        &auth_file,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{token}"}}}}}}"#,
            private.host()
        ),
    )
    .unwrap();
    let out = tokio::task::block_in_place(|| {
        lp.command()
            .args(["convert", &src, &dst])
            .env("REGISTRY_AUTH_FILE", &auth_file)
            .output()
            .unwrap()
    });
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).trim().starts_with("sha256:"));

    // Out-of-range options are refused before any work.
    let out = lp.cmd(&["convert", &src, &dst, "--level", "12"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("out of range"), "{}", stderr(&out));
}

/// `zstd -dc BLOB | tar -t`, and the sha256 and length of the decompressed stream.
fn zstd_listing(path: &Path) -> (Vec<String>, Digest, u64) {
    let raw = std::process::Command::new("zstd")
        .arg("-dc")
        .arg(path)
        .output()
        .unwrap();
    assert!(raw.status.success(), "zstd -dc: {}", stderr(&raw));
    let names = tar_names(&raw.stdout);
    (
        names,
        Digest::sha256_of(&raw.stdout),
        raw.stdout.len() as u64,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_output_is_plain_tar_zstd_and_mounts() {
    if !Path::new("/usr/bin/zstd").exists() {
        eprintln!("zstd not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    let tars = small_tars("zstd-chunked");
    push_gzip(&registry, "conv/zc", "v1", &tars).await;
    let src = format!("{}/conv/zc:v1", registry.host());
    let dst = format!("{}/conv/zc:zstd", registry.host());
    let lp = lazypull(&[]);
    tokio::task::block_in_place(|| {
        convert(
            &lp,
            &[&src, &dst, "--format", "zstd-chunked", "--level", "3"],
        )
    });
    let image = stored(&dst).await;
    assert_eq!(
        image.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    let diff_ids = image.config["rootfs"]["diff_ids"]
        .as_array()
        .unwrap()
        .clone();
    for ((desc, tar), diff_id) in layers(&image).iter().zip(&tars).zip(&diff_ids) {
        assert_eq!(
            desc["mediaType"],
            "application/vnd.oci.image.layer.v1.tar+zstd"
        );
        let ann = &desc["annotations"];
        for key in [
            "io.github.containers.zstd-chunked.manifest-checksum",
            "io.github.containers.zstd-chunked.manifest-position",
            "io.containers.zstd-chunked.manifest-checksum",
        ] {
            assert!(ann[key].is_string(), "{key} missing: {desc}");
        }
        assert!(ann.get(TOC_ANNOTATION).is_none(), "{desc}");
        let (names, digest, _) = zstd_listing(&registry.blob_data_path(&digest_of(desc)));
        // The tar stream passes through unchanged: same entries, same diff id.
        assert_eq!(names, tar_names(tar));
        assert_eq!(diff_id.as_str().unwrap(), digest.to_string());
        assert_eq!(digest, Digest::sha256_of(tar));
    }
    let mnt = tempfile::tempdir().unwrap();
    let mut lp = lazypull(&[]);
    tokio::task::block_in_place(|| lp.mount(&dst, mnt.path()));
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("srv/hello.txt")).unwrap(),
        "hello from zstd-chunked\n"
    );
    assert_eq!(
        std::fs::read(mnt.path().join("usr/lib/big.bin")).unwrap(),
        lazypull_tests::random_bytes(3 << 20, 5)
    );
    tokio::task::block_in_place(|| lp.umount(mnt.path()));
}

/// CPU seconds used by the calling thread so far (robust to other load on the machine).
fn thread_cpu() -> f64 {
    // First field of schedstat: nanoseconds this thread ran on a CPU.
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
    s.split_whitespace().next().unwrap().parse::<f64>().unwrap() / 1e9
}

/// Converter throughput on the realistic image, in MB of tar per CPU second, per step
/// (`cargo test --release -p lazypull --test convert throughput -- --ignored --nocapture`).
#[test]
#[ignore]
fn throughput() {
    use lazypull_fs::estargz::{write_estargz, WriterOptions};
    use std::io::Write;
    let tars = realistic_layers(3);
    let total: u64 = tars.iter().map(|t| t.len() as u64).sum();
    let mb = total as f64 / 1e6;
    let gz: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
    let time = |what: &str, f: &mut dyn FnMut()| {
        let (c, w) = (thread_cpu(), Instant::now());
        f();
        let (cpu, wall) = (thread_cpu() - c, w.elapsed().as_secs_f64());
        eprintln!(
            "{what:<40} {:7.1} MB/s per CPU s ({cpu:.1} CPU s, {wall:.1} s wall)",
            mb / cpu
        );
    };
    time("gunzip (MultiGzDecoder)", &mut || {
        for g in &gz {
            let mut d = flate2::read::MultiGzDecoder::new(&g[..]);
            std::io::copy(&mut d, &mut std::io::sink()).unwrap();
        }
    });
    for level in [1u32, 6] {
        time(&format!("plain gzip level {level}"), &mut || {
            for t in &tars {
                let mut e =
                    flate2::write::GzEncoder::new(std::io::sink(), flate2::Compression::new(level));
                e.write_all(t).unwrap();
                e.finish().unwrap();
            }
        });
        time(
            &format!("write_estargz level {level} (tar in)"),
            &mut || {
                for t in &tars {
                    let opts = WriterOptions {
                        level: flate2::Compression::new(level),
                        ..WriterOptions::default()
                    };
                    write_estargz(&t[..], std::io::sink(), &opts).unwrap();
                }
            },
        );
    }
    time("gunzip + write_estargz level 6", &mut || {
        for g in &gz {
            let d = flate2::read::MultiGzDecoder::new(&g[..]);
            write_estargz(d, std::io::sink(), &WriterOptions::default()).unwrap();
        }
    });
    for level in [3, 10] {
        time(
            &format!("zstd_chunked level {level} (workers: see wall)"),
            &mut || {
                for t in &tars {
                    let opts = lazypull_fs::zstd_chunked::WriterOptions {
                        level,
                        ..Default::default()
                    };
                    lazypull_fs::zstd_chunked::write_zstd_chunked(&t[..], std::io::sink(), &opts)
                        .unwrap();
                }
            },
        );
    }
}

/// podman 4.3 (Debian) pulls and runs what `lazypull convert` writes, in both formats, and
/// pulls it *partially* (containers/storage's chunked differ: ranged GETs of the chunks it does
/// not have locally, "Retrieved partial blob" in its log) rather than downloading whole blobs.
/// A second pull of the same files in the other format fetches little: chunks already in the
/// local store are reused.
#[tokio::test(flavor = "multi_thread")]
async fn podman_pulls_converted_images_partially_and_runs_them() {
    if !Path::new("/usr/bin/podman").exists() {
        eprintln!("podman not installed; skipping");
        return;
    }
    let registry = TestRegistry::plain();
    let proxy = lazypull_tests::CountingProxy::start(&registry.host());
    let tars = small_tars("podman");
    push_gzip(&registry, "conv/pod", "v1", &tars).await;
    let src = format!("{}/conv/pod:v1", registry.host());
    let lp = lazypull(&[]);
    let hello = b"hello from podman\n";
    let expected = format!(
        "entry: 1 files\n{}  /srv/hello.txt\n",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(hello))
    );
    let hosts = [registry.host(), proxy.host()];
    // Pulls `tag` through the proxy; returns (blob GETs, ranged ones, body bytes, partial?).
    let pull = |podman: &Podman, tag: &str| {
        let image = format!("{}/conv/pod:{tag}", proxy.host());
        proxy.reset();
        let out = podman.cmd(&["--log-level", "debug", "pull", &image]);
        let log = stderr(&out);
        assert!(out.status.success(), "podman pull {tag}: {log}");
        let gets: Vec<_> = proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
            .collect();
        let ranged = gets.iter().filter(|r| r.range.is_some()).count();
        let partial = log.contains("Retrieved partial blob");
        (gets.len(), ranged, proxy.total_body_bytes(), partial)
    };
    let mut blob_bytes = 0u64;
    let mut stores = Vec::new();
    for (format, tag) in [("estargz", "esgz"), ("zstd-chunked", "zstd")] {
        let dst = format!("{}/conv/pod:{tag}", registry.host());
        tokio::task::block_in_place(|| convert(&lp, &[&src, &dst, "--format", format]));
        let image = stored(&dst).await;
        blob_bytes = layers(&image)
            .iter()
            .map(|l| l["size"].as_u64().unwrap())
            .sum();
        let podman = Podman::new(&hosts, PARTIAL_PULLS);
        let (gets, ranged, bytes, partial) = tokio::task::block_in_place(|| pull(&podman, tag));
        eprintln!(
            "podman 4.3 pull of {format} ({blob_bytes} bytes of layers): {gets} blob GETs, \
             {ranged} with Range, {bytes} bytes, partial: {partial}"
        );
        assert!(
            partial && ranged > 0,
            "podman did not pull {format} partially"
        );
        let image_ref = format!("{}/conv/pod:{tag}", proxy.host());
        let out = tokio::task::block_in_place(|| {
            podman.cmd(&["run", "--rm", "--network", "none", &image_ref])
        });
        assert!(
            out.status.success(),
            "podman run {format}: {}",
            stderr(&out)
        );
        assert_eq!(stdout(&out), expected, "podman run {format}");
        stores.push(podman);
    }
    // The zstd:chunked store pulls the eStargz image: the files are there already.
    let (gets, ranged, bytes, partial) = tokio::task::block_in_place(|| pull(&stores[1], "esgz"));
    eprintln!(
        "then eStargz into the store holding the zstd:chunked image: {gets} blob GETs, {ranged} \
         with Range, {bytes} bytes, partial: {partial}"
    );
    assert!(partial);
    assert!(bytes * 2 < blob_bytes, "{bytes} bytes fetched again");
}

/// Ctrl-C stops a conversion: a non-zero exit, a message, no tag at the destination and no
/// temporary files left under the root.
#[tokio::test(flavor = "multi_thread")]
async fn interrupt_stops_and_cleans_up() {
    let registry = TestRegistry::plain();
    // Text compresses slowly at level 9: several seconds of work.
    let text: Vec<u8> = (0..6_000_000u32)
        .flat_map(|i| format!("{i} {}\n", i.wrapping_mul(2_654_435_761)).into_bytes())
        .collect();
    let tar = build_tar(vec![E::File("big.txt", 0o644, text)]);
    push_gzip(&registry, "conv/int", "v1", &[tar]).await;
    let src = format!("{}/conv/int:v1", registry.host());
    let dst = format!("{}/conv/int:esgz", registry.host());
    let lp = lazypull(&[]);
    let child = lp
        .command()
        .args(["convert", &src, &dst, "--level", "9"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = lp.root.path().join("tmp");
    let started = Instant::now();
    // Wait until the conversion has its temporary directory, then interrupt it.
    while std::fs::read_dir(&tmp).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "no temp dir");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(700));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("interrupted"), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let r: Reference = dst.parse().unwrap();
    assert!(client().fetch_manifest(&r).await.is_err());
}
