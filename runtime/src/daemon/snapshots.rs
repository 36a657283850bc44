//! The containerd snapshotter served by the daemon (`--snapshotter-socket`): the
//! [`lazypull_snapshotter::Snapshotter`] over the daemon's layer mounts.
//!
//! A remote snapshot holds one reference on the daemon's shared mount of its layer
//! (`<root>/layers/<hex>`, the same mount `lazypull run` uses), so containerd containers and
//! lazypull's own share one FUSE mount and one cache. Snapshotter state lives in
//! `<root>/snapshotter` (`metadata.redb`, `snapshots/<id>/{fs,work}`).
//!
//! Only layers that can be read lazily are mounted for containerd (eStargz, zstd:chunked, or
//! a layer already local); for any other the answer is "cannot", and containerd downloads and
//! applies it itself, which is cheaper than lazypull fetching it whole and serving a copy.
//! The layer's descriptor (size, media type, annotations) is recorded in the snapshot's
//! labels, so the daemon mounts it again after a restart without the registry.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lazypull_fetcher::{Digest, Reference};
use lazypull_fs::open::{probe_layer, Probe, TOC_DIGEST_ANNOTATION};
use lazypull_snapshotter::{
    MountedLayer, RemoteLayer, RemoteLayers, Snapshotter, LABEL_CRI_MANIFEST_DIGEST,
};
use tokio::sync::{mpsc, oneshot};

use super::store::LayerRecord;
use super::{layers, Shared, PULL_LOCK};
use crate::config::Settings;

/// Compressed size of the layer (set by `lazypull rpull`, recorded by the daemon).
pub const LABEL_SIZE: &str = "containerd.io/snapshot/remote/lazypull.size";
/// Media type of the layer.
pub const LABEL_MEDIA_TYPE: &str = "containerd.io/snapshot/remote/lazypull.media-type";
/// The layer's manifest annotations as a JSON object (TOC digests and the like).
pub const LABEL_ANNOTATIONS: &str = "containerd.io/snapshot/remote/lazypull.annotations";

/// containerd's limit on a label (key and value together).
const MAX_LABEL: usize = 4096;

/// gzip layer media type assumed when a client sent neither a media type nor a manifest.
const GZIP_LAYER: &str = lazypull_fetcher::manifest::OCI_LAYER_GZIP;

/// [`RemoteLayers`] over the daemon's state.
pub struct DaemonLayers {
    state: Shared,
}

impl RemoteLayers for DaemonLayers {
    async fn mount(&self, layer: &RemoteLayer) -> Result<MountedLayer, String> {
        mount(&self.state, layer).await.map_err(|e| {
            super::metrics::FALLBACKS
                .with_label_values(&["snapshotter"])
                .inc();
            crate::report::chain(&e)
        })
    }

    async fn release(&self, layer: &RemoteLayer) {
        let record = LayerRecord {
            digest: layer.layer_digest.clone(),
            size: 0,
            media_type: String::new(),
            annotations: HashMap::new(),
        };
        let _guard = PULL_LOCK.lock().await;
        let mut st = self.state.lock().await;
        layers::release_all(&mut st, &[record]);
    }
}

/// The layer's descriptor, from the labels when they carry it, else from the image manifest
/// (CRI sends its digest), else from a HEAD of the blob (stargz-snapshotter's labels).
async fn describe(
    state: &Shared,
    reference: &Reference,
    layer: &RemoteLayer,
) -> Result<LayerRecord> {
    let labels = &layer.labels;
    let mut annotations: HashMap<String, String> = labels
        .get(LABEL_ANNOTATIONS)
        .and_then(|a| serde_json::from_str(a).ok())
        .unwrap_or_default();
    if let Some(toc) = labels.get(TOC_DIGEST_ANNOTATION) {
        annotations
            .entry(TOC_DIGEST_ANNOTATION.to_string())
            .or_insert_with(|| toc.clone());
    }
    if let (Some(size), Some(mt)) = (labels.get(LABEL_SIZE), labels.get(LABEL_MEDIA_TYPE)) {
        return Ok(LayerRecord {
            digest: layer.layer_digest.clone(),
            size: size.parse().context("bad size label")?,
            media_type: mt.clone(),
            annotations,
        });
    }
    let registry = state.lock().await.engine.registry().clone();
    if let Some(md) = labels.get(LABEL_CRI_MANIFEST_DIGEST) {
        let md: Digest = md.parse().context("bad manifest digest label")?;
        let m = registry
            .fetch_manifest(&reference.with_digest(md))
            .await
            .context("fetching the image manifest")?;
        if let lazypull_fetcher::Manifest::Image(m) = &m.manifest {
            if let Some(l) = m
                .layers()
                .iter()
                .find(|l| l.digest().to_string() == layer.layer_digest)
            {
                let mut a = l.annotations().clone().unwrap_or_default();
                a.extend(annotations);
                return Ok(LayerRecord {
                    digest: layer.layer_digest.clone(),
                    size: l.size(),
                    media_type: l.media_type().to_string(),
                    annotations: a,
                });
            }
        }
        bail!("manifest {md} does not list layer {}", layer.layer_digest);
    }
    let digest: Digest = layer.layer_digest.parse()?;
    let size = registry
        .blob_size(reference, &digest)
        .await
        .context("asking the registry for the layer's size")?;
    Ok(LayerRecord {
        digest: layer.layer_digest.clone(),
        size,
        media_type: GZIP_LAYER.to_string(),
        annotations,
    })
}

