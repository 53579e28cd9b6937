//! The store handle as Python sees it: enqueue (from a prepared [`Template`]), read, admin.
//! Runs on the calling Python thread; every engine call that may block (SQLite I/O, the write
//! lock, waiting) runs with the GIL released. Fork-safe: a handle records the pid that opened it
//! and, used in a forked child, abandons (never closes) the inherited connections and reopens.

use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use queue_dispatcher_core::sync::Mutex;
use queue_dispatcher_core::{
    self as core, admin, Config, DispatcherInfo, ErrorRecord, NewTask, QueueCounts, Runtime, State, Store, Task,
    TaskFilter, TaskId,
};

use crate::errors::{invalid, to_py};
use crate::json;

/// One call of `Store.enqueue_many`: (template, args, kwargs).
type Call<'py> = (PyRef<'py, Template>, Bound<'py, PyTuple>, Option<Bound<'py, PyDict>>);

/// Seconds (float) → Duration, refusing negative, NaN and absurd values.
pub fn seconds(field: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| invalid(field, format!("{s} is not a number of seconds >= 0")))
}

#[pyclass(module = "queue_dispatcher._native", name = "Store", frozen)]
pub struct PyStore {
    config: Config,
    /// (pid that opened it, handle).
    inner: Mutex<(u32, Store)>,
}

impl PyStore {
    /// The engine handle of this process (reopened after a fork).
    pub fn get(&self, py: Python<'_>) -> PyResult<Store> {
        let pid = std::process::id();
        {
            let g = self.inner.lock();
            if g.0 == pid {
                return Ok(g.1.clone());
            }
        }
        let fresh = py.detach(|| Store::open(&self.config)).map_err(to_py)?;
        let mut g = self.inner.lock();
        if g.0 != pid {
            let inherited = std::mem::replace(&mut g.1, fresh);
            // The parent's connections must never be closed from the child.
            std::mem::forget(inherited);
            g.0 = pid;
        }
        Ok(g.1.clone())
    }
}

#[pymethods]
impl PyStore {
    /// Opens `db` (a path or `sqlite:///abs/path[?synchronous=full]`), else `$QUEUE_DISPATCHER_DB`,
    /// else `./queue_dispatcher.db`.
    #[new]
    #[pyo3(signature = (db=None, *, busy_timeout=None))]
    fn new(py: Python<'_>, db: Option<&str>, busy_timeout: Option<f64>) -> PyResult<PyStore> {
        let mut config = Config::resolve(db).map_err(to_py)?;
        if let Some(t) = busy_timeout {
            config.busy_timeout = seconds("busy_timeout", t)?;
        }
        let store = py.detach(|| Store::open(&config)).map_err(to_py)?;
        Ok(PyStore { config, inner: Mutex::new((std::process::id(), store)) })
    }

    /// The database file.
    #[getter]
    fn path(&self) -> String {
        self.config.path.display().to_string()
    }

