//! EGD server: verified entropy to other programs and to VMs (PROTOCOL.md §9).
//!
//! # Protocol
//!
//! Stream socket (TCP or Unix), the client speaks first, numbers are
//! big-endian:
//!
//! | command | arguments | reply |
//! |---|---|---|
//! | `0x00` entropy available | – | u32: bits in the pool (pool bytes × 8) |
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
//! closed for being slow.
//!
//! # Design
//!
//! One [`serve`] future owns the listeners, the entropy source and a *hub*:
//!
//! * **Pool.** Bytes taken from `source` but not yet given to a client, in
//!   source order. The hub takes a block from `source` only while the pool
//!   holds fewer than [`EgdConfig::pool_bytes`] bytes, or while the pool is
//!   empty and a client is waiting. When nobody wants bytes the daemon's
//!   channel fills up and the keys are not read (backpressure).
//! * **Round robin.** A client blocked in `0x02` registers how many bytes its
//!   current request still needs (its *want*, at most 255). The hub walks the
//!   waiting clients in turn and grants each at most [`CHUNK`] bytes per turn
//!   from the front of the pool, so no client can starve the others. Every
//!   byte is moved out of the pool exactly once: it is never given to two
//!   clients, and each client receives its bytes in source order.
//! * **Withdrawal.** Each block comes with how many times its key's health
//!   gate had closed when it was released. When a gate closes
//!   ([`GATE_CLOSINGS`] moves), the hub drops that key's bytes from
//!   the pool before it next grants any, and refuses blocks still on their
//!   way from before the closing ([`EgdStats::withdrawn_by_key`]).
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
//! * **Client limit.** Connections beyond [`EgdConfig::max_clients`] are
//!   accepted and closed at once (counted in [`EgdStats::rejected_clients`]).
//!
//! Not handled here: half-open TCP peers (no FIN ever arrives) keep their slot
//! until the kernel gives up on the connection; they reserve at most 255 bytes
//! and never block anyone else.
//!
//! [`serve`] returns when the source channel is closed (noticed the next time
//! the hub wants a block); the daemon can also just drop the future. Either
//! way every client connection is closed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;

use ekey_proto::keys::Serial;

use crate::driver::{GATE_CLOSINGS, GateCloses, any_gate_closed};

/// Most bytes a waiting client is granted per round-robin turn.
pub const CHUNK: usize = 32;

/// Settings of the EGD server.
#[derive(Clone, Debug)]
pub struct EgdConfig {
    /// Most clients connected at once; more are accepted and closed.
    pub max_clients: usize,
    /// Bytes per second per client (token bucket; burst is one second's
    /// worth, at least 512 bytes). `None` or `Some(0)`: unlimited.
    pub rate_limit: Option<u32>,
    /// Bound on a client's queued requests, in bytes: the queue holds
    /// `max(1, buffer_per_client / 256)` requests (each replies ≤ 256 bytes).
    pub buffer_per_client: usize,
    /// Verified bytes kept ready in the pool.
    pub pool_bytes: usize,
}

impl Default for EgdConfig {
    fn default() -> Self {
        Self {
            max_clients: 64,
            rate_limit: None,
            buffer_per_client: 4096,
            pool_bytes: 16 * 1024,
        }
    }
}

impl EgdConfig {
    fn max_pending(&self) -> usize {
        (self.buffer_per_client / 256).max(1)
    }
}

/// One connected client, for `ekey-host status`.
#[derive(Clone, Debug)]
pub struct ClientStats {
    /// Server-wide connection number.
    pub id: u64,
    /// `tcp ADDR:PORT` or `unix pid P uid U`.
    pub peer: String,
    /// Entropy bytes written to this client.
    pub bytes_served: u64,
    /// Requests read but not yet fully answered.
    pub requests_pending: usize,
    /// When it connected.
    pub connected_since: SystemTime,
}

