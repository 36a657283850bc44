//! A Docker registry token server (distribution's "token authentication specification").
//!
//! `GET /token?service=S&scope=repository:NAME:pull,push&scope=...` with optional Basic auth, and
//! the OAuth2 form `POST /token` (`grant_type=password` or `refresh_token`) that containerd tries
//! first. Tokens are ES256 JWTs whose header carries an `x5c` chain: one self-signed P-256
//! certificate generated at start, written as PEM to [`TokenIssuer::cert_path`] for the
//! registry's `auth.token.rootcertbundle`. Claims: `iss`, `sub`, `aud` (the service, a string as
//! distribution 2.8 expects), `exp`, `nbf`, `iat`, `jti`, `access`.
//!
//! Note that distribution accepts a token up to 60 s after its `exp` (clock-skew leeway). To make
//! the registry reject tokens soon, use [`TokenIssuer::set_exp_shift`] with a negative shift.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use rand::RngCore;
use serde::Serialize;
use tempfile::TempDir;

use crate::server::{full, BackgroundServer, Body};

/// Settings of a [`TokenIssuer`].
#[derive(Debug, Clone)]
pub struct TokenIssuerConfig {
    /// Accepted users as (user, password).
    pub users: Vec<(String, String)>,
    /// Whether anonymous requests get `pull` on the repositories they ask for. If false they get a
    /// token with no access at all (the registry then answers 401 `insufficient_scope`).
    pub allow_anonymous_pull: bool,
    /// Token lifetime: `expires_in` of the response and `exp - iat` of the JWT.
    pub token_lifetime: Duration,
    /// The `service` (JWT `aud`) the registry is configured with.
    pub service: String,
    /// The issuer name (JWT `iss`) the registry trusts.
    pub issuer: String,
}

impl Default for TokenIssuerConfig {
    fn default() -> Self {
        TokenIssuerConfig {
            users: Vec::new(),
            allow_anonymous_pull: false,
            token_lifetime: Duration::from_secs(300),
            service: "lazypull-test-registry".to_string(),
            issuer: "lazypull-test-issuer".to_string(),
        }
    }
}

/// How the credentials of a token request checked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialCheck {
    /// No credentials were sent.
    Anonymous,
    /// Known user, right password (or a valid refresh token).
    Valid,
    /// Unknown user, wrong password, malformed `Authorization` or unknown refresh token.
    Invalid,
}

/// One entry of a JWT `access` claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Access {
    /// Resource type, e.g. `repository`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Resource name, e.g. `library/busybox`.
    pub name: String,
    /// Granted actions, e.g. `["pull", "push"]`.
    pub actions: Vec<String>,
}

/// One request the issuer answered, as recorded.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// `GET` or `POST`.
    pub method: String,
    /// The `service` parameter, if sent.
    pub service: Option<String>,
    /// Every scope asked for (multiple `scope` parameters and space-separated scopes are split).
    pub scopes: Vec<String>,
    /// The user name sent, if any.
    pub user: Option<String>,
    /// Whether the credentials were valid.
    pub credentials: CredentialCheck,
    /// `grant_type` of a POST request.
    pub grant_type: Option<String>,
    /// HTTP status of the answer.
    pub status: u16,
    /// Access granted in the issued token (empty when none was issued).
    pub granted: Vec<Access>,
}

struct IssuerState {
    users: Mutex<HashMap<String, String>>,
    allow_anonymous_pull: AtomicBool,
    lifetime_secs: AtomicU64,
    exp_shift: AtomicI64,
    fail_status: Mutex<Option<u16>>,
    service: String,
    issuer: String,
    key: EncodingKey,
    cert_der_b64: String,
    requests: Mutex<Vec<TokenRequest>>,
    refresh_tokens: Mutex<HashMap<String, String>>,
}

struct IssuerInner {
    state: Arc<IssuerState>,
    server: BackgroundServer,
    cert_path: PathBuf,
    _dir: TempDir,
}

