//! EGD server: verified entropy to other programs and to VMs (PROTOCOL.md §9).
//!
//! # Protocol
//!
//! Stream socket (TCP or Unix), the client speaks first, numbers are
//! big-endian:
//!
//! | command | arguments | reply |
//! |---|---|---|
//! | `0x00` entropy available | – | u32: bits this client could take now (its credit plus the free pool bytes, × 8; see shares below) |
//! | `0x01` read, non-blocking | u8 n | u8 count, then count bytes (what the pool has now, at most n) |
//! | `0x02` read, blocking | u8 n | exactly n bytes, sent as they become available |
//! | `0x03` add entropy | u16 shannons, u8 n, n bytes | none (the data is read and dropped) |
//! | `0x04` get pid | – | u8 len, then the pid in ASCII |
//!
//! Any other command byte closes that client (counted in
//! [`EgdStats::closed_for_protocol_errors`], as is a connection that ends in
//! the middle of a command). Replies go out strictly in request order, so
//! QEMU's `rng-egd` (several `0x02 n` in flight, replies matched by byte
//! count) gets exactly n bytes per request, in order. A client is never
//! closed for being slow; only an idle one may be closed, to make room for
//! another peer (see Admission).
//!
//! # Design
//!
//! One [`serve`] future owns the listeners, the entropy source and a *hub*:
//!
//! * **Pool.** Bytes taken from `source` but not yet given to a client, in
//!   source order. The hub takes blocks from `source` while the pool holds
//!   fewer than [`EgdConfig::pool_bytes`] bytes, or while a client waits and
//!   no pool byte is free for it (see shares). When nobody wants bytes the
//!   daemon's channel fills up and the keys are not read (backpressure).
//! * **Shares over time.** Under scarcity (a real key gives about 3.9 kB/s,
//!   released by its health gate in 2,500-byte blocks about every 0.64 s),
//!   the pool is divided by *credit accounts*, so that a client asking for
//!   less than its fair share gets all it asks for, at once, and clients
//!   asking for more split the rest (max-min fairness over time):
//!   - A client is *active* while it has a request pending and for
//!     [`ACTIVE_WINDOW`] (3 s) after its last request was read or answered.
//!     Only active clients compete; a client that goes quiet for longer
//!     loses its credit (it goes back to the free part of the pool).
//!   - Bytes taken into the pool are credited to the active clients in
//!     proportion to their *share* (the `--egd-share` weight of the
//!     listener they came through, 1 by default). An account holds at most
//!     one second of the client's share of the recent arrival rate
//!     (exponentially weighted over [`RATE_TAU`], 2 s), and at least
//!     [`MIN_CREDIT_CAP`] (512) bytes; but never more than its share of
//!     half of [`EgdConfig::pool_bytes`], so the accounts together never
//!     reserve more than half the pool, and a full pool always has free
//!     bytes (plenty: nobody waits for credit). What a full account cannot take is shared
//!     among the others (water-filling); what no account can take is
//!     *free*.
//!   - A client is granted bytes up to its credit plus the free bytes: a
//!     modest client's requests are met from its own account (which refills
//!     faster than it drains), and a greedy client takes what is free the
//!     moment it is free. So with plenty of entropy (the pool full, accounts
//!     full) everybody is served at once, as before.
//!   - Credit is a count, not particular bytes: every grant still takes the
//!     oldest pool bytes, so each byte is moved out of the pool exactly once
//!     and each client receives its bytes in source order.
//!   - A newly connected client has no credit. Its first request can take
//!     free bytes at once; otherwise it waits for the next bytes to arrive,
//!     of which it is credited its share (under a second at a real key's
//!     rate, usually one gate block).
//! * **Round robin.** A client blocked in `0x02` registers how many bytes its
//!   current request still needs (its *want*, at most 255). The hub walks the
//!   waiting clients in turn and grants each a turn of [`CHUNK`] bytes (or
//!   the rest of its want, if less) once its credit plus the free bytes
//!   cover the whole turn, paid from its credit first. So no client can
//!   starve the others of what is free, and bytes go out in whole turns,
//!   not in slivers of credit.
//! * **Withdrawal.** Each block comes with how many times its key's health
//!   gate had closed when it was released. When a gate closes
//!   ([`GATE_CLOSINGS`] moves), the hub drops that key's bytes from
//!   the pool before it next grants any, and refuses blocks still on their
//!   way from before the closing ([`EgdStats::withdrawn_by_key`]); the
//!   credit accounts shrink with the pool.
//! * **Per-client tasks.** Each connection runs in its own task with a reader
//!   (parses commands into a bounded queue of
//!   `max(1, buffer_per_client / 256)` requests — a client pipelining more is
//!   simply not read until it has been answered) and a writer (answers the
//!   queue in order). A client that stops reading only stalls its own writer;
//!   since a client only ever wants the rest of its *current* request, at
//!   most 255 bytes are reserved for a stuck client.
//! * **Disconnects.** Bytes granted to a client but not yet written to its
//!   socket go back to the front of the pool when it goes away (so they are
//!   not lost; the next client may then receive them slightly out of source
//!   order). Its queued requests are dropped. End of input between commands
//!   is taken as a half-close: requests already read are still answered, so
//!   a client that closes with a blocking read outstanding is let go when
//!   writing its reply fails.
//! * **Rate limit.** With [`EgdConfig::rate_limit`] each client has a token
//!   bucket (refilled at `rate` bytes/s, holding at most one second's worth
//!   or 512 bytes, whichever is more; it starts full). Blocked reads wait for
//!   tokens; non-blocking reads return at most the tokens available.
//!
//! # Admission
//!
//! A *peer* is the source address of a TCP client (IPv4-mapped IPv6
//! addresses count as IPv4), and for a TCP client on this host (loopback,
//! or one of this host's addresses) also the user owning its socket, found
//! in `/proc/net/tcp{,6}` as identd does (Linux; so QEMU running as its own
//! user and a local user who floods 127.0.0.1 are different peers); and the
//! user id of a Unix-socket client (`SO_PEERCRED`). On each new connection,
//! in this order:
//!
//! 1. **Allow-lists.** With [`Admission::allow_nets`] (`--egd-allow CIDR`),
//!    only TCP peers inside one of the networks are served; with
//!    [`Admission::allow_uids`] / [`Admission::allow_gids`]
//!    (`--egd-allow-uid`, `--egd-allow-gid`), only Unix peers whose uid, or
//!    whose group at connect time (the primary group `SO_PEERCRED` reports;
//!    supplementary groups are not seen), is listed. Anyone else is closed
//!    before a byte is read or sent ([`EgdStats::refused_not_allowed`]).
//! 2. **Per-peer cap.** A peer holding [`Admission::max_per_peer`]
//!    connections (32 by default) has its new one closed at once
//!    ([`EgdStats::refused_peer_cap`]); nobody else's connection is touched.
//! 3. **Slots.** Below [`Admission::max_clients`] (64) connections, the
//!    client is admitted. When every slot is taken, the hub *reclaims* one:
//!    of the peers holding at least two connections more than the
//!    newcomer's peer (so that peer still holds more afterwards), the one
//!    holding the most gives up its longest-idle connection that has no
//!    request pending and nothing granted ([`EgdStats::reclaimed_slots`]).
//!    If there is none, the newcomer is closed
//!    ([`EgdStats::rejected_clients`]). So however many connections one
//!    local user opens, a peer holding fewer can always get in, and a peer
//!    can never push out connections of a peer that holds fewer than it
//!    does. A reclaimed connection is one that sat idle; QEMU's socket
//!    chardev reconnects with `reconnect=SECONDS` (libvirt: `<reconnect
//!    enabled='yes' timeout='N'/>`), which is why reclaiming is safe for it.
//!
//! # TLS
//!
//! An [`EgdListener::Tls`] listener (feature `tls`; `--egd-tls`) speaks the
//! same protocol inside TLS 1.3 or 1.2 (rustls), to the same hub. A client
//! must present a certificate that chains to the client CA (see
//! `crate::tls`); its *subject* (RFC 4514, `CN=guest1,O=Example`) is its
//! name in the statistics and its peer for the per-peer cap (whatever
//! address it comes from), and [`Admission::allow_subjects`]
//! (`--egd-allow-subject`) may narrow who is served. The allow-list of
//! networks is checked on the source address before the handshake, the
//! rest of admission after it. A handshake that fails (no certificate, one
//! from another CA, an expired one, plain TCP or garbage) or takes longer
//! than [`EgdConfig::tls_handshake_timeout`] closes the connection before
//! any entropy byte is sent ([`EgdStats::tls_handshake_failures`],
//! [`EgdStats::tls_handshake_timeouts`]); at most
//! [`Admission::max_clients`] handshakes run at once (more are refused as
//! [`EgdStats::rejected_clients`]), so half-open TLS peers cannot hold
//! slots.
//!
//! Half-open TCP peers (no FIN ever arrives) keep their slot until the kernel
//! gives up on the connection or it is reclaimed; they reserve at most 255
//! bytes and never block anyone else.
//!
//! [`serve`] returns when the source channel is closed (noticed the next time
//! the hub wants a block); the daemon can also just drop the future. Either
//! way every client connection is closed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
#[cfg(unix)]
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use zeroize::Zeroizing;

use ekey_proto::keys::Serial;

use crate::keys::driver::{GATE_CLOSINGS, GateCloses, any_gate_closed};
use crate::wipe::WipeQueue;

#[cfg(feature = "tls")]
mod tls;

/// Most bytes a waiting client is granted per round-robin turn.
pub const CHUNK: usize = 32;

/// How long after its last request a client still counts as active (a
/// competitor for credit).
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(3);

/// Time constant of the arrival-rate estimate that sizes credit accounts.
pub const RATE_TAU: Duration = Duration::from_secs(2);

/// Smallest credit cap, bytes (unless the pool's share is smaller).
pub const MIN_CREDIT_CAP: usize = 512;

/// Credit is kept in 1/1024 bytes, so shares of a 32-byte block add up.
const SCALE: u64 = 1024;

/// Settings of the EGD server.
#[derive(Clone, Debug)]
pub struct EgdConfig {
    /// Who may connect, and how many.
    pub admission: Admission,
    /// Bytes per second per client (token bucket; burst is one second's
    /// worth, at least 512 bytes). `None` or `Some(0)`: unlimited.
    pub rate_limit: Option<u32>,
    /// Bound on a client's queued requests, in bytes: the queue holds
    /// `max(1, buffer_per_client / 256)` requests (each replies ≤ 256 bytes).
    pub buffer_per_client: usize,
    /// Verified bytes kept ready in the pool.
    pub pool_bytes: usize,
    /// Share weights of the clients of each kind of listener.
    pub shares: Shares,
    /// Longest a TLS handshake may take.
    pub tls_handshake_timeout: Duration,
}

impl Default for EgdConfig {
    fn default() -> Self {
        Self {
            admission: Admission::default(),
            rate_limit: None,
            buffer_per_client: 4096,
            pool_bytes: 16 * 1024,
            shares: Shares::default(),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl EgdConfig {
    fn max_pending(&self) -> usize {
        (self.buffer_per_client / 256).max(1)
    }
}

/// Who may connect, and how many connections each peer may hold (see the
/// module docs, "Admission").
#[derive(Clone, Debug)]
pub struct Admission {
    /// Most clients connected at once.
    pub max_clients: usize,
    /// Most connections one peer (TCP: source address; Unix: uid) holds.
    pub max_per_peer: usize,
    /// TCP peers allowed; empty: all.
    pub allow_nets: Vec<ipnet::IpNet>,
    /// Unix peers allowed by uid; with `allow_gids`, empty: all.
    pub allow_uids: Vec<u32>,
    /// Unix peers allowed by (primary) gid.
    pub allow_gids: Vec<u32>,
    /// TLS peers allowed by certificate subject (see
    /// `crate::tls::subject_matches`); empty: any the client CA vouches for.
    pub allow_subjects: Vec<String>,
}

impl Default for Admission {
    fn default() -> Self {
        Self {
            max_clients: 64,
            max_per_peer: 32,
            allow_nets: Vec::new(),
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            allow_subjects: Vec::new(),
        }
    }
}

impl Admission {
    /// Whether the allow-lists let `peer` in.
    fn allows(&self, peer: &PeerInfo) -> bool {
        match peer.id {
            PeerId::Ip(ip) | PeerId::Local(ip, _) => self.allows_ip(ip),
            PeerId::Subject(_) => {
                peer.ip.is_some_and(|ip| self.allows_ip(ip))
                    && (self.allow_subjects.is_empty()
                        || peer
                            .subject
                            .as_deref()
                            .is_some_and(|s| self.allows_subject(s)))
            }
            PeerId::Uid(uid) => {
                (self.allow_uids.is_empty() && self.allow_gids.is_empty())
                    || self.allow_uids.contains(&uid)
                    || peer.gid.is_some_and(|g| self.allow_gids.contains(&g))
            }
            PeerId::Unknown => self.allow_uids.is_empty() && self.allow_gids.is_empty(),
            PeerId::Guest(_) => true,
        }
    }

    /// Whether the networks allow-list lets a TCP or TLS peer in.
    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.allow_nets.is_empty() || self.allow_nets.iter().any(|n| n.contains(&ip))
    }

    #[cfg(feature = "tls")]
    fn allows_subject(&self, subject: &str) -> bool {
        self.allow_subjects
            .iter()
            .any(|a| crate::tls::subject_matches(subject, a))
    }

    #[cfg(not(feature = "tls"))]
    fn allows_subject(&self, _subject: &str) -> bool {
        false
    }
}

/// Share weights (`--egd-share KIND=WEIGHT`): under scarcity a client gets
/// entropy in proportion to its listener's weight.
#[derive(Clone, Copy, Debug)]
pub struct Shares {
    /// Clients of the TCP listener.
    pub tcp: u32,
    /// Clients of the Unix-socket listener.
    pub unix: u32,
    /// Clients of the TLS listener.
    pub tls: u32,
    /// vhost-user guests ([`InternalConnector`]).
    pub vhost_user: u32,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            tcp: 1,
            unix: 1,
            tls: 1,
            vhost_user: 1,
        }
    }
}