/// Counters of the EGD server, for `ekey-host status`.
#[derive(Clone, Debug, Default)]
pub struct EgdStats {
    /// The clients connected now.
    pub clients: Vec<ClientStats>,
    /// Entropy bytes written to all clients.
    pub total_served: u64,
    /// Clients accepted (not counting rejected ones).
    pub total_clients: u64,
    /// Connections closed at once because `max_clients` were connected.
    pub rejected_clients: u64,
    /// Clients closed for an unknown command or a truncated request.
    pub closed_for_protocol_errors: u64,
    /// Entropy bytes written to clients, by the key they came from.
    pub served_by_key: BTreeMap<Serial, u64>,
    /// Bytes withdrawn from the pool (or refused on the way in) because
    /// their key's health gate closed after they were released, by key.
    pub withdrawn_by_key: BTreeMap<Serial, u64>,
}

/// A verified block for the pool, the key it came from, and how many times
/// that key's health gate had closed when the block was released.
pub type SourceBlock = ([u8; 32], Serial, u64);

/// A byte queue [`Runs::withdraw`] can cut runs out of.
pub(crate) trait ByteQueue {
    /// Removes `n` bytes from `at` on (wiping them where it can).
    fn remove_range(&mut self, at: usize, n: usize);
}

impl ByteQueue for VecDeque<u8> {
    fn remove_range(&mut self, at: usize, n: usize) {
        let end = (at + n).min(self.len());
        for b in self.range_mut(at.min(end)..end) {
            *b = 0;
        }
        self.drain(at.min(end)..end);
    }
}

