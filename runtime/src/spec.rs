//! Building the OCI runtime `config.json` for `lazypull run`.
//!
//! `lazypull run` mounts an image's layers, stacks them into a root filesystem and hands a bundle
//! (`config.json` + `rootfs/`) to runc. This module turns the image configuration (Entrypoint,
//! Cmd, Env, WorkingDir, User) and the command-line flags into that `config.json`, following the
//! rules docker, podman and nerdctl use, so an image behaves the same under `lazypull run` as
//! under `docker run`:
//!
//! * **args**: Entrypoint followed by the command after the image name, or the image's Cmd when
//!   no command is given; `--entrypoint` replaces the image's Entrypoint and drops its Cmd.
//! * **env**: `PATH` (a default when nothing sets it), `HOSTNAME`, `TERM=xterm` with `-t`, then
//!   the image's Env, `--env-file` files in order, `-e` flags; a later value wins by key. `HOME`
//!   comes from the user's passwd entry unless set.
//! * **user**: `-u` or the image's User, resolved against the *image's* `/etc/passwd` and
//!   `/etc/group` the way runc does, reading those files without ever following a symlink out
//!   of the root filesystem (it is untrusted image content).
//! * **mounts, namespaces, capabilities, masked paths**: runc's and docker's defaults.
//!
//! Not done here (yet): `/etc/hosts` (and `/etc/resolv.conf` with `--net none`, where the host's
//! file would be useless), seccomp (runc runs without a filter; docker's default profile is
//! large and would need its own module), AppArmor/SELinux labels, user namespaces, resource
//! limits other than the open-files limit.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capabilities, Capability, Linux, LinuxBuilder, LinuxCapabilitiesBuilder,
    LinuxDeviceCgroupBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxResourcesBuilder,
    Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType, Process, ProcessBuilder, RootBuilder,
    Spec, SpecBuilder, UserBuilder,
};

/// The `PATH` docker and runc give a container whose image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The open-files limit podman gives containers (lowered to the host's hard limit when that is
/// smaller, because runc cannot raise a hard limit above its own).
pub const DEFAULT_NOFILE: u64 = 1_048_576;

/// Largest `/etc/passwd`, `/etc/group` or `--env-file` read: these are a few KiB in practice, and
/// an image must not be able to make `run` read gigabytes.
pub const MAX_CONFIG_FILE: u64 = 4 << 20;

/// OCI runtime-spec version written to `config.json`; the version runc 1.1 itself writes.
const OCI_VERSION: &str = "1.0.2-dev";

/// Largest uid/gid runc accepts (`libcontainer/user`: ids are Go ints limited to 2^31-1).
const MAX_ID: u64 = (1 << 31) - 1;

/// Longest hostname `sethostname(2)` accepts (`HOST_NAME_MAX`).
const HOST_NAME_MAX: usize = 64;

/// Symlinks followed while resolving one path inside the rootfs, like the kernel's limit.
const MAX_SYMLINKS: usize = 40;

/// Why a `config.json` could not be built or written. Each message says what is wrong and how
/// to fix it, because it is shown as-is to the user of `lazypull run`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpecError {
    /// Neither the image nor the command line says what to run.
    #[error("image has no Entrypoint or Cmd; give a command after the image name")]
    NoCommand,

    /// The first word of the command is an empty string (e.g. `--entrypoint ''` with a command
    /// that starts with `''`), which cannot be executed.
    #[error("the command to run is an empty string; give a program name or path")]
    EmptyProgram,

    /// A string that becomes part of a C string (argument, variable, path) contains a NUL byte,
    /// which the kernel would silently truncate at.
    #[error("{what} contains a NUL byte, which cannot be passed to the container; remove it")]
    Nul {
        /// Which input, e.g. `argument 2` or `-w`.
        what: String,
    },

    /// An environment variable from the image, an env file or `-e` is malformed.
    #[error("invalid environment variable {var:?} from {origin}: {reason}; use KEY=VALUE")]
    EnvVar {
        /// The entry as given.
        var: String,
        /// `-e`, `the image config` or `FILE:LINE`.
        origin: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// `-e KEY` names a variable of this process whose value is not UTF-8.
    #[error(
        "environment variable {key} of this process is not valid UTF-8, so `-e {key}` cannot \
         pass it on; use -e {key}=VALUE"
    )]
    EnvNotUnicode {
        /// The variable name.
        key: String,
    },

    /// An `--env-file` could not be read.
    #[error("cannot read env file {}: {source}; check the --env-file path", path.display())]
    EnvFile {
        /// The file as given.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// An `--env-file` line is not `KEY=VALUE`, `KEY`, a `#` comment or blank.
    #[error("{}:{line}: {reason}; env files hold KEY=VALUE or KEY lines, # comments and blank lines",
            path.display())]
    EnvFileLine {
        /// The file as given.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        reason: String,
    },

    /// The working directory (from `-w` or the image) is not absolute.
    #[error("working directory {dir:?} from {origin} is not an absolute path; use -w /DIR")]
    Workdir {
        /// The directory as given.
        dir: String,
        /// `-w` or `the image config`.
        origin: &'static str,
    },

    /// The user spec is not `USER[:GROUP]`.
    #[error("invalid user {spec:?} from {origin}: {reason}; use -u USER[:GROUP] with names or numeric ids")]
    UserSpec {
        /// The spec as given.
        spec: String,
        /// `-u` or `the image config`.
        origin: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A user name that the image's `/etc/passwd` does not define.
    #[error("user {name:?} not found in the image's /etc/passwd; use a numeric uid (e.g. -u 1000) or a user the image defines")]
    UnknownUser {
        /// The name looked up.
        name: String,
    },

    /// A group name that the image's `/etc/group` does not define.
    #[error("group {name:?} not found in the image's /etc/group; use a numeric gid (e.g. -u USER:1000) or a group the image defines")]
    UnknownGroup {
        /// The name looked up.
        name: String,
    },

    /// `/etc/passwd` or `/etc/group` in the image exists but cannot be read safely (not a
    /// regular file, too large, a symlink loop, an I/O error).
    #[error("cannot read {path} in the image's root filesystem: {source}; fix the image or use numeric ids (-u UID:GID)")]
    RootfsFile {
        /// The path inside the rootfs, e.g. `/etc/passwd`.
        path: &'static str,
        /// The underlying error.
        source: io::Error,
    },

    /// A `-v` spec is malformed.
    #[error("invalid volume {spec:?}: {reason}; use -v /HOST/PATH:/CONTAINER/PATH[:ro|rw]")]
    Volume {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A `-v` host path does not exist or cannot be examined.
    #[error("volume {spec:?}: host path {} is not accessible: {source}; create it or fix the path",
            path.display())]
    VolumeSource {
        /// The spec as given.
        spec: String,
        /// The host path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },

    /// Two `-v` flags mount onto the same container path.
    #[error("two volumes are mounted at {dest}; give each container path only once")]
    DuplicateMount {
        /// The container path.
        dest: String,
    },

    /// The hostname cannot be set with `sethostname(2)`.
    #[error("invalid hostname {hostname:?}: {reason}")]
    Hostname {
        /// The hostname as given.
        hostname: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// oci-spec refused to build a part of the spec (a bug in this module, not in the input).
    #[error("internal error building the runtime spec: {0}")]
    Oci(#[from] oci_spec::OciSpecError),

    /// `config.json` could not be written.
    #[error("cannot write {}: {source}; check that the bundle directory exists and is writable",
            path.display())]
    Write {
        /// The `config.json` path.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// Network mode of a container (`--net`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetMode {
    /// Share the host's network namespace (`--net host`): no isolation, but networking works
    /// without a CNI setup, which lazypull does not have.
    Host,
    /// A new, empty network namespace (`--net none`): only a loopback device, which is down.
    None,
}

/// The `lazypull run` flags that shape `config.json`, already split by the CLI parser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// The command after the image name; replaces the image's Cmd when non-empty.
    pub command: Vec<String>,
    /// `--entrypoint`: replaces the image's Entrypoint (one word, not shell-split) and drops its
    /// Cmd; `Some("")` clears the Entrypoint, as in docker.
    pub entrypoint: Option<String>,
    /// `-e KEY=VALUE`, or `-e KEY` to pass this process's value (skipped when unset).
    pub env: Vec<String>,
    /// `--env-file`: files of `KEY=VALUE` / `KEY` lines, `#` comments and blank lines, applied
    /// in order before `-e`.
    pub env_files: Vec<PathBuf>,
    /// `-v SRC:DST[:ro|rw]`: bind mounts of existing absolute host paths.
    pub volumes: Vec<String>,
    /// `-w`: absolute working directory; overrides the image's WorkingDir.
    pub workdir: Option<String>,
    /// `-u USER[:GROUP]` (names or numbers); overrides the image's User (empty keeps it).
    pub user: Option<String>,
    /// `--net`.
    pub net: NetMode,
    /// `--read-only`: mount the root filesystem read-only.
    pub read_only: bool,
    /// `-t`: give the process a terminal (and `TERM=xterm`).
    pub tty: bool,
    /// Container hostname (the caller passes e.g. a container id prefix).
    pub hostname: String,
}

