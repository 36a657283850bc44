//! zstd:chunked layers against a real `docker-registry`: lazypull's own writer, skopeo's
//! (`skopeo copy --dest-compress-format zstd:chunked`, containers/image + containers/storage)
//! and stargz-snapshotter's (`ctr-remote images convert --oci --zstdchunked`) blobs all open
//! lazily through `open_layer` (annotations, or the footer alone when the manifest lost them),
//! serve every file byte-identical to the source tar, survive a daemon restart without the
//! registry, and fall back to the verified whole fetch when the TOC is unusable. The other way
//! round, podman's partial pull (containers/storage's own reader) reads lazypull's layers.
//!
//! skopeo, podman and containerd/ctr-remote come from Debian; tests needing them fail with an
//! install hint when they are missing.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::retry::RetryPolicy;
use lazypull_fetcher::{
    CacheConfig, ChunkCache, Digest, EngineConfig, FetchEngine, Priority, Reference, Registry,
    RegistryConfig,
};
use lazypull_fs::chunks::SourceConfig;
use lazypull_fs::estargz::{Prefetch, ReaderConfig};
use lazypull_fs::open::{
    open_layer, open_zstd_chunked, LayerDescriptor, OpenError, OpenedLayer, Served,
};
use lazypull_fs::toc::{Kind, NodeId};
use lazypull_fs::zstd_chunked::{self, write_zstd_chunked, WriterOptions};
use lazypull_tests::{
    random_bytes, CountingProxy, ImageSpec, Layer, TestContainerd, TestRegistry,
    MEDIA_TYPE_OCI_LAYER_ZSTD,
};
use tempfile::TempDir;

const BIG: usize = (5 << 20) + 17;

// ---------------------------------------------------------------------------------------------
// Fixtures

/// What the test tar holds.
struct Expected {
    /// Regular files: path -> (content, mode).
    files: BTreeMap<String, (Vec<u8>, u32)>,
    symlinks: BTreeMap<String, String>,
    hardlinks: Vec<(String, String)>,
    dirs: Vec<String>,
    whiteouts: Vec<String>,
    opaque: Vec<String>,
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

/// A layer tar with dirs, files of many sizes (random, text, a run of zeros), a file whose
/// parents are never named, symlinks, a hard link, a whiteout, an opaque dir and an xattr.
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
    file(&mut b, "usr/lib/zeros", vec![0u8; 100_000], 0o644);
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

    fn fresh_cache(&self, name: &str) -> ChunkCache {
        ChunkCache::open(self.cache_dir.with_file_name(name), CacheConfig::default()).unwrap()
    }
}

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

fn reference(host: &str, repo: &str) -> Reference {
    format!("{host}/{repo}:latest").parse().unwrap()
}

fn blob_gets(proxy: &CountingProxy, digest: &Digest) -> (usize, usize) {
    let needle = format!("/blobs/{digest}");
    let ranged =
        proxy.count(|r| r.method == "GET" && r.path.contains(&needle) && r.range.is_some());
    let whole = proxy.count(|r| r.method == "GET" && r.path.contains(&needle) && r.range.is_none());
    (ranged, whole)
}

fn without_annotations(desc: &LayerDescriptor) -> LayerDescriptor {
    LayerDescriptor {
        annotations: HashMap::new(),
        ..desc.clone()
    }
}