/// A running token server. Cheap to clone (shared handle); stops when the last clone is dropped.
#[derive(Clone)]
pub struct TokenIssuer {
    inner: Arc<IssuerInner>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("realm", &self.realm())
            .field("service", &self.service())
            .finish()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    nbf: i64,
    iat: i64,
    jti: String,
    access: &'a [Access],
}

impl TokenIssuer {
    /// Generates a P-256 key and self-signed certificate, writes the certificate PEM to a temp
    /// dir and starts serving on a free 127.0.0.1 port.
    pub fn start(config: TokenIssuerConfig) -> TokenIssuer {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generate P-256 key for token issuer");
        let mut params = rcgen::CertificateParams::new(vec![config.issuer.clone()])
            .expect("certificate params for token issuer");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, config.issuer.clone());
        let cert = params
            .self_signed(&key_pair)
            .expect("self-sign token issuer certificate");
        let dir = tempfile::Builder::new()
            .prefix("lazypull-token-issuer-")
            .tempdir()
            .expect("create token issuer temp dir");
        let cert_path = dir.path().join("token-issuer.crt");
        std::fs::write(&cert_path, cert.pem()).expect("write token issuer certificate");
        let key = EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes())
            .expect("load token issuer key into jsonwebtoken");

        let state = Arc::new(IssuerState {
            users: Mutex::new(config.users.into_iter().collect()),
            allow_anonymous_pull: AtomicBool::new(config.allow_anonymous_pull),
            lifetime_secs: AtomicU64::new(config.token_lifetime.as_secs().max(1)),
            exp_shift: AtomicI64::new(0),
            fail_status: Mutex::new(None),
            service: config.service,
            issuer: config.issuer,
            key,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(cert.der()),
            requests: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
        });
        let handler_state = state.clone();
        let server = BackgroundServer::start("token-issuer", move |req| {
            let state = handler_state.clone();
            async move { handle(state, req).await }
        });
        TokenIssuer {
            inner: Arc::new(IssuerInner {
                state,
                server,
                cert_path,
                _dir: dir,
            }),
        }
    }

    /// An issuer with one user and default settings (no anonymous pull).
    pub fn with_user(user: &str, password: &str) -> TokenIssuer {
        TokenIssuer::start(TokenIssuerConfig {
            users: vec![(user.to_string(), password.to_string())],
            ..TokenIssuerConfig::default()
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        self.inner.server.addr().to_string()
    }

    /// The token endpoint, `http://127.0.0.1:PORT/token` (the registry's `realm`).
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.host())
    }

    /// The service name (JWT `aud`).
    pub fn service(&self) -> &str {
        &self.inner.state.service
    }

    /// The issuer name (JWT `iss`).
    pub fn issuer_name(&self) -> &str {
        &self.inner.state.issuer
    }

    /// PEM of the signing certificate, for the registry's `rootcertbundle`.
    pub fn cert_path(&self) -> &Path {
        &self.inner.cert_path
    }

    /// How many requests reached the token endpoint (any method, any outcome).
    pub fn request_count(&self) -> usize {
        self.inner.state.requests.lock().len()
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.inner.state.requests.lock().clone()
    }

    /// Forgets the recorded requests.
    pub fn reset(&self) {
        self.inner.state.requests.lock().clear();
    }

    /// Adds or replaces a user.
    pub fn add_user(&self, user: &str, password: &str) {
        self.inner
            .state
            .users
            .lock()
            .insert(user.to_string(), password.to_string());
    }

    /// Removes a user: later requests with its credentials get 401.
    pub fn remove_user(&self, user: &str) {
        self.inner.state.users.lock().remove(user);
    }

    /// Changes whether anonymous requests get `pull`.
    pub fn set_allow_anonymous_pull(&self, allow: bool) {
        self.inner
            .state
            .allow_anonymous_pull
            .store(allow, Ordering::SeqCst);
    }

    /// Lifetime of tokens issued from now on (whole seconds, at least 1).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.inner
            .state
            .lifetime_secs
            .store(lifetime.as_secs().max(1), Ordering::SeqCst);
    }

    /// Seconds added to the JWT `exp` claim (not to `expires_in`). distribution accepts tokens
    /// for 60 s past `exp`, so with lifetime L and shift -60 the registry rejects a token about
    /// L seconds after issue, which is what a token-refresh test needs.
    pub fn set_exp_shift(&self, secs: i64) {
        self.inner.state.exp_shift.store(secs, Ordering::SeqCst);
    }

    /// While `Some(status)`, every token request is answered with that status and no token
    /// (simulates an auth server outage).
    pub fn set_fail(&self, status: Option<u16>) {
        *self.inner.state.fail_status.lock() = status;
    }

    /// Mints a token granting exactly the given scopes (`repository:NAME:pull,push`, ...),
    /// subject `lazypull-test`, without going through HTTP and without recording a request.
    pub fn mint(&self, scopes: &[&str]) -> String {
        let access: Vec<Access> = scopes.iter().filter_map(|s| parse_scope(s)).collect();
        self.inner.state.sign("lazypull-test", &access)
    }
}

