//! Layers that cannot be read lazily (plain gzip, zstd, uncompressed tar) against a real
//! `docker-registry`: `open_layer` fetches them whole (verified), converts them once into a
//! local eStargz copy and serves them through the ordinary chunk path. eStargz layers still
//! open lazily; registry failures and unknown media types are errors, never fallbacks.
//!
//! Requests are counted by a `CountingProxy` in front of the registry; corruption is real (the
//! registry's stored blob is overwritten on disk).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::retry::RetryPolicy;
use lazypull_fetcher::{
    CacheConfig, ChunkCache, Digest, EngineConfig, Error, FetchEngine, Priority, Reference,
    Registry, RegistryConfig,
};
use lazypull_fs::chunks::SourceConfig;
use lazypull_fs::estargz::{self, ReaderConfig, WriterOptions};
use lazypull_fs::local::{self, Phase, Progress};
use lazypull_fs::open::{
    open_layer, open_layer_with_progress, probe_layer, LayerDescriptor, LazyFormat, OpenError,
    OpenedLayer, Probe, Served, TOC_DIGEST_ANNOTATION,
};
use lazypull_fs::toc::Kind;
use lazypull_tests::{
    random_bytes, CountingProxy, ImageSpec, Layer, TestRegistry, MEDIA_TYPE_DOCKER_LAYER_GZIP,
    MEDIA_TYPE_OCI_LAYER, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD,
};
use parking_lot::Mutex;
use tempfile::TempDir;

const BIG: usize = (5 << 20) + 17;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// What the test tar holds, to compare the served layer against.
struct Expected {
    /// Regular files: path -> (content, mode).
    files: BTreeMap<String, (Vec<u8>, u32)>,
    /// Symlinks: path -> target.
    symlinks: BTreeMap<String, String>,
    /// Hard links: (link, target).
    hardlinks: Vec<(String, String)>,
    /// Directories that must exist (including ones the tar never names).
    dirs: Vec<String>,
    /// Paths of whiteouts (presented as 0/0 character devices named without `.wh.`).
    whiteouts: Vec<String>,
    /// Opaque directories.
    opaque: Vec<String>,
    /// `user.*` xattrs: path -> (name, value).
    xattrs: Vec<(String, String, Vec<u8>)>,
}

fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// A layer tar with dirs, files of many sizes (one > 4 MiB, one of exactly 4 MiB), a file
/// whose parents are never named, symlinks, a hard link, a whiteout, an opaque dir and xattrs.
fn test_tar() -> (Vec<u8>, Expected) {
    let mut b = tar::Builder::new(Vec::new());
    let mut exp = Expected {
        files: BTreeMap::new(),
        symlinks: BTreeMap::new(),
        hardlinks: Vec::new(),
        dirs: Vec::new(),
        whiteouts: Vec::new(),
        opaque: Vec::new(),
        xattrs: Vec::new(),
    };
    for d in ["etc", "usr", "usr/bin", "var", "many"] {
        let mut h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, format!("{d}/"), &[][..]).unwrap();
        exp.dirs.push(d.to_string());
    }
    let mut file = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: Vec<u8>, mode: u32| {
        let mut h = header(tar::EntryType::Regular, data.len() as u64, mode);
        b.append_data(&mut h, path, &data[..]).unwrap();
        exp.files.insert(path.to_string(), (data, mode));
    };
    file(&mut b, "etc/hostname", b"lazypull-host\n".to_vec(), 0o644);
    file(&mut b, "etc/empty", Vec::new(), 0o600);
    file(&mut b, "usr/bin/tool", random_bytes(BIG, 1), 0o755);
    file(&mut b, "usr/bin/exact4m", random_bytes(4 << 20, 2), 0o755);
    let text: Vec<u8> = (0..200_000u32)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect();
    file(&mut b, "usr/share/doc/lazypull/README", text, 0o644);
    file(
        &mut b,
        "usr/lib/libx.so",
        random_bytes((64 << 10) + 3, 3),
        0o755,
    );
    for i in 0..40usize {
        file(
            &mut b,
            &format!("many/f{i:02}"),
            random_bytes(i * 37 + 1, 100 + i as u64),
            0o640,
        );
    }
    exp.dirs
        .extend(["usr/share", "usr/share/doc", "usr/lib"].map(String::from));

    // A file with an xattr (PAX record).
    b.append_pax_extensions([("SCHILY.xattr.user.lazypull", &b"yes"[..])])
        .unwrap();
    let data = b"with xattr".to_vec();
    let mut h = header(tar::EntryType::Regular, data.len() as u64, 0o644);
    b.append_data(&mut h, "etc/xattr-file", &data[..]).unwrap();
    exp.files.insert("etc/xattr-file".into(), (data, 0o644));
    exp.xattrs.push((
        "etc/xattr-file".into(),
        "user.lazypull".into(),
        b"yes".to_vec(),
    ));

    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "usr/bin/alias", "tool").unwrap();
    exp.symlinks.insert("usr/bin/alias".into(), "tool".into());
    let mut h = header(tar::EntryType::Symlink, 0, 0o777);
    b.append_link(&mut h, "etc/abs", "/usr/bin/tool").unwrap();
    exp.symlinks
        .insert("etc/abs".into(), "/usr/bin/tool".into());
    let mut h = header(tar::EntryType::Link, 0, 0o755);
    b.append_link(&mut h, "usr/bin/tool-hard", "usr/bin/tool")
        .unwrap();
    exp.hardlinks
        .push(("usr/bin/tool-hard".into(), "usr/bin/tool".into()));
    let mut h = header(tar::EntryType::Regular, 0, 0o644);
    b.append_data(&mut h, "etc/.wh.x", &[][..]).unwrap();
    exp.whiteouts.push("etc/x".into());
    let mut h = header(tar::EntryType::Regular, 0, 0o644);
    b.append_data(&mut h, "var/.wh..wh..opq", &[][..]).unwrap();
    exp.opaque.push("var".into());
    (b.into_inner().unwrap(), exp)
}

