//! Reaching the daemon: start it when it is not running, send requests, show progress.

use std::io::{BufRead, IsTerminal};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::api::{self, Reply, Request};
use crate::config::Settings;

/// What the daemon needs from the host, checked before starting it so the error says what to do.
pub fn preflight() -> Result<()> {
    super::require_root()?;
    if !std::path::Path::new("/dev/fuse").exists() {
        bail!(
            "/dev/fuse is missing: load the FUSE module (`modprobe fuse`), or in a container \
             pass the device (`--device /dev/fuse`)"
        );
    }
    Ok(())
}

/// Daemon-only flags given to this command (see [`crate::config::SettingsArgs::daemon_flags_given`]).
static DAEMON_FLAGS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();

/// Records the daemon-only flags this command was given, so [`ensure_daemon`] can say that a
/// daemon already running ignores them.
pub fn note_daemon_flags(given: Vec<&'static str>) {
    let _ = DAEMON_FLAGS.set(given);
}

/// Says that a running daemon keeps the settings it started with, when this command was given
/// daemon flags whose values differ from the daemon's.
async fn warn_ignored_flags(s: &Settings) {
    let Some(given) = DAEMON_FLAGS.get().filter(|g| !g.is_empty()) else {
        return;
    };
    let Ok(reply) = call(s, &Request::Info, false).await else {
        return;
    };
    let theirs: Vec<String> = reply.data["daemon_args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let ours = s.to_args();
    let value = |args: &[String], flag: &str| -> Option<String> {
        args.windows(2).find(|w| w[0] == flag).map(|w| w[1].clone())
    };
    let differ: Vec<&str> = given
        .iter()
        .copied()
        .filter(|f| value(&ours, f) != value(&theirs, f))
        .collect();
    if differ.is_empty() {
        return;
    }
    eprintln!(
        "lazypull: warning: the daemon on {} is already running, so {} change nothing: it keeps \
         the settings it started with (`lazypull shutdown`, then run the command again, to \
         start it with these)",
        s.address.display(),
        differ.join(", ")
    );
}

/// Starts the daemon for these settings unless one answers on the socket already.
pub async fn ensure_daemon(s: &Settings) -> Result<()> {
    if tokio::net::UnixStream::connect(&s.address).await.is_ok() {
        warn_ignored_flags(s).await;
        return Ok(());
    }
    preflight()?;
    std::fs::create_dir_all(&s.root).with_context(|| format!("creating {}", s.root.display()))?;
    // Commands started together (a `run` and a `ps`) must not both start a daemon: the
    // second would take over the socket. One starts it under this lock; the others wait and
    // then find it answering.
    let lock_path = s.root.join("daemon-start.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    let _lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e)
    })
    .await?
    .with_context(|| format!("locking {}", lock_path.display()))?;
    if tokio::net::UnixStream::connect(&s.address).await.is_ok() {
        return Ok(());
    }
    let log_path = s.log_path();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the lazypull executable")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(s.to_args());
    // Few malloc arenas: chunk buffers are allocated and freed on many threads, and glibc's
    // default of 8 arenas per core keeps hundreds of MiB of freed memory (measured with
    // fs-bench: 433 MiB after an import workload, 234 MiB with one arena).
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        cmd.env("MALLOC_ARENA_MAX", "2");
    }
    cmd.arg("serve")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: a Ctrl-C meant for the command that started it must not
        // stop the daemon.
        .process_group(0);
    let mut child = cmd.spawn().context("starting the lazypull daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let pid = child.id();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        line
    });
    let line = tokio::time::timeout(Duration::from_secs(60), line)
        .await
        .context("the lazypull daemon did not become ready within 60 s")??;
    if line.trim() != "READY" {
        let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
        let last: Vec<&str> = tail.lines().rev().take(5).collect();
        bail!(
            "the lazypull daemon failed to start: {}\n(full log: {})",
            last.into_iter().rev().collect::<Vec<_>>().join("\n"),
            log_path.display()
        );
    }
    // Reap it if it exits while this process still runs.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    eprintln!(
        "started the lazypull daemon (pid {pid}, log {})",
        log_path.display()
    );
    Ok(())
}

/// Sends a request; progress events go to stderr when `progress` is set and stderr is a
/// terminal or the events are few. A refusal becomes an error carrying the daemon's message.
pub async fn call(s: &Settings, req: &Request, progress: bool) -> Result<Reply> {
    let tty = std::io::stderr().is_terminal();
    let mut on_event = |e: &str| {
        if progress {
            if tty {
                eprint!("\r\x1b[K{e}");
            } else {
                eprintln!("{e}");
            }
        }
    };
    let reply = api::request(&s.address, req, &mut on_event).await?;
    if progress && tty {
        eprint!("\r\x1b[K");
    }
    if !reply.ok {
        bail!(
            "{}",
            reply
                .error
                .unwrap_or_else(|| "the daemon refused without saying why".into())
        );
    }
    Ok(reply)
}

/// The daemon's PID, if it answers.
pub async fn daemon_pid(s: &Settings) -> Option<u32> {
    let r = call(s, &Request::Ping, false).await.ok()?;
    r.data.get("pid")?.as_u64().map(|p| p as u32)
}

/// Waits until `pid` is gone (or `timeout`).
pub async fn wait_exit(pid: u32, timeout: Duration) {
    let start = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < timeout {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // A zombie has exited; its parent reaps it.
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
