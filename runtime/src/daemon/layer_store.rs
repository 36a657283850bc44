//! The podman / CRI-O additional layer store served by the daemon (`--layer-store DIR`):
//! [`lazypull_snapshotter::layer_store::LayerStore`] over the daemon's layer mounts.
//!
//! A lookup of `DIR/<base64(ref)>/<digest>` resolves the image (manifest and config, kept for
//! a minute so the lookups of one pull cost two requests), finds the layer by its compressed
//! digest (what podman 4.3 asks for) or its TOC digest (what newer containers/storage asks
//! for), and mounts it through the same path as the containerd snapshotter: only layers that
//! can be read lazily, the others answer ENOENT and podman downloads them itself.
//!
//! A layer's `blob` file (read when containers/storage copies the layer elsewhere: `push`,
//! `save`) is served from a verified local copy ([`blob_copy_path`]), downloaded whole on its
//! first read: a byte range of a compressed blob cannot be checked against the layer digest,
//! and unverified bytes are never served.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use lazypull_fetcher::{Digest, Platform, Priority, Reference};
use lazypull_fs::open::TOC_DIGEST_ANNOTATION;
use lazypull_fs::zstd_chunked::{
    LEGACY_MANIFEST_CHECKSUM_ANNOTATION, MANIFEST_CHECKSUM_ANNOTATION,
};
use lazypull_snapshotter::layer_store::{LayerStore, StoreLayer, StoreLayers};
use lazypull_snapshotter::RemoteLayer;
use parking_lot::Mutex;

use super::snapshots::{self, LABEL_ANNOTATIONS, LABEL_MEDIA_TYPE, LABEL_SIZE};
use super::Shared;
use crate::config::Settings;
use crate::convert::UNCOMPRESSED_SIZE_ANNOTATION;

/// How long a resolved image is reused for further layer lookups.
const IMAGE_TTL: Duration = Duration::from_secs(60);

/// One layer of a resolved image.
#[derive(Debug, Clone)]
struct ImageLayer {
    digest: String,
    size: u64,
    media_type: String,
    annotations: HashMap<String, String>,
    diff_id: Option<String>,
}

/// The layers of a resolved image, and when it was resolved.
type ResolvedLayers = (Instant, Arc<Vec<ImageLayer>>);

/// [`StoreLayers`] over the daemon's state.
pub struct DaemonStore {
    state: Shared,
    images: Mutex<HashMap<String, ResolvedLayers>>,
    /// One download at a time per blob (concurrent reads of `blob` wait for it).
    downloads: Mutex<HashMap<Digest, Arc<tokio::sync::Mutex<()>>>>,
}

/// Where the verified copy of a layer's compressed blob is kept for the store's `blob` file;
/// removed with the layer's other local files. In a directory of its own, so its download's
/// partial file cannot meet the whole-layer path's (`<hex>.partial-<pid>` in `local_dir`).
pub fn blob_copy_path(local_dir: &std::path::Path, layer: &Digest) -> std::path::PathBuf {
    local_dir
        .join("store-blobs")
        .join(format!("{}.blob", layer.hex()))
}

impl DaemonStore {
    async fn image(&self, image_ref: &str, reference: &Reference) -> Result<Arc<Vec<ImageLayer>>> {
        if let Some((at, layers)) = self.images.lock().get(image_ref) {
            if at.elapsed() < IMAGE_TTL {
                return Ok(layers.clone());
            }
        }
        let registry = self.state.lock().await.engine.registry().clone();
        let resolved = registry
            .resolve(reference, &Platform::host())
            .await
            .context("resolving the image")?;
        let manifest = resolved
            .image()
            .context("the registry returned an index where an image manifest was expected")?;
        let config_digest: Digest = manifest.config().digest().to_string().parse()?;
        let config = registry
            .fetch_blob(reference, &config_digest)
            .await
            .context("fetching the image config")?;
        let config: serde_json::Value =
            serde_json::from_slice(&config).context("the image config is not JSON")?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let layers: Vec<ImageLayer> = manifest
            .layers()
            .iter()
            .enumerate()
            .map(|(i, l)| ImageLayer {
                digest: l.digest().to_string(),
                size: l.size(),
                media_type: l.media_type().to_string(),
                annotations: l.annotations().clone().unwrap_or_default(),
                diff_id: diff_ids.get(i).cloned(),
            })
            .collect();
        let layers = Arc::new(layers);
        self.images
            .lock()
            .insert(image_ref.to_string(), (Instant::now(), layers.clone()));
        Ok(layers)
    }

