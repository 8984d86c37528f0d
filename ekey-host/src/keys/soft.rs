//! The built-in software key: `ekey-proto`'s `device` state machine with
//! documented demo keys, fed by the operating system's CSPRNG.
//!
//! Its output is only as random as the OS generator it draws from: it is for
//! demos and tests, never a source to credit a kernel with.

use ekey_proto::device::{Device, DeviceConfig, Output};
use ekey_proto::keys::{LongTermKey, Serial};

/// Serial of the demo software key (PEM64 `RW11bGF0ZWRLZXkx`).
pub const DEMO_SERIAL: Serial = Serial(*b"EmulatedKey1");

/// Long-term key of the demo software key: 32 bytes of 0x5e. Public on
/// purpose: a software key protects nothing.
pub fn demo_long_term_key() -> LongTermKey {
    LongTermKey::from_bytes([0x5e; 32])
}

/// Master key of the demo software key: 32 bytes of 0x4d, printed (with
/// its check byte) as `TU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU2T`.
pub fn demo_master_key() -> ekey_proto::keys::MasterKey {
    ekey_proto::keys::MasterKey::from_bytes([0x4d; 32])
}

/// Faults a software key injects now and then, for tests of the host
/// (`ekey-host emulate --fault-…`). Zero means never.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultPlan {
    /// Corrupt the MAC of every Nth frame (entropy frames only, so that a
    /// lost `K!` does not make a whole session unreadable).
    pub corrupt_every: u64,
    /// Send garbage before every Nth frame.
    pub garbage_every: u64,
    /// Send every Nth entropy frame twice.
    pub replay_every: u64,
    /// Enter this failure mode (its character, e.g. `3`) at once.
    pub failure_mode: Option<u8>,
    /// Spoil the noise the key encrypts (tests of the health gate).
    pub noise: NoiseFault,
    /// Report this core temperature (tenths of a kelvin) instead of 315.0 K.
    pub temperature: Option<u32>,
}

/// Bad noise a software key can be told to produce, so that the host's
/// health gate can be shown to catch it. The frames stay authentic: only
/// what is inside them is bad, as with a failing generator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NoiseFault {
    /// Good noise.
    #[default]
    None,
    /// Every byte is this value.
    Stuck(u8),
    /// Each bit is 1 with probability 9/16.
    Biased,
    /// The same 32 bytes over and over.
    Repeat,
}

impl std::str::FromStr for NoiseFault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(NoiseFault::None),
            "biased" => Ok(NoiseFault::Biased),
            "repeat" => Ok(NoiseFault::Repeat),
            _ => match s.strip_prefix("stuck") {
                Some(v) => {
                    let v = v.trim_start_matches(['=', ':']);
                    let v = v.strip_prefix("0x").unwrap_or(v);
                    let b = if v.is_empty() {
                        0
                    } else {
                        u8::from_str_radix(v, 16).map_err(|e| format!("stuck byte: {e}"))?
                    };
                    Ok(NoiseFault::Stuck(b))
                }
                None => Err(format!(
                    "unknown noise fault {s:?} (none, stuck[=HEX], biased, repeat)"
                )),
            },
        }
    }
}

/// The software key's noise: scripted bytes first (tests), then the OS
/// generator (or a seeded ChaCha20, for tests that need to know the stream
/// in advance), spoiled as `fault` says.
struct Noise {
    script: std::collections::VecDeque<u8>,
    os: rand_core::UnwrapErr<getrandom::SysRng>,
    seeded: Option<rand_chacha::ChaCha20Rng>,
    fault: NoiseFault,
    last: [u8; 32],
    have_last: bool,
}

impl Noise {
    fn raw(&mut self, dst: &mut [u8]) {
        use rand_core::Rng;
        match &mut self.seeded {
            Some(c) => c.fill_bytes(dst),
            None => self.os.fill_bytes(dst),
        }
    }
}

impl rand_core::TryRng for Noise {
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
        let scripted = dst.len().min(self.script.len());
        let (head, tail) = dst.split_at_mut(scripted);
        for (d, b) in head.iter_mut().zip(self.script.drain(..scripted)) {
            *d = b;
        }
        if tail.is_empty() {
            return Ok(());
        }
        match self.fault {
            NoiseFault::None => self.raw(tail),
            NoiseFault::Stuck(b) => tail.fill(b),
            NoiseFault::Biased => {
                let mut extra = vec![0u8; tail.len() * 3];
                self.raw(tail);
                self.raw(&mut extra);
                for (d, e) in tail.iter_mut().zip(extra.chunks_exact(3)) {
                    // P(bit = 1) = 1 - 1/2 · 7/8 = 9/16.
                    *d |= e[0] & e[1] & e[2];
                }
            }
            NoiseFault::Repeat => {
                if !self.have_last {
                    let mut first = [0u8; 32];
                    self.raw(&mut first);
                    self.last = first;
                    self.have_last = true;
                }
                for (d, b) in tail.iter_mut().zip(self.last.iter().cycle()) {
                    *d = *b;
                }
            }
        }
        Ok(())
    }
}

/// A software key in this process.
pub struct SoftKey {
    device: Device,
    noise: Noise,
    plan: FaultPlan,
    frames: u64,
    /// Faults held back until `trigger` is set.
    held: Option<(FaultPlan, std::sync::Arc<std::sync::atomic::AtomicBool>)>,
}

