//! A registry behind a shaped network link, for the cold-start benchmark.
//!
//! Pull times only mean something against a known link: on loopback every design looks the same,
//! because what lazy pulling saves is round trips and bytes. [`ShapedRegistry`] runs Debian's
//! `docker-registry` inside its own network namespace (`lpbench-<pid>`), reachable from the host
//! over a veth pair whose two ends are rate-limited with `tbf` (this kernel has no `netem`, so
//! the qdisc can limit the rate but cannot add delay). The round-trip time is added by a small
//! delaying TCP proxy on `127.0.0.1` that holds every chunk for half an RTT in each direction,
//! pipelined like a real long link, and holds each new connection for one RTT (the TCP
//! handshake a real link would cost). Clients use [`ShapedRegistry::host`] as the registry.
//!
//! Everything is torn down on drop, also while a panic unwinds. A benchmark killed outright
//! leaves its namespace behind (the registry itself dies with it through `setpriv --pdeathsig`);
//! [`cleanup_leftovers`] removes such remains and [`leftovers`] lists them.
//!
//! Only one [`ShapedRegistry`] can live at a time on a machine: the names contain the PID, but
//! the link always uses `10.231.0.0/30`.

use std::collections::hash_map::RandomState;
use std::fs::OpenOptions;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::is_root;
use lazypull_tests::util::pid_alive;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// A network profile: the link between the machine pulling images and the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Short name used on the command line and in reports (`lan`, `wan`, `slow`).
    pub name: &'static str,
    /// Link rate in bits per second, enforced by `tbf` in each direction.
    pub rate_bits_per_sec: u64,
    /// Round-trip time, added by the delaying proxy (half in each direction).
    pub rtt: Duration,
}

/// The profiles the cold-start benchmark runs under: a data-centre LAN, a good WAN link to a
/// cloud registry, and a slow far-away link where round trips dominate.
pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "lan",
        rate_bits_per_sec: 1_000_000_000,
        rtt: Duration::from_millis(1),
    },
    Profile {
        name: "wan",
        rate_bits_per_sec: 200_000_000,
        rtt: Duration::from_millis(20),
    },
    Profile {
        name: "slow",
        rate_bits_per_sec: 50_000_000,
        rtt: Duration::from_millis(60),
    },
];

/// The profile of [`PROFILES`] called `name`, so a benchmark can take profile names as
/// arguments; `None` for an unknown name.
pub fn profile(name: &str) -> Option<Profile> {
    PROFILES.iter().copied().find(|p| p.name == name)
}

/// Prefix of the benchmark's network namespaces (`lpbench-<pid>`).
const NETNS_PREFIX: &str = "lpbench-";
/// Host side address of the veth pair.
const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 1);
/// Namespace side address of the veth pair, where the registry listens.
const NS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 231, 0, 2);
/// The link's subnet.
const SUBNET: &str = "10.231.0.0/30";
/// Port of the registry inside the namespace.
const REGISTRY_PORT: u16 = 5000;
/// How long [`ShapedRegistry::start`] waits for the registry to answer `GET /v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Smallest blob [`ShapedRegistry::measure`] accepts for the rate: smaller ones are dominated by
/// the round trips.
const MIN_RATE_BLOB_BYTES: u64 = 8_000_000;
/// Largest chunk the proxy reads at once.
const PROXY_CHUNK: usize = 256 * 1024;
/// Bytes the proxy may hold per direction and connection; far above rate × RTT/2 of every
/// profile (1 Gbit/s × 30 ms ≈ 4 MB), so the delay never limits the bandwidth.
const PROXY_MAX_IN_FLIGHT: usize = 64 << 20;
/// Read timeout of the measuring HTTP client.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Set while a [`ShapedRegistry`] of this process is alive: they all use the same names and
/// subnet.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// `tbf` bucket size in bytes for `rate_bits_per_sec`: 4 ms worth of data at the rate (a
/// timer tick at HZ=250), but at least 128 KiB so that GSO/TSO packets of up to 64 KiB always
/// fit in the bucket and the qdisc never has to drop or split them.
fn tbf_burst_bytes(rate_bits_per_sec: u64) -> u64 {
    (rate_bits_per_sec / 8 / 250).max(128 * 1024)
}