impl ByteQueue for Vec<u8> {
    fn remove_range(&mut self, at: usize, n: usize) {
        let end = (at + n).min(self.len());
        self[at.min(end)..end].fill(0);
        self.drain(at.min(end)..end);
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
        json!({
            "clients": self.clients.iter().map(|c| json!({
                "peer": c.peer,
                "bytes_served": c.bytes_served,
                "requests_pending": c.requests_pending,
                "connected_seconds": now
                    .duration_since(c.connected_since)
                    .map_or(0, |d| d.as_secs()),
            })).collect::<Vec<_>>(),
            "total_served": self.total_served,
            "total_clients": self.total_clients,
            "rejected_clients": self.rejected_clients,
            "closed_for_protocol_errors": self.closed_for_protocol_errors,
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
    Unix(UnixListener),
}

enum Conn {
    Tcp(TcpStream, String),
    Unix(UnixStream, String),
}

impl EgdListener {
    fn poll_accept(&self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<Conn>> {
        match self {
            Self::Tcp(l) => l.poll_accept(cx).map_ok(|(s, a)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s, format!("tcp {a}"))
            }),
            Self::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| {
                let peer = match s.peer_cred() {
                    Ok(c) => match c.pid() {
                        Some(pid) => format!("unix pid {pid} uid {}", c.uid()),
                        None => format!("unix uid {}", c.uid()),
                    },
                    Err(_) => "unix".to_string(),
                };
                Conn::Unix(s, peer)
            }),
        }
    }
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
    let ctx = Arc::new(Ctx {
        config,
        hub: Mutex::new(Hub::default()),
        hub_wake: Notify::new(),
        stats,
        closes,
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
}

#[derive(Default)]
struct Hub {
    /// Bytes from the source not yet granted, oldest first.
    pool: VecDeque<u8>,
    /// The keys the pool's bytes came from.
    pool_keys: Runs,
    slots: HashMap<u64, Slot>,
    /// Clients with `want > 0`, in round-robin order.
    waiters: VecDeque<u64>,
    active: usize,
    next_id: u64,
    /// [`GATE_CLOSINGS`] when the pool was last checked for bytes to
    /// withdraw.
    closings_seen: u64,
    /// For each key with bytes in the pool: how many times its gate had
    /// closed when they were released (all the same: older ones are
    /// withdrawn before newer ones go in).
    pool_epoch: HashMap<Serial, u64>,
}

struct Slot {
    /// Bytes the current blocking request still needs granted.
    want: usize,
    /// Granted, not yet written to the socket.
    granted: VecDeque<u8>,
    /// The keys the granted bytes came from.
    granted_keys: Runs,
    wake: Arc<Notify>,
    bucket: Option<TokenBucket>,
}

impl Hub {
    /// Forgets a client; bytes granted to it but not written go back to the
    /// front of the pool.
    fn remove(&mut self, id: u64) {
        self.waiters.retain(|&w| w != id);
        if let Some(mut slot) = self.slots.remove(&id) {
            let len = slot.granted.len();
            self.pool_keys
                .extend_front(slot.granted_keys.take_front(len));
            for b in slot.granted.into_iter().rev() {
                self.pool.push_front(b);
            }
        }
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
        let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
        for (key, n) in removed {
            self.pool_epoch.remove(&key);
            *stats.withdrawn_by_key.entry(key).or_default() += n as u64;
        }
    }

    /// Takes a block from the source into the pool, unless its key's gate
    /// closed after it was released.
    fn take_in(&mut self, block: SourceBlock, closes: &GateCloses, stats: &Mutex<EgdStats>) {
        let (data, key, epoch) = block;
        self.withdraw_closed(closes, stats);
        if any_gate_closed() && epoch < closes(&key) {
            let mut stats = stats.lock().unwrap_or_else(|p| p.into_inner());
            *stats.withdrawn_by_key.entry(key).or_default() += data.len() as u64;
            return;
        }
        self.pool.extend(data);
        self.pool_keys.push_back(key, data.len());
        self.pool_epoch.insert(key, epoch);
    }

    fn need_source(&self, pool_bytes: usize) -> bool {
        self.pool.len() < pool_bytes || (self.pool.is_empty() && !self.waiters.is_empty())
    }

    /// Grants pool bytes to waiting clients, round robin, at most [`CHUNK`]
    /// per turn. Returns when a rate-limited waiter will have tokens again.
    fn distribute(&mut self, now: Instant) -> Option<Instant> {
        let mut wake: Option<Instant> = None;
        let mut idle = 0;
        while !self.pool.is_empty() && idle < self.waiters.len() {
            let Some(id) = self.waiters.pop_front() else {
                break;
            };
            let Some(slot) = self.slots.get_mut(&id) else {
                continue;
            };
            if slot.want == 0 {
                continue;
            }
            let turn = CHUNK.min(slot.want);
            if let Some(b) = &mut slot.bucket {
                b.refill(now);
                if b.available() < turn {
                    let at = b.when(turn);
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                    self.waiters.push_back(id);
                    idle += 1;
                    continue;
                }
            }
            let n = turn.min(self.pool.len());
            slot.granted.extend(self.pool.drain(..n));
            slot.granted_keys.extend_back(self.pool_keys.take_front(n));
            slot.want -= n;
            if let Some(b) = &mut slot.bucket {
                b.take(n);
            }
            slot.wake.notify_one();
            if slot.want > 0 {
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

/// Moves blocks from the source into the pool and grants them to waiting
/// clients. Returns when the source is closed.
async fn run_hub(ctx: &Ctx, source: &mut mpsc::Receiver<SourceBlock>) {
    loop {
        let (need, wake) = {
            let mut hub = ctx.hub();
            hub.withdraw_closed(&ctx.closes, &ctx.stats);
            let wake = hub.distribute(Instant::now());
            (hub.need_source(ctx.config.pool_bytes), wake)
        };
        let sleep = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now));
        tokio::select! {
            biased;
            () = ctx.hub_wake.notified() => {}
            block = source.recv(), if need => match block {
                Some(block) => ctx.hub().take_in(block, &ctx.closes, &ctx.stats),
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
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            conn = poll_fn(|cx| {
                for l in listeners {
                    if let Poll::Ready(r) = l.poll_accept(cx) {
                        return Poll::Ready(r);
                    }
                }
                Poll::Pending
            }) => conn,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let conn = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors and the like: wait a little, go on.
                tracing::warn!("EGD accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(client) = Client::register(ctx, &conn) else {
            ctx.stats().rejected_clients += 1;
            continue; // dropping `conn` closes it
        };
        match conn {
            Conn::Tcp(s, _) => tasks.spawn(client.run(s)),
            Conn::Unix(s, _) => tasks.spawn(client.run(s)),
        };
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
}

impl Client {
    /// Registers a new client, or `None` if `max_clients` are connected.
    fn register(ctx: &Arc<Ctx>, conn: &Conn) -> Option<Self> {
        let wake = Arc::new(Notify::new());
        let id = {
            let mut hub = ctx.hub();
            if hub.active >= ctx.config.max_clients {
                return None;
            }
            hub.active += 1;
            hub.next_id += 1;
            let id = hub.next_id;
            let slot = Slot {
                want: 0,
                granted: VecDeque::new(),
                granted_keys: Runs::default(),
                wake: wake.clone(),
                bucket: ctx.bucket(),
            };
            hub.slots.insert(id, slot);
            id
        };
        let peer = match conn {
            Conn::Tcp(_, p) | Conn::Unix(_, p) => p.clone(),
        };
        tracing::debug!("EGD client {id} connected: {peer}");
        let mut stats = ctx.stats();
        stats.total_clients += 1;
        stats.clients.push(ClientStats {
            id,
            peer,
            bytes_served: 0,
            requests_pending: 0,
            connected_since: SystemTime::now(),
        });
        Some(Self {
            ctx: ctx.clone(),
            id,
            wake,
        })
    }

    async fn run<S: AsyncRead + AsyncWrite + Send + 'static>(self, stream: S) {
        let (rd, mut wr) = tokio::io::split(stream);
        let (tx, mut rx) = mpsc::channel(self.ctx.config.max_pending());
        let reader = self.read_requests(BufReader::with_capacity(256, rd), tx);
        let writer = self.write_replies(&mut wr, &mut rx);
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => match end {
                // Half-closed: answer what was asked, then go.
                Ok(()) => {
                    let _ = writer.await;
                }
                Err(ReadEnd::Io) => {}
                Err(ReadEnd::Protocol) => {
                    tracing::debug!("EGD client {}: protocol error, closing", self.id);
                    self.ctx.stats().closed_for_protocol_errors += 1;
                }
            },
            _ = &mut writer => {}
        }
    }

    async fn read_requests<R: AsyncRead + Unpin>(
        &self,
        mut rd: R,
        tx: mpsc::Sender<Request>,
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
            if let Some(c) = self.ctx.stats().client(self.id) {
                c.requests_pending += 1;
            }
            // Blocks while the queue is full: the client is not read until
            // it has been answered.
            if tx.send(req).await.is_err() {
                return Ok(());
            }
        }
    }

    async fn write_replies<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        rx: &mut mpsc::Receiver<Request>,
    ) -> io::Result<()> {
        while let Some(req) = rx.recv().await {
            match req {
                Request::Available => {
                    let bits = self.ctx.hub().pool.len().saturating_mul(8);
                    let bits = u32::try_from(bits).unwrap_or(u32::MAX);
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
            if let Some(c) = self.ctx.stats().client(self.id) {
                c.requests_pending = c.requests_pending.saturating_sub(1);
            }
        }
        Ok(())
    }

    /// Non-blocking read: moves up to `n` pool bytes (and tokens) to this
    /// client's granted bytes; returns how many.
    fn take_now(&self, n: usize) -> usize {
        let count = {
            let mut hub = self.ctx.hub();
            let hub = &mut *hub;
            hub.withdraw_closed(&self.ctx.closes, &self.ctx.stats);
            let Some(slot) = hub.slots.get_mut(&self.id) else {
                return 0;
            };
            let mut count = n.min(hub.pool.len());
            if let Some(b) = &mut slot.bucket {
                b.refill(Instant::now());
                count = count.min(b.available());
                b.take(count);
            }
            slot.granted.extend(hub.pool.drain(..count));
            slot.granted_keys
                .extend_back(hub.pool_keys.take_front(count));
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
                for (dst, src) in buf.iter_mut().zip(slot.granted.iter().take(k)) {
                    *dst = *src;
                }
                k
            };
            if ready == 0 {
                self.wake.notified().await;
                continue;
            }
            let written = wr.write(&buf[..ready]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let keys = match self.ctx.hub().slots.get_mut(&self.id) {
                Some(slot) => {
                    slot.granted.drain(..written);
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
        {
            let mut hub = self.ctx.hub();
            hub.active -= 1;
            hub.remove(self.id);
        }
        self.ctx.hub_wake.notify_one();
        self.ctx.stats().clients.retain(|c| c.id != self.id);
        tracing::debug!("EGD client {} disconnected", self.id);
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

    const T: Duration = Duration::from_secs(5);

    /// Block `i` from a key whose serial says whether `i` is odd (so the
    /// test can tell which key each served byte came from).
    fn src(i: u64) -> SourceBlock {
        (block(i), key_of(i), 0)
    }

    /// Keys whose gate never closed.
    fn never_closed() -> GateCloses {
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
    fn block_numbers(bytes: &[u8]) -> Vec<u64> {
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
        let mut q: VecDeque<u8> = (0..96u8).collect();
        let mut runs = Runs::default();
        runs.push_back(a, 32);
        runs.push_back(b, 32);
        runs.push_back(a, 32);
        let removed = runs.withdraw(&mut q, |k| *k == a);
        assert_eq!(removed, vec![(a, 32), (a, 32)]);
        assert_eq!(q, (32..64u8).collect::<VecDeque<u8>>());
        assert_eq!(runs.take_front(100), vec![(b, 32)]);

        let mut v: Vec<u8> = (0..96u8).collect();
        let mut runs = Runs::default();
        runs.push_back(b, 40);
        runs.push_back(a, 16);
        runs.push_back(b, 40);
        let removed = runs.withdraw(&mut v, |k| *k == a);
        assert_eq!(removed, vec![(a, 16)]);
        assert_eq!(v, (0..40u8).chain(56..96).collect::<Vec<u8>>());
        // Nothing of the key: nothing moves.
        assert!(runs.withdraw(&mut v, |k| *k == a).is_empty());
        assert_eq!(v.len(), 80);
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
            max_clients: 2,
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
            hub.slots.insert(
                id,
                Slot {
                    want: 100,
                    granted: VecDeque::new(),
                    granted_keys: Runs::default(),
                    wake: Arc::new(Notify::new()),
                    bucket: None,
                },
            );
            hub.waiters.push_back(id);
        }
        hub.pool.extend(0..=255u8);
        hub.pool.extend(0..100u8);
        let now = Instant::now();
        assert_eq!(hub.distribute(now), None);
        // Chunks of 32 in turn: 1 gets 0..32, 2 gets 32..64, 3 gets 64..96, ...
        let g1: Vec<u8> = hub.slots[&1].granted.iter().copied().collect();
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
        hub.slots.insert(
            1,
            Slot {
                want: 64,
                granted: VecDeque::new(),
                granted_keys: Runs::default(),
                wake: Arc::new(Notify::new()),
                bucket: Some(bucket),
            },
        );
        hub.waiters.push_back(1);
        hub.pool.extend([0u8; 64]);
        let wake = hub.distribute(now).expect("a wake-up time");
        let ms = (wake - now).as_millis();
        assert!((32..=34).contains(&ms), "{ms} ms");
        assert_eq!(hub.pool.len(), 64);
        hub.distribute(wake);
        assert_eq!(hub.slots[&1].granted.len(), 32);
        assert_eq!(hub.pool.len(), 32);
    }
}
