//! Authentication: who a CONNECT is. Usernames with argon2 password hashes from the
//! configuration, JWT bearer tokens in the password field, the username of a verified TLS
//! client certificate, and whether anonymous clients are let in.
//!
//! The outcome for each CONNECT, in this order:
//!
//! 1. a client certificate that passed verification and `tls.username_from_cert` is set:
//!    the certificate's name is the username (username and password in CONNECT ignored);
//! 2. JWT is configured and the password looks like a JWT (`xxx.yyy.zzz` in base64url
//!    characters), unless the username is a configured user and `auth.jwt.password_as_token`
//!    is `unless_user` (the default: a configured user's password is always a password,
//!    even one like `correct.horse.battery`): a valid token (signature, `exp`, `nbf`, and
//!    `aud` / `iss`, which are required when configured) makes its username claim the
//!    username; an invalid one is refused with 0x86 / return code 4;
//! 3. the username is a configured user: the password must match its hash, else 0x86 / 4;
//! 4. otherwise, with `auth.allow_anonymous`, the client is let in under the username it
//!    sent (unverified; never one of the configured users), else refused: 0x86 / 4 if it
//!    sent credentials, 0x87 / 5 (not authorized) if it sent none.
//!
//! Password hashes are checked on a blocking thread, a few at a time: argon2 is meant to be
//! slow, and a flood of wrong passwords must not stall the node's event loop. Successful
//! checks are remembered for a while (a salted SHA-256 of the password, in memory), and the
//! checks of one username take turns, so a reconnect storm of devices sharing a login costs
//! one argon2 run, not one per device (each also holds argon2's 19 MiB while it runs).

use jetmq_common::settings::InvalidSetting;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Let in clients that do not authenticate. Off by default: a node that faces the
    /// internet must not need an operator to remember to close it.
    pub allow_anonymous: bool,
    pub users: Vec<UserConfig>,
    pub jwt: JwtConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    /// PHC string from `jetmq-broker hash-password`, e.g. `$argon2id$v=19$m=19456,t=2,p=1$...`.
    pub password_hash: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    HS384,
    HS512,
    RS256,
    RS384,
    RS512,
    ES256,
    ES384,
}

impl JwtAlgorithm {
    fn symmetric(self) -> bool {
        matches!(
            self,
            JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512
        )
    }

    fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as A;
        match self {
            JwtAlgorithm::HS256 => A::HS256,
            JwtAlgorithm::HS384 => A::HS384,
            JwtAlgorithm::HS512 => A::HS512,
            JwtAlgorithm::RS256 => A::RS256,
            JwtAlgorithm::RS384 => A::RS384,
            JwtAlgorithm::RS512 => A::RS512,
            JwtAlgorithm::ES256 => A::ES256,
            JwtAlgorithm::ES384 => A::ES384,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Off unless `secret` or `public_key_file` is set.
    pub algorithm: JwtAlgorithm,
    /// Shared secret for HS256/384/512 (the UTF-8 bytes of the string).
    pub secret: Option<String>,
    /// PEM public key (or certificate) for RS*/ES*.
    pub public_key_file: Option<PathBuf>,
    /// Required `aud` value; unset: `aud` is not checked.
    pub audience: Option<String>,
    /// Required `iss` value; unset: `iss` is not checked.
    pub issuer: Option<String>,
    /// The claim holding the username.
    pub username_claim: String,
    /// Clock skew allowed on `exp` and `nbf`, seconds.
    pub leeway_secs: u64,
    /// When a password that looks like a JWT is taken as one.
    pub password_as_token: PasswordAsToken,
}

/// When a CONNECT password shaped like a JWT (`xxx.yyy.zzz`) is checked as a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PasswordAsToken {
    /// Unless the CONNECT username is a configured user (`auth.users`): that user's
    /// password is checked against its hash, whatever it looks like.
    #[default]
    UnlessUser,
    /// Always: a configured user whose password has two dots cannot log in.
    Always,
}

impl Default for JwtConfig {
    fn default() -> Self {
        JwtConfig {
            algorithm: JwtAlgorithm::HS256,
            secret: None,
            public_key_file: None,
            audience: None,
            issuer: None,
            username_claim: "sub".to_owned(),
            leeway_secs: 30,
            password_as_token: PasswordAsToken::default(),
        }
    }
}