impl SoftKey {
    /// The demo key.
    pub fn demo() -> Self {
        let mut config = DeviceConfig::new(DEMO_SERIAL, demo_long_term_key());
        config.master_key = Some(demo_master_key());
        Self::new(config)
    }

    /// A software key with this configuration.
    pub fn new(config: DeviceConfig) -> Self {
        SoftKey {
            device: Device::new(config),
            noise: Noise {
                script: std::collections::VecDeque::new(),
                os: rand_core::UnwrapErr(getrandom::SysRng),
                seeded: None,
                fault: NoiseFault::None,
                last: [0; 32],
                have_last: false,
            },
            plan: FaultPlan::default(),
            frames: 0,
            held: None,
        }
    }

    /// Bytes the key's noise source yields first (so a test can make the
    /// key's device entropy a known value); the OS generator after them.
    pub fn script_noise(&mut self, bytes: &[u8]) {
        self.noise.script.extend(bytes);
    }

    /// Takes noise from ChaCha20 with this seed instead of the OS
    /// generator: the same seed gives the same stream (tests that must know
    /// what the key will send, e.g. a stream known to pass the health
    /// tests).
    pub fn seed_noise(&mut self, seed: [u8; 32]) {
        use rand_core::SeedableRng;
        self.noise.seeded = Some(rand_chacha::ChaCha20Rng::from_seed(seed));
    }

    /// The long-term key in the key's "flash".
    pub fn long_term_key(&self) -> &LongTermKey {
        self.device.long_term_key()
    }

    /// Sets the faults to inject.
    pub fn set_faults(&mut self, plan: FaultPlan) {
        self.plan = plan;
        self.noise.fault = plan.noise;
        if let Some(t) = plan.temperature {
            self.device
                .set_temperature(ekey_proto::wire::info::Temperature { deci_kelvin: t });
        }
        if let Some(c) = plan.failure_mode {
            self.device.faults_mut().failure_mode =
                Some(ekey_proto::wire::info::FailureMode::from_char(c));
        }
    }

    /// Sets the faults to inject once `trigger` is set (checked before
    /// each frame), e.g. by a signal handler: a key that starts well and
    /// fails while running.
    pub fn set_faults_when(
        &mut self,
        plan: FaultPlan,
        trigger: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        self.held = Some((plan, trigger));
    }

    /// Bytes from the host.
    pub fn write(&mut self, bytes: &[u8]) {
        self.device.handle_input(bytes, &mut self.noise);
    }

    /// One frame slot's output, if the key has something to say.
    pub fn poll(&mut self) -> Option<Output> {
        if self
            .held
            .as_ref()
            .is_some_and(|(_, t)| t.load(std::sync::atomic::Ordering::Acquire))
            && let Some((plan, _)) = self.held.take()
        {
            tracing::info!("software key: faults armed");
            self.set_faults(plan);
        }
        self.frames += 1;
        let n = self.frames;
        let every = |k: u64| k != 0 && n.is_multiple_of(k);
        let f = self.device.faults_mut();
        if every(self.plan.corrupt_every) {
            // At most one pending: an unkeyed key must not save corruptions
            // up for its first entropy frames.
            f.corrupt_entropy_macs = 1;
        }
        if every(self.plan.garbage_every) {
            f.garbage = 1 + (n % 90) as usize;
        }
        if every(self.plan.replay_every) {
            f.replay_next = true;
        }
        self.device.poll(&mut self.noise)
    }

    /// The key's serial.
    pub fn serial(&self) -> Serial {
        self.device.serial()
    }
}

/// Frame slot length for a software key that should deliver about `rate`
/// bytes of entropy a second (32 bytes a frame).
pub fn slot_for_rate(rate: u32) -> std::time::Duration {
    std::time::Duration::from_secs_f64(32.0 / f64::from(rate.max(1)))
}

/// Serves `key` on `link` until the link closes: commands in, one frame per
/// `slot` out. Every plaintext block sent with an intact MAC is appended to
/// `record`, in order (once, even when the frame is replayed).
pub async fn serve<L>(
    link: &mut L,
    key: &mut SoftKey,
    slot: std::time::Duration,
    mut record: Option<&mut (dyn std::io::Write + Send)>,
) -> std::io::Result<()>
where
    L: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Timers have millisecond resolution: faster keys send a few frames
    // per tick.
    let per_tick = (std::time::Duration::from_millis(1).as_nanos() / slot.as_nanos().max(1)).max(1);
    let per_tick = u32::try_from(per_tick).unwrap_or(u32::MAX);
    let mut tick = tokio::time::interval(slot * per_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            r = link.read(&mut buf) => {
                let n = r?;
                if n == 0 {
                    return Ok(());
                }
                key.write(&buf[..n]);
            }
            _ = tick.tick() => for _ in 0..per_tick {
                if let Some(o) = key.poll() {
                    if let (Some(sent), Some(rec)) = (o.entropy, record.as_deref_mut())
                        && sent.authentic
                    {
                        rec.write_all(&sent.data)?;
                        rec.flush()?;
                    }
                    link.write_all(&o.bytes).await?;
                    link.flush().await?;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_keys_read_as_documented() {
        assert_eq!(DEMO_SERIAL.to_string(), "RW11bGF0ZWRLZXkx");
        assert_eq!(
            &demo_long_term_key().to_pem()[..],
            b"Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4="
        );
        let printed = ekey_proto::rekey::print_master_key(&demo_master_key());
        assert_eq!(
            &printed[..],
            b"TU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU1NTU2T"
        );
    }
}
