//! device-fw: the key's side of the Entropy Key protocol on a Cortex-M3.
//!
//! A `Device` with an xorshift noise source reads the host's recorded
//! commands (a reset, then `K` and a nonce; an opaque static slice: see
//! `transcript`) and sends its frames, byte by byte, to `sink::TX_DATA`.
//! Every `SLOTS_PER_CYCLE` frame slots it is power-cycled, forever.

#![no_std]
#![no_main]
// No unsafe code of our own. (cortex-m-rt's `#[entry]` expansion has its
// own, turning the `static mut` below into a `&'static mut`; the lint does
// not apply to it.)
#![deny(unsafe_code)]

use core::hint::black_box;
use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use ekey_embedded::xorshift::XorShift32;
use ekey_embedded::{device_app, fixture, sink, transcript};
use ekey_proto::device::Device;
use panic_halt as _;

#[entry]
fn main() -> ! {
    // cortex-m-rt turns this into a `&'static mut` (safe: `main` runs once),
    // so the device lives in static RAM, not on the stack. `MaybeUninit`
    // rather than `Option`: `Option::<Device>::None` is not all zero bytes,
    // so it would land in .data and cost its full size in flash as well.
    static mut DEVICE: MaybeUninit<Device> = MaybeUninit::uninit();

    let device: &'static mut Device = DEVICE.write(device_app::new_device());
    // A real key reads a hardware noise source here.
    let mut noise = XorShift32::new(fixture::NOISE_SEED);
    loop {
        // black_box: the optimiser must treat the commands as unknown bytes.
        let commands = black_box(transcript::HOST_TO_KEY);
        let slots = device_app::run(
            device,
            &mut noise,
            commands,
            device_app::SLOTS_PER_CYCLE,
            |out| {
                sink::transmit(&out.bytes);
                sink::frame_slot();
            },
        );
        black_box(slots);
        // Power-cycle: assigning drops (and so zeroizes) the old keys.
        *device = device_app::new_device();
    }
}
