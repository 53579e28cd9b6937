//! In-process meeting point of everything that shares one database: wake-ups for waiting claims
//! and `wait()` calls (local commits and, through the watcher, other processes' commits), and the
//! cancellation flags of tasks running in this process, so a cancel here is seen at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;

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
}

impl Hub {
    /// A receiver that gets (coalesced) wake-ups whenever the database may have changed.
    pub fn subscribe(&self) -> Receiver<()> {
        let (tx, rx) = bounded(1);
        self.subscribers.lock().push(tx);
        rx
    }

    pub fn notify(&self) {
        self.subscribers.lock().retain(|tx| !matches!(tx.try_send(()), Err(crossbeam_channel::TrySendError::Disconnected(_))));
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
