//! Command-line definitions and the client side of every command.

mod convert;
mod daemon_client;
mod profile;
mod rpull;
mod run;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use lazypull_fetcher::credentials::CredentialStore;
use lazypull_fetcher::hosts::HostsConfig;
use lazypull_fetcher::{Digest, Platform, Reference, Registry, RegistryConfig};

use crate::api::{ContainerInfo, ImageInfo, ImageStats, MountInfo, OpenedPath, Request};
use crate::config::{LogFormat, Settings, SettingsArgs};
use crate::daemon::human_bytes;
pub use daemon_client::{call, ensure_daemon};

/// Lazy-pulling image filesystem, snapshotter and thin container runtime.
///
/// Containers start before their image is downloaded: layers are mounted from the registry and
/// fetched on demand, verified chunk by chunk, and cached locally. Every command but `info`
/// and `shutdown` starts the daemon (`lazypull serve`) when it is not running.
#[derive(Debug, Parser)]
#[command(name = "lazypull", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub settings: SettingsArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground: layer mounts, cache, containers' roots.
    ///
    /// Started automatically by the other commands; run it yourself under a service manager.
    /// SIGTERM/Ctrl-C stop it cleanly, but are refused once while containers run (their files
    /// would disappear): stop them first, signal twice within 10 s, or `lazypull shutdown --force`.
    Serve,
    /// Pull an image: resolve it, fetch manifest, config and layer TOCs, mount the layers
    /// lazily. Layers without a TOC are fetched whole (and verified).
    Pull {
        /// Image reference, e.g. `localhost:5000/app:1.0`.
        image: String,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
        /// Print only the manifest digest.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Run a command in a new container, its image pulled lazily if needed.
    Run(Box<run::RunArgs>),
    /// Pull an image into containerd lazily through the lazypull snapshotter: manifest and
    /// config into containerd's content store, layers as remote snapshots (layers without a
    /// TOC are downloaded and applied by containerd), and the image record. Then
    /// `ctr run --snapshotter lazypull IMAGE ID CMD` starts it. containerd's socket is given
    /// with --containerd-address (the global --address is lazypull's own socket).
    Rpull(Box<rpull::RpullArgs>),
    /// List containers (running ones; `-a` for all).
    #[command(alias = "ls")]
    Ps {
        /// Show all containers, also created and exited ones.
        #[arg(short, long)]
        all: bool,
        /// Print only IDs.
        #[arg(short, long)]
        quiet: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop running containers: SIGTERM, then SIGKILL after the timeout.
    Stop {
        /// Seconds to wait before killing.
        #[arg(short = 't', long = "time", default_value_t = 10)]
        time: u64,
        /// Container names or IDs.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Remove containers: their writable layer, mounts and records.
    Rm {
        /// Kill running containers first.
        #[arg(short, long)]
        force: bool,
        /// Container names or IDs.
        #[arg(required = true)]
        containers: Vec<String>,
    },
    /// Print the output of a detached container.
    Logs {
        /// Container name or ID.
        container: String,
    },
    /// List pulled images.
    Images {
        /// Print only manifest digests.
        #[arg(short, long)]
        quiet: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove images; their layers are unmounted unless another image uses them.
    Rmi {
        /// Also stop and remove every container that uses the images, running or not (each is
        /// named in the output).
        #[arg(short, long)]
        force: bool,
        /// Image references or digest prefixes.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove layer data no image uses, and report cache use against its budget.
    Prune {
        /// Also remove every image no container uses, and every cached chunk no mounted layer
        /// can read (as `podman image prune -a`): the disk is given back.
        #[arg(short, long)]
        all: bool,
    },
    /// Per image and layer: bytes fetched by reason, share cached, fill rate, slowest reads.
    Stats {
        /// An image reference, or a layer digest (prefix); default: every image.
        target: Option<String>,
        /// Print JSON (the same numbers as the Prometheus metrics).
        #[arg(long)]
        json: bool,
        /// Print the files the image's containers opened, one per line, in the order first
        /// opened: a prefetch list recorded from a real run, for `lazypull convert
        /// --prefetch-list` (files of layers fetched whole are not recorded).
        #[arg(long, conflicts_with = "json")]
        accessed: bool,
    },
    /// Versions, kernel features (FUSE, passthrough, overlayfs), daemon and cache state.
    Info {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mount an image read-only at DIR (pulling it first if needed), its layers fetched lazily
    /// and merged with overlayfs.
    Mount {
        /// Image reference.
        image: String,
        /// Existing directory to mount on.
        dir: PathBuf,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
    },
    /// Unmount an image mounted with `lazypull mount` (the image stays pulled).
    #[command(alias = "unmount")]
    Umount {
        /// The mount point.
        dir: PathBuf,
    },
    /// List images mounted with `lazypull mount`.
    Mounts,
    /// Resolve an image in its registry and print its manifest summary (digest, platform,
    /// layers) as JSON. Needs no daemon.
    Inspect {
        /// Image reference.
        image: String,
        /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
        #[arg(long)]
        platform: Option<String>,
    },
    /// Rewrite an image's layers as eStargz (or zstd:chunked) and push it. Needs no daemon.
    Convert(Box<convert::ConvertArgs>),
    /// Learned prefetch profiles: what an image's first start on this node read, prefetched
    /// by its next cold start; `push` publishes one next to the image for every node.
    #[command(subcommand)]
    Profile(profile::ProfileCommand),
    /// Download one blob of an image's repository, verified against its digest. Needs no daemon.
    Fetch {
        /// Image reference naming the repository.
        image: String,
        /// Digest of the blob (`sha256:...`).
        digest: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Stop the daemon (refused while containers run unless --force).
    Shutdown {
        /// Stop even while containers run; their files become unreachable.
        #[arg(short, long)]
        force: bool,
    },
    /// Supervise a detached container (started by `run -d`).
    #[command(hide = true)]
    ContainerShim {
        /// Container ID.
        id: String,
        /// Remove the container when it exits.
        #[arg(long)]
        rm: bool,
    },
    /// Hold the daemon's FUSE connections so its mounts survive a daemon crash (started by
    /// `serve`; exits when the daemon stops cleanly, or `--grace` seconds after it died and
    /// none came back).
    #[command(hide = true)]
    FuseKeeper {
        /// The socket the daemon talks to it on.
        #[arg(long)]
        socket: PathBuf,
        /// Seconds to hold the mounts of a daemon that does not come back.
        #[arg(long, default_value_t = 600)]
        grace: u64,
    },
}

/// Logs go to stderr (the daemon's stderr is its log file); `RUST_LOG` filters them.
pub fn init_logging(format: LogFormat, daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The registry client the settings describe.
pub fn registry(settings: &Settings) -> Registry {
    let mut hosts = HostsConfig::new(settings.hosts_dir.clone());
    for h in &settings.insecure_registries {
        hosts = hosts.with_plain_http(h);
    }
    let timeout = Duration::from_secs(settings.fetch_timeout.max(1));
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

/// Runs one command; returns the process exit code.
pub async fn execute(cli: Cli, settings: Settings) -> Result<u8> {
    let s = &settings;
    daemon_client::note_daemon_flags(cli.settings.daemon_flags_given());
    match cli.command {
        Command::Serve => {
            daemon_client::preflight()?;
            crate::daemon::serve(settings.clone(), registry(&settings), || {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "READY");
                let _ = out.flush();
            })
            .await?;
        }
        Command::Pull {
            image,
            platform,
            quiet,
        } => {
            ensure_daemon(s).await?;
            let reply = call(s, &Request::Pull { image, platform }, !quiet).await?;
            if quiet {
                println!("{}", reply.data.as_str().unwrap_or_default());
            } else if let Some(m) = reply.message {
                println!("{m}");
            }
        }
        Command::Run(args) => return run::run(s, *args).await,
        Command::Rpull(args) => {
            ensure_daemon(s).await?;
            rpull::rpull(s, *args).await?;
        }
        Command::ContainerShim { id, rm } => return run::shim(s, &id, rm).await,
        Command::FuseKeeper { socket, grace } => {
            tokio::task::spawn_blocking(move || {
                crate::daemon::keeper::run(&socket, Duration::from_secs(grace))
            })
            .await??;
        }
        Command::Ps { all, quiet, json } => {
            ensure_daemon(s).await?;
            let list: Vec<ContainerInfo> = call(s, &Request::Ps, false).await?.decode()?;
            let list: Vec<ContainerInfo> = list
                .into_iter()
                .filter(|c| all || c.status == "running")
                .collect();
            print_containers(&list, quiet, json)?;
        }
        Command::Stop { time, containers } => {
            ensure_daemon(s).await?;
            let mut failed = false;
            for c in containers {
                match call(
                    s,
                    &Request::Stop {
                        container: c,
                        timeout: time,
                    },
                    false,
                )
                .await
                {
                    Ok(r) => println!("{}", r.message.unwrap_or_default()),
                    Err(e) => {
                        eprintln!("lazypull: {}", crate::report::chain(&e));
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        Command::Rm { force, containers } => {
            ensure_daemon(s).await?;
            let mut failed = false;
            for c in containers {
                match call(
                    s,
                    &Request::Remove {
                        container: c,
                        force,
                    },
                    false,
                )
                .await
                {
                    Ok(r) => println!("{}", r.message.unwrap_or_default()),
                    Err(e) => {
                        eprintln!("lazypull: {}", crate::report::chain(&e));
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        Command::Logs { container } => {
            ensure_daemon(s).await?;
            let list: Vec<ContainerInfo> = call(s, &Request::Ps, false).await?.decode()?;
            let c = list
                .iter()
                .find(|c| c.name == container || c.id.starts_with(&container))
                .with_context(|| format!("no such container: {container}"))?;
            let log = s.root.join("containers").join(&c.id).join("container.log");
            let data = std::fs::read(&log).with_context(|| {
                format!("{} has no log (only detached containers have one)", c.name)
            })?;
            std::io::stdout().write_all(&data)?;
        }
        Command::Images { quiet, json } => {
            ensure_daemon(s).await?;
            let list: Vec<ImageInfo> = call(s, &Request::Images, false).await?.decode()?;
            print_images(&list, quiet, json)?;
        }
        Command::Rmi { force, images } => {
            ensure_daemon(s).await?;
            let mut failed = false;
            for image in images {
                match call(s, &Request::Rmi { image, force }, false).await {
                    Ok(r) => println!("{}", r.message.unwrap_or_default()),
                    Err(e) => {
                        eprintln!("lazypull: {}", crate::report::chain(&e));
                        failed = true;
                    }
                }
            }
            return Ok(u8::from(failed));
        }
        Command::Prune { all } => {
            ensure_daemon(s).await?;
            let req = if all {
                Request::PruneAll
            } else {
                Request::Prune
            };
            let r = call(s, &req, false).await?;
            println!("{}", r.message.unwrap_or_default());
        }
        Command::Info { json } => info(s, json).await?,
        Command::Stats {
            target,
            json,
            accessed,
        } => {
            if accessed && target.is_none() {
                bail!("--accessed needs an image: lazypull stats --accessed IMAGE > prefetch.list");
            }
            ensure_daemon(s).await?;
            let list: Vec<ImageStats> = call(s, &Request::Stats { target, accessed }, false)
                .await?
                .decode()?;
            if accessed {
                print_accessed(&list)?;
            } else {
                print_stats(&list, json)?;
            }
        }
        Command::Mount {
            image,
            dir,
            platform,
        } => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("mount point {}", dir.display()))?;
            ensure_daemon(s).await?;
            let r = call(
                s,
                &Request::Mount {
                    image,
                    mountpoint: dir,
                    platform,
                },
                true,
            )
            .await?;
            eprintln!("{}", r.message.unwrap_or_default());
        }
        Command::Umount { dir } => {
            let dir = std::fs::canonicalize(&dir)
                .with_context(|| format!("mount point {}", dir.display()))?;
            ensure_daemon(s).await?;
            let r = call(s, &Request::Umount { mountpoint: dir }, false).await?;
            eprintln!("{}", r.message.unwrap_or_default());
        }
        Command::Mounts => {
            ensure_daemon(s).await?;
            let list: Vec<MountInfo> = call(s, &Request::Mounts, false).await?.decode()?;
            let mut out = std::io::stdout().lock();
            for m in list {
                let state = if m.complete { "complete" } else { "lazy" };
                writeln!(
                    out,
                    "{}\t{}\t{} layers\t{state}",
                    m.mountpoint.display(),
                    m.image,
                    m.layers.len()
                )?;
            }
        }
        Command::Inspect { image, platform } => inspect(s, &image, platform.as_deref()).await?,
        Command::Convert(args) => return convert::run(s, *args).await,
        Command::Profile(command) => profile::run(s, command).await?,
        Command::Fetch {
            image,
            digest,
            output,
        } => {
            let reference: Reference = image.parse()?;
            let digest: Digest = digest.parse()?;
            let n = registry(s)
                .download_blob(&reference, &digest, None, &output, &|_| {})
                .await?;
            eprintln!(
                "{digest}: {n} bytes verified, written to {}",
                output.display()
            );
        }
        Command::Shutdown { force } => {
            if tokio::net::UnixStream::connect(&s.address).await.is_err() {
                eprintln!("the lazypull daemon is not running");
                return Ok(0);
            }
            let pid = daemon_client::daemon_pid(s).await;
            let r = call(s, &Request::Shutdown { force }, false).await?;
            if let Some(pid) = pid {
                daemon_client::wait_exit(pid, Duration::from_secs(30)).await;
            }
            eprintln!("{}", r.message.unwrap_or_default());
        }
    }
    Ok(0)
}

fn ago(secs: u64) -> String {
    let d = crate::daemon::store::now().saturating_sub(secs);
    match d {
        0..=59 => format!("{d} seconds ago"),
        60..=3599 => format!("{} minutes ago", d / 60),
        3600..=172_799 => format!("{} hours ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

fn print_containers(list: &[ContainerInfo], quiet: bool, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(list)?)?;
        return Ok(());
    }
    if quiet {
        for c in list {
            writeln!(out, "{}", &c.id[..12.min(c.id.len())])?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<14}{:<40}{:<24}{:<18}{:<16}NAMES",
        "CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS"
    )?;
    for c in list {
        let status = match (c.status.as_str(), c.exit_code) {
            ("exited", Some(code)) => format!("Exited ({code})"),
            ("exited", None) => "Exited".to_string(),
            ("running", _) => "Up".to_string(),
            (s, _) => {
                let mut s = s.to_string();
                if let Some(f) = s.get_mut(0..1) {
                    f.make_ascii_uppercase();
                }
                s
            }
        };
        let mut cmd: String = c.command.chars().take(21).collect();
        if c.command.chars().count() > 21 {
            cmd.push_str("...");
        }
        writeln!(
            out,
            "{:<14}{:<40}{:<24}{:<18}{:<16}{}",
            &c.id[..12.min(c.id.len())],
            c.image,
            format!("\"{cmd}\""),
            ago(c.created),
            status,
            c.name
        )?;
    }
    Ok(())
}

fn print_images(list: &[ImageInfo], quiet: bool, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(list)?)?;
        return Ok(());
    }
    if quiet {
        for i in list {
            writeln!(out, "{}", i.digest)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<48}{:<16}{:<15}{:<12}{:<8}CACHED",
        "REPOSITORY", "TAG", "DIGEST", "SIZE", "LAYERS"
    )?;
    for i in list {
        let (repo, tag) = match i.reference.rsplit_once('@') {
            Some((r, _)) => (r.to_string(), "<none>".to_string()),
            None => match i.reference.rsplit_once(':') {
                Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
                _ => (i.reference.clone(), "latest".to_string()),
            },
        };
        let digest: String = i
            .digest
            .strip_prefix("sha256:")
            .unwrap_or(&i.digest)
            .chars()
            .take(12)
            .collect();
        let cached = match &i.unavailable {
            Some(why) => format!("unavailable: {why}"),
            None if i.size == 0 => "100%".to_string(),
            None => format!("{}%", i.cached * 100 / i.size),
        };
        writeln!(
            out,
            "{repo:<48}{tag:<16}{digest:<15}{:<12}{:<8}{cached}",
            human_bytes(i.size),
            i.layers
        )?;
    }
    Ok(())
}

/// The access logs of the images' layers, merged in the order the files were first opened.
fn print_accessed(list: &[ImageStats]) -> Result<()> {
    let mut opened: Vec<&OpenedPath> = list
        .iter()
        .flat_map(|i| &i.layers)
        .flat_map(|l| &l.opened)
        .collect();
    opened.sort_by_key(|o| o.sequence);
    let mut seen = std::collections::HashSet::new();
    let mut out = std::io::stdout().lock();
    for o in opened {
        if seen.insert(o.path.as_str()) {
            writeln!(out, "{}", o.path)?;
        }
    }
    Ok(())
}

fn print_stats(list: &[ImageStats], json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(list)?)?;
        return Ok(());
    }
    for image in list {
        writeln!(out, "{} ({})", image.reference, image.digest)?;
        writeln!(
            out,
            "  {:<21}{:>10}{:>8}{:>11}{:>11}{:>11}{:>9}{:>12}",
            "LAYER", "SIZE", "CACHED", "ON-DEMAND", "PREFETCH", "BACKGROUND", "TOC", "FILL RATE"
        )?;
        for l in &image.layers {
            let short: String = l.digest.chars().take(19).collect();
            let served = if l.served == "local" {
                " (fetched whole)"
            } else {
                ""
            };
            writeln!(
                out,
                "  {short:<21}{:>10}{:>7.1}%{:>11}{:>11}{:>11}{:>9}{:>10}/s{served}",
                human_bytes(l.size),
                l.percent_cached,
                human_bytes(l.fetched_bytes.on_demand),
                human_bytes(l.fetched_bytes.prefetch),
                human_bytes(l.fetched_bytes.background),
                human_bytes(l.fetched_bytes.toc),
                human_bytes(l.fill_rate as u64),
            )?;
            for r in &l.slowest_reads {
                writeln!(
                    out,
                    "      waited {:>8.1} ms  {} @{} (+{})",
                    r.seconds * 1000.0,
                    r.path,
                    r.offset,
                    r.len
                )?;
            }
        }
    }
    Ok(())
}

async fn inspect(s: &Settings, image: &str, platform: Option<&str>) -> Result<()> {
    let reference: Reference = image.parse()?;
    let platform = match platform {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg)?,
        None => Platform::host(),
    };
    let registry = registry(s);
    let resolved = registry.resolve(&reference, &platform).await?;
    let manifest = resolved
        .image()
        .context("registry returned an index where an image manifest was expected")?;
    // The platform is the image's own (its config's), not the one asked for: a single-platform
    // image is returned whatever was asked.
    let config_digest: Digest = manifest.config().digest().to_string().parse()?;
    let config = registry
        .fetch_blob(&reference, &config_digest)
        .await
        .context("fetching the image config")?;
    let actual = serde_json::from_slice::<serde_json::Value>(&config)
        .ok()
        .and_then(|c| Platform::of_config(&c))
        .unwrap_or(platform);
    let layers: Vec<serde_json::Value> = manifest
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
        "platform": actual.to_string(),
        "config": manifest.config().digest().to_string(),
        "layers": layers,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Kernel facts `info` reports.
fn kernel_facts() -> serde_json::Value {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_fs = |name: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(name))
    };
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let (major, minor) = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    serde_json::json!({
        "kernel": release,
        "fuse_device": std::path::Path::new("/dev/fuse").exists(),
        "fuse": has_fs("fuse"),
        // FUSE passthrough (FOPEN_PASSTHROUGH) arrived in Linux 6.9.
        "fuse_passthrough": (major, minor) >= (6, 9),
        "overlay": has_fs("overlay"),
    })
}

async fn info(s: &Settings, json: bool) -> Result<()> {
    let rt = crate::runtime::Runtime::new(s);
    let daemon = match tokio::net::UnixStream::connect(&s.address).await {
        Ok(_) => Some(call(s, &Request::Info, false).await?.data),
        Err(_) => None,
    };
    let v = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "root": s.root,
        "address": s.address,
        "runtime": {
            "binary": rt.binary(),
            "path": rt.locate(),
            "version": rt.version(),
        },
        "host": kernel_facts(),
        "daemon": daemon,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let yes = |b: &serde_json::Value| {
        if b.as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    };
    let h = &v["host"];
    println!("lazypull {}", env!("CARGO_PKG_VERSION"));
    println!("root:              {}", s.root.display());
    println!("socket:            {}", s.address.display());
    println!(
        "runtime:           {} ({})",
        rt.binary(),
        rt.version().unwrap_or_else(|| "NOT FOUND".into())
    );
    println!("kernel:            {}", h["kernel"].as_str().unwrap_or("?"));
    println!(
        "FUSE:              {} (/dev/fuse {})",
        yes(&h["fuse"]),
        if h["fuse_device"].as_bool() == Some(true) {
            "present"
        } else {
            "MISSING"
        }
    );
    println!("FUSE passthrough:  {}", yes(&h["fuse_passthrough"]));
    println!("overlayfs:         {}", yes(&h["overlay"]));
    match &v["daemon"] {
        serde_json::Value::Null => println!("daemon:            not running"),
        d => {
            println!("daemon:            running (pid {})", d["pid"]);
            println!(
                "images:            {} ({} layers mounted, {} complete)",
                d["images"], d["layers_mounted"], d["layers_complete"]
            );
            println!("containers:        {}", d["containers"]);
            println!(
                "cache:             {} of {} ({} chunks)",
                human_bytes(d["cache_used_bytes"].as_u64().unwrap_or(0)),
                human_bytes(d["cache_budget_bytes"].as_u64().unwrap_or(0)),
                d["cache_entries"]
            );
        }
    }
    Ok(())
}

/// Fails with what to do when not root.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "lazypull needs root privileges (it mounts filesystems and runs containers): run it \
             with sudo"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_everything_after_the_image_as_the_command() {
        let cli = Cli::try_parse_from([
            "lazypull",
            "run",
            "--rm",
            "-e",
            "A=1",
            "img",
            "sh",
            "-c",
            "echo --rm -e",
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.image(), "img");
        assert_eq!(a.command(), ["sh", "-c", "echo --rm -e"]);
    }
}
