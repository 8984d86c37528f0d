//! TLS for EGD, from rustls (with ring as its crypto provider): the server
//! side of `run --egd-tls` and the client side of `feed --egd tls://`.
//!
//! The server always asks for a client certificate and checks it against
//! `--tls-client-ca`; there is no anonymous mode. The client checks the
//! server's certificate against `--tls-ca`, by host name or IP address.
//! Private key files must not be readable by group or others.
//!
//! [`TlsServer`] holds the server's settings and re-reads its files on
//! [`TlsServer::reload`] (SIGHUP): connections already made keep the
//! settings they were made with; new handshakes use the new ones.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Why TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or holds no usable PEM item.
    #[error("{flag} {}: {why}", path.display())]
    File {
        /// The option naming the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A private key file that group or others may read.
    #[error(
        "{flag} {}: the private key is readable by {who} (mode {mode:03o}); \
         make it readable by its owner only: chmod 600 {}",
        path.display(),
        path.display()
    )]
    KeyMode {
        /// The option naming the file.
        flag: &'static str,
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// `group`, `others`, or `group and others`.
        who: &'static str,
    },
    /// The files do not make a working TLS setup (say, the key does not
    /// match the certificate).
    #[error("TLS settings: {0}")]
    Settings(String),
}

/// The files of the TLS listener (`--tls-cert`, `--tls-key`,
/// `--tls-client-ca`).
#[derive(Clone, Debug)]
pub struct ServerFiles {
    /// The server's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates client certificates must chain to, PEM.
    pub client_ca: PathBuf,
}

/// The files of a TLS client (`feed --tls-ca`, `--tls-cert`, `--tls-key`).
#[derive(Clone, Debug)]
pub struct ClientFiles {
    /// The CA certificates the server's certificate must chain to, PEM.
    pub ca: PathBuf,
    /// The client's certificate chain, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
}

/// The crypto provider: ring. rustls 0.23.48 marks it deprecated because it
/// has no post-quantum key exchange; the clients this serves first (QEMU
/// with GnuTLS 3.7) offer none either, and ring, unlike aws-lc-rs, builds
/// without cmake and keeps the binary small. Switching is this one line.
#[allow(deprecated)]
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(flag: &'static str, path: &Path, why: impl fmt::Display) -> TlsError {
    TlsError::File {
        flag,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Reads the certificates of a PEM file; none at all is an error.
fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(flag, path, pem_why(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(flag, path, pem_why(e)))?;
    if certs.is_empty() {
        return Err(file_error(flag, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn pem_why(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(e) => e.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the right kind in it".into(),
        e => format!("not valid PEM: {e}"),
    }
}

/// Refuses a key file that group or others may read (`meta`: the open
/// file's, so the file checked is the file read).
fn check_key_mode(
    flag: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), TlsError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        let who = match (mode & 0o040 != 0, mode & 0o004 != 0) {
            (true, true) => "group and others",
            (true, false) => "group",
            (false, true) => "others",
            (false, false) => return Ok(()),
        };
        Err(TlsError::KeyMode {
            flag,
            path: path.to_path_buf(),
            mode,
            who,
        })
    }
    #[cfg(not(unix))]
    {
        let _ = (flag, path, meta);
        Ok(())
    }
}

/// Reads a private key: opens the file once, checks that open file's
/// mode, and reads its PEM text into a buffer wiped afterwards.
fn read_key(flag: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| file_error(flag, path, e))?;
    let meta = file.metadata().map_err(|e| file_error(flag, path, e))?;
    check_key_mode(flag, path, &meta)?;
    let mut pem = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut pem)
        .map_err(|e| file_error(flag, path, e))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_error(flag, path, pem_why(e)))
}

