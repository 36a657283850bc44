//! Image references (`busybox`, `ghcr.io/o/r:tag`, `host:5000/r@sha256:...`).
//!
//! Users type short names, but registries, caches, containerd and podman must all agree on one
//! spelling of the same image, otherwise the same image is pulled, cached and mounted twice. The
//! rules follow the CNCF distribution `reference` package (what docker and podman accept), so a
//! name that works with `docker pull` works with lazypull and means the same image.
//!
//! Deliberate differences: the 255-character limit applies to the normalised name (so that the
//! canonical form always re-parses), and a first component with a '.' that is not a valid host
//! name but is a valid path component (`a.b-c__d/e`) is a Docker Hub namespace, not an error.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

const DEFAULT_REGISTRY: &str = "docker.io";
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;

/// A parsed, normalised image reference.
///
/// Kept normalised (registry filled in, `library/` added, `latest` defaulted) so that equality and
/// hashing identify the image, not the way the user happened to spell it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why an image reference was rejected.
///
/// One variant per mistake so callers (and tests) can tell them apart, and every message quotes
/// the input and says what was expected, because users paste these names from many places. The
/// first field is always the rejected input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Nothing to pull: usually an unset variable in a script.
    #[error("invalid reference \"\": an image reference cannot be empty (expected NAME[:TAG][@DIGEST], e.g. busybox:latest)")]
    Empty,
    /// Whitespace is never part of a name; it usually comes from copy-paste or a config file.
    #[error("invalid reference {0:?}: leading or trailing whitespace is not allowed; remove it")]
    Whitespace(String),
    /// A 64-hex string is an image ID; docker refuses it as a name to avoid ambiguity.
    #[error(
        "invalid reference {0:?}: a 64-character hex string is an image ID, not a repository name"
    )]
    ImageId(String),
    /// Only a tag or digest was given (`:tag`, `@sha256:...`).
    #[error("invalid reference {0:?}: the repository name before the tag or digest is missing")]
    MissingName(String),
    /// Only a registry (second field) was given: `ghcr.io/`, `[::1]:5000`.
    #[error("invalid reference {0:?}: it names only the registry {1:?}; add a repository path (e.g. {1}/owner/image)")]
    MissingRepository(String, String),
    /// `//` or a leading `/`: a path component is empty.
    #[error("invalid reference {0:?}: empty path component ('//' or a leading '/'); separate components with a single '/'")]
    EmptyComponent(String),
    /// A trailing `/` after the repository.
    #[error("invalid reference {0:?}: trailing '/' after the repository; remove it or add the missing component")]
    TrailingSlash(String),
    /// A character (second field) that can never appear in a repository path.
    #[error("invalid reference {0:?}: character {1:?} is not allowed in a repository name (allowed: a-z 0-9 . _ - /)")]
    InvalidCharacter(String, char),
    /// Registries only accept lower-case repository paths (second field: the path as written).
    #[error("invalid reference {0:?}: repository name {1:?} must be lowercase")]
    UppercaseRepository(String, String),
    /// Separators misused in a path component (second field), e.g. `a..b`, `-a`, `a_-b`; the
    /// third field says what is wrong.
    #[error("invalid reference {0:?}: path component {1:?} is malformed: {2}")]
    InvalidComponent(String, String, &'static str),
    /// The registry (second field) is not a host name, IPv4 or bracketed IPv6 address, optionally
    /// with a port; the third field says what is wrong.
    #[error("invalid reference {0:?}: registry host {1:?} is malformed: {2}")]
    InvalidDomain(String, String, &'static str),
    /// The registry port (second field) is not a number in range.
    #[error(
        "invalid reference {0:?}: registry port {1:?} must be a decimal number between 0 and 65535"
    )]
    InvalidPort(String, String),
    /// `name:` with nothing after the colon.
    #[error("invalid reference {0:?}: the tag after ':' is empty; write NAME:TAG or drop the ':'")]
    EmptyTag(String),
    /// Tags are limited to 128 characters (second field: the tag's length).
    #[error("invalid reference {0:?}: the tag is {1} characters long; at most 128 are allowed")]
    TagTooLong(String, usize),
    /// The tag (second field) has characters outside `[A-Za-z0-9_.-]` or starts with `.`/`-`.
    #[error("invalid reference {0:?}: tag {1:?} is malformed; expected one of [A-Za-z0-9_] followed by up to 127 of [A-Za-z0-9_.-]")]
    InvalidTag(String, String),
    /// `name@` with nothing after the at sign.
    #[error("invalid reference {0:?}: the digest after '@' is empty; expected NAME@sha256:<64 hex digits>")]
    EmptyDigest(String),
    /// The digest after `@` did not parse (second field: why).
    #[error("invalid reference {0:?}: {1}")]
    InvalidDigest(String, #[source] DigestError),
    /// Registries refuse names longer than 255 characters (second field: the normalised length).
    #[error("invalid reference {0:?}: the full name is {1} characters long once normalised; at most 255 are allowed")]
    NameTooLong(String, usize),
}

