//! Finding and keeping keys: devices, the software key, USB with hot-plug.

use std::io::{self};
use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::Ctx;
use crate::daemon::Error;
use crate::daemon::KeySources;
use crate::daemon::SharedStatuses;
use crate::daemon::Write;
use crate::daemon::add_status;
use crate::keys::driver::{self, Ended, KeyStatus, SharedStatus};
use crate::keys::soft;
use crate::keys::soft::DEMO_SERIAL;
use crate::keys::soft::SoftKey;
use crate::keys::transport::{self, Link};
use crate::keys::usb;
use crate::outputs::file::create_private;
use ekey_proto::host::{Config, Event, State};
use ekey_proto::keys::{LongTermKey, Serial};
use tracing::{info, warn};

/// Why a key can give no entropy, if its state says so.
pub(crate) fn terminal_reason(state: State) -> Option<String> {
    match state {
        State::NoLongTermKey => Some("the key's serial has no long-term key in the keyring".into()),
        State::LongTermKeyRejected => Some(
            "the key rejected the long-term key in the keyring (wrong key for this serial)".into(),
        ),
        State::WrongSerial => Some("unexpected serial number".into()),
        State::Failed(mode) => Some(format!("the key is in a failure mode: {mode}")),
        _ => None,
    }
}

#[cfg(usb)]
/// Drives a key on USB until it goes away; a key that stops answering
/// gets a USB port reset (it then re-enumerates and comes back through
/// hot-plug).
pub(crate) fn start_usb_key(
    info: usb::DeviceInfo,
    ctx: &Ctx,
    statuses: &SharedStatuses,
    seen: &UsbSeen,
) {
    let id = info.id();
    if !seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .active
        .insert(id)
    {
        // Already driven (hot-plug and a rescan both saw it).
        return;
    }
    let seen = seen.clone();
    let status = add_status(
        statuses,
        usb::describe(&info),
        info.serial_number(),
        ctx.gate,
        ctx.window,
    );
    tokio::spawn(keep_usb_key(info, ctx.clone(), status, seen));
}

#[cfg(usb)]
/// Drives the USB key `info` until it goes away (resetting its port if
/// it stops answering, waiting while it is released for a re-key), then
/// marks it no longer driven.
async fn keep_usb_key(info: usb::DeviceInfo, mut ctx: Ctx, status: SharedStatus, seen: UsbSeen) {
    let id = info.id();
    let where_ = usb::describe(&info);
    loop {
        match usb::open(&info).await {
            Ok((mut link, dev)) => match drive_one(&mut link, &mut ctx, &status, true).await {
                Ok(Ended::Unresponsive) => {
                    warn!("{where_}: key does not answer; resetting its USB port");
                    drop(link);
                    if let Err(e) = usb::reset(&dev).await {
                        warn!("{where_}: USB port reset failed: {e}");
                    }
                }
                Ok(Ended::Released) => {
                    // Let go (interface released) until the re-key is
                    // done, then take the key back.
                    drop(link);
                    drop(dev);
                    set_connected(&status, false);
                    info!("{where_}: key released for a re-key");
                    wait_until_resumed(&mut ctx, &status).await;
                    continue;
                }
                Ok(Ended::Closed) => info!("{where_}: key unplugged"),
                Ok(Ended::OutputClosed) => {}
                Err(e) => {
                    // An unplugged key's transfers fail with whatever
                    // the host controller makes of it; tell the two
                    // apart by whether the device is still there.
                    if still_listed(id, &e).await {
                        warn!("{where_}: the key stopped working: {e}");
                    } else {
                        info!("{where_}: key unplugged ({e})");
                    }
                }
            },
            Err(e) => {
                warn!("{e}");
                // Not retried by the rescan (it would fail the same
                // way every few seconds); a re-plug retries.
                seen.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .failed
                    .insert(id);
                if ctx.is_read {
                    let _ = ctx
                        .fail_tx
                        .send((where_.clone(), format!("cannot use the key: {e}")));
                }
            }
        }
        break;
    }
    set_connected(&status, false);
    seen.lock()
        .unwrap_or_else(|p| p.into_inner())
        .active
        .remove(&id);
}

