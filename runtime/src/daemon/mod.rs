//! `lazypull serve`: the daemon that owns every layer mount, the chunk cache and the fetch
//! engine, so layers shared between images and containers are mounted once and one process
//! accounts for the cache budget.
//!
//! The CLI starts it on demand (and says so) and talks to it over a root-only unix socket (see
//! [`crate::api`]). Pulled images, image mounts and containers are recorded under `--root`;
//! after a restart, also after SIGKILL, the daemon first detaches whatever mounts the old
//! process left (dead FUSE mounts answer "Transport endpoint is not connected"), then mounts
//! the recorded images again.

mod containers;
pub mod keeper; // holds FUSE connections across daemon restarts
mod layer_store; // podman / CRI-O additional layer store
mod layers;
pub mod metrics;
pub mod mounts;
pub mod profiles;
pub(crate) mod snapshots; // containerd snapshotter; `rpull` writes the labels it reads
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazypull_fetcher::{
    CacheConfig, ChunkCache, Digest, EngineConfig, FetchEngine, Platform, Reference, Registry,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};

use crate::api::{ImageInfo, MountInfo, Reply, Request};
use crate::config::Settings;
use layers::LayerEntry;
use store::{ContainerRecord, ImageRecord, MountRecord};

/// Streams progress events to the client of one request.
pub type Events = mpsc::UnboundedSender<String>;

/// A pulled image and whether its layers are mounted.
struct ImageEntry {
    record: ImageRecord,
    /// Why its layers are not mounted (a restore that could not reach the registry).
    unavailable: Option<String>,
}

/// Everything the daemon holds, behind one async mutex; network work happens outside it.
pub struct State {
    settings: Settings,
    engine: FetchEngine,
    cache: ChunkCache,
    layers: HashMap<Digest, LayerEntry>,
    images: BTreeMap<String, ImageEntry>,
    mounts: BTreeMap<PathBuf, MountRecord>,
    containers: BTreeMap<String, ContainerRecord>,
    /// The process holding every layer mount's FUSE connection across restarts; `None` if it
    /// could not be started (a restart then cuts running containers off unread files).
    keeper: Option<Arc<keeper::Keeper>>,
    /// Live layer mounts a killed predecessor left (by mount point), waiting for their layer
    /// to be opened again and the mount taken over.
    inherited: HashMap<PathBuf, keeper::Inherited>,
}

/// How long the keeper holds the mounts of a daemon that does not come back.
const KEEPER_GRACE: Duration = Duration::from_secs(600);

/// The mounts the keeper holds that are still live, for taking over; the rest it forgets.
fn inherit_mounts(keeper: &keeper::Keeper) -> HashMap<PathBuf, keeper::Inherited> {
    let kept = match keeper.list() {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(error = %crate::report::chain(&e), "cannot list the mounts the FUSE keeper holds");
            return HashMap::new();
        }
    };
    let mut out = HashMap::new();
    for k in kept {
        let live = lazypull_fs::fuse::fuse_mounted_at(&k.mountpoint).unwrap_or(false);
        match keeper::Inherited::decode(&k.meta, k.device) {
            Some(inherited) if live => {
                out.insert(k.mountpoint, inherited);
            }
            _ => keeper.forget(&k.mountpoint),
        }
    }
    if !out.is_empty() {
        tracing::info!(
            mounts = out.len(),
            "live layer mounts of the previous daemon found; taking them over"
        );
    }
    out
}

type Shared = Arc<Mutex<State>>;

/// Serialises image pulls so two requests for images sharing a layer mount it once.
static PULL_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

impl State {
    fn images_path(&self) -> PathBuf {
        self.settings.root.join("images.json")
    }

    fn mounts_path(&self) -> PathBuf {
        self.settings.root.join("mounts.json")
    }

    fn save_images(&self) -> Result<()> {
        let v: Vec<&ImageRecord> = self.images.values().map(|e| &e.record).collect();
        store::save(&self.images_path(), &v)
    }

    fn save_mounts(&self) -> Result<()> {
        let v: Vec<&MountRecord> = self.mounts.values().collect();
        store::save(&self.mounts_path(), &v)
    }

