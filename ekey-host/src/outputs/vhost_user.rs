//! vhost-user-rng: the key's bytes straight into a guest's virtqueue.
//!
//! With `-device vhost-user-rng-pci`, QEMU hands the virtio-rng request
//! queue of a guest to a backend process over a vhost-user socket; the
//! guest's memory is shared with the backend (a `memory-backend-memfd` with
//! `share=on`), and the backend writes the random bytes into the guest's
//! buffers itself. This module is that backend, built on rust-vmm's crates
//! (`vhost-user-backend` speaks the protocol; `virtio-queue` walks the
//! rings; `vm-memory` maps and bounds-checks guest memory).
//!
//! Each guest is one client of the EGD hub: a [`Connector`] opens an
//! in-process EGD connection for it, and the backend asks that connection
//! for bytes with EGD's blocking read (`0x02 n`), as many as the guest's
//! held buffers want. So a vhost-user guest gets the same shares, rate
//! limits and withdrawal as any EGD client, and waits (its buffers held,
//! not completed) while the hub has nothing for it. Nothing is made up.
//!
//! Threads and tasks, per guest connection:
//! - `vhost-user-backend`'s request thread (the protocol) and its vring
//!   worker thread (kicks). A kick pops the guest's new buffers, checks
//!   them, and queues them; it never waits for entropy.
//! - a tokio task (the feeder) that talks EGD to the hub and, as bytes
//!   arrive, writes them into the oldest held buffers, marks them used and
//!   signals the guest.
//!
//! When QEMU disconnects (quits, is killed), the feeder is stopped, which
//! drops its EGD connection (the hub frees the slot), and the socket is
//! served again.
//!
//! Guest descriptors are untrusted: a buffer must be device-writable,
//! non-empty, inside guest memory, and its chain well formed; anything else
//! is rejected (completed with 0 bytes, in order) and counted. A request is
//! filled with at most [`MAX_REQUEST`] bytes. Every write goes through
//! `vm-memory`, which checks it against the guest's regions.
//!
//! When QEMU stops the ring (`GET_VRING_BASE`: the VM paused, the driver
//! unloaded, a migration), the held buffers are given back: the ring's
//! next-available index is moved back over them, so a restarted ring offers
//! them again. Completing them with 0 bytes instead would hang Linux's
//! virtio-rng driver, which takes a 0-byte completion for "cancelled,
//! still queued" and waits for that buffer forever.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::runtime::Handle;
use tokio::sync::Notify;
use tracing::{debug, info, warn};
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic,
    GuestMemoryMmap, Permissions,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use zeroize::Zeroize;

use crate::wipe::WipeQueue;

/// The most bytes one guest request is filled with; a longer buffer gets
/// this many (the used length says so).
pub const MAX_REQUEST: usize = 4096;

/// The most descriptors a chain may have (an indirect table may hold
/// 65535: following them all for every buffer would let a guest spend the
/// vring thread's time).
pub const MAX_DESCRIPTORS: usize = 256;

/// The largest queue offered to QEMU (QEMU 7.2's vhost-user-rng uses 4).
const QUEUE_SIZE: usize = 1024;

/// The most bytes asked of the hub and not yet received.
const MAX_ASKED: usize = 8192;

/// EGD's largest blocking read.
const EGD_MAX_READ: usize = 255;

/// EGD's blocking read command.
const EGD_READ_BLOCKING: u8 = 0x02;

/// How long to wait before asking the hub again after it refused or closed.
const HUB_RETRY: Duration = Duration::from_secs(1);

/// How long to wait after a failed accept before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// How often `--vhost-user-rng-dir` looks for new sockets.
const DIR_POLL: Duration = Duration::from_millis(500);

/// How often a socket that refused a connection (a stale one: its QEMU is
/// gone) is tried again when it has not been replaced.
const STALE_RETRY: Duration = Duration::from_secs(5);

/// How many of a guest's latest waits the percentiles are taken over.
const WAIT_SAMPLES: usize = 1024;

/// Opens an EGD connection into the hub for the guest named `name`.
pub trait Connector: Send + Sync + 'static {
    /// An EGD connection, or `None` if the hub refused (full). The backend
    /// holds the guest's requests and asks again a second later.
    fn connect(&self, name: &str) -> Option<DuplexStream>;
}

/// The statistics, shared between the backends and `status`.
pub type SharedStats = Arc<Mutex<VhostUserStats>>;

/// Why a guest's buffer was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    /// A descriptor the device may not write (virtio-rng buffers are
    /// device-writable).
    ReadOnly,
    /// A descriptor of 0 bytes.
    ZeroLength,
    /// A descriptor reaching outside guest memory.
    OutsideMemory,
    /// A chain that cannot be followed: no descriptor, a loop, a `next`
    /// beyond the table, a bad indirect table.
    BrokenChain,
    /// A chain of more than [`MAX_DESCRIPTORS`] descriptors.
    TooManyDescriptors,
}

/// Rejected buffers, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BadCounts {
    /// See [`Bad::ReadOnly`].
    pub read_only: u64,
    /// See [`Bad::ZeroLength`].
    pub zero_length: u64,
    /// See [`Bad::OutsideMemory`].
    pub outside_memory: u64,
    /// See [`Bad::BrokenChain`].
    pub broken_chain: u64,
    /// See [`Bad::TooManyDescriptors`].
    pub too_many_descriptors: u64,
    /// Times the available ring could not be read (an index the guest
    /// moved too far, a ring outside memory).
    pub bad_avail_ring: u64,
    /// Buffers whose write failed although they had passed the checks (the
    /// guest's memory map changed under them).
    pub write_failed: u64,
}

impl BadCounts {
    fn count(&mut self, bad: Bad) {
        match bad {
            Bad::ReadOnly => self.read_only += 1,
            Bad::ZeroLength => self.zero_length += 1,
            Bad::OutsideMemory => self.outside_memory += 1,
            Bad::BrokenChain => self.broken_chain += 1,
            Bad::TooManyDescriptors => self.too_many_descriptors += 1,
        }
    }

