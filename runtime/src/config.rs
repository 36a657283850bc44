//! Settings: `/etc/lazypull/config.toml`, every key overridable by a command-line flag.
//!
//! The file is optional at its default path and required when named with `--config`; unknown
//! keys are an error so a misspelt setting never silently does nothing.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the configuration file is looked for unless `--config` names another.
pub const DEFAULT_CONFIG: &str = "/etc/lazypull/config.toml";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (line and key).
        detail: String,
    },
}

/// Output format of the daemon's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The keys of `config.toml`; all optional, so a file may set only what differs.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct FileConfig {
    /// State directory.
    pub root: Option<PathBuf>,
    /// Daemon socket.
    pub address: Option<PathBuf>,
    /// Chunk cache budget in MiB.
    pub cache_mib: Option<u64>,
    /// Fetch whole layers in the background after mounting.
    pub background_fill: Option<bool>,
    /// Fetch the files a layer marks as needed first (eStargz prefetch landmark) on mount.
    pub prefetch: Option<bool>,
    /// Background fill cap, MiB/s (0 = none).
    pub fill_rate: Option<u64>,
    /// Seconds a read may wait on the registry before failing.
    pub fetch_timeout: Option<u64>,
    /// Directories with containerd-style `hosts.toml` files.
    pub hosts_dir: Option<Vec<PathBuf>>,
    /// Registries spoken to over plain HTTP.
    pub insecure_registries: Option<Vec<String>>,
    /// OCI runtime binary (name in PATH or absolute path).
    pub runtime: Option<String>,
    /// Log format.
    pub log_format: Option<LogFormat>,
    /// Prometheus endpoint address (`host:port`); empty or absent: off.
    pub metrics_address: Option<String>,
    /// containerd snapshotter socket; empty disables the snapshotter.
    pub snapshotter_socket: Option<PathBuf>,
    /// Directory at which to serve the podman / CRI-O additional layer store; absent or
    /// empty: off.
    pub layer_store: Option<PathBuf>,
}

impl FileConfig {
    /// Loads `path`; a missing file is an error only when `required` (named by `--config`).
    pub fn load(path: &Path, required: bool) -> Result<FileConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(FileConfig::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    }
}

/// Every setting resolved: flag, else config file, else default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// State directory: cache, layer mounts, containers, image records, daemon log.
    pub root: PathBuf,
    /// The daemon's unix socket.
    pub address: PathBuf,
    /// Chunk cache budget in MiB.
    pub cache_mib: u64,
    /// Fetch whole layers in the background after mounting.
    pub background_fill: bool,
    /// Fetch the prefetch landmark's files first on mount.
    pub prefetch: bool,
    /// Background fill cap, MiB/s (0 = none).
    pub fill_rate: u64,
    /// Seconds a read may wait on the registry before failing.
    pub fetch_timeout: u64,
    /// Directories with containerd-style `hosts.toml` files.
    pub hosts_dir: Vec<PathBuf>,
    /// Registries spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// OCI runtime binary.
    pub runtime: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Prometheus endpoint (`host:port`), if any.
    pub metrics_address: Option<String>,
    /// The containerd snapshotter's unix socket (`proxy_plugins`); `None` when disabled.
    pub snapshotter_socket: Option<PathBuf>,
    /// Where the containers/storage additional layer store is mounted; `None` when off.
    pub layer_store: Option<PathBuf>,
}

