//! Locks and condition variables that stay usable in a forked child.
//!
//! parking_lot keeps one global table of parked threads whose buckets are guarded by locks; a
//! thread of the parent that was inside one of them at the instant of fork() never releases it in
//! the child, so the child's next contended lock, wait or notify hangs forever (reproduced: a
//! child forked from a busy process waited on a bucket lock in its first pool checkout). std's
//! Linux locks keep their whole state in the lock itself, so a lock the child creates (or one no
//! parent thread held) behaves normally. These wrappers give the std types the small, poison-free
//! surface the engine uses; a panic while holding a lock does not poison it (as with parking_lot).
//!
//! [`Condvar`] counts its waiters so a notify with none is one atomic load, not a futex syscall:
//! the predicate must be changed under the mutex the waiters use (the usual condvar discipline).

use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

/// A mutex that ignores poisoning.
#[derive(Default)]
pub struct Mutex<T: ?Sized>(std::sync::Mutex<T>);

/// Holds a [`Mutex`]; the Option is only empty inside [`Condvar`] waits.
pub struct MutexGuard<'a, T: ?Sized>(Option<std::sync::MutexGuard<'a, T>>);

impl<T> Mutex<T> {
    pub const fn new(value: T) -> Mutex<T> {
        Mutex(std::sync::Mutex::new(value))
    }
}

impl<T: ?Sized> Mutex<T> {
    pub fn lock(&self) -> MutexGuard<'_, T> {
        MutexGuard(Some(self.0.lock().unwrap_or_else(PoisonError::into_inner)))
    }

    pub fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        match self.0.try_lock() {
            Ok(g) => Some(MutexGuard(Some(g))),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(MutexGuard(Some(e.into_inner()))),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }
}

impl<T: ?Sized> Deref for MutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0.as_deref().expect("guard present outside a wait")
    }
}

impl<T: ?Sized> DerefMut for MutexGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.0.as_deref_mut().expect("guard present outside a wait")
    }
}

/// Whether a timed wait ended by its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitTimeoutResult(bool);

impl WaitTimeoutResult {
    pub fn timed_out(self) -> bool {
        self.0
    }
}

/// A condition variable for [`Mutex`].
#[derive(Default)]
pub struct Condvar {
    cv: std::sync::Condvar,
    waiters: AtomicUsize,
}

impl Condvar {
    pub const fn new() -> Condvar {
        Condvar { cv: std::sync::Condvar::new(), waiters: AtomicUsize::new(0) }
    }

    pub fn wait<T>(&self, guard: &mut MutexGuard<'_, T>) {
        let g = guard.0.take().expect("guard present");
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let g = self.cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        guard.0 = Some(g);
    }

    pub fn wait_for<T>(&self, guard: &mut MutexGuard<'_, T>, timeout: Duration) -> WaitTimeoutResult {
        let g = guard.0.take().expect("guard present");
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let (g, r) = self.cv.wait_timeout(g, timeout).unwrap_or_else(PoisonError::into_inner);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        guard.0 = Some(g);
        WaitTimeoutResult(r.timed_out())
    }

    /// Like parking_lot's: the mutex is released and taken again even when the deadline has
    /// already passed, so a caller that loops on it lets the notifying thread in.
    pub fn wait_until<T>(&self, guard: &mut MutexGuard<'_, T>, deadline: Instant) -> WaitTimeoutResult {
        self.wait_for(guard, deadline.saturating_duration_since(Instant::now()))
    }

    pub fn notify_one(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.cv.notify_one();
        }
    }

    pub fn notify_all(&self) {
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.cv.notify_all();
        }
    }
}

/// A reader-writer lock that ignores poisoning.
#[derive(Default)]
pub struct RwLock<T>(std::sync::RwLock<T>);

impl<T> RwLock<T> {
    pub const fn new(value: T) -> RwLock<T> {
        RwLock(std::sync::RwLock::new(value))
    }

    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// The write lock, trying until `timeout` has passed (used only around fork, where a short
    /// sleep between tries costs nothing).
    pub fn try_write_for(&self, timeout: Duration) -> Option<std::sync::RwLockWriteGuard<'_, T>> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.0.try_write() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => return Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Err(std::sync::TryLockError::WouldBlock) => return None,
            }
        }
    }
}

/// A lock that is not tied to a guard's lifetime, so one thread can hold it across calls (a
/// batch) and release it later with [`RawLock::unlock`].
#[derive(Default)]
struct RawLock {
    locked: Mutex<bool>,
    released: Condvar,
}

impl RawLock {
    fn lock(&self) {
        let mut locked = self.locked.lock();
        while *locked {
            self.released.wait(&mut locked);
        }
        *locked = true;
    }

    fn try_lock_for(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut locked = self.locked.lock();
        while *locked {
            if self.released.wait_until(&mut locked, deadline).timed_out() && *locked {
                return false;
            }
        }
        *locked = true;
        true
    }

    fn unlock(&self) {
        *self.locked.lock() = false;
        self.released.notify_one();
    }
}

