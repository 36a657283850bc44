//! lazypull-snapshotter: containerd's snapshots service, served as a proxy plugin
//! (`[proxy_plugins.lazypull] type = "snapshot"`), with lazily mounted remote layers.
//!
//! - [`Snapshotter`] keeps snapshot metadata in redb ([`meta`]) and lays out local snapshots
//!   exactly like containerd's overlayfs snapshotter: `snapshots/<id>/fs` (the upper directory
//!   or the layer's files) and `snapshots/<id>/work`; [`Snapshotter::mounts`] answers a bind
//!   mount for a snapshot with no parent or a read-only view of one layer, and overlayfs
//!   (`lowerdir`, plus `upperdir`/`workdir` when writable) for stacks.
//! - Remote layers: a `Prepare` that carries `containerd.io/snapshot.ref` and a layer
//!   reference (`containerd.io/snapshot/cri.image-ref` + `cri.layer-digest`, or
//!   stargz-snapshotter's `containerd.io/snapshot/remote/stargz.reference` + `.digest`) asks
//!   the daemon, through [`RemoteLayers`], to mount that layer lazily; when it can, the layer
//!   is committed under the `snapshot.ref` name with the [`LABEL_REMOTE`] label and the
//!   answer is `AlreadyExists`, so containerd skips the download. When it cannot (no TOC,
//!   registry failure), `Prepare` goes on as a normal snapshotter and containerd downloads
//!   and applies the layer itself: a pull never fails because the lazy path did.
//! - [`Snapshotter::restore`] mounts every remote snapshot again after a restart, before the
//!   socket is served; a snapshot whose layer cannot be mounted is never handed to containerd
//!   with a dead mount point: its mounts fail with `Unavailable` until a retry succeeds.
//!
//! # Why these crates
//! The gRPC messages come from `containerd-client` 0.9 (tonic 0.14 / prost 0.14, the tonic
//! the workspace can build, and the crate `lazypull rpull` uses as a client). It generates
//! clients only, so the server side of `containerd.services.snapshots.v1.Snapshots` is
//! generated in `build.rs` with tonic-build's manual service builder over those message types.
//! `containerd-snapshots` 0.3 was not used: it is pinned to tonic 0.9 / prost 0.11 / hyper
//! 0.14, which would put a second, older gRPC and HTTP stack into the binary next to
//! containerd-client's, with message types incompatible with it.

pub mod filter;
pub mod layer_store;
pub mod meta;
mod service;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use containerd_client::types::Mount;

pub use meta::{Kind, MetaError, MetaStore, Record, Remote, Usage};
pub use service::{bind, serve_listener, SnapshotsService};

/// Generated gRPC server of containerd's snapshots service.
#[allow(missing_docs, clippy::all)]
pub mod grpc {
    /// `google.protobuf.Empty` as prost maps it.
    pub type Empty = ();
    include!(concat!(
        env!("OUT_DIR"),
        "/containerd.services.snapshots.v1.Snapshots.rs"
    ));
}

/// The committed snapshot a `Prepare` should produce (containerd sets it to the chain ID).
pub const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Image reference of the layer (set by CRI with `disable_snapshot_annotations = false`, and
/// by `lazypull rpull`).
pub const LABEL_CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// Compressed digest of the layer.
pub const LABEL_CRI_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
/// Digest of the image manifest holding the layer.
pub const LABEL_CRI_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The image's layer digests, comma-separated (may be truncated).
pub const LABEL_CRI_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// stargz-snapshotter's (and `ctr-remote images rpull`'s) image reference label.
pub const LABEL_STARGZ_REF: &str = "containerd.io/snapshot/remote/stargz.reference";
/// stargz-snapshotter's layer digest label.
pub const LABEL_STARGZ_DIGEST: &str = "containerd.io/snapshot/remote/stargz.digest";
/// Marks a snapshot served lazily by lazypull.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/remote";
/// Value of [`LABEL_REMOTE`].
pub const REMOTE_VALUE: &str = "lazypull";

/// A layer to serve lazily, as a `Prepare`'s labels describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// Image reference to read the layer from.
    pub image_ref: String,
    /// Compressed layer digest (`sha256:...`).
    pub layer_digest: String,
    /// Every label of the snapshot (size, media type, TOC digest and manifest digest when the
    /// client sent them, plus what [`MountedLayer::labels`] recorded).
    pub labels: HashMap<String, String>,
}

