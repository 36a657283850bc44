//! The in-memory model of one layer: its directory tree, file attributes and, for regular
//! files, the chunks their content is made of.
//!
//! Every format reader (eStargz, zstd:chunked, the seekable index) fills this one model, and the
//! FUSE filesystem serves from it. It is built once per mounted layer and then never changes,
//! so it is laid out for size and lookup speed rather than mutation: names are interned in one
//! byte arena, nodes and chunks live in flat vectors indexed by `u32`, directory entries are
//! sorted `(name, node)` pairs looked up by binary search. A layer of 100k files costs a few
//! tens of MB at most.
//!
//! Hard links are one node reachable from several directory entries (`nlink` counts them).
//! Whiteouts are resolved here as overlayfs expects them: `.wh.NAME` becomes a character device
//! 0/0 named `NAME`, and `.wh..wh..opq` marks its directory opaque.

pub mod json;
#[cfg(test)]
pub(crate) mod sample;
pub mod spool;
pub mod time;

use std::collections::HashMap;

use lazypull_fetcher::Digest;

/// Index of a node in [`Layer::nodes`]; the root is [`ROOT`].
pub type NodeId = u32;

/// The root directory's id.
pub const ROOT: NodeId = 0;

/// Index of a name in the layer's name arena.
type NameId = u32;

/// Longest uncompressed chunk a layer may declare. A chunk is decompressed whole into memory
/// before its digest can be checked, so this bounds the memory one chunk load can take, and it
/// is checked before anything is allocated. eStargz writers stay far below it (4 MiB by
/// default); containers/storage's zstd:chunked chunks average 64 KiB but a run of zeros or data
/// its rolling checksum never splits becomes one chunk. A layer that declares a larger chunk
/// is not read lazily but fetched whole and verified instead.
pub const MAX_CHUNK_SIZE: u64 = 16 << 20;

/// Longest compressed unit (gzip member or zstd frames) a chunk may be read from, and the
/// furthest into its decompressed unit a chunk may start (`inner_offset + size`). Both bound
/// what one chunk load fetches and decompresses; a legitimate unit holds at most one chunk
/// plus the tar headers that follow it.
pub const MAX_UNIT_BYTES: u64 = 4 * MAX_CHUNK_SIZE;

/// Longest name of one directory entry (Linux `NAME_MAX`): longer names cannot be created by
/// any filesystem an image is extracted to, and the kernel refuses them in FUSE replies.
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target (Linux `PATH_MAX` minus the terminating NUL); `readlink` cannot
/// return more.
pub const MAX_LINK_TARGET_LEN: usize = 4095;

/// Longest extended attribute name, value and name list (Linux `XATTR_NAME_MAX`,
/// `XATTR_SIZE_MAX`, `XATTR_LIST_MAX`): the kernel refuses larger ones, so a layer holding them
/// could not be extracted either.
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// See [`MAX_XATTR_NAME_LEN`].
pub const MAX_XATTR_VALUE_LEN: usize = 64 << 10;
/// See [`MAX_XATTR_NAME_LEN`].
pub const MAX_XATTR_LIST_LEN: usize = 64 << 10;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Directory.
    Dir,
    /// Regular file.
    File,
    /// Symbolic link.
    Symlink,
    /// Character device (also whiteouts, as 0/0).
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
}

/// One file, directory or other object of the layer. Deliberately small: no names (they belong
/// to directory entries), no strings, no per-node allocations.
#[derive(Debug, Clone)]
pub struct Node {
    /// Type of the object.
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky (no file-type bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Size in bytes (regular files: content; symlinks: target length).
    pub size: u64,
    /// Number of directory entries naming this node (plus subdirectories' `..` for dirs).
    pub nlink: u32,
    /// Device major number (devices only).
    pub dev_major: u32,
    /// Device minor number (devices only).
    pub dev_minor: u32,
    /// Parent directory (for a hard-linked file: the first directory that named it).
    pub parent: NodeId,
    /// Directories: range in the entry table. Files: range in the chunk table.
    first: u32,
    count: u32,
    /// Symlinks: target in the name arena. Others: unused.
    link: NameId,
    /// Index+1 into the xattr table (0 = none).
    xattrs: u32,
    /// Index+1 into the file-digest table (0 = none).
    digest: u32,
    /// Directory marked opaque by a `.wh..wh..opq` entry.
    pub opaque: bool,
}

/// A piece of a regular file's content as stored in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk within the file's content.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Offset in the blob where the compressed unit holding the chunk starts.
    pub blob_offset: u64,
    /// Length of that compressed unit in the blob.
    pub blob_len: u64,
    /// Offset of the chunk inside the decompressed unit (eStargz `innerOffset`).
    pub inner_offset: u64,
    /// Digest of the chunk's uncompressed bytes; `None` only for formats without chunk
    /// digests, whose content is then verified as a whole file.
    pub digest: Option<Digest>,
}

