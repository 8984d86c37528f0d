//! `cfg(usb)`: the target has a raw USB backend (nusb runs on Linux, macOS
//! and Windows; on the BSDs keys come through their tty).
//! `cfg(vhost_user)`: vhost-user-rng is built (Linux, with the `vhost-user`
//! feature).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(usb)");
    println!("cargo::rustc-check-cfg=cfg(vhost_user)");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if matches!(os.as_str(), "linux" | "macos" | "windows") {
        println!("cargo::rustc-cfg=usb");
    }
    if os == "linux" && std::env::var_os("CARGO_FEATURE_VHOST_USER").is_some() {
        println!("cargo::rustc-cfg=vhost_user");
    }
}
