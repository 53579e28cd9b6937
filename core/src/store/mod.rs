//! Storage behind one narrow interface whose functions are named after state transitions
//! (enqueue, claim, complete/fail/retry via `settle`, cancel, recover, heartbeat...), so a second
//! store (PostgreSQL) can implement the same semantics and pass the same test suite.
//! [`Store`] is the public handle: cheap to clone, usable from any thread.

mod db;
pub(crate) mod db_fork {
    pub use super::db::{after_fork_in_child, after_fork_in_parent, prepare_fork};
}
mod combine;
mod pg_pool;
mod postgres;
mod postgres_schema;
mod process_local;
pub(crate) mod schema;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::task::{
    CancelReason, DispatcherInfo, Enqueued, NewTask, Outcome, QueueCounts, Settled, State, Task, TaskFilter, TaskId,
};
use crate::Runtime;

pub use db::Synchronous;
pub use postgres::PostgresConfig;

/// Environment variable naming the database when no path is given.
pub const DB_ENV: &str = "QUEUE_DISPATCHER_DB";
/// Database file used when neither an argument nor the environment names one.
pub const DEFAULT_DB: &str = "queue_dispatcher.db";

/// How to open a store.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub path: PathBuf,
    /// NORMAL (default): a committed task survives any process crash. FULL: it also survives
    /// power loss, at several times the cost per commit.
    pub synchronous: Synchronous,
    /// How long a write waits for another process's lock before failing with `Error::Busy`.
    pub busy_timeout: Duration,
    /// The -wal file is checkpointed and truncated back under this size.
    pub wal_limit_bytes: u64,
    /// Set for a `postgres://` URL: the store is PostgreSQL (`path` then holds the URL as given).
    pub postgres: Option<PostgresConfig>,
}

impl Config {
    pub fn new(path: impl Into<PathBuf>) -> Config {
        Config {
            path: path.into(),
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(30),
            wal_limit_bytes: 16 << 20,
            postgres: None,
        }
    }

    /// Resolves the database location: the argument, else `$QUEUE_DISPATCHER_DB`, else
    /// `queue_dispatcher.db` in the working directory. Accepts a plain path or
    /// `sqlite:///abs/path` / `sqlite://rel/path`, optionally followed by `?synchronous=full`, or a
    /// `postgres://user@host:port/db` (or `postgresql://`) URL, optionally with `?schema=name`.
    pub fn resolve(arg: Option<&str>) -> Result<Config> {
        let env = std::env::var(DB_ENV).ok().filter(|s| !s.is_empty());
        let spec = arg.filter(|s| !s.is_empty()).map(str::to_string).or(env).unwrap_or_else(|| DEFAULT_DB.to_string());
        Config::parse(&spec)
    }

    pub fn parse(spec: &str) -> Result<Config> {
        if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
            let mut cfg = Config::new(spec);
            cfg.postgres = Some(PostgresConfig::parse(spec)?);
            return Ok(cfg);
        }
        let (location, query) = match spec.split_once('?') {
            Some((l, q)) if spec.starts_with("sqlite:") => (l, Some(q)),
            _ => (spec, None),
        };
        let path = match location.strip_prefix("sqlite://") {
            Some(rest) => rest,
            None if location.contains("://") => {
                return Err(Error::invalid(
                    "database",
                    format!(
                    "{spec:?}: unsupported URL scheme (supported: SQLite paths, sqlite://, postgres://, postgresql://)"
                ),
                ))
            }
            None => location,
        };
        if path.is_empty() {
            return Err(Error::invalid("database", "empty path"));
        }
        let mut cfg = Config::new(path);
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("synchronous", v)) => cfg.synchronous = v.parse()?,
                _ => {
                    return Err(Error::invalid(
                        "database",
                        format!("{spec:?}: unknown option {pair:?} (known: synchronous=normal|full)"),
                    ))
                }
            }
        }
        Ok(cfg)
    }
}

/// A dispatcher as the store records it.
#[derive(Debug, Clone)]
pub(crate) struct Registration {
    pub runtime: Runtime,
    pub name: String,
    pub workers: usize,
    pub queues: Option<String>,
    pub lease: Duration,
}

/// Which tasks a dispatcher claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSelection {
    /// Only these named queues (`None`: every named queue).
    pub named: Option<Vec<String>>,
    /// Whether tasks without a queue are claimed too.
    pub parallel: bool,
}

