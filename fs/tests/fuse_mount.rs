//! Real FUSE mounts of in-memory layers: the tree, attributes, content, xattrs and whiteouts as
//! the kernel (and overlayfs on top) sees them, reads that never block the session, errors,
//! read-only-ness, passthrough and stale-mount clean-up.
//!
//! Every mount lives under a per-test temporary directory and is unmounted by a guard's `Drop`
//! even when an assertion fails; each test ends by checking that nothing is left mounted there.
//! The tests skip (with a message) only when `/dev/fuse` is missing.

// Only for lgetxattr/llistxattr, which neither std nor nix wraps.
#![allow(unsafe_code)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazypull_fs::fuse::{unmount_stale, ContentSource, LayerMount, MountOptions};
use lazypull_fs::toc::{Chunk, Entry, Kind, Layer, LayerBuilder, NodeId};
use parking_lot::Mutex;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Fixtures

macro_rules! require_fuse {
    () => {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIP: /dev/fuse is missing; FUSE mount tests cannot run here");
            return;
        }
    };
}

type Done = Box<dyn FnOnce(Result<Bytes, i32>) + Send>;

/// File content by node, served from memory.
#[derive(Default)]
struct MemSource {
    files: HashMap<NodeId, Vec<u8>>,
    /// Nodes whose reads fail with EIO.
    eio: HashSet<NodeId>,
    /// Answer at most this many bytes per call (exercises the filesystem's re-asking).
    piece: Option<usize>,
    /// Backing files for passthrough, offered while `offer_backing` is set.
    backing: HashMap<NodeId, PathBuf>,
    offer_backing: AtomicBool,
}

impl MemSource {
    fn answer(&self, node: NodeId, offset: u64, size: u32) -> Result<Bytes, i32> {
        if self.eio.contains(&node) {
            return Err(libc::EIO);
        }
        let data = self.files.get(&node).ok_or(libc::EIO)?;
        let start = (offset as usize).min(data.len());
        let mut end = (start + size as usize).min(data.len());
        if let Some(p) = self.piece {
            end = end.min(start + p);
        }
        Ok(Bytes::copy_from_slice(&data[start..end]))
    }
}

impl ContentSource for MemSource {
    fn read(&self, node: NodeId, offset: u64, size: u32, done: Done) {
        done(self.answer(node, offset, size));
    }

    fn backing_file(&self, node: NodeId) -> Option<PathBuf> {
        if self.offer_backing.load(Ordering::SeqCst) {
            self.backing.get(&node).cloned()
        } else {
            None
        }
    }
}

/// Holds reads of one file until released (a stalled network fetch).
struct GateSource {
    inner: MemSource,
    gated: NodeId,
    open: AtomicBool,
    pending: Mutex<Vec<(u64, u32, Done)>>,
}

impl GateSource {
    fn release(&self) {
        self.open.store(true, Ordering::SeqCst);
        let pending = std::mem::take(&mut *self.pending.lock());
        for (offset, size, done) in pending {
            done(self.inner.answer(self.gated, offset, size));
        }
    }
}

impl ContentSource for GateSource {
    fn read(&self, node: NodeId, offset: u64, size: u32, done: Done) {
        if node == self.gated && !self.open.load(Ordering::SeqCst) {
            let mut pending = self.pending.lock();
            // Re-check under the lock so a concurrent release cannot strand this read.
            if !self.open.load(Ordering::SeqCst) {
                pending.push((offset, size, done));
                return;
            }
        }
        self.inner.read(node, offset, size, done)
    }
}