    async fn lookup_layer(&self, image_ref: &str, digest: &str) -> Result<StoreLayer> {
        let reference: Reference = image_ref
            .parse()
            .with_context(|| format!("image reference {image_ref:?}"))?;
        let layers = self.image(image_ref, &reference).await?;
        let toc_keys = [
            TOC_DIGEST_ANNOTATION,
            MANIFEST_CHECKSUM_ANNOTATION,
            LEGACY_MANIFEST_CHECKSUM_ANNOTATION,
        ];
        let Some(layer) = layers.iter().find(|l| {
            l.digest == digest
                || toc_keys
                    .iter()
                    .any(|k| l.annotations.get(*k).is_some_and(|v| v == digest))
        }) else {
            bail!("the image has no layer {digest}");
        };
        let Some(diff_id) = &layer.diff_id else {
            bail!(
                "the image config lists no diff_id for layer {}",
                layer.digest
            );
        };
        let mut labels = HashMap::new();
        labels.insert(LABEL_SIZE.to_string(), layer.size.to_string());
        labels.insert(LABEL_MEDIA_TYPE.to_string(), layer.media_type.clone());
        labels.insert(
            LABEL_ANNOTATIONS.to_string(),
            serde_json::to_string(&layer.annotations)?,
        );
        let remote = RemoteLayer {
            image_ref: image_ref.to_string(),
            layer_digest: layer.digest.clone(),
            labels,
        };
        let mounted = snapshots::mount(&self.state, &remote).await?;
        Ok(StoreLayer {
            dir: mounted.dir,
            info: info_json(layer, diff_id)?,
            blob_size: layer.size,
            blob_digest: layer.digest.clone(),
        })
    }
}

/// containers/storage's `Layer` JSON for the `info` file. `compression` is its
/// `archive.Compression` number (gzip 2, zstd 4).
fn info_json(layer: &ImageLayer, diff_id: &str) -> Result<Vec<u8>> {
    let compression = if layer.media_type.contains("zstd") {
        4
    } else {
        2
    };
    let mut info = BTreeMap::new();
    info.insert("compressed-diff-digest", serde_json::json!(layer.digest));
    info.insert("compressed-size", serde_json::json!(layer.size));
    info.insert("diff-digest", serde_json::json!(diff_id));
    info.insert("compression", serde_json::json!(compression));
    if let Some(size) = layer
        .annotations
        .get(UNCOMPRESSED_SIZE_ANNOTATION)
        .and_then(|s| s.parse::<u64>().ok())
    {
        info.insert("diff-size", serde_json::json!(size));
    }
    Ok(serde_json::to_vec(&info)?)
}

impl StoreLayers for DaemonStore {
    async fn lookup(&self, image_ref: &str, digest: &str) -> Result<StoreLayer, String> {
        self.lookup_layer(image_ref, digest).await.map_err(|e| {
            super::metrics::FALLBACKS
                .with_label_values(&["layer_store"])
                .inc();
            crate::report::chain(&e)
        })
    }

    async fn read_blob(
        &self,
        image_ref: &str,
        layer: &StoreLayer,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, String> {
        let reference: Reference = image_ref.parse().map_err(|e| format!("{e}"))?;
        let digest: Digest = layer.blob_digest.parse().map_err(|e| format!("{e}"))?;
        let path = self
            .verified_blob(&reference, &digest, layer.blob_size)
            .await
            .map_err(|e| crate::report::chain(&e))?;
        let file = lazypull_fetcher::BlobReader::local(&path, digest)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        file.read_at(offset, len, Priority::OnDemand)
            .await
            .map_err(|e| e.to_string())
    }
}

impl DaemonStore {
    /// The verified local copy of blob `digest`, downloaded (and checked against its size and
    /// digest) on first use.
    async fn verified_blob(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
    ) -> Result<std::path::PathBuf> {
        let (engine, local_dir) = {
            let st = self.state.lock().await;
            (st.engine.clone(), st.settings.root.join("local"))
        };
        let path = blob_copy_path(&local_dir, digest);
        if path.exists() {
            return Ok(path);
        }
        let lock = self.downloads.lock().entry(*digest).or_default().clone();
        let result = async {
            let _guard = lock.lock().await;
            if path.exists() {
                return Ok(());
            }
            let dir = path.parent().unwrap_or(&local_dir);
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            tracing::info!(layer = %digest, size, "layer store: downloading the blob whole to serve it verified");
            engine
                .registry()
                .download_blob(reference, digest, Some(size), &path, &|_| {})
                .await
                .context("downloading the layer's blob for the layer store")?;
            anyhow::Ok(())
        }
        .await;
        // Released whether the download worked or not (a failed one is retried by the next
        // read).
        self.downloads.lock().remove(digest);
        result.map(|()| path)
    }
}

/// Mounts the store when the settings name a directory.
pub fn start(state: &Shared, settings: &Settings) -> Result<Option<LayerStore>> {
    let Some(dir) = &settings.layer_store else {
        return Ok(None);
    };
    let backend = Arc::new(DaemonStore {
        state: state.clone(),
        images: Mutex::new(HashMap::new()),
        downloads: Mutex::new(HashMap::new()),
    });
    let store = LayerStore::mount(dir, backend, tokio::runtime::Handle::current())
        .with_context(|| format!("serving the layer store at {}", dir.display()))?;
    Ok(Some(store))
}
