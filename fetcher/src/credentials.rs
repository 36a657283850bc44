//! Where registry passwords come from: explicit credentials, docker/podman auth files and
//! `docker-credential-*` helpers.
//!
//! Why reuse these sources: users have already run `docker login` or `podman login`; reading
//! the same files (and calling the same helpers, e.g. for cloud registries with short-lived
//! tokens) makes private images work with no lazypull-specific setup.
//!
//! Secrets never appear in `Debug`/`Display` output, errors or logs. Lookups are synchronous and
//! may run a helper process for up to [`HELPER_TIMEOUT`]; async callers should use
//! `tokio::task::spawn_blocking` and cache the result per registry.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Map, Value};

/// Username docker uses to mark the secret as an identity (OAuth refresh) token.
pub const IDENTITY_TOKEN_USERNAME: &str = "<token>";

/// How long a credential helper may run before it is killed: a hung helper (e.g. waiting on a
/// locked keychain) must not hang image pulls.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// Server URL docker uses for Docker Hub in auth files and when calling helpers.
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";

/// Names under which Docker Hub appears in auth files; all mean the `docker.io` registry.
const DOCKER_HUB_ALIASES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// Largest helper output read; real answers are a few hundred bytes.
const MAX_HELPER_OUTPUT: u64 = 1 << 20;

/// A username and secret for one registry.
///
/// Why a dedicated type: it redacts the secret in `Debug` and `Display`, so credentials can be
/// logged or put in error contexts without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Registry username, or [`IDENTITY_TOKEN_USERNAME`] when `secret` is an identity token.
    pub username: String,
    /// Password or identity token. Never print it.
    pub secret: String,
}

impl Credentials {
    /// Builds credentials from a username and a password (or identity token).
    pub fn new(username: impl Into<String>, secret: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            secret: secret.into(),
        }
    }

    /// `Basic base64(user:secret)`, the `Authorization` value for Basic auth and for the token
    /// endpoint of the Bearer flow.
    pub fn basic_header_value(&self) -> String {
        let raw = format!("{}:{}", self.username, self.secret);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// True when `secret` is an identity token (username `<token>`, as docker does), which must be
    /// exchanged via the OAuth2 refresh-token grant instead of being sent as a password.
    pub fn is_identity_token(&self) -> bool {
        self.username == IDENTITY_TOKEN_USERNAME
    }
}

impl fmt::Debug for Credentials {
    /// Redacted, so that `{:?}` of a struct holding credentials is safe to log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for Credentials {
    /// `username:<redacted>`, for messages that say which account was used.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:<redacted>", self.username)
    }
}

/// Why credentials could not be looked up. Messages name the file or helper at fault and never
/// contain secrets or helper output.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A credentials file exists but cannot be read.
    #[error("cannot read credentials file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A credentials file is not valid JSON or does not have the docker config layout.
    #[error("malformed credentials file {}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong (never includes values).
        reason: String,
    },
    /// An `auths` entry for the registry has an undecodable `auth` field.
    #[error("malformed credentials file {}: invalid \"auth\" for {key:?}: {reason}", path.display())]
    BadAuth {
        /// The file.
        path: PathBuf,
        /// The `auths` key of the entry.
        key: String,
        /// What is wrong (never includes the value).
        reason: &'static str,
    },
    /// A `credHelpers`/`credsStore` value that is not a plain helper name (it would be run).
    #[error("credentials file {}: invalid credential helper name {helper:?}", path.display())]
    InvalidHelperName {
        /// The file.
        path: PathBuf,
        /// The configured name.
        helper: String,
    },
    /// The helper program does not exist.
    #[error(
        "credential helper docker-credential-{helper} not found (is it installed and on PATH?)"
    )]
    HelperNotFound {
        /// Helper name (without the `docker-credential-` prefix).
        helper: String,
    },
    /// The helper could not be run, failed, or printed something unusable.
    #[error("credential helper docker-credential-{helper} failed: {reason}")]
    HelperFailed {
        /// Helper name (without the `docker-credential-` prefix).
        helper: String,
        /// What went wrong (exit status or kind of problem, never its output).
        reason: String,
    },
    /// The helper did not answer in time and was killed.
    #[error(
        "credential helper docker-credential-{helper} did not answer within {timeout:?}; killed it"
    )]
    HelperTimeout {
        /// Helper name (without the `docker-credential-` prefix).
        helper: String,
        /// The limit that was exceeded.
        timeout: Duration,
    },
}

