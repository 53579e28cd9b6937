//! Native worker threads. Each is a Rust thread that waits in `Worker::claim` without the GIL
//! and attaches to Python only to run the task's code (and its callbacks); the host's main
//! thread keeps signal handling and the shutdown wait (see `WorkerPool.wait`).
//! Python exceptions never unwind through Rust: they are caught here and stored as the task's
//! failure record (class, message, traceback lines). Targets resolve only by one exact-string
//! lookup in the registry dict the package fills from `@task` / `@job`; nothing is imported or
//! looked up along a path taken from the row.

use std::cell::RefCell;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};
use queue_dispatcher_core::sync::{Condvar, Mutex};
use queue_dispatcher_core::{
    CancelReason, ClaimKind, Claimed, Dispatcher, DispatcherConfig, Error as CoreError, ErrorRecord, Outcome,
    QueueSelection, Runtime, Settled, Worker,
};

use crate::errors::{invalid, to_py};
use crate::json;
use crate::store::{seconds, PyStore};

const DEBUG: i32 = 10;
const INFO: i32 = 20;
const WARNING: i32 = 30;
const ERROR: i32 = 40;

/// A registered task: what a target name in the registry resolves to.
#[pyclass(module = "queue_dispatcher._native", name = "Registered", frozen, get_all)]
pub struct Registered {
    pub name: String,
    pub func: Py<PyAny>,
    pub on_success: Option<Py<PyAny>>,
    pub on_error: Option<Py<PyAny>>,
}

#[pymethods]
impl Registered {
    #[new]
    #[pyo3(signature = (name, func, on_success=None, on_error=None))]
    fn new(
        name: String,
        func: Py<PyAny>,
        on_success: Option<Py<PyAny>>,
        on_error: Option<Py<PyAny>>,
    ) -> PyResult<Registered> {
        queue_dispatcher_core::target::validate(Runtime::Python, &name).map_err(to_py)?;
        Ok(Registered { name, func, on_success, on_error })
    }

    fn __repr__(&self) -> String {
        format!("<Registered {}>", self.name)
    }
}

struct Current {
    worker: Arc<Worker>,
    claimed: Arc<Claimed>,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

/// The task running on this thread, seen from inside its code.
#[pyclass(module = "queue_dispatcher._native", name = "RunningTask", frozen)]
pub struct RunningTask {
    worker: Arc<Worker>,
    claimed: Arc<Claimed>,
}

#[pymethods]
impl RunningTask {
    #[getter]
    fn id(&self) -> i64 {
        self.claimed.task.id
    }

    #[getter]
    fn target(&self) -> &str {
        &self.claimed.task.target
    }

    #[getter]
    fn queue(&self) -> Option<&str> {
        self.claimed.task.queue.as_deref()
    }

    /// 1 for the first run, 2 for the first retry...
    #[getter]
    fn attempt(&self) -> i64 {
        self.claimed.task.attempts
    }

    /// The stored meta object as JSON text.
    #[getter]
    fn meta(&self) -> Option<&str> {
        self.claimed.task.meta.as_deref()
    }

    /// True once the task was cancelled, reset or timed out: its code should stop.
    #[getter]
    fn cancelled(&self) -> bool {
        self.claimed.cancelled().is_some()
    }

    /// Why the flag was raised: "cancelled", "reset", "timeout", or None.
    #[getter]
    fn cancel_reason(&self) -> Option<&'static str> {
        self.claimed.cancelled().map(|r| match r {
            CancelReason::Cancelled => "cancelled",
            CancelReason::Reset => "reset",
            CancelReason::Timeout => "timeout",
        })
    }

    /// Reports progress; readers see it while the task runs (writes coalesced to ~10/s).
    #[pyo3(signature = (msg=None, perc_finished=None))]
    fn update_message(&self, msg: Option<&str>, perc_finished: Option<f64>) -> PyResult<()> {
        if msg.is_none() && perc_finished.is_none() {
            return Ok(());
        }
        self.worker.progress(&self.claimed, msg, perc_finished).map_err(to_py)
    }

    fn __repr__(&self) -> String {
        format!("<RunningTask {} {}>", self.claimed.task.id, self.claimed.task.target)
    }
}

/// The task running on this thread, or None outside a task.
#[pyfunction]
pub fn current_task() -> Option<RunningTask> {
    CURRENT.with(|c| {
        c.borrow().as_ref().map(|cur| RunningTask { worker: cur.worker.clone(), claimed: cur.claimed.clone() })
    })
}

/// Clears the current task when the code returns (or unwinds).
struct CurrentGuard;

