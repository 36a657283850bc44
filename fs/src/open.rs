//! Opening a layer of an image: find and verify its TOC with as few requests as possible, and
//! wire the model to a [`LayerSource`].
//!
//! [`open_layer`] is the entry point for every layer of an image: eStargz and zstd:chunked
//! layers are served lazily ([`open_estargz`], [`open_zstd_chunked`]); any other tar layer
//! (plain gzip, zstd, uncompressed; OCI or Docker media types) is fetched whole, verified and
//! converted once into a local eStargz copy ([`crate::local`]), so every image runs. Which way
//! a layer went, and why, is in [`OpenedLayer::served`]. Which way it goes is decided in one
//! place, [`probe_layer`], which the daemon also asks before it tells containerd or podman that
//! a layer is served remotely, so the two can never disagree.
//!
//! The blob bytes a lazy layer's TOC was read from are saved under `local_dir` (see
//! [`saved_toc_path`]), tagged with their format, so a restarted daemon mounts the layer again
//! without the registry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use lazypull_fetcher::{BlobReader, ChunkCache, Digest, FetchEngine, Reference};

use crate::chunks::{Compression, LayerSource, SourceConfig};
use crate::estargz::{self, EstargzError, Footer, Prefetch, ReaderConfig};
use crate::local::{self, LayerCompression, LocalRequest, ProgressFn};
use crate::toc::Layer;
use crate::zstd_chunked::{self, TocHint, ZstdChunkedError};

/// Manifest annotation with the digest of a layer's TOC JSON (defined with the TOC format).
pub use crate::toc::json::TOC_DIGEST_ANNOTATION;

/// What the manifest says about one layer.
#[derive(Debug, Clone)]
pub struct LayerDescriptor {
    /// Compressed blob digest.
    pub digest: Digest,
    /// Compressed blob size.
    pub size: u64,
    /// Layer media type.
    pub media_type: String,
    /// Layer annotations.
    pub annotations: HashMap<String, String>,
}

/// Why a layer cannot be opened lazily.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Reading the blob failed.
    #[error("layer {layer}: {source}")]
    Fetch {
        /// Layer digest.
        layer: Digest,
        /// Fetcher error.
        source: lazypull_fetcher::Error,
    },
    /// The layer is not eStargz or its TOC is invalid.
    #[error("layer {layer}: {source}")]
    Toc {
        /// Layer digest.
        layer: Digest,
        /// Reader error.
        source: EstargzError,
    },
    /// The layer is not zstd:chunked, its annotations are malformed, or its TOC is invalid.
    #[error("layer {layer}: {source}")]
    ZstdChunked {
        /// Layer digest.
        layer: Digest,
        /// Reader error.
        source: ZstdChunkedError,
    },
    /// Nothing ties the layer's TOC to the manifest: the annotation that carries its digest
    /// is missing, so a registry or proxy could swap the blob for another valid one of the same
    /// size and every name and byte would follow the swapped TOC. Such a TOC is never used;
    /// [`open_layer`] fetches the layer whole and verifies it against the layer digest instead.
    #[error("layer {layer}: its {format} TOC is not bound to the manifest (no {annotation} annotation), so it is not trusted")]
    Unbound {
        /// Layer digest.
        layer: Digest,
        /// `eStargz` or `zstd:chunked`.
        format: &'static str,
        /// The annotation that would bind it.
        annotation: &'static str,
    },
    /// The TOC digest annotation is not a digest.
    #[error("layer {layer}: annotation {TOC_DIGEST_ANNOTATION} is invalid: {detail}")]
    BadAnnotation {
        /// Layer digest.
        layer: Digest,
        /// Parse error.
        detail: String,
    },
    /// The layer's media type is not one lazypull can serve at all (neither lazily nor by a
    /// whole fetch), e.g. encrypted layers or non-layer artifacts.
    #[error("layer {layer}: media type {media_type:?} cannot be served: {detail}")]
    Unsupported {
        /// Layer digest.
        layer: Digest,
        /// The media type from the manifest.
        media_type: String,
        /// Why, and what is expected instead.
        detail: String,
    },
    /// The downloaded (and verified) layer could not be converted into a local eStargz copy:
    /// it is not a readable tar stream, or holds an entry eStargz cannot represent.
    #[error(
        "layer {layer}: converting the downloaded layer into a local eStargz copy failed: {source}"
    )]
    Convert {
        /// Layer digest.
        layer: Digest,
        /// The writer's error.
        source: EstargzError,
    },
    /// Local storage of a whole-fetched layer failed (disk full, permissions, ...).
    #[error("layer {layer}: local copy {}: {detail}", path.display())]
    Local {
        /// Layer digest.
        layer: Digest,
        /// The file or directory involved.
        path: PathBuf,
        /// What was being done and the OS error.
        detail: String,
    },
}

