//! Putting content into a registry for tests: blobs, manifests, images and indexes, over plain
//! HTTP with reqwest. Test utilities, not product code: every failure panics with the registry's
//! answer.

use std::collections::BTreeMap;
use std::io::Read;

use lazypull_fetcher::Digest;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::token::TokenIssuer;

/// OCI image manifest.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI uncompressed layer.
pub const MEDIA_TYPE_OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// OCI gzip layer (also eStargz).
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer (also zstd:chunked).
pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker schema 2 manifest.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// How the [`Pusher`] authenticates.
#[derive(Debug, Clone)]
pub enum PushAuth {
    /// No credentials.
    None,
    /// HTTP Basic (htpasswd registries).
    Basic(String, String),
    /// A fixed bearer token (e.g. from [`TokenIssuer::mint`]).
    Bearer(String),
    /// Mint a `repository:<repo>:pull,push` token from this issuer for each operation.
    Token(TokenIssuer),
}

/// Manifest flavour for [`Pusher::push_image_with`] and [`Pusher::push_index_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ManifestFormat {
    /// OCI image manifest / index (default).
    #[default]
    Oci,
    /// Docker schema 2 manifest / manifest list.
    Docker,
}

/// A layer to push: its blob, media type, uncompressed digest (`diff_id`) and annotations.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The blob as stored in the registry.
    pub data: Vec<u8>,
    /// Media type in the manifest; `None` picks one from the content and manifest format.
    pub media_type: Option<String>,
    /// Digest of the uncompressed tar (goes into the config's `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Descriptor annotations (e.g. `containerd.io/snapshot/stargz/toc.digest`).
    pub annotations: BTreeMap<String, String>,
}

/// What the blob looks like, judged from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Gzip,
    Zstd,
    None,
}

fn compression_of(data: &[u8]) -> Compression {
    if data.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

impl Layer {
    /// A layer from a blob. gzip (one or more members, as eStargz) is detected and decompressed to
    /// compute the `diff_id`; anything else without zstd magic is taken as an uncompressed tar.
    /// For zstd blobs, set the `diff_id` with [`Layer::with_diff_id`] (this crate carries no zstd
    /// decoder); until then it is the digest of the compressed bytes.
    pub fn new(data: Vec<u8>) -> Layer {
        let diff_id = match compression_of(&data) {
            Compression::Gzip => {
                let mut raw = Vec::new();
                flate2::read::MultiGzDecoder::new(&data[..])
                    .read_to_end(&mut raw)
                    .expect("layer starts with gzip magic but does not decompress");
                Digest::sha256_of(&raw)
            }
            Compression::Zstd | Compression::None => Digest::sha256_of(&data),
        };
        Layer {
            data,
            media_type: None,
            diff_id,
            annotations: BTreeMap::new(),
        }
    }

    /// Sets the media type used in the manifest.
    pub fn with_media_type(mut self, media_type: &str) -> Layer {
        self.media_type = Some(media_type.to_string());
        self
    }

    /// Sets the uncompressed digest.
    pub fn with_diff_id(mut self, diff_id: Digest) -> Layer {
        self.diff_id = diff_id;
        self
    }

    /// Adds a descriptor annotation.
    pub fn with_annotation(mut self, key: &str, value: &str) -> Layer {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    fn media_type_for(&self, format: ManifestFormat) -> String {
        if let Some(m) = &self.media_type {
            return m.clone();
        }
        match (format, compression_of(&self.data)) {
            (ManifestFormat::Oci, Compression::Gzip) => MEDIA_TYPE_OCI_LAYER_GZIP,
            (ManifestFormat::Oci, Compression::Zstd) => MEDIA_TYPE_OCI_LAYER_ZSTD,
            (ManifestFormat::Oci, Compression::None) => MEDIA_TYPE_OCI_LAYER,
            (ManifestFormat::Docker, Compression::Gzip) => MEDIA_TYPE_DOCKER_LAYER_GZIP,
            (ManifestFormat::Docker, Compression::Zstd) => MEDIA_TYPE_OCI_LAYER_ZSTD,
            (ManifestFormat::Docker, Compression::None) => {
                "application/vnd.docker.image.rootfs.diff.tar"
            }
        }
        .to_string()
    }
}

/// Everything [`Pusher::push_image_with`] needs.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Layers, base first.
    pub layers: Vec<Layer>,
    /// Platform OS, e.g. `linux`.
    pub os: String,
    /// Platform architecture, e.g. `amd64`.
    pub arch: String,
    /// Platform variant, e.g. `v8`.
    pub variant: Option<String>,
    /// The config's `config` object (`Env`, `Cmd`, `Entrypoint`, `WorkingDir`, ...).
    pub config: Value,
    /// OCI or Docker media types.
    pub format: ManifestFormat,
    /// Manifest annotations.
    pub annotations: BTreeMap<String, String>,
}

impl ImageSpec {
    /// An OCI linux image of these layers with an empty `config` section.
    pub fn new(layers: Vec<Layer>, os: &str, arch: &str) -> ImageSpec {
        ImageSpec {
            layers,
            os: os.to_string(),
            arch: arch.to_string(),
            variant: None,
            config: json!({}),
            format: ManifestFormat::Oci,
            annotations: BTreeMap::new(),
        }
    }
}

/// What [`Pusher::push_image`] put into the registry.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// Digest of the manifest bytes.
    pub manifest_digest: Digest,
    /// The manifest exactly as pushed.
    pub manifest_bytes: Vec<u8>,
    /// Media type of the manifest.
    pub manifest_media_type: String,
    /// Digest of the config blob.
    pub config_digest: Digest,
    /// The config exactly as pushed.
    pub config_bytes: Vec<u8>,
    /// Digests of the layer blobs, base first.
    pub layer_digests: Vec<Digest>,
    /// Sizes of the layer blobs, base first.
    pub layer_sizes: Vec<u64>,
}