    fn add(&mut self, o: &BadCounts) {
        self.read_only += o.read_only;
        self.zero_length += o.zero_length;
        self.outside_memory += o.outside_memory;
        self.broken_chain += o.broken_chain;
        self.too_many_descriptors += o.too_many_descriptors;
        self.bad_avail_ring += o.bad_avail_ring;
        self.write_failed += o.write_failed;
    }

    /// All rejections.
    pub fn total(&self) -> u64 {
        self.read_only
            + self.zero_length
            + self.outside_memory
            + self.broken_chain
            + self.too_many_descriptors
            + self.bad_avail_ring
            + self.write_failed
    }
}

/// Who opens the vhost-user connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `--vhost-user-rng PATH`: the daemon listens on the socket, QEMU
    /// connects (`-chardev socket,path=PATH`).
    Listen,
    /// `--vhost-user-rng-dir DIR`: QEMU listens (`-chardev
    /// socket,path=DIR/NAME.sock,server=on`), the daemon connects.
    Connect,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Listen => "listen",
            Role::Connect => "connect",
        }
    }
}

/// One vhost-user guest's counters.
#[derive(Clone, Debug)]
pub struct GuestStats {
    /// The guest's name (the hub knows its EGD client by it).
    pub name: String,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Who opens the connection.
    pub role: Role,
    /// Whether QEMU is connected now.
    pub connected: bool,
    /// vhost-user connections so far.
    pub connections: u64,
    /// Whether the guest's EGD connection to the hub is open now.
    pub hub_connected: bool,
    /// Times the hub refused an EGD connection (full).
    pub hub_refusals: u64,
    /// Bytes written into the guest's buffers.
    pub bytes_served: u64,
    /// Buffers filled and completed.
    pub requests_served: u64,
    /// Buffers held now, waiting for bytes.
    pub requests_pending: usize,
    /// The bytes those buffers want.
    pub bytes_pending: usize,
    /// Buffers longer than [`MAX_REQUEST`] (filled with that many).
    pub requests_capped: u64,
    /// Held buffers given back to the ring when QEMU stopped it.
    pub requests_returned: u64,
    /// Rejected buffers, by kind.
    pub rejected: BadCounts,
    /// The last problem seen (connecting, the hub, the protocol).
    pub last_error: Option<String>,
    /// The latest waits (from the kick that brought a buffer to its
    /// completion), at most [`WAIT_SAMPLES`].
    waits: VecDeque<Duration>,
}

impl GuestStats {
    fn new(name: &str, socket: &Path, role: Role) -> Self {
        Self {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            role,
            connected: false,
            connections: 0,
            hub_connected: false,
            hub_refusals: 0,
            bytes_served: 0,
            requests_served: 0,
            requests_pending: 0,
            bytes_pending: 0,
            requests_capped: 0,
            requests_returned: 0,
            rejected: BadCounts::default(),
            last_error: None,
            waits: VecDeque::new(),
        }
    }

    fn record_wait(&mut self, wait: Duration) {
        if self.waits.len() == WAIT_SAMPLES {
            self.waits.pop_front();
        }
        self.waits.push_back(wait);
    }

    /// The `p`-th percentile (0..=100) of the latest waits, if any.
    pub fn wait_percentile(&self, p: f64) -> Option<Duration> {
        if self.waits.is_empty() {
            return None;
        }
        let mut w: Vec<Duration> = self.waits.iter().copied().collect();
        w.sort_unstable();
        let rank = (p.clamp(0.0, 100.0) / 100.0 * (w.len() - 1) as f64).round() as usize;
        w.get(rank).copied()
    }

    /// The counters as JSON (waits in milliseconds).
    pub fn to_json(&self) -> Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        json!({
            "name": self.name,
            "socket": self.socket.display().to_string(),
            "role": self.role.as_str(),
            "connected": self.connected,
            "connections": self.connections,
            "hub_connected": self.hub_connected,
            "hub_refusals": self.hub_refusals,
            "bytes_served": self.bytes_served,
            "requests_served": self.requests_served,
            "requests_pending": self.requests_pending,
            "bytes_pending": self.bytes_pending,
            "requests_capped": self.requests_capped,
            "requests_returned": self.requests_returned,
            "rejected": {
                "read_only": self.rejected.read_only,
                "zero_length": self.rejected.zero_length,
                "outside_memory": self.rejected.outside_memory,
                "broken_chain": self.rejected.broken_chain,
                "too_many_descriptors": self.rejected.too_many_descriptors,
                "bad_avail_ring": self.rejected.bad_avail_ring,
                "write_failed": self.rejected.write_failed,
                "total": self.rejected.total(),
            },
            "wait_p50_ms": ms(self.wait_percentile(50.0)),
            "wait_p99_ms": ms(self.wait_percentile(99.0)),
            "last_error": self.last_error,
        })
    }
}

/// The vhost-user guests' counters, one entry per socket (kept after the
/// guest leaves, so the books add up).
#[derive(Clone, Debug, Default)]
pub struct VhostUserStats {
    /// The guests, in the order their sockets were first seen.
    pub guests: Vec<GuestStats>,
}

impl VhostUserStats {
    /// The guest on `socket`, if known.
    pub fn guest(&self, socket: &Path) -> Option<&GuestStats> {
        self.guests.iter().find(|g| g.socket == socket)
    }

    /// The guest on `socket`, added if new.
    fn entry(&mut self, name: &str, socket: &Path, role: Role) -> &mut GuestStats {
        let i = match self.guests.iter().position(|g| g.socket == socket) {
            Some(i) => i,
            None => {
                self.guests.push(GuestStats::new(name, socket, role));
                self.guests.len() - 1
            }
        };
        &mut self.guests[i]
    }

    /// Everything as JSON: `{"guests": [...], "bytes_served": N, ...}`.
    pub fn to_json(&self) -> Value {
        json!({
            "guests": self.guests.iter().map(GuestStats::to_json).collect::<Vec<_>>(),
            "connected": self.guests.iter().filter(|g| g.connected).count(),
            "bytes_served": self.guests.iter().map(|g| g.bytes_served).sum::<u64>(),
            "requests_pending": self.guests.iter().map(|g| g.requests_pending).sum::<usize>(),
        })
    }
}