/// The command-line side of [`Settings`]: `None` means "not given on the command line".
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SettingsArgs {
    /// Configuration file [default: /etc/lazypull/config.toml, optional there].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// State directory: chunk cache, layer mounts, containers, image records, daemon log
    /// [default: /var/lib/lazypull].
    #[arg(long, global = true, value_name = "DIR")]
    pub root: Option<PathBuf>,

    /// The daemon's unix socket [default: /run/lazypull/lazypull.sock].
    #[arg(long, global = true, value_name = "SOCKET")]
    pub address: Option<PathBuf>,

    /// Directories holding containerd-style `<host>/hosts.toml` files (mirrors, CAs, plain
    /// HTTP), searched in order [default: /etc/lazypull/certs.d /etc/containerd/certs.d].
    #[arg(long, global = true, value_name = "DIR")]
    pub hosts_dir: Vec<PathBuf>,

    /// Talk plain HTTP to this registry host (repeatable), like nerdctl --insecure-registry.
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure: Vec<String>,

    /// Chunk cache budget in MiB; least recently used chunks are evicted beyond it
    /// [default: 10240].
    #[arg(long, global = true, value_name = "MIB")]
    pub cache_mib: Option<u64>,

    /// After mounting a layer, fetch all of it in the background at low priority so it
    /// becomes fully local [default: true].
    #[arg(long, global = true, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub background_fill: Option<bool>,

    /// On mount, fetch first the files the layer lists for prefetch (eStargz landmark)
    /// [default: true].
    #[arg(long, global = true, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub prefetch: Option<bool>,

    /// How long a read may wait on an unreachable or stalled registry before it fails (EIO
    /// in a mount), in seconds [default: 30].
    #[arg(long, global = true, value_name = "SECS")]
    pub fetch_timeout: Option<u64>,

    /// Cap on the background fill's download rate, in MiB/s, 0 = no cap [default: 0].
    /// On-demand reads are never capped.
    #[arg(long, global = true, value_name = "MIB_PER_SEC")]
    pub fill_rate: Option<u64>,

    /// OCI runtime used by `run` (name in PATH or absolute path) [default: runc].
    #[arg(long, global = true, value_name = "BINARY")]
    pub runtime: Option<String>,

    /// Log format on stderr and in the daemon log [default: text].
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,

    /// Serve Prometheus metrics at http://ADDR/metrics from the daemon, e.g. 127.0.0.1:9880
    /// [default: off].
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_address: Option<String>,

    /// Unix socket on which the daemon serves containerd's snapshots API (name it in
    /// containerd's `[proxy_plugins.lazypull]`); an empty value disables it
    /// [default: /run/lazypull/snapshotter.sock].
    #[arg(long, global = true, value_name = "SOCKET")]
    pub snapshotter_socket: Option<String>,

    /// Serve an additional layer store for podman / CRI-O at DIR (containers/storage reads
    /// `DIR/<base64(image)>/<layer digest>/{diff,info,blob}`; name it in storage.conf as
    /// `additionallayerstores = ["DIR:ref"]`); an empty value disables it [default: off].
    #[arg(long, global = true, value_name = "DIR")]
    pub layer_store: Option<String>,
}

impl SettingsArgs {
    /// The flags given that only a daemon reads when it starts (registry flags are also the
    /// command's own, for `inspect`, `convert` and `push`), as typed: a command that
    /// finds a daemon running says they change nothing rather than ignore them silently.
    pub fn daemon_flags_given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut flag = |set: bool, name: &'static str| {
            if set {
                given.push(name);
            }
        };
        flag(self.cache_mib.is_some(), "--cache-mib");
        flag(self.background_fill.is_some(), "--background-fill");
        flag(self.prefetch.is_some(), "--prefetch");
        flag(self.fill_rate.is_some(), "--fill-rate");
        flag(self.metrics_address.is_some(), "--metrics-address");
        flag(self.snapshotter_socket.is_some(), "--snapshotter-socket");
        flag(self.layer_store.is_some(), "--layer-store");
        given
    }

    /// Merges flags over the configuration file over defaults.
    pub fn resolve(&self) -> Result<Settings, ConfigError> {
        let file = match &self.config {
            Some(p) => FileConfig::load(p, true)?,
            None => FileConfig::load(Path::new(DEFAULT_CONFIG), false)?,
        };
        Ok(self.merge(file))
    }

    fn merge(&self, file: FileConfig) -> Settings {
        let hosts_dir = if !self.hosts_dir.is_empty() {
            self.hosts_dir.clone()
        } else {
            file.hosts_dir.unwrap_or_else(|| {
                vec![
                    PathBuf::from("/etc/lazypull/certs.d"),
                    PathBuf::from("/etc/containerd/certs.d"),
                ]
            })
        };
        let mut insecure_registries = file.insecure_registries.unwrap_or_default();
        insecure_registries.extend(self.insecure.iter().cloned());
        Settings {
            root: self
                .root
                .clone()
                .or(file.root)
                .unwrap_or_else(|| PathBuf::from("/var/lib/lazypull")),
            address: self
                .address
                .clone()
                .or(file.address)
                .unwrap_or_else(|| PathBuf::from("/run/lazypull/lazypull.sock")),
            cache_mib: self.cache_mib.or(file.cache_mib).unwrap_or(10240),
            background_fill: self
                .background_fill
                .or(file.background_fill)
                .unwrap_or(true),
            prefetch: self.prefetch.or(file.prefetch).unwrap_or(true),
            fill_rate: self.fill_rate.or(file.fill_rate).unwrap_or(0),
            fetch_timeout: self.fetch_timeout.or(file.fetch_timeout).unwrap_or(30),
            hosts_dir,
            insecure_registries,
            runtime: self
                .runtime
                .clone()
                .or(file.runtime)
                .unwrap_or_else(|| "runc".to_string()),
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            metrics_address: self
                .metrics_address
                .clone()
                .or(file.metrics_address)
                .filter(|a| !a.is_empty()),
            snapshotter_socket: Some(
                self.snapshotter_socket
                    .clone()
                    .map(PathBuf::from)
                    .or(file.snapshotter_socket)
                    .unwrap_or_else(|| PathBuf::from("/run/lazypull/snapshotter.sock")),
            )
            .filter(|p| !p.as_os_str().is_empty()),
            layer_store: self
                .layer_store
                .clone()
                .map(PathBuf::from)
                .or(file.layer_store)
                .filter(|p| !p.as_os_str().is_empty()),
        }
    }
}