/// Who a connection comes from, for per-peer caps and reclaiming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PeerId {
    /// A TCP client's source address.
    Ip(IpAddr),
    /// A TCP client on this host: its source address and the user owning
    /// its socket.
    Local(IpAddr, u32),
    /// A TLS client's certificate subject (hashed with the server's own
    /// random key).
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    Subject(u64),
    /// A Unix-socket client's user.
    #[cfg_attr(not(unix), allow(dead_code))]
    Uid(u32),
    /// A Unix-socket client whose credentials could not be read.
    #[cfg_attr(not(unix), allow(dead_code))]
    Unknown,
    /// An in-process client (a vhost-user guest), one id per connection:
    /// configured by the administrator, so never refused by allow-lists
    /// or caps, and never reclaimed.
    Guest(u64),
}

/// What the server knows of a new connection.
#[derive(Clone, Debug)]
struct PeerInfo {
    id: PeerId,
    /// `tcp ADDR:PORT`, `tls ADDR:PORT SUBJECT` or `unix pid P uid U`.
    label: String,
    /// `tcp`, `tls` or `unix`.
    listener: &'static str,
    /// A TCP or TLS client's source address.
    ip: Option<IpAddr>,
    gid: Option<u32>,
    /// A TLS client's certificate subject.
    subject: Option<String>,
    share: u32,
}

/// Request wait times (read to reply written), as a log-scale histogram:
/// four buckets per doubling from 1 µs, so a quantile is within 19 %.
#[derive(Clone, Debug)]
pub struct Waits {
    buckets: [u32; WAIT_BUCKETS],
    count: u64,
}

const WAIT_BUCKETS: usize = 4 * 36;

impl Default for Waits {
    fn default() -> Self {
        Self {
            buckets: [0; WAIT_BUCKETS],
            count: 0,
        }
    }
}

impl Waits {
    fn bucket(micros: u64) -> usize {
        if micros < 4 {
            return micros as usize;
        }
        let octave = 63 - u64::from(micros.leading_zeros());
        let sub = (micros >> (octave - 2)) & 3;
        ((octave as usize) * 4 + sub as usize).min(WAIT_BUCKETS - 1)
    }

    /// The upper bound of bucket `i`, µs.
    fn upper(i: usize) -> u64 {
        // Buckets 4..8 stay empty (4 µs and up start at bucket 8).
        if i < 8 {
            return i as u64 + 1;
        }
        let (octave, sub) = ((i / 4) as u32, (i % 4) as u64);
        (4 + sub + 1) << (octave - 2)
    }

    /// Records one wait.
    pub fn record(&mut self, wait: Duration) {
        let micros = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::bucket(micros)] += 1;
        self.count += 1;
    }

    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0..=1), rounded up to its bucket's bound; `None`
    /// before any request.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64 * q).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += u64::from(n);
            if seen >= rank {
                return Some(Duration::from_micros(Self::upper(i)));
            }
        }
        None
    }
}

/// One connected client, for `ekey-host status`.
#[derive(Clone, Debug)]
pub struct ClientStats {
    /// Server-wide connection number.
    pub id: u64,
    /// `tcp ADDR:PORT`, `tls ADDR:PORT SUBJECT` or `unix pid P uid U`.
    pub peer: String,
    /// `tcp`, `tls` or `unix`.
    pub listener: &'static str,
    /// The TCP or TLS client's address.
    pub ip: Option<IpAddr>,
    /// The TLS client's certificate subject: its name.
    pub subject: Option<String>,
    /// The Unix-socket client's user.
    pub uid: Option<u32>,
    /// Its share weight.
    pub share: u32,
    /// Entropy bytes written to this client.
    pub bytes_served: u64,
    /// Requests read but not yet fully answered.
    pub requests_pending: usize,
    /// How long its requests waited, read to reply written.
    pub waits: Waits,
    /// When it connected.
    pub connected_since: SystemTime,
    /// When it last sent a request or was last answered.
    pub last_active: SystemTime,
}

/// Counters of the EGD server, for `ekey-host status`.
#[derive(Clone, Debug, Default)]
pub struct EgdStats {
    /// The clients connected now.
    pub clients: Vec<ClientStats>,
    /// Entropy bytes written to all clients.
    pub total_served: u64,
    /// Clients accepted (not counting refused ones).
    pub total_clients: u64,
    /// Connections closed at once because every slot was taken and none
    /// could be reclaimed.
    pub rejected_clients: u64,
    /// Connections closed at once because the allow-lists do not name the
    /// peer.
    pub refused_not_allowed: u64,
    /// Connections closed at once because their peer held its cap.
    pub refused_peer_cap: u64,
    /// Idle connections closed to make room for another peer.
    pub reclaimed_slots: u64,
    /// Clients closed for an unknown command or a truncated request.
    pub closed_for_protocol_errors: u64,
    /// Whether a TLS listener serves.
    pub tls: bool,
    /// TLS connections closed because their handshake failed (no
    /// certificate, one the client CA does not vouch for, plain TCP, ...).
    pub tls_handshake_failures: u64,
    /// TLS connections closed because their handshake took too long.
    pub tls_handshake_timeouts: u64,
    /// Why the last TLS handshake failed, and the peer.
    pub tls_last_failure: Option<String>,
    /// Bytes in the pool now (taken from the keys, not yet granted).
    pub pool_bytes: usize,
    /// Of those, bytes held as the clients' credit.
    pub reserved_bytes: usize,
    /// Entropy bytes written to clients, by the key they came from.
    pub served_by_key: BTreeMap<Serial, u64>,
    /// Bytes withdrawn from the pool (or refused on the way in) because
    /// their key's health gate closed after they were released, by key.
    pub withdrawn_by_key: BTreeMap<Serial, u64>,
}

/// A verified block for the pool, the key it came from, and how many times
/// that key's health gate had closed when the block was released.
pub type SourceBlock = (crate::wipe::SecretBlock, Serial, u64);

/// A byte queue [`Runs::withdraw`] can cut runs out of.
pub(crate) trait ByteQueue {
    /// Removes `n` bytes from `at` on (wiping them where it can).
    fn remove_range(&mut self, at: usize, n: usize);
}

impl ByteQueue for WipeQueue {
    fn remove_range(&mut self, at: usize, n: usize) {
        WipeQueue::remove_range(self, at, n);
    }
}

/// Which key each byte of a byte queue came from, as runs in queue order
/// (kept beside the bytes, so the bytes themselves stay a plain queue).
#[derive(Default)]
pub(crate) struct Runs(VecDeque<(Serial, usize)>);

impl Runs {
    /// Removes from `bytes` (the queue these runs describe) every byte
    /// whose key `stale` names; returns what was removed, by key. The rest
    /// keeps its order.
    pub(crate) fn withdraw(
        &mut self,
        bytes: &mut impl ByteQueue,
        stale: impl Fn(&Serial) -> bool,
    ) -> Vec<(Serial, usize)> {
        if !self.0.iter().any(|(k, _)| stale(k)) {
            return Vec::new();
        }
        let mut removed = Vec::new();
        let mut kept = Runs::default();
        let mut at = 0;
        for (key, n) in self.0.drain(..) {
            if stale(&key) {
                bytes.remove_range(at, n);
                removed.push((key, n));
            } else {
                at += n;
                kept.push_back(key, n);
            }
        }
        *self = kept;
        removed
    }

    pub(crate) fn push_back(&mut self, key: Serial, len: usize) {
        match self.0.back_mut() {
            Some((k, n)) if *k == key => *n += len,
            _ => self.0.push_back((key, len)),
        }
    }

    /// Takes the runs of the first `len` bytes.
    pub(crate) fn take_front(&mut self, mut len: usize) -> Vec<(Serial, usize)> {
        let mut out = Vec::new();
        while len > 0 {
            let Some((key, n)) = self.0.front_mut() else {
                break;
            };
            let take = (*n).min(len);
            out.push((*key, take));
            *n -= take;
            len -= take;
            if *n == 0 {
                self.0.pop_front();
            }
        }
        out
    }

    fn extend_back(&mut self, runs: Vec<(Serial, usize)>) {
        for (k, n) in runs {
            self.push_back(k, n);
        }
    }

    /// Puts `runs` (in queue order) back in front.
    fn extend_front(&mut self, runs: Vec<(Serial, usize)>) {
        for (k, n) in runs.into_iter().rev() {
            match self.0.front_mut() {
                Some((fk, fn_)) if *fk == k => *fn_ += n,
                _ => self.0.push_front((k, n)),
            }
        }
    }
}

impl EgdStats {
    /// The counters as JSON.
    pub fn to_json(&self) -> Value {
        let now = SystemTime::now();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        json!({
            "clients": self.clients.iter().map(|c| json!({
                "id": c.id,
                "peer": c.peer,
                "listener": c.listener,
                "ip": c.ip.map(|ip| ip.to_string()),
                "subject": c.subject,
                "uid": c.uid,
                "share": c.share,
                "bytes_served": c.bytes_served,
                "requests_pending": c.requests_pending,
                "requests_answered": c.waits.count(),
                "wait_p50_ms": ms(c.waits.quantile(0.50)),
                "wait_p99_ms": ms(c.waits.quantile(0.99)),
                "connected_seconds": now
                    .duration_since(c.connected_since)
                    .map_or(0, |d| d.as_secs()),
                "idle_seconds": now
                    .duration_since(c.last_active)
                    .map_or(0.0, |d| d.as_secs_f64()),
            })).collect::<Vec<_>>(),
            "total_served": self.total_served,
            "total_clients": self.total_clients,
            "rejected_clients": self.rejected_clients,
            "refused_not_allowed": self.refused_not_allowed,
            "refused_peer_cap": self.refused_peer_cap,
            "reclaimed_slots": self.reclaimed_slots,
            "closed_for_protocol_errors": self.closed_for_protocol_errors,
            "tls": self.tls,
            "tls_handshake_failures": self.tls_handshake_failures,
            "tls_handshake_timeouts": self.tls_handshake_timeouts,
            "tls_last_failure": self.tls_last_failure,
            "pool_bytes": self.pool_bytes,
            "reserved_bytes": self.reserved_bytes,
            "served_by_key": self.served_by_key.iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect::<serde_json::Map<String, Value>>(),
        })
    }

    fn client(&mut self, id: u64) -> Option<&mut ClientStats> {
        self.clients.iter_mut().find(|c| c.id == id)
    }
}

/// A socket the server accepts clients on.
#[derive(Debug)]
pub enum EgdListener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket.
    #[cfg(unix)]
    Unix(UnixListener),
    /// TLS over TCP, with its settings.
    #[cfg(feature = "tls")]
    Tls(TcpListener, Arc<crate::tls::TlsServer>),
    /// In-process connections from an [`InternalConnector`].
    Internal(Mutex<mpsc::UnboundedReceiver<InternalConn>>),
}

/// An in-process connection waiting for the hub.
#[derive(Debug)]
pub struct InternalConn {
    name: String,
    stream: tokio::io::DuplexStream,
}

/// Opens in-process EGD connections into a hub: each vhost-user guest is
/// one more client of the hub, with its shares, `--egd-rate`, withdrawal
/// and accounting, listed as `vhost-user NAME` (listener `vhost-user`).
#[derive(Clone, Debug)]
pub struct InternalConnector {
    tx: mpsc::UnboundedSender<InternalConn>,
}