    /// The image a user names: a reference as given (normalised), or a digest prefix.
    fn find_image(&self, name: &str) -> Option<String> {
        if let Ok(r) = name.parse::<Reference>() {
            let key = r.to_string();
            if self.images.contains_key(&key) {
                return Some(key);
            }
        }
        let hex = name.strip_prefix("sha256:").unwrap_or(name);
        if hex.len() >= 4 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let found: Vec<&String> = self
                .images
                .iter()
                .filter(|(_, e)| {
                    e.record
                        .digest
                        .strip_prefix("sha256:")
                        .is_some_and(|d| d.starts_with(hex))
                })
                .map(|(k, _)| k)
                .collect();
            if found.len() == 1 {
                return Some(found[0].clone());
            }
        }
        None
    }

    /// Mount directories of an image's layers, top first.
    fn layer_dirs(&self, record: &ImageRecord) -> Result<Vec<PathBuf>> {
        record
            .layers
            .iter()
            .rev()
            .map(|l| {
                let d: Digest = l.digest.parse()?;
                self.layers
                    .get(&d)
                    .map(|e| e.dir.clone())
                    .with_context(|| format!("layer {d} of {} is not mounted", record.reference))
            })
            .collect()
    }
}

/// Runs the daemon until SIGTERM/SIGINT (refused once while containers run) or a `shutdown`
/// request. `ready` is called once the socket accepts connections.
pub async fn serve(settings: Settings, registry: Registry, ready: impl FnOnce()) -> Result<()> {
    let root = settings.root.clone();
    // One daemon per root: the snapshotter's store has one writer.
    let Some(_root_lock) = snapshots::lock_root(&root, &settings.address).await? else {
        eprintln!(
            "lazypull: a daemon already serves {} on {}; this one exits without serving (the \
             running one keeps its settings: `lazypull shutdown` first to change them)",
            root.display(),
            settings.address.display()
        );
        ready();
        return Ok(());
    };
    for d in ["layers", "journal", "containers", "local", "runc"] {
        std::fs::create_dir_all(root.join(d))
            .with_context(|| format!("creating {}", root.join(d).display()))?;
    }
    let keeper = match keeper::Keeper::connect_or_start(&root, KEEPER_GRACE) {
        Ok(k) => {
            let k = Arc::new(k);
            k.watch();
            Some(k)
        }
        Err(e) => {
            tracing::warn!(error = %crate::report::chain(&e),
                "no FUSE keeper: if this daemon dies, running containers lose their unread files");
            None
        }
    };
    let inherited = keeper.as_deref().map(inherit_mounts).unwrap_or_default();
    let keep: std::collections::HashSet<PathBuf> = inherited.keys().cloned().collect();
    let stale = mounts::clean_stale(&root, &keep);
    if stale > 0 {
        tracing::warn!(
            count = stale,
            "removed stale mounts left by a daemon that did not shut down cleanly"
        );
    }
    let cache = ChunkCache::open(
        root.join("cache"),
        CacheConfig {
            budget_bytes: settings.cache_mib << 20,
            ..CacheConfig::default()
        },
    )
    .with_context(|| format!("opening the chunk cache in {}", root.display()))?;
    let images: Vec<ImageRecord> = store::load(&root.join("images.json"))?;
    let old_mounts: Vec<MountRecord> = store::load(&root.join("mounts.json"))?;
    for m in &old_mounts {
        // An image mount outside the root is stale if the old daemon died.
        if mounts::is_mounted(&m.mountpoint) {
            let _ = nix::mount::umount2(&m.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let containers = store::load_containers(&root.join("containers"));
    let state = Arc::new(Mutex::new(State {
        engine: FetchEngine::new(registry, EngineConfig::default()),
        cache,
        layers: HashMap::new(),
        images: images
            .into_iter()
            .map(|r| {
                (
                    r.reference.clone(),
                    ImageEntry {
                        record: r,
                        unavailable: Some("not mounted yet".into()),
                    },
                )
            })
            .collect(),
        mounts: BTreeMap::new(),
        containers: containers.into_iter().map(|c| (c.id.clone(), c)).collect(),
        settings: settings.clone(),
        keeper,
        inherited,
    }));
    restore(&state, old_mounts).await;
    if let Some(addr) = &settings.metrics_address {
        let addr: std::net::SocketAddr = addr
            .parse()
            .with_context(|| format!("--metrics-address {addr:?} is not HOST:PORT"))?;
        metrics::serve(addr, state.clone()).await?;
    }

    // containerd snapshotter: remote snapshots remounted before its socket accepts requests.
    let snapshotter = snapshots::start(&state, &settings).await?;
    // podman / CRI-O additional layer store.
    let layer_store = layer_store::start(&state, &settings)?;
    claim_inherited(&state).await;

    let sock = &settings.address;
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(sock);
    let listener =
        UnixListener::bind(sock).with_context(|| format!("binding {}", sock.display()))?;
    std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o600))?;
    ready();
    tracing::info!(socket = %sock.display(), root = %root.display(), "lazypull daemon ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let (stop_tx, mut stop_rx) = mpsc::channel::<()>(1);
    let mut refused_at: Option<Instant> = None;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let (stream, _) = match conn {
                    Ok(c) => c,
                    Err(e) => { tracing::warn!(error = %e, "accept"); continue; }
                };
                let (state, stop_tx) = (state.clone(), stop_tx.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &state, &stop_tx).await {
                        tracing::debug!(error = %crate::report::chain(&e), "client connection");
                    }
                });
            }
            _ = stop_rx.recv() => break,
            _ = async { tokio::select! { _ = term.recv() => (), _ = int.recv() => () } } => {
                let running = containers::running(&state).await;
                let again = refused_at.is_some_and(|t| t.elapsed() < Duration::from_secs(10));
                if running.is_empty() || again {
                    break;
                }
                tracing::warn!(
                    containers = %running.join(", "),
                    "refusing to stop while containers run (their files would disappear); \
                     stop them first, use `lazypull shutdown --force`, or signal again within 10 s"
                );
                refused_at = Some(Instant::now());
            }
        }
    }
    if let Some(s) = snapshotter {
        s.stop().await; // containerd snapshotter
    }
    if let Some(s) = layer_store {
        // Blocking: waits for the session thread, which may be answering from a task.
        tokio::task::spawn_blocking(move || s.unmount()).await.ok();
    }
    shutdown(&state).await;
    let _ = std::fs::remove_file(sock);
    tracing::info!("lazypull daemon stopped");
    Ok(())
}

