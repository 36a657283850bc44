//! `TestRegistry`: a real `docker-registry` (CNCF distribution 2.8) process for one test.
//!
//! Each registry gets a free 127.0.0.1 port, a temp dir holding `config.yml`, its storage and
//! `registry.log` (stdout and stderr of the process), and is killed by PID on drop (also while a
//! test unwinds from a panic). Processes are started with `setpriv --pdeathsig KILL` from a
//! long-lived spawner thread when `setpriv` exists, so even a test binary that is killed outright
//! leaves no registry behind.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lazypull_fetcher::Digest;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::RngCore;
use tempfile::TempDir;

use crate::push::{PushAuth, Pusher};
use crate::token::TokenIssuer;
use crate::util::{find_in_path, free_port, spawn_from_spawner_thread};

/// How long [`TestRegistry::start`] and [`TestRegistry::restart`] wait for `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Authentication of a [`TestRegistry`].
#[derive(Debug, Clone, Default)]
pub enum RegistryAuth {
    /// Open registry.
    #[default]
    None,
    /// `auth.htpasswd` with one bcrypt user.
    Htpasswd {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
    /// `auth.token` trusting this issuer (realm, service, issuer and certificate are taken from
    /// it). The registry keeps the issuer alive.
    Token(TokenIssuer),
}

impl RegistryAuth {
    /// `RegistryAuth::Htpasswd` from string slices.
    pub fn htpasswd(user: &str, password: &str) -> RegistryAuth {
        RegistryAuth::Htpasswd {
            user: user.to_string(),
            password: password.to_string(),
        }
    }
}

/// A running `docker-registry` process with its own config and storage.
pub struct TestRegistry {
    dir: TempDir,
    port: u16,
    auth: RegistryAuth,
    child: Option<Child>,
    pid: u32,
    paused: bool,
}

impl std::fmt::Debug for TestRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestRegistry")
            .field("url", &self.url())
            .field("pid", &self.pid)
            .field("dir", &self.dir.path())
            .finish()
    }
}

/// The registry binary: `$LAZYPULL_REGISTRY_BIN`, `docker-registry` on `PATH`, or
/// `/usr/bin/docker-registry`.
fn registry_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("LAZYPULL_REGISTRY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "LAZYPULL_REGISTRY_BIN={} is not a file",
            bin.display()
        );
        return bin;
    }
    find_in_path("docker-registry")
        .or_else(|| {
            let p = PathBuf::from("/usr/bin/docker-registry");
            p.is_file().then_some(p)
        })
        .unwrap_or_else(|| panic!("docker-registry not found: apt-get install docker-registry"))
}

