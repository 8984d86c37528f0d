//! usb-fw: an Entropy Key as a usb-device firmware on a Cortex-M3.
//!
//! `ekey_proto::usb_class::EntropyKeyClass` (the software key behind the
//! real key's CDC-ACM interfaces) and a `UsbDevice` set up as the real key
//! (`usb_class::device_builder`), over `register_bus::RegisterBus`, a
//! stand-in for a peripheral driver whose registers are opaque statics.
//! Built for its size; on QEMU it idles (no host, no events).

#![no_std]
#![no_main]
// No unsafe code of our own (cortex-m-rt's `#[entry]` expansion has its
// own, turning the `static mut`s below into `&'static mut`s).
#![deny(unsafe_code)]

use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use ekey_embedded::register_bus::RegisterBus;
use ekey_embedded::xorshift::XorShift32;
use ekey_embedded::{fixture, sink};
use ekey_proto::device::DeviceConfig;
use ekey_proto::keys::{LongTermKey, SERIAL_PEM_LEN, Serial};
use ekey_proto::usb_class::{self, EntropyKeyClass, Pacing};
use panic_halt as _;
use usb_device::bus::UsbBusAllocator;
use usb_device::device::UsbDevice;

type Class = EntropyKeyClass<'static, RegisterBus>;

#[entry]
fn main() -> ! {
    // Statics, not locals: the class and the device borrow the allocator
    // and the serial string for 'static, and the state stays off the stack
    // (as in device-fw; `MaybeUninit` keeps it in .bss).
    static mut ALLOC: MaybeUninit<UsbBusAllocator<RegisterBus>> = MaybeUninit::uninit();
    static mut SERIAL_STRING: MaybeUninit<heapless::String<SERIAL_PEM_LEN>> = MaybeUninit::uninit();
    static mut CLASS: MaybeUninit<Class> = MaybeUninit::uninit();
    static mut USB: MaybeUninit<UsbDevice<'static, RegisterBus>> = MaybeUninit::uninit();

    let serial = Serial(fixture::SERIAL);
    let alloc: &'static UsbBusAllocator<RegisterBus> =
        ALLOC.write(UsbBusAllocator::new(RegisterBus::new()));
    let serial_string: &'static str = SERIAL_STRING.write(usb_class::serial_string(&serial));
    let config = DeviceConfig::new(serial, LongTermKey::from_bytes(fixture::LONG_TERM_KEY));
    let Ok(class) = EntropyKeyClass::new(alloc, config, Pacing::HostDriven) else {
        panic!("endpoint allocation failed");
    };
    let class: &'static mut Class = CLASS.write(class);
    let Ok(builder) = usb_class::device_builder(alloc, serial_string) else {
        panic!("device builder");
    };
    let usb = USB.write(builder.build());
    // A real key reads a hardware noise source here.
    let mut noise = XorShift32::new(fixture::NOISE_SEED);
    loop {
        usb.poll(&mut [&mut *class]);
        if let Ok(act) = class.run(&mut noise) {
            for _ in 0..act.slots {
                sink::frame_slot();
            }
        }
    }
}