/// Mounts the recorded images' layers and image mounts again. Never fails the start: an image
/// whose layers cannot be mounted (registry unreachable, credentials gone) is listed as
/// unavailable and retried when it is used.
async fn restore(state: &Shared, old_mounts: Vec<MountRecord>) {
    let keys: Vec<String> = state.lock().await.images.keys().cloned().collect();
    for key in keys {
        let (ev, _rx) = mpsc::unbounded_channel();
        if let Err(e) = ensure_mounted(state, &key, &ev).await {
            tracing::warn!(image = %key, error = %crate::report::chain(&e), "image not restored; will retry when used");
        }
    }
    let mut st = state.lock().await;
    for m in old_mounts {
        let Some(entry) = st.images.get(&m.image) else {
            continue;
        };
        if entry.unavailable.is_some() || !m.mountpoint.is_dir() {
            continue;
        }
        let record = entry.record.clone();
        match st
            .layer_dirs(&record)
            .and_then(|d| mounts::mount_readonly_stack(&d, &m.mountpoint))
        {
            Ok(()) => {
                st.mounts.insert(m.mountpoint.clone(), m);
            }
            Err(e) => {
                tracing::warn!(mountpoint = %m.mountpoint.display(), error = %crate::report::chain(&e), "image mount not restored")
            }
        }
    }
    if let Err(e) = st.save_mounts() {
        tracing::warn!(error = %crate::report::chain(&e), "saving mounts");
    }
}

