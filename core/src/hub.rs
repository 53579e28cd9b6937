//! In-process meeting point of everything that shares one database: wake-ups for waiting claims
//! and `wait()` calls (local commits and, through the watcher, other processes' commits), and the
//! cancellation flags of tasks running in this process, so a cancel here is seen at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::sync::{Condvar, Mutex};
use crossbeam_channel::{bounded, Receiver, Sender};

use crate::task::{CancelReason, TaskId};

/// A running task's cancellation flag, polled by host code.
#[derive(Debug, Default)]
pub struct CancelFlag(AtomicU8);

impl CancelFlag {
    pub fn get(&self) -> Option<CancelReason> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(CancelReason::Cancelled),
            2 => Some(CancelReason::Reset),
            3 => Some(CancelReason::Timeout),
            _ => None,
        }
    }

    /// Raises the flag; the first reason wins.
    pub fn raise(&self, reason: CancelReason) {
        let v = match reason {
            CancelReason::Cancelled => 1,
            CancelReason::Reset => 2,
            CancelReason::Timeout => 3,
        };
        let _ = self.0.compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire);
    }
}

#[derive(Default)]
pub struct Hub {
    subscribers: Mutex<Vec<Sender<()>>>,
    running: Mutex<HashMap<TaskId, Arc<CancelFlag>>>,
    /// How many waiters currently need to hear about other processes' commits. The watcher only
    /// watches the database while this is non-zero: watching costs every commit a notification.
    interest: Mutex<usize>,
    interest_cv: Condvar,
}

/// Held by a waiter that needs other processes' commits to wake it; see [`Hub::interest`].
pub struct Interest(Arc<Hub>);

impl Drop for Interest {
    fn drop(&mut self) {
        *self.0.interest.lock() -= 1;
    }
}

impl Hub {
    /// A receiver that gets (coalesced) wake-ups whenever the database may have changed.
    pub fn subscribe(&self) -> Receiver<()> {
        let (tx, rx) = bounded(1);
        self.subscribers.lock().push(tx);
        rx
    }

    /// Registers a waiter that needs cross-process wake-ups until the guard is dropped.
    pub fn interest(self: &Arc<Self>) -> Interest {
        let mut n = self.interest.lock();
        *n += 1;
        if *n == 1 {
            self.interest_cv.notify_all();
        }
        Interest(self.clone())
    }

    /// Blocks until some waiter is interested or `timeout` passes; returns whether one is.
    pub fn wait_for_interest(&self, timeout: std::time::Duration) -> bool {
        let mut n = self.interest.lock();
        if *n == 0 {
            self.interest_cv.wait_for(&mut n, timeout);
        }
        *n > 0
    }

    pub fn interested(&self) -> bool {
        *self.interest.lock() > 0
    }

    pub fn notify(&self) {
        self.subscribers
            .lock()
            .retain(|tx| !matches!(tx.try_send(()), Err(crossbeam_channel::TrySendError::Disconnected(_))));
    }

    pub fn track(&self, id: TaskId, flag: Arc<CancelFlag>) {
        self.running.lock().insert(id, flag);
    }

    pub fn untrack(&self, id: TaskId) {
        self.running.lock().remove(&id);
    }

    /// Raises the flag of a task running in this process, if it is.
    pub fn raise(&self, id: TaskId, reason: CancelReason) {
        if let Some(flag) = self.running.lock().get(&id) {
            flag.raise(reason);
        }
    }
}