impl RemoteLayer {
    /// The layer `labels` name, if they name one.
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<RemoteLayer> {
        let (image_ref, digest) = match (
            labels.get(LABEL_CRI_IMAGE_REF),
            labels.get(LABEL_CRI_LAYER_DIGEST),
        ) {
            (Some(r), Some(d)) => (r, d),
            _ => (
                labels.get(LABEL_STARGZ_REF)?,
                labels.get(LABEL_STARGZ_DIGEST)?,
            ),
        };
        Some(RemoteLayer {
            image_ref: image_ref.clone(),
            layer_digest: digest.clone(),
            labels: labels.clone(),
        })
    }
}

/// A layer the daemon mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedLayer {
    /// Directory holding the layer's files (a live mount).
    pub dir: PathBuf,
    /// Labels to record on the snapshot and pass back on every later [`RemoteLayers::mount`]
    /// of it (what the daemon needs to mount it again without the registry: size, media
    /// type, ...). Keys should start with `containerd.io/snapshot/remote/`.
    pub labels: BTreeMap<String, String>,
}

/// What the snapshotter needs from the daemon that owns the lazy layer mounts.
///
/// Each successful [`RemoteLayers::mount`] is one reference that the snapshotter gives back
/// with exactly one [`RemoteLayers::release`] (when the snapshot is removed, or before it
/// mounts the layer again after its mount died).
pub trait RemoteLayers: Send + Sync + 'static {
    /// Mounts `layer` lazily (or takes another reference on its existing mount). An error
    /// says why it cannot be served lazily; the snapshotter then lets containerd download it.
    fn mount(
        &self,
        layer: &RemoteLayer,
    ) -> impl Future<Output = Result<MountedLayer, String>> + Send;

    /// Gives back one reference taken by [`RemoteLayers::mount`].
    fn release(&self, layer: &RemoteLayer) -> impl Future<Output = ()> + Send;
}

/// Why a request failed; mapped onto the gRPC codes containerd's errdefs understand.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Metadata rules or store.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// A bad `List` filter.
    #[error(transparent)]
    Filter(#[from] filter::FilterError),
    /// A remote layer of the snapshot is not mounted and cannot be mounted now.
    #[error("snapshot {name:?}: its lazily served layer is not available: {reason}")]
    Unavailable {
        /// The remote snapshot.
        name: String,
        /// Why.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Counters for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Layers prepared as remote snapshots (containerd skipped their download).
    pub remote_prepared: u64,
    /// Prepares that carried a layer reference but fell back to a normal snapshot.
    pub fallbacks: u64,
    /// Remote snapshots mounted again after a restart or a dead mount.
    pub remounted: u64,
}

/// The snapshotter: metadata, local snapshot directories and remote layer mounts.
pub struct Snapshotter<R: RemoteLayers> {
    root: PathBuf,
    meta: MetaStore,
    remote: R,
    /// Remote snapshots whose layer this process holds a reference on, by name.
    held: Mutex<HashMap<String, PathBuf>>,
    /// Serialises (re)mounting of remote snapshots so each holds one reference at most.
    remount: tokio::sync::Mutex<()>,
    index_off: bool,
    remote_prepared: AtomicU64,
    fallbacks: AtomicU64,
    remounted: AtomicU64,
}

impl<R: RemoteLayers> std::fmt::Debug for Snapshotter<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter")
            .field("root", &self.root)
            .finish()
    }
}

/// Whether `dir` is a live mount point: it answers `stat` (a FUSE mount whose server died
/// answers ENOTCONN) and sits on another device than its parent.
pub fn is_live_mount(dir: &Path) -> bool {
    let (Ok(m), Some(parent)) = (std::fs::metadata(dir), dir.parent()) else {
        return false;
    };
    std::fs::metadata(parent).is_ok_and(|p| p.dev() != m.dev())
}

/// Disk usage of the tree at `dir` like containerd's `fs.DiskUsage`: allocated bytes and
/// inodes, hard links counted once.
pub fn disk_usage(dir: &Path) -> std::io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        if seen.insert((m.dev(), m.ino())) {
            usage.inodes += 1;
            usage.size += (m.blocks() * 512) as i64;
        }
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(usage)
}