/// How an opened layer is served, so the daemon can log and count layers that could not be
/// read lazily (they cost a whole download before the first read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// From the registry, chunk by chunk, on demand (eStargz, zstd:chunked).
    Lazy,
    /// From a local eStargz copy made by a verified whole-layer fetch.
    Local {
        /// Why the layer could not be served lazily, for logs and status output.
        reason: String,
        /// The local copy (see [`local::remove_local_copy`] to delete it).
        path: PathBuf,
    },
}

/// A layer ready to mount.
#[derive(Debug, Clone)]
pub struct OpenedLayer {
    /// File content, served lazily.
    pub source: LayerSource,
    /// What to prefetch first.
    pub prefetch: Prefetch,
    /// The layer's TOC digest: for eStargz the digest of the TOC JSON (for a local copy, of the
    /// TOC lazypull wrote); for zstd:chunked the digest of the compressed TOC (the
    /// manifest-checksum annotation), which is what containers/storage calls the TOC digest.
    pub toc_digest: Digest,
    /// Lazily from the registry, or from a local copy (and why).
    pub served: Served,
}

/// Opens an eStargz layer: one speculative read of the blob's tail (footer + usually the whole
/// TOC), a second only when the TOC is larger than that, then verification against the
/// manifest's TOC digest annotation when present.
pub async fn open_estargz(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
) -> Result<OpenedLayer, OpenError> {
    open_estargz_tail(engine, cache, reference, desc, reader, source)
        .await
        .map(|(opened, _, _)| opened)
}

/// The TOC digest the manifest promises, if it names one (`Err`: the annotation is not a
/// digest).
fn expected_toc(desc: &LayerDescriptor) -> Result<Option<Digest>, String> {
    desc.annotations
        .get(TOC_DIGEST_ANNOTATION)
        .map(|v| v.parse::<Digest>().map_err(|e| e.to_string()))
        .transpose()
}

/// Where the blob bytes holding a lazily read layer's TOC are kept, so a restarted daemon can
/// mount the layer again without the registry.
pub fn saved_toc_path(local_dir: &Path, layer: &Digest) -> PathBuf {
    local_dir.join(format!("{}.toc", layer.hex()))
}

/// Which reader a saved TOC is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TocFormat {
    Estargz = 1,
    ZstdChunked = 2,
}

/// Start of a tagged saved-TOC file: magic, format byte, version byte (1). Files written before
/// formats were tagged start directly with the offset and hold eStargz.
const SAVED_TOC_MAGIC: &[u8; 6] = b"LPTOC\0";

/// Saves the blob bytes read (`start` offset, then the bytes) atomically; failures only cost a
/// registry read at the next restart, so they are logged, not returned.
fn save_toc(local_dir: &Path, layer: &Digest, format: TocFormat, start: u64, tail: &[u8]) {
    let path = saved_toc_path(local_dir, layer);
    let tmp = path.with_extension(format!("toc.{}.tmp", std::process::id()));
    let mut data = Vec::with_capacity(16 + tail.len());
    data.extend_from_slice(SAVED_TOC_MAGIC);
    data.extend_from_slice(&[format as u8, 1]);
    data.extend_from_slice(&start.to_le_bytes());
    data.extend_from_slice(tail);
    let res = std::fs::create_dir_all(local_dir)
        .and_then(|()| std::fs::write(&tmp, &data))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(layer = %layer, error = %e, "cannot save the layer's TOC for restarts");
    }
}

/// The format, start offset and bytes of a saved TOC file.
fn parse_saved_toc(data: &[u8]) -> Option<(TocFormat, u64, Bytes)> {
    let (format, rest) = match data.strip_prefix(SAVED_TOC_MAGIC) {
        Some(rest) => {
            let format = match rest.first()? {
                1 => TocFormat::Estargz,
                2 => TocFormat::ZstdChunked,
                _ => return None,
            };
            if rest.get(1) != Some(&1) {
                return None;
            }
            (format, rest.get(2..)?)
        }
        None => (TocFormat::Estargz, data),
    };
    let start = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    Some((format, start, Bytes::copy_from_slice(rest.get(8..)?)))
}

