//! A driver for the `lazypull` binary under a private `--root` and socket, shared by the
//! binary's integration tests and the benchmarks. It cleans up after itself on drop, also
//! when a test fails: containers removed, daemon stopped (killed if it will not stop), and
//! whatever is still mounted under the root detached.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary with its own root, socket and daemon.
pub struct Lazypull {
    /// State directory (`--root`).
    pub root: tempfile::TempDir,
    bin: PathBuf,
    extra: Vec<String>,
    mounted: Vec<PathBuf>,
}

impl Lazypull {
    /// `bin` with these extra global flags.
    pub fn new(bin: impl AsRef<Path>, extra: &[&str]) -> Lazypull {
        Lazypull {
            root: tempfile::tempdir().expect("tempdir"),
            bin: bin.as_ref().to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            mounted: Vec::new(),
        }
    }

    /// The daemon socket.
    pub fn socket(&self) -> PathBuf {
        self.root.path().join("lazypull.sock")
    }

    /// The daemon's containerd snapshotter socket (for `[proxy_plugins]`).
    pub fn snapshotter_socket(&self) -> PathBuf {
        self.root.path().join("snapshotter.sock")
    }

    /// A command with this instance's global flags, ready for arguments.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--config")
            .arg("/dev/null")
            .arg("--root")
            .arg(self.root.path())
            .arg("--address")
            .arg(self.socket())
            .arg("--hosts-dir")
            .arg(self.root.path().join("no-hosts"))
            // Each instance serves its containerd snapshotter on its own socket.
            .arg("--snapshotter-socket")
            .arg(self.snapshotter_socket())
            .args(&self.extra)
            .env("RUST_LOG", "info");
        c
    }

    /// Runs `lazypull ARGS` to completion (stdin closed).
    pub fn cmd(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running lazypull")
    }

    /// `cmd`, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "lazypull {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `lazypull mount IMAGE DIR`, asserting success.
    pub fn mount(&mut self, image: &str, dir: &Path) {
        self.ok(&["mount", image, &dir.display().to_string()]);
        self.mounted.push(dir.to_path_buf());
    }

    /// `lazypull umount DIR`, asserting success.
    pub fn umount(&mut self, dir: &Path) {
        self.ok(&["umount", &dir.display().to_string()]);
        self.mounted.retain(|d| d != dir);
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("lazypull.log")).unwrap_or_default()
    }

    /// Waits until every image mount reports its layers complete.
    pub fn wait_complete(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            let out = self.cmd(&["mounts"]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.contains("\tcomplete") && !text.contains("\tlazy") {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "layers not complete after {timeout:?}: {text}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the daemon answers on its socket.
    pub fn daemon_running(&self) -> bool {
        std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
    }

    /// PID of this root's daemon, from `/proc/*/cmdline`.
    pub fn daemon_pid(&self) -> Option<u32> {
        let root = self.root.path().to_string_lossy().into_owned();
        self.find_process(|args| args.contains(&&b"serve"[..]) && args.contains(&root.as_bytes()))
    }

    /// PID of this root's FUSE keeper (`lazypull fuse-keeper --socket <root>/...`).
    pub fn keeper_pid(&self) -> Option<u32> {
        let socket = self.root.path().join("fuse-keeper.sock");
        let socket = socket.to_string_lossy().into_owned();
        self.find_process(|args| {
            args.contains(&&b"fuse-keeper"[..]) && args.contains(&socket.as_bytes())
        })
    }

    fn find_process(&self, matches: impl Fn(&[&[u8]]) -> bool) -> Option<u32> {
        crate::util::processes()
            .into_iter()
            .find(|p| !p.zombie && matches(&p.args()))
            .map(|p| p.pid)
    }

    /// The daemon's `(VmRSS, RssAnon)` in bytes (zeros when it is not running).
    pub fn daemon_memory(&self) -> (u64, u64) {
        let status = self
            .daemon_pid()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024)
        };
        (field("VmRSS:"), field("RssAnon:"))
    }

    /// Waits (up to `timeout`) until the daemon process has exited, not just closed its
    /// socket: it may still finish background work (and write into the root) for a moment.
    pub fn wait_daemon_exit(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.daemon_pid().is_some() {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Kills the daemon with SIGKILL (a crash) and waits until it is gone and its socket
    /// refuses connections, so the next command starts a new one. Its FUSE keeper stays.
    pub fn kill_daemon(&self) {
        let pid = self.daemon_pid().expect("no lazypull daemon to kill");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9 the daemon");
        assert!(
            self.wait_daemon_exit(Duration::from_secs(10)),
            "the killed daemon did not exit"
        );
        // Its cmdline goes before its sockets close: wait until the socket refuses.
        let start = Instant::now();
        while self.daemon_running() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the killed daemon's socket still answers"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `lazypull shutdown --force` and wait for the process to go.
    pub fn shutdown(&self) -> bool {
        let _ = self.cmd(&["shutdown", "--force"]);
        self.wait_daemon_exit(Duration::from_secs(20))
    }

    /// Mount points at or below the root.
    pub fn mounts_under_root(&self) -> Vec<String> {
        let root = self.root.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|mp| mp.starts_with(&root))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Lazypull {
    fn drop(&mut self) {
        if self.daemon_running() {
            let ids = self.cmd(&["ps", "-a", "-q"]);
            for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
                let _ = self.cmd(&["rm", "-f", id]);
            }
            for d in self.mounted.clone() {
                let _ = self.cmd(&["umount", &d.display().to_string()]);
            }
            if !self.shutdown() {
                if let Some(pid) = self.daemon_pid() {
                    eprintln!("lazypull daemon {pid} did not stop; killing it");
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                    self.wait_daemon_exit(Duration::from_secs(5));
                }
            }
        } else if let Some(pid) = self.daemon_pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            self.wait_daemon_exit(Duration::from_secs(5));
        }
        // The keeper of a killed daemon holds its FUSE connections: let them go, so the
        // mounts below fail fast instead of waiting for a daemon.
        if let Some(pid) = self.keeper_pid() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            let start = Instant::now();
            while self.keeper_pid().is_some() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Containers the daemon could not remove (it was killed in the test) go too.
        let runc_root = self.root.path().join("runc");
        if runc_root.is_dir() {
            if let Ok(out) = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["list", "-q"])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("runc")
                        .arg("--root")
                        .arg(&runc_root)
                        .args(["delete", "--force", id])
                        .status();
                }
            }
        }
        let mut left = self.mounts_under_root();
        left.extend(
            self.mounted
                .iter()
                .map(|d| d.display().to_string())
                .filter(|d| {
                    std::fs::read_to_string("/proc/self/mountinfo")
                        .unwrap_or_default()
                        .lines()
                        .any(|l| l.split_whitespace().nth(4) == Some(d))
                }),
        );
        left.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for mp in left {
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
        }
    }
}