/// Whether a layer not mounted yet can be read lazily (or from a local copy); the error says
/// why not. The decision is [`probe_layer`]'s, the same one mounting follows.
async fn check_lazy(state: &Shared, reference: &Reference, rec: &LayerRecord) -> Result<()> {
    let desc = layers::descriptor(rec)?;
    let (engine, local_dir) = {
        let st = state.lock().await;
        (st.engine.clone(), st.settings.root.join("local"))
    };
    match probe_layer(&engine, reference, &desc, &local_dir).await? {
        Probe::Local | Probe::Lazy(_) => Ok(()),
        Probe::Whole(reason) => bail!("{reason}"),
    }
}

/// Mounts `layer` for a client that only knows it by image reference and digest (the
/// containerd snapshotter, the podman layer store), taking one reference on the mount.
pub(super) async fn mount(state: &Shared, layer: &RemoteLayer) -> Result<MountedLayer> {
    let reference: Reference = layer
        .image_ref
        .parse()
        .with_context(|| format!("image reference {:?}", layer.image_ref))?;
    let digest: Digest = layer.layer_digest.parse()?;
    let mounted = state.lock().await.layers.contains_key(&digest);
    let rec = describe(state, &reference, layer).await?;
    if !mounted {
        check_lazy(state, &reference, &rec).await?;
    }
    let _guard = PULL_LOCK.lock().await;
    let (events, _rx) = mpsc::unbounded_channel();
    layers::acquire_all(state, &reference, std::slice::from_ref(&rec), &events).await?;
    let dir = {
        let st = state.lock().await;
        st.layers
            .get(&digest)
            .map(|l| l.dir.clone())
            .context("the layer went away while it was being mounted")?
    };
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_SIZE.to_string(), rec.size.to_string());
    labels.insert(LABEL_MEDIA_TYPE.to_string(), rec.media_type.clone());
    if !rec.annotations.is_empty() {
        let json = serde_json::to_string(&rec.annotations)?;
        if LABEL_ANNOTATIONS.len() + json.len() <= MAX_LABEL {
            labels.insert(LABEL_ANNOTATIONS.to_string(), json);
        }
    }
    Ok(MountedLayer { dir, labels })
}

/// One daemon per root: held for the daemon's lifetime (`<root>/daemon.lock`, flock).
///
/// The snapshotter's redb store can be open in one process only, and a second daemon on the
/// same root would also clean "stale" mounts that are the first one's live mounts. Two
/// commands that find no daemon may start one each at the same moment; the second then
/// waits until the first answers on its socket and returns `None`: the caller reports ready
/// and exits, and its client talks to the first daemon.
pub async fn lock_root(
    root: &std::path::Path,
    address: &std::path::Path,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    use nix::fcntl::{Flock, FlockArg};
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let path = root.join("daemon.lock");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut announced = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
        // A live daemon answers a ping (a dying one may still hold its socket open).
        let mut quiet = |_: &str| {};
        let ping = crate::api::request(address, &crate::api::Request::Ping, &mut quiet);
        let answered = tokio::time::timeout(std::time::Duration::from_secs(2), ping)
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.ok));
        if answered {
            tracing::info!(root = %root.display(),
                "another lazypull daemon serves this root; leaving it to that one");
            return Ok(None);
        }
        if !announced {
            tracing::info!(root = %root.display(), "waiting for the daemon that holds this root");
            announced = true;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "another process holds {} and its daemon does not answer on {}",
                path.display(),
                address.display()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The snapshotter while it serves.
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

impl Running {
    /// Stops accepting requests and waits for the server to finish.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.task).await;
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Opens the snapshotter under `<root>/snapshotter`, mounts every remote snapshot again (the
/// daemon cleaned stale mounts before), then binds the socket and serves it. `None` when the
/// settings disable it.
pub async fn start(state: &Shared, settings: &Settings) -> Result<Option<Running>> {
    let Some(socket) = settings.snapshotter_socket.clone() else {
        return Ok(None);
    };
    let dir = settings.root.join("snapshotter");
    let snapshotter = Snapshotter::open(
        &dir,
        DaemonLayers {
            state: state.clone(),
        },
    )
    .with_context(|| format!("opening the snapshotter in {}", dir.display()))?;
    let (ok, failed) = snapshotter.restore().await;
    if ok + failed > 0 {
        tracing::info!(
            mounted = ok,
            unavailable = failed,
            "remote snapshots restored"
        );
    }
    let listener = lazypull_snapshotter::bind(&socket)
        .with_context(|| format!("binding the snapshotter socket {}", socket.display()))?;
    let (tx, rx) = oneshot::channel();
    let snapshotter = Arc::new(snapshotter);
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        if let Err(e) = lazypull_snapshotter::serve_listener(snapshotter, listener, shutdown).await
        {
            tracing::error!(error = %e, "snapshotter service stopped");
        }
    });
    tracing::info!(socket = %socket.display(), "containerd snapshotter ready");
    Ok(Some(Running {
        stop: Some(tx),
        task,
        socket,
    }))
}
