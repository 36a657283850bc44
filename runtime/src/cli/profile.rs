//! `lazypull profile`: the prefetch profiles a node learned, shown and published.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use lazypull_fetcher::{Digest, Platform, Reference};
use oci_spec::image::{Descriptor, MediaType};

use crate::config::Settings;
use crate::daemon::profiles::{self, ARTIFACT_TYPE};

/// What `lazypull profile` does.
#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Print the files of IMAGE's learned profile, one per line, in the order its next cold
    /// start prefetches them (`LAYER PATH`). Needs no daemon.
    Show {
        /// Image reference (resolved in its registry to find the manifest digest).
        image: String,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
    },
    /// Publish this node's learned profile of IMAGE next to the image in its repository (an
    /// OCI artifact whose subject is the image manifest, listed under the referrers tag
    /// `sha256-<hex>`), so a pull on any node prefetches it. Needs push access to the
    /// repository; needs no daemon.
    Push {
        /// Image reference.
        image: String,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
    },
}

/// Runs one `profile` subcommand.
pub async fn run(s: &Settings, command: ProfileCommand) -> Result<()> {
    let (ProfileCommand::Show { image, platform } | ProfileCommand::Push { image, platform }) =
        &command;
    let reference: Reference = image.parse()?;
    let platform = match platform {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let registry = super::registry(s);
    let resolved = registry
        .resolve(&reference, &platform)
        .await
        .with_context(|| format!("resolving {image}"))?;
    let manifest = &resolved.manifest;
    let Some(profile) = profiles::load(&s.root, &manifest.digest) else {
        bail!(
            "no profile of {image} ({}) on this node (under {}): run the image once, and \
             its start is learned",
            manifest.digest,
            s.root.join("profiles").display()
        );
    };
    match command {
        ProfileCommand::Show { .. } => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for f in &profile.files {
                // Paths may come from a registry: control characters are shown escaped.
                writeln!(out, "{} /{}", f.layer, f.path.escape_debug())?;
            }
        }
        ProfileCommand::Push { .. } => {
            let subject = Descriptor::new(
                MediaType::Other(manifest.media_type.clone()),
                manifest.bytes.len() as u64,
                oci_digest(&manifest.digest)?,
            );
            let content = Bytes::from(serde_json::to_vec(&profile)?);
            anyhow::ensure!(
                content.len() as u64 <= lazypull_fetcher::registry::MAX_DOCUMENT_BYTES,
                "the profile of {image} is {} bytes, above the {} a node reads",
                content.len(),
                lazypull_fetcher::registry::MAX_DOCUMENT_BYTES
            );
            let pushed = registry
                .attach_artifact(&reference, subject, ARTIFACT_TYPE, ARTIFACT_TYPE, content)
                .await
                .with_context(|| format!("publishing the profile of {image}"))?;
            eprintln!(
                "{image}: profile of {} files published as {pushed} (listed under tag {}-{})",
                profile.files.len(),
                manifest.digest.algorithm().as_str(),
                manifest.digest.hex()
            );
        }
    }
    Ok(())
}

fn oci_digest(d: &Digest) -> Result<oci_spec::image::Digest> {
    d.to_string()
        .parse()
        .map_err(|e| anyhow::anyhow!("digest {d}: {e}"))
}
