//! `os.fork()` in a process whose other threads may be inside SQLite (the engine's writer,
//! watcher and checkpoint threads, worker threads enqueuing). A child inherits every global
//! SQLite mutex in the state it had at the fork: one held by another thread (e.g. the allocator's)
//! stays held forever, and the child's first `Store` open deadlocks. So the fork hook of the
//! package takes SQLite's static mutexes before the fork (outer before inner, the order SQLite
//! nests them, so no thread inside SQLite can be waiting on us for one we do not hold yet) and
//! releases them on both sides. Runs on the forking thread, GIL held; no thread holds the GIL
//! while inside SQLite, so this cannot deadlock against Python.
//! (Engine-level concern: requested for queue_dispatcher_core so the Ruby binding shares it.)

use std::os::raw::c_int;

use rusqlite::ffi;

/// Outer mutexes first: MAIN guards initialization, OPEN/VFS are taken around file opens and
/// may allocate (PRNG and LRU likewise), MEM/PMEM are the allocator's innermost ones.
const STATIC_MUTEXES: [c_int; 12] = [
    ffi::SQLITE_MUTEX_STATIC_MAIN,
    ffi::SQLITE_MUTEX_STATIC_OPEN,
    ffi::SQLITE_MUTEX_STATIC_VFS1,
    ffi::SQLITE_MUTEX_STATIC_VFS2,
    ffi::SQLITE_MUTEX_STATIC_VFS3,
    ffi::SQLITE_MUTEX_STATIC_APP1,
    ffi::SQLITE_MUTEX_STATIC_APP2,
    ffi::SQLITE_MUTEX_STATIC_APP3,
    ffi::SQLITE_MUTEX_STATIC_PRNG,
    ffi::SQLITE_MUTEX_STATIC_LRU,
    ffi::SQLITE_MUTEX_STATIC_PMEM,
    ffi::SQLITE_MUTEX_STATIC_MEM,
];

fn mutexes() -> impl DoubleEndedIterator<Item = *mut ffi::sqlite3_mutex> {
    // SAFETY: sqlite3_mutex_alloc with a static id returns SQLite's own static mutex (or null
    // when SQLite was built without mutexes); it initializes SQLite if needed.
    STATIC_MUTEXES
        .iter()
        .map(|&id| unsafe { ffi::sqlite3_mutex_alloc(id) })
}

/// `os.register_at_fork(before=...)`: holds every static SQLite mutex across the fork.
#[pyo3::pyfunction]
pub fn _before_fork() {
    for m in mutexes() {
        if !m.is_null() {
            // SAFETY: a valid static mutex; released by _after_fork on this same thread.
            unsafe { ffi::sqlite3_mutex_enter(m) };
        }
    }
}

/// `os.register_at_fork(after_in_parent=..., after_in_child=...)`: releases them again.
#[pyo3::pyfunction]
pub fn _after_fork() {
    for m in mutexes().rev() {
        if !m.is_null() {
            // SAFETY: entered by _before_fork on this thread (the forking thread, in the child too).
            unsafe { ffi::sqlite3_mutex_leave(m) };
        }
    }
}
