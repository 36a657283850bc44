//! The mount server: one process per `--root` that owns every lazily mounted layer, the chunk
//! cache and the fetch engine, so layers shared between images are mounted once and one
//! process accounts for the cache budget.
//!
//! `lazypull mount` starts it on demand (and says so) and talks to it over a unix socket in
//! the root directory (mode 0600) with one JSON request and one JSON reply per connection. It
//! exits when its last image is unmounted, or on SIGTERM/SIGINT after unmounting everything.
//! (The full daemon, `lazypull serve`, grows out of this.)

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use lazypull_fetcher::{
    CacheConfig, ChunkCache, Digest, EngineConfig, FetchEngine, Platform, Reference, Registry,
};
use lazypull_fs::chunks::{LayerSource, SourceConfig};
use lazypull_fs::estargz::{Prefetch, ReaderConfig};
use lazypull_fs::fuse::{LayerMount, MountOptions};
use lazypull_fs::open::{open_estargz, LayerDescriptor};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

/// A request to the mount server.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Mount `image` read-only at `mountpoint`.
    Mount {
        /// Image reference.
        image: String,
        /// Absolute mount point.
        mountpoint: PathBuf,
        /// Platform (OS/ARCH[/VARIANT]).
        platform: Option<String>,
    },
    /// Undo a mount.
    Umount {
        /// Absolute mount point.
        mountpoint: PathBuf,
    },
    /// List mounts.
    List,
}

/// The server's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Human summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Mounts (for `list`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<MountInfo>,
}

/// One mounted image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    /// Where.
    pub mountpoint: PathBuf,
    /// Which image.
    pub image: String,
    /// Layer digests, base first.
    pub layers: Vec<String>,
    /// Whether every layer is completely in the local cache (reads never leave the machine).
    #[serde(default)]
    pub complete: bool,
}

/// How the server treats layers.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Chunk cache settings.
    pub cache: CacheConfig,
    /// Fetch whole layers in the background after mounting.
    pub background_fill: bool,
    /// Cap of the background fill, bytes per second.
    pub fill_rate: Option<u64>,
}

/// Paths under the root.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("mount.sock")
}

struct LayerEntry {
    mount: Option<LayerMount>,
    source: LayerSource,
    dir: PathBuf,
    refs: usize,
    fill: tokio::task::JoinHandle<()>,
}

struct State {
    root: PathBuf,
    engine: FetchEngine,
    cache: ChunkCache,
    layers: HashMap<Digest, LayerEntry>,
    images: HashMap<PathBuf, MountInfo>,
    background_fill: bool,
    fill_rate: Option<u64>,
}

