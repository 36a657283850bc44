//! What both TOC writers do before they write: spool the input tar to a temporary file and
//! plan which entries move to the front for prefetching.
//!
//! A prefetch layout puts the files a workload reads first at the start of the blob, so the
//! writer must see the whole input before it writes; the input is a stream, hence the spool.
//! The plan is a pure function of the spooled entries' paths, so it is written (and tested)
//! once for every format.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use super::split_path;

/// How deep prefetch planning follows hard links to their targets: a chain longer than this
/// is hostile, and stopping early only costs prefetch order, never content.
const MAX_LINK_DEPTH: usize = 256;

/// Creates an anonymous temporary file (unlinked right after creation) in the temporary
/// directory, named after `format` while it exists, for spooling a conversion's input. The
/// file vanishes with its last handle, so a crash leaves nothing behind.
pub fn spool_file(format: &str) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mut last = io::Error::other("no attempt made");
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(
            ".lazypull-{format}-{}-{nanos}-{n}",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => {
                let _ = std::fs::remove_file(&path);
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// What prefetch planning needs to know about one spooled entry.
pub trait PlannedEntry {
    /// The entry's normalised path; empty for a PAX global header, which names no file.
    fn path(&self) -> &str;
    /// The normalised target of a hard link.
    fn hardlink_target(&self) -> Option<&str>;
}

/// Chooses the entries to move to the front, in order: for each prefetch path, its parent
/// directories' entries, its hard-link target (recursively), then every occurrence of the path
/// itself (all occurrences, so "later entry wins" is preserved). PAX global headers met before
/// the first moved entry move with it, since they apply to every entry after them.
pub fn plan_prefetch<T: PlannedEntry>(items: &[T], list: &[String]) -> Vec<usize> {
    let mut by_path: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, s) in items.iter().enumerate() {
        if !s.path().is_empty() {
            by_path.entry(s.path()).or_default().push(i);
        }
    }
    struct Plan<'a, T> {
        items: &'a [T],
        by_path: HashMap<&'a str, Vec<usize>>,
        taken: HashSet<String>,
        moved: HashSet<usize>,
        front: Vec<usize>,
    }
    impl<T: PlannedEntry> Plan<'_, T> {
        fn take(&mut self, path: &str, depth: usize) {
            if path.is_empty() || depth > MAX_LINK_DEPTH || !self.taken.insert(path.to_string()) {
                return;
            }
            // Parent directories first.
            let mut end = 0;
            while let Some(rel) = path.get(end..).and_then(|r| r.find('/')) {
                end += rel;
                if let Some(parent) = path.get(..end) {
                    self.take(parent, depth);
                }
                end += 1;
            }
            let occurrences = self.by_path.get(path).cloned().unwrap_or_default();
            for &i in &occurrences {
                let target = self
                    .items
                    .get(i)
                    .and_then(|s| s.hardlink_target().map(str::to_string));
                if let Some(t) = target {
                    self.take(&t, depth + 1);
                }
            }
            for i in occurrences {
                if self.moved.insert(i) {
                    self.front.push(i);
                }
            }
        }
    }
    let mut plan = Plan {
        items,
        by_path,
        taken: HashSet::new(),
        moved: HashSet::new(),
        front: Vec::new(),
    };
    for p in list {
        if let Ok(parts) = split_path(p) {
            plan.take(&parts.join("/"), 0);
        }
    }
    let Some(&first) = plan.front.iter().min() else {
        return Vec::new();
    };
    let mut front: Vec<usize> = (0..first)
        .filter(|&i| items.get(i).is_some_and(|s| s.path().is_empty()))
        .collect();
    front.extend(plan.front);
    front
}

/// A numeric tar header field; a blank one (all NUL or spaces, as some writers leave unused
/// fields) reads as 0 instead of failing the conversion.
pub fn numeric(raw: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    if raw.iter().all(|b| *b == 0 || *b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Item(&'static str, Option<&'static str>);

    impl PlannedEntry for Item {
        fn path(&self) -> &str {
            self.0
        }
        fn hardlink_target(&self) -> Option<&str> {
            self.1
        }
    }

    fn plan(items: &[Item], list: &[&str]) -> Vec<usize> {
        let list: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        plan_prefetch(items, &list)
    }

    #[test]
    fn parents_and_link_targets_come_first() {
        let items = [
            Item("a", None),
            Item("a/x", None),
            Item("b", None),
            Item("b/l", Some("a/x")),
            Item("c", None),
        ];
        assert_eq!(plan(&items, &["b/l"]), vec![2, 0, 1, 3]);
        assert_eq!(plan(&items, &["./c"]), vec![4]);
        assert_eq!(plan(&items, &["missing", "../escape"]), Vec::<usize>::new());
    }

    #[test]
    fn every_occurrence_moves_in_order() {
        let items = [Item("f", None), Item("g", None), Item("f", None)];
        assert_eq!(plan(&items, &["f"]), vec![0, 2]);
    }

    #[test]
    fn global_headers_before_the_first_moved_entry_move_too() {
        let items = [
            Item("", None),
            Item("a", None),
            Item("", None),
            Item("b", None),
        ];
        assert_eq!(plan(&items, &["b"]), vec![0, 2, 3]);
        assert_eq!(plan(&items, &["a"]), vec![0, 1]);
    }

    #[test]
    fn link_loops_end() {
        let items = [Item("a", Some("b")), Item("b", Some("a"))];
        assert_eq!(plan(&items, &["a"]), vec![1, 0]);
    }
}