/// Why a layer description was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TocError {
    /// A path is absolute, contains `..`, NUL, or is empty.
    #[error("invalid path {0:?} in layer: paths must be relative, without '..' or NUL")]
    BadPath(String),
    /// An entry's parent exists but is not a directory.
    #[error("{path:?}: parent {parent:?} is not a directory")]
    ParentNotDir {
        /// The entry.
        path: String,
        /// Its parent.
        parent: String,
    },
    /// A hard link names a missing target (or one that is a directory).
    #[error("hard link {path:?} points to {target:?}, which is not an earlier regular file of the layer")]
    BadHardlink {
        /// The link.
        path: String,
        /// Its target.
        target: String,
    },
    /// Chunks of a file overlap, leave gaps, or do not add up to its size.
    #[error("{path:?}: chunks do not cover the file exactly ({detail})")]
    BadChunks {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A symlink without a target.
    #[error("symlink {0:?} has no target")]
    NoLinkTarget(String),
    /// A name (one path component) longer than the kernel accepts.
    #[error("{path:?}: a name of {len} bytes is longer than {MAX_NAME_LEN} (NAME_MAX)")]
    NameTooLong {
        /// The entry (cut to its first 300 bytes in messages).
        path: String,
        /// Length of the offending component.
        len: usize,
    },
    /// A symlink target longer than `readlink` can return.
    #[error("symlink {path:?}: a target of {len} bytes is longer than {MAX_LINK_TARGET_LEN}")]
    LinkTargetTooLong {
        /// The symlink.
        path: String,
        /// Length of its target.
        len: usize,
    },
    /// Extended attributes the kernel could not hold.
    #[error("{path:?}: extended attributes beyond the kernel's limits ({detail})")]
    BadXattrs {
        /// The entry.
        path: String,
        /// Which limit.
        detail: String,
    },
    /// A chunk (or the compressed unit it is read from) larger than the reader accepts.
    #[error("{path:?}: {what} of {size} bytes is larger than the {limit}-byte limit")]
    ChunkTooLarge {
        /// The file.
        path: String,
        /// Which size.
        what: &'static str,
        /// The declared size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Two chunks with the same digest but different sizes: one digest names one content, so
    /// the TOC is inconsistent (a cached chunk of one size must never stand for the other).
    #[error("{path:?}: chunk digest {digest} is declared with {size} bytes here and {other} bytes elsewhere in the layer")]
    ChunkDigestConflict {
        /// The file whose chunk conflicts.
        path: String,
        /// The digest.
        digest: Box<Digest>,
        /// Its size in this file.
        size: u64,
        /// Its size where it was first declared.
        other: u64,
    },
    /// More entries than the model can index.
    #[error("layer has too many entries ({0})")]
    TooLarge(usize),
}

/// One entry as a format reader saw it, before it is placed in the tree.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Path relative to the layer root (`./` prefixes and trailing `/` are accepted).
    pub path: String,
    /// What it is. Hard links use `Kind::File` with `hardlink_target` set.
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds).
    pub mtime: i64,
    /// Content size (regular files).
    pub size: u64,
    /// Symlink target.
    pub link_target: Option<String>,
    /// For hard links: the path of the file they link to.
    pub hardlink_target: Option<String>,
    /// Device numbers.
    pub dev_major: u32,
    /// Device numbers.
    pub dev_minor: u32,
    /// Extended attributes.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// Content chunks, in file order.
    pub chunks: Vec<Chunk>,
    /// Digest of the whole content, when the format records it.
    pub digest: Option<Digest>,
}

impl Entry {
    /// An entry with default attributes (root-owned, 0644/0755, epoch mtime).
    pub fn new(path: impl Into<String>, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: if kind == Kind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link_target: None,
            hardlink_target: None,
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            chunks: Vec::new(),
            digest: None,
        }
    }
}

/// A layer's tree, immutable once built.
#[derive(Debug, Default)]
pub struct Layer {
    names: Vec<u8>,
    name_offsets: Vec<(u32, u32)>,
    nodes: Vec<Node>,
    /// Directory entries: (name, node), each directory's run sorted by name bytes.
    entries: Vec<(NameId, NodeId)>,
    chunks: Vec<Chunk>,
    xattrs: Vec<Vec<(NameId, Vec<u8>)>>,
    digests: Vec<Digest>,
}

