//! `ekey-host list`: the keys on USB, and whether the keyring knows them.

use std::path::Path;

use crate::keyring::Keyring;
use crate::keys::usb;
use ekey_proto::keys::Serial;

pub(crate) async fn list_command(keyring_path: &Path) -> Result<(), String> {
    let ring = match Keyring::load(keyring_path) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("ekey-host: {e}");
            None
        }
    };
    let keys = usb::list().await.map_err(|e| e.to_string())?;
    if keys.is_empty() {
        println!("no Entropy Key (USB 20df:0001) attached");
        return Ok(());
    }
    for k in keys {
        let serial = k.serial_number().unwrap_or("(no serial)");
        let in_ring = match (&ring, serial.parse::<Serial>()) {
            (Some(r), Ok(s)) if r.contains(&s) => "long-term key in keyring",
            (Some(_), Ok(_)) => "NOT in keyring: run `ekey-host rekey`",
            (None, _) => "keyring unreadable",
            (_, Err(_)) => "serial is not a valid Entropy Key serial",
        };
        println!("{serial}  {}  {in_ring}", usb::describe(&k));
    }
    Ok(())
}