/// Facts about the host that shape the spec; probed once per spec so tests can inject them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Host {
    /// Hard `RLIMIT_NOFILE` of this process (runc's parent), `None` when unknown.
    nofile_hard: Option<u64>,
    /// Whether the host has an `/etc/resolv.conf` to share with `--net host` containers.
    resolv_conf: bool,
    /// Whether the kernel has cgroup namespaces.
    cgroup_ns: bool,
}

impl Host {
    fn probe() -> Self {
        Host {
            nofile_hard: fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|s| parse_nofile_hard(&s)),
            resolv_conf: fs::metadata("/etc/resolv.conf").is_ok_and(|m| m.is_file()),
            cgroup_ns: Path::new("/proc/self/ns/cgroup").exists(),
        }
    }
}

/// Builds the runtime spec for running `image` with `opts`.
///
/// `rootfs` is the container's assembled root filesystem on the host; it is only read, for the
/// image's `/etc/passwd` and `/etc/group` (never following symlinks out of it). The spec names
/// the root as `rootfs` relative to the bundle, so the caller mounts it at `<bundle>/rootfs`.
/// Also reads this process's environment (`-e KEY`), the `--env-file` files, `/proc/self/limits`
/// and checks that volume sources exist.
pub fn build_spec(
    image: &ImageConfiguration,
    opts: &RunOptions,
    rootfs: &Path,
) -> Result<Spec, SpecError> {
    build_spec_on(image, opts, rootfs, &Host::probe())
}

fn build_spec_on(
    image: &ImageConfiguration,
    opts: &RunOptions,
    rootfs: &Path,
    host: &Host,
) -> Result<Spec, SpecError> {
    let config = image.config().as_ref();
    let image_entrypoint = config.and_then(|c| c.entrypoint().as_deref());
    let image_cmd = config.and_then(|c| c.cmd().as_deref());
    let image_env = config.and_then(|c| c.env().as_deref()).unwrap_or_default();
    let image_workdir = config.and_then(|c| c.working_dir().as_deref());
    let image_user = config.and_then(|c| c.user().as_deref());

    check_hostname(&opts.hostname)?;
    let args = resolve_args(image_entrypoint, image_cmd, opts)?;
    let cwd = resolve_workdir(opts.workdir.as_deref(), image_workdir)?;
    let user = match opts.user.as_deref() {
        Some(spec) if !spec.is_empty() => resolve_user(rootfs, spec, "-u")?,
        _ => resolve_user(rootfs, image_user.unwrap_or_default(), "the image config")?,
    };
    let env = resolve_env(image_env, opts, &user.home)?;

    let volumes = opts
        .volumes
        .iter()
        .map(|v| parse_volume(v))
        .collect::<Result<Vec<_>, _>>()?;
    let mounts = build_mounts(volumes, opts.net, host)?;

    let process = build_process(args, env, cwd, &user, opts.tty, host)?;
    let linux = build_linux(opts.net, host)?;
    let root = RootBuilder::default()
        .path("rootfs")
        .readonly(opts.read_only)
        .build()?;
    let mut spec = SpecBuilder::default()
        .version(OCI_VERSION)
        .root(root)
        .hostname(opts.hostname.clone())
        .mounts(mounts)
        .process(process)
        .linux(linux)
        .build()?;
    // The builder fills unset fields from oci-spec's own defaults; drop the ones that are not
    // ours so the file holds exactly what this module decided.
    spec.set_annotations(None);
    Ok(spec)
}

/// Writes `spec` to `<bundle>/config.json` atomically (a temporary file in the bundle, synced,
/// then renamed over it), so runc never reads a half-written file and a crash leaves either the
/// old or the new file. The file is mode 0600: the environment may hold secrets.
pub fn write_config(bundle: &Path, spec: &Spec) -> Result<(), SpecError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dest = bundle.join("config.json");
    let err = |source| SpecError::Write {
        path: dest.clone(),
        source,
    };
    let data = serde_json::to_vec_pretty(spec).map_err(|e| err(e.into()))?;
    let tmp = bundle.join(format!(
        ".config.json.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(&data)?;
        file.sync_all()?;
        fs::rename(&tmp, &dest)?;
        // Make the rename itself durable.
        File::open(bundle)?.sync_all()
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })
}

// ---------------------------------------------------------------------------------------------
// Process: args, cwd, env, user
// ---------------------------------------------------------------------------------------------

fn check_nul(s: &str, what: impl FnOnce() -> String) -> Result<(), SpecError> {
    if s.contains('\0') {
        return Err(SpecError::Nul { what: what() });
    }
    Ok(())
}

fn check_hostname(hostname: &str) -> Result<(), SpecError> {
    let reason = if hostname.is_empty() {
        "it is empty; pass a name such as the container id prefix"
    } else if hostname.len() > HOST_NAME_MAX {
        "it is longer than 64 bytes, the kernel's limit; use a shorter name"
    } else if hostname.contains('\0') {
        "it contains a NUL byte; remove it"
    } else {
        return Ok(());
    };
    Err(SpecError::Hostname {
        hostname: hostname.to_owned(),
        reason,
    })
}

/// Docker's rule: `--entrypoint` replaces the image's Entrypoint and its Cmd (unless a command
/// is given); a command replaces only the Cmd.
fn resolve_args(
    image_entrypoint: Option<&[String]>,
    image_cmd: Option<&[String]>,
    opts: &RunOptions,
) -> Result<Vec<String>, SpecError> {
    let (entrypoint, cmd): (&[String], &[String]) = match &opts.entrypoint {
        Some(ep) if ep.is_empty() => (&[], &opts.command),
        Some(ep) => (std::slice::from_ref(ep), &opts.command),
        None if opts.command.is_empty() => (
            image_entrypoint.unwrap_or_default(),
            image_cmd.unwrap_or_default(),
        ),
        None => (image_entrypoint.unwrap_or_default(), &opts.command),
    };
    let args: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    match args.first() {
        None => return Err(SpecError::NoCommand),
        Some(program) if program.is_empty() => return Err(SpecError::EmptyProgram),
        Some(_) => {}
    }
    for (i, arg) in args.iter().enumerate() {
        check_nul(arg, || format!("argument {i} of the command"))?;
    }
    Ok(args)
}

fn resolve_workdir(flag: Option<&str>, image: Option<&str>) -> Result<String, SpecError> {
    let (dir, origin) = match (flag, image) {
        (Some(dir), _) if !dir.is_empty() => (dir, "-w"),
        (_, Some(dir)) if !dir.is_empty() => (dir, "the image config"),
        _ => return Ok("/".to_owned()),
    };
    check_nul(dir, || format!("the working directory from {origin}"))?;
    if !dir.starts_with('/') {
        return Err(SpecError::Workdir {
            dir: dir.to_owned(),
            origin,
        });
    }
    Ok(dir.to_owned())
}

/// An ordered environment: first-insertion order, last value wins.
#[derive(Default)]
struct EnvList {
    entries: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl EnvList {
    fn set(&mut self, key: &str, value: &str) {
        match self.index.get(key) {
            Some(&i) => self.entries[i].1 = value.to_owned(),
            None => {
                self.index.insert(key.to_owned(), self.entries.len());
                self.entries.push((key.to_owned(), value.to_owned()));
            }
        }
    }

    fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    fn into_vec(self) -> Vec<String> {
        self.entries
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }
}

/// Why `key` cannot be an environment variable name, if it cannot.
fn env_key_problem(key: &str) -> Option<&'static str> {
    if key.is_empty() {
        Some("the name is empty")
    } else if key.contains('\0') {
        Some("the name contains a NUL byte")
    } else {
        None
    }
}

/// Applies one `KEY=VALUE` or `KEY` entry from `-e` or an env file.
fn apply_user_env(list: &mut EnvList, entry: &str, origin: &str) -> Result<(), SpecError> {
    let bad = |reason| SpecError::EnvVar {
        var: entry.to_owned(),
        origin: origin.to_owned(),
        reason,
    };
    match entry.split_once('=') {
        Some((key, value)) => {
            if let Some(reason) = env_key_problem(key) {
                return Err(bad(reason));
            }
            if value.contains('\0') {
                return Err(bad("the value contains a NUL byte"));
            }
            list.set(key, value);
        }
        None => {
            if let Some(reason) = env_key_problem(entry) {
                return Err(bad(reason));
            }
            // Docker: `-e KEY` passes this process's value, and nothing when it is unset.
            if let Some(value) = std::env::var_os(entry) {
                let value = value.into_string().map_err(|_| SpecError::EnvNotUnicode {
                    key: entry.to_owned(),
                })?;
                if value.contains('\0') {
                    return Err(bad("the value contains a NUL byte"));
                }
                list.set(entry, &value);
            }
        }
    }
    Ok(())
}

