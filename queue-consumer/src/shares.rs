//! Fair shares of the worker's slots between its queues.
//!
//! A poll holds no slot while it waits: an idle queue's 20 s long poll must not keep
//! a busy queue's jobs from starting. Instead each queue asks SQS for no more
//! messages than its *share* leaves room for, and a received message takes a slot
//! from a fair (first come, first served) semaphore before its job starts.
//!
//! The shares are a weighted water-filling of `WORKER_CONCURRENCY`: a queue whose last
//! receive came back full has work waiting and may take as much as it is given; any
//! other queue needs no more than it holds. So a busy queue gets every slot the others
//! do not use, two busy queues split the slots by weight, and an idle queue asks, when
//! it polls, for the share it would get if it had work. A queue always asks for at
//! least one message when it holds none.
//!
//! Messages received beyond the free slots (a queue that was idle gets work while the
//! others hold every slot) wait for the next slot, kept invisible meanwhile; their
//! queue's share then stops the others from asking for more until it is fair.
//!
//! A *chain* holds one slot from its receipt until it is settled: a message, or the
//! messages of one FIFO group in one receive, which run one after the other on the
//! same slot.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::queue::MAX_BATCH;

/// The slots of a worker and how its queues share them.
#[derive(Debug)]
pub(crate) struct Shares {
    concurrency: usize,
    lanes: Mutex<Vec<Load>>,
    /// Bumped whenever a queue's load changes, so receive loops look again.
    changed: watch::Sender<()>,
    /// Jobs running (or settling) at once.
    permits: Arc<Semaphore>,
}

/// One queue's load.
#[derive(Debug, Clone, Copy)]
struct Load {
    weight: u32,
    /// Chains received and not yet settled.
    held: usize,
    /// Its last receive came back with as many messages as it asked for: more wait.
    backlog: bool,
}

