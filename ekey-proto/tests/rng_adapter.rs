//! `rng::EntropyKeyRng` against a software key over an in-memory link.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::time::Duration;

use ekey_proto::device::{Device, DeviceConfig, SentBlock};
use ekey_proto::health::{CloseReason, FIPS_BLOCK_BYTES, Gate, GateConfig};
use ekey_proto::host::{Config, State};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rng::{EntropyKeyRng, Error, SingleKey};
use ekey_proto::time::Instant;
use ekey_proto::wire::info::{FailureMode, Temperature};
use embedded_io::ErrorKind;
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng, TryCryptoRng, TryRng, UnwrapErr};

const SERIAL: Serial = Serial([0x21; 12]);
const OTHER: Serial = Serial([0x42; 12]);

fn ltk() -> LongTermKey {
    LongTermKey::from_bytes([0x33; 32])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LinkError(ErrorKind);

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "link error {:?}", self.0)
    }
}
impl std::error::Error for LinkError {}
impl embedded_io::Error for LinkError {
    fn kind(&self) -> ErrorKind {
        self.0
    }
}

/// The key's noise source.
enum Noise {
    Good(Box<ChaCha20Rng>),
    /// Every byte the same: frames still verify, the data is worthless.
    Stuck(u8),
}

impl TryRng for Noise {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        match self {
            Noise::Good(r) => r.fill_bytes(dst),
            Noise::Stuck(b) => dst.fill(*b),
        }
        Ok(())
    }
}
impl TryCryptoRng for Noise {}

/// The key's end of the link.
struct KeyEnd {
    device: Device,
    noise: Noise,
    /// Bytes the key sent that the adapter has not read yet.
    pending: VecDeque<u8>,
    /// Every entropy block the key sent, in order.
    sent: Vec<SentBlock>,
    /// Most bytes one read returns.
    chunk: usize,
    reads: usize,
    /// Every n-th read fails with `Interrupted` (0: never).
    interrupt_every: usize,
    /// The next this many writes fail with `Interrupted`.
    write_interrupts: usize,
}

/// A duplex in-memory link: writes go to the key; a read with nothing
/// pending lets the key send its next frame.
#[derive(Clone)]
struct Link(Rc<RefCell<KeyEnd>>);

impl Link {
    fn new(device: Device) -> Self {
        Link(Rc::new(RefCell::new(KeyEnd {
            device,
            noise: Noise::Good(Box::new(ChaCha20Rng::seed_from_u64(1))),
            pending: VecDeque::new(),
            sent: Vec::new(),
            chunk: 64,
            reads: 0,
            interrupt_every: 0,
            write_interrupts: 0,
        })))
    }

    fn standard() -> Self {
        Self::new(Device::new(DeviceConfig::new(SERIAL, ltk())))
    }

    /// The plaintext stream the key sent.
    fn stream(&self) -> Vec<u8> {
        let end = self.0.borrow();
        assert!(end.sent.iter().all(|b| b.authentic && !b.replayed));
        end.sent.iter().flat_map(|b| b.data).collect()
    }

    fn blocks_sent(&self) -> usize {
        self.0.borrow().sent.len()
    }
}

impl embedded_io::ErrorType for Link {
    type Error = LinkError;
}