impl Layer {
    /// Number of nodes (inodes), the root included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the layer holds nothing but its root.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// The node `id`, if it exists.
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id as usize)
    }

    fn name(&self, id: NameId) -> &[u8] {
        let (start, len) = self.name_offsets[id as usize];
        &self.names[start as usize..(start + len) as usize]
    }

    /// The entries of directory `dir`, sorted by name: `(name, node)`.
    pub fn children(&self, dir: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> + '_ {
        let range = match self.node(dir) {
            Some(n) if n.kind == Kind::Dir => n.first as usize..(n.first + n.count) as usize,
            _ => 0..0,
        };
        self.entries[range]
            .iter()
            .map(|&(name, node)| (self.name(name), node))
    }

    /// Looks `name` up in directory `dir`.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        let n = self.node(dir)?;
        if n.kind != Kind::Dir {
            return None;
        }
        let run = &self.entries[n.first as usize..(n.first + n.count) as usize];
        run.binary_search_by(|&(nm, _)| self.name(nm).cmp(name))
            .ok()
            .map(|i| run[i].1)
    }

    /// The path of `id` from the root, without a leading slash (`""` for the root), found by
    /// walking up the parent links: how a node is named to people (stats, access logs). For a
    /// hard-linked file, the path under the first directory that named it.
    pub fn path(&self, id: NodeId) -> Option<String> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut node = id;
        // A well-formed tree is at most as deep as it has nodes; the bound stops a cycle.
        for _ in 0..=self.nodes.len() {
            if node == ROOT {
                parts.reverse();
                let joined: Vec<String> = parts
                    .iter()
                    .map(|p| String::from_utf8_lossy(p).into_owned())
                    .collect();
                return Some(joined.join("/"));
            }
            let parent = self.node(node)?.parent;
            let (name, _) = self.children(parent).find(|&(_, child)| child == node)?;
            parts.push(name);
            node = parent;
        }
        None
    }

    /// Resolves a slash-separated path from the root (no symlinks followed).
    pub fn resolve(&self, path: &str) -> Option<NodeId> {
        path.split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .try_fold(ROOT, |dir, c| self.lookup(dir, c.as_bytes()))
    }

    /// A regular file's chunks, in file order.
    pub fn chunks(&self, file: NodeId) -> &[Chunk] {
        match self.node(file) {
            Some(n) if n.kind == Kind::File => {
                &self.chunks[n.first as usize..(n.first + n.count) as usize]
            }
            _ => &[],
        }
    }

    /// Every chunk of the layer (for prefetch and background fill planning).
    pub fn all_chunks(&self) -> &[Chunk] {
        &self.chunks
    }

    /// A symlink's target.
    pub fn link_target(&self, id: NodeId) -> Option<&[u8]> {
        match self.node(id) {
            Some(n) if n.kind == Kind::Symlink => Some(self.name(n.link)),
            _ => None,
        }
    }

    /// A node's extended attributes as stored in the layer (overlay whiteout attributes are
    /// added by the filesystem, not stored here).
    pub fn xattrs(&self, id: NodeId) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let list = match self.node(id) {
            Some(n) if n.xattrs > 0 => self.xattrs[n.xattrs as usize - 1].as_slice(),
            _ => &[],
        };
        list.iter().map(|(k, v)| (self.name(*k), v.as_slice()))
    }

    /// The digest of a regular file's whole content, when the format gave one.
    pub fn file_digest(&self, id: NodeId) -> Option<&Digest> {
        match self.node(id) {
            Some(n) if n.digest > 0 => self.digests.get(n.digest as usize - 1),
            _ => None,
        }
    }

    /// Bytes of heap this model uses (for the memory budget and its test).
    pub fn heap_bytes(&self) -> usize {
        self.names.capacity()
            + self.name_offsets.capacity() * 8
            + self.nodes.capacity() * std::mem::size_of::<Node>()
            + self.entries.capacity() * 8
            + self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + self
                .xattrs
                .iter()
                .map(|x| 24 + x.iter().map(|(_, v)| 28 + v.len()).sum::<usize>())
                .sum::<usize>()
            + self.digests.capacity() * std::mem::size_of::<Digest>()
    }
}

/// Builds a [`Layer`] from entries in tar order: later duplicates win, missing parent
/// directories are synthesised (0755 root:root), whiteouts are translated.
#[derive(Debug, Default)]
pub struct LayerBuilder {
    names: Vec<u8>,
    name_offsets: Vec<(u32, u32)>,
    name_ids: HashMap<Vec<u8>, NameId>,
    nodes: Vec<Node>,
    /// Per directory node: children by name (only during building).
    dirs: HashMap<NodeId, HashMap<NameId, NodeId>>,
    chunks: Vec<Chunk>,
    xattrs: Vec<Vec<(NameId, Vec<u8>)>>,
    digests: Vec<Digest>,
    /// Size of every chunk digest seen so far, to refuse one digest declared with two sizes.
    chunk_sizes: HashMap<Digest, u64>,
}