impl InternalConnector {
    /// A new connection for the guest `name`: the caller's end of an EGD
    /// stream. `None` when the hub has stopped.
    pub fn connect(&self, name: &str) -> Option<tokio::io::DuplexStream> {
        let (ours, theirs) = tokio::io::duplex(4096);
        self.tx
            .send(InternalConn {
                name: name.to_owned(),
                stream: theirs,
            })
            .ok()?;
        Some(ours)
    }
}

/// A listener for in-process connections, and its connector.
pub fn internal_listener() -> (InternalConnector, EgdListener) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        InternalConnector { tx },
        EgdListener::Internal(Mutex::new(rx)),
    )
}

/// Ids of in-process connections ([`PeerId::Guest`]).
static NEXT_GUEST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

enum Stream {
    Tcp(TcpStream),
    #[cfg(unix)]
    Unix(UnixStream),
    /// Before its handshake.
    #[cfg(feature = "tls")]
    Tls(TcpStream, Arc<crate::tls::TlsServer>),
    Internal(tokio::io::DuplexStream),
}

impl EgdListener {
    fn poll_accept(
        &self,
        cx: &mut std::task::Context<'_>,
        shares: Shares,
    ) -> Poll<io::Result<(Stream, PeerInfo)>> {
        match self {
            Self::Tcp(l) => l.poll_accept(cx).map_ok(|(s, a)| {
                let _ = s.set_nodelay(true);
                let ip = a.ip().to_canonical();
                let uid = s.local_addr().ok().and_then(|me| local_peer_uid(a, me));
                let peer = PeerInfo {
                    id: uid.map_or(PeerId::Ip(ip), |uid| PeerId::Local(ip, uid)),
                    label: match uid {
                        Some(uid) => format!("tcp {a} uid {uid}"),
                        None => format!("tcp {a}"),
                    },
                    listener: "tcp",
                    ip: Some(ip),
                    gid: None,
                    subject: None,
                    share: shares.tcp,
                };
                (Stream::Tcp(s), peer)
            }),
            #[cfg(feature = "tls")]
            Self::Tls(l, server) => l.poll_accept(cx).map_ok(|(s, a)| {
                let _ = s.set_nodelay(true);
                let ip = a.ip().to_canonical();
                // Who it is, the handshake tells (tls::handshake).
                let peer = PeerInfo {
                    id: PeerId::Ip(ip),
                    label: format!("tls {a}"),
                    listener: "tls",
                    ip: Some(ip),
                    gid: None,
                    subject: None,
                    share: shares.tls,
                };
                (Stream::Tls(s, server.clone()), peer)
            }),
            #[cfg(unix)]
            Self::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| {
                let cred = s.peer_cred().ok();
                let label = match &cred {
                    Some(c) => match c.pid() {
                        Some(pid) => format!("unix pid {pid} uid {}", c.uid()),
                        None => format!("unix uid {}", c.uid()),
                    },
                    None => "unix".to_string(),
                };
                let peer = PeerInfo {
                    id: cred.map_or(PeerId::Unknown, |c| PeerId::Uid(c.uid())),
                    label,
                    listener: "unix",
                    ip: None,
                    gid: cred.map(|c| c.gid()),
                    subject: None,
                    share: shares.unix,
                };
                (Stream::Unix(s), peer)
            }),
            Self::Internal(rx) => {
                let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                match rx.poll_recv(cx) {
                    // Every connector gone: nothing more will come.
                    Poll::Ready(None) | Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(c)) => {
                        let id = NEXT_GUEST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let peer = PeerInfo {
                            id: PeerId::Guest(id),
                            label: format!("vhost-user {}", c.name),
                            listener: "vhost-user",
                            ip: None,
                            gid: None,
                            subject: None,
                            share: shares.vhost_user,
                        };
                        Poll::Ready(Ok((Stream::Internal(c.stream), peer)))
                    }
                }
            }
        }
    }
}

/// The user owning the other end of a TCP connection from this host, as
/// identd would find it: the socket whose local address is `peer` and whose
/// remote address is `me`, in `/proc/net/tcp` or `/proc/net/tcp6`. `None`
/// for peers on other hosts, off Linux, or if the client has gone already.
fn local_peer_uid(peer: SocketAddr, me: SocketAddr) -> Option<u32> {
    let (peer_ip, me_ip) = (peer.ip().to_canonical(), me.ip().to_canonical());
    if !(peer_ip.is_loopback() || peer_ip == me_ip) || !cfg!(target_os = "linux") {
        return None;
    }
    let peer = SocketAddr::new(peer_ip, peer.port());
    let me = SocketAddr::new(me_ip, me.port());
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines()
                .skip(1)
                .filter_map(parse_tcp_table_line)
                .find(|&(local, remote, _)| local == peer && remote == me)
                .map(|(_, _, uid)| uid)
        })
}

/// One line of `/proc/net/tcp{,6}`: (local address, remote address, uid),
/// addresses canonical (IPv4-mapped IPv6 as IPv4).
fn parse_tcp_table_line(line: &str) -> Option<(SocketAddr, SocketAddr, u32)> {
    fn addr(field: &str) -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        // The kernel prints the address as 32-bit words in host order.
        let word = |i: usize| -> Option<[u8; 4]> {
            let hex = ip.get(i * 8..i * 8 + 8)?;
            Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
        };
        let ip: IpAddr = match ip.len() {
            8 => std::net::Ipv4Addr::from(word(0)?).into(),
            32 => {
                let mut b = [0u8; 16];
                for (i, chunk) in b.chunks_mut(4).enumerate() {
                    chunk.copy_from_slice(&word(i)?);
                }
                std::net::Ipv6Addr::from(b).into()
            }
            _ => return None,
        };
        Some(SocketAddr::new(ip.to_canonical(), port))
    }
    // sl local_address rem_address st tx:rx tr:when retrnsmt uid ...
    let f: Vec<&str> = line.split_whitespace().collect();
    Some((addr(f.get(1)?)?, addr(f.get(2)?)?, f.get(7)?.parse().ok()?))
}

/// Binds a TCP listener. `"8888"` and `":8888"` mean `127.0.0.1:8888`;
/// anything else is `HOST:PORT` (`[::1]:8888`, `0.0.0.0:8888`, …).
pub async fn bind_tcp(addr: &str) -> io::Result<TcpListener> {
    let addr = addr.trim();
    let port = addr.strip_prefix(':').unwrap_or(addr);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        TcpListener::bind(format!("127.0.0.1:{port}")).await
    } else if addr.is_empty() {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty EGD address",
        ))
    } else {
        TcpListener::bind(addr).await
    }
}

/// Binds a Unix stream socket at `path` with permissions `mode` (0o600 is
/// the default the CLI should use) and, if given, group `group`.
///
/// A stale socket at `path` is removed first; a socket something still
/// listens on, or any other kind of file, is an error (never deleted).
/// Must be called inside a tokio runtime.
#[cfg(unix)]
pub fn bind_unix(path: &Path, mode: u32, group: Option<u32>) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use: another EGD server (another ekey-host?) listens there",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Unix sockets are Unix only: an error here.
#[cfg(not(unix))]
pub fn bind_unix(
    path: &Path,
    _mode: u32,
    _group: Option<u32>,
) -> io::Result<std::convert::Infallible> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{}: Unix sockets are Unix only; use --egd-tcp",
            path.display()
        ),
    ))
}

/// Runs the EGD server on `listeners` (all sharing one pool and one
/// round robin), fed verified 32-byte blocks by `source`, counting in
/// `stats`. Returns when `source` is closed; dropping the future stops the
/// server too. Either way all clients are disconnected.
pub async fn serve(
    listeners: Vec<EgdListener>,
    config: EgdConfig,
    mut source: mpsc::Receiver<SourceBlock>,
    stats: Arc<Mutex<EgdStats>>,
    closes: GateCloses,
) -> io::Result<()> {
    #[cfg(feature = "tls")]
    {
        let tls = listeners.iter().any(|l| matches!(l, EgdListener::Tls(..)));
        stats.lock().unwrap_or_else(|e| e.into_inner()).tls = tls;
    }
    let ctx = Arc::new(Ctx {
        config,
        hub: Mutex::new(Hub::default()),
        hub_wake: Notify::new(),
        stats,
        closes,
        last_refusal_warning: Mutex::new(None),
        #[cfg(feature = "tls")]
        handshakes: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        #[cfg(feature = "tls")]
        subject_key: std::hash::RandomState::new(),
    });
    tokio::select! {
        () = run_hub(&ctx, &mut source) => Ok(()),
        r = accept_loop(&ctx, &listeners) => r,
    }
}

/// Shared state of one server.
struct Ctx {
    config: EgdConfig,
    hub: Mutex<Hub>,
    /// Wakes the hub: new want, pool taken from, client gone.
    hub_wake: Notify,
    stats: Arc<Mutex<EgdStats>>,
    closes: GateCloses,
    /// When a refused connection was last logged at `warn` (refusals come
    /// in floods; the rest go to `debug`).
    last_refusal_warning: Mutex<Option<Instant>>,
    /// TLS handshakes under way.
    #[cfg(feature = "tls")]
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    /// Hashes TLS subjects into [`PeerId::Subject`].
    #[cfg(feature = "tls")]
    subject_key: std::hash::RandomState,
}

impl Ctx {
    fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats(&self) -> MutexGuard<'_, EgdStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bucket(&self) -> Option<TokenBucket> {
        match self.config.rate_limit {
            Some(rate) if rate > 0 => Some(TokenBucket::new(rate, Instant::now())),
            _ => None,
        }
    }

    /// Counts and logs a refused connection.
    fn refused(&self, peer: &PeerInfo, why: Refusal) {
        let total = {
            let mut stats = self.stats();
            let counter = match why {
                Refusal::NotAllowed => &mut stats.refused_not_allowed,
                Refusal::PeerCap => &mut stats.refused_peer_cap,
                Refusal::Full => &mut stats.rejected_clients,
            };
            *counter += 1;
            *counter
        };
        self.log_refusal(&peer.label, why.text(), total);
    }

    /// Logs a refused connection at `warn` at most every 10 s, and at
    /// `debug` in between.
    fn log_refusal(&self, label: &str, why: &str, total: u64) {
        let now = Instant::now();
        let mut last = self
            .last_refusal_warning
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            *last = Some(now);
            tracing::warn!("EGD: refused {label}: {why} ({total} so far)");
        } else {
            tracing::debug!("EGD: refused {label}: {why}");
        }
    }
}

/// Why a new connection was closed at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    /// The allow-lists do not name the peer.
    NotAllowed,
    /// The peer holds its cap of connections.
    PeerCap,
    /// Every slot is taken and none may be reclaimed.
    Full,
}

impl Refusal {
    fn text(self) -> &'static str {
        match self {
            Self::NotAllowed => "not in the allow-lists",
            Self::PeerCap => "this peer holds its cap of connections (--egd-max-per-peer)",
            Self::Full => "every client slot is taken (--egd-max-clients)",
        }
    }
}

#[derive(Default)]
struct Hub {
    /// Bytes from the source not yet granted, oldest first.
    pool: WipeQueue,
    /// The keys the pool's bytes came from.
    pool_keys: Runs,
    slots: HashMap<u64, Slot>,
    /// Clients with `want > 0`, in round-robin order.
    waiters: VecDeque<u64>,
    next_id: u64,
    /// Sum of the slots' credit (in 1/[`SCALE`] bytes); never more than the
    /// pool holds, so `pool.len() * SCALE - claimed` is the free part.
    claimed: u64,
    /// Connections held by each peer.
    peers: HashMap<PeerId, usize>,
    /// Arrival rate estimate, bytes/s (see [`RATE_TAU`]), and when it was
    /// last updated.
    rate: f64,
    rate_at: Option<Instant>,
    /// [`GATE_CLOSINGS`] when the pool was last checked for bytes to
    /// withdraw.
    closings_seen: u64,
    /// For each key with bytes in the pool: how many times its gate had
    /// closed when they were released (all the same: older ones are
    /// withdrawn before newer ones go in).
    pool_epoch: HashMap<Serial, u64>,
}

struct Slot {
    peer: PeerId,
    share: u32,
    /// Bytes the current blocking request still needs granted.
    want: usize,
    /// Granted, not yet written to the socket.
    granted: WipeQueue,
    /// The keys the granted bytes came from.
    granted_keys: Runs,
    /// Pool bytes reserved for this client, in 1/[`SCALE`] bytes.
    credit: u64,
    /// Requests read and not yet answered.
    pending: usize,
    /// When it last sent a request or was last answered.
    last_active: Instant,
    wake: Arc<Notify>,
    /// Tells the client's task to close (its slot was reclaimed).
    close: Arc<Notify>,
    bucket: Option<TokenBucket>,
}

