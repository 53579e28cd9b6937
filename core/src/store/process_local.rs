//! The connection state a store uses, one per process: after fork() the child opens its own
//! and never touches (closes, unlocks) the one it inherited from its parent.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use crate::error::Result;

/// State that belongs to the process that opened it.
pub(super) trait OwnedByProcess {
    fn pid(&self) -> u32;
}

/// An `Arc<T>` of this process, reopened in a forked child.
pub(super) struct ProcessLocal<T: OwnedByProcess> {
    /// The current T, from `Arc::into_raw`, holding one strong count. No lock: a fork can copy
    /// a lock held by another thread into the child, where nothing would ever release it.
    /// A pointer is only ever replaced in a forked child, whose old T is leaked on purpose, so
    /// a pointer loaded here stays valid for as long as this handle lives.
    ptr: AtomicPtr<T>,
}

impl<T: OwnedByProcess> ProcessLocal<T> {
    pub fn new(value: Arc<T>) -> ProcessLocal<T> {
        ProcessLocal { ptr: AtomicPtr::new(Arc::into_raw(value) as *mut T) }
    }

    /// The T of this process; `open` makes a fresh one in a forked child (the inherited one,
    /// and this handle's count on it, are leaked).
    pub fn get(&self, open: impl Fn() -> Result<Arc<T>>) -> Result<Arc<T>> {
        loop {
            let ptr = self.ptr.load(Ordering::Acquire);
            // SAFETY: `ptr` came from Arc::into_raw and its count is held by this handle (see
            // the field's comment), so it is live; we take one more count for the returned Arc.
            let current = unsafe {
                Arc::increment_strong_count(ptr);
                Arc::from_raw(ptr)
            };
            if current.pid() == std::process::id() {
                return Ok(current);
            }
            std::mem::forget(current);
            let fresh = Arc::into_raw(open()?) as *mut T;
            if self.ptr.compare_exchange(ptr, fresh, Ordering::AcqRel, Ordering::Acquire).is_err() {
                // SAFETY: `fresh` was never published; give its count back.
                drop(unsafe { Arc::from_raw(fresh) });
            }
        }
    }
}

impl<T: OwnedByProcess> Drop for ProcessLocal<T> {
    fn drop(&mut self) {
        // SAFETY: the handle's own count, taken in new() or get().
        drop(unsafe { Arc::from_raw(self.ptr.load(Ordering::Acquire)) });
    }
}
