//! The NATS identities of a jetmq cluster (`jetmq-broker nats-auth`): one NKEY user per role,
//! a route secret, and the nats-server include that lets each role do only what it needs.
//!
//! Every shipped NATS config includes the generated `auth.conf`, so nothing can connect to
//! NATS without one of these keys: NATS carries every MQTT message, session and retained
//! message in plain subjects, so an anonymous NATS client would bypass every MQTT ACL.
//!
//! The roles live in the global account (the share mapping is a server-level `mappings`
//! block, which applies to the global account only) and are told apart by per-user
//! permissions:
//! - `broker`: jetmq's own subjects, JetStream API, its KV buckets and its inbox.
//! - `ingestor`: only what consuming a share takes: look up the message stream, create
//!   its durable pull consumer with a share filter, pull, acknowledge, and its own inbox.
//!   It cannot subscribe to any jetmq subject, publish into `jetmq.in.>`, or read a bucket.
//!
//! Each role uses its own inbox prefix ([`BROKER_INBOX_PREFIX`], [`INGESTOR_INBOX_PREFIX`]),
//! so one role cannot subscribe to the replies meant for the other.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::streams::{MESSAGE_STREAM, NODE_BUCKET, SESSION_BUCKET};

/// Inbox prefix of jetmq-broker's NATS connection (`ConnectOptions::custom_inbox_prefix`).
pub const BROKER_INBOX_PREFIX: &str = "_INBOX.broker";
/// Inbox prefix of jetmq-ingestor's NATS connection.
pub const INGESTOR_INBOX_PREFIX: &str = "_INBOX.ingestor";

/// The server include with the users and their permissions.
pub const AUTH_CONF: &str = "auth.conf";
/// The include for a `cluster {}` block: route authorization and routes with the secret.
pub const ROUTES_CONF: &str = "routes.conf";
/// The route password (hex), kept so that `--if-missing` can rewrite `routes.conf`.
pub const ROUTE_SECRET: &str = "route.secret";
/// User name that NATS servers present to each other on routes.
pub const ROUTE_USER: &str = "jetmq-route";

/// A role that connects to NATS, and the file that holds its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Broker,
    Ingestor,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Broker, Role::Ingestor];

    pub fn name(self) -> &'static str {
        match self {
            Role::Broker => "broker",
            Role::Ingestor => "ingestor",
        }
    }

    /// `<role>.nk`: the user seed, mode 0600; `nats.nkey_seed_file` takes it.
    pub fn seed_file(self) -> String {
        format!("{}.nk", self.name())
    }

    /// What the role may publish and subscribe to (nats-server permission subjects).
    pub fn permissions(self) -> (Vec<String>, Vec<String>) {
        match self {
            Role::Broker => (
                vec![
                    // MQTT messages in (jetmq.in.>, mapped onto shares), retained copies
                    // (jetmq.r.>), the inter-node kick/drain requests (jetmq.node.>).
                    "jetmq.>".into(),
                    // Streams, buckets, consumers: the broker creates and runs them all.
                    "$JS.API.>".into(),
                    format!("$KV.{SESSION_BUCKET}.>"),
                    format!("$KV.{NODE_BUCKET}.>"),
                    "$JS.ACK.>".into(),
                    // Flow control replies of the push consumers (KV watchers, retained).
                    "$JS.FC.>".into(),
                    // Replies to other nodes' kick/drain requests.
                    format!("{BROKER_INBOX_PREFIX}.>"),
                ],
                vec![
                    "jetmq.>".into(),
                    // JetStream replies, push consumer deliveries and request replies.
                    format!("{BROKER_INBOX_PREFIX}.>"),
                ],
            ),
            Role::Ingestor => (
                vec![
                    "$JS.API.INFO".into(),
                    // Whichever of broker and ingestor starts first creates the message
                    // stream; a stream that exists is only looked up (no update, no delete).
                    format!("$JS.API.STREAM.INFO.{MESSAGE_STREAM}"),
                    format!("$JS.API.STREAM.CREATE.{MESSAGE_STREAM}"),
                    // Its durable consumer, with a filter on one share: the filter is part
                    // of the subject, and the server checks it against the request.
                    format!("$JS.API.CONSUMER.CREATE.{MESSAGE_STREAM}.*.jetmq.s.*.>"),
                    format!("$JS.API.CONSUMER.INFO.{MESSAGE_STREAM}.*"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{MESSAGE_STREAM}.*"),
                    format!("$JS.API.CONSUMER.UNPIN.{MESSAGE_STREAM}.*"),
                    // Acknowledgements (v1 and v2 reply subjects).
                    format!("$JS.ACK.{MESSAGE_STREAM}.>"),
                    format!("$JS.ACK.*.*.{MESSAGE_STREAM}.>"),
                ],
                vec![format!("{INGESTOR_INBOX_PREFIX}.>")],
            ),
        }
    }
}

