//! `QueueDispatcher::Native::Store`: enqueue, read, admin and batches on one database. Every
//! call that touches the database runs without the GVL (a batch in another thread may hold the
//! write lock, so waiting with the GVL would deadlock the process). Runs on Ruby threads.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use magnus::{prelude::*, r_hash::ForEach, rb_sys::AsRawValue, Error, IntoValue, RArray, RHash, Ruby, Symbol, Value};
use queue_dispatcher_core::{
    admin, Batch, Config, DispatcherInfo, ErrorRecord, NewTask, QueueCounts, Runtime, State, Store, Task, TaskFilter,
    TaskId,
};

use crate::errors::{invalid, IntoRb};
use crate::json;
use crate::nogvl::{check_interrupts, no_ubf, without_gvl};

#[magnus::wrap(class = "QueueDispatcher::Native::Store", free_immediately, size)]
pub struct RbStore(pub Store);

thread_local! {
    /// Batches open on this thread, innermost last. A batch holds the engine's write lock, which
    /// belongs to the OS thread that took it: a Ruby thread is one OS thread, so it ends here too.
    static BATCHES: RefCell<Vec<Batch>> = const { RefCell::new(Vec::new()) };
}

fn sym(ruby: &Ruby, s: &str) -> Symbol {
    ruby.to_symbol(s)
}

pub fn error_hash(ruby: &Ruby, e: &ErrorRecord) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    h.aset(sym(ruby, "class"), e.class.as_str())?;
    h.aset(sym(ruby, "message"), e.message.as_str())?;
    h.aset(sym(ruby, "backtrace"), ruby.ary_from_iter(e.backtrace.iter().map(String::as_str)))?;
    Ok(h)
}

/// A task as a Hash with Symbol keys; times are Integer microseconds (UTC), JSON payloads text.
pub fn task_hash(ruby: &Ruby, t: &Task) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    let set = |k: &str, v: Value| h.aset(sym(ruby, k), v);
    set("id", t.id.into_value_with(ruby))?;
    set("queue", t.queue.as_deref().into_value_with(ruby))?;
    set("runtime", t.runtime.as_str().into_value_with(ruby))?;
    set("target", t.target.as_str().into_value_with(ruby))?;
    set("receiver", t.receiver.as_deref().into_value_with(ruby))?;
    set("args", t.args.as_str().into_value_with(ruby))?;
    set("priority", t.priority.into_value_with(ruby))?;
    set("state", t.state.as_str().into_value_with(ruby))?;
    set("attempts", t.attempts.into_value_with(ruby))?;
    set("retries", t.retries.into_value_with(ruby))?;
    set("lost", t.lost.into_value_with(ruby))?;
    set("run_at", t.run_at.into_value_with(ruby))?;
    set("timeout", t.timeout.map(|d| d.as_secs_f64()).into_value_with(ruby))?;
    set("unique_key", t.unique_key.as_deref().into_value_with(ruby))?;
    set("meta", t.meta.as_deref().into_value_with(ruby))?;
    set("result", t.result.as_deref().into_value_with(ruby))?;
    set(
        "error",
        match &t.error {
            Some(e) => error_hash(ruby, e)?.as_value(),
            None => ruby.qnil().as_value(),
        },
    )?;
    let history = ruby.ary_new_capa(t.error_history.len());
    for e in &t.error_history {
        history.push(error_hash(ruby, e)?)?;
    }
    set("error_history", history.as_value())?;
    set("message", t.message.as_deref().into_value_with(ruby))?;
    set("perc_finished", t.perc_finished.into_value_with(ruby))?;
    set("enqueued_at", t.enqueued_at.into_value_with(ruby))?;
    set("started_at", t.started_at.into_value_with(ruby))?;
    set("finished_at", t.finished_at.into_value_with(ruby))?;
    set("dispatcher_id", t.dispatcher_id.into_value_with(ruby))?;
    set("depends_on", ruby.ary_from_iter(t.depends_on.iter().copied()).as_value())?;
    set("cancel_requested", t.cancel_requested.into_value_with(ruby))?;
    Ok(h)
}

fn counts_hash(ruby: &Ruby, c: &QueueCounts) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    h.aset(sym(ruby, "queue"), c.queue.as_deref())?;
    h.aset(sym(ruby, "paused"), c.paused)?;
    for (k, v) in [
        ("new", c.new),
        ("waiting", c.waiting),
        ("running", c.running),
        ("successful", c.successful),
        ("error", c.error),
        ("aborted", c.aborted),
    ] {
        h.aset(sym(ruby, k), v)?;
    }
    Ok(h)
}