/// A lazily served layer: the model wired to the blob and cache, with the chunks that lie
/// wholly inside the bytes already read (`start`, `read`) cached in the background.
#[allow(clippy::too_many_arguments)]
fn lazy_layer(
    layer: Layer,
    blob: BlobReader,
    cache: &ChunkCache,
    compression: Compression,
    source: SourceConfig,
    prefetch: Prefetch,
    toc_digest: Digest,
    (start, read): (u64, Bytes),
) -> OpenedLayer {
    let source = LayerSource::new(
        Arc::new(layer),
        blob,
        cache.clone(),
        compression,
        source,
        tokio::runtime::Handle::current(),
    );
    source.seed(start, read);
    OpenedLayer {
        source,
        prefetch,
        toc_digest,
        served: Served::Lazy,
    }
}

/// Opens a layer from its saved TOC, with no registry access. The TOC is checked as on the
/// first open (digest against the manifest annotations, structure); anything wrong (including
/// a TOC saved for the other format) deletes the saved copy and returns `None`, so the caller
/// reads the TOC from the registry again.
#[allow(clippy::too_many_arguments)]
fn open_saved_toc(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: &SourceConfig,
    local_dir: &Path,
    want: TocFormat,
) -> Option<OpenedLayer> {
    let path = saved_toc_path(local_dir, &desc.digest);
    let data = std::fs::read(&path).ok()?;
    let blob = || engine.blob(reference, desc.digest, Some(desc.size));
    let opened = (|| {
        let (format, start, tail) = parse_saved_toc(&data)?;
        if format != want {
            return None;
        }
        Some(match format {
            TocFormat::Estargz => {
                // Saved by a version that trusted unbound TOCs: never reused without a binding.
                let expected = expected_toc(desc).ok()??;
                let o = estargz::open_toc(&tail, start, desc.size, Some(&expected), reader).ok()?;
                lazy_layer(
                    o.layer,
                    blob(),
                    cache,
                    Compression::Gzip,
                    source.clone(),
                    o.prefetch,
                    o.toc_digest,
                    (start, tail),
                )
            }
            TocFormat::ZstdChunked => {
                let hint = TocHint::from_annotations(&desc.annotations)
                    .ok()
                    .filter(TocHint::is_bound)?;
                let o = zstd_chunked::open_toc(&tail, start, desc.size, &hint, reader).ok()?;
                lazy_layer(
                    o.layer,
                    blob(),
                    cache,
                    Compression::Zstd,
                    source.clone(),
                    o.prefetch,
                    o.manifest_checksum,
                    (start, tail),
                )
            }
        })
    })();
    if opened.is_none() {
        tracing::warn!(layer = %desc.digest, path = %path.display(), "saved TOC is unusable; reading it from the registry again");
        let _ = std::fs::remove_file(&path);
    }
    opened
}

/// [`open_estargz`], also returning the tail read (its start offset and bytes).
async fn open_estargz_tail(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
) -> Result<(OpenedLayer, u64, bytes::Bytes), OpenError> {
    let layer = desc.digest;
    let expected = expected_toc(desc)
        .map_err(|detail| OpenError::BadAnnotation { layer, detail })?
        .ok_or(OpenError::Unbound {
            layer,
            format: "eStargz",
            annotation: TOC_DIGEST_ANNOTATION,
        })?;
    let expected = Some(expected);
    let blob = engine.blob(reference, desc.digest, Some(desc.size));
    let fetch = |source| OpenError::Fetch { layer, source };
    let tail_len = estargz::tail_read_len(desc.size).min(desc.size);
    let mut start = desc.size - tail_len;
    let mut tail = blob.read_toc_at(start, tail_len).await.map_err(fetch)?;
    let mut tries = 0;
    let opened = loop {
        match estargz::open_toc(&tail, start, desc.size, expected.as_ref(), reader) {
            Ok(o) => break o,
            Err(EstargzError::NeedMore { from }) if tries == 0 && from < start => {
                tries += 1;
                let more = blob.read_toc_at(from, start - from).await.map_err(fetch)?;
                let mut joined = Vec::with_capacity(more.len() + tail.len());
                joined.extend_from_slice(&more);
                joined.extend_from_slice(&tail);
                tail = joined.into();
                start = from;
            }
            Err(source) => return Err(OpenError::Toc { layer, source }),
        }
    };
    let opened = lazy_layer(
        opened.layer,
        blob,
        cache,
        Compression::Gzip,
        source,
        opened.prefetch,
        opened.toc_digest,
        (start, tail.clone()),
    );
    Ok((opened, start, tail))
}

