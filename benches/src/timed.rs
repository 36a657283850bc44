//! Timing a command the way a user perceives a container start: from invoking it to the first
//! line the container prints, and to its exit, with Ctrl-C stopping the benchmark cleanly.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Longest one container start may take before the benchmark gives up on it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How long output may still arrive after the process exited (a grandchild holding the pipe).
const DRAIN: Duration = Duration::from_secs(5);
/// Polling interval for the child's exit (and so the resolution of "time to exit").
const POLL: Duration = Duration::from_millis(2);

/// Set by the first Ctrl-C: the benchmark stops at the next check and cleans up.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Fails once Ctrl-C was pressed, so long loops stop at a clean point.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs a command to completion; its stderr becomes the error when it fails.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What [`run_timed`] saw: the moments a benchmark reports.
pub struct Timed {
    /// When the first stdout line arrived (from `start`).
    pub first_line: Option<Duration>,
    /// `bytes()` at the first line.
    pub bytes_first: u64,
    /// When the process exited (from `start`).
    pub exit: Duration,
    pub status: ExitStatus,
    pub stdout: String,
}

/// Spawns `cmd` with stdout piped (stderr to `stderr_path`), notes when its first stdout line
/// arrives and when it exits, both from `start`. Gives up after [`RUN_TIMEOUT`] or on Ctrl-C;
/// the process is killed in that case.
pub fn run_timed(
    mut cmd: Command,
    start: Instant,
    stderr_path: &Path,
    bytes: impl Fn() -> u64,
) -> Result<Timed> {
    let stderr =
        File::create(stderr_path).with_context(|| format!("creating {}", stderr_path.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = ChildGuard(cmd.spawn().with_context(|| format!("starting {program}"))?);
    let stdout = child.0.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send((Instant::now(), line)).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let deadline = start + RUN_TIMEOUT;
    let (mut first_line, mut bytes_first, mut out) = (None, 0, String::new());
    let mut eof = false;
    let mut exited: Option<(Duration, ExitStatus)> = None;
    loop {
        if eof {
            std::thread::sleep(POLL);
        } else {
            match rx.recv_timeout(POLL) {
                Ok((at, line)) => {
                    if first_line.is_none() {
                        first_line = Some(at.duration_since(start));
                        bytes_first = bytes();
                    }
                    out.push_str(&line);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => eof = true,
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
        if exited.is_none() {
            if let Some(status) = child.0.try_wait().context("waiting for the process")? {
                exited = Some((start.elapsed(), status));
            }
        }
        if let Some((at, status)) = exited {
            if eof || start.elapsed() > at + DRAIN {
                return Ok(Timed {
                    first_line,
                    bytes_first,
                    exit: at,
                    status,
                    stdout: out,
                });
            }
        }
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("{program} did not finish within {RUN_TIMEOUT:?}; its output so far: {out:?}");
        }
    }
}

/// Kills the child (by its PID, through `Child::kill`) if it still runs when dropped.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Peak resident set (`VmHWM`) of a process, in bytes.
pub fn vm_hwm(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Installs the Ctrl-C handler on `rt`: the first press sets [`INTERRUPTED`] (the benchmark
/// stops at its next check and cleans up), the second exits at once.
pub fn on_ctrl_c(rt: &tokio::runtime::Runtime, bench: &'static str) {
    rt.spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("\n{bench}: interrupted; cleaning up (Ctrl-C again to quit at once)");
        INTERRUPTED.store(true, Ordering::SeqCst);
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}