/// Ordered sources of registry credentials.
///
/// Why an explicit list: the precedence (CLI credentials, then podman's, then docker's files) is
/// part of the user-visible behaviour, and tests need hermetic stores that ignore `$HOME`.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    statics: Vec<(String, Credentials)>,
    files: Vec<PathBuf>,
    helper_dir: Option<PathBuf>,
    helper_timeout: Option<Duration>,
}

impl CredentialStore {
    /// The usual sources for the current user, from `$HOME`, `$XDG_RUNTIME_DIR`, `$DOCKER_CONFIG`
    /// and `$REGISTRY_AUTH_FILE`, so `docker login` and `podman login` just work.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var_os(name).map(PathBuf::from);
        Self::from_env_vars(
            var("HOME"),
            var("XDG_RUNTIME_DIR"),
            var("DOCKER_CONFIG"),
            var("REGISTRY_AUTH_FILE"),
        )
    }

    /// [`from_env`](Self::from_env) with the variables passed in, so tests need not mutate the
    /// process environment. Files, in priority order: `registry_auth_file`,
    /// `<xdg_runtime_dir>/containers/auth.json`, then `<docker_config>/config.json` or, without
    /// `docker_config`, `<home>/.docker/config.json`. Empty values count as unset.
    pub fn from_env_vars(
        home: Option<PathBuf>,
        xdg_runtime_dir: Option<PathBuf>,
        docker_config: Option<PathBuf>,
        registry_auth_file: Option<PathBuf>,
    ) -> Self {
        let set = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let mut store = Self::empty();
        if let Some(file) = set(registry_auth_file) {
            store = store.with_file(file);
        }
        if let Some(dir) = set(xdg_runtime_dir) {
            store = store.with_file(dir.join("containers").join("auth.json"));
        }
        if let Some(dir) = set(docker_config) {
            store = store.with_file(dir.join("config.json"));
        } else if let Some(home) = set(home) {
            store = store.with_file(home.join(".docker").join("config.json"));
        }
        store
    }

    /// A store with no sources: anonymous access only, until sources are added.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Appends a docker-config-format file (lower priority than those already added). It may
    /// not exist yet: files are read at every lookup, so a later `docker login` is picked up.
    pub fn with_file(mut self, path: PathBuf) -> Self {
        self.files.push(path);
        self
    }

    /// Adds credentials for `registry` that win over every file (CLI `--user`, tests).
    pub fn with_static(mut self, registry: &str, creds: Credentials) -> Self {
        self.statics.push((registry.to_string(), creds));
        self
    }

    /// Runs `docker-credential-*` helpers from `dir` instead of searching `$PATH`, for hermetic
    /// tests and for deployments that only trust helpers in a fixed directory.
    pub fn with_helper_dir(mut self, dir: PathBuf) -> Self {
        self.helper_dir = Some(dir);
        self
    }

    /// Replaces [`HELPER_TIMEOUT`], for tests and for helpers known to be slow.
    pub fn with_helper_timeout(mut self, timeout: Duration) -> Self {
        self.helper_timeout = Some(timeout);
        self
    }

    /// Credentials for `registry` (as in an image reference, e.g. `docker.io`, `ghcr.io`,
    /// `localhost:5000`), or `None` for anonymous access.
    ///
    /// Static credentials win; then each file in order. Within a file a `credHelpers` entry for
    /// the registry is final for that file (if it knows nothing, the next file is tried);
    /// otherwise `credsStore` is asked, then `auths`. A `credsStore` helper that is not installed
    /// is skipped with a warning (configs copied from Docker Desktop often name one).
    pub fn lookup(&self, registry: &str) -> Result<Option<Credentials>, CredentialError> {
        let wanted = canonical_registry(registry);
        if let Some((_, creds)) = self
            .statics
            .iter()
            .find(|(key, _)| key_registry(key).as_deref() == Some(&wanted))
        {
            return Ok(Some(creds.clone()));
        }
        for path in &self.files {
            let Some(file) = load_file(path)? else {
                continue;
            };
            if let Some(helper) = find_helper(&file.cred_helpers, &wanted) {
                match self.run_helper(path, helper, &wanted)? {
                    Some(creds) => return Ok(Some(creds)),
                    None => continue,
                }
            }
            if let Some(helper) = &file.creds_store {
                match self.run_helper(path, helper, &wanted) {
                    Ok(Some(creds)) => return Ok(Some(creds)),
                    Ok(None) => {}
                    Err(CredentialError::HelperNotFound { helper }) => {
                        let file = path.display();
                        tracing::warn!(%file, helper, "credsStore helper missing; using auths");
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(creds) = auth_from_file(path, &file.auths, &wanted)? {
                return Ok(Some(creds));
            }
        }
        Ok(None)
    }

    /// Runs helper `name` for `registry`, validating the name taken from `path`.
    fn run_helper(
        &self,
        path: &Path,
        name: &str,
        registry: &str,
    ) -> Result<Option<Credentials>, CredentialError> {
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || !name.chars().all(valid) {
            return Err(CredentialError::InvalidHelperName {
                path: path.to_path_buf(),
                helper: name.to_string(),
            });
        }
        let program_name = format!("docker-credential-{name}");
        let program = match &self.helper_dir {
            Some(dir) => dir.join(program_name),
            None => PathBuf::from(program_name),
        };
        let server_url = match registry {
            "docker.io" => DOCKER_HUB_SERVER,
            other => other,
        };
        tracing::debug!(helper = name, server_url, "asking credential helper");
        let timeout = self.helper_timeout.unwrap_or(HELPER_TIMEOUT);
        get_from_helper(&program, name, server_url, timeout)
    }
}

/// The parts of a docker config file this module uses.
struct AuthFile {
    auths: Map<String, Value>,
    cred_helpers: Vec<(String, String)>,
    creds_store: Option<String>,
}

/// Reads and checks the layout of one file; `None` if it does not exist.
fn load_file(path: &Path) -> Result<Option<AuthFile>, CredentialError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(source) => {
            return Err(CredentialError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let malformed = |reason: String| CredentialError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    // Parse to a Value first: serde's type errors quote values, which may be secrets.
    let root: Value = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    let Value::Object(mut root) = root else {
        return Err(malformed("top level is not a JSON object".into()));
    };
    let auths = match root.remove("auths") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err(malformed("\"auths\" is not an object".into())),
    };
    if let Some((key, _)) = auths.iter().find(|(_, v)| !v.is_object()) {
        return Err(malformed(format!(
            "\"auths\" entry {key:?} is not an object"
        )));
    }
    let cred_helpers = match root.remove("credHelpers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(m)) => m
            .into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                _ => Err(malformed(format!(
                    "\"credHelpers\" entry {k:?} is not a string"
                ))),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(malformed("\"credHelpers\" is not an object".into())),
    };
    let creds_store = match root.remove("credsStore") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(malformed("\"credsStore\" is not a string".into())),
    };
    Ok(Some(AuthFile {
        auths,
        cred_helpers,
        creds_store,
    }))
}

/// The best `auths` entry for `registry` that holds credentials.
fn auth_from_file(
    path: &Path,
    auths: &Map<String, Value>,
    registry: &str,
) -> Result<Option<Credentials>, CredentialError> {
    let mut candidates: Vec<(u8, &String, &Value)> = auths
        .iter()
        .filter(|(k, _)| key_registry(k).as_deref() == Some(registry))
        .map(|(k, v)| {
            let rank = if k.as_str() == registry {
                0
            } else if registry == "docker.io" && k.as_str() == DOCKER_HUB_SERVER {
                1
            } else {
                2
            };
            (rank, k, v)
        })
        .collect();
    candidates.sort_by_key(|(rank, _, _)| *rank);
    for (_, key, entry) in candidates {
        if let Some(creds) = decode_entry(path, key, entry)? {
            return Ok(Some(creds));
        }
    }
    Ok(None)
}

/// Credentials in one `auths` entry: `identitytoken`, else `auth`, else `username`/`password`.
fn decode_entry(
    path: &Path,
    key: &str,
    entry: &Value,
) -> Result<Option<Credentials>, CredentialError> {
    let field = |name: &str| {
        entry
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let bad = |reason| CredentialError::BadAuth {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason,
    };
    if let Some(token) = field("identitytoken") {
        return Ok(Some(Credentials::new(IDENTITY_TOKEN_USERNAME, token)));
    }
    if let Some(auth) = entry.get("auth").filter(|v| !v.is_null()) {
        let Some(auth) = auth.as_str() else {
            return Err(bad("not a string"));
        };
        let auth = auth.trim();
        if !auth.is_empty() {
            let engines = [
                base64::engine::general_purpose::STANDARD,
                base64::engine::general_purpose::STANDARD_NO_PAD,
            ];
            let decoded = engines
                .iter()
                .find_map(|e| e.decode(auth).ok())
                .ok_or_else(|| bad("not valid base64"))?;
            let decoded = String::from_utf8(decoded).map_err(|_| bad("not valid UTF-8"))?;
            let (user, secret) = decoded
                .split_once(':')
                .ok_or_else(|| bad("decoded value has no ':'"))?;
            if user.is_empty() && secret.is_empty() {
                return Ok(None);
            }
            return Ok(Some(Credentials::new(user, secret)));
        }
    }
    match (field("username"), field("password")) {
        (Some(user), Some(secret)) => Ok(Some(Credentials::new(user, secret))),
        _ => Ok(None),
    }
}

/// The `credHelpers` helper for `registry`, preferring an exact key over an alias.
fn find_helper<'a>(entries: &'a [(String, String)], registry: &str) -> Option<&'a str> {
    entries
        .iter()
        .find(|(k, _)| k == registry)
        .or_else(|| {
            entries
                .iter()
                .find(|(k, _)| key_registry(k).as_deref() == Some(registry))
        })
        .map(|(_, helper)| helper.as_str())
}