/// Layers up to this size are read whole when their TOC is read: one request instead of two or
/// more, and every chunk is then cached from it (the layer is complete at once).
const SMALL_LAYER: u64 = 1 << 20;

/// Opens a zstd:chunked layer: one read of exactly the compressed TOC that the
/// manifest-position annotation names (of the whole blob when it is small), verified against
/// the manifest-checksum annotation. Without annotations the TOC is found through the footer
/// (one more small read), as containers/storage itself never does: a layer whose annotations
/// were dropped by a tool in between is still read lazily.
pub async fn open_zstd_chunked(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
) -> Result<OpenedLayer, OpenError> {
    open_zstd_chunked_tail(engine, cache, reference, desc, reader, source)
        .await
        .map(|(opened, _, _)| opened)
}

/// [`open_zstd_chunked`], also returning the bytes read (start offset and bytes).
async fn open_zstd_chunked_tail(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
) -> Result<(OpenedLayer, u64, Bytes), OpenError> {
    let layer = desc.digest;
    let size = desc.size;
    let toc_err = |source| OpenError::ZstdChunked { layer, source };
    let fetch = |source| OpenError::Fetch { layer, source };
    let hint = TocHint::from_annotations(&desc.annotations).map_err(toc_err)?;
    if !hint.is_bound() {
        return Err(OpenError::Unbound {
            layer,
            format: "zstd:chunked",
            annotation: zstd_chunked::MANIFEST_CHECKSUM_ANNOTATION,
        });
    }
    let blob = engine.blob(reference, desc.digest, Some(size));
    // The footer probe, when it already holds everything needed.
    let mut have: Option<Bytes> = None;
    let start = match (hint.toc.is_some(), hint.toc_range(size)) {
        (true, Some(_)) if size <= SMALL_LAYER => 0,
        (true, Some((start, _))) => start,
        // A position that does not fit the blob: let the reader say what is wrong.
        (true, None) => {
            return Err(toc_err(
                zstd_chunked::open_toc(&[], 0, size, &hint, reader)
                    .err()
                    .unwrap_or(ZstdChunkedError::ShortData { have: 0, need: 0 }),
            ))
        }
        (false, _) => {
            // No position: the footer says where the TOC is; read from there to the end (TOC,
            // tar-split and footer), so the saved bytes reopen the same way.
            let len = (zstd_chunked::FOOTER_PROBE_LEN as u64).min(size);
            let tail = blob.read_toc_at(size - len, len).await.map_err(fetch)?;
            // The reader checks the footer's position and sizes against the limits first and
            // says from where to read.
            let tail_start = size - tail.len() as u64;
            let from = match zstd_chunked::open_toc(&tail, tail_start, size, &hint, reader) {
                Ok(_) => {
                    have = Some(tail.clone());
                    tail_start
                }
                Err(ZstdChunkedError::NeedMore { from }) => from,
                Err(e) => return Err(toc_err(e)),
            };
            let limit = reader
                .max_toc_bytes
                .saturating_mul(2)
                .saturating_add(zstd_chunked::FOOTER_PROBE_LEN as u64);
            if size - from > limit {
                return Err(toc_err(ZstdChunkedError::TooLarge {
                    what: "TOC, tar-split and footer (as located by the footer)",
                    size: size - from,
                    limit,
                }));
            }
            if size <= SMALL_LAYER && tail_start > 0 {
                have = None;
                0
            } else {
                from
            }
        }
    };
    let end = match hint.toc_range(size) {
        Some((_, end)) if hint.toc.is_some() && size > SMALL_LAYER => end,
        _ => size,
    };
    let data = match have {
        Some(tail) => tail,
        None => blob.read_toc_at(start, end - start).await.map_err(fetch)?,
    };
    let opened = zstd_chunked::open_toc(&data, start, size, &hint, reader).map_err(toc_err)?;
    if opened.from_footer {
        tracing::info!(layer = %layer, "zstd:chunked layer without annotations: TOC found through its footer");
    }
    let lazy = lazy_layer(
        opened.layer,
        blob,
        cache,
        Compression::Zstd,
        source,
        opened.prefetch,
        opened.manifest_checksum,
        (start, data.clone()),
    );
    Ok((lazy, start, data))
}