/// Locks `m`, taking the data of a poisoned lock as it is (every critical
/// section here leaves its data consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest buffer that passed the checks: where its bytes go.
#[derive(Debug)]
struct Request {
    /// The chain's head (what `add_used` names).
    head: u16,
    /// The writable pieces, in order, together at most [`MAX_REQUEST`].
    segments: Vec<(GuestAddress, usize)>,
    /// Their total.
    len: usize,
    /// When it was popped.
    since: Instant,
}

/// A popped chain, waiting for its turn to be completed.
#[derive(Debug)]
enum Entry {
    /// To be filled.
    Fill(Request),
    /// Rejected: to be completed with 0 bytes (or skipped if its head is
    /// not even an index of the table).
    Reject(u16),
}

/// Checks one chain; the request to fill, or why not (the head, and the
/// first problem found), and whether the request was capped.
fn check_chain<I>(head: u16, chain: I, mem: &impl GuestMemory) -> Result<(Request, bool), Bad>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut segments = Vec::new();
    let mut len = 0usize;
    let mut capped = false;
    let mut count = 0usize;
    let mut last_has_next = false;
    for d in chain {
        count += 1;
        if count > MAX_DESCRIPTORS {
            return Err(Bad::TooManyDescriptors);
        }
        last_has_next = d.has_next();
        if !d.is_write_only() {
            return Err(Bad::ReadOnly);
        }
        let dlen = d.len() as usize;
        if dlen == 0 {
            return Err(Bad::ZeroLength);
        }
        if !mem.check_range(d.addr(), dlen, Permissions::Write) {
            return Err(Bad::OutsideMemory);
        }
        let take = dlen.min(MAX_REQUEST - len);
        if take < dlen {
            capped = true;
        }
        if take > 0 {
            segments.push((d.addr(), take));
            len += take;
        }
    }
    // The iterator stops early, silently, on a loop, a `next` beyond the
    // table or an unreadable descriptor: the last one still says "next".
    if count == 0 || last_has_next {
        return Err(Bad::BrokenChain);
    }
    Ok((
        Request {
            head,
            segments,
            len,
            since: Instant::now(),
        },
        capped,
    ))
}

/// What one pass over the ring did.
#[derive(Debug, Default)]
struct Pass {
    /// Buffers filled and completed.
    served: u64,
    /// Bytes written into them.
    bytes: u64,
    /// Chains popped from the available ring.
    popped: u64,
    /// Buffers completed (filled or rejected): the guest is to be signalled.
    completed: u64,
    /// Capped requests popped.
    capped: u64,
    /// Rejections.
    bad: BadCounts,
    /// The filled buffers' waits.
    waits: Vec<Duration>,
}

/// The buffers held for a guest and the bytes received for them.
struct Held {
    /// Popped chains, oldest first: always the latest popped ones, so that
    /// [`Held::give_back`] can move the ring's index back over them.
    entries: VecDeque<Entry>,
    /// Bytes from the hub not yet written into a buffer.
    bytes: WipeQueue,
    /// Bytes asked of the hub and not yet received.
    asked: usize,
}

impl Held {
    fn new() -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: WipeQueue::with_capacity(MAX_REQUEST),
            asked: 0,
        }
    }

    /// Buffers waiting to be filled.
    fn pending(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e, Entry::Fill(_)))
            .count()
    }

    /// The bytes those buffers want.
    fn pending_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| match e {
                Entry::Fill(r) => r.len,
                Entry::Reject(_) => 0,
            })
            .sum()
    }

    /// The bytes to ask the hub for: what the held buffers want, less what
    /// is here or on its way.
    fn wanted(&self) -> usize {
        self.pending_bytes()
            .saturating_sub(self.bytes.len() + self.asked)
    }

    /// Pops every chain the guest made available (up to a queue's worth
    /// held), checks each, and queues it.
    fn pop_available<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M, pass: &mut Pass) {
        let limit = usize::from(queue.size()).max(1);
        let mut avail = match queue.iter(mem) {
            Ok(it) => it,
            Err(virtio_queue::Error::QueueNotReady) => return,
            Err(e) => {
                debug!("vhost-user-rng: the available ring cannot be read: {e}");
                pass.bad.bad_avail_ring += 1;
                return;
            }
        };
        while self.entries.len() < limit {
            let Some(chain) = avail.next() else { break };
            let head = chain.head_index();
            let entry = match check_chain(head, chain, mem) {
                Ok((req, capped)) => {
                    pass.capped += u64::from(capped);
                    Entry::Fill(req)
                }
                Err(bad) => {
                    pass.bad.count(bad);
                    Entry::Reject(head)
                }
            };
            self.entries.push_back(entry);
            pass.popped += 1;
        }
    }

    /// Completes, oldest first, the rejected buffers and the buffers whose
    /// bytes are here.
    fn deliver<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M, pass: &mut Pass) {
        let mut chunk = [0u8; 256];
        while let Some(front) = self.entries.front() {
            let (head, len) = match front {
                Entry::Reject(head) => (*head, 0),
                Entry::Fill(req) => {
                    if self.bytes.len() < req.len {
                        break;
                    }
                    let mut written = 0usize;
                    'segments: for &(addr, seg_len) in &req.segments {
                        let mut off = 0;
                        while off < seg_len {
                            let n = (seg_len - off).min(chunk.len());
                            let Some(at) = addr.checked_add(off as u64) else {
                                break 'segments;
                            };
                            self.bytes.copy_front(&mut chunk[..n]);
                            if mem.write_slice(&chunk[..n], at).is_err() {
                                break 'segments;
                            }
                            self.bytes.discard_front(n);
                            written += n;
                            off += n;
                        }
                    }
                    if written < req.len {
                        pass.bad.write_failed += 1;
                    } else {
                        pass.served += 1;
                        pass.waits.push(req.since.elapsed());
                    }
                    pass.bytes += written as u64;
                    // At most MAX_REQUEST.
                    (req.head, written as u32)
                }
            };
            self.entries.pop_front();
            match queue.add_used(mem, head, len) {
                Ok(()) => pass.completed += 1,
                Err(e) => debug!("vhost-user-rng: buffer {head} not completed: {e}"),
            }
        }
        chunk.zeroize();
    }

    /// One pass: pops, completes what can be, and pops again if that made
    /// room (a full hold leaves buffers in the ring).
    fn pass<M: GuestMemory>(&mut self, queue: &mut Queue, mem: &M, pass: &mut Pass) {
        self.pop_available(queue, mem, pass);
        let completed = pass.completed;
        self.deliver(queue, mem, pass);
        if pass.completed > completed {
            self.pop_available(queue, mem, pass);
            self.deliver(queue, mem, pass);
        }
    }

    /// Gives the held buffers back to the ring (see the module docs);
    /// returns how many.
    fn give_back(&mut self, queue: &mut Queue) -> usize {
        let n = self.entries.len();
        // The entries are the latest `n` popped, so the ring's index goes
        // back by `n`; u16 arithmetic wraps as the ring's does.
        queue.set_next_avail(queue.next_avail().wrapping_sub(n as u16));
        self.entries.clear();
        n
    }
}