/// Splits and checks a layer path: relative, no `..`, no NUL, `./` and trailing `/` dropped.
pub fn split_path(path: &str) -> Result<Vec<&str>, TocError> {
    let bad = || TocError::BadPath(shorten(path));
    if path.contains('\0') || path.starts_with('/') {
        return Err(bad());
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(bad());
    }
    if let Some(long) = parts.iter().find(|p| p.len() > MAX_NAME_LEN) {
        return Err(TocError::NameTooLong {
            path: shorten(path),
            len: long.len(),
        });
    }
    Ok(parts)
}

/// Why [`split_path`] refused a path, without repeating the path: for callers whose own error
/// already names it (the writers' "input tar entry ..." errors).
pub fn path_problem(e: &TocError) -> String {
    match e {
        TocError::BadPath(_) => {
            "the path is absolute, contains '..' or NUL; a layer must not escape its root".into()
        }
        TocError::NameTooLong { len, .. } => {
            format!("a name of {len} bytes is longer than {MAX_NAME_LEN} (NAME_MAX)")
        }
        other => other.to_string(),
    }
}

/// A path cut to a length fit for an error message (a hostile name can be megabytes).
pub(crate) fn shorten(path: &str) -> String {
    if path.len() <= 300 {
        return path.to_string();
    }
    let mut end = 300;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &path[..end])
}

impl LayerBuilder {
    /// An empty layer with only its root directory.
    pub fn new() -> LayerBuilder {
        let mut b = LayerBuilder::default();
        b.nodes.push(Self::blank(Kind::Dir, 0o755, ROOT));
        b.dirs.insert(ROOT, HashMap::new());
        b
    }

    fn blank(kind: Kind, mode: u32, parent: NodeId) -> Node {
        Node {
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            nlink: 1,
            dev_major: 0,
            dev_minor: 0,
            parent,
            first: 0,
            count: 0,
            link: 0,
            xattrs: 0,
            digest: 0,
            opaque: false,
        }
    }

    fn intern(&mut self, s: &[u8]) -> NameId {
        if let Some(&id) = self.name_ids.get(s) {
            return id;
        }
        let id = self.name_offsets.len() as NameId;
        self.name_offsets
            .push((self.names.len() as u32, s.len() as u32));
        self.names.extend_from_slice(s);
        self.name_ids.insert(s.to_vec(), id);
        id
    }

    /// Finds or creates (as 0755 root:root) the directory at `parts`.
    fn dir_at(&mut self, parts: &[&str], full: &str) -> Result<NodeId, TocError> {
        let mut dir = ROOT;
        for (i, part) in parts.iter().enumerate() {
            let name = self.intern(part.as_bytes());
            let existing = self.dirs.get(&dir).and_then(|d| d.get(&name)).copied();
            dir = match existing {
                Some(id) if self.nodes[id as usize].kind == Kind::Dir => id,
                Some(_) => {
                    return Err(TocError::ParentNotDir {
                        path: full.to_string(),
                        parent: parts[..=i].join("/"),
                    })
                }
                None => {
                    let id = self.push_node(Self::blank(Kind::Dir, 0o755, dir))?;
                    self.dirs.insert(id, HashMap::new());
                    self.link(dir, name, id);
                    id
                }
            };
        }
        Ok(dir)
    }

    fn push_node(&mut self, node: Node) -> Result<NodeId, TocError> {
        if self.nodes.len() >= u32::MAX as usize - 1 {
            return Err(TocError::TooLarge(self.nodes.len()));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() as NodeId - 1)
    }

    fn link(&mut self, dir: NodeId, name: NameId, node: NodeId) {
        if let Some(d) = self.dirs.get_mut(&dir) {
            d.insert(name, node);
        }
    }