impl JwtConfig {
    fn enabled(&self) -> bool {
        self.secret.is_some() || self.public_key_file.is_some()
    }
}

impl AuthConfig {
    /// True when some CONNECT can be admitted: anonymous access, a configured user, JWT, or
    /// (`client_certificates`) names taken from verified client certificates. A node without
    /// any of these refuses everyone, which is safe but almost always a configuration mistake.
    pub fn admits_anyone(&self, client_certificates: bool) -> bool {
        self.allow_anonymous || !self.users.is_empty() || self.jwt.enabled() || client_certificates
    }

    /// Syntax checks (no files are read). Errors name the key.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let mut seen = std::collections::HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            if user.username.is_empty() {
                return Err(InvalidSetting::new(
                    "auth.users",
                    format!("user {}: empty username", i + 1),
                ));
            }
            if !seen.insert(user.username.as_str()) {
                return Err(InvalidSetting::new(
                    "auth.users",
                    format!("user {:?} is listed twice", user.username),
                ));
            }
            PasswordHash::new(&user.password_hash).map_err(|e| {
                InvalidSetting::new(
                    "auth.users",
                    format!(
                        "user {:?}: password_hash is not a PHC string ({e}); make one with `jetmq-broker hash-password`",
                        user.username
                    ),
                )
            })?;
        }
        let jwt = &self.jwt;
        if jwt.secret.is_some() && jwt.public_key_file.is_some() {
            return Err(InvalidSetting::new(
                "auth.jwt",
                "set either secret (HS*) or public_key_file (RS*/ES*), not both",
            ));
        }
        if jwt.enabled() {
            if jwt.algorithm.symmetric() != jwt.secret.is_some() {
                return Err(InvalidSetting::new(
                    "auth.jwt.algorithm",
                    format!(
                        "{:?} needs {}",
                        jwt.algorithm,
                        if jwt.algorithm.symmetric() {
                            "auth.jwt.secret"
                        } else {
                            "auth.jwt.public_key_file"
                        }
                    ),
                ));
            }
            if jwt.secret.as_deref().is_some_and(|s| s.len() < 32) {
                return Err(InvalidSetting::new(
                    "auth.jwt.secret",
                    "must be at least 32 bytes long",
                ));
            }
            if jwt.username_claim.is_empty() {
                return Err(InvalidSetting::new(
                    "auth.jwt.username_claim",
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong password, unknown user without anonymous access, bad token: 0x86 / 4.
    BadCredentials,
    /// No credentials and anonymous access is off: 0x87 / 5.
    NotAuthorized,
    /// Too many checks waiting: 0x89 server busy / 3.
    Busy,
}

/// Who the client is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The username authorization rules see (None: anonymous).
    pub username: Option<String>,
    pub method: Method,
    /// When the credentials stop being valid, seconds since the Unix epoch (a JWT's `exp`
    /// plus the configured leeway): the connection is closed then.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Anonymous,
    Password,
    Jwt,
    Certificate,
}

/// What a CONNECT offers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    /// From a verified client certificate (see [`crate::transport::PeerInfo`]).
    pub cert_username: Option<&'a str>,
}

/// Concurrent password hash checks per node.
const VERIFY_SLOTS: usize = 4;
/// Usernames whose password checks may run side by side (more are striped over these).
const USER_TURNS: usize = 64;
/// How long a CONNECT waits for a free slot before being refused as busy.
const VERIFY_QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a successful password check is remembered.
const CACHE_TTL: Duration = Duration::from_secs(600);
/// Remembered checks at most (the cache is cleared when full).
const CACHE_MAX: usize = 100_000;

pub struct Authenticator {
    allow_anonymous: bool,
    users: HashMap<String, Arc<str>>,
    /// Checked for unknown usernames too, so their timing does not tell them apart.
    dummy_hash: Arc<str>,
    jwt: Option<Jwt>,
    slots: Semaphore,
    cache: Mutex<HashMap<String, ([u8; 32], Instant)>>,
    cache_salt: [u8; 16],
    /// argon2 runs so far (each costs tens of milliseconds and its working memory).
    hash_checks: AtomicU64,
    /// Password checks of one username take turns (striped by a keyed hash of the name).
    user_turns: Vec<tokio::sync::Mutex<()>>,
    turn_hasher: std::collections::hash_map::RandomState,
}

struct Jwt {
    password_as_token: PasswordAsToken,
    key: jsonwebtoken::DecodingKey,
    validation: jsonwebtoken::Validation,
    username_claim: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("allow_anonymous", &self.allow_anonymous)
            .field("users", &self.users.len())
            .field("jwt", &self.jwt.is_some())
            .finish_non_exhaustive()
    }
}