/// Arguments of `tc` that put the `tbf` shaper of `profile` on `dev`'s egress. The 200 ms
/// queue lets TCP fill the link at line rate without tail drops.
fn tbf_args(dev: &str, profile: &Profile) -> Vec<String> {
    [
        "qdisc",
        "add",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{}bit", profile.rate_bits_per_sec),
        "burst",
        &tbf_burst_bytes(profile.rate_bits_per_sec).to_string(),
        "latency",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Network namespace name of process `pid`.
fn netns_name(pid: u32) -> String {
    format!("{NETNS_PREFIX}{pid}")
}

/// Host side veth of process `pid` (at most 3 + 7 + 1 = 11 characters, under IFNAMSIZ).
fn host_veth_name(pid: u32) -> String {
    format!("lpb{pid}h")
}

/// Namespace side veth of process `pid`.
fn ns_veth_name(pid: u32) -> String {
    format!("lpb{pid}n")
}

/// The PID in a benchmark namespace name `lpbench-<pid>`.
fn netns_owner(name: &str) -> Option<u32> {
    name.strip_prefix(NETNS_PREFIX)?.parse().ok()
}

/// The PID in a benchmark veth name `lpb<pid>h` / `lpb<pid>n`.
fn veth_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("lpb")?;
    let digits = rest.strip_suffix('h').or_else(|| rest.strip_suffix('n'))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// An executable: in `PATH`, else in the sbin directories a non-login root shell may lack.
fn find_tool(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    from_path.or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

/// The registry binary: `$LAZYPULL_REGISTRY_BIN` (as for the tests), else `docker-registry`.
fn registry_binary() -> Option<PathBuf> {
    match std::env::var_os("LAZYPULL_REGISTRY_BIN") {
        Some(bin) => Some(PathBuf::from(bin)).filter(|p| p.is_file()),
        None => find_tool("docker-registry"),
    }
}

/// Runs `program args`, failing with its stderr when it exits non-zero.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let bin = find_tool(program).ok_or_else(|| {
        anyhow!("`{program}` not found in PATH or /usr/sbin: install iproute2 (apt-get install iproute2)")
    })?;
    let out = Command::new(&bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not run `{program} {}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args` for cleanup: failures are ignored (the thing may already be gone).
fn run_quiet(program: &str, args: &[&str]) -> bool {
    let Some(bin) = find_tool(program) else {
        return false;
    };
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Names of all network namespaces (`ip netns list` prints `name (id: N)`).
fn netns_list() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Names of all links of the host namespace (`ip -o link` prints `N: name@peer: <...`).
fn link_list() -> Vec<String> {
    run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().nth(1)?.trim_end_matches(':');
            Some(name.split('@').next().unwrap_or(name).to_string())
        })
        .collect()
}

/// PIDs of the processes inside namespace `ns`.
fn netns_pids(ns: &str) -> Vec<u32> {
    run("ip", &["netns", "pids", ns])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Names of leftover benchmark namespaces (`lpbench-<pid>`) and veth links (`lpb<pid>h`,
/// `lpb<pid>n`) in the host namespace, from this run or an earlier killed one. A benchmark checks
/// it is empty at the end of a run, after dropping its [`ShapedRegistry`], to prove nothing was
/// left behind. While a [`ShapedRegistry`] lives its own namespace and link are listed too.
pub fn leftovers() -> Vec<String> {
    let mut names: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| netns_owner(n).is_some())
        .collect();
    names.extend(link_list().into_iter().filter(|l| veth_owner(l).is_some()));
    names
}

/// Whether the namespace or link of owner `pid` belongs to a live run that must not be touched:
/// this process's own live [`ShapedRegistry`], or another live process whose namespace still
/// holds processes (its registry).
fn owned_by_live_run(pid: u32) -> bool {
    if pid == std::process::id() {
        return ACTIVE.load(Ordering::SeqCst);
    }
    pid_alive(pid) && !netns_pids(&netns_name(pid)).is_empty()
}

/// Deletes the remains of earlier benchmark runs that were killed before they could clean up:
/// kills processes left inside `lpbench-*` namespaces, deletes those namespaces (with the veth
/// ends and qdiscs in them) and stray `lpb*` veth links. [`ShapedRegistry::start`] calls it, so
/// a killed run never blocks the next one. Namespaces of runs that are still alive are left
/// alone (with a message on stderr). Best effort: never fails.
pub fn cleanup_leftovers() {
    for ns in netns_list() {
        let Some(owner) = netns_owner(&ns) else {
            continue;
        };
        if owned_by_live_run(owner) {
            eprintln!("shaping: leaving {ns} alone: it belongs to running process {owner}");
            continue;
        }
        for pid in netns_pids(&ns) {
            run_quiet("kill", &["-9", &pid.to_string()]);
        }
        // The host side veth first: deleting it is synchronous and removes both ends.
        run_quiet("ip", &["link", "del", &host_veth_name(owner)]);
        if !run_quiet("ip", &["netns", "del", &ns]) {
            eprintln!("shaping: could not delete leftover network namespace {ns}");
        }
    }
    for link in link_list() {
        let Some(owner) = veth_owner(&link) else {
            continue;
        };
        if owned_by_live_run(owner) {
            continue;
        }
        if !run_quiet("ip", &["link", "del", &link]) {
            eprintln!("shaping: could not delete leftover link {link}");
        }
    }
}

/// Clears [`ACTIVE`] when dropped.
struct ActiveGuard;

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.store(false, Ordering::SeqCst);
    }
}