/// Opens any layer of an image: lazily when it is eStargz or zstd:chunked, otherwise by a
/// verified whole-layer fetch into a local eStargz copy under `local_dir` (see
/// [`crate::local`]).
///
/// - A valid local copy made earlier is used first, with no registry access at all (a daemon
///   restoring its mounts must not need the registry).
/// - Layers whose TOC the manifest binds (see [`probe_layer`]) are opened from their saved TOC
///   or through [`open_estargz`] / [`open_zstd_chunked`]; if the TOC turns out unusable, the
///   layer falls back to the whole fetch (logged with the reason) rather than failing the pull.
/// - Every other tar layer (plain gzip or zstd, uncompressed, unbound TOCs) takes the whole
///   fetch, with the probe's reason.
/// - Registry errors (unreachable, unauthorized, not found, digest mismatch) are returned as
///   [`OpenError::Fetch`], never turned into a fallback: the whole fetch would fail the same
///   way. Media types that are not tar layers give [`OpenError::Unsupported`].
pub async fn open_layer(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
    local_dir: &Path,
) -> Result<OpenedLayer, OpenError> {
    open_layer_with_progress(
        engine, cache, reference, desc, reader, source, local_dir, None,
    )
    .await
}

/// [`open_layer`], reporting the download and conversion of a whole-fetched layer to
/// `progress` (lazy layers report nothing: they have nothing slow to report).
#[allow(clippy::too_many_arguments)]
pub async fn open_layer_with_progress(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
    local_dir: &Path,
    progress: Option<ProgressFn>,
) -> Result<OpenedLayer, OpenError> {
    let layer = desc.digest;
    let compression = LayerCompression::from_media_type(&desc.media_type)
        .map_err(|detail| unsupported(desc, detail))?;
    if let Some(opened) = local::reuse_local(
        cache,
        desc,
        reader,
        &source,
        local_dir,
        &format!(
            "{}; reusing the local copy made earlier",
            static_reason(compression, desc)
        ),
    )
    .await
    {
        return Ok(opened);
    }
    let reason = match probe_layer(engine, reference, desc, local_dir).await? {
        // The local copy was there but could not be used (`reuse_local` said why): make it again.
        Probe::Local => static_reason(compression, desc),
        Probe::Whole(reason) => {
            // A TOC saved for this layer earlier (by a version that trusted it) is never reused.
            let _ = std::fs::remove_file(saved_toc_path(local_dir, &layer));
            reason
        }
        Probe::Lazy(format) => {
            match open_lazy(
                engine, cache, reference, desc, reader, &source, local_dir, format,
            )
            .await?
            {
                Ok(opened) => return Ok(opened),
                Err(reason) => reason,
            }
        }
    };
    local::fetch_local(LocalRequest {
        engine: engine.clone(),
        cache: cache.clone(),
        reference: reference.clone(),
        desc: desc.clone(),
        reader: reader.clone(),
        source,
        local_dir: local_dir.to_path_buf(),
        reason,
        progress,
    })
    .await
}

/// The error for a media type lazypull cannot serve (`detail` says why).
fn unsupported(desc: &LayerDescriptor, detail: String) -> OpenError {
    OpenError::Unsupported {
        layer: desc.digest,
        media_type: desc.media_type.clone(),
        detail,
    }
}

/// Why a layer of this compression is not read lazily, known from the manifest alone.
fn static_reason(compression: LayerCompression, desc: &LayerDescriptor) -> String {
    let mt = &desc.media_type;
    match compression {
        LayerCompression::Gzip => format!("no usable eStargz TOC (media type {mt})"),
        LayerCompression::Zstd
            if desc
                .annotations
                .keys()
                .any(|k| k.contains("zstd-chunked.manifest")) =>
        {
            format!("no usable zstd:chunked TOC (media type {mt})")
        }
        LayerCompression::Zstd => format!("no TOC: plain zstd layer (media type {mt})"),
        LayerCompression::None => format!("no TOC: uncompressed tar layer (media type {mt})"),
    }
}

/// How a layer is read, as [`probe_layer`] decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A local copy of the layer, verified when it was made, is on this node.
    Local,
    /// Read lazily: the manifest binds a TOC of this format.
    Lazy(LazyFormat),
    /// Fetched whole and verified against the layer digest, for this reason.
    Whole(String),
}