#[derive(Debug, Error)]
pub enum NatsAuthError {
    #[error(
        "{0} exists; pass --force to replace every file, or --if-missing to keep the existing keys"
    )]
    Exists(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a user NKEY seed: {message}")]
    BadSeed { path: PathBuf, message: String },
    #[error("route {0:?}: give host:port (no scheme, no credentials)")]
    BadRoute(String),
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub dir: PathBuf,
    /// Replace every existing file (new keys: every server and client must get the new ones).
    pub force: bool,
    /// Keep existing seeds and route secret; write only what is missing and the includes.
    pub if_missing: bool,
    /// `host:port` of every route (NATS cluster) listener, to write `routes.conf`.
    pub routes: Vec<String>,
}

/// What was written (or kept).
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub written: Vec<PathBuf>,
    pub kept: Vec<PathBuf>,
    /// Public key per role.
    pub public_keys: Vec<(Role, String)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NatsAuthError + '_ {
    move |source| NatsAuthError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to `path` with `mode`, through a temporary file and a rename, so a
/// reader never sees half a file and a secret never exists with wider permissions.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), NatsAuthError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn random_hex(bytes: usize) -> Result<String, NatsAuthError> {
    let path = Path::new("/dev/urandom");
    let mut buf = vec![0u8; bytes];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io(path))?;
    Ok(buf.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

fn read_first_line(path: &Path) -> Result<String, NatsAuthError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    Ok(text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default()
        .to_owned())
}

