//! The TLS listener's side of admission: the handshake tells who a client
//! is before it joins the hub (see the parent module, "TLS").

use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;

use super::{Client, Ctx, PeerId, PeerInfo, Refusal};
use crate::tls::{TlsAcceptor, TlsServer};

/// Counts a handshake under way; dropping it ends the count.
struct Handshaking(Arc<AtomicUsize>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Checks a new TLS connection's source address and the number of
/// handshakes under way; if both allow it, returns the task that does the
/// handshake and then serves the client. Otherwise the connection is
/// closed, and counted.
pub(super) fn start(
    ctx: &Arc<Ctx>,
    tcp: TcpStream,
    server: &TlsServer,
    peer: PeerInfo,
) -> Option<impl Future<Output = ()> + Send + 'static> {
    if peer
        .ip
        .is_some_and(|ip| !ctx.config.admission.allows_ip(ip))
    {
        ctx.refused(&peer, Refusal::NotAllowed);
        return None;
    }
    let under_way = ctx.handshakes.fetch_add(1, Ordering::Relaxed);
    let counted = Handshaking(ctx.handshakes.clone());
    if under_way >= ctx.config.admission.max_clients {
        ctx.refused(&peer, Refusal::Full);
        return None;
    }
    let ctx = ctx.clone();
    let acceptor = server.acceptor();
    Some(handshake_and_serve(ctx, tcp, acceptor, peer, counted))
}

async fn handshake_and_serve(
    ctx: Arc<Ctx>,
    tcp: TcpStream,
    acceptor: TlsAcceptor,
    mut peer: PeerInfo,
    counted: Handshaking,
) {
    let limit = ctx.config.tls_handshake_timeout;
    let stream = match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return ctx.tls_failed(&peer, &e.to_string(), false),
        Err(_) => {
            let why = format!("no handshake within {} s", limit.as_secs_f64());
            return ctx.tls_failed(&peer, &why, true);
        }
    };
    drop(counted);
    let subject = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::tls::subject);
    let Some(subject) = subject else {
        return ctx.tls_failed(&peer, "its certificate has no readable subject", false);
    };
    peer.id = PeerId::Subject(ctx.subject_key.hash_one(&subject));
    peer.label = format!("{} {subject}", peer.label);
    peer.subject = Some(subject);
    match Client::register(&ctx, &peer) {
        Ok(client) => client.run(stream).await,
        Err(why) => ctx.refused(&peer, why),
    }
}

