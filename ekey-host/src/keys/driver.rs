//! Drives one key: a [`Session`] over a [`Link`], verified frames through
//! the key's health [`Gate`], released blocks out through a bounded
//! channel to the dispatcher, status kept for whoever asks.
//!
//! # The driver always reads its key
//!
//! The outputs may take nothing for hours: an EGD server with no client,
//! a kernel pool that is full. The driver still reads every frame,
//! verifies and decrypts it, and pushes it through the gate, so that an
//! unplugged key, a failure-mode report, or a temperature or voltage out
//! of bounds is seen within about a second whatever the outputs do.
//!
//! What the outputs cannot take meanwhile is bounded and kept in order:
//!
//! - Released bytes wait in the gate's own output buffer, at most
//!   [`OUTPUT_CAPACITY`](ekey_proto::health::OUTPUT_CAPACITY) bytes (two
//!   tested blocks), wiped as they leave. The driver keeps no other copy.
//! - Before a frame that could complete a tested block with that buffer
//!   full, the driver waits up to [`ROOM_WAIT`] for the channel to take
//!   some. Outputs that move, even slowly, lose nothing (`read` at the
//!   emulator's fastest rate gets every byte, in order).
//! - Outputs that stay full past that: the oldest waiting bytes are
//!   dropped, wiped, and booked [`OutputLedger::unused`]. What waits is
//!   always the newest bytes in the order they passed; a dropped byte is
//!   never served later, and nothing overtakes anything.
//! - A closing of the gate discards whatever waits in it (the gate
//!   counts it), and blocks already in the channel are withdrawn
//!   downstream ([`Block::withdrawn`]).
//!
//! # Where entropy lives
//!
//! On its way out, a key's plaintext is in exactly these places, each
//! wiped when the bytes leave it:
//!
//! 1. the session's event queue (`ekey-proto`, wiped as events leave it)
//!    and the driver's copy of the event, wiped once in the gate;
//! 2. the gate's block under test and its output buffer (`ekey-proto`);
//! 3. a [`Block`]'s [`SecretBlock`] (one heap slot per 32 bytes; the
//!    channels to the dispatcher and on to the outputs move pointers to
//!    it, never the bytes), including [`Dispatch::pending`](crate::daemon);
//! 4. an output's own buffer: the EGD pool and each client's granted
//!    bytes, the kernel output's buffer ([`WipeQueue`](crate::wipe::WipeQueue)),
//!    or the `--output` writer's buffer on its way to the file.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ekey_proto::health::{Gate, GateConfig, GateStatus};
use ekey_proto::host::{Config, Counters, DeviceInfo, Event, KeyLookup, Reason, Session, State};
use ekey_proto::keys::Serial;
use ekey_proto::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::keys::transport::Link;
use crate::wipe::SecretBlock;

/// How many times a key's health gate has closed so far. A block released
/// before the latest closing is withdrawn: never served.
pub type GateCloses = Arc<dyn Fn(&Serial) -> u64 + Send + Sync>;

/// Bumped whenever any key's health gate closes, so that the outputs look
/// for bytes to withdraw only then.
pub static GATE_CLOSINGS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Whether any key's gate has closed in this process: until then no block
/// can be withdrawn, and none is looked up.
pub(crate) fn any_gate_closed() -> bool {
    GATE_CLOSINGS.load(std::sync::atomic::Ordering::Acquire) != 0
}

/// One verified 32-byte block and the key it came from. Its bytes live in
/// a [`SecretBlock`]: wiped when dropped, never shown by `Debug`, and not
/// copied into the channels it passes through.
#[derive(Clone)]
pub struct Block {
    /// The key's serial.
    pub serial: Serial,
    /// The plaintext.
    pub data: SecretBlock,
    /// The key's status, where the output that takes the block books it
    /// ([`KeyStatus::outputs`]).
    pub status: SharedStatus,
    /// How many times the key's health gate had closed when the block was
    /// released. If it has closed since, the block is withdrawn.
    pub epoch: u64,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Whether the key's health gate closed after this block was released
    /// (the block is then not to be used).
    pub fn withdrawn(&self) -> bool {
        // Per block: no lock until some gate has closed at all.
        any_gate_closed() && {
            let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
            st.gate.counters.times_closed > self.epoch
        }
    }