/// `desc` with only the annotations that bind the TOC (the compressed TOC's checksum, the TOC
/// digest), as a tool that drops the position annotations would leave it.
fn checksum_only(desc: &LayerDescriptor) -> LayerDescriptor {
    LayerDescriptor {
        annotations: desc
            .annotations
            .iter()
            .filter(|(k, _)| k.contains("manifest-checksum") || k.ends_with("toc.digest"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..desc.clone()
    }
}

/// Opens `desc` stripped of every annotation and checks that its TOC, which nothing ties to
/// the manifest, was not trusted: the layer was fetched whole, verified, and serves the tar.
async fn assert_unbound_is_fetched_whole(
    engine: &FetchEngine,
    r: &Reference,
    desc: &LayerDescriptor,
    exp: &Expected,
) {
    let dirs = Dirs::new();
    let opened = open(
        engine,
        &dirs.cache(),
        r,
        &without_annotations(desc),
        &dirs.local,
    )
    .await
    .unwrap();
    match &opened.served {
        Served::Local { reason, .. } => {
            assert!(reason.contains("not bound to the manifest"), "{reason}")
        }
        Served::Lazy => panic!("a TOC without a binding annotation was trusted"),
    }
    assert_layer_matches(&opened, exp).await;
}

/// Every file's bytes (whole and across chunk boundaries) and digest, attributes, links,
/// whiteouts, opaque dirs and xattrs of the served layer equal the tar's.
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
        for (off, len) in [(1u64, 5u64), (content.len() as u64 / 2, 70_000)] {
            let got = source.read(id, off, len, Priority::OnDemand).await.unwrap();
            let end = (off + len).min(content.len() as u64) as usize;
            let from = (off as usize).min(end);
            assert_eq!(&got[..], &content[from..end], "{path} {off}+{len}");
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
        let n = layer.node(layer.resolve(w).unwrap()).unwrap();
        assert_eq!(
            (n.kind, n.dev_major, n.dev_minor),
            (Kind::CharDevice, 0, 0),
            "{w}"
        );
    }
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

/// `(file offset, size, digest)` of every chunk of every regular file.
fn chunk_lists(opened: &OpenedLayer, exp: &Expected) -> BTreeMap<String, Vec<(u64, u64, Digest)>> {
    let layer = opened.source.layer();
    exp.files
        .keys()
        .map(|p| {
            let id: NodeId = layer.resolve(p).unwrap();
            let list = layer
                .chunks(id)
                .iter()
                .map(|c| (c.file_offset, c.size, c.digest.unwrap()))
                .collect();
            (p.clone(), list)
        })
        .collect()
}

fn run(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e}); install it from Debian"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An OCI image layout at `dir` holding one image `latest` with the uncompressed layer `tar`.
fn oci_layout(dir: &Path, tar: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| -> (Digest, usize) {
        let d = Digest::sha256_of(data);
        std::fs::write(blobs.join(d.hex()), data).unwrap();
        (d, data.len())
    };
    let (ld, ls) = put(tar);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [ld.to_string()]}, "config": {}
    });
    let (cd, cs) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd.to_string(), "size": cs},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": ld.to_string(), "size": ls}]
    });
    let (md, ms) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(), "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "latest"}}]
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

// ---------------------------------------------------------------------------------------------
/// The registry layer of a zstd:chunked blob, with the writer's annotations (as podman pushes
/// it).
fn annotated_layer(blob: Vec<u8>, written: &zstd_chunked::WrittenLayer) -> Layer {
    let mut layer = Layer::new(blob)
        .with_media_type(MEDIA_TYPE_OCI_LAYER_ZSTD)
        .with_diff_id(written.diff_id);
    for (k, v) in written.annotations() {
        layer = layer.with_annotation(&k, &v);
    }
    layer
}

/// Pushes a one-layer linux/amd64 image as `repo:latest`.
async fn push_single(registry: &TestRegistry, repo: &str, layer: Layer) {
    registry
        .pusher()
        .push_image_with(
            repo,
            "latest",
            &ImageSpec::new(vec![layer], "linux", "amd64"),
        )
        .await;
}

// Tests

