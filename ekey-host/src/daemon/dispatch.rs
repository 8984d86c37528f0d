//! Verified blocks to the outputs: each block the keys' drivers release goes
//! to exactly one output that has room (kernel, EGD, file), or is counted as
//! `unused` when the daemon has no output at all. A block waits in
//! [`Dispatch::pending`] until some output takes it, so backpressure reaches
//! the keys through the bounded channels. A block whose key's gate closed
//! after it was released is withdrawn here instead of being passed on.

use tokio::sync::mpsc;

use crate::keys::driver::{Block, OutputLedger};
use crate::outputs::egd::SourceBlock;
use crate::outputs::kernel::KeyBlock;

/// What the daemon's outputs are fed through.
pub(crate) struct Dispatch {
    /// Blocks from every key's driver.
    pub(crate) rx: mpsc::Receiver<Block>,
    /// The block waiting for room in an output.
    pub(crate) pending: Option<Block>,
    pub(crate) egd: Option<mpsc::Sender<SourceBlock>>,
    pub(crate) kernel: Option<mpsc::Sender<KeyBlock>>,
    /// The `--output` thread's queue: a block and how many of its bytes to
    /// write.
    pub(crate) file: Option<mpsc::Sender<(crate::wipe::SecretBlock, usize)>>,
    /// `--limit` (or `read`'s count): bytes to write, then stop.
    pub(crate) limit: Option<u64>,
    /// Bytes counted against the limit so far.
    pub(crate) written: u64,
}

/// How one [`Dispatch::turn`] ended.
pub(crate) enum Turn {
    /// A block moved (in, out, or withdrawn).
    Moved,
    /// Every driver is gone, or the EGD server or the output thread ended
    /// (the output thread says why when it is closed).
    Ended,
    /// The kernel output stopped (it logged why).
    KernelStopped,
}

impl Dispatch {
    /// Whether the limit has been reached.
    pub(crate) fn done(&self) -> bool {
        self.limit.is_some_and(|l| self.written >= l)
    }

    fn has_outputs(&self) -> bool {
        self.file.is_some() || self.egd.is_some() || self.kernel.is_some()
    }

    /// Bytes of the next block that still count against the limit.
    fn take(&self) -> u64 {
        self.limit.map_or(32, |l| (l - self.written).min(32))
    }

    /// Moves one block: takes one in, or passes the pending one to an
    /// output with room. Cancel-safe (a cancelled turn loses nothing).
    pub(crate) async fn turn(&mut self) -> Turn {
        let waiting = self.pending.is_some();
        tokio::select! {
            b = self.rx.recv(), if !waiting => {
                let Some(block) = b else { return Turn::Ended };
                if self.has_outputs() {
                    self.pending = Some(block);
                } else {
                    self.written += self.take();
                    block.book(32, |o| &mut o.unused);
                }
                Turn::Moved
            }
            permit = reserve(self.kernel.as_ref()), if waiting => {
                let Ok(permit) = permit else { return Turn::KernelStopped };
                hand_over(&mut self.pending, permit, |o| &mut o.kernel);
                Turn::Moved
            }
            permit = reserve(self.egd.as_ref()), if waiting => {
                let Ok(permit) = permit else { return Turn::Ended };
                hand_over(&mut self.pending, permit, |o| &mut o.egd);
                Turn::Moved
            }
            permit = reserve(self.file.as_ref()), if waiting => {
                let Ok(permit) = permit else { return Turn::Ended };
                if let Some(block) = self.pending.take() {
                    if block.withdrawn() {
                        block.book(32, |o| &mut o.withdrawn);
                    } else {
                        let take = self.take();
                        self.written += take;
                        block.book(take, |o| &mut o.file);
                        block.book(32 - take, |o| &mut o.unused);
                        permit.send((block.data, take as usize));
                    }
                }
                Turn::Moved
            }
        }
    }
}

/// Hands the pending block to an output that takes whole blocks with their
/// key and gate epoch (kernel, EGD), booking it to `ledger`, or withdraws
/// it if its key's gate closed since it was released.
fn hand_over(
    pending: &mut Option<Block>,
    permit: mpsc::Permit<'_, KeyBlock>,
    ledger: impl FnOnce(&mut OutputLedger) -> &mut u64,
) {
    let Some(block) = pending.take() else {
        return;
    };
    if block.withdrawn() {
        block.book(32, |o| &mut o.withdrawn);
    } else {
        block.book(32, ledger);
        permit.send((block.data, block.serial, block.epoch));
    }
}

/// Room in a queue (pending forever when there is no queue).
async fn reserve<T>(
    tx: Option<&mpsc::Sender<T>>,
) -> Result<mpsc::Permit<'_, T>, mpsc::error::SendError<()>> {
    match tx {
        Some(tx) => tx.reserve().await,
        None => std::future::pending().await,
    }
}