impl embedded_io::Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        let mut end = self.0.borrow_mut();
        let end = &mut *end;
        end.reads += 1;
        if end.interrupt_every > 0 && end.reads.is_multiple_of(end.interrupt_every) {
            return Err(LinkError(ErrorKind::Interrupted));
        }
        for _ in 0..10_000 {
            if !end.pending.is_empty() {
                break;
            }
            if let Some(out) = end.device.poll(&mut end.noise) {
                end.sent.extend(out.entropy);
                end.pending.extend(out.bytes.iter().copied());
            }
        }
        let n = buf.len().min(end.chunk).min(end.pending.len());
        if n == 0 {
            return Err(LinkError(ErrorKind::TimedOut));
        }
        for (d, s) in buf.iter_mut().zip(end.pending.drain(..n)) {
            *d = s;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Link {
    fn write(&mut self, buf: &[u8]) -> Result<usize, LinkError> {
        let mut end = self.0.borrow_mut();
        let end = &mut *end;
        if end.write_interrupts > 0 {
            end.write_interrupts -= 1;
            return Err(LinkError(ErrorKind::Interrupted));
        }
        end.device.handle_input(buf, &mut end.noise);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
}

/// A fake clock: every reading is `step_ms` later than the last.
#[derive(Clone)]
struct FakeClock {
    ms: Rc<Cell<u64>>,
    step_ms: u64,
}

impl FakeClock {
    fn new(step_ms: u64) -> Self {
        FakeClock {
            ms: Rc::new(Cell::new(0)),
            step_ms,
        }
    }
    fn closure(&self) -> impl FnMut() -> Instant + use<> {
        let ms = self.ms.clone();
        let step = self.step_ms;
        move || {
            ms.set(ms.get() + step);
            Instant::from_millis(ms.get())
        }
    }
}

type Clock = Box<dyn FnMut() -> Instant>;

fn adapter<T, K>(transport: T, keys: K, config: Config) -> EntropyKeyRng<T, K, ChaCha20Rng, Clock>
where
    T: embedded_io::Read + embedded_io::Write,
    K: ekey_proto::host::KeyLookup,
{
    let clock: Clock = Box::new(FakeClock::new(11).closure());
    EntropyKeyRng::with_config(
        transport,
        keys,
        ChaCha20Rng::seed_from_u64(2),
        clock,
        config,
    )
}

fn standard() -> (Link, EntropyKeyRng<Link, SingleKey, ChaCha20Rng, Clock>) {
    let link = Link::standard();
    let rng = adapter(
        link.clone(),
        SingleKey::for_serial(SERIAL, ltk()),
        Config::default(),
    );
    (link, rng)
}

#[test]
fn fills_follow_the_stream_without_wasting_blocks() {
    let (link, mut rng) = standard();
    let mut got = Vec::new();
    for len in [1usize, 7, 32, 33, 1000] {
        let mut buf = vec![0u8; len];
        rng.try_fill_bytes(&mut buf).unwrap();
        got.extend_from_slice(&buf);
    }
    assert_eq!(got.len(), 1073);
    let stream = link.stream();
    assert_eq!(got, stream[..got.len()]);
    // 1073 bytes need 34 blocks, and no more were taken.
    assert_eq!(link.blocks_sent(), 34);
    assert_eq!(rng.counters().blocks, 34);
    assert_eq!(rng.buffered(), 34 * 32 - 1073);
    assert_eq!(rng.state(), State::Running);
    assert_eq!(rng.serial(), Some(SERIAL));
}

#[test]
fn empty_fill_does_nothing() {
    let (link, mut rng) = standard();
    rng.try_fill_bytes(&mut []).unwrap();
    assert_eq!(link.0.borrow().reads, 0);
}

#[test]
fn words_are_little_endian_stream_bytes() {
    let (link, mut rng) = standard();
    let a = rng.try_next_u32().unwrap();
    let b = rng.try_next_u64().unwrap();
    let mut c = [0u8; 3];
    rng.try_fill_bytes(&mut c).unwrap();
    let s = link.stream();
    assert_eq!(a, u32::from_le_bytes(s[0..4].try_into().unwrap()));
    assert_eq!(b, u64::from_le_bytes(s[4..12].try_into().unwrap()));
    assert_eq!(c, s[12..15]);
    assert_eq!(link.blocks_sent(), 1);
}

#[test]
fn short_and_interrupted_reads() {
    let link = Link::standard();
    link.0.borrow_mut().chunk = 7;
    link.0.borrow_mut().interrupt_every = 5;
    let mut rng = adapter(link.clone(), SingleKey::new(ltk()), Config::default());
    let mut got = vec![0u8; 500];
    rng.try_fill_bytes(&mut got).unwrap();
    assert_eq!(got, link.stream()[..500]);
    assert_eq!(link.blocks_sent(), 16);
}

#[test]
fn stream_continues_across_session_rekeys() {
    let (link, mut rng) = standard();
    let len = 4200 * 32 + 5;
    let mut got = vec![0u8; len];
    // Odd-sized pieces so reads straddle blocks.
    for piece in got.chunks_mut(1001) {
        rng.try_fill_bytes(piece).unwrap();
    }
    assert_eq!(got, link.stream()[..len]);
    assert!(rng.counters().rekeys >= 2, "{:?}", rng.counters());
    assert!(link.0.borrow().device.stats().rekeys >= 2);
    assert_eq!(rng.counters().bad_macs, 0);
    assert_eq!(rng.counters().resets, 1);
}

#[test]
fn closure_keyring_works() {
    let link = Link::standard();
    let keyring = |s: &Serial| (*s == SERIAL).then(ltk);
    let mut rng = adapter(link.clone(), keyring, Config::default());
    let x = rng.try_next_u64().unwrap();
    assert_eq!(
        x,
        u64::from_le_bytes(link.stream()[..8].try_into().unwrap())
    );
}

/// A transport with a scripted answer for reads and writes.
struct Scripted {
    read: Result<usize, LinkError>,
    write: Result<usize, LinkError>,
    reads: usize,
}

impl embedded_io::ErrorType for Scripted {
    type Error = LinkError;
}
impl embedded_io::Read for Scripted {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, LinkError> {
        self.reads += 1;
        let n = self.read?;
        // Line noise: never a frame.
        for (i, b) in buf.iter_mut().take(n).enumerate() {
            *b = if i % 2 == 0 { b'x' } else { b'\n' };
        }
        Ok(n.min(buf.len()))
    }
}
impl embedded_io::Write for Scripted {
    fn write(&mut self, buf: &[u8]) -> Result<usize, LinkError> {
        self.write.map(|n| n.min(buf.len()))
    }
    fn flush(&mut self) -> Result<(), LinkError> {
        Ok(())
    }
}

fn scripted(
    read: Result<usize, LinkError>,
    write: Result<usize, LinkError>,
) -> EntropyKeyRng<Scripted, SingleKey, ChaCha20Rng, Clock> {
    adapter(
        Scripted {
            read,
            write,
            reads: 0,
        },
        SingleKey::new(ltk()),
        Config::default(),
    )
}

#[test]
fn read_error_is_a_transport_error() {
    let mut rng = scripted(Err(LinkError(ErrorKind::BrokenPipe)), Ok(usize::MAX));
    assert_eq!(
        rng.try_next_u32(),
        Err(Error::Transport(LinkError(ErrorKind::BrokenPipe)))
    );
}

#[test]
fn write_error_is_a_transport_error() {
    let mut rng = scripted(Ok(64), Err(LinkError(ErrorKind::NotConnected)));
    assert_eq!(
        rng.try_next_u32(),
        Err(Error::Transport(LinkError(ErrorKind::NotConnected)))
    );
}

#[test]
fn end_of_stream() {
    let mut rng = scripted(Ok(0), Ok(usize::MAX));
    assert_eq!(rng.try_next_u32(), Err(Error::Eof));
    // A write that takes nothing is a closed transport too (not a panic,
    // as `write_all` would have it).
    let mut rng = scripted(Ok(64), Ok(0));
    assert_eq!(rng.try_next_u32(), Err(Error::Eof));
}

#[test]
fn silent_transport_times_out() {
    let mut rng = scripted(Err(LinkError(ErrorKind::TimedOut)), Ok(usize::MAX));
    let mut buf = [0u8; 8];
    assert_eq!(rng.try_fill_bytes(&mut buf), Err(Error::Timeout));
    // 11 ms per clock reading, about two readings per read: 10 s is
    // roughly 450 reads.
    let reads = rng.transport().reads;
    assert!((300..1000).contains(&reads), "{reads}");
    // The session kept resetting the silent key meanwhile.
    assert!(rng.counters().reset_timeouts >= 2, "{:?}", rng.counters());
    // The adapter stays usable: the next call waits again.
    assert_eq!(rng.try_fill_bytes(&mut buf), Err(Error::Timeout));
}

#[test]
fn line_noise_times_out_with_configured_timeout() {
    let mut rng = scripted(Ok(64), Ok(usize::MAX)).with_timeout(Duration::from_secs(1));
    assert_eq!(rng.timeout(), Duration::from_secs(1));
    assert_eq!(rng.try_next_u64(), Err(Error::Timeout));
    let reads = rng.transport().reads;
    assert!((30..100).contains(&reads), "{reads}");
    assert!(rng.counters().garbage_bytes > 0);
}

#[test]
fn wrong_long_term_key_is_rejected() {
    let link = Link::standard();
    let wrong = LongTermKey::from_bytes([0x44; 32]);
    let mut rng = adapter(link.clone(), SingleKey::new(wrong), Config::default());
    let mut buf = [0u8; 32];
    assert_eq!(
        rng.try_fill_bytes(&mut buf),
        Err(Error::LongTermKeyRejected)
    );
    assert_eq!(rng.state(), State::LongTermKeyRejected);
    assert_eq!(rng.counters().blocks, 0);
    // Fails at once while the back-off runs.
    let reads = link.0.borrow().reads;
    assert_eq!(
        rng.try_fill_bytes(&mut buf),
        Err(Error::LongTermKeyRejected)
    );
    assert_eq!(link.0.borrow().reads, reads);
}

#[test]
fn rejected_key_is_retried_after_the_back_off() {
    let link = Link::standard();
    let mut rng = adapter(
        link.clone(),
        SingleKey::new(LongTermKey::from_bytes([0x44; 32])),
        Config::default(),
    );
    assert_eq!(rng.try_next_u32(), Err(Error::LongTermKeyRejected));
    // The key's flash is fixed meanwhile (stands in for the right key).
    link.0
        .borrow_mut()
        .device
        .set_long_term_key(LongTermKey::from_bytes([0x44; 32]));
    // Each call reads the clock; after 5 s of calls the session retries.
    let mut result = Err(Error::LongTermKeyRejected);
    for _ in 0..1000 {
        result = rng.try_next_u32();
        if result != Err(Error::LongTermKeyRejected) {
            break;
        }
    }
    assert!(result.is_ok(), "{result:?}");
}

#[test]
fn unknown_serial_has_no_long_term_key() {
    let link = Link::standard();
    let mut rng = adapter(
        link.clone(),
        SingleKey::for_serial(OTHER, ltk()),
        Config::default(),
    );
    assert_eq!(rng.try_next_u32(), Err(Error::NoLongTermKey));
    assert_eq!(rng.state(), State::NoLongTermKey);
    // Stays refused without touching the transport.
    let reads = link.0.borrow().reads;
    assert_eq!(rng.try_next_u32(), Err(Error::NoLongTermKey));
    assert_eq!(link.0.borrow().reads, reads);
    assert!(link.blocks_sent() == 0);
}

#[test]
fn closure_keyring_without_the_key() {
    let keyring = |_: &Serial| -> Option<LongTermKey> { None };
    let mut rng = adapter(Link::standard(), keyring, Config::default());
    assert_eq!(rng.try_next_u32(), Err(Error::NoLongTermKey));
}

#[test]
fn unexpected_serial_is_refused() {
    let config = Config {
        expected_serial: Some(OTHER),
        ..Config::default()
    };
    let mut rng = adapter(Link::standard(), SingleKey::new(ltk()), config);
    assert_eq!(rng.try_next_u32(), Err(Error::WrongSerial));
    assert_eq!(rng.state(), State::WrongSerial);
}

#[test]
fn failure_mode_stops_the_stream() {
    let (link, mut rng) = standard();
    let mut buf = [0u8; 40];
    rng.try_fill_bytes(&mut buf).unwrap();
    assert_eq!(rng.buffered(), 24);
    link.0.borrow_mut().device.faults_mut().failure_mode = Some(FailureMode::LeftBiased);
    let mut big = [0u8; 1000];
    assert_eq!(
        rng.try_fill_bytes(&mut big),
        Err(Error::FailureMode(FailureMode::LeftBiased))
    );
    assert_eq!(rng.state(), State::Failed(FailureMode::LeftBiased));
    // Nothing stays buffered, and nothing comes out any more.
    assert_eq!(rng.buffered(), 0);
    assert_eq!(
        rng.try_next_u32(),
        Err(Error::FailureMode(FailureMode::LeftBiased))
    );
    // A reset asks the key again; it still fails.
    rng.reset();
    assert_eq!(
        rng.try_next_u32(),
        Err(Error::FailureMode(FailureMode::LeftBiased))
    );
    assert!(rng.info().shannon.is_some());
}

#[test]
fn seeds_chacha() {
    let (link, mut rng) = standard();
    let mut seeded = ChaCha20Rng::try_from_rng(&mut rng).unwrap();
    let seed: [u8; 32] = link.stream()[..32].try_into().unwrap();
    let mut expected = ChaCha20Rng::from_seed(seed);
    assert_eq!(seeded.next_u64(), expected.next_u64());
    assert_eq!(link.blocks_sent(), 1);
    assert_eq!(rng.buffered(), 0);
}

#[test]
fn unwrap_err_is_infallible_on_success() {
    let (link, mut rng) = standard();
    let mut strict = UnwrapErr(&mut rng);
    let a = strict.next_u32();
    let mut b = [0u8; 4];
    strict.fill_bytes(&mut b);
    let s = link.stream();
    assert_eq!(a, u32::from_le_bytes(s[..4].try_into().unwrap()));
    assert_eq!(b, s[4..8]);
}

#[test]
#[should_panic]
fn unwrap_err_panics_on_error() {
    let mut rng = scripted(Ok(0), Ok(usize::MAX));
    let _ = UnwrapErr(&mut rng).next_u32();
}

#[test]
fn errors_display_and_debug() {
    let e: Error<LinkError> = Error::Transport(LinkError(ErrorKind::BrokenPipe));
    assert_eq!(e.to_string(), "transport error: link error BrokenPipe");
    let e: Box<dyn std::error::Error> =
        Box::new(Error::<LinkError>::FailureMode(FailureMode::LeftBiased));
    assert!(e.to_string().starts_with("key reports a failure"));
    assert_eq!(
        Error::<LinkError>::Timeout.to_string(),
        "no entropy from the key in time"
    );
    let key = SingleKey::for_serial(SERIAL, ltk());
    assert!(!format!("{key:?}").contains("33"));
}

#[test]
fn debug_shows_no_entropy_and_into_inner_returns_the_transport() {
    let (link, mut rng) = standard();
    let x = rng.try_next_u32().unwrap();
    let dbg = format!("{rng:?}");
    assert!(dbg.contains("buffered: 28"), "{dbg}");
    assert!(!dbg.contains(&x.to_string()));
    let back = rng.into_inner();
    assert!(Rc::ptr_eq(&back.0, &link.0));
}

// --- The health gate (`with_gate`) ---

fn gated(
    link: &Link,
    config: GateConfig,
) -> EntropyKeyRng<Link, SingleKey, ChaCha20Rng, Clock, Gate> {
    adapter(
        link.clone(),
        SingleKey::for_serial(SERIAL, ltk()),
        Config::default(),
    )
    .with_timeout(Duration::from_secs(60))
    .with_gate(Gate::new(config))
}

#[test]
fn gate_hands_out_the_stream_from_tested_blocks_only() {
    let link = Link::standard();
    let mut rng = gated(&link, GateConfig::default());
    let mut got = vec![0u8; 2 * FIPS_BLOCK_BYTES + 100];
    for piece in got.chunks_mut(333) {
        rng.try_fill_bytes(piece).unwrap();
    }
    // The same bytes as without a gate: the key's stream, in order.
    assert_eq!(got, link.stream()[..got.len()]);
    let status = rng.gate().status();
    assert!(status.open);
    // 5,100 bytes need three whole tested blocks, and no byte was handed
    // out before its block was tested.
    assert_eq!(status.counters.blocks_tested, 3);
    assert_eq!(status.counters.blocks_failed, 0);
    // Taken from the gate a 32-byte block at a time, as needed: 160
    // blocks; the rest of the third waits in the gate.
    assert_eq!(status.counters.bytes_released, 160 * 32);
    assert_eq!(rng.buffered(), 160 * 32 - got.len());
    assert_eq!(
        status.counters.bytes_buffered,
        3 * FIPS_BLOCK_BYTES as u64 - 160 * 32
    );
    assert_eq!(status.counters.bytes_received, link.stream().len() as u64);
    assert!(link.stream().len() >= 3 * FIPS_BLOCK_BYTES);
    assert!(link.stream().len() < 3 * FIPS_BLOCK_BYTES + 32);
    assert!(format!("{rng:?}").contains("Gate"));
}

#[test]
fn gate_refuses_a_stuck_source_whose_frames_verify() {
    // Without a gate, a stuck noise source is handed out as it comes: the
    // frames carry valid MACs.
    let link = Link::standard();
    link.0.borrow_mut().noise = Noise::Stuck(0xa5);
    let mut plain = adapter(
        link.clone(),
        SingleKey::for_serial(SERIAL, ltk()),
        Config::default(),
    );
    let mut buf = [0u8; 64];
    plain.try_fill_bytes(&mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));

    let link = Link::standard();
    link.0.borrow_mut().noise = Noise::Stuck(0xa5);
    let mut rng = gated(&link, GateConfig::default());
    let mut buf = [0u8; 32];
    let err = rng.try_fill_bytes(&mut buf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::GateClosed(CloseReason::Continuous | CloseReason::RepetitionCount)
        ),
        "{err:?}"
    );
    assert_eq!(buf, [0u8; 32], "nothing handed out");
    assert!(err.to_string().starts_with("health gate closed: "), "{err}");
    let status = rng.gate().status();
    assert!(!status.open);
    assert_eq!(status.counters.bytes_released, 0);
    // The key was running all along: only the gate said no.
    assert_eq!(rng.state(), State::Running);
    assert!(link.blocks_sent() > 100);
    // And it keeps saying no.
    assert!(matches!(rng.try_next_u32(), Err(Error::GateClosed(_))));
}