/// lazypull's writer: the layer opens lazily with one range request (annotations) or two (the
/// footer alone), is never downloaded whole, serves the source tar exactly, and reopens after
/// a restart from the saved TOC with the registry gone.
#[tokio::test(flavor = "multi_thread")]
async fn our_writer_opens_lazily_and_restarts_without_the_registry() {
    let (tar, exp) = test_tar();
    let started = Instant::now();
    let mut blob = Vec::new();
    let written = write_zstd_chunked(&tar[..], &mut blob, &WriterOptions::default()).unwrap();
    let took = started.elapsed();
    eprintln!(
        "write_zstd_chunked (level 10): {} bytes of tar -> {} bytes in {took:?} = {:.1} MB/s",
        tar.len(),
        blob.len(),
        tar.len() as f64 / took.as_secs_f64() / 1e6
    );
    assert_eq!(written.diff_id, Digest::sha256_of(&tar));
    let layer = annotated_layer(blob.clone(), &written);
    let mut registry = TestRegistry::plain();
    push_single(&registry, "zc/ours", layer).await;
    let proxy = CountingProxy::start(&registry.host());
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "zc/ours");
    let desc = descriptors(&engine, &r).await.remove(0);
    assert_eq!(desc.media_type, MEDIA_TYPE_OCI_LAYER_ZSTD);
    assert_eq!(desc.digest, written.blob_digest);

    proxy.reset();
    let opened = open(&engine, &cache, &r, &desc, &dirs.local).await.unwrap();
    assert_eq!(opened.served, Served::Lazy);
    assert_eq!(opened.toc_digest, written.manifest_checksum);
    assert_eq!(
        blob_gets(&proxy, &desc.digest),
        (1, 0),
        "one range read of the TOC"
    );
    assert_layer_matches(&opened, &exp).await;
    assert_eq!(
        blob_gets(&proxy, &desc.digest).1,
        0,
        "never downloaded whole"
    );
    assert!(zstd_chunked::TocHint::from_annotations(&desc.annotations)
        .unwrap()
        .is_zstd_chunked());

    // The same blob with only the checksum annotation: the footer finds the TOC, the checksum
    // binds it.
    let bare = checksum_only(&desc);
    let dirs2 = Dirs::new();
    proxy.reset();
    let opened = open(&engine, &dirs2.cache(), &r, &bare, &dirs2.local)
        .await
        .unwrap();
    assert_eq!(opened.served, Served::Lazy);
    assert_eq!(opened.toc_digest, written.manifest_checksum);
    assert_eq!(
        blob_gets(&proxy, &desc.digest),
        (2, 0),
        "footer probe, then TOC"
    );
    assert_layer_matches(&opened, &exp).await;
    // open_zstd_chunked directly, without the local store.
    let direct = open_zstd_chunked(
        &engine,
        &dirs2.fresh_cache("direct"),
        &r,
        &bare,
        &ReaderConfig::default(),
        SourceConfig::default(),
    )
    .await
    .unwrap();
    assert_eq!(direct.source.layer().len(), opened.source.layer().len());

    // Fill the cache, then restart with the registry gone: both layers reopen from their
    // saved TOCs and serve from the cache.
    opened.source.fill().await.unwrap();
    assert!(opened.source.is_complete());
    let first = open(&engine, &cache, &r, &desc, &dirs.local).await.unwrap();
    first.source.fill().await.unwrap();
    registry.kill();
    drop(proxy);
    for (d, dirs) in [(&desc, &dirs), (&bare, &dirs2)] {
        let engine = self::engine(&dirs.hosts);
        let reopened = open(&engine, &dirs.cache(), &r, d, &dirs.local)
            .await
            .unwrap();
        assert_eq!(reopened.served, Served::Lazy);
        assert_eq!(engine.registry().stats().requests, 0);
        assert_layer_matches(&reopened, &exp).await;
    }
}