use ReferenceError as E;

impl Reference {
    /// Parses and normalises what a user typed, so every later step works on one canonical form.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(E::Empty);
        }
        let input = || s.to_string();
        if s.trim() != s {
            return Err(E::Whitespace(input()));
        }
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(E::ImageId(input()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((_, "")) => return Err(E::EmptyDigest(input())),
            Some((rest, d)) => {
                let digest = d
                    .parse::<Digest>()
                    .map_err(|source| E::InvalidDigest(input(), source))?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        if rest.starts_with('[') && !rest.contains('/') {
            return Err(E::MissingRepository(input(), rest.to_string()));
        }
        let (name, tag) = split_tag(rest);
        if name.is_empty() {
            return Err(E::MissingName(input()));
        }
        if let Some(tag) = tag {
            check_tag(s, tag)?;
        }
        let (registry, remote) = match name.split_once('/') {
            Some((first, remainder)) if treated_as_domain(first) => {
                check_domain(s, first)?;
                if remainder.is_empty() {
                    return Err(E::MissingRepository(input(), first.to_string()));
                }
                (normalise_registry(first), remainder)
            }
            _ => (DEFAULT_REGISTRY.to_string(), name),
        };
        check_path(s, remote)?;
        let repository = if registry == DEFAULT_REGISTRY && !remote.contains('/') {
            format!("{OFFICIAL_PREFIX}{remote}")
        } else {
            remote.to_string()
        };
        let len = registry.len() + 1 + repository.len();
        if len > NAME_MAX {
            return Err(E::NameTooLong(input(), len));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The normalised registry, the key for credentials, `hosts.toml` and mirrors.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path, as used in `/v2/<repository>/...` URLs and token scopes.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The tag; `None` only for digest-only references, which must not float to `latest`.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The pinned digest, which wins over the tag because it names immutable content.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What goes after `/manifests/`: the digest when pinned (immutable, verifiable), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// A copy pinned to the resolved manifest, so later reads cannot see a re-pushed tag; the tag
    /// is kept for display.
    pub fn with_digest(&self, d: Digest) -> Reference {
        Reference {
            digest: Some(d),
            ..self.clone()
        }
    }

    /// The host to contact: Docker Hub's name differs from its API endpoint.
    pub fn api_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// The short form users type (`busybox:latest`), for messages and listings; it re-parses to
    /// the same reference.
    pub fn familiar(&self) -> String {
        let mut out = if self.registry == DEFAULT_REGISTRY {
            let short = self
                .repository
                .strip_prefix(OFFICIAL_PREFIX)
                .filter(|r| !r.contains('/'))
                .unwrap_or(&self.repository);
            match short.split_once('/') {
                Some((first, _)) if treated_as_domain(first) => {
                    format!("{DEFAULT_REGISTRY}/{}", self.repository)
                }
                _ => short.to_string(),
            }
        } else {
            format!("{}/{}", self.registry, self.repository)
        };
        self.push_suffix(&mut out);
        out
    }

    /// Whether the registry is this machine, where plain HTTP is acceptable (test registries).
    pub fn is_localhost(&self) -> bool {
        let reg = self.registry.as_str();
        if let Some(rest) = reg.strip_prefix('[') {
            let addr = rest.split_once(']').map_or(rest, |(a, _)| a);
            return addr.parse::<Ipv6Addr>().is_ok_and(|a| a.is_loopback());
        }
        let host = reg.split_once(':').map_or(reg, |(h, _)| h);
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<Ipv4Addr>().is_ok_and(|a| a.is_loopback())
    }

    fn push_suffix(&self, out: &mut String) {
        if let Some(t) = &self.tag {
            out.push(':');
            out.push_str(t);
        }
        if let Some(d) = &self.digest {
            out.push('@');
            out.push_str(&d.to_string());
        }
    }
}

/// Splits `name[:tag]`; a ':' before the last '/' belongs to a registry port.
fn split_tag(rest: &str) -> (&str, Option<&str>) {
    match (rest.rfind(':'), rest.rfind('/')) {
        (Some(c), Some(slash)) if c < slash => (rest, None),
        (Some(c), _) => (&rest[..c], Some(&rest[c + 1..])),
        (None, _) => (rest, None),
    }
}

/// Whether the first path component names a registry. A '.'-containing component that is a
/// valid path component but not a valid host (`a.b-c__d`) stays a Docker Hub namespace.
fn treated_as_domain(first: &str) -> bool {
    first == "localhost"
        || first.contains(':')
        || (first.contains('.')
            && (host_error(first).is_none() || component_error(first).is_some()))
}

fn normalise_registry(domain: &str) -> String {
    let hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    if hub.iter().any(|h| domain.eq_ignore_ascii_case(h)) {
        DEFAULT_REGISTRY.to_string()
    } else {
        domain.to_string()
    }
}

fn check_tag(input: &str, tag: &str) -> Result<(), ReferenceError> {
    if tag.is_empty() {
        return Err(E::EmptyTag(input.to_string()));
    }
    if tag.len() > TAG_MAX {
        return Err(E::TagTooLong(input.to_string(), tag.len()));
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut bytes = tag.bytes();
    let first_ok = bytes.next().is_some_and(word);
    if !first_ok || !bytes.all(|b| word(b) || b == b'.' || b == b'-') {
        return Err(E::InvalidTag(input.to_string(), tag.to_string()));
    }
    Ok(())
}

/// Validates `host[:port]` where host is a DNS name, IPv4 address or `[IPv6]`.
fn check_domain(input: &str, domain: &str) -> Result<(), ReferenceError> {
    let bad = |reason| E::InvalidDomain(input.to_string(), domain.to_string(), reason);
    let port = if let Some(rest) = domain.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or_else(|| bad("'[' of an IPv6 address is not closed by ']'"))?;
        if addr.is_empty()
            || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
            || addr.parse::<Ipv6Addr>().is_err()
        {
            return Err(bad("expected an IPv6 address inside [], e.g. [::1]"));
        }
        match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad("expected ':PORT' or nothing after ']'"))?,
            ),
        }
    } else {
        let (host, port) = match domain.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (domain, None),
        };
        if let Some(reason) = host_error(host) {
            return Err(bad(reason));
        }
        port
    };
    if let Some(p) = port {
        let numeric = !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        if !numeric || !p.parse::<u32>().is_ok_and(|n| n <= 65535) {
            return Err(E::InvalidPort(input.to_string(), p.to_string()));
        }
    }
    Ok(())
}

