//! `QueueDispatcher::Native::{Dispatcher, Worker, Claimed}`: the engine's pull-based worker API
//! for Ruby worker threads. A worker thread is a Ruby thread that waits inside `claim` with the
//! GVL released; Thread#kill, Thread#raise and signals wake it through the worker's waker (the
//! unblocking function). Outcomes are acknowledged only after their commit.

use std::time::Duration;

use magnus::{prelude::*, Error, RArray, RHash, Ruby, Symbol, Value};
use queue_dispatcher_core::{
    CancelReason, ClaimKind, Claimed, Dispatcher, DispatcherConfig, Error as CoreError, ErrorRecord, Outcome,
    QueueSelection, Runtime, Settled, Store, Worker,
};

use crate::errors::{invalid, to_ruby, IntoRb};
use crate::nogvl::{check_interrupts, no_ubf, without_gvl};
use crate::store::{error_hash, task_hash, RbStore};

#[magnus::wrap(class = "QueueDispatcher::Native::Dispatcher", free_immediately, size)]
pub struct RbDispatcher(Dispatcher);

#[magnus::wrap(class = "QueueDispatcher::Native::Worker", free_immediately, size)]
pub struct RbWorker(Worker);

#[magnus::wrap(class = "QueueDispatcher::Native::Claimed", free_immediately, size)]
pub struct RbClaimed(Claimed);

fn secs(field: &str, v: Value) -> Result<Duration, Error> {
    let s = f64::try_convert(v).map_err(|_| invalid(field, "must be a number of seconds"))?;
    if !(s.is_finite() && s > 0.0) {
        return Err(invalid(field, format!("{s} is not a positive number of seconds")));
    }
    Ok(Duration::from_secs_f64(s))
}

fn timeout(t: Option<f64>) -> Option<Duration> {
    t.map(|s| Duration::from_secs_f64(if s.is_finite() { s.max(0.0) } else { 0.0 }))
}

fn settled_value(ruby: &Ruby, s: &Settled) -> Symbol {
    ruby.to_symbol(match s {
        Settled::Successful => "successful",
        Settled::Failed(_) => "error",
        Settled::Retrying { .. } => "retrying",
        Settled::Aborted(_) => "aborted",
        Settled::Released => "released",
    })
}

/// The outcome from Ruby: `result_json` for a normal return, or `[class, message, backtrace]`.
fn outcome(result: Option<String>, error: Option<RArray>) -> Result<Outcome, Error> {
    match error {
        Some(e) => {
            let class: String = e.entry(0)?;
            let message: String = e.entry(1)?;
            let backtrace: Vec<String> = e.entry::<Option<Vec<String>>>(2)?.unwrap_or_default();
            Ok(Outcome::Failure(ErrorRecord { class, message, backtrace }))
        }
        None => Ok(Outcome::Success(result.unwrap_or_else(|| "null".into()))),
    }
}

impl RbDispatcher {
    /// `Dispatcher.start(store, opts)`: opts workers, queues (Array or nil: all), parallel,
    /// name, heartbeat, lease, max_lost, retry_base, retry_cap, keep_successful, keep_failed.
    pub fn start(store: &RbStore, opts: RHash) -> Result<RbDispatcher, Error> {
        let mut cfg = DispatcherConfig::new(Runtime::Ruby);
        let mut named: Option<Vec<String>> = None;
        let mut parallel = true;
        crate::json::try_foreach(opts, |k: Symbol, v: Value| {
            match &*k.name()? {
                "workers" => {
                    cfg.workers = usize::try_convert(v).map_err(|_| invalid("workers", "must be a positive Integer"))?
                }
                "queues" => {
                    named = Option::<Vec<String>>::try_convert(v)
                        .map_err(|_| invalid("queues", "must be an Array of queue names"))?
                }
                "parallel" => parallel = v.to_bool(),
                "name" => cfg.name = Option::<String>::try_convert(v)?,
                "heartbeat" => cfg.heartbeat = secs("heartbeat", v)?,
                "lease" => cfg.lease = secs("lease", v)?,
                "max_lost" => {
                    cfg.max_lost = u32::try_convert(v).map_err(|_| invalid("max_lost", "must be an Integer"))?
                }
                "retry_base" => cfg.retry_base = secs("retry_base", v)?,
                "retry_cap" => cfg.retry_cap = secs("retry_cap", v)?,
                "keep_successful" => cfg.keep_successful = secs("keep_successful", v)?,
                "keep_failed" => cfg.keep_failed = secs("keep_failed", v)?,
                other => return Err(invalid("dispatcher", format!("unknown option {other:?}"))),
            }
            Ok(())
        })?;
        cfg.queues = QueueSelection { named, parallel };
        let store: Store = store.0.clone();
        let d = without_gvl(move || Dispatcher::start(&store, cfg), no_ubf)?.rb()?;
        Ok(RbDispatcher(d))
    }

    pub fn id(&self) -> i64 {
        self.0.id()
    }

    pub fn worker(&self) -> RbWorker {
        RbWorker(self.0.worker())
    }

    pub fn running(&self) -> usize {
        self.0.running()
    }

    pub fn stop_claiming(&self) {
        self.0.stop_claiming();
    }

    /// Stops claiming, waits up to `grace` seconds for running tasks, then leaves (unfinished
    /// runs go back to `new` as lost). The Ruby CLI waits for its threads first and passes 0.
    pub fn shutdown(&self, grace: f64) -> Result<(), Error> {
        let d = &self.0;
        let grace = timeout(Some(grace)).unwrap_or_default();
        without_gvl(|| d.shutdown(grace), no_ubf)?.rb()
    }
}

