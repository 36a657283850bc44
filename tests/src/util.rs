//! Small helpers: free ports, deterministic random data, gzip.

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{mpsc, Mutex, OnceLock};

use rand::{RngCore, SeedableRng};

/// Returns a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, close).
///
/// Another process could take it before the caller binds it; on a test machine that is rare.
/// Servers of this crate that can bind themselves (proxy, token issuer) do so instead.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// `len` pseudo-random bytes, the same for the same `seed` (ChaCha-based `StdRng`). Fast enough
/// for blobs of hundreds of MiB; incompressible, so gzip does not shrink it.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    data
}

/// Gzip-compresses `data` (one gzip member, default level).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip into memory");
    enc.finish().expect("finish gzip into memory")
}

/// Tells whether `pid` names a live (not zombie) process, from `/proc/<pid>/stat`.
pub fn pid_alive(pid: u32) -> bool {
    stat_after_name(pid).is_some_and(|rest| !rest.trim_start().starts_with('Z'))
}

/// What follows the parenthesised command name in `/proc/<pid>/stat` ("123 (name) S 1 ..."):
/// the state, then the parent's PID.
fn stat_after_name(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat.rsplit_once(')')?.1.to_string())
}

/// A process as `/proc` shows it, for harnesses that find or clean up what tools started.
pub struct Proc {
    /// Its PID.
    pub pid: u32,
    /// Its parent's PID.
    pub ppid: u32,
    /// Exited but not reaped.
    pub zombie: bool,
    /// `/proc/<pid>/cmdline`: the arguments, NUL-separated.
    pub cmdline: Vec<u8>,
}

impl Proc {
    /// The command line split into its arguments.
    pub fn args(&self) -> Vec<&[u8]> {
        self.cmdline.split(|b| *b == 0).collect()
    }
}

/// Every process that could be read from `/proc` now.
pub fn processes() -> Vec<Proc> {
    let pids = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok());
    pids.filter_map(|pid| {
        let rest = stat_after_name(pid)?;
        let mut fields = rest.split_whitespace();
        let zombie = fields.next()? == "Z";
        let ppid = fields.next()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        Some(Proc {
            pid,
            ppid,
            zombie,
            cmdline,
        })
    })
    .collect()
}

/// SIGKILLs every process whose command line contains `needle`, and all their descendants:
/// the last resort of a harness whose tool (podman's conmon, a shim) left a process behind.
/// Returns how many it killed.
pub fn kill_trees_mentioning(needle: &str) -> usize {
    let me = std::process::id();
    let procs = processes();
    let mut doomed: Vec<u32> = procs
        .iter()
        .filter(|p| p.pid != me && String::from_utf8_lossy(&p.cmdline).contains(needle))
        .map(|p| p.pid)
        .collect();
    let mut i = 0;
    while i < doomed.len() {
        let p = doomed[i];
        for c in &procs {
            if c.ppid == p && c.pid != me && !doomed.contains(&c.pid) {
                doomed.push(c.pid);
            }
        }
        i += 1;
    }
    for &pid in &doomed {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    doomed.len()
}

/// `name` found in a directory of `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the process: `PR_SET_PDEATHSIG` fires when
/// the *thread* that forked the child exits, so forking from short-lived test or blocking-pool
/// threads would kill registries early.
pub fn spawn_from_spawner_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("lazypull-test-spawner".to_string())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawn the process-spawner thread");
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx))
        .expect("spawner thread is alive");
    reply_rx.recv().expect("spawner thread answers")
}

/// A command left running in the background to show that it waits (for a FUSE server that is
/// being restarted, say) rather than failing.
pub struct Waiting {
    what: String,
    thread: Option<std::thread::JoinHandle<std::process::Output>>,
}

impl Waiting {
    /// Starts `cmd` (stdin closed, output captured); `what` names it in failures.
    pub fn spawn(mut cmd: Command, what: &str) -> Waiting {
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        Waiting {
            what: what.to_string(),
            thread: Some(std::thread::spawn(move || {
                child.wait_with_output().expect("waiting for the command")
            })),
        }
    }

    /// Panics (with the command's output) if it has finished within `d`.
    pub fn assert_waits(&mut self, d: std::time::Duration) {
        std::thread::sleep(d);
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let out = self.thread.take().and_then(|t| t.join().ok());
            let out = out.map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            });
            panic!("{} did not wait: {out:?}", self.what);
        }
    }

    /// Its output, once it finishes; panics after `timeout`, `context()` in the message.
    pub fn finish(
        mut self,
        timeout: std::time::Duration,
        context: impl Fn() -> String,
    ) -> std::process::Output {
        let t = self.thread.take().expect("already finished");
        let start = std::time::Instant::now();
        while !t.is_finished() {
            assert!(
                start.elapsed() < timeout,
                "{} still waiting after {timeout:?}:\n{}",
                self.what,
                context()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        t.join().expect("waiting thread")
    }
}
