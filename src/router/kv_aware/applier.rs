//! The KV index's one writer: every subscription (intake.rs) queues what it learned —
//! a batch of events, a rank to forget, a worker gone — and one thread applies it in
//! order. Under load (more than one change waiting) the thread lets a moment's batches
//! gather and applies them together (`KvIndex::apply_group`): the index's memory is
//! fetched for the next batch while one is applied, the lock is taken once for many, and
//! no runtime thread waits on the lock or on the index's cache misses. A trickle is
//! applied as it comes. The index is behind the events by at most that moment (GATHER)
//! and the time to apply what is queued.
//!
//! What is queued is bounded (docs/SECURITY.md): each change holds its share of
//! QUEUE_BYTES (a batch its size on the wire) until applied, so a subscription that
//! outruns the thread waits, and so does its socket.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::api::kv_events::KvEvent;
use crate::router::kv_aware::index::{KvIndex, WorkerRank};

/// How long the thread lets batches gather once one has come.
const GATHER: Duration = Duration::from_millis(1);
/// Blocks applied together at most (the index takes its lock per as many).
const BLOCKS_PER_GROUP: usize = 4096;
/// The bytes of events queued at most, all subscriptions together.
const QUEUE_BYTES: usize = 64 << 20;
/// What a change other than a batch counts for, against QUEUE_BYTES.
const CHANGE_BYTES: usize = 256;

/// What a subscription learned, in the order it learned it.
pub(crate) enum Change {
    /// A batch of a rank's events, and its sequence number.
    Batch { holder: Arc<WorkerRank>, seq: u64, events: Vec<KvEvent> },
    /// A rank is subscribed to (shown by /workers before its first batch).
    Subscribed(Arc<WorkerRank>),
    /// A rank's entries cannot be trusted: forgotten, the subscription goes on.
    Distrusted(Arc<WorkerRank>),
    /// A rank's subscription ended.
    Unsubscribed(Arc<WorkerRank>),
    /// A worker left the pools: every rank of it.
    WorkerGone(String),
}

struct Queued {
    change: Change,
    _share: OwnedSemaphorePermit,
}

/// The way into the index's queue (cloned per subscription).
#[derive(Clone)]
pub(crate) struct Applier {
    tx: mpsc::UnboundedSender<Queued>,
    room: Arc<Semaphore>,
}

impl Applier {
    /// Starts the index's writer thread; it ends when every `Applier` is dropped.
    pub(crate) fn start(index: Arc<KvIndex>) -> std::io::Result<Applier> {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("kv-index".into()).spawn(move || apply_queued(&index, rx))?;
        Ok(Applier { tx, room: Arc::new(Semaphore::new(QUEUE_BYTES)) })
    }

    /// Queues `change` (`bytes`: a batch's size on the wire), once there is room for it.
    pub(crate) async fn send(&self, change: Change, bytes: usize) {
        let share = bytes.clamp(CHANGE_BYTES, QUEUE_BYTES) as u32;
        // The semaphore is never closed.
        let Ok(share) = self.room.clone().acquire_many_owned(share).await else { return };
        // The thread ends only once every sender is gone, so this cannot fail while we exist.
        let _ = self.tx.send(Queued { change, _share: share });
    }
}

fn blocks_of(change: &Change) -> usize {
    match change {
        Change::Batch { events, .. } => events
            .iter()
            .map(|e| match e {
                KvEvent::Stored { hashes, .. } | KvEvent::Removed { hashes } => hashes.len(),
                KvEvent::AllCleared => 1,
            })
            .sum(),
        _ => 1,
    }
}

fn apply_queued(index: &KvIndex, mut rx: mpsc::UnboundedReceiver<Queued>) {
    let mut group: Vec<Queued> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut blocks = blocks_of(&first.change);
        group.push(first);
        let mut take_queued = |group: &mut Vec<Queued>| {
            while blocks < BLOCKS_PER_GROUP {
                let Ok(next) = rx.try_recv() else { break };
                blocks += blocks_of(&next.change);
                group.push(next);
            }
        };
        take_queued(&mut group);
        // More than one waiting: events come faster than they are applied one by one, so
        // a moment's more are let gather. A trickle is applied as it comes (no wait, and
        // the thread wakes once a batch, not twice).
        if group.len() > 1 {
            std::thread::sleep(GATHER);
            take_queued(&mut group);
        }
        apply(index, &group);
        // Their shares of the queue are given back.
        group.clear();
    }
}

/// Applies a group in order: runs of batches together, the other changes between them.
fn apply(index: &KvIndex, group: &[Queued]) {
    let mut batches: Vec<(&WorkerRank, &[KvEvent])> = Vec::new();
    let mut seqs: Vec<(&WorkerRank, u64)> = Vec::new();
    let flush = |batches: &mut Vec<(&WorkerRank, &[KvEvent])>, seqs: &mut Vec<(&WorkerRank, u64)>| {
        if !batches.is_empty() {
            index.apply_group_cpu_timed(batches);
            index.note_seqs(seqs);
        }
        batches.clear();
        seqs.clear();
    };
    for q in group {
        match &q.change {
            Change::Batch { holder, seq, events } => {
                batches.push((holder, events));
                seqs.push((holder, *seq));
                continue;
            }
            _ => flush(&mut batches, &mut seqs),
        }
        match &q.change {
            Change::Batch { .. } => {}
            Change::Subscribed(holder) => index.note_subscribed(holder),
            Change::Distrusted(holder) => index.drop_holder(holder),
            Change::Unsubscribed(holder) => index.unsubscribed(holder),
            Change::WorkerGone(url) => index.drop_worker(url),
        }
    }
    flush(&mut batches, &mut seqs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_are_applied_in_the_order_they_were_queued() {
        let index = Arc::new(KvIndex::default());
        let applier = Applier::start(index.clone()).unwrap();
        let a = Arc::new(WorkerRank { url: "http://a".into(), rank: 0 });
        let stored = |hashes: Vec<u64>, tokens: Vec<u32>| KvEvent::Stored { hashes, parent: None, token_ids: tokens, block_size: 2 };
        applier.send(Change::Subscribed(a.clone()), 0).await;
        applier.send(Change::Batch { holder: a.clone(), seq: 0, events: vec![stored(vec![1], vec![1, 2])] }, 10).await;
        // Distrusted after the batch: the batch's block is gone, the next one stays.
        applier.send(Change::Distrusted(a.clone()), 0).await;
        applier.send(Change::Batch { holder: a.clone(), seq: 1, events: vec![stored(vec![2], vec![3, 4])] }, 10).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while index.applied_totals().batches < 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let keys = |t: &[u32]| crate::router::kv_aware::index::block_hashes(t, 2);
        assert!(index.prefix_blocks(2, &keys(&[1, 2])).is_empty());
        assert_eq!(index.prefix_blocks(2, &keys(&[3, 4])).get(&*a), Some(&1));
        assert_eq!(index.status_by_worker()["http://a"][0].last_seq, Some(1));
        // A worker gone takes everything of it; queue room is given back as changes apply.
        applier.send(Change::WorkerGone("http://a".into()), 0).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while (!index.sizes().is_empty() || applier.room.available_permits() < QUEUE_BYTES) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(index.sizes().is_empty());
        assert_eq!(applier.room.available_permits(), QUEUE_BYTES);
    }
}