impl IssuerState {
    fn lifetime(&self) -> u64 {
        self.lifetime_secs.load(Ordering::SeqCst)
    }

    fn sign(&self, subject: &str, access: &[Access]) -> String {
        let now = unix_now() as i64;
        let mut jti = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut jti);
        let claims = Claims {
            iss: &self.issuer,
            sub: subject,
            aud: &self.service,
            exp: now + self.lifetime() as i64 + self.exp_shift.load(Ordering::SeqCst),
            nbf: now - 1,
            iat: now,
            jti: hex::encode(jti),
            access,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".to_string());
        header.x5c = Some(vec![self.cert_der_b64.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign JWT")
    }

    fn check_password(&self, user: &str, password: &str) -> CredentialCheck {
        match self.users.lock().get(user) {
            Some(p) if p == password => CredentialCheck::Valid,
            _ => CredentialCheck::Invalid,
        }
    }

    /// What a requester gets for `scopes`.
    fn grant(&self, credentials: CredentialCheck, scopes: &[String]) -> Vec<Access> {
        let requested = scopes.iter().filter_map(|s| parse_scope(s));
        match credentials {
            CredentialCheck::Valid => requested.collect(),
            CredentialCheck::Anonymous if self.allow_anonymous_pull.load(Ordering::SeqCst) => {
                requested
                    .filter(|a| a.kind == "repository")
                    .filter_map(|mut a| {
                        a.actions.retain(|x| x == "pull");
                        (!a.actions.is_empty()).then_some(a)
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// Parses `type:name:action,action`; the name may itself contain colons.
fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    // `repository(plugin):name:pull` carries a class in parentheses; keep only the type.
    let kind = kind.split('(').next().unwrap_or(kind);
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// RFC 3339 UTC timestamp of `secs` since the epoch.
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(value.to_string()))
        .expect("build token response")
}

fn unauthorized(message: &str) -> Response<Body> {
    let mut resp = json_response(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]}),
    );
    resp.headers_mut().insert(
        "www-authenticate",
        http::HeaderValue::from_static("Basic realm=\"lazypull-test-issuer\""),
    );
    resp
}

/// Decodes `application/x-www-form-urlencoded` or a query string into pairs.
fn form_pairs(s: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(s.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn split_scopes(pairs: &[(String, String)]) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .collect()
}

fn first(pairs: &[(String, String)], key: &str) -> Option<String> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

async fn handle(state: Arc<IssuerState>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let authorization = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => bytes::Bytes::new(),
    };

    let mut record = TokenRequest {
        method: method.to_string(),
        service: None,
        scopes: Vec::new(),
        user: None,
        credentials: CredentialCheck::Anonymous,
        grant_type: None,
        status: 0,
        granted: Vec::new(),
    };
    let response = answer(
        &state,
        &method,
        &path,
        &query,
        authorization.as_deref(),
        &body,
        &mut record,
    );
    record.status = response.status().as_u16();
    state.requests.lock().push(record);
    response
}

fn answer(
    state: &IssuerState,
    method: &Method,
    path: &str,
    query: &str,
    authorization: Option<&str>,
    body: &[u8],
    record: &mut TokenRequest,
) -> Response<Body> {
    if path != "/token" {
        return json_response(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error": "not found"}),
        );
    }
    let mut offline = false;
    let mut presented_refresh = None;
    match *method {
        Method::GET => {
            let pairs = form_pairs(query);
            record.service = first(&pairs, "service");
            record.scopes = split_scopes(&pairs);
            if let Some(auth) = authorization {
                let decoded = auth
                    .strip_prefix("Basic ")
                    .and_then(|b| {
                        base64::engine::general_purpose::STANDARD
                            .decode(b.trim())
                            .ok()
                    })
                    .and_then(|b| String::from_utf8(b).ok());
                match decoded.as_deref().and_then(|s| s.split_once(':')) {
                    Some((user, password)) => {
                        record.user = Some(user.to_string());
                        record.credentials = state.check_password(user, password);
                    }
                    None => record.credentials = CredentialCheck::Invalid,
                }
            }
        }
        Method::POST => {
            let pairs = form_pairs(&String::from_utf8_lossy(body));
            record.service = first(&pairs, "service");
            record.scopes = split_scopes(&pairs);
            record.grant_type = first(&pairs, "grant_type");
            offline = first(&pairs, "access_type").as_deref() == Some("offline");
            match record.grant_type.as_deref() {
                Some("password") => {
                    let user = first(&pairs, "username").unwrap_or_default();
                    let password = first(&pairs, "password").unwrap_or_default();
                    record.credentials = state.check_password(&user, &password);
                    record.user = Some(user);
                }
                Some("refresh_token") => {
                    let token = first(&pairs, "refresh_token").unwrap_or_default();
                    match state.refresh_tokens.lock().get(&token) {
                        Some(user) => {
                            record.user = Some(user.clone());
                            record.credentials = CredentialCheck::Valid;
                            presented_refresh = Some(token);
                        }
                        None => record.credentials = CredentialCheck::Invalid,
                    }
                }
                _ => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"error": "unsupported_grant_type"}),
                    )
                }
            }
        }
        _ => {
            return json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method not allowed"}),
            )
        }
    }

    if let Some(status) = *state.fail_status.lock() {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        return json_response(status, serde_json::json!({"error": "injected failure"}));
    }
    if let Some(service) = &record.service {
        if service != &state.service {
            return json_response(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": format!("unknown service {service:?}")}),
            );
        }
    }
    if record.credentials == CredentialCheck::Invalid {
        return unauthorized("invalid credentials");
    }

    record.granted = state.grant(record.credentials, &record.scopes);
    let subject = record.user.clone().unwrap_or_default();
    let token = state.sign(&subject, &record.granted);
    let now = unix_now();
    let mut answer = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": state.lifetime(),
        "issued_at": rfc3339(now),
    });
    if *method == Method::POST && record.credentials == CredentialCheck::Valid {
        let refresh = presented_refresh.unwrap_or_else(|| {
            let mut raw = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut raw);
            hex::encode(raw)
        });
        if offline || record.grant_type.as_deref() == Some("refresh_token") {
            state
                .refresh_tokens
                .lock()
                .insert(refresh.clone(), subject.clone());
            answer["refresh_token"] = serde_json::Value::String(refresh);
        }
    }
    json_response(StatusCode::OK, answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse() {
        let a = parse_scope("repository:library/busybox:pull,push").unwrap();
        assert_eq!(a.kind, "repository");
        assert_eq!(a.name, "library/busybox");
        assert_eq!(a.actions, vec!["pull", "push"]);
        let b = parse_scope("registry:catalog:*").unwrap();
        assert_eq!((b.kind.as_str(), b.name.as_str()), ("registry", "catalog"));
        assert_eq!(b.actions, vec!["*"]);
        let c = parse_scope("repository(plugin):a:b:pull").unwrap();
        assert_eq!((c.kind.as_str(), c.name.as_str()), ("repository", "a:b"));
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
