//! What the daemon remembers across restarts: pulled images, image mounts and containers, as
//! small JSON files under `--root`, each replaced atomically (temp file + rename), so a crash
//! leaves the old or the new version, never half of one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// A layer as the manifest describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    /// Compressed digest.
    pub digest: String,
    /// Compressed size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// Annotations (TOC digest and the like).
    #[serde(default)]
    pub annotations: std::collections::HashMap<String, String>,
}

/// A pulled image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Normalised reference it was pulled by.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Platform selected.
    pub platform: String,
    /// The image config JSON.
    pub config: serde_json::Value,
    /// Layers, base first.
    pub layers: Vec<LayerRecord>,
    /// When, in seconds since the epoch.
    pub pulled: u64,
}

/// An image mounted at a directory by `lazypull mount`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    /// Mount point.
    pub mountpoint: PathBuf,
    /// Image reference (key of its [`ImageRecord`]).
    pub image: String,
}

/// A container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerRecord {
    /// Full ID (64 hex digits).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// Image reference (key of its [`ImageRecord`]).
    pub image: String,
    /// Command line for `ps`.
    pub command: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// Remove when it exits.
    pub rm: bool,
    /// `created`, `running` or `exited`, as last reported by its supervisor.
    pub status: String,
    /// Exit code once exited.
    pub exit_code: Option<i32>,
    /// PID of the supervising `lazypull` process while it runs.
    pub supervisor: Option<u32>,
}

/// Writes `value` as JSON to `path` atomically.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(value)?;
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Reads JSON from `path`; a missing file is the default value.
pub fn load<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data).with_context(|| {
            format!(
                "{} is corrupt; move it away to start afresh",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Every container record under `dir` (one subdirectory per container); unreadable ones are
/// logged and skipped so one bad record cannot keep the daemon from starting.
pub fn load_containers(dir: &Path) -> Vec<ContainerRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path().join("container.json");
        match std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|d| Ok(serde_json::from_slice::<ContainerRecord>(&d)?))
        {
            Ok(r) => out.push(r),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "skipping unreadable container record")
            }
        }
    }
    out.sort_by_key(|c| c.created);
    out
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