fn gzip_level(data: &[u8], level: u32) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A client isolated from the host's configuration, with short retry bounds so fault tests
/// finish quickly.
fn engine(hosts_dir: &Path) -> FetchEngine {
    let registry = Registry::new(RegistryConfig {
        hosts: HostsConfig::new(vec![hosts_dir.to_path_buf()]),
        credentials: CredentialStore::empty(),
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            max_total: Duration::from_secs(2),
        },
        ..RegistryConfig::default()
    });
    FetchEngine::new(registry, EngineConfig::default())
}

/// Per-test directories: hosts config, chunk cache, local layer store.
struct Dirs {
    _tmp: TempDir,
    hosts: PathBuf,
    local: PathBuf,
    cache_dir: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::tempdir().unwrap();
        let hosts = tmp.path().join("hosts");
        std::fs::create_dir_all(&hosts).unwrap();
        Dirs {
            hosts,
            local: tmp.path().join("layers"),
            cache_dir: tmp.path().join("cache"),
            _tmp: tmp,
        }
    }

    fn cache(&self) -> ChunkCache {
        ChunkCache::open(&self.cache_dir, CacheConfig::default()).unwrap()
    }

    /// A fresh chunk cache in a new directory (as after losing the cache).
    fn fresh_cache(&self, name: &str) -> ChunkCache {
        ChunkCache::open(self.cache_dir.with_file_name(name), CacheConfig::default()).unwrap()
    }

    /// Names of the files in the local layer store (empty when it does not exist).
    fn local_files(&self) -> Vec<String> {
        let mut names: Vec<String> = match std::fs::read_dir(&self.local) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

/// The layer descriptors of `reference`'s manifest, as the registry serves it.
async fn descriptors(engine: &FetchEngine, reference: &Reference) -> Vec<LayerDescriptor> {
    let fetched = engine.registry().fetch_manifest(reference).await.unwrap();
    let m: serde_json::Value = serde_json::from_slice(&fetched.bytes).unwrap();
    m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| LayerDescriptor {
            digest: l["digest"].as_str().unwrap().parse().unwrap(),
            size: l["size"].as_u64().unwrap(),
            media_type: l["mediaType"].as_str().unwrap().to_string(),
            annotations: l["annotations"]
                .as_object()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

async fn open(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    local_dir: &Path,
) -> Result<OpenedLayer, OpenError> {
    open_layer(
        engine,
        cache,
        reference,
        desc,
        &ReaderConfig::default(),
        SourceConfig::default(),
        local_dir,
    )
    .await
}

fn blob_gets(proxy: &CountingProxy, digest: &Digest) -> usize {
    let needle = format!("/blobs/{digest}");
    proxy.count(|r| r.method == "GET" && r.path.contains(&needle))
}

fn local_reason(opened: &OpenedLayer) -> &str {
    match &opened.served {
        Served::Local { reason, .. } => reason,
        Served::Lazy => panic!("expected a local layer, got {:?}", opened.served),
    }
}

/// Checks the served layer against the tar it was made from: every file's bytes (whole and
/// across chunk boundaries) and digest, attributes, links, whiteouts, opaque dirs, xattrs.
async fn assert_layer_matches(opened: &OpenedLayer, exp: &Expected) {
    let source = &opened.source;
    let layer = source.layer();
    for (path, (content, mode)) in &exp.files {
        let id = layer
            .resolve(path)
            .unwrap_or_else(|| panic!("{path} missing"));
        let node = layer.node(id).unwrap();
        assert_eq!(node.kind, Kind::File, "{path}");
        assert_eq!(node.size, content.len() as u64, "{path} size");
        assert_eq!(node.mode & 0o7777, *mode, "{path} mode");
        let whole = source
            .read(id, 0, content.len() as u64 + 100, Priority::OnDemand)
            .await
            .unwrap();
        assert!(whole[..] == content[..], "{path}: content differs");
        if let Some(d) = layer.file_digest(id) {
            assert_eq!(*d, Digest::sha256_of(content), "{path} digest");
        } else {
            assert!(content.is_empty(), "{path} has no digest");
        }
        if content.len() > 4 << 20 {
            for (off, len) in [
                ((4 << 20) - 10, 20u64),
                (1, 5),
                (content.len() as u64 - 3, 10),
            ] {
                let got = source.read(id, off, len, Priority::OnDemand).await.unwrap();
                let end = (off + len).min(content.len() as u64) as usize;
                assert_eq!(&got[..], &content[off as usize..end], "{path} {off}+{len}");
            }
        }
    }
    for (path, target) in &exp.symlinks {
        let id = layer.resolve(path).unwrap();
        assert_eq!(layer.node(id).unwrap().kind, Kind::Symlink, "{path}");
        assert_eq!(layer.link_target(id).unwrap(), target.as_bytes(), "{path}");
    }
    for (link, target) in &exp.hardlinks {
        let (a, b) = (layer.resolve(link).unwrap(), layer.resolve(target).unwrap());
        assert_eq!(a, b, "hard link {link} is not the same node as {target}");
        assert_eq!(layer.node(a).unwrap().nlink, 2, "{link} nlink");
    }
    for d in &exp.dirs {
        let id = layer
            .resolve(d)
            .unwrap_or_else(|| panic!("dir {d} missing"));
        assert_eq!(layer.node(id).unwrap().kind, Kind::Dir, "{d}");
    }
    for w in &exp.whiteouts {
        let id = layer
            .resolve(w)
            .unwrap_or_else(|| panic!("whiteout {w} missing"));
        let n = layer.node(id).unwrap();
        assert_eq!(
            (n.kind, n.dev_major, n.dev_minor),
            (Kind::CharDevice, 0, 0),
            "{w}"
        );
    }
    assert!(layer.resolve("etc/.wh.x").is_none());
    for o in &exp.opaque {
        assert!(
            layer.node(layer.resolve(o).unwrap()).unwrap().opaque,
            "{o} opaque"
        );
    }
    for (path, name, value) in &exp.xattrs {
        let id = layer.resolve(path).unwrap();
        let found: HashMap<Vec<u8>, Vec<u8>> = layer
            .xattrs(id)
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(
            found.get(name.as_bytes()),
            Some(value),
            "{path} xattr {name}"
        );
    }
}

/// An image of the test tree as plain gzip, zstd, uncompressed tar and (Docker media type)
/// gzip at another level, under `repo:latest`.
struct Pushed {
    exp: Expected,
    tar: Vec<u8>,
    gzip: Vec<u8>,
    zstd: Vec<u8>,
}

async fn push_plain_layers(registry: &TestRegistry, repo: &str) -> Pushed {
    let (tar, exp) = test_tar();
    let gzip = gzip_level(&tar, 6);
    let docker_gzip = gzip_level(&tar, 9);
    assert_ne!(
        gzip, docker_gzip,
        "the two gzip layers must be different blobs"
    );
    let zstd = zstd::encode_all(&tar[..], 3).unwrap();
    let diff_id = Digest::sha256_of(&tar);
    let spec = ImageSpec::new(
        vec![
            Layer::new(gzip.clone()).with_media_type(MEDIA_TYPE_OCI_LAYER_GZIP),
            Layer::new(zstd.clone())
                .with_media_type(MEDIA_TYPE_OCI_LAYER_ZSTD)
                .with_diff_id(diff_id),
            Layer::new(tar.clone()).with_media_type(MEDIA_TYPE_OCI_LAYER),
            Layer::new(docker_gzip).with_media_type(MEDIA_TYPE_DOCKER_LAYER_GZIP),
        ],
        "linux",
        "amd64",
    );
    registry
        .pusher()
        .push_image_with(repo, "latest", &spec)
        .await;
    Pushed {
        exp,
        tar,
        gzip,
        zstd,
    }
}

fn reference(host: &str, repo: &str) -> Reference {
    format!("{host}/{repo}:latest").parse().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Plain gzip, zstd, uncompressed tar and Docker gzip layers are each fetched once, converted,
/// and served with every byte, digest and attribute intact; the store keeps only the
/// `.estargz` copies.
#[tokio::test(flavor = "multi_thread")]
async fn plain_layers_are_served_from_verified_local_copies() {
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let pushed = push_plain_layers(&registry, "plain/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "plain/app");
    let descs = descriptors(&engine, &r).await;
    assert_eq!(descs.len(), 4);
    let expect_reason = ["plain gzip", "plain zstd", "uncompressed tar", "plain gzip"];
    for (desc, want) in descs.iter().zip(expect_reason) {
        let started = Instant::now();
        let opened = open(&engine, &cache, &r, desc, &dirs.local).await.unwrap();
        let took = started.elapsed();
        eprintln!(
            "{} ({} bytes, {}): opened in {took:?} = {:.1} MB/s of tar",
            desc.digest,
            desc.size,
            desc.media_type,
            pushed.tar.len() as f64 / took.as_secs_f64() / 1e6
        );
        let reason = local_reason(&opened);
        assert!(
            reason.contains(want),
            "reason {reason:?} should say {want:?}"
        );
        assert!(
            reason.contains(&desc.media_type),
            "reason {reason:?} names the media type"
        );
        match &opened.served {
            Served::Local { path, .. } => {
                assert_eq!(*path, local::local_copy_path(&dirs.local, &desc.digest));
                assert_eq!(opened.source.digest(), desc.digest);
            }
            Served::Lazy => unreachable!(),
        }
        assert_eq!(
            blob_gets(&proxy, &desc.digest),
            if want == "plain gzip" || want == "plain zstd" {
                2
            } else {
                1
            },
            "one whole download (plus the eStargz / zstd:chunked footer probe for gzip and zstd) of {}",
            desc.media_type
        );
        assert_layer_matches(&opened, &pushed.exp).await;
    }
    let mut want: Vec<String> = descs
        .iter()
        .map(|d| format!("{}.estargz", d.digest.hex()))
        .collect();
    want.sort();
    assert_eq!(dirs.local_files(), want, "only the converted copies stay");
}

/// A daemon restart: a fresh engine and an empty chunk cache open the local copies with no
/// registry request at all, even with the registry gone.
#[tokio::test(flavor = "multi_thread")]
async fn reopening_local_layers_needs_no_registry() {
    let mut registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let pushed = push_plain_layers(&registry, "restart/app").await;
    let dirs = Dirs::new();
    let r = reference(&proxy.host(), "restart/app");
    let descs = {
        let engine = engine(&dirs.hosts);
        let cache = dirs.cache();
        let descs = descriptors(&engine, &r).await;
        for d in &descs {
            open(&engine, &cache, &r, d, &dirs.local).await.unwrap();
        }
        descs
    };
    proxy.reset();
    let engine = engine(&dirs.hosts);
    let cache = dirs.fresh_cache("cache-after-restart");
    for d in &descs {
        let opened = open(&engine, &cache, &r, d, &dirs.local).await.unwrap();
        assert!(
            local_reason(&opened).contains("made earlier"),
            "{:?}",
            opened.served
        );
        assert_layer_matches(&opened, &pushed.exp).await;
    }
    assert_eq!(
        proxy.requests().len(),
        0,
        "reopening must not touch the registry: {:?}",
        proxy
            .requests()
            .iter()
            .map(|q| q.path.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(engine.registry().stats().requests, 0);

    registry.kill();
    drop(proxy);
    let cache = dirs.fresh_cache("cache-registry-gone");
    for d in &descs {
        let opened = open(&engine, &cache, &r, d, &dirs.local).await.unwrap();
        let id = opened.source.layer().resolve("usr/bin/tool").unwrap();
        let got = opened
            .source
            .read(id, 0, 1 << 30, Priority::OnDemand)
            .await
            .unwrap();
        assert!(got[..] == pushed.exp.files["usr/bin/tool"].0[..]);
    }
}

/// Eight concurrent opens of one layer download it once and all serve it.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_opens_download_once() {
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let pushed = push_plain_layers(&registry, "concurrent/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "concurrent/app");
    let descs = descriptors(&engine, &r).await;
    for desc in &descs[..2] {
        let opens = (0..8).map(|_| open(&engine, &cache, &r, desc, &dirs.local));
        let results = futures::future::join_all(opens).await;
        for opened in results {
            let opened = opened.unwrap();
            assert!(matches!(opened.served, Served::Local { .. }));
            let id = opened.source.layer().resolve("usr/bin/tool").unwrap();
            let got = opened
                .source
                .read(id, 0, 1 << 30, Priority::OnDemand)
                .await
                .unwrap();
            assert!(got[..] == pushed.exp.files["usr/bin/tool"].0[..]);
        }
        let whole = proxy.count(|q| {
            q.method == "GET" && q.path.contains(&desc.digest.to_string()) && q.range.is_none()
        });
        assert_eq!(
            whole, 1,
            "{}: one whole-blob download for 8 openers",
            desc.media_type
        );
    }
}

/// eStargz layers open lazily when the manifest binds their TOC (the TOC digest annotation)
/// and leave nothing but the saved TOC in the local store. Without the annotation nothing ties
/// the TOC to the manifest, so it is never used, not even from a TOC saved by an older
/// version: the layer is fetched whole and verified against the layer digest instead.
#[tokio::test(flavor = "multi_thread")]
async fn estargz_layers_open_lazily_only_when_the_manifest_binds_their_toc() {
    let registry = TestRegistry::plain();
    let (tar, exp) = test_tar();
    let mut blob = Vec::new();
    let written = estargz::write_estargz(&tar[..], &mut blob, &WriterOptions::default()).unwrap();
    // The same layer again without annotation (a different blob: other chunk size).
    let mut blob2 = Vec::new();
    let opts2 = WriterOptions {
        chunk_size: 1 << 20,
        ..WriterOptions::default()
    };
    estargz::write_estargz(&tar[..], &mut blob2, &opts2).unwrap();
    let unbound = Digest::sha256_of(&blob2);
    let spec = ImageSpec::new(
        vec![
            Layer::new(blob)
                .with_media_type(MEDIA_TYPE_OCI_LAYER_GZIP)
                .with_annotation(TOC_DIGEST_ANNOTATION, &written.toc_digest.to_string()),
            Layer::new(blob2.clone()).with_media_type(MEDIA_TYPE_OCI_LAYER_GZIP),
        ],
        "linux",
        "amd64",
    );
    registry
        .pusher()
        .push_image_with("esgz/app", "latest", &spec)
        .await;
    let proxy = CountingProxy::start(&registry.host());
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "esgz/app");
    let descs = descriptors(&engine, &r).await;
    // A TOC an older version saved for the unannotated layer (tagged format: magic, eStargz,
    // version 1, start offset 0, then the blob's bytes): it must not be reused.
    std::fs::create_dir_all(&dirs.local).unwrap();
    let mut saved = b"LPTOC\0\x01\x01".to_vec();
    saved.extend_from_slice(&0u64.to_le_bytes());
    saved.extend_from_slice(&blob2);
    std::fs::write(dirs.local.join(format!("{}.toc", unbound.hex())), saved).unwrap();
    // The probe the daemon asks before it tells containerd a layer is remote decides as the
    // open below does.
    for desc in &descs {
        let probe = probe_layer(&engine, &r, desc, &dirs.local).await.unwrap();
        if desc.digest == unbound {
            assert!(
                matches!(&probe, Probe::Whole(reason) if reason.contains("not bound to the manifest")),
                "{probe:?}"
            );
        } else {
            assert_eq!(probe, Probe::Lazy(LazyFormat::Estargz));
        }
    }
    for desc in &descs {
        let opened = open(&engine, &cache, &r, desc, &dirs.local).await.unwrap();
        let whole = proxy.count(|q| {
            q.method == "GET" && q.path.contains(&desc.digest.to_string()) && q.range.is_none()
        });
        if desc.digest == unbound {
            match &opened.served {
                Served::Local { reason, .. } => assert!(
                    reason.contains("not bound to the manifest")
                        && reason.contains(TOC_DIGEST_ANNOTATION),
                    "{reason}"
                ),
                Served::Lazy => panic!("an unbound TOC was trusted"),
            }
            assert_eq!(whole, 1, "fetched whole, once");
        } else {
            assert_eq!(opened.served, Served::Lazy, "{:?}", desc.annotations);
            assert_eq!(whole, 0, "a lazy layer is never downloaded whole");
        }
        assert_eq!(opened.source.digest(), desc.digest);
        assert_layer_matches(&opened, &exp).await;
    }
    let first = open(&engine, &cache, &r, &descs[0], &dirs.local)
        .await
        .unwrap();
    assert_eq!(first.toc_digest, written.toc_digest);
    // The bound layer's saved TOC and the unbound layer's local copy; the stale saved TOC of
    // the unbound layer is gone.
    let files = dirs.local_files();
    assert!(
        !files
            .iter()
            .any(|f| f.ends_with(&format!("{}.toc", unbound.hex()))),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.ends_with(&format!("{}.toc", descs[0].digest.hex()))),
        "{files:?}"
    );
}

/// An eStargz layer whose TOC is unusable (annotation does not match) is not a failed pull: it
/// falls back to the verified whole fetch and says why.
#[tokio::test(flavor = "multi_thread")]
async fn unusable_estargz_toc_falls_back_to_whole_fetch() {
    let registry = TestRegistry::plain();
    let (tar, exp) = test_tar();
    let mut blob = Vec::new();
    estargz::write_estargz(&tar[..], &mut blob, &WriterOptions::default()).unwrap();
    let wrong = Digest::sha256_of(b"not this toc");
    let spec = ImageSpec::new(
        vec![Layer::new(blob)
            .with_media_type(MEDIA_TYPE_OCI_LAYER_GZIP)
            .with_annotation(TOC_DIGEST_ANNOTATION, &wrong.to_string())],
        "linux",
        "amd64",
    );
    registry
        .pusher()
        .push_image_with("badtoc/app", "latest", &spec)
        .await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&registry.host(), "badtoc/app");
    let desc = &descriptors(&engine, &r).await[0];
    let opened = open(&engine, &cache, &r, desc, &dirs.local).await.unwrap();
    let reason = local_reason(&opened);
    assert!(
        reason.contains("TOC unusable") && reason.contains("mismatch"),
        "{reason}"
    );
    assert_layer_matches(&opened, &exp).await;
}

/// A blob altered in registry storage fails the whole fetch with a digest mismatch (no
/// fallback can help) and leaves no file in the local store.
#[tokio::test(flavor = "multi_thread")]
async fn corrupted_blob_fails_with_digest_mismatch_and_leaves_nothing() {
    let registry = TestRegistry::plain();
    let pushed = push_plain_layers(&registry, "corrupt/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&registry.host(), "corrupt/app");
    let descs = descriptors(&engine, &r).await;
    for (desc, original) in descs.iter().zip([&pushed.gzip, &pushed.zstd, &pushed.tar]) {
        let path = registry.blob_data_path(&desc.digest);
        let mut bad = original.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        let err = open(&engine, &cache, &r, desc, &dirs.local)
            .await
            .expect_err("a corrupt blob must not be served");
        match &err {
            OpenError::Fetch {
                layer,
                source: Error::DigestMismatch { expected, .. },
            } => {
                assert_eq!(*layer, desc.digest);
                assert_eq!(**expected, desc.digest);
            }
            other => panic!(
                "{}: expected a digest mismatch, got {other:?}",
                desc.media_type
            ),
        }
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(
            dirs.local_files().is_empty(),
            "left behind: {:?}",
            dirs.local_files()
        );
    }
}

/// Unknown and encrypted media types are refused with a clear message, before any request.
#[tokio::test(flavor = "multi_thread")]
async fn unknown_media_types_are_unsupported() {
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "unknown/app");
    for (mt, says) in [
        (
            "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
            "expected an OCI or Docker tar",
        ),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "encrypted",
        ),
        ("", "no media type"),
    ] {
        let desc = LayerDescriptor {
            digest: Digest::sha256_of(mt.as_bytes()),
            size: 1234,
            media_type: mt.to_string(),
            annotations: HashMap::new(),
        };
        let err = open(&engine, &cache, &r, &desc, &dirs.local)
            .await
            .unwrap_err();
        assert!(matches!(err, OpenError::Unsupported { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(says) && msg.contains(mt) && msg.contains(&desc.digest.to_string()),
            "{msg}"
        );
    }
    assert_eq!(proxy.requests().len(), 0);
    assert!(dirs.local_files().is_empty());
}

/// Registry errors are returned, not turned into a fallback: a missing blob, and a registry
/// that is down.
#[tokio::test(flavor = "multi_thread")]
async fn registry_errors_do_not_fall_back() {
    let mut registry = TestRegistry::plain();
    let _pushed = push_plain_layers(&registry, "down/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&registry.host(), "down/app");
    let descs = descriptors(&engine, &r).await;

    let missing = LayerDescriptor {
        digest: Digest::sha256_of(b"never pushed"),
        size: 100,
        media_type: MEDIA_TYPE_OCI_LAYER_ZSTD.into(),
        annotations: HashMap::new(),
    };
    let err = open(&engine, &cache, &r, &missing, &dirs.local)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Fetch {
                source: Error::NotFound { .. },
                ..
            }
        ),
        "{err:?}"
    );

    registry.kill();
    for desc in &descs {
        let err = open(&engine, &cache, &r, desc, &dirs.local)
            .await
            .unwrap_err();
        match &err {
            OpenError::Fetch { source, .. } => assert!(source.is_transient(), "{err}"),
            other => panic!("{}: expected a fetch error, got {other:?}", desc.media_type),
        }
    }
    assert!(dirs.local_files().is_empty(), "{:?}", dirs.local_files());
}

/// A damaged local copy is detected when opened, removed, and rebuilt from the registry.
#[tokio::test(flavor = "multi_thread")]
async fn damaged_local_copy_is_rebuilt() {
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let pushed = push_plain_layers(&registry, "damaged/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "damaged/app");
    let desc = descriptors(&engine, &r).await[1].clone();
    open(&engine, &cache, &r, &desc, &dirs.local).await.unwrap();
    let copy = local::local_copy_path(&dirs.local, &desc.digest);
    let len = std::fs::metadata(&copy).unwrap().len();
    // Chop off the footer: the TOC can no longer be found.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&copy)
        .unwrap()
        .set_len(len - 30)
        .unwrap();
    proxy.reset();
    let opened = open(&engine, &dirs.fresh_cache("cache2"), &r, &desc, &dirs.local)
        .await
        .unwrap();
    assert_eq!(
        blob_gets(&proxy, &desc.digest),
        2,
        "rebuilt with one download (after the zstd:chunked footer probe)"
    );
    assert_eq!(std::fs::metadata(&copy).unwrap().len(), len);
    assert_layer_matches(&opened, &pushed.exp).await;
}

/// A verified download left by a crash during conversion is reused without the network, and
/// stale work files of dead processes are cleaned up.
#[tokio::test(flavor = "multi_thread")]
async fn leftover_download_is_reused_and_stale_work_removed() {
    let registry = TestRegistry::plain();
    let proxy = CountingProxy::start(&registry.host());
    let pushed = push_plain_layers(&registry, "leftover/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "leftover/app");
    let descs = descriptors(&engine, &r).await;
    let zstd = &descs[1];
    let hex = zstd.digest.hex();
    std::fs::create_dir_all(&dirs.local).unwrap();
    std::fs::write(dirs.local.join(format!("{hex}.download")), &pushed.zstd).unwrap();
    // PID 4194304 is above Linux's PID_MAX_LIMIT, so it is certainly dead.
    std::fs::write(dirs.local.join(format!("{hex}.partial-4194304")), b"junk").unwrap();
    std::fs::write(
        dirs.local.join(format!("{hex}.estargz.tmp-4194304-0")),
        b"junk",
    )
    .unwrap();
    proxy.reset();
    let opened = open(&engine, &cache, &r, zstd, &dirs.local).await.unwrap();
    assert_eq!(
        proxy.requests().len(),
        0,
        "the leftover download was verified and reused"
    );
    assert_layer_matches(&opened, &pushed.exp).await;
    assert_eq!(dirs.local_files(), vec![format!("{hex}.estargz")]);

    // A leftover download that does not match is thrown away and fetched again.
    let tar_desc = &descs[2];
    let thex = tar_desc.digest.hex();
    std::fs::write(
        dirs.local.join(format!("{thex}.download")),
        b"not the layer",
    )
    .unwrap();
    let opened = open(&engine, &cache, &r, tar_desc, &dirs.local)
        .await
        .unwrap();
    assert_eq!(blob_gets(&proxy, &tar_desc.digest), 1);
    assert_layer_matches(&opened, &pushed.exp).await;

    assert!(local::remove_local_copy(&dirs.local, &zstd.digest).unwrap());
    assert!(!local::remove_local_copy(&dirs.local, &zstd.digest).unwrap());
    assert_eq!(dirs.local_files(), vec![format!("{thex}.estargz")]);
}

/// Progress reports cover the download and the conversion (which overlap), each growing and
/// ending at the blob size.
#[tokio::test(flavor = "multi_thread")]
async fn progress_reports_download_and_conversion() {
    let registry = TestRegistry::plain();
    let _pushed = push_plain_layers(&registry, "progress/app").await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&registry.host(), "progress/app");
    let desc = descriptors(&engine, &r).await[0].clone();
    let seen: Arc<Mutex<Vec<(Instant, Progress)>>> = Arc::default();
    let sink = seen.clone();
    let opened = open_layer_with_progress(
        &engine,
        &cache,
        &r,
        &desc,
        &ReaderConfig::default(),
        SourceConfig::default(),
        &dirs.local,
        Some(Arc::new(move |p: &Progress| {
            sink.lock().push((Instant::now(), p.clone()))
        })),
    )
    .await
    .unwrap();
    assert!(matches!(opened.served, Served::Local { .. }));
    let timed = seen.lock();
    let seen: Vec<Progress> = timed.iter().map(|(_, p)| p.clone()).collect();
    let last = |phase| seen.iter().rfind(|p| p.phase == phase).cloned().unwrap();
    let d = last(Phase::Download);
    assert_eq!(
        (d.done, d.total, d.layer),
        (desc.size, desc.size, desc.digest)
    );
    let c = last(Phase::Convert);
    assert_eq!((c.done, c.total), (desc.size, desc.size));
    // The conversion follows the download, so the two phases interleave; each only grows.
    for phase in [Phase::Download, Phase::Convert] {
        let done: Vec<u64> = seen
            .iter()
            .filter(|p| p.phase == phase)
            .map(|p| p.done)
            .collect();
        assert!(done.windows(2).all(|w| w[0] <= w[1]), "{phase:?}: {done:?}");
    }
    let first_convert = seen.iter().position(|p| p.phase == Phase::Convert).unwrap();
    let convert_time = timed.last().unwrap().0 - timed[first_convert].0;
    let tar_len = test_tar().0.len();
    eprintln!(
        "converted {} compressed / {tar_len} tar bytes in {convert_time:?}: {:.1} MB/s of tar",
        desc.size,
        tar_len as f64 / convert_time.as_secs_f64() / 1e6
    );
}