/// Reads a host file given on the command line, capped at [`MAX_CONFIG_FILE`].
fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    read_limited(file)
}

fn read_limited(file: File) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    file.take(MAX_CONFIG_FILE + 1).read_to_end(&mut data)?;
    if data.len() as u64 > MAX_CONFIG_FILE {
        return Err(io::Error::other(format!(
            "larger than the {} MiB limit",
            MAX_CONFIG_FILE >> 20
        )));
    }
    Ok(data)
}

/// Applies an `--env-file` the way docker reads it: leading whitespace is ignored, `#` lines
/// and blank lines are skipped, `KEY=VALUE` keeps VALUE verbatim (no quote processing), a lone
/// `KEY` passes this process's value; names must not contain whitespace.
fn apply_env_file(list: &mut EnvList, path: &Path) -> Result<(), SpecError> {
    let data = read_capped(path).map_err(|source| SpecError::EnvFile {
        path: path.to_owned(),
        source,
    })?;
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&data);
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line_err = |reason: String| SpecError::EnvFileLine {
            path: path.to_owned(),
            line: line_no,
            reason,
        };
        let line = std::str::from_utf8(raw)
            .map_err(|_| line_err("the line is not valid UTF-8".to_owned()))?;
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, entry) = match line.split_once('=') {
            Some((key, _)) => (key, line),
            None => (line.trim_end(), line.trim_end()),
        };
        if key.chars().any(char::is_whitespace) {
            return Err(line_err(format!(
                "variable name {key:?} contains whitespace"
            )));
        }
        let origin = format!("{}:{line_no}", path.display());
        apply_user_env(list, entry, &origin)?;
    }
    Ok(())
}

fn resolve_env(
    image_env: &[String],
    opts: &RunOptions,
    home: &str,
) -> Result<Vec<String>, SpecError> {
    let mut list = EnvList::default();
    list.set("PATH", DEFAULT_PATH);
    list.set("HOSTNAME", &opts.hostname);
    if opts.tty {
        list.set("TERM", "xterm");
    }
    for entry in image_env {
        let bad = |reason| SpecError::EnvVar {
            var: entry.clone(),
            origin: "the image config".to_owned(),
            reason,
        };
        let (key, value) = entry
            .split_once('=')
            .ok_or_else(|| bad("there is no '=' (the image is malformed)"))?;
        if let Some(reason) = env_key_problem(key) {
            return Err(bad(reason));
        }
        if value.contains('\0') {
            return Err(bad("the value contains a NUL byte"));
        }
        list.set(key, value);
    }
    for file in &opts.env_files {
        apply_env_file(&mut list, file)?;
    }
    for entry in &opts.env {
        apply_user_env(&mut list, entry, "-e")?;
    }
    if !list.contains("HOME") {
        list.set("HOME", home);
    }
    Ok(list.into_vec())
}

/// A user resolved against the image's passwd and group files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResolvedUser {
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    home: String,
}

#[derive(Debug)]
struct PasswdEntry {
    name: String,
    uid: u64,
    gid: u64,
    home: String,
}

#[derive(Debug)]
struct GroupEntry {
    name: String,
    gid: u64,
    members: Vec<String>,
}

/// Lines of a passwd/group file split on ':', skipping blank, comment and NIS (`+`/`-`) lines.
fn db_lines(data: &str) -> impl Iterator<Item = Vec<&str>> {
    data.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(['+', '-']))
        .map(|l| l.split(':').collect())
}

