//! Opening a layer of an image: find and verify its TOC with as few requests as possible, and
//! wire the model to a [`LayerSource`].
//!
//! [`open_layer`] is the entry point for every layer of an image: eStargz layers are served
//! lazily ([`open_estargz`]); any other tar layer (plain gzip, zstd, uncompressed; OCI or
//! Docker media types) is fetched whole, verified and converted once into a local eStargz copy
//! ([`crate::local`]), so every image runs. Which way a layer went, and why, is in
//! [`OpenedLayer::served`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazypull_fetcher::{ChunkCache, Digest, FetchEngine, Priority, Reference};

use crate::chunks::{Compression, LayerSource, SourceConfig};
use crate::estargz::{self, EstargzError, Footer, Prefetch, ReaderConfig};
use crate::local::{self, LayerCompression, LocalRequest, ProgressFn};

/// Manifest annotation with the digest of an eStargz layer's TOC JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

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
    /// From the registry, chunk by chunk, on demand (eStargz).
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
    /// Digest of the TOC JSON (for a local copy, of the TOC lazypull wrote).
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

/// Where the blob tail holding a lazily read layer's TOC is kept, so a restarted daemon can
/// mount the layer again without the registry.
pub fn saved_toc_path(local_dir: &Path, layer: &Digest) -> PathBuf {
    local_dir.join(format!("{}.toc", layer.hex()))
}

/// Saves the tail read (`start` offset, then the bytes) atomically; failures only cost a
/// registry read at the next restart, so they are logged, not returned.
fn save_toc(local_dir: &Path, layer: &Digest, start: u64, tail: &[u8]) {
    let path = saved_toc_path(local_dir, layer);
    let tmp = path.with_extension(format!("toc.{}.tmp", std::process::id()));
    let mut data = Vec::with_capacity(8 + tail.len());
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

/// Opens a layer from its saved TOC, with no registry access. The TOC is checked as on the
/// first open (digest against the manifest annotation, structure); anything wrong deletes
/// the saved copy and returns `None`, so the caller reads the TOC from the registry again.
fn open_saved_toc(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: &SourceConfig,
    local_dir: &Path,
) -> Option<OpenedLayer> {
    let path = saved_toc_path(local_dir, &desc.digest);
    let data = std::fs::read(&path).ok()?;
    let parsed = (|| {
        let start = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
        let tail = bytes::Bytes::copy_from_slice(data.get(8..)?);
        let expected = expected_toc(desc).ok()?;
        let opened = estargz::open_toc(&tail, start, desc.size, expected.as_ref(), reader).ok()?;
        Some((start, tail, opened))
    })();
    let Some((start, tail, opened)) = parsed else {
        tracing::warn!(layer = %desc.digest, path = %path.display(), "saved TOC is unusable; reading it from the registry again");
        let _ = std::fs::remove_file(&path);
        return None;
    };
    let source = LayerSource::new(
        Arc::new(opened.layer),
        engine.blob(reference, desc.digest, Some(desc.size)),
        cache.clone(),
        Compression::Gzip,
        source.clone(),
        tokio::runtime::Handle::current(),
    );
    source.seed(start, tail);
    Some(OpenedLayer {
        source,
        prefetch: opened.prefetch,
        toc_digest: opened.toc_digest,
        served: Served::Lazy,
    })
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
    let expected =
        expected_toc(desc).map_err(|detail| OpenError::BadAnnotation { layer, detail })?;
    let blob = engine.blob(reference, desc.digest, Some(desc.size));
    let fetch = |source| OpenError::Fetch { layer, source };
    let tail_len = estargz::tail_read_len(desc.size).min(desc.size);
    let mut start = desc.size - tail_len;
    let mut tail = blob
        .read_at(start, tail_len, Priority::OnDemand)
        .await
        .map_err(fetch)?;
    let mut tries = 0;
    let opened = loop {
        match estargz::open_toc(&tail, start, desc.size, expected.as_ref(), reader) {
            Ok(o) => break o,
            Err(EstargzError::NeedMore { from }) if tries == 0 && from < start => {
                tries += 1;
                let more = blob
                    .read_at(from, start - from, Priority::OnDemand)
                    .await
                    .map_err(fetch)?;
                let mut joined = Vec::with_capacity(more.len() + tail.len());
                joined.extend_from_slice(&more);
                joined.extend_from_slice(&tail);
                tail = joined.into();
                start = from;
            }
            Err(source) => return Err(OpenError::Toc { layer, source }),
        }
    };
    let runtime = tokio::runtime::Handle::current();
    let source = LayerSource::new(
        Arc::new(opened.layer),
        blob,
        cache.clone(),
        Compression::Gzip,
        source,
        runtime,
    );
    source.seed(start, tail.clone());
    Ok((
        OpenedLayer {
            source,
            prefetch: opened.prefetch,
            toc_digest: opened.toc_digest,
            served: Served::Lazy,
        },
        start,
        tail,
    ))
}

/// Opens any layer of an image: lazily when it is eStargz, otherwise by a verified whole-layer
/// fetch into a local eStargz copy under `local_dir` (see [`crate::local`]).
///
/// - A valid local copy made earlier is used first, with no registry access at all (a daemon
///   restoring its mounts must not need the registry).
/// - gzip layers with the TOC digest annotation, or whose footer parses, go through
///   [`open_estargz`]; if their TOC turns out unusable, the layer falls back to the whole
///   fetch (logged with the reason) rather than failing the pull.
/// - zstd (also zstd:chunked, not read lazily yet), uncompressed and footer-less gzip layers
///   take the whole fetch.
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
    let compression = LayerCompression::from_media_type(&desc.media_type).map_err(|detail| {
        OpenError::Unsupported {
            layer,
            media_type: desc.media_type.clone(),
            detail,
        }
    })?;
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
    let reason = match compression {
        LayerCompression::Gzip => {
            match try_estargz(
                engine,
                cache,
                reference,
                desc,
                reader,
                source.clone(),
                local_dir,
            )
            .await?
            {
                Ok(opened) => return Ok(opened),
                Err(reason) => reason,
            }
        }
        LayerCompression::Zstd | LayerCompression::None => static_reason(compression, desc),
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
            format!("zstd:chunked layers are not read lazily yet (media type {mt})")
        }
        LayerCompression::Zstd => format!("no TOC: plain zstd layer (media type {mt})"),
        LayerCompression::None => format!("no TOC: uncompressed tar layer (media type {mt})"),
    }
}

