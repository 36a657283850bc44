//! Artifacts that travel next to an image in its repository (a learned prefetch profile,
//! later a seekable index), found by the image's manifest digest.
//!
//! An artifact is an OCI image manifest whose `subject` is the image's manifest, whose
//! `artifactType` says what it is, whose config is the empty descriptor and whose one layer
//! is the artifact's content. It is listed under the referrers tag schema of OCI
//! distribution 1.1: an image index tagged `sha256-<hex of the subject digest>` in the same
//! repository. That fallback works on every registry (distribution 2.8 has no referrers API),
//! and registries that do have the API list the same manifests, since they carry `subject`.
//!
//! Finding is read-only and verified the usual way: the artifact manifest by its digest, its
//! `subject` checked against the image, its content by its digest and bounded in size. An
//! artifact grants no trust by itself; what a caller does with its content must be checked
//! against the image (a profile only names files, whose bytes are verified as always).

use bytes::Bytes;
use oci_spec::image::{
    Descriptor, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder, MediaType,
};

use crate::digest::Digest;
use crate::error::Error;
use crate::manifest::{Manifest, OCI_INDEX, OCI_MANIFEST};
use crate::push::PushError;
use crate::reference::Reference;
use crate::registry::Registry;

/// The tag under which the referrers of `subject` are listed in `image`'s repository.
pub fn fallback_tag(image: &Reference, subject: &Digest) -> Result<Reference, Error> {
    let name = format!(
        "{}/{}:{}-{}",
        image.registry(),
        image.repository(),
        subject.algorithm().as_str(),
        subject.hex()
    );
    name.parse().map_err(|e| Error::Manifest {
        reference: name.clone(),
        detail: format!("cannot name the referrers tag: {e}"),
    })
}

/// The empty JSON config every artifact manifest points to.
const EMPTY_CONFIG: &[u8] = b"{}";

fn bad_manifest(reference: &Reference, detail: String) -> Error {
    Error::Manifest {
        reference: reference.to_string(),
        detail,
    }
}

fn to_oci(d: &Digest) -> Result<oci_spec::image::Digest, Error> {
    d.to_string().parse().map_err(|e| Error::Manifest {
        reference: d.to_string(),
        detail: format!("digest not accepted by the OCI model: {e}"),
    })
}

