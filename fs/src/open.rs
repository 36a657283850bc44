//! Opening a layer of an image for lazy reading: find and verify its TOC with as few requests
//! as possible, and wire the model to a [`LayerSource`].

use std::collections::HashMap;
use std::sync::Arc;

use lazypull_fetcher::{ChunkCache, Digest, FetchEngine, Priority, Reference};

use crate::chunks::{Compression, LayerSource, SourceConfig};
use crate::estargz::{self, EstargzError, Prefetch, ReaderConfig};

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
}

/// A layer ready to mount.
#[derive(Debug, Clone)]
pub struct OpenedLayer {
    /// File content, served lazily.
    pub source: LayerSource,
    /// What to prefetch first.
    pub prefetch: Prefetch,
    /// Digest of the TOC JSON.
    pub toc_digest: Digest,
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
    let layer = desc.digest;
    let expected = match desc.annotations.get(TOC_DIGEST_ANNOTATION) {
        Some(v) => Some(v.parse::<Digest>().map_err(|e| OpenError::BadAnnotation {
            layer,
            detail: e.to_string(),
        })?),
        None => None,
    };
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
    source.seed(start, tail);
    Ok(OpenedLayer {
        source,
        prefetch: opened.prefetch,
        toc_digest: opened.toc_digest,
    })
}