    fn describe(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.get(py)?.describe())
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("<queue_dispatcher Store {}>", self.get(py)?.describe()))
    }

    /// Enqueues one call of `template` with these arguments; durable when this returns.
    /// Returns the task id (that of the unfinished holder when the unique_key is taken).
    #[pyo3(signature = (template, args, kwargs=None))]
    fn enqueue(
        &self,
        py: Python<'_>,
        template: &Template,
        args: &Bound<'_, PyTuple>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<TaskId> {
        let task = template.build(json::encode_args(args, kwargs)?);
        let store = self.get(py)?;
        py.detach(|| store.enqueue(task)).map(|e| e.id).map_err(to_py)
    }

    /// Enqueues many calls in one transaction: all become visible together, or none.
    fn enqueue_many(&self, py: Python<'_>, calls: Vec<Call<'_>>) -> PyResult<Vec<TaskId>> {
        let tasks = calls
            .iter()
            .map(|(t, a, k)| Ok(t.build(json::encode_args(a, k.as_ref())?)))
            .collect::<PyResult<Vec<NewTask>>>()?;
        let store = self.get(py)?;
        let done = py.detach(|| store.enqueue_many(&tasks)).map_err(to_py)?;
        Ok(done.into_iter().map(|e| e.id).collect())
    }

    /// Adds dependencies to a task that is `new` and was never claimed.
    fn add_dependencies(&self, py: Python<'_>, task: TaskId, depends_on: Vec<TaskId>) -> PyResult<()> {
        let store = self.get(py)?;
        py.detach(|| store.add_dependencies(task, &depends_on)).map_err(to_py)
    }

    fn task(&self, py: Python<'_>, id: TaskId) -> PyResult<TaskRecord> {
        let store = self.get(py)?;
        py.detach(|| store.task(id)).map(TaskRecord::from).map_err(to_py)
    }

    /// Lists tasks. `queue=""` selects tasks without a queue; `meta` keys must equal the given
    /// values (compared as JSON).
    #[pyo3(signature = (*, states=None, queue=None, runtime=None, meta=None, limit=None, offset=None, descending=false))]
    #[allow(clippy::too_many_arguments)]
    fn list(
        &self,
        py: Python<'_>,
        states: Option<Vec<String>>,
        queue: Option<String>,
        runtime: Option<&str>,
        meta: Option<&Bound<'_, PyDict>>,
        limit: Option<u32>,
        offset: Option<u32>,
        descending: bool,
    ) -> PyResult<Vec<TaskRecord>> {
        let mut filter = TaskFilter { limit, offset, descending, ..Default::default() };
        for s in states.unwrap_or_default() {
            filter.states.push(s.parse::<State>().map_err(to_py)?);
        }
        filter.queue = queue.map(|q| if q.is_empty() { None } else { Some(q) });
        filter.runtime = runtime.map(|r| r.parse::<Runtime>()).transpose().map_err(to_py)?;
        if let Some(m) = meta {
            for (k, v) in m.iter() {
                filter.meta.push((k.extract::<String>()?, json::encode_value(&v, "meta")?));
            }
        }
        let store = self.get(py)?;
        let tasks = py.detach(|| store.list(&filter)).map_err(to_py)?;
        Ok(tasks.into_iter().map(TaskRecord::from).collect())
    }

    fn counts(&self, py: Python<'_>) -> PyResult<Vec<QueueCountsRecord>> {
        let store = self.get(py)?;
        Ok(py.detach(|| store.counts()).map_err(to_py)?.into_iter().map(QueueCountsRecord::from).collect())
    }

    fn dispatchers(&self, py: Python<'_>) -> PyResult<Vec<DispatcherRecord>> {
        let store = self.get(py)?;
        Ok(py.detach(|| store.dispatchers()).map_err(to_py)?.into_iter().map(DispatcherRecord::from).collect())
    }

    /// Is a dispatcher (of `runtime`, or of any runtime) heartbeating?
    #[pyo3(signature = (runtime=None))]
    fn dispatcher_alive(&self, py: Python<'_>, runtime: Option<&str>) -> PyResult<bool> {
        let runtime = runtime.map(|r| r.parse::<Runtime>()).transpose().map_err(to_py)?;
        let store = self.get(py)?;
        py.detach(|| store.dispatcher_alive(runtime)).map_err(to_py)
    }

    /// Cancels a task; returns its state afterwards (`aborted`, or `running` with its flag raised).
    fn cancel(&self, py: Python<'_>, id: TaskId) -> PyResult<String> {
        let store = self.get(py)?;
        py.detach(|| store.cancel(id)).map(|s| s.as_str().to_string()).map_err(to_py)
    }

    /// Aborts everything unfinished; returns how many tasks were affected.
    fn reset(&self, py: Python<'_>) -> PyResult<u64> {
        let store = self.get(py)?;
        py.detach(|| store.reset()).map_err(to_py)
    }

    fn pause(&self, py: Python<'_>, queue: &str) -> PyResult<()> {
        let store = self.get(py)?;
        py.detach(|| store.pause(queue)).map_err(to_py)
    }

    fn resume(&self, py: Python<'_>, queue: &str) -> PyResult<()> {
        let store = self.get(py)?;
        py.detach(|| store.resume(queue)).map_err(to_py)
    }

    /// Deletes tasks finished more than `older_than` seconds ago (except those an unfinished task
    /// depends on); returns how many.
    fn purge(&self, py: Python<'_>, older_than: f64) -> PyResult<u64> {
        let age = seconds("older_than", older_than)?;
        let store = self.get(py)?;
        py.detach(|| store.purge(age)).map_err(to_py)
    }

    /// Waits until the task is finished or `timeout` seconds pass; returns the task as last read.
    /// The GIL is released while waiting, in short slices so signals (Ctrl-C) are handled.
    #[pyo3(signature = (id, timeout=None))]
    fn wait(&self, py: Python<'_>, id: TaskId, timeout: Option<f64>) -> PyResult<TaskRecord> {
        let deadline = timeout.map(|t| seconds("timeout", t)).transpose()?.map(|t| Instant::now() + t);
        let store = self.get(py)?;
        loop {
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(Duration::from_millis(100)),
                None => Duration::from_millis(100),
            };
            let task = py.detach(|| store.wait(id, Some(slice))).map_err(to_py)?;
            if task.state.is_finished() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(TaskRecord::from(task));
            }
            py.check_signals()?;
        }
    }

    /// Opens a batch on this thread (see `queue_dispatcher.batch()`).
    fn begin_batch(&self, py: Python<'_>) -> PyResult<Batch> {
        let store = self.get(py)?;
        let batch = py.detach(|| store.begin_batch().map(SendBatch)).map_err(to_py)?;
        Ok(Batch { inner: Some(batch.0) })
    }

    /// The human-readable status report (dispatchers, per-queue counts, running tasks).
    fn status_report(&self, py: Python<'_>) -> PyResult<String> {
        let store = self.get(py)?;
        py.detach(|| admin::status_report(&store)).map_err(to_py)
    }
}

