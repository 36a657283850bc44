//! The FUSE filesystem that serves one layer read-only (`LayerFs` in docs/design.md section 2).
//!
//! A mounted layer answers every metadata request (lookup, getattr, readdir, readlink, xattrs,
//! statfs) from the immutable [`Layer`] model in memory, and every read of file content through a
//! [`ContentSource`] (the chunk reader: cache, network, verification). Because nothing in a layer
//! ever changes, the kernel is told to cache aggressively: long entry/attribute TTLs (also for
//! negative lookups), `FOPEN_KEEP_CACHE` on files, `FOPEN_CACHE_DIR` on directories, cached
//! symlinks.
//!
//! Reads never block the FUSE session thread: the reply object is handed to the content source
//! together with the request and is answered from whichever thread finishes the fetch, so a
//! `stat` storm or reads of cached files stay fast while some other read waits on the registry.
//! Once a file is complete and verified on local disk, [`ContentSource::backing_file`] names it
//! and the file is opened with FUSE passthrough (kernel >= 6.9), so its reads never reach this
//! process at all.
//!
//! Whiteouts are presented as overlayfs expects them in a lower layer (docs/design.md 4.1): the model has
//! already turned `.wh.NAME` into a character device 0/0, and opaque directories get the
//! `trusted.overlay.opaque` (and `user.overlay.opaque`, for `userxattr` overlay mounts) xattr
//! with value `y`.
//!
//! **One mount per layer.** Each layer gets its own FUSE mount ([`LayerMount`]) rather than one
//! mount with a directory per layer: overlayfs takes one path per lower layer anyway, inode
//! numbers are per superblock so `NodeId + 1` needs no namespacing, every layer has its own
//! lifetime (mount when first needed, unmount when its last snapshot goes) and its own failure
//! domain (a stale mount affects one layer), and passthrough/page-cache state is per layer. A
//! store that must show many layers under one tree (the podman additional layer store) can
//! mount each layer below its own directory.
//!
//! The mount is `nodev,nosuid`, set explicitly (mount(2) grants both unless told not to): the
//! layer mounts sit under the daemon's root where any local user who can reach them could
//! otherwise open an image's device nodes (a 0666 block device is a raw host disk) or run its
//! set-user-ID binaries as their owner. Containers see the layer through overlayfs, whose own
//! mount flags govern device nodes and set-id execution inside the container (and runc's device
//! cgroup governs which devices it may open), so the raw layer mount needs neither.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Config, CopyFileRangeFlags, Errno, FileAttr, FileHandle,
    FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner,
    MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, Session, SessionACL, SessionUnmounter, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use tracing::{debug, info, warn};

use crate::metrics::{Op, OpTimer};
use crate::takeover::{JournalHandle, KernelOffer, OpenJournal};
use crate::toc::{Kind, Layer, Node, NodeId};

/// Supplies file content; implemented by the chunk reader (network + cache + verification), and
/// by tests in memory.
///
/// Both methods are called on the FUSE session thread, which serves every request of the mount:
/// they must return quickly and leave any waiting (network, decompression) to other threads.
pub trait ContentSource: Send + Sync + 'static {
    /// Read up to `size` bytes at `offset` of regular file `node`; call `done` exactly once, from
    /// any thread, possibly much later.
    ///
    /// The filesystem only asks for bytes inside the file (`offset + size <= file size`), and
    /// expects them all: a shorter answer makes it ask again for the rest (the kernel would take
    /// a short read as a shrunken file), an empty answer fails the read with EIO. The error value
    /// is an errno (EIO for failed verification or an unreachable registry).
    fn read(
        &self,
        node: NodeId,
        offset: u64,
        size: u32,
        done: Box<dyn FnOnce(Result<bytes::Bytes, i32>) + Send>,
    );

    /// A local file holding the node's complete, verified content, if there is one (enables FUSE
    /// passthrough, so the kernel reads it directly). Default: None.
    fn backing_file(&self, node: NodeId) -> Option<PathBuf> {
        let _ = node;
        None
    }
}

/// How a layer is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// The mount's source as shown in `/proc/self/mountinfo` (e.g. `lazypull:sha256:abcd…`), so
    /// stale mounts can be recognised and attributed after a restart.
    pub fsname: String,
    /// Let every user access the mount (FUSE's `allow_other`); containers run as arbitrary
    /// uids, and `default_permissions` makes the kernel check the layer's modes. Default true.
    pub allow_other: bool,
    /// Open fully cached files with FUSE passthrough when the kernel supports it. Default true.
    pub passthrough: bool,
    /// Entry and attribute cache lifetime in the kernel. Layers are immutable, so this can be
    /// long. Default one day.
    pub ttl: Duration,
    /// Also mark opaque directories with `user.overlay.opaque`, for overlay mounts with the
    /// `userxattr` option (rootless). Off by default: a normal overlay mount would show that
    /// attribute in the merged tree, which an unpacked image does not have.
    pub userxattr: bool,
    /// A file recording the open handles, so a daemon that takes the live mount over after this
    /// one died knows which files the kernel still holds open ([`LayerMount::take_over`]).
    /// Default none: a mount that will never be taken over needs none.
    pub journal: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            fsname: "lazypull".to_string(),
            allow_other: true,
            passthrough: true,
            ttl: Duration::from_secs(24 * 60 * 60),
            userxattr: false,
            journal: None,
        }
    }
}

