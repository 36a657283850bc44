//! Learned prefetch: what an image's start read on this node, in order, kept per image and
//! prefetched at the image's next cold start, with no flag and no conversion.
//!
//! The first pull of an image (no profile yet) watches the access logs of its layer mounts
//! (the `stats --accessed` machinery) and saves, each time the workload's on-demand reads
//! go quiet within [`LEARN_FOR`] of the pull, the files opened so far, in the order first
//! opened, to `<root>/profiles/<manifest hex>.json`. A later pull of the same manifest (after
//! `rmi`, a pruned or evicted cache, a new daemon on the same root) prefetches those files,
//! per layer in parallel and in the recorded order, while the container starts; the layers'
//! landmark prefetch and the background fill run as before, the fill after both.
//!
//! Trust: a profile names files, nothing else. Every byte it makes the daemon fetch is
//! verified like any other, so a wrong, stale or hostile profile costs bandwidth, never
//! correctness; paths it names that a layer does not have are skipped, and its size is bounded.
//! Keyed by manifest digest only: two different commands run from one image share a profile
//! (the first one recorded).
//!
//! `lazypull profile push IMAGE` publishes a node's profile next to the image in its
//! repository (an OCI artifact whose subject is the manifest, listed under the referrers tag
//! `sha256-<hex>`; see [`lazypull_fetcher::referrers`]). A pull that has no local profile
//! looks there, concurrently with the container's start, keeps what it finds, and prefetches
//! it: a fresh node starts with what another node learned.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lazypull_fetcher::Digest;
use lazypull_fs::background;
use lazypull_fs::toc::NodeId;
use serde::{Deserialize, Serialize};

use super::store::ImageRecord;
use super::Shared;

/// The profile format this daemon writes and reads.
const VERSION: u32 = 1;
/// Artifact type (and content media type) of a profile published next to its image.
pub const ARTIFACT_TYPE: &str = "application/vnd.lazypull.profile.v1+json";
/// How long after a pull the start is watched and the profile updated.
const LEARN_FOR: Duration = Duration::from_secs(60);
/// How long on-demand reads must have been quiet for the files opened so far to be saved.
const QUIET: Duration = Duration::from_secs(2);
/// How often the learner looks at the access logs.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// Largest profile read or published (bytes): what the registry client reads of a small
/// document at most.
const MAX_FILE_BYTES: u64 = lazypull_fetcher::registry::MAX_DOCUMENT_BYTES;

/// What an image's start read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Profile {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Manifest digest of the image it was recorded for.
    pub image: String,
    /// When it was recorded, seconds since the epoch.
    pub recorded: u64,
    /// Files in the order first opened.
    pub files: Vec<ProfileFile>,
}

/// One file of a [`Profile`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProfileFile {
    /// Digest of the layer holding it (the uppermost layer that served the open).
    pub layer: String,
    /// Path inside the layer, without a leading slash.
    pub path: String,
}

/// Where the profile of manifest `image` lives.
pub fn profile_path(root: &Path, image: &Digest) -> PathBuf {
    root.join("profiles").join(format!("{}.json", image.hex()))
}

/// The saved profile of `image`, if there is a usable one (an unreadable or foreign file is
/// logged and ignored: it only ever costs the prefetch).
pub fn load(root: &Path, image: &Digest) -> Option<Profile> {
    let path = profile_path(root, image);
    let read = || -> Result<Option<Profile>> {
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        anyhow::ensure!(
            len <= MAX_FILE_BYTES,
            "{} is {len} bytes, above the {MAX_FILE_BYTES}-byte limit",
            path.display()
        );
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        parse(&data, image)
            .with_context(|| format!("{}", path.display()))
            .map(Some)
    };
    match read() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(image = %image, error = %crate::report::chain(&e),
                "ignoring a saved prefetch profile");
            None
        }
    }
}

/// Parses a profile and checks that it is one for `image`.
pub fn parse(data: &[u8], image: &Digest) -> Result<Profile> {
    let p: Profile = serde_json::from_slice(data).context("not a lazypull profile")?;
    anyhow::ensure!(
        p.version == VERSION && p.image == image.to_string(),
        "a profile of version {} for {}, not version {VERSION} for {image}",
        p.version,
        p.image
    );
    Ok(p)
}

