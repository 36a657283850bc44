//! The daemon's protocol: one JSON request per connection, answered by zero or more progress
//! events and one final reply, each a JSON line. Small and inspectable with `socat`; the
//! socket is root-only (0600), which is the whole of its access control.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// What a client asks of the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the daemon alive (and which)?
    Ping,
    /// Resolve an image, mount its layers lazily and remember it.
    Pull {
        /// Image reference.
        image: String,
        /// Platform (OS/ARCH[/VARIANT]); default this host.
        platform: Option<String>,
    },
    /// List pulled images.
    Images,
    /// Forget an image and unmount its layers no other image uses.
    Rmi {
        /// Reference or digest prefix.
        image: String,
        /// Also remove its stopped containers.
        force: bool,
    },
    /// Mount an image read-only at a directory (pulling it first if needed).
    Mount {
        /// Image reference.
        image: String,
        /// Absolute mount point.
        mountpoint: PathBuf,
        /// Platform.
        platform: Option<String>,
    },
    /// Undo a [`Request::Mount`].
    Umount {
        /// Absolute mount point.
        mountpoint: PathBuf,
    },
    /// List image mounts.
    Mounts,
    /// Prepare a container: pull if needed, writable overlay root, bundle directory.
    Create {
        /// Image reference.
        image: String,
        /// Platform.
        platform: Option<String>,
        /// Container name (unique); default derived from the ID.
        name: Option<String>,
        /// Remove when it exits.
        rm: bool,
        /// The command line shown by `ps`.
        command: String,
    },
    /// The supervisor started the runtime for a container.
    Started {
        /// Container ID.
        id: String,
        /// PID of the supervising process.
        pid: u32,
    },
    /// The container exited.
    Exited {
        /// Container ID.
        id: String,
        /// Exit code (128+signal when killed).
        code: i32,
    },
    /// Stop a running container: SIGTERM, then SIGKILL after `timeout` seconds.
    Stop {
        /// Name or ID (prefix).
        container: String,
        /// Grace period in seconds.
        timeout: u64,
    },
    /// Remove a container (its mounts and directories).
    Remove {
        /// Name or ID (prefix).
        container: String,
        /// Kill it first if it runs.
        force: bool,
    },
    /// List containers.
    Ps,
    /// Unmount layers no image uses, delete their local data, trim the cache to budget.
    Prune,
    /// `prune --all`: also remove every image no container uses, and every cached chunk no
    /// mounted layer can read.
    PruneAll,
    /// Daemon, kernel and cache facts.
    Info,
    /// Per-image, per-layer data path statistics.
    Stats {
        /// An image reference, a layer digest (prefix), or all when `None`.
        target: Option<String>,
        /// Include each layer's access log ([`LayerStats::opened`]).
        #[serde(default)]
        accessed: bool,
    },
    /// Stop the daemon (refused while containers run unless `force`).
    Shutdown {
        /// Stop even while containers run (their files become unreachable).
        force: bool,
    },
}

/// One line from the daemon: a progress event or the final answer.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// A progress message; more lines follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// Whether the request succeeded (final line).
    #[serde(default)]
    pub ok: bool,
    /// What went wrong and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Human summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Request-specific payload.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Reply {
    /// A successful reply with a message.
    pub fn ok(message: impl Into<String>) -> Reply {
        Reply {
            ok: true,
            message: Some(message.into()),
            ..Reply::default()
        }
    }

    /// A successful reply carrying data.
    pub fn data(data: impl Serialize) -> Reply {
        Reply {
            ok: true,
            data: serde_json::to_value(data).unwrap_or_default(),
            ..Reply::default()
        }
    }

    /// Decodes the payload.
    pub fn decode<T: for<'de> Deserialize<'de>>(&self) -> Result<T> {
        serde_json::from_value(self.data.clone()).context("decoding the daemon's reply")
    }
}