/// Counters of one mount, for metrics and for tests that must see requests reach the daemon.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FsStats {
    /// LOOKUP requests.
    pub lookups: u64,
    /// GETATTR requests.
    pub getattrs: u64,
    /// READ requests handed to the content source (reads at or past EOF excluded).
    pub reads: u64,
    /// Bytes returned by those reads.
    pub read_bytes: u64,
    /// Opens answered with FUSE passthrough.
    pub passthrough_opens: u64,
    /// The reads that took longest to answer (network waits show up here), slowest first.
    pub slowest_reads: Vec<SlowRead>,
    /// Distinct regular files opened (the length of the access log, [`LayerMount::opened`]).
    pub opened_files: u64,
}

/// One slow READ, for "what did the workload wait on?".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowRead {
    /// The file.
    pub node: NodeId,
    /// Where in it.
    pub offset: u64,
    /// How much was asked for.
    pub len: u32,
    /// Time from request to reply.
    pub seconds: f64,
}

/// How many slow reads a mount remembers.
const SLOW_READS_KEPT: usize = 5;
/// How many opened files a mount's access log remembers (16 bytes each, plus the set).
const OPENED_KEPT: usize = 100_000;
/// Orders first opens across every mount of the process, so that the files of an image's
/// layers can be merged into one list in the order the workload opened them. It starts at 1 so
/// that 0 can mean "before any open" to a reader asking for opens after a point.
static OPEN_SEQUENCE: AtomicU64 = AtomicU64::new(1);

/// A regular file the mount served an open for, for the access log (a prefetch list recorded
/// from a real run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedFile {
    /// The file.
    pub node: NodeId,
    /// Position of its first open among all first opens of this process's mounts.
    pub sequence: u64,
}

/// The files a mount has served opens for, each once, in the order first opened.
#[derive(Debug, Default)]
struct OpenLog {
    seen: std::collections::HashSet<NodeId>,
    order: Vec<OpenedFile>,
}