/// The registry behind the shaped link: `docker-registry` in namespace `lpbench-<pid>` on
/// `10.231.0.2:5000`, a veth pair shaped with `tbf` to the profile's rate in both directions,
/// and the delaying proxy on `127.0.0.1` adding the profile's RTT.
///
/// Drop tears everything down, also while a panic unwinds: the registry is killed by PID and
/// reaped, the proxy stopped, the veth pair (with its qdiscs) and the namespace deleted.
pub struct ShapedRegistry {
    profile: Profile,
    netns: String,
    host_veth: String,
    dir: TempDir,
    child: Option<Child>,
    proxy: Option<DelayProxy>,
    _active: ActiveGuard,
}

impl std::fmt::Debug for ShapedRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShapedRegistry")
            .field("profile", &self.profile)
            .field("netns", &self.netns)
            .field("proxy", &self.proxy.as_ref().map(DelayProxy::host))
            .field("registry_pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl ShapedRegistry {
    /// Starts the shaped registry serving `storage_root`: an existing `docker-registry`
    /// filesystem storage root (the `rootdirectory` of `storage.filesystem`) already holding the
    /// pushed images; it is served read-mostly (nothing is deleted or purged). Needs root, `ip`
    /// and `tc` (iproute2), `docker-registry` and a kernel with veth and `sch_tbf`.
    ///
    /// Removes leftovers of killed runs first ([`cleanup_leftovers`]). Blocks until the registry
    /// answers `GET /v2/` (20 s at most). On failure everything set up so far is torn down.
    pub fn start(storage_root: &Path, profile: Profile) -> Result<ShapedRegistry> {
        if profile.rate_bits_per_sec == 0 {
            bail!(
                "profile {:?} has a zero rate: give it a rate in bits per second",
                profile.name
            );
        }
        if !is_root() {
            bail!(
                "the shaped registry needs root (network namespaces, veth, tc): run the \
                 benchmark as root, e.g. with sudo"
            );
        }
        for tool in ["ip", "tc"] {
            if find_tool(tool).is_none() {
                bail!("`{tool}` not found: install iproute2 (apt-get install iproute2)");
            }
        }
        let registry_bin = registry_binary().ok_or_else(|| {
            anyhow!(
                "docker-registry not found (or LAZYPULL_REGISTRY_BIN is not a file): \
                 apt-get install docker-registry"
            )
        })?;
        let storage_root = storage_root.canonicalize().with_context(|| {
            format!(
                "registry storage root {} does not exist: push the benchmark images first",
                storage_root.display()
            )
        })?;
        if !storage_root.is_dir() {
            bail!(
                "registry storage root {} is not a directory: pass the registry's \
                 storage.filesystem.rootdirectory",
                storage_root.display()
            );
        }

        if ACTIVE
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            bail!(
                "another ShapedRegistry is alive in this process (they share the namespace \
                 name and {SUBNET}): drop it before starting the next one"
            );
        }
        let active = ActiveGuard;
        cleanup_leftovers();

        let in_use = run("ip", &["-o", "-4", "addr", "show", "to", SUBNET])
            .context("could not list IPv4 addresses with `ip addr show`")?;
        if let Some(line) = in_use.lines().find(|l| !l.trim().is_empty()) {
            bail!(
                "{SUBNET} is already in use on the host ({}): another benchmark run is probably \
                 still going; wait for it, or remove that address/namespace by hand",
                line.split_whitespace()
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }

        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix("lpbench-registry-")
            .tempdir()
            .context("could not create a temp dir for the registry's config and log")?;
        // From here on, dropping `registry` undoes whatever was set up.
        let mut registry = ShapedRegistry {
            profile,
            netns: netns_name(pid),
            host_veth: host_veth_name(pid),
            dir,
            child: None,
            proxy: None,
            _active: active,
        };
        registry.setup_link()?;
        registry.spawn_registry(&registry_bin, &storage_root)?;
        registry.wait_ready()?;
        registry.start_proxy()?;
        Ok(registry)
    }

    /// Creates the namespace and the veth pair, addresses them and puts `tbf` on both ends.
    fn setup_link(&self) -> Result<()> {
        let ns = self.netns.as_str();
        let host = self.host_veth.as_str();
        let pid = std::process::id();
        let peer = ns_veth_name(pid);
        let host_cidr = format!("{HOST_ADDR}/30");
        let ns_cidr = format!("{NS_ADDR}/30");
        let what = "could not set up the benchmark network (is this kernel built with \
                    veth and network namespaces?)";
        run("ip", &["netns", "add", ns]).context(what)?;
        run(
            "ip",
            &["link", "add", host, "type", "veth", "peer", "name", &peer],
        )
        .context(what)?;
        run("ip", &["link", "set", &peer, "netns", ns]).context(what)?;
        run("ip", &["addr", "add", &host_cidr, "dev", host]).context(what)?;
        run("ip", &["link", "set", host, "up"]).context(what)?;
        run("ip", &["-n", ns, "addr", "add", &ns_cidr, "dev", &peer]).context(what)?;
        run("ip", &["-n", ns, "link", "set", &peer, "up"]).context(what)?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"]).context(what)?;

        let shaper = "could not add the tbf shaper (is sch_tbf available? `modprobe sch_tbf`)";
        let host_args = tbf_args(host, &self.profile);
        run(
            "tc",
            &host_args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .context(shaper)?;
        let mut ns_args = vec!["-n".to_string(), ns.to_string()];
        ns_args.extend(tbf_args(&peer, &self.profile));
        run(
            "tc",
            &ns_args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .context(shaper)?;
        Ok(())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// The last `lines` lines of the registry's log, for error messages.
    fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Writes `config.yml` and starts the registry inside the namespace.
    fn spawn_registry(&mut self, bin: &Path, storage_root: &Path) -> Result<()> {
        let state = RandomState::new();
        let mut secret = String::new();
        for i in 0..2u64 {
            let mut h = state.build_hasher();
            h.write_u64(i);
            h.write_u32(std::process::id());
            secret.push_str(&format!("{:016x}", h.finish()));
        }
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  formatter: text\n  fields:\n    service: lpbench-registry\n\
             storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: \"{NS_ADDR}:{REGISTRY_PORT}\"\n  secret: \"{secret}\"\n\
             health:\n  storagedriver:\n    enabled: false\n",
            storage_root.display()
        );
        let config_path = self.dir.path().join("config.yml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("could not write {}", config_path.display()))?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("could not create {}", self.log_path().display()))?;
        let ip = find_tool("ip").context("`ip` not found: install iproute2")?;
        // `setpriv --pdeathsig KILL` makes the registry die with this process even when the
        // benchmark is killed outright; `setpriv` and `ip netns exec` both exec, so the child's
        // PID is the registry's own.
        let mut cmd = match find_tool("setpriv") {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.arg("--pdeathsig").arg("KILL").arg(&ip);
                c
            }
            None => Command::new(&ip),
        };
        cmd.args(["netns", "exec", &self.netns])
            .arg(bin)
            .arg("serve")
            .arg(&config_path)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .context("could not duplicate the log file handle")?,
            )
            .stderr(log);
        // Environment variables REGISTRY_* override the config file.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("REGISTRY_") {
                cmd.env_remove(key);
            }
        }
        // The parent-death signal fires when the *thread* that forked exits: fork from the
        // long-lived spawner thread of the test harness, not from whichever thread calls us.
        let child = lazypull_tests::util::spawn_from_spawner_thread(cmd)
            .with_context(|| format!("could not start {} in {}", bin.display(), self.netns))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the registry answers `GET /v2/` with 200 over the shaped link.
    fn wait_ready(&mut self) -> Result<()> {
        let addr = SocketAddr::V4(SocketAddrV4::new(NS_ADDR, REGISTRY_PORT));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match http_get(addr, "/v2/", Duration::from_secs(2)) {
                Ok(resp) if resp.status == 200 => return Ok(()),
                Ok(resp) => format!("GET /v2/ answered {}", resp.status),
                Err(e) => format!("{e:#}"),
            };
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!(
                        "docker-registry exited during start-up ({status}); log tail:\n{}",
                        self.log_tail(40)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry in {} not ready on {addr} after {READY_TIMEOUT:?} ({last}); \
                     log tail:\n{}",
                    self.netns,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the delaying proxy in front of the registry.
    fn start_proxy(&mut self) -> Result<()> {
        self.proxy = Some(DelayProxy::start(&self.registry_addr(), self.profile.rtt)?);
        Ok(())
    }

    /// `10.231.0.2:5000`: the registry itself, behind the shaped veth but without the added
    /// latency, for a caller that puts its own proxies (a counting one, then a
    /// [`DelayProxy`]) in front.
    pub fn registry_addr(&self) -> String {
        SocketAddrV4::new(NS_ADDR, REGISTRY_PORT).to_string()
    }

    /// `127.0.0.1:PORT` of the delaying proxy: what clients (containerd, podman, lazypull) use
    /// as the registry host, over plain HTTP.
    pub fn host(&self) -> String {
        match &self.proxy {
            Some(p) => p.host(),
            // Unreachable: start only returns a registry whose proxy runs.
            None => "127.0.0.1:0".to_string(),
        }
    }

    /// Measures the achieved link through the proxy, so that a report can show the link the
    /// numbers were obtained on next to the profile asked for. Returns (bits per second, RTT).
    ///
    /// The RTT is the minimum over 5 `GET /v2/` on a fresh TCP connection each, from `connect`
    /// to the end of the response, as measured (nothing subtracted): with the emulated
    /// handshake that is about two profile RTTs, what the first request on a new connection
    /// costs. The rate is one download of `GET /v2/<repo>/blobs/<blob_digest>`, end to end
    /// (connect and first byte latency included); the blob must be at least 8 MB so the round
    /// trips hardly matter. Blocks the calling thread.
    pub fn measure(&self, repo: &str, blob_digest: &str) -> Result<(f64, Duration)> {
        measure(&self.host(), repo, blob_digest)
            .with_context(|| format!("registry log tail:\n{}", self.log_tail(20)))
    }
}

impl Drop for ShapedRegistry {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.proxy = None;
        // Deleting the host end is synchronous and removes both ends with their qdiscs; the
        // namespace itself is then empty.
        run_quiet("ip", &["link", "del", &self.host_veth]);
        run_quiet("ip", &["netns", "del", &self.netns]);
    }
}

/// Measures the link to `host` (`IP:PORT`), so that a report can show the link the numbers
/// were obtained on next to the profile asked for. Returns (bits per second, RTT).
///
/// The RTT is the minimum over 5 `GET /v2/` on a fresh TCP connection each, from `connect`
/// to the end of the response, as measured (nothing subtracted): through a [`DelayProxy`]
/// (which emulates the handshake) that is about two profile RTTs, what the first request on a
/// new connection costs. The rate is one download of `GET /v2/<repo>/blobs/<blob_digest>`, end
/// to end (connect and first byte latency included); the blob must be at least 8 MB so the
/// round trips hardly matter. Blocks the calling thread.
pub fn measure(host: &str, repo: &str, blob_digest: &str) -> Result<(f64, Duration)> {
    let addr: SocketAddr = host
        .parse()
        .with_context(|| format!("{host:?} is not an IP address and port"))?;
    let mut rtt = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let resp = http_get(addr, "/v2/", CLIENT_TIMEOUT)
            .context("RTT probe `GET /v2/` through the delaying proxy failed")?;
        let elapsed = start.elapsed();
        if resp.status != 200 {
            bail!(
                "RTT probe `GET /v2/` through the proxy answered {}: {}",
                resp.status,
                resp.body_prefix()
            );
        }
        rtt = rtt.min(elapsed);
    }

    let path = format!("/v2/{repo}/blobs/{blob_digest}");
    let start = Instant::now();
    let resp = http_get(addr, &path, CLIENT_TIMEOUT)
        .with_context(|| format!("rate probe `GET {path}` through the delaying proxy failed"))?;
    let elapsed = start.elapsed();
    if resp.status != 200 {
        bail!(
            "rate probe `GET {path}` answered {}: {}; name a blob that exists in the \
             storage root (a layer of a pushed image)",
            resp.status,
            resp.body_prefix()
        );
    }
    if resp.body_len < MIN_RATE_BLOB_BYTES {
        bail!(
            "blob {blob_digest} of {repo} has only {} bytes: name a blob of at least \
             {MIN_RATE_BLOB_BYTES} bytes (a large layer) to measure the rate",
            resp.body_len
        );
    }
    let bits_per_sec = resp.body_len as f64 * 8.0 / elapsed.as_secs_f64();
    Ok((bits_per_sec, rtt))
}