/// Lower-cased registry name with Docker Hub's aliases folded into `docker.io`.
fn canonical_registry(registry: &str) -> String {
    let lower = registry.trim().to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&lower.as_str()) {
        "docker.io".to_string()
    } else {
        lower
    }
}

/// The registry an auth-file key refers to, or `None` for repository-scoped keys
/// (`quay.io/org`, allowed by containers auth.json), which registry-level lookups skip.
/// Docker's legacy forms with a scheme and/or an API path (`https://ghcr.io`, `ghcr.io/v1/`)
/// are registry-level.
fn key_registry(key: &str) -> Option<String> {
    let key = key.trim();
    let lower = key.to_ascii_lowercase();
    let (rest, had_scheme) = match lower
        .strip_prefix("https://")
        .or_else(|| lower.strip_prefix("http://"))
    {
        Some(rest) => (rest, true),
        None => (lower.as_str(), false),
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let registry_level = had_scheme || matches!(path, "" | "v1" | "v1/" | "v2" | "v2/");
    (registry_level && !host.is_empty()).then(|| canonical_registry(host))
}

/// What a helper prints on success.
#[derive(serde::Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Runs `<program> get` with `server_url` on stdin (docker's credential-helper protocol) and kills
/// it after `timeout`. `name` is only used in errors and logs; output never is.
fn get_from_helper(
    program: &Path,
    name: &str,
    server_url: &str,
    timeout: Duration,
) -> Result<Option<Credentials>, CredentialError> {
    let failed = |reason: String| CredentialError::HelperFailed {
        helper: name.to_string(),
        reason,
    };
    let timed_out = || CredentialError::HelperTimeout {
        helper: name.to_string(),
        timeout,
    };
    let deadline = Instant::now() + timeout;
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CredentialError::HelperNotFound {
                helper: name.to_string(),
            },
            _ => failed(format!("cannot start: {e}")),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper may exit without reading; a broken pipe then is its business, not an error.
        let _ = stdin.write_all(server_url.as_bytes());
    }
    // Read stdout on a thread so a chatty helper cannot block on a full pipe, and so a
    // grandchild keeping the pipe open cannot block us past the deadline.
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stdout.take(MAX_HELPER_OUTPUT).read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(timed_out());
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("cannot wait for it: {e}")));
            }
        }
    };
    let grace = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(200));
    let stdout = rx.recv_timeout(grace).map_err(|_| timed_out())?;
    if !status.success() {
        if String::from_utf8_lossy(&stdout).contains("credentials not found") {
            return Ok(None);
        }
        return Err(failed(format!("exited with {status}")));
    }
    // The serde error is dropped: it may quote the output.
    let answer: HelperAnswer = serde_json::from_slice(&stdout)
        .map_err(|_| failed("printed malformed JSON (output not shown)".into()))?;
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials::new(answer.username, answer.secret)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    fn auth(user: &str, pass: &str) -> Value {
        json!({ "auth": STANDARD.encode(format!("{user}:{pass}")) })
    }

    fn write_json(dir: &Path, name: &str, value: &Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec(value).unwrap()).unwrap();
        p
    }

    fn store(path: &Path) -> CredentialStore {
        CredentialStore::empty().with_file(path.to_path_buf())
    }

    fn user(store: &CredentialStore, registry: &str) -> Option<String> {
        store
            .lookup(registry)
            .unwrap()
            .map(|c| format!("{}:{}", c.username, c.secret))
    }

    const HELPER_SCRIPT: &str = r#"#!/bin/sh