/// Why mounting or unmounting a layer failed.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The FUSE device is missing (no `fuse` module, or a container without `/dev/fuse`).
    #[error("/dev/fuse is not available (load the fuse module or pass the device in): {0}")]
    NoDevice(#[source] io::Error),
    /// The mount itself failed.
    #[error("mounting layer at {mountpoint}: {source}")]
    Mount {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The mount call returned but the mount is not in the mount table.
    #[error("FUSE mount at {0} does not appear in /proc/self/mountinfo")]
    NotLive(PathBuf),
    /// Unmounting failed, even lazily.
    #[error("unmounting {mountpoint}: {source}")]
    Unmount {
        /// Where.
        mountpoint: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A mount point could not be examined.
    #[error("inspecting {path}: {source}")]
    Inspect {
        /// What.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// xattrs overlayfs reads on a lower directory to see whether it is opaque.
const OPAQUE_XATTRS: [&[u8]; 2] = [b"trusted.overlay.opaque", b"user.overlay.opaque"];
/// Background (readahead) requests the kernel keeps in flight before queueing: high, because
/// some of them may wait on the network while others could be served from cache.
const MAX_BACKGROUND: u16 = 128;
/// Block size reported by stat and statfs.
const BLOCK: u32 = 4096;
/// How long `unmount` waits for the session thread after the mount is gone. The thread only
/// lingers when something still holds the superblock (an overlay stacked on it, a lazily
/// detached mount with open files); it then ends on its own when that goes away.
const JOIN_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    getattrs: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    passthrough_opens: AtomicU64,
    slow: Mutex<Vec<SlowRead>>,
    opened: Mutex<OpenLog>,
}

impl Counters {
    fn note_open(&self, node: NodeId) {
        let mut log = self.opened.lock();
        if log.order.len() < OPENED_KEPT && log.seen.insert(node) {
            let sequence = OPEN_SEQUENCE.fetch_add(1, Ordering::Relaxed);
            log.order.push(OpenedFile { node, sequence });
        }
    }

    fn note_read(&self, read: SlowRead) {
        let mut slow = self.slow.lock();
        if slow.len() >= SLOW_READS_KEPT && slow.last().is_some_and(|l| l.seconds >= read.seconds) {
            return;
        }
        slow.push(read);
        slow.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        slow.truncate(SLOW_READS_KEPT);
    }

    fn snapshot(&self) -> FsStats {
        FsStats {
            lookups: self.lookups.load(Ordering::Relaxed),
            getattrs: self.getattrs.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            read_bytes: self.read_bytes.load(Ordering::Relaxed),
            passthrough_opens: self.passthrough_opens.load(Ordering::Relaxed),
            slowest_reads: self.slow.lock().clone(),
            opened_files: self.opened.lock().order.len() as u64,
        }
    }
}

/// A passthrough backing file registered with the kernel, and its raw id (for the journal).
type Backing = (BackingId, u32);

/// One open file handle.
#[derive(Debug)]
struct Handle {
    node: NodeId,
    /// The passthrough backing this handle uses; dropping the last reference closes the kernel's
    /// backing id.
    backing: Option<Arc<Backing>>,
    /// Opened by a previous daemon in passthrough mode with this backing id, which nothing
    /// here owns yet (see [`InodeIo::inherited`]).
    inherited: Option<u32>,
}

/// Per-inode io mode. The kernel refuses (with EIO to the caller) a passthrough open of an inode
/// that is open in cached mode, a cached open of one open in passthrough mode, and a second,
/// different backing file for one inode; this tracks enough to never ask for any of those.
#[derive(Debug, Default)]
struct InodeIo {
    /// Handles open without passthrough.
    cached: u32,
    /// The backing id the passthrough handles of this inode share.
    backing: Weak<Backing>,
    /// The raw backing id of passthrough handles a previous daemon opened and the kernel still
    /// holds (a taken-over mount). A new open of the inode must use this very id: the kernel
    /// refuses a second backing file for an inode (EIO). Wrapped into `backing` at the first
    /// such open; left to the kernel (closed with the connection) if none comes.
    inherited: Option<u32>,
}

#[derive(Debug)]
struct OpenTable {
    next_fh: u64,
    handles: HashMap<u64, Handle>,
    inodes: HashMap<NodeId, InodeIo>,
    /// Where the handles are recorded for a successor daemon.
    journal: OpenJournal,
}

impl OpenTable {
    fn new(journal: OpenJournal) -> OpenTable {
        OpenTable {
            next_fh: 0,
            handles: HashMap::new(),
            inodes: HashMap::new(),
            journal,
        }
    }

    /// A table holding the handles a previous daemon left open (from its journal).
    fn inherit(journal: OpenJournal, open: BTreeMap<u64, JournalHandle>) -> OpenTable {
        let mut table = OpenTable::new(journal);
        for (fh, h) in open {
            table.next_fh = table.next_fh.max(fh);
            let io = table.inodes.entry(h.node).or_default();
            match h.backing {
                Some(id) => io.inherited = Some(id),
                None => io.cached += 1,
            }
            table.handles.insert(
                fh,
                Handle {
                    node: h.node,
                    backing: None,
                    inherited: h.backing,
                },
            );
        }
        table
    }

    fn insert(&mut self, handle: Handle, backing_id: Option<u32>) -> FileHandle {
        self.next_fh += 1;
        self.journal.opened(self.next_fh, handle.node, backing_id);
        self.handles.insert(self.next_fh, handle);
        FileHandle(self.next_fh)
    }
}

/// The `fuser` filesystem serving one layer.
struct LayerFs {
    layer: Arc<Layer>,
    source: Arc<dyn ContentSource>,
    ttl: Duration,
    /// Names under which opaque directories carry the overlay opaque marker.
    opaque_xattrs: &'static [&'static [u8]],
    /// The mount wants passthrough.
    want_passthrough: bool,
    /// Passthrough was granted by the kernel and has not failed since.
    passthrough: AtomicBool,
    counters: Arc<Counters>,
    opens: Mutex<OpenTable>,
    /// Sum of regular file sizes in blocks, for statfs.
    total_blocks: u64,
    /// A duplicate of the session's `/dev/fuse` descriptor (set once the session exists), for
    /// registering passthrough backing files with an id this process knows (the journal
    /// records it).
    device: Arc<std::sync::OnceLock<OwnedFd>>,
    /// What the kernel offered in FUSE_INIT.
    offer: Arc<Mutex<Option<KernelOffer>>>,
}

/// The owner of backing id `raw`: closes it when dropped.
///
/// `raw` must be an id open on this mount's connection that nothing else owns or closes: one
/// just returned by `FUSE_DEV_IOC_BACKING_OPEN`, or one a dead predecessor left open (its
/// journal names it). Ids are per connection, so a wrong one can only make the kernel refuse
/// the open of this mount's own file (EIO), never reach another mount's files.
#[allow(unsafe_code)]
fn wrap_backing(reply: &ReplyOpen, raw: u32) -> BackingId {
    // SAFETY: fuser's only requirement is the one stated above (a live id of this connection
    // with no other owner, so it is closed once).
    unsafe { reply.wrap_backing(raw) }
}

fn node_id(ino: INodeNo) -> Option<NodeId> {
    ino.0.checked_sub(1).and_then(|n| NodeId::try_from(n).ok())
}

fn ino(id: NodeId) -> INodeNo {
    INodeNo(u64::from(id) + 1)
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

/// The kernel's 32-bit `new_encode_dev`, which FUSE's `rdev` field carries.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Seconds since the epoch as a time, clamped instead of overflowing (mtimes come from the
/// layer, which is untrusted input).
fn to_time(secs: i64) -> SystemTime {
    let d = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(d)
    } else {
        UNIX_EPOCH.checked_sub(d)
    };
    t.unwrap_or(UNIX_EPOCH)
}

/// Names overlayfs interprets; a layer's own values for them are not shown, so only the
/// layer's whiteout entries (not arbitrary tar xattrs) can steer overlayfs (redirects, metacopy,
/// origin).
fn overlay_private(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// Answers a getxattr/listxattr with `data`, following the size protocol: size 0 asks for the
/// length, a too small buffer is ERANGE.
fn reply_xattr(reply: ReplyXattr, size: u32, data: &[u8]) {
    let Ok(len) = u32::try_from(data.len()) else {
        reply.error(Errno::E2BIG);
        return;
    };
    if size == 0 {
        reply.size(len);
    } else if len > size {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl LayerFs {
    fn new(
        layer: Arc<Layer>,
        source: Arc<dyn ContentSource>,
        opts: &MountOptions,
        opens: OpenTable,
    ) -> LayerFs {
        let total_bytes: u64 = (0..layer.len())
            .filter_map(|i| layer.node(i as NodeId))
            .filter(|n| n.kind == Kind::File)
            .map(|n| n.size)
            .fold(0u64, u64::saturating_add);
        LayerFs {
            layer,
            source,
            ttl: opts.ttl,
            opaque_xattrs: if opts.userxattr {
                &OPAQUE_XATTRS[..]
            } else {
                &OPAQUE_XATTRS[..1]
            },
            want_passthrough: opts.passthrough,
            passthrough: AtomicBool::new(false),
            counters: Arc::new(Counters::default()),
            opens: Mutex::new(opens),
            total_blocks: total_bytes.div_ceil(u64::from(BLOCK)),
            device: Arc::new(std::sync::OnceLock::new()),
            offer: Arc::new(Mutex::new(None)),
        }
    }

    /// The node behind a kernel inode number; ENOENT for anything the layer does not have.
    fn get(&self, ino: INodeNo) -> Result<(NodeId, &Node), Errno> {
        let id = node_id(ino).ok_or(Errno::ENOENT)?;
        let node = self.layer.node(id).ok_or(Errno::ENOENT)?;
        Ok((id, node))
    }

    fn attr(&self, id: NodeId, node: &Node) -> FileAttr {
        let t = to_time(node.mtime);
        FileAttr {
            ino: ino(id),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: file_type(node.kind),
            perm: (node.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: match node.kind {
                Kind::CharDevice | Kind::BlockDevice => encode_dev(node.dev_major, node.dev_minor),
                _ => 0,
            },
            blksize: BLOCK,
            flags: 0,
        }
    }

    /// A directory's entries including `.` and `..`, in the order readdir offsets index.
    fn dir_entries(&self, id: NodeId, node: &Node) -> impl Iterator<Item = (&[u8], NodeId)> + '_ {
        [(&b"."[..], id), (&b".."[..], node.parent)]
            .into_iter()
            .chain(self.layer.children(id))
    }

    fn xattr<'a>(&'a self, id: NodeId, node: &Node, name: &[u8]) -> Option<&'a [u8]> {
        if node.kind == Kind::Dir && node.opaque && self.opaque_xattrs.contains(&name) {
            return Some(b"y");
        }
        if overlay_private(name) {
            return None;
        }
        self.layer
            .xattrs(id)
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// Opens the node's backing file for passthrough, if it has a usable one. Turns passthrough
    /// off for the mount when the kernel refuses it.
    fn open_backing(&self, id: NodeId, node: &Node, reply: &ReplyOpen) -> Option<(BackingId, u32)> {
        if !self.passthrough.load(Ordering::Relaxed) {
            return None;
        }
        let device = self.device.get()?;
        let path = self.source.backing_file(id)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                debug!(path = %path.display(), error = %e, "backing file unusable, serving reads");
                return None;
            }
        };
        // The kernel reads the backing file up to its own end, so a wrong-sized one would show
        // wrong content.
        match file.metadata() {
            Ok(m) if m.is_file() && m.len() == node.size => {}
            Ok(m) => {
                warn!(
                    path = %path.display(),
                    backing_size = m.len(),
                    size = node.size,
                    "backing file does not match the layer's file; not using passthrough"
                );
                return None;
            }
            Err(e) => {
                debug!(path = %path.display(), error = %e, "backing file unusable, serving reads");
                return None;
            }
        }
        match BackingId::create_raw(device, &file) {
            Ok(raw) => Some((wrap_backing(reply, raw), raw)),
            Err(e) => {
                if self.passthrough.swap(false, Ordering::Relaxed) {
                    info!(
                        error = %e,
                        "kernel refused a FUSE passthrough backing file; this mount serves all \
                         reads through the daemon"
                    );
                }
                None
            }
        }
    }
}

/// One READ in flight: asks the source again for the remainder if it answers short.
struct ReadOp {
    source: Arc<dyn ContentSource>,
    counters: Arc<Counters>,
    node: NodeId,
    /// Next offset to ask for.
    offset: u64,
    /// Bytes still wanted.
    remaining: u32,
    /// Bytes received so far, when the source answered in pieces.
    acc: Vec<u8>,
    reply: ReplyData,
    /// Observes the READ's latency when the operation is done (replied or dropped).
    _timer: ReadTimer,
}

/// Times one READ for the metrics and the mount's slowest-reads list.
struct ReadTimer {
    counters: Arc<Counters>,
    node: NodeId,
    offset: u64,
    len: u32,
    start: Instant,
    _op: OpTimer,
}

impl Drop for ReadTimer {
    fn drop(&mut self) {
        self.counters.note_read(SlowRead {
            node: self.node,
            offset: self.offset,
            len: self.len,
            seconds: self.start.elapsed().as_secs_f64(),
        });
    }
}

/// Hand-over between [`ReadOp::start`] and the source's `done` callback. A callback that runs
/// while `source.read` is still on the stack (a synchronous source) parks its result here and
/// `start` continues in its loop, so a source answering in many small pieces cannot grow the
/// stack.
struct ReadHandOver {
    op: Option<ReadOp>,
    in_call: bool,
    early: Option<Result<bytes::Bytes, i32>>,
}

impl ReadOp {
    fn start(self) {
        let mut op = self;
        loop {
            let source = Arc::clone(&op.source);
            let (node, offset, size) = (op.node, op.offset, op.remaining);
            let shared = Arc::new(Mutex::new(ReadHandOver {
                op: Some(op),
                in_call: true,
                early: None,
            }));
            let theirs = Arc::clone(&shared);
            source.read(
                node,
                offset,
                size,
                Box::new(move |res| {
                    let mut h = theirs.lock();
                    if h.in_call {
                        h.early = Some(res);
                        return;
                    }
                    let Some(op) = h.op.take() else { return };
                    drop(h);
                    if let Some(next) = op.step(res) {
                        next.start();
                    }
                }),
            );
            let mut h = shared.lock();
            h.in_call = false;
            // No early result: the callback carries on when the data arrives. (If the source
            // drops `done` unanswered, dropping the reply answers EIO.)
            let Some(res) = h.early.take() else { return };
            let Some(o) = h.op.take() else { return };
            drop(h);
            match o.step(res) {
                Some(next) => op = next,
                None => return,
            }
        }
    }

    /// Takes one answer of the source: replies (and returns None), or returns the operation
    /// when more bytes must be asked for.
    fn step(mut self, res: Result<bytes::Bytes, i32>) -> Option<ReadOp> {
        let data = match res {
            Err(errno) => {
                self.reply.error(Errno::from_i32(errno));
                return None;
            }
            Ok(data) if data.is_empty() => {
                warn!(
                    node = self.node,
                    offset = self.offset,
                    "content source returned no data inside the file"
                );
                self.reply.error(Errno::EIO);
                return None;
            }
            Ok(data) => data,
        };
        let n = data.len().min(self.remaining as usize);
        self.counters
            .read_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        if self.acc.is_empty() && n == self.remaining as usize {
            self.reply.data(&data[..n]);
            return None;
        }
        self.acc.extend_from_slice(&data[..n]);
        self.offset += n as u64;
        self.remaining -= n as u32;
        if self.remaining == 0 {
            self.reply.data(&self.acc);
            return None;
        }
        Some(self)
    }
}

impl Filesystem for LayerFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        *self.offer.lock() = Some(KernelOffer {
            minor: config.kernel_abi().1,
            capabilities: config.capabilities().bits(),
        });
        // Optional features: ignore what the kernel does not offer.
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_PARALLEL_DIROPS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        if self.want_passthrough {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => {
                    // Depth 1: backing files live on a plain filesystem, and overlayfs can still
                    // stack on this mount (overlay over depth 2 would exceed the kernel's limit).
                    let _ = config.set_max_stack_depth(1);
                    self.passthrough.store(true, Ordering::Relaxed);
                }
                Err(_) => info!(
                    "kernel does not offer FUSE passthrough; cached files are read through the daemon"
                ),
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _timer = OpTimer::new(Op::Lookup);
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let (dir, node) = match self.get(parent) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        if node.kind != Kind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        match self.layer.lookup(dir, name.as_bytes()) {
            Some(id) => match self.layer.node(id) {
                Some(n) => reply.entry(&self.ttl, &self.attr(id, n), Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            None => {
                // Node id 0 with a TTL: the kernel caches the miss (a negative dentry), which
                // saves the many failing lookups of path searches (PATH, PYTHONPATH, ld.so).
                let mut attr = self.attr(dir, node);
                attr.ino = INodeNo(0);
                reply.entry(&self.ttl, &attr, Generation(0));
            }
        }
    }

    fn forget(&self, _req: &Request, _ino: INodeNo, _nlookup: u64) {
        // Inodes are the layer's nodes and live as long as the mount: nothing to release.
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _timer = OpTimer::new(Op::Getattr);
        self.counters.getattrs.fetch_add(1, Ordering::Relaxed);
        match self.get(ino) {
            Ok((id, node)) => reply.attr(&self.ttl, &self.attr(id, node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let _timer = OpTimer::new(Op::Readlink);
        let id = match self.get(ino) {
            Ok((id, _)) => id,
            Err(e) => return reply.error(e),
        };
        match self.layer.link_target(id) {
            Some(target) => reply.data(target),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _timer = OpTimer::new(Op::Open);
        let (id, node) = match self.get(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match node.kind {
            Kind::File => {}
            Kind::Dir => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::EINVAL),
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        self.counters.note_open(id);
        // NOFLUSH: flush is a no-op here, so close() need not wait for the daemon.
        let noflush = FopenFlags::FOPEN_NOFLUSH;
        let mut guard = self.opens.lock();
        let table = &mut *guard;
        let io = table.inodes.entry(id).or_default();
        // An inode already open in passthrough mode must keep using the same backing id.
        let backing = match (io.backing.upgrade(), io.inherited) {
            (Some(b), _) => Some(b),
            (None, Some(raw)) => {
                // A previous daemon opened `raw` on this connection and never closed it (its
                // handles are still open); from here on it has exactly one owner.
                let b = Arc::new((wrap_backing(&reply, raw), raw));
                io.backing = Arc::downgrade(&b);
                io.inherited = None;
                // The inherited handles share it, so it stays open while any of them is.
                for h in table.handles.values_mut() {
                    if h.node == id && h.inherited.take().is_some() {
                        h.backing = Some(Arc::clone(&b));
                    }
                }
                Some(b)
            }
            (None, None) if io.cached == 0 => self.open_backing(id, node, &reply).map(|b| {
                let b = Arc::new(b);
                io.backing = Arc::downgrade(&b);
                b
            }),
            (None, None) => None,
        };
        match backing {
            Some(b) => {
                let fh = table.insert(
                    Handle {
                        node: id,
                        backing: Some(Arc::clone(&b)),
                        inherited: None,
                    },
                    Some(b.1),
                );
                self.counters
                    .passthrough_opens
                    .fetch_add(1, Ordering::Relaxed);
                // Only the passthrough-compatible flags: the kernel fails the open (EIO) if
                // e.g. KEEP_CACHE comes with PASSTHROUGH; the page cache is not used anyway.
                reply.opened_passthrough(fh, noflush, &b.0);
            }
            None => {
                io.cached += 1;
                let fh = table.insert(
                    Handle {
                        node: id,
                        backing: None,
                        inherited: None,
                    },
                    None,
                );
                // KEEP_CACHE: the content never changes, so pages cached by an earlier open
                // stay valid.
                reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE | noflush);
            }
        }
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
        let (id, node) = match self.get(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match node.kind {
            Kind::File => {}
            Kind::Dir => return reply.error(Errno::EISDIR),
            _ => return reply.error(Errno::EINVAL),
        }
        if offset >= node.size || size == 0 {
            return reply.data(&[]);
        }
        // Fits in u32: bounded by `size`.
        let size = (node.size - offset).min(u64::from(size)) as u32;
        let _span = tracing::debug_span!("read", node = id, offset, size).entered();
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        ReadOp {
            source: Arc::clone(&self.source),
            counters: Arc::clone(&self.counters),
            node: id,
            offset,
            remaining: size,
            acc: Vec::new(),
            reply,
            _timer: ReadTimer {
                counters: Arc::clone(&self.counters),
                node: id,
                offset,
                len: size,
                start: Instant::now(),
                _op: OpTimer::new(Op::Read),
            },
        }
        .start();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _timer = OpTimer::new(Op::Release);
        let mut guard = self.opens.lock();
        let table = &mut *guard;
        if let Some(handle) = table.handles.remove(&fh.0) {
            let node = handle.node;
            let cached = handle.backing.is_none() && handle.inherited.is_none();
            // Drops this handle's share of the backing id (closing it if it was the last).
            drop(handle);
            let handles = &table.handles;
            if let Some(io) = table.inodes.get_mut(&node) {
                let inherited_left = io.inherited.is_some()
                    && handles
                        .values()
                        .any(|h| h.node == node && h.inherited.is_some());
                if cached {
                    io.cached = io.cached.saturating_sub(1);
                }
                if !inherited_left {
                    // Nobody opens with it any more; the connection closes it at the end.
                    io.inherited = None;
                }
                if io.cached == 0 && io.backing.strong_count() == 0 && io.inherited.is_none() {
                    table.inodes.remove(&node);
                }
            }
            table.journal.released(fh.0, table.handles.is_empty());
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _timer = OpTimer::new(Op::Opendir);
        match self.get(ino) {
            Ok((_, n)) if n.kind == Kind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
            ),
            Ok(_) => reply.error(Errno::ENOTDIR),
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
        let _timer = OpTimer::new(Op::Readdir);
        let (id, node) = match self.get(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        if node.kind != Kind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (name, child)) in self.dir_entries(id, node).enumerate().skip(skip) {
            let Some(c) = self.layer.node(child) else {
                continue;
            };
            if reply.add(
                self::ino(child),
                i as u64 + 1,
                file_type(c.kind),
                OsStr::from_bytes(name),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _timer = OpTimer::new(Op::Readdirplus);
        let (id, node) = match self.get(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        if node.kind != Kind::Dir {
            return reply.error(Errno::ENOTDIR);
        }
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, (name, child)) in self.dir_entries(id, node).enumerate().skip(skip) {
            let Some(c) = self.layer.node(child) else {
                continue;
            };
            if reply.add(
                self::ino(child),
                i as u64 + 1,
                OsStr::from_bytes(name),
                &self.ttl,
                &self.attr(child, c),
                Generation(0),
            ) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _timer = OpTimer::new(Op::Statfs);
        reply.statfs(
            self.total_blocks,
            0,
            0,
            self.layer.len() as u64,
            0,
            BLOCK,
            255,
            BLOCK,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _timer = OpTimer::new(Op::Getxattr);
        let (id, node) = match self.get(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        match self.xattr(id, node, name.as_bytes()) {
            Some(value) => reply_xattr(reply, size, value),
            None => reply.error(Errno::NO_XATTR),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _timer = OpTimer::new(Op::Listxattr);
        let (id, node) = match self.get(ino) {
            Ok(x) => x,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        if node.kind == Kind::Dir && node.opaque {
            for n in self.opaque_xattrs {
                names.extend_from_slice(n);
                names.push(0);
            }
        }
        for (k, _) in self.layer.xattrs(id) {
            if !overlay_private(k) {
                names.extend_from_slice(k);
                names.push(0);
            }
        }
        reply_xattr(reply, size, &names);
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _timer = OpTimer::new(Op::Access);
        match self.get(ino) {
            Ok(_) if mask.contains(AccessFlags::W_OK) => reply.error(Errno::EROFS),
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    // Everything below would change the layer: a layer is immutable, so EROFS (fuser's defaults
    // would say ENOSYS, which some callers take as "try another way").

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
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
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }
}

/// A layer mounted read-only with FUSE. Unmounts on [`LayerMount::unmount`] or drop, so a
/// mount never outlives the value that owns it (lazily, if something still uses it).
#[derive(Debug)]
pub struct LayerMount {
    mountpoint: PathBuf,
    /// How this mount is unmounted: fuser's handle for a mount this process made, a plain
    /// umount for one taken over; `None` once done.
    unmount: Option<Unmount>,
    thread: Option<JoinHandle<io::Result<()>>>,
    counters: Arc<Counters>,
    /// A duplicate of the connection's `/dev/fuse` descriptor, and what the kernel offered on
    /// it: what a keeper process must hold for a successor to take the mount over.
    device: OwnedFd,
    offer: Option<KernelOffer>,
}

#[derive(Debug)]
enum Unmount {
    Fuser(SessionUnmounter),
    Direct,
}

/// The fuser session options of a layer mount.
fn session_config(opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::FSName(opts.fsname.clone()),
        // A kernel option, so the direct mount(2) path sets `fuse.lazypull` too (fuser's
        // `Subtype` only reaches fusermount).
        MountOption::CUSTOM("subtype=lazypull".to_string()),
        MountOption::DefaultPermissions,
    ];
    config.acl = session_acl(opts);
    config
}

fn session_acl(opts: &MountOptions) -> SessionACL {
    if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    }
}

/// The open table a mount starts with: empty for a new mount (the journal emptied), the
/// journal's open handles for a taken-over one.
fn open_table(opts: &MountOptions, inherit: bool) -> OpenTable {
    let Some(path) = &opts.journal else {
        return OpenTable::new(OpenJournal::disabled());
    };
    match OpenJournal::open(path) {
        Ok((journal, open)) if inherit => OpenTable::inherit(journal, open),
        Ok((journal, _)) => {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0));
            OpenTable::new(journal)
        }
        Err(e) => {
            warn!(path = %path.display(), error = %e, "open-file journal unavailable; a restarted daemon cannot take this mount over");
            OpenTable::new(OpenJournal::disabled())
        }
    }
}

impl LayerMount {
    /// Mounts `layer` at `mountpoint` (an existing directory), serving file content from
    /// `source`. Returns once the mount is live: the kernel has completed the FUSE handshake and
    /// the mount is in the mount table.
    pub fn mount(
        layer: Arc<Layer>,
        source: Arc<dyn ContentSource>,
        mountpoint: &Path,
        opts: MountOptions,
    ) -> Result<LayerMount, FuseError> {
        std::fs::metadata("/dev/fuse").map_err(FuseError::NoDevice)?;
        let mount_err = |source: io::Error| FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        };
        // fuser mounts at the canonical path; unmount and mount-table checks must use it too.
        let mountpoint = mountpoint.canonicalize().map_err(mount_err)?;
        let fs = LayerFs::new(layer, source, &opts, open_table(&opts, false));
        let counters = Arc::clone(&fs.counters);
        let (device_slot, offer) = (Arc::clone(&fs.device), Arc::clone(&fs.offer));
        // Mounts and completes FUSE_INIT before returning.
        let mut session =
            Session::new(fs, &mountpoint, &session_config(&opts)).map_err(mount_err)?;
        let unmounter = session.unmount_callable();
        let device = session.as_fd().try_clone_to_owned().map_err(mount_err)?;
        let _ = device_slot.set(device.try_clone().map_err(mount_err)?);
        let offer = *offer.lock();
        let thread = std::thread::Builder::new()
            .name("lazypull-fuse".to_string())
            .spawn(move || session.run())
            .map_err(mount_err)?;
        let mut mount = LayerMount {
            mountpoint,
            unmount: Some(Unmount::Fuser(unmounter)),
            thread: Some(thread),
            counters,
            device,
            offer,
        };
        match fuse_mounted_at(&mount.mountpoint) {
            Ok(true) => {
                debug!(mountpoint = %mount.mountpoint.display(), fsname = %opts.fsname, "layer mounted");
                Ok(mount)
            }
            Ok(false) => {
                let _ = mount.unmount_inner();
                Err(FuseError::NotLive(mount.mountpoint.clone()))
            }
            Err(source) => {
                let _ = mount.unmount_inner();
                Err(FuseError::Inspect {
                    path: PathBuf::from("/proc/self/mountinfo"),
                    source,
                })
            }
        }
    }

    /// Serves `layer` on `device`, the live connection of a mount at `mountpoint` whose daemon
    /// died (a keeper process held the descriptor), instead of mounting anew: containers with
    /// the old mount in their overlays keep working, and the requests they queued meanwhile
    /// are answered. `mountpoint` must be the path the mount was made at; it is not touched
    /// (a lookup there would wait for this very process). `layer` must be built from the same
    /// TOC (inode numbers are positions in it) and `opts.journal` name the previous journal.
    pub fn take_over(
        layer: Arc<Layer>,
        source: Arc<dyn ContentSource>,
        mountpoint: &Path,
        opts: MountOptions,
        device: OwnedFd,
        offer: KernelOffer,
    ) -> Result<LayerMount, FuseError> {
        let mount_err = |source: io::Error| FuseError::Mount {
            mountpoint: mountpoint.to_path_buf(),
            source,
        };
        match fuse_mounted_at(mountpoint) {
            Ok(true) => {}
            Ok(false) => return Err(FuseError::NotLive(mountpoint.to_path_buf())),
            Err(source) => {
                return Err(FuseError::Inspect {
                    path: PathBuf::from("/proc/self/mountinfo"),
                    source,
                })
            }
        }
        let fs = LayerFs::new(layer, source, &opts, open_table(&opts, true));
        let counters = Arc::clone(&fs.counters);
        let device_slot = Arc::clone(&fs.device);
        let kept = device.try_clone().map_err(mount_err)?;
        let session = crate::takeover::take_over_session(
            fs,
            device,
            offer,
            session_acl(&opts),
            session_config(&opts),
        )
        .map_err(mount_err)?;
        let _ = device_slot.set(session.as_fd().try_clone_to_owned().map_err(mount_err)?);
        match crate::takeover::resend_unanswered(session.as_fd()) {
            Ok(()) => {}
            // Aborted (e.g. through /sys/fs/fuse/connections): listed, but nothing to serve.
            Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => {
                return Err(FuseError::NotLive(mountpoint.to_path_buf()))
            }
            Err(e) => warn!(mountpoint = %mountpoint.display(), error = %e,
                "kernel cannot resend requests the killed daemon had taken; those wait until the mount goes"),
        }
        let thread = std::thread::Builder::new()
            .name("lazypull-fuse".to_string())
            .spawn(move || session.run())
            .map_err(mount_err)?;
        info!(mountpoint = %mountpoint.display(), fsname = %opts.fsname, "took over a live layer mount");
        Ok(LayerMount {
            mountpoint: mountpoint.to_path_buf(),
            unmount: Some(Unmount::Direct),
            thread: Some(thread),
            counters,
            device: kept,
            offer: Some(offer),
        })
    }

    /// The connection's `/dev/fuse` descriptor and the kernel's offer, for a keeper process
    /// that lets a successor [`LayerMount::take_over`] this mount. `None` if the kernel's
    /// offer was not seen (never for mounts made by this module).
    pub fn connection(&self) -> Option<(BorrowedFd<'_>, KernelOffer)> {
        Some((self.device.as_fd(), self.offer?))
    }

    /// Where the layer is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts the layer. A busy mount (open files, a process's cwd) is detached lazily: it
    /// disappears from the tree now and the kernel drops it when its last user goes.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.unmount_inner()
    }

    /// Request counters since the mount.
    pub fn stats(&self) -> FsStats {
        self.counters.snapshot()
    }

    /// The regular files this mount served opens for, each once, in the order first opened
    /// (at most 100,000): what a workload needed, as a prefetch list for the next conversion.
    pub fn opened(&self) -> Vec<OpenedFile> {
        self.counters.opened.lock().order.clone()
    }

    fn unmount_inner(&mut self) -> Result<(), FuseError> {
        let result = match self.unmount.take() {
            None => return Ok(()),
            Some(Unmount::Fuser(mut unmounter)) => unmounter.unmount(),
            Some(Unmount::Direct) => {
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty())
                    .map_err(io::Error::from)
            }
        };
        let mut detached = false;
        if let Err(e) = result {
            // Busy, or already gone (unmounted from outside, or a dead connection detached by
            // `unmount_stale`). fuser has given up its handle either way, so nothing else will
            // unmount this path behind our back.
            let still = fuse_mounted_at(&self.mountpoint).unwrap_or(true);
            if still {
                nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
                    |errno| FuseError::Unmount {
                        mountpoint: self.mountpoint.clone(),
                        source: io::Error::from(errno),
                    },
                )?;
                info!(mountpoint = %self.mountpoint.display(), reason = %e, "layer busy, detached lazily");
                detached = true;
            }
        }
        if let Some(thread) = self.thread.take() {
            // A detached mount's session serves its remaining users; do not wait for it.
            let wait = if detached { Duration::ZERO } else { JOIN_WAIT };
            let deadline = Instant::now() + wait;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                match thread.join() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(error = %e, "FUSE session ended with an error"),
                    Err(_) => warn!("FUSE session thread panicked"),
                }
            } else {
                // The superblock is still in use (an overlay on top, or open files of a
                // detached mount); the session ends by itself when the kernel lets go.
                debug!(mountpoint = %self.mountpoint.display(), "FUSE session still referenced; leaving it to finish");
            }
        }
        Ok(())
    }
}

impl Drop for LayerMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount_inner() {
            warn!(error = %e, "unmounting layer on drop");
        }
    }
}

/// Detaches a dead FUSE mount at `mountpoint` (its daemon is gone, so every request fails with
/// "transport endpoint is not connected"), e.g. left by a daemon that crashed before a restart.
/// Returns whether there was one. Live mounts, other filesystems and plain directories are left
/// alone.
pub fn unmount_stale(mountpoint: &Path) -> Result<bool, FuseError> {
    let inspect = |source: io::Error| FuseError::Inspect {
        path: mountpoint.to_path_buf(),
        source,
    };
    // Made absolute without canonicalize(): resolving the path would touch the dead mount.
    let path = if mountpoint.is_absolute() {
        mountpoint.to_path_buf()
    } else {
        std::env::current_dir().map_err(inspect)?.join(mountpoint)
    };
    if !fuse_mounted_at(&path).map_err(inspect)? {
        return Ok(false);
    }
    // statfs always asks the daemon (stat may be answered from attributes the kernel cached
    // for a day), so it tells a dead connection from a live one.
    match nix::sys::statvfs::statvfs(&path) {
        Ok(_) => Ok(false),
        Err(nix::errno::Errno::ENOTCONN) | Err(nix::errno::Errno::ECONNABORTED) => {
            nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH).map_err(|errno| {
                FuseError::Unmount {
                    mountpoint: path.clone(),
                    source: io::Error::from(errno),
                }
            })?;
            info!(mountpoint = %path.display(), "detached stale FUSE mount");
            Ok(true)
        }
        Err(errno) => Err(inspect(io::Error::from(errno))),
    }
}

/// Whether a FUSE filesystem is mounted exactly at `path` (canonical) in this process's mount
/// namespace. Reads the mount table only: never touches the mount (whose server may be this
/// very process, not serving yet).
pub fn fuse_mounted_at(path: &Path) -> io::Result<bool> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    let want = path.as_os_str().as_bytes();
    Ok(info.split(|&b| b == b'\n').any(|line| {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == b"-") else {
            return false;
        };
        fields.len() > 4
            && unescape_mountinfo(fields[4]) == want
            && fields
                .get(sep + 1)
                .is_some_and(|t| *t == b"fuse" || t.starts_with(b"fuse."))
    }))
}

/// Undoes mountinfo's octal escapes (`\040` for space, etc.).
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' && i + 3 < field.len() {
            let oct = &field[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(b) = u8::try_from(v) {
                    out.push(b);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_encoding_matches_libc_for_32_bit_numbers() {
        for (ma, mi) in [(0, 0), (8, 1), (8, 300), (259, 70000), (4095, 0xfffff)] {
            assert_eq!(u64::from(encode_dev(ma, mi)), libc::makedev(ma, mi));
        }
    }

    #[test]
    fn times_never_overflow() {
        assert_eq!(to_time(0), UNIX_EPOCH);
        assert_eq!(to_time(10), UNIX_EPOCH + Duration::from_secs(10));
        let _ = to_time(i64::MAX);
        let _ = to_time(i64::MIN);
    }

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo(br"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(br"/a\\"), br"/a\\");
        assert_eq!(unescape_mountinfo(br"/x\04"), br"/x\04");
    }

    #[test]
    fn inode_numbers() {
        assert_eq!(node_id(INodeNo(0)), None);
        assert_eq!(node_id(INodeNo(1)), Some(0));
        assert_eq!(node_id(INodeNo(u64::MAX)), None);
        assert_eq!(ino(0), INodeNo::ROOT);
    }
}