/// The delaying TCP proxy on 127.0.0.1: one RTT for each new connection (the handshake a real
/// link costs), then RTT/2 on every byte each way, pipelined so that the latency does not cap
/// the rate. Runs on its own runtime; stops when dropped.
pub struct DelayProxy {
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
}

impl DelayProxy {
    /// Starts a proxy forwarding every connection to `upstream` (`IP:PORT`) with `rtt` added.
    pub fn start(upstream: &str, rtt: Duration) -> Result<DelayProxy> {
        let upstream: SocketAddr = upstream
            .parse()
            .with_context(|| format!("delaying proxy upstream {upstream:?} is not IP:PORT"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lpbench-proxy")
            .enable_all()
            .build()
            .context("could not build the tokio runtime of the delaying proxy")?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("could not bind the delaying proxy on 127.0.0.1")?;
        std_listener
            .set_nonblocking(true)
            .context("could not make the proxy listener non-blocking")?;
        let addr = std_listener
            .local_addr()
            .context("could not read the proxy listener's address")?;
        let listener = {
            let _enter = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .context("could not register the proxy listener with tokio")?
        };
        runtime.spawn(accept_loop(listener, upstream, rtt));
        Ok(DelayProxy {
            runtime: Some(runtime),
            addr,
        })
    }

    /// `127.0.0.1:PORT`: what clients use as the registry host, over plain HTTP.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Does not block, so dropping it inside async code cannot panic; the workers drop
            // every task (and with them the sockets) as they stop.
            runtime.shutdown_background();
        }
    }
}