impl CurrentGuard {
    fn set(worker: &Arc<Worker>, claimed: &Arc<Claimed>) -> CurrentGuard {
        CURRENT.with(|c| *c.borrow_mut() = Some(Current { worker: worker.clone(), claimed: claimed.clone() }));
        CurrentGuard
    }
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| *c.borrow_mut() = None);
    }
}

/// What every worker thread of a pool shares.
struct Shared {
    registry: Py<PyDict>,
    task_factory: Py<PyAny>,
    logger: Py<PyAny>,
    format_exception: Py<PyAny>,
    stopping: AtomicBool,
    busy: AtomicUsize,
    done: AtomicU64,
    failed: AtomicU64,
    /// Worker threads still running, and a condvar signalled when one exits.
    alive: Mutex<usize>,
    exited: Condvar,
}

impl Shared {
    fn log_enabled(&self, py: Python<'_>, level: i32) -> bool {
        self.logger.bind(py).call_method1("isEnabledFor", (level,)).and_then(|v| v.is_truthy()).unwrap_or(false)
    }

    fn log(&self, py: Python<'_>, level: i32, task_id: Option<i64>, msg: String) {
        let logger = self.logger.bind(py);
        let extra = PyDict::new(py);
        if let Some(id) = task_id {
            let _ = extra.set_item("task_id", id);
        }
        let kwargs = PyDict::new(py);
        let _ = kwargs.set_item("extra", extra);
        if logger.call_method("log", (level, PyString::new(py, &msg)), Some(&kwargs)).is_err() {
            // A broken logging setup must not take a worker down.
            PyErr::take(py);
        }
    }

    /// The failure record of a Python exception: qualified class name, message, traceback lines.
    fn error_record(&self, py: Python<'_>, err: &PyErr) -> ErrorRecord {
        let value = err.value(py);
        let ty = value.get_type();
        let qualname = ty.qualname().map(|s| s.to_string()).unwrap_or_else(|_| "Exception".into());
        let class = match ty.module().map(|m| m.to_string()) {
            Ok(m) if m != "builtins" => format!("{m}.{qualname}"),
            _ => qualname,
        };
        let message = value.str().map(|s| s.to_string()).unwrap_or_else(|_| "<unprintable exception>".into());
        let backtrace = self
            .format_exception
            .bind(py)
            .call1((ty, value, err.traceback(py)))
            .and_then(|lines| lines.extract::<Vec<String>>())
            .map(|lines| lines.concat().lines().map(String::from).collect())
            .unwrap_or_default();
        ErrorRecord { class, message, backtrace }
    }
}

/// What running a claimed task's code produced.
struct Ran {
    outcome: Outcome,
    callbacks: bool,
    log_debug: bool,
}

/// Runs the task's code on this thread (GIL held) and turns whatever happened into an outcome.
fn execute(py: Python<'_>, shared: &Shared, worker: &Arc<Worker>, claimed: &Arc<Claimed>) -> Ran {
    let task = &claimed.task;
    let log_debug = shared.log_enabled(py, DEBUG);
    if log_debug {
        shared.log(
            py,
            DEBUG,
            Some(task.id),
            format!(
                "task {} {} started (attempt {}, queue {})",
                task.id,
                task.target,
                task.attempts,
                task.queue.as_deref().unwrap_or("-")
            ),
        );
    }
    let entry = match shared.registry.bind(py).get_item(&task.target) {
        Ok(Some(e)) => e,
        Ok(None) | Err(_) => {
            let message = format!(
                "{:?} is not a registered task in this worker: decorate it with @queue_dispatcher.task (or its class with @queue_dispatcher.job) and import its module in the worker (--import); nothing was imported or run",
                task.target
            );
            return Ran {
                outcome: Outcome::Failure(ErrorRecord::new("UnregisteredTask", message)),
                callbacks: false,
                log_debug,
            };
        }
    };
    let Ok(reg) = entry.cast::<Registered>() else {
        let message = format!("registry entry for {:?} is not a queue_dispatcher registration", task.target);
        return Ran {
            outcome: Outcome::Failure(ErrorRecord::new("UnregisteredTask", message)),
            callbacks: false,
            log_debug,
        };
    };
    let reg = reg.get();
    let callbacks = reg.on_success.is_some() || reg.on_error.is_some();
    let (args, kwargs) = match json::decode_args(py, &task.args) {
        Ok(a) => a,
        Err(e) => {
            return Ran {
                outcome: Outcome::Failure(ErrorRecord::new(
                    "ArgumentError",
                    format!("cannot decode the stored arguments: {e}"),
                )),
                callbacks,
                log_debug,
            }
        }
    };
    let result = {
        let _current = CurrentGuard::set(worker, claimed);
        reg.func.bind(py).call(args, Some(&kwargs))
    };
    let outcome = match result {
        Ok(value) => match json::encode_value(&value, "result") {
            Ok(text) => Outcome::Success(text),
            Err(e) => {
                let text = value.repr().map(|r| r.to_string()).unwrap_or_else(|_| "<unrepresentable>".into());
                shared.log(
                    py,
                    WARNING,
                    Some(task.id),
                    format!(
                        "task {} {}: the result cannot be stored as JSON ({}); stored as its text {text:?}",
                        task.id,
                        task.target,
                        e.value(py)
                    ),
                );
                Outcome::Success(serde_json::to_string(&text).unwrap_or_default())
            }
        },
        Err(err) => Outcome::Failure(shared.error_record(py, &err)),
    };
    Ran { outcome, callbacks, log_debug }
}