    /// Adds one entry. A later entry with the same path replaces the earlier one (as tar
    /// extraction does), except that a directory replacing a directory keeps its children.
    pub fn add(&mut self, entry: Entry) -> Result<(), TocError> {
        let parts = split_path(&entry.path)?;
        check_xattrs(&entry)?;
        let Some((last, parents)) = parts.split_last() else {
            // The root itself: take its attributes.
            if entry.kind == Kind::Dir {
                let root = &mut self.nodes[ROOT as usize];
                root.mode = entry.mode;
                root.uid = entry.uid;
                root.gid = entry.gid;
                root.mtime = entry.mtime;
                return Ok(());
            }
            return Err(TocError::BadPath(shorten(&entry.path)));
        };
        let parent = self.dir_at(parents, &entry.path)?;
        // Whiteouts.
        if *last == ".wh..wh..opq" {
            self.nodes[parent as usize].opaque = true;
            return Ok(());
        }
        let (name_str, whiteout) = match last.strip_prefix(".wh.") {
            // `.wh..` and `.wh...` would hide `.` and `..`: not a name a layer can delete.
            Some("." | "..") => return Err(TocError::BadPath(shorten(&entry.path))),
            Some(n) if !n.is_empty() => (n, true),
            _ => (*last, false),
        };
        let name = self.intern(name_str.as_bytes());
        let existing = self.dirs.get(&parent).and_then(|d| d.get(&name)).copied();

        if whiteout {
            let mut n = Self::blank(Kind::CharDevice, 0, parent);
            n.mtime = entry.mtime;
            let id = self.push_node(n)?;
            self.link(parent, name, id);
            return Ok(());
        }
        if let Some(target) = &entry.hardlink_target {
            let tparts = split_path(target)?;
            let bad = || TocError::BadHardlink {
                path: entry.path.clone(),
                target: target.clone(),
            };
            let mut cur = ROOT;
            for p in &tparts {
                let nm = *self.name_ids.get(p.as_bytes()).ok_or_else(bad)?;
                cur = *self
                    .dirs
                    .get(&cur)
                    .and_then(|d| d.get(&nm))
                    .ok_or_else(bad)?;
            }
            let kind = self.nodes[cur as usize].kind;
            if tparts.is_empty() || kind == Kind::Dir {
                return Err(bad());
            }
            if existing == Some(cur) {
                return Ok(());
            }
            self.nodes[cur as usize].nlink += 1;
            self.link(parent, name, cur);
            return Ok(());
        }
        if entry.kind == Kind::Dir {
            if let Some(id) = existing {
                if self.nodes[id as usize].kind == Kind::Dir {
                    let n = &mut self.nodes[id as usize];
                    n.mode = entry.mode;
                    n.uid = entry.uid;
                    n.gid = entry.gid;
                    n.mtime = entry.mtime;
                    n.xattrs = 0;
                    let x = self.intern_xattrs(&entry.xattrs);
                    self.nodes[id as usize].xattrs = x;
                    return Ok(());
                }
            }
        }
        let mut node = Self::blank(entry.kind, entry.mode & 0o7777, parent);
        node.uid = entry.uid;
        node.gid = entry.gid;
        node.mtime = entry.mtime;
        node.dev_major = entry.dev_major;
        node.dev_minor = entry.dev_minor;
        node.xattrs = self.intern_xattrs(&entry.xattrs);
        match entry.kind {
            Kind::File => {
                check_chunks(&entry)?;
                self.check_chunk_digests(&entry)?;
                node.size = entry.size;
                node.first = self.chunks.len() as u32;
                node.count = entry.chunks.len() as u32;
                self.chunks.extend_from_slice(&entry.chunks);
                if let Some(d) = entry.digest {
                    self.digests.push(d);
                    node.digest = self.digests.len() as u32;
                }
            }
            Kind::Symlink => {
                let target = entry
                    .link_target
                    .as_deref()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| TocError::NoLinkTarget(shorten(&entry.path)))?;
                if target.len() > MAX_LINK_TARGET_LEN {
                    return Err(TocError::LinkTargetTooLong {
                        path: shorten(&entry.path),
                        len: target.len(),
                    });
                }
                node.link = self.intern(target.as_bytes());
                node.size = target.len() as u64;
            }
            _ => {}
        }
        let id = self.push_node(node)?;
        if entry.kind == Kind::Dir {
            self.dirs.insert(id, HashMap::new());
        }
        if let Some(old) = existing {
            let o = &mut self.nodes[old as usize];
            o.nlink = o.nlink.saturating_sub(1);
        }
        self.link(parent, name, id);
        Ok(())
    }

    /// Records the size of each chunk digest of `entry`, refusing a digest already declared
    /// with another size.
    fn check_chunk_digests(&mut self, entry: &Entry) -> Result<(), TocError> {
        for c in &entry.chunks {
            let Some(d) = c.digest else { continue };
            match self.chunk_sizes.entry(d) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(c.size);
                }
                std::collections::hash_map::Entry::Occupied(o) if *o.get() != c.size => {
                    return Err(TocError::ChunkDigestConflict {
                        path: shorten(&entry.path),
                        digest: Box::new(d),
                        size: c.size,
                        other: *o.get(),
                    });
                }
                std::collections::hash_map::Entry::Occupied(_) => {}
            }
        }
        Ok(())
    }

    fn intern_xattrs(&mut self, xattrs: &[(String, Vec<u8>)]) -> u32 {
        if xattrs.is_empty() {
            return 0;
        }
        let list: Vec<(NameId, Vec<u8>)> = xattrs
            .iter()
            .map(|(k, v)| (self.intern(k.as_bytes()), v.clone()))
            .collect();
        self.xattrs.push(list);
        self.xattrs.len() as u32
    }

    /// Freezes the tree: sorts directory entries, counts directory links, drops nodes that no
    /// entry names any more (replaced duplicates).
    pub fn build(mut self) -> Layer {
        // Reachable nodes get new, dense ids in breadth-first order (root stays 0).
        let mut remap: Vec<u32> = vec![u32::MAX; self.nodes.len()];
        let mut order: Vec<NodeId> = vec![ROOT];
        remap[ROOT as usize] = 0;
        let mut entries: Vec<(NameId, NodeId)> = Vec::new();
        let mut ranges: Vec<(NodeId, u32, u32)> = Vec::new();
        let mut i = 0;
        while i < order.len() {
            let old = order[i];
            i += 1;
            if let Some(children) = self.dirs.remove(&old) {
                let mut list: Vec<(NameId, NodeId)> = children.into_iter().collect();
                list.sort_by(|a, b| {
                    let (sa, la) = self.name_offsets[a.0 as usize];
                    let (sb, lb) = self.name_offsets[b.0 as usize];
                    self.names[sa as usize..(sa + la) as usize]
                        .cmp(&self.names[sb as usize..(sb + lb) as usize])
                });
                let first = entries.len() as u32;
                for (name, child) in &list {
                    if remap[*child as usize] == u32::MAX {
                        remap[*child as usize] = order.len() as u32;
                        order.push(*child);
                    }
                    entries.push((*name, *child));
                }
                ranges.push((old, first, list.len() as u32));
            }
        }
        for e in &mut entries {
            e.1 = remap[e.1 as usize];
        }
        let mut nodes: Vec<Node> = order
            .iter()
            .map(|&old| {
                let mut n = self.nodes[old as usize].clone();
                n.parent = remap[n.parent as usize].min(order.len() as u32 - 1);
                n
            })
            .collect();
        for (old, first, count) in ranges {
            let n = &mut nodes[remap[old as usize] as usize];
            n.first = first;
            n.count = count;
        }
        // Directory link counts: 2 plus one per subdirectory.
        let subdirs: Vec<u32> = nodes
            .iter()
            .map(|n| {
                if n.kind == Kind::Dir {
                    entries[n.first as usize..(n.first + n.count) as usize]
                        .iter()
                        .filter(|(_, c)| nodes[*c as usize].kind == Kind::Dir)
                        .count() as u32
                } else {
                    0
                }
            })
            .collect();
        for (n, s) in nodes.iter_mut().zip(subdirs) {
            if n.kind == Kind::Dir {
                n.nlink = 2 + s;
            }
        }
        // Parents of directories follow the entry that names them.
        for idx in 0..nodes.len() {
            if nodes[idx].kind == Kind::Dir {
                let (first, count) = (nodes[idx].first, nodes[idx].count);
                for &(_, c) in &entries[first as usize..(first + count) as usize] {
                    if nodes[c as usize].kind == Kind::Dir {
                        nodes[c as usize].parent = idx as u32;
                    }
                }
            }
        }
        nodes[ROOT as usize].parent = ROOT;
        self.name_ids = HashMap::new();
        self.chunk_sizes = HashMap::new();
        let mut layer = Layer {
            names: self.names,
            name_offsets: self.name_offsets,
            nodes,
            entries,
            chunks: self.chunks,
            xattrs: self.xattrs,
            digests: self.digests,
        };
        layer.names.shrink_to_fit();
        layer.name_offsets.shrink_to_fit();
        layer.nodes.shrink_to_fit();
        layer.entries.shrink_to_fit();
        layer.chunks.shrink_to_fit();
        layer
    }
}