impl Settings {
    /// The flags that reproduce these settings exactly, for starting the daemon or a
    /// container supervisor with the same view as the command that started it.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--config".to_string(),
            "/dev/null".to_string(),
            "--root".to_string(),
            self.root.display().to_string(),
            "--address".to_string(),
            self.address.display().to_string(),
            "--cache-mib".to_string(),
            self.cache_mib.to_string(),
            "--background-fill".to_string(),
            self.background_fill.to_string(),
            "--prefetch".to_string(),
            self.prefetch.to_string(),
            "--fill-rate".to_string(),
            self.fill_rate.to_string(),
            "--fetch-timeout".to_string(),
            self.fetch_timeout.to_string(),
            "--runtime".to_string(),
            self.runtime.clone(),
            "--log-format".to_string(),
            match self.log_format {
                LogFormat::Text => "text".to_string(),
                LogFormat::Json => "json".to_string(),
            },
        ];
        if let Some(m) = &self.metrics_address {
            a.push("--metrics-address".to_string());
            a.push(m.clone());
        }
        a.push("--snapshotter-socket".to_string());
        a.push(
            self.snapshotter_socket
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        a.push("--layer-store".to_string());
        a.push(
            self.layer_store
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        for d in &self.hosts_dir {
            a.push("--hosts-dir".to_string());
            a.push(d.display().to_string());
        }
        for h in &self.insecure_registries {
            a.push("--insecure-registry".to_string());
            a.push(h.clone());
        }
        a
    }

    /// The daemon's log file.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("lazypull.log")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let file: FileConfig =
            toml::from_str("cache_mib = 5\nruntime = \"crun\"\nfetch_timeout = 7\n").unwrap();
        let args = SettingsArgs {
            cache_mib: Some(9),
            ..SettingsArgs::default()
        };
        let s = args.merge(file);
        assert_eq!(s.cache_mib, 9);
        assert_eq!(s.runtime, "crun");
        assert_eq!(s.fetch_timeout, 7);
        assert_eq!(s.root, PathBuf::from("/var/lib/lazypull"));
        assert!(s.background_fill);
    }

    #[test]
    fn unknown_keys_are_rejected_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "cache_mb = 5\n").unwrap();
        let e = FileConfig::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("cache_mb"), "{e}");
        assert!(FileConfig::load(&dir.path().join("missing"), true).is_err());
        assert!(FileConfig::load(&dir.path().join("missing"), false).is_ok());
    }

    #[test]
    fn to_args_round_trips() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            s: SettingsArgs,
        }
        let s = Settings {
            root: "/r".into(),
            address: "/r/s.sock".into(),
            cache_mib: 3,
            background_fill: false,
            prefetch: false,
            fill_rate: 4,
            fetch_timeout: 5,
            hosts_dir: vec!["/h".into()],
            insecure_registries: vec!["127.0.0.1:5000".into()],
            runtime: "/usr/sbin/runc".into(),
            log_format: LogFormat::Json,
            metrics_address: Some("127.0.0.1:9880".into()),
            snapshotter_socket: Some("/r/snap.sock".into()),
            layer_store: Some("/r/store".into()),
        };
        let mut argv = vec!["x".to_string()];
        argv.extend(s.to_args());
        let t = T::try_parse_from(argv).unwrap();
        assert_eq!(t.s.resolve().unwrap(), s);
        let off = Settings {
            snapshotter_socket: None,
            layer_store: None,
            ..s
        };
        let mut argv = vec!["x".to_string()];
        argv.extend(off.to_args());
        let t = T::try_parse_from(argv).unwrap();
        assert_eq!(t.s.resolve().unwrap(), off);
    }
}