/// Runs on_success / on_error of the task's registration, if any; a failing callback is logged
/// and changes nothing.
fn run_callback(py: Python<'_>, shared: &Shared, task_id: i64, target: &str, success: bool) {
    let Ok(Some(entry)) = shared.registry.bind(py).get_item(target) else {
        return;
    };
    let Ok(reg) = entry.cast::<Registered>() else {
        return;
    };
    let reg = reg.get();
    let Some(cb) = (if success { &reg.on_success } else { &reg.on_error }) else {
        return;
    };
    let which = if success { "on_success" } else { "on_error" };
    let res = shared.task_factory.bind(py).call1((task_id,)).and_then(|t| cb.bind(py).call1((t,)));
    if let Err(e) = res {
        let rec = shared.error_record(py, &e);
        shared.log(
            py,
            ERROR,
            Some(task_id),
            format!(
                "task {task_id} {target}: {which} callback raised {}: {}\n{}",
                rec.class,
                rec.message,
                rec.backtrace.join("\n")
            ),
        );
    }
}

fn log_settled(
    py: Python<'_>,
    shared: &Shared,
    claimed: &Claimed,
    settled: &Result<Settled, CoreError>,
    started: Instant,
    log_debug: bool,
) {
    let t = &claimed.task;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match settled {
        Ok(Settled::Successful) => {
            if log_debug {
                shared.log(py, DEBUG, Some(t.id), format!("task {} {} successful in {ms:.1} ms", t.id, t.target));
            }
        }
        Ok(Settled::Retrying { run_at, error }) => {
            let wait = (*run_at - queue_dispatcher_core::clock::now_micros()).max(0) as f64 / 1e6;
            shared.log(
                py,
                WARNING,
                Some(t.id),
                format!(
                    "task {} {} failed (attempt {} of {}), retrying in {wait:.1}s: {}: {}",
                    t.id,
                    t.target,
                    t.attempts,
                    t.retries + 1,
                    error.class,
                    error.message
                ),
            );
        }
        Ok(Settled::Failed(e)) => {
            shared.log(
                py,
                ERROR,
                Some(t.id),
                format!("task {} {} failed after {ms:.1} ms: {}: {}", t.id, t.target, e.class, e.message),
            );
        }
        Ok(Settled::Aborted(e)) => {
            shared.log(
                py,
                WARNING,
                Some(t.id),
                format!("task {} {} aborted: {}: {}", t.id, t.target, e.class, e.message),
            );
        }
        Ok(Settled::Released) => {
            shared.log(py, INFO, Some(t.id), format!("task {} {} handed back unstarted", t.id, t.target));
        }
        Err(e) => {
            shared.log(py, ERROR, Some(t.id), format!("task {} {}: outcome not stored: {e}", t.id, t.target));
        }
    }
}

/// Decrements the live-thread count when a worker thread ends, however it ends.
struct ExitGuard(Arc<Shared>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let mut alive = self.0.alive.lock();
        *alive -= 1;
        self.0.exited.notify_all();
    }
}

fn worker_thread(shared: Arc<Shared>, worker: Worker) {
    let _exit = ExitGuard(shared.clone());
    let worker = Arc::new(worker);
    // One outer attach keeps this thread's Python thread state for its whole life, so each task
    // only takes the GIL (no thread state created and destroyed per task, and threading.local
    // data survives between tasks). The loop itself runs detached.
    let _ = Python::try_attach(|py| py.detach(|| worker_loop(&shared, &worker)));
}

