//! `lazypull run`: the daemon prepares the container (image pulled lazily, writable overlay
//! root, bundle directory); this process writes the OCI runtime config and supervises the
//! runtime, so stdio, the terminal, signals and the exit code pass straight through. A detached
//! container (`-d`) gets the same supervisor as a background process writing its log.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use super::{call, ensure_daemon, require_root};
use crate::api::{Created, Request};
use crate::config::Settings;
use crate::program::{self, ProgramError};
use crate::runtime::Runtime;
use crate::spec::{self, NetMode, RunOptions};

/// Network mode of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Net {
    /// Share the host's network namespace.
    Host,
    /// A new network namespace with only a loopback interface.
    None,
}

/// `lazypull run` flags, as docker/podman/nerdctl spell them.
#[derive(Debug, clap::Args)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Remove the container (its writable layer and record) when it exits.
    #[arg(long)]
    rm: bool,
    /// Run in the background and print the container ID; output goes to `lazypull logs`.
    #[arg(short, long)]
    detach: bool,
    /// Keep stdin open and pass it to the container.
    #[arg(short, long)]
    interactive: bool,
    /// Give the container a terminal (use with -i for an interactive shell).
    #[arg(short, long)]
    tty: bool,
    /// Container name (default: the first 12 digits of its ID).
    #[arg(long)]
    name: Option<String>,
    /// Set an environment variable (K=V), or pass K from this environment (repeatable).
    #[arg(short, long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Read environment variables from a file of K=V lines (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Bind-mount a host directory or file: SRC:DST[:ro|rw] (repeatable).
    #[arg(short, long = "volume", value_name = "SRC:DST[:ro]")]
    volume: Vec<String>,
    /// Working directory inside the container.
    #[arg(short, long, value_name = "DIR")]
    workdir: Option<String>,
    /// User to run as: NAME|UID[:GROUP|GID].
    #[arg(short, long)]
    user: Option<String>,
    /// Network: `host` shares the host's, `none` gives only loopback.
    #[arg(long, alias = "network", value_enum, default_value = "host")]
    net: Net,
    /// Override the image's entrypoint ("" clears it).
    #[arg(long)]
    entrypoint: Option<String>,
    /// Mount the container's root filesystem read-only.
    #[arg(long)]
    read_only: bool,
    /// Container hostname (default: the container name).
    #[arg(long, short = 'H')]
    hostname: Option<String>,
    /// Platform to select from a multi-platform image (OS/ARCH[/VARIANT]); default: this host.
    #[arg(long)]
    platform: Option<String>,
    /// Seconds to wait after forwarding Ctrl-C/SIGTERM before killing the container.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    stop_timeout: u64,
    /// Image reference.
    image: String,
    /// Command and arguments (default: the image's entrypoint and cmd).
    #[arg(allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Runs the container; returns its exit code.