/// Runs the server until the last image is unmounted or a signal arrives. `ready` is called
/// once the socket accepts connections.
pub async fn serve(
    root: PathBuf,
    registry: Registry,
    options: ServeOptions,
    ready: impl FnOnce(),
) -> Result<()> {
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let cache = ChunkCache::open(root.join("cache"), options.cache.clone())
        .with_context(|| format!("opening the chunk cache in {}", root.display()))?;
    let sock = socket_path(&root);
    let _ = std::fs::remove_file(&sock);
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let state = Arc::new(Mutex::new(State {
        root: root.clone(),
        engine: FetchEngine::new(registry, EngineConfig::default()),
        cache,
        layers: HashMap::new(),
        images: HashMap::new(),
        background_fill: options.background_fill,
        fill_rate: options.fill_rate,
    }));
    ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (idle_tx, mut idle_rx) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = conn?;
                let (state, idle_tx) = (state.clone(), idle_tx.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &state).await {
                        tracing::warn!(error = %format!("{e:#}"), "mount request failed");
                    }
                    if state.lock().await.images.is_empty() {
                        let _ = idle_tx.try_send(());
                    }
                });
            }
            _ = idle_rx.recv() => {
                if state.lock().await.images.is_empty() {
                    tracing::info!("last image unmounted; exiting");
                    break;
                }
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let mut st = state.lock().await;
    let mounts: Vec<PathBuf> = st.images.keys().cloned().collect();
    for mp in mounts {
        if let Err(e) = umount_image(&mut st, &mp) {
            tracing::warn!(mountpoint = %mp.display(), error = %format!("{e:#}"), "unmount at shutdown");
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

async fn handle(stream: UnixStream, state: &Arc<Mutex<State>>) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Err(e) => Reply {
            error: Some(format!("bad request: {e}")),
            ..Reply::default()
        },
        Ok(req) => match execute(req, state).await {
            Ok(r) => r,
            Err(e) => Reply {
                error: Some(format!("{e:#}")),
                ..Reply::default()
            },
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

async fn execute(req: Request, state: &Arc<Mutex<State>>) -> Result<Reply> {
    match req {
        Request::List => {
            let st = state.lock().await;
            let mounts = st
                .images
                .values()
                .map(|m| {
                    let mut m = m.clone();
                    m.complete = m.layers.iter().all(|d| {
                        d.parse::<Digest>()
                            .ok()
                            .and_then(|d| st.layers.get(&d))
                            .is_some_and(|l| l.source.is_complete())
                    });
                    m
                })
                .collect();
            Ok(Reply {
                ok: true,
                mounts,
                ..Reply::default()
            })
        }
        Request::Umount { mountpoint } => {
            let mut st = state.lock().await;
            umount_image(&mut st, &mountpoint)?;
            Ok(Reply {
                ok: true,
                message: Some(format!("unmounted {}", mountpoint.display())),
                ..Reply::default()
            })
        }
        Request::Mount {
            image,
            mountpoint,
            platform,
        } => mount_image(state, &image, &mountpoint, platform.as_deref()).await,
    }
}

async fn mount_image(
    state: &Arc<Mutex<State>>,
    image: &str,
    mountpoint: &Path,
    platform: Option<&str>,
) -> Result<Reply> {
    let reference: Reference = image.parse()?;
    let platform = match platform {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    if !mountpoint.is_absolute() || !mountpoint.is_dir() {
        bail!(
            "mount point {} must be an existing directory given as an absolute path",
            mountpoint.display()
        );
    }
    let (engine, cache, root) = {
        let st = state.lock().await;
        if st.images.contains_key(mountpoint) {
            bail!("{} is already a lazypull mount", mountpoint.display());
        }
        (st.engine.clone(), st.cache.clone(), st.root.clone())
    };
    let resolved = engine.registry().resolve(&reference, &platform).await?;
    let manifest = resolved
        .image()
        .context("the registry returned an index where an image manifest was expected")?;
    let descs: Vec<LayerDescriptor> = manifest
        .layers()
        .iter()
        .map(|l| {
            Ok(LayerDescriptor {
                digest: l.digest().to_string().parse()?,
                size: l.size(),
                media_type: l.media_type().to_string(),
                annotations: l.annotations().clone().unwrap_or_default(),
            })
        })
        .collect::<Result<_>>()?;
    if descs.is_empty() {
        bail!("{image} has no layers");
    }
    let mut taken: Vec<Digest> = Vec::new();
    let result = async {
        for desc in &descs {
            acquire_layer(state, &engine, &cache, &root, &reference, desc).await?;
            taken.push(desc.digest);
        }
        let st = state.lock().await;
        let dirs: Vec<PathBuf> = descs
            .iter()
            .rev()
            .filter_map(|d| st.layers.get(&d.digest).map(|l| l.dir.clone()))
            .collect();
        mount_stack(&dirs, mountpoint)
    }
    .await;
    let mut st = state.lock().await;
    if let Err(e) = result {
        for d in taken {
            release_layer(&mut st, &d);
        }
        return Err(e);
    }
    let info = MountInfo {
        mountpoint: mountpoint.to_path_buf(),
        image: resolved.reference.to_string(),
        layers: descs.iter().map(|d| d.digest.to_string()).collect(),
        complete: false,
    };
    st.images.insert(mountpoint.to_path_buf(), info);
    Ok(Reply {
        ok: true,
        message: Some(format!(
            "mounted {} ({} layers) at {}",
            resolved.reference,
            descs.len(),
            mountpoint.display()
        )),
        ..Reply::default()
    })
}

/// Mounts a layer if it is not mounted yet (then starts its prefetch and background fill), or
/// takes another reference on it.
async fn acquire_layer(
    state: &Arc<Mutex<State>>,
    engine: &FetchEngine,
    cache: &ChunkCache,
    root: &Path,
    reference: &Reference,
    desc: &LayerDescriptor,
) -> Result<()> {
    let (background_fill, fill_rate) = {
        let mut st = state.lock().await;
        if let Some(l) = st.layers.get_mut(&desc.digest) {
            l.refs += 1;
            return Ok(());
        }
        (st.background_fill, st.fill_rate)
    };
    let opened = open_estargz(
        engine,
        cache,
        reference,
        desc,
        &ReaderConfig::default(),
        SourceConfig {
            fill_rate,
            ..SourceConfig::default()
        },
    )
    .await
    .with_context(|| {
        format!(
            "layer {} ({}) cannot be mounted lazily; only eStargz layers are supported so far",
            desc.digest, desc.media_type
        )
    })?;
    let dir = root.join("layers").join(desc.digest.hex());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _ = lazypull_fs::fuse::unmount_stale(&dir);
    let source = opened.source.clone();
    let mount = LayerMount::mount(
        source.layer().clone(),
        Arc::new(source.clone()),
        &dir,
        MountOptions {
            fsname: format!("lazypull:{}", desc.digest),
            ..MountOptions::default()
        },
    )
    .with_context(|| format!("mounting layer {} at {}", desc.digest, dir.display()))?;
    let fill_source = source.clone();
    let prefetch = opened.prefetch;
    let digest = desc.digest;
    let fill = tokio::spawn(async move {
        if let Prefetch::Until { blob_offset } = prefetch {
            if let Err(e) = fill_source.prefetch(blob_offset).await {
                tracing::warn!(layer = %digest, error = %e, "prefetch incomplete");
            }
        }
        if !background_fill {
            return;
        }
        match fill_source.fill().await {
            Ok(()) => tracing::info!(layer = %digest, "layer fully cached"),
            Err(e) => tracing::warn!(layer = %digest, error = %e, "background fill incomplete"),
        }
    });
    let mut st = state.lock().await;
    st.layers.insert(
        desc.digest,
        LayerEntry {
            mount: Some(mount),
            source,
            dir,
            refs: 1,
            fill,
        },
    );
    Ok(())
}

fn release_layer(st: &mut State, digest: &Digest) {
    let Some(l) = st.layers.get_mut(digest) else {
        return;
    };
    l.refs -= 1;
    if l.refs > 0 {
        return;
    }
    if let Some(mut l) = st.layers.remove(digest) {
        l.fill.abort();
        if let Some(m) = l.mount.take() {
            if let Err(e) = m.unmount() {
                tracing::warn!(layer = %digest, error = %e, "unmounting layer");
            }
        }
        let _ = std::fs::remove_dir(&l.dir);
        tracing::debug!(layer = %digest, complete = l.source.is_complete(), "layer released");
    }
}

fn umount_image(st: &mut State, mountpoint: &Path) -> Result<()> {
    let Some(info) = st.images.get(mountpoint).cloned() else {
        bail!("{} is not a lazypull mount", mountpoint.display());
    };
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::empty())
        .or_else(|_| nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH))
        .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    st.images.remove(mountpoint);
    for d in &info.layers {
        if let Ok(d) = d.parse::<Digest>() {
            release_layer(st, &d);
        }
    }
    Ok(())
}

/// Stacks layer mounts (top first) read-only at `target`: overlayfs for several layers, a
/// read-only bind mount for one.
fn mount_stack(top_first: &[PathBuf], target: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    if let [only] = top_first {
        mount(
            Some(only.as_path()),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind-mounting {} at {}", only.display(), target.display()))?;
        mount(
            None::<&str>,
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("making {} read-only", target.display()))?;
        return Ok(());
    }
    let lower: Vec<String> = top_first.iter().map(|p| p.display().to_string()).collect();
    let opts = format!("lowerdir={}", lower.join(":"));
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_RDONLY,
        Some(opts.as_str()),
    )
    .with_context(|| format!("mounting overlayfs at {}", target.display()))?;
    Ok(())
}

/// Sends one request to the server of `root`.
pub async fn request(root: &Path, req: &Request) -> Result<Reply> {
    let sock = socket_path(root);
    let stream = UnixStream::connect(&sock)
        .await
        .with_context(|| format!("connecting to the mount server at {}", sock.display()))?;
    let (rd, mut wr) = stream.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    if line.is_empty() {
        bail!(
            "the mount server closed the connection without answering; see {}",
            root.join("mount-server.log").display()
        );
    }
    Ok(serde_json::from_str(&line)?)
}
