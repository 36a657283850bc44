//! Image conversion (`lazypull convert`): read an image from a registry or an OCI layout,
//! rewrite every layer as eStargz (or zstd:chunked), and write the new image (configs with the
//! new `rootfs.diff_ids`, manifests with the format's layer annotations, a new index for a
//! multi-platform image) to a registry or an OCI layout.
//!
//! Why this shape:
//! - Streaming, bounded memory and disk: a source layer is downloaded (verified) to a temporary
//!   file, decompressed while it is converted into a second temporary file, and uploaded from
//!   that file; each file is deleted as soon as it is no longer needed, and at most
//!   `2 x jobs` layers are between download and upload at any time. Nothing holds a whole
//!   layer in memory.
//! - All cores: one layer is converted per core at a time (the writers are single-threaded
//!   and CPU-bound) while other layers download or upload.
//! - Faithful: manifests, configs and indexes are edited as JSON values, so fields and
//!   annotations this code does not know survive; only digests, sizes, media types, the
//!   layer-format annotations and the diff ids change.
//!
//! The per-layer step [`convert_layer`] is a plain synchronous function (file in, file out);
//! [`convert_image`] orchestrates fetching, converting and pushing, reporting progress through
//! a [`Reporter`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazypull_fetcher::digest::Verifier;
use lazypull_fetcher::manifest::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};
use lazypull_fetcher::{
    BlobPush, Digest, Manifest, Platform, PushBlobOptions, PushError, Reference, Registry,
};
use lazypull_fs::estargz::{write_estargz, EstargzError, WriterOptions};
use lazypull_fs::local::LayerCompression;
use lazypull_fs::zstd_chunked::{self, ZstdChunkedError};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

pub use lazypull_fs::estargz::{TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION};
/// OCI image layout: the annotation naming a manifest in `index.json`.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// buildx marks attestation manifests in an index with this annotation.
const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";

use lazypull_fetcher::manifest::{
    DOCKER_CONFIG, DOCKER_LAYER_GZIP, OCI_CONFIG, OCI_LAYER_GZIP, OCI_LAYER_ZSTD,
};

/// Largest manifest, index or config accepted from an OCI layout (as from a registry).
const MAX_DOCUMENT: u64 = 8 << 20;
/// Progress is reported at most once per this many input bytes.
const PROGRESS_STEP: u64 = 1 << 20;

/// The layer format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// eStargz: gzip members per chunk with a TOC; any tar+gzip tool still reads it.
    Estargz,
    /// zstd:chunked (containers/storage partial pulls); any tar+zstd tool still reads it.
    ZstdChunked,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Estargz => "estargz",
            Format::ZstdChunked => "zstd:chunked",
        })
    }
}

/// How each layer is written.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Output format.
    pub format: Format,
    /// Largest chunk of a file (the unit of lazy fetching); `None`: the format's default.
    pub chunk_size: Option<u64>,
    /// Compression level (gzip 0-9, zstd 1-22); `None`: the format's default.
    pub level: Option<i32>,
    /// Files to put first, followed by the prefetch landmark; `None`: no prefetch list.
    pub prefetch: Option<Vec<String>>,
}

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// Reading from the source registry failed.
    #[error(transparent)]
    Registry(#[from] lazypull_fetcher::Error),
    /// Writing to the destination registry failed.
    #[error(transparent)]
    Push(#[from] PushError),
    /// The eStargz writer failed on a layer (bad tar, corrupt compression, I/O).
    #[error("converting layer {layer} to eStargz: {source}")]
    Estargz {
        /// The source layer (digest, or file when converting a file).
        layer: String,
        /// What the writer said.
        source: EstargzError,
    },
    /// The zstd:chunked writer failed on a layer (bad tar, corrupt compression, I/O).
    #[error("converting layer {layer} to zstd:chunked: {source}")]
    ZstdChunked {
        /// The source layer (digest, or file when converting a file).
        layer: String,
        /// What the writer said.
        source: ZstdChunkedError,
    },
    /// An option is out of range.
    #[error("{0}")]
    BadOption(String),
    /// A layer this code cannot convert (encrypted, unknown media type).
    #[error("cannot convert layer {layer} of media type {media_type:?}: {detail}")]
    UnsupportedLayer {
        /// The layer.
        layer: String,
        /// Its media type.
        media_type: String,
        /// Why.
        detail: String,
    },
    /// A blob read from an OCI layout does not hash to its name.
    #[error("blob {expected} in {path} hashes to {actual}: the layout is corrupt")]
    BlobDigest {
        /// The file.
        path: PathBuf,
        /// Its name.
        expected: Box<Digest>,
        /// What it hashes to.
        actual: Box<Digest>,
    },
    /// A manifest, index or config is not what an image needs.
    #[error("image {image}: {detail}")]
    Image {
        /// The image or document.
        image: String,
        /// What is wrong.
        detail: String,
    },
    /// An OCI layout cannot be read or written.
    #[error("OCI layout {}: {detail}", path.display())]
    Layout {
        /// The layout directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A SRC or DST argument is not a reference or layout.
    #[error("invalid image location {input:?}: {detail}")]
    Location {
        /// The argument.
        input: String,
        /// What is wrong.
        detail: String,
    },
    /// Local I/O (temporary files).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Stopped by the user (Ctrl-C) or because another layer failed.
    #[error("conversion cancelled")]
    Cancelled,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ConvertError {
    let what = what.into();
    move |source| ConvertError::Io { what, source }
}

/// Where an image is read from or written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A registry repository and tag (or digest, for sources).
    Registry(Reference),
    /// An OCI image layout directory and the `org.opencontainers.image.ref.name` of the image.
    Layout {
        /// The directory.
        dir: PathBuf,
        /// The name; `None` picks the only image (source) or `latest` (destination).
        tag: Option<String>,
    },
}

impl Location {
    /// Parses `oci:DIR[:TAG]` (as skopeo does: the first `:` after the directory ends it) or
    /// an image reference.
    pub fn parse(s: &str) -> Result<Location, ConvertError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.split_once(':') {
                Some((d, t)) if !t.is_empty() => (d, Some(t.to_string())),
                Some((d, _)) => (d, None),
                None => (rest, None),
            };
            if dir.is_empty() {
                return Err(ConvertError::Location {
                    input: s.to_string(),
                    detail: "the OCI layout directory is missing (expected oci:DIR[:TAG])".into(),
                });
            }
            return Ok(Location::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        s.parse::<Reference>()
            .map(Location::Registry)
            .map_err(|e| ConvertError::Location {
                input: s.to_string(),
                detail: e.to_string(),
            })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Registry(r) => write!(f, "{}", r.familiar()),
            Location::Layout { dir, tag } => {
                write!(f, "oci:{}", dir.display())?;
                if let Some(t) = tag {
                    write!(f, ":{t}")?;
                }
                Ok(())
            }
        }
    }
}

/// Which images of a multi-platform index to convert.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Platforms {
    /// Every platform; the result is a new index.
    #[default]
    All,
    /// One platform; the result is a single image manifest.
    One(Platform),
}

