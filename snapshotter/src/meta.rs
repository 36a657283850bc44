//! Snapshot metadata in an embedded transactional store (redb): one record per snapshot,
//! keyed by its name, with the same rules as containerd's `snapshots/storage` package (which
//! its overlayfs snapshotter keeps in bolt).
//!
//! Every change is one redb write transaction committed with fsync, so after a crash a
//! snapshot either exists with all of its fields or not at all. A caller that also creates
//! directories does so while it holds the transaction ([`MetaStore::write`]) and commits only
//! once they exist; directories left by a crash before the commit are orphans that
//! [`crate::Snapshotter::cleanup`] removes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Snapshots by name; the value is the JSON of a [`Record`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters (`next_id`).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// What went wrong, in the categories containerd's errdefs use (mapped to gRPC codes).
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// No snapshot by that name.
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    /// The name is taken.
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The snapshot is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request itself is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The store failed (disk, corruption).
    #[error("metadata store: {0}")]
    Store(String),
}

impl From<redb::Error> for MetaError {
    fn from(e: redb::Error) -> Self {
        MetaError::Store(e.to_string())
    }
}

macro_rules! store_err {
    ($($t:ty),*) => {$(
        impl From<$t> for MetaError {
            fn from(e: $t) -> Self {
                MetaError::Store(e.to_string())
            }
        }
    )*};
}
store_err!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);

/// The kind of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read-only view of a parent.
    View,
    /// Writable, not yet committed.
    Active,
    /// Committed: immutable, may be a parent.
    Committed,
}

impl Kind {
    /// containerd's spelling (`view`, `active`, `committed`), also used by filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a snapshot's own files.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Bytes (allocated blocks).
    pub size: i64,
    /// Inodes.
    pub inodes: i64,
}

/// A layer served lazily by the daemon instead of a directory of this snapshotter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// Image reference the layer is read from.
    pub image_ref: String,
    /// Compressed layer digest.
    pub layer_digest: String,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Internal ID: names the snapshot's directory, stays the same across a commit.
    pub id: u64,
    /// Name (key while active or view).
    pub name: String,
    /// Kind.
    pub kind: Kind,
    /// Parent's name.
    pub parent: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created: i64,
    /// Last change, nanoseconds since the epoch.
    pub updated: i64,
    /// Usage recorded at commit (active snapshots are measured when asked).
    pub usage: Usage,
    /// Set for remote (lazily mounted) snapshots.
    pub remote: Option<Remote>,
}

/// Nanoseconds since the epoch, now.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The store.
#[derive(Debug)]
pub struct MetaStore {
    db: Database,
}

/// A write transaction: changes are visible to others only after [`Tx::commit`]; dropping it
/// without committing discards them.
pub struct Tx {
    txn: redb::WriteTransaction,
}

impl MetaStore {
    /// Opens (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<MetaStore, MetaError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        txn.open_table(SNAPSHOTS)?;
        txn.open_table(COUNTERS)?;
        txn.commit()?;
        Ok(MetaStore { db })
    }

    /// Starts a write transaction (waits for any other writer to finish).
    pub fn write(&self) -> Result<Tx, MetaError> {
        Ok(Tx {
            txn: self.db.begin_write()?,
        })
    }

    /// The snapshot named `name`.
    pub fn get(&self, name: &str) -> Result<Record, MetaError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let v = table
            .get(name)?
            .ok_or_else(|| MetaError::NotFound(name.to_string()))?;
        Ok(serde_json::from_slice(v.value())?)
    }

    /// Every snapshot, by name.
    pub fn list(&self) -> Result<Vec<Record>, MetaError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (_, v) = item?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// The parents of `record`, nearest first.
    pub fn parents(&self, record: &Record) -> Result<Vec<Record>, MetaError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SNAPSHOTS)?;
        let mut out: Vec<Record> = Vec::new();
        let mut next = record.parent.clone();
        while let Some(p) = next {
            if out.len() > 10_000 {
                return Err(MetaError::Store(format!(
                    "parent chain of {:?} does not end",
                    record.name
                )));
            }
            let v = table.get(p.as_str())?.ok_or_else(|| {
                MetaError::Store(format!("parent {p:?} of {:?} is missing", record.name))
            })?;
            let r: Record = serde_json::from_slice(v.value())?;
            next = r.parent.clone();
            out.push(r);
        }
        Ok(out)
    }
}