impl Default for QueueSelection {
    fn default() -> Self {
        QueueSelection { named: None, parallel: true }
    }
}

pub(crate) enum Settle {
    /// The code returned (or raised): store the outcome.
    Outcome(Outcome),
    /// The run never started (its worker was stopped first): back to `new`, no attempt counted.
    Release,
}

pub(crate) struct SettleReq {
    pub id: TaskId,
    pub token: i64,
    pub settle: Settle,
    pub progress: Option<Progress>,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Progress {
    pub message: Option<String>,
    pub perc: Option<f64>,
}

pub(crate) struct ProgressReq {
    pub id: TaskId,
    pub token: i64,
    pub progress: Progress,
}

pub(crate) struct ClaimReq<'a> {
    pub dispatcher: i64,
    pub runtime: Runtime,
    pub selection: &'a QueueSelection,
    pub want: usize,
}

/// What a claim hands to a worker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ClaimedRow {
    /// Run the task's code with this attempt token.
    Run { task: Task, token: i64 },
    /// The task already ended (failed dependency, or aborted outside a worker); its on_error
    /// callback is owed by a worker of its runtime.
    OnError { task: Task },
}

pub(crate) struct RetryPolicy {
    pub base: Duration,
    pub cap: Duration,
}

pub(crate) struct CycleOut {
    pub settled: Vec<Result<Settled>>,
    pub claimed: Vec<ClaimedRow>,
    /// Earliest run_at (µs, UTC) of a delayed task, to wake up for.
    pub next_due: Option<i64>,
}

pub(crate) struct Beat {
    /// Running tasks of this dispatcher whose cancel or reset was requested elsewhere.
    pub cancels: Vec<(TaskId, CancelReason)>,
}

/// The transitions every store implements. All writes are transactions; each function is atomic.
pub(crate) trait Backend: Send + Sync {
    fn hub(&self) -> Arc<Hub>;
    fn describe(&self) -> String;

    fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Enqueued>>;
    fn add_dependencies(&self, task: TaskId, deps: &[TaskId]) -> Result<()>;
    fn cancel(&self, id: TaskId) -> Result<State>;
    fn reset(&self) -> Result<u64>;
    fn set_paused(&self, queue: &str, paused: bool) -> Result<()>;
    fn purge(&self, successful_before: i64, failed_before: i64) -> Result<u64>;

    fn task(&self, id: TaskId) -> Result<Task>;
    fn list(&self, filter: &TaskFilter) -> Result<Vec<Task>>;
    fn counts(&self) -> Result<Vec<QueueCounts>>;
    fn dispatchers(&self) -> Result<Vec<DispatcherInfo>>;

    fn register(&self, reg: &Registration) -> Result<i64>;
    fn heartbeat(&self, id: i64, reg: &Registration) -> Result<Beat>;
    /// Returns running tasks of dead dispatchers to `new` (counted as lost) or, past `max_lost`
    /// or when cancelled, to `aborted`. Returns how many were recovered.
    fn recover(&self, max_lost: u32) -> Result<u64>;
    /// Releases this dispatcher's unfinished runs at once (it is leaving) and removes its row.
    fn deregister(&self, id: i64, max_lost: u32) -> Result<u64>;
    /// Settles outcomes, writes coalesced progress, then claims: one transaction (group commit).
    fn cycle(
        &self,
        settles: &[SettleReq],
        progress: &[ProgressReq],
        claim: Option<ClaimReq<'_>>,
        retry: &RetryPolicy,
    ) -> Result<CycleOut>;

    fn begin_batch(&self) -> Result<()>;
    fn end_batch(&self, commit: bool) -> Result<()>;
}

/// Handle on a queue database. Clones share one connection set per process and file.
#[derive(Clone)]
pub struct Store {
    pub(crate) backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({})", self.backend.describe())
    }
}

impl Store {
    pub fn open(config: &Config) -> Result<Store> {
        if config.postgres.is_some() {
            return Ok(Store { backend: Arc::new(postgres::PgStore::open(config)?) });
        }
        Ok(Store { backend: Arc::new(sqlite::SqliteStore::open(config)?) })
    }

