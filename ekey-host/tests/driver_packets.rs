//! The driver over a link that hands out one USB packet per read, as nusb
//! does (one completed transfer per `read`): with reads batched every
//! 100 ms, everything that arrived meanwhile must be taken in that wake-up,
//! not one packet per wake-up (which capped a full-speed key at ~320 B/s).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use ekey_host::keys::driver::{self, DriveOptions, KeyStatus, Signals};
use ekey_host::keys::soft::{self, SoftKey};
use ekey_proto::host::Config;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// At most `packet` bytes per read.
struct Packets {
    inner: DuplexStream,
    packet: usize,
}

impl AsyncRead for Packets {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let take = buf.remaining().min(self.packet);
        let mut small = vec![0u8; take];
        let mut rb = ReadBuf::new(&mut small);
        match Pin::new(&mut self.inner).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                buf.put_slice(rb.filled());
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for Packets {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn one_packet_per_read_does_not_cap_the_rate() {
    let (host_end, mut key_end) = tokio::io::duplex(64 * 1024);
    // 40,000 B/s: 1,250 frames a second.
    let slot = soft::slot_for_rate(40_000);
    let key = tokio::spawn(async move {
        let mut key = SoftKey::demo();
        let _ = soft::serve(&mut key_end, &mut key, slot, None).await;
    });
    let mut link: ekey_host::keys::transport::Link = Box::new(Packets {
        inner: host_end,
        packet: 64,
    });
    let ring = {
        let mut r = ekey_host::keyring::Keyring::default();
        r.set(soft::DEMO_SERIAL, soft::demo_long_term_key());
        r
    };
    let lookup = move |s: &ekey_proto::keys::Serial| ring.get(s);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let status = Arc::new(Mutex::new(KeyStatus::new("packets")));
    let (_reload_tx, reload) = tokio::sync::watch::channel(0u64);
    let (_released_tx, released) =
        tokio::sync::watch::channel(Arc::new(std::collections::BTreeSet::new()));
    let mut signals = Signals { reload, released };
    let options = DriveOptions {
        config: Config::default(),
        stop_when_unresponsive: false,
        coalesce: DriveOptions::DEFAULT_COALESCE,
    };
    let st = status.clone();
    let driving = tokio::spawn(async move {
        let _ = driver::drive(
            &mut link,
            options,
            &lookup,
            &tx,
            &st,
            &mut signals,
            &mut |_, _| {},
        )
        .await;
    });
    // Count what comes out for 3 s.
    let mut bytes = 0usize;
    let end = tokio::time::Instant::now() + Duration::from_secs(3);
    while let Ok(Some(b)) = tokio::time::timeout_at(end, rx.recv()).await {
        bytes += b.data.bytes().len();
    }
    driving.abort();
    key.abort();
    let frames = status.lock().unwrap().counters.blocks;
    // One packet per 100 ms would give ~30 frames in 3 s; the key sent
    // ~3,750. Taking everything ready per wake-up gets nearly all of them.
    assert!(
        frames > 1_500,
        "only {frames} entropy frames verified in 3 s ({bytes} bytes released)"
    );
}