    /// Books `bytes` of this block to an output in the key's ledger.
    pub fn book(&self, bytes: u64, to: impl FnOnce(&mut OutputLedger) -> &mut u64) {
        let mut st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        *to(&mut st.outputs) += bytes;
    }
}

/// What a status page shows about a key.
#[derive(Clone, Debug)]
pub struct KeyStatus {
    /// How the key is attached (path, or "built-in software key").
    pub transport: String,
    /// The serial, once known.
    pub serial: Option<Serial>,
    /// The session's state.
    pub state: State,
    /// Why it is in that state.
    pub reason: Reason,
    /// Counters of the current session.
    pub counters: Counters,
    /// Counters of the earlier sessions (before the key was re-plugged).
    pub earlier: Counters,
    /// Latest info items.
    pub info: DeviceInfo,
    /// Whether the link is up.
    pub connected: bool,
    /// How many times the link came up.
    pub connects: u64,
    /// Bytes handed to the outputs (released by the health gate).
    pub delivered: u64,
    /// The health gate between this key and the outputs, as last seen.
    pub gate: GateStatus,
    /// The gate itself: it outlives a session (a re-plugged key keeps its
    /// history and its half-tested block).
    pub gate_handle: SharedGate,
    /// Where the key's released bytes went.
    pub outputs: OutputLedger,
    /// When the driver started.
    pub since: std::time::Instant,
    /// When the link last came up.
    pub connected_since: Option<std::time::Instant>,
    /// The latest SP 800-90B min-entropy estimates of its output.
    pub min_entropy: Option<ekey_proto::health::min_entropy::Estimates>,
    /// Its output window for them (see [`crate::keys::estimate`]).
    pub window: crate::keys::estimate::SharedWindow,
}

impl KeyStatus {
    /// A fresh status for a key attached through `transport`, with the
    /// default health gate.
    pub fn new(transport: impl Into<String>) -> Self {
        Self::with_gate(transport, GateConfig::default(), 0)
    }

    /// A fresh status with a health gate configured so, and a window of
    /// `window` bytes for the min-entropy estimates (0: none).
    pub fn with_gate(transport: impl Into<String>, gate: GateConfig, window: usize) -> Self {
        let gate = Gate::new(gate);
        KeyStatus {
            gate: gate.status(),
            gate_handle: Arc::new(Mutex::new(gate)),
            transport: transport.into(),
            serial: None,
            state: State::Resetting,
            reason: Reason::Start,
            counters: Counters::default(),
            earlier: Counters::default(),
            info: DeviceInfo::default(),
            connected: false,
            connects: 0,
            delivered: 0,
            outputs: OutputLedger::default(),
            since: std::time::Instant::now(),
            connected_since: None,
            min_entropy: None,
            window: Arc::new(Mutex::new(crate::keys::estimate::Window::new(window))),
        }
    }

    /// This key's entry in an output's books by key (0 before the serial
    /// is known or when the output booked nothing for it).
    pub fn booked_in(&self, by_key: &std::collections::BTreeMap<Serial, u64>) -> u64 {
        self.serial
            .and_then(|s| by_key.get(&s).copied())
            .unwrap_or(0)
    }

    /// Counters over every session of this key.
    pub fn totals(&self) -> Counters {
        self.earlier.merged(&self.counters)
    }

    /// Marks the link up (a new session starts) or down.
    pub fn set_connected(&mut self, up: bool) {
        if up && !self.connected {
            self.connects += 1;
            self.connected_since = Some(std::time::Instant::now());
            self.earlier = self.totals();
            self.counters = Counters::default();
        }
        self.connected = up;
    }
}