/// Takes over the inherited mounts no image or snapshot claimed (layers the podman store had
/// opened: it opens layers on first lookup, so nothing else would, and a running podman
/// container may be reading them). They stay mounted until the daemon stops, as the store's
/// layers do. Those that cannot be opened are let go: their users get ENOTCONN rather than
/// waiting forever.
async fn claim_inherited(state: &Shared) {
    let claims: Vec<(Reference, store::LayerRecord)> = state
        .lock()
        .await
        .inherited
        .values()
        .filter_map(|i| i.layer.clone())
        .collect();
    for (reference, rec) in claims {
        let (ev, _rx) = mpsc::unbounded_channel();
        let _guard = PULL_LOCK.lock().await;
        match layers::acquire_all(state, &reference, std::slice::from_ref(&rec), &ev).await {
            Ok(_) => tracing::info!(layer = %rec.digest, image = %reference,
                "kept a layer mount no image or snapshot names (a podman container's); it stays until the daemon stops"),
            Err(e) => tracing::warn!(layer = %rec.digest, error = %crate::report::chain(&e),
                "cannot reopen a layer the previous daemon had mounted"),
        }
    }
    let mut st = state.lock().await;
    let left: Vec<PathBuf> = st.inherited.drain().map(|(mp, _)| mp).collect();
    for mp in left {
        tracing::warn!(mountpoint = %mp.display(), "a live mount of the previous daemon belongs to no image or snapshot; detaching it");
        let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        if let Some(k) = &st.keeper {
            k.forget(&mp);
        }
    }
}

async fn shutdown(state: &Shared) {
    let mut st = state.lock().await;
    let mps: Vec<PathBuf> = st.mounts.keys().cloned().collect();
    for mp in mps {
        if let Err(e) = mounts::unmount(&mp) {
            tracing::warn!(error = %crate::report::chain(&e), "unmount at shutdown");
        }
    }
    // Image mounts are remembered (mounts.json) and restored by the next daemon.
    st.mounts.clear();
    let root = st.settings.root.join("containers");
    for mp in mounts::mounts_under(&root) {
        let _ = mounts::unmount(&mp);
    }
    let digests: Vec<Digest> = st.layers.keys().copied().collect();
    for d in digests {
        layers::drop_layer(&mut st, &d);
    }
    // Nothing left to hold: the keeper goes too.
    if let Some(k) = st.keeper.take() {
        k.quit();
    }
}

async fn handle(stream: UnixStream, state: &Shared, stop: &mpsc::Sender<()>) -> Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<String>();
    let req = serde_json::from_str::<Request>(&line);
    let state2 = state.clone();
    let stop2 = stop.clone();
    let work = tokio::spawn(async move {
        match req {
            Err(e) => Err(anyhow::anyhow!("bad request: {e}")),
            Ok(req) => execute(req, &state2, &ev_tx, &stop2).await,
        }
    });
    while let Some(ev) = ev_rx.recv().await {
        let mut out = serde_json::to_vec(&Reply {
            event: Some(ev),
            ..Reply::default()
        })?;
        out.push(b'\n');
        // A client that went away still lets the work finish.
        let _ = wr.write_all(&out).await;
    }
    let reply = match work.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Reply {
            error: Some(crate::report::chain(&e)),
            ..Reply::default()
        },
        Err(e) => Reply {
            error: Some(format!("internal error: {e}")),
            ..Reply::default()
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    Ok(())
}

