//! `TestContainerd`: a real `containerd` daemon (Debian's 1.6) for one test, driven with
//! `ctr-remote` (stargz-snapshotter's `ctr`, which adds `images convert --estargz`).
//!
//! Each daemon gets a temp dir holding `config.toml`, its `root` and `state` directories, the
//! gRPC socket and `containerd.log` (stdout and stderr of the process). Plugins that need things
//! a test machine lacks (CRI, btrfs, zfs, devmapper, aufs, tracing) are disabled. The process is
//! started with `setpriv --pdeathsig KILL` from a long-lived spawner thread when `setpriv` exists,
//! so even a test binary that is killed outright leaves no daemon behind; on drop it is stopped
//! by PID (SIGTERM, then SIGKILL), anything still mounted under its directories is unmounted and
//! the temp dir is removed (also while a test unwinds from a panic).

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::util::{find_in_path, spawn_from_spawner_thread};

/// How long [`TestContainerd::start`] waits until `ctr version` answers.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long drop waits after SIGTERM before sending SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// The containerd namespace [`TestContainerd::ctr_remote`] works in.
pub const NAMESPACE: &str = "lazypull-test";
/// Longest path a unix socket address may have (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

const INSTALL_HINT: &str = "install them with `apt-get install -y containerd stargz-snapshotter` \
                            (the CI script .ci/run does)";

/// A running `containerd` with its own config, root, state and socket in a temp dir.
pub struct TestContainerd {
    dir: Option<TempDir>,
    child: Option<Child>,
    pid: u32,
    /// Extra config appended to `config.toml` (proxy plugins).
    extra_config: String,
}

impl std::fmt::Debug for TestContainerd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContainerd")
            .field("pid", &self.pid)
            .field("socket", &self.socket())
            .finish()
    }
}

/// `name` on `PATH` or in `/usr/bin`; panics with how to install it otherwise.
fn binary(name: &str, package: &str) -> PathBuf {
    find_in_path(name)
        .or_else(|| {
            let p = Path::new("/usr/bin").join(name);
            p.is_file().then_some(p)
        })
        .unwrap_or_else(|| {
            panic!(
                "`{name}` (Debian package {package}) not found: the containerd interop tests need \
                 containerd and ctr-remote; {INSTALL_HINT}"
            )
        })
}

/// Mount points listed in `/proc/self/mountinfo` (field 5, octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(unescape_mountinfo(mp)))
        .collect()
}