/// Where a key's released bytes went: each block goes to exactly one
/// output. Bytes released but not yet handed to an output are queued
/// ([`OutputLedger::queued`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputLedger {
    /// Handed to the kernel output (credited, or mixed without credit with
    /// `--kernel=0`).
    pub kernel: u64,
    /// Handed to the EGD server's pool.
    pub egd: u64,
    /// Written to `--output`.
    pub file: u64,
    /// Taken but not used (beyond `read`'s limit, or no output asked for).
    pub unused: u64,
    /// Released, then withdrawn before any output took it: the key's
    /// health gate closed in between.
    pub withdrawn: u64,
}

impl OutputLedger {
    /// Bytes handed to any output, left unused or withdrawn.
    pub fn total(&self) -> u64 {
        self.kernel + self.egd + self.file + self.unused + self.withdrawn
    }

    /// Of `released` bytes, those still on their way to an output.
    pub fn queued(&self, released: u64) -> u64 {
        released.saturating_sub(self.total())
    }
}

/// A key's health gate, shared by its successive sessions.
pub type SharedGate = Arc<Mutex<Gate>>;

/// Shared, updated status of one key.
pub type SharedStatus = Arc<Mutex<KeyStatus>>;

/// How the drive loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The link closed (key unplugged, socket closed).
    Closed,
    /// Nobody takes blocks any more.
    OutputClosed,
    /// The key stopped answering resets (and the caller asked to hear of
    /// it, e.g. to reset its USB port).
    Unresponsive,
    /// Someone (`ekey-host rekey`) asked the daemon to let go of the key.
    Released,
}

/// What the rest of the daemon tells a key's driver.
#[derive(Clone)]
pub struct Signals {
    /// Bumped when the keyring was re-read: the key is reset to use it.
    pub reload: tokio::sync::watch::Receiver<u64>,
    /// Keys (serials or transports) the daemon must let go of for now.
    pub released: tokio::sync::watch::Receiver<std::sync::Arc<std::collections::BTreeSet<String>>>,
}

impl Signals {
    /// Whether the key described by `st` is to be let go of.
    pub fn is_released(&self, st: &KeyStatus) -> bool {
        let set = self.released.borrow();
        set.contains(&st.transport) || st.serial.is_some_and(|s| set.contains(&s.to_string()))
    }
}