async fn execute(
    req: Request,
    state: &Shared,
    events: &Events,
    stop: &mpsc::Sender<()>,
) -> Result<Reply> {
    match req {
        Request::Ping => Ok(Reply::data(serde_json::json!({
            "pid": std::process::id(),
            "version": env!("CARGO_PKG_VERSION"),
        }))),
        Request::Pull { image, platform } => {
            let span = tracing::info_span!("pull", image = %image);
            tracing::Instrument::instrument(
                pull(state, &image, platform.as_deref(), true, events),
                span,
            )
            .await
        }
        Request::Images => images(state).await,
        Request::Rmi { image, force } => rmi(state, &image, force).await,
        Request::Mount {
            image,
            mountpoint,
            platform,
        } => mount_image(state, &image, &mountpoint, platform.as_deref(), events).await,
        Request::Umount { mountpoint } => {
            let mut st = state.lock().await;
            if !st.mounts.contains_key(&mountpoint) {
                bail!("{} is not a lazypull mount", mountpoint.display());
            }
            mounts::unmount(&mountpoint)?;
            st.mounts.remove(&mountpoint);
            st.save_mounts()?;
            Ok(Reply::ok(format!("unmounted {}", mountpoint.display())))
        }
        Request::Mounts => {
            let st = state.lock().await;
            let list: Vec<MountInfo> = st
                .mounts
                .values()
                .map(|m| {
                    let layers: Vec<String> = st
                        .images
                        .get(&m.image)
                        .map(|e| e.record.layers.iter().map(|l| l.digest.clone()).collect())
                        .unwrap_or_default();
                    let complete = layers.iter().all(|d| {
                        d.parse::<Digest>()
                            .ok()
                            .and_then(|d| st.layers.get(&d))
                            .is_some_and(|l| l.source.is_complete())
                    });
                    MountInfo {
                        mountpoint: m.mountpoint.clone(),
                        image: m.image.clone(),
                        layers,
                        complete,
                    }
                })
                .collect();
            Ok(Reply::data(list))
        }
        Request::Create {
            image,
            platform,
            name,
            rm,
            command,
        } => {
            containers::create(
                state,
                &image,
                platform.as_deref(),
                name,
                rm,
                command,
                events,
            )
            .await
        }
        Request::Started { id, pid } => containers::started(state, &id, pid).await,
        Request::Exited { id, code } => containers::exited(state, &id, code).await,
        Request::Stop { container, timeout } => containers::stop(state, &container, timeout).await,
        Request::Remove { container, force } => containers::remove(state, &container, force).await,
        Request::Ps => containers::ps(state).await,
        Request::Prune => prune(state, false).await,
        Request::PruneAll => prune(state, true).await,
        Request::Info => info(state).await,
        Request::Stats { target, accessed } => {
            let st = state.lock().await;
            let stats = tokio::task::block_in_place(|| {
                metrics::image_stats(&st, target.as_deref(), accessed)
            });
            if stats.is_empty() {
                if let Some(t) = target {
                    bail!("no image or mounted layer matches {t} (see `lazypull images`)");
                }
            }
            Ok(Reply::data(stats))
        }
        Request::Shutdown { force } => {
            let running = containers::running(state).await;
            if !running.is_empty() && !force {
                bail!(
                    "containers are running ({}); stop them first or use --force (their files \
                     become unreachable)",
                    running.join(", ")
                );
            }
            let _ = stop.try_send(());
            Ok(Reply::ok("lazypull daemon stopping"))
        }
    }
}

fn parse_platform(platform: Option<&str>) -> Result<Platform> {
    match platform {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg),
        None => Ok(Platform::host()),
    }
}