/// Hashes a password for `auth.users` (argon2id, default parameters, random salt).
pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("cannot hash password: {e}"))
}

fn verify_hash(hash: &str, password: &[u8]) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default().verify_password(password, &parsed).is_ok(),
        Err(_) => false,
    }
}

fn looks_like_jwt(password: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(password).ok()?;
    let ok = text.split('.').count() == 3
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    ok.then_some(text)
}

impl Authenticator {
    /// Builds the authenticator; reads the JWT key file. Errors name the key.
    pub fn new(config: &AuthConfig) -> anyhow::Result<Authenticator> {
        let users = config
            .users
            .iter()
            .map(|u| (u.username.clone(), Arc::from(u.password_hash.as_str())))
            .collect();
        let jwt = if config.jwt.enabled() {
            let c = &config.jwt;
            let key = match (&c.secret, &c.public_key_file) {
                (Some(secret), _) => jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
                (None, Some(path)) => {
                    let pem = std::fs::read(path).with_context(|| {
                        format!("auth.jwt.public_key_file: cannot read {}", path.display())
                    })?;
                    let key = if matches!(c.algorithm, JwtAlgorithm::ES256 | JwtAlgorithm::ES384) {
                        jsonwebtoken::DecodingKey::from_ec_pem(&pem)
                    } else {
                        jsonwebtoken::DecodingKey::from_rsa_pem(&pem)
                    };
                    key.with_context(|| {
                        format!(
                            "auth.jwt.public_key_file: {} is not a {:?} public key",
                            path.display(),
                            c.algorithm
                        )
                    })?
                }
                (None, None) => unreachable!("enabled() checked"),
            };
            let mut validation = jsonwebtoken::Validation::new(c.algorithm.to_jsonwebtoken());
            validation.leeway = c.leeway_secs;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            // A configured audience or issuer is required, not only checked when present:
            // otherwise a token minted for another service (no `aud`) or by anyone holding
            // the key for another purpose (no `iss`) would pass.
            let mut required = vec!["exp"];
            match &c.audience {
                Some(aud) => {
                    validation.set_audience(&[aud]);
                    required.push("aud");
                }
                None => validation.validate_aud = false,
            }
            if let Some(iss) = &c.issuer {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            Some(Jwt {
                password_as_token: c.password_as_token,
                key,
                validation,
                username_claim: c.username_claim.clone(),
            })
        } else {
            None
        };
        let mut cache_salt = [0u8; 16];
        getrandom_fill(&mut cache_salt);
        let dummy: String = cache_salt.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Authenticator {
            allow_anonymous: config.allow_anonymous,
            users,
            dummy_hash: Arc::from(hash_password(&dummy)?.as_str()),
            jwt,
            slots: Semaphore::new(VERIFY_SLOTS),
            cache: Mutex::new(HashMap::new()),
            cache_salt,
            hash_checks: AtomicU64::new(0),
            user_turns: (0..USER_TURNS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            turn_hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// Decides who a CONNECT is.
    pub async fn authenticate(&self, creds: Credentials<'_>) -> Result<Identity, Refusal> {
        if let Some(name) = creds.cert_username {
            return Ok(Identity {
                username: Some(name.to_owned()),
                method: Method::Certificate,
                expires_at: None,
            });
        }
        if let Some((jwt, token)) = self.token_in(&creds) {
            return match jwt.check(token) {
                Ok((username, expires_at)) => Ok(Identity {
                    username: Some(username),
                    method: Method::Jwt,
                    expires_at: Some(expires_at),
                }),
                Err(reason) => {
                    tracing::info!(username = creds.username, reason, "JWT refused");
                    Err(Refusal::BadCredentials)
                }
            };
        }
        if let Some(username) = creds.username {
            if let Some(hash) = self.users.get(username) {
                let Some(password) = creds.password else {
                    return Err(Refusal::BadCredentials);
                };
                return if self
                    .check_password(username, hash.clone(), password)
                    .await?
                {
                    Ok(Identity {
                        username: Some(username.to_owned()),
                        method: Method::Password,
                        expires_at: None,
                    })
                } else {
                    Err(Refusal::BadCredentials)
                };
            }
        }
        if self.allow_anonymous {
            return Ok(Identity {
                username: creds.username.map(str::to_owned),
                method: Method::Anonymous,
                expires_at: None,
            });
        }
        if creds.username.is_none() && creds.password.is_none() {
            return Err(Refusal::NotAuthorized);
        }
        if let (Some(_), Some(password)) = (creds.username, creds.password) {
            // Unknown user: spend the same time as for a known one.
            let _ = self
                .check_password("", self.dummy_hash.clone(), password)
                .await?;
        }
        Err(Refusal::BadCredentials)
    }

    /// The JWT to check, if JWT is configured and the password is to be taken as one.
    fn token_in<'c>(&self, creds: &Credentials<'c>) -> Option<(&Jwt, &'c str)> {
        let jwt = self.jwt.as_ref()?;
        let token = creds.password.and_then(looks_like_jwt)?;
        let configured_user = creds.username.is_some_and(|u| self.users.contains_key(u));
        match jwt.password_as_token {
            PasswordAsToken::UnlessUser if configured_user => None,
            _ => Some((jwt, token)),
        }
    }

    /// Which of [`Authenticator::user_turns`] a username waits on.
    fn turn_of(&self, username: &str) -> usize {
        use std::hash::BuildHasher;
        (self.turn_hasher.hash_one(username) % USER_TURNS as u64) as usize
    }

    fn cache_key(&self, password: &[u8]) -> [u8; 32] {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(self.cache_salt);
        hasher.update(password);
        hasher.finalize().into()
    }

    /// This user logged in with this password recently.
    fn remembered(&self, username: &str, key: &[u8; 32]) -> bool {
        if username.is_empty() {
            return false;
        }
        let cache = self.cache.lock();
        cache
            .get(username)
            .is_some_and(|(known, at)| known == key && at.elapsed() < CACHE_TTL)
    }

    async fn check_password(
        &self,
        username: &str,
        hash: Arc<str>,
        password: &[u8],
    ) -> Result<bool, Refusal> {
        let key = self.cache_key(password);
        if self.remembered(username, &key) {
            return Ok(true);
        }
        let waited = tokio::time::timeout(VERIFY_QUEUE_TIMEOUT, async {
            // One check per username at a time: in a reconnect storm every login of a user
            // misses the cache before the first check ends; the others wait for it and find
            // the answer remembered (argon2 also holds 19 MiB while it runs).
            let turn = self.user_turns[self.turn_of(username)].lock().await;
            let slot = self.slots.acquire().await;
            (turn, slot)
        })
        .await;
        let Ok((_turn, Ok(_slot))) = waited else {
            return Err(Refusal::Busy);
        };
        if self.remembered(username, &key) {
            return Ok(true);
        }
        let password = password.to_vec();
        self.hash_checks.fetch_add(1, Ordering::Relaxed);
        let ok = tokio::task::spawn_blocking(move || verify_hash(&hash, &password))
            .await
            .unwrap_or(false);
        if ok && !username.is_empty() {
            let mut cache = self.cache.lock();
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(username.to_owned(), (key, Instant::now()));
        }
        Ok(ok)
    }
}

impl Jwt {
    /// The username of a valid token and when it expires (`exp` + leeway), or why it is
    /// not valid (for the log).
    fn check(&self, token: &str) -> Result<(String, u64), &'static str> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &self.key,
            &self.validation,
        )
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "expired",
            ErrorKind::ImmatureSignature => "not valid yet (nbf)",
            ErrorKind::InvalidAudience => "wrong audience",
            ErrorKind::InvalidIssuer => "wrong issuer",
            ErrorKind::InvalidSignature => "bad signature",
            ErrorKind::InvalidAlgorithm => "wrong algorithm",
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "exp" => "no exp claim",
                "aud" => "no aud claim (audience is configured)",
                "iss" => "no iss claim (issuer is configured)",
                _ => "missing a required claim",
            },
            _ => "malformed",
        })?;
        // Validation required a numeric exp; fractional seconds round down.
        let exp = data
            .claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .ok_or("exp is not a number")?;
        match data.claims.get(&self.username_claim) {
            Some(serde_json::Value::String(name)) if !name.is_empty() => {
                Ok((name.clone(), exp.saturating_add(self.validation.leeway)))
            }
            _ => Err("no username claim"),
        }
    }
}