fn parse_passwd(data: &str) -> Vec<PasswdEntry> {
    db_lines(data)
        .filter_map(|f| {
            Some(PasswdEntry {
                name: (*f.first()?).to_owned(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).copied().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

fn parse_group(data: &str) -> Vec<GroupEntry> {
    db_lines(data)
        .filter_map(|f| {
            Some(GroupEntry {
                name: (*f.first()?).to_owned(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// `Some(id)` when `s` is all digits (runc treats such a spec as an id, never a name).
fn numeric_id(s: &str) -> Option<Option<u32>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value = s
        .parse::<u64>()
        .ok()
        .filter(|&v| v <= MAX_ID)
        .and_then(|v| u32::try_from(v).ok());
    Some(value)
}

fn to_id(v: u64) -> Option<u32> {
    u32::try_from(v).ok().filter(|&v| u64::from(v) <= MAX_ID)
}

/// Resolves `USER[:GROUP]` like runc's `GetExecUser`: a numeric user is a uid (its passwd
/// entry, if any, supplies gid and home; otherwise gid 0 and home `/`); a name must exist.
/// An explicit group replaces the gid and, as in runc, suppresses supplementary groups;
/// otherwise a user found in passwd gets every group that lists it as a member.
fn resolve_user(
    rootfs: &Path,
    spec: &str,
    origin: &'static str,
) -> Result<ResolvedUser, SpecError> {
    let bad = |reason: String| SpecError::UserSpec {
        spec: spec.to_owned(),
        origin,
        reason,
    };
    if spec.contains('\0') {
        return Err(bad("it contains a NUL byte".to_owned()));
    }
    let (user_arg, group_arg) = match spec.split_once(':') {
        Some((_, g)) if g.contains(':') => return Err(bad("more than one ':'".to_owned())),
        Some((_, "")) => return Err(bad("the group after ':' is empty".to_owned())),
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let out_of_range = |what: &str| bad(format!("{what} is larger than {MAX_ID}"));

    let passwd = parse_passwd(&read_rootfs_db(rootfs, "/etc/passwd")?);
    let (uid_wanted, name_wanted) = if user_arg.is_empty() {
        (Some(0), None) // runc's default user
    } else {
        match numeric_id(user_arg) {
            Some(Some(uid)) => (Some(uid), None),
            Some(None) => return Err(out_of_range("the uid")),
            None => (None, Some(user_arg)),
        }
    };
    let entry = passwd.iter().find(|e| match (uid_wanted, name_wanted) {
        (Some(uid), _) => e.uid == u64::from(uid),
        (None, Some(name)) => e.name == name,
        (None, None) => false,
    });
    let mut user = match (entry, uid_wanted) {
        (Some(e), _) => ResolvedUser {
            uid: to_id(e.uid).ok_or_else(|| out_of_range("the uid in /etc/passwd"))?,
            gid: to_id(e.gid).ok_or_else(|| out_of_range("the gid in /etc/passwd"))?,
            additional_gids: Vec::new(),
            home: if e.home.is_empty() || e.home.contains('\0') {
                "/".to_owned()
            } else {
                e.home.clone()
            },
        },
        (None, Some(uid)) => ResolvedUser {
            uid,
            gid: 0,
            additional_gids: Vec::new(),
            home: "/".to_owned(),
        },
        (None, None) => {
            return Err(SpecError::UnknownUser {
                name: user_arg.to_owned(),
            })
        }
    };

    if group_arg.is_none() && entry.is_none() {
        return Ok(user);
    }
    let groups = parse_group(&read_rootfs_db(rootfs, "/etc/group")?);
    match group_arg {
        Some(group_arg) => {
            let found = groups
                .iter()
                .find(|g| g.name == group_arg || g.gid.to_string() == group_arg);
            user.gid = match (found, numeric_id(group_arg)) {
                (Some(g), _) => {
                    to_id(g.gid).ok_or_else(|| out_of_range("the gid in /etc/group"))?
                }
                (None, Some(Some(gid))) => gid,
                (None, Some(None)) => return Err(out_of_range("the gid")),
                (None, None) => {
                    return Err(SpecError::UnknownGroup {
                        name: group_arg.to_owned(),
                    })
                }
            };
        }
        None => {
            if let Some(entry) = entry {
                for g in groups.iter().filter(|g| g.members.contains(&entry.name)) {
                    if let Some(gid) = to_id(g.gid) {
                        if !user.additional_gids.contains(&gid) {
                            user.additional_gids.push(gid);
                        }
                    }
                }
            }
        }
    }
    Ok(user)
}

/// Reads `/etc/passwd` or `/etc/group` from the rootfs; a missing file reads as empty (numeric
/// ids still work, as in runc).
fn read_rootfs_db(rootfs: &Path, path: &'static str) -> Result<String, SpecError> {
    let err = |source| SpecError::RootfsFile { path, source };
    match open_in_root(rootfs, path).map_err(err)? {
        None => Ok(String::new()),
        Some(file) => {
            let data = read_limited(file).map_err(err)?;
            Ok(String::from_utf8_lossy(&data).into_owned())
        }
    }
}

/// Opens the regular file `path` inside `root`, resolving every component inside it the way a
/// chroot would: absolute symlink targets restart at `root`, `..` never climbs above it.
///
/// Each component is opened with `O_NOFOLLOW` relative to the already opened parent directory
/// (through `/proc/self/fd/N/NAME`, which needs no unsafe code), so a symlink swapped in during
/// the walk is refused rather than followed to the host. `Ok(None)` when the file does not
/// exist (or a parent is not a directory). The final open uses `O_NONBLOCK` so a FIFO cannot
/// hang the caller; anything but a regular file is an error.
fn open_in_root(root: &Path, path: &str) -> io::Result<Option<File>> {
    let root_dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(root)?;
    let mut stack: Vec<File> = Vec::new();
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front_components(&mut pending, Path::new(path));
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            stack.pop();
            continue;
        }
        let parent = stack.last().unwrap_or(&root_dir);
        let via_proc = Path::new("/proc/self/fd")
            .join(parent.as_raw_fd().to_string())
            .join(&name);
        let last = pending.is_empty();
        let flags = libc::O_NOFOLLOW
            | if last {
                libc::O_NONBLOCK
            } else {
                libc::O_DIRECTORY
            };
        match OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(&via_proc)
        {
            Ok(file) if last => {
                if !file.metadata()?.is_file() {
                    return Err(io::Error::other("not a regular file"));
                }
                return Ok(Some(file));
            }
            Ok(dir) => stack.push(dir),
            // A symlink: `O_NOFOLLOW` fails with ELOOP, or with ENOTDIR when combined with
            // `O_DIRECTORY`. ENOTDIR may also be a plain file in the way; readlink tells.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                let target = match fs::read_link(&via_proc) {
                    Ok(target) => target,
                    Err(_) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
                    Err(_) => return Err(e),
                };
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other("too many levels of symbolic links"));
                }
                if target.is_absolute() {
                    stack.clear();
                }
                push_front_components(&mut pending, &target);
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    // The path ended in `..` or an empty symlink: it names a directory.
    Err(io::Error::other("not a regular file"))
}

/// Puts the components of `path` (names and `..`; root and `.` dropped) in front of `pending`.
fn push_front_components(pending: &mut VecDeque<OsString>, path: &Path) {
    for c in path.components().rev() {
        match c {
            Component::Normal(n) => pending.push_front(n.to_owned()),
            Component::ParentDir => pending.push_front("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
}

/// Docker's default capability set.
const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

fn build_process(
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    user: &ResolvedUser,
    tty: bool,
    host: &Host,
) -> Result<Process, SpecError> {
    let caps: Capabilities = DEFAULT_CAPS.into_iter().collect();
    // Like docker: bounding, effective and permitted; no inheritable or ambient set, so a
    // non-root user loses them all at execve.
    let mut capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()?;
    capabilities.set_inheritable(None);
    capabilities.set_ambient(None);

    let mut user_builder = UserBuilder::default().uid(user.uid).gid(user.gid);
    if !user.additional_gids.is_empty() {
        user_builder = user_builder.additional_gids(user.additional_gids.clone());
    }

    let mut process = ProcessBuilder::default()
        .terminal(tty)
        .user(user_builder.build()?)
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .no_new_privileges(false)
        .build()?;
    // runc refuses a hard limit above its own, so never ask for more than the host gives.
    let rlimits = match host.nofile_hard {
        Some(hard) => {
            let n = hard.min(DEFAULT_NOFILE);
            Some(vec![PosixRlimitBuilder::default()
                .typ(PosixRlimitType::RlimitNofile)
                .soft(n)
                .hard(n)
                .build()?])
        }
        None => None, // unknown: inherit runc's limits
    };
    process.set_rlimits(rlimits);
    Ok(process)
}

/// The hard `Max open files` limit from `/proc/self/limits` (`unlimited` as `u64::MAX`).
fn parse_nofile_hard(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let hard = line
        .strip_prefix("Max open files")?
        .split_whitespace()
        .nth(1)?;
    if hard == "unlimited" {
        Some(u64::MAX)
    } else {
        hard.parse().ok()
    }
}

// ---------------------------------------------------------------------------------------------
// Mounts and Linux settings
// ---------------------------------------------------------------------------------------------

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| (*o).to_owned()).collect::<Vec<_>>())
        .build()?)
}

/// runc's default mounts (with docker's options on /proc).
///
/// `/sys` is a fresh sysfs mount in both network modes. Mounting sysfs needs a network
/// namespace owned by the mounting user namespace; as real root that holds for the host's
/// namespace too (checked with runc 1.1.5: sysfs mounts fine with `--net host`), so the
/// bind-mount fallback podman uses for rootless host networking is not needed. It would also be
/// worse here: an `rbind` of `/sys` drags in the host's submounts (fuse connections, debugfs,
/// bpf...) and runc 1.1 applies `ro` only to the top mount, leaving those writable.
///
/// `/sys/fs/cgroup` (`cgroup`, ro) works on this hybrid cgroup v1 host with runc 1.1.5: runc
/// mounts a tmpfs and binds each v1 controller read-only (the v2 `unified` hierarchy is not
/// shown inside); on pure v2 runc mounts cgroup2.
fn default_mounts() -> Result<Vec<Mount>, SpecError> {
    Ok(vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", "ro"],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", "ro"],
        )?,
    ])
}

/// A parsed `-v`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Volume {
    source: PathBuf,
    dest: String,
    read_only: bool,
}

/// Lexically normalises an absolute container path: no `.` or empty components; `..` refused
/// (runc would clamp it at the root, which is rarely what was meant).
fn normalize_dest(dest: &str) -> Result<String, String> {
    if !dest.starts_with('/') {
        return Err(format!("container path {dest:?} is not absolute"));
    }
    let mut out = String::new();
    for part in dest.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("container path {dest:?} contains '..'")),
            name => {
                out.push('/');
                out.push_str(name);
            }
        }
    }
    if out.is_empty() {
        return Err("cannot mount over the container's root directory".to_owned());
    }
    Ok(out)
}