impl Registry {
    /// Stores `content` (of media type `content_type`) as an artifact of type
    /// `artifact_type` referring to the image manifest `subject` (its descriptor), and lists
    /// it under the referrers tag, replacing an earlier artifact of the same type there.
    /// Returns the artifact manifest's digest.
    pub async fn attach_artifact(
        &self,
        image: &Reference,
        subject: Descriptor,
        artifact_type: &str,
        content_type: &str,
        content: Bytes,
    ) -> Result<Digest, PushError> {
        let subject_digest: Digest =
            subject
                .digest()
                .to_string()
                .parse()
                .map_err(|e| PushError::BadReference {
                    reference: image.to_string(),
                    detail: format!("the subject digest does not parse: {e}"),
                })?;
        let empty = Digest::sha256_of(EMPTY_CONFIG);
        let content_digest = Digest::sha256_of(&content);
        let content_len = content.len() as u64;
        for (digest, data) in [
            (&empty, Bytes::from_static(EMPTY_CONFIG)),
            (&content_digest, content),
        ] {
            if !self.blob_exists(image, digest).await? {
                self.upload_blob_bytes(image, digest, data).await?;
            }
        }
        let artifact = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .artifact_type(MediaType::Other(artifact_type.to_string()))
            .config(Descriptor::new(
                MediaType::EmptyJSON,
                EMPTY_CONFIG.len() as u64,
                to_oci(&empty)?,
            ))
            .layers(vec![Descriptor::new(
                MediaType::Other(content_type.to_string()),
                content_len,
                to_oci(&content_digest)?,
            )])
            .subject(subject)
            .build()
            .map_err(|e| bad_manifest(image, format!("building the artifact manifest: {e}")))?;
        let bytes = serde_json::to_vec(&artifact)
            .map_err(|e| bad_manifest(image, format!("encoding the artifact manifest: {e}")))?;
        let pinned = image.with_digest(Digest::sha256_of(&bytes));
        let artifact_digest = self.put_manifest(&pinned, &bytes, OCI_MANIFEST).await?;

        // The referrers list: what is there, without earlier artifacts of this type.
        let tag = fallback_tag(image, &subject_digest)?;
        let mut listed: Vec<Descriptor> = match self.fetch_manifest(&tag).await {
            Ok(f) => match f.manifest {
                Manifest::Index(index) => index.manifests().clone(),
                Manifest::Image(_) => Vec::new(),
            },
            Err(Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        listed.retain(|d| {
            d.artifact_type().as_ref().map(|t| t.to_string()) != Some(artifact_type.to_string())
        });
        let mut entry = Descriptor::new(
            MediaType::ImageManifest,
            bytes.len() as u64,
            to_oci(&artifact_digest)?,
        );
        entry.set_artifact_type(Some(MediaType::Other(artifact_type.to_string())));
        listed.push(entry);
        let index: ImageIndex = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(listed)
            .build()
            .map_err(|e| bad_manifest(image, format!("building the referrers index: {e}")))?;
        let index_bytes = serde_json::to_vec(&index)
            .map_err(|e| bad_manifest(image, format!("encoding the referrers index: {e}")))?;
        self.put_manifest(&tag, &index_bytes, OCI_INDEX).await?;
        Ok(artifact_digest)
    }

    /// The content of the newest artifact of type `artifact_type` that refers to `subject`
    /// in `image`'s repository (`None`: there is none), at most `max_bytes` long.
    pub async fn find_artifact(
        &self,
        image: &Reference,
        subject: &Digest,
        artifact_type: &str,
        max_bytes: u64,
    ) -> Result<Option<Bytes>, Error> {
        let tag = fallback_tag(image, subject)?;
        let listed = match self.fetch_manifest(&tag).await {
            Ok(f) => f,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Manifest::Index(index) = listed.manifest else {
            return Ok(None);
        };
        let Some(entry) = index.manifests().iter().rev().find(|d| {
            d.artifact_type().as_ref().map(|t| t.to_string()).as_deref() == Some(artifact_type)
        }) else {
            return Ok(None);
        };
        let digest: Digest = entry
            .digest()
            .to_string()
            .parse()
            .map_err(|e| bad_manifest(&tag, format!("a listed digest does not parse: {e}")))?;
        let pinned = image.with_digest(digest);
        let fetched = self.fetch_manifest(&pinned).await?;
        let Manifest::Image(artifact) = fetched.manifest else {
            return Err(bad_manifest(
                &pinned,
                "the listed artifact is an index".into(),
            ));
        };
        check_artifact(&pinned, &artifact, subject, artifact_type)?;
        let layer = &artifact.layers()[0];
        if layer.size() > max_bytes {
            return Err(bad_manifest(
                &pinned,
                format!(
                    "the artifact is {} bytes, above the {max_bytes}-byte limit",
                    layer.size()
                ),
            ));
        }
        let content_digest: Digest = layer.digest().to_string().parse().map_err(|e| {
            bad_manifest(&pinned, format!("the content digest does not parse: {e}"))
        })?;
        // fetch_blob verifies the bytes against the digest.
        let content = self.fetch_blob(image, &content_digest).await?;
        if content.len() as u64 != layer.size() {
            return Err(bad_manifest(
                &pinned,
                format!(
                    "the content is {} bytes, the manifest says {}",
                    content.len(),
                    layer.size()
                ),
            ));
        }
        Ok(Some(content))
    }
}

/// An artifact manifest found under the referrers tag must say what it is, refer to the image
/// it was looked up for, and carry one content layer.
fn check_artifact(
    at: &Reference,
    artifact: &ImageManifest,
    subject: &Digest,
    artifact_type: &str,
) -> Result<(), Error> {
    let kind = artifact.artifact_type().as_ref().map(|t| t.to_string());
    if kind.as_deref() != Some(artifact_type) {
        return Err(bad_manifest(
            at,
            format!("artifact type {kind:?}, expected {artifact_type}"),
        ));
    }
    let refers = artifact.subject().as_ref().map(|s| s.digest().to_string());
    if refers.as_deref() != Some(subject.to_string().as_str()) {
        return Err(bad_manifest(
            at,
            format!("the artifact refers to {refers:?}, not to the image {subject}"),
        ));
    }
    if artifact.layers().len() != 1 {
        return Err(bad_manifest(
            at,
            format!(
                "the artifact has {} content layers, expected 1",
                artifact.layers().len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_tag_names_the_subject_digest() {
        let image: Reference = "localhost:5000/app/web:1.0".parse().unwrap();
        let d = Digest::sha256_of(b"manifest");
        let tag = fallback_tag(&image, &d).unwrap();
        assert_eq!(tag.repository(), "app/web");
        assert_eq!(tag.tag(), Some(format!("sha256-{}", d.hex()).as_str()));
        assert_eq!(tag.digest(), None);
    }

    #[test]
    fn artifacts_must_refer_to_the_image_and_say_what_they_are() {
        let at: Reference = "localhost:5000/app:x".parse().unwrap();
        let image = Digest::sha256_of(b"image");
        let other = Digest::sha256_of(b"other");
        let build = |kind: &str, subject: &Digest, layers: usize| {
            ImageManifestBuilder::default()
                .schema_version(2u32)
                .artifact_type(MediaType::Other(kind.into()))
                .config(Descriptor::new(
                    MediaType::EmptyJSON,
                    2,
                    to_oci(&Digest::sha256_of(EMPTY_CONFIG)).unwrap(),
                ))
                .layers(
                    (0..layers)
                        .map(|_| {
                            Descriptor::new(
                                MediaType::Other("x".into()),
                                1,
                                to_oci(&Digest::sha256_of(b"c")).unwrap(),
                            )
                        })
                        .collect::<Vec<_>>(),
                )
                .subject(Descriptor::new(
                    MediaType::ImageManifest,
                    5,
                    to_oci(subject).unwrap(),
                ))
                .build()
                .unwrap()
        };
        let t = "application/vnd.example+json";
        assert!(check_artifact(&at, &build(t, &image, 1), &image, t).is_ok());
        let e = check_artifact(&at, &build(t, &other, 1), &image, t).unwrap_err();
        assert!(e.to_string().contains("not to the image"), "{e}");
        let e = check_artifact(&at, &build("other", &image, 1), &image, t).unwrap_err();
        assert!(e.to_string().contains("artifact type"), "{e}");
        let e = check_artifact(&at, &build(t, &image, 2), &image, t).unwrap_err();
        assert!(e.to_string().contains("2 content layers"), "{e}");
    }
}