fn check_route(route: &str) -> Result<(), NatsAuthError> {
    let bad = || NatsAuthError::BadRoute(route.to_owned());
    let (host, port) = route.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(['/', '@', ' ']) || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Generates (or completes) the credentials of a cluster in `options.dir`.
pub fn generate(options: &Options) -> Result<Generated, NatsAuthError> {
    for route in &options.routes {
        check_route(route)?;
    }
    let dir = &options.dir;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut out = Generated::default();
    let mut secret_files: Vec<PathBuf> =
        Role::ALL.iter().map(|r| dir.join(r.seed_file())).collect();
    secret_files.push(dir.join(ROUTE_SECRET));
    if !options.force && !options.if_missing {
        let mut all = secret_files.clone();
        all.push(dir.join(AUTH_CONF));
        all.push(dir.join(ROUTES_CONF));
        if let Some(existing) = all.into_iter().find(|p| p.exists()) {
            return Err(NatsAuthError::Exists(existing));
        }
    }
    let keep = |path: &Path| options.if_missing && !options.force && path.exists();

    for role in Role::ALL {
        let path = dir.join(role.seed_file());
        let pair = if keep(&path) {
            let seed = read_first_line(&path)?;
            let pair = nkeys::KeyPair::from_seed(&seed).map_err(|e| NatsAuthError::BadSeed {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if pair.key_pair_type() != nkeys::KeyPairType::User {
                return Err(NatsAuthError::BadSeed {
                    path,
                    message: "not a user seed (SU...)".into(),
                });
            }
            out.kept.push(path);
            pair
        } else {
            let pair = nkeys::KeyPair::new_user();
            let seed = pair.seed().map_err(|e| NatsAuthError::BadSeed {
                path: path.clone(),
                message: e.to_string(),
            })?;
            write_file(&path, &format!("{seed}\n"), 0o600)?;
            out.written.push(path);
            pair
        };
        out.public_keys.push((role, pair.public_key()));
    }

    let secret_path = dir.join(ROUTE_SECRET);
    let secret = if keep(&secret_path) {
        out.kept.push(secret_path.clone());
        read_first_line(&secret_path)?
    } else {
        let secret = random_hex(32)?;
        write_file(&secret_path, &format!("{secret}\n"), 0o600)?;
        out.written.push(secret_path);
        secret
    };

    let auth = dir.join(AUTH_CONF);
    write_file(&auth, &auth_conf(&out.public_keys), 0o644)?;
    out.written.push(auth);
    if !options.routes.is_empty() {
        let routes = dir.join(ROUTES_CONF);
        write_file(&routes, &routes_conf(&secret, &options.routes), 0o600)?;
        out.written.push(routes);
    }
    Ok(out)
}

fn quoted_list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `authorization` block: one NKEY user per role with its permissions. There is no
/// `no_auth_user`, so a client without one of these keys is refused.
pub fn auth_conf(public_keys: &[(Role, String)]) -> String {
    let mut s = String::from(
        "# Generated by `jetmq-broker nats-auth`: the NATS users of jetmq and what each may do.\n\
         # Include it at the top level of every nats-server config of the cluster. Clients\n\
         # without one of these NKEYs are refused (there is no anonymous user).\n\
         # Seeds: broker.nk -> jetmq-broker, ingestor.nk -> jetmq-ingestor (nats.nkey_seed_file).\n\
         # See docs/nats-config.md (\"Identities and permissions\").\n\
         authorization {\n  users: [\n",
    );
    for (role, key) in public_keys {
        let (publish, subscribe) = role.permissions();
        let _ = write!(
            s,
            "    # {name}\n    {{\n      nkey: \"{key}\"\n      permissions: {{\n        publish: {{ allow: [{publish}] }}\n        subscribe: {{ allow: [{subscribe}] }}\n      }}\n    }}\n",
            name = role.name(),
            publish = quoted_list(&publish),
            subscribe = quoted_list(&subscribe),
        );
    }
    s.push_str("  ]\n}\n");
    s
}

/// The include for a `cluster {}` block: routes authenticate with a shared secret, which
/// each server also presents when it dials the others.
pub fn routes_conf(secret: &str, routes: &[String]) -> String {
    let mut s = String::from(
        "# Generated by `jetmq-broker nats-auth --routes`: include inside `cluster { }`.\n\
         # Holds the route secret: keep it mode 0600.\n",
    );
    let _ = writeln!(
        s,
        "authorization {{ user: \"{ROUTE_USER}\", password: \"{secret}\", timeout: 2 }}"
    );
    s.push_str("routes: [\n");
    for route in routes {
        let _ = writeln!(s, "  \"nats-route://{ROUTE_USER}:{secret}@{route}\"");
    }
    s.push_str("]\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::natsconn::NatsSecurity;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn generates_seeds_with_private_modes_and_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!("jetmq-natsauth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let options = Options {
            dir: dir.clone(),
            routes: vec!["nats-1:6222".into(), "127.0.0.1:6223".into()],
            ..Default::default()
        };
        let first = generate(&options).expect("generates");
        for role in Role::ALL {
            let seed = dir.join(role.seed_file());
            assert_eq!(mode(&seed), 0o600);
            let security = NatsSecurity {
                nkey_seed_file: Some(seed),
                ..Default::default()
            };
            security
                .validate()
                .expect("the seed file is a valid nkey_seed_file");
        }
        assert_eq!(mode(&dir.join(ROUTE_SECRET)), 0o600);
        assert_eq!(mode(&dir.join(ROUTES_CONF)), 0o600);
        let auth = std::fs::read_to_string(dir.join(AUTH_CONF)).expect("auth.conf");
        for (_, key) in &first.public_keys {
            assert!(auth.contains(key.as_str()));
        }
        assert!(!auth.contains("no_auth_user"));
        let routes = std::fs::read_to_string(dir.join(ROUTES_CONF)).expect("routes.conf");
        assert!(routes.contains("@nats-1:6222\""), "{routes}");

        let again = generate(&options).expect_err("refuses to overwrite");
        assert!(matches!(again, NatsAuthError::Exists(_)), "{again}");

        let kept = generate(&Options {
            if_missing: true,
            ..options.clone()
        })
        .expect("keeps");
        assert_eq!(kept.public_keys, first.public_keys);
        assert_eq!(
            std::fs::read_to_string(dir.join(ROUTES_CONF)).expect("routes.conf"),
            routes
        );

        let replaced = generate(&Options {
            force: true,
            ..options.clone()
        })
        .expect("replaces");
        assert_ne!(replaced.public_keys, first.public_keys);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn routes_must_be_host_and_port() {
        for bad in ["nats-route://a:1", "a", "u:p@a:1", "a:port"] {
            let err = generate(&Options {
                dir: std::env::temp_dir().join("jetmq-natsauth-never"),
                routes: vec![bad.into()],
                ..Default::default()
            })
            .expect_err("refused");
            assert!(matches!(err, NatsAuthError::BadRoute(_)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_ingestor_may_not_touch_jetmq_subjects_or_buckets() {
        let (publish, subscribe) = Role::Ingestor.permissions();
        for p in publish.iter().chain(&subscribe) {
            assert!(!p.starts_with("jetmq."), "{p}");
            assert!(!p.starts_with("$KV."), "{p}");
            assert!(!p.contains("STREAM.MSG.GET"), "{p}");
            assert!(!p.contains("DIRECT"), "{p}");
            assert_ne!(p, "$JS.API.>");
        }
        assert_eq!(subscribe, vec![format!("{INGESTOR_INBOX_PREFIX}.>")]);
    }
}