fn dispatcher_hash(ruby: &Ruby, d: &DispatcherInfo) -> Result<RHash, Error> {
    let h = ruby.hash_new();
    h.aset(sym(ruby, "id"), d.id)?;
    h.aset(sym(ruby, "runtime"), d.runtime.as_str())?;
    h.aset(sym(ruby, "name"), d.name.as_str())?;
    h.aset(sym(ruby, "host"), d.host.as_str())?;
    h.aset(sym(ruby, "pid"), d.pid)?;
    h.aset(sym(ruby, "workers"), d.workers)?;
    h.aset(sym(ruby, "queues"), d.queues.as_deref())?;
    h.aset(sym(ruby, "started_at"), d.started_at)?;
    h.aset(sym(ruby, "heartbeat_at"), d.heartbeat_at)?;
    h.aset(sym(ruby, "alive"), d.alive)?;
    h.aset(sym(ruby, "running"), d.running)?;
    Ok(h)
}

fn opt_string(field: &str, v: Value) -> Result<Option<String>, Error> {
    if v.is_nil() {
        return Ok(None);
    }
    String::try_convert(v).map(Some).map_err(|_| invalid(field, "must be a String"))
}

fn opt_i64(field: &str, v: Value) -> Result<Option<i64>, Error> {
    if v.is_nil() {
        return Ok(None);
    }
    i64::try_convert(v).map(Some).map_err(|_| invalid(field, "must be an Integer"))
}

/// Applies the enqueue options (already normalized by the Ruby library) to `t`.
fn apply_options(t: &mut NewTask, opts: RHash) -> Result<(), Error> {
    json::try_foreach(opts, |k: Symbol, v: Value| {
        let name = k.name()?;
        {
            match &*name {
                // Set by `QueueDispatcher.python_task`: a task for the other language's dispatchers.
                "runtime" => {
                    t.runtime = String::try_convert(v)
                        .map_err(|_| invalid("runtime", "must be a String"))?
                        .parse::<Runtime>()
                        .rb()?
                }
                "queue" => t.queue = opt_string("queue", v)?,
                "priority" => t.priority = opt_i64("priority", v)?.unwrap_or(queue_dispatcher_core::DEFAULT_PRIORITY),
                "run_at" => t.run_at = opt_i64("run_at", v)?,
                "retries" => {
                    let n = opt_i64("retries", v)?.unwrap_or(0);
                    t.retries = u32::try_from(n)
                        .map_err(|_| invalid("retries", format!("{n} is not between 0 and {}", u32::MAX)))?;
                }
                "timeout" => {
                    t.timeout = if v.is_nil() {
                        None
                    } else {
                        let secs =
                            f64::try_convert(v).map_err(|_| invalid("timeout", "must be a number of seconds"))?;
                        if !(secs.is_finite() && secs > 0.0) {
                            return Err(invalid("timeout", format!("{secs} is not a positive number of seconds")));
                        }
                        Some(Duration::from_secs_f64(secs))
                    }
                }
                "unique_key" => t.unique_key = opt_string("unique_key", v)?,
                "meta" => {
                    t.meta = if v.is_nil() {
                        None
                    } else if RHash::from_value(v).is_some() {
                        Some(json::dump_json(v, "meta".into())?)
                    } else {
                        return Err(invalid("meta", "must be a Hash (stored as a JSON object)"));
                    }
                }
                "depends_on" => {
                    if !v.is_nil() {
                        let ids = RArray::try_convert(v)
                            .map_err(|_| invalid("depends_on", "must be an Array of task ids"))?;
                        for id in ids {
                            t.depends_on.push(
                                i64::try_convert(id)
                                    .map_err(|_| invalid("depends_on", "must be an Array of task ids"))?,
                            );
                        }
                    }
                }
                other => return Err(invalid("options", format!("unknown option {other:?}"))),
            }
            Ok(())
        }
    })
}

fn state_list(states: RArray) -> Result<Vec<State>, Error> {
    states
        .into_iter()
        .map(|s| {
            let text = String::try_convert(s)
                .or_else(|_| Symbol::try_convert(s).and_then(|s| s.name().map(|n| n.into_owned())))?;
            text.parse::<State>().rb()
        })
        .collect()
}

