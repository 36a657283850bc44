//! Registry authentication: `WWW-Authenticate` challenges, the Bearer token flow and a token
//! cache.
//!
//! Registries answer an unauthenticated request with `401` and a challenge. For `Bearer`, the
//! client asks the named token server (`realm`) for a token for `service` and `scope`,
//! authenticating there with Basic credentials (or an OAuth2 refresh token), and retries with
//! the token. Tokens are cached per (realm, service, scope) until shortly before they expire so
//! a container start does not pay a token round trip per request. For `Basic`, credentials go on
//! every request to that host.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Token authentication: fetch a token from `realm`.
    Bearer {
        /// Token server URL.
        realm: String,
        /// Service name the token is for.
        service: Option<String>,
        /// Scope the registry asked for, if it said.
        scope: Option<String>,
    },
    /// Send Basic credentials directly.
    Basic {
        /// Realm (informational).
        realm: Option<String>,
    },
}

/// Parses the value of a `WWW-Authenticate` header (RFC 7235 auth-params, quoted or token
/// values). Unknown schemes give `None`.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = match header.find(char::is_whitespace) {
        Some(i) => (&header[..i], &header[i..]),
        None => (header, ""),
    };
    let params = parse_params(rest);
    let get = |k: &str| params.get(k).cloned();
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => Some(Challenge::Bearer {
            realm: get("realm")?,
            service: get("service"),
            scope: get("scope"),
        }),
        "basic" => Some(Challenge::Basic {
            realm: get("realm"),
        }),
        _ => None,
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while matches!(chars.peek(), Some(c) if c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            break;
        }
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        while matches!(chars.peek(), Some(c) if c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.to_ascii_lowercase(), value);
    }
    out
}

/// The JSON a token server answers with (distribution's token spec and OAuth2 both).
#[derive(Debug, Deserialize)]
pub struct TokenResponse {
    /// Token (distribution spec name).
    #[serde(default)]
    pub token: Option<String>,
    /// Token (OAuth2 name); either may be present.
    #[serde(default)]
    pub access_token: Option<String>,
    /// Lifetime in seconds; the spec's default is 60.
    #[serde(default)]
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token, whichever field carried it.
    pub fn into_token(self) -> Option<(String, Duration)> {
        let lifetime = Duration::from_secs(self.expires_in.unwrap_or(60).max(1));
        self.token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))
            .map(|t| (t, lifetime))
    }
}

/// Key of a cached token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// Token server.
    pub realm: String,
    /// Service.
    pub service: String,
    /// Scope (`repository:NAME:pull`).
    pub scope: String,
}

/// Tokens by key, dropped a little before they expire.
#[derive(Default)]
pub struct TokenCache {
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenCache({} tokens)", self.tokens.lock().len())
    }
}

impl TokenCache {
    /// A still-valid token for `key`.
    pub fn get(&self, key: &TokenKey) -> Option<String> {
        let mut tokens = self.tokens.lock();
        match tokens.get(key) {
            Some((t, until)) if Instant::now() < *until => Some(t.clone()),
            Some(_) => {
                tokens.remove(key);
                None
            }
            None => None,
        }
    }

    /// Stores a token valid for `lifetime` (renewed 10% or at most 30 s early so a request
    /// never starts with a token about to expire).
    pub fn put(&self, key: TokenKey, token: String, lifetime: Duration) {
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        self.tokens
            .lock()
            .insert(key, (token, Instant::now() + lifetime - margin));
    }

    /// Forgets a token the registry rejected.
    pub fn invalidate(&self, key: &TokenKey) {
        self.tokens.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_and_basic() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/busybox:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"basic realm="Registry Realm""#),
            Some(Challenge::Basic {
                realm: Some("Registry Realm".into())
            })
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm=http://x/t, service = "s\"q", error="insufficient_scope""#
            ),
            Some(Challenge::Bearer {
                realm: "http://x/t".into(),
                service: Some("s\"q".into()),
                scope: None
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate abc"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn token_cache_expiry() {
        let cache = TokenCache::default();
        let key = TokenKey {
            realm: "r".into(),
            service: "s".into(),
            scope: "repository:a:pull".into(),
        };
        cache.put(key.clone(), "t".into(), Duration::from_secs(60));
        assert_eq!(cache.get(&key).as_deref(), Some("t"));
        cache.invalidate(&key);
        assert_eq!(cache.get(&key), None);
        cache.put(key.clone(), "t".into(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(cache.get(&key), None);
    }

    #[test]
    fn token_response_fields() {
        let r: TokenResponse =
            serde_json::from_str(r#"{"access_token":"a","expires_in":300}"#).unwrap();
        assert_eq!(r.into_token(), Some(("a".into(), Duration::from_secs(300))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":"b"}"#).unwrap();
        assert_eq!(r.into_token(), Some(("b".into(), Duration::from_secs(60))));
        let r: TokenResponse = serde_json::from_str(r#"{"token":""}"#).unwrap();
        assert_eq!(r.into_token(), None);
    }
}