/// Resolves `image` and mounts its layers; with `refresh` false an image already pulled is
/// used as it is (what `run` does), with `refresh` true the tag is resolved again (`pull`).
pub async fn pull(
    state: &Shared,
    image: &str,
    platform: Option<&str>,
    refresh: bool,
    events: &Events,
) -> Result<Reply> {
    let reference: Reference = image.parse()?;
    let key = reference.to_string();
    let asked = platform.is_some();
    let platform = parse_platform(platform)?;
    // An image pulled for another platform than the one asked for now is resolved again.
    let serves = |r: &ImageRecord| {
        !asked
            || r.platform
                .parse::<Platform>()
                .is_ok_and(|have| platform.serves(&have))
    };
    let started = Instant::now();
    let engine = {
        let st = state.lock().await;
        if !refresh {
            if let Some(e) = st.images.get(&key) {
                if e.unavailable.is_none() && serves(&e.record) {
                    return Ok(Reply::data(e.record.digest.clone()));
                }
            }
        }
        st.engine.clone()
    };
    let before = engine.registry().stats();
    let _guard = PULL_LOCK.lock().await;
    let known = state
        .lock()
        .await
        .images
        .get(&key)
        .map(|e| e.record.clone());
    let record = match known {
        Some(r) if !refresh && serves(&r) => r,
        _ => {
            let _ = events.send(format!("resolving {key}"));
            let resolved = engine.registry().resolve(&reference, &platform).await?;
            let manifest = resolved
                .image()
                .context("the registry returned an index where an image manifest was expected")?;
            let config_digest: Digest = manifest.config().digest().to_string().parse()?;
            let config = engine
                .registry()
                .fetch_blob(&reference, &config_digest)
                .await
                .context("fetching the image config")?;
            let config: serde_json::Value =
                serde_json::from_slice(&config).context("the image config is not JSON")?;
            // A single-platform image is for the platform its config says, whatever was asked.
            let actual = Platform::of_config(&config);
            if let Some(actual) = &actual {
                if !platform.serves(actual) {
                    if asked {
                        bail!(
                            "{key} is an image for {actual}, not {platform} (it has no manifest \
                             for other platforms); drop --platform or use an image built for \
                             {platform}"
                        );
                    }
                    let _ = events.send(format!(
                        "WARNING: image platform ({actual}) does not match this host ({platform})"
                    ));
                }
            }
            let layers = manifest
                .layers()
                .iter()
                .map(|l| store::LayerRecord {
                    digest: l.digest().to_string(),
                    size: l.size(),
                    media_type: l.media_type().to_string(),
                    annotations: l.annotations().clone().unwrap_or_default(),
                })
                .collect::<Vec<_>>();
            if layers.is_empty() {
                bail!("{key} has no layers");
            }
            ImageRecord {
                reference: key.clone(),
                digest: resolved.manifest.digest.to_string(),
                platform: actual.unwrap_or_else(|| platform.clone()).to_string(),
                config,
                layers,
                pulled: store::now(),
            }
        }
    };
    let unchanged = {
        let st = state.lock().await;
        st.images
            .get(&key)
            .is_some_and(|e| e.unavailable.is_none() && e.record.digest == record.digest)
    };
    if !unchanged {
        let summary = layers::acquire_all(state, &reference, &record.layers, events).await?;
        let prefetch = state.lock().await.settings.prefetch;
        profiles::spawn(state.clone(), record.clone(), prefetch);
        let mut st = state.lock().await;
        if let Some(old) = st.images.remove(&key) {
            if old.unavailable.is_none() {
                layers::release_all(&mut st, &old.record.layers);
            }
        }
        st.images.insert(
            key.clone(),
            ImageEntry {
                record: record.clone(),
                unavailable: None,
            },
        );
        st.save_images()?;
        let fetched = engine.registry().stats().blob_bytes - before.blob_bytes;
        let msg = format!(
            "{key}: {} layers ({}), {} fetched, {:.2} s",
            record.layers.len(),
            summary,
            human_bytes(fetched),
            started.elapsed().as_secs_f64()
        );
        tracing::info!(image = %key, digest = %record.digest, "{msg}");
        return Ok(Reply {
            ok: true,
            message: Some(msg),
            data: serde_json::Value::String(record.digest),
            ..Reply::default()
        });
    }
    Ok(Reply {
        ok: true,
        message: Some(format!("{key}: image is up to date ({})", record.digest)),
        data: serde_json::Value::String(record.digest),
        ..Reply::default()
    })
}

/// Makes sure an image recorded earlier has its layers mounted (after a restart that could
/// not reach the registry, for example).
async fn ensure_mounted(state: &Shared, key: &str, events: &Events) -> Result<()> {
    let record = {
        let st = state.lock().await;
        match st.images.get(key) {
            Some(e) if e.unavailable.is_none() => return Ok(()),
            Some(e) => e.record.clone(),
            None => bail!("no such image: {key}"),
        }
    };
    let _guard = PULL_LOCK.lock().await;
    let reference: Reference = record.reference.parse()?;
    let result = layers::acquire_all(state, &reference, &record.layers, events).await;
    let mut st = state.lock().await;
    match result {
        Ok(_) => {
            if let Some(e) = st.images.get_mut(key) {
                e.unavailable = None;
            } else {
                layers::release_all(&mut st, &record.layers);
            }
            Ok(())
        }
        Err(e) => {
            if let Some(entry) = st.images.get_mut(key) {
                entry.unavailable = Some(crate::report::chain(&e));
            }
            Err(e)
        }
    }
}