/// Moves a batch across `detach` (it never leaves the thread: detach runs on this thread).
struct SendBatch(core::Batch);
// SAFETY: `py.detach` runs its closure on the calling thread, so the batch stays on the thread
// that began it, as the engine requires.
unsafe impl Send for SendBatch {}

impl SendBatch {
    fn commit(self) -> queue_dispatcher_core::Result<()> {
        self.0.commit()
    }

    fn rollback(self) -> queue_dispatcher_core::Result<()> {
        self.0.rollback()
    }
}

/// An open batch: tasks enqueued (and linked) on this thread become visible together when it
/// commits, or not at all.
#[pyclass(module = "queue_dispatcher._native", name = "Batch", unsendable)]
pub struct Batch {
    inner: Option<core::Batch>,
}

#[pymethods]
impl Batch {
    fn commit(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.inner.take() {
            Some(b) => {
                let b = SendBatch(b);
                py.detach(move || b.commit()).map_err(to_py)
            }
            None => Err(invalid("batch", "this batch has already ended")),
        }
    }

    fn rollback(&mut self, py: Python<'_>) -> PyResult<()> {
        match self.inner.take() {
            Some(b) => {
                let b = SendBatch(b);
                py.detach(move || b.rollback()).map_err(to_py)
            }
            None => Err(invalid("batch", "this batch has already ended")),
        }
    }

    #[getter]
    fn open(&self) -> bool {
        self.inner.is_some()
    }
}

/// What to enqueue, prepared once per task function (and per `enqueue_with` call): the target
/// and its options. Arguments are added per call by `Store.enqueue`.
#[pyclass(module = "queue_dispatcher._native", name = "Template", frozen)]
pub struct Template {
    task: NewTask,
    delay: Option<Duration>,
}

impl Template {
    fn build(&self, args: String) -> NewTask {
        let mut task = self.task.clone();
        task.args = args;
        if let Some(d) = self.delay {
            task.run_at = Some(core::clock::now_micros() + d.as_micros() as i64);
        }
        task
    }
}

#[pymethods]
impl Template {
    /// `runtime` is the language whose dispatchers run the task (`"python"` by default; `"ruby"`
    /// enqueues a Ruby task by its name). `receiver` is the id of the instance a Ruby
    /// `Const#method` target is called on (found again with `Const.find(id)`).
    #[new]
    #[pyo3(signature = (target, *, runtime="python", receiver=None, queue=None, priority=core::DEFAULT_PRIORITY, retries=0, timeout=None, delay=None, run_at=None, unique_key=None, meta=None, depends_on=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        target: String,
        runtime: &str,
        receiver: Option<&Bound<'_, PyAny>>,
        queue: Option<String>,
        priority: i64,
        retries: u32,
        timeout: Option<f64>,
        delay: Option<f64>,
        run_at: Option<i64>,
        unique_key: Option<String>,
        meta: Option<&Bound<'_, PyAny>>,
        depends_on: Vec<TaskId>,
    ) -> PyResult<Template> {
        let runtime = runtime.parse::<Runtime>().map_err(to_py)?;
        core::target::validate(runtime, &target).map_err(to_py)?;
        let receiver = receiver.filter(|r| !r.is_none()).map(|r| json::encode_value(r, "receiver")).transpose()?;
        core::target::validate_receiver(runtime, &target, receiver.as_deref()).map_err(to_py)?;
        let mut task = NewTask::new(runtime, target);
        task.receiver = receiver;
        task.queue = queue;
        task.priority = priority;
        task.retries = retries;
        task.timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        if task.timeout.is_some_and(|t| t.is_zero()) {
            return Err(invalid("timeout", "must be positive"));
        }
        task.run_at = run_at;
        task.unique_key = unique_key;
        task.meta = meta.filter(|m| !m.is_none()).map(|m| json::encode_value(m, "meta")).transpose()?;
        task.depends_on = depends_on;
        let delay = delay.map(|d| seconds("delay", d)).transpose()?;
        Ok(Template { task, delay })
    }

    #[getter]
    fn target(&self) -> &str {
        &self.task.target
    }

    #[getter]
    fn queue(&self) -> Option<&str> {
        self.task.queue.as_deref()
    }

    #[getter]
    fn priority(&self) -> i64 {
        self.task.priority
    }

    #[getter]
    fn runtime(&self) -> &'static str {
        self.task.runtime.as_str()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Template {} {} queue={:?} priority={}>",
            self.task.runtime.as_str(),
            self.task.target,
            self.task.queue,
            self.task.priority
        )
    }
}