/// The format of a layer read lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LazyFormat {
    /// eStargz, bound by the TOC digest annotation.
    Estargz,
    /// zstd:chunked, bound by the manifest-checksum annotation.
    ZstdChunked,
}

/// Decides how a layer is read: from a local copy, lazily (and in which format), or whole (and
/// why). The one owner of that decision: [`open_layer`] follows it, and the daemon asks it
/// before telling containerd or podman that a layer is served remotely.
///
/// Only annotations that bind a TOC to the manifest make a layer lazy: a TOC nothing ties to
/// the manifest digest is never trusted. A layer without them costs at most one small read of
/// its end, only to say why it is fetched whole (plain gzip, an unbound eStargz TOC, ...);
/// refusing a TOC found that way is counted in the metrics. Registry errors are returned as
/// [`OpenError::Fetch`]; media types that are not tar layers as [`OpenError::Unsupported`].
pub async fn probe_layer(
    engine: &FetchEngine,
    reference: &Reference,
    desc: &LayerDescriptor,
    local_dir: &Path,
) -> Result<Probe, OpenError> {
    let layer = desc.digest;
    let compression = LayerCompression::from_media_type(&desc.media_type)
        .map_err(|detail| unsupported(desc, detail))?;
    if local::local_copy_path(local_dir, &layer).exists() {
        return Ok(Probe::Local);
    }
    // A verified download left by an interrupted conversion: an earlier run already chose the
    // whole fetch, and finishing it needs no registry at all.
    if local::download_path(local_dir, &layer).exists() {
        return Ok(Probe::Whole(static_reason(compression, desc)));
    }
    let mt = &desc.media_type;
    let read_end = |len: u64| async move {
        let len = len.min(desc.size);
        engine
            .blob(reference, layer, Some(desc.size))
            .read_toc_at(desc.size - len, len)
            .await
            .map_err(|source| OpenError::Fetch { layer, source })
    };
    match compression {
        LayerCompression::None => Ok(Probe::Whole(static_reason(compression, desc))),
        LayerCompression::Gzip => {
            match expected_toc(desc) {
                Ok(Some(_)) => return Ok(Probe::Lazy(LazyFormat::Estargz)),
                Err(detail) => {
                    let e = OpenError::BadAnnotation { layer, detail };
                    return Ok(Probe::Whole(refuse_invalid(&e, "estargz", "eStargz")));
                }
                Ok(None) => {}
            }
            if desc.size < estargz::EXTERNAL_TOC_FOOTER_SIZE as u64 {
                return Ok(Probe::Whole(format!(
                    "no eStargz footer: the {}-byte blob is too small (media type {mt})",
                    desc.size
                )));
            }
            let tail = read_end(estargz::FOOTER_SIZE as u64).await?;
            Ok(Probe::Whole(match estargz::parse_footer(&tail) {
                Ok((Footer::Estargz { .. } | Footer::Legacy { .. }, _)) => refuse_unbound(
                    &OpenError::Unbound {
                        layer,
                        format: "eStargz",
                        annotation: TOC_DIGEST_ANNOTATION,
                    },
                    "estargz",
                    mt,
                ),
                Ok((Footer::ExternalToc, _)) => {
                    format!("eStargz with an external TOC is not supported yet (media type {mt})")
                }
                Err(_) => format!(
                    "no eStargz TOC: plain gzip layer without an eStargz footer (media type {mt})"
                ),
            }))
        }
        LayerCompression::Zstd => {
            let hint = match TocHint::from_annotations(&desc.annotations) {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(layer = %layer, error = %e,
                        "zstd:chunked annotations are unusable; falling back to a verified whole-layer fetch");
                    return Ok(Probe::Whole(format!(
                        "zstd:chunked annotations unusable: {e} (media type {mt})"
                    )));
                }
            };
            if hint.is_bound() {
                return Ok(Probe::Lazy(LazyFormat::ZstdChunked));
            }
            // Without a position either, one small read of the footer tells zstd:chunked from
            // plain zstd.
            if hint.toc.is_none() {
                let plain = || {
                    Probe::Whole(format!(
                        "no TOC: plain zstd layer without a zstd:chunked footer (media type {mt})"
                    ))
                };
                if desc.size < 48 {
                    return Ok(plain());
                }
                let tail = read_end(zstd_chunked::FOOTER_PROBE_LEN as u64).await?;
                if zstd_chunked::parse_footer(&tail).is_err() {
                    return Ok(plain());
                }
            }
            Ok(Probe::Whole(refuse_unbound(
                &OpenError::Unbound {
                    layer,
                    format: "zstd:chunked",
                    annotation: zstd_chunked::MANIFEST_CHECKSUM_ANNOTATION,
                },
                "zstd_chunked",
                mt,
            )))
        }
    }
}