impl RbStore {
    /// `Store.open(path_or_nil)`: the argument, else `$QUEUE_DISPATCHER_DB`, else `./queue_dispatcher.db`.
    pub fn open(path: Option<String>) -> Result<RbStore, Error> {
        let cfg = Config::resolve(path.as_deref()).rb()?;
        let store = without_gvl(move || Store::open(&cfg), no_ubf)?.rb()?;
        Ok(RbStore(store))
    }

    pub fn describe(&self) -> String {
        self.0.describe()
    }

    /// One task, durable when this returns. `opts` carries normalized options (or nil); its
    /// `runtime` (default ruby) names the language whose dispatchers run it.
    pub fn enqueue(
        &self,
        target: String,
        receiver: Option<String>,
        args: RArray,
        kwargs: Option<RHash>,
        opts: Option<RHash>,
    ) -> Result<TaskId, Error> {
        let mut t = NewTask::new(Runtime::Ruby, target);
        t.receiver = receiver;
        t.args = json::dump_args(args, kwargs)?;
        if let Some(o) = opts {
            apply_options(&mut t, o)?;
        }
        let store = &self.0;
        Ok(without_gvl(|| store.enqueue(t), no_ubf)?.rb()?.id)
    }

    pub fn add_dependencies(&self, task: TaskId, deps: Vec<TaskId>) -> Result<(), Error> {
        let store = &self.0;
        without_gvl(|| store.add_dependencies(task, &deps), no_ubf)?.rb()
    }

    pub fn task(ruby: &Ruby, rb_self: &Self, id: TaskId) -> Result<RHash, Error> {
        let store = &rb_self.0;
        let t = without_gvl(|| store.task(id), no_ubf)?.rb()?;
        task_hash(ruby, &t)
    }