fn worker_loop(shared: &Arc<Shared>, worker: &Arc<Worker>) {
    let mut next: Option<Claimed> = None;
    loop {
        let claimed = match next.take() {
            Some(c) => c,
            None => match worker.claim(Some(Duration::from_secs(1))) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    if shared.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                Err(CoreError::Stopped) => return,
                Err(e) => {
                    if Python::try_attach(|py| shared.log(py, ERROR, None, format!("claim failed: {e}"))).is_none() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            },
        };
        let claimed = Arc::new(claimed);
        let task_id = claimed.task.id;
        if claimed.kind == ClaimKind::OnError {
            // The task ended without running (failed dependency, cancel, reset, lost): its
            // on_error callback is owed by a worker of its runtime.
            if Python::try_attach(|py| run_callback(py, shared, task_id, &claimed.task.target, false)).is_none() {
                return;
            }
            continue;
        }
        shared.busy.fetch_add(1, Ordering::AcqRel);
        let started = Instant::now();
        let Some(ran) = Python::try_attach(|py| execute(py, shared, worker, &claimed)) else {
            // The interpreter is shutting down: hand the task back unstarted... it did not run.
            let _ = worker.release(&claimed);
            shared.busy.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let settled = if ran.callbacks || shared.stopping.load(Ordering::Acquire) {
            worker.complete(&claimed, ran.outcome)
        } else {
            // No callbacks to run in between: store the outcome and claim the next task in
            // one transaction.
            let (settled, n) = worker.complete_and_claim(&claimed, ran.outcome, Some(Duration::from_secs(1)));
            next = match n {
                Ok(c) => c,
                Err(CoreError::Stopped) => None,
                Err(e) => {
                    let _ = Python::try_attach(|py| shared.log(py, ERROR, None, format!("claim failed: {e}")));
                    None
                }
            };
            settled
        };
        shared.busy.fetch_sub(1, Ordering::AcqRel);
        shared.done.fetch_add(1, Ordering::AcqRel);
        let plain_success = matches!(settled, Ok(Settled::Successful));
        if !plain_success {
            shared.failed.fetch_add(1, Ordering::AcqRel);
        }
        let needs_python =
            ran.log_debug || !plain_success || (ran.callbacks && settled.as_ref().is_ok_and(Settled::is_terminal));
        if needs_python {
            let attached = Python::try_attach(|py| {
                log_settled(py, shared, &claimed, &settled, started, ran.log_debug);
                if ran.callbacks {
                    match &settled {
                        Ok(Settled::Successful) => run_callback(py, shared, task_id, &claimed.task.target, true),
                        Ok(Settled::Failed(_) | Settled::Aborted(_)) => {
                            run_callback(py, shared, task_id, &claimed.task.target, false)
                        }
                        _ => {}
                    }
                }
            });
            if attached.is_none() {
                return;
            }
        }
    }
}

/// A dispatcher and its native worker threads. In a forked child the pool is inert: its threads
/// do not exist there, so nothing is stopped, joined or dropped (that would wait forever).
#[pyclass(module = "queue_dispatcher._native", name = "WorkerPool", frozen)]
pub struct WorkerPool {
    pid: u32,
    dispatcher: ManuallyDrop<Dispatcher>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    workers: usize,
}

#[pymethods]
impl WorkerPool {
    /// Registers a dispatcher on `store` and starts `workers` native threads that run the
    /// registered tasks. `queues`: only these named queues (None: all); `parallel`: also tasks
    /// without a queue. Times are in seconds.
    #[new]
    #[pyo3(signature = (store, registry, task_factory, logger, *, workers=10, queues=None, parallel=true, name=None, lease=15.0, heartbeat=1.0, max_lost=5, retry_base=1.0, retry_cap=600.0, keep_successful=None, keep_failed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        store: &PyStore,
        registry: Py<PyDict>,
        task_factory: Py<PyAny>,
        logger: Py<PyAny>,
        workers: usize,
        queues: Option<Vec<String>>,
        parallel: bool,
        name: Option<String>,
        lease: f64,
        heartbeat: f64,
        max_lost: u32,
        retry_base: f64,
        retry_cap: f64,
        keep_successful: Option<f64>,
        keep_failed: Option<f64>,
    ) -> PyResult<WorkerPool> {
        if workers == 0 {
            return Err(invalid("workers", "at least one worker thread is needed"));
        }
        let mut cfg = DispatcherConfig::new(Runtime::Python);
        cfg.name = name;
        cfg.workers = workers;
        cfg.queues = QueueSelection { named: queues, parallel };
        cfg.lease = seconds("lease", lease)?;
        cfg.heartbeat = seconds("heartbeat", heartbeat)?;
        cfg.max_lost = max_lost;
        cfg.retry_base = seconds("retry_base", retry_base)?;
        cfg.retry_cap = seconds("retry_cap", retry_cap)?;
        if let Some(k) = keep_successful {
            cfg.keep_successful = seconds("keep_successful", k)?;
        }
        if let Some(k) = keep_failed {
            cfg.keep_failed = seconds("keep_failed", k)?;
        }
        let format_exception = py.import("traceback")?.getattr("format_exception")?.unbind();
        let engine = store.get(py)?;
        let dispatcher = py.detach(|| Dispatcher::start(&engine, cfg)).map_err(to_py)?;
        let shared = Arc::new(Shared {
            registry,
            task_factory,
            logger,
            format_exception,
            stopping: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            alive: Mutex::new(workers),
            exited: Condvar::new(),
        });
        let mut threads = Vec::with_capacity(workers);
        for n in 0..workers {
            let w = dispatcher.worker();
            let s = shared.clone();
            let spawned =
                std::thread::Builder::new().name(format!("qd-py-worker-{n}")).spawn(move || worker_thread(s, w));
            match spawned {
                Ok(h) => threads.push(h),
                Err(e) => {
                    *shared.alive.lock() -= workers - n;
                    shared.stopping.store(true, Ordering::Release);
                    dispatcher.stop_claiming();
                    return Err(to_py(CoreError::Storage { message: format!("cannot start worker thread: {e}") }));
                }
            }
        }
        Ok(WorkerPool {
            pid: std::process::id(),
            dispatcher: ManuallyDrop::new(dispatcher),
            shared,
            threads: Mutex::new(threads),
            workers,
        })
    }

    /// The dispatcher's id (its heartbeat row).
    #[getter]
    fn id(&self) -> i64 {
        self.dispatcher.id()
    }

    #[getter]
    fn workers(&self) -> usize {
        self.workers
    }

    /// Worker threads running a task's code right now.
    #[getter]
    fn busy(&self) -> usize {
        self.shared.busy.load(Ordering::Acquire)
    }

    /// Tasks run to an outcome by this pool.
    #[getter]
    fn done(&self) -> u64 {
        self.shared.done.load(Ordering::Acquire)
    }

    /// Tasks whose outcome was not a success.
    #[getter]
    fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Acquire)
    }

    /// Worker threads that have not exited yet.
    #[getter]
    fn alive(&self) -> usize {
        *self.shared.alive.lock()
    }

    /// Graceful stop, first half: claim nothing more; threads leave once their task is stored.
    fn stop_claiming(&self) {
        if self.inherited() {
            return;
        }
        self.shared.stopping.store(true, Ordering::Release);
        self.dispatcher.stop_claiming();
    }

    /// Waits up to `timeout` seconds (None: forever) for every worker thread to exit; returns
    /// True if they all have. The GIL is released, in short slices so signal handlers run.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        if self.inherited() {
            return Ok(false);
        }
        let deadline = timeout.map(|t| seconds("timeout", t)).transpose()?.map(|t| Instant::now() + t);
        loop {
            let slice_end = Instant::now() + Duration::from_millis(50);
            let end = deadline.map_or(slice_end, |d| d.min(slice_end));
            let all_exited = py.detach(|| {
                let mut alive = self.shared.alive.lock();
                while *alive > 0 {
                    if self.shared.exited.wait_until(&mut alive, end).timed_out() {
                        break;
                    }
                }
                *alive == 0
            });
            if all_exited {
                let handles: Vec<_> = self.threads.lock().drain(..).collect();
                py.detach(|| {
                    handles.into_iter().for_each(|h| {
                        let _ = h.join();
                    })
                });
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Stops the dispatcher: claims nothing more, waits up to `grace` seconds for running tasks
    /// to be stored, then releases whatever still runs (back to `new`, counted as lost, so
    /// another dispatcher picks it up) and removes the heartbeat row. Returns True if every
    /// worker thread has exited (otherwise some task code is still running in this process).
    #[pyo3(signature = (grace=0.0))]
    fn shutdown(&self, py: Python<'_>, grace: f64) -> PyResult<bool> {
        if self.inherited() {
            return Ok(false);
        }
        self.stop_claiming();
        let all_exited = self.wait(py, Some(grace))?;
        py.detach(|| self.dispatcher.shutdown(Duration::ZERO)).map_err(to_py)?;
        Ok(all_exited)
    }
}

impl WorkerPool {
    /// True in a forked child of the process that started the pool.
    fn inherited(&self) -> bool {
        self.pid != std::process::id()
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        if !self.inherited() {
            // SAFETY: dropped exactly once, here; never touched again.
            unsafe { ManuallyDrop::drop(&mut self.dispatcher) };
        }
    }
}