/// Decodes the `\NNN` octal escapes mountinfo uses for space, tab, newline and backslash.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TestContainerd {
    /// Writes a config into a new temp dir, starts `containerd --config` on it and waits (20 s at
    /// most) until `ctr --address SOCK version` succeeds. Panics with the log tail if it does
    /// not, and with an install hint if `containerd`, `ctr` or `ctr-remote` is missing.
    pub fn start() -> TestContainerd {
        Self::start_with_config("")
    }

    /// [`TestContainerd::start`] with a snapshotter proxy plugin: `[proxy_plugins.NAME]` of
    /// type `snapshot` at `socket` (the process serving it may start before or after).
    pub fn start_with_proxy_snapshotter(name: &str, socket: &Path) -> TestContainerd {
        Self::start_with_config(&format!(
            "\n[proxy_plugins]\n  [proxy_plugins.{name}]\n    type = \"snapshot\"\n    \
             address = \"{}\"\n",
            socket.display()
        ))
    }

    fn start_with_config(extra_config: &str) -> TestContainerd {
        let containerd = binary("containerd", "containerd");
        let ctr = binary("ctr", "containerd");
        binary("ctr-remote", "stargz-snapshotter");
        let dir = tempfile::Builder::new()
            .prefix("lazypull-containerd-")
            .tempdir()
            .expect("create containerd temp dir");
        let mut this = TestContainerd {
            dir: Some(dir),
            child: None,
            pid: 0,
            extra_config: extra_config.to_string(),
        };
        let socket = this.socket();
        assert!(
            socket.as_os_str().len() + ".ttrpc".len() <= MAX_SOCKET_PATH,
            "containerd socket path {} is too long for a unix socket; set TMPDIR to a shorter \
             directory",
            socket.display()
        );
        this.write_config();

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(this.log())
            .expect("open containerd log");
        let mut cmd = match find_in_path("setpriv") {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.arg("--pdeathsig").arg("KILL").arg(&containerd);
                c
            }
            None => Command::new(&containerd),
        };
        cmd.arg("--config")
            .arg(this.config_path())
            .current_dir(this.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file handle"))
            .stderr(log)
            .env_remove("CONTAINERD_ADDRESS")
            .env_remove("CONTAINERD_NAMESPACE");
        let child = spawn_from_spawner_thread(cmd)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", containerd.display()));
        this.pid = child.id();
        this.child = Some(child);
        this.wait_ready(&ctr);
        this
    }

    fn dir(&self) -> &Path {
        self.dir.as_ref().expect("temp dir lives until drop").path()
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("config.toml")
    }

    fn root(&self) -> PathBuf {
        self.dir().join("root")
    }

    fn state(&self) -> PathBuf {
        self.dir().join("state")
    }

    fn write_config(&self) {
        let dir = self.dir();
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\n  \
               \"io.containerd.grpc.v1.cri\",\n  \
               \"io.containerd.snapshotter.v1.btrfs\",\n  \
               \"io.containerd.snapshotter.v1.zfs\",\n  \
               \"io.containerd.snapshotter.v1.devmapper\",\n  \
               \"io.containerd.snapshotter.v1.aufs\",\n  \
               \"io.containerd.tracing.processor.v1.otlp\",\n  \
               \"io.containerd.internal.v1.tracing\",\n\
             ]\n\
             \n\
             [grpc]\n  address = \"{socket}\"\n\
             \n\
             [debug]\n  level = \"info\"\n\
             \n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = self.root().display(),
            state = self.state().display(),
            socket = self.socket().display(),
            opt = dir.join("opt").display(),
        );
        let config = config + &self.extra_config;
        std::fs::write(self.config_path(), config).expect("write containerd config.toml");
    }

    fn wait_ready(&mut self, ctr: &Path) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.socket().exists() {
                let ok = Command::new(ctr)
                    .arg("--address")
                    .arg(self.socket())
                    .args(["--connect-timeout", "2s", "--timeout", "5s", "version"])
                    .stdin(Stdio::null())
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if ok {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "containerd exited during start-up ({status}); log tail:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if Instant::now() > deadline {
                let tail = self.log_tail(40);
                self.stop();
                panic!(
                    "containerd at {} not ready after {READY_TIMEOUT:?}; log tail:\n{tail}",
                    self.socket().display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gRPC socket (`grpc.address`).
    pub fn socket(&self) -> PathBuf {
        self.dir().join("containerd.sock")
    }

    /// Path of the log file (stdout and stderr of the daemon).
    pub fn log(&self) -> PathBuf {
        self.dir().join("containerd.log")
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read(self.log())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// PID of the daemon.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Runs `ctr-remote --address SOCK --namespace lazypull-test ARGS` and returns its output
    /// (whatever the exit status; check it).
    pub fn ctr_remote(&self, args: &[&str]) -> Output {
        let bin = binary("ctr-remote", "stargz-snapshotter");
        Command::new(&bin)
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
    }

    /// `ctr --address SOCK --namespace lazypull-test ARGS`, not started: for callers that
    /// time it or read its output as it comes.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary("ctr", "containerd"));
        c.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args);
        c
    }

    /// Runs `ctr --address SOCK --namespace lazypull-test ARGS` (containerd's own client) and
    /// returns its output (whatever the exit status; check it).
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run ctr: {e}"))
    }

    /// The daemon's root directory (`root` in its config).
    pub fn root_dir(&self) -> PathBuf {
        self.root()
    }

    /// SIGTERM, up to [`STOP_TIMEOUT`] for the daemon to exit, then SIGKILL; reaps it.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Lazily unmounts everything mounted under the temp dir, deepest first.
    fn unmount_leftovers(&self) {
        let dir = self.dir().to_path_buf();
        let mut under: Vec<PathBuf> = mount_points()
            .into_iter()
            .filter(|mp| mp.starts_with(&dir))
            .collect();
        under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        under.dedup();
        for mp in under {
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for TestContainerd {
    fn drop(&mut self) {
        self.stop();
        if self.dir.is_some() {
            self.unmount_leftovers();
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if dir.close().is_err() {
                // Best effort: something may still be busy; try once more after a moment.
                std::thread::sleep(Duration::from_millis(200));
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }
}
