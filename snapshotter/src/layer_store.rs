//! The additional layer store that podman and CRI-O read through containers/storage.
//!
//! containers/storage (configured with `additionallayerstores = ["DIR:ref"]`) looks for a
//! layer at `DIR/<base64(image reference)>/<layer digest>/` before downloading it, and needs
//! three entries there: `diff` (the layer's tree, used as an overlayfs lower directory),
//! `info` (JSON in its own `Layer` format: digests, sizes, compression) and `blob` (the
//! compressed blob, read when the layer is copied elsewhere). Nothing exists in advance: a
//! lookup of a path is what asks the store to resolve that image and layer, so this is a
//! small FUSE filesystem whose directories appear when named. Whatever cannot be served
//! lazily answers `ENOENT`, and podman falls back to its normal download.
//!
//! Use and release: containers/storage creates (and then deletes) `<layer>/use` when it
//! starts using a layer and runs `rmdir <layer>` when it releases one; a store that tracks
//! them answers `ENOENT` to both (anything else makes podman warn "GC doesn't seem to be
//! supported"). The store keeps one reference on the daemon's mount of each layer it has
//! served until the daemon stops, so a second pull after `podman rmi` finds the layer
//! mounted and cached.
//!
//! `diff` is a symbolic link to the daemon's own mount of the layer: the mount, cache and
//! fetches are the ones `lazypull run` and the containerd snapshotter use.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, Request, Session, SessionACL, SessionUnmounter,
};
use parking_lot::Mutex;

/// A layer the daemon has mounted for the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLayer {
    /// Directory holding the layer's files (the daemon's live mount): the target of `diff`.
    pub dir: PathBuf,
    /// The `info` file: containers/storage's layer JSON.
    pub info: Vec<u8>,
    /// Size of the compressed blob (`blob`'s size).
    pub blob_size: u64,
    /// The compressed layer digest, for reading the blob.
    pub blob_digest: String,
}

/// What the store needs from the daemon that owns the layer mounts.
pub trait StoreLayers: Send + Sync + 'static {
    /// Resolves `image_ref`, finds its layer `digest` (compressed or TOC digest) and mounts it
    /// lazily, taking one reference the store keeps. The error says why it cannot be served
    /// lazily: the store then answers `ENOENT` and podman downloads the layer itself.
    fn lookup(
        &self,
        image_ref: &str,
        digest: &str,
    ) -> impl Future<Output = Result<StoreLayer, String>> + Send;

    /// Reads `len` bytes at `offset` of the compressed blob of `layer` in `image_ref`.
    fn read_blob(
        &self,
        image_ref: &str,
        layer: &StoreLayer,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = Result<Bytes, String>> + Send;
}