/// One vhost-user connection's state, shared by the backend (protocol and
/// vring threads) and the feeder task.
struct Conn {
    name: String,
    socket: PathBuf,
    stats: SharedStats,
    /// The guest's memory, from `SET_MEM_TABLE`.
    mem: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// The request queue, from its first kick.
    vring: Mutex<Option<VringRwLock>>,
    /// Lock order: `held`, then the vring, then `stats`.
    held: Mutex<Held>,
    /// Tells the feeder that the held buffers want more bytes.
    wake: Notify,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    event_idx: AtomicBool,
    /// Stops the vring worker thread when the connection ends.
    exit: (EventConsumer, EventNotifier),
}

impl Conn {
    fn new(name: &str, socket: &Path, stats: SharedStats) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            stats,
            mem: Mutex::new(None),
            vring: Mutex::new(None),
            held: Mutex::new(Held::new()),
            wake: Notify::new(),
            event_idx: AtomicBool::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)?,
        }))
    }

    /// Updates this guest's counters.
    fn with_stats(&self, f: impl FnOnce(&mut GuestStats)) {
        let mut s = lock(&self.stats);
        // Role is only used when the entry is new, which it is not: the
        // spawners add it first.
        f(s.entry(&self.name, &self.socket, Role::Listen));
    }

    /// Pops and checks new buffers, completes what can be, signals the
    /// guest, and wakes the feeder if more bytes are wanted.
    fn service(&self) {
        let vring = lock(&self.vring).clone();
        let mem = lock(&self.mem).clone();
        let (Some(vring), Some(mem)) = (vring, mem) else {
            return;
        };
        let mut pass = Pass::default();
        let (pending, pending_bytes, wanted) = {
            let mut held = lock(&self.held);
            let mem = mem.memory();
            let mut state = vring.get_mut();
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            if state.is_enabled() && state.get_queue().ready() {
                let q = state.get_queue_mut();
                loop {
                    if event_idx {
                        // No kicks while the ring is being read.
                        let _ = q.disable_notification(&*mem);
                    }
                    let popped = pass.popped;
                    held.pass(q, &*mem, &mut pass);
                    // With EVENT_IDX, re-arm the kick; buffers that came
                    // meanwhile are read now (unless the hold is full:
                    // then they wait in the ring).
                    if !event_idx
                        || pass.popped == popped
                        || !q.enable_notification(&*mem).unwrap_or(false)
                    {
                        break;
                    }
                }
                if pass.completed > 0 {
                    let notify = q.needs_notification(&*mem).unwrap_or(true);
                    if notify && let Err(e) = state.signal_used_queue() {
                        debug!("vhost-user-rng {}: cannot signal the guest: {e}", self.name);
                    }
                }
            }
            (held.pending(), held.pending_bytes(), held.wanted())
        };
        self.with_stats(|g| {
            g.bytes_served += pass.bytes;
            g.requests_served += pass.served;
            g.requests_capped += pass.capped;
            g.rejected.add(&pass.bad);
            g.requests_pending = pending;
            g.bytes_pending = pending_bytes;
            for w in pass.waits.drain(..) {
                g.record_wait(w);
            }
        });
        if wanted > 0 {
            self.wake.notify_one();
        }
    }

    /// QEMU stops the ring: gives the held buffers back.
    fn stop(&self) {
        let mut held = lock(&self.held);
        let Some(vring) = lock(&self.vring).clone() else {
            held.entries.clear();
            return;
        };
        let n = held.give_back(vring.get_mut().get_queue_mut());
        drop(held);
        if n > 0 {
            debug!("vhost-user-rng {}: {n} held buffers given back", self.name);
        }
        self.with_stats(|g| {
            g.requests_returned += n as u64;
            g.requests_pending = 0;
            g.bytes_pending = 0;
        });
    }

    /// Forgets the held buffers and wipes the bytes (the device is reset
    /// or the connection is over).
    fn reset(&self) {
        let mut held = lock(&self.held);
        held.entries.clear();
        held.bytes.wipe();
        drop(held);
        self.with_stats(|g| {
            g.requests_pending = 0;
            g.bytes_pending = 0;
        });
    }

    /// The feeder: holds an EGD connection to the hub (reconnecting after
    /// a refusal or a close) and pumps bytes through it.
    async fn feed(self: Arc<Self>, connector: Arc<dyn Connector>) {
        loop {
            let Some(stream) = connector.connect(&self.name) else {
                self.with_stats(|g| {
                    g.hub_refusals += 1;
                    g.hub_connected = false;
                });
                tokio::time::sleep(HUB_RETRY).await;
                continue;
            };
            self.with_stats(|g| g.hub_connected = true);
            let why = self.pump(stream).await;
            // What was asked will not come.
            lock(&self.held).asked = 0;
            debug!("vhost-user-rng {}: hub connection lost: {why}", self.name);
            self.with_stats(|g| {
                g.hub_connected = false;
                g.last_error = Some(format!("hub: {why}"));
            });
            tokio::time::sleep(HUB_RETRY).await;
        }
    }

    /// Asks the hub for what the held buffers want and hands the bytes to
    /// them, until the hub closes; returns why it ended.
    async fn pump(&self, stream: DuplexStream) -> String {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut chunk = [0u8; 256];
        // A slow re-scan, for buffers made available while the ring was
        // disabled (no kick comes for them).
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let why = loop {
            let ask = {
                let mut held = lock(&self.held);
                let n = held
                    .wanted()
                    .min(MAX_ASKED.saturating_sub(held.asked))
                    .min(EGD_MAX_READ);
                held.asked += n;
                n
            };
            if ask > 0 {
                // `ask` is at most 255.
                if let Err(e) = wr.write_all(&[EGD_READ_BLOCKING, ask as u8]).await {
                    break e.to_string();
                }
                continue;
            }
            let asked = lock(&self.held).asked;
            let room = asked.min(chunk.len());
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tick.tick() => self.service(),
                r = rd.read(&mut chunk[..room]), if room > 0 => match r {
                    Ok(0) => break "the hub closed the connection".to_string(),
                    Err(e) => break e.to_string(),
                    Ok(n) => {
                        {
                            let mut held = lock(&self.held);
                            held.bytes.extend_from_slice(&chunk[..n]);
                            held.asked = held.asked.saturating_sub(n);
                        }
                        chunk[..n].zeroize();
                        self.service();
                    }
                },
            }
        };
        chunk.zeroize();
        why
    }
}

