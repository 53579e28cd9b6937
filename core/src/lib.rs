//! queue_dispatcher's engine: persistent task queues in one SQLite file, with serial named queues,
//! dependencies across queues and languages, delays, retries, timeouts, leases and recovery, and
//! a pull-based worker API that Python and Ruby bindings drive from their own threads.
//!
//! ```text
//!   enqueue ──► new ──claim──► running ──complete──► successful
//!               ▲ │               │ ├──fail, no retries left──► error
//!               │ │               │ └──cancel/reset flag, code returned──► aborted
//!               │ │               └──fail with retries left / lease lost──► new
//!               │ └──cancel / reset / failed dependency──► aborted | error
//! ```
//!
//! - [`Store`]: enqueue (one, or many atomically, or inside a batch), dependencies, cancel,
//!   listings, counts, pause/resume, reset, purge.
//! - [`Dispatcher`] / [`Worker`]: register, heartbeat, claim (blocking, wakeable), complete.
//!
//! The behaviour contract is the project's DESIGN.md; each rule is enforced where it is named
//! in the module docs (`store::schema` for what the database itself guarantees).

pub mod admin;
pub mod clock;
mod dispatcher;
mod error;
mod hub;
pub mod pidfile;
mod retry;
mod store;
pub mod sync;
pub mod target;
mod task;

pub use dispatcher::{ClaimKind, Claimed, Dispatcher, DispatcherConfig, Worker, WorkerWaker};
pub use error::{Error, Result};
pub use hub::CancelFlag;
pub use pidfile::PidFile;
pub use store::{Batch, Config, PostgresConfig, QueueSelection, Store, Synchronous, DB_ENV, DEFAULT_DB};
pub use task::{
    CancelReason, DispatcherInfo, Enqueued, ErrorRecord, NewTask, Outcome, QueueCounts, Runtime, Settled, State, Task,
    TaskFilter, TaskId, DEFAULT_PRIORITY,
};

/// Hooks for hosts that fork (gunicorn --preload, Puma preload_app!): call [`fork::prepare`]
/// right before fork(), then [`fork::after_in_parent`] in the parent and
/// [`fork::after_in_child`] in the child (`os.register_at_fork`, `Process._fork`). Every Store
/// handle keeps working on both sides: the child abandons its inherited connections (never
/// closing them, which would drop the parent's locks) and opens the file again. Dispatchers do
/// not survive fork (their threads do not exist in the child); start worker processes by exec.
pub mod fork {
    pub use crate::store::db_fork::{
        after_fork_in_child as after_in_child, after_fork_in_parent as after_in_parent, prepare_fork as prepare,
    };
}

/// The engine's version (the one version of the project).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