/// Why `host` is not a dot-separated list of `[A-Za-z0-9]` labels with inner '-', if it is not.
fn host_error(host: &str) -> Option<&'static str> {
    if host.is_empty() {
        return Some("the host name is empty");
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Some("empty label (a leading, trailing or doubled '.')");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Some("only letters, digits, '-' and '.' are allowed in a host name");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a host label cannot start or end with '-'");
        }
    }
    None
}

/// Why `c` is not `[a-z0-9]+` runs joined by '.', '_', '__' or '-'+, if it is not.
fn component_error(c: &str) -> Option<&'static str> {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    if !b.first().is_some_and(alnum) {
        return Some("it must start with a lower-case letter or digit");
    }
    if !b.last().is_some_and(alnum) {
        return Some("it must end with a lower-case letter or digit");
    }
    let mut i = 0;
    while i < b.len() {
        if b.get(i).is_some_and(alnum) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !b.get(i).is_some_and(alnum) {
            i += 1;
        }
        let sep = &b[start..i];
        let ok = sep == b"." || sep == b"_" || sep == b"__" || sep.iter().all(|&x| x == b'-');
        if !ok {
            return Some(
                "letters/digits must be separated by exactly one of '.', '_', '__' or '-'+",
            );
        }
    }
    None
}

fn check_path(input: &str, path: &str) -> Result<(), ReferenceError> {
    if let Some(ch) = path
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(E::InvalidCharacter(input.to_string(), ch));
    }
    if path.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(E::UppercaseRepository(input.to_string(), path.to_string()));
    }
    let count = path.split('/').count();
    for (i, component) in path.split('/').enumerate() {
        if component.is_empty() {
            return Err(if i + 1 == count && i > 0 {
                E::TrailingSlash(input.to_string())
            } else {
                E::EmptyComponent(input.to_string())
            });
        }
        if let Some(reason) = component_error(component) {
            return Err(E::InvalidComponent(
                input.to_string(),
                component.to_string(),
                reason,
            ));
        }
    }
    Ok(())
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// The fully qualified form, so logs and stored records are unambiguous.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = format!("{}/{}", self.registry, self.repository);
        self.push_suffix(&mut out);
        f.write_str(&out)
    }
}

