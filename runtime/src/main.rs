//! The `lazypull` command: CLI, daemon and thin OCI runtime.
//!
//! Commands so far: `inspect` and `fetch` (registry), `mount`/`umount` (lazy image mounts through
//! the mount server); `serve`, `pull`, `run` and the rest arrive with their issues. Flags follow
//! ctr/nerdctl/podman conventions.

mod mountd;

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::{CacheConfig, Digest, Platform, Reference, Registry, RegistryConfig};

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

    /// State directory: chunk cache, layer mount points, the mount server's socket and log.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        default_value = "/var/lib/lazypull"
    )]
    root: PathBuf,

    /// Chunk cache budget in MiB; least recently used chunks are evicted beyond it.
    #[arg(long, global = true, value_name = "MIB", default_value_t = 10240)]
    cache_mib: u64,

    /// After mounting a layer, fetch all of it in the background at low priority so it
    /// becomes fully local.
    #[arg(long, global = true, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    background_fill: bool,

    /// How long a read may wait on an unreachable or stalled registry before it fails (EIO
    /// in a mount), in seconds.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    fetch_timeout: u64,

    /// Cap on the background fill's download rate, in MiB/s (0 = no cap). On-demand reads
    /// are never capped.
    #[arg(long, global = true, value_name = "MIB_PER_SEC", default_value_t = 0)]
    fill_rate: u64,

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
    /// Mount an image read-only at DIR, its layers fetched lazily (eStargz), merged with
    /// overlayfs. Returns once the mount is usable; the mount server (started on demand)
    /// keeps serving it until `lazypull umount DIR`.
    Mount {
        /// Image reference.
        image: String,
        /// Existing directory to mount on.
        dir: PathBuf,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
    },
    /// Unmount an image mounted with `lazypull mount`, and its layers unless other images use them.
    #[command(alias = "unmount")]
    Umount {
        /// The mount point.
        dir: PathBuf,
    },
    /// List images mounted with `lazypull mount`.
    Mounts,
    /// Run the mount server in the foreground (started automatically by `lazypull mount`).
    #[command(hide = true)]
    MountServer,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if matches!(cli.command, Command::MountServer) {
        return match mount_server(&cli) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lazypull mount-server: {e:#}");
                ExitCode::from(1)
            }
        };
    }
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
    let timeout = Duration::from_secs(cli.fetch_timeout.max(1));
    let defaults = RegistryConfig::default();
    Registry::new(RegistryConfig {
        hosts,
        credentials: CredentialStore::from_env(),
        idle_timeout: defaults.idle_timeout.min(timeout),
        retry: lazypull_fetcher::retry::RetryPolicy {
            max_total: timeout,
            ..defaults.retry.clone()
        },
        ..defaults
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
        Command::Mount {
            image,
            dir,
            platform,
        } => {
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("mount point {}", dir.display()))?;
            ensure_server(&cli).await?;
            let reply = mountd::request(
                &cli.root,
                &mountd::Request::Mount {
                    image: image.clone(),
                    mountpoint: dir,
                    platform: platform.clone(),
                },
            )
            .await?;
            finish(reply)?;
        }
        Command::Umount { dir } => {
            let dir = std::fs::canonicalize(dir)
                .with_context(|| format!("mount point {}", dir.display()))?;
            let reply = mountd::request(&cli.root, &mountd::Request::Umount { mountpoint: dir })
                .await
                .context("is anything mounted? no mount server is running for this --root")?;
            finish(reply)?;
        }
        Command::Mounts => {
            let reply: mountd::Reply = mountd::request(&cli.root, &mountd::Request::List)
                .await
                .unwrap_or_default();
            let mut stdout = std::io::stdout().lock();
            for m in reply.mounts {
                let state = if m.complete { "complete" } else { "lazy" };
                writeln!(
                    stdout,
                    "{}\t{}\t{} layers\t{state}",
                    m.mountpoint.display(),
                    m.image,
                    m.layers.len()
                )?;
            }
        }
        Command::MountServer => bail!("mount-server is handled before the runtime starts"),
    }
    Ok(())
}

fn finish(reply: mountd::Reply) -> Result<()> {
    if let Some(m) = &reply.message {
        eprintln!("{m}");
    }
    match reply.error {
        Some(e) if !reply.ok => bail!("{e}"),
        _ => Ok(()),
    }
}

/// Starts the mount server for `--root` unless one answers already.
async fn ensure_server(cli: &Cli) -> Result<()> {
    if tokio::net::UnixStream::connect(mountd::socket_path(&cli.root))
        .await
        .is_ok()
    {
        return Ok(());
    }
    std::fs::create_dir_all(&cli.root)
        .with_context(|| format!("creating {}", cli.root.display()))?;
    let log_path = cli.root.join("mount-server.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the lazypull executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--root").arg(&cli.root);
    cmd.arg("--cache-mib").arg(cli.cache_mib.to_string());
    cmd.arg("--background-fill")
        .arg(cli.background_fill.to_string());
    cmd.arg("--fetch-timeout")
        .arg(cli.fetch_timeout.to_string());
    cmd.arg("--fill-rate").arg(cli.fill_rate.to_string());
    for d in &cli.hosts_dir {
        cmd.arg("--hosts-dir").arg(d);
    }
    for h in &cli.insecure {
        cmd.arg("--insecure-registry").arg(h);
    }
    // Few malloc arenas: chunk buffers are allocated and freed on many threads, and glibc's
    // default of 8 arenas per core keeps hundreds of MiB of freed memory (measured with
    // fs-bench: 433 MiB after an import workload, 234 MiB with one arena).
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        cmd.env("MALLOC_ARENA_MAX", "2");
    }
    cmd.arg("mount-server")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    let mut child = cmd.spawn().context("starting the mount server")?;
    let stdout = child.stdout.take().context("mount server stdout")?;
    let pid = child.id();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(30), line)
        .await
        .context("the mount server did not become ready within 30 s")??;
    if line.trim() != "READY" {
        bail!(
            "the mount server failed to start; see {}",
            log_path.display()
        );
    }
    eprintln!(
        "started the lazypull mount server (pid {pid}, log {})",
        log_path.display()
    );
    Ok(())
}

fn mount_server(cli: &Cli) -> Result<()> {
    // CPU-heavy work is bounded to one job per core in lazypull-fs; a small blocking pool
    // keeps the thread count (and per-thread allocator state) small as well.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("starting the async runtime")?;
    let registry = registry(cli);
    let options = mountd::ServeOptions {
        cache: CacheConfig {
            budget_bytes: cli.cache_mib << 20,
            ..CacheConfig::default()
        },
        background_fill: cli.background_fill,
        fill_rate: (cli.fill_rate > 0).then_some(cli.fill_rate << 20),
    };
    let root: &Path = &cli.root;
    rt.block_on(mountd::serve(root.to_path_buf(), registry, options, || {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "READY");
        let _ = out.flush();
    }))
}