/// Saves `profile` atomically.
fn save(root: &Path, image: &Digest, profile: &Profile) -> Result<()> {
    let path = profile_path(root, image);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    super::store::save(&path, profile)
}

/// What the image's layer mounts have served opens for since first-open sequence `after`:
/// (sequence, layer digest, layer model, node), gathered under the daemon's lock (a copy of
/// each access log, nothing more).
type Opened = Vec<(u64, String, Arc<lazypull_fs::toc::Layer>, NodeId)>;

async fn opened_since(state: &Shared, record: &ImageRecord, after: u64) -> Opened {
    let st = state.lock().await;
    let mut opened = Vec::new();
    for l in &record.layers {
        let Ok(d) = l.digest.parse::<Digest>() else {
            continue;
        };
        let Some(entry) = st.layers.get(&d) else {
            continue;
        };
        let layer = entry.source.layer();
        opened.extend(
            entry
                .opened()
                .into_iter()
                .filter(|o| o.sequence > after)
                .map(|o| (o.sequence, l.digest.clone(), Arc::clone(layer), o.node)),
        );
    }
    opened
}

/// The files of `opened` in first-open order, named by path (outside the daemon's lock: naming
/// walks the tree); a path opened through several layers counts once, at its first open.
async fn name(mut opened: Opened) -> Vec<ProfileFile> {
    opened.sort_by_key(|(seq, ..)| *seq);
    tokio::task::spawn_blocking(move || {
        let mut seen = std::collections::HashSet::new();
        opened
            .into_iter()
            .filter_map(|(_, layer_digest, layer, node)| {
                Some(ProfileFile {
                    layer: layer_digest,
                    path: layer.path(node)?,
                })
            })
            .filter(|f| seen.insert(f.path.clone()))
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Starts what the image's pull owes its profile: prefetching a saved one, or learning one.
pub fn spawn(state: Shared, record: ImageRecord, prefetch: bool) {
    let Ok(image) = record.digest.parse::<Digest>() else {
        return;
    };
    tokio::spawn(async move {
        let (root, engine) = {
            let st = state.lock().await;
            (st.settings.root.clone(), st.engine.clone())
        };
        // What the image's layers served before this pull (other images sharing a layer)
        // is not this image's start.
        let before = opened_since(&state, &record, 0)
            .await
            .iter()
            .map(|(seq, ..)| *seq)
            .max()
            .unwrap_or(0);
        let profile = match load(&root, &image) {
            Some(p) => Some(p),
            None => published(&engine, &root, &record, &image).await,
        };
        match profile {
            Some(profile) if prefetch => prefetch_profile(&state, &record, &profile).await,
            Some(_) => {}
            None => learn(&state, &root, &image, &record, before).await,
        }
    });
}

/// The profile published next to the image in its repository (`lazypull profile push`), kept
/// locally once found; `None` when there is none or it cannot be used (logged).
async fn published(
    engine: &lazypull_fetcher::FetchEngine,
    root: &Path,
    record: &ImageRecord,
    image: &Digest,
) -> Option<Profile> {
    let reference: lazypull_fetcher::Reference = record.reference.parse().ok()?;
    let found = engine
        .registry()
        .find_artifact(&reference, image, ARTIFACT_TYPE, MAX_FILE_BYTES)
        .await;
    let data = match found {
        Ok(Some(data)) => data,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(image = %record.reference, error = %crate::report::chain(&e.into()),
                "cannot read the image's published prefetch profile; learning one instead");
            return None;
        }
    };
    match parse(&data, image) {
        Ok(p) => {
            tracing::info!(image = %record.reference, files = p.files.len(),
                "found a prefetch profile published next to the image");
            if let Err(e) = save(root, image, &p) {
                tracing::warn!(image = %record.reference, error = %crate::report::chain(&e),
                    "cannot keep the published prefetch profile");
            }
            Some(p)
        }
        Err(e) => {
            tracing::warn!(image = %record.reference, error = %crate::report::chain(&e),
                "ignoring the image's published prefetch profile");
            None
        }
    }
}

/// Prefetches the profile's files, each layer's in the recorded order, layers in parallel.
async fn prefetch_profile(state: &Shared, record: &ImageRecord, profile: &Profile) {
    let started = Instant::now();
    let mut work = Vec::new();
    {
        let st = state.lock().await;
        for l in &record.layers {
            let Ok(d) = l.digest.parse::<Digest>() else {
                continue;
            };
            let Some(entry) = st.layers.get(&d).filter(|e| !e.local) else {
                continue;
            };
            let layer = entry.source.layer();
            let nodes: Vec<_> = profile
                .files
                .iter()
                .filter(|f| f.layer == l.digest)
                .filter_map(|f| layer.resolve(&f.path))
                .collect();
            if !nodes.is_empty() {
                work.push((entry.source.clone(), nodes));
            }
        }
    }
    let files: usize = work.iter().map(|(_, n)| n.len()).sum();
    tracing::info!(image = %record.reference, files, of = profile.files.len(),
        "prefetching what the image's last start read");
    let _prefetching = background::Prefetching::start();
    let results = futures::future::join_all(
        work.into_iter()
            .map(|(source, nodes)| async move { source.prefetch_files(&nodes).await }),
    )
    .await;
    for e in results.into_iter().filter_map(Result::err) {
        tracing::warn!(image = %record.reference, error = %e, "profile prefetch incomplete");
    }
    if files > 0 {
        super::metrics::PROFILES
            .with_label_values(&["prefetched"])
            .inc();
    }
    tracing::info!(image = %record.reference, files,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()), "profile prefetch done");
}

/// Watches the image's start and saves what it opened each time its reads go quiet.
async fn learn(state: &Shared, root: &Path, image: &Digest, record: &ImageRecord, after: u64) {
    let started = Instant::now();
    let mut saved = 0usize;
    while started.elapsed() < LEARN_FOR {
        tokio::time::sleep(LOOK_EVERY).await;
        // Quiet: no fetch anyone waits on for a while (or none at all since the pull, when
        // the cache already held what the start read).
        let quiet = background::on_demand_in_flight() == 0
            && background::since_last_on_demand()
                .map_or(started.elapsed() >= QUIET, |s| s >= QUIET);
        if !quiet {
            continue;
        }
        let opened = opened_since(state, record, after).await;
        let count = opened.len();
        if count <= saved {
            continue;
        }
        let files = name(opened).await;
        let profile = Profile {
            version: VERSION,
            image: image.to_string(),
            recorded: super::store::now(),
            files,
        };
        match save(root, image, &profile) {
            Ok(()) => {
                if saved == 0 {
                    super::metrics::PROFILES
                        .with_label_values(&["learned"])
                        .inc();
                }
                saved = count;
                tracing::info!(image = %record.reference, files = profile.files.len(),
                    "saved what the image's start read; its next cold start prefetches it");
            }
            Err(e) => {
                tracing::warn!(image = %record.reference, error = %crate::report::chain(&e),
                    "cannot save the prefetch profile");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn saved_profiles_round_trip_and_foreign_or_broken_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (digest('a'), digest('b'));
        assert_eq!(load(dir.path(), &a), None);
        let p = Profile {
            version: VERSION,
            image: a.to_string(),
            recorded: 1,
            files: vec![ProfileFile {
                layer: b.to_string(),
                path: "usr/lib/x.so".into(),
            }],
        };
        save(dir.path(), &a, &p).unwrap();
        assert_eq!(load(dir.path(), &a), Some(p.clone()));
        // A profile copied under another image's name is not used for it.
        std::fs::copy(profile_path(dir.path(), &a), profile_path(dir.path(), &b)).unwrap();
        assert_eq!(load(dir.path(), &b), None);
        // Nor is a broken one, or one of another version.
        std::fs::write(profile_path(dir.path(), &a), b"{\"version\":1,").unwrap();
        assert_eq!(load(dir.path(), &a), None);
        let newer = Profile { version: 2, ..p };
        save(dir.path(), &a, &newer).unwrap();
        assert_eq!(load(dir.path(), &a), None);
        // Nor one too big to be a profile.
        let f = std::fs::File::create(profile_path(dir.path(), &a)).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert_eq!(load(dir.path(), &a), None);
    }
}