/// Asks `GET /v2/` on `addr` with a raw HTTP/1.1 request and returns the status code.
fn probe(addr: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(
            format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let line = std::str::from_utf8(&buf[..got]).ok()?;
    line.strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()
}

impl TestRegistry {
    /// Starts a registry with the given authentication and waits (10 s at most) until `GET /v2/`
    /// answers 200 or 401. Panics with the log tail if it does not.
    pub fn start(auth: RegistryAuth) -> TestRegistry {
        let dir = tempfile::Builder::new()
            .prefix("lazypull-registry-")
            .tempdir()
            .expect("create registry temp dir");
        let port = free_port();
        let mut registry = TestRegistry {
            dir,
            port,
            auth,
            child: None,
            pid: 0,
            paused: false,
        };
        std::fs::create_dir_all(registry.storage_dir()).expect("create registry storage dir");
        registry.write_config();
        registry.spawn();
        registry
    }

    /// An open registry (`RegistryAuth::None`).
    pub fn plain() -> TestRegistry {
        TestRegistry::start(RegistryAuth::None)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    /// Path of the log file (stdout and stderr of every run, appended).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn write_config(&self) {
        let mut secret = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut secret);
        let storage = self.storage_dir();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n  fields:\n    service: registry\n\
             storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: \"127.0.0.1:{}\"\n  secret: \"{}\"\n  headers:\n    \
             X-Content-Type-Options: [nosniff]\n\
             health:\n  storagedriver:\n    enabled: false\n",
            storage.display(),
            self.port,
            hex::encode(secret),
        );
        match &self.auth {
            RegistryAuth::None => {}
            RegistryAuth::Htpasswd { user, password } => {
                let hash = bcrypt::hash(password, 4).expect("bcrypt hash");
                let htpasswd = self.dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).expect("write htpasswd");
                config.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: lazypull-test-registry\n    path: \"{}\"\n",
                    htpasswd.display()
                ));
            }
            RegistryAuth::Token(issuer) => {
                config.push_str(&format!(
                    "auth:\n  token:\n    realm: \"{}\"\n    service: \"{}\"\n    issuer: \"{}\"\n    \
                     rootcertbundle: \"{}\"\n",
                    issuer.realm(),
                    issuer.service(),
                    issuer.issuer_name(),
                    issuer.cert_path().display()
                ));
            }
        }
        std::fs::write(self.config_path(), config).expect("write registry config.yml");
    }

    fn spawn(&mut self) {
        let bin = registry_binary();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open registry log");
        let mut cmd = match find_in_path("setpriv") {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.arg("--pdeathsig").arg("KILL").arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.arg("serve")
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file handle"))
            .stderr(log)
            .env_remove("REGISTRY_HTTP_ADDR");
        let child = spawn_from_spawner_thread(cmd)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        self.pid = child.id();
        self.child = Some(child);
        self.paused = false;
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let addr: SocketAddr = self.host().parse().expect("registry socket address");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = probe(addr) {
                if status == 200 || status == 401 {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "docker-registry exited during start-up ({status}); log tail:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if Instant::now() > deadline {
                let tail = self.log_tail(40);
                self.kill();
                panic!(
                    "docker-registry on {} not ready after {READY_TIMEOUT:?}; log tail:\n{tail}",
                    self.host()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PID of the current (or last) registry process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is running (possibly paused).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The authentication it was started with.
    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// The token issuer, for `RegistryAuth::Token` registries.
    pub fn token_issuer(&self) -> Option<&TokenIssuer> {
        match &self.auth {
            RegistryAuth::Token(issuer) => Some(issuer),
            _ => None,
        }
    }

    /// The temp dir holding config, storage and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The storage root (`storage.filesystem.rootdirectory`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps the bytes of `digest`:
    /// `<storage>/docker/registry/v2/blobs/<alg>/<2 hex>/<hex>/data`. Overwrite it to serve
    /// corrupt content.
    pub fn blob_data_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.storage_dir()
            .join("docker/registry/v2/blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(&hex)
            .join("data")
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A [`Pusher`] with the right credentials for this registry (Basic for htpasswd, tokens
    /// minted by the issuer for token auth).
    pub fn pusher(&self) -> Pusher {
        let auth = match &self.auth {
            RegistryAuth::None => PushAuth::None,
            RegistryAuth::Htpasswd { user, password } => {
                PushAuth::Basic(user.clone(), password.clone())
            }
            RegistryAuth::Token(issuer) => PushAuth::Token(issuer.clone()),
        };
        Pusher::new(&self.url(), auth)
    }

    fn signal(&self, signal: Signal) {
        if self.child.is_some() {
            let pid = i32::try_from(self.pid).expect("pid fits in i32");
            kill(Pid::from_raw(pid), signal)
                .unwrap_or_else(|e| panic!("send {signal} to docker-registry {pid}: {e}"));
        }
    }

    /// SIGKILL and reap the process. The port then refuses connections. No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.paused = false;
    }

    /// SIGSTOP: the registry stops answering; connections are still accepted by the kernel.
    pub fn pause(&mut self) {
        self.signal(Signal::SIGSTOP);
        self.paused = true;
    }

    /// SIGCONT after [`TestRegistry::pause`].
    pub fn resume(&mut self) {
        self.signal(Signal::SIGCONT);
        self.paused = false;
    }

    /// Whether the registry is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Kills the process if it runs, then starts it again on the same port with the same storage
    /// and config, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped (paused) process. TempDir removes the files afterwards.
        self.kill();
    }
}
