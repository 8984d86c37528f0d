//! usb-fw's stand-in for a USB peripheral driver: a [`UsbBus`] whose
//! "registers" are statics (see [`sink`](crate::sink) for why every access
//! goes through `black_box`).
//!
//! It is not a driver and no host ever talks to it; it exists so that the
//! firmware links usb-device's control pipe, the class and the software key
//! with every path reachable, as with a real peripheral whose registers the
//! compiler cannot predict. A real driver (e.g. `stm32-usbd`) does more
//! work per call (packet memory, endpoint registers): count a few KB more.
//! With all registers zero (QEMU, or reset values) nothing ever happens:
//! `poll` reports no events and the device stays unconfigured.

use core::hint::black_box;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

use usb_device::bus::{PollResult, UsbBus};
use usb_device::endpoint::{EndpointAddress, EndpointType};
use usb_device::{Result, UsbDirection, UsbError};

/// Event register: bit 31 reset, bit 30 suspend, bit 29 resume; bits 0-15
/// OUT packet received per endpoint, bits 16-28 IN complete (EP0-12).
pub static EVENTS: AtomicU32 = AtomicU32::new(0);
/// SETUP received, per endpoint (bits 0-15).
pub static SETUP: AtomicU32 = AtomicU32::new(0);
/// Length of the received packet (any endpoint), in bytes.
pub static RX_LEN: AtomicU32 = AtomicU32::new(0);
/// The received packet, 64 bytes as 16 little-endian words.
pub static RX_BUF: [AtomicU32; 16] = [const { AtomicU32::new(0) }; 16];
/// IN endpoints with a packet not yet collected (bit n: EP n).
pub static TX_BUSY: AtomicU32 = AtomicU32::new(0);
/// Stalled endpoints (bits 0-15 OUT, 16-31 IN).
pub static STALLED: AtomicU32 = AtomicU32::new(0);
/// The device address.
pub static ADDRESS: AtomicU32 = AtomicU32::new(0);

/// The fake peripheral. Tracks endpoint allocation only.
pub struct RegisterBus {
    allocated_in: u16,
    allocated_out: u16,
}

impl RegisterBus {
    /// A bus with no endpoints allocated.
    pub const fn new() -> Self {
        RegisterBus {
            allocated_in: 0,
            allocated_out: 0,
        }
    }
}

impl Default for RegisterBus {
    fn default() -> Self {
        Self::new()
    }
}

fn stall_bit(ep: EndpointAddress) -> u32 {
    let shift = ep.index() as u32 + if ep.is_in() { 16 } else { 0 };
    1u32 << (shift & 31)
}

impl UsbBus for RegisterBus {
    fn alloc_ep(
        &mut self,
        dir: UsbDirection,
        addr: Option<EndpointAddress>,
        _ty: EndpointType,
        max_packet_size: u16,
        _interval: u8,
    ) -> Result<EndpointAddress> {
        if max_packet_size > 64 {
            return Err(UsbError::EndpointMemoryOverflow);
        }
        let mask = match dir {
            UsbDirection::In => &mut self.allocated_in,
            UsbDirection::Out => &mut self.allocated_out,
        };
        let index = match addr {
            Some(a) if a.index() < 8 && *mask & (1 << a.index()) == 0 => a.index(),
            Some(_) => return Err(UsbError::InvalidEndpoint),
            None => (1..8)
                .find(|&i| *mask & (1 << i) == 0)
                .ok_or(UsbError::EndpointOverflow)?,
        };
        *mask |= 1 << index;
        Ok(EndpointAddress::from_parts(index, dir))
    }

    fn enable(&mut self) {}

    fn reset(&self) {
        black_box(&TX_BUSY).store(0, Relaxed);
        black_box(&STALLED).store(0, Relaxed);
        black_box(&ADDRESS).store(0, Relaxed);
    }

    fn set_device_address(&self, addr: u8) {
        black_box(&ADDRESS).store(u32::from(addr), Relaxed);
    }

    fn write(&self, ep: EndpointAddress, buf: &[u8]) -> Result<usize> {
        if buf.len() > 64 {
            return Err(UsbError::BufferOverflow);
        }
        let bit = 1u32 << (ep.index() & 15);
        let busy = black_box(&TX_BUSY);
        if busy.load(Relaxed) & bit != 0 {
            return Err(UsbError::WouldBlock);
        }
        crate::sink::transmit(buf);
        busy.fetch_or(bit, Relaxed);
        Ok(buf.len())
    }

    fn read(&self, ep: EndpointAddress, buf: &mut [u8]) -> Result<usize> {
        let bit = 1u32 << (ep.index() & 15);
        let setup = black_box(&SETUP).load(Relaxed) & bit != 0;
        let events = black_box(&EVENTS);
        if !setup && events.load(Relaxed) & bit == 0 {
            return Err(UsbError::WouldBlock);
        }
        let len = if setup {
            8
        } else {
            (black_box(&RX_LEN).load(Relaxed) as usize).min(64)
        };
        if len > buf.len() {
            return Err(UsbError::BufferOverflow);
        }
        let words = black_box(&RX_BUF);
        for (i, b) in buf.iter_mut().take(len).enumerate() {
            let word = words.get(i / 4).map_or(0, |w| w.load(Relaxed));
            *b = word.to_le_bytes().get(i % 4).copied().unwrap_or(0);
        }
        if setup {
            black_box(&SETUP).fetch_and(!bit, Relaxed);
        } else {
            events.fetch_and(!bit, Relaxed);
        }
        Ok(len)
    }

    fn set_stalled(&self, ep: EndpointAddress, stalled: bool) {
        let reg = black_box(&STALLED);
        if stalled {
            reg.fetch_or(stall_bit(ep), Relaxed);
        } else {
            reg.fetch_and(!stall_bit(ep), Relaxed);
        }
    }

    fn is_stalled(&self, ep: EndpointAddress) -> bool {
        black_box(&STALLED).load(Relaxed) & stall_bit(ep) != 0
    }

    fn suspend(&self) {}

    fn resume(&self) {}

    fn poll(&self) -> PollResult {
        let events = black_box(&EVENTS).swap(0, Relaxed);
        let setup = black_box(&SETUP).load(Relaxed) as u16;
        if events & (1 << 31) != 0 {
            return PollResult::Reset;
        }
        if events & (1 << 30) != 0 {
            return PollResult::Suspend;
        }
        if events & (1 << 29) != 0 {
            return PollResult::Resume;
        }
        let ep_out = events as u16;
        let ep_in_complete = ((events >> 16) & 0x1fff) as u16;
        if ep_in_complete != 0 {
            black_box(&TX_BUSY).fetch_and(!u32::from(ep_in_complete), Relaxed);
        }
        // OUT data stays reported until read.
        black_box(&EVENTS).fetch_or(u32::from(ep_out), Relaxed);
        if ep_out | ep_in_complete | setup == 0 {
            PollResult::None
        } else {
            PollResult::Data {
                ep_out,
                ep_in_complete,
                ep_setup: setup,
            }
        }
    }
}