impl Tx {
    fn read(&self, name: &str) -> Result<Option<Record>, MetaError> {
        let table = self.txn.open_table(SNAPSHOTS)?;
        let v = table.get(name)?;
        Ok(match v {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    /// The snapshot named `name`.
    pub fn get(&self, name: &str) -> Result<Record, MetaError> {
        self.read(name)?
            .ok_or_else(|| MetaError::NotFound(name.to_string()))
    }

    fn put(&self, r: &Record) -> Result<(), MetaError> {
        let mut table = self.txn.open_table(SNAPSHOTS)?;
        let data = serde_json::to_vec(r)?;
        table.insert(r.name.as_str(), data.as_slice())?;
        Ok(())
    }

    fn next_id(&self) -> Result<u64, MetaError> {
        let mut table = self.txn.open_table(COUNTERS)?;
        let id = table.get("next_id")?.map(|v| v.value()).unwrap_or(1);
        table.insert("next_id", id + 1)?;
        Ok(id)
    }

    /// Creates a snapshot (containerd's `CreateSnapshot`): the name must be free, the parent
    /// must exist and be committed. Returns the new record (with a fresh ID).
    pub fn create(
        &self,
        name: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<Remote>,
    ) -> Result<Record, MetaError> {
        if name.is_empty() {
            return Err(MetaError::InvalidArgument("snapshot key is empty".into()));
        }
        if self.read(name)?.is_some() {
            return Err(MetaError::AlreadyExists(name.to_string()));
        }
        if let Some(p) = parent {
            let pr = self
                .read(p)?
                .ok_or_else(|| MetaError::NotFound(format!("parent {p}")))?;
            if pr.kind != Kind::Committed {
                return Err(MetaError::InvalidArgument(format!(
                    "parent {p:?} is not a committed snapshot"
                )));
            }
        }
        let now = now_nanos();
        let r = Record {
            id: self.next_id()?,
            name: name.to_string(),
            kind,
            parent: parent.map(str::to_string),
            labels,
            created: now,
            updated: now,
            usage: Usage::default(),
            remote,
        };
        self.put(&r)?;
        Ok(r)
    }

    /// Commits the active snapshot `key` as `name` (containerd's `CommitActive`): same ID and
    /// parent, kind committed, the given labels and usage; `key` is gone afterwards.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<Record, MetaError> {
        if name.is_empty() {
            return Err(MetaError::InvalidArgument("commit name is empty".into()));
        }
        let old = self.get(key)?;
        if old.kind != Kind::Active {
            return Err(MetaError::FailedPrecondition(format!(
                "snapshot {key:?} is not active (it is {})",
                old.kind.as_str()
            )));
        }
        if self.read(name)?.is_some() {
            return Err(MetaError::AlreadyExists(name.to_string()));
        }
        let now = now_nanos();
        let r = Record {
            name: name.to_string(),
            kind: Kind::Committed,
            labels,
            created: now,
            updated: now,
            usage,
            ..old
        };
        let mut table = self.txn.open_table(SNAPSHOTS)?;
        table.remove(key)?;
        drop(table);
        self.put(&r)?;
        Ok(r)
    }

    /// Removes `name`; fails while another snapshot has it as parent.
    pub fn remove(&self, name: &str) -> Result<Record, MetaError> {
        let r = self.get(name)?;
        let table = self.txn.open_table(SNAPSHOTS)?;
        for item in table.iter()? {
            let (_, v) = item?;
            let child: Record = serde_json::from_slice(v.value())?;
            if child.parent.as_deref() == Some(name) {
                return Err(MetaError::FailedPrecondition(format!(
                    "cannot remove snapshot {name:?}: snapshot {:?} has it as parent",
                    child.name
                )));
            }
        }
        drop(table);
        let mut table = self.txn.open_table(SNAPSHOTS)?;
        table.remove(name)?;
        Ok(r)
    }

    /// Updates labels (the only mutable field) like containerd's `UpdateInfo`: with no paths
    /// every label is replaced; `labels` replaces all; `labels.KEY` sets or (when absent in
    /// `labels`) deletes one.
    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record, MetaError> {
        let mut r = self.get(name)?;
        if paths.is_empty() {
            r.labels = labels;
        } else {
            for p in paths {
                if let Some(key) = p.strip_prefix("labels.") {
                    match labels.get(key) {
                        Some(v) => {
                            r.labels.insert(key.to_string(), v.clone());
                        }
                        None => {
                            r.labels.remove(key);
                        }
                    }
                } else if p == "labels" {
                    r.labels = labels.clone();
                } else {
                    return Err(MetaError::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {name:?}: only labels can change"
                    )));
                }
            }
        }
        r.updated = now_nanos();
        self.put(&r)?;
        Ok(r)
    }