/// Everything [`convert_image`] needs besides source and destination.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// How layers are written.
    pub layer: LayerOptions,
    /// Which platforms of an index to convert.
    pub platforms: Platforms,
    /// Layers converted at the same time (normally the number of cores).
    pub jobs: usize,
    /// Where temporary files go (a private directory is made inside).
    pub work_dir: PathBuf,
    /// Set to stop: running conversions fail at their next read, nothing more starts.
    pub cancel: Arc<AtomicBool>,
}

/// What a layer is doing, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a download or conversion slot.
    Queued,
    /// Fetching the source blob (progress in compressed bytes).
    Download,
    /// Rewriting it (progress in source bytes consumed).
    Convert,
    /// Uploading the result (progress in bytes sent).
    Upload,
}

/// A layer as [`Reporter::begin`] announces it.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// Source blob digest.
    pub digest: Digest,
    /// Source blob size.
    pub size: u64,
}

/// How one layer ended, for [`Reporter::layer_done`].
#[derive(Debug, Clone)]
pub struct LayerSummary {
    /// The converted blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Size of the uncompressed tar written.
    pub tar_size: u64,
    /// Time spent converting (excluding transfers).
    pub convert_time: Duration,
    /// Whether the destination had to receive it, or had it already.
    pub pushed: BlobPush,
}

/// Receives progress; the CLI shows bars on a terminal and plain lines otherwise. Called from
/// async tasks and blocking threads alike, so implementations must be cheap and thread-safe.
pub trait Reporter: Send + Sync {
    /// The layers about to be converted, in order (indexes below refer to this list).
    fn begin(&self, layers: &[LayerInfo]);
    /// Layer `layer` entered `phase`, whose progress counts up to `total` bytes.
    fn phase(&self, layer: usize, phase: Phase, total: u64);
    /// Progress within the current phase.
    fn progress(&self, layer: usize, done: u64);
    /// Layer `layer` is converted and at the destination.
    fn layer_done(&self, layer: usize, summary: &LayerSummary);
    /// Anything else worth telling the user (skipped entries, pushed manifests).
    fn note(&self, message: &str);
}

/// A layer's conversion result: what the new manifest and config need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertedLayer {
    /// Digest of the new blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Digest of its uncompressed tar (the config's diff id).
    pub diff_id: Digest,
    /// Size of its uncompressed tar.
    pub tar_size: u64,
    /// Layer descriptor annotations the format defines.
    pub annotations: BTreeMap<String, String>,
    /// Media type, OCI flavour.
    pub media_type: &'static str,
    /// Compressed bytes read from the source.
    pub source_size: u64,
}

/// Reads the source blob: counts (for progress), optionally hashes (layout blobs, which
/// nothing verified yet), and stops when the conversion is cancelled.
struct Tap<'a, R> {
    inner: R,
    read: u64,
    reported: u64,
    hash: Option<Verifier>,
    progress: &'a (dyn Fn(u64) + Sync),
    cancel: &'a AtomicBool,
}

impl<R: Read> Read for Tap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            // Not `Interrupted`: readers retry that kind.
            return Err(io::Error::other("conversion cancelled"));
        }
        let n = self.inner.read(buf)?;
        let data = buf.get(..n).unwrap_or_default();
        if let Some(h) = &mut self.hash {
            h.update(data);
        }
        self.read += n as u64;
        if self.read - self.reported >= PROGRESS_STEP || n == 0 {
            self.reported = self.read;
            (self.progress)(self.read);
        }
        Ok(n)
    }
}