/// A pulled image as listed by `images`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Normalised reference.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Layer count.
    pub layers: usize,
    /// Compressed size of all layers.
    pub size: u64,
    /// Bytes of the layers already local.
    pub cached: u64,
    /// Layers served by a whole-layer fetch (no TOC).
    pub local_layers: usize,
    /// Seconds since the epoch.
    pub pulled: u64,
    /// Why the image's layers are not mounted, when they are not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

/// An image mount (from `lazypull mount`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountInfo {
    /// Where.
    pub mountpoint: PathBuf,
    /// Which image.
    pub image: String,
    /// Layer digests, base first.
    pub layers: Vec<String>,
    /// Whether every layer is completely local.
    #[serde(default)]
    pub complete: bool,
}

/// A container as listed by `ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// Full ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command line.
    pub command: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// `created`, `running`, `exited`.
    pub status: String,
    /// Exit code once exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// What `create` hands the client so it can write the runtime config and start the container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    /// Container ID.
    pub id: String,
    /// Container name.
    pub name: String,
    /// The OCI bundle directory (rootfs mounted inside).
    pub bundle: PathBuf,
    /// The image's config JSON (entrypoint, env, user, ...).
    pub image_config: serde_json::Value,
}

/// Sends one request; progress events go to `on_event`; returns the final reply.
pub async fn request(
    address: &Path,
    req: &Request,
    on_event: &mut dyn FnMut(&str),
) -> Result<Reply> {
    let stream = UnixStream::connect(address)
        .await
        .with_context(|| format!("connecting to the lazypull daemon at {}", address.display()))?;
    let (rd, mut wr) = stream.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    let mut lines = BufReader::new(rd).lines();
    while let Some(line) = lines.next_line().await? {
        let reply: Reply = serde_json::from_str(&line).context("malformed reply from daemon")?;
        match &reply.event {
            Some(e) => on_event(e),
            None => return Ok(reply),
        }
    }
    bail!("the lazypull daemon closed the connection without answering (did it crash? see its log)")
}

/// Bytes or requests by why they were fetched.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ByReason {
    /// A process was blocked on the read.
    pub on_demand: u64,
    /// Read-ahead and the prefetch list.
    pub prefetch: u64,
    /// Background fill.
    pub background: u64,
    /// The table of contents.
    pub toc: u64,
}

/// A read that took long, with the file it was in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlowReadInfo {
    /// Path inside the layer.
    pub path: String,
    /// Offset in the file.
    pub offset: u64,
    /// Bytes asked for.
    pub len: u32,
    /// Time to answer.
    pub seconds: f64,
}

/// One mounted layer's data path, for `lazypull stats`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerStats {
    /// Compressed digest.
    pub digest: String,
    /// Compressed size.
    pub size: u64,
    /// `lazy` or `local` (fetched whole).
    pub served: String,
    /// Chunks in the layer.
    pub chunks: u64,
    /// Of those, in the local cache.
    pub chunks_cached: u64,
    /// `chunks_cached` as a percentage (100 for local layers).
    pub percent_cached: f64,
    /// Registry bytes by reason.
    pub fetched_bytes: ByReason,
    /// Registry requests by reason.
    pub requests: ByReason,
    /// Average background fill rate since the layer was mounted, bytes per second.
    pub fill_rate: f64,
    /// Chunks whose digest did not match (each refetched or failed).
    pub digest_mismatches: u64,
    /// The reads that waited longest.
    pub slowest_reads: Vec<SlowReadInfo>,
    /// Regular files opened through the mount since it was mounted.
    #[serde(default)]
    pub opened_files: u64,
    /// Those files, in the order first opened; only when asked for (`stats --accessed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub opened: Vec<OpenedPath>,
}

/// A file a workload opened, for a prefetch list recorded from a real run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenedPath {
    /// Path inside the layer (and so inside the image), no leading slash.
    pub path: String,
    /// Its size.
    pub size: u64,
    /// Order of its first open among all first opens the daemon served.
    pub sequence: u64,
}

/// An image and its layers' statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageStats {
    /// Reference.
    pub reference: String,
    /// Manifest digest.
    pub digest: String,
    /// Layers, base first.
    pub layers: Vec<LayerStats>,
}