    /// Opens `arg`, `$QUEUE_DISPATCHER_DB` or `./queue_dispatcher.db` (see [`Config::resolve`]).
    pub fn open_default(arg: Option<&str>) -> Result<Store> {
        Store::open(&Config::resolve(arg)?)
    }

    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Enqueues one task; durable when this returns.
    pub fn enqueue(&self, task: NewTask) -> Result<Enqueued> {
        Ok(self.backend.enqueue(std::slice::from_ref(&task))?[0])
    }

    /// Enqueues many tasks in one transaction: all become visible together, or none.
    pub fn enqueue_many(&self, tasks: &[NewTask]) -> Result<Vec<Enqueued>> {
        self.backend.enqueue(tasks)
    }

    /// Adds dependencies to a task that is `new` and was never claimed.
    pub fn add_dependencies(&self, task: TaskId, deps: &[TaskId]) -> Result<()> {
        self.backend.add_dependencies(task, deps)
    }

    pub fn task(&self, id: TaskId) -> Result<Task> {
        self.backend.task(id)
    }

    pub fn list(&self, filter: &TaskFilter) -> Result<Vec<Task>> {
        self.backend.list(filter)
    }

    pub fn counts(&self) -> Result<Vec<QueueCounts>> {
        self.backend.counts()
    }

    /// A `new` task becomes `aborted`; a running one gets its cancellation flag raised and is
    /// stored `aborted` when its code returns. Finished tasks are left alone. Returns the state.
    pub fn cancel(&self, id: TaskId) -> Result<State> {
        self.backend.cancel(id)
    }

    /// Aborts everything unfinished (the original `reset_immediately!`): `new` tasks at once,
    /// running ones when their code returns. Returns how many tasks were affected.
    pub fn reset(&self) -> Result<u64> {
        self.backend.reset()
    }

    pub fn pause(&self, queue: &str) -> Result<()> {
        self.backend.set_paused(queue, true)
    }

    pub fn resume(&self, queue: &str) -> Result<()> {
        self.backend.set_paused(queue, false)
    }

    /// Deletes finished tasks that finished more than `older_than` ago, except those an
    /// unfinished task depends on.
    pub fn purge(&self, older_than: Duration) -> Result<u64> {
        let cutoff = crate::clock::now_micros() - older_than.as_micros() as i64;
        self.backend.purge(cutoff, cutoff)
    }

    pub fn dispatchers(&self) -> Result<Vec<DispatcherInfo>> {
        self.backend.dispatchers()
    }

    /// Is a dispatcher (of `runtime`, or of any runtime) heartbeating?
    pub fn dispatcher_alive(&self, runtime: Option<Runtime>) -> Result<bool> {
        Ok(self.dispatchers()?.iter().any(|d| d.alive && runtime.is_none_or(|r| r == d.runtime)))
    }

    /// Opens a batch on this thread: everything this thread enqueues (or links with
    /// `add_dependencies`) until the batch ends becomes visible to workers together, or not at
    /// all. The batch holds the database's write lock, so keep it short; it must end on the
    /// thread that began it. Batches nest.
    pub fn begin_batch(&self) -> Result<Batch> {
        self.backend.begin_batch()?;
        Ok(Batch { store: self.clone(), open: true, _not_send: std::marker::PhantomData })
    }

    /// Waits until task `id` is finished, or `timeout` passes; returns the task as last read.
    /// Wakes on every commit to the database, so it returns within about a millisecond.
    pub fn wait(&self, id: TaskId, timeout: Option<Duration>) -> Result<Task> {
        let hub = self.backend.hub();
        let changes: Receiver<()> = hub.subscribe();
        let _interest = hub.interest();
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let task = self.task(id)?;
            if task.state.is_finished() {
                return Ok(task);
            }
            let slice = Duration::from_millis(200);
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) => left.min(slice),
                    None => return Ok(task),
                },
                None => slice,
            };
            let _ = changes.recv_timeout(wait);
        }
    }
}

/// An open batch; see [`Store::begin_batch`]. Dropping it without `commit` rolls it back.
pub struct Batch {
    store: Store,
    open: bool,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Batch {
    pub fn commit(mut self) -> Result<()> {
        self.open = false;
        self.store.backend.end_batch(true)
    }

    pub fn rollback(mut self) -> Result<()> {
        self.open = false;
        self.store.backend.end_batch(false)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.open {
            let _ = self.store.backend.end_batch(false);
        }
    }
}