/// The `vhost-user-backend` side of a [`Conn`].
#[derive(Clone)]
struct RngBackend(Arc<Conn>);

impl VhostUserBackend for RngBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // QEMU 7.2's vhost-user-rng sends the guest's features as they are
        // (it filters nothing), and vhost-user-backend refuses any bit not
        // offered here: so EVENT_IDX and NOTIFY_ON_EMPTY, which QEMU's
        // virtio-pci offers every guest, must be accepted.
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.0.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *lock(&self.0.mem) = Some(mem);
        Ok(())
    }

    fn reset_device(&self) {
        self.0.reset();
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        self.0.stop();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // An error here would end the vring thread: log instead.
        if device_event != 0 || !evset.contains(EventSet::IN) {
            debug!(
                "vhost-user-rng {}: unexpected event {device_event} {evset:?}",
                self.0.name
            );
            return Ok(());
        }
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        {
            let mut v = lock(&self.0.vring);
            if v.is_none() {
                *v = Some(vring.clone());
            }
        }
        self.0.service();
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.0.exit.0.try_clone().ok()?,
            self.0.exit.1.try_clone().ok()?,
        ))
    }
}

/// A new connection's state and daemon, not yet connected.
fn new_daemon(
    name: &str,
    socket: &Path,
    stats: &SharedStats,
) -> io::Result<(Arc<Conn>, VhostUserDaemon<RngBackend>)> {
    let conn = Conn::new(name, socket, stats.clone())?;
    let daemon = VhostUserDaemon::new(
        format!("vhost-rng-{name}"),
        RngBackend(conn.clone()),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| io::Error::other(e.to_string()))?;
    Ok((conn, daemon))
}

/// Serves one connected QEMU until it goes: the feeder runs meanwhile.
fn serve_connection(
    mut daemon: VhostUserDaemon<RngBackend>,
    conn: Arc<Conn>,
    connector: &Arc<dyn Connector>,
    runtime: &Handle,
) {
    info!(
        "vhost-user-rng {}: QEMU connected on {}",
        conn.name,
        conn.socket.display()
    );
    conn.with_stats(|g| {
        g.connected = true;
        g.connections += 1;
        g.last_error = None;
    });
    let feeder = runtime.spawn(conn.clone().feed(connector.clone()));
    let result = daemon.wait();
    feeder.abort();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    // Joins the vring thread.
    drop(daemon);
    conn.reset();
    // QEMU quitting or killed shows as one of these.
    let error = match result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected
            | vhost::vhost_user::Error::PartialMessage
            | vhost::vhost_user::Error::SocketBroken(_),
        )) => None,
        Err(e) => Some(e.to_string()),
    };
    match &error {
        None => info!("vhost-user-rng {}: QEMU disconnected", conn.name),
        Some(e) => warn!("vhost-user-rng {}: connection ended: {e}", conn.name),
    }
    conn.with_stats(|g| {
        g.connected = false;
        g.hub_connected = false;
        if error.is_some() {
            g.last_error = error;
        }
    });
}

/// Serves `--vhost-user-rng PATH`: listens on `path` (replacing a stale
/// socket there, refusing to replace anything else) and serves one QEMU
/// after another as the guest `name`, each with an EGD connection from
/// `connector` while it is connected. Returns once the socket is bound;
/// the serving thread runs for the life of the process (remove the socket
/// at exit). The socket's mode follows the umask.
pub fn spawn_socket(
    path: &Path,
    name: &str,
    connector: Arc<dyn Connector>,
    stats: SharedStats,
    runtime: Handle,
) -> io::Result<JoinHandle<()>> {
    if let Ok(m) = std::fs::symlink_metadata(path)
        && !m.file_type().is_socket()
    {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        ));
    }
    let mut listener = Listener::new(path, true).map_err(|e| io::Error::other(e.to_string()))?;
    lock(&stats).entry(name, path, Role::Listen);
    let (name, path) = (name.to_string(), path.to_path_buf());
    std::thread::Builder::new()
        .name(format!("vhost-rng-{name}"))
        .spawn(move || {
            loop {
                let (conn, mut daemon) = match new_daemon(&name, &path, &stats) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!("vhost-user-rng {name}: {e}");
                        std::thread::sleep(ACCEPT_RETRY);
                        continue;
                    }
                };
                // Blocks until QEMU connects.
                if let Err(e) = daemon.start(&mut listener) {
                    warn!(
                        "vhost-user-rng {name}: accepting on {}: {e}",
                        path.display()
                    );
                    conn.with_stats(|g| g.last_error = Some(e.to_string()));
                    std::thread::sleep(ACCEPT_RETRY);
                    continue;
                }
                serve_connection(daemon, conn, &connector, &runtime);
            }
        })
}

/// A guest's name from its socket's file name: the name without a
/// `.sock` suffix; `None` for names that are not UTF-8 or are empty.
pub fn guest_name(file_name: &std::ffi::OsStr) -> Option<String> {
    let s = file_name.to_str()?;
    let s = s.strip_suffix(".sock").unwrap_or(s);
    (!s.is_empty()).then(|| s.to_string())
}

