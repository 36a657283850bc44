//! Per-registry host configuration in containerd's `hosts.toml` format.
//!
//! Why this format: operators already maintain `/etc/containerd/certs.d/<registry>/hosts.toml`
//! for mirrors, private CAs and insecure registries. Reading the same files means lazypull
//! pulls through the same mirrors with the same trust settings as containerd, with no second
//! configuration to keep in sync.
//!
//! [`HostsConfig::endpoints`] turns a registry name (as written in an image reference) into the
//! ordered list of [`Endpoint`]s to try: configured mirrors in file order, then the upstream
//! server. Files are read on every call, so edits apply without restarting (as in containerd).

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use url::Url;

/// Name of the configuration file inside each per-registry directory.
const HOSTS_FILE: &str = "hosts.toml";
/// Directory consulted when a registry has no directory of its own (containerd's convention).
const DEFAULT_NAMESPACE: &str = "_default";

/// Where to look for `hosts.toml` files and which registries may be spoken to over plain HTTP.
///
/// Why a value rather than globals: the daemon builds one from its command line
/// (`--hosts-dir`, `--plain-http`) and tests build their own against temporary directories.
#[derive(Debug, Clone, Default)]
pub struct HostsConfig {
    dirs: Vec<PathBuf>,
    /// Hosts the user marked insecure: reached over `http://` when no scheme is configured.
    plain_http: Vec<String>,
}

/// One place to send registry API requests to, with the TLS and header settings that apply.
///
/// Why a flat struct: the registry client needs everything for one attempt in one place, and
/// tries the endpoints of a registry in order until one answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// API root without a trailing slash, normally `<scheme>://<host>[/<prefix>]/v2`; with
    /// `override_path` the configured path as is. Request paths are appended to it.
    pub base: Url,
    /// `host[:port]` of `base`, for logs, authentication scopes and per-host limits.
    pub host: String,
    /// Which operations this endpoint may be trusted with (a public mirror must not resolve).
    pub capabilities: Capabilities,
    /// Skip TLS certificate and host name verification (explicitly configured only).
    pub skip_verify: bool,
    /// Extra CA certificate files to trust (relative paths in hosts.toml are resolved against
    /// the file's directory).
    pub ca: Vec<PathBuf>,
    /// Client certificates for mutual TLS: certificate file and optional separate key file.
    pub client_cert: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra HTTP headers sent with every request to this endpoint, in file order.
    pub headers: Vec<(String, String)>,
    /// True for `[host."..."]` entries, false for the upstream server (always last).
    pub is_mirror: bool,
}

/// Operations an endpoint may be used for, as in containerd.
///
/// Why: resolving a tag to a digest is a trust decision; a mirror configured with only `pull`
/// may serve content addressed by digest but must not be asked what a tag points to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// May fetch manifests and blobs by digest.
    pub pull: bool,
    /// May resolve tags to digests.
    pub resolve: bool,
    /// May receive uploads (`lazypull convert` pushes only to endpoints that allow it).
    pub push: bool,
}