impl Slot {
    fn new(peer: PeerId, share: u32, bucket: Option<TokenBucket>, now: Instant) -> Self {
        Self {
            peer,
            share: share.max(1),
            want: 0,
            granted: WipeQueue::default(),
            granted_keys: Runs::default(),
            credit: 0,
            pending: 0,
            last_active: now,
            wake: Arc::new(Notify::new()),
            close: Arc::new(Notify::new()),
            bucket,
        }
    }

    /// Whether it competes for credit.
    fn active(&self, now: Instant) -> bool {
        self.want > 0 || self.pending > 0 || now.duration_since(self.last_active) < ACTIVE_WINDOW
    }

    /// Whether closing it loses nothing: no request pending, nothing
    /// granted.
    fn idle(&self) -> bool {
        self.pending == 0 && self.want == 0 && self.granted.is_empty()
    }
}

impl Hub {
    /// Pool bytes nobody holds credit for, in 1/[`SCALE`] bytes.
    fn free(&self) -> u64 {
        (self.pool.len() as u64 * SCALE).saturating_sub(self.claimed)
    }

    /// Bytes client `slot` may be granted now: its credit plus the free
    /// bytes (no more than the pool holds).
    fn allowance(&self, slot: &Slot) -> usize {
        let bytes = (slot.credit + self.free()) / SCALE;
        usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(self.pool.len())
    }

    /// Moves the oldest `n` pool bytes to client `id`, paying from its
    /// credit first (the caller checked [`Hub::allowance`]).
    fn grant(&mut self, id: u64, n: usize) {
        let Some(slot) = self.slots.get_mut(&id) else {
            return;
        };
        let n = n.min(self.pool.len());
        let paid = slot.credit.min(n as u64 * SCALE);
        slot.credit -= paid;
        self.claimed -= paid;
        self.pool.move_front_to(n, &mut slot.granted);
        slot.granted_keys.extend_back(self.pool_keys.take_front(n));
        // Taking free bytes may leave the accounts holding more than the
        // pool; it cannot, as `n` ≤ credit + free, but stay safe.
        self.fit_credit();
    }

    /// Admits a new client from `peer`, reclaiming an idle slot if every
    /// slot is taken (see the module docs, "Admission"). Returns its id,
    /// and the connection reclaimed for it, if any.
    fn admit(
        &mut self,
        admission: &Admission,
        peer: &PeerInfo,
        bucket: Option<TokenBucket>,
        now: Instant,
    ) -> Result<(u64, Option<u64>), Refusal> {
        if !admission.allows(peer) {
            return Err(Refusal::NotAllowed);
        }
        let held = self.peers.get(&peer.id).copied().unwrap_or(0);
        if held >= admission.max_per_peer {
            return Err(Refusal::PeerCap);
        }
        let mut reclaimed = None;
        if self.slots.len() >= admission.max_clients && !matches!(peer.id, PeerId::Guest(_)) {
            let victim = self
                .slots
                .iter()
                .filter(|(_, s)| s.idle())
                .map(|(&id, s)| (self.peers.get(&s.peer).copied().unwrap_or(0), s, id))
                .filter(|&(count, _, _)| count >= held + 2)
                .max_by_key(|&(count, s, id)| {
                    (
                        count,
                        now.duration_since(s.last_active),
                        std::cmp::Reverse(id),
                    )
                })
                .map(|(_, _, id)| id);
            let Some(victim) = victim else {
                return Err(Refusal::Full);
            };
            if let Some(slot) = self.slots.get(&victim) {
                slot.close.notify_one();
            }
            self.remove(victim);
            reclaimed = Some(victim);
        }
        self.next_id += 1;
        let id = self.next_id;
        self.slots
            .insert(id, Slot::new(peer.id, peer.share, bucket, now));
        *self.peers.entry(peer.id).or_default() += 1;
        Ok((id, reclaimed))
    }

    /// Forgets a client (once; returns whether it was there). Its credit
    /// becomes free, and bytes granted to it but not written go back to
    /// the front of the pool.
    fn remove(&mut self, id: u64) -> bool {
        let Some(slot) = self.slots.remove(&id) else {
            return false;
        };
        self.waiters.retain(|&w| w != id);
        self.claimed -= slot.credit;
        if let Some(n) = self.peers.get_mut(&slot.peer) {
            *n -= 1;
            if *n == 0 {
                self.peers.remove(&slot.peer);
            }
        }
        let Slot {
            granted,
            mut granted_keys,
            ..
        } = slot;
        self.pool_keys
            .extend_front(granted_keys.take_front(granted.len()));
        let back = Zeroizing::new(granted.iter().collect::<Vec<u8>>());
        self.pool.prepend(&back);
        true
    }

    /// Shrinks every account in proportion if together they claim more
    /// than the pool holds (after a withdrawal).
    fn fit_credit(&mut self) {
        let have = self.pool.len() as u64 * SCALE;
        if self.claimed <= have {
            return;
        }
        let (have, claimed) = (u128::from(have), u128::from(self.claimed));
        let mut sum = 0;
        for slot in self.slots.values_mut() {
            // ≤ credit, since have < claimed.
            slot.credit = (u128::from(slot.credit) * have / claimed) as u64;
            sum += slot.credit;
        }
        self.claimed = sum;
    }

    /// Divides `bytes` just taken into the pool among the active clients'
    /// accounts (see the module docs, "Shares over time").
    fn credit(&mut self, bytes: usize, now: Instant, pool_bytes: usize) {
        let tau = RATE_TAU.as_secs_f64();
        let dt = self
            .rate_at
            .map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        // Not f64::exp: without its only libm call the daemon maps no libm.so.
        self.rate = self.rate * libm::exp(-dt / tau) + bytes as f64 / tau;
        self.rate_at = Some(now);

        // Only active clients compete; the others' credit goes free.
        let mut weight = 0u64;
        for slot in self.slots.values_mut() {
            if slot.active(now) {
                weight += u64::from(slot.share);
            } else {
                self.claimed -= slot.credit;
                slot.credit = 0;
            }
        }
        if weight == 0 {
            return;
        }
        let cap = |share: u32| -> u64 {
            let part = f64::from(share) / weight as f64;
            let bytes = (self.rate * part).max(MIN_CREDIT_CAP as f64);
            let bytes = bytes.min(pool_bytes as f64 / 2.0 * part);
            (bytes * SCALE as f64) as u64
        };
        let caps: Vec<(u64, u64)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.active(now))
            .map(|(&id, s)| (id, cap(s.share)))
            .collect();
        // Water-filling: what a full account cannot take goes to the others.
        let mut left = bytes as u64 * SCALE;
        let mut open: Vec<(u64, u64)> = Vec::with_capacity(caps.len());
        for &(id, cap) in &caps {
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if slot.credit > cap {
                self.claimed -= slot.credit - cap;
                slot.credit = cap;
            }
            if slot.credit < cap {
                open.push((id, cap));
            }
        }
        for _round in 0..8 {
            if left == 0 || open.is_empty() {
                break;
            }
            let open_weight: u64 = open
                .iter()
                .filter_map(|(id, _)| self.slots.get(id))
                .map(|s| u64::from(s.share))
                .sum();
            if open_weight == 0 {
                break;
            }
            let offer = left;
            let mut still_open = Vec::with_capacity(open.len());
            for &(id, cap) in &open {
                let Some(slot) = self.slots.get_mut(&id) else {
                    continue;
                };
                let part = offer * u64::from(slot.share) / open_weight;
                let take = part.min(cap - slot.credit).min(left);
                slot.credit += take;
                self.claimed += take;
                left -= take;
                if slot.credit < cap {
                    still_open.push((id, cap));
                }
            }
            open = still_open;
        }
        self.fit_credit();
    }

    /// After any key's gate closed: withdraws from the pool the bytes of
    /// keys whose gate closed after they were released. (Every byte in the
    /// pool was released before the closing it is checked against, except
    /// after a closing and a re-opening the check missed: 64 clean blocks
    /// later, so not in practice; such bytes would only be withdrawn too.)
    fn withdraw_closed(&mut self, closes: &GateCloses, stats: &Mutex<EgdStats>) {
        let now = GATE_CLOSINGS.load(std::sync::atomic::Ordering::Acquire);
        if now == self.closings_seen {
            return;
        }
        let epochs = &self.pool_epoch;
        let removed = self.pool_keys.withdraw(&mut self.pool, |k| {
            epochs.get(k).is_some_and(|&e| e < closes(k))
        });
        self.closings_seen = now;
        if removed.is_empty() {
            return;
        }
        self.fit_credit();
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        for (key, n) in removed {
            self.pool_epoch.remove(&key);
            *stats.withdrawn_by_key.entry(key).or_default() += n as u64;
        }
    }

    /// Takes a block from the source into the pool, unless its key's gate
    /// closed after it was released. Returns the bytes added.
    fn take_in(
        &mut self,
        block: SourceBlock,
        closes: &GateCloses,
        stats: &Mutex<EgdStats>,
    ) -> usize {
        let (data, key, epoch) = block;
        self.take_in_data(data.bytes(), key, epoch, closes, stats)
    }

    fn take_in_data(
        &mut self,
        data: &[u8; 32],
        key: Serial,
        epoch: u64,
        closes: &GateCloses,
        stats: &Mutex<EgdStats>,
    ) -> usize {
        self.withdraw_closed(closes, stats);
        if any_gate_closed() && epoch < closes(&key) {
            let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
            *stats.withdrawn_by_key.entry(key).or_default() += data.len() as u64;
            return 0;
        }
        self.pool.extend_from_slice(data);
        self.pool_keys.push_back(key, data.len());
        self.pool_epoch.insert(key, epoch);
        data.len()
    }

    /// Whether the hub should take another block: the pool is below its
    /// size, or a client waits and no free byte is left for it.
    fn need_source(&self, pool_bytes: usize) -> bool {
        self.pool.len() < pool_bytes || (!self.waiters.is_empty() && self.free() < SCALE)
    }

    /// Grants pool bytes to waiting clients, round robin, at most [`CHUNK`]
    /// per turn and no more than each one's allowance. Returns when a
    /// rate-limited waiter will have tokens again.
    fn distribute(&mut self, now: Instant) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut idle = 0;
        while !self.pool.is_empty() && idle < self.waiters.len() {
            let Some(id) = self.waiters.pop_front() else {
                break;
            };
            let Some(slot) = self.slots.get(&id) else {
                continue;
            };
            if slot.want == 0 {
                continue;
            }
            let turn = CHUNK.min(slot.want);
            if self.allowance(slot) < turn {
                // Not a whole turn it may take now (granting less would
                // only mean more, smaller writes): the next blocks bring
                // credit.
                self.waiters.push_back(id);
                idle += 1;
                continue;
            }
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if let Some(b) = &mut slot.bucket {
                b.refill(now);
                if b.available() < turn {
                    let at = b.when(turn);
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                    self.waiters.push_back(id);
                    idle += 1;
                    continue;
                }
                b.take(turn);
            }
            slot.want -= turn;
            slot.wake.notify_one();
            let more = slot.want > 0;
            self.grant(id, turn);
            if more {
                self.waiters.push_back(id);
            }
            idle = 0;
        }
        wake
    }
}

/// Token bucket in bytes.
struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, now: Instant) -> Self {
        let capacity = f64::from(rate.max(512));
        Self {
            rate: f64::from(rate),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    fn available(&self) -> usize {
        self.tokens as usize
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When the bucket (as of its last refill) holds `n` tokens.
    fn when(&self, n: usize) -> Instant {
        let missing = (n as f64 - self.tokens).max(0.0);
        // A millisecond of slack so the wake-up does not land just short.
        self.last + Duration::from_secs_f64(missing / self.rate) + Duration::from_millis(1)
    }
}

/// Most blocks taken from the source in one go before they are credited
/// (so crediting, which walks every client, runs per batch, not per block).
const INTAKE_BATCH: usize = 80;

/// Moves blocks from the source into the pool, credits them, and grants
/// them to waiting clients. Returns when the source is closed.
async fn run_hub(ctx: &Ctx, source: &mut mpsc::Receiver<SourceBlock>) {
    let pool_bytes = ctx.config.pool_bytes;
    let mut shown = (0, 0);
    loop {
        let (need, wake, levels) = {
            let mut hub = ctx.hub();
            hub.withdraw_closed(&ctx.closes, &ctx.stats);
            let wake = hub.distribute(Instant::now());
            let levels = (hub.pool.len(), (hub.claimed / SCALE) as usize);
            (hub.need_source(pool_bytes), wake, levels)
        };
        if levels != shown {
            shown = levels;
            let mut stats = ctx.stats();
            (stats.pool_bytes, stats.reserved_bytes) = levels;
        }
        let sleep = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now));
        tokio::select! {
            biased;
            () = ctx.hub_wake.notified() => {}
            block = source.recv(), if need => match block {
                Some(block) => {
                    let mut hub = ctx.hub();
                    let mut added = hub.take_in(block, &ctx.closes, &ctx.stats);
                    for _ in 1..INTAKE_BATCH {
                        if !hub.need_source(pool_bytes) {
                            break;
                        }
                        match source.try_recv() {
                            Ok(block) => added += hub.take_in(block, &ctx.closes, &ctx.stats),
                            Err(_) => break,
                        }
                    }
                    hub.credit(added, Instant::now(), pool_bytes);
                }
                None => return,
            },
            () = sleep, if wake.is_some() => {}
        }
    }
}

