//! `cfg(usb)`: the target has a raw USB backend (nusb runs on Linux, macOS
//! and Windows; on the BSDs keys come through their tty).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(usb)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if matches!(os.as_str(), "linux" | "macos" | "windows") {
        println!("cargo::rustc-cfg=usb");
    }
}