#[cfg(usb)]
/// Whether a USB key whose transfers failed with `e` is still attached.
///
/// nusb reports a disconnect as `ConnectionAborted`; other errors (a
/// host controller may first report `EPROTO`) come before the kernel has
/// removed the device, so the device list is asked for up to 2 s.
pub(crate) async fn still_listed(id: usb::DeviceId, e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::ConnectionAborted {
        return false;
    }
    for _ in 0..10 {
        let listed = usb::list()
            .await
            .is_ok_and(|l| l.iter().any(|d| d.id() == id));
        if !listed {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

#[cfg(usb)]
/// USB keys being driven, and those that could not be opened.
#[derive(Default)]
pub(crate) struct UsbSeenSets {
    pub(crate) active: std::collections::HashSet<usb::DeviceId>,
    pub(crate) failed: std::collections::HashSet<usb::DeviceId>,
}

#[cfg(usb)]
pub(crate) type UsbSeen = std::sync::Arc<std::sync::Mutex<UsbSeenSets>>;

/// How often the daemon lists USB keys, besides hot-plug events: hot-plug
/// needs udev's events (no udevd in containers, initramfs or mdev systems),
/// and a key that re-enumerates after a port reset must come back anyway.
#[cfg(usb)]
pub(crate) const USB_RESCAN: Duration = Duration::from_secs(5);

/// Waits until the key of `status` is no longer released.
pub(crate) async fn wait_until_resumed(ctx: &mut Ctx, status: &SharedStatus) {
    loop {
        let st = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !ctx.signals.is_released(&st) {
            return;
        }
        if ctx.signals.released.changed().await.is_err() {
            return;
        }
    }
}

/// Keeps a key on a tty or socket attached: re-opens it after it goes away
/// (unplugged, socket closed), once a second.
pub(crate) async fn keep_device(path: PathBuf, mut ctx: Ctx, status: SharedStatus) {
    loop {
        match transport::open_path(&path).await {
            Ok(mut link) => match drive_one(&mut link, &mut ctx, &status, false).await {
                Ok(Ended::OutputClosed) => return,
                Ok(Ended::Released) => {
                    drop(link);
                    set_connected(&status, false);
                    info!("{}: key released for a re-key", path.display());
                    wait_until_resumed(&mut ctx, &status).await;
                    continue;
                }
                Ok(Ended::Closed | Ended::Unresponsive) => {
                    warn!("{}: key went away", path.display())
                }
                Err(e) => warn!("{}: {e}", path.display()),
            },
            Err(e) => {
                if ctx.is_read {
                    let _ = ctx
                        .fail_tx
                        .send((path.display().to_string(), format!("no key found: {e}")));
                    return;
                }
                tracing::debug!("{e}");
            }
        }
        set_connected(&status, false);
        if ctx.tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub(crate) fn set_connected(status: &SharedStatus, up: bool) {
    status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_connected(up);
}

pub(crate) async fn drive_one(
    link: &mut Link,
    ctx: &mut Ctx,
    status: &SharedStatus,
    stop_when_unresponsive: bool,
) -> io::Result<Ended> {
    set_connected(status, true);
    let r = drive_connected(link, ctx, status, stop_when_unresponsive).await;
    set_connected(status, false);
    r
}

pub(crate) async fn drive_connected(
    link: &mut Link,
    ctx: &mut Ctx,
    status: &SharedStatus,
    stop_when_unresponsive: bool,
) -> io::Result<Ended> {
    driver::drain(link, Duration::from_millis(50), Duration::from_millis(500)).await?;
    let lookup = {
        let ring = ctx.ring.clone();
        move |s: &Serial| -> Option<LongTermKey> {
            ring.read().unwrap_or_else(|p| p.into_inner()).get(s)
        }
    };
    let transport = status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .transport
        .clone();
    let (is_read, fail_tx, keyed) = (ctx.is_read, ctx.fail_tx.clone(), ctx.keyed.clone());
    let mut on_event = |st: &KeyStatus, ev: &Event| match ev {
        Event::StateChanged { state, reason } => {
            let serial = st.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
            info!("key {serial} ({transport}): {state} ({reason})");
            if state.is_running() {
                keyed.notify_one();
            }
            if let Some(why) = terminal_reason(*state)
                && is_read
            {
                let _ = fail_tx.send((transport.clone(), format!("key {serial}: {why}")));
            }
        }
        Event::Fault(f) => tracing::debug!("key ({transport}): {f:?}"),
        Event::Unresponsive { attempts } => {
            warn!("key ({transport}) does not answer after {attempts} resets")
        }
        _ => {}
    };
    let options = driver::DriveOptions {
        config: Config::default(),
        stop_when_unresponsive,
        // `read` and `test` stop after a count: shorter batches overshoot
        // it less.
        coalesce: if is_read {
            driver::DriveOptions::READ_COALESCE
        } else {
            driver::DriveOptions::DEFAULT_COALESCE
        },
    };
    driver::drive(
        link,
        options,
        &lookup,
        &ctx.tx,
        status,
        &mut ctx.signals,
        &mut on_event,
    )
    .await
}

/// Starts every key the command line names: `--device` paths, the built-in
/// software key, or (the default) every key on USB now and, for the daemon,
/// every key plugged in later. Returns how many keys started now.
pub(crate) async fn start_keys(
    keys: &KeySources,
    ctx: Ctx,
    statuses: &SharedStatuses,
) -> Result<usize, Error> {
    for path in &keys.devices {
        let status = add_status(
            statuses,
            path.display().to_string(),
            None,
            ctx.gate,
            ctx.window,
        );
        tokio::spawn(keep_device(path.clone(), ctx.clone(), status));
    }
    if keys.emulate {
        start_emulated(keys, &ctx, statuses)?;
    }
    if keys.devices.is_empty() && !keys.emulate {
        start_usb(&ctx, statuses).await?;
    }
    let sources = statuses.lock().unwrap_or_else(|p| p.into_inner()).len();
    Ok(sources)
}

/// The built-in software key (`--emulate`), over an in-process pipe.
fn start_emulated(keys: &KeySources, ctx: &Ctx, statuses: &SharedStatuses) -> Result<(), Error> {
    let status = add_status(
        statuses,
        "built-in software key".into(),
        None,
        ctx.gate,
        ctx.window,
    );
    let (host_end, mut key_end) = tokio::io::duplex(4096);
    let slot = soft::slot_for_rate(keys.rate);
    info!(
        "software key {} (demo keys; bytes come from the OS generator, not from noise)",
        DEMO_SERIAL
    );
    let mut record: Option<Box<dyn Write + Send>> = match &keys.record {
        Some(p) => Some(Box::new(create_private(p)?)),
        None => None,
    };
    tokio::spawn(async move {
        let mut key = SoftKey::demo();
        let rec = record.as_deref_mut().map(|w| w as _);
        if let Err(e) = soft::serve(&mut key_end, &mut key, slot, rec).await {
            warn!("built-in software key: {e}");
        }
    });
    let mut ctx = ctx.clone();
    tokio::spawn(async move {
        let mut link: Link = Box::new(host_end);
        let _ = drive_one(&mut link, &mut ctx, &status, false).await;
    });
    Ok(())
}

/// Keys on USB where there is no raw USB: a clear error.
#[cfg(not(usb))]
async fn start_usb(_: &Ctx, _: &SharedStatuses) -> Result<(), Error> {
    Err(Error::UsbList(usb::unsupported()))
}

#[cfg(usb)]
/// Keys on USB: every one attached now, and (for the daemon, not `read`)
/// every one plugged in later, from hot-plug events and a rescan.
async fn start_usb(ctx: &Ctx, statuses: &SharedStatuses) -> Result<(), Error> {
    let watch = if ctx.is_read {
        None
    } else {
        Some(usb::watch().map_err(Error::UsbWatch)?)
    };
    let found = usb::list().await.map_err(Error::UsbList)?;
    if found.is_empty() {
        if ctx.is_read {
            return Err(Error::NoKey);
        }
        info!("no Entropy Key attached yet: waiting for one to be plugged in");
    }
    let seen = UsbSeen::default();
    for info in found {
        start_usb_key(info, ctx, statuses, &seen);
    }
    if let Some(watch) = watch {
        tokio::spawn(follow_hotplug(
            watch,
            ctx.clone(),
            statuses.clone(),
            seen.clone(),
        ));
        tokio::spawn(rescan_usb(ctx.clone(), statuses.clone(), seen));
    }
    Ok(())
}

#[cfg(usb)]
/// Starts a driver for each key plugged in.
async fn follow_hotplug(
    mut watch: usb::HotplugWatch,
    ctx: Ctx,
    statuses: SharedStatuses,
    seen: UsbSeen,
) {
    let forget = |id| {
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .failed
            .remove(&id);
    };
    while let Some(ev) = usb::next_event(&mut watch).await {
        match ev {
            usb::Hotplug::Arrived(info) => {
                info!("key plugged in: {}", usb::describe(&info));
                forget(info.id());
                start_usb_key(*info, &ctx, &statuses, &seen);
            }
            usb::Hotplug::Left(id) => forget(id),
        }
    }
}

#[cfg(usb)]
/// Every [`USB_RESCAN`]: starts a driver for any key on USB that no driver
/// has (hot-plug events can be missed, e.g. without udev).
async fn rescan_usb(ctx: Ctx, statuses: SharedStatuses, seen: UsbSeen) {
    let mut tick = tokio::time::interval(USB_RESCAN);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(found) = usb::list().await else {
            continue;
        };
        for info in found {
            let known = {
                let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                s.active.contains(&info.id()) || s.failed.contains(&info.id())
            };
            if !known {
                info!("key found: {}", usb::describe(&info));
                start_usb_key(info, &ctx, &statuses, &seen);
            }
        }
    }
}