/// Random bytes from the OS (via argon2's re-exported `rand_core`).
fn getrandom_fill(buf: &mut [u8]) {
    use argon2::password_hash::rand_core::RngCore;
    argon2::password_hash::rand_core::OsRng.fill_bytes(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn config_with(users: &[(&str, &str)], allow_anonymous: bool) -> AuthConfig {
        AuthConfig {
            allow_anonymous,
            users: users
                .iter()
                .map(|(u, p)| UserConfig {
                    username: (*u).to_owned(),
                    password_hash: hash_password(p).expect("hash"),
                })
                .collect(),
            jwt: JwtConfig::default(),
        }
    }

    fn creds<'a>(user: Option<&'a str>, password: Option<&'a str>) -> Credentials<'a> {
        Credentials {
            username: user,
            password: password.map(str::as_bytes),
            cert_username: None,
        }
    }

    #[test]
    fn hashes_verify_and_validate() {
        let hash = hash_password("correct horse").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_hash(&hash, b"correct horse"));
        assert!(!verify_hash(&hash, b"wrong horse"));
        assert!(!verify_hash("not a hash", b"correct horse"));
        let config = config_with(&[("alice", "pw")], false);
        assert!(config.validate().is_ok());
        let mut bad = config.clone();
        bad.users[0].password_hash = "plaintext".into();
        assert_eq!(bad.validate().unwrap_err().key, "auth.users");
        let mut twice = config.clone();
        twice.users.push(twice.users[0].clone());
        assert!(twice.validate().is_err());
    }

    #[tokio::test]
    async fn passwords_and_anonymous_access() {
        let auth = Authenticator::new(&config_with(&[("alice", "s3cret")], false)).expect("auth");
        let ok = auth
            .authenticate(creds(Some("alice"), Some("s3cret")))
            .await
            .expect("right password");
        assert_eq!(ok.username.as_deref(), Some("alice"));
        assert_eq!(ok.method, Method::Password);
        // Cached the second time; still right.
        assert!(auth
            .authenticate(creds(Some("alice"), Some("s3cret")))
            .await
            .is_ok());
        for (user, password, refusal) in [
            (Some("alice"), Some("wrong"), Refusal::BadCredentials),
            (Some("alice"), None, Refusal::BadCredentials),
            (Some("bob"), Some("s3cret"), Refusal::BadCredentials),
            (Some("bob"), None, Refusal::BadCredentials),
            (None, None, Refusal::NotAuthorized),
        ] {
            assert_eq!(
                auth.authenticate(creds(user, password)).await,
                Err(refusal),
                "{user:?} {password:?}"
            );
        }

        let open = Authenticator::new(&config_with(&[("alice", "s3cret")], true)).expect("auth");
        let anon = open.authenticate(creds(None, None)).await.expect("anon");
        assert_eq!((anon.username, anon.method), (None, Method::Anonymous));
        let claimed = open
            .authenticate(creds(Some("bob"), None))
            .await
            .expect("unknown user, anonymous allowed");
        assert_eq!(claimed.username.as_deref(), Some("bob"));
        // A configured user's name cannot be taken without its password.
        assert_eq!(
            open.authenticate(creds(Some("alice"), Some("nope"))).await,
            Err(Refusal::BadCredentials)
        );
        assert_eq!(
            open.authenticate(creds(Some("alice"), None)).await,
            Err(Refusal::BadCredentials)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_login_storm_of_one_user_costs_few_hash_checks() {
        let auth = Arc::new(
            Authenticator::new(&config_with(&[("fleet", "s3cret")], false)).expect("auth"),
        );
        let logins: Vec<_> = (0..64)
            .map(|_| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    auth.authenticate(creds(Some("fleet"), Some("s3cret")))
                        .await
                        .is_ok()
                })
            })
            .collect();
        for login in logins {
            assert!(login.await.expect("joined"));
        }
        let runs = auth.hash_checks.load(Ordering::Relaxed);
        // The others waited for the first check and found its answer remembered.
        assert_eq!(runs, 1, "{runs} argon2 runs for 64 logins of one user");
        // A wrong password is never served from the cache.
        assert_eq!(
            auth.authenticate(creds(Some("fleet"), Some("guess"))).await,
            Err(Refusal::BadCredentials)
        );
        assert_eq!(auth.hash_checks.load(Ordering::Relaxed), runs + 1);
    }

    #[tokio::test]
    async fn certificate_names_win() {
        let auth = Authenticator::new(&config_with(&[], false)).expect("auth");
        let id = auth
            .authenticate(Credentials {
                username: Some("ignored"),
                password: Some(b"ignored"),
                cert_username: Some("device-7"),
            })
            .await
            .expect("cert");
        assert_eq!(id.username.as_deref(), Some("device-7"));
        assert_eq!(id.method, Method::Certificate);
    }

    fn jwt_auth(audience: Option<&str>) -> Authenticator {
        let mut config = config_with(&[], false);
        config.jwt.secret = Some(SECRET.into());
        config.jwt.audience = audience.map(str::to_owned);
        config.jwt.username_claim = "name".into();
        config.validate().expect("valid");
        Authenticator::new(&config).expect("auth")
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("token")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[tokio::test]
    async fn jwt_tokens_are_checked() {
        let auth = jwt_auth(Some("jetmq"));
        let good = token(
            serde_json::json!({"name": "dev-1", "aud": "jetmq", "exp": now() + 60}),
            SECRET,
        );
        let id = auth
            .authenticate(creds(Some("whatever"), Some(&good)))
            .await
            .expect("valid token");
        assert_eq!(id.username.as_deref(), Some("dev-1"));
        assert_eq!(id.method, Method::Jwt);
        // exp + the default leeway of 30 s, so the connection can be closed then.
        let expires_at = id.expires_at.expect("a token login expires");
        assert!((now() + 60 + 30..=now() + 60 + 31).contains(&expires_at));
        let other_secret = "ffffffffffffffffffffffffffffffff";
        for bad in [
            // expired, beyond the leeway
            serde_json::json!({"name": "dev-1", "aud": "jetmq", "exp": now() - 120}),
            // wrong audience
            serde_json::json!({"name": "dev-1", "aud": "other", "exp": now() + 60}),
            // no expiry
            serde_json::json!({"name": "dev-1", "aud": "jetmq"}),
            // no username claim
            serde_json::json!({"sub": "dev-1", "aud": "jetmq", "exp": now() + 60}),
            // not yet valid
            serde_json::json!({"name": "dev-1", "aud": "jetmq", "exp": now() + 600, "nbf": now() + 300}),
        ] {
            let t = token(bad.clone(), SECRET);
            assert_eq!(
                auth.authenticate(creds(None, Some(&t))).await,
                Err(Refusal::BadCredentials),
                "{bad}"
            );
        }
        let forged = token(
            serde_json::json!({"name": "dev-1", "aud": "jetmq", "exp": now() + 60}),
            other_secret,
        );
        assert_eq!(
            auth.authenticate(creds(None, Some(&forged))).await,
            Err(Refusal::BadCredentials)
        );
        // An RS256 header cannot be used against an HS256 configuration.
        let (header, rest) = good.split_once('.').expect("jwt");
        let _ = header;
        let rs_header = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9";
        let confused = format!("{rs_header}.{rest}");
        assert_eq!(
            auth.authenticate(creds(None, Some(&confused))).await,
            Err(Refusal::BadCredentials)
        );
        // Without an audience configured, tokens with any audience are fine.
        let loose = jwt_auth(None);
        let t = token(
            serde_json::json!({"name": "dev-2", "aud": "x", "exp": now() + 60}),
            SECRET,
        );
        assert!(loose.authenticate(creds(None, Some(&t))).await.is_ok());
    }

    #[tokio::test]
    async fn configured_audience_and_issuer_are_required() {
        let mut config = config_with(&[], false);
        config.jwt.secret = Some(SECRET.into());
        config.jwt.audience = Some("jetmq".into());
        config.jwt.issuer = Some("https://issuer.test".into());
        let auth = Authenticator::new(&config).expect("auth");
        let exp = now() + 60;
        let full = serde_json::json!({"sub": "d", "aud": "jetmq", "iss": "https://issuer.test", "exp": exp});
        assert!(auth
            .authenticate(creds(None, Some(&token(full, SECRET))))
            .await
            .is_ok());
        for (missing, claims) in [
            (
                "aud",
                serde_json::json!({"sub": "d", "iss": "https://issuer.test", "exp": exp}),
            ),
            (
                "iss",
                serde_json::json!({"sub": "d", "aud": "jetmq", "exp": exp}),
            ),
            ("both", serde_json::json!({"sub": "d", "exp": exp})),
        ] {
            let t = token(claims, SECRET);
            assert_eq!(
                auth.authenticate(creds(None, Some(&t))).await,
                Err(Refusal::BadCredentials),
                "token without {missing}"
            );
        }
        // Neither configured: neither required.
        let loose = jwt_auth(None);
        let t = token(serde_json::json!({"name": "d", "exp": exp}), SECRET);
        assert!(loose.authenticate(creds(None, Some(&t))).await.is_ok());
    }

    #[tokio::test]
    async fn a_configured_users_dotted_password_is_a_password() {
        let dotted = "correct.horse.battery";
        assert!(looks_like_jwt(dotted.as_bytes()).is_some());
        let mut config = config_with(&[("alice", dotted)], false);
        config.jwt.secret = Some(SECRET.into());
        let good = token(
            serde_json::json!({"sub": "dev-1", "exp": now() + 60}),
            SECRET,
        );

        let auth = Authenticator::new(&config).expect("auth");
        let id = auth
            .authenticate(creds(Some("alice"), Some(dotted)))
            .await
            .expect("alice's own password");
        assert_eq!(id.method, Method::Password);
        // A token under a configured user's name is that user's (wrong) password.
        assert_eq!(
            auth.authenticate(creds(Some("alice"), Some(&good))).await,
            Err(Refusal::BadCredentials)
        );
        // Any other username: the token decides.
        let id = auth
            .authenticate(creds(Some("x"), Some(&good)))
            .await
            .expect("token");
        assert_eq!(
            (id.username.as_deref(), id.method),
            (Some("dev-1"), Method::Jwt)
        );

        config.jwt.password_as_token = PasswordAsToken::Always;
        let always = Authenticator::new(&config).expect("auth");
        assert_eq!(
            always
                .authenticate(creds(Some("alice"), Some(dotted)))
                .await,
            Err(Refusal::BadCredentials)
        );
        let id = always
            .authenticate(creds(Some("alice"), Some(&good)))
            .await
            .expect("token");
        assert_eq!(id.username.as_deref(), Some("dev-1"));
    }

    #[test]
    fn jwt_config_is_validated() {
        let mut config = AuthConfig::default();
        config.jwt.secret = Some("short".into());
        assert_eq!(config.validate().unwrap_err().key, "auth.jwt.secret");
        config.jwt.secret = Some(SECRET.into());
        config.jwt.algorithm = JwtAlgorithm::RS256;
        assert_eq!(config.validate().unwrap_err().key, "auth.jwt.algorithm");
        config.jwt.algorithm = JwtAlgorithm::HS512;
        assert!(config.validate().is_ok());
        assert!(looks_like_jwt(b"a.b.c").is_some());
        assert!(looks_like_jwt(b"a.b").is_none());
        assert!(looks_like_jwt(b"plain password.with.dots").is_none());
    }
}