#[test]
fn gate_closes_on_the_keys_temperature_and_reopens_when_it_cools() {
    let link = Link::standard();
    let config = GateConfig {
        reopen_after: 2,
        ..GateConfig::default()
    };
    let mut rng = gated(&link, config);
    // Hot from the start: 95 °C, past the default 85 °C limit.
    let hot = Temperature { deci_kelvin: 3682 };
    link.0.borrow_mut().device.set_temperature(hot);
    let mut buf = [0u8; 32];
    match rng.try_fill_bytes(&mut buf) {
        Err(Error::GateClosed(CloseReason::Temperature { millicelsius })) => {
            assert_eq!(millicelsius, hot.millicelsius())
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(buf, [0u8; 32]);
    assert_eq!(rng.gate().status().counters.bytes_released, 0);

    // Cooled down: the next report clears the condition, and two clean
    // blocks re-open the gate.
    link.0
        .borrow_mut()
        .device
        .set_temperature(Temperature { deci_kelvin: 3131 });
    rng.try_fill_bytes(&mut buf).unwrap();
    let status = rng.gate().status();
    assert!(status.open);
    assert_eq!(status.counters.times_closed, 1);
    assert!(status.counters.bytes_released >= 32);
    // What came out is the key's stream, at a whole tested block.
    let stream = link.stream();
    let at = stream
        .windows(32)
        .position(|w| w == buf)
        .expect("the bytes are from the stream");
    assert_eq!(at % FIPS_BLOCK_BYTES, 0, "at {at}");
}

#[test]
fn reset_drops_what_the_gate_held() {
    let link = Link::standard();
    let mut rng = gated(&link, GateConfig::default());
    let mut first = [0u8; 32];
    rng.try_fill_bytes(&mut first).unwrap();
    assert_eq!(first, link.stream()[..32]);
    let held = rng.gate().status().counters;
    assert!(held.bytes_buffered > 0);
    let sent_before = link.blocks_sent();
    rng.reset();
    let after = rng.gate().status().counters;
    assert_eq!(after.bytes_buffered + after.bytes_pending, 0);
    assert_eq!(
        after.bytes_discarded,
        held.bytes_discarded + held.bytes_buffered + held.bytes_pending
    );
    // What comes next is from blocks the key sent after the reset, from
    // the first of them on: nothing from before leaks through.
    let mut next = vec![0u8; 1000];
    rng.try_fill_bytes(&mut next).unwrap();
    let stream = link.stream();
    assert_eq!(next, stream[sent_before * 32..sent_before * 32 + 1000]);
    assert_eq!(rng.counters().resets, 2);
}

#[test]
fn a_pause_between_calls_does_not_reset_the_key() {
    let link = Link::standard();
    let clock = FakeClock::new(11);
    let tick = clock.closure();
    let mut rng = EntropyKeyRng::new(
        link.clone(),
        SingleKey::for_serial(SERIAL, ltk()),
        ChaCha20Rng::seed_from_u64(2),
        Box::new(tick) as Clock,
    );
    let mut a = [0u8; 40];
    rng.try_fill_bytes(&mut a).unwrap();
    let resets = rng.counters().resets;
    let rekeys = link.0.borrow().device.stats().rekeys;
    // A minute goes by before the next call (a ChaCha reseed, say).
    clock.ms.set(clock.ms.get() + 60_000);
    let mut b = [0u8; 100];
    rng.try_fill_bytes(&mut b).unwrap();
    assert_eq!(rng.counters().resets, resets, "{:?}", rng.counters());
    assert_eq!(link.0.borrow().device.stats().rekeys, rekeys);
    // The stream simply goes on.
    assert_eq!(b, link.stream()[40..140]);
}

#[test]
fn interrupted_writes_are_retried() {
    let link = Link::standard();
    // The reset and the session re-key's `K` are each interrupted once
    // or twice before they go through.
    link.0.borrow_mut().write_interrupts = 3;
    let mut rng = adapter(link.clone(), SingleKey::new(ltk()), Config::default());
    let mut buf = [0u8; 64];
    rng.try_fill_bytes(&mut buf).unwrap();
    assert_eq!(buf, link.stream()[..64]);
    assert_eq!(link.0.borrow().write_interrupts, 0);
    assert_eq!(rng.counters().resets, 1);
    assert_eq!(rng.counters().rekey_timeouts, 0);
}

#[test]
fn writes_that_keep_timing_out_end_in_a_timeout() {
    let link = Link::standard();
    link.0.borrow_mut().write_interrupts = usize::MAX;
    let mut rng = adapter(link.clone(), SingleKey::new(ltk()), Config::default())
        .with_timeout(Duration::from_secs(1));
    let mut buf = [0u8; 8];
    assert_eq!(rng.try_fill_bytes(&mut buf), Err(Error::Timeout));
}