/// Reads CA certificates into a root store; a file with no usable CA is an
/// error.
fn read_roots(flag: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(flag, path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(flag, path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// TLS 1.3, and 1.2 for older peers.
const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// What one side of a connection reads: the CA it checks its peer
/// against, and its own certificate chain and key.
struct Own {
    roots: Arc<RootCertStore>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Own {
    fn read(ca: (&'static str, &Path), cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            roots: read_roots(ca.0, ca.1)?,
            certs: read_certs("--tls-cert", cert)?,
            key: read_key("--tls-key", key)?,
        })
    }
}

/// A certificate and key rustls refuses together (not a pair, say).
fn pair_error(cert: &Path, key: &Path, e: rustls::Error) -> TlsError {
    TlsError::Settings(format!(
        "--tls-cert {} with --tls-key {}: {e}",
        cert.display(),
        key.display()
    ))
}

/// Builds the listener's settings from its files: TLS 1.3 and 1.2, client
/// certificates required and checked against the client CA.
pub fn server_config(files: &ServerFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let ca = ("--tls-client-ca", files.client_ca.as_path());
    let own = Own::read(ca, &files.cert, &files.key)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(own.roots, provider())
        .build()
        .map_err(|e| file_error(ca.0, ca.1, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(own.certs, own.key)
        .map_err(|e| pair_error(&files.cert, &files.key, e))?;
    // No resumption: every connection shows a certificate checked now (a
    // resumed session would skip an expired one). Guests connect rarely.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Builds a client's settings from its files: the server's certificate is
/// checked against `ca`, and the client presents its own.
pub fn client_config(files: &ClientFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let ca = ("--tls-ca", files.ca.as_path());
    let own = Own::read(ca, &files.cert, &files.key)?;
    let verifier = WebPkiServerVerifier::builder_with_provider(own.roots, provider())
        .build()
        .map_err(|e| file_error(ca.0, ca.1, e))?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(own.certs, own.key)
        .map_err(|e| pair_error(&files.cert, &files.key, e))?;
    Ok(Arc::new(config))
}

/// The TLS listener's settings, reloadable.
pub struct TlsServer {
    files: ServerFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Reads `files`; fails with a message naming the file at fault.
    pub fn load(files: ServerFiles) -> Result<Self, TlsError> {
        let config = RwLock::new(server_config(&files)?);
        Ok(Self { files, config })
    }

    /// Re-reads the files. On an error the settings in use are kept.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.files)?;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// An acceptor with the settings in use now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.config
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    /// The files it reads.
    pub fn files(&self) -> &ServerFiles {
        &self.files
    }
}

/// A connector with `files`' settings.
pub fn connector(files: &ClientFiles) -> Result<TlsConnector, TlsError> {
    Ok(TlsConnector::from(client_config(files)?))
}

/// A certificate's subject, in the RFC 4514 form (`CN=guest1,O=Example`).
/// `None` if the certificate cannot be parsed (rustls has checked it, so
/// this does not happen for a peer's certificate).
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_cert::der::Decode;
    let cert = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    Some(cert.tbs_certificate().subject().to_string())
}

/// Whether `subject` (RFC 4514) is allowed by `allowed`: the same subject,
/// or `CN=NAME` naming one of its common names.
pub fn subject_matches(subject: &str, allowed: &str) -> bool {
    let allowed = allowed.trim();
    if subject == allowed {
        return true;
    }
    let Some(want) = allowed_cn(allowed) else {
        return false;
    };
    // RDNs are separated by unescaped commas (and multi-valued ones by
    // unescaped '+').
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in subject.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' | '+' => {
                if subject.get(start..i).and_then(subject_cn) == Some(want) {
                    return true;
                }
                start = i + 1;
            }
            _ => {}
        }
    }
    subject.get(start..).and_then(subject_cn) == Some(want)
}

/// The NAME of an `--egd-allow-subject CN=NAME` (spaces around the
/// whole value and the key are the user's, and dropped).
fn allowed_cn(s: &str) -> Option<&str> {
    let (k, v) = s.split_once('=')?;
    k.trim().eq_ignore_ascii_case("CN").then_some(v)
}

/// The value of one RDN of a subject if it is `CN=…`, exactly as the
/// certificate has it (no trimming: a name with trailing spaces, escaped
/// or Unicode, is another name).
fn subject_cn(rdn: &str) -> Option<&str> {
    rdn.strip_prefix("CN=")
}

/// Certificates for tests, made with rcgen.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };

    pub(crate) type Ca = CertifiedIssuer<'static, KeyPair>;

    pub(crate) fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    /// A certificate from `ca` (a server's for 127.0.0.1, or a client's)
    /// and its key, PEM.
    pub(crate) fn leaf(ca: &Ca, cn: &str, server: bool, expired: bool) -> (String, String) {
        let names: &[&str] = if server {
            &["127.0.0.1", "localhost"]
        } else {
            &[]
        };
        issue(ca, cn, names, server, expired)
    }

    /// A certificate from `ca` for `names` (DNS names or addresses), and
    /// its key, PEM.
    pub(crate) fn issue(
        ca: &Ca,
        cn: &str,
        names: &[&str],
        server: bool,
        expired: bool,
    ) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub(crate) fn write(path: &Path, text: &str, mode: u32) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_whole_or_by_common_name() {
        let s = "CN=build1,O=Example\\, Inc.,C=GB";
        assert!(subject_matches(s, s));
        assert!(subject_matches(s, "CN=build1"));
        assert!(subject_matches(s, " cn=build1 "));
        assert!(!subject_matches(s, "CN=build"));
        assert!(!subject_matches(s, "CN=build1,O=Example"));
        assert!(!subject_matches(s, "O=Example\\, Inc."));
        // The escaped comma is not a separator: " Inc." is no RDN.
        assert!(!subject_matches("CN=a\\,CN=b", "CN=b"));
        assert!(subject_matches("O=x+CN=guest", "CN=guest"));
        // A look-alike with a trailing no-break space (x509-cert does not
        // escape it) is another name.
        assert!(!subject_matches("CN=guest1\u{a0},O=Example", "CN=guest1"));
        assert!(!subject_matches("CN=guest1\u{2003}", "CN=guest1"));
        assert!(!subject_matches("O=CN=guest1", "CN=guest1"));
    }
}