impl<R: RemoteLayers> Snapshotter<R> {
    /// Opens the snapshotter's state under `root` (created if needed): `metadata.redb` and
    /// `snapshots/`. Directories that a crash left without metadata are removed.
    pub fn open(root: &Path, remote: R) -> Result<Snapshotter<R>, Error> {
        let snaps = root.join("snapshots");
        std::fs::create_dir_all(&snaps).map_err(io_err(format!("creating {}", snaps.display())))?;
        let meta = MetaStore::open(&root.join("metadata.redb"))?;
        let s = Snapshotter {
            root: root.to_path_buf(),
            meta,
            remote,
            held: Mutex::new(HashMap::new()),
            remount: tokio::sync::Mutex::new(()),
            index_off: Path::new("/sys/module/overlay/parameters/index").exists(),
            remote_prepared: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            remounted: AtomicU64::new(0),
        };
        let removed = s.cleanup_dirs()?;
        if removed > 0 {
            tracing::info!(
                count = removed,
                "removed snapshot directories left without metadata"
            );
        }
        Ok(s)
    }

    /// The metadata store.
    pub fn meta(&self) -> &MetaStore {
        &self.meta
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            remote_prepared: self.remote_prepared.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
            remounted: self.remounted.load(Ordering::Relaxed),
        }
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn upper_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// Mounts every remote snapshot's layer again (after a restart: the daemon has removed
    /// stale mounts first). Never fails: a layer that cannot be mounted is logged, and its
    /// snapshot answers `Unavailable` until a later attempt succeeds. Returns how many were
    /// mounted and how many were not.
    pub async fn restore(&self) -> (usize, usize) {
        let records = match self.meta.list() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "reading snapshot metadata");
                return (0, 0);
            }
        };
        let (mut ok, mut failed) = (0, 0);
        for r in records.iter().filter(|r| r.remote.is_some()) {
            match self.remote_dir(r).await {
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    tracing::warn!(snapshot = %r.name, error = %e,
                        "remote snapshot not mounted; it is retried when used");
                }
            }
        }
        (ok, failed)
    }

    fn remote_layer(r: &Record) -> Option<RemoteLayer> {
        let remote = r.remote.as_ref()?;
        Some(RemoteLayer {
            image_ref: remote.image_ref.clone(),
            layer_digest: remote.layer_digest.clone(),
            labels: r.labels.clone().into_iter().collect(),
        })
    }

    /// The live mount of a remote snapshot's layer, mounting it (again) if needed.
    async fn remote_dir(&self, r: &Record) -> Result<PathBuf, Error> {
        let layer = Self::remote_layer(r).ok_or_else(|| Error::Unavailable {
            name: r.name.clone(),
            reason: "not a remote snapshot".into(),
        })?;
        let live = |held: &Mutex<HashMap<String, PathBuf>>| {
            held.lock()
                .expect("held lock")
                .get(&r.name)
                .filter(|d| is_live_mount(d))
                .cloned()
        };
        if let Some(d) = live(&self.held) {
            return Ok(d);
        }
        let _guard = self.remount.lock().await;
        if let Some(d) = live(&self.held) {
            return Ok(d);
        }
        let dead = self.held.lock().expect("held lock").remove(&r.name);
        if let Some(dead) = dead {
            tracing::warn!(snapshot = %r.name, dir = %dead.display(),
                "remote layer mount is gone; mounting it again");
            self.remote.release(&layer).await;
        }
        match self.remote.mount(&layer).await {
            Ok(m) if is_live_mount(&m.dir) => {
                self.held
                    .lock()
                    .expect("held lock")
                    .insert(r.name.clone(), m.dir.clone());
                self.remounted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(snapshot = %r.name, layer = %layer.layer_digest,
                    dir = %m.dir.display(), "remote snapshot mounted");
                Ok(m.dir)
            }
            Ok(m) => {
                self.remote.release(&layer).await;
                Err(Error::Unavailable {
                    name: r.name.clone(),
                    reason: format!("{} is not a live mount", m.dir.display()),
                })
            }
            Err(reason) => Err(Error::Unavailable {
                name: r.name.clone(),
                reason,
            }),
        }
    }

    /// The directory holding a committed snapshot's files.
    async fn layer_dir(&self, r: &Record) -> Result<PathBuf, Error> {
        if r.remote.is_some() {
            self.remote_dir(r).await
        } else {
            Ok(self.upper_dir(r.id))
        }
    }

    /// The mounts of an active or view snapshot, as containerd's overlayfs snapshotter makes
    /// them.
    async fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>, Error> {
        let parents = self.meta.parents(r)?;
        let mut lowers = Vec::with_capacity(parents.len());
        for p in &parents {
            lowers.push(self.layer_dir(p).await?);
        }
        let bind = |source: &Path, ro: bool| {
            vec![Mount {
                r#type: "bind".into(),
                source: source.display().to_string(),
                target: String::new(),
                options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
            }]
        };
        if lowers.is_empty() {
            return Ok(bind(&self.upper_dir(r.id), r.kind == Kind::View));
        }
        let mut options = Vec::new();
        if self.index_off {
            options.push("index=off".to_string());
        }
        if r.kind == Kind::Active {
            options.push(format!("workdir={}", self.work_dir(r.id).display()));
            options.push(format!("upperdir={}", self.upper_dir(r.id).display()));
        } else if lowers.len() == 1 {
            return Ok(bind(&lowers[0], true));
        }
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        options.push(format!("lowerdir={}", lowerdir.join(":")));
        Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }])
    }

    /// `Prepare` (writable) or `View` (read-only) of a local snapshot.
    async fn create_local(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        // Make sure remote parents are mounted before anything is created.
        let parent_dir = match parent {
            Some(p) => {
                let pr = self.meta.get(p).map_err(|e| match e {
                    MetaError::NotFound(_) => MetaError::NotFound(format!("parent {p}")),
                    e => e,
                })?;
                if pr.kind != Kind::Committed {
                    return Err(MetaError::InvalidArgument(format!(
                        "parent {p:?} is not a committed snapshot"
                    ))
                    .into());
                }
                Some(self.layer_dir(&pr).await?)
            }
            None => None,
        };
        let snaps = self.root.join("snapshots");
        let tmp = tempdir_in(&snaps)?;
        let made = (|| -> std::io::Result<()> {
            std::fs::create_dir(tmp.join("fs"))?;
            set_mode(&tmp.join("fs"), 0o755)?;
            if kind == Kind::Active {
                std::fs::create_dir(tmp.join("work"))?;
                set_mode(&tmp.join("work"), 0o711)?;
            }
            if let Some(pd) = &parent_dir {
                let st = std::fs::metadata(pd)?;
                std::os::unix::fs::lchown(tmp.join("fs"), Some(st.uid()), Some(st.gid()))?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::Io {
                what: format!("preparing {}", tmp.display()),
                source: e,
            });
        }
        let created = (|| -> Result<Record, Error> {
            let tx = self.meta.write()?;
            let r = tx.create(key, parent, kind, labels, None)?;
            let dir = self.snapshot_dir(r.id);
            // A directory left by a crash under this ID has no metadata: replace it.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(io_err(format!("creating {}", dir.display())))?;
            if let Err(e) = tx.commit_tx() {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
            Ok(r)
        })();
        let r = match created {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        self.mounts_of(&r).await
    }

    /// containerd's `Prepare`: a writable snapshot on `parent`; or, for a layer that can be
    /// served lazily, the committed remote snapshot and [`MetaError::AlreadyExists`].
    pub async fn prepare(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if let (Some(target), Some(layer)) = (
            labels.get(LABEL_SNAPSHOT_REF),
            RemoteLayer::from_labels(&labels),
        ) {
            match self.prepare_remote(target, parent, &layer).await {
                Ok(name) => {
                    return Err(MetaError::AlreadyExists(format!(
                        "target snapshot {target:?} (remote snapshot {name:?})"
                    ))
                    .into())
                }
                Err(reason) => {
                    self.fallbacks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        layer = %layer.layer_digest,
                        image = %layer.image_ref,
                        reason = %reason,
                        "layer not served lazily; containerd downloads and applies it"
                    );
                }
            }
        }
        self.create_local(key, parent, Kind::Active, labels.into_iter().collect())
            .await
    }

    /// Finds or creates the committed remote snapshot for `target` on `parent`; returns its
    /// name, or why the layer is not served lazily.
    async fn prepare_remote(
        &self,
        target: &str,
        parent: Option<&str>,
        layer: &RemoteLayer,
    ) -> Result<String, String> {
        let matches = |r: &Record| {
            r.kind == Kind::Committed
                && r.labels.get(LABEL_SNAPSHOT_REF).map(String::as_str) == Some(target)
                && r.parent.as_deref() == parent
        };
        let existing = self.meta.list().map_err(|e| e.to_string())?;
        if let Some(r) = existing.iter().find(|r| matches(r)) {
            // Already there (another namespace or an earlier pull); usable if mounted.
            return match &r.remote {
                Some(_) => self
                    .remote_dir(r)
                    .await
                    .map(|_| r.name.clone())
                    .map_err(|e| e.to_string()),
                None => Ok(r.name.clone()),
            };
        }
        if let Some(p) = parent {
            match self.meta.get(p) {
                Ok(pr) if pr.kind == Kind::Committed => {}
                Ok(_) => return Err(format!("parent {p:?} is not committed")),
                Err(e) => return Err(e.to_string()),
            }
        }
        let mounted = self.remote.mount(layer).await?;
        if !is_live_mount(&mounted.dir) {
            self.remote.release(layer).await;
            return Err(format!(
                "the daemon answered {}, which is not a live mount",
                mounted.dir.display()
            ));
        }
        let mut labels: BTreeMap<String, String> = layer.labels.clone().into_iter().collect();
        labels.extend(mounted.labels.clone());
        labels.insert(LABEL_REMOTE.to_string(), REMOTE_VALUE.to_string());
        let created = (|| -> Result<Record, MetaError> {
            let tx = self.meta.write()?;
            // Someone may have created it meanwhile.
            if let Some(r) = self.meta.list()?.into_iter().find(|r| matches(r)) {
                return Err(MetaError::AlreadyExists(r.name));
            }
            let mut name = target.to_string();
            let mut n = 1;
            while tx.get(&name).is_ok() {
                n += 1;
                name = format!("{target}~{n}");
            }
            let r = tx.create(
                &name,
                parent,
                Kind::Committed,
                labels,
                Some(Remote {
                    image_ref: layer.image_ref.clone(),
                    layer_digest: layer.layer_digest.clone(),
                }),
            )?;
            tx.commit_tx()?;
            Ok(r)
        })();
        match created {
            Ok(r) => {
                self.held
                    .lock()
                    .expect("held lock")
                    .insert(r.name.clone(), mounted.dir.clone());
                self.remote_prepared.fetch_add(1, Ordering::Relaxed);
                tracing::info!(snapshot = %r.name, layer = %layer.layer_digest,
                    image = %layer.image_ref, dir = %mounted.dir.display(),
                    "layer prepared as a remote snapshot");
                Ok(r.name)
            }
            Err(MetaError::AlreadyExists(name)) => {
                self.remote.release(layer).await;
                Ok(name)
            }
            Err(e) => {
                self.remote.release(layer).await;
                Err(e.to_string())
            }
        }
    }

    /// containerd's `View`: a read-only snapshot of `parent`.
    pub async fn view(
        &self,
        key: &str,
        parent: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        self.create_local(key, parent, Kind::View, labels.into_iter().collect())
            .await
    }

    /// containerd's `Mounts` of an active or view snapshot.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let r = self.meta.get(key)?;
        if r.kind == Kind::Committed {
            return Err(MetaError::FailedPrecondition(format!(
                "snapshot {key:?} is committed: only active and view snapshots have mounts"
            ))
            .into());
        }
        self.mounts_of(&r).await
    }

    /// containerd's `Commit`: the active snapshot `key` becomes the committed `name`.
    pub async fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), Error> {
        let r = self.meta.get(key)?;
        if r.kind != Kind::Active {
            return Err(MetaError::FailedPrecondition(format!(
                "snapshot {key:?} is not active (it is {})",
                r.kind.as_str()
            ))
            .into());
        }
        let upper = self.upper_dir(r.id);
        let usage = tokio::task::spawn_blocking(move || disk_usage(&upper))
            .await
            .map_err(|e| Error::Io {
                what: "measuring usage".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(io_err(format!("measuring {key}")))?;
        let tx = self.meta.write()?;
        tx.commit(key, name, labels.into_iter().collect(), usage)?;
        tx.commit_tx()?;
        Ok(())
    }

    /// containerd's `Remove`: fails while the snapshot has children.
    pub async fn remove(&self, key: &str) -> Result<(), Error> {
        let tx = self.meta.write()?;
        let r = tx.remove(key)?;
        tx.commit_tx()?;
        if let Some(layer) = Self::remote_layer(&r) {
            let held = self.held.lock().expect("held lock").remove(&r.name);
            if held.is_some() {
                self.remote.release(&layer).await;
            }
            tracing::info!(snapshot = %r.name, layer = %layer.layer_digest, "remote snapshot removed");
        } else {
            tracing::debug!(snapshot = %r.name, kind = r.kind.as_str(), "snapshot removed");
            let dir = self.snapshot_dir(r.id);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                // The metadata is gone: Cleanup removes the directory later.
                tracing::warn!(dir = %dir.display(), error = %e, "removing snapshot directory");
            }
        }
        Ok(())
    }

    /// containerd's `Stat`.
    pub fn stat(&self, key: &str) -> Result<Record, Error> {
        Ok(self.meta.get(key)?)
    }

    /// containerd's `Update`: labels only.
    pub fn update(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        paths: &[String],
    ) -> Result<Record, Error> {
        let tx = self.meta.write()?;
        let r = tx.update(name, labels.into_iter().collect(), paths)?;
        tx.commit_tx()?;
        Ok(r)
    }

    /// containerd's `Walk` (`List` over gRPC) with filters.
    pub fn list(&self, filters: &[String]) -> Result<Vec<Record>, Error> {
        let f = filter::Filters::parse(filters)?;
        Ok(self
            .meta
            .list()?
            .into_iter()
            .filter(|r| f.matches(r))
            .collect())
    }

    /// containerd's `Usage`: measured for active snapshots, recorded at commit otherwise.
    pub async fn usage(&self, key: &str) -> Result<Usage, Error> {
        let r = self.meta.get(key)?;
        if r.kind != Kind::Active {
            return Ok(r.usage);
        }
        let upper = self.upper_dir(r.id);
        tokio::task::spawn_blocking(move || disk_usage(&upper))
            .await
            .map_err(|e| Error::Io {
                what: "measuring usage".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(io_err(format!("measuring {key}")))
    }

    /// containerd's `Cleanup`: removes snapshot directories that no snapshot owns.
    pub fn cleanup(&self) -> Result<usize, Error> {
        self.cleanup_dirs()
    }

    fn cleanup_dirs(&self) -> Result<usize, Error> {
        // Hold the write lock so no Prepare is between creating its directory and committing.
        let tx = self.meta.write()?;
        let ids: HashSet<String> = self
            .meta
            .list()?
            .iter()
            .filter(|r| r.remote.is_none())
            .map(|r| r.id.to_string())
            .collect();
        let snaps = self.root.join("snapshots");
        let mut removed = 0;
        for e in std::fs::read_dir(&snaps)
            .map_err(io_err(format!("reading {}", snaps.display())))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if ids.contains(&name) {
                continue;
            }
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => removed += 1,
                Err(err) => {
                    tracing::warn!(dir = %e.path().display(), error = %err, "cleanup")
                }
            }
        }
        drop(tx);
        Ok(removed)
    }
}

fn set_mode(p: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
}

/// A new uniquely named directory `new-*` in `dir`.
fn tempdir_in(dir: &Path) -> Result<PathBuf, Error> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    for _ in 0..100 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = dir.join(format!("new-{}-{n}", std::process::id()));
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(format!("creating {}", p.display()))(e)),
        }
    }
    Err(Error::Io {
        what: format!("creating a directory in {}", dir.display()),
        source: std::io::Error::other("no free name"),
    })
}

/// Shared handle, as the gRPC service and the daemon hold it.
pub type Shared<R> = Arc<Snapshotter<R>>;

#[cfg(test)]
mod tests;
