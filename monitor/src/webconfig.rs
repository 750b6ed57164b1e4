//! `--web-config-file`: `node_exporter`'s web configuration (the Prometheus exporter
//! toolkit's format). `tls_server_config` serves the endpoints over TLS, with client
//! certificates verified against `client_ca_file` where given; `basic_auth_users` asks
//! for a user and password on `/metrics`, checked against bcrypt hashes. The kubelet's
//! probes, `/healthz` and `/readyz`, need no password and no client certificate (they
//! tell nothing but whether the agent is up and attached, and the kubelet presents
//! none): where certificates are required, the handshake verifies any certificate given
//! and lets one without in, and every other path then refuses a connection that gave
//! none. TLS covers the probes too. A wrong password costs the same bcrypt whether or not
//! the user exists, and failures are rate-limited.

use std::{
    collections::{BTreeMap, HashSet},
    hash::{BuildHasher as _, RandomState},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use base64::Engine as _;
use log::warn;
use rustls::{
    RootCertStore, ServerConfig,
    crypto::ring,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::WebPkiClientVerifier,
};
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

/// The file as written: `node_exporter`'s keys, unknown ones refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    client_auth_type: Option<ClientAuth>,
    #[serde(default)]
    min_version: Option<TlsVersion>,
}

/// The client certificate policies this agent offers (Go's names). Asking for a
/// certificate and accepting any, verified or not, is not among them.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
enum ClientAuth {
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
enum TlsVersion {
    TLS12,
    TLS13,
}

/// The endpoints' TLS: the files it is made from, and the configuration they made last;
/// read again when a file changes (a certificate renewed in place), kept when the new
/// files do not make one.
pub struct Tls {
    files: TlsFile,
    made: Mutex<(Vec<Option<SystemTime>>, Arc<ServerConfig>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// Users and their bcrypt hashes, and the credentials already checked (by a keyed hash
/// of them, never the password): bcrypt takes tens of milliseconds on purpose, a scrape
/// every few seconds need not pay it each time.
pub struct Users {
    hashes: BTreeMap<String, String>,
    verified: Mutex<HashSet<u64>>,
    key: RandomState,
    /// A hash of no one's password at the highest cost of the users': what an unknown
    /// user's password is checked against, so that it costs what a known one's does.
    nobody: String,
    /// Checks that may still fail before the next is refused unchecked.
    failures: Mutex<Bucket>,
}

/// A token bucket: `FAILURES_BURST` tokens, one more every `1 / FAILURES_PER_SECOND` s.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Failed password checks allowed a second, after a burst: bcrypt takes tens of
/// milliseconds on purpose, so a client guessing passwords must not have it for free.
const FAILURES_PER_SECOND: f64 = 2.0;
const FAILURES_BURST: f64 = 10.0;

impl Bucket {
    fn full() -> Self {
        Self {
            tokens: FAILURES_BURST,
            at: Instant::now(),
        }
    }

    /// Whether a check may run now (a token is left); the failure, if it fails, takes it.
    fn has_token(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.at).as_secs_f64() * FAILURES_PER_SECOND;
        self.tokens = (self.tokens + earned).min(FAILURES_BURST);
        self.at = now;
        self.tokens >= 1.0
    }

    fn take(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("users", &self.hashes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Credentials remembered as checked, at most; then forgotten all at once.
const VERIFIED_MAX: usize = 64;

/// What the endpoints require.
#[derive(Debug, Default)]
pub struct Web {
    pub tls: Option<Tls>,
    pub users: Option<Users>,
}

impl Web {
    /// Reads and checks `path`: certificates and key that make a TLS configuration,
    /// hashes that are bcrypt's. Any fault is one error naming the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --web-config-file {}", path.display()))?;
        let file: File = if text.trim().is_empty() {
            File::default()
        } else {
            serde_norway::from_str(&text)
                .map_err(|e| anyhow!("{e}"))
                .with_context(|| format!("--web-config-file {}", path.display()))?
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tls = file
            .tls_server_config
            .map(|t| Tls::new(t, dir))
            .transpose()
            .with_context(|| format!("--web-config-file {}", path.display()))?;
        let users = if file.basic_auth_users.is_empty() {
            None
        } else {
            Some(
                Users::new(file.basic_auth_users)
                    .with_context(|| format!("--web-config-file {}", path.display()))?,
            )
        };
        Ok(Self { tls, users })
    }
}

impl Tls {
    /// Whether paths other than the probes need a verified client certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.files.policy() == Some(ClientAuth::RequireAndVerifyClientCert)
    }

    fn new(mut files: TlsFile, dir: &Path) -> Result<Self> {
        // Relative paths are the file's own directory's, as node_exporter has them.
        for p in [
            Some(&mut files.cert_file),
            Some(&mut files.key_file),
            files.client_ca_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        if files
            .client_auth_type
            .is_some_and(|a| a != ClientAuth::NoClientCert)
            && files.client_ca_file.is_none()
        {
            bail!("tls_server_config: client_auth_type needs client_ca_file to verify against");
        }
        let config = files.make()?;
        let made = Mutex::new((files.mtimes(), Arc::new(config)));
        Ok(Self { files, made })
    }

    /// The acceptor for a new connection: the files read again if one changed since.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut made = self.made.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.files.mtimes();
        if now != made.0 {
            match self.files.make() {
                Ok(config) => *made = (now, Arc::new(config)),
                Err(e) => {
                    warn!("{e:#}; serving with the certificate read before");
                    made.0 = now;
                }
            }
        }
        TlsAcceptor::from(Arc::clone(&made.1))
    }
}

impl TlsFile {
    /// The client certificate policy in force: none without a CA; with one and no
    /// policy, certificates required and verified, as the exporter toolkit has it.
    fn policy(&self) -> Option<ClientAuth> {
        match (&self.client_ca_file, self.client_auth_type) {
            (None, _) | (Some(_), Some(ClientAuth::NoClientCert)) => None,
            (Some(_), policy) => Some(policy.unwrap_or(ClientAuth::RequireAndVerifyClientCert)),
        }
    }

    fn mtimes(&self) -> Vec<Option<SystemTime>> {
        [
            Some(&self.cert_file),
            Some(&self.key_file),
            self.client_ca_file.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
    }

    fn make(&self) -> Result<ServerConfig> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert_file)
            .and_then(Iterator::collect)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cert_file {}", self.cert_file.display()))?;
        if certs.is_empty() {
            bail!(
                "cert_file {}: no certificate in it",
                self.cert_file.display()
            );
        }
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("key_file {}", self.key_file.display()))?;
        let provider = Arc::new(ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            Some(TlsVersion::TLS13) => &[&rustls::version::TLS13],
            _ => &[&rustls::version::TLS12, &rustls::version::TLS13],
        };
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .context("TLS versions")?;
        let builder = match (self.policy(), &self.client_ca_file) {
            (None, _) | (_, None) => builder.with_no_client_auth(),
            (Some(_), Some(ca)) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| anyhow!("{e}"))
                    .with_context(|| format!("client_ca_file {}", ca.display()))?
                {
                    let cert = cert
                        .map_err(|e| anyhow!("{e}"))
                        .with_context(|| format!("client_ca_file {}", ca.display()))?;
                    roots
                        .add(cert)
                        .with_context(|| format!("client_ca_file {}", ca.display()))?;
                }
                // A certificate given is verified in the handshake; one not given is let
                // in, so that the kubelet's probes pass, and required by every other path
                // (`requires_client_cert`).
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .allow_unauthenticated();
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .with_context(|| format!("client_ca_file {}", ca.display()))?,
                )
            }
        };
        builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "cert_file {} and key_file {}",
                self.cert_file.display(),
                self.key_file.display()
            )
        })
    }
}

