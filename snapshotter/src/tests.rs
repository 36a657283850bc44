//! Snapshotter behaviour without containerd: containerd's overlayfs rules for local
//! snapshots, remote snapshots through a fake daemon that mounts a tmpfs per layer, fallback,
//! restore after a restart and after a mount died, crash leftovers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::*;

/// A fake daemon: "mounts" a layer by mounting a tmpfs at `<dir>/<digest hex>` (shared and
/// counted by digest), or refuses layers whose digest starts with `sha256:bad`.
struct FakeDaemon {
    dir: PathBuf,
    refs: Mutex<HashMap<String, usize>>,
    mounts: Mutex<usize>,
}

impl FakeDaemon {
    fn new(dir: &Path) -> FakeDaemon {
        FakeDaemon {
            dir: dir.to_path_buf(),
            refs: Mutex::default(),
            mounts: Mutex::default(),
        }
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest.trim_start_matches("sha256:"))
    }

    fn refs(&self, digest: &str) -> usize {
        self.refs.lock().unwrap().get(digest).copied().unwrap_or(0)
    }
}

impl RemoteLayers for FakeDaemon {
    async fn mount(&self, layer: &RemoteLayer) -> Result<MountedLayer, String> {
        if layer.layer_digest.starts_with("sha256:bad") {
            return Err("no TOC".into());
        }
        let dir = self.path(&layer.layer_digest);
        if !is_live_mount(&dir) {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            nix::mount::mount(
                Some("tmpfs"),
                &dir,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some("size=1m"),
            )
            .map_err(|e| e.to_string())?;
            std::fs::write(dir.join("layer-file"), &layer.layer_digest).unwrap();
            *self.mounts.lock().unwrap() += 1;
        }
        *self
            .refs
            .lock()
            .unwrap()
            .entry(layer.layer_digest.clone())
            .or_default() += 1;
        let mut labels = BTreeMap::new();
        labels.insert(
            "containerd.io/snapshot/remote/test.size".to_string(),
            "42".to_string(),
        );
        Ok(MountedLayer { dir, labels })
    }

    async fn release(&self, layer: &RemoteLayer) {
        let mut refs = self.refs.lock().unwrap();
        let n = refs.entry(layer.layer_digest.clone()).or_default();
        *n = n.saturating_sub(1);
        if *n == 0 {
            let _ = nix::mount::umount2(
                &self.path(&layer.layer_digest),
                nix::mount::MntFlags::MNT_DETACH,
            );
        }
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        for d in self.refs.lock().unwrap().keys() {
            let _ = nix::mount::umount2(&self.path(d), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("layers")).unwrap();
        Env { tmp }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("snapshotter")
    }

    fn open(&self) -> Snapshotter<FakeDaemon> {
        Snapshotter::open(
            &self.root(),
            FakeDaemon::new(&self.tmp.path().join("layers")),
        )
        .unwrap()
    }
}

fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn remote_labels(target: &str, digest: &str) -> HashMap<String, String> {
    labels(&[
        (LABEL_SNAPSHOT_REF, target),
        (LABEL_CRI_IMAGE_REF, "registry.test/app:v1"),
        (LABEL_CRI_LAYER_DIGEST, digest),
    ])
}

fn option<'a>(m: &'a Mount, key: &str) -> Option<&'a str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
}

fn is_already_exists(e: &Error) -> bool {
    matches!(e, Error::Meta(MetaError::AlreadyExists(_)))
}