async fn accept_loop(ctx: &Arc<Ctx>, listeners: &[EgdListener]) -> io::Result<()> {
    if listeners.is_empty() {
        return std::future::pending().await;
    }
    let shares = ctx.config.shares;
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            conn = poll_fn(|cx| {
                for l in listeners {
                    if let Poll::Ready(r) = l.poll_accept(cx, shares) {
                        return Poll::Ready(r);
                    }
                }
                Poll::Pending
            }) => conn,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: wait a little, go on.
                tracing::warn!("EGD accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream {
            Stream::Tcp(s) => admit_and_spawn(ctx, &peer, &mut tasks, s),
            #[cfg(unix)]
            Stream::Unix(s) => admit_and_spawn(ctx, &peer, &mut tasks, s),
            Stream::Internal(s) => admit_and_spawn(ctx, &peer, &mut tasks, s),
            #[cfg(feature = "tls")]
            Stream::Tls(tcp, server) => {
                if let Some(task) = tls::start(ctx, tcp, &server, peer) {
                    tasks.spawn(task);
                }
            }
        }
    }
}

/// Admits a client on a plain stream and starts its task, or closes it.
fn admit_and_spawn<S>(ctx: &Arc<Ctx>, peer: &PeerInfo, tasks: &mut JoinSet<()>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    match Client::register(ctx, peer) {
        Ok(client) => {
            tasks.spawn(client.run(stream));
        }
        // Dropping `stream` closes it.
        Err(why) => ctx.refused(peer, why),
    }
}

enum Request {
    Available,
    NonBlocking(u8),
    Blocking(u8),
    Pid,
}

/// Why the reader stopped other than a clean end (the client closed its
/// side between commands, or the writer is gone).
enum ReadEnd {
    /// Read error (reset and the like).
    Io,
    /// Unknown command or a command cut short.
    Protocol,
}

/// One connected client. Dropping it releases everything it held.
struct Client {
    ctx: Arc<Ctx>,
    id: u64,
    wake: Arc<Notify>,
    close: Arc<Notify>,
}

impl Client {
    /// Registers a new client, or says why it is refused.
    fn register(ctx: &Arc<Ctx>, peer: &PeerInfo) -> Result<Self, Refusal> {
        let now = Instant::now();
        let (id, reclaimed, wake, close) = {
            let mut hub = ctx.hub();
            let (id, reclaimed) = hub.admit(&ctx.config.admission, peer, ctx.bucket(), now)?;
            let slot = &hub.slots[&id];
            (id, reclaimed, slot.wake.clone(), slot.close.clone())
        };
        let mut stats = ctx.stats();
        if let Some(old) = reclaimed {
            stats.reclaimed_slots += 1;
            stats.clients.retain(|c| c.id != old);
            tracing::info!(
                "EGD: closed idle client {old} to make room for {} (every slot was taken)",
                peer.label
            );
        }
        tracing::debug!("EGD client {id} connected: {}", peer.label);
        stats.total_clients += 1;
        let wall = SystemTime::now();
        stats.clients.push(ClientStats {
            id,
            peer: peer.label.clone(),
            listener: peer.listener,
            ip: peer.ip,
            subject: peer.subject.clone(),
            uid: match peer.id {
                PeerId::Uid(uid) | PeerId::Local(_, uid) => Some(uid),
                _ => None,
            },
            share: peer.share.max(1),
            bytes_served: 0,
            requests_pending: 0,
            waits: Waits::default(),
            connected_since: wall,
            last_active: wall,
        });
        drop(stats);
        if reclaimed.is_some() {
            ctx.hub_wake.notify_one();
        }
        Ok(Self {
            ctx: ctx.clone(),
            id,
            wake,
            close,
        })
    }

