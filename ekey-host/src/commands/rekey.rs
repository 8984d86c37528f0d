//! `ekey-host rekey`: give a key a new long-term key.

use std::io::{self, IsTerminal};
use std::time::Duration;

use crate::cli::RekeyArgs;
use crate::daemon::control;
use crate::daemon::sleep_until_opt;
use crate::keyring::{self, Keyring};
use crate::keys::driver::{self};
use crate::keys::transport::{self, Link};
use crate::keys::usb;
#[cfg(not(unix))]
use crate::nounix::UnixStream;
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rekey::parse_master_key;
use tokio::io::AsyncWriteExt;
#[cfg(unix)]
use tokio::net::UnixStream;
use tracing::warn;

/// The master key from the option, a file, or a prompt (no echo).
pub(crate) fn read_master_key(args: &RekeyArgs) -> Result<ekey_proto::keys::MasterKey, String> {
    let text = zeroize::Zeroizing::new(match (&args.master_key, &args.master_key_file) {
        (Some(k), _) => {
            warn!(
                "--master-key: other users can read this command line (ps); --master-key-file or the prompt keep the key private"
            );
            k.clone()
        }
        (None, Some(f)) if f.as_os_str() == "-" => {
            // Room enough that no reallocation leaves a copy behind.
            let mut text = String::with_capacity(1024);
            io::Read::read_to_string(&mut io::stdin().lock(), &mut text)
                .map_err(|e| format!("cannot read the master key from standard input: {e}"))?;
            text
        }
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
        }
        (None, None) => {
            if !io::stdin().is_terminal() {
                return Err("no master key: give --master-key, --master-key-file, or run on a terminal to be asked".into());
            }
            rpassword::prompt_password("Master key (as printed on the card): ")
                .map_err(|e| format!("cannot read the master key: {e}"))?
        }
    });
    parse_master_key(text.trim()).map_err(|e| e.to_string())
}

/// Which key to re-key: the device given, or the one on USB.
pub(crate) async fn rekey_target(
    args: &RekeyArgs,
) -> Result<(Link, String, Option<Serial>), String> {
    let wanted: Option<Serial> = match &args.serial {
        Some(s) => Some(s.parse().map_err(|e| format!("--serial: {e}"))?),
        None => None,
    };
    if let Some(path) = &args.device {
        let link = transport::open_path(path)
            .await
            .map_err(|e| e.to_string())?;
        return Ok((link, path.display().to_string(), wanted));
    }
    let keys = usb::list()
        .await
        .map_err(|e| format!("{e}; give --device PATH for a key on a tty or socket"))?;
    let matching: Vec<_> = keys
        .into_iter()
        .filter(|k| wanted.is_none_or(|w| k.serial_number() == Some(w.to_string().as_str())))
        .collect();
    match matching.as_slice() {
        [] => Err(match wanted {
            Some(w) => format!("no key with serial {w} is attached"),
            None => "no Entropy Key (USB 20df:0001) is attached".into(),
        }),
        [one] => {
            let (link, _dev) = usb::open(one).await.map_err(|e| e.to_string())?;
            let serial = one.serial_number().and_then(|s| s.parse().ok()).or(wanted);
            Ok((link, usb::describe(one), serial))
        }
        several => {
            let mut msg = String::from("several keys are attached; choose one with --serial:");
            for k in several {
                msg.push_str(&format!(
                    "\n  {}  {}",
                    k.serial_number().unwrap_or("?"),
                    usb::describe(k)
                ));
            }
            Err(msg)
        }
    }
}

/// Fixed nonce for tests (`--nonce`), else the OS generator.
pub(crate) struct NonceSource(Option<[u8; 12]>);

impl rand_core::TryRng for NonceSource {
    type Error = getrandom::Error;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        rand_core::TryRng::try_next_u32(&mut getrandom::SysRng)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        rand_core::TryRng::try_next_u64(&mut getrandom::SysRng)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        match self.0.take() {
            Some(n) if n.len() == dst.len() => {
                dst.copy_from_slice(&n);
                Ok(())
            }
            _ => rand_core::TryRng::try_fill_bytes(&mut getrandom::SysRng, dst),
        }
    }
}
impl rand_core::TryCryptoRng for NonceSource {}

pub(crate) async fn rekey_command(args: RekeyArgs) -> Result<(), String> {
    // Everything that can be refused is refused before the key is touched.
    let master = read_master_key(&args)?;
    let nonce = match &args.nonce {
        Some(h) => Some(
            hex::decode(h.trim())
                .ok()
                .and_then(|v| <[u8; 12]>::try_from(v).ok())
                .ok_or("--nonce: 24 hex digits")?,
        ),
        None => None,
    };
    let mut ring = load_keyring(&args)?;
    // The release lasts while the held control connection stays open: if
    // this process dies, the daemon takes the key back by itself.
    let held = ask_release(&args).await?;
    let result = tokio::select! {
        r = rekey_exchange(&args, master, nonce, ring.as_mut()) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted; if an L command had reached the key, run the re-key again".into()),
    };
    if let Some((t, _)) = &held
        && let Err(e) = control::request(&args.control, &format!("resume {t}")).await
    {
        eprintln!("ekey-host: could not tell the daemon to take the key back: {e}");
    }
    drop(held);
    let (serial, key) = result?;
    match ring {
        None => {
            println!("{serial} {}", String::from_utf8_lossy(&key.to_pem()[..]));
            eprintln!("key {serial}: long-term key updated (not stored: --no-keyring)");
        }
        Some(_) => {
            println!(
                "key {serial}: long-term key updated (keyring {})",
                args.keyring.display()
            );
        }
    }
    Ok(())
}