impl Capabilities {
    /// Everything allowed: containerd's default when a section has no `capabilities` key.
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

impl Default for Capabilities {
    /// All capabilities, because that is what containerd assumes when none are listed.
    fn default() -> Self {
        Capabilities::ALL
    }
}

/// Why a registry's host configuration could not be determined. Every file-related variant names
/// the file so an operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The registry name cannot be a directory name or URL host (e.g. contains `/`).
    #[error("invalid registry name {registry:?}: {reason}")]
    InvalidRegistry {
        /// The name as given.
        registry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The hosts.toml file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a value of the wrong type (message has line/column).
    #[error("invalid hosts file {}: {source}", path.display())]
    Parse {
        /// The hosts.toml file.
        path: PathBuf,
        /// toml's error, including the line and column.
        #[source]
        source: toml::de::Error,
    },
    /// A `capabilities` entry other than `pull`, `resolve` or `push`.
    #[error("{}: unknown capability {capability:?} in {section} (expected \"pull\", \"resolve\" or \"push\")", path.display())]
    UnknownCapability {
        /// The hosts.toml file.
        path: PathBuf,
        /// `server` or `host."<url>"`.
        section: String,
        /// The offending entry.
        capability: String,
    },
    /// A server or host URL that cannot be used as a registry endpoint.
    #[error("{}: invalid URL {url:?} in {section}: {reason}", path.display())]
    BadUrl {
        /// The hosts.toml file.
        path: PathBuf,
        /// `server` or `host."<url>"`.
        section: String,
        /// The URL as written.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other invalid value (e.g. a `client` pair with three elements).
    #[error("{}: invalid {key} in {section}: {reason}", path.display())]
    Invalid {
        /// The hosts.toml file.
        path: PathBuf,
        /// `server` or `host."<url>"`.
        section: String,
        /// The key holding the bad value.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl HostsConfig {
    /// Configuration directories searched in order (first match wins), e.g. from `--hosts-dir`.
    pub fn new(dirs: Vec<PathBuf>) -> Self {
        HostsConfig {
            dirs,
            plain_http: Vec::new(),
        }
    }

    /// The directories of the design: lazypull's own first, so it can override, then
    /// containerd's, so existing containerd mirror configuration is honoured as is.
    pub fn default_dirs() -> Self {
        let dirs = ["/etc/lazypull/certs.d", "/etc/containerd/certs.d"];
        Self::new(dirs.iter().map(PathBuf::from).collect())
    }

    /// Marks a registry (`host` or `host:port`; without a port it matches every port) as
    /// plain-HTTP, because some private registries have no TLS and the user said so explicitly.
    /// Applies only where no scheme is configured: an explicit `https://` still wins.
    pub fn with_plain_http(mut self, host: &str) -> Self {
        self.plain_http.push(host.trim().to_ascii_lowercase());
        self
    }

    /// The endpoints to try for `registry`, mirrors first in file order, upstream server last.
    ///
    /// Uses the first `<dir>/<registry>/hosts.toml` in directory order; failing that the first
    /// `<dir>/_default/hosts.toml`; failing that the default upstream alone. Missing files are
    /// not errors; unreadable or invalid ones are. (Docker-style `*.crt`/`*.cert` files without
    /// a hosts.toml are not read: list them in a hosts.toml.)
    pub fn endpoints(&self, registry: &str) -> Result<Vec<Endpoint>, HostsError> {
        validate_registry(registry)?;
        for dir in &self.dirs {
            let path = dir.join(registry).join(HOSTS_FILE);
            if let Some(text) = read_optional(&path)? {
                tracing::debug!(registry, file = %path.display(), "using hosts.toml");
                return self.endpoints_from_file(registry, &path, &text);
            }
        }
        for dir in &self.dirs {
            let path = dir.join(DEFAULT_NAMESPACE).join(HOSTS_FILE);
            if let Some(text) = read_optional(&path)? {
                tracing::debug!(registry, file = %path.display(), "using _default hosts.toml");
                return self.endpoints_from_file(registry, &path, &text);
            }
        }
        Ok(vec![self.default_server(registry)?])
    }

    /// Parses `raw` (with or without scheme) as an endpoint URL. Without a scheme, loopback
    /// hosts (as Docker and containerd treat them) and hosts marked plain-HTTP get `http`.
    fn parse_url(&self, raw: &str) -> Result<Url, String> {
        let raw = raw.trim();
        if raw.contains("://") {
            return normalize_url(raw);
        }
        let host_port = raw
            .split('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let host = split_host_port(&host_port).0;
        let plain =
            is_loopback(host) || self.plain_http.iter().any(|p| *p == host_port || p == host);
        normalize_url(&format!("{}://{raw}", if plain { "http" } else { "https" }))
    }

    /// The upstream `registry` itself: Docker Hub's API lives on `registry-1.docker.io`.
    fn server_url(&self, registry: &str) -> Result<Url, String> {
        let hub = registry.eq_ignore_ascii_case("docker.io");
        self.parse_url(if hub {
            "https://registry-1.docker.io"
        } else {
            registry
        })
    }

    /// The upstream endpoint used when nothing is configured for `registry`.
    fn default_server(&self, registry: &str) -> Result<Endpoint, HostsError> {
        let url = self
            .server_url(registry)
            .map_err(|reason| HostsError::InvalidRegistry {
                registry: registry.to_string(),
                reason,
            })?;
        build(Path::new(""), "server", url, RawSettings::default(), false)
    }

    /// Builds the endpoint list from one hosts.toml.
    fn endpoints_from_file(
        &self,
        registry: &str,
        path: &Path,
        text: &str,
    ) -> Result<Vec<Endpoint>, HostsError> {
        let file: HostsFile = toml::from_str(text).map_err(|source| HostsError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let bad_url = |section: &str, url: &str, reason| HostsError::BadUrl {
            path: path.to_path_buf(),
            section: section.to_string(),
            url: url.to_string(),
            reason,
        };
        let mut out = Vec::with_capacity(file.host.0.len() + 1);
        for (raw, settings) in file.host.0 {
            let section = format!("host.{raw:?}");
            let url = self
                .parse_url(&raw)
                .map_err(|r| bad_url(&section, &raw, r))?;
            out.push(build(path, &section, url, settings, true)?);
        }
        let mut url = match &file.server {
            Some(raw) => self.parse_url(raw).map_err(|r| bad_url("server", raw, r))?,
            None => self
                .server_url(registry)
                .map_err(|r| bad_url("server", registry, r))?,
        };
        // Docker Hub's web name does not serve the registry API (containerd maps it too).
        if url.host_str() == Some("docker.io") {
            let _ = url.set_host(Some("registry-1.docker.io"));
        }
        let settings = RawSettings {
            capabilities: file.capabilities,
            skip_verify: file.skip_verify,
            ca: file.ca,
            client: file.client,
            header: file.header,
            override_path: file.override_path,
        };
        out.push(build(path, "server", url, settings, false)?);
        Ok(out)
    }
}

/// Applies one section's settings to its URL; relative paths are relative to the file's dir.
fn build(
    path: &Path,
    section: &str,
    url: Url,
    settings: RawSettings,
    is_mirror: bool,
) -> Result<Endpoint, HostsError> {
    let invalid = |key, reason: &str| HostsError::Invalid {
        path: path.to_path_buf(),
        section: section.to_string(),
        key,
        reason: reason.to_string(),
    };
    let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
    let rel = |p: &str| base_dir.join(p);
    let mut capabilities = Capabilities::ALL;
    if let Some(caps) = settings.capabilities {
        capabilities = Capabilities {
            pull: false,
            resolve: false,
            push: false,
        };
        for cap in caps {
            match cap.as_str() {
                "pull" => capabilities.pull = true,
                "resolve" => capabilities.resolve = true,
                "push" => capabilities.push = true,
                _ => {
                    let (path, section) = (path.to_path_buf(), section.to_string());
                    return Err(HostsError::UnknownCapability {
                        path,
                        section,
                        capability: cap,
                    });
                }
            }
        }
    }
    let ca: Vec<String> = settings.ca.map(OneOrMany::into_vec).unwrap_or_default();
    if ca.iter().any(String::is_empty) {
        return Err(invalid("ca", "empty path"));
    }
    let clients: Vec<Vec<String>> = match settings.client {
        None => Vec::new(),
        Some(ClientSpec::One(cert)) => vec![vec![cert]],
        Some(ClientSpec::Many(items)) => items.into_iter().map(ClientItem::into_vec).collect(),
    };
    let mut client_cert = Vec::with_capacity(clients.len());
    for entry in clients {
        match entry.as_slice() {
            [cert] | [cert, _] if cert.is_empty() => {
                return Err(invalid("client", "empty certificate path"))
            }
            [cert] => client_cert.push((rel(cert), None)),
            [cert, key] => client_cert.push((rel(cert), (!key.is_empty()).then(|| rel(key)))),
            _ => {
                return Err(invalid(
                    "client",
                    "expected a path or a [certificate, key] pair",
                ))
            }
        }
    }
    let headers = (settings.header.map(|h| h.0).unwrap_or_default().into_iter())
        .flat_map(|(name, values)| {
            values
                .into_vec()
                .into_iter()
                .map(move |v| (name.clone(), v))
        })
        .collect();
    let base = api_base(url, settings.override_path.unwrap_or(false));
    Ok(Endpoint {
        host: host_port(&base),
        base,
        capabilities,
        skip_verify: settings.skip_verify.unwrap_or(false),
        ca: ca.iter().map(|p| rel(p)).collect(),
        client_cert,
        headers,
        is_mirror,
    })
}

/// `host[:port]` of a URL (IPv6 hosts keep their brackets; default ports are omitted).
fn host_port(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// Parses an absolute URL and checks it can be a registry endpoint.
fn normalize_url(s: &str) -> Result<Url, String> {
    let url = Url::parse(s).map_err(|e| e.to_string())?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(format!("scheme {:?} is not http or https", url.scheme()));
    }
    if url.host_str().filter(|h| !h.is_empty()).is_none() {
        return Err("no host".into());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("query strings and fragments are not allowed".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in URLs are not allowed; use a credential store".into());
    }
    Ok(url)
}

/// Sets the API path: appends `/v2` unless already there or `override_path` keeps it as is.
/// The result never ends in `/`, so request paths can be appended with a leading `/`.
fn api_base(mut url: Url, override_path: bool) -> Url {
    let trimmed = url.path().trim_end_matches('/').to_string();
    let path = if override_path || trimmed == "/v2" || trimmed.ends_with("/v2") {
        trimmed
    } else {
        format!("{trimmed}/v2")
    };
    url.set_path(&path);
    url
}

/// Rejects names that would escape the configuration directory or cannot be a URL host.
fn validate_registry(registry: &str) -> Result<(), HostsError> {
    let reason = if registry.is_empty() {
        Some("empty")
    } else if registry == "." || registry == ".." || registry == DEFAULT_NAMESPACE {
        Some("reserved name")
    } else if registry
        .chars()
        .any(|c| c == '/' || c == '\\' || c.is_whitespace() || c.is_control())
    {
        Some("must be host[:port] without '/', '\\' or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(HostsError::InvalidRegistry {
            registry: registry.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

/// Splits `host:port`, `[v6]:port`, `[v6]` or a bare IPv6 address into host and port.
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(rest) = s.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, after)) => (host, after.strip_prefix(':')),
            None => (s, None),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, Some(port)),
        _ => (s, None),
    }
}

/// Loopback registries default to plain HTTP because local test registries rarely have TLS.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// "Does not exist" (or a parent that is not a directory): skip rather than fail.
fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

/// Reads a file, treating "does not exist" (or a non-directory parent) as absent.
fn read_optional(path: &Path) -> Result<Option<String>, HostsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if is_absent(&e) => Ok(None),
        Err(source) => Err(HostsError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The document as written; unknown keys (e.g. `proxy`, `dial_timeout`) are ignored because
/// containerd may add keys lazypull does not need.
/// (Top-level keys are spelled out: `#[serde(flatten)]` would lose toml's line numbers.)
#[derive(Deserialize)]
struct HostsFile {
    server: Option<String>,
    #[serde(default)]
    host: Ordered<RawSettings>,
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    client: Option<ClientSpec>,
    header: Option<Ordered<OneOrMany>>,
    override_path: Option<bool>,
}

/// Keys shared by the top level (for `server`) and each `[host."..."]` table.
#[derive(Deserialize, Default)]
struct RawSettings {
    capabilities: Option<Vec<String>>,
    skip_verify: Option<bool>,
    ca: Option<OneOrMany>,
    client: Option<ClientSpec>,
    header: Option<Ordered<OneOrMany>>,
    override_path: Option<bool>,
}

/// A string or an array of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `client = "cert"`, `client = ["c1", "c2"]` or `client = [["cert", "key"], ...]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClientSpec {
    One(String),
    Many(Vec<ClientItem>),
}

/// One element of a `client` array.
#[derive(Deserialize)]
#[serde(untagged)]
enum ClientItem {
    Cert(String),
    Pair(Vec<String>),
}

impl ClientItem {
    fn into_vec(self) -> Vec<String> {
        match self {
            ClientItem::Cert(cert) => vec![cert],
            ClientItem::Pair(pair) => pair,
        }
    }
}

/// A TOML table kept in document order, since mirror order is priority order.
struct Ordered<V>(Vec<(String, V)>);

impl<V> Default for Ordered<V> {
    fn default() -> Self {
        Ordered(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OrderedVisitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for OrderedVisitor<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(OrderedVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write(dir: &Path, registry: &str, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir.join(registry)).unwrap();
        let p = dir.join(registry).join(HOSTS_FILE);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn bases(cfg: &HostsConfig, registry: &str) -> Vec<String> {
        let eps = cfg.endpoints(registry).unwrap();
        eps.iter().map(|e| e.base.to_string()).collect()
    }

    const PULL_ONLY: Capabilities = Capabilities {
        pull: true,
        resolve: false,
        push: false,
    };

    #[test]
    fn defaults_without_config() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = HostsConfig::new(vec![tmp.path().to_path_buf()]);
        for (registry, base, host) in [
            (
                "docker.io",
                "https://registry-1.docker.io/v2",
                "registry-1.docker.io",
            ),
            ("ghcr.io", "https://ghcr.io/v2", "ghcr.io"),
            (
                "localhost:5000",
                "http://localhost:5000/v2",
                "localhost:5000",
            ),
            ("localhost", "http://localhost/v2", "localhost"),
            (
                "127.0.0.1:5000",
                "http://127.0.0.1:5000/v2",
                "127.0.0.1:5000",
            ),
            ("127.3.4.5", "http://127.3.4.5/v2", "127.3.4.5"),
            ("[::1]:5000", "http://[::1]:5000/v2", "[::1]:5000"),
            ("reg.example:443", "https://reg.example/v2", "reg.example"),
        ] {
            let eps = cfg.endpoints(registry).unwrap();
            assert_eq!(eps.len(), 1, "{registry}");
            assert_eq!((eps[0].base.as_str(), eps[0].host.as_str()), (base, host));
            assert_eq!(
                (eps[0].is_mirror, eps[0].capabilities),
                (false, Capabilities::ALL)
            );
        }
        assert_eq!(
            bases(&HostsConfig::default(), "ghcr.io"),
            ["https://ghcr.io/v2"]
        );
    }

    #[test]
    fn plain_http_marking() {
        let cfg = HostsConfig::default()
            .with_plain_http("reg.lan:5000")
            .with_plain_http("o.lan");
        assert_eq!(bases(&cfg, "reg.lan:5000"), ["http://reg.lan:5000/v2"]);
        assert_eq!(bases(&cfg, "reg.lan:6000"), ["https://reg.lan:6000/v2"]);
        assert_eq!(bases(&cfg, "o.lan:1234"), ["http://o.lan:1234/v2"]);
        assert_eq!(bases(&cfg, "ghcr.io"), ["https://ghcr.io/v2"]);
    }

    #[test]
    fn mirrors_in_file_order_then_server() {
        let tmp = tempfile::tempdir().unwrap();
        let text = r#"
server = "https://registry-1.docker.io"
[host."https://zz.example"]
  capabilities = ["pull"]
[host."aa.example:5000/prefix/"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  [host."aa.example:5000/prefix/".header]
    x-one = "1"
    x-many = ["a", "b"]
[host."http://mm.example/v2"]
"#;
        write(tmp.path(), "docker.io", text);
        let cfg = HostsConfig::new(vec![tmp.path().into()]);
        let eps = cfg.endpoints("docker.io").unwrap();
        let want = ["https://zz.example/v2", "https://aa.example:5000/prefix/v2"];
        let want = [
            &want[..],
            &["http://mm.example/v2", "https://registry-1.docker.io/v2"],
        ];
        assert_eq!(bases(&cfg, "docker.io"), want.concat());
        let mirror: Vec<bool> = eps.iter().map(|e| e.is_mirror).collect();
        assert_eq!(mirror, [true, true, true, false]);
        assert_eq!(eps[0].capabilities, PULL_ONLY);
        assert_eq!(
            eps[1].capabilities,
            Capabilities {
                resolve: true,
                ..PULL_ONLY
            }
        );
        assert_eq!(eps[2].capabilities, Capabilities::ALL);
        assert!(eps[1].skip_verify && !eps[0].skip_verify);
        assert_eq!(eps[1].host, "aa.example:5000");
        let h: Vec<String> = eps[1]
            .headers
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(h, ["x-one=1", "x-many=a", "x-many=b"]);
    }

    #[test]
    fn server_settings_paths_and_override() {
        let tmp = tempfile::tempdir().unwrap();
        let text = r#"
server = "https://upstream.example/api/"
override_path = true
capabilities = ["pull"]
ca = "ca.crt"
client = [["client.cert", "client.key"], ["/abs/client.pem", ""]]
[header]
x-hint = "x"
[host."https://m.example"]
ca = ["/etc/abs.pem", "sub/rel.pem"]
client = "only.pem"
[host."https://m2.example"]
client = ["c1.pem", "c2.pem"]
"#;
        let file = write(tmp.path(), "reg.example", text);
        let d = file.parent().unwrap();
        let cfg = HostsConfig::new(vec![tmp.path().into()]);
        let eps = cfg.endpoints("reg.example").unwrap();
        let want = [
            "https://m.example/v2",
            "https://m2.example/v2",
            "https://upstream.example/api",
        ];
        assert_eq!(bases(&cfg, "reg.example"), want);
        let server = &eps[2];
        assert_eq!(server.capabilities, PULL_ONLY);
        assert_eq!(server.ca, [d.join("ca.crt")]);
        let abs = PathBuf::from("/abs/client.pem");
        let pair = (d.join("client.cert"), Some(d.join("client.key")));
        assert_eq!(server.client_cert, [pair, (abs, None)]);
        assert_eq!(server.headers, [("x-hint".to_string(), "x".to_string())]);
        assert_eq!(
            eps[0].ca,
            [PathBuf::from("/etc/abs.pem"), d.join("sub/rel.pem")]
        );
        assert_eq!(eps[0].client_cert, [(d.join("only.pem"), None)]);
        assert_eq!(
            eps[1].client_cert,
            [(d.join("c1.pem"), None), (d.join("c2.pem"), None)]
        );
        // Top-level settings apply to the server only.
        assert!(eps[0].headers.is_empty() && eps[0].capabilities == Capabilities::ALL);
    }

    #[test]
    fn default_server_and_docker_io_alias() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "localhost:5000",
            "[host.\"https://mirror.example\"]\n",
        );
        write(tmp.path(), "docker.io", "server = \"https://docker.io\"\n");
        let cfg = HostsConfig::new(vec![tmp.path().into()]);
        let want = ["https://mirror.example/v2", "http://localhost:5000/v2"];
        assert_eq!(bases(&cfg, "localhost:5000"), want);
        assert_eq!(
            bases(&cfg, "docker.io"),
            ["https://registry-1.docker.io/v2"]
        );
    }

    #[test]
    fn default_namespace_fallback_and_first_dir_wins() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        write(b.path(), "ghcr.io", "[host.\"https://b.example\"]\n");
        write(a.path(), "ghcr.io", "[host.\"https://a.example\"]\n");
        write(b.path(), "quay.io", "[host.\"https://bq.example\"]\n");
        write(
            a.path(),
            DEFAULT_NAMESPACE,
            "[host.\"https://dflt.example\"]\n",
        );
        let cfg = HostsConfig::new(vec![a.path().into(), b.path().into()]);
        assert_eq!(
            bases(&cfg, "ghcr.io"),
            ["https://a.example/v2", "https://ghcr.io/v2"]
        );
        // A registry's own file in a later dir beats _default in an earlier one.
        assert_eq!(
            bases(&cfg, "quay.io"),
            ["https://bq.example/v2", "https://quay.io/v2"]
        );
        let want = ["https://dflt.example/v2", "https://registry-1.docker.io/v2"];
        assert_eq!(bases(&cfg, "docker.io"), want);
    }

    #[test]
    fn errors_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = HostsConfig::new(vec![tmp.path().into()]);
        for (registry, text, needle) in [
            ("syntax.example", "server = \n[host.\n", "line 1"),
            ("type.example", "\n\nskip_verify = \"yes\"\n", "line 3"),
            ("mirror-type.example", "[host.\"m\"]\n\nca = 5\n", "line 3"),
            (
                "cap.example",
                "[host.\"https://m\"]\ncapabilities = [\"pull\", \"fly\"]\n",
                "\"fly\"",
            ),
            ("url.example", "server = \"ftp://x.example\"\n", "ftp"),
            ("url2.example", "[host.\"https://\"]\n", "invalid URL"),
            (
                "client.example",
                "client = [[\"a\", \"b\", \"c\"]]\n",
                "client",
            ),
            ("host.example", "host = 3\n", "line 1"),
        ] {
            let path = write(tmp.path(), registry, text);
            let err = cfg.endpoints(registry).unwrap_err().to_string();
            assert!(
                err.contains(&path.display().to_string()),
                "{registry}: {err}"
            );
            assert!(err.contains(needle), "{registry}: {err}");
        }
        for bad in ["", "..", "a/b", "../etc", "_default", "a b"] {
            let err = cfg.endpoints(bad);
            assert!(
                matches!(err, Err(HostsError::InvalidRegistry { .. })),
                "{bad:?}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_file_is_an_error() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = write(tmp.path(), "ghcr.io", "");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
        if std::fs::read(&path).is_ok() {
            return; // running as root: permissions are not enforced
        }
        let err = HostsConfig::new(vec![tmp.path().into()])
            .endpoints("ghcr.io")
            .unwrap_err();
        assert!(matches!(err, HostsError::Read { .. }));
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn api_path_rules() {
        for (url, override_path, want) in [
            ("https://a.example", false, "https://a.example/v2"),
            ("https://a.example/", false, "https://a.example/v2"),
            ("https://a.example/v2/", false, "https://a.example/v2"),
            ("https://a.example/p/v2", false, "https://a.example/p/v2"),
            ("https://a.example/p/", true, "https://a.example/p"),
        ] {
            assert_eq!(
                api_base(Url::parse(url).unwrap(), override_path).as_str(),
                want
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}", registry in "[a-z0-9.:_-]{1,20}") {
            let tmp = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(tmp.path().join(&registry)).unwrap();
            std::fs::write(tmp.path().join(&registry).join(HOSTS_FILE), &text).unwrap();
            let _ = HostsConfig::new(vec![tmp.path().into()]).endpoints(&registry);
        }
    }
}