    /// Makes the changes durable (fsync) and visible.
    pub fn commit_tx(self) -> Result<(), MetaError> {
        self.txn.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, MetaStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = MetaStore::open(&dir.path().join("meta.redb")).unwrap();
        (dir, s)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn uncommitted_transactions_leave_nothing() {
        let (_d, s) = store();
        let tx = s.write().unwrap();
        tx.create("a", None, Kind::Active, BTreeMap::new(), None)
            .unwrap();
        drop(tx);
        assert!(matches!(s.get("a"), Err(MetaError::NotFound(_))));
        assert!(s.list().unwrap().is_empty());
        // The ID counter was rolled back with it.
        let tx = s.write().unwrap();
        let r = tx
            .create("b", None, Kind::Active, BTreeMap::new(), None)
            .unwrap();
        tx.commit_tx().unwrap();
        assert_eq!(r.id, 1);
        assert_eq!(s.get("b").unwrap(), r);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let s = MetaStore::open(&path).unwrap();
            let tx = s.write().unwrap();
            tx.create("a", None, Kind::Active, labels(&[("x", "1")]), None)
                .unwrap();
            tx.commit_tx().unwrap();
        }
        let s = MetaStore::open(&path).unwrap();
        assert_eq!(s.get("a").unwrap().labels, labels(&[("x", "1")]));
    }

    #[test]
    fn containerd_rules_for_create_commit_remove() {
        let (_d, s) = store();
        let tx = s.write().unwrap();
        tx.create("base-key", None, Kind::Active, BTreeMap::new(), None)
            .unwrap();
        assert!(matches!(
            tx.create("base-key", None, Kind::Active, BTreeMap::new(), None),
            Err(MetaError::AlreadyExists(_))
        ));
        assert!(matches!(
            tx.create("x", Some("nope"), Kind::Active, BTreeMap::new(), None),
            Err(MetaError::NotFound(_))
        ));
        assert!(matches!(
            tx.create("x", Some("base-key"), Kind::Active, BTreeMap::new(), None),
            Err(MetaError::InvalidArgument(_))
        ));
        let usage = Usage {
            size: 4096,
            inodes: 2,
        };
        let base = tx
            .commit("base-key", "base", labels(&[("l", "v")]), usage)
            .unwrap();
        assert_eq!(base.kind, Kind::Committed);
        assert_eq!(base.usage, usage);
        assert!(matches!(tx.get("base-key"), Err(MetaError::NotFound(_))));
        assert!(matches!(
            tx.commit("base", "again", BTreeMap::new(), usage),
            Err(MetaError::FailedPrecondition(_))
        ));
        let child = tx
            .create("child", Some("base"), Kind::View, BTreeMap::new(), None)
            .unwrap();
        assert_eq!(child.parent.as_deref(), Some("base"));
        assert!(matches!(
            tx.remove("base"),
            Err(MetaError::FailedPrecondition(_))
        ));
        tx.commit_tx().unwrap();
        assert_eq!(s.parents(&s.get("child").unwrap()).unwrap()[0].name, "base");
        let tx = s.write().unwrap();
        tx.remove("child").unwrap();
        tx.remove("base").unwrap();
        tx.commit_tx().unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn label_updates_follow_field_paths() {
        let (_d, s) = store();
        let tx = s.write().unwrap();
        tx.create(
            "a",
            None,
            Kind::Active,
            labels(&[("k1", "1"), ("k2", "2")]),
            None,
        )
        .unwrap();
        let r = tx
            .update(
                "a",
                labels(&[("k1", "one"), ("k3", "3")]),
                &["labels.k1".into()],
            )
            .unwrap();
        assert_eq!(r.labels, labels(&[("k1", "one"), ("k2", "2")]));
        let r = tx
            .update("a", BTreeMap::new(), &["labels.k2".into()])
            .unwrap();
        assert_eq!(r.labels, labels(&[("k1", "one")]));
        let r = tx.update("a", labels(&[("z", "9")]), &[]).unwrap();
        assert_eq!(r.labels, labels(&[("z", "9")]));
        assert!(matches!(
            tx.update("a", BTreeMap::new(), &["name".into()]),
            Err(MetaError::InvalidArgument(_))
        ));
    }
}