/// The keyring to update, unless `--no-keyring`; a missing file is an
/// empty keyring, an unreadable one an error.
fn load_keyring(args: &RekeyArgs) -> Result<Option<Keyring>, String> {
    if args.no_keyring {
        return Ok(None);
    }
    Ok(Some(match Keyring::load(&args.keyring) {
        Ok(r) => r,
        Err(keyring::KeyringError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            Keyring::new()
        }
        Err(e) => {
            return Err(format!(
                "{e}\n(the keyring is rewritten after a re-key: fix it first)"
            ));
        }
    }))
}

/// Asks a running daemon to let go of the key, and to take it back after:
/// the target named in the release and the control connection that holds
/// it, or nothing if no daemon listens (or the key cannot be named).
async fn ask_release(args: &RekeyArgs) -> Result<Option<(String, UnixStream)>, String> {
    let target = match (&args.device, &args.serial) {
        (Some(p), _) => Some(p.display().to_string()),
        (None, Some(s)) => Some(s.clone()),
        (None, None) => usb::list().await.ok().and_then(|k| {
            (k.len() == 1)
                .then(|| k[0].serial_number().map(str::to_owned))
                .flatten()
        }),
    };
    let Some(t) = target else {
        return Ok(None);
    };
    match control::hold(&args.control, &format!("release {t}")).await {
        Ok((a, conn)) if a.starts_with("ok") => Ok(Some((t, conn))),
        Ok((a, _)) => Err(format!(
            "the running daemon could not let go of the key: {}",
            a.trim()
        )),
        // No daemon listening there: nothing holds the key.
        Err(control::ControlError::Unreachable { source, .. })
            if matches!(
                source.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(format!(
            "cannot ask the running daemon to let go of the key: {e}"
        )),
    }
}

/// The exchange itself; on success the keyring (if any) is written.
pub(crate) async fn rekey_exchange(
    args: &RekeyArgs,
    master: ekey_proto::keys::MasterKey,
    nonce: Option<[u8; 12]>,
    ring: Option<&mut Keyring>,
) -> Result<(Serial, LongTermKey), String> {
    use ekey_proto::rekey::{LongTermRekey, RekeyConfig};
    use tokio::io::AsyncReadExt;
    let (mut link, where_, expected) = rekey_target(args).await?;
    driver::drain(
        &mut link,
        Duration::from_millis(50),
        Duration::from_millis(500),
    )
    .await
    .map_err(|e| format!("{where_}: {e}"))?;
    let base = tokio::time::Instant::now();
    let now = || ekey_proto::time::Instant::from_millis(base.elapsed().as_millis() as u64);
    let config = RekeyConfig {
        expected_serial: expected,
        ..RekeyConfig::default()
    };
    let mut proc = LongTermRekey::new(config, master, now(), &mut NonceSource(nonce))
        .map_err(|e| format!("no random nonce: {e}"))?;
    let mut buf = [0u8; 1024];
    let outcome = loop {
        while let Some(t) = proc.poll_transmit() {
            link.write_all(&t)
                .await
                .map_err(|e| format!("{where_}: {e}"))?;
            link.flush().await.map_err(|e| format!("{where_}: {e}"))?;
        }
        if let Some(o) = proc.take_outcome() {
            break o;
        }
        let deadline = proc
            .poll_timeout()
            .map(|t| base + Duration::from_millis(t.millis()));
        tokio::select! {
            r = link.read(&mut buf) => {
                let n = r.map_err(|e| format!("{where_}: {e}"))?;
                if n == 0 {
                    return Err(format!("{where_}: the key went away during the re-key"));
                }
                let mut input = &buf[..n];
                while !input.is_empty() {
                    let used = proc.handle_input(now(), input);
                    input = &input[used..];
                }
            }
            _ = sleep_until_opt(deadline) => proc.handle_timeout(now()),
        }
    };
    outcome_result(outcome, ring, &args.keyring)
}

/// What the re-key's `outcome` means: the key's new long-term key, stored
/// in `ring` (if any, written to `keyring_path`), or why there is none.
fn outcome_result(
    outcome: ekey_proto::rekey::RekeyOutcome,
    ring: Option<&mut Keyring>,
    keyring_path: &std::path::Path,
) -> Result<(Serial, LongTermKey), String> {
    use ekey_proto::rekey::RekeyOutcome;
    match outcome {
        RekeyOutcome::Done { serial, key } => {
            if let Some(ring) = ring {
                ring.set(serial, key.clone());
                ring.save(keyring_path).map_err(|e| {
                    format!(
                        "key {serial} has a new long-term key, but the keyring could not be written: {e}; \
                         run the re-key again once the keyring is writable"
                    )
                })?;
            }
            Ok((serial, key))
        }
        RekeyOutcome::Refused {
            serial,
            refusal,
            text,
        } => Err(format!(
            "key {serial} refused the long-term re-key: {refusal} (key says: {text}); keyring unchanged"
        )),
        RekeyOutcome::WrongSerial { expected, found } => Err(format!(
            "the key answering is {found}, not {expected}; nothing changed"
        )),
        RekeyOutcome::NonceLength { received } => Err(format!(
            "the key received {received} nonce bytes of 12; it may now hold a long-term key nobody knows: run the re-key again"
        )),
        RekeyOutcome::TimedOut {
            step,
            key_may_have_changed,
        } => Err(if key_may_have_changed {
            format!(
                "no answer from the key ({step}); it may have taken a new long-term key whose reply was lost: run the re-key again"
            )
        } else {
            format!("no answer from the key ({step}); nothing changed")
        }),
    }
}