/// A socket `--vhost-user-rng-dir` could not connect to, and when.
struct Refused {
    /// The socket file's inode and change time when it refused: a new
    /// QEMU makes a new file (inode numbers alone are reused at once).
    file: (u64, i64, i64),
    /// When it refused.
    at: Instant,
    /// What the error was (logged once).
    error: String,
}

/// Serves `--vhost-user-rng-dir DIR`: every socket that appears in `dir`
/// (created by QEMU or libvirt, `-chardev socket,server=on,path=DIR/NAME.sock`)
/// is connected to and served as the guest `NAME`; when the connection
/// ends the socket is connected to again if QEMU still listens on it (a
/// stale socket left by a killed QEMU is tried again every 5 s, or at once
/// when it is replaced). Sockets are looked for every 0.5 s; QEMU waits at
/// start until the daemon connects. Returns once `dir` is checked to be a
/// directory; the watching thread runs for the life of the process.
pub fn spawn_dir(
    dir: &Path,
    connector: Arc<dyn Connector>,
    stats: SharedStats,
    runtime: Handle,
) -> io::Result<JoinHandle<()>> {
    if !std::fs::metadata(dir)?.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ));
    }
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("vhost-rng-dir".to_string())
        .spawn(move || {
            let active: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
            let mut refused: HashMap<PathBuf, Refused> = HashMap::new();
            let mut dir_error = None;
            loop {
                match std::fs::read_dir(&dir) {
                    Ok(entries) => {
                        dir_error = None;
                        let mut seen = HashSet::new();
                        for entry in entries.flatten() {
                            let path = entry.path();
                            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                                continue;
                            };
                            if !meta.file_type().is_socket() {
                                continue;
                            }
                            seen.insert(path.clone());
                            if lock(&active).contains(&path) {
                                continue;
                            }
                            if let Some(r) = refused.get(&path)
                                && r.file == (meta.ino(), meta.ctime(), meta.ctime_nsec())
                                && r.at.elapsed() < STALE_RETRY
                            {
                                continue;
                            }
                            let Some(name) = guest_name(&entry.file_name()) else {
                                continue;
                            };
                            match connect_dir_socket(&path, &name, &stats) {
                                Ok((conn, daemon)) => {
                                    refused.remove(&path);
                                    lock(&active).insert(path.clone());
                                    let (active, connector, runtime) =
                                        (active.clone(), connector.clone(), runtime.clone());
                                    let spawned = std::thread::Builder::new()
                                        .name(format!("vhost-rng-{name}"))
                                        .spawn(move || {
                                            serve_connection(daemon, conn, &connector, &runtime);
                                            lock(&active).remove(&path);
                                        });
                                    if let Err(e) = spawned {
                                        warn!("vhost-user-rng {name}: {e}");
                                    }
                                }
                                Err(e) => {
                                    let error = e.to_string();
                                    let new = refused.get(&path).is_none_or(|r| r.error != error);
                                    if new {
                                        info!(
                                            "vhost-user-rng {name}: cannot connect to {}: {error}",
                                            path.display()
                                        );
                                        lock(&stats)
                                            .entry(&name, &path, Role::Connect)
                                            .last_error = Some(error.clone());
                                    }
                                    refused.insert(
                                        path,
                                        Refused {
                                            file: (meta.ino(), meta.ctime(), meta.ctime_nsec()),
                                            at: Instant::now(),
                                            error,
                                        },
                                    );
                                }
                            }
                        }
                        refused.retain(|p, _| seen.contains(p));
                    }
                    Err(e) => {
                        let error = e.to_string();
                        if dir_error.as_ref() != Some(&error) {
                            warn!("vhost-user-rng: cannot read {}: {error}", dir.display());
                            dir_error = Some(error);
                        }
                    }
                }
                std::thread::sleep(DIR_POLL);
            }
        })
}