/// A mutex its owning thread may lock again (a write inside that thread's open batch).
pub struct ReentrantMutex<T> {
    raw: RawLock,
    /// The owning thread's token (0: none).
    owner: AtomicUsize,
    /// How often the owner holds it; only the owner touches it.
    depth: Cell<usize>,
    data: T,
}

// SAFETY: `depth` is only read and written by the thread that holds `raw`; `data` is only
// reachable through a guard, i.e. by the owning thread (T: Send suffices, as for a Mutex).
unsafe impl<T: Send> Sync for ReentrantMutex<T> {}
unsafe impl<T: Send> Send for ReentrantMutex<T> {}

/// Shared access to a [`ReentrantMutex`]'s value by its owning thread.
pub struct ReentrantMutexGuard<'a, T> {
    lock: &'a ReentrantMutex<T>,
    /// Not Send: it must be released on the thread that took it.
    _not_send: std::marker::PhantomData<*const ()>,
}

fn thread_token() -> usize {
    thread_local!(static TOKEN: u8 = const { 0 });
    TOKEN.with(|t| t as *const u8 as usize)
}

impl<T> ReentrantMutex<T> {
    pub fn new(data: T) -> ReentrantMutex<T> {
        ReentrantMutex { raw: RawLock::default(), owner: AtomicUsize::new(0), depth: Cell::new(0), data }
    }

    pub fn is_owned_by_current_thread(&self) -> bool {
        self.owner.load(Ordering::Relaxed) == thread_token()
    }

    fn enter(&self) -> ReentrantMutexGuard<'_, T> {
        self.depth.set(self.depth.get() + 1);
        ReentrantMutexGuard { lock: self, _not_send: std::marker::PhantomData }
    }

    pub fn lock(&self) -> ReentrantMutexGuard<'_, T> {
        if !self.is_owned_by_current_thread() {
            self.raw.lock();
            self.owner.store(thread_token(), Ordering::Relaxed);
        }
        self.enter()
    }

    pub fn try_lock_for(&self, timeout: Duration) -> Option<ReentrantMutexGuard<'_, T>> {
        if !self.is_owned_by_current_thread() {
            if !self.raw.try_lock_for(timeout) {
                return None;
            }
            self.owner.store(thread_token(), Ordering::Relaxed);
        }
        Some(self.enter())
    }

    /// Releases one level of a guard that was forgotten (`mem::forget`).
    ///
    /// # Safety
    /// The calling thread must own the lock through a forgotten guard.
    pub unsafe fn force_unlock(&self) {
        debug_assert!(self.is_owned_by_current_thread());
        let depth = self.depth.get() - 1;
        self.depth.set(depth);
        if depth == 0 {
            self.owner.store(0, Ordering::Relaxed);
            self.raw.unlock();
        }
    }
}

impl<T> Deref for ReentrantMutexGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.lock.data
    }
}

impl<T> Drop for ReentrantMutexGuard<'_, T> {
    fn drop(&mut self) {
        // SAFETY: this guard is the owning thread's hold on the lock.
        unsafe { self.lock.force_unlock() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_reentrant_lock_is_taken_again_by_its_owner_and_waits_for_others() {
        let m = Arc::new(ReentrantMutex::new(Cell::new(0)));
        let outer = m.lock();
        let inner = m.lock();
        inner.set(1);
        drop(inner);
        assert!(m.is_owned_by_current_thread());
        let other = {
            let m = m.clone();
            std::thread::spawn(move || {
                assert!(m.try_lock_for(Duration::from_millis(20)).is_none(), "held by the main thread");
                let g = m.lock();
                g.get()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        outer.set(2);
        drop(outer);
        assert!(!m.is_owned_by_current_thread());
        assert_eq!(other.join().unwrap(), 2);
    }

    #[test]
    fn a_forgotten_guard_is_released_later_by_its_thread() {
        let m = ReentrantMutex::new(());
        std::mem::forget(m.lock());
        std::mem::forget(m.lock());
        // SAFETY: two guards forgotten above on this thread.
        unsafe { m.force_unlock() };
        assert!(m.is_owned_by_current_thread());
        unsafe { m.force_unlock() };
        assert!(!m.is_owned_by_current_thread());
        std::thread::scope(|s| {
            s.spawn(|| assert!(m.try_lock_for(Duration::from_millis(10)).is_some()));
        });
    }

    #[test]
    fn a_condvar_wakes_a_waiter_and_times_out_without_one() {
        let state = Arc::new((Mutex::new(false), Condvar::new()));
        let waiter = {
            let state = state.clone();
            std::thread::spawn(move || {
                let mut ready = state.0.lock();
                while !*ready {
                    state.1.wait(&mut ready);
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        *state.0.lock() = true;
        state.1.notify_all();
        waiter.join().unwrap();
        let mut g = state.0.lock();
        assert!(state.1.wait_for(&mut g, Duration::from_millis(5)).timed_out());
        assert!(state.1.wait_until(&mut g, Instant::now()).timed_out());
    }

    #[test]
    fn a_panic_while_holding_does_not_poison() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock();
            panic!("while holding");
        })
        .join();
        assert_eq!(*m.lock(), 1);
        assert!(m.try_lock().is_some());
    }
}