impl Shares {
    /// Slots for `concurrency` jobs, shared by queues of these weights.
    pub(crate) fn new(concurrency: usize, weights: &[u32]) -> Arc<Self> {
        let concurrency = concurrency.max(1);
        Arc::new(Self {
            concurrency,
            lanes: Mutex::new(
                weights
                    .iter()
                    .map(|w| Load {
                        weight: (*w).max(1),
                        held: 0,
                        backlog: false,
                    })
                    .collect(),
            ),
            changed: watch::Sender::new(()),
            permits: Arc::new(Semaphore::new(concurrency)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Load>> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A receiver that sees every change of load.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// How many messages queue `lane` may ask for now (at most a batch), and how
    /// many it could ask for once its own settles are done (its full batch).
    pub(crate) fn ask(&self, lane: usize) -> (usize, usize) {
        let lanes = self.lock();
        let share = share_if_busy(self.concurrency, &lanes, lane);
        let full = share.min(MAX_BATCH);
        let held = lanes[lane].held;
        let ask = if held == 0 {
            full.max(1)
        } else {
            share.saturating_sub(held).min(MAX_BATCH)
        };
        (ask, full.max(1))
    }

    /// Queue `lane` asked for `asked` messages and got `got`.
    pub(crate) fn received(&self, lane: usize, asked: usize, got: usize) {
        self.lock()[lane].backlog = got > 0 && got >= asked;
        self.changed.send_replace(());
    }

    /// A slot for a chain of queue `lane` received in `receive`.
    pub(crate) fn slot(self: &Arc<Self>, lane: usize, receive: &Arc<AtomicUsize>) -> Slot {
        self.lock()[lane].held += 1;
        receive.fetch_add(1, Ordering::SeqCst);
        Slot {
            shares: Arc::clone(self),
            lane,
            receive: Arc::clone(receive),
            permit: None,
        }
    }
}

/// The share queue `lane` gets when it has work waiting, in whole slots (rounded up,
/// at least one).
fn share_if_busy(concurrency: usize, lanes: &[Load], lane: usize) -> usize {
    let wants: Vec<(f64, Option<f64>)> = lanes
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let demand = if i == lane || l.backlog {
                None
            } else {
                Some(count(l.held))
            };
            (f64::from(l.weight), demand)
        })
        .collect();
    let shares = water_fill(count(concurrency), &wants);
    let share = shares.get(lane).copied().unwrap_or(0.0).ceil().max(1.0);
    // A share is at most the concurrency, a small whole number.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let share = share as usize;
    share.min(concurrency)
}

#[allow(clippy::cast_precision_loss)]
fn count(n: usize) -> f64 {
    n as f64
}

/// Splits `capacity` between claimants of (weight, demand; `None`: no limit): one
/// whose demand is below its weighted part gets its demand, and the rest is split
/// again among the others, by weight.
fn water_fill(capacity: f64, claimants: &[(f64, Option<f64>)]) -> Vec<f64> {
    let mut shares = vec![0.0; claimants.len()];
    let mut open: Vec<usize> = (0..claimants.len()).collect();
    let mut left = capacity.max(0.0);
    while !open.is_empty() {
        let weights: f64 = open.iter().map(|i| claimants[*i].0).sum();
        if weights <= 0.0 {
            break;
        }
        let fits: Vec<usize> = open
            .iter()
            .copied()
            .filter(|i| {
                claimants[*i]
                    .1
                    .is_some_and(|d| d <= left * claimants[*i].0 / weights)
            })
            .collect();
        if fits.is_empty() {
            for i in &open {
                shares[*i] = left * claimants[*i].0 / weights;
            }
            break;
        }
        for i in fits {
            let demand = claimants[i].1.unwrap_or(0.0);
            shares[i] = demand;
            left = (left - demand).max(0.0);
            open.retain(|j| *j != i);
        }
    }
    shares
}

/// A chain's slot: counted in its queue's load from receipt until dropped, and the
/// permit its jobs run on.
#[derive(Debug)]
pub(crate) struct Slot {
    shares: Arc<Shares>,
    lane: usize,
    /// Chains of its receive not yet settled.
    receive: Arc<AtomicUsize>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    /// Waits for a permit to run on, unless it has one.
    pub(crate) async fn run(&mut self) {
        if self.permit.is_none() {
            // The semaphore is never closed.
            self.permit = Arc::clone(&self.shares.permits).acquire_owned().await.ok();
        }
    }

    /// Whether it has a permit to run on.
    pub(crate) fn can_run(&self) -> bool {
        self.permit.is_some()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut lanes = self.shares.lock();
            lanes[self.lane].held = lanes[self.lane].held.saturating_sub(1);
        }
        self.receive.fetch_sub(1, Ordering::SeqCst);
        drop(self.permit.take());
        self.shares.changed.send_replace(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(weight: u32, held: usize, backlog: bool) -> Load {
        Load {
            weight,
            held,
            backlog,
        }
    }

    #[test]
    fn an_idle_queue_leaves_every_slot_to_a_busy_one() {
        let lanes = [load(1, 0, false), load(1, 4, true)];
        assert_eq!(share_if_busy(10, &lanes, 1), 10);
        // The idle one, when it polls, asks for what it would get with work.
        assert_eq!(share_if_busy(10, &lanes, 0), 5);
    }

    #[test]
    fn busy_queues_split_by_weight_and_a_quiet_one_keeps_what_it_holds() {
        let lanes = [load(3, 5, true), load(1, 5, true), load(1, 1, false)];
        // 9 slots left by the quiet queue's one, split 3:1.
        assert_eq!(share_if_busy(10, &lanes, 0), 7);
        assert_eq!(share_if_busy(10, &lanes, 1), 3);
        assert_eq!(share_if_busy(1, &lanes, 1), 1);
    }

    #[test]
    fn a_long_job_takes_only_its_own_slot() {
        let lanes = [load(1, 1, false)];
        let shares = Shares::new(10, &[1]);
        *shares.lock() = lanes.to_vec();
        assert_eq!(shares.ask(0), (9, 10));
    }

    #[test]
    fn water_filling_gives_small_demands_in_full() {
        let s = water_fill(10.0, &[(1.0, Some(1.0)), (1.0, None), (2.0, None)]);
        assert_eq!(s, vec![1.0, 3.0, 6.0]);
        let s = water_fill(10.0, &[(1.0, Some(20.0)), (1.0, None)]);
        assert_eq!(s, vec![5.0, 5.0]);
        assert_eq!(water_fill(10.0, &[]), Vec::<f64>::new());
    }

    #[tokio::test]
    async fn a_slot_counts_until_dropped() {
        let shares = Shares::new(2, &[1, 1]);
        let receive = Arc::new(AtomicUsize::new(0));
        let mut a = shares.slot(0, &receive);
        a.run().await;
        assert!(a.can_run());
        assert_eq!(shares.lock()[0].held, 1);
        assert_eq!(receive.load(Ordering::SeqCst), 1);
        drop(a);
        assert_eq!(shares.lock()[0].held, 0);
        assert_eq!(receive.load(Ordering::SeqCst), 0);
        assert_eq!(shares.permits.available_permits(), 2);
    }
}