impl Users {
    fn new(hashes: BTreeMap<String, String>) -> Result<Self> {
        for (user, hash) in &hashes {
            if user.contains(':') {
                bail!("basic_auth_users: user {user:?} has a ':', which basic auth cannot carry");
            }
            // A bcrypt hash: $2a$, $2b$ or $2y$, a cost, 53 characters of salt and hash.
            let parts: Vec<&str> = hash.split('$').collect();
            let ok = parts.len() == 4
                && parts[0].is_empty()
                && matches!(parts[1], "2a" | "2b" | "2x" | "2y")
                && parts[2].parse::<u32>().is_ok_and(|c| (4..=31).contains(&c))
                && parts[3].len() == 53;
            if !ok {
                bail!("basic_auth_users: the password of {user:?} is not a bcrypt hash");
            }
        }
        let cost = hashes
            .values()
            .filter_map(|h| h.split('$').nth(2)?.parse::<u32>().ok())
            .max()
            .unwrap_or(bcrypt::DEFAULT_COST);
        let secret = format!("{:x}", RandomState::new().hash_one(Instant::now()));
        let nobody = bcrypt::hash(secret, cost).context("basic_auth_users: hashing")?;
        Ok(Self {
            hashes,
            verified: Mutex::default(),
            key: RandomState::new(),
            nobody,
            failures: Mutex::new(Bucket::full()),
        })
    }