pub async fn run(s: &Settings, a: RunArgs) -> Result<u8> {
    require_root()?;
    let rt = Runtime::new(s);
    if rt.locate().is_none() {
        bail!(
            "OCI runtime {:?} not found: install runc (`apt-get install runc`), or name another \
             with --runtime or `runtime` in /etc/lazypull/config.toml",
            rt.binary()
        );
    }
    if a.detach && a.tty {
        bail!("-t with -d is not supported yet: run detached without -t, or in the foreground with -it");
    }
    if a.tty && !std::io::stdin().is_terminal() {
        bail!("-t needs a terminal on standard input, and this one is not: run it from a terminal, or drop -t (keep -i to pass input through)");
    }
    ensure_daemon(s).await?;
    let shown = if a.command.is_empty() {
        String::new()
    } else {
        a.command.join(" ")
    };
    let created: Created = call(
        s,
        &Request::Create {
            image: a.image.clone(),
            platform: a.platform.clone(),
            name: a.name.clone(),
            rm: a.rm,
            command: shown,
        },
        true,
    )
    .await?
    .decode()?;
    let spec = match write_spec(&created, &a) {
        Ok(spec) => spec,
        Err(e) => {
            let _ = call(
                s,
                &Request::Remove {
                    container: created.id.clone(),
                    force: true,
                },
                false,
            )
            .await;
            return Err(e);
        }
    };
    if let Err(e) = check_program(&created, &spec) {
        // The container stays, exited with podman's code, unless `--rm` asked otherwise.
        eprintln!("lazypull: {e}");
        return finish(s, &created.id, a.rm, Ok(i32::from(e.exit_code()))).await;
    }
    if a.detach {
        let exe = std::env::current_exe().context("finding the lazypull executable")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(s.to_args())
            .arg("container-shim")
            .arg(&created.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if a.rm {
            cmd.arg("--rm");
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut shim = cmd.spawn().context("starting the container supervisor")?;
        // Return once the container runs (as `podman run -d` does), so the next command sees
        // it running; a container that ends at once has ended by then.
        let end = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < end && shim.try_wait()?.is_none() {
            if matches!(rt.state(&created.id).as_deref(), Some("running" | "paused")) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("{}", created.id);
        return Ok(0);
    }
    let code = supervise(
        s,
        &created.id,
        &created.bundle,
        a.interactive || a.tty,
        None,
        a.stop_timeout,
    )
    .await;
    finish(s, &created.id, a.rm, code).await
}

fn write_spec(created: &Created, a: &RunArgs) -> Result<oci_spec::runtime::Spec> {
    let image: oci_spec::image::ImageConfiguration =
        serde_json::from_value(created.image_config.clone())
            .context("the image's config cannot be read as an OCI image configuration")?;
    let opts = RunOptions {
        command: a.command.clone(),
        entrypoint: a.entrypoint.clone(),
        env: a.env.clone(),
        env_files: a.env_file.clone(),
        volumes: a.volume.clone(),
        workdir: a.workdir.clone(),
        user: a.user.clone(),
        net: match a.net {
            Net::Host => NetMode::Host,
            Net::None => NetMode::None,
        },
        read_only: a.read_only,
        tty: a.tty,
        hostname: a.hostname.clone().unwrap_or_else(|| created.name.clone()),
    };
    let spec = spec::build_spec(&image, &opts, &created.bundle.join("rootfs"))?;
    spec::write_config(&created.bundle, &spec)?;
    Ok(spec)
}

/// Looks the container's program up in its root, as podman does before it starts anything.
fn check_program(created: &Created, spec: &oci_spec::runtime::Spec) -> Result<(), ProgramError> {
    let Some(process) = spec.process() else {
        return Ok(());
    };
    let Some(program) = process.args().as_ref().and_then(|a| a.first()) else {
        return Ok(());
    };
    let path = process
        .env()
        .as_ref()
        .and_then(|env| env.iter().rev().find_map(|kv| kv.strip_prefix("PATH=")));
    let cwd = process.cwd().to_string_lossy();
    program::check(&created.bundle.join("rootfs"), program, &cwd, path)
}

/// Tells the daemon how the container ended and removes it when asked; returns the exit code.
async fn finish(s: &Settings, id: &str, rm: bool, code: Result<i32>) -> Result<u8> {
    let code = match code {
        Ok(c) => c,
        Err(e) => {
            let _ = call(
                s,
                &Request::Exited {
                    id: id.to_string(),
                    code: 125,
                },
                false,
            )
            .await;
            if rm {
                let _ = call(
                    s,
                    &Request::Remove {
                        container: id.to_string(),
                        force: true,
                    },
                    false,
                )
                .await;
            }
            return Err(e);
        }
    };
    call(
        s,
        &Request::Exited {
            id: id.to_string(),
            code,
        },
        false,
    )
    .await?;
    if rm {
        call(
            s,
            &Request::Remove {
                container: id.to_string(),
                force: true,
            },
            false,
        )
        .await?;
    }
    Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255))
}

/// The detached form of [`supervise`], started by `run -d`.
pub async fn shim(s: &Settings, id: &str, rm: bool) -> Result<u8> {
    let bundle = s.root.join("containers").join(id);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bundle.join("container.log"))
        .context("opening the container log")?;
    let code = supervise(s, id, &bundle, false, Some(log), 10).await;
    finish(s, id, rm, code).await
}

fn signal_name(kind: i32) -> &'static str {
    match kind {
        libc::SIGINT => "INT",
        libc::SIGTERM => "TERM",
        libc::SIGHUP => "HUP",
        libc::SIGQUIT => "QUIT",
        _ => "KILL",
    }
}

