//! Manifests and indexes (OCI and Docker v2 media types) and platform selection.
//!
//! The registry client fetches raw bytes and verifies their digest; this module turns them into
//! [`oci_spec`] types and picks the right image of a multi-platform index.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::error::Error;

/// OCI image manifest media type.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker v2 schema 2 manifest media type.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// OCI image config media type.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image config media type.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// OCI gzip layer media type (also the one eStargz layers carry, so any runtime can unpack them).
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer media type (also zstd:chunked's).
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// Docker gzip layer media type.
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The `Accept` header for manifest requests: every type lazypull understands.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A parsed manifest: one image, or an index of images for several platforms.
#[derive(Debug, Clone)]
pub enum Manifest {
    /// A single image.
    Image(Box<ImageManifest>),
    /// A multi-platform index (or Docker manifest list).
    Index(Box<ImageIndex>),
}

/// A manifest as fetched: the exact bytes (their digest is the identity), the media type the
/// registry declared, and the parsed form.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    /// Digest of `bytes`, verified.
    pub digest: Digest,
    /// Media type (from the response, or the document's own `mediaType`).
    pub media_type: String,
    /// The raw document, needed to re-push or store it byte-exact.
    pub bytes: Bytes,
    /// Parsed form.
    pub manifest: Manifest,
}

impl Manifest {
    /// Parses `bytes`, deciding by the declared media type, then by the document's
    /// `mediaType`, then by shape (`manifests` vs `layers`).
    pub fn parse(media_type: &str, bytes: &[u8], reference: &str) -> Result<Manifest, Error> {
        let bad = |detail: String| Error::Manifest {
            reference: reference.to_string(),
            detail,
        };
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
        let declared = match media_type {
            OCI_INDEX | DOCKER_MANIFEST_LIST | OCI_MANIFEST | DOCKER_MANIFEST => media_type,
            _ => value
                .get("mediaType")
                .and_then(|m| m.as_str())
                .unwrap_or(""),
        };
        let is_index = match declared {
            OCI_INDEX | DOCKER_MANIFEST_LIST => true,
            OCI_MANIFEST | DOCKER_MANIFEST => false,
            _ if value.get("manifests").is_some() => true,
            _ if value.get("layers").is_some() => false,
            other => {
                return Err(bad(format!(
                    "unsupported media type {other:?} (schema 1 manifests are not supported)"
                )))
            }
        };
        if is_index {
            let idx = ImageIndex::from_reader(bytes).map_err(|e| bad(e.to_string()))?;
            Ok(Manifest::Index(Box::new(idx)))
        } else {
            let m = ImageManifest::from_reader(bytes).map_err(|e| bad(e.to_string()))?;
            Ok(Manifest::Image(Box::new(m)))
        }
    }
}

/// The digest of a descriptor in lazypull's [`Digest`] type.
pub fn descriptor_digest(d: &Descriptor) -> Result<Digest, Error> {
    let s = d.digest().to_string();
    s.parse().map_err(|e| Error::Manifest {
        reference: s.clone(),
        detail: format!("{e}"),
    })
}