[ "$1" = get ] || exit 3
read -r url
case "$url" in
  https://index.docker.io/v1/) echo '{"ServerURL":"x","Username":"hub","Secret":"hubpw"}' ;;
  ghcr.io) printf '{"ServerURL":"ghcr.io","Username":"<token>","Secret":"tok"}' ;;
  quay.io) echo '{"Username":"quser","Secret":"qpw"}' ;;
  fail.example) echo 'leaked-secret'; exit 1 ;;
  garbage.example) echo 'not json leaked-secret' ;;
  slow.example) exec sleep 5 ;;
  slowchild.example) sleep 3 ;;
  *) echo 'credentials not found in native keychain'; exit 1 ;;
esac
"#;

    /// Writes `docker-credential-<name>` into `dir`, waiting out ETXTBSY (a fork in a
    /// concurrent test can briefly inherit the write handle).
    fn install_helper(dir: &Path, name: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&path, HELPER_SCRIPT).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        for _ in 0..100 {
            match Command::new(&path).stdin(Stdio::null()).status() {
                Err(e) if e.raw_os_error() == Some(26) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
        path
    }

    #[test]
    fn credentials_redact_secret() {
        let c = Credentials::new("alice", "hunter2");
        let store = CredentialStore::empty().with_static("ghcr.io", c.clone());
        for s in [format!("{c:?}"), format!("{c}"), format!("{store:?}")] {
            assert!(!s.contains("hunter2") && s.contains("<redacted>") && s.contains("alice"));
        }
        assert_eq!(c.basic_header_value(), "Basic YWxpY2U6aHVudGVyMg==");
        assert!(!c.is_identity_token() && Credentials::new("<token>", "t").is_identity_token());
    }

    #[test]
    fn statics_win_then_files_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let a = write_json(
            tmp.path(),
            "a.json",
            &json!({"auths": {"ghcr.io": auth("a", "1")}}),
        );
        let b = json!({"auths": {"ghcr.io": auth("b", "2"), "quay.io": auth("q", "3")}});
        let b = write_json(tmp.path(), "b.json", &b);
        let missing = tmp.path().join("missing.json");
        let s = store(&missing).with_file(a).with_file(b);
        assert_eq!(user(&s, "ghcr.io").as_deref(), Some("a:1"));
        assert_eq!(user(&s, "GHCR.io").as_deref(), Some("a:1"));
        assert_eq!(user(&s, "quay.io").as_deref(), Some("q:3"));
        assert_eq!(user(&s, "other.example"), None);
        let s = s.with_static("ghcr.io", Credentials::new("cli", "x"));
        assert_eq!(user(&s, "ghcr.io").as_deref(), Some("cli:x"));
        // A file that appears later is picked up by the same store.
        write_json(
            tmp.path(),
            "missing.json",
            &json!({"auths": {"quay.io": auth("n", "4")}}),
        );
        assert_eq!(user(&s, "quay.io").as_deref(), Some("n:4"));
    }

    #[test]
    fn key_forms_and_docker_hub_aliases() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "registry-1.docker.io",
        ];
        for key in hub.iter().chain(&["docker.io", "http://docker.io/v2/"]) {
            let p = write_json(
                tmp.path(),
                "c.json",
                &json!({"auths": {*key: auth("hub", "pw")}}),
            );
            for registry in ["docker.io", "index.docker.io"] {
                assert_eq!(
                    user(&store(&p), registry).as_deref(),
                    Some("hub:pw"),
                    "{key}"
                );
            }
            assert_eq!(user(&store(&p), "ghcr.io"), None);
        }
        // The canonical Hub key beats other aliases; empty entries are skipped.
        let all = json!({"auths": {
            "docker.io": {}, "https://index.docker.io/v1/": auth("canon", "1"),
            "index.docker.io": auth("alias", "2"),
        }});
        let p = write_json(tmp.path(), "c.json", &all);
        assert_eq!(user(&store(&p), "docker.io").as_deref(), Some("canon:1"));
        // Scheme and API path are stripped; repository-scoped keys are not registry-level.
        let keys = json!({"auths": {
            "https://ghcr.io": auth("g", "1"), "localhost:5000/v1/": auth("l", "2"),
            "quay.io/org": auth("ns", "3"),
        }});
        let p = write_json(tmp.path(), "c.json", &keys);
        assert_eq!(user(&store(&p), "ghcr.io").as_deref(), Some("g:1"));
        assert_eq!(user(&store(&p), "localhost:5000").as_deref(), Some("l:2"));
        assert_eq!(user(&store(&p), "quay.io"), None);
    }

    #[test]
    fn identity_token_and_plain_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = auth("user", "");
        a["identitytoken"] = json!("refresh-tok");
        let file = json!({"auths": {
            "a.example": a, "b.example": {"username": "u", "password": "p:w"},
            "c.example": auth("u", "p:w"),
        }});
        let s = store(&write_json(tmp.path(), "c.json", &file));
        let a = s.lookup("a.example").unwrap().unwrap();
        assert!(a.is_identity_token() && a.secret == "refresh-tok");
        assert_eq!(user(&s, "b.example").as_deref(), Some("u:p:w"));
        assert_eq!(user(&s, "c.example").as_deref(), Some("u:p:w"));
    }

    #[test]
    fn from_env_vars_order() {
        let tmp = tempfile::tempdir().unwrap();
        let t = |p: &str| tmp.path().join(p);
        let entry = |u: &str| json!({"auths": {"ghcr.io": auth(u, "x")}});
        for (dir, name, u) in [
            ("home/.docker", "config.json", "home"),
            ("run/containers", "auth.json", "xdg"),
            ("dcfg", "config.json", "dcfg"),
            ("", "raf.json", "raf"),
        ] {
            std::fs::create_dir_all(t(dir)).unwrap();
            write_json(&t(dir), name, &entry(u));
        }
        let (home, xdg, dcfg, raf) = (t("home"), t("run"), t("dcfg"), t("raf.json"));
        let env = |h: &PathBuf, x: &PathBuf, d: &PathBuf, r: Option<&PathBuf>| {
            let s = CredentialStore::from_env_vars(
                Some(h.clone()),
                Some(x.clone()),
                Some(d.clone()),
                r.cloned(),
            );
            s.lookup("ghcr.io").unwrap().map(|c| c.username)
        };
        let none = PathBuf::new();
        assert_eq!(env(&home, &xdg, &dcfg, Some(&raf)).as_deref(), Some("raf"));
        assert_eq!(env(&home, &xdg, &dcfg, None).as_deref(), Some("xdg"));
        assert_eq!(env(&home, &none, &dcfg, None).as_deref(), Some("dcfg"));
        assert_eq!(env(&home, &none, &none, None).as_deref(), Some("home"));
        assert_eq!(env(&none, &none, &none, None), None);
        let s = CredentialStore::from_env_vars(None, None, None, Some(raf))
            .with_static("ghcr.io", Credentials::new("static", "s"));
        assert_eq!(user(&s, "ghcr.io").as_deref(), Some("static:s"));
    }

    #[test]
    fn malformed_files_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        for (name, text, needle) in [
            ("syntax.json", r#"{"auths": {"#, "line"),
            ("array.json", "[]", "top level"),
            ("auths.json", r#"{"auths": "leaked-secret"}"#, "\"auths\""),
            (
                "entry.json",
                r#"{"auths": {"ghcr.io": "leaked-secret"}}"#,
                "ghcr.io",
            ),
            (
                "b64.json",
                r#"{"auths": {"ghcr.io": {"auth": "!leaked-secret"}}}"#,
                "base64",
            ),
            (
                "colon.json",
                r#"{"auths": {"ghcr.io": {"auth": "bGVha2VkLXNlY3JldA=="}}}"#,
                "':'",
            ),
            (
                "helpers.json",
                r#"{"credHelpers": {"ghcr.io": 5}}"#,
                "credHelpers",
            ),
            (
                "store.json",
                r#"{"credsStore": "../../bin/sh"}"#,
                "helper name",
            ),
        ] {
            let p = tmp.path().join(name);
            std::fs::write(&p, text).unwrap();
            let err = store(&p).lookup("ghcr.io").unwrap_err().to_string();
            assert!(
                err.contains(&p.display().to_string()) && err.contains(needle),
                "{err}"
            );
            assert!(!err.contains("leaked-secret"), "{name}: {err}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn helpers_protocol_and_precedence() {
        let tmp = tempfile::tempdir().unwrap();
        install_helper(tmp.path(), "test");
        let cfg = json!({
            "credsStore": "test",
            "credHelpers": {"ghcr.io": "test", "https://nothere.example": "test"},
            "auths": {
                "ghcr.io": auth("file", "f"), "nothere.example": auth("file", "f"),
                "unknown.example": auth("fallback", "f"), "quay.io": auth("file", "f"),
            },
        });
        let later = json!({"auths": {"nothere.example": auth("later", "l")}});
        let s = store(&write_json(tmp.path(), "config.json", &cfg))
            .with_file(write_json(tmp.path(), "later.json", &later))
            .with_helper_dir(tmp.path().to_path_buf());
        // credHelpers beats auths in the same file; `<token>` marks an identity token.
        let g = s.lookup("ghcr.io").unwrap().unwrap();
        assert!(g.is_identity_token() && g.secret == "tok");
        // credsStore beats auths; Docker Hub is asked for under its legacy server URL.
        assert_eq!(user(&s, "docker.io").as_deref(), Some("hub:hubpw"));
        assert_eq!(user(&s, "quay.io").as_deref(), Some("quser:qpw"));
        // credsStore knows nothing: this file's auths.
        assert_eq!(user(&s, "unknown.example").as_deref(), Some("fallback:f"));
        // credHelpers knows nothing: not this file's auths, but the next file.
        assert_eq!(user(&s, "nothere.example").as_deref(), Some("later:l"));
        assert_eq!(user(&s, "none.example"), None);
    }

    #[cfg(unix)]
    #[test]
    fn helper_failures() {
        let tmp = tempfile::tempdir().unwrap();
        let program = install_helper(tmp.path(), "test");
        let get =
            |url: &str, ms: u64| get_from_helper(&program, "test", url, Duration::from_millis(ms));
        assert_eq!(get("none.example", 5000).unwrap(), None);
        for url in ["fail.example", "garbage.example"] {
            let err = get(url, 5000).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, CredentialError::HelperFailed { .. }), "{msg}");
            assert!(
                msg.contains("docker-credential-test") && !msg.contains("leaked"),
                "{msg}"
            );
        }
        for url in ["slow.example", "slowchild.example"] {
            let start = Instant::now();
            let err = get(url, 300).unwrap_err();
            assert!(
                matches!(err, CredentialError::HelperTimeout { .. }),
                "{err}"
            );
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{url}: {:?}",
                start.elapsed()
            );
        }
        let nope = tmp.path().join("docker-credential-nope");
        let err = get_from_helper(&nope, "nope", "x", HELPER_TIMEOUT).unwrap_err();
        assert!(
            matches!(err, CredentialError::HelperNotFound { .. }),
            "{err}"
        );
        // A missing credHelpers helper is an error; a missing credsStore one is skipped.
        let dir = tmp.path().to_path_buf();
        let h = json!({"credHelpers": {"ghcr.io": "nope"}});
        let s = store(&write_json(tmp.path(), "h.json", &h)).with_helper_dir(dir.clone());
        assert!(matches!(
            s.lookup("ghcr.io"),
            Err(CredentialError::HelperNotFound { .. })
        ));
        let f = json!({"credsStore": "nope", "auths": {"ghcr.io": auth("a", "b")}});
        let s = store(&write_json(tmp.path(), "s.json", &f)).with_helper_dir(dir.clone());
        assert_eq!(user(&s, "ghcr.io").as_deref(), Some("a:b"));
        // Timeouts surface through lookup too.
        let t = json!({"credHelpers": {"slow.example": "test"}});
        let s = store(&write_json(tmp.path(), "t.json", &t))
            .with_helper_dir(dir)
            .with_helper_timeout(Duration::from_millis(200));
        assert!(matches!(
            s.lookup("slow.example"),
            Err(CredentialError::HelperTimeout { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(text in "\\PC{0,200}", registry in "[a-z0-9.:/-]{0,20}") {
            let tmp = tempfile::tempdir().unwrap();
            let p = tmp.path().join("c.json");
            std::fs::write(&p, &text).unwrap();
            let _ = store(&p).lookup(&registry);
        }
    }
}
