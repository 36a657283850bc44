//! Reference trees for filesystem tests: apply tar layers the way a container runtime unpacks
//! them (whiteouts and opaque directories honoured), and compare two trees entry by entry
//! (type, mode, owner, size, content, link target, device numbers, xattrs).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// Unpacks `layers` (uncompressed tars, base first) into `dest` like a runtime does:
/// `.wh.NAME` removes NAME, `.wh..wh..opq` empties its directory of lower-layer content.
pub fn apply_layers(layers: &[Vec<u8>], dest: &Path) {
    std::fs::create_dir_all(dest).expect("create dest");
    for layer in layers {
        let mut ar = tar::Archive::new(&layer[..]);
        ar.set_preserve_permissions(true);
        ar.set_preserve_ownerships(true);
        ar.set_unpack_xattrs(true);
        ar.set_overwrite(true);
        for e in ar.entries().expect("tar entries") {
            let mut e = e.expect("tar entry");
            let path = e.path().expect("path").into_owned();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            match name.as_deref() {
                Some(".wh..wh..opq") => {
                    let dir = dest.join(&parent);
                    if let Ok(rd) = std::fs::read_dir(&dir) {
                        for c in rd.flatten() {
                            remove_any(&c.path());
                        }
                    }
                }
                Some(n) if n.starts_with(".wh.") => {
                    remove_any(&dest.join(&parent).join(&n[4..]));
                }
                _ => {
                    let kind = e.header().entry_type();
                    if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                        make_special(&mut e, dest, &path);
                    } else {
                        e.unpack_in(dest).expect("unpack");
                    }
                }
            }
        }
    }
}

/// Creates a device node or FIFO (the tar crate's unpack writes them as empty files).
fn make_special<R: std::io::Read>(e: &mut tar::Entry<'_, R>, dest: &Path, path: &Path) {
    use nix::sys::stat::{mknod, Mode, SFlag};
    let h = e.header();
    let kind = h.entry_type();
    let flag = if kind.is_character_special() {
        SFlag::S_IFCHR
    } else if kind.is_block_special() {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFIFO
    };
    let major = h.device_major().ok().flatten().unwrap_or(0);
    let minor = h.device_minor().ok().flatten().unwrap_or(0);
    let mode = h.mode().unwrap_or(0o644);
    let target = dest.join(path);
    remove_any(&target);
    let dev = nix::sys::stat::makedev(u64::from(major), u64::from(minor));
    mknod(&target, flag, Mode::from_bits_truncate(mode), dev)
        .unwrap_or_else(|e| panic!("mknod {}: {e}", target.display()));
    // mknod applies the umask: set the exact mode, owner and mtime as unpacking would.
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
    let uid = h.uid().unwrap_or(0) as u32;
    let gid = h.gid().unwrap_or(0) as u32;
    std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).expect("chown");
}

fn remove_any(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Everything compared about one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// `dir`, `file`, `symlink`, `char`, `block`, `fifo`, `socket`.
    pub kind: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size (files).
    pub size: u64,
    /// sha256 of the content (files).
    pub content: Option<String>,
    /// Link target (symlinks).
    pub target: Option<PathBuf>,
    /// Device number (devices).
    pub rdev: u64,
    /// Extended attributes except overlay's own (`trusted.overlay.*`).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// Walks `root` (not following symlinks) and describes every entry by relative path.
pub fn describe_tree(root: &Path) -> BTreeMap<PathBuf, EntryInfo> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, EntryInfo>) {
    let rd = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
    for entry in rd {
        let entry = entry.expect("dir entry");
        let path = entry.path();
        let m = std::fs::symlink_metadata(&path).expect("lstat");
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_file() {
            "file"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "socket"
        };
        let content = ft.is_file().then(|| {
            let data =
                std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            hex::encode(Sha256::digest(&data))
        });
        let info = EntryInfo {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if ft.is_file() { m.len() } else { 0 },
            content,
            target: ft
                .is_symlink()
                .then(|| std::fs::read_link(&path).expect("readlink")),
            rdev: if ft.is_char_device() || ft.is_block_device() {
                m.rdev()
            } else {
                0
            },
            xattrs: xattrs(&path),
        };
        let rel = path.strip_prefix(root).expect("under root").to_path_buf();
        out.insert(rel, info);
        if ft.is_dir() {
            walk(root, &path, out);
        }
    }
}

/// Extended attributes of `path` (not following symlinks), overlay's and security's own
/// excluded.
pub fn xattrs(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(names) = xattr::list(path) else {
        return out;
    };
    for name in names {
        let name = name.to_string_lossy().into_owned();
        if name.starts_with("trusted.overlay.") || name.starts_with("security.") {
            continue;
        }
        if let Ok(Some(v)) = xattr::get(path, &name) {
            out.insert(name, v);
        }
    }
    out
}

/// Differences between two described trees, one line each (empty = identical).
pub fn diff_trees(
    expected: &BTreeMap<PathBuf, EntryInfo>,
    actual: &BTreeMap<PathBuf, EntryInfo>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in expected {
        match actual.get(p) {
            None => out.push(format!("missing: {}", p.display())),
            Some(a) if a != e => out.push(format!(
                "differs: {}: expected {e:?}, got {a:?}",
                p.display()
            )),
            _ => {}
        }
    }
    for p in actual.keys() {
        if !expected.contains_key(p) {
            out.push(format!("unexpected: {}", p.display()));
        }
    }
    out
}