/// Errors of mounting the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The mount itself failed.
    #[error("mounting the layer store at {path}: {source}")]
    Mount {
        /// Where.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

const ROOT: u64 = 1;
/// Attribute and entry lifetime: what exists never changes while the store is mounted.
const TTL: Duration = Duration::from_secs(3600);
const BLOCK: u32 = 4096;

#[derive(Debug, Clone)]
enum Node {
    Root,
    /// `DIR/<base64(ref)>`. Standard base64 may hold `/`, which splits the name into
    /// nested directories: `encoded` is the name so far, `image_ref` what it decodes to (if
    /// it does; a prefix may not).
    Image {
        encoded: String,
        image_ref: Option<String>,
    },
    /// `DIR/<base64(ref)>/<digest>`; its files are the next three inode numbers.
    Layer {
        image_ref: String,
        layer: Arc<StoreLayer>,
    },
    Diff(Arc<StoreLayer>),
    Info(Arc<StoreLayer>),
    Blob {
        image_ref: String,
        layer: Arc<StoreLayer>,
    },
}

#[derive(Debug, Default)]
struct Table {
    nodes: HashMap<u64, Node>,
    /// (parent inode, name) -> inode.
    names: HashMap<(u64, OsString), u64>,
    next: u64,
    /// Per layer directory inode: uses announced minus releases (for the log).
    uses: HashMap<u64, Arc<AtomicI64>>,
}

impl Table {
    fn new() -> Table {
        let mut t = Table {
            next: ROOT + 1,
            ..Table::default()
        };
        t.nodes.insert(ROOT, Node::Root);
        t
    }

    fn child(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.names.get(&(parent, name.to_os_string())).copied()
    }

    /// The directory for the encoded reference `encoded`, named `name` under `parent`.
    fn add_image(&mut self, parent: u64, name: &OsStr, encoded: String) -> u64 {
        if let Some(ino) = self.child(parent, name) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        let image_ref = decode_ref(&encoded);
        self.nodes.insert(ino, Node::Image { encoded, image_ref });
        self.names.insert((parent, name.to_os_string()), ino);
        ino
    }

    fn add_layer(&mut self, parent: u64, name: &OsStr, image_ref: &str, layer: StoreLayer) -> u64 {
        if let Some(ino) = self.child(parent, name) {
            return ino;
        }
        let layer = Arc::new(layer);
        let ino = self.next;
        self.next += 4;
        self.nodes.insert(
            ino,
            Node::Layer {
                image_ref: image_ref.to_string(),
                layer: layer.clone(),
            },
        );
        self.nodes.insert(ino + 1, Node::Diff(layer.clone()));
        self.nodes.insert(ino + 2, Node::Info(layer.clone()));
        self.nodes.insert(
            ino + 3,
            Node::Blob {
                image_ref: image_ref.to_string(),
                layer,
            },
        );
        self.names.insert((parent, name.to_os_string()), ino);
        for (i, n) in ["diff", "info", "blob"].iter().enumerate() {
            self.names
                .insert((ino, OsString::from(n)), ino + 1 + i as u64);
        }
        self.uses.insert(ino, Arc::new(AtomicI64::new(0)));
        ino
    }
}

/// The FUSE side of the store.
struct StoreFs<B: StoreLayers> {
    backend: Arc<B>,
    runtime: tokio::runtime::Handle,
    table: Arc<Mutex<Table>>,
    /// Serialises layer lookups, so two lookups of one layer mount it once.
    resolving: Arc<tokio::sync::Mutex<()>>,
    owner: Attrs,
}

/// The image reference an encoded name stands for: base64 (standard alphabet, as
/// containers/storage writes it) of a reference.
fn decode_ref(encoded: &str) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(encoded.as_bytes())
        .ok()?;
    let s = String::from_utf8(raw).ok()?;
    let plausible = !s.is_empty()
        && s.len() <= 512
        && s.bytes().all(|b| b.is_ascii_graphic())
        && !s.contains("..");
    plausible.then_some(s)
}

/// Whether `s` uses only the standard base64 alphabet (without `/`, which splits names).
fn is_base64(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
}