/// Waits (up to 5 s) until the runtime has started the container's process. Until then the
/// container's init is the runtime's own helper (`runc init`, a Go program), which a forwarded
/// SIGINT or SIGTERM kills with status 2 in the middle of the start, instead of reaching the
/// container's program.
fn wait_started(rt: &Runtime, id: &str) {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        match rt.state(id).as_deref() {
            Some("running" | "paused" | "stopped") => return,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Waits until the runtime runs the container's program (`true`), or the runtime ends first
/// (`false`: the program never ran, or ran and ended at once). Bounded: after a minute the
/// container counts as started whatever the runtime says.
async fn wait_running(rt: &Runtime, id: &str, runtime: &mut tokio::process::Child) -> Result<bool> {
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if runtime.try_wait()?.is_some() {
            return Ok(false);
        }
        let (rt2, id2) = (rt.clone(), id.to_string());
        let state = tokio::task::spawn_blocking(move || rt2.state(&id2)).await?;
        if matches!(state.as_deref(), Some("running" | "paused" | "stopped"))
            || tokio::time::Instant::now() >= end
        {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `runc run` and waits for it, forwarding SIGINT/SIGTERM/SIGHUP/SIGQUIT to the
/// container (a second one, or `stop_timeout` seconds without exit, kills it). Returns the
/// container's exit code (128+N when killed by signal N).
async fn supervise(
    s: &Settings,
    id: &str,
    bundle: &Path,
    stdin: bool,
    log: Option<std::fs::File>,
    stop_timeout: u64,
) -> Result<i32> {
    let rt = Runtime::new(s);
    let mut cmd: tokio::process::Command = rt.command().into();
    cmd.arg("run").arg("--bundle").arg(bundle).arg(id);
    cmd.stdin(if stdin {
        Stdio::inherit()
    } else {
        Stdio::null()
    });
    if let Some(log) = log {
        cmd.stdout(log.try_clone()?).stderr(log);
    }
    let mut sigs = Vec::new();
    for k in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        sigs.push((k, signal(SignalKind::from_raw(k))?));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", rt.binary()))?;
    // The start is reported once the runtime runs the program: until then `ps` says `created`.
    if wait_running(&rt, id, &mut child).await? {
        let reported = call(
            s,
            &Request::Started {
                id: id.to_string(),
                pid: std::process::id(),
            },
            false,
        )
        .await;
        if let Err(e) = reported {
            // The daemon no longer knows the container (removed while it started): stop it
            // rather than leave a process that no command can see or stop.
            let (rt, id2) = (rt.clone(), id.to_string());
            let _ = tokio::task::spawn_blocking(move || rt.kill(&id2, "KILL")).await;
            let _ = child.wait().await;
            return Err(e.context("the container was removed while it started, so it was stopped"));
        }
    }
    let mut deadline: Option<tokio::time::Instant> = None;
    let status = loop {
        let next_signal = async {
            let futs = sigs.iter_mut().map(|(k, s)| {
                let k = *k;
                Box::pin(async move {
                    s.recv().await;
                    k
                })
            });
            futures::future::select_all(futs).await.0
        };
        let kill_at = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            st = child.wait() => break st?,
            sig = next_signal => {
                let name = if deadline.is_some() { "KILL" } else { signal_name(sig) };
                tracing::info!(container = id, signal = name, "forwarding signal");
                let rt = rt.clone();
                let id2 = id.to_string();
                let _ = tokio::task::spawn_blocking(move || {
                    wait_started(&rt, &id2);
                    rt.kill(&id2, name)
                })
                .await;
                deadline.get_or_insert(tokio::time::Instant::now() + Duration::from_secs(stop_timeout));
            }
            _ = kill_at => {
                let rt = rt.clone();
                let id2 = id.to_string();
                let _ = tokio::task::spawn_blocking(move || rt.kill(&id2, "KILL")).await;
                deadline = Some(tokio::time::Instant::now() + Duration::from_secs(3600));
            }
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 125,
    })
}

#[cfg(test)]
impl RunArgs {
    pub(crate) fn image(&self) -> &str {
        &self.image
    }

    pub(crate) fn command(&self) -> &[String] {
        &self.command
    }
}