/// Converts the layer blob at `src` (gzip, zstd or plain tar, told by its magic bytes; the
/// media type only breaks ties for empty blobs) into `dst`, streaming. `verify` checks the
/// source blob's digest on the way (for blobs not verified by a download). `progress` gets
/// the source bytes consumed so far.
pub fn convert_layer(
    src: &Path,
    verify: Option<&Digest>,
    dst: &Path,
    opts: &LayerOptions,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<ConvertedLayer, ConvertError> {
    convert_layer_inner(src, verify, dst, opts, progress, cancel).map_err(|e| {
        if cancel.load(Ordering::Relaxed) {
            ConvertError::Cancelled
        } else {
            e
        }
    })
}

fn convert_layer_inner(
    src: &Path,
    verify: Option<&Digest>,
    dst: &Path,
    opts: &LayerOptions,
    progress: &(dyn Fn(u64) + Sync),
    cancel: &AtomicBool,
) -> Result<ConvertedLayer, ConvertError> {
    let layer_name = verify.map_or_else(|| src.display().to_string(), |d| d.to_string());
    let file = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    let mut tap = Tap {
        inner: file,
        read: 0,
        reported: 0,
        hash: verify.map(|d| Verifier::new(d.algorithm())),
        progress,
        cancel,
    };
    let out = File::create(dst).map_err(io_err(format!("creating {}", dst.display())))?;
    let written = {
        let mut input = BufReader::with_capacity(256 << 10, &mut tap);
        let head = input
            .fill_buf()
            .map_err(io_err(format!("reading {}", src.display())))?;
        let tar = LayerCompression::sniff(head)
            .decoder(input)
            .map_err(io_err("starting the decompressor"))?;
        match opts.format {
            Format::Estargz => {
                let defaults = WriterOptions::default();
                let level = match opts.level {
                    Some(l @ 0..=9) => flate2::Compression::new(l as u32),
                    Some(l) => {
                        return Err(ConvertError::BadOption(format!(
                            "gzip level {l} is out of range 0-9"
                        )))
                    }
                    None => defaults.level,
                };
                let w = write_estargz(
                    tar,
                    out,
                    &WriterOptions {
                        chunk_size: opts.chunk_size.unwrap_or(defaults.chunk_size),
                        level,
                        prefetch: opts.prefetch.clone(),
                    },
                )
                .map_err(|source| ConvertError::Estargz {
                    layer: layer_name.clone(),
                    source,
                })?;
                ConvertedLayer {
                    digest: w.blob_digest,
                    size: w.blob_size,
                    diff_id: w.diff_id,
                    tar_size: w.uncompressed_size,
                    annotations: BTreeMap::from([
                        (TOC_DIGEST_ANNOTATION.to_string(), w.toc_digest.to_string()),
                        (
                            UNCOMPRESSED_SIZE_ANNOTATION.to_string(),
                            w.uncompressed_size.to_string(),
                        ),
                    ]),
                    media_type: OCI_LAYER_GZIP,
                    source_size: 0,
                }
            }
            Format::ZstdChunked => {
                let defaults = zstd_chunked::WriterOptions::default();
                let w = zstd_chunked::write_zstd_chunked(
                    tar,
                    out,
                    &zstd_chunked::WriterOptions {
                        chunk_size: opts.chunk_size.unwrap_or(defaults.chunk_size),
                        level: opts.level.unwrap_or(defaults.level),
                        prefetch: opts.prefetch.clone(),
                    },
                )
                .map_err(|source| ConvertError::ZstdChunked {
                    layer: layer_name.clone(),
                    source,
                })?;
                ConvertedLayer {
                    digest: w.blob_digest,
                    size: w.blob_size,
                    diff_id: w.diff_id,
                    tar_size: w.uncompressed_size,
                    annotations: w.annotations(),
                    media_type: OCI_LAYER_ZSTD,
                    source_size: 0,
                }
            }
        }
    };
    // Hash what the decompressor left unread (trailers, padding) so the digest covers the
    // whole blob.
    io::copy(&mut tap, &mut io::sink()).map_err(io_err(format!("reading {}", src.display())))?;
    if let (Some(expected), Some(h)) = (verify, tap.hash.take()) {
        let actual = h.finish();
        if actual != *expected {
            return Err(ConvertError::BlobDigest {
                path: src.to_path_buf(),
                expected: Box::new(*expected),
                actual: Box::new(actual),
            });
        }
    }
    tracing::debug!(layer = %layer_name, tar = written.tar_size, "layer converted");
    Ok(ConvertedLayer {
        source_size: tap.read,
        ..written
    })
}

/// A manifest, index or config document as read: exact bytes, digest, media type.
#[derive(Debug, Clone)]
struct Doc {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

/// Where blobs and documents come from.
struct Source<'a> {
    location: &'a Location,
    registry: &'a Registry,
}

impl Source<'_> {
    fn layout_blob(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join("blobs")
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// The document SRC names (an image manifest or an index).
    async fn top(&self) -> Result<Doc, ConvertError> {
        match self.location {
            Location::Registry(r) => {
                let m = self.registry.fetch_manifest(r).await?;
                Ok(Doc {
                    digest: m.digest,
                    media_type: m.media_type,
                    bytes: m.bytes,
                })
            }
            Location::Layout { dir, tag } => {
                let index = read_layout_index(dir)?;
                let entries = index
                    .get("manifests")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let name_of = |e: &Value| {
                    e.pointer("/annotations/org.opencontainers.image.ref.name")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                };
                let chosen = match tag {
                    Some(t) => entries.iter().find(|e| name_of(e).as_deref() == Some(t)),
                    None if entries.len() == 1 => entries.first(),
                    None => None,
                };
                let Some(desc) = chosen else {
                    let names: Vec<String> = entries.iter().filter_map(name_of).collect();
                    return Err(ConvertError::Layout {
                        path: dir.clone(),
                        detail: match tag {
                            Some(t) => format!(
                                "no image named {t:?} in index.json (names: {})",
                                if names.is_empty() {
                                    "none".into()
                                } else {
                                    names.join(", ")
                                }
                            ),
                            None => format!(
                                "index.json lists {} images; name one as oci:DIR:NAME (names: {})",
                                entries.len(),
                                names.join(", ")
                            ),
                        },
                    });
                };
                let (digest, media_type, _) = descriptor_parts(desc, &dir.display().to_string())?;
                self.document(&digest, &media_type).await
            }
        }
    }

    /// A manifest, index or config by digest, verified.
    async fn document(&self, digest: &Digest, media_type: &str) -> Result<Doc, ConvertError> {
        match self.location {
            Location::Registry(r) => {
                if is_manifest_type(media_type) {
                    let m = self
                        .registry
                        .fetch_manifest(&r.with_digest(*digest))
                        .await?;
                    Ok(Doc {
                        digest: m.digest,
                        media_type: m.media_type,
                        bytes: m.bytes,
                    })
                } else {
                    let bytes = self.registry.fetch_blob(r, digest).await?;
                    Ok(Doc {
                        digest: *digest,
                        media_type: media_type.to_string(),
                        bytes,
                    })
                }
            }
            Location::Layout { dir, .. } => {
                let path = Self::layout_blob(dir, digest);
                let len = std::fs::metadata(&path)
                    .map_err(io_err(format!("reading {}", path.display())))?
                    .len();
                if len > MAX_DOCUMENT {
                    return Err(ConvertError::Layout {
                        path: dir.clone(),
                        detail: format!("document {digest} is {len} bytes, more than allowed"),
                    });
                }
                let bytes =
                    std::fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
                let mut v = Verifier::new(digest.algorithm());
                v.update(&bytes);
                let actual = v.finish();
                if actual != *digest {
                    return Err(ConvertError::BlobDigest {
                        path,
                        expected: Box::new(*digest),
                        actual: Box::new(actual),
                    });
                }
                Ok(Doc {
                    digest: *digest,
                    media_type: media_type.to_string(),
                    bytes: Bytes::from(bytes),
                })
            }
        }
    }

    /// A layer blob as a local file: downloaded and verified into `tmp` from a registry (the
    /// file is then the caller's to delete), or the layout's own file (verified while it is
    /// converted). Returns the path and whether it still needs verifying.
    async fn blob_file(
        &self,
        digest: &Digest,
        tmp: &Path,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(PathBuf, bool), ConvertError> {
        match self.location {
            Location::Registry(r) => {
                let path = tmp.join(format!("{}.src", digest.hex()));
                self.registry
                    .download_blob(r, digest, None, &path, progress)
                    .await?;
                Ok((path, false))
            }
            Location::Layout { dir, .. } => Ok((Self::layout_blob(dir, digest), true)),
        }
    }
}

fn is_manifest_type(media_type: &str) -> bool {
    matches!(
        media_type,
        OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST
    )
}

fn read_layout_index(dir: &Path) -> Result<Value, ConvertError> {
    let path = dir.join("index.json");
    let text = std::fs::read(&path).map_err(|e| ConvertError::Layout {
        path: dir.to_path_buf(),
        detail: format!("cannot read index.json: {e}"),
    })?;
    serde_json::from_slice(&text).map_err(|e| ConvertError::Layout {
        path: dir.to_path_buf(),
        detail: format!("index.json is not valid JSON: {e}"),
    })
}

/// Digest, media type and size of a descriptor value.
fn descriptor_parts(desc: &Value, image: &str) -> Result<(Digest, String, u64), ConvertError> {
    let bad = |detail: String| ConvertError::Image {
        image: image.to_string(),
        detail,
    };
    let digest = desc
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("a descriptor has no digest".into()))?
        .parse::<Digest>()
        .map_err(|e| bad(format!("a descriptor has an invalid digest: {e}")))?;
    let media_type = desc
        .get("mediaType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let size = desc.get("size").and_then(Value::as_u64).unwrap_or(0);
    Ok((digest, media_type, size))
}

/// Where the converted image goes.
struct Dest<'a> {
    location: &'a Location,
    registry: &'a Registry,
}

impl Dest<'_> {
    /// Creates the layout skeleton; checks a registry destination is a tag.
    fn prepare(&self) -> Result<(), ConvertError> {
        match self.location {
            Location::Registry(r) => {
                if r.digest().is_some() {
                    return Err(ConvertError::Location {
                        input: r.to_string(),
                        detail: "the destination must be a tag, not a digest (the converted \
                                 image has a new digest)"
                            .into(),
                    });
                }
                Ok(())
            }
            Location::Layout { dir, .. } => {
                std::fs::create_dir_all(dir.join("blobs/sha256"))
                    .map_err(io_err(format!("creating {}", dir.display())))?;
                let marker = dir.join("oci-layout");
                if !marker.exists() {
                    std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                        .map_err(io_err(format!("writing {}", marker.display())))?;
                }
                if !dir.join("index.json").exists() {
                    write_atomic(
                        &dir.join("index.json"),
                        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#,
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Puts the file at `path` (which the call may consume) as blob `digest`. `mount_from`:
    /// a repository of the same registry that may have the blob already (the source: an
    /// eStargz image converted again with the same options comes out byte-identical).
    async fn put_file(
        &self,
        digest: &Digest,
        path: &Path,
        progress: Option<lazypull_fetcher::push::UploadProgress>,
        mount_from: Option<&Reference>,
    ) -> Result<BlobPush, ConvertError> {
        match self.location {
            Location::Registry(r) => Ok(self
                .registry
                .push_blob_file(
                    r,
                    digest,
                    path,
                    &PushBlobOptions {
                        mount_from: mount_from.cloned(),
                        progress,
                    },
                )
                .await?),
            Location::Layout { dir, .. } => {
                let target = Source::layout_blob(dir, digest);
                if target.exists() {
                    return Ok(BlobPush::Exists);
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(io_err(format!("creating {}", parent.display())))?;
                }
                if std::fs::rename(path, &target).is_err() {
                    let tmp = target.with_extension("partial");
                    std::fs::copy(path, &tmp)
                        .map_err(io_err(format!("copying into {}", dir.display())))?;
                    std::fs::rename(&tmp, &target)
                        .map_err(io_err(format!("writing {}", target.display())))?;
                }
                Ok(BlobPush::Uploaded)
            }
        }
    }

    async fn put_bytes(&self, digest: &Digest, data: Bytes) -> Result<(), ConvertError> {
        match self.location {
            Location::Registry(r) => {
                if !self.registry.blob_exists(r, digest).await? {
                    self.registry.upload_blob_bytes(r, digest, data).await?;
                }
                Ok(())
            }
            Location::Layout { dir, .. } => {
                let target = Source::layout_blob(dir, digest);
                if !target.exists() {
                    write_atomic(&target, &data)?;
                }
                Ok(())
            }
        }
    }

    /// Stores a manifest or index: by digest (a child of an index) or, for the top document,
    /// under the destination's tag (layout: its name in `index.json`). Returns its digest.
    async fn put_manifest(
        &self,
        bytes: &[u8],
        media_type: &str,
        top: bool,
    ) -> Result<Digest, ConvertError> {
        let digest = Digest::sha256_of(bytes);
        match self.location {
            Location::Registry(r) => {
                let target = if top {
                    r.clone()
                } else {
                    r.with_digest(digest)
                };
                Ok(self
                    .registry
                    .put_manifest(&target, bytes, media_type)
                    .await?)
            }
            Location::Layout { dir, tag } => {
                self.put_bytes(&digest, Bytes::copy_from_slice(bytes))
                    .await?;
                if top {
                    let name = tag.clone().unwrap_or_else(|| "latest".to_string());
                    let mut index = read_layout_index(dir)?;
                    let mut entries = index
                        .get("manifests")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    entries.retain(|e| {
                        e.pointer("/annotations/org.opencontainers.image.ref.name")
                            .and_then(Value::as_str)
                            != Some(name.as_str())
                    });
                    entries.push(json!({
                        "mediaType": media_type,
                        "digest": digest.to_string(),
                        "size": bytes.len(),
                        "annotations": { REF_NAME_ANNOTATION: name },
                    }));
                    index["manifests"] = Value::Array(entries);
                    let text = serde_json::to_vec(&index).map_err(|e| ConvertError::Layout {
                        path: dir.clone(),
                        detail: e.to_string(),
                    })?;
                    write_atomic(&dir.join("index.json"), &text)?;
                }
                Ok(digest)
            }
        }
    }
}

/// Writes `data` to `path` through a temporary name, so readers never see half a file.
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ConvertError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(io_err(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io_err(format!("writing {}", path.display())))
}

/// One image (manifest + config) to rewrite.
struct ImagePlan {
    /// The manifest as read.
    manifest: Doc,
    /// Parsed manifest.
    value: Value,
    /// The config as read.
    config: Doc,
    /// Per layer: index into the unique-layer list, or `None` to keep it unchanged.
    layers: Vec<Option<usize>>,
    /// Where this image sits in the source index, if it came from one.
    index_entry: Option<usize>,
}

/// What [`convert_image`] produced.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// Digest of what DST now names (a manifest or an index).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Images (platforms) converted.
    pub images: usize,
    /// Distinct layers converted.
    pub layers: usize,
    /// Source bytes (compressed) of those layers.
    pub source_bytes: u64,
    /// Uncompressed tar bytes written.
    pub tar_bytes: u64,
    /// Converted blob bytes.
    pub blob_bytes: u64,
    /// CPU time (user + system) the process used during the conversion, all threads: with
    /// the tar bytes, a throughput figure that other load on the machine does not distort.
    pub cpu_time: Option<Duration>,
    /// Wall-clock time of the whole conversion.
    pub elapsed: Duration,
}

/// Layer-format annotations dropped from converted layers (they describe the old blob).
fn is_format_annotation(key: &str) -> bool {
    key == TOC_DIGEST_ANNOTATION
        || key == UNCOMPRESSED_SIZE_ANNOTATION
        || key.starts_with("io.github.containers.zstd-chunked.")
        || key.starts_with("io.containers.zstd-chunked.")
        || key.starts_with("containerd.io/snapshot/stargz/")
}

/// Whether a layer descriptor is converted (`Ok(true)`), kept as is (`Ok(false)`: foreign or
/// non-distributable layers, which the registry does not serve), or refused.
fn layer_is_convertible(media_type: &str, digest: &Digest) -> Result<bool, ConvertError> {
    let mt = media_type.to_ascii_lowercase();
    if mt.contains("foreign") || mt.contains("nondistributable") {
        return Ok(false);
    }
    LayerCompression::from_media_type(media_type)
        .map(|_| true)
        .map_err(|detail| ConvertError::UnsupportedLayer {
            layer: digest.to_string(),
            media_type: media_type.to_string(),
            detail,
        })
}

/// Converts the image at `src` and writes the result to `dst`.
pub async fn convert_image(
    registry: &Registry,
    src: &Location,
    dst: &Location,
    opts: &ConvertOptions,
    reporter: Arc<dyn Reporter>,
) -> Result<ConvertReport, ConvertError> {
    let started = Instant::now();
    let cpu_at_start = process_cpu();
    let source = Source {
        location: src,
        registry,
    };
    let dest = Dest {
        location: dst,
        registry,
    };
    dest.prepare()?;
    let image_name = src.to_string();
    let top = source.top().await?;
    let top_parsed = Manifest::parse(&top.media_type, &top.bytes, &image_name)?;

    // Plan: which manifests to rewrite, and the distinct layers they use.
    let mut plans: Vec<ImagePlan> = Vec::new();
    let mut unique: Vec<(Digest, u64, String)> = Vec::new();
    let mut unique_index: HashMap<Digest, usize> = HashMap::new();
    let mut index_value: Option<Value> = None;
    let mut dropped: Vec<usize> = Vec::new();
    let mut add_image = |doc: Doc,
                         config: Doc,
                         value: Value,
                         index_entry: Option<usize>,
                         unique: &mut Vec<(Digest, u64, String)>|
     -> Result<ImagePlan, ConvertError> {
        let mut layers = Vec::new();
        for l in value
            .get("layers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
        {
            let (digest, media_type, size) = descriptor_parts(&l, &image_name)?;
            if !layer_is_convertible(&media_type, &digest)? {
                layers.push(None);
                continue;
            }
            let i = *unique_index.entry(digest).or_insert_with(|| {
                unique.push((digest, size, media_type.clone()));
                unique.len() - 1
            });
            layers.push(Some(i));
        }
        Ok(ImagePlan {
            manifest: doc,
            value,
            config,
            layers,
            index_entry,
        })
    };
    let load = |doc: Doc| async {
        let value: Value = serde_json::from_slice(&doc.bytes).map_err(|e| ConvertError::Image {
            image: image_name.clone(),
            detail: format!("manifest {} is not JSON: {e}", doc.digest),
        })?;
        let config_desc = value.get("config").cloned().unwrap_or(Value::Null);
        let (config_digest, config_type, _) = descriptor_parts(&config_desc, &image_name)?;
        let config = source.document(&config_digest, &config_type).await?;
        Ok::<_, ConvertError>((doc, config, value))
    };
    match &top_parsed {
        Manifest::Image(_) => {
            let (doc, config, value) = load(top.clone()).await?;
            if let Platforms::One(p) = &opts.platforms {
                let c: Value = serde_json::from_slice(&config.bytes).unwrap_or(Value::Null);
                let os = c.get("os").and_then(Value::as_str).unwrap_or_default();
                let arch = c
                    .get("architecture")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if os != p.os || arch != p.architecture {
                    reporter.note(&format!(
                        "{image_name} is a single-platform image ({os}/{arch}); converting it \
                         although --platform asked for {p}"
                    ));
                }
            }
            plans.push(add_image(doc, config, value, None, &mut unique)?);
        }
        Manifest::Index(index) => {
            let value: Value =
                serde_json::from_slice(&top.bytes).map_err(|e| ConvertError::Image {
                    image: image_name.clone(),
                    detail: format!("index is not JSON: {e}"),
                })?;
            let entries = value
                .get("manifests")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let selected: Option<Digest> = match &opts.platforms {
                Platforms::All => None,
                Platforms::One(p) => {
                    let desc =
                        p.select(index)
                            .ok_or_else(|| lazypull_fetcher::Error::NoPlatform {
                                reference: image_name.clone(),
                                wanted: p.to_string(),
                                available: lazypull_fetcher::manifest::describe_platforms(index),
                            })?;
                    Some(lazypull_fetcher::manifest::descriptor_digest(desc)?)
                }
            };
            for (i, entry) in entries.iter().enumerate() {
                let (digest, media_type, _) = descriptor_parts(entry, &image_name)?;
                if let Some(s) = selected {
                    if s != digest {
                        continue;
                    }
                }
                let attestation = entry
                    .pointer("/annotations")
                    .and_then(|a| a.get(REFERENCE_TYPE_ANNOTATION))
                    .is_some();
                if attestation {
                    reporter.note(&format!(
                        "dropping {digest} from the index: an attestation of the unconverted image"
                    ));
                    dropped.push(i);
                    continue;
                }
                let doc = source.document(&digest, &media_type).await?;
                let child = Manifest::parse(&doc.media_type, &doc.bytes, &image_name)?;
                let is_image = match &child {
                    Manifest::Image(m) => matches!(
                        m.config().media_type().to_string().as_str(),
                        OCI_CONFIG | DOCKER_CONFIG
                    ),
                    Manifest::Index(_) => false,
                };
                if !is_image {
                    return Err(ConvertError::Image {
                        image: image_name.clone(),
                        detail: format!(
                            "index entry {digest} ({media_type}) is not a container image; \
                             select the platforms to convert with --platform"
                        ),
                    });
                }
                let (doc, config, v) = load(doc).await?;
                let index_entry = if selected.is_some() { None } else { Some(i) };
                plans.push(add_image(doc, config, v, index_entry, &mut unique)?);
            }
            if selected.is_none() {
                index_value = Some(value);
            }
        }
    }
    if plans.is_empty() {
        return Err(ConvertError::Image {
            image: image_name,
            detail: "nothing to convert: the index lists no container images".into(),
        });
    }

    // Convert and push every distinct layer.
    let infos: Vec<LayerInfo> = unique
        .iter()
        .map(|(digest, size, _)| LayerInfo {
            digest: *digest,
            size: *size,
        })
        .collect();
    reporter.begin(&infos);
    let tmp = tempfile::Builder::new()
        .prefix("lazypull-convert-")
        .tempdir_in(&opts.work_dir)
        .map_err(io_err(format!(
            "creating a temporary directory in {}",
            opts.work_dir.display()
        )))?;
    let jobs = opts.jobs.max(1);
    let cpu = Semaphore::new(jobs);
    let inflight = Semaphore::new(jobs * 2);
    let results =
        futures::future::try_join_all(unique.iter().enumerate().map(|(i, (digest, size, _))| {
            let (source, dest, reporter, tmp, cpu, inflight) =
                (&source, &dest, &reporter, tmp.path(), &cpu, &inflight);
            async move {
                let _slot = inflight
                    .acquire()
                    .await
                    .map_err(|_| ConvertError::Cancelled)?;
                if opts.cancel.load(Ordering::Relaxed) {
                    return Err(ConvertError::Cancelled);
                }
                reporter.phase(i, Phase::Download, *size);
                let r = reporter.clone();
                let (path, verify) = source
                    .blob_file(digest, tmp, &move |n| r.progress(i, n))
                    .await?;
                reporter.phase(i, Phase::Queued, *size);
                let permit = cpu.acquire().await.map_err(|_| ConvertError::Cancelled)?;
                if opts.cancel.load(Ordering::Relaxed) {
                    return Err(ConvertError::Cancelled);
                }
                reporter.phase(i, Phase::Convert, *size);
                let out = tmp.join(format!("{}.out", digest.hex()));
                let (r, cancel, layer_opts, d) = (
                    reporter.clone(),
                    opts.cancel.clone(),
                    opts.layer.clone(),
                    *digest,
                );
                let (src_path, out_path) = (path.clone(), out.clone());
                let t = Instant::now();
                let converted = tokio::task::spawn_blocking(move || {
                    let res = convert_layer(
                        &src_path,
                        verify.then_some(&d),
                        &out_path,
                        &layer_opts,
                        &|n| r.progress(i, n),
                        &cancel,
                    );
                    if res.is_err() {
                        // Stop the other layers at their next read.
                        cancel.store(true, Ordering::Relaxed);
                    }
                    res
                })
                .await
                .map_err(|e| ConvertError::Io {
                    what: format!("converting layer {digest}"),
                    source: io::Error::other(e.to_string()),
                })?
                .map_err(|e| match e {
                    ConvertError::Estargz { source, .. } => ConvertError::Estargz {
                        layer: digest.to_string(),
                        source,
                    },
                    ConvertError::ZstdChunked { source, .. } => ConvertError::ZstdChunked {
                        layer: digest.to_string(),
                        source,
                    },
                    e => e,
                })?;
                let convert_time = t.elapsed();
                drop(permit);
                if !verify {
                    let _ = std::fs::remove_file(&path);
                }
                reporter.phase(i, Phase::Upload, converted.size);
                let r = reporter.clone();
                let pushed = dest
                    .put_file(
                        &converted.digest,
                        &out,
                        Some(Arc::new(move |n| r.progress(i, n))),
                        match src {
                            Location::Registry(r) => Some(r),
                            Location::Layout { .. } => None,
                        },
                    )
                    .await?;
                let _ = std::fs::remove_file(&out);
                reporter.layer_done(
                    i,
                    &LayerSummary {
                        digest: converted.digest,
                        size: converted.size,
                        tar_size: converted.tar_size,
                        convert_time,
                        pushed,
                    },
                );
                Ok::<_, ConvertError>(converted)
            }
        }))
        .await
        .inspect_err(|_| opts.cancel.store(true, Ordering::Relaxed))?;
    drop(tmp);

    // Configs and manifests.
    let docker_flavour_ok = opts.layer.format == Format::Estargz;
    let mut new_children: HashMap<usize, (Digest, usize, String)> = HashMap::new();
    let mut last: Option<(Digest, String)> = None;
    let single = index_value.is_none();
    for plan in &plans {
        let mut config: Value =
            serde_json::from_slice(&plan.config.bytes).map_err(|e| ConvertError::Image {
                image: image_name.clone(),
                detail: format!("config {} is not JSON: {e}", plan.config.digest),
            })?;
        let old_ids: Vec<Value> = config
            .pointer("/rootfs/diff_ids")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if old_ids.len() != plan.layers.len() {
            return Err(ConvertError::Image {
                image: image_name.clone(),
                detail: format!(
                    "config {} lists {} diff ids for the {} layers of manifest {}",
                    plan.config.digest,
                    old_ids.len(),
                    plan.layers.len(),
                    plan.manifest.digest
                ),
            });
        }
        let docker = plan.manifest.media_type == DOCKER_MANIFEST && docker_flavour_ok;
        let mut manifest = plan.value.clone();
        let old_layers = manifest
            .get("layers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut new_layers = Vec::new();
        let mut new_ids = Vec::new();
        for ((desc, old_id), slot) in old_layers.iter().zip(&old_ids).zip(&plan.layers) {
            let Some(u) = slot else {
                new_layers.push(desc.clone());
                new_ids.push(old_id.clone());
                continue;
            };
            let c = &results[*u];
            let mut d = desc.clone();
            let media_type = if docker && c.media_type == OCI_LAYER_GZIP {
                DOCKER_LAYER_GZIP
            } else {
                c.media_type
            };
            d["mediaType"] = json!(media_type);
            d["digest"] = json!(c.digest.to_string());
            d["size"] = json!(c.size);
            if let Some(obj) = d.as_object_mut() {
                obj.remove("urls");
                let mut ann: serde_json::Map<String, Value> = obj
                    .get("annotations")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                ann.retain(|k, _| !is_format_annotation(k));
                for (k, v) in &c.annotations {
                    ann.insert(k.clone(), json!(v));
                }
                if ann.is_empty() {
                    obj.remove("annotations");
                } else {
                    obj.insert("annotations".into(), Value::Object(ann));
                }
            }
            new_layers.push(d);
            new_ids.push(json!(c.diff_id.to_string()));
        }
        config["rootfs"]["diff_ids"] = Value::Array(new_ids);
        let config_bytes = serde_json::to_vec(&config).map_err(|e| ConvertError::Image {
            image: image_name.clone(),
            detail: e.to_string(),
        })?;
        let config_digest = Digest::sha256_of(&config_bytes);
        dest.put_bytes(&config_digest, Bytes::from(config_bytes.clone()))
            .await?;
        let (manifest_type, config_type) = if docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        manifest["layers"] = Value::Array(new_layers);
        manifest["config"]["digest"] = json!(config_digest.to_string());
        manifest["config"]["size"] = json!(config_bytes.len());
        manifest["config"]["mediaType"] = json!(config_type);
        manifest["mediaType"] = json!(manifest_type);
        let bytes = serde_json::to_vec(&manifest).map_err(|e| ConvertError::Image {
            image: image_name.clone(),
            detail: e.to_string(),
        })?;
        let digest = dest.put_manifest(&bytes, manifest_type, single).await?;
        if let Some(i) = plan.index_entry {
            new_children.insert(i, (digest, bytes.len(), manifest_type.to_string()));
        }
        if !single {
            reporter.note(&format!(
                "manifest {} -> {digest}{}",
                plan.manifest.digest,
                platform_suffix(&config)
            ));
        }
        last = Some((digest, manifest_type.to_string()));
    }

    let (digest, media_type) = match index_value {
        None => last.ok_or(ConvertError::Cancelled)?,
        Some(mut index) => {
            let entries = index
                .get("manifests")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mut out = Vec::new();
            let mut all_oci = true;
            for (i, mut e) in entries.into_iter().enumerate() {
                if dropped.contains(&i) {
                    continue;
                }
                if let Some((d, size, mt)) = new_children.get(&i) {
                    e["digest"] = json!(d.to_string());
                    e["size"] = json!(size);
                    e["mediaType"] = json!(mt);
                    all_oci &= mt == OCI_MANIFEST;
                }
                out.push(e);
            }
            let index_type = if top.media_type == DOCKER_MANIFEST_LIST && !all_oci {
                DOCKER_MANIFEST_LIST
            } else {
                OCI_INDEX
            };
            index["manifests"] = Value::Array(out);
            index["mediaType"] = json!(index_type);
            let bytes = serde_json::to_vec(&index).map_err(|e| ConvertError::Image {
                image: image_name.clone(),
                detail: e.to_string(),
            })?;
            let d = dest.put_manifest(&bytes, index_type, true).await?;
            (d, index_type.to_string())
        }
    };
    Ok(ConvertReport {
        digest,
        media_type,
        images: plans.len(),
        layers: results.len(),
        source_bytes: results.iter().map(|c| c.source_size).sum(),
        tar_bytes: results.iter().map(|c| c.tar_size).sum(),
        blob_bytes: results.iter().map(|c| c.size).sum(),
        cpu_time: process_cpu()
            .zip(cpu_at_start)
            .map(|(now, then)| now.saturating_sub(then)),
        elapsed: started.elapsed(),
    })
}

/// User + system CPU time of this process so far (all threads), from `/proc/self/stat`
/// (fields 14 and 15, in USER_HZ = 100 ticks per second on Linux).
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; fields after it are space-separated.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

fn platform_suffix(config: &Value) -> String {
    let os = config.get("os").and_then(Value::as_str).unwrap_or("?");
    let arch = config
        .get("architecture")
        .and_then(Value::as_str)
        .unwrap_or("?");
    match config.get("variant").and_then(Value::as_str) {
        Some(v) => format!(" ({os}/{arch}/{v})"),
        None => format!(" ({os}/{arch})"),
    }
}

/// Reads a prefetch list: one path per line; blank lines and `#` comments are ignored;
/// leading `/` and `./` are dropped (layers hold relative paths).
pub fn read_prefetch_list(path: &Path) -> Result<Vec<String>, ConvertError> {
    let text = std::fs::read_to_string(path).map_err(io_err(format!(
        "reading the prefetch list {}",
        path.display()
    )))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut p = l;
            loop {
                if let Some(r) = p.strip_prefix("./") {
                    p = r;
                } else if let Some(r) = p.strip_prefix('/') {
                    p = r;
                } else {
                    break;
                }
            }
            p.to_string()
        })
        .filter(|p| !p.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::MultiGzDecoder;
    use std::io::Write;

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn names_of_estargz(blob: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(MultiGzDecoder::new(blob));
        a.entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect()
    }

    fn opts(prefetch: Option<Vec<String>>) -> LayerOptions {
        LayerOptions {
            format: Format::Estargz,
            chunk_size: Some(64 << 10),
            level: Some(1),
            prefetch,
        }
    }

    #[test]
    fn converts_gzip_zstd_and_plain_tar_alike() {
        let tar = tar_of(&[("a", b"alpha"), ("b/c", &[7u8; 200_000])]);
        let dir = tempfile::tempdir().unwrap();
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&tar[..], 3).unwrap();
        // `zstd --long=30`: a window that zstd's default decoder refuses, but the daemon's
        // whole-layer fallback accepts, so `convert` must too.
        let zst_long = {
            let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
            e.long_distance_matching(true).unwrap();
            e.window_log(30).unwrap();
            e.write_all(&tar).unwrap();
            e.finish().unwrap()
        };
        assert!(
            zstd::stream::read::Decoder::new(&zst_long[..])
                .and_then(|mut d| std::io::copy(&mut d, &mut std::io::sink()))
                .is_err(),
            "the long-window frame needs a raised window limit"
        );
        let mut results = Vec::new();
        for (name, data) in [
            ("gz", gz),
            ("zst", zst),
            ("zst-long", zst_long),
            ("tar", tar.clone()),
        ] {
            let src = dir.path().join(name);
            std::fs::write(&src, &data).unwrap();
            let out = dir.path().join(format!("{name}.out"));
            let digest = Digest::sha256_of(&data);
            let c = convert_layer(
                &src,
                Some(&digest),
                &out,
                &opts(None),
                &|_| {},
                &AtomicBool::new(false),
            )
            .unwrap();
            let blob = std::fs::read(&out).unwrap();
            assert_eq!(c.digest, Digest::sha256_of(&blob));
            assert_eq!(c.size, blob.len() as u64);
            assert_eq!(c.source_size, data.len() as u64);
            assert!(c.annotations.contains_key(TOC_DIGEST_ANNOTATION));
            assert_eq!(
                c.annotations[UNCOMPRESSED_SIZE_ANNOTATION],
                c.tar_size.to_string()
            );
            let names = names_of_estargz(&blob);
            assert_eq!(names[0], ".no.prefetch.landmark", "{names:?}");
            assert!(names.contains(&"b/c".to_string()), "{names:?}");
            results.push((c.diff_id, blob));
        }
        // The same tar gives the same layer whatever the source compression.
        assert!(results.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn prefetch_list_goes_first_and_layout_digest_is_checked() {
        let tar = tar_of(&[("x", b"1"), ("y/z", b"2"), ("w", b"3")]);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t");
        std::fs::write(&src, &tar).unwrap();
        let out = dir.path().join("o");
        convert_layer(
            &src,
            None,
            &out,
            &opts(Some(vec!["y/z".into()])),
            &|_| {},
            &AtomicBool::new(false),
        )
        .unwrap();
        let names = names_of_estargz(&std::fs::read(&out).unwrap());
        assert_eq!(&names[..2], ["y/z", ".prefetch.landmark"], "{names:?}");

        let wrong = Digest::sha256_of(b"not it");
        let err = convert_layer(
            &src,
            Some(&wrong),
            &out,
            &opts(None),
            &|_| {},
            &AtomicBool::new(false),
        )
        .unwrap_err();
        assert!(matches!(err, ConvertError::BlobDigest { .. }), "{err}");
    }

    #[test]
    fn cancelled_conversion_stops() {
        let tar = tar_of(&[("x", b"1")]);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t");
        std::fs::write(&src, &tar).unwrap();
        let err = convert_layer(
            &src,
            None,
            &dir.path().join("o"),
            &opts(None),
            &|_| {},
            &AtomicBool::new(true),
        )
        .unwrap_err();
        assert!(matches!(err, ConvertError::Cancelled), "{err}");
    }

    #[test]
    fn locations_and_prefetch_lists_parse() {
        assert_eq!(
            Location::parse("oci:/tmp/x:v1").unwrap(),
            Location::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            Location::parse("oci:rel").unwrap(),
            Location::Layout {
                dir: "rel".into(),
                tag: None
            }
        );
        assert!(Location::parse("oci:").is_err());
        assert!(matches!(
            Location::parse("localhost:5000/a/b:c").unwrap(),
            Location::Registry(_)
        ));
        assert!(Location::parse("Bad Name").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("list");
        std::fs::write(
            &p,
            "# comment\n/usr/bin/python3\n\n./etc/hosts\n  lib/x  \n",
        )
        .unwrap();
        assert_eq!(
            read_prefetch_list(&p).unwrap(),
            ["usr/bin/python3", "etc/hosts", "lib/x"]
        );
    }
}