/// Connects to a QEMU listening on `path`, for the guest `name`.
fn connect_dir_socket(
    path: &Path,
    name: &str,
    stats: &SharedStats,
) -> io::Result<(Arc<Conn>, VhostUserDaemon<RngBackend>)> {
    let s = path
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path is not UTF-8"))?;
    lock(stats).entry(name, path, Role::Connect);
    let (conn, mut daemon) = new_daemon(name, path, stats)?;
    daemon
        .start_client(s)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok((conn, daemon))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const MEM_SIZE: usize = 0x4_0000;
    const BUF: u64 = 0x1_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory")
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// The counter pattern a fake hub sends.
    fn pattern(n: usize, from: usize) -> Vec<u8> {
        (from..from + n).map(|i| (i % 251) as u8).collect()
    }

    /// Pops and delivers once.
    fn pass(held: &mut Held, q: &mut Queue, mem: &GuestMemoryMmap) -> Pass {
        let mut p = Pass::default();
        held.pass(q, mem, &mut p);
        p
    }

    /// The used ring's entry `i`: (id, len).
    fn used(mq: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = mq.used().ring().ref_at(i).expect("used entry").load();
        (e.id(), e.len())
    }

    fn used_idx(mq: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mq.used().idx().load()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }

    #[test]
    fn a_good_chain_waits_for_bytes_then_is_filled() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[desc(BUF, 64, W, 0)], 0)
            .expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(
            (p.completed, p.bad.total()),
            (0, 0),
            "nothing yet: it waits"
        );
        assert_eq!((held.pending(), held.wanted()), (1, 64));
        assert_eq!(used_idx(&mq), 0);

        held.bytes.extend_from_slice(&pattern(40, 0));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(p.completed, 0, "40 of 64 bytes: still held");
        assert_eq!(held.wanted(), 24);
        held.bytes.extend_from_slice(&pattern(30, 40));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!((p.completed, p.served, p.bytes), (1, 1, 64));
        assert_eq!(used_idx(&mq), 1);
        assert_eq!(used(&mq, 0), (0, 64));
        assert_eq!(read(&mem, BUF, 64), pattern(64, 0));
        assert_eq!(held.bytes.iter().collect::<Vec<_>>(), pattern(6, 64));
        assert_eq!((held.pending(), held.wanted()), (0, 0));
    }

    #[test]
    fn a_chain_of_several_buffers_is_filled_in_order() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[desc(BUF, 10, W | N, 1), desc(BUF + 0x100, 22, W, 0)], 0)
            .expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        held.bytes.extend_from_slice(&pattern(32, 0));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!((p.completed, p.bytes), (1, 32));
        assert_eq!(used(&mq, 0), (0, 32));
        assert_eq!(read(&mem, BUF, 10), pattern(10, 0));
        assert_eq!(read(&mem, BUF + 0x100, 22), pattern(22, 10));
    }

    /// A single-descriptor chain of `d` is rejected as `bad`, completed
    /// with 0 bytes, and touches no memory.
    fn rejected(d: RawDescriptor, bad: Bad) {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[d], 0).expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        held.bytes.extend_from_slice(&[0xee; 64]);
        let p = pass(&mut held, &mut q, &mem);
        let mut want = BadCounts::default();
        want.count(bad);
        assert_eq!(p.bad, want);
        assert_eq!((p.completed, p.bytes, p.served), (1, 0, 0));
        assert_eq!(used(&mq, 0), (0, 0));
        assert_eq!(held.bytes.len(), 64, "no byte used");
        assert_eq!(held.wanted(), 0);
        assert!(read(&mem, BUF - 64, 256).iter().all(|&b| b == 0));
    }

    #[test]
    fn a_read_only_buffer_is_rejected() {
        rejected(desc(BUF, 64, 0, 0), Bad::ReadOnly);
    }

    #[test]
    fn a_zero_length_buffer_is_rejected() {
        rejected(desc(BUF, 0, W, 0), Bad::ZeroLength);
    }

    #[test]
    fn a_buffer_past_guest_memory_is_rejected() {
        rejected(desc(MEM_SIZE as u64 - 32, 64, W, 0), Bad::OutsideMemory);
        rejected(desc(u64::MAX - 16, 64, W, 0), Bad::OutsideMemory);
        rejected(desc(0x1000_0000, 64, W, 0), Bad::OutsideMemory);
    }

    #[test]
    fn a_broken_chain_is_rejected() {
        // `next` beyond the table.
        rejected(desc(BUF, 64, W | N, 200), Bad::BrokenChain);
        // A loop: descriptor 0 names itself.
        rejected(desc(BUF, 64, W | N, 0), Bad::BrokenChain);
        // An indirect table whose length is not a multiple of 16.
        rejected(
            desc(BUF, 24, VRING_DESC_F_INDIRECT as u16, 0),
            Bad::BrokenChain,
        );
    }

    #[test]
    fn a_chain_of_too_many_descriptors_is_rejected() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 512);
        let chain = |n: u16| -> Vec<RawDescriptor> {
            (0..n)
                .map(|i| {
                    let next = if i + 1 < n { N } else { 0 };
                    desc(BUF + u64::from(i), 1, W | next, i + 1)
                })
                .collect()
        };
        let n = MAX_DESCRIPTORS as u16;
        mq.add_desc_chains(&chain(n + 1), 0).expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        held.bytes.extend_from_slice(&[1; 512]);
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(
            (p.bad.too_many_descriptors, p.completed, p.bytes),
            (1, 1, 0)
        );
        // MAX_DESCRIPTORS is fine.
        let mq = MockSplitQueue::new(&mem, 512);
        mq.add_desc_chains(&chain(n), 0).expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!((p.bad.total(), p.bytes), (0, u64::from(n)));
    }

    #[test]
    fn a_read_only_piece_rejects_the_whole_chain() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[desc(BUF, 64, W | N, 1), desc(BUF + 64, 64, 0, 0)], 0)
            .expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        held.bytes.extend_from_slice(&[1; 128]);
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(p.bad.read_only, 1);
        assert_eq!(used(&mq, 0), (0, 0));
        assert!(read(&mem, BUF, 128).iter().all(|&b| b == 0));
    }

    #[test]
    fn an_over_long_buffer_is_filled_up_to_the_cap() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[desc(BUF, 0x2_0000, W, 0)], 0)
            .expect("chain");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(p.capped, 1);
        assert_eq!(held.wanted(), MAX_REQUEST);
        held.bytes.extend_from_slice(&pattern(MAX_REQUEST + 10, 0));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!((p.completed, p.bytes), (1, MAX_REQUEST as u64));
        assert_eq!(used(&mq, 0), (0, MAX_REQUEST as u32));
        assert_eq!(read(&mem, BUF, MAX_REQUEST), pattern(MAX_REQUEST, 0));
        assert!(
            read(&mem, BUF + MAX_REQUEST as u64, 4096)
                .iter()
                .all(|&b| b == 0),
            "nothing past the cap"
        );
    }

    #[test]
    fn a_rejection_behind_a_held_buffer_keeps_its_place() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(&[desc(BUF, 64, W, 0), desc(BUF + 64, 64, 0, 0)], 0)
            .expect("chains");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!((p.completed, p.bad.read_only), (0, 1));
        assert_eq!(
            used_idx(&mq),
            0,
            "the rejection waits behind the held buffer"
        );
        held.bytes.extend_from_slice(&pattern(64, 0));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(p.completed, 2);
        assert_eq!((used(&mq, 0), used(&mq, 1)), ((0, 64), (1, 0)));
    }

    #[test]
    fn held_buffers_are_given_back_when_the_ring_stops() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(
            &[
                desc(BUF, 64, W, 0),
                desc(BUF + 64, 64, W, 0),
                desc(BUF + 128, 64, W, 0),
            ],
            0,
        )
        .expect("chains");
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        held.bytes.extend_from_slice(&pattern(64, 0));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(p.completed, 1);
        assert_eq!(q.next_avail(), 3);
        assert_eq!(held.give_back(&mut q), 2);
        assert_eq!((q.next_avail(), held.pending()), (1, 0));
        // The restarted ring offers them again, and they are served.
        held.bytes.extend_from_slice(&pattern(128, 64));
        let p = pass(&mut held, &mut q, &mem);
        assert_eq!(p.completed, 2);
        assert_eq!((used(&mq, 1), used(&mq, 2)), ((1, 64), (2, 64)));
        assert_eq!(read(&mem, BUF, 192), pattern(192, 0));
    }

    #[test]
    fn a_guest_cannot_make_it_hold_more_than_a_queue() {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 4);
        mq.desc_table()
            .store(0, desc(BUF, 64, W, 0))
            .expect("store");
        // The same head offered again and again: 4, then 2 more.
        let offer = |from: u16, n: u16| {
            for i in from..from + n {
                let slot = mq.avail().ring().ref_at(usize::from(i % 4)).expect("slot");
                slot.store(0);
            }
            mq.avail().idx().store(from + n);
        };
        offer(0, 4);
        let mut q: Queue = mq.create_queue().expect("queue");
        let mut held = Held::new();
        pass(&mut held, &mut q, &mem);
        assert_eq!((held.pending(), q.next_avail()), (4, 4));
        offer(4, 2);
        pass(&mut held, &mut q, &mem);
        assert_eq!(
            (held.pending(), q.next_avail()),
            (4, 4),
            "at most a queue's worth held; the rest stays in the ring"
        );
        held.bytes.extend_from_slice(&pattern(64, 0));
        pass(&mut held, &mut q, &mem);
        assert_eq!((held.pending(), q.next_avail()), (4, 5));
    }

    #[test]
    fn stats_to_json() {
        let mut s = VhostUserStats::default();
        let g = s.entry("vm1", Path::new("/run/vm1.sock"), Role::Connect);
        g.bytes_served = 128;
        g.rejected.read_only = 2;
        for ms in 1..=100 {
            g.record_wait(Duration::from_millis(ms));
        }
        let j = s.to_json();
        let g = &j["guests"][0];
        assert_eq!(g["name"], "vm1");
        assert_eq!(g["role"], "connect");
        assert_eq!(g["rejected"]["read_only"], 2);
        assert_eq!(g["rejected"]["total"], 2);
        assert_eq!(j["bytes_served"], 128);
        let p50 = g["wait_p50_ms"].as_f64().expect("p50");
        let p99 = g["wait_p99_ms"].as_f64().expect("p99");
        assert!((50.0..=51.0).contains(&p50), "{p50}");
        assert!((98.0..=100.0).contains(&p99), "{p99}");
    }

    #[test]
    fn guest_names() {
        use std::ffi::OsStr;
        assert_eq!(guest_name(OsStr::new("vm1.sock")).as_deref(), Some("vm1"));
        assert_eq!(guest_name(OsStr::new("vm2")).as_deref(), Some("vm2"));
        assert_eq!(guest_name(OsStr::new(".sock")), None);
    }

    /// A descriptor for the property tests: anywhere near memory, any
    /// length, any flags, any `next`.
    fn any_desc(indirect: bool) -> impl Strategy<Value = RawDescriptor> {
        let flags = if indirect { 0u16..8 } else { 0u16..4 };
        (
            prop_oneof![0u64..(MEM_SIZE as u64 + 0x1000), any::<u64>()],
            prop_oneof![0u32..0x3000, any::<u32>()],
            flags,
            0u16..24,
        )
            .prop_map(|(a, l, f, n)| desc(a, l, f, n))
    }

    fn run_table(table: &[RawDescriptor], heads: &[u16], extra_avail: u16, bytes: usize) {
        let mem = memory();
        let mq = MockSplitQueue::new(&mem, 16);
        for (i, d) in table.iter().enumerate() {
            mq.desc_table().store(i as u16, *d).expect("store");
        }
        // Made available by hand: any heads, and an index maybe too far.
        // (At most 8: the mock lays the used ring over the avail ring's
        // second half.)
        assert!(heads.len() <= 8);
        for (i, h) in heads.iter().enumerate() {
            mq.avail().ring().ref_at(i).expect("avail").store(*h);
        }
        mq.avail()
            .idx()
            .store((heads.len() as u16).wrapping_add(extra_avail));
        let mut q: Queue = mq.create_queue().expect("queue");
        let before = read(&mem, 0, MEM_SIZE);
        let mut held = Held::new();
        held.bytes.extend_from_slice(&pattern(bytes, 0));
        let p = pass(&mut held, &mut q, &mem);
        let p2 = pass(&mut held, &mut q, &mem);
        assert!(p.bytes + p2.bytes <= bytes as u64);
        let after = read(&mem, 0, MEM_SIZE);
        // The used ring: flags, idx, 16 elements of 8 bytes, avail_event
        // (the mock's `end()` counts elements, not bytes).
        let used_ring = mq.used_addr().0..mq.used_addr().0 + 4 + 16 * 8 + 2;
        // Every byte changed is in the used ring or in a writable
        // descriptor's buffer (direct descriptors only: indirect tables
        // are random memory here).
        let writable: Vec<std::ops::Range<u64>> = table
            .iter()
            .map(|d| SplitDescriptor::from(*d))
            .filter(|d| d.is_write_only())
            .map(|d| d.addr().0..d.addr().0.saturating_add(u64::from(d.len())))
            .collect();
        let has_indirect = table
            .iter()
            .any(|d| SplitDescriptor::from(*d).refers_to_indirect_table());
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if b == a {
                continue;
            }
            let i = i as u64;
            assert!(
                used_ring.contains(&i) || has_indirect || writable.iter().any(|r| r.contains(&i)),
                "byte {i:#x} written outside any writable buffer"
            );
        }
        let used_now = mq.used().idx().load();
        let offered = usize::from((heads.len() as u16).wrapping_add(extra_avail));
        if offered > 16 {
            assert_eq!(used_now, 0, "an index too far is refused");
            assert!(p.bad.bad_avail_ring > 0);
        } else {
            assert!(usize::from(used_now) <= offered);
        }
        for k in 0..usize::from(used_now) {
            assert!(used(&mq, k).1 as usize <= MAX_REQUEST);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_descriptor_tables_never_panic_nor_write_outside(
            table in proptest::collection::vec(any_desc(false), 0..16),
            heads in proptest::collection::vec(0u16..20, 0..=8),
            extra in prop_oneof![Just(0u16), 0u16..40, any::<u16>()],
            bytes in 0usize..10_000,
        ) {
            run_table(&table, &heads, extra, bytes);
        }

        #[test]
        fn random_tables_with_indirect_descriptors_never_panic(
            table in proptest::collection::vec(any_desc(true), 0..16),
            heads in proptest::collection::vec(0u16..20, 0..=8),
            bytes in 0usize..10_000,
        ) {
            run_table(&table, &heads, 0, bytes);
        }
    }
}