#[tokio::test]
async fn local_snapshots_follow_the_overlayfs_snapshotter() {
    let env = Env::new();
    let s = env.open();
    // A base layer: bind mount of its own fs directory, writable.
    let m = s.prepare("extract-1", None, HashMap::new()).await.unwrap();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "bind");
    assert_eq!(m[0].options, ["rw", "rbind"]);
    let base_fs = PathBuf::from(&m[0].source);
    assert!(base_fs.ends_with("fs") && base_fs.is_dir());
    std::fs::write(base_fs.join("hello"), vec![7u8; 10_000]).unwrap();
    assert!(s.usage("extract-1").await.unwrap().inodes >= 2);
    s.commit("base", "extract-1", labels(&[("l", "v")]))
        .await
        .unwrap();
    let base = s.stat("base").unwrap();
    assert_eq!(base.kind, Kind::Committed);
    assert_eq!(base.labels.get("l").map(String::as_str), Some("v"));
    assert!(base.usage.size >= 10_000, "{:?}", base.usage);
    assert_eq!(s.usage("base").await.unwrap(), base.usage);
    assert!(matches!(
        s.mounts("base").await,
        Err(Error::Meta(MetaError::FailedPrecondition(_)))
    ));

    // A container on top: overlay with upper and work.
    let m = s
        .prepare("container", Some("base"), HashMap::new())
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert_eq!(option(&m[0], "lowerdir"), Some(base_fs.to_str().unwrap()));
    assert!(option(&m[0], "upperdir").unwrap().ends_with("/fs"));
    assert!(option(&m[0], "workdir").unwrap().ends_with("/work"));
    assert_eq!(s.mounts("container").await.unwrap(), m);

    // Views: one layer is a read-only bind of it; none is a read-only bind of an empty dir.
    let v = s
        .view("view-1", Some("base"), HashMap::new())
        .await
        .unwrap();
    assert_eq!(v[0].r#type, "bind");
    assert_eq!(v[0].source, base_fs.to_str().unwrap());
    assert_eq!(v[0].options, ["ro", "rbind"]);
    let v = s.view("view-0", None, HashMap::new()).await.unwrap();
    assert_eq!(v[0].options, ["ro", "rbind"]);

    // Two layers: the view is an overlay of both lowers, top first, no upper.
    s.commit("top", "container", HashMap::new()).await.unwrap();
    let v = s.view("view-2", Some("top"), HashMap::new()).await.unwrap();
    assert_eq!(v[0].r#type, "overlay");
    let lower = option(&v[0], "lowerdir").unwrap();
    assert!(lower.ends_with(base_fs.to_str().unwrap()) && lower.contains(':'));
    assert!(option(&v[0], "upperdir").is_none());

    // containerd's errors.
    assert!(matches!(
        s.prepare("container2", Some("missing"), HashMap::new())
            .await,
        Err(Error::Meta(MetaError::NotFound(_)))
    ));
    assert!(matches!(
        s.prepare("x", Some("view-1"), HashMap::new()).await,
        Err(Error::Meta(MetaError::InvalidArgument(_)))
    ));
    assert!(is_already_exists(
        &s.prepare("view-1", None, HashMap::new()).await.unwrap_err()
    ));
    assert!(matches!(
        s.commit("x", "view-1", HashMap::new()).await,
        Err(Error::Meta(MetaError::FailedPrecondition(_)))
    ));
    assert!(matches!(
        s.remove("base").await,
        Err(Error::Meta(MetaError::FailedPrecondition(_)))
    ));

    // Walk with filters.
    let names = |f: &[&str]| -> Vec<String> {
        let f: Vec<String> = f.iter().map(|s| s.to_string()).collect();
        s.list(&f).unwrap().into_iter().map(|r| r.name).collect()
    };
    assert_eq!(names(&[]).len(), 5);
    assert_eq!(names(&["kind==committed"]), ["base", "top"]);
    assert_eq!(names(&["parent==base"]), ["top", "view-1"]);
    assert_eq!(names(&["labels.l==v"]), ["base"]);
    assert!(s.list(&["kind=".to_string()]).is_err());

    // Update labels.
    let r = s
        .update("top", labels(&[("a", "1")]), &["labels.a".to_string()])
        .unwrap();
    assert_eq!(r.labels.get("a").map(String::as_str), Some("1"));

    // Remove in order; directories go with the metadata.
    for k in ["view-0", "view-1", "view-2", "top", "base"] {
        s.remove(k).await.unwrap();
    }
    assert!(s.list(&[]).unwrap().is_empty());
    let left: Vec<_> = std::fs::read_dir(env.root().join("snapshots"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn crash_leftovers_are_cleaned_and_metadata_survives() {
    let env = Env::new();
    {
        let s = env.open();
        s.prepare("a", None, HashMap::new()).await.unwrap();
    }
    // A Prepare that crashed before its commit leaves a directory without metadata.
    let orphan = env.root().join("snapshots").join("new-1-1");
    std::fs::create_dir_all(orphan.join("fs")).unwrap();
    std::fs::create_dir_all(env.root().join("snapshots").join("999/fs")).unwrap();
    let s = env.open();
    assert!(!orphan.exists());
    assert!(!env.root().join("snapshots/999").exists());
    assert_eq!(s.stat("a").unwrap().kind, Kind::Active);
    let m = s.mounts("a").await.unwrap();
    assert!(Path::new(&m[0].source).is_dir());
    std::fs::create_dir_all(env.root().join("snapshots").join("998")).unwrap();
    assert_eq!(s.cleanup().unwrap(), 1);
}

#[tokio::test]
async fn remote_layers_are_committed_under_the_target_and_reused() {
    if !is_root() {
        eprintln!("needs root to mount; skipping");
        return;
    }
    let env = Env::new();
    let s = env.open();
    let e = s
        .prepare(
            "ns/1/extract-a",
            None,
            remote_labels("sha256:chain1", "sha256:aaaa"),
        )
        .await
        .unwrap_err();
    assert!(is_already_exists(&e), "{e}");
    let r = s.stat("sha256:chain1").unwrap();
    assert_eq!(r.kind, Kind::Committed);
    assert_eq!(
        r.labels.get(LABEL_REMOTE).map(String::as_str),
        Some(REMOTE_VALUE)
    );
    assert_eq!(
        r.labels
            .get("containerd.io/snapshot/remote/test.size")
            .map(String::as_str),
        Some("42")
    );
    assert!(matches!(
        s.stat("ns/1/extract-a"),
        Err(Error::Meta(MetaError::NotFound(_)))
    ));
    // What containerd asks next to find it.
    let f = vec![format!(
        r#"labels."{LABEL_SNAPSHOT_REF}"==sha256:chain1,parent=="""#
    )];
    assert_eq!(s.list(&f).unwrap().len(), 1);

    // The second layer on top, then a container on both.
    let e = s
        .prepare(
            "ns/2/extract-b",
            Some("sha256:chain1"),
            remote_labels("sha256:chain2", "sha256:bbbb"),
        )
        .await
        .unwrap_err();
    assert!(is_already_exists(&e), "{e}");
    let m = s
        .prepare("ns/3/ctr", Some("sha256:chain2"), HashMap::new())
        .await
        .unwrap();
    let layers = env.tmp.path().join("layers");
    assert_eq!(
        option(&m[0], "lowerdir").unwrap(),
        format!(
            "{}:{}",
            layers.join("bbbb").display(),
            layers.join("aaaa").display()
        )
    );
    // Same layer again (another namespace): no second mount, no second snapshot.
    let e = s
        .prepare(
            "ns2/1/extract-a",
            None,
            remote_labels("sha256:chain1", "sha256:aaaa"),
        )
        .await
        .unwrap_err();
    assert!(is_already_exists(&e));
    assert_eq!(s.remote.refs("sha256:aaaa"), 1);
    assert_eq!(s.stats().remote_prepared, 2);

    // A layer the daemon cannot serve lazily: a normal active snapshot for containerd to fill.
    let m = s
        .prepare(
            "ns/4/extract-c",
            Some("sha256:chain2"),
            remote_labels("sha256:chain3", "sha256:bad0"),
        )
        .await
        .unwrap();
    assert!(option(&m[0], "upperdir").is_some());
    assert_eq!(s.stats().fallbacks, 1);
    s.commit("ns/5/sha256:chain3", "ns/4/extract-c", HashMap::new())
        .await
        .unwrap();

    // Removing gives the references back.
    s.remove("ns/3/ctr").await.unwrap();
    s.remove("ns/5/sha256:chain3").await.unwrap();
    s.remove("sha256:chain2").await.unwrap();
    assert_eq!(s.remote.refs("sha256:bbbb"), 0);
    assert!(!is_live_mount(&layers.join("bbbb")));
    assert_eq!(s.remote.refs("sha256:aaaa"), 1);
}

#[tokio::test]
async fn remote_snapshots_are_remounted_after_a_restart_and_a_dead_mount() {
    if !is_root() {
        eprintln!("needs root to mount; skipping");
        return;
    }
    let env = Env::new();
    let layers = env.tmp.path().join("layers");
    {
        let s = env.open();
        let e = s
            .prepare("k1", None, remote_labels("sha256:c1", "sha256:aaaa"))
            .await
            .unwrap_err();
        assert!(is_already_exists(&e));
        s.prepare("ctr", Some("sha256:c1"), HashMap::new())
            .await
            .unwrap();
        // The daemon dies: its mounts go with it.
    }
    assert!(!is_live_mount(&layers.join("aaaa")));
    let s = env.open();
    assert_eq!(s.restore().await, (1, 0));
    assert_eq!(s.remote.refs("sha256:aaaa"), 1);
    let m = s.mounts("ctr").await.unwrap();
    let lower = PathBuf::from(option(&m[0], "lowerdir").unwrap());
    assert!(is_live_mount(&lower));
    assert_eq!(
        std::fs::read_to_string(lower.join("layer-file")).unwrap(),
        "sha256:aaaa"
    );
    // The recorded labels came back to the daemon.
    let r = s.stat("sha256:c1").unwrap();
    assert!(r
        .labels
        .contains_key("containerd.io/snapshot/remote/test.size"));

    // The mount dies under us: Mounts mounts it again instead of answering a dead path.
    nix::mount::umount2(&lower, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let m = s.mounts("ctr").await.unwrap();
    assert!(is_live_mount(Path::new(option(&m[0], "lowerdir").unwrap())));
    assert_eq!(s.remote.refs("sha256:aaaa"), 1);
    assert_eq!(*s.remote.mounts.lock().unwrap(), 2);
}

#[tokio::test]
async fn unavailable_remote_layers_are_never_answered_with_a_dead_path() {
    if !is_root() {
        eprintln!("needs root to mount; skipping");
        return;
    }
    let env = Env::new();
    {
        let s = env.open();
        let _ = s
            .prepare("k1", None, remote_labels("sha256:c1", "sha256:aaaa"))
            .await;
        s.prepare("ctr", Some("sha256:c1"), HashMap::new())
            .await
            .unwrap();
    }
    // Restart with a daemon that cannot mount anything (registry gone, no local TOC).
    struct Broken;
    impl RemoteLayers for Broken {
        async fn mount(&self, _: &RemoteLayer) -> Result<MountedLayer, String> {
            Err("registry unreachable".into())
        }
        async fn release(&self, _: &RemoteLayer) {}
    }
    let s = Snapshotter::open(&env.root(), Broken).unwrap();
    assert_eq!(s.restore().await, (0, 1));
    let e = s.mounts("ctr").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable { .. }), "{e}");
    assert!(e.to_string().contains("registry unreachable"), "{e}");
    // It can still be listed and removed.
    assert_eq!(s.list(&[]).unwrap().len(), 2);
    s.remove("ctr").await.unwrap();
    s.remove("sha256:c1").await.unwrap();
}