/// A wrong manifest checksum, or a mangled position annotation, is not a failed pull: the layer
/// falls back to the verified whole fetch and says why.
#[tokio::test(flavor = "multi_thread")]
async fn unusable_toc_falls_back_to_whole_fetch() {
    let (tar, exp) = test_tar();
    let mut blob = Vec::new();
    let written = write_zstd_chunked(
        &tar[..],
        &mut blob,
        &WriterOptions {
            level: 3,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    let registry = TestRegistry::plain();
    registry
        .pusher()
        .push_image_with(
            "zc/bad",
            "latest",
            &ImageSpec::new(
                vec![Layer::new(blob)
                    .with_media_type(MEDIA_TYPE_OCI_LAYER_ZSTD)
                    .with_diff_id(written.diff_id)],
                "linux",
                "amd64",
            ),
        )
        .await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let r = reference(&registry.host(), "zc/bad");
    let desc = descriptors(&engine, &r).await.remove(0);
    let wrong = Digest::sha256_of(b"not this toc");
    let position = written.toc.annotation();
    for (annotations, says) in [
        (
            vec![
                (
                    zstd_chunked::MANIFEST_CHECKSUM_ANNOTATION,
                    wrong.to_string(),
                ),
                (zstd_chunked::MANIFEST_POSITION_ANNOTATION, position.clone()),
            ],
            "checksum mismatch",
        ),
        (
            vec![(
                zstd_chunked::MANIFEST_POSITION_ANNOTATION,
                "1:2:x".to_string(),
            )],
            "annotations unusable",
        ),
        (
            vec![
                (
                    zstd_chunked::MANIFEST_CHECKSUM_ANNOTATION,
                    written.manifest_checksum.to_string(),
                ),
                (
                    zstd_chunked::MANIFEST_POSITION_ANNOTATION,
                    format!("{}:{}:1:1", written.blob_size - 5, 100),
                ),
            ],
            "does not fit",
        ),
        (
            vec![(zstd_chunked::MANIFEST_POSITION_ANNOTATION, position.clone())],
            "not bound to the manifest",
        ),
    ] {
        let desc = LayerDescriptor {
            annotations: annotations
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            ..desc.clone()
        };
        let dirs = Dirs::new();
        let opened = open(&engine, &dirs.cache(), &r, &desc, &dirs.local)
            .await
            .unwrap();
        let Served::Local { reason, .. } = &opened.served else {
            panic!("expected a fallback for {:?}", desc.annotations)
        };
        assert!(reason.contains(says), "{reason}");
        assert_layer_matches(&opened, &exp).await;
    }
}

/// skopeo 1.9.3 (containers/image 5.23, containers/storage 1.43) writes zstd:chunked with the
/// older `io.containers.*` annotations and the 40-byte `GnUlInUx` footer. Its layer opens
/// lazily (with and without annotations), serves the source tar, and its chunks are the very
/// chunks lazypull's writer cuts from the same files (same rolling checksum), so the chunk
/// cache shares them.
#[tokio::test(flavor = "multi_thread")]
async fn skopeo_zstd_chunked_opens_lazily() {
    let (tar, exp) = test_tar();
    let registry = TestRegistry::plain();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    oci_layout(&src, &tar);
    let out = run(
        Command::new("skopeo").args(["--version"]),
        "skopeo --version (apt-get install -y skopeo)",
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    let dest = format!("docker://{}/zc/skopeo:latest", registry.host());
    let started = Instant::now();
    run(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .args(["--dest-compress-format", "zstd:chunked"])
            .arg(format!("oci:{}:latest", src.display()))
            .arg(&dest),
        "skopeo copy --dest-compress-format zstd:chunked",
    );
    eprintln!(
        "skopeo wrote zstd:chunked ({} bytes of tar) in {:?}",
        tar.len(),
        started.elapsed()
    );
    let proxy = CountingProxy::start(&registry.host());
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let r = reference(&proxy.host(), "zc/skopeo");
    let desc = descriptors(&engine, &r).await.remove(0);
    assert_eq!(desc.media_type, MEDIA_TYPE_OCI_LAYER_ZSTD, "{desc:?}");
    let hint = zstd_chunked::TocHint::from_annotations(&desc.annotations).unwrap();
    assert!(
        hint.toc.is_some() && hint.manifest_checksum.is_some(),
        "skopeo's zstd:chunked annotations: {:?}",
        desc.annotations
    );

    proxy.reset();
    let cache = dirs.cache();
    let started = Instant::now();
    let opened = open(&engine, &cache, &r, &desc, &dirs.local).await.unwrap();
    eprintln!(
        "skopeo layer ({} bytes, {} entries) opened lazily in {:?}",
        desc.size,
        opened.source.layer().len(),
        started.elapsed()
    );
    assert_eq!(opened.served, Served::Lazy, "{:?}", opened.served);
    assert_eq!(Some(opened.toc_digest), hint.manifest_checksum);
    assert_eq!(blob_gets(&proxy, &desc.digest), (1, 0));
    let started = Instant::now();
    assert_layer_matches(&opened, &exp).await;
    eprintln!(
        "read every file of the skopeo layer on demand: {:?}, {} bytes fetched",
        started.elapsed(),
        proxy.total_body_bytes()
    );
    assert_eq!(
        blob_gets(&proxy, &desc.digest).1,
        0,
        "never downloaded whole"
    );

    // With the checksum only: skopeo's 40-byte legacy footer locates the TOC.
    let dirs2 = Dirs::new();
    let bare = open(
        &engine,
        &dirs2.cache(),
        &r,
        &checksum_only(&desc),
        &dirs2.local,
    )
    .await
    .unwrap();
    assert_eq!(bare.served, Served::Lazy);
    assert_layer_matches(&bare, &exp).await;
    // Without any annotation nothing binds the TOC: fetched whole.
    assert_unbound_is_fetched_whole(&engine, &r, &desc, &exp).await;

    // The blob itself: a plain tar+zstd of exactly the source tar.
    let mut raw = Vec::new();
    let whole = engine
        .blob(&r, desc.digest, Some(desc.size))
        .read_at(0, desc.size, Priority::OnDemand)
        .await
        .unwrap();
    zstd::stream::read::Decoder::with_buffer(&whole[..])
        .unwrap()
        .read_to_end(&mut raw)
        .unwrap();
    assert!(raw == tar, "skopeo's layer decompresses to the source tar");

    // Same chunks as lazypull's writer cuts.
    let mut ours = Vec::new();
    let w = write_zstd_chunked(&tar[..], &mut ours, &WriterOptions::default()).unwrap();
    assert_eq!(w.diff_id, Digest::sha256_of(&raw));
    let hint = zstd_chunked::TocHint::from_annotations(
        &w.annotations().into_iter().collect::<HashMap<_, _>>(),
    )
    .unwrap();
    let our_toc =
        zstd_chunked::open_toc(&ours, 0, ours.len() as u64, &hint, &ReaderConfig::default())
            .unwrap();
    let theirs = chunk_lists(&opened, &exp);
    let mut same = 0;
    for (path, list) in &theirs {
        let id = our_toc.layer.resolve(path).unwrap();
        let mine: Vec<(u64, u64, Digest)> = our_toc
            .layer
            .chunks(id)
            .iter()
            .map(|c| (c.file_offset, c.size, c.digest.unwrap()))
            .collect();
        assert_eq!(&mine, list, "{path}: chunk boundaries differ from skopeo's");
        same += list.len();
    }
    eprintln!("{same} chunks identical to skopeo's");
}

/// stargz-snapshotter 0.12's `ctr-remote images convert --oci --zstdchunked` (an eStargz TOC in
/// zstd:chunked's skippable frames, with landmark entries and no `endOffset`) opens lazily and
/// serves the source tar.
#[test]
fn ctr_remote_zstdchunked_opens_lazily() {
    let containerd = TestContainerd::start();
    let registry = TestRegistry::plain();
    let host = registry.host();
    let (tar, exp) = test_tar();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(registry.pusher().push_image_with(
        "zc/plain",
        "v1",
        &ImageSpec::new(
            vec![Layer::new(lazypull_tests::gzip(&tar))],
            "linux",
            "amd64",
        ),
    ));
    let plain_ref = format!("{host}/zc/plain:v1");
    let zc_ref = format!("{host}/zc/ctr-remote:v1");
    let check = |what: &str, out: std::process::Output| {
        assert!(
            out.status.success(),
            "{what}: {}\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            containerd.log_tail(30)
        );
    };
    check(
        "ctr-remote images pull",
        containerd.ctr_remote(&[
            "images",
            "pull",
            "--plain-http",
            "--platform",
            "linux/amd64",
            &plain_ref,
        ]),
    );
    check(
        "ctr-remote images convert --oci --zstdchunked",
        containerd.ctr_remote(&[
            "images",
            "convert",
            "--oci",
            "--zstdchunked",
            "--platform",
            "linux/amd64",
            &plain_ref,
            &zc_ref,
        ]),
    );
    check(
        "ctr-remote images push",
        containerd.ctr_remote(&[
            "images",
            "push",
            "--plain-http",
            "--platform",
            "linux/amd64",
            &zc_ref,
        ]),
    );
    rt.block_on(async {
        let dirs = Dirs::new();
        let engine = engine(&dirs.hosts);
        let r: Reference = zc_ref.parse().unwrap();
        let desc = descriptors(&engine, &r).await.remove(0);
        eprintln!(
            "ctr-remote layer: {} {:?}",
            desc.media_type, desc.annotations
        );
        assert_eq!(desc.media_type, MEDIA_TYPE_OCI_LAYER_ZSTD);
        assert_unbound_is_fetched_whole(&engine, &r, &desc, &exp).await;
        for d in [desc.clone(), checksum_only(&desc)] {
            let dirs = Dirs::new();
            let opened = open(&engine, &dirs.cache(), &r, &d, &dirs.local)
                .await
                .unwrap();
            assert_eq!(opened.served, Served::Lazy, "{:?}", opened.served);
            // ctr-remote convert without a record file marks the layer "nothing to prefetch".
            assert_eq!(opened.prefetch, Prefetch::None);
            assert!(opened
                .source
                .layer()
                .resolve(".no.prefetch.landmark")
                .is_none());
            assert_layer_matches(&opened, &exp).await;
        }
    });
}

/// Peak resident memory of this process so far (kB).
fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Counts and hashes nothing: a sink that only counts bytes.
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Throughput of the writer and the lazy read path on real files. Run in release:
/// `LAZYPULL_MEASURE_DIR=/usr/lib/x86_64-linux-gnu cargo test --release -p lazypull-fs --test
/// zstd_chunked -- --ignored --nocapture measure`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement; run in release with --ignored"]
async fn measure_write_and_read_throughput() {
    let dir =
        std::env::var("LAZYPULL_MEASURE_DIR").unwrap_or_else(|_| "/usr/lib/python3.11".into());
    let levels: Vec<i32> = std::env::var("LAZYPULL_MEASURE_LEVELS")
        .unwrap_or_else(|_| "3,10".into())
        .split(',')
        .map(|l| l.parse().unwrap())
        .collect();
    let tar_of = || {
        Command::new("tar")
            .args(["-C", &dir, "-cf", "-", "."])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    // Throughput from memory (the writer alone).
    let mut tar = Vec::new();
    tar_of()
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    for &level in &levels {
        let started = Instant::now();
        let w = write_zstd_chunked(
            &tar[..],
            Counter(0),
            &WriterOptions {
                level,
                ..WriterOptions::default()
            },
        )
        .unwrap();
        let took = started.elapsed().as_secs_f64();
        eprintln!(
            "write level {level} (tar in memory): {:.1} MB/s of tar, {:.1}% of its size",
            w.uncompressed_size as f64 / took / 1e6,
            100.0 * w.blob_size as f64 / w.uncompressed_size as f64,
        );
    }
    drop(tar);
    // Streaming: the writer's memory does not grow with the layer.
    for &level in &levels {
        let mut child = tar_of();
        let before = peak_rss_kb();
        let started = Instant::now();
        let mut out = Counter(0);
        let w = write_zstd_chunked(
            child.stdout.take().unwrap(),
            &mut out,
            &WriterOptions {
                level,
                ..WriterOptions::default()
            },
        )
        .unwrap();
        let took = started.elapsed().as_secs_f64();
        let _ = child.wait();
        eprintln!(
            "write level {level}: {} MB tar -> {} MB ({:.1}%) in {took:.2} s = {:.1} MB/s of tar; peak RSS {} -> {} MB",
            w.uncompressed_size / 1_000_000,
            w.blob_size / 1_000_000,
            100.0 * w.blob_size as f64 / w.uncompressed_size as f64,
            w.uncompressed_size as f64 / took / 1e6,
            before / 1024,
            peak_rss_kb() / 1024,
        );
    }
    if std::env::var("LAZYPULL_MEASURE_READ").as_deref() == Ok("0") {
        return;
    }
    // Lazy read of the whole layer through a real registry.
    let mut child = tar_of();
    let mut blob = Vec::new();
    let w = write_zstd_chunked(
        child.stdout.take().unwrap(),
        &mut blob,
        &WriterOptions {
            level: 3,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    let _ = child.wait();
    let hint = zstd_chunked::TocHint::from_annotations(
        &w.annotations().into_iter().collect::<HashMap<_, _>>(),
    )
    .unwrap();
    let started = Instant::now();
    let toc = zstd_chunked::open_toc(&blob, 0, blob.len() as u64, &hint, &ReaderConfig::default())
        .unwrap();
    eprintln!(
        "open_toc: {} entries, {} chunks, TOC {} KB compressed / {} KB JSON, parsed in {:?}; model {} KB",
        toc.layer.len(),
        toc.layer.all_chunks().len(),
        w.toc.compressed_len / 1024,
        w.toc.uncompressed_len / 1024,
        started.elapsed(),
        toc.layer.heap_bytes() / 1024
    );
    let mut layer = Layer::new(blob)
        .with_media_type(MEDIA_TYPE_OCI_LAYER_ZSTD)
        .with_diff_id(w.diff_id);
    for (k, v) in w.annotations() {
        layer = layer.with_annotation(&k, &v);
    }
    // The same files as eStargz (4 MiB chunks), for comparison.
    let mut tar = Vec::new();
    tar_of()
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    let mut esgz = Vec::new();
    let e = lazypull_fs::estargz::write_estargz(
        &tar[..],
        &mut esgz,
        &lazypull_fs::estargz::WriterOptions::default(),
    )
    .unwrap();
    let esgz_layer = Layer::new(esgz)
        .with_media_type(lazypull_tests::MEDIA_TYPE_OCI_LAYER_GZIP)
        .with_annotation(
            lazypull_fs::open::TOC_DIGEST_ANNOTATION,
            &e.toc_digest.to_string(),
        );
    let registry = TestRegistry::plain();
    registry
        .pusher()
        .push_image_with(
            "zc/measure",
            "latest",
            &ImageSpec::new(vec![layer, esgz_layer], "linux", "amd64"),
        )
        .await;
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let r = reference(&registry.host(), "zc/measure");
    for desc in descriptors(&engine, &r).await {
        let format = if desc.media_type.ends_with("zstd") {
            "zstd:chunked"
        } else {
            "eStargz"
        };
        let dirs = Dirs::new();
        let started = Instant::now();
        let opened = open(&engine, &dirs.cache(), &r, &desc, &dirs.local)
            .await
            .unwrap();
        assert_eq!(opened.served, Served::Lazy);
        eprintln!(
            "{format}: open_layer (lazy) {:?}, {} chunks",
            started.elapsed(),
            opened.source.layer().all_chunks().len()
        );
        let started = Instant::now();
        opened.source.fill().await.unwrap();
        let took = started.elapsed().as_secs_f64();
        eprintln!(
            "{format}: background fill (fetch, decompress, verify, cache every chunk): {} MB in {took:.2} s = {:.1} MB/s of tar",
            w.uncompressed_size / 1_000_000,
            w.uncompressed_size as f64 / took / 1e6
        );
        // On-demand reads of every file, cold cache, in inode order.
        let dirs2 = Dirs::new();
        let opened = open(&engine, &dirs2.cache(), &r, &desc, &dirs2.local)
            .await
            .unwrap();
        let layer = opened.source.layer().clone();
        let started = Instant::now();
        let mut bytes = 0u64;
        for id in 0..layer.len() as NodeId {
            let n = layer.node(id).unwrap();
            if n.kind == Kind::File && n.size > 0 {
                let got = opened
                    .source
                    .read(id, 0, n.size, Priority::OnDemand)
                    .await
                    .unwrap();
                bytes += got.len() as u64;
            }
        }
        let took = started.elapsed().as_secs_f64();
        eprintln!(
            "{format}: on-demand reads of every file (cold): {} MB in {took:.2} s = {:.1} MB/s",
            bytes / 1_000_000,
            bytes as f64 / took / 1e6
        );
    }
}

/// podman with an isolated store (its own storage.conf, containers.conf, graph and run roots,
/// partial pulls enabled, overlay driver); unmounts and removes everything on drop.
struct Podman {
    dir: TempDir,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(
            p.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"overlay\"\nrunroot = \"{}/run\"\ngraphroot = \"{}/root\"\n\
                 [storage.options]\npull_options = {{enable_partial_images = \"true\", \
                 use_hard_links = \"false\", ostree_repos = \"\"}}\n",
                p.display(),
                p.display()
            ),
        )
        .unwrap();
        std::fs::write(
            p.join("containers.conf"),
            "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        Podman { dir }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("podman")
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .args([
                "--tmpdir",
                &self.dir.path().join("tmp").display().to_string(),
            ])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("podman: {e}; install it with `apt-get install -y podman`"))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["image", "unmount", "--all", "--force"]);
        let _ = self.cmd(&["system", "reset", "--force"]);
    }
}

/// The other direction: containers/storage (podman 4.3.1's partial pull) reads lazypull's
/// zstd:chunked layers through their TOC (it fetches the TOC range, then the chunks), and the
/// resulting root filesystem and diff ID equal the source tar's.
#[tokio::test(flavor = "multi_thread")]
async fn podman_partial_pull_reads_our_layers() {
    let (tar, exp) = test_tar();
    let mut blob = Vec::new();
    let written = write_zstd_chunked(&tar[..], &mut blob, &WriterOptions::default()).unwrap();
    let layer = annotated_layer(blob, &written);
    let registry = TestRegistry::plain();
    push_single(&registry, "zc/podman", layer).await;
    let proxy = CountingProxy::start(&registry.host());
    let image = format!("{}/zc/podman:latest", proxy.host());
    let podman = Podman::new();
    let out = tokio::task::block_in_place(|| {
        podman.cmd(&["--log-level=debug", "pull", "--tls-verify=false", &image])
    });
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "podman pull: {log}");
    assert!(
        log.contains("Retrieved partial blob"),
        "podman did not pull the layer partially:\n{log}"
    );
    let needle = format!("/blobs/{}", written.blob_digest);
    let toc_reads = proxy.count(|r| {
        r.method == "GET"
            && r.path.contains(&needle)
            && r.range
                .as_deref()
                .is_some_and(|h| h.contains(&format!("{}-", written.toc.offset)))
    });
    assert_eq!(
        toc_reads, 1,
        "podman reads the TOC range the annotation names"
    );

    let out = podman.cmd(&["image", "inspect", &image, "--format", "{{.RootFS.Layers}}"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&written.diff_id.to_string()),
        "diff ID: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = podman.cmd(&["image", "mount", &image]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for (path, (content, mode)) in &exp.files {
        let p = root.join(path);
        assert!(std::fs::read(&p).unwrap() == *content, "{path}");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            *mode,
            "{path}"
        );
    }
    for (path, target) in &exp.symlinks {
        assert_eq!(
            std::fs::read_link(root.join(path)).unwrap(),
            PathBuf::from(target)
        );
    }
    for (link, target) in &exp.hardlinks {
        let (a, b) = (
            std::fs::metadata(root.join(link)).unwrap(),
            std::fs::metadata(root.join(target)).unwrap(),
        );
        assert_eq!(a.ino(), b.ino(), "{link} is a hard link to {target}");
    }
}

/// A file cut into many small zstd:chunked chunks is read with a few requests, not one per
/// chunk: the chunks of one read reach the blob reader together, so their ranges merge (the
/// cold-start benchmark measured 4x eStargz's requests before).
#[tokio::test(flavor = "multi_thread")]
async fn many_small_chunks_of_one_read_merge_into_few_requests() {
    let big = random_bytes(3 << 20, 77);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, big.len() as u64, 0o644);
    b.append_data(&mut h, "big.bin", &big[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let mut blob = Vec::new();
    let opts = WriterOptions {
        chunk_size: 64 << 10,
        ..WriterOptions::default()
    };
    let written = write_zstd_chunked(&tar[..], &mut blob, &opts).unwrap();
    let layer = annotated_layer(blob, &written);
    let registry = TestRegistry::plain();
    push_single(&registry, "zc/small-chunks", layer).await;
    let proxy = CountingProxy::start(&registry.host());
    let dirs = Dirs::new();
    let engine = engine(&dirs.hosts);
    let cache = dirs.cache();
    let r = reference(&proxy.host(), "zc/small-chunks");
    let desc = descriptors(&engine, &r).await.remove(0);
    let opened = open(&engine, &cache, &r, &desc, &dirs.local).await.unwrap();
    let node = opened.source.layer().resolve("big.bin").unwrap();
    let chunks = opened.source.layer().chunks(node).len();
    assert!(chunks >= 40, "only {chunks} chunks: the test needs many");
    proxy.reset();
    let got = opened
        .source
        .read(node, 0, big.len() as u64, Priority::OnDemand)
        .await
        .unwrap();
    assert!(got == big, "wrong content");
    let (ranged, whole) = blob_gets(&proxy, &desc.digest);
    eprintln!("{chunks} chunks read with {ranged} range requests");
    assert_eq!(whole, 0);
    assert!(
        ranged <= 3,
        "{ranged} range requests for one read of {chunks} chunks"
    );
}