fn check_xattrs(entry: &Entry) -> Result<(), TocError> {
    let bad = |detail: String| TocError::BadXattrs {
        path: shorten(&entry.path),
        detail,
    };
    let mut list = 0usize;
    for (name, value) in &entry.xattrs {
        if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN {
            return Err(bad(format!(
                "a name of {} bytes (1 to {MAX_XATTR_NAME_LEN} allowed)",
                name.len()
            )));
        }
        if value.len() > MAX_XATTR_VALUE_LEN {
            return Err(bad(format!(
                "a value of {} bytes (at most {MAX_XATTR_VALUE_LEN})",
                value.len()
            )));
        }
        list = list.saturating_add(name.len() + 1);
    }
    if list > MAX_XATTR_LIST_LEN {
        return Err(bad(format!(
            "a name list of {list} bytes (at most {MAX_XATTR_LIST_LEN})"
        )));
    }
    Ok(())
}

fn check_chunks(entry: &Entry) -> Result<(), TocError> {
    let bad = |detail: String| TocError::BadChunks {
        path: shorten(&entry.path),
        detail,
    };
    let mut expect = 0u64;
    for c in &entry.chunks {
        if c.file_offset != expect {
            return Err(bad(format!(
                "chunk at {} where {} was expected",
                c.file_offset, expect
            )));
        }
        if c.size == 0 {
            return Err(bad(format!("empty chunk at {}", c.file_offset)));
        }
        let too_large = |what, size, limit| TocError::ChunkTooLarge {
            path: shorten(&entry.path),
            what,
            size,
            limit,
        };
        if c.size > MAX_CHUNK_SIZE {
            return Err(too_large("chunk", c.size, MAX_CHUNK_SIZE));
        }
        if c.blob_len > MAX_UNIT_BYTES {
            return Err(too_large("compressed unit", c.blob_len, MAX_UNIT_BYTES));
        }
        let unit_end = c.inner_offset.saturating_add(c.size);
        if unit_end > MAX_UNIT_BYTES {
            return Err(too_large(
                "decompressed unit up to the chunk's end",
                unit_end,
                MAX_UNIT_BYTES,
            ));
        }
        expect = c
            .file_offset
            .checked_add(c.size)
            .ok_or_else(|| bad("chunk end overflows".into()))?;
        if c.blob_len == 0 {
            return Err(bad(format!(
                "chunk at {} has no compressed data",
                c.file_offset
            )));
        }
    }
    if expect != entry.size {
        return Err(bad(format!(
            "chunks cover {expect} bytes of a {}-byte file",
            entry.size
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> Entry {
        let mut e = Entry::new(path, Kind::File);
        e.size = size;
        if size > 0 {
            e.chunks.push(Chunk {
                file_offset: 0,
                size,
                blob_offset: 0,
                blob_len: 10,
                inner_offset: 0,
                digest: None,
            });
        }
        e
    }

    #[test]
    fn builds_tree_with_missing_parents_links_and_whiteouts() {
        let mut b = LayerBuilder::new();
        b.add(file("usr/local/lib/python3/x.py", 5)).unwrap();
        let mut d = Entry::new("etc/", Kind::Dir);
        d.mode = 0o700;
        b.add(d).unwrap();
        b.add(file("./etc/passwd", 3)).unwrap();
        let mut hl = Entry::new("etc/passwd-", Kind::File);
        hl.hardlink_target = Some("etc/passwd".into());
        b.add(hl).unwrap();
        let mut sl = Entry::new("bin", Kind::Symlink);
        sl.link_target = Some("usr/bin".into());
        b.add(sl).unwrap();
        b.add(Entry::new("var/.wh.cache", Kind::File)).unwrap();
        b.add(Entry::new("opt/.wh..wh..opq", Kind::File)).unwrap();
        // Duplicate: the later entry wins.
        b.add(file("etc/hosts", 1)).unwrap();
        b.add(file("etc/hosts", 2)).unwrap();
        let l = b.build();

        let usr = l.resolve("usr/local/lib").unwrap();
        assert_eq!(l.node(usr).unwrap().mode, 0o755);
        let etc = l.resolve("etc").unwrap();
        assert_eq!(l.node(etc).unwrap().mode, 0o700);
        let p = l.resolve("etc/passwd").unwrap();
        assert_eq!(l.resolve("etc/passwd-"), Some(p));
        assert_eq!(l.node(p).unwrap().nlink, 2);
        assert_eq!(
            l.link_target(l.resolve("bin").unwrap()),
            Some(&b"usr/bin"[..])
        );
        let wh = l.node(l.resolve("var/cache").unwrap()).unwrap();
        assert_eq!(
            (wh.kind, wh.dev_major, wh.dev_minor),
            (Kind::CharDevice, 0, 0)
        );
        assert!(l.node(l.resolve("opt").unwrap()).unwrap().opaque);
        assert_eq!(l.node(l.resolve("etc/hosts").unwrap()).unwrap().size, 2);
        let names: Vec<&[u8]> = l.children(etc).map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"hosts"[..], b"passwd", b"passwd-"]);
        // Root: 2 + subdirs (usr, etc, var, opt).
        assert_eq!(l.node(ROOT).unwrap().nlink, 6);
        assert_eq!(l.node(etc).unwrap().parent, ROOT);
        // The replaced etc/hosts node is gone.
        // root + usr/local/lib/python3/x.py + etc, passwd, bin, var, cache, opt, hosts.
        assert_eq!(l.len(), 1 + 5 + 7);

        // Paths back from nodes: the root is empty, a hard link is named by its first name.
        assert_eq!(l.path(ROOT).as_deref(), Some(""));
        assert_eq!(l.path(p).as_deref(), Some("etc/passwd"));
        let x = l.resolve("usr/local/lib/python3/x.py").unwrap();
        assert_eq!(l.path(x).as_deref(), Some("usr/local/lib/python3/x.py"));
        assert_eq!(l.path(l.len() as NodeId + 5), None);
    }

    #[test]
    fn rejects_bad_input() {
        let mut b = LayerBuilder::new();
        for p in ["/etc/passwd", "a/../b", "..", "a\0b"] {
            assert!(
                matches!(b.add(file(p, 0)), Err(TocError::BadPath(_))),
                "{p}"
            );
        }
        b.add(file("f", 1)).unwrap();
        assert!(matches!(
            b.add(file("f/x", 1)),
            Err(TocError::ParentNotDir { .. })
        ));
        let mut hl = Entry::new("h", Kind::File);
        hl.hardlink_target = Some("missing".into());
        assert!(matches!(b.add(hl), Err(TocError::BadHardlink { .. })));
        let mut gap = file("g", 10);
        gap.chunks[0].file_offset = 1;
        assert!(matches!(b.add(gap), Err(TocError::BadChunks { .. })));
        let mut short = file("s", 10);
        short.size = 20;
        assert!(matches!(b.add(short), Err(TocError::BadChunks { .. })));
        let sl = Entry::new("l", Kind::Symlink);
        assert!(matches!(b.add(sl), Err(TocError::NoLinkTarget(_))));
    }

    #[test]
    fn refuses_what_the_kernel_or_memory_could_not_take() {
        let mut b = LayerBuilder::new();
        // Names: one component over NAME_MAX, in a path or as a hard link target.
        let long = "n".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            b.add(file(&format!("d/{long}"), 1)),
            Err(TocError::NameTooLong { len: 256, .. })
        ));
        b.add(file(&"n".repeat(MAX_NAME_LEN), 1)).unwrap();
        let mut hl = Entry::new("h", Kind::File);
        hl.hardlink_target = Some(format!("{long}/x"));
        assert!(matches!(b.add(hl), Err(TocError::NameTooLong { .. })));
        // The error message does not carry a megabyte-long name.
        let huge = "x".repeat(1 << 20);
        let msg = b.add(file(&huge, 1)).unwrap_err().to_string();
        assert!(msg.len() < 1000, "{} bytes", msg.len());
        // Whiteouts of `.` and `..`.
        for w in [".wh..", "d/.wh...", ".wh..."] {
            assert!(
                matches!(b.add(Entry::new(w, Kind::File)), Err(TocError::BadPath(_))),
                "{w}"
            );
        }
        // Symlink targets readlink could not return.
        let mut sl = Entry::new("l", Kind::Symlink);
        sl.link_target = Some("t".repeat(MAX_LINK_TARGET_LEN + 1));
        assert!(matches!(b.add(sl), Err(TocError::LinkTargetTooLong { .. })));
        // Chunks beyond the limits, checked before anything is allocated for them.
        for (size, blob_len, inner) in [
            (MAX_CHUNK_SIZE + 1, 10, 0),
            (1 << 40, 10, 0),
            (u64::MAX, 10, 0),
            (10, MAX_UNIT_BYTES + 1, 0),
            (10, 10, MAX_UNIT_BYTES),
        ] {
            let mut f = file("big", size);
            f.chunks[0].blob_len = blob_len;
            f.chunks[0].inner_offset = inner;
            assert!(
                matches!(b.add(f), Err(TocError::ChunkTooLarge { .. })),
                "{size} {blob_len} {inner}"
            );
        }
        // Extended attributes beyond the kernel's limits.
        for xattrs in [
            vec![("user.".to_string() + &"k".repeat(300), vec![1])],
            vec![("user.k".to_string(), vec![0; MAX_XATTR_VALUE_LEN + 1])],
            (0..5000)
                .map(|i| (format!("user.attribute-{i:08}"), vec![]))
                .collect(),
            vec![(String::new(), vec![])],
        ] {
            let mut e = Entry::new("x", Kind::Dir);
            e.xattrs = xattrs;
            assert!(matches!(b.add(e), Err(TocError::BadXattrs { .. })));
        }
        let mut f = file("max", MAX_CHUNK_SIZE);
        f.chunks[0].blob_len = MAX_UNIT_BYTES;
        b.add(f).unwrap();
    }

    #[test]
    fn one_chunk_digest_names_one_size() {
        let d = Digest::sha256_of(b"twelve bytes");
        let with = |path: &str, size: u64, digest: Digest| {
            let mut e = file(path, size);
            e.chunks[0].digest = Some(digest);
            e
        };
        let mut b = LayerBuilder::new();
        b.add(with("a", 12, d)).unwrap();
        // The same content again (deduplicated files) is fine.
        b.add(with("a2", 12, d)).unwrap();
        for size in [4096, 5] {
            let err = b.add(with("b", size, d)).unwrap_err();
            assert!(
                matches!(err, TocError::ChunkDigestConflict { size: s, other: 12, .. } if s == size),
                "{err:?}"
            );
        }
        let layer = b.build();
        assert!(layer.resolve("b").is_none());
    }

    #[test]
    fn memory_per_file_is_small() {
        let mut b = LayerBuilder::new();
        for i in 0..20_000 {
            b.add(file(
                &format!("usr/lib/python3/site-packages/pkg{}/module_{i}.py", i % 100),
                100,
            ))
            .unwrap();
        }
        let l = b.build();
        let per_file = l.heap_bytes() / 20_000;
        assert!(per_file < 300, "{per_file} bytes per file");
    }
}