fn parse_volume(spec: &str) -> Result<Volume, SpecError> {
    let bad = |reason: String| SpecError::Volume {
        spec: spec.to_owned(),
        reason,
    };
    if spec.contains('\0') {
        return Err(bad("it contains a NUL byte".to_owned()));
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let (src, dst, options) = match parts.as_slice() {
        [src, dst] => (*src, *dst, None),
        [src, dst, opts] => (*src, *dst, Some(*opts)),
        _ => return Err(bad("expected SRC:DST or SRC:DST:OPTIONS".to_owned())),
    };
    if src.is_empty() {
        return Err(bad("the host path is empty".to_owned()));
    }
    if !src.starts_with('/') {
        let reason = if src.contains('/') || src.starts_with('.') {
            format!("host path {src:?} is not absolute")
        } else {
            format!("named volumes ({src:?}) are not supported; give an absolute host path")
        };
        return Err(bad(reason));
    }
    let dest = normalize_dest(dst).map_err(bad)?;
    let mut read_only = None;
    if let Some(options) = options {
        for opt in options.split(',') {
            let ro = match opt {
                "ro" => true,
                "rw" => false,
                other => {
                    return Err(bad(format!(
                        "unknown option {other:?}; only ro and rw are supported"
                    )))
                }
            };
            if read_only.replace(ro).is_some() {
                return Err(bad("give only one of ro and rw".to_owned()));
            }
        }
    }
    let source = PathBuf::from(src);
    fs::metadata(&source).map_err(|e| SpecError::VolumeSource {
        spec: spec.to_owned(),
        path: source.clone(),
        source: e,
    })?;
    Ok(Volume {
        source,
        dest,
        read_only: read_only.unwrap_or(false),
    })
}

/// `true` when `path` is `dir` or inside it.
fn is_under(path: &Path, dir: &str) -> bool {
    path.starts_with(dir)
}

/// Default mounts, minus those a volume covers (docker: a user mount replaces a default one at
/// the same place, and one over `/dev` replaces the `/dev/*` ones), then the volumes in order,
/// then the host's `/etc/resolv.conf` for `--net host`.
fn build_mounts(volumes: Vec<Volume>, net: NetMode, host: &Host) -> Result<Vec<Mount>, SpecError> {
    let mut seen = std::collections::HashSet::new();
    for v in &volumes {
        if !seen.insert(v.dest.as_str()) {
            return Err(SpecError::DuplicateMount {
                dest: v.dest.clone(),
            });
        }
    }
    let covered = |dest: &Path| volumes.iter().any(|v| is_under(dest, &v.dest));
    let mut mounts: Vec<Mount> = default_mounts()?
        .into_iter()
        .filter(|m| !covered(m.destination()))
        .collect();
    for v in &volumes {
        let mut options = vec!["rbind", "rprivate"];
        if v.read_only {
            options.push("ro");
        }
        mounts.push(
            MountBuilder::default()
                .destination(v.dest.as_str())
                .typ("bind")
                .source(v.source.clone())
                .options(options.into_iter().map(str::to_owned).collect::<Vec<_>>())
                .build()?,
        );
    }
    // Sharing the host's network means sharing its resolver configuration too.
    if net == NetMode::Host && host.resolv_conf && !covered(Path::new("/etc/resolv.conf")) {
        mounts.push(mount(
            "/etc/resolv.conf",
            "bind",
            "/etc/resolv.conf",
            &["rbind", "rprivate", "nosuid", "nodev", "noexec", "ro"],
        )?);
    }
    Ok(mounts)
}

fn build_linux(net: NetMode, host: &Host) -> Result<Linux, SpecError> {
    let mut kinds = vec![
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ];
    if net == NetMode::None {
        kinds.push(LinuxNamespaceType::Network);
    }
    // Docker makes the cgroup namespace private only on cgroup v2, but runc 1.1.5 handles it on
    // this hybrid v1 host too (checked), and it keeps the host's cgroup paths out of the
    // container. Kernels without cgroup namespaces (< 4.6) share the host's.
    if host.cgroup_ns {
        kinds.push(LinuxNamespaceType::Cgroup);
    }
    let namespaces = kinds
        .into_iter()
        .map(|typ| LinuxNamespaceBuilder::default().typ(typ).build())
        .collect::<Result<Vec<_>, _>>()?;
    // Deny every device in the cgroup device controller; runc then allows its standard set
    // (null, zero, full, tty, random, urandom, pts, ptmx...) and creates those nodes.
    let deny_all = LinuxDeviceCgroupBuilder::default()
        .allow(false)
        .access("rwm")
        .build()?;
    let resources = LinuxResourcesBuilder::default()
        .devices(vec![deny_all])
        .build()?;
    let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    // No seccomp profile: runc runs without a filter (docker's default profile is future work).
    Ok(LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .masked_paths(strings(&[
            "/proc/acpi",
            "/proc/kcore",
            "/proc/keys",
            "/proc/latency_stats",
            "/proc/timer_list",
            "/proc/timer_stats",
            "/proc/sched_debug",
            "/sys/firmware",
            "/proc/scsi",
        ]))
        .readonly_paths(strings(&[
            "/proc/asound",
            "/proc/bus",
            "/proc/fs",
            "/proc/irq",
            "/proc/sys",
            "/proc/sysrq-trigger",
        ]))
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};
    use proptest::prelude::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
                          # a comment\n\
                          \n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          broken:x:notanumber:1\n\
                          nohome:x:1001:1001\n";
    const GROUP: &str = "root:x:0:root\n\
                         wheel:x:10:root,app\n\
                         app:x:1000:\n\
                         audio:x:29:app\n\
                         staff:x:50:\n";

    fn host() -> Host {
        Host {
            nofile_hard: Some(20000),
            resolv_conf: true,
            cgroup_ns: true,
        }
    }

    fn opts() -> RunOptions {
        RunOptions {
            command: vec![],
            entrypoint: None,
            env: vec![],
            env_files: vec![],
            volumes: vec![],
            workdir: None,
            user: None,
            net: NetMode::Host,
            read_only: false,
            tty: false,
            hostname: "abc123".to_owned(),
        }
    }

    fn image(
        entrypoint: Option<&[&str]>,
        cmd: Option<&[&str]>,
        env: &[&str],
        workdir: Option<&str>,
        user: Option<&str>,
    ) -> ImageConfiguration {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut c = ConfigBuilder::default().env(strings(env));
        if let Some(ep) = entrypoint {
            c = c.entrypoint(strings(ep));
        }
        if let Some(cmd) = cmd {
            c = c.cmd(strings(cmd));
        }
        if let Some(w) = workdir {
            c = c.working_dir(w);
        }
        if let Some(u) = user {
            c = c.user(u);
        }
        ImageConfigurationBuilder::default()
            .config(c.build().unwrap())
            .build()
            .unwrap()
    }

    fn rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(dir.path().join("etc/passwd"), PASSWD).unwrap();
        fs::write(dir.path().join("etc/group"), GROUP).unwrap();
        dir
    }

    fn build(img: &ImageConfiguration, o: &RunOptions, root: &Path) -> Result<Spec, SpecError> {
        build_spec_on(img, o, root, &host())
    }

    fn args_of(spec: &Spec) -> Vec<String> {
        spec.process().as_ref().unwrap().args().clone().unwrap()
    }

    fn env_of(spec: &Spec) -> Vec<String> {
        spec.process().as_ref().unwrap().env().clone().unwrap()
    }

    fn user_of(spec: &Spec) -> (u32, u32, Vec<u32>) {
        let u = spec.process().as_ref().unwrap().user();
        (
            u.uid(),
            u.gid(),
            u.additional_gids().clone().unwrap_or_default(),
        )
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    // ---- args ------------------------------------------------------------------------------

    #[test]
    fn args_follow_docker_rules() {
        let root = rootfs();
        let img = image(Some(&["/ep", "-x"]), Some(&["cmd", "1"]), &[], None, None);
        let run = |o: &RunOptions| build(&img, o, root.path()).map(|s| args_of(&s));

        assert_eq!(run(&opts()).unwrap(), s(&["/ep", "-x", "cmd", "1"]));
        let o = RunOptions {
            command: s(&["other"]),
            ..opts()
        };
        assert_eq!(run(&o).unwrap(), s(&["/ep", "-x", "other"]));
        // --entrypoint drops the image's Cmd...
        let o = RunOptions {
            entrypoint: Some("/bin/sh".into()),
            ..opts()
        };
        assert_eq!(run(&o).unwrap(), s(&["/bin/sh"]));
        // ...unless a command is given.
        let o = RunOptions {
            entrypoint: Some("/bin/sh".into()),
            command: s(&["-c", "true"]),
            ..opts()
        };
        assert_eq!(run(&o).unwrap(), s(&["/bin/sh", "-c", "true"]));
        // --entrypoint '' clears it.
        let o = RunOptions {
            entrypoint: Some(String::new()),
            command: s(&["ls", "-l"]),
            ..opts()
        };
        assert_eq!(run(&o).unwrap(), s(&["ls", "-l"]));
        let o = RunOptions {
            entrypoint: Some(String::new()),
            ..opts()
        };
        assert!(matches!(run(&o), Err(SpecError::NoCommand)));
    }

    #[test]
    fn no_entrypoint_or_cmd_is_a_clear_error() {
        let root = rootfs();
        let err = build(&image(None, None, &[], None, None), &opts(), root.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "image has no Entrypoint or Cmd; give a command after the image name"
        );
        // Cmd only, or a command only, is enough.
        let spec = build(
            &image(None, Some(&["sh"]), &[], None, None),
            &opts(),
            root.path(),
        );
        assert_eq!(args_of(&spec.unwrap()), s(&["sh"]));
        let o = RunOptions {
            command: s(&["true"]),
            ..opts()
        };
        let spec = build(&image(None, None, &[], None, None), &o, root.path());
        assert_eq!(args_of(&spec.unwrap()), s(&["true"]));
    }

    #[test]
    fn bad_args_are_rejected() {
        let root = rootfs();
        let img = image(None, None, &[], None, None);
        let o = RunOptions {
            command: s(&["", "x"]),
            ..opts()
        };
        assert!(matches!(
            build(&img, &o, root.path()),
            Err(SpecError::EmptyProgram)
        ));
        let o = RunOptions {
            command: s(&["echo", "a\0b"]),
            ..opts()
        };
        let err = build(&img, &o, root.path()).unwrap_err();
        assert!(err.to_string().contains("argument 1"), "{err}");
    }

    // ---- env -------------------------------------------------------------------------------

    #[test]
    fn env_layers_and_defaults() {
        let root = rootfs();
        let dir = tempfile::tempdir().unwrap();
        let f1 = dir.path().join("one.env");
        fs::write(
            &f1,
            "# comment\n\n  A=file1\nB=from file # not a comment\r\nC\n",
        )
        .unwrap();
        let f2 = dir.path().join("two.env");
        fs::write(&f2, "\u{feff}A=file2\n").unwrap();
        std::env::set_var("LAZYPULL_SPEC_TEST_C", "from-process");
        let f3 = dir.path().join("three.env");
        fs::write(&f3, "LAZYPULL_SPEC_TEST_C\nLAZYPULL_SPEC_TEST_UNSET_1\n").unwrap();

        let img = image(
            None,
            Some(&["sh"]),
            &["A=image", "IMG=1", "HOSTNAME=img"],
            None,
            None,
        );
        let o = RunOptions {
            env_files: vec![f1, f2, f3],
            env: s(&["IMG=2", "E=x=y", "LAZYPULL_SPEC_TEST_UNSET_2", "EMPTY="]),
            tty: true,
            ..opts()
        };
        let env = env_of(&build(&img, &o, root.path()).unwrap());
        assert_eq!(
            env,
            s(&[
                &format!("PATH={DEFAULT_PATH}"),
                "HOSTNAME=img",
                "TERM=xterm",
                "A=file2",
                "IMG=2",
                "B=from file # not a comment",
                "LAZYPULL_SPEC_TEST_C=from-process",
                "E=x=y",
                "EMPTY=",
                "HOME=/root",
            ])
        );
    }

    #[test]
    fn image_path_and_home_win_over_defaults() {
        let root = rootfs();
        let img = image(
            None,
            Some(&["sh"]),
            &["PATH=/opt/bin", "HOME=/srv"],
            None,
            None,
        );
        let env = env_of(&build(&img, &opts(), root.path()).unwrap());
        assert_eq!(env, s(&["PATH=/opt/bin", "HOSTNAME=abc123", "HOME=/srv"]));
    }

    #[test]
    fn bad_env_is_rejected() {
        let root = rootfs();
        let img = image(None, Some(&["sh"]), &[], None, None);
        for bad in ["=x", "", "A\0B=1", "A=1\0"] {
            let o = RunOptions {
                env: s(&[bad]),
                ..opts()
            };
            let err = build(&img, &o, root.path()).unwrap_err();
            assert!(matches!(err, SpecError::EnvVar { .. }), "{bad:?}: {err}");
        }
        let img = image(None, Some(&["sh"]), &["NOEQUALS"], None, None);
        let err = build(&img, &opts(), root.path()).unwrap_err();
        assert!(err.to_string().contains("the image config"), "{err}");
    }

    #[test]
    fn bad_env_files_are_rejected_with_the_line() {
        let root = rootfs();
        let img = image(None, Some(&["sh"]), &[], None, None);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.env");
        fs::write(&f, "OK=1\nBAD KEY=1\n").unwrap();
        let o = RunOptions {
            env_files: vec![f.clone()],
            ..opts()
        };
        let err = build(&img, &o, root.path()).unwrap_err();
        assert!(
            matches!(err, SpecError::EnvFileLine { line: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("bad.env:2"), "{err}");

        fs::write(&f, b"A=\xff\n").unwrap();
        let err = build(&img, &o, root.path()).unwrap_err();
        assert!(
            matches!(err, SpecError::EnvFileLine { line: 1, .. }),
            "{err}"
        );

        fs::write(&f, "=novalue\n").unwrap();
        let err = build(&img, &o, root.path()).unwrap_err();
        assert!(matches!(err, SpecError::EnvVar { .. }), "{err}");

        let o = RunOptions {
            env_files: vec![dir.path().join("missing")],
            ..opts()
        };
        let err = build(&img, &o, root.path()).unwrap_err();
        assert!(matches!(err, SpecError::EnvFile { .. }), "{err}");
        assert!(err.to_string().contains("--env-file"), "{err}");
    }

    // ---- cwd -------------------------------------------------------------------------------

    #[test]
    fn workdir_resolution() {
        let root = rootfs();
        let cwd = |img: &ImageConfiguration, o: &RunOptions| {
            build(img, o, root.path()).map(|s| s.process().as_ref().unwrap().cwd().clone())
        };
        let plain = image(None, Some(&["sh"]), &[], None, None);
        let with = image(None, Some(&["sh"]), &[], Some("/app"), None);
        assert_eq!(cwd(&plain, &opts()).unwrap(), PathBuf::from("/"));
        assert_eq!(cwd(&with, &opts()).unwrap(), PathBuf::from("/app"));
        let o = RunOptions {
            workdir: Some("/tmp".into()),
            ..opts()
        };
        assert_eq!(cwd(&with, &o).unwrap(), PathBuf::from("/tmp"));
        let o = RunOptions {
            workdir: Some("rel".into()),
            ..opts()
        };
        let err = cwd(&with, &o).unwrap_err();
        assert!(
            matches!(err, SpecError::Workdir { origin: "-w", .. }),
            "{err}"
        );
        let rel = image(None, Some(&["sh"]), &[], Some("app"), None);
        let err = cwd(&rel, &opts()).unwrap_err();
        assert!(matches!(
            err,
            SpecError::Workdir {
                origin: "the image config",
                ..
            }
        ));
    }

    // ---- user ------------------------------------------------------------------------------

    #[test]
    fn user_resolution() {
        let root = rootfs();
        let r = |spec: &str| resolve_user(root.path(), spec, "-u");
        let home = |spec: &str| r(spec).unwrap().home;
        let ids = |spec: &str| {
            let u = r(spec).unwrap();
            (u.uid, u.gid, u.additional_gids)
        };
        // Default user: root, with root's supplementary groups.
        assert_eq!(ids(""), (0, 0, vec![0, 10]));
        assert_eq!(ids("root"), (0, 0, vec![0, 10]));
        assert_eq!(ids("app"), (1000, 1000, vec![10, 29]));
        assert_eq!(home("app"), "/home/app");
        // Numeric uid with an entry: its gid and groups.
        assert_eq!(ids("1000"), (1000, 1000, vec![10, 29]));
        // Numeric uid without an entry: gid 0, home /.
        assert_eq!(ids("4242"), (4242, 0, vec![]));
        assert_eq!(home("4242"), "/");
        assert_eq!(home("nohome"), "/");
        // Explicit groups: by name or number, and no supplementary groups (runc).
        assert_eq!(ids("app:staff"), (1000, 50, vec![]));
        assert_eq!(ids("app:777"), (1000, 777, vec![]));
        assert_eq!(ids("4242:4343"), (4242, 4343, vec![]));
        assert_eq!(ids(":audio"), (0, 29, vec![]));
    }

    #[test]
    fn user_errors() {
        let root = rootfs();
        let r = |spec: &str| resolve_user(root.path(), spec, "-u");
        assert!(matches!(r("nobody"), Err(SpecError::UnknownUser { .. })));
        assert!(matches!(r("broken"), Err(SpecError::UnknownUser { .. })));
        assert!(matches!(
            r("app:nogroup"),
            Err(SpecError::UnknownGroup { .. })
        ));
        for bad in [
            "a:b:c",
            "app:",
            "4294967296",
            "2147483648",
            "app:99999999999",
            "a\0",
        ] {
            assert!(matches!(r(bad), Err(SpecError::UserSpec { .. })), "{bad:?}");
        }
        let msg = r("nobody").unwrap_err().to_string();
        assert!(
            msg.contains("/etc/passwd") && msg.contains("-u 1000"),
            "{msg}"
        );
    }

    #[test]
    fn user_from_image_and_flag() {
        let root = rootfs();
        let img = image(None, Some(&["sh"]), &[], None, Some("app"));
        let spec = build(&img, &opts(), root.path()).unwrap();
        assert_eq!(user_of(&spec), (1000, 1000, vec![10, 29]));
        assert!(env_of(&spec).contains(&"HOME=/home/app".to_owned()));
        let o = RunOptions {
            user: Some("0:0".into()),
            ..opts()
        };
        assert_eq!(
            user_of(&build(&img, &o, root.path()).unwrap()),
            (0, 0, vec![])
        );
        // An empty -u keeps the image's user.
        let o = RunOptions {
            user: Some(String::new()),
            ..opts()
        };
        assert_eq!(user_of(&build(&img, &o, root.path()).unwrap()).0, 1000);
    }

    #[test]
    fn missing_passwd_allows_numeric_ids_only() {
        let root = tempfile::tempdir().unwrap();
        let r = |spec: &str| resolve_user(root.path(), spec, "-u");
        assert_eq!(r("").unwrap().uid, 0);
        assert_eq!(r("123:456").unwrap().gid, 456);
        assert!(matches!(r("app"), Err(SpecError::UnknownUser { .. })));
        assert!(matches!(r("1:grp"), Err(SpecError::UnknownGroup { .. })));
    }

    /// A file outside the rootfs that looks like a passwd file with a user `evil`.
    fn host_passwd() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("passwd"), "evil:x:4242:4242::/:/bin/sh\n").unwrap();
        fs::write(dir.path().join("group"), "evilgrp:x:4343:\n").unwrap();
        dir
    }

    #[test]
    fn symlinked_passwd_never_reads_the_host() {
        let hostdir = host_passwd();
        let host_file = hostdir.path().join("passwd");

        // etc/passwd -> /<hostdir>/passwd: resolved inside the rootfs, where it doesn't exist.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        symlink(&host_file, root.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            resolve_user(root.path(), "evil", "-u"),
            Err(SpecError::UnknownUser { .. })
        ));
        // ...but a copy at the same path inside the rootfs is what it means.
        let inside = root.path().join(host_file.strip_prefix("/").unwrap());
        fs::create_dir_all(inside.parent().unwrap()).unwrap();
        fs::write(&inside, "evil:x:7:7::/inside:/bin/sh\n").unwrap();
        let u = resolve_user(root.path(), "evil", "-u").unwrap();
        assert_eq!((u.uid, u.home.as_str()), (7, "/inside"));

        // Relative escape with ..: clamped at the rootfs root.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        let dots = "../".repeat(root.path().components().count() + 3);
        symlink(
            format!("{dots}{}", host_file.strip_prefix("/").unwrap().display()),
            root.path().join("etc/passwd"),
        )
        .unwrap();
        assert!(matches!(
            resolve_user(root.path(), "evil", "-u"),
            Err(SpecError::UnknownUser { .. })
        ));

        // A symlinked etc directory pointing at the host.
        let root = tempfile::tempdir().unwrap();
        symlink(hostdir.path(), root.path().join("etc")).unwrap();
        assert!(matches!(
            resolve_user(root.path(), "evil", "-u"),
            Err(SpecError::UnknownUser { .. })
        ));
        assert!(matches!(
            resolve_user(root.path(), "0:evilgrp", "-u"),
            Err(SpecError::UnknownGroup { .. })
        ));
    }

    #[test]
    fn symlinks_inside_the_rootfs_are_followed() {
        let root = rootfs();
        fs::create_dir(root.path().join("data")).unwrap();
        fs::rename(root.path().join("etc/passwd"), root.path().join("data/pw")).unwrap();
        symlink("/data/../data/./pw", root.path().join("etc/passwd")).unwrap();
        fs::rename(root.path().join("etc"), root.path().join("realetc")).unwrap();
        symlink("realetc", root.path().join("etc")).unwrap();
        assert_eq!(resolve_user(root.path(), "app", "-u").unwrap().uid, 1000);
    }

    #[test]
    fn unsafe_passwd_files_are_errors_not_hangs() {
        // A symlink loop.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        symlink("passwd", root.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            resolve_user(root.path(), "app", "-u"),
            Err(SpecError::RootfsFile { .. })
        ));
        // A FIFO (opening it blocking would hang forever).
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        nix::unistd::mkfifo(
            &root.path().join("etc/passwd"),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        assert!(matches!(
            resolve_user(root.path(), "app", "-u"),
            Err(SpecError::RootfsFile { .. })
        ));
        // A directory.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc/passwd")).unwrap();
        assert!(matches!(
            resolve_user(root.path(), "1", "-u"),
            Err(SpecError::RootfsFile { .. })
        ));
        // Too large.
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        let f = File::create(root.path().join("etc/passwd")).unwrap();
        f.set_len(MAX_CONFIG_FILE + 1).unwrap();
        let err = resolve_user(root.path(), "app", "-u").unwrap_err();
        assert!(err.to_string().contains("MiB"), "{err}");
        // etc is a file: like a missing passwd.
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("etc"), "").unwrap();
        assert_eq!(resolve_user(root.path(), "5", "-u").unwrap().uid, 5);
    }

    // ---- mounts ----------------------------------------------------------------------------

    fn mount_dests(spec: &Spec) -> Vec<String> {
        spec.mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect()
    }

    #[test]
    fn volumes_parse() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let v = parse_volume(&format!("{src}:/data")).unwrap();
        assert_eq!((v.dest.as_str(), v.read_only), ("/data", false));
        assert_eq!(v.source, dir.path());
        let v = parse_volume(&format!("{src}://data/./x/:ro")).unwrap();
        assert_eq!((v.dest.as_str(), v.read_only), ("/data/x", true));
        assert!(!parse_volume(&format!("{src}:/data:rw")).unwrap().read_only);

        let bad = |spec: String, needle: &str| {
            let err = parse_volume(&spec).unwrap_err();
            assert!(err.to_string().contains(needle), "{spec}: {err}");
        };
        bad("rel/path:/data".into(), "not absolute");
        bad("./x:/data".into(), "not absolute");
        bad("myvol:/data".into(), "named volumes");
        bad(format!("{src}:data"), "not absolute");
        bad(format!("{src}:/"), "root directory");
        bad(format!("{src}:/a/../b"), "'..'");
        bad(format!("{src}:/data:rx"), "unknown option");
        bad(format!("{src}:/data:ro,rw"), "only one");
        bad(format!("{src}:/data:"), "unknown option");
        bad(src.clone(), "SRC:DST");
        bad(format!("{src}:/a:ro:x"), "SRC:DST");
        bad(":/data".to_owned(), "empty");
        let err = parse_volume(&format!("{src}/missing:/data")).unwrap_err();
        assert!(matches!(err, SpecError::VolumeSource { .. }), "{err}");
    }

    #[test]
    fn volumes_become_bind_mounts_and_replace_defaults() {
        let root = rootfs();
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().display().to_string();
        let img = image(None, Some(&["sh"]), &[], None, None);
        let o = RunOptions {
            volumes: vec![format!("{src}:/data:ro"), format!("{src}:/dev/shm")],
            net: NetMode::None,
            ..opts()
        };
        let spec = build(&img, &o, root.path()).unwrap();
        assert_eq!(
            mount_dests(&spec),
            s(&[
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/data",
                "/dev/shm"
            ])
        );
        let data = &spec.mounts().as_ref().unwrap()[6];
        assert_eq!(data.typ().as_deref(), Some("bind"));
        assert_eq!(data.source().as_deref(), Some(dir.path()));
        assert_eq!(
            data.options().clone().unwrap(),
            s(&["rbind", "rprivate", "ro"])
        );
        let shm = &spec.mounts().as_ref().unwrap()[7];
        assert_eq!(shm.options().clone().unwrap(), s(&["rbind", "rprivate"]));

        // A volume over /dev replaces every /dev mount.
        let o = RunOptions {
            volumes: vec![format!("{src}:/dev")],
            ..opts()
        };
        let dests = mount_dests(&build(&img, &o, root.path()).unwrap());
        assert!(!dests.iter().any(|d| d.starts_with("/dev/")), "{dests:?}");

        let o = RunOptions {
            volumes: vec![format!("{src}:/x"), format!("{src}:/x/")],
            ..opts()
        };
        let err = build(&img, &o, root.path()).unwrap_err();
        assert!(matches!(err, SpecError::DuplicateMount { .. }), "{err}");
    }

    #[test]
    fn network_modes() {
        let root = rootfs();
        let img = image(None, Some(&["sh"]), &[], None, None);
        let ns = |spec: &Spec| -> Vec<LinuxNamespaceType> {
            let linux = spec.linux().as_ref().unwrap();
            linux
                .namespaces()
                .as_ref()
                .unwrap()
                .iter()
                .map(|n| n.typ())
                .collect()
        };
        let host_spec = build(&img, &opts(), root.path()).unwrap();
        assert!(!ns(&host_spec).contains(&LinuxNamespaceType::Network));
        assert!(ns(&host_spec).contains(&LinuxNamespaceType::Cgroup));
        assert_eq!(mount_dests(&host_spec).last().unwrap(), "/etc/resolv.conf");

        let o = RunOptions {
            net: NetMode::None,
            ..opts()
        };
        let none_spec = build(&img, &o, root.path()).unwrap();
        assert!(ns(&none_spec).contains(&LinuxNamespaceType::Network));
        assert!(!mount_dests(&none_spec).contains(&"/etc/resolv.conf".to_owned()));

        let no_cgroupns = Host {
            cgroup_ns: false,
            resolv_conf: false,
            ..host()
        };
        let spec = build_spec_on(&img, &opts(), root.path(), &no_cgroupns).unwrap();
        assert!(!ns(&spec).contains(&LinuxNamespaceType::Cgroup));
        assert!(!mount_dests(&spec).contains(&"/etc/resolv.conf".to_owned()));
    }

    #[test]
    fn process_and_root_settings() {
        let root = rootfs();
        let img = image(None, Some(&["sh"]), &[], None, None);
        let o = RunOptions {
            tty: true,
            read_only: true,
            ..opts()
        };
        let spec = build(&img, &o, root.path()).unwrap();
        assert_eq!(spec.hostname().as_deref(), Some("abc123"));
        assert_eq!(spec.annotations(), &None);
        let r = spec.root().as_ref().unwrap();
        assert_eq!(
            (r.path().as_path(), r.readonly()),
            (Path::new("rootfs"), Some(true))
        );
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.terminal(), Some(true));
        assert_eq!(p.no_new_privileges(), Some(false));
        assert_eq!(p.oom_score_adj(), None);
        let caps = p.capabilities().as_ref().unwrap();
        let expected: Capabilities = DEFAULT_CAPS.into_iter().collect();
        assert_eq!(caps.bounding().as_ref(), Some(&expected));
        assert_eq!(caps.effective().as_ref(), Some(&expected));
        assert_eq!(caps.permitted().as_ref(), Some(&expected));
        assert_eq!((caps.inheritable(), caps.ambient()), (&None, &None));
        let rl = p.rlimits().as_ref().unwrap();
        assert_eq!(rl.len(), 1);
        assert_eq!(
            (rl[0].typ(), rl[0].soft(), rl[0].hard()),
            (PosixRlimitType::RlimitNofile, 20000, 20000)
        );

        let big = Host {
            nofile_hard: Some(u64::MAX),
            ..host()
        };
        let spec = build_spec_on(&img, &o, root.path(), &big).unwrap();
        let rl = spec.process().as_ref().unwrap().rlimits().clone().unwrap();
        assert_eq!(
            (rl[0].soft(), rl[0].hard()),
            (DEFAULT_NOFILE, DEFAULT_NOFILE)
        );
        let unknown = Host {
            nofile_hard: None,
            ..host()
        };
        let spec = build_spec_on(&img, &o, root.path(), &unknown).unwrap();
        assert_eq!(spec.process().as_ref().unwrap().rlimits(), &None);

        let linux = spec.linux().as_ref().unwrap();
        assert!(linux
            .masked_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/kcore".to_owned()));
        assert!(linux
            .readonly_paths()
            .as_ref()
            .unwrap()
            .contains(&"/proc/sys".to_owned()));
        assert!(linux.seccomp().is_none());
    }

    #[test]
    fn hostname_is_checked() {
        let root = rootfs();
        let img = image(None, Some(&["sh"]), &[], None, None);
        for bad in [String::new(), "x".repeat(65), "a\0b".to_owned()] {
            let o = RunOptions {
                hostname: bad.clone(),
                ..opts()
            };
            let err = build(&img, &o, root.path()).unwrap_err();
            assert!(matches!(err, SpecError::Hostname { .. }), "{bad:?}");
        }
    }

    #[test]
    fn nofile_limit_is_parsed() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 20000                files     \n";
        assert_eq!(parse_nofile_hard(limits), Some(20000));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_nofile_hard(unlimited), Some(u64::MAX));
        assert_eq!(parse_nofile_hard("garbage"), None);
        assert!(Host::probe().nofile_hard.is_some());
    }

    // ---- write_config ----------------------------------------------------------------------

    #[test]
    fn write_config_is_atomic_and_loadable() {
        let root = rootfs();
        let bundle = tempfile::tempdir().unwrap();
        let img = image(Some(&["/bin/sh"]), None, &["A=1"], None, None);
        let spec = build(&img, &opts(), root.path()).unwrap();
        write_config(bundle.path(), &spec).unwrap();
        write_config(bundle.path(), &spec).unwrap(); // replaces
        let path = bundle.path().join("config.json");
        assert_eq!(Spec::load(&path).unwrap(), spec);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(bundle.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("config.json")]);
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(json["root"]["path"], "rootfs");
        assert_eq!(json["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");

        let err = write_config(&bundle.path().join("missing"), &spec).unwrap_err();
        assert!(matches!(err, SpecError::Write { .. }), "{err}");
    }

    // ---- never panics ----------------------------------------------------------------------

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn build_spec_never_panics(
            env in proptest::collection::vec(".{0,12}", 0..4),
            user in proptest::option::of("[a-z0-9:\\x00]{0,12}|.{0,12}"),
            volumes in proptest::collection::vec("(/tmp|/|[a-z.]{0,4})?(:[/a-z.]{0,6}){0,3}|.{0,16}", 0..3),
            workdir in proptest::option::of(".{0,8}"),
            entrypoint in proptest::option::of(".{0,6}"),
            command in proptest::collection::vec(".{0,6}", 0..3),
            image_env in proptest::collection::vec(".{0,10}", 0..3),
            image_user in proptest::option::of(".{0,10}"),
            hostname in ".{0,70}",
        ) {
            let root = rootfs();
            let ie: Vec<&str> = image_env.iter().map(String::as_str).collect();
            let img = image(None, Some(&["sh"]), &ie, workdir.as_deref(), image_user.as_deref());
            let o = RunOptions { env, user, volumes, workdir, entrypoint, command, hostname, ..opts() };
            let _ = build_spec(&img, &o, root.path());
        }
    }

    // ---- the real thing --------------------------------------------------------------------

    const RUNC: &str = "/usr/sbin/runc";
    const BUSYBOX: &str = "/bin/busybox";

    /// Deletes the container (whatever state it is in) when the test ends, pass or fail.
    struct RuncContainer<'a> {
        state: &'a Path,
        id: String,
    }

    impl Drop for RuncContainer<'_> {
        fn drop(&mut self) {
            let _ = Command::new(RUNC)
                .arg("--root")
                .arg(self.state)
                .args(["delete", "-f", &self.id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// `runc run` of the bundle with a deadline; returns (exit code, stdout, stderr).
    fn runc_run(state: &Path, bundle: &Path, name: &str) -> (Option<i32>, String, String) {
        let id = format!("lazypull-spec-{name}-{}", std::process::id());
        let _guard = RuncContainer {
            state,
            id: id.clone(),
        };
        let out_path = bundle.with_extension("stdout");
        let err_path = bundle.with_extension("stderr");
        let mut child = Command::new(RUNC)
            .arg("--root")
            .arg(state)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(&err_path).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("runc run did not finish within 60s");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (out, err) = (
            fs::read_to_string(&out_path).unwrap(),
            fs::read_to_string(&err_path).unwrap(),
        );
        eprintln!(
            "{RUNC} --root {} run --bundle {} {id}: {status}, stdout {out:?}, stderr {err:?}",
            state.display(),
            bundle.display()
        );
        (status.code(), out, err)
    }

    #[test]
    fn spec_runs_under_real_runc() {
        let root_user = nix::unistd::geteuid().is_root();
        if !root_user || !Path::new(RUNC).exists() || !Path::new(BUSYBOX).exists() {
            eprintln!("skipping spec_runs_under_real_runc: needs root, {RUNC} and {BUSYBOX}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        let rootfs = bundle.join("rootfs");
        for d in ["bin", "etc", "tmp"] {
            fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
        fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
        symlink("busybox", rootfs.join("bin/sh")).unwrap();
        fs::write(
            rootfs.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        )
        .unwrap();
        fs::write(rootfs.join("etc/group"), "root:x:0:\napp:x:1000:\n").unwrap();
        let data = tmp.path().join("data");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("f"), "hello from the volume\n").unwrap();
        let state = tmp.path().join("runc-state");

        // 1: env, workdir, user, read-only volume, --net none, exit status.
        let img = image(None, Some(&["sh"]), &["FOO=image"], None, None);
        let o = RunOptions {
            command: s(&[
                "sh",
                "-c",
                "echo $FOO; pwd; id -u; cat /data/f; cat /proc/net/dev | wc -l; \
                 touch /data/g 2>/dev/null || echo data-ro; exit 3",
            ]),
            env: s(&["FOO=bar"]),
            volumes: vec![format!("{}:/data:ro", data.display())],
            workdir: Some("/tmp".into()),
            user: Some("app".into()),
            net: NetMode::None,
            ..opts()
        };
        let spec = build_spec(&img, &o, &rootfs).unwrap();
        write_config(&bundle, &spec).unwrap();
        let (code, out, err) = runc_run(&state, &bundle, "none");
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "bar",
                "/tmp",
                "1000",
                "hello from the volume",
                "3",
                "data-ro"
            ],
            "stderr: {err}"
        );
        assert_eq!(code, Some(3), "stderr: {err}");
        assert!(!data.join("g").exists());

        // 2: --net host, --read-only, default (root) user, sysfs, resolv.conf, nofile limit.
        let o = RunOptions {
            command: s(&[
                "sh",
                "-c",
                "hostname; id -u; touch /probe 2>/dev/null && echo rw || echo ro; \
                 test -d /sys/kernel && echo sysfs; test -f /etc/resolv.conf && echo resolv; \
                 ulimit -n",
            ]),
            net: NetMode::Host,
            read_only: true,
            hostname: "spec-test".into(),
            ..opts()
        };
        let spec = build_spec(&img, &o, &rootfs).unwrap();
        write_config(&bundle, &spec).unwrap();
        let (code, out, err) = runc_run(&state, &bundle, "host");
        let nofile = Host::probe()
            .nofile_hard
            .unwrap()
            .min(DEFAULT_NOFILE)
            .to_string();
        let mut expected = vec!["spec-test", "0", "ro", "sysfs"];
        if Host::probe().resolv_conf {
            expected.push("resolv");
        }
        expected.push(&nofile);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines, expected, "stderr: {err}");
        assert_eq!(code, Some(0), "stderr: {err}");
    }
}