    /// Waits until the task is finished or `timeout` seconds pass (nil: no limit); returns it.
    /// Thread#kill, Thread#raise and signals interrupt the wait within a few milliseconds.
    pub fn wait(ruby: &Ruby, rb_self: &Self, id: TaskId, timeout: Option<f64>) -> Result<RHash, Error> {
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs_f64(t.max(0.0)));
        let store = &rb_self.0;
        loop {
            let interrupted = AtomicBool::new(false);
            let t = without_gvl(
                || loop {
                    // Store::wait cannot be woken from outside, so wait in short slices and look
                    // at the interrupt flag in between (see the engine request in the README).
                    let slice = Duration::from_millis(20);
                    let wait = deadline.map_or(slice, |d| d.saturating_duration_since(Instant::now()).min(slice));
                    let t = store.wait(id, Some(wait));
                    let done = match &t {
                        Ok(t) => t.state.is_finished() || deadline.is_some_and(|d| Instant::now() >= d),
                        Err(_) => true,
                    };
                    if done || interrupted.load(Ordering::Acquire) {
                        return t;
                    }
                },
                || interrupted.store(true, Ordering::Release),
            )?
            .rb()?;
            if t.state.is_finished() || deadline.is_some_and(|d| Instant::now() >= d) {
                return task_hash(ruby, &t);
            }
            // Interrupted: run trap handlers / raise for Thread#kill, then keep waiting.
            check_interrupts()?;
        }
    }

    pub fn cancel(&self, id: TaskId) -> Result<String, Error> {
        let store = &self.0;
        Ok(without_gvl(|| store.cancel(id), no_ubf)?.rb()?.as_str().to_string())
    }

    pub fn reset(&self) -> Result<u64, Error> {
        let store = &self.0;
        without_gvl(|| store.reset(), no_ubf)?.rb()
    }

    pub fn pause(&self, queue: String) -> Result<(), Error> {
        let store = &self.0;
        without_gvl(|| store.pause(&queue), no_ubf)?.rb()
    }

    pub fn resume(&self, queue: String) -> Result<(), Error> {
        let store = &self.0;
        without_gvl(|| store.resume(&queue), no_ubf)?.rb()
    }

    /// Deletes finished tasks older than `seconds`; returns how many.
    pub fn purge(&self, seconds: f64) -> Result<u64, Error> {
        if !(seconds.is_finite() && seconds >= 0.0) {
            return Err(invalid("older_than", format!("{seconds} is not a number of seconds")));
        }
        let store = &self.0;
        without_gvl(|| store.purge(Duration::from_secs_f64(seconds)), no_ubf)?.rb()
    }

    pub fn counts(ruby: &Ruby, rb_self: &Self) -> Result<RArray, Error> {
        let store = &rb_self.0;
        let counts = without_gvl(|| store.counts(), no_ubf)?.rb()?;
        let out = ruby.ary_new_capa(counts.len());
        for c in &counts {
            out.push(counts_hash(ruby, c)?)?;
        }
        Ok(out)
    }

    /// `filter`: states (Array), queue (String, or false for tasks without a queue), runtime,
    /// meta (Hash of top-level key => value), limit, offset, descending.
    pub fn list(ruby: &Ruby, rb_self: &Self, filter: Option<RHash>) -> Result<RArray, Error> {
        let mut f = TaskFilter::default();
        if let Some(h) = filter {
            json::try_foreach(h, |k: Symbol, v: Value| {
                match &*k.name()? {
                    "states" => f.states = state_list(RArray::try_convert(v)?)?,
                    "queue" if v.as_raw() == rb_sys::special_consts::Qfalse as rb_sys::VALUE => f.queue = Some(None),
                    "queue" => f.queue = opt_string("queue", v)?.map(Some),
                    "runtime" => f.runtime = opt_string("runtime", v)?.map(|r| r.parse()).transpose().rb()?,
                    "meta" => {
                        let mut pairs = Vec::new();
                        RHash::try_convert(v)?.foreach(|mk: Value, mv: Value| {
                            let key = match String::try_convert(mk) {
                                Ok(s) => s,
                                Err(_) => Symbol::try_convert(mk)?.name()?.into_owned(),
                            };
                            pairs.push((key.clone(), json::dump_json(mv, format!("meta[{key:?}]"))?));
                            Ok(ForEach::Continue)
                        })?;
                        f.meta = pairs;
                    }
                    "limit" => f.limit = opt_i64("limit", v)?.map(|n| n.clamp(0, u32::MAX as i64) as u32),
                    "offset" => f.offset = opt_i64("offset", v)?.map(|n| n.clamp(0, u32::MAX as i64) as u32),
                    "descending" => f.descending = v.to_bool(),
                    other => return Err(invalid("filter", format!("unknown filter {other:?}"))),
                }
                Ok(())
            })?;
        }
        let store = &rb_self.0;
        let tasks = without_gvl(|| store.list(&f), no_ubf)?.rb()?;
        let out = ruby.ary_new_capa(tasks.len());
        for t in &tasks {
            out.push(task_hash(ruby, t)?)?;
        }
        Ok(out)
    }

    pub fn dispatchers(ruby: &Ruby, rb_self: &Self) -> Result<RArray, Error> {
        let store = &rb_self.0;
        let list = without_gvl(|| store.dispatchers(), no_ubf)?.rb()?;
        let out = ruby.ary_new_capa(list.len());
        for d in &list {
            out.push(dispatcher_hash(ruby, d)?)?;
        }
        Ok(out)
    }

    /// Is a Ruby dispatcher heartbeating on this database?
    pub fn dispatcher_alive(&self) -> Result<bool, Error> {
        let store = &self.0;
        without_gvl(|| store.dispatcher_alive(Some(Runtime::Ruby)), no_ubf)?.rb()
    }

    pub fn status_report(&self) -> Result<String, Error> {
        let store = &self.0;
        without_gvl(|| admin::status_report(store), no_ubf)?.rb()
    }

    /// Opens a batch on this thread (see `QueueDispatcher.batch`).
    pub fn batch_begin(&self) -> Result<(), Error> {
        let store = &self.0;
        let batch = without_gvl(|| store.begin_batch(), no_ubf)?.rb()?;
        BATCHES.with(|b| b.borrow_mut().push(batch));
        Ok(())
    }

    /// Ends this thread's innermost batch: commit (true) or roll back (false).
    pub fn batch_end(&self, commit: bool) -> Result<(), Error> {
        let Some(batch) = BATCHES.with(|b| b.borrow_mut().pop()) else {
            return Err(invalid("batch", "no batch is open on this thread"));
        };
        // The batch ends on this very thread: the GVL-free call runs on the caller's thread.
        without_gvl(move || if commit { batch.commit() } else { batch.rollback() }, no_ubf)?.rb()
    }

    pub fn batch_depth(&self) -> usize {
        BATCHES.with(|b| b.borrow().len())
    }
}