/// A stored failure: exception class, message and backtrace lines.
#[pyclass(module = "queue_dispatcher._native", name = "ErrorInfo", frozen, get_all, eq)]
#[derive(Clone, PartialEq)]
pub struct ErrorInfo {
    pub class_name: String,
    pub message: String,
    pub backtrace: Vec<String>,
}

impl From<ErrorRecord> for ErrorInfo {
    fn from(e: ErrorRecord) -> Self {
        ErrorInfo { class_name: e.class, message: e.message, backtrace: e.backtrace }
    }
}

#[pymethods]
impl ErrorInfo {
    fn __repr__(&self) -> String {
        format!("<ErrorInfo {}: {}>", self.class_name, self.message)
    }
}

/// One stored task as last read. Times are integer microseconds since the epoch (UTC).
#[pyclass(module = "queue_dispatcher._native", name = "TaskRecord", frozen, get_all)]
#[derive(Clone)]
pub struct TaskRecord {
    pub id: TaskId,
    pub queue: Option<String>,
    pub runtime: String,
    pub target: String,
    pub receiver: Option<String>,
    pub args: String,
    pub priority: i64,
    pub state: String,
    pub attempts: i64,
    pub retries: i64,
    pub lost: i64,
    pub run_at: i64,
    pub timeout: Option<f64>,
    pub unique_key: Option<String>,
    pub meta: Option<String>,
    pub result: Option<String>,
    pub error: Option<ErrorInfo>,
    pub error_history: Vec<ErrorInfo>,
    pub message: Option<String>,
    pub perc_finished: Option<f64>,
    pub enqueued_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub dispatcher_id: Option<i64>,
    pub depends_on: Vec<TaskId>,
    pub cancel_requested: bool,
}

impl From<Task> for TaskRecord {
    fn from(t: Task) -> Self {
        TaskRecord {
            id: t.id,
            queue: t.queue,
            runtime: t.runtime.as_str().to_string(),
            target: t.target,
            receiver: t.receiver,
            args: t.args,
            priority: t.priority,
            state: t.state.as_str().to_string(),
            attempts: t.attempts,
            retries: t.retries,
            lost: t.lost,
            run_at: t.run_at,
            timeout: t.timeout.map(|d| d.as_secs_f64()),
            unique_key: t.unique_key,
            meta: t.meta,
            result: t.result,
            error: t.error.map(ErrorInfo::from),
            error_history: t.error_history.into_iter().map(ErrorInfo::from).collect(),
            message: t.message,
            perc_finished: t.perc_finished,
            enqueued_at: t.enqueued_at,
            started_at: t.started_at,
            finished_at: t.finished_at,
            dispatcher_id: t.dispatcher_id,
            depends_on: t.depends_on,
            cancel_requested: t.cancel_requested,
        }
    }
}

#[pymethods]
impl TaskRecord {
    fn __repr__(&self) -> String {
        format!("<TaskRecord {} {} {}>", self.id, self.target, self.state)
    }
}

/// Counts of one queue (`queue` None: tasks without a queue), per state; `waiting` is the part
/// of `new` whose dependencies or run_at are not met yet.
#[pyclass(module = "queue_dispatcher._native", name = "QueueCounts", frozen, get_all)]
#[derive(Clone)]
pub struct QueueCountsRecord {
    pub queue: Option<String>,
    pub paused: bool,
    pub new: u64,
    pub waiting: u64,
    pub running: u64,
    pub successful: u64,
    pub error: u64,
    pub aborted: u64,
}