/// Reads and discards what the key had queued before we arrived: reads
/// until the line has been quiet for `quiet` (at most `limit` in all).
pub async fn drain(link: &mut Link, quiet: Duration, limit: Duration) -> io::Result<()> {
    let end = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 512];
    loop {
        let wait = quiet.min(end.saturating_duration_since(tokio::time::Instant::now()));
        if wait.is_zero() {
            return Ok(());
        }
        match tokio::time::timeout(wait, link.read(&mut buf)).await {
            Err(_) => return Ok(()),
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// How to drive a key.
#[derive(Clone, Debug)]
pub struct DriveOptions {
    /// The session's tunables.
    pub config: Config,
    /// End with [`Ended::Unresponsive`] when the key stops answering resets
    /// (so that the caller can reset its USB port).
    pub stop_when_unresponsive: bool,
    /// After draining the line, wait this long before reading again, so
    /// that frames are read in batches (fewer wakeups, less CPU). Zero
    /// reads each frame as it comes.
    pub coalesce: Duration,
}

impl DriveOptions {
    /// The daemon's choice: batches of a quarter of a second (about 22
    /// frames, 1.4 kB at the key's rate, well within any socket or tty
    /// buffer): four wake-ups a second, and a lost key or a failure
    /// report is still seen within a second.
    pub const DEFAULT_COALESCE: Duration = Duration::from_millis(250);

    /// `read` and `test`: batches of a tenth of a second.
    pub const READ_COALESCE: Duration = Duration::from_millis(100);
}

/// Runs a session on `link` until the link or the output closes.
/// `on_event` sees every event but entropy (after the status is updated);
/// a change on
/// `signals.reload` (the keyring was re-read) resets the key, and a key
/// named in `signals.released` is let go of ([`Ended::Released`]).
pub async fn drive<K: KeyLookup + ?Sized>(
    link: &mut Link,
    options: DriveOptions,
    keyring: &K,
    blocks: &mpsc::Sender<Block>,
    status: &SharedStatus,
    signals: &mut Signals,
    on_event: &mut (dyn FnMut(&KeyStatus, &Event) + Send),
) -> io::Result<Ended> {
    signals.reload.mark_unchanged();
    signals.released.mark_unchanged();
    let mut run = Run::new(options, blocks, status, on_event);
    loop {
        // Released before or while we were opening, or once the serial
        // became known: let go.
        if signals.is_released(&status.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(Ended::Released);
        }
        if run.stop_when_unresponsive && run.unresponsive {
            return Ok(Ended::Unresponsive);
        }
        run.send_commands(link).await?;
        let n = match run.wait(link, signals).await? {
            Woke::Read(0) => return Ok(Ended::Closed),
            Woke::Read(n) => n,
            Woke::Again => continue,
            Woke::End(ended) => return Ok(ended),
        };
        if let Some(ended) = run.take_in(link, n, keyring).await? {
            return Ok(ended);
        }
        run.pace().await?;
    }
}

/// Milliseconds since `base`, as the session counts time.
fn since(base: tokio::time::Instant) -> Instant {
    Instant::from_millis(base.elapsed().as_millis() as u64)
}

/// What woke [`Run::wait`].
enum Woke {
    /// This many bytes were read into the buffer (0: the link closed).
    Read(usize),
    /// A signal or a session timeout was handled: go round again.
    Again,
    /// The drive is over.
    End(Ended),
}

/// The state of one [`drive`]: the session, its gate, and the pacing.
struct Run<'a> {
    base: tokio::time::Instant,
    session: Session,
    rng: getrandom::SysRng,
    /// The key's gate, looked up once rather than per frame.
    gate: SharedGate,
    /// The key's min-entropy window, likewise.
    window: crate::keys::estimate::SharedWindow,
    buf: Vec<u8>,
    reload_alive: bool,
    released_alive: bool,
    unresponsive: bool,
    stop_when_unresponsive: bool,
    coalesce: Duration,
    /// A read this large in one batch means the source is faster than a
    /// real key (FAST_READ per READ_INTERVAL, scaled to the batch length).
    fast_read: usize,
    fast_until: Option<tokio::time::Instant>,
    /// One wake-up per batch (see the ticker's docs); `None`: a plain
    /// sleep, if the system has no timer to spare or batches are off.
    ticker: Option<crate::keys::ticker::Ticker>,
    blocks: &'a mpsc::Sender<Block>,
    status: &'a SharedStatus,
    on_event: &'a mut (dyn FnMut(&KeyStatus, &Event) + Send),
}

impl<'a> Run<'a> {
    fn new(
        options: DriveOptions,
        blocks: &'a mpsc::Sender<Block>,
        status: &'a SharedStatus,
        on_event: &'a mut (dyn FnMut(&KeyStatus, &Event) + Send),
    ) -> Self {
        use crate::keys::transport::{FAST_READ, READ_INTERVAL};
        let DriveOptions {
            config,
            stop_when_unresponsive,
            coalesce,
        } = options;
        let scaled = FAST_READ as u128 * coalesce.as_millis() / READ_INTERVAL.as_millis().max(1);
        let (gate, window) = {
            let st = status.lock().unwrap_or_else(|p| p.into_inner());
            (st.gate_handle.clone(), st.window.clone())
        };
        Run {
            base: tokio::time::Instant::now(),
            session: Session::new(config, Instant::from_millis(0)),
            rng: getrandom::SysRng,
            gate,
            window,
            buf: vec![0u8; 4096],
            reload_alive: true,
            released_alive: true,
            unresponsive: false,
            stop_when_unresponsive,
            coalesce,
            fast_read: usize::try_from(scaled).unwrap_or(usize::MAX).max(FAST_READ),
            fast_until: None,
            ticker: (!coalesce.is_zero())
                .then(|| crate::keys::ticker::Ticker::new(coalesce).ok())
                .flatten(),
            blocks,
            status,
            on_event,
        }
    }

    /// The session's clock: milliseconds since the drive began.
    fn now(&self) -> Instant {
        since(self.base)
    }

    /// Sends what the session has to say.
    async fn send_commands(&mut self, link: &mut Link) -> io::Result<()> {
        while let Some(t) = self.session.poll_transmit() {
            // A wedged key must not wedge the driver.
            tokio::time::timeout(WRITE_TIMEOUT, async {
                link.write_all(&t).await?;
                link.flush().await
            })
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "the key does not take commands")
            })??;
        }
        Ok(())
    }

    /// Hands the session's events out; `Some` if the drive must end.
    fn hand_out_events(&mut self) -> Option<Ended> {
        match deliver(
            &mut self.session,
            self.status,
            &self.gate,
            &self.window,
            self.blocks,
            &mut *self.on_event,
        ) {
            Delivered::OutputClosed => return Some(Ended::OutputClosed),
            Delivered::Unresponsive => self.unresponsive = true,
            Delivered::Ok => {}
        }
        None
    }

    /// Waits for input, a signal or the session's next timeout.
    async fn wait(&mut self, link: &mut Link, signals: &mut Signals) -> io::Result<Woke> {
        enum Hit {
            Read(io::Result<usize>),
            Timeout,
            Again,
        }
        let base = self.base;
        let deadline = self
            .session
            .poll_timeout()
            .map(|t| base + Duration::from_millis(t.millis()));
        let hit = tokio::select! {
            r = link.read(&mut self.buf) => Hit::Read(r),
            changed = signals.reload.changed(), if self.reload_alive => {
                // The keyring changed: start over so it is used. An error:
                // nobody will ask for reloads any more.
                self.reload_alive = changed.is_ok();
                if self.reload_alive {
                    self.session.reset(since(base));
                }
                Hit::Again
            }
            changed = signals.released.changed(), if self.released_alive => {
                self.released_alive = changed.is_ok();
                Hit::Again
            }
            _ = sleep_until_opt(deadline) => Hit::Timeout,
        };
        Ok(match hit {
            Hit::Read(r) => Woke::Read(r?),
            Hit::Again => Woke::Again,
            Hit::Timeout => {
                let now = self.now();
                self.session.handle_timeout(now);
                self.hand_out_events().map_or(Woke::Again, Woke::End)
            }
        })
    }

    /// Takes in the `n` bytes just read and whatever else is ready now: a
    /// USB link hands out one transfer (one or a few frames) per read, and
    /// what completed while we slept must all be taken in this wake-up.
    async fn take_in<K: KeyLookup + ?Sized>(
        &mut self,
        link: &mut Link,
        n: usize,
        keyring: &K,
    ) -> io::Result<Option<Ended>> {
        let (mut taken, mut len) = (n, n);
        for _ in 0..MAX_READS_PER_WAKE {
            let mut at = 0;
            while at < len {
                // The next frame may complete a tested block with the gate's
                // output full: give the outputs a moment to take some.
                if !has_room(&self.gate, self.blocks) {
                    let serial = self.session.serial().unwrap_or_default();
                    make_room(serial, self.status, &self.gate, self.blocks).await;
                }
                let now = self.now();
                let input = self.buf.get(at..len).unwrap_or_default();
                at += self
                    .session
                    .handle_input(now, input, keyring, &mut self.rng);
                if let Some(ended) = self.hand_out_events() {
                    return Ok(Some(ended));
                }
            }
            if self.session.has_transmit() {
                break;
            }
            match try_read(link, &mut self.buf) {
                Some(Ok(0)) => return Ok(Some(Ended::Closed)),
                Some(Ok(m)) => {
                    len = m;
                    taken += m;
                }
                Some(Err(e)) => return Err(e),
                None => break,
            }
        }
        let now = self.now();
        self.session.handle_timeout(now);
        // A fast source (much taken in one wake-up) is read again at once.
        if taken >= self.fast_read {
            self.fast_until =
                Some(tokio::time::Instant::now() + crate::keys::transport::FAST_WINDOW);
        }
        Ok(None)
    }

    /// The line is drained: let frames gather instead of waking for each
    /// one (a key sends ~100 a second). Commands still go out at once, and
    /// no timeout of the session is anywhere near this short.
    async fn pace(&mut self) -> io::Result<()> {
        let fast = self
            .fast_until
            .is_some_and(|t| tokio::time::Instant::now() < t);
        if fast || self.coalesce.is_zero() || self.session.has_transmit() {
            return Ok(());
        }
        match self.ticker.as_mut() {
            Some(t) => t.tick().await,
            None => {
                tokio::time::sleep(self.coalesce).await;
                Ok(())
            }
        }
    }
}