    async fn run<S: AsyncRead + AsyncWrite + Send + 'static>(self, stream: S) {
        let (rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel(self.ctx.config.max_pending());
        let reader = self.read_requests(BufReader::with_capacity(256, rd), tx);
        let writer = self.write_replies(&mut wr, &mut rx);
        let close = self.close.clone();
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => match end {
                // Half-closed: answer what was asked, then go.
                Ok(()) => {
                    tokio::select! {
                        _ = writer => {}
                        () = close.notified() => {}
                    }
                }
                Err(ReadEnd::Io) => {}
                Err(ReadEnd::Protocol) => {
                    tracing::debug!("EGD client {}: protocol error, closing", self.id);
                    self.ctx.stats().closed_for_protocol_errors += 1;
                }
            },
            _ = &mut writer => {}
            () = close.notified() => {
                tracing::debug!("EGD client {}: slot reclaimed, closing", self.id);
            }
        }
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        tx: mpsc::Sender<(Request, Instant)>,
    ) -> Result<(), ReadEnd> {
        fn cut(e: io::Error) -> ReadEnd {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ReadEnd::Protocol
            } else {
                ReadEnd::Io
            }
        }
        loop {
            let cmd = match rd.read_u8().await {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(_) => return Err(ReadEnd::Io),
            };
            let req = match cmd {
                0x00 => Request::Available,
                0x01 => Request::NonBlocking(rd.read_u8().await.map_err(cut)?),
                0x02 => Request::Blocking(rd.read_u8().await.map_err(cut)?),
                0x03 => {
                    let _shannons = rd.read_u16().await.map_err(cut)?;
                    let n = rd.read_u8().await.map_err(cut)?;
                    let mut junk = [0u8; 255];
                    rd.read_exact(&mut junk[..usize::from(n)])
                        .await
                        .map_err(cut)?;
                    continue;
                }
                0x04 => Request::Pid,
                _ => return Err(ReadEnd::Protocol),
            };
            let now = Instant::now();
            if let Some(slot) = self.ctx.hub().slots.get_mut(&self.id) {
                slot.pending += 1;
                slot.last_active = now;
            }
            if let Some(c) = self.ctx.stats().client(self.id) {
                c.requests_pending += 1;
                c.last_active = SystemTime::now();
            }
            // Blocks while the queue is full: the client is not read until
            // it has been answered.
            if tx.send((req, now)).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn write_replies<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        rx: &mut mpsc::Receiver<(Request, Instant)>,
    ) -> io::Result<()> {
        while let Some((req, read_at)) = rx.recv().await {
            match req {
                Request::Available => {
                    let bytes = {
                        let hub = self.ctx.hub();
                        hub.slots.get(&self.id).map_or(0, |s| hub.allowance(s))
                    };
                    let bits = u32::try_from(bytes.saturating_mul(8)).unwrap_or(u32::MAX);
                    wr.write_all(&bits.to_be_bytes()).await?;
                }
                Request::NonBlocking(n) => {
                    let count = self.take_now(usize::from(n));
                    wr.write_all(&[count as u8]).await?;
                    self.write_granted(wr, count).await?;
                }
                Request::Blocking(n) => {
                    self.want(usize::from(n));
                    self.write_granted(wr, usize::from(n)).await?;
                }
                Request::Pid => {
                    let pid = std::process::id().to_string();
                    let mut reply = vec![pid.len() as u8];
                    reply.extend_from_slice(pid.as_bytes());
                    wr.write_all(&reply).await?;
                }
            }
            if rx.is_empty() {
                // TLS may hold the tail of a reply when the socket was
                // full; plain sockets hold nothing.
                wr.flush().await?;
            }
            let now = Instant::now();
            if let Some(slot) = self.ctx.hub().slots.get_mut(&self.id) {
                slot.pending = slot.pending.saturating_sub(1);
                slot.last_active = now;
            }
            if let Some(c) = self.ctx.stats().client(self.id) {
                c.requests_pending = c.requests_pending.saturating_sub(1);
                c.waits.record(now.saturating_duration_since(read_at));
                c.last_active = SystemTime::now();
            }
        }
        Ok(())
    }

    /// Non-blocking read: moves up to `n` pool bytes (within this client's
    /// allowance and tokens) to its granted bytes; returns how many.
    fn take_now(&self, n: usize) -> usize {
        let count = {
            let mut hub = self.ctx.hub();
            let hub = &mut *hub;
            hub.withdraw_closed(&self.ctx.closes, &self.ctx.stats);
            let Some(slot) = hub.slots.get(&self.id) else {
                return 0;
            };
            let mut count = n.min(hub.allowance(slot));
            if let Some(slot) = hub.slots.get_mut(&self.id)
                && let Some(b) = &mut slot.bucket
            {
                b.refill(Instant::now());
                count = count.min(b.available());
                b.take(count);
            }
            hub.grant(self.id, count);
            count
        };
        if count > 0 {
            self.ctx.hub_wake.notify_one();
        }
        count
    }

    /// Blocking read: asks the hub for `n` more bytes.
    fn want(&self, n: usize) {
        if n == 0 {
            return;
        }
        {
            let mut hub = self.ctx.hub();
            let Some(slot) = hub.slots.get_mut(&self.id) else {
                return;
            };
            slot.want += n;
            if slot.want == n {
                hub.waiters.push_back(self.id);
            }
        }
        self.ctx.hub_wake.notify_one();
    }

    /// Writes exactly `count` granted bytes, waiting for grants as needed.
    /// Bytes leave `granted` only once written, so a client that goes away
    /// returns the rest to the pool (see `Drop`).
    async fn write_granted<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        mut count: usize,
    ) -> io::Result<()> {
        let mut buf = [0u8; 256];
        while count > 0 {
            let ready = {
                let hub = self.ctx.hub();
                let Some(slot) = hub.slots.get(&self.id) else {
                    return Err(io::ErrorKind::NotConnected.into());
                };
                let k = slot.granted.len().min(count).min(buf.len());
                slot.granted.copy_front(&mut buf[..k])
            };
            if ready == 0 {
                // What is written must be on its way before waiting (TLS
                // may still hold a record).
                wr.flush().await?;
                self.wake.notified().await;
                continue;
            }
            let written = wr.write(&buf[..ready]).await;
            buf[..ready].fill(0);
            let written = written?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let keys = match self.ctx.hub().slots.get_mut(&self.id) {
                Some(slot) => {
                    slot.granted.discard_front(written);
                    slot.granted_keys.take_front(written)
                }
                None => Vec::new(),
            };
            count -= written;
            let mut stats = self.ctx.stats();
            stats.total_served += written as u64;
            for (key, n) in keys {
                *stats.served_by_key.entry(key).or_default() += n as u64;
            }
            if let Some(c) = stats.client(self.id) {
                c.bytes_served += written as u64;
            }
        }
        Ok(())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let was_there = self.ctx.hub().remove(self.id);
        self.ctx.hub_wake.notify_one();
        self.ctx.stats().clients.retain(|c| c.id != self.id);
        if was_there {
            tracing::debug!("EGD client {} disconnected", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::net::SocketAddr;
    use std::os::unix::fs::MetadataExt;

    use tokio::net::TcpSocket;
    use tokio::task::JoinHandle;
    use tokio::time::{sleep, timeout};

    use super::*;

    pub(super) const T: Duration = Duration::from_secs(5);

    /// Block `i` from a key whose serial says whether `i` is odd (so the
    /// test can tell which key each served byte came from).
    pub(super) fn src(i: u64) -> SourceBlock {
        (crate::wipe::SecretBlock::take(&mut block(i)), key_of(i), 0)
    }

    /// Keys whose gate never closed.
    pub(super) fn never_closed() -> GateCloses {
        Arc::new(|_: &Serial| 0)
    }

    fn key_of(i: u64) -> Serial {
        Serial([u8::from(i % 2 == 1); 12])
    }

    /// Block `i` of the test source: `i` as u64 little-endian, four times.
    fn block(i: u64) -> [u8; 32] {
        let mut b = [0u8; 32];
        for w in b.chunks_mut(8) {
            w.copy_from_slice(&i.to_le_bytes());
        }
        b
    }

    fn blocks(range: std::ops::Range<u64>) -> Vec<u8> {
        range.flat_map(block).collect()
    }

    /// The block numbers of a stream made of whole test blocks.
    pub(super) fn block_numbers(bytes: &[u8]) -> Vec<u64> {
        assert_eq!(bytes.len() % 32, 0, "not whole blocks");
        bytes
            .chunks(32)
            .map(|c| {
                let i = u64::from_le_bytes(c[..8].try_into().unwrap());
                assert_eq!(c, block(i), "not a source block");
                i
            })
            .collect()
    }

    struct Server {
        addr: SocketAddr,
        tx: mpsc::Sender<SourceBlock>,
        stats: Arc<Mutex<EgdStats>>,
        _task: JoinHandle<io::Result<()>>,
    }

    impl Server {
        async fn start(config: EgdConfig, channel: usize) -> Self {
            let (tx, rx) = mpsc::channel(channel);
            let stats = Arc::new(Mutex::new(EgdStats::default()));
            let l = bind_tcp(":0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let task = tokio::spawn(serve(
                vec![EgdListener::Tcp(l)],
                config,
                rx,
                stats.clone(),
                never_closed(),
            ));
            Self {
                addr,
                tx,
                stats,
                _task: task,
            }
        }

        /// Feeds blocks `from..` forever (as fast as the server takes them).
        fn feed(&self, from: u64) {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                for i in from.. {
                    if tx.send(src(i)).await.is_err() {
                        break;
                    }
                }
            });
        }

        async fn connect(&self) -> TcpStream {
            let s = TcpStream::connect(self.addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            s
        }

        fn stats(&self) -> EgdStats {
            self.stats.lock().unwrap().clone()
        }

        /// Waits until `f(stats)` holds.
        async fn wait_for(&self, what: &str, f: impl Fn(&EgdStats) -> bool) {
            let t0 = Instant::now();
            while !f(&self.stats()) {
                assert!(t0.elapsed() < T, "timed out waiting for {what}");
                sleep(Duration::from_millis(2)).await;
            }
        }
    }

    async fn read_n(s: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        timeout(T, s.read_exact(&mut buf))
            .await
            .expect("reply timed out")
            .unwrap();
        buf
    }

    async fn pid_reply(s: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> String {
        s.write_all(&[0x04]).await.unwrap();
        let len = read_n(s, 1).await[0];
        String::from_utf8(read_n(s, usize::from(len)).await).unwrap()
    }

    /// True if the server closed the connection.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 1];
        matches!(
            timeout(T, s.read(&mut b)).await.expect("not closed"),
            Ok(0) | Err(_)
        )
    }

    /// A QEMU-like client: `total` requests of `0x02 64`, `in_flight` at a
    /// time; returns what it got (then checks no extra byte came).
    async fn qemu_client(mut s: TcpStream, total: usize, in_flight: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut sent = 0;
        while sent < in_flight.min(total) {
            s.write_all(&[0x02, 64]).await.unwrap();
            sent += 1;
        }
        while got.len() < total * 64 {
            got.extend(read_n(&mut s, 64).await);
            if sent < total {
                s.write_all(&[0x02, 64]).await.unwrap();
                sent += 1;
            }
        }
        assert_eq!(pid_reply(&mut s).await, std::process::id().to_string());
        got
    }

    #[tokio::test(flavor = "current_thread")]
    async fn all_five_commands() {
        let config = EgdConfig {
            pool_bytes: 64,
            ..EgdConfig::default()
        };
        let srv = Server::start(config, 8).await;
        srv.tx.send(src(0)).await.unwrap();
        srv.tx.send(src(1)).await.unwrap();
        let mut s = srv.connect().await;

        // 0x00: bits available, once the pool has taken both blocks.
        let t0 = Instant::now();
        loop {
            s.write_all(&[0x00]).await.unwrap();
            let bits = read_n(&mut s, 4).await;
            if bits == [0, 0, 2, 0] {
                break;
            }
            assert!(t0.elapsed() < T, "pool never filled");
            sleep(Duration::from_millis(2)).await;
        }
        let source = blocks(0..4);
        // 0x01 n: count, then bytes.
        s.write_all(&[0x01, 10]).await.unwrap();
        assert_eq!(
            read_n(&mut s, 11).await,
            [&[10][..], &source[..10]].concat()
        );
        s.write_all(&[0x00]).await.unwrap();
        assert_eq!(read_n(&mut s, 4).await, (54u32 * 8).to_be_bytes());
        s.write_all(&[0x01, 255]).await.unwrap();
        assert_eq!(
            read_n(&mut s, 55).await,
            [&[54][..], &source[10..64]].concat()
        );
        s.write_all(&[0x01, 5]).await.unwrap();
        assert_eq!(read_n(&mut s, 1).await, [0]);
        // 0x02 n: blocks until the bytes exist.
        s.write_all(&[0x02, 40]).await.unwrap();
        let mut b = [0u8; 1];
        assert!(
            timeout(Duration::from_millis(30), s.read(&mut b))
                .await
                .is_err()
        );
        srv.tx.send(src(2)).await.unwrap();
        srv.tx.send(src(3)).await.unwrap();
        assert_eq!(read_n(&mut s, 40).await, source[64..104]);
        // 0x03: parsed in full, no reply; 0x04: the pid.
        s.write_all(&[0x03, 0x01, 0x00, 3, 9, 9, 9, 0x03, 0, 8, 0])
            .await
            .unwrap();
        assert_eq!(pid_reply(&mut s).await, std::process::id().to_string());
        // Pipelined, answered in order.
        s.write_all(&[0x01, 2, 0x00, 0x02, 1, 0x04]).await.unwrap();
        let reply = read_n(&mut s, 3 + 4 + 1).await;
        assert_eq!(reply[..3], [2, source[104], source[105]]);
        assert_eq!(reply[3..7], (22u32 * 8).to_be_bytes());
        assert_eq!(reply[7], source[106]);
        let pid = std::process::id().to_string();
        assert_eq!(read_n(&mut s, 1 + pid.len()).await[1..], *pid.as_bytes());

        let st = srv.stats();
        assert_eq!(st.total_served, 10 + 54 + 40 + 2 + 1);
        assert_eq!(st.clients.len(), 1);
        assert_eq!(st.clients[0].bytes_served, st.total_served);
        assert_eq!(st.clients[0].requests_pending, 0);
        assert!(st.clients[0].peer.starts_with("tcp 127.0.0.1:"));

        // Unknown command: closed.
        s.write_all(&[0x05]).await.unwrap();
        assert!(closed(&mut s).await);
        srv.wait_for("client gone", |st| st.clients.is_empty())
            .await;
        assert_eq!(srv.stats().closed_for_protocol_errors, 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unix_socket_modes_and_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egd.sock");
        let l = bind_unix(&path, 0o600, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        drop(l);
        // Stale socket replaced; own group and another mode.
        let gid = std::fs::metadata(dir.path()).unwrap().gid();
        let l = bind_unix(&path, 0o660, Some(gid)).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o660, gid));
        // A socket that is listened on is not taken over.
        let err = bind_unix(&path, 0o600, None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("in use"), "{err}");
        assert!(std::os::unix::net::UnixStream::connect(&path).is_ok());
        // Anything but a socket is left alone.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(bind_unix(&file, 0o600, None).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"x");

        let (tx, rx) = mpsc::channel(4);
        let stats = Arc::new(Mutex::new(EgdStats::default()));
        let _srv = tokio::spawn(serve(
            vec![EgdListener::Unix(l)],
            EgdConfig::default(),
            rx,
            stats.clone(),
            never_closed(),
        ));
        let mut s = UnixStream::connect(&path).await.unwrap();
        assert_eq!(pid_reply(&mut s).await, std::process::id().to_string());
        s.write_all(&[0x02, 32]).await.unwrap();
        tx.send(src(7)).await.unwrap();
        assert_eq!(read_n(&mut s, 32).await, block(7));
        let st = stats.lock().unwrap().clone();
        assert!(
            st.clients[0].peer.starts_with("unix "),
            "{}",
            st.clients[0].peer
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tcp_address_forms() {
        for a in [":0", "0", " 0 ", "127.0.0.1:0"] {
            let l = bind_tcp(a).await.unwrap();
            assert_eq!(l.local_addr().unwrap().ip().to_string(), "127.0.0.1", "{a}");
        }
        assert!(bind_tcp("").await.is_err());
        assert!(bind_tcp(":").await.is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn qemu_pipelined_requests_in_order() {
        let srv = Server::start(EgdConfig::default(), 16).await;
        srv.feed(0);
        let s = srv.connect().await;
        // Four requests in one write, as QEMU does.
        let got = qemu_client(s, 4, 4).await;
        assert_eq!(got, blocks(0..8));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn many_qemu_clients_exact_unique_in_order() {
        let srv = Server::start(EgdConfig::default(), 64).await;
        srv.feed(0);
        let mut clients = Vec::new();
        for _ in 0..32 {
            let s = srv.connect().await;
            clients.push(tokio::spawn(qemu_client(s, 16, 4)));
        }
        let mut seen = HashSet::new();
        let mut by_key: BTreeMap<Serial, u64> = BTreeMap::new();
        for c in clients {
            let got = c.await.unwrap();
            assert_eq!(got.len(), 16 * 64);
            let nums = block_numbers(&got);
            assert!(nums.windows(2).all(|w| w[0] < w[1]), "out of order");
            for n in nums {
                assert!(seen.insert(n), "block {n} served twice");
                *by_key.entry(key_of(n)).or_default() += 32;
            }
        }
        srv.wait_for("all gone", |st| st.total_served == 32 * 16 * 64)
            .await;
        // Every served byte is booked to the key its block came from.
        assert_eq!(srv.stats().served_by_key, by_key);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn scarce_entropy_is_shared_fairly() {
        let config = EgdConfig {
            pool_bytes: 0,
            ..EgdConfig::default()
        };
        let srv = Server::start(config, 64).await;
        let fed = 512;
        let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let done_tx = Arc::new(done_tx);
        let mut clients = Vec::new();
        for _ in 0..32 {
            let mut s = srv.connect().await;
            let (total, done_tx, mut done_rx) = (total.clone(), done_tx.clone(), done_rx.clone());
            clients.push(tokio::spawn(async move {
                // Always four requests in flight, until all was served.
                s.write_all(&[0x02, 64].repeat(4)).await.unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 256];
                loop {
                    let n = tokio::select! {
                        r = s.read(&mut buf) => r.unwrap(),
                        _ = done_rx.wait_for(|d| *d) => break,
                    };
                    assert!(n > 0);
                    let done = (got.len() + n) / 64 - got.len() / 64;
                    got.extend_from_slice(&buf[..n]);
                    s.write_all(&[0x02, 64].repeat(done)).await.unwrap();
                    let sum = total.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    if sum + n as u64 == fed * 32 {
                        done_tx.send_replace(true);
                    }
                }
                got
            }));
        }
        srv.wait_for("requests", |st| {
            st.clients.len() == 32 && st.clients.iter().all(|c| c.requests_pending == 4)
        })
        .await;
        for i in 0..fed {
            srv.tx.send(src(i)).await.unwrap();
        }
        let mut served = Vec::new();
        let mut seen = HashSet::new();
        for c in clients {
            let got = timeout(T, c).await.expect("not all served").unwrap();
            served.push(got.len());
            for n in block_numbers(&got) {
                assert!(n < fed && seen.insert(n), "block {n}");
            }
        }
        assert_eq!(seen.len() as u64, fed, "every block served once");
        let mean = served.iter().sum::<usize>() / served.len();
        let least = *served.iter().min().unwrap();
        assert!(least * 2 >= mean, "least {least}, mean {mean}: {served:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn garbage_closes_only_that_client() {
        let srv = Server::start(EgdConfig::default(), 16).await;
        let mut good = srv.connect().await;
        good.write_all(&[0x02, 64]).await.unwrap();
        let mut bad = srv.connect().await;
        bad.write_all(&[0x07, 1, 2, 3]).await.unwrap();
        assert!(closed(&mut bad).await);
        // A request cut short is malformed too.
        let mut cut = srv.connect().await;
        cut.write_all(&[0x03, 0, 1, 200, 1]).await.unwrap();
        cut.shutdown().await.unwrap();
        assert!(closed(&mut cut).await);
        srv.feed(0);
        assert_eq!(read_n(&mut good, 64).await, blocks(0..2));
        assert_eq!(pid_reply(&mut good).await, std::process::id().to_string());
        srv.wait_for("closed", |st| st.closed_for_protocol_errors == 2)
            .await;
        assert_eq!(srv.stats().clients.len(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn stalled_reader_does_not_stall_others() {
        let srv = Server::start(EgdConfig::default(), 64).await;
        srv.feed(0);
        // A client with a tiny receive buffer asks for a lot and never reads.
        let sock = TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let stalled = sock.connect(srv.addr).await.unwrap();
        let (_rd, mut wr) = stalled.into_split();
        let _writer = tokio::spawn(async move {
            let _ = wr.write_all(&[0x02, 255].repeat(100_000)).await;
            wr
        });
        // Wait until the server can no longer write to it.
        let mut last = 0;
        let mut steady = 0;
        let t0 = Instant::now();
        while steady < 20 {
            sleep(Duration::from_millis(10)).await;
            let st = srv.stats();
            let now = st.clients.first().map_or(0, |c| c.bytes_served);
            steady = if now == last && now > 0 {
                steady + 1
            } else {
                0
            };
            last = now;
            assert!(t0.elapsed() < T, "stalled client never stalled");
        }
        let s = srv.connect().await;
        let got = timeout(Duration::from_secs(2), qemu_client(s, 10, 4))
            .await
            .expect("other client stalled");
        assert_eq!(got.len(), 640);
        // (Its kernel buffers took a few MB before it stalled.)
        let st = srv.stats();
        assert!(st.clients[0].bytes_served < 100_000 * 255);
        assert!(st.clients[0].requests_pending > 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn disconnect_mid_request_disturbs_nobody() {
        let srv = Server::start(EgdConfig::default(), 64).await;
        let mut other = srv.connect().await;
        other.write_all(&[0x02, 64].repeat(4)).await.unwrap();
        let mut quitter = srv.connect().await;
        quitter.write_all(&[0x02, 255].repeat(4)).await.unwrap();
        srv.wait_for("requests", |st| {
            st.clients.len() == 2 && st.clients.iter().all(|c| c.requests_pending == 4)
        })
        .await;
        srv.feed(0);
        read_n(&mut quitter, 100).await;
        drop(quitter);
        assert_eq!(read_n(&mut other, 256).await.len(), 256);
        srv.wait_for("quitter gone", |st| st.clients.len() == 1)
            .await;
        let got = qemu_client(other, 8, 4).await;
        assert_eq!(got.len(), 512);
        let st = srv.stats();
        assert_eq!(st.clients.len(), 1);
        assert_eq!(st.clients[0].requests_pending, 0);
        assert_eq!(st.total_clients, 2);
        // The quitter's unwritten grants went back with their keys: the
        // books by key still add up to what was served.
        assert_eq!(st.served_by_key.values().sum::<u64>(), st.total_served);
    }

    #[test]
    fn withdrawing_a_key_cuts_its_runs_out_and_keeps_the_rest_in_order() {
        let (a, b) = (Serial([1; 12]), Serial([2; 12]));
        let queue = |r: std::ops::Range<u8>| {
            let mut q = WipeQueue::default();
            q.extend_from_slice(&r.collect::<Vec<u8>>());
            q
        };
        let mut q = queue(0..96);
        let mut runs = Runs::default();
        runs.push_back(a, 32);
        runs.push_back(b, 32);
        runs.push_back(a, 32);
        let removed = runs.withdraw(&mut q, |k| *k == a);
        assert_eq!(removed, vec![(a, 32), (a, 32)]);
        assert_eq!(
            q.iter().collect::<Vec<u8>>(),
            (32..64u8).collect::<Vec<u8>>()
        );
        assert_eq!(runs.take_front(100), vec![(b, 32)]);

        let mut v = queue(0..96);
        let mut runs = Runs::default();
        runs.push_back(b, 40);
        runs.push_back(a, 16);
        runs.push_back(b, 40);
        let removed = runs.withdraw(&mut v, |k| *k == a);
        assert_eq!(removed, vec![(a, 16)]);
        let kept: Vec<u8> = (0..40u8).chain(56..96).collect();
        assert_eq!(v.iter().collect::<Vec<u8>>(), kept);
        // Nothing of the key: nothing moves.
        assert!(runs.withdraw(&mut v, |k| *k == a).is_empty());
        assert_eq!(v.len(), 80);
        // The withdrawn bytes left no copy behind.
        let live = v.len();
        assert_eq!(v.storage().iter().filter(|&&x| x != 0).count(), live - 1);
    }

    #[test]
    fn runs_split_and_merge() {
        let (a, b) = (Serial([1; 12]), Serial([2; 12]));
        let mut r = Runs::default();
        r.push_back(a, 32);
        r.push_back(a, 32);
        r.push_back(b, 32);
        assert_eq!(r.take_front(40), vec![(a, 40)]);
        assert_eq!(r.take_front(40), vec![(a, 24), (b, 16)]);
        // Given back in front, in order, merging with what is there.
        r.extend_front(vec![(a, 24), (b, 16)]);
        assert_eq!(r.0, VecDeque::from(vec![(a, 24), (b, 32)]));
        assert_eq!(r.take_front(100), vec![(a, 24), (b, 32)]);
        assert!(r.take_front(1).is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn rate_limit_per_client() {
        let config = EgdConfig {
            rate_limit: Some(1000),
            ..EgdConfig::default()
        };
        let srv = Server::start(config, 64).await;
        srv.feed(0);
        let mut s = srv.connect().await;
        s.write_all(&[0x02, 64].repeat(8)).await.unwrap();
        let t0 = Instant::now();
        let run = Duration::from_millis(2000);
        let mut got = 0usize;
        let mut buf = [0u8; 512];
        while let Ok(r) = timeout(run.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
            let n = r.unwrap();
            let done = (got + n) / 64 - got / 64;
            got += n;
            s.write_all(&[0x02, 64].repeat(done)).await.unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        // Burst of 1000 plus 1000/s, one chunk of slack.
        let most = 1000.0 + 1000.0 * secs + 32.0;
        assert!((got as f64) <= most, "{got} bytes in {secs:.2} s");
        assert!(got >= 2500, "only {got} bytes in {secs:.2} s");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn max_clients_enforced() {
        let config = EgdConfig {
            admission: Admission {
                max_clients: 2,
                ..Admission::default()
            },
            ..EgdConfig::default()
        };
        let srv = Server::start(config, 4).await;
        let mut a = srv.connect().await;
        let mut b = srv.connect().await;
        let pid = std::process::id().to_string();
        assert_eq!(pid_reply(&mut a).await, pid);
        assert_eq!(pid_reply(&mut b).await, pid);
        let mut c = srv.connect().await;
        assert!(closed(&mut c).await);
        assert_eq!(pid_reply(&mut a).await, pid);
        let st = srv.stats();
        assert_eq!((st.rejected_clients, st.total_clients), (1, 2));
        // A freed place can be taken again.
        drop(a);
        srv.wait_for("a gone", |st| st.clients.len() == 1).await;
        let mut d = srv.connect().await;
        assert_eq!(pid_reply(&mut d).await, pid);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn in_process_guests_get_in_past_caps_and_allow_lists() {
        // One TCP slot, and an allow-list no TCP peer here is in.
        let config = EgdConfig {
            admission: Admission {
                max_clients: 1,
                allow_nets: vec!["192.0.2.0/24".parse().unwrap()],
                ..Admission::default()
            },
            shares: Shares {
                vhost_user: 3,
                ..Shares::default()
            },
            ..EgdConfig::default()
        };
        let (connector, internal) = internal_listener();
        let (tx, rx) = mpsc::channel(4);
        let stats = Arc::new(Mutex::new(EgdStats::default()));
        let l = bind_tcp("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _task = tokio::spawn(serve(
            vec![EgdListener::Tcp(l), internal],
            config,
            rx,
            stats.clone(),
            never_closed(),
        ));
        tokio::spawn(async move {
            for i in 0.. {
                if tx.send(src(i)).await.is_err() {
                    break;
                }
            }
        });
        let mut a = connector.connect("guest-a").unwrap();
        let mut b = connector.connect("guest-b").unwrap();
        a.write_all(&[0x02, 64]).await.unwrap();
        b.write_all(&[0x02, 32]).await.unwrap();
        let got_a = read_n(&mut a, 64).await;
        let got_b = read_n(&mut b, 32).await;
        let (na, nb) = (block_numbers(&got_a), block_numbers(&got_b));
        assert!(na.iter().all(|i| !nb.contains(i)), "a block went to both");
        // Two guests hold more than max_clients, and a TCP client (not in
        // the allow-list) is still refused.
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        assert!(closed(&mut tcp).await);
        let st = stats.lock().unwrap().clone();
        assert_eq!(st.refused_not_allowed, 1);
        let mut guests: Vec<_> = st
            .clients
            .iter()
            .map(|c| (c.peer.clone(), c.listener, c.share, c.bytes_served))
            .collect();
        guests.sort();
        assert_eq!(
            guests,
            [
                ("vhost-user guest-a".to_string(), "vhost-user", 3, 64),
                ("vhost-user guest-b".to_string(), "vhost-user", 3, 32),
            ]
        );
        // A guest that goes frees its slot.
        drop(a);
        let t0 = Instant::now();
        while stats.lock().unwrap().clients.len() != 1 {
            assert!(t0.elapsed() < T, "guest-a still listed");
            sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn backpressure_without_clients() {
        let config = EgdConfig {
            pool_bytes: 1024,
            ..EgdConfig::default()
        };
        let srv = Server::start(config, 1000).await;
        for i in 0..1000 {
            srv.tx.try_send(src(i)).unwrap();
        }
        sleep(Duration::from_millis(50)).await;
        let taken = srv.tx.capacity();
        assert_eq!(taken, 1024 / 32, "blocks taken with nobody asking");
        let mut s = srv.connect().await;
        s.write_all(&[0x00]).await.unwrap();
        assert_eq!(read_n(&mut s, 4).await, (1024u32 * 8).to_be_bytes());
        s.write_all(&[0x02, 255]).await.unwrap();
        assert_eq!(read_n(&mut s, 255).await, blocks(0..8)[..255]);
        sleep(Duration::from_millis(20)).await;
        // Refilled to the pool size, no further.
        assert_eq!(srv.tx.capacity(), 1024 / 32 + 8);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn source_closed_stops_server() {
        let Server {
            addr,
            tx,
            stats,
            _task: task,
        } = Server::start(EgdConfig::default(), 4).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x02, 64]).await.unwrap();
        tx.send(src(0)).await.unwrap();
        assert_eq!(read_n(&mut s, 32).await, block(0));
        drop(tx);
        timeout(T, task).await.unwrap().unwrap().unwrap();
        assert!(closed(&mut s).await);
        assert!(stats.lock().unwrap().clients.is_empty());
    }

    #[test]
    fn hub_round_robin_and_returns() {
        let mut hub = Hub::default();
        for id in 1..=3 {
            let mut slot = Slot::new(PeerId::Uid(0), 1, None, Instant::now());
            slot.want = 100;
            hub.slots.insert(id, slot);
            hub.waiters.push_back(id);
        }
        hub.pool
            .extend_from_slice(&(0..=255u8).collect::<Vec<u8>>());
        hub.pool.extend_from_slice(&(0..100u8).collect::<Vec<u8>>());
        let now = Instant::now();
        assert_eq!(hub.distribute(now), None);
        // Chunks of 32 in turn: 1 gets 0..32, 2 gets 32..64, 3 gets 64..96, ...
        let g1: Vec<u8> = hub.slots[&1].granted.iter().collect();
        assert_eq!(g1[..32], (0..32).collect::<Vec<u8>>()[..]);
        assert_eq!(g1[32..64], (96..128).collect::<Vec<u8>>()[..]);
        assert!(
            hub.slots
                .values()
                .all(|s| s.want == 0 && s.granted.len() == 100)
        );
        assert_eq!(hub.pool.len(), 56);
        // A client that leaves gives back what it could not be sent.
        let front = hub.pool[0];
        hub.remove(2);
        assert_eq!(hub.pool.len(), 156);
        assert_eq!(hub.pool[0], 32);
        assert_eq!(hub.pool[100], front);
    }

    #[test]
    fn hub_rate_limited_waiter_wakes_later() {
        let now = Instant::now();
        let mut hub = Hub::default();
        let mut bucket = TokenBucket::new(1000, now);
        bucket.take(1000);
        let mut slot = Slot::new(PeerId::Uid(0), 1, Some(bucket), now);
        slot.want = 64;
        hub.slots.insert(1, slot);
        hub.waiters.push_back(1);
        hub.pool.extend_from_slice(&[0u8; 64]);
        let wake = hub.distribute(now).expect("a wake-up time");
        let ms = (wake - now).as_millis();
        assert!((32..=34).contains(&ms), "{ms} ms");
        assert_eq!(hub.pool.len(), 64);
        hub.distribute(wake);
        assert_eq!(hub.slots[&1].granted.len(), 32);
        assert_eq!(hub.pool.len(), 32);
    }

    /// A hub slot, active now, from `peer` with `share`.
    fn slot(hub: &mut Hub, id: u64, peer: PeerId, share: u32, now: Instant) {
        hub.slots.insert(id, Slot::new(peer, share, None, now));
        *hub.peers.entry(peer).or_default() += 1;
        hub.next_id = hub.next_id.max(id);
    }

    /// Feeds `bytes` into the hub's pool as one intake and credits them.
    fn intake(hub: &mut Hub, bytes: usize, now: Instant) {
        hub.pool.extend_from_slice(&vec![0u8; bytes]);
        hub.pool_keys.push_back(key_of(0), bytes);
        hub.credit(bytes, now, 16 * 1024);
    }

    /// Client `id` asks for `n` bytes (one blocking request) at `now`.
    fn ask(hub: &mut Hub, id: u64, n: usize, now: Instant) {
        let slot = hub.slots.get_mut(&id).unwrap();
        slot.last_active = now;
        slot.want += n;
        slot.pending += 1;
        if slot.want == n {
            hub.waiters.push_back(id);
        }
    }

    /// Takes what client `id` was granted.
    fn drain(hub: &mut Hub, id: u64) -> usize {
        let slot = hub.slots.get_mut(&id).unwrap();
        let n = slot.granted.len();
        slot.granted.discard_front(n);
        slot.granted_keys.take_front(n);
        if slot.want == 0 && n > 0 {
            slot.pending = 0;
        }
        n
    }

    /// The credit books: the accounts add up, and never exceed the pool.
    fn books(hub: &Hub) {
        let sum: u64 = hub.slots.values().map(|s| s.credit).sum();
        assert_eq!(sum, hub.claimed);
        assert!(hub.claimed <= hub.pool.len() as u64 * SCALE);
    }

    #[test]
    fn a_modest_client_beside_a_greedy_one_gets_all_it_asks_for() {
        // The real key's pattern: 2,500 bytes every 640 ms. A modest
        // client asks 64 bytes every 100 ms (640 B/s); a greedy one always
        // wants more than there is.
        let t0 = Instant::now();
        let mut hub = Hub::default();
        slot(&mut hub, 1, PeerId::Uid(1), 1, t0);
        slot(&mut hub, 2, PeerId::Uid(2), 1, t0);
        let (mut modest, mut greedy, mut asked, mut late) = (0, 0, 0, 0);
        for tick in 0..600u64 {
            let now = t0 + Duration::from_millis(100 * tick);
            // Block arrivals in this tick.
            if tick * 100 / 640 != (tick + 1) * 100 / 640 || tick == 0 {
                intake(&mut hub, 2500, now);
            }
            if hub.slots[&2].want == 0 {
                ask(&mut hub, 2, 255, now);
            }
            // The modest client's previous request must have been met
            // within its tick.
            if hub.slots[&1].want > 0 {
                late += 1;
            }
            ask(&mut hub, 1, 64, now);
            asked += 64;
            for _ in 0..20 {
                hub.distribute(now);
                modest += drain(&mut hub, 1);
                greedy += drain(&mut hub, 2);
                if hub.slots[&2].want == 0 {
                    ask(&mut hub, 2, 255, now);
                }
            }
            books(&hub);
        }
        // After the first second (no credit yet), every request was met at
        // once.
        assert!(late <= 10, "{late} late requests");
        assert!(modest + 64 * 10 >= asked, "modest got {modest} of {asked}");
        // The greedy client took the rest, nothing was lost.
        let released = 2500 * (600 * 100 / 640 + 1);
        assert!(greedy > 0);
        assert_eq!(modest + greedy + hub.pool.len(), released);
    }

    #[test]
    fn greedy_clients_split_evenly_and_weights_count() {
        let t0 = Instant::now();
        let mut hub = Hub::default();
        slot(&mut hub, 1, PeerId::Uid(1), 1, t0);
        slot(&mut hub, 2, PeerId::Uid(2), 1, t0);
        slot(&mut hub, 3, PeerId::Uid(3), 2, t0);
        let mut got = [0usize; 4];
        for tick in 0..200u64 {
            let now = t0 + Duration::from_millis(10 * tick);
            intake(&mut hub, 400, now);
            for _ in 0..50 {
                for id in 1..=3 {
                    if hub.slots[&id].want == 0 {
                        ask(&mut hub, id, 255, now);
                    }
                }
                hub.distribute(now);
                for id in 1..=3 {
                    got[id as usize] += drain(&mut hub, id);
                }
            }
            books(&hub);
        }
        // Shares 1:1:2 of 80,000 bytes, within a turn or two of credit.
        let total: usize = got.iter().sum();
        assert!(total + hub.pool.len() == 80_000);
        for (id, part) in [(1, 0.25), (2, 0.25), (3, 0.5)] {
            let share = got[id] as f64 / total as f64;
            assert!(
                (share - part).abs() < 0.03,
                "client {id}: {share:.3} {got:?}"
            );
        }
    }

    #[test]
    fn accounts_are_capped_and_what_they_cannot_take_is_free() {
        let t0 = Instant::now();
        let mut hub = Hub::default();
        slot(&mut hub, 1, PeerId::Uid(1), 1, t0);
        slot(&mut hub, 2, PeerId::Uid(2), 1, t0);
        // Nobody asks: after a second of ~4 kB/s, the accounts are full at
        // their caps (about one second of each one's share of the rate, at
        // least MIN_CREDIT_CAP) and the rest is free.
        for tick in 0..10u64 {
            intake(&mut hub, 400, t0 + Duration::from_millis(100 * tick));
        }
        books(&hub);
        let c1 = hub.slots[&1].credit / SCALE;
        assert_eq!(c1, hub.slots[&2].credit / SCALE);
        let rate = hub.rate;
        let cap = (rate / 2.0).max(MIN_CREDIT_CAP as f64);
        assert!(
            (c1 as f64 - cap).abs() <= 1.0,
            "credit {c1}, cap {cap} at {rate:.0} B/s"
        );
        assert!(
            hub.free() / SCALE + 2 * c1 + 2 >= 4000,
            "free {}, credit {c1} each",
            hub.free() / SCALE
        );
        // A client gone quiet past the window loses its credit at the next
        // intake; its peer's account refills, up to the (new) cap.
        let later = t0 + ACTIVE_WINDOW + Duration::from_secs(2);
        hub.slots.get_mut(&2).unwrap().last_active = later;
        intake(&mut hub, 400, later);
        assert_eq!(hub.slots[&1].credit, 0);
        assert!(hub.slots[&2].credit > 0);
        books(&hub);
        // A client's allowance is its credit and the free bytes.
        let s1 = &hub.slots[&1];
        assert_eq!(hub.allowance(s1) as u64, hub.free() / SCALE);
    }

    #[test]
    fn withdrawal_and_departures_keep_the_credit_books() {
        let t0 = Instant::now();
        let mut hub = Hub::default();
        for id in 1..=3 {
            slot(&mut hub, id, PeerId::Uid(id as u32), 1, t0);
        }
        intake(&mut hub, 3000, t0);
        books(&hub);
        let before: Vec<u64> = (1..=3).map(|id| hub.slots[&id].credit).collect();
        assert!(before.iter().all(|&c| c > 0));
        // Most of the pool withdrawn: the accounts shrink in proportion.
        hub.pool.discard_front(2900);
        hub.fit_credit();
        books(&hub);
        assert!(hub.claimed <= 100 * SCALE);
        // A departure frees its credit.
        let c2 = hub.slots[&2].credit;
        let free = hub.free();
        assert!(hub.remove(2));
        assert!(!hub.remove(2), "removing twice");
        assert_eq!(hub.free(), free + c2);
        books(&hub);
        assert_eq!(hub.peers.get(&PeerId::Uid(2)), None);
    }

    fn peer(id: PeerId) -> PeerInfo {
        PeerInfo {
            id,
            label: format!("{id:?}"),
            listener: "tcp",
            ip: match id {
                PeerId::Ip(ip) | PeerId::Local(ip, _) => Some(ip),
                _ => None,
            },
            gid: None,
            subject: None,
            share: 1,
        }
    }

    #[test]
    fn admission_caps_peers_and_reclaims_only_from_bigger_ones() {
        let now = Instant::now();
        let a = PeerId::Ip("10.0.0.1".parse().unwrap());
        let b = PeerId::Ip("10.0.0.2".parse().unwrap());
        let c = PeerId::Local("127.0.0.1".parse().unwrap(), 1000);
        let adm = Admission {
            max_clients: 4,
            max_per_peer: 3,
            ..Admission::default()
        };
        let mut hub = Hub::default();
        let admit = |hub: &mut Hub, p: PeerId, at: u64| {
            hub.admit(&adm, &peer(p), None, now + Duration::from_millis(at))
        };
        // `a` takes three slots and is then at its cap.
        for at in 0..3 {
            assert!(matches!(admit(&mut hub, a, at), Ok((_, None))));
        }
        assert_eq!(admit(&mut hub, a, 3), Err(Refusal::PeerCap));
        // `b` takes the last slot; the next `b` (holding 1, `a` 3: a
        // difference of 2) reclaims `a`'s longest-idle connection, id 1.
        assert!(matches!(admit(&mut hub, b, 4), Ok((_, None))));
        // A connection with a request pending is never reclaimed.
        hub.slots.get_mut(&1).unwrap().pending = 1;
        let (_, reclaimed) = admit(&mut hub, b, 5).unwrap();
        assert_eq!(reclaimed, Some(2));
        assert!(hub.slots.contains_key(&1));
        assert_eq!(hub.peers[&a], 2);
        assert_eq!(hub.peers[&b], 2);
        // Nobody holds two more than `b` now: refused, nothing taken.
        assert_eq!(admit(&mut hub, b, 6), Err(Refusal::Full));
        assert_eq!(hub.slots.len(), 4);
        // `c` holds none: the longest-idle idle connection of the biggest
        // peers (`a` and `b`, two each) goes: `a`'s id 3.
        assert_eq!(admit(&mut hub, c, 7), Ok((6, Some(3))));
        assert_eq!(hub.slots.len(), 4);
        assert_eq!((hub.peers[&a], hub.peers[&b], hub.peers[&c]), (1, 2, 1));
        // `c` again: `b` holds 2 = 1 + 1 more, not 2 more: refused.
        assert_eq!(admit(&mut hub, c, 8), Err(Refusal::Full));
        // Allow-lists come first.
        let only_b = Admission {
            allow_nets: vec!["10.0.0.2/32".parse().unwrap()],
            ..adm.clone()
        };
        assert_eq!(
            hub.admit(&only_b, &peer(a), None, now).map(|_| ()),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn wait_quantiles_are_within_a_bucket() {
        let mut w = Waits::default();
        assert_eq!(w.quantile(0.5), None);
        for ms in 1..=100u64 {
            w.record(Duration::from_millis(ms));
        }
        w.record(Duration::ZERO);
        w.record(Duration::from_secs(100_000));
        assert_eq!(w.count(), 102);
        for (q, want) in [(0.5, 50.0), (0.9, 91.0), (0.98, 99.0)] {
            let got = w.quantile(q).unwrap().as_secs_f64() * 1000.0;
            assert!(got >= want && got <= want * 1.19 + 0.01, "q{q}: {got} ms");
        }
        assert_eq!(w.quantile(0.0), Some(Duration::from_micros(1)));
        assert!(w.quantile(1.0).unwrap() >= Duration::from_secs(3600));
    }

    #[test]
    fn proc_net_tcp_lines_parse() {
        // The example in the kernel's Documentation/networking/proc_net_tcp:
        // 172.16.3.1:40012 to 172.16.3.3:6000 (on a little-endian host).
        let line = "  46: 010310AC:9C4C 030310AC:1770 01 00000150:00000000 \
                    01:00000019 00000000  1000        0 54165785 4 cd1e6040 25 4 27 3 -1";
        if cfg!(target_endian = "little") {
            let (local, remote, uid) = parse_tcp_table_line(line).unwrap();
            assert_eq!(local, "172.16.3.1:40012".parse().unwrap());
            assert_eq!(remote, "172.16.3.3:6000".parse().unwrap());
            assert_eq!(uid, 1000);
        }
        assert_eq!(
            parse_tcp_table_line("  sl  local_address rem_address"),
            None
        );
        assert_eq!(parse_tcp_table_line(""), None);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "current_thread")]
    async fn a_local_tcp_client_is_known_by_its_user() {
        let me = std::fs::metadata("/proc/self").unwrap().uid();
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(host).await else {
                continue; // no IPv6 here
            };
            let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (s, peer) = l.accept().await.unwrap();
            assert_eq!(peer, c.local_addr().unwrap());
            assert_eq!(
                local_peer_uid(peer, s.local_addr().unwrap()),
                Some(me),
                "{host}"
            );
        }
        // Not a peer on this host: not looked up.
        let far: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        assert_eq!(local_peer_uid(far, "192.0.2.9:8888".parse().unwrap()), None);
    }
}
