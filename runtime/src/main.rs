//! The `lazypull` command: CLI, daemon and thin OCI runtime.
//!
//! Only the registry-facing commands exist so far (`inspect`, `fetch`); `serve`, `pull`, `run`
//! and the rest arrive with their issues. Flags follow ctr/nerdctl/podman conventions.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::{Digest, Platform, Reference, Registry, RegistryConfig};

/// Lazy-pulling image filesystem, snapshotter and thin container runtime.
///
/// Containers start before their image is downloaded: layers are mounted from the registry and
/// fetched on demand, verified chunk by chunk, and cached locally.
#[derive(Debug, Parser)]
#[command(name = "lazypull", version, propagate_version = true)]
struct Cli {
    /// Directories holding containerd-style `<host>/hosts.toml` files (mirrors, CAs, plain
    /// HTTP), searched in order.
    #[arg(long, global = true, value_name = "DIR",
          default_values = ["/etc/lazypull/certs.d", "/etc/containerd/certs.d"])]
    hosts_dir: Vec<PathBuf>,

    /// Talk plain HTTP to this registry host (repeatable), like nerdctl --insecure-registry.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    insecure: Vec<String>,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Resolve an image and print its manifest summary (digest, platform, layers) as JSON.
    Inspect {
        /// Image reference, e.g. `busybox`, `ghcr.io/org/app:1.0`, `localhost:5000/app@sha256:...`.
        image: String,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
    },
    /// Download one blob of an image's repository, verified against its digest.
    Fetch {
        /// Image reference naming the repository.
        image: String,
        /// Digest of the blob (`sha256:...`).
        digest: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lazypull: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazypull: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn registry(cli: &Cli) -> Registry {
    let mut hosts = HostsConfig::new(cli.hosts_dir.clone());
    for h in &cli.insecure {
        hosts = hosts.with_plain_http(h);
    }
    Registry::new(RegistryConfig {
        hosts,
        credentials: CredentialStore::from_env(),
        ..RegistryConfig::default()
    })
}

async fn run(cli: Cli) -> Result<()> {
    let reg = registry(&cli);
    match &cli.command {
        Command::Inspect { image, platform } => {
            let reference: Reference = image.parse()?;
            let platform = match platform {
                Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg)?,
                None => Platform::host(),
            };
            let resolved = reg.resolve(&reference, &platform).await?;
            let image = resolved
                .image()
                .context("registry returned an index where an image manifest was expected")?;
            let layers: Vec<serde_json::Value> = image
                .layers()
                .iter()
                .map(|l| {
                    serde_json::json!({
                        "digest": l.digest().to_string(),
                        "size": l.size(),
                        "mediaType": l.media_type().to_string(),
                        "annotations": l.annotations(),
                    })
                })
                .collect();
            let out = serde_json::json!({
                "reference": resolved.reference.to_string(),
                "indexDigest": resolved.index.as_ref().map(|i| i.digest.to_string()),
                "manifestDigest": resolved.manifest.digest.to_string(),
                "mediaType": resolved.manifest.media_type,
                "platform": platform.to_string(),
                "config": image.config().digest().to_string(),
                "layers": layers,
            });
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{}", serde_json::to_string_pretty(&out)?)?;
        }
        Command::Fetch {
            image,
            digest,
            output,
        } => {
            let reference: Reference = image.parse()?;
            let digest: Digest = digest.parse()?;
            let n = reg
                .download_blob(&reference, &digest, output, &|_| {})
                .await?;
            eprintln!(
                "{digest}: {n} bytes verified, written to {}",
                output.display()
            );
        }
    }
    Ok(())
}