async fn images(state: &Shared) -> Result<Reply> {
    let st = state.lock().await;
    let list: Vec<ImageInfo> = st
        .images
        .values()
        .map(|e| {
            let mut cached = 0;
            let mut local_layers = 0;
            for l in &e.record.layers {
                let entry = l
                    .digest
                    .parse::<Digest>()
                    .ok()
                    .and_then(|d| st.layers.get(&d));
                if let Some(entry) = entry {
                    if entry.local {
                        local_layers += 1;
                    }
                    if entry.source.is_complete() {
                        cached += l.size;
                    }
                }
            }
            ImageInfo {
                reference: e.record.reference.clone(),
                digest: e.record.digest.clone(),
                layers: e.record.layers.len(),
                size: e.record.layers.iter().map(|l| l.size).sum(),
                cached,
                local_layers,
                pulled: e.record.pulled,
                unavailable: e.unavailable.clone(),
            }
        })
        .collect();
    Ok(Reply::data(list))
}

async fn rmi(state: &Shared, image: &str, force: bool) -> Result<Reply> {
    let st = state.lock().await;
    let key = st
        .find_image(image)
        .with_context(|| format!("no such image: {image} (see `lazypull images`)"))?;
    let users: Vec<ContainerRecord> = st
        .containers
        .values()
        .filter(|c| c.image == key)
        .cloned()
        .collect();
    if !users.is_empty() && !force {
        let names: Vec<&str> = users.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "image {key} is used by containers {}; remove them first or use --force",
            names.join(", ")
        );
    }
    if let Some(m) = st.mounts.values().find(|m| m.image == key) {
        bail!(
            "image {key} is mounted at {}; unmount it first",
            m.mountpoint.display()
        );
    }
    drop(st);
    let mut out = String::new();
    for c in users {
        containers::remove(state, &c.id, true)
            .await
            .with_context(|| format!("removing container {} of image {key}", c.name))?;
        out.push_str(&format!("Removed container: {}\n", c.name));
    }
    let mut st = state.lock().await;
    if let Some(e) = st.images.remove(&key) {
        if e.unavailable.is_none() {
            layers::release_all(&mut st, &e.record.layers);
        }
        st.save_images()?;
        out.push_str(&format!("Untagged: {key}\nDeleted: {}", e.record.digest));
        return Ok(Reply::ok(out));
    }
    bail!("no such image: {image}")
}

async fn mount_image(
    state: &Shared,
    image: &str,
    mountpoint: &Path,
    platform: Option<&str>,
    events: &Events,
) -> Result<Reply> {
    if !mountpoint.is_absolute() || !mountpoint.is_dir() {
        bail!(
            "mount point {} must be an existing directory given as an absolute path",
            mountpoint.display()
        );
    }
    if state.lock().await.mounts.contains_key(mountpoint) {
        bail!("{} is already a lazypull mount", mountpoint.display());
    }
    pull(state, image, platform, false, events).await?;
    let key = image.parse::<Reference>()?.to_string();
    ensure_mounted(state, &key, events).await?;
    let mut st = state.lock().await;
    let record = st
        .images
        .get(&key)
        .map(|e| e.record.clone())
        .with_context(|| format!("image {key} was removed meanwhile"))?;
    let dirs = st.layer_dirs(&record)?;
    mounts::mount_readonly_stack(&dirs, mountpoint)?;
    st.mounts.insert(
        mountpoint.to_path_buf(),
        MountRecord {
            mountpoint: mountpoint.to_path_buf(),
            image: key.clone(),
        },
    );
    st.save_mounts()?;
    Ok(Reply::ok(format!(
        "mounted {key} ({} layers) at {}",
        record.layers.len(),
        mountpoint.display()
    )))
}

