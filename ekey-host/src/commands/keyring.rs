//! `ekey-host keyring`: show and edit the keyring.

use std::path::Path;

use crate::cli::KeyringAction;
use crate::keyring::{self, Keyring};
use crate::keys::usb;
use ekey_proto::keys::Serial;

pub(crate) async fn keyring_command(action: KeyringAction, path: &Path) -> Result<(), String> {
    match action {
        KeyringAction::List => {
            let ring = Keyring::load(path).map_err(|e| e.to_string())?;
            let attached: Option<Vec<String>> = usb::list().await.ok().map(|k| {
                k.iter()
                    .filter_map(|d| d.serial_number().map(str::to_owned))
                    .collect()
            });
            for serial in ring.serials() {
                let s = serial.to_string();
                let now = match &attached {
                    Some(a) if a.contains(&s) => "attached",
                    Some(_) => "not attached",
                    None => "attached: unknown (no USB here)",
                };
                println!("{s}  {now}");
            }
            Ok(())
        }
        KeyringAction::Check => {
            let ring = Keyring::load(path).map_err(|e| e.to_string())?;
            for w in ring.warnings() {
                eprintln!("warning: {w}");
            }
            if let Ok(Some(w)) = keyring::check_permissions(path) {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: {} keys, every line valid",
                path.display(),
                ring.serials().len()
            );
            Ok(())
        }
        KeyringAction::Remove { serial } => {
            let serial: Serial = serial.parse().map_err(|e| format!("serial: {e}"))?;
            let mut ring = Keyring::load(path).map_err(|e| e.to_string())?;
            if !ring.remove(&serial) {
                return Err(format!("{} has no key for {serial}", path.display()));
            }
            ring.save(path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("removed {serial} from {}", path.display());
            Ok(())
        }
    }
}