/// Accepts client connections and serves each with [`serve_connection`].
async fn accept_loop(listener: tokio::net::TcpListener, upstream: SocketAddr, rtt: Duration) {
    loop {
        match listener.accept().await {
            Ok((client, _)) => {
                tokio::spawn(serve_connection(client, upstream, rtt));
            }
            // Out of file descriptors and the like: try again shortly rather than stop serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Proxies one connection: one RTT for the emulated TCP handshake, then both directions, each
/// delayed by half the RTT.
async fn serve_connection(client: tokio::net::TcpStream, upstream: SocketAddr, rtt: Duration) {
    // The client's connect() returned at once on loopback; what it sends meanwhile waits in the
    // socket buffer until the handshake over the long link would have completed.
    tokio::time::sleep(rtt).await;
    let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
        return; // Dropping the client connection tells it that the registry is unreachable.
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let one_way = rtt / 2;
    tokio::join!(
        delayed_pipe(client_read, server_write, one_way),
        delayed_pipe(server_read, client_write, one_way),
    );
}

/// What travels through a delayed pipe: bytes or end of stream, due at `deadline`.
struct Segment {
    deadline: tokio::time::Instant,
    /// `None`: the sender half-closed (or failed); shut down the write side.
    data: Option<Vec<u8>>,
    /// Budget of bytes in flight, released once written.
    _permit: Option<OwnedSemaphorePermit>,
}

/// Copies `from` to `to`, every chunk delayed by `delay` from when it was read. Reading and
/// writing run concurrently, so the delay does not limit bandwidth (like a long link full of
/// data in flight). End of stream is delayed too and propagated as a half-close.
async fn delayed_pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Segment>();
    let budget = Arc::new(Semaphore::new(PROXY_MAX_IN_FLIGHT));

    let reader = async move {
        let mut buf = vec![0u8; PROXY_CHUNK];
        loop {
            let read = tokio::select! {
                r = from.read(&mut buf) => r,
                // The writer gave up (peer gone): stop reading.
                _ = tx.closed() => return,
            };
            let n = match read {
                Ok(n) if n > 0 => n,
                // EOF or error: pass end of stream on after the queued data.
                _ => {
                    let _ = tx.send(Segment {
                        deadline: tokio::time::Instant::now() + delay,
                        data: None,
                        _permit: None,
                    });
                    return;
                }
            };
            let deadline = tokio::time::Instant::now() + delay;
            // n <= PROXY_CHUNK, far below u32::MAX and the budget.
            let Ok(permit) = budget.clone().acquire_many_owned(n as u32).await else {
                return;
            };
            let segment = Segment {
                deadline,
                data: Some(buf[..n].to_vec()),
                _permit: Some(permit),
            };
            if tx.send(segment).is_err() {
                return;
            }
        }
    };

    let writer = async move {
        while let Some(segment) = rx.recv().await {
            tokio::time::sleep_until(segment.deadline).await;
            match segment.data {
                Some(data) => {
                    if to.write_all(&data).await.is_err() {
                        return; // Dropping `rx` stops the reader.
                    }
                }
                None => break,
            }
        }
        let _ = to.shutdown().await;
    };

    tokio::join!(reader, writer);
}

/// An HTTP response as far as the measurements need it.
struct HttpResponse {
    status: u16,
    /// Body bytes received.
    body_len: u64,
    /// The first bytes of the body, for error messages.
    body_start: Vec<u8>,
}

impl HttpResponse {
    fn body_prefix(&self) -> String {
        String::from_utf8_lossy(&self.body_start).trim().to_string()
    }
}

/// A minimal HTTP/1.1 `GET` on a new connection (`Connection: close`): reads the status line,
/// the headers and the whole body (by `Content-Length`, else to end of stream), keeping only its
/// first 4 KiB. The registry answers everything the benchmark asks with a `Content-Length`.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("could not connect to {addr}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .context("could not set a socket read timeout")?;
    let _ = stream.set_nodelay(true);
    (&stream)
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lazypull-bench\r\n\
                 Accept: */*\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .with_context(|| format!("could not send GET {path} to {addr}"))?;
    let mut reader = BufReader::with_capacity(PROXY_CHUNK, &stream);

    let mut line = String::new();
    reader
        .read_line(&mut line)
        .with_context(|| format!("no response to GET {path} from {addr}"))?;
    let status: u16 = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP status line from {addr}: {:?}", line.trim_end()))?;
    let mut content_length: Option<u64> = None;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .with_context(|| format!("reading response headers of GET {path} from {addr}"))?;
        if n == 0 {
            bail!("{addr} closed the connection in the headers of GET {path}");
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .parse()
                        .with_context(|| format!("bad Content-Length {value:?} from {addr}"))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding")
                && !value.eq_ignore_ascii_case("identity")
            {
                bail!(
                    "{addr} answered GET {path} with Transfer-Encoding {value}, not supported here"
                );
            }
        }
    }

    let mut body_len = 0u64;
    let mut body_start = Vec::new();
    let mut buf = vec![0u8; PROXY_CHUNK];
    loop {
        let want = match content_length {
            Some(total) if body_len >= total => break,
            Some(total) => ((total - body_len) as usize).min(buf.len()),
            None => buf.len(),
        };
        let n = reader
            .read(&mut buf[..want])
            .with_context(|| format!("reading the body of GET {path} from {addr}"))?;
        if n == 0 {
            if let Some(total) = content_length {
                bail!("{addr} closed the connection after {body_len} of {total} body bytes of GET {path}");
            }
            break;
        }
        if body_start.len() < 4096 {
            let keep = n.min(4096 - body_start.len());
            body_start.extend_from_slice(&buf[..keep]);
        }
        body_len += n as u64;
    }
    Ok(HttpResponse {
        status,
        body_len,
        body_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_found_by_name() {
        let wan = profile("wan").unwrap();
        assert_eq!(wan.rate_bits_per_sec, 200_000_000);
        assert_eq!(wan.rtt, Duration::from_millis(20));
        assert_eq!(profile("lan").unwrap().rate_bits_per_sec, 1_000_000_000);
        assert_eq!(profile("slow").unwrap().rtt, Duration::from_millis(60));
        assert!(profile("LAN").is_none());
        assert!(profile("").is_none());
    }

    #[test]
    fn burst_holds_gso_packets_and_4ms_of_data() {
        assert_eq!(tbf_burst_bytes(50_000_000), 128 * 1024);
        assert_eq!(tbf_burst_bytes(1_000_000_000), 500_000);
        for p in PROFILES {
            assert!(tbf_burst_bytes(p.rate_bits_per_sec) >= 64 * 1024);
        }
    }

    #[test]
    fn tbf_command_line() {
        let args = tbf_args("lpb42h", &profile("slow").unwrap());
        assert_eq!(
            args.join(" "),
            "qdisc add dev lpb42h root tbf rate 50000000bit burst 131072 latency 200ms"
        );
    }

    #[test]
    fn names_fit_and_parse_back() {
        // Linux PIDs are at most 4194304 (7 digits); IFNAMSIZ allows 15 characters.
        let pid = 4_194_304;
        assert!(host_veth_name(pid).len() <= 15);
        assert!(ns_veth_name(pid).len() <= 15);
        assert_eq!(veth_owner(&host_veth_name(pid)), Some(pid));
        assert_eq!(veth_owner(&ns_veth_name(17)), Some(17));
        assert_eq!(netns_owner(&netns_name(99)), Some(99));
        for other in ["lpbh", "lpb12x", "lpbxh", "eth0", "lpb12h0", "ifb0"] {
            assert_eq!(veth_owner(other), None, "{other}");
        }
        assert_eq!(netns_owner("lpbench-"), None);
        assert_eq!(netns_owner("other-1"), None);
    }

    /// A blocking `GET /v2/` through the proxy, timed from connect to the end of the response.
    fn timed_v2(host: &str) -> (u16, Duration) {
        let start = Instant::now();
        let resp = http_get(host.parse().unwrap(), "/v2/", Duration::from_secs(10)).unwrap();
        (resp.status, start.elapsed())
    }

    #[test]
    fn shaped_registry_delays_and_limits() {
        let missing: Vec<&str> = ["ip", "tc", "docker-registry"]
            .into_iter()
            .filter(|t| find_tool(t).is_none())
            .collect();
        if !is_root() || !missing.is_empty() {
            eprintln!(
                "skipping shaped_registry_delays_and_limits: needs root (is root: {}) and \
                 ip, tc, docker-registry (missing: {missing:?})",
                is_root()
            );
            return;
        }

        // A 16 MiB blob pushed into a plain registry's storage, which the shaped one serves.
        let mut source = lazypull_tests::TestRegistry::plain();
        let blob = lazypull_tests::random_bytes(16 << 20, 7);
        let digest = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(source.pusher().push_blob("bench/shaping", &blob));
        source.kill();

        let profile = Profile {
            name: "test",
            rate_bits_per_sec: 100_000_000,
            rtt: Duration::from_millis(40),
        };
        let registry = ShapedRegistry::start(&source.storage_dir(), profile).unwrap();
        let pid = std::process::id();
        assert!(netns_list().contains(&netns_name(pid)));

        let (status, took) = timed_v2(&registry.host());
        println!("GET /v2/ through {}: {status} in {took:?}", registry.host());
        assert_eq!(status, 200);
        // Connect delay (one RTT) plus request and response (one RTT).
        assert!(took >= Duration::from_millis(40), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");

        let (rate, rtt) = registry
            .measure("bench/shaping", &digest.to_string())
            .unwrap();
        println!(
            "measured: {:.1} Mbit/s, RTT {:.1} ms (profile 100 Mbit/s, 40 ms)",
            rate / 1e6,
            rtt.as_secs_f64() * 1e3
        );
        assert!((50e6..110e6).contains(&rate), "rate {rate}");
        assert!(
            rtt >= Duration::from_millis(40) && rtt <= Duration::from_millis(200),
            "{rtt:?}"
        );

        // A missing blob is an error that says what to do.
        let err = registry
            .measure(
                "bench/shaping",
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            )
            .unwrap_err();
        println!("missing blob: {err:#}");
        assert!(format!("{err:#}").contains("404"), "{err:#}");

        // Only one at a time.
        let second = ShapedRegistry::start(&source.storage_dir(), profile).unwrap_err();
        assert!(format!("{second:#}").contains("another ShapedRegistry"));

        drop(registry);
        assert!(!netns_list().contains(&netns_name(pid)));
        assert!(leftovers().is_empty(), "{:?}", leftovers());
        assert!(!ACTIVE.load(Ordering::SeqCst));
    }
}