impl Ctx {
    /// Counts and logs a failed handshake.
    fn tls_failed(&self, peer: &PeerInfo, why: &str, timed_out: bool) {
        let total = {
            let mut stats = self.stats();
            stats.tls_last_failure = Some(format!("{}: {why}", peer.label));
            if timed_out {
                stats.tls_handshake_timeouts += 1;
            } else {
                stats.tls_handshake_failures += 1;
            }
            stats.tls_handshake_timeouts + stats.tls_handshake_failures
        };
        self.log_refusal(&peer.label, &format!("TLS handshake: {why}"), total);
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::mpsc;
    use tokio::time::{sleep, timeout};
    use tokio_rustls::client::TlsStream;

    use super::super::tests::{T, block_numbers, never_closed, src};
    use super::super::{EgdConfig, EgdListener, EgdStats, bind_tcp, serve};
    use crate::tls::testing::{Ca, ca, leaf, write};
    use crate::tls::{ClientFiles, ServerFiles, TlsError, TlsServer};

    /// A TLS listener with one CA for its own certificate and its
    /// clients', fed the test blocks.
    struct Tls {
        dir: tempfile::TempDir,
        ca: Ca,
        files: ServerFiles,
        server: Arc<TlsServer>,
        addr: std::net::SocketAddr,
        stats: Arc<Mutex<EgdStats>>,
    }

    impl Tls {
        async fn start(config: EgdConfig) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca = ca("Test CA");
            let files = ServerFiles {
                cert: dir.path().join("server-cert.pem"),
                key: dir.path().join("server-key.pem"),
                client_ca: dir.path().join("ca-cert.pem"),
            };
            write(&files.client_ca, &ca.pem(), 0o644);
            let tls = |f: &ServerFiles, cn: &str| {
                let (cert, key) = leaf(&ca, cn, true, false);
                write(&f.cert, &cert, 0o644);
                write(&f.key, &key, 0o600);
            };
            tls(&files, "server one");
            let server = Arc::new(TlsServer::load(files.clone()).unwrap());
            let l = bind_tcp(":0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let (tx, rx) = mpsc::channel(8);
            let stats = Arc::new(Mutex::new(EgdStats::default()));
            let listeners = vec![EgdListener::Tls(l, server.clone())];
            tokio::spawn(serve(listeners, config, rx, stats.clone(), never_closed()));
            tokio::spawn(async move {
                for i in 0.. {
                    if tx.send(src(i)).await.is_err() {
                        break;
                    }
                }
            });
            Self {
                dir,
                ca,
                files,
                server,
                addr,
                stats,
            }
        }

        /// A client's files: its certificate from `ca` (this server's CA
        /// if `None`), trusting this server's CA.
        fn client(&self, cn: &str, ca: Option<&Ca>, expired: bool) -> ClientFiles {
            let (cert, key) = leaf(ca.unwrap_or(&self.ca), cn, false, expired);
            let files = ClientFiles {
                ca: self.files.client_ca.clone(),
                cert: self.path(&format!("{cn}-cert.pem")),
                key: self.path(&format!("{cn}-key.pem")),
            };
            write(&files.cert, &cert, 0o644);
            write(&files.key, &key, 0o600);
            files
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        async fn connect_with(
            &self,
            config: Arc<ClientConfig>,
        ) -> io::Result<TlsStream<TcpStream>> {
            let tcp = TcpStream::connect(self.addr).await?;
            let name = ServerName::try_from("127.0.0.1").unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
        }

        async fn connect(&self, files: &ClientFiles) -> io::Result<TlsStream<TcpStream>> {
            self.connect_with(crate::tls::client_config(files).unwrap())
                .await
        }

        fn stats(&self) -> EgdStats {
            self.stats.lock().unwrap().clone()
        }

        async fn wait_for(&self, what: &str, f: impl Fn(&EgdStats) -> bool) {
            let t0 = std::time::Instant::now();
            while !f(&self.stats()) {
                assert!(t0.elapsed() < T, "timed out waiting for {what}");
                sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// Asks for 64 bytes (blocking) and returns them.
    async fn ask64(s: &mut TlsStream<TcpStream>) -> Vec<u8> {
        s.write_all(&[0x02, 64]).await.unwrap();
        let mut got = vec![0u8; 64];
        timeout(T, s.read_exact(&mut got))
            .await
            .expect("no reply")
            .unwrap();
        got
    }

    /// Asks for entropy on a connection that should be refused; returns
    /// why it ended, and panics if any byte of a reply came.
    async fn refused(conn: io::Result<TlsStream<TcpStream>>) -> String {
        let mut s = match conn {
            Err(e) => return e.to_string(),
            // TLS 1.3: the server's verdict on the client's certificate
            // comes after the client's side of the handshake is done.
            Ok(s) => s,
        };
        let _ = s.write_all(&[0x02, 64]).await;
        let mut b = [0u8; 64];
        match timeout(T, s.read(&mut b))
            .await
            .expect("neither bytes nor a close")
        {
            Ok(0) => "closed".into(),
            Ok(n) => panic!("a refused client got {n} bytes"),
            Err(e) => e.to_string(),
        }
    }

    fn subject_of(s: &TlsStream<TcpStream>) -> String {
        let certs = s.get_ref().1.peer_certificates().unwrap();
        crate::tls::subject(&certs[0]).unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_with_a_good_certificate_gets_the_keys_bytes_in_order() {
        let t = Tls::start(EgdConfig::default()).await;
        let files = t.client("guest1", None, false);
        let mut s = t.connect(&files).await.unwrap();
        let mut got = ask64(&mut s).await;
        // TLS 1.2 too (QEMU with priority=NORMAL:-VERS-TLS1.3).
        let tls12 = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots(&t.files.client_ca))
            .with_client_auth_cert(certs(&files.cert), key(&files.key))
            .unwrap();
        let mut s12 = t.connect_with(Arc::new(tls12)).await.unwrap();
        assert_eq!(
            s12.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let got12 = ask64(&mut s12).await;
        got.extend(ask64(&mut s).await);
        // Every byte is a source block's, each block once, in order per
        // client.
        let (a, b) = (block_numbers(&got), block_numbers(&got12));
        assert!(a.windows(2).all(|w| w[0] < w[1]), "{a:?}");
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        assert!(a.iter().all(|i| !b.contains(i)), "{a:?} {b:?}");
        let st = t.stats();
        assert_eq!(st.clients.len(), 2);
        for c in &st.clients {
            assert_eq!(c.listener, "tls");
            assert_eq!(c.subject.as_deref(), Some("CN=guest1"));
            assert!(c.peer.starts_with("tls 127.0.0.1:") && c.peer.ends_with(" CN=guest1"));
        }
        assert_eq!(st.total_served, 192);
        assert_eq!(st.tls_handshake_failures + st.tls_handshake_timeouts, 0);
        assert_eq!(subject_of(&s), "CN=server one");
    }

    fn certs(path: &Path) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::pem_file_iter(path)
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn key(path: &Path) -> rustls_pki_types::PrivateKeyDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::PrivateKeyDer::from_pem_file(path).unwrap()
    }

    fn roots(path: &Path) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(path) {
            roots.add(c).unwrap();
        }
        roots
    }

    #[tokio::test(flavor = "current_thread")]
    async fn no_foreign_expired_or_missing_certificate_and_no_plain_tcp_gets_a_byte() {
        let t = Tls::start(EgdConfig::default()).await;
        let other = ca("Other CA");
        let foreign = t.client("foreign", Some(&other), false);
        let expired = t.client("expired", None, true);
        let anonymous = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&t.files.client_ca))
            .with_no_client_auth();
        let mut why = vec![
            refused(t.connect(&foreign).await).await,
            refused(t.connect(&expired).await).await,
            refused(t.connect_with(Arc::new(anonymous)).await).await,
        ];
        // Plain EGD on the TLS port: at most a TLS alert comes back.
        let mut plain = TcpStream::connect(t.addr).await.unwrap();
        plain.write_all(&[0x02, 64, 0x02, 64]).await.unwrap();
        let mut back = Vec::new();
        let _ = timeout(T, plain.read_to_end(&mut back))
            .await
            .expect("not closed");
        assert!(
            back.len() < 64 && back.first().is_none_or(|&b| b == 0x15),
            "{back:?}"
        );
        t.wait_for("four failures", |s| s.tls_handshake_failures == 4)
            .await;
        let st = t.stats();
        why.push(st.tls_last_failure.clone().unwrap());
        assert_eq!((st.total_served, st.total_clients), (0, 0), "{why:?}");
        assert!(st.clients.is_empty());
        // The clients saw the server's alert for each, and the server says
        // why it closed the last.
        for (i, alert) in ["UnknownCA", "CertificateExpired", "CertificateRequired"]
            .iter()
            .enumerate()
        {
            assert!(why[i].contains(alert), "{why:?}");
        }
        assert!(
            why[3].starts_with("tls 127.0.0.1:") && why[3].contains("InvalidContentType"),
            "{why:?}"
        );
        // A good client is still served.
        let mut s = t.connect(&t.client("guest1", None, false)).await.unwrap();
        assert_eq!(block_numbers(&ask64(&mut s).await), [0, 1]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reload_swaps_the_server_certificate_and_keeps_connected_clients() {
        let t = Tls::start(EgdConfig::default()).await;
        let files = t.client("guest1", None, false);
        let mut old = t.connect(&files).await.unwrap();
        let first = ask64(&mut old).await;
        assert_eq!(subject_of(&old), "CN=server one");
        let (cert, key) = leaf(&t.ca, "server two", true, false);
        write(&t.files.cert, &cert, 0o644);
        write(&t.files.key, &key, 0o600);
        t.server.reload().unwrap();
        let mut new = t.connect(&files).await.unwrap();
        assert_eq!(subject_of(&new), "CN=server two");
        // The old connection goes on.
        let more = ask64(&mut old).await;
        let mut a = block_numbers(&first);
        a.extend(block_numbers(&more));
        assert!(a.windows(2).all(|w| w[0] < w[1]), "{a:?}");
        ask64(&mut new).await;
        // Bad files are refused, and the ones in use stay.
        write(&t.files.key, &key, 0o640);
        let err = t.server.reload().unwrap_err();
        assert!(
            matches!(err, TlsError::KeyMode { who: "group", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        let mut third = t.connect(&files).await.unwrap();
        assert_eq!(subject_of(&third), "CN=server two");
        ask64(&mut third).await;
        assert_eq!(t.stats().clients.len(), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn silent_peers_time_out_and_subjects_are_admitted_as_peers() {
        let mut config = EgdConfig {
            tls_handshake_timeout: Duration::from_millis(200),
            ..EgdConfig::default()
        };
        config.admission.allow_subjects = vec!["CN=guest1".into()];
        config.admission.max_per_peer = 1;
        let t = Tls::start(config).await;
        // Half-open: connects, says nothing.
        let mut silent = TcpStream::connect(t.addr).await.unwrap();
        let mut b = [0u8; 1];
        let end = timeout(T, silent.read(&mut b)).await.expect("not closed");
        assert!(matches!(end, Ok(0) | Err(_)));
        assert_eq!(t.stats().tls_handshake_timeouts, 1);
        // Not in --egd-allow-subject.
        let guest2 = t.client("guest2", None, false);
        refused(t.connect(&guest2).await).await;
        t.wait_for("refused", |s| s.refused_not_allowed == 1).await;
        // guest1 is one peer, wherever it connects from: its second
        // connection is over its cap.
        let guest1 = t.client("guest1", None, false);
        let mut s = t.connect(&guest1).await.unwrap();
        ask64(&mut s).await;
        refused(t.connect(&guest1).await).await;
        t.wait_for("peer cap", |s| s.refused_peer_cap == 1).await;
        assert_eq!(t.stats().total_clients, 1);
    }

    #[test]
    fn key_files_others_may_read_are_refused_and_bad_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca("Test CA");
        let (cert, key) = leaf(&ca, "server", true, false);
        let files = ServerFiles {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            client_ca: dir.path().join("ca.pem"),
        };
        write(&files.cert, &cert, 0o644);
        write(&files.client_ca, &ca.pem(), 0o644);
        write(&files.key, &key, 0o644);
        let err = TlsServer::load(files.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                TlsError::KeyMode {
                    mode: 0o644,
                    who: "group and others",
                    ..
                }
            ),
            "{err}"
        );
        write(&files.key, &key, 0o604);
        let err = TlsServer::load(files.clone()).unwrap_err().to_string();
        assert!(
            err.contains("readable by others") && err.contains("--tls-key"),
            "{err}"
        );
        write(&files.key, &key, 0o600);
        TlsServer::load(files.clone()).unwrap();
        // The client CA file holding a key, not a certificate.
        write(&files.client_ca, &key, 0o600);
        let err = TlsServer::load(files.clone()).unwrap_err().to_string();
        assert!(
            err.starts_with("--tls-client-ca ") && err.contains("no PEM"),
            "{err}"
        );
        // A key that is not the certificate's.
        write(&files.client_ca, &ca.pem(), 0o644);
        write(&files.key, &leaf(&ca, "other", true, false).1, 0o600);
        let err = TlsServer::load(files).unwrap_err().to_string();
        assert!(
            err.contains("--tls-cert") && err.contains("--tls-key"),
            "{err}"
        );
    }
}