/// Tries a gzip layer as eStargz. The outer error is a registry failure (returned as is);
/// the inner `Err` is the reason to fall back to the whole fetch.
async fn try_estargz(
    engine: &FetchEngine,
    cache: &ChunkCache,
    reference: &Reference,
    desc: &LayerDescriptor,
    reader: &ReaderConfig,
    source: SourceConfig,
    local_dir: &Path,
) -> Result<Result<OpenedLayer, String>, OpenError> {
    let layer = desc.digest;
    if let Some(opened) = open_saved_toc(engine, cache, reference, desc, reader, &source, local_dir)
    {
        return Ok(Ok(opened));
    }
    let mt = &desc.media_type;
    if !desc.annotations.contains_key(TOC_DIGEST_ANNOTATION) {
        // No annotation: one small read of the footer tells eStargz from plain gzip without
        // paying for the (much larger) speculative TOC read on plain layers.
        let len = (estargz::FOOTER_SIZE as u64).min(desc.size);
        if len < estargz::EXTERNAL_TOC_FOOTER_SIZE as u64 {
            return Ok(Err(format!(
                "no eStargz footer: the {}-byte blob is too small (media type {mt})",
                desc.size
            )));
        }
        let tail = engine
            .blob(reference, layer, Some(desc.size))
            .read_at(desc.size - len, len, Priority::OnDemand)
            .await
            .map_err(|source| OpenError::Fetch { layer, source })?;
        match estargz::parse_footer(&tail) {
            Ok((Footer::Estargz { .. } | Footer::Legacy { .. }, _)) => {}
            Ok((Footer::ExternalToc, _)) => {
                return Ok(Err(format!(
                    "eStargz with an external TOC is not supported yet (media type {mt})"
                )))
            }
            Err(_) => {
                return Ok(Err(format!(
                    "no eStargz TOC: plain gzip layer without an eStargz footer (media type {mt})"
                )))
            }
        }
    }
    match open_estargz_tail(engine, cache, reference, desc, reader, source).await {
        Ok((opened, start, tail)) => {
            save_toc(local_dir, &layer, start, &tail);
            Ok(Ok(opened))
        }
        Err(e @ OpenError::Fetch { .. }) => Err(e),
        Err(e) => {
            tracing::warn!(layer = %layer, error = %e,
                "eStargz TOC is unusable; falling back to a verified whole-layer fetch");
            Ok(Err(format!("eStargz TOC unusable: {e}")))
        }
    }
}