/// Whether `name` looks like a digest (`algorithm:hex`), before asking the daemon.
fn plausible_digest(name: &OsStr) -> bool {
    let Some(s) = name.to_str() else {
        return false;
    };
    match s.split_once(':') {
        Some((alg, hex)) => {
            !alg.is_empty()
                && alg.bytes().all(|b| b.is_ascii_alphanumeric())
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

impl<B: StoreLayers> StoreFs<B> {
    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        self.owner.attr(ino, node)
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.table
            .lock()
            .nodes
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    fn entries(&self, ino: u64) -> Vec<(u64, FileType, OsString)> {
        let t = self.table.lock();
        let mut v: Vec<(u64, FileType, OsString)> = t
            .names
            .iter()
            .filter(|((p, _), _)| *p == ino)
            .map(|((_, name), child)| {
                let kind = match t.nodes.get(child) {
                    Some(Node::Diff(_)) => FileType::Symlink,
                    Some(Node::Info(_) | Node::Blob { .. }) => FileType::RegularFile,
                    _ => FileType::Directory,
                };
                (*child, kind, name.clone())
            })
            .collect();
        v.sort_by_key(|(child, _, _)| *child);
        v
    }
}

impl<B: StoreLayers> Filesystem for StoreFs<B> {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent_node = match self.node(parent) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        // (Bound first: a guard in the `if let` would live through its body.)
        let known = self.table.lock().child(parent.0, name);
        if let Some(ino) = known {
            return match self.node(INodeNo(ino)) {
                Ok(n) => reply.entry(&TTL, &self.attr(ino, &n), Generation(0)),
                Err(e) => reply.error(e),
            };
        }
        // A name that continues an encoded reference (after a `/` of base64).
        let continued = |prefix: Option<&str>| -> Option<String> {
            let part = name.to_str().filter(|n| is_base64(n))?;
            let encoded = match prefix {
                Some(p) => format!("{p}/{part}"),
                None => part.to_string(),
            };
            (encoded.len() <= 2048).then_some(encoded)
        };
        let image = match &parent_node {
            Node::Root => continued(None),
            Node::Image { encoded, .. } if !plausible_digest(name) => continued(Some(encoded)),
            _ => None,
        };
        if let Some(encoded) = image {
            let ino = self.table.lock().add_image(parent.0, name, encoded);
            return match self.node(INodeNo(ino)) {
                Ok(n) => reply.entry(&TTL, &self.attr(ino, &n), Generation(0)),
                Err(e) => reply.error(e),
            };
        }
        match parent_node {
            Node::Image {
                image_ref: Some(image_ref),
                ..
            } if plausible_digest(name) => {
                let backend = self.backend.clone();
                let table = self.table.clone();
                let resolving = self.resolving.clone();
                let name = name.to_os_string();
                let owner = self.owner;
                // Resolving may take round trips to the registry: answer from a task, so the
                // session keeps serving other requests meanwhile.
                self.runtime.spawn(async move {
                    let _one = resolving.lock().await;
                    let known = {
                        let t = table.lock();
                        t.child(parent.0, &name)
                            .and_then(|ino| Some((ino, t.nodes.get(&ino)?.clone())))
                    };
                    if let Some((ino, node)) = known {
                        {
                            return reply.entry(&TTL, &owner.attr(ino, &node), Generation(0));
                        }
                    }
                    let digest = name.to_string_lossy().into_owned();
                    match backend.lookup(&image_ref, &digest).await {
                        Ok(layer) => {
                            let node = {
                                let mut t = table.lock();
                                let ino = t.add_layer(parent.0, &name, &image_ref, layer);
                                t.nodes.get(&ino).cloned().map(|n| (ino, n))
                            };
                            match node {
                                Some((ino, node)) => {
                                    reply.entry(&TTL, &owner.attr(ino, &node), Generation(0))
                                }
                                None => reply.error(Errno::EIO),
                            }
                        }
                        Err(why) => {
                            tracing::warn!(image = %image_ref, layer = %digest,
                                "layer store: not served lazily ({why}); podman will download it");
                            reply.error(Errno::ENOENT)
                        }
                    }
                });
            }
            // `use` (and anything else) does not exist: see `create`.
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: Option<FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        match self.node(ino) {
            Ok(n) => reply.attr(&TTL, &self.attr(ino.0, &n)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Ok(Node::Diff(l)) => reply.data(l.dir.as_os_str().as_bytes()),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(Node::Info(_) | Node::Blob { .. }) => {}
            Ok(Node::Diff(_)) => return reply.error(Errno::ELOOP),
            Ok(_) => return reply.error(Errno::EISDIR),
            Err(e) => return reply.error(e),
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.node(ino) {
            Ok(Node::Info(l)) => {
                let from = (offset as usize).min(l.info.len());
                let to = from.saturating_add(size as usize).min(l.info.len());
                reply.data(&l.info[from..to]);
            }
            Ok(Node::Blob { image_ref, layer }) => {
                if offset >= layer.blob_size || size == 0 {
                    return reply.data(&[]);
                }
                let len = u64::from(size).min(layer.blob_size - offset);
                let backend = self.backend.clone();
                self.runtime.spawn(async move {
                    match backend.read_blob(&image_ref, &layer, offset, len).await {
                        Ok(b) => reply.data(&b),
                        Err(why) => {
                            tracing::warn!(layer = %layer.blob_digest, offset, len,
                                "layer store: blob read failed: {why}");
                            reply.error(Errno::EIO)
                        }
                    }
                });
            }
            Ok(_) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.node(ino) {
            Ok(Node::Root | Node::Image { .. } | Node::Layer { .. }) => {}
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        }
        let mut all = vec![
            (ino.0, FileType::Directory, OsString::from(".")),
            (ino.0, FileType::Directory, OsString::from("..")),
        ];
        all.extend(self.entries(ino.0));
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (child, kind, name)) in all.into_iter().enumerate().skip(skip) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    /// containers/storage announces that it uses a layer by creating `<layer>/use`.
    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let t = self.table.lock();
        match (t.nodes.get(&parent.0), t.uses.get(&parent.0)) {
            (Some(Node::Layer { image_ref, layer }), Some(uses)) if name == "use" => {
                let n = uses.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::debug!(image = %image_ref, layer = %layer.blob_digest, uses = n,
                    "layer store: layer in use");
                reply.error(Errno::ENOENT)
            }
            _ => reply.error(Errno::EROFS),
        }
    }

    /// containers/storage releases a layer with `rmdir <layer>`.
    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let t = self.table.lock();
        let Some(ino) = t.child(parent.0, name) else {
            return reply.error(Errno::ENOENT);
        };
        match (t.nodes.get(&ino), t.uses.get(&ino)) {
            (Some(Node::Layer { image_ref, layer }), Some(uses)) => {
                let n = uses.fetch_sub(1, Ordering::Relaxed) - 1;
                tracing::debug!(image = %image_ref, layer = %layer.blob_digest, uses = n,
                    "layer store: layer released");
                reply.error(Errno::ENOENT)
            }
            _ => reply.error(Errno::EROFS),
        }
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOENT)
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS)
    }
}

/// What every entry's attributes share (owner and times); cheap to copy into tasks.
#[derive(Debug, Clone, Copy)]
struct Attrs {
    uid: u32,
    gid: u32,
    started: SystemTime,
}

impl Attrs {
    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let (kind, perm, size) = match node {
            Node::Root | Node::Image { .. } | Node::Layer { .. } => (FileType::Directory, 0o555, 0),
            Node::Diff(l) => (FileType::Symlink, 0o777, l.dir.as_os_str().len() as u64),
            Node::Info(l) => (FileType::RegularFile, 0o444, l.info.len() as u64),
            Node::Blob { layer, .. } => (FileType::RegularFile, 0o444, layer.blob_size),
        };
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }
}

/// The mounted store; dropping it unmounts.
pub struct LayerStore {
    path: PathBuf,
    unmounter: Option<SessionUnmounter>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl LayerStore {
    /// Mounts the store at `path` (created if missing; a dead mount left there by a daemon
    /// that did not stop cleanly is detached first), answering lookups through `backend` on
    /// `runtime`. Returns once the mount is live.
    pub fn mount<B: StoreLayers>(
        path: &Path,
        backend: Arc<B>,
        runtime: tokio::runtime::Handle,
    ) -> Result<LayerStore, StoreError> {
        let err = |source: io::Error| StoreError::Mount {
            path: path.to_path_buf(),
            source,
        };
        // A stale FUSE mount answers ENOTCONN to everything, canonicalize included.
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        std::fs::create_dir_all(path).map_err(err)?;
        let path = path.canonicalize().map_err(err)?;
        let fs = StoreFs {
            backend,
            runtime,
            table: Arc::new(Mutex::new(Table::new())),
            resolving: Arc::new(tokio::sync::Mutex::new(())),
            owner: Attrs {
                uid: nix::unistd::getuid().as_raw(),
                gid: nix::unistd::getgid().as_raw(),
                started: SystemTime::now(),
            },
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("lazypull-store".to_string()),
            MountOption::CUSTOM("subtype=lazypull-store".to_string()),
            MountOption::DefaultPermissions,
        ];
        // podman runs as root, but CRI-O or a rootful podman's helpers may not: the store's
        // files are world-readable by design (the layers are public to their users anyway).
        config.acl = SessionACL::All;
        let mut session = Session::new(fs, &path, &config).map_err(err)?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("lazypull-store".to_string())
            .spawn(move || session.run())
            .map_err(err)?;
        tracing::info!(path = %path.display(), "podman/CRI-O additional layer store mounted");
        Ok(LayerStore {
            path,
            unmounter: Some(unmounter),
            thread: Some(thread),
        })
    }

    /// Where the store is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Unmounts the store (lazily when busy: it disappears now, the kernel lets go later).
    pub fn unmount(mut self) {
        self.unmount_inner();
    }

    fn unmount_inner(&mut self) {
        let Some(mut u) = self.unmounter.take() else {
            return;
        };
        if u.unmount().is_err() {
            let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LayerStore {
    fn drop(&mut self) {
        self.unmount_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_base64_references_and_digests() {
        let name = base64::engine::general_purpose::STANDARD.encode("127.0.0.1:5000/app:v1");
        assert_eq!(decode_ref(&name).as_deref(), Some("127.0.0.1:5000/app:v1"));
        assert_eq!(decode_ref("use"), None);
        assert_eq!(decode_ref("not base64!"), None);
        let dots = base64::engine::general_purpose::STANDARD.encode("../../etc");
        assert_eq!(decode_ref(&dots), None);
        // Standard base64 can hold `/`: this reference's encoding does.
        let slashed = base64::engine::general_purpose::STANDARD.encode("r.io/??:v1");
        assert!(slashed.contains('/'), "{slashed}");
        assert!(slashed.split('/').all(is_base64));
        assert!(plausible_digest(OsStr::new(&format!(
            "sha256:{}",
            "ab".repeat(32)
        ))));
        assert!(!plausible_digest(OsStr::new("sha256:xyz")));
        assert!(!plausible_digest(OsStr::new("use")));
        assert!(!plausible_digest(OsStr::new("diff")));
    }

    #[test]
    fn a_layer_directory_holds_diff_info_and_blob() {
        let mut t = Table::new();
        let img = t.add_image(ROOT, OsStr::new("aW1n"), "aW1n".into());
        assert!(
            matches!(t.nodes.get(&img), Some(Node::Image { image_ref: Some(r), .. }) if r == "img")
        );
        let layer = StoreLayer {
            dir: "/x".into(),
            info: b"{}".to_vec(),
            blob_size: 10,
            blob_digest: "sha256:00".into(),
        };
        let l = t.add_layer(img, OsStr::new("sha256:aa"), "img", layer.clone());
        // Looking it up again gives the same inode (one daemon reference per layer).
        assert_eq!(t.add_layer(img, OsStr::new("sha256:aa"), "img", layer), l);
        assert!(matches!(t.nodes.get(&(l + 1)), Some(Node::Diff(_))));
        assert!(matches!(t.nodes.get(&(l + 2)), Some(Node::Info(_))));
        assert!(matches!(t.nodes.get(&(l + 3)), Some(Node::Blob { .. })));
        assert_eq!(t.child(l, OsStr::new("blob")), Some(l + 3));
        assert_eq!(t.child(l, OsStr::new("use")), None);
    }
}