/// Reads what `link` has ready now, without waiting and without asking to
/// be woken (no timer, no extra wake-up): `None` if nothing is ready.
fn try_read(link: &mut Link, buf: &mut [u8]) -> Option<io::Result<usize>> {
    use std::task::{Context, Poll, Waker};
    let mut cx = Context::from_waker(Waker::noop());
    let mut rb = tokio::io::ReadBuf::new(buf);
    match tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut **link), &mut cx, &mut rb) {
        Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
        Poll::Ready(Err(e)) => Some(Err(e)),
        Poll::Pending => None,
    }
}

/// Most reads taken in one wake-up before the loop looks at commands,
/// timers and signals again.
const MAX_READS_PER_WAKE: usize = 64;

/// Longest a command may take to reach the key.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What handing out events found.
enum Delivered {
    Ok,
    OutputClosed,
    Unresponsive,
}

/// Shows the gate's new state in the key's status. If it closed, the
/// outputs are told to withdraw the key's bytes released before
/// ([`GATE_CLOSINGS`], after the status shows the closing).
fn set_gate(st: &mut KeyStatus, after: ekey_proto::health::GateStatus) {
    let closed = after.counters.times_closed > st.gate.counters.times_closed;
    st.gate = after;
    if closed {
        GATE_CLOSINGS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Logs a gate opening or closing.
fn log_gate_change(serial: Serial, before: bool, gate: &Gate) {
    match (before, gate.is_open()) {
        (true, false) => tracing::warn!(
            "key {serial}: health gate closed ({}): its output is discarded until the \
             cause is gone and {} clean blocks pass",
            gate.status()
                .reason
                .map_or_else(|| "?".to_string(), |r| r.to_string()),
            gate.config().reopen_after
        ),
        (false, true) => tracing::info!("key {serial}: health gate open again"),
        _ => {}
    }
}

/// The tests a block failed, for the log: "monobit, poker".
pub fn failed_tests(r: &ekey_proto::health::BlockReport) -> String {
    let all = [
        (!r.fips.monobit_ok, "monobit"),
        (!r.fips.poker_ok, "poker"),
        (!r.fips.runs_ok, "runs"),
        (!r.fips.long_run_ok, "long run"),
        (!r.continuous_ok, "continuous"),
        (!r.rct_ok, "repetition count"),
        (!r.apt_ok, "adaptive proportion"),
    ];
    let names: Vec<&str> = all.iter().filter(|(f, _)| *f).map(|(_, n)| *n).collect();
    if names.is_empty() {
        "no test".into()
    } else {
        names.join(", ")
    }
}

/// Hands the session's events out (never waiting for the outputs).
fn deliver(
    session: &mut Session,
    status: &SharedStatus,
    gate_handle: &SharedGate,
    window: &crate::keys::estimate::SharedWindow,
    blocks: &mpsc::Sender<Block>,
    on_event: &mut (dyn FnMut(&KeyStatus, &Event) + Send),
) -> Delivered {
    let mut result = Delivered::Ok;
    while let Some(ev) = session.poll_event() {
        let is_entropy = matches!(ev, Event::Entropy { .. });
        let snapshot = {
            let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
            // Kept from the USB descriptor until the key names itself.
            if let Some(serial) = session.serial() {
                st.serial = Some(serial);
            }
            st.state = session.state();
            if let Event::StateChanged { reason, .. } = &ev {
                st.reason = *reason;
            }
            st.counters = session.counters();
            st.info = *session.info();
            // Entropy is the per-frame path: no copy of the status for it.
            (!is_entropy).then(|| st.clone())
        };
        if let Some(snapshot) = &snapshot {
            on_event(snapshot, &ev);
        }
        match ev {
            Event::Entropy { mut data, .. } => {
                let serial = session.serial().unwrap_or_default();
                let pushed = gate_entropy(serial, &data, status, gate_handle, window, blocks);
                zeroize::Zeroize::zeroize(&mut data);
                if let Err(outcome) = pushed {
                    return outcome;
                }
            }
            Event::Info(_) => {
                let serial = session.serial().unwrap_or_default();
                let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
                let after = {
                    let mut gate = gate_handle.lock().unwrap_or_else(|p| p.into_inner());
                    let before = gate.is_open();
                    gate.observe(session.info());
                    log_gate_change(serial, before, &gate);
                    gate.status()
                };
                if after.warnings.any() && !st.gate.warnings.any() {
                    tracing::warn!("key {serial}: {}", after.warnings);
                }
                set_gate(&mut st, after);
            }
            Event::Unresponsive { .. } => result = Delivered::Unresponsive,
            _ => {}
        }
    }
    result
}

/// Passes one verified frame through the health gate and hands what it
/// releases to the outputs, without waiting for them (see the module docs:
/// the driver never stops reading its key).
///
/// Released bytes wait in the gate's own output buffer (at most
/// [`OUTPUT_CAPACITY`] bytes, wiped as they leave) while the outputs'
/// channel is full. When the gate would have no room for the next tested
/// block, the oldest waiting bytes are taken out and booked `unused`, so
/// that what waits is always the newest, in the order it passed.
fn gate_entropy(
    serial: Serial,
    data: &[u8; 32],
    status: &SharedStatus,
    gate_handle: &SharedGate,
    window: &crate::keys::estimate::SharedWindow,
    blocks: &mpsc::Sender<Block>,
) -> Result<(), Delivered> {
    let mut gate = gate_handle.lock().unwrap_or_else(|p| p.into_inner());
    let (mut sent, mut closed) = hand_out(&mut gate, serial, status, blocks);
    let mut unused = 0;
    while !closed && !gate.output_has_room() {
        let Some(mut old) = gate.pop_released() else {
            break;
        };
        zeroize::Zeroize::zeroize(&mut old);
        unused += 32;
    }
    let before = gate.is_open();
    if let Some(r) = gate.push(data).filter(|r| !r.passed()) {
        // Once closed, a dead source would fail a block a second: the
        // closing is logged, the rest is debug.
        let failed = failed_tests(&r);
        let msg =
            format_args!("key {serial}: a block of 20,000 bits failed {failed} and was discarded");
        if before && gate.is_open() {
            tracing::info!("{msg}");
        } else {
            tracing::debug!("{msg}");
        }
    }
    log_gate_change(serial, before, &gate);
    let due = {
        let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
        w.push(data);
        w.due(std::time::Instant::now())
    };
    if let Some(bytes) = due {
        start_estimate(
            serial,
            bytes,
            window.clone(),
            status.clone(),
            gate_handle.clone(),
        );
    }
    if !closed {
        let (more, now_closed) = hand_out(&mut gate, serial, status, blocks);
        sent += more;
        closed = now_closed;
    }
    let after = gate.status();
    drop(gate);
    let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
    set_gate(&mut st, after);
    st.delivered += sent;
    st.outputs.unused += unused;
    if closed {
        Err(Delivered::OutputClosed)
    } else {
        Ok(())
    }
}

/// Estimates a key's window on tokio's blocking pool (inline without a
/// runtime), then hands the result to its status and its gate.
fn start_estimate(
    serial: Serial,
    bytes: zeroize::Zeroizing<Vec<u8>>,
    window: crate::keys::estimate::SharedWindow,
    status: SharedStatus,
    gate: SharedGate,
) {
    let work = move || {
        let t0 = std::time::Instant::now();
        let size = bytes.len();
        let e = crate::keys::estimate::estimate(&bytes);
        window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .done(Some(bytes));
        if let Some(e) = e {
            tracing::debug!(
                "key {serial}: min-entropy {:.3} bits per byte ({} bytes, {:?})",
                e.min(),
                size,
                t0.elapsed()
            );
            let after = {
                let mut g = gate.lock().unwrap_or_else(|p| p.into_inner());
                let before = g.is_open();
                g.observe_min_entropy(crate::keys::estimate::millibits(&e));
                log_gate_change(serial, before, &g);
                g.status()
            };
            let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
            st.min_entropy = Some(e);
            set_gate(&mut st, after);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(work)),
        Err(_) => work(),
    }
}

/// Whether the next tested block has room in the gate's output, or the
/// outputs' channel can take some of what waits there.
fn has_room(gate: &SharedGate, blocks: &mpsc::Sender<Block>) -> bool {
    blocks.capacity() > 0
        || gate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .output_has_room()
}

/// Longest the driver waits for the outputs before reading on (and letting
/// the gate's oldest waiting bytes go unused): outputs that move, even
/// slowly, lose nothing; outputs that are full do not stop the key being
/// read for longer than this.
pub const ROOM_WAIT: Duration = Duration::from_millis(100);

/// Waits up to [`ROOM_WAIT`] for room in the outputs' channel and moves
/// what the gate holds into it.
async fn make_room(
    serial: Serial,
    status: &SharedStatus,
    gate_handle: &SharedGate,
    blocks: &mpsc::Sender<Block>,
) {
    let Ok(Ok(permit)) = tokio::time::timeout(ROOM_WAIT, blocks.reserve()).await else {
        return;
    };
    let mut gate = gate_handle.lock().unwrap_or_else(|p| p.into_inner());
    if !send_one(permit, &mut gate, serial, status) {
        return;
    }
    let (more, _) = hand_out(&mut gate, serial, status, blocks);
    drop(gate);
    status.lock().unwrap_or_else(|p| p.into_inner()).delivered += 32 + more;
}

/// Moves released bytes from the gate into the outputs' channel while it
/// has room. Returns the bytes sent, and whether the channel is closed
/// (nobody takes blocks any more).
fn hand_out(
    gate: &mut Gate,
    serial: Serial,
    status: &SharedStatus,
    blocks: &mpsc::Sender<Block>,
) -> (u64, bool) {
    let mut sent = 0;
    while gate.released_len() >= 32 {
        let permit = match blocks.try_reserve() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => break,
            Err(mpsc::error::TrySendError::Closed(())) => return (sent, true),
        };
        if !send_one(permit, gate, serial, status) {
            break;
        }
        sent += 32;
    }
    (sent, false)
}

/// Sends the gate's next 32 released bytes with `permit`; `false` if it
/// has none. Bytes still waiting in the gate passed after its latest
/// closing (a closing discards them), so that closing is their epoch.
fn send_one(
    permit: mpsc::Permit<'_, Block>,
    gate: &mut Gate,
    serial: Serial,
    status: &SharedStatus,
) -> bool {
    let epoch = gate.times_closed();
    let Some(mut data) = gate.pop_released() else {
        return false;
    };
    permit.send(Block {
        serial,
        data: SecretBlock::take(&mut data),
        status: status.clone(),
        epoch,
    });
    true
}