impl From<QueueCounts> for QueueCountsRecord {
    fn from(c: QueueCounts) -> Self {
        QueueCountsRecord {
            queue: c.queue,
            paused: c.paused,
            new: c.new,
            waiting: c.waiting,
            running: c.running,
            successful: c.successful,
            error: c.error,
            aborted: c.aborted,
        }
    }
}

#[pymethods]
impl QueueCountsRecord {
    fn __repr__(&self) -> String {
        format!(
            "<QueueCounts {:?} new={} waiting={} running={} successful={} error={} aborted={}>",
            self.queue, self.new, self.waiting, self.running, self.successful, self.error, self.aborted
        )
    }
}

/// A dispatcher's heartbeat row.
#[pyclass(module = "queue_dispatcher._native", name = "DispatcherInfo", frozen, get_all)]
#[derive(Clone)]
pub struct DispatcherRecord {
    pub id: i64,
    pub runtime: String,
    pub name: String,
    pub host: String,
    pub pid: i64,
    pub workers: i64,
    pub queues: Option<String>,
    pub started_at: i64,
    pub heartbeat_at: i64,
    pub alive: bool,
    pub running: u64,
}

impl From<DispatcherInfo> for DispatcherRecord {
    fn from(d: DispatcherInfo) -> Self {
        DispatcherRecord {
            id: d.id,
            runtime: d.runtime.as_str().to_string(),
            name: d.name,
            host: d.host,
            pid: d.pid,
            workers: d.workers,
            queues: d.queues,
            started_at: d.started_at,
            heartbeat_at: d.heartbeat_at,
            alive: d.alive,
            running: d.running,
        }
    }
}

#[pymethods]
impl DispatcherRecord {
    fn __repr__(&self) -> String {
        format!("<DispatcherInfo {} {} pid={} alive={}>", self.id, self.name, self.pid, self.alive)
    }
}

/// Benchmark support: the engine's own enqueue rate (tasks/s) on `db`, one task per call from
/// one thread, with no Python in the loop; the yardstick `py_enqueue` is compared with.
#[pyfunction]
pub fn _core_enqueue_rate(py: Python<'_>, db: &str, n: usize, args: &str) -> PyResult<f64> {
    let store = py.detach(|| Store::open(&Config::new(db))).map_err(to_py)?;
    let task = NewTask::new(Runtime::Python, "bench.jobs:noop").args(args);
    py.detach(|| {
        let tasks = vec![task; n];
        let start = Instant::now();
        for t in tasks {
            store.enqueue(t)?;
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .map_err(to_py)
}

/// Benchmark support: the engine's own drain rate (tasks/s) of `n` ready no-op tasks on a fresh
/// `db` by `workers` Rust threads using `complete_and_claim`, with no Python in the loop; the
/// yardstick `py_drain_2w` is compared with.
#[pyfunction]
pub fn _core_drain_rate(py: Python<'_>, db: &str, n: usize, workers: usize) -> PyResult<f64> {
    use queue_dispatcher_core::{Dispatcher, DispatcherConfig, Outcome};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let store = py.detach(|| Store::open(&Config::new(db))).map_err(to_py)?;
    py.detach(|| {
        let task = NewTask::new(Runtime::Python, "bench.jobs:noop");
        for chunk in vec![task; n].chunks(5000) {
            store.enqueue_many(chunk)?;
        }
        let mut cfg = DispatcherConfig::new(Runtime::Python);
        cfg.workers = workers;
        let d = Dispatcher::start(&store, cfg)?;
        let left = AtomicUsize::new(n);
        let take = || left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1)).is_ok();
        let start = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..workers {
                let w = d.worker();
                let take = &take;
                s.spawn(move || -> queue_dispatcher_core::Result<()> {
                    let wait = Some(Duration::from_secs(10));
                    let mut cur = if take() { w.claim(wait)? } else { None };
                    while let Some(c) = cur {
                        let ok = Outcome::Success("null".into());
                        cur = if take() {
                            let (done, next) = w.complete_and_claim(&c, ok, wait);
                            done?;
                            next?
                        } else {
                            w.complete(&c, ok)?;
                            None
                        };
                    }
                    Ok(())
                });
            }
        });
        let rate = n as f64 / start.elapsed().as_secs_f64();
        d.shutdown(Duration::from_secs(1))?;
        Ok(rate)
    })
    .map_err(to_py)
}