/// Stored as the fully qualified string, readable in config and state files.
impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Parsed (and validated) from the string form, so bad state files fail loudly.
impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    macro_rules! dg {
        () => {
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        };
    }
    const HUB: &str = "registry-1.docker.io";
    type S = &'static str;
    type Row = (S, S, S, Option<S>, Option<S>, S, S, S, bool);

    #[test]
    fn normalisation_table() {
        #[rustfmt::skip]
        let cases: &[Row] = &[
            // input, registry, repository, tag, digest, display, familiar, api_host, localhost
            ("busybox", "docker.io", "library/busybox", Some("latest"), None,
             "docker.io/library/busybox:latest", "busybox:latest", HUB, false),
            ("library/busybox:1.36", "docker.io", "library/busybox", Some("1.36"), None,
             "docker.io/library/busybox:1.36", "busybox:1.36", HUB, false),
            ("docker.io/busybox", "docker.io", "library/busybox", Some("latest"), None,
             "docker.io/library/busybox:latest", "busybox:latest", HUB, false),
            ("index.docker.io/library/busybox", "docker.io", "library/busybox", Some("latest"), None,
             "docker.io/library/busybox:latest", "busybox:latest", HUB, false),
            ("registry-1.docker.io/user/app", "docker.io", "user/app", Some("latest"), None,
             "docker.io/user/app:latest", "user/app:latest", HUB, false),
            ("user/app:v1", "docker.io", "user/app", Some("v1"), None,
             "docker.io/user/app:v1", "user/app:v1", HUB, false),
            ("ghcr.io/o/r:tag", "ghcr.io", "o/r", Some("tag"), None,
             "ghcr.io/o/r:tag", "ghcr.io/o/r:tag", "ghcr.io", false),
            (concat!("host:5000/r@", dg!()), "host:5000", "r", None, Some(dg!()),
             concat!("host:5000/r@", dg!()), concat!("host:5000/r@", dg!()), "host:5000", false),
            ("localhost/r", "localhost", "r", Some("latest"), None,
             "localhost/r:latest", "localhost/r:latest", "localhost", true),
            ("localhost:5000/a/b/c:t", "localhost:5000", "a/b/c", Some("t"), None,
             "localhost:5000/a/b/c:t", "localhost:5000/a/b/c:t", "localhost:5000", true),
            ("127.0.0.1:5000/x", "127.0.0.1:5000", "x", Some("latest"), None,
             "127.0.0.1:5000/x:latest", "127.0.0.1:5000/x:latest", "127.0.0.1:5000", true),
            ("[::1]:5000/x:y", "[::1]:5000", "x", Some("y"), None,
             "[::1]:5000/x:y", "[::1]:5000/x:y", "[::1]:5000", true),
            (concat!("r:tag@", dg!()), "docker.io", "library/r", Some("tag"), Some(dg!()),
             concat!("docker.io/library/r:tag@", dg!()), concat!("r:tag@", dg!()), HUB, false),
            ("a.b-c__d/e", "docker.io", "a.b-c__d/e", Some("latest"), None,
             "docker.io/a.b-c__d/e:latest", "a.b-c__d/e:latest", HUB, false),
            ("docker.io/foo.bar/x", "docker.io", "foo.bar/x", Some("latest"), None,
             "docker.io/foo.bar/x:latest", "docker.io/foo.bar/x:latest", HUB, false),
            ("Registry.Example.COM:443/a--b_c/d:V_1.0-rc", "Registry.Example.COM:443", "a--b_c/d",
             Some("V_1.0-rc"), None, "Registry.Example.COM:443/a--b_c/d:V_1.0-rc",
             "Registry.Example.COM:443/a--b_c/d:V_1.0-rc", "Registry.Example.COM:443", false),
            ("localhost:5000", "docker.io", "library/localhost", Some("5000"), None,
             "docker.io/library/localhost:5000", "localhost:5000", HUB, false),
        ];
        for &(input, registry, repo, tag, digest, display, familiar, api, local) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(r.registry(), registry, "{input}");
            assert_eq!(r.repository(), repo, "{input}");
            assert_eq!(r.tag(), tag, "{input}");
            assert_eq!(
                r.digest().map(|d| d.to_string()).as_deref(),
                digest,
                "{input}"
            );
            assert_eq!(r.to_string(), display, "{input}");
            assert_eq!(r.familiar(), familiar, "{input}");
            assert_eq!(r.api_host(), api, "{input}");
            assert_eq!(r.is_localhost(), local, "{input}");
            assert_eq!(Reference::parse(display).unwrap(), r, "{input}");
            assert_eq!(Reference::parse(familiar).unwrap(), r, "{input}");
            assert_eq!(input.parse::<Reference>().unwrap(), r);
        }
    }

    #[test]
    fn manifest_reference_and_pinning() {
        let r = Reference::parse("ghcr.io/o/r:v2").unwrap();
        assert_eq!(r.manifest_reference(), "v2");
        let d: Digest = dg!().parse().unwrap();
        let pinned = r.with_digest(d);
        assert_eq!(pinned.tag(), Some("v2"));
        assert_eq!(pinned.manifest_reference(), dg!());
        assert_eq!(pinned.to_string(), concat!("ghcr.io/o/r:v2@", dg!()));
        assert!(Reference::parse("[0:0:0:0:0:0:0:1]/x")
            .unwrap()
            .is_localhost());
        assert!(Reference::parse("127.9.9.9/x").unwrap().is_localhost());
        assert!(!Reference::parse("128.0.0.1/x").unwrap().is_localhost());
    }

    #[test]
    fn serde_uses_string_form() {
        let r = Reference::parse("busybox").unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"docker.io/library/busybox:latest\"");
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        let err = serde_json::from_str::<Reference>("\"a//b\"").unwrap_err();
        assert!(err.to_string().contains("empty path component"), "{err}");
    }

    #[test]
    fn malformed_table() {
        type Check = fn(&ReferenceError) -> bool;
        let long_tag = format!("busybox:{}", "t".repeat(129));
        let long_name = format!("ghcr.io/{}", "a".repeat(248));
        #[rustfmt::skip]
        let cases: Vec<(String, Check, &str)> = vec![
            ("".into(), |e| matches!(e, E::Empty), "cannot be empty"),
            (" busybox".into(), |e| matches!(e, E::Whitespace(_)), "whitespace"),
            ("busybox\n".into(), |e| matches!(e, E::Whitespace(_)), "whitespace"),
            ("a//b".into(), |e| matches!(e, E::EmptyComponent(_)), "'//'"),
            ("/a".into(), |e| matches!(e, E::EmptyComponent(_)), "leading '/'"),
            ("user/app/".into(), |e| matches!(e, E::TrailingSlash(_)), "trailing '/'"),
            ("Busybox".into(), |e| matches!(e, E::UppercaseRepository(..)), "lowercase"),
            ("ghcr.io/o/App:1".into(), |e| matches!(e, E::UppercaseRepository(..)), "lowercase"),
            (long_tag, |e| matches!(e, E::TagTooLong(_, 129)), "at most 128"),
            ("busybox:bad!tag".into(), |e| matches!(e, E::InvalidTag(..)), "[A-Za-z0-9_]"),
            ("busybox:-x".into(), |e| matches!(e, E::InvalidTag(..)), "[A-Za-z0-9_.-]"),
            ("busybox:".into(), |e| matches!(e, E::EmptyTag(_)), "tag after ':' is empty"),
            ("busybox@".into(), |e| matches!(e, E::EmptyDigest(_)), "sha256:<64 hex"),
            ("busybox@md5:abcd".into(), |e| matches!(e, E::InvalidDigest(..)), "unsupported"),
            ("busybox@sha256:abc".into(), |e| matches!(e, E::InvalidDigest(..)), "64"),
            ("host:port/x".into(), |e| matches!(e, E::InvalidPort(..)), "decimal number"),
            ("host:99999/x".into(), |e| matches!(e, E::InvalidPort(..)), "65535"),
            ("busy!box".into(), |e| matches!(e, E::InvalidCharacter(_, '!')), "'!'"),
            ("ghcr.io/".into(), |e| matches!(e, E::MissingRepository(..)), "add a repository"),
            ("[::1]:5000".into(), |e| matches!(e, E::MissingRepository(..)), "[::1]:5000/"),
            (long_name, |e| matches!(e, E::NameTooLong(_, 256)), "at most 255"),
            ("docker.io/a__-b".into(), |e| matches!(e, E::InvalidComponent(..)), "'__'"),
            ("u/-a".into(), |e| matches!(e, E::InvalidComponent(..)), "must start"),
            (":tag".into(), |e| matches!(e, E::MissingName(_)), "repository name"),
            ("a..b/c".into(), |e| matches!(e, E::InvalidDomain(..)), "empty label"),
            ("gh_cr.io:5000/x".into(), |e| matches!(e, E::InvalidDomain(..)), "letters, digits"),
            ("[zz::1]:5000/x".into(), |e| matches!(e, E::InvalidDomain(..)), "IPv6"),
            ("a".repeat(32) + &"0".repeat(32), |e| matches!(e, E::ImageId(_)), "image ID"),
        ];
        assert!(cases.len() >= 12);
        for (input, check, hint) in &cases {
            let err = Reference::parse(input).expect_err(input);
            assert!(check(&err), "{input:?}: unexpected {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{input:?}")), "{msg} lacks the input");
            assert!(msg.contains(hint), "{msg:?} lacks hint {hint:?}");
        }
    }

    fn valid_reference() -> impl Strategy<Value = String> {
        let component = "[a-z0-9]{1,4}((\\.|_|__|-{1,2})[a-z0-9]{1,4}){0,2}";
        let registry = prop_oneof![
            Just(String::new()),
            Just("docker.io/".to_string()),
            Just("index.docker.io/".to_string()),
            Just("localhost/".to_string()),
            "[a-zA-Z][a-z0-9-]{0,5}[a-z0-9]\\.[a-z]{2,3}(:[0-9]{1,4})?/",
            "127\\.0\\.0\\.[0-9]{1,2}:[0-9]{2,4}/",
            "\\[::1\\](:5000)?/",
        ];
        let tag = proptest::option::of("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}");
        let digest = proptest::option::of(any::<[u8; 32]>());
        (
            registry,
            proptest::collection::vec(component, 1..4),
            tag,
            digest,
        )
            .prop_map(|(reg, comps, tag, digest)| {
                let mut s = reg + &comps.join("/");
                if let Some(t) = tag {
                    s = format!("{s}:{t}");
                }
                if let Some(d) = digest {
                    s = format!("{s}@{}", Digest::sha256_of(&d));
                }
                s
            })
    }

    fn assert_round_trips(r: &Reference) {
        let display = r.to_string();
        assert_eq!(Reference::parse(&display).as_ref(), Ok(r), "{display}");
        let familiar = r.familiar();
        assert_eq!(Reference::parse(&familiar).as_ref(), Ok(r), "{familiar}");
    }

    proptest! {
        #[test]
        fn valid_references_round_trip(s in valid_reference()) {
            let r = Reference::parse(&s).map_err(|e| TestCaseError::fail(e.to_string()))?;
            assert_round_trips(&r);
        }

        #[test]
        fn parse_never_panics(s in prop_oneof![any::<String>(), "[a-zA-Z0-9:/@._\\[\\]-]{0,40}"]) {
            if let Ok(r) = Reference::parse(&s) {
                assert_round_trips(&r);
            }
        }
    }
}