impl RbWorker {
    fn claim_inner(&self, t: Option<f64>) -> Result<Option<RbClaimed>, Error> {
        let w = &self.0;
        let waker = w.waker();
        let got = without_gvl(|| w.claim(timeout(t)), || waker.wake())?.rb()?;
        match got {
            Some(c) => Ok(Some(RbClaimed(c))),
            None => {
                // Woken (or timed out): let Ruby act on a pending Thread#kill, raise or signal.
                check_interrupts()?;
                Ok(None)
            }
        }
    }

    /// Waits up to `timeout` seconds (nil: until woken) for a task; nil when none came.
    /// Raises StoppedError once the dispatcher stops claiming.
    pub fn claim(&self, timeout: Option<f64>) -> Result<Option<RbClaimed>, Error> {
        self.claim_inner(timeout)
    }

    /// Stores the outcome (`result_json`, or `[class, message, backtrace]` as `error`) and
    /// returns where the task stands: :successful, :error, :retrying, :aborted.
    pub fn complete(
        ruby: &Ruby,
        rb_self: &Self,
        c: &RbClaimed,
        result: Option<String>,
        error: Option<RArray>,
    ) -> Result<Symbol, Error> {
        let outcome = outcome(result, error)?;
        let w = &rb_self.0;
        let claimed = &c.0;
        let s = without_gvl(|| w.complete(claimed, outcome), no_ubf)?.rb()?;
        Ok(settled_value(ruby, &s))
    }

    /// `complete`, then claim in the same engine cycle. Returns `[settled, next]` where settled
    /// is a Symbol or the exception the store refused the outcome with (not raised, so the next
    /// claim is never lost), and next is a Claimed, nil, or :stopped.
    pub fn complete_and_claim(
        ruby: &Ruby,
        rb_self: &Self,
        c: &RbClaimed,
        result: Option<String>,
        error: Option<RArray>,
        t: Option<f64>,
    ) -> Result<RArray, Error> {
        let outcome = outcome(result, error)?;
        let w = &rb_self.0;
        let waker = w.waker();
        let claimed = &c.0;
        let (settled, next) = without_gvl(|| w.complete_and_claim(claimed, outcome, timeout(t)), || waker.wake())?;
        let settled: Value = match settled {
            Ok(s) => settled_value(ruby, &s).as_value(),
            Err(e) => match to_ruby(e).value() {
                Some(exc) => exc,
                None => ruby.qnil().as_value(),
            },
        };
        let next: Value = match next {
            Ok(Some(c)) => ruby.obj_wrap(RbClaimed(c)).as_value(),
            Ok(None) => ruby.qnil().as_value(),
            Err(CoreError::Stopped) => ruby.to_symbol("stopped").as_value(),
            Err(e) => return Err(to_ruby(e)),
        };
        Ok(ruby.ary_new_from_values(&[settled, next]))
    }

    /// Hands a claimed task back unstarted (no attempt counted).
    pub fn release(ruby: &Ruby, rb_self: &Self, c: &RbClaimed) -> Result<Symbol, Error> {
        let w = &rb_self.0;
        let claimed = &c.0;
        let s = without_gvl(|| w.release(claimed), no_ubf)?.rb()?;
        Ok(settled_value(ruby, &s))
    }

    /// Progress of a running task (coalesced by the engine; never blocks).
    pub fn progress(&self, c: &RbClaimed, message: Option<String>, perc: Option<f64>) -> Result<(), Error> {
        self.0.progress(&c.0, message.as_deref(), perc).rb()
    }

    /// Makes this worker's current (or next) claim return nil.
    pub fn wake(&self) {
        self.0.waker().wake();
    }
}

impl RbClaimed {
    pub fn id(&self) -> i64 {
        self.0.task.id
    }

    /// :run (run the code, then complete) or :on_error (the task already ended without running:
    /// run its on_error callbacks only).
    pub fn kind(ruby: &Ruby, rb_self: &Self) -> Symbol {
        ruby.to_symbol(match rb_self.0.kind {
            ClaimKind::Run => "run",
            ClaimKind::OnError => "on_error",
        })
    }

    pub fn target(&self) -> String {
        self.0.task.target.clone()
    }

    pub fn receiver(&self) -> Option<String> {
        self.0.task.receiver.clone()
    }

    pub fn args(&self) -> String {
        self.0.task.args.clone()
    }

    pub fn queue(&self) -> Option<String> {
        self.0.task.queue.clone()
    }

    pub fn attempts(&self) -> i64 {
        self.0.task.attempts
    }

    pub fn error(ruby: &Ruby, rb_self: &Self) -> Result<Option<RHash>, Error> {
        rb_self.0.task.error.as_ref().map(|e| error_hash(ruby, e)).transpose()
    }

    /// nil, or why the task should stop: :cancelled, :reset or :timeout.
    pub fn cancelled(ruby: &Ruby, rb_self: &Self) -> Option<Symbol> {
        rb_self.0.cancelled().map(|r| {
            ruby.to_symbol(match r {
                CancelReason::Cancelled => "cancelled",
                CancelReason::Reset => "reset",
                CancelReason::Timeout => "timeout",
            })
        })
    }

    pub fn to_h(ruby: &Ruby, rb_self: &Self) -> Result<RHash, Error> {
        task_hash(ruby, &rb_self.0.task)
    }
}