    /// Whether an `Authorization` header's value names a user with its password. Slow
    /// (bcrypt) the first time a pair is seen: call it off the runtime.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(encoded) = authorization.and_then(|h| h.strip_prefix(b"Basic ")) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded) else {
            return false;
        };
        let Ok(pair) = std::str::from_utf8(&decoded) else {
            return false;
        };
        let Some((user, password)) = pair.split_once(':') else {
            return false;
        };
        // An unknown user's password is checked too, against a hash of the same cost.
        let known = self.hashes.get(user);
        let hash = known.unwrap_or(&self.nobody);
        let seen = self.key.hash_one((user, password, hash));
        if self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&seen)
        {
            return true;
        }
        if !self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .has_token()
        {
            // Too many failures of late: refused without a check.
            return false;
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) || known.is_none() {
            self.failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            return false;
        }
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(seen);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("em-web-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn error(dir: &Path, text: &str) -> String {
        let p = write(dir, "web.yml", text);
        format!("{:#}", Web::load(&p).unwrap_err())
    }

    #[test]
    fn users_are_checked_against_their_bcrypt_hashes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = Users::new(BTreeMap::from([("prometheus".to_owned(), hash)])).unwrap();
        let basic = |pair: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        assert!(users.allows(Some(basic("prometheus:s3cret").as_bytes())));
        // Again, from what was remembered.
        assert!(users.allows(Some(basic("prometheus:s3cret").as_bytes())));
        for wrong in ["prometheus:wrong", "other:s3cret", "prometheus", ""] {
            assert!(!users.allows(Some(basic(wrong).as_bytes())), "{wrong}");
        }
        assert!(!users.allows(None));
        assert!(!users.allows(Some(b"Bearer x")));
        assert!(!users.allows(Some(b"Basic !!!")));
    }

    #[test]
    fn a_wrong_password_costs_the_same_for_any_user_and_failures_are_rate_limited() {
        let hash = bcrypt::hash("s3cret", 8).unwrap();
        let users = Users::new(BTreeMap::from([("prometheus".to_owned(), hash)])).unwrap();
        let basic = |pair: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        };
        let time = |pair: &str| {
            let started = Instant::now();
            assert!(!users.allows(Some(basic(pair).as_bytes())));
            started.elapsed()
        };
        // Alternated, medians of three each: an unknown user costs a bcrypt too.
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for i in 0..3 {
            known.push(time(&format!("prometheus:wrong{i}")));
            unknown.push(time(&format!("mallory:wrong{i}")));
        }
        known.sort();
        unknown.sort();
        let ratio = unknown[1].as_secs_f64() / known[1].as_secs_f64();
        assert!((0.5..2.0).contains(&ratio), "{known:?} {unknown:?}");
        // Ten failures in all so far less six: four more, then refused unchecked, fast,
        // even with the right password; and the bucket fills again with time.
        for i in 0..4 {
            time(&format!("prometheus:again{i}"));
        }
        let refused = time("prometheus:s3cret");
        assert!(refused < known[0] / 4, "{refused:?} against {known:?}");
        std::thread::sleep(std::time::Duration::from_millis(600));
        assert!(users.allows(Some(basic("prometheus:s3cret").as_bytes())));
    }

    #[test]
    fn a_bad_file_is_one_clear_error() {
        let d = dir("bad");
        let hash = bcrypt::hash("x", 4).unwrap();
        for (text, says) in [
            ("tls_server_config: [", "--web-config-file"),
            (
                "basic_auth_user:\n  a: b\n",
                "unknown field `basic_auth_user`",
            ),
            (
                "basic_auth_users:\n  a: plain\n",
                "the password of \"a\" is not a bcrypt hash",
            ),
            (
                "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
                "cert_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAndVerifyClientCert\n",
                "needs client_ca_file",
            ),
            (
                "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n",
                "unknown variant `RequireAnyClientCert`",
            ),
        ] {
            let e = error(&d, text);
            assert!(e.contains(says), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let ok = write(&d, "ok.yml", &format!("basic_auth_users:\n  a: '{hash}'\n"));
        let web = Web::load(&ok).unwrap();
        assert!(web.tls.is_none() && web.users.is_some());
        let empty = write(&d, "empty.yml", "");
        let web = Web::load(&empty).unwrap();
        assert!(web.tls.is_none() && web.users.is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