/// Opens a layer the probe found lazy: from its saved TOC when there is one, else from the
/// registry. The outer error is a registry failure (returned as is); the inner `Err` is the
/// reason to fall back to the whole fetch (a TOC that does not verify or parse).
#[allow(clippy::too_many_arguments)]
async fn open_lazy(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: &SourceConfig,
    local_dir: &Path,
    format: LazyFormat,
) -> Result<Result<OpenedLayer, String>, OpenError> {
    let (saved, metric, name) = match format {
        LazyFormat::Estargz => (TocFormat::Estargz, "estargz", "eStargz"),
        LazyFormat::ZstdChunked => (TocFormat::ZstdChunked, "zstd_chunked", "zstd:chunked"),
    };
    if let Some(opened) = open_saved_toc(
        engine, cache, reference, desc, reader, source, local_dir, saved,
    ) {
        return Ok(Ok(opened));
    }
    let source = source.clone();
    let opened = match format {
        LazyFormat::Estargz => {
            open_estargz_tail(engine, cache, reference, desc, reader, source).await
        }
        LazyFormat::ZstdChunked => {
            open_zstd_chunked_tail(engine, cache, reference, desc, reader, source).await
        }
    };
    match opened {
        Ok((opened, start, tail)) => {
            save_toc(local_dir, &desc.digest, saved, start, &tail);
            Ok(Ok(opened))
        }
        Err(e @ OpenError::Fetch { .. }) => Err(e),
        Err(e) => Ok(Err(refuse_invalid(&e, metric, name))),
    }
}

/// Logs and counts a TOC that nothing ties to the manifest; returns the reason the layer is
/// fetched whole. `format` names the metric label (`estargz`, `zstd_chunked`).
fn refuse_unbound(e: &OpenError, format: &str, media_type: &str) -> String {
    crate::metrics::count_refused_toc(format, crate::metrics::TocRefusal::Unbound);
    tracing::warn!(error = %e,
        "TOC not bound to the manifest; fetching the layer whole and verifying it against the layer digest instead");
    match e {
        OpenError::Unbound {
            format, annotation, ..
        } => format!(
            "{format} TOC not bound to the manifest (no {annotation} annotation; media type {media_type})"
        ),
        _ => format!("TOC not bound to the manifest (media type {media_type})"),
    }
}

/// Logs and counts a TOC that could not be used; returns the reason the layer is fetched
/// whole.
fn refuse_invalid(e: &OpenError, format: &str, name: &str) -> String {
    crate::metrics::count_refused_toc(format, crate::metrics::TocRefusal::Invalid);
    tracing::warn!(error = %e,
        "{name} TOC is unusable; falling back to a verified whole-layer fetch");
    format!("{name} TOC unusable: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_toc_files_are_tagged_and_legacy_ones_read_as_estargz() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Digest::sha256_of(b"layer");
        for format in [TocFormat::Estargz, TocFormat::ZstdChunked] {
            save_toc(dir.path(), &layer, format, 1234, b"toc bytes");
            let data = std::fs::read(saved_toc_path(dir.path(), &layer)).unwrap();
            let (f, start, bytes) = parse_saved_toc(&data).unwrap();
            assert_eq!((f, start, &bytes[..]), (format, 1234, &b"toc bytes"[..]));
        }
        // Written before formats were tagged: offset, then an eStargz tail.
        let mut legacy = 77u64.to_le_bytes().to_vec();
        legacy.extend_from_slice(b"tail");
        let (f, start, bytes) = parse_saved_toc(&legacy).unwrap();
        assert_eq!(
            (f, start, &bytes[..]),
            (TocFormat::Estargz, 77, &b"tail"[..])
        );
        // Unknown format or version, truncated: unusable.
        for bad in [
            &b"LPTOC\0\x09\x01\0\0\0\0\0\0\0\0"[..],
            b"LPTOC\0\x02\x07",
            b"short",
        ] {
            assert!(parse_saved_toc(bad).is_none(), "{bad:?}");
        }
    }
}