/// Deletes layer files no image uses; with `all`, first removes every image no container or
/// mount uses, and afterwards every cached chunk no mounted layer can read.
async fn prune(state: &Shared, all: bool) -> Result<Reply> {
    let mut st = state.lock().await;
    let mut out = String::new();
    if all {
        let busy: std::collections::HashSet<String> = st
            .containers
            .values()
            .map(|c| c.image.clone())
            .chain(st.mounts.values().map(|m| m.image.clone()))
            .collect();
        let unused: Vec<String> = st
            .images
            .keys()
            .filter(|k| !busy.contains(*k))
            .cloned()
            .collect();
        for key in &unused {
            if let Some(e) = st.images.remove(key) {
                if e.unavailable.is_none() {
                    layers::release_all(&mut st, &e.record.layers);
                }
                out.push_str(&format!("Untagged: {key}\n"));
            }
        }
        st.save_images()?;
    }
    let used: std::collections::HashSet<String> = st
        .images
        .values()
        .flat_map(|e| e.record.layers.iter().map(|l| l.digest.clone()))
        .filter_map(|d| d.parse::<Digest>().ok().map(|d| d.hex().to_string()))
        // Mounted layers are in use too (the containerd snapshotter holds some).
        .chain(st.layers.keys().map(|d| d.hex().to_string()))
        .collect();
    let mut freed = 0u64;
    let mut removed = 0usize;
    for sub in ["layers", "local"] {
        let dir = st.settings.root.join(sub);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or_default();
            if used.contains(hex) || mounts::is_mounted(&e.path()) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            let res = if e.path().is_dir() {
                std::fs::remove_dir_all(e.path())
            } else {
                std::fs::remove_file(e.path())
            };
            if res.is_ok() {
                freed += size;
                removed += 1;
            }
        }
    }
    out.push_str(&format!(
        "removed {removed} unused layer files ({})",
        human_bytes(freed)
    ));
    if all {
        // What mounted layers can still read: their chunks and whole-file digests.
        let mut keep = std::collections::HashSet::new();
        for l in st.layers.values() {
            let layer = l.source.layer();
            keep.extend(layer.all_chunks().iter().filter_map(|c| c.digest));
            keep.extend((0..layer.len() as u32).filter_map(|id| layer.file_digest(id).copied()));
        }
        let (chunks, bytes) = st
            .cache
            .retain(|d| keep.contains(d))
            .with_context(|| format!("pruning the chunk cache in {}", st.cache.dir().display()))?;
        out.push_str(&format!(
            "; removed {chunks} cached chunks ({})",
            human_bytes(bytes)
        ));
    }
    let cache = st.cache.stats();
    out.push_str(&format!(
        "; cache {} of {} budget",
        human_bytes(cache.used_bytes),
        human_bytes(cache.budget_bytes)
    ));
    Ok(Reply::ok(out))
}

async fn info(state: &Shared) -> Result<Reply> {
    let st = state.lock().await;
    let cache = st.cache.stats();
    let complete = st
        .layers
        .values()
        .filter(|l| l.source.is_complete())
        .count();
    Ok(Reply::data(serde_json::json!({
        "pid": std::process::id(),
        "version": env!("CARGO_PKG_VERSION"),
        "root": st.settings.root,
        "address": st.settings.address,
        "runtime": st.settings.runtime,
        // What the daemon started with, as flags: a command given other daemon settings says
        // they change nothing.
        "daemon_args": st.settings.to_args(),
        "images": st.images.len(),
        "containers": st.containers.len(),
        "layers_mounted": st.layers.len(),
        "layers_complete": complete,
        "cache_used_bytes": cache.used_bytes,
        "cache_budget_bytes": cache.budget_bytes,
        "cache_entries": cache.entries,
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "cache_evictions": cache.evictions,
        "registry": {
            "requests": st.engine.registry().stats().requests,
            "blob_bytes": st.engine.registry().stats().blob_bytes,
        },
    })))
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
