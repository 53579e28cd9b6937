//! `os.register_at_fork` hooks: the engine's own fork support (queue_dispatcher_core::fork)
//! holds every engine transaction of this process and SQLite's global mutexes across the fork,
//! so a child made while engine threads are busy does not inherit a lock held by a thread it
//! lacks. Runs on the forking thread.

use pyo3::prelude::*;

/// `before=`: waits (without the GIL, so a thread finishing a batch can take it) until no engine
/// transaction is in flight, then holds the locks until `_after_fork`.
#[pyfunction]
pub fn _before_fork(py: Python<'_>) {
    py.detach(queue_dispatcher_core::fork::prepare);
}

/// `after_in_parent=`: releases them.
#[pyfunction]
pub fn _after_fork() {
    queue_dispatcher_core::fork::after_in_parent();
}

/// `after_in_child=` (through the package): releases SQLite's locks; the inherited databases are
/// abandoned and opened again at their next use.
#[pyfunction]
pub fn _after_fork_child() {
    queue_dispatcher_core::fork::after_in_child();
}