/// Opens the gate on drop, so a failing test never leaves a reader blocked.
struct GateGuard(Arc<GateSource>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Builds a layer and remembers each file's content by path.
struct Spec {
    builder: LayerBuilder,
    contents: Vec<(String, Vec<u8>)>,
}

impl Spec {
    fn new() -> Spec {
        Spec {
            builder: LayerBuilder::new(),
            contents: Vec::new(),
        }
    }

    fn add(&mut self, e: Entry) -> &mut Spec {
        self.builder.add(e).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Spec {
        let mut e = Entry::new(path, Kind::Dir);
        e.mode = mode;
        self.add(e)
    }

    fn file_with(&mut self, path: &str, content: &[u8], f: impl FnOnce(&mut Entry)) -> &mut Spec {
        let mut e = Entry::new(path, Kind::File);
        e.size = content.len() as u64;
        if !content.is_empty() {
            e.chunks.push(Chunk {
                file_offset: 0,
                size: content.len() as u64,
                blob_offset: 0,
                blob_len: 1,
                inner_offset: 0,
                digest: None,
            });
        }
        f(&mut e);
        self.contents.push((path.to_string(), content.to_vec()));
        self.add(e)
    }

    fn file(&mut self, path: &str, content: &[u8]) -> &mut Spec {
        self.file_with(path, content, |_| {})
    }

    fn whiteout(&mut self, path: &str) -> &mut Spec {
        self.add(Entry::new(path, Kind::File))
    }

    fn build(self) -> (Arc<Layer>, MemSource) {
        let layer = self.builder.build();
        let mut src = MemSource::default();
        for (path, content) in self.contents {
            if let Some(id) = layer.resolve(&path) {
                src.files.insert(id, content);
            }
        }
        (Arc::new(layer), src)
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn scratch() -> TempDir {
    tempfile::Builder::new()
        .prefix("lazypull-fuse-test-")
        .tempdir()
        .unwrap()
}

fn subdir(base: &TempDir, name: &str) -> PathBuf {
    let p = base.path().join(name);
    fs::create_dir_all(&p).unwrap();
    p
}

/// Test mounts present both opaque markers (`userxattr`), so both are checked; the default
/// (trusted only) is what `lazypull mount`'s tree comparison covers.
fn opts() -> MountOptions {
    MountOptions {
        fsname: "lazypull:test".to_string(),
        userxattr: true,
        ..MountOptions::default()
    }
}

fn mount(
    layer: &Arc<Layer>,
    source: Arc<dyn ContentSource>,
    at: &Path,
    opts: MountOptions,
) -> LayerMount {
    LayerMount::mount(Arc::clone(layer), source, at, opts).unwrap()
}

/// Mount points listed in this process's mount table (unescaped).
fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .collect()
}

fn assert_nothing_mounted_under(base: &Path) {
    let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
    let left: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(&base))
        .collect();
    assert!(left.is_empty(), "mounts left behind: {left:?}");
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// lgetxattr with a buffer of `size` bytes (0: ask for the length). Ok(length) or Err(errno).
fn getxattr(path: &Path, name: &str, size: usize) -> Result<(usize, Vec<u8>), i32> {
    let p = cpath(path);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: valid NUL-terminated strings and a buffer of `size` bytes (or null with size 0).
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), ptr, size) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok((r as usize, buf))
}

fn xattr(path: &Path, name: &str) -> Result<Vec<u8>, i32> {
    getxattr(path, name, 4096).map(|(_, v)| v)
}

fn listxattr(path: &Path) -> BTreeSet<String> {
    let p = cpath(path);
    let mut buf = vec![0u8; 4096];
    // SAFETY: valid path and a 4096-byte buffer.
    let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "{}", std::io::Error::last_os_error());
    buf.truncate(r as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn serves_tree_attributes_content_and_xattrs() {
    require_fuse!();
    let big = pseudo_random(300_001, 7);
    let hosts = b"127.0.0.1 localhost\n".to_vec();
    let mut s = Spec::new();
    s.add({
        let mut e = Entry::new("etc", Kind::Dir);
        e.mode = 0o750;
        e.uid = 3;
        e.gid = 4;
        e.mtime = 1_600_000_000;
        e
    })
    .file_with("etc/hosts", &hosts, |e| {
        e.uid = 1000;
        e.gid = 1001;
        e.mtime = 1_600_000_123;
        e.xattrs.push(("user.foo".into(), b"bar".to_vec()));
        // A layer's own overlay attributes are not shown.
        e.xattrs
            .push(("trusted.overlay.redirect".into(), b"/etc".to_vec()));
    })
    .file_with("etc/big", &big, |e| e.mode = 0o4755)
    .file("empty", b"")
    .add({
        let mut e = Entry::new("etc/hosts.link", Kind::File);
        e.hardlink_target = Some("etc/hosts".into());
        e
    })
    .add({
        let mut e = Entry::new("bin", Kind::Symlink);
        e.link_target = Some("usr/bin".into());
        e
    })
    .add({
        let mut e = Entry::new("dev/null", Kind::CharDevice);
        e.mode = 0o666;
        (e.dev_major, e.dev_minor) = (1, 3);
        e
    })
    .add({
        let mut e = Entry::new("dev/sdb", Kind::BlockDevice);
        e.mode = 0o660;
        (e.dev_major, e.dev_minor) = (8, 300);
        e
    })
    .add({
        let mut e = Entry::new("dev/nvme", Kind::BlockDevice);
        (e.dev_major, e.dev_minor) = (259, 70_000);
        e
    })
    .add({
        let mut e = Entry::new("run/fifo", Kind::Fifo);
        e.mode = 0o600;
        e
    })
    .dir("var", 0o755)
    .whiteout("var/.wh.gone")
    .whiteout("opt/.wh..wh..opq")
    .file("opt/keep", b"k");
    let (layer, src) = s.build();
    let nodes = layer.len() as u64;

    let tmp = scratch();
    let mnt = subdir(&tmp, "mnt");
    let m = mount(&layer, Arc::new(src), &mnt, opts());
    let mp = m.mountpoint().to_path_buf();

    // Directories.
    assert_eq!(
        names(&mp),
        set(&["bin", "dev", "empty", "etc", "opt", "run", "var"])
    );
    assert_eq!(names(&mp.join("etc")), set(&["big", "hosts", "hosts.link"]));
    assert_eq!(names(&mp.join("dev")), set(&["null", "nvme", "sdb"]));
    let root = fs::metadata(&mp).unwrap();
    assert_eq!(root.mode(), libc::S_IFDIR | 0o755);
    assert_eq!(root.nlink(), 2 + 5); // dev, etc, opt, run, var
    assert_eq!(root.ino(), 1);
    let etc = fs::metadata(mp.join("etc")).unwrap();
    assert_eq!(etc.mode(), libc::S_IFDIR | 0o750);
    assert_eq!((etc.uid(), etc.gid(), etc.nlink()), (3, 4, 2));
    assert_eq!(etc.mtime(), 1_600_000_000);

    // Regular files, hard links.
    let h = fs::metadata(mp.join("etc/hosts")).unwrap();
    assert_eq!(h.mode(), libc::S_IFREG | 0o644);
    assert_eq!((h.uid(), h.gid(), h.nlink()), (1000, 1001, 2));
    assert_eq!(h.size(), hosts.len() as u64);
    assert_eq!(
        (h.mtime(), h.atime(), h.ctime()),
        (1_600_000_123, 1_600_000_123, 1_600_000_123)
    );
    assert_eq!(h.blksize(), 4096);
    assert_eq!(h.blocks(), 1);
    let hl = fs::metadata(mp.join("etc/hosts.link")).unwrap();
    assert_eq!(hl.ino(), h.ino());
    let b = fs::metadata(mp.join("etc/big")).unwrap();
    assert_eq!(b.mode(), libc::S_IFREG | 0o4755);
    assert_eq!(b.size(), big.len() as u64);
    assert_eq!(fs::metadata(mp.join("empty")).unwrap().size(), 0);

    // Symlink.
    let l = fs::symlink_metadata(mp.join("bin")).unwrap();
    assert!(l.file_type().is_symlink());
    assert_eq!(l.mode() & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(l.size(), 7);
    assert_eq!(fs::read_link(mp.join("bin")).unwrap(), Path::new("usr/bin"));

    // Devices and fifo.
    let null = fs::metadata(mp.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.mode(), libc::S_IFCHR | 0o666);
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    let sdb = fs::metadata(mp.join("dev/sdb")).unwrap();
    assert!(sdb.file_type().is_block_device());
    assert_eq!(sdb.mode(), libc::S_IFBLK | 0o660);
    assert_eq!(sdb.rdev(), libc::makedev(8, 300));
    assert_eq!(
        fs::metadata(mp.join("dev/nvme")).unwrap().rdev(),
        libc::makedev(259, 70_000)
    );
    let fifo = fs::metadata(mp.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode(), libc::S_IFIFO | 0o600);

    // Whiteout and opaque directory, as overlayfs expects them.
    let wh = fs::symlink_metadata(mp.join("var/gone")).unwrap();
    assert!(wh.file_type().is_char_device());
    assert_eq!(wh.rdev(), 0);
    assert_eq!(
        xattr(&mp.join("opt"), "trusted.overlay.opaque").unwrap(),
        b"y"
    );
    assert_eq!(xattr(&mp.join("opt"), "user.overlay.opaque").unwrap(), b"y");
    assert_eq!(
        listxattr(&mp.join("opt")),
        set(&["trusted.overlay.opaque", "user.overlay.opaque"])
    );
    assert_eq!(
        xattr(&mp.join("etc"), "trusted.overlay.opaque"),
        Err(libc::ENODATA)
    );

    // Layer xattrs and the size protocol.
    let hp = mp.join("etc/hosts");
    assert_eq!(xattr(&hp, "user.foo").unwrap(), b"bar");
    assert_eq!(getxattr(&hp, "user.foo", 0).unwrap().0, 3);
    assert_eq!(getxattr(&hp, "user.foo", 2), Err(libc::ERANGE));
    assert_eq!(xattr(&hp, "user.missing"), Err(libc::ENODATA));
    assert_eq!(xattr(&hp, "trusted.overlay.redirect"), Err(libc::ENODATA));
    assert_eq!(listxattr(&hp), set(&["user.foo"]));
    assert!(listxattr(&mp.join("empty")).is_empty());

    // Missing names (cached negatively) and non-directories.
    assert_eq!(
        fs::metadata(mp.join("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        fs::metadata(mp.join("nope")).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        fs::metadata(mp.join("empty/x")).unwrap_err().raw_os_error(),
        Some(libc::ENOTDIR)
    );

    // Content: whole files, odd offsets, past EOF.
    assert_eq!(fs::read(&hp).unwrap(), hosts);
    assert_eq!(fs::read(mp.join("etc/hosts.link")).unwrap(), hosts);
    assert_eq!(fs::read(mp.join("etc/big")).unwrap(), big);
    assert!(fs::read(mp.join("empty")).unwrap().is_empty());
    assert_eq!(fs::read(mp.join("opt/keep")).unwrap(), b"k");
    let f = fs::File::open(mp.join("etc/big")).unwrap();
    for (off, len) in [
        (1u64, 10usize),
        (4095, 2),
        (4097, 70_000),
        (131_071, 3),
        (299_990, 11),
    ] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(buf, big[off as usize..off as usize + len], "offset {off}");
    }
    let mut buf = [0u8; 100];
    assert_eq!(f.read_at(&mut buf, 299_995).unwrap(), 6);
    assert_eq!(buf[..6], big[299_995..]);
    assert_eq!(f.read_at(&mut buf, 300_001).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf, 10_000_000).unwrap(), 0);
    drop(f);

    // statfs: inode count and blocks from sizes.
    let st = nix::sys::statvfs::statvfs(&mp).unwrap();
    assert_eq!(st.files() as u64, nodes);
    assert_eq!(
        st.blocks() as u64 * st.fragment_size() as u64,
        (big.len() + hosts.len() + 1).div_ceil(4096) as u64 * 4096
    );

    let stats = m.stats();
    assert!(stats.lookups > 0 && stats.reads > 0, "{stats:?}");
    assert!(
        stats.read_bytes >= (big.len() + hosts.len()) as u64,
        "{stats:?}"
    );
    m.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

#[test]
fn source_answering_in_pieces_still_reads_whole_file() {
    require_fuse!();
    let data = pseudo_random(200_000, 3);
    let mut s = Spec::new();
    s.file("f", &data);
    let (layer, mut src) = s.build();
    // Odd-sized pieces, answered synchronously: tens of thousands of hand-overs per file.
    src.piece = Some(7);
    let tmp = scratch();
    let m = mount(&layer, Arc::new(src), &subdir(&tmp, "mnt"), opts());
    assert_eq!(fs::read(m.mountpoint().join("f")).unwrap(), data);
    m.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

/// Unmounts an overlay on drop (before the layers under it, by declaration order).
struct OverlayGuard(PathBuf);

impl Drop for OverlayGuard {
    fn drop(&mut self) {
        if mount_points().contains(&self.0) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn overlayfs_merges_layers_with_whiteouts_and_opaque_dirs() {
    require_fuse!();
    let mut lower = Spec::new();
    lower
        .file("a/x", b"ax")
        .file("a/keep", b"keep")
        .file("b/y", b"by")
        .file("d/z", b"dz");
    let (lower, lower_src) = lower.build();
    let mut upper = Spec::new();
    upper
        .whiteout("a/.wh.x")
        .whiteout("d/.wh..wh..opq")
        .file("d/w", b"dw");
    let (upper, upper_src) = upper.build();

    let tmp = scratch();
    let lm = mount(&lower, Arc::new(lower_src), &subdir(&tmp, "lower"), opts());
    let um = mount(&upper, Arc::new(upper_src), &subdir(&tmp, "upper"), opts());
    let merged = subdir(&tmp, "merged").canonicalize().unwrap();
    let data = format!(
        "lowerdir={}:{}",
        um.mountpoint().display(),
        lm.mountpoint().display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(data.as_str()),
    )
    .unwrap_or_else(|e| panic!("mounting overlay with {data}: {e}"));
    let guard = OverlayGuard(merged.clone());

    assert_eq!(names(&merged), set(&["a", "b", "d"]));
    assert_eq!(names(&merged.join("a")), set(&["keep"]));
    assert!(!merged.join("a/x").exists());
    assert_eq!(fs::read(merged.join("a/keep")).unwrap(), b"keep");
    assert_eq!(fs::read(merged.join("b/y")).unwrap(), b"by");
    assert_eq!(names(&merged.join("d")), set(&["w"]));
    assert!(!merged.join("d/z").exists());
    assert_eq!(fs::read(merged.join("d/w")).unwrap(), b"dw");

    nix::mount::umount(&merged).unwrap();
    drop(guard);
    um.unmount().unwrap();
    lm.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

#[test]
fn stalled_read_does_not_block_other_requests() {
    require_fuse!();
    let slow = pseudo_random(10_000, 11);
    let mut s = Spec::new();
    s.file("slow", &slow);
    for i in 0..50 {
        s.file(&format!("many/f{i}"), b"x");
    }
    let (layer, inner) = s.build();
    let gate = Arc::new(GateSource {
        gated: layer.resolve("slow").unwrap(),
        inner,
        open: AtomicBool::new(false),
        pending: Mutex::new(Vec::new()),
    });
    let tmp = scratch();
    // TTL 0: every stat below must reach the daemon instead of the kernel's cache.
    let m = mount(
        &layer,
        Arc::clone(&gate) as Arc<dyn ContentSource>,
        &subdir(&tmp, "mnt"),
        MountOptions {
            ttl: Duration::ZERO,
            ..opts()
        },
    );
    let gate_guard = GateGuard(Arc::clone(&gate));
    let mp = m.mountpoint().to_path_buf();

    let reader = {
        let p = mp.join("slow");
        std::thread::spawn(move || fs::read(p))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.pending.lock().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the read never reached the source"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!reader.is_finished());

    let before = m.stats();
    let start = Instant::now();
    for i in 0..1000 {
        let md = fs::metadata(mp.join(format!("many/f{}", i % 50))).unwrap();
        assert_eq!(md.size(), 1);
    }
    let took = start.elapsed();
    let after = m.stats();
    assert!(took < Duration::from_secs(1), "1000 stats took {took:?}");
    assert!(
        after.lookups + after.getattrs - before.lookups - before.getattrs >= 1000,
        "stats did not reach the daemon: {before:?} -> {after:?}"
    );
    assert!(!reader.is_finished(), "gated read finished early");

    drop(gate_guard); // opens the gate
    let got = reader.join().unwrap().unwrap();
    assert_eq!(got, slow);
    m.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

#[test]
fn source_errors_reach_the_reader_as_eio() {
    require_fuse!();
    let mut s = Spec::new();
    s.file("bad", &pseudo_random(5000, 1)).file("good", b"fine");
    let (layer, mut src) = s.build();
    src.eio.insert(layer.resolve("bad").unwrap());
    let tmp = scratch();
    let m = mount(&layer, Arc::new(src), &subdir(&tmp, "mnt"), opts());
    let mut f = fs::File::open(m.mountpoint().join("bad")).unwrap();
    let mut buf = Vec::new();
    let err = f.read_to_end(&mut buf).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(fs::read(m.mountpoint().join("good")).unwrap(), b"fine");
    // Metadata of the failing file is still fine.
    assert_eq!(
        fs::metadata(m.mountpoint().join("bad")).unwrap().size(),
        5000
    );
    drop(f);
    m.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

#[test]
fn mount_is_read_only() {
    require_fuse!();
    let mut s = Spec::new();
    s.file("f", b"data").dir("d", 0o777);
    let (layer, src) = s.build();
    let tmp = scratch();
    let m = mount(&layer, Arc::new(src), &subdir(&tmp, "mnt"), opts());
    let mp = m.mountpoint();
    let erofs =
        |r: std::io::Result<()>| assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EROFS));
    erofs(fs::File::create(mp.join("new")).map(|_| ()));
    erofs(fs::File::create(mp.join("d/new")).map(|_| ()));
    erofs(
        fs::OpenOptions::new()
            .append(true)
            .open(mp.join("f"))
            .map(|_| ()),
    );
    erofs(fs::create_dir(mp.join("newdir")));
    erofs(fs::remove_file(mp.join("f")));
    erofs(fs::rename(mp.join("f"), mp.join("g")));
    erofs(std::os::unix::fs::symlink("x", mp.join("l")));
    assert_eq!(fs::read(mp.join("f")).unwrap(), b"data");
    m.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

fn passthrough_unavailable_reason() -> String {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if (major, minor) < (6, 9) {
        format!("kernel {} predates FUSE passthrough (6.9)", release.trim())
    } else {
        format!(
            "kernel {} did not grant or refused FUSE passthrough (CONFIG_FUSE_PASSTHROUGH off, \
             no CAP_SYS_ADMIN, or the backing file on a stacked filesystem)",
            release.trim()
        )
    }
}

#[test]
fn passthrough_serves_cached_files_from_the_backing_file() {
    require_fuse!();
    let content = pseudo_random(123_457, 5);
    let mut s = Spec::new();
    s.file("pt", &content)
        .file("mixed", b"mixed content")
        .file("plain", b"plain");
    let (layer, mut src) = s.build();
    let tmp = scratch();
    let backing = tmp.path().join("backing-pt");
    fs::write(&backing, &content).unwrap();
    let backing_mixed = tmp.path().join("backing-mixed");
    fs::write(&backing_mixed, b"mixed content").unwrap();
    let pt = layer.resolve("pt").unwrap();
    let mixed = layer.resolve("mixed").unwrap();
    src.backing.insert(pt, backing);
    src.backing.insert(mixed, backing_mixed);
    src.offer_backing.store(true, Ordering::SeqCst);
    let src = Arc::new(src);
    let m = mount(
        &layer,
        Arc::clone(&src) as Arc<dyn ContentSource>,
        &subdir(&tmp, "mnt"),
        opts(),
    );
    let mp = m.mountpoint().to_path_buf();

    assert_eq!(fs::read(mp.join("pt")).unwrap(), content);
    let stats = m.stats();
    let passthrough = stats.passthrough_opens == 1;
    if passthrough {
        assert_eq!(
            stats.reads, 0,
            "passthrough reads reached the daemon: {stats:?}"
        );
        eprintln!("passthrough: active");
    } else {
        assert_eq!(stats.passthrough_opens, 0);
        eprintln!(
            "passthrough: NOT used — {}; content was served through the daemon",
            passthrough_unavailable_reason()
        );
    }

    // Two handles of one inode at once share the backing file.
    let a = fs::File::open(mp.join("pt")).unwrap();
    let b = fs::File::open(mp.join("pt")).unwrap();
    let mut x = vec![0u8; 1000];
    let mut y = vec![0u8; 1000];
    a.read_exact_at(&mut x, 5).unwrap();
    b.read_exact_at(&mut y, 100_000).unwrap();
    assert_eq!(x, content[5..1005]);
    assert_eq!(y, content[100_000..101_000]);
    drop((a, b));
    if passthrough {
        assert_eq!(m.stats().passthrough_opens, 3);
    }

    // A file open without passthrough (not cached yet) must stay in that mode while open,
    // even once its backing file appears (the kernel would fail a mixed open with EIO).
    src.offer_backing.store(false, Ordering::SeqCst);
    let first = fs::File::open(mp.join("mixed")).unwrap();
    src.offer_backing.store(true, Ordering::SeqCst);
    let opens = m.stats().passthrough_opens;
    let second = fs::File::open(mp.join("mixed")).unwrap();
    let mut buf = vec![0u8; 13];
    second.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, b"mixed content");
    first.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, b"mixed content");
    assert_eq!(m.stats().passthrough_opens, opens);
    drop((first, second));

    // Files without a backing file are read normally.
    assert_eq!(fs::read(mp.join("plain")).unwrap(), b"plain");
    m.unmount().unwrap();
    assert_nothing_mounted_under(tmp.path());
}

const STALE_CHILD_ENV: &str = "LAZYPULL_FUSE_TEST_STALE_CHILD";

/// Helper run in a child process by `stale_mount_is_detached`: mounts a layer at the directory
/// named by the environment and waits to be killed, leaving a dead mount behind. Does nothing
/// when run directly.
#[test]
#[ignore = "helper for stale_mount_is_detached; runs only in its child process"]
fn stale_mount_child() {
    let Some(dir) = std::env::var_os(STALE_CHILD_ENV) else {
        return;
    };
    let mut s = Spec::new();
    s.file("f", b"x");
    let (layer, src) = s.build();
    let m = mount(&layer, Arc::new(src), Path::new(&dir), opts());
    std::mem::forget(m);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Kills the child and detaches whatever it left mounted.
struct ChildGuard(Child, PathBuf);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if mount_points().contains(&self.1) {
            let _ = nix::mount::umount2(&self.1, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

#[test]
fn stale_mount_is_detached() {
    require_fuse!();
    let tmp = scratch();
    let dir = subdir(&tmp, "stale").canonicalize().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "stale_mount_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(STALE_CHILD_ENV, &dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child, dir.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !mount_points().contains(&dir) {
        assert!(Instant::now() < deadline, "child never mounted");
        assert!(guard.0.try_wait().unwrap().is_none(), "child exited early");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Alive: left alone.
    assert!(!unmount_stale(&dir).unwrap());
    assert_eq!(fs::read(dir.join("f")).unwrap(), b"x");

    // The daemon dies: the mount stays, every access fails.
    guard.0.kill().unwrap();
    guard.0.wait().unwrap();
    // (stat may still be answered from cached attributes; statfs always asks the daemon.)
    assert_eq!(
        nix::sys::statvfs::statvfs(&dir).unwrap_err(),
        nix::errno::Errno::ENOTCONN
    );
    assert!(unmount_stale(&dir).unwrap());
    assert!(!mount_points().contains(&dir));
    assert!(fs::metadata(&dir).unwrap().is_dir());
    assert!(!unmount_stale(&dir).unwrap());
    assert!(!unmount_stale(&tmp.path().join("does-not-exist")).unwrap());
    drop(guard);
    assert_nothing_mounted_under(tmp.path());
}

#[test]
fn drop_unmounts_even_when_busy() {
    require_fuse!();
    let mut s = Spec::new();
    s.file("f", b"held open");
    let (layer, src) = s.build();
    let tmp = scratch();
    let m = mount(&layer, Arc::new(src), &subdir(&tmp, "mnt"), opts());
    let held = fs::File::open(m.mountpoint().join("f")).unwrap();
    drop(m); // busy: detached lazily
    assert_nothing_mounted_under(tmp.path());
    // The open file keeps working until closed.
    let mut buf = [0u8; 9];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"held open");
}

#[test]
fn mount_errors_are_reported() {
    require_fuse!();
    let (layer, src) = Spec::new().build();
    let tmp = scratch();
    let err =
        LayerMount::mount(layer, Arc::new(src), &tmp.path().join("missing"), opts()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}
