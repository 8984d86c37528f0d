//! `ekey-host emulate`: the built-in software key on a pty, a Unix socket or a tty.

use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use crate::cli::EmulateArgs;
use crate::keys::soft::{self, SoftKey, demo_long_term_key};
use crate::keys::transport::{self};
use crate::outputs::file::create_private;
use ekey_proto::device::DeviceConfig;
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rekey::parse_master_key;
use tracing::{info, warn};

pub(crate) async fn emulate(args: EmulateArgs) -> Result<(), String> {
    let mut key = soft_key(&args)?;
    let EmulateArgs {
        pty,
        unix,
        tty,
        rate,
        record,
        ..
    } = args;
    let mut rec: Option<Box<dyn Write + Send>> = match &record {
        Some(p) => Some(Box::new(create_private(p).map_err(|e| e.to_string())?)),
        None => None,
    };
    let slot = soft::slot_for_rate(rate);
    let rec = rec.as_deref_mut().map(|w| w as _);
    if let Some(path) = tty {
        return serve_tty(&path, &mut key, slot, rec).await;
    }
    if pty {
        serve_pty(&mut key, slot, rec).await
    } else {
        let path = unix.ok_or("give --pty or --unix PATH")?;
        serve_unix(&path, &mut key, slot, rec).await
    }
}

/// The software key the options describe: its serial, keys, faults and
/// noise.
fn soft_key(args: &EmulateArgs) -> Result<SoftKey, String> {
    let plan = soft::FaultPlan {
        corrupt_every: args.fault_corrupt_every,
        garbage_every: args.fault_garbage_every,
        replay_every: args.fault_replay_every,
        failure_mode: args.fault_failure_mode.map(|c| c as u8),
        noise: args.fault_noise.unwrap_or_default(),
        temperature: args.fault_temperature,
    };
    let serial: Serial = args
        .serial
        .parse()
        .map_err(|e| format!("--serial: {e} (16 PEM64 characters)"))?;
    let ltk = match &args.long_term_key {
        Some(k) => LongTermKey::from_pem(k.trim().as_bytes())
            .map_err(|e| format!("--long-term-key: {e} (44 PEM64 characters)"))?,
        None => demo_long_term_key(),
    };
    let mut config = DeviceConfig::new(serial, ltk);
    config.master_key = Some(match &args.master_key {
        Some(m) => parse_master_key(m).map_err(|e| format!("--master-key: {e}"))?,
        None => soft::demo_master_key(),
    });
    let mut key = SoftKey::new(config);
    if args.fault_on_usr1 {
        let now = soft::FaultPlan {
            failure_mode: None,
            temperature: None,
            ..plan
        };
        key.set_faults(now);
        key.set_faults_when(plan, on_usr1()?);
    } else {
        key.set_faults(plan);
    }
    if let Some(h) = &args.noise_seed {
        let seed: [u8; 32] = hex::decode(h.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("--noise-seed: 64 hex digits")?;
        key.seed_noise(seed);
    }
    if let Some(h) = &args.noise_prefix {
        key.script_noise(&hex::decode(h.trim()).map_err(|e| format!("--noise-prefix: {e}"))?);
    }
    Ok(key)
}

/// `emulate --pty`: serves the key on a new pty (its path on standard
/// output) until the other side hangs up or Ctrl-C.
async fn serve_pty(
    key: &mut SoftKey,
    slot: Duration,
    rec: Option<&mut (dyn Write + Send)>,
) -> Result<(), String> {
    let (mut master, path) =
        transport::open_pty().map_err(|e| format!("cannot create a pty: {e}"))?;
    println!("{}", path.display());
    let _ = io::stdout().flush();
    info!("software key {} on {}", key.serial(), path.display());
    tokio::select! {
        r = soft::serve(&mut master, key, slot, rec) => {
            r.map_err(|e| format!("pty: {e}"))
        }
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// `emulate --unix`: serves the key to one client at a time on a Unix
/// socket at `path` (replacing a stale socket there) until a signal, then
/// removes the socket.
async fn serve_unix(
    path: &Path,
    key: &mut SoftKey,
    slot: Duration,
    mut rec: Option<&mut (dyn Write + Send)>,
) -> Result<(), String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    println!("{}", path.display());
    let _ = io::stdout().flush();
    info!("software key {} on {}", key.serial(), path.display());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    loop {
        tokio::select! {
            a = listener.accept() => {
                let (mut stream, _) = a.map_err(|e| format!("accept: {e}"))?;
                info!("client connected");
                tokio::select! {
                    r = soft::serve(&mut stream, key, slot, rec.as_deref_mut().map(|w| w as _)) => {
                        if let Err(e) = r { warn!("client: {e}"); }
                        info!("client disconnected");
                    }
                    _ = tokio::signal::ctrl_c() => break,
                    _ = sigterm.recv() => break,
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// A flag set when the process gets SIGUSR1.
fn on_usr1() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, String> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .map_err(|e| format!("cannot watch SIGUSR1: {e}"))?;
    let set = flag.clone();
    tokio::spawn(async move {
        if usr1.recv().await.is_some() {
            set.store(true, std::sync::atomic::Ordering::Release);
        }
    });
    Ok(flag)
}

/// `emulate --tty`: serves the key on an existing tty until a signal,
/// reopening the tty whenever the other side hangs up (a gadget's port
/// while the host side is unbound).
pub(crate) async fn serve_tty(
    path: &Path,
    key: &mut SoftKey,
    slot: Duration,
    mut rec: Option<&mut (dyn Write + Send)>,
) -> Result<(), String> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    // The first open must work: a wrong path is an error, not a wait.
    let mut tty = Some(transport::Tty::open(path).map_err(|e| e.to_string())?);
    println!("{}", path.display());
    let _ = io::stdout().flush();
    info!("software key {} on {}", key.serial(), path.display());
    loop {
        let mut t = match tty.take() {
            Some(t) => t,
            None => match transport::Tty::open(path) {
                Ok(t) => {
                    info!("{}: open again", path.display());
                    t
                }
                Err(e) => {
                    tracing::debug!("{}: {e}", path.display());
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        _ = sigterm.recv() => return Ok(()),
                    }
                }
            },
        };
        tokio::select! {
            r = soft::serve(&mut t, key, slot, rec.as_deref_mut().map(|w| w as _)) => {
                match r {
                    Ok(()) => info!("{}: the other side hung up", path.display()),
                    Err(e) => info!("{}: {e}", path.display()),
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
        drop(t);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