impl PushedImage {
    /// Size of the manifest in bytes (for index descriptors).
    pub fn manifest_size(&self) -> u64 {
        self.manifest_bytes.len() as u64
    }
}

/// Pushes content to one registry.
#[derive(Debug, Clone)]
pub struct Pusher {
    base: url::Url,
    auth: PushAuth,
    client: reqwest::Client,
}

impl Pusher {
    /// A pusher for `registry_url` (`http://127.0.0.1:PORT`, also a proxy's URL).
    pub fn new(registry_url: &str, auth: PushAuth) -> Pusher {
        let base = url::Url::parse(registry_url)
            .unwrap_or_else(|e| panic!("bad registry url {registry_url:?}: {e}"));
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(120))
            .build()
            .expect("build reqwest client");
        Pusher { base, auth, client }
    }

    /// The registry base URL.
    pub fn url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    fn auth_headers(&self, repo: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = match &self.auth {
            PushAuth::None => None,
            PushAuth::Basic(user, password) => {
                use base64::Engine as _;
                let raw = format!("{user}:{password}");
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(raw)
                ))
            }
            PushAuth::Bearer(token) => Some(format!("Bearer {token}")),
            PushAuth::Token(issuer) => Some(format!(
                "Bearer {}",
                issuer.mint(&[&format!("repository:{repo}:pull,push")])
            )),
        };
        if let Some(v) = value {
            headers.insert(
                AUTHORIZATION,
                HeaderValue::from_str(&v).expect("authorization header value"),
            );
        }
        headers
    }

    fn endpoint(&self, path: &str) -> url::Url {
        self.base.join(path).expect("join registry url")
    }

    /// Uploads `data` as a blob of `repo` (POST an upload, then a monolithic PUT with the
    /// digest) and returns its digest. Pushing an existing blob again is fine.
    pub async fn push_blob(&self, repo: &str, data: &[u8]) -> Digest {
        let digest = Digest::sha256_of(data);
        let headers = self.auth_headers(repo);
        let start = self
            .client
            .post(self.endpoint(&format!("/v2/{repo}/blobs/uploads/")))
            .headers(headers.clone())
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST blob upload to {repo}: {e}"));
        let status = start.status();
        let location = start
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status != StatusCode::ACCEPTED {
            let body = start.text().await.unwrap_or_default();
            panic!("POST blob upload to {repo}: expected 202, got {status}: {body}");
        }
        let location = location.expect("blob upload answer without Location");
        // Location may be relative or absolute.
        let mut put_url = self
            .base
            .join(&location)
            .unwrap_or_else(|e| panic!("bad upload Location {location:?}: {e}"));
        put_url
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let put = self
            .client
            .put(put_url)
            .headers(headers)
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT blob {digest} to {repo}: {e}"));
        let status = put.status();
        if status != StatusCode::CREATED {
            let body = put.text().await.unwrap_or_default();
            panic!("PUT blob {digest} to {repo}: expected 201, got {status}: {body}");
        }
        digest
    }

    /// PUTs a manifest (or index) under `reference` (tag or digest) and returns its digest,
    /// checked against the registry's `Docker-Content-Digest`.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Digest {
        let digest = Digest::sha256_of(bytes);
        let resp = self
            .client
            .put(self.endpoint(&format!("/v2/{repo}/manifests/{reference}")))
            .headers(self.auth_headers(repo))
            .header(CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT manifest {repo}:{reference}: {e}"));
        let status = resp.status();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if status != StatusCode::CREATED {
            let body = resp.text().await.unwrap_or_default();
            panic!("PUT manifest {repo}:{reference}: expected 201, got {status}: {body}");
        }
        if let Some(h) = header_digest {
            assert_eq!(
                h,
                digest.to_string(),
                "registry digest of manifest {repo}:{reference} differs from ours"
            );
        }
        digest
    }

    /// Pushes an OCI image of `layers` (blobs, each gzip or plain tar, see [`Layer::new`]) for
    /// `os`/`arch` under `repo:tag`.
    pub async fn push_image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        os: &str,
        arch: &str,
    ) -> PushedImage {
        let layers = layers.iter().map(|l| Layer::new(l.clone())).collect();
        self.push_image_with(repo, tag, &ImageSpec::new(layers, os, arch))
            .await
    }

    /// Pushes layers, config and manifest described by `spec` under `repo:tag`.
    pub async fn push_image_with(&self, repo: &str, tag: &str, spec: &ImageSpec) -> PushedImage {
        let mut layer_digests = Vec::new();
        let mut layer_sizes = Vec::new();
        let mut descriptors = Vec::new();
        for layer in &spec.layers {
            let digest = self.push_blob(repo, &layer.data).await;
            let mut desc = json!({
                "mediaType": layer.media_type_for(spec.format),
                "digest": digest.to_string(),
                "size": layer.data.len(),
            });
            if !layer.annotations.is_empty() {
                desc["annotations"] = json!(layer.annotations);
            }
            descriptors.push(desc);
            layer_digests.push(digest);
            layer_sizes.push(layer.data.len() as u64);
        }
        let mut config = json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": spec.arch,
            "os": spec.os,
            "config": spec.config,
            "rootfs": {
                "type": "layers",
                "diff_ids": spec.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
            },
            "history": spec.layers.iter().map(|_| json!({
                "created": "2024-01-01T00:00:00Z",
                "created_by": "lazypull-tests",
            })).collect::<Vec<_>>(),
        });
        if let Some(v) = &spec.variant {
            config["variant"] = json!(v);
        }
        let config_bytes = serde_json::to_vec(&config).expect("serialize image config");
        let config_digest = self.push_blob(repo, &config_bytes).await;
        let (manifest_type, config_type) = match spec.format {
            ManifestFormat::Oci => (MEDIA_TYPE_OCI_MANIFEST, MEDIA_TYPE_OCI_CONFIG),
            ManifestFormat::Docker => (MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_DOCKER_CONFIG),
        };
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {
                "mediaType": config_type,
                "digest": config_digest.to_string(),
                "size": config_bytes.len(),
            },
            "layers": descriptors,
        });
        if !spec.annotations.is_empty() {
            manifest["annotations"] = json!(spec.annotations);
        }
        let manifest_bytes = serde_json::to_vec(&manifest).expect("serialize manifest");
        let manifest_digest = self
            .push_manifest(repo, tag, manifest_type, &manifest_bytes)
            .await;
        PushedImage {
            manifest_digest,
            manifest_bytes,
            manifest_media_type: manifest_type.to_string(),
            config_digest,
            config_bytes,
            layer_digests,
            layer_sizes,
        }
    }

    /// Pushes an OCI index under `repo:tag` listing `manifests` as
    /// `(digest, size, os, arch, variant)`; the manifests must already be in `repo` and be OCI
    /// manifests. Returns the index digest.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        manifests: &[(Digest, u64, &str, &str, Option<&str>)],
    ) -> Digest {
        self.push_index_with(repo, tag, ManifestFormat::Oci, manifests)
            .await
    }

    /// Like [`Pusher::push_index`], as an OCI index or a Docker manifest list (whose entries are
    /// then Docker schema 2 manifests).
    pub async fn push_index_with(
        &self,
        repo: &str,
        tag: &str,
        format: ManifestFormat,
        manifests: &[(Digest, u64, &str, &str, Option<&str>)],
    ) -> Digest {
        let (index_type, entry_type) = match format {
            ManifestFormat::Oci => (MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST),
            ManifestFormat::Docker => (MEDIA_TYPE_DOCKER_MANIFEST_LIST, MEDIA_TYPE_DOCKER_MANIFEST),
        };
        let entries: Vec<Value> = manifests
            .iter()
            .map(|(digest, size, os, arch, variant)| {
                let mut platform = json!({"architecture": arch, "os": os});
                if let Some(v) = variant {
                    platform["variant"] = json!(v);
                }
                json!({
                    "mediaType": entry_type,
                    "digest": digest.to_string(),
                    "size": size,
                    "platform": platform,
                })
            })
            .collect();
        let index = json!({
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": entries,
        });
        let bytes = serde_json::to_vec(&index).expect("serialize index");
        self.push_manifest(repo, tag, index_type, &bytes).await
    }
}