/// An OS/architecture/variant triple, as `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux`, `windows`...
    pub os: String,
    /// GOARCH names: `amd64`, `arm64`, `arm`, `s390x`...
    pub architecture: String,
    /// `v7`, `v8`; none when the architecture has no variants.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this binary runs on, in OCI (GOARCH) names.
    pub fn host() -> Platform {
        let (architecture, variant) = match std::env::consts::ARCH {
            "x86_64" => ("amd64", None),
            "aarch64" => ("arm64", Some("v8")),
            "arm" => ("arm", Some("v7")),
            "x86" => ("386", None),
            "powerpc64" => ("ppc64le", None),
            "s390x" => ("s390x", None),
            "riscv64" => ("riscv64", None),
            other => (other, None),
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
        }
    }

    /// Whether an index entry's platform serves this one. A missing variant on either side
    /// matches (arm64 images rarely say v8), as containerd's default matcher does.
    pub fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        if p.os().to_string() != self.os || p.architecture().to_string() != self.architecture {
            return false;
        }
        match (&self.variant, p.variant()) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        }
    }

    /// The platform an image config says its image is for (`os`, `architecture`, `variant`),
    /// which is the truth for a single-platform image whatever platform was asked for.
    pub fn of_config(config: &serde_json::Value) -> Option<Platform> {
        let field = |k: &str| {
            config
                .get(k)
                .and_then(|v| v.as_str())
                .filter(|v| !v.is_empty())
        };
        Some(Platform {
            os: field("os")?.to_string(),
            architecture: field("architecture")?.to_string(),
            variant: field("variant").map(str::to_string),
        })
    }

    /// Whether an image for `image` serves a request for this platform: same OS and
    /// architecture, and the same variant when both name one (as [`Platform::matches`]).
    pub fn serves(&self, image: &Platform) -> bool {
        self.os == image.os
            && self.architecture == image.architecture
            && match (&self.variant, &image.variant) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    }

    /// Picks the manifest for this platform from an index: an exact variant match first, then
    /// an entry with no variant.
    pub fn select<'a>(&self, index: &'a ImageIndex) -> Option<&'a Descriptor> {
        let candidates = || {
            index
                .manifests()
                .iter()
                .filter(|d| d.platform().as_ref().is_some_and(|p| self.matches(p)))
        };
        candidates()
            .find(|d| {
                d.platform()
                    .as_ref()
                    .is_some_and(|p| p.variant() == &self.variant)
            })
            .or_else(|| candidates().next())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &&str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(ok) {
            return Err(format!(
                "invalid platform {s:?}: expected OS/ARCH[/VARIANT], for example linux/arm64/v8"
            ));
        }
        Ok(Platform {
            os: parts[0].to_string(),
            architecture: parts[1].to_string(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

/// Lists an index's platforms for error messages.
pub fn describe_platforms(index: &ImageIndex) -> String {
    let list: Vec<String> = index
        .manifests()
        .iter()
        .filter_map(|d| d.platform().as_ref())
        .map(|p| {
            let mut s = format!("{}/{}", p.os(), p.architecture());
            if let Some(v) = p.variant() {
                s.push('/');
                s.push_str(v);
            }
            s
        })
        .collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(entries: &[(&str, &str, Option<&str>)]) -> ImageIndex {
        let manifests: Vec<serde_json::Value> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let mut p = serde_json::json!({"os": os, "architecture": arch});
                if let Some(v) = variant {
                    p["variant"] = serde_json::json!(v);
                }
                serde_json::json!({
                    "mediaType": OCI_MANIFEST,
                    "digest": format!("sha256:{:064x}", i),
                    "size": 100,
                    "platform": p,
                })
            })
            .collect();
        let doc =
            serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
        ImageIndex::from_reader(doc.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn selects_platforms() {
        let idx = index(&[
            ("linux", "amd64", None),
            ("linux", "arm", Some("v6")),
            ("linux", "arm", Some("v7")),
            ("linux", "arm64", None),
        ]);
        let pick = |p: &str| {
            let p: Platform = p.parse().unwrap();
            p.select(&idx).map(|d| d.digest().to_string())
        };
        assert_eq!(pick("linux/amd64").unwrap(), format!("sha256:{:064x}", 0));
        assert_eq!(pick("linux/arm/v7").unwrap(), format!("sha256:{:064x}", 2));
        assert_eq!(pick("linux/arm/v6").unwrap(), format!("sha256:{:064x}", 1));
        assert_eq!(
            pick("linux/arm64/v8").unwrap(),
            format!("sha256:{:064x}", 3)
        );
        assert_eq!(pick("linux/s390x"), None);
        assert_eq!(pick("windows/amd64"), None);
        assert_eq!(
            describe_platforms(&idx),
            "linux/amd64, linux/arm/v6, linux/arm/v7, linux/arm64"
        );
    }

    #[test]
    fn parses_platform_strings() {
        assert_eq!(
            "linux/arm64/v8".parse::<Platform>().unwrap().to_string(),
            "linux/arm64/v8"
        );
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
        assert_eq!(Platform::host().os, "linux");
    }

    #[test]
    fn a_config_says_which_platform_its_image_serves() {
        let p = |s: &str| s.parse::<Platform>().unwrap();
        let cfg = serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let image = Platform::of_config(&cfg).unwrap();
        assert_eq!(image, p("linux/arm64/v8"));
        assert!(p("linux/arm64").serves(&image));
        assert!(p("linux/arm64/v8").serves(&image));
        assert!(!p("linux/arm64/v7").serves(&image));
        assert!(!p("linux/s390x").serves(&image));
        assert!(!p("windows/arm64").serves(&image));
        assert_eq!(
            Platform::of_config(&serde_json::json!({"os": "linux"})),
            None
        );
    }

    #[test]
    fn parses_by_type_and_shape() {
        let m = serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{:064x}", 1), "size": 2},
            "layers": []
        })
        .to_string();
        assert!(matches!(
            Manifest::parse("", m.as_bytes(), "x").unwrap(),
            Manifest::Image(_)
        ));
        assert!(matches!(
            Manifest::parse(DOCKER_MANIFEST, m.as_bytes(), "x").unwrap(),
            Manifest::Image(_)
        ));
        let err = Manifest::parse("", b"{\"schemaVersion\":1}", "img").unwrap_err();
        assert!(err.to_string().contains("unsupported media type"), "{err}");
        let err = Manifest::parse(OCI_MANIFEST, b"not json", "img").unwrap_err();
        assert!(err.to_string().contains("invalid manifest img"), "{err}");
    }
}
