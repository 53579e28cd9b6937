//! The pull-based worker API. A host (Python, Ruby, Rust) starts a [`Dispatcher`], gives each of
//! its worker threads a [`Worker`], and each worker loops: `claim` (blocks, wakeable from another
//! thread), run the code, `complete`. Two engine threads serve them:
//! - the writer thread owns every claim and outcome: it gathers whatever is pending and applies
//!   it in one transaction (group commit), acknowledging each outcome only after its commit;
//! - the ticker thread heartbeats, recovers tasks of dead dispatchers, raises timeout and cancel
//!   flags, and purges old tasks.
//!
//! Delivery is at-least-once: it is worse to lose a task than to run it twice. A claim never
//! takes more tasks than there are waiting workers, and a dispatcher whose heartbeat is older
//! than half its lease claims nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sync::{Condvar, Mutex};
use crossbeam_channel::{bounded, select, unbounded, Receiver, Sender};

use crate::clock;
use crate::error::{Error, Result};
use crate::hub::{CancelFlag, Hub};
use crate::store::{
    ClaimReq, ClaimedRow, Progress, ProgressReq, QueueSelection, Registration, RetryPolicy, Settle, SettleReq, Store,
};
use crate::task::{CancelReason, ErrorRecord, Outcome, Runtime, Settled, Task, TaskId};

/// How long a worker waiting for its claim yields the CPU before it sleeps.
const WORKER_SPIN: Duration = Duration::from_micros(100);

/// How long after handing out claims the writer polls for their outcomes (see writer_loop).
const COALESCE_WINDOW: Duration = Duration::from_micros(100);

/// Progress writes per task are coalesced to at most one per this interval.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub runtime: Runtime,
    /// Shown in status listings (default: `host:pid`).
    pub name: Option<String>,
    /// Worker threads the host runs (shown in status; claims are bounded by waiting workers).
    pub workers: usize,
    pub queues: QueueSelection,
    pub heartbeat: Duration,
    pub lease: Duration,
    /// Lost runs (dispatcher died) before a task is given up as `aborted`.
    pub max_lost: u32,
    pub retry_base: Duration,
    pub retry_cap: Duration,
    /// Automatic retention: successful tasks are purged after this long...
    pub keep_successful: Duration,
    /// ...and failed or aborted ones after this long.
    pub keep_failed: Duration,
}

impl DispatcherConfig {
    pub fn new(runtime: Runtime) -> DispatcherConfig {
        DispatcherConfig {
            runtime,
            name: None,
            workers: 10,
            queues: QueueSelection::default(),
            heartbeat: Duration::from_secs(1),
            lease: Duration::from_secs(15),
            max_lost: 5,
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(600),
            keep_successful: Duration::from_secs(7 * 86_400),
            keep_failed: Duration::from_secs(30 * 86_400),
        }
    }
}

/// What a worker got from a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClaimKind {
    /// Run the task's code, then `complete` it.
    Run,
    /// The task already ended without running (a failed dependency, or aborted by cancel, reset
    /// or a lost worker); run its on_error callback only. Nothing to complete.
    OnError,
}

/// A task handed to one worker.
#[derive(Debug)]
pub struct Claimed {
    pub task: Task,
    pub kind: ClaimKind,
    token: i64,
    flag: Arc<CancelFlag>,
}

impl Claimed {
    /// Set when the task was cancelled, reset or timed out while running: host code should stop.
    pub fn cancelled(&self) -> Option<CancelReason> {
        self.flag.get()
    }

    /// The flag itself, for host code that polls it from elsewhere.
    pub fn cancel_flag(&self) -> Arc<CancelFlag> {
        self.flag.clone()
    }
}

enum SlotState {
    Waiting,
    Claiming { cancel: bool },
    Done(Result<Option<Box<Claimed>>>),
    Gone,
}

/// One pending claim: a worker waits on it, the writer fills it.
struct Slot {
    state: Mutex<SlotState>,
    cv: Condvar,
}

impl Slot {
    fn finish(&self, value: Result<Option<Claimed>>) {
        *self.state.lock() = SlotState::Done(value.map(|c| c.map(Box::new)));
        self.cv.notify_all();
    }

    /// Wake request: a waiting slot gives up; one being claimed for decides after the claim.
    fn cancel(&self) {
        let mut st = self.state.lock();
        match &mut *st {
            SlotState::Waiting => {
                *st = SlotState::Gone;
                self.cv.notify_all();
            }
            SlotState::Claiming { cancel } => *cancel = true,
            _ => {}
        }
    }
}

enum Request {
    /// An outcome, and optionally the same worker's next claim, so both go into one transaction.
    Settle(SettleReq, Sender<Result<Settled>>, Option<Arc<Slot>>),
    Park(Arc<Slot>),
    Progress(ProgressReq),
    StopClaiming,
    Stop,
}

struct RunningEntry {
    flag: Arc<CancelFlag>,
    deadline: Option<Instant>,
}

struct Inner {
    store: Store,
    hub: Arc<Hub>,
    cfg: DispatcherConfig,
    reg: Registration,
    id: i64,
    requests: Sender<Request>,
    stopping: AtomicBool,
    /// Monotonic micros of the last successful heartbeat.
    beat_ok: AtomicI64,
    running: Mutex<HashMap<TaskId, RunningEntry>>,
    idle: Condvar,
    ticker_wake: Sender<()>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shut_down: AtomicBool,
}

impl Inner {
    fn beat_fresh(&self) -> bool {
        clock::mono_micros() - self.beat_ok.load(Ordering::Acquire) <= self.cfg.lease.as_micros() as i64 / 2
    }

    fn send(&self, req: Request) -> Result<()> {
        self.requests.send(req).map_err(|_| Error::Stopped)
    }
}

/// A running dispatcher: registered, heartbeating, serving claims. Dropping it shuts it down
/// immediately (see [`Dispatcher::shutdown`]).
pub struct Dispatcher {
    inner: Arc<Inner>,
}

impl Dispatcher {
    pub fn start(store: &Store, cfg: DispatcherConfig) -> Result<Dispatcher> {
        if cfg.lease.is_zero() || cfg.heartbeat.is_zero() || cfg.heartbeat * 2 > cfg.lease {
            return Err(Error::invalid(
                "lease",
                format!("lease ({:?}) must be at least twice the heartbeat interval ({:?})", cfg.lease, cfg.heartbeat),
            ));
        }
        if let Some(names) = &cfg.queues.named {
            if let Some(bad) = names.iter().find(|n| n.is_empty()) {
                return Err(Error::invalid("queues", format!("{bad:?}: queue names must not be empty")));
            }
        }
        let reg = Registration {
            runtime: cfg.runtime,
            name: cfg.name.clone().unwrap_or_else(|| format!("{}:{}", clock::hostname(), std::process::id())),
            workers: cfg.workers,
            queues: cfg.queues.named.as_ref().map(|n| n.join(",")),
            lease: cfg.lease,
        };
        let id = store.backend.register(&reg)?;
        let hub = store.backend.hub();
        let changes = hub.subscribe();
        let (tx, rx) = unbounded();
        let (ticker_tx, ticker_rx) = bounded(1);
        let inner = Arc::new(Inner {
            store: store.clone(),
            hub,
            cfg,
            reg,
            id,
            requests: tx,
            stopping: AtomicBool::new(false),
            beat_ok: AtomicI64::new(clock::mono_micros()),
            running: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
            ticker_wake: ticker_tx,
            threads: Mutex::new(Vec::new()),
            shut_down: AtomicBool::new(false),
        });
        let w = inner.clone();
        let writer = std::thread::Builder::new().name("qd-writer".into()).spawn(move || writer_loop(w, rx, changes))?;
        let t = inner.clone();
        let ticker = std::thread::Builder::new().name("qd-ticker".into()).spawn(move || ticker_loop(t, ticker_rx))?;
        inner.threads.lock().extend([writer, ticker]);
        Ok(Dispatcher { inner })
    }

    pub fn id(&self) -> i64 {
        self.inner.id
    }

    pub fn config(&self) -> &DispatcherConfig {
        &self.inner.cfg
    }

    /// A claim handle for one worker thread.
    pub fn worker(&self) -> Worker {
        Worker {
            inner: self.inner.clone(),
            wake: Arc::new(WakeState { woken: AtomicBool::new(false), current: Mutex::new(None) }),
        }
    }

    /// Tasks claimed by this dispatcher whose outcome is not stored yet.
    pub fn running(&self) -> usize {
        self.inner.running.lock().len()
    }

    /// Graceful stop, first half: claim nothing more; waiting claims return `Error::Stopped`.
    pub fn stop_claiming(&self) {
        if !self.inner.stopping.swap(true, Ordering::AcqRel) {
            let _ = self.inner.send(Request::StopClaiming);
        }
    }

    /// Stops claiming, waits up to `grace` for running tasks to report, then stops the engine
    /// threads and removes the heartbeat row. Runs still unfinished are released at once
    /// (counted as lost, back to `new`) so another dispatcher picks them up; their outcomes,
    /// if they still come, are refused.
    pub fn shutdown(&self, grace: Duration) -> Result<()> {
        self.stop_claiming();
        let deadline = Instant::now() + grace;
        {
            let mut running = self.inner.running.lock();
            while !running.is_empty() {
                if self.inner.idle.wait_until(&mut running, deadline).timed_out() {
                    break;
                }
            }
        }
        if self.inner.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _ = self.inner.send(Request::Stop);
        let _ = self.inner.ticker_wake.try_send(());
        let threads: Vec<_> = self.inner.threads.lock().drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        for (id, _) in self.inner.running.lock().drain() {
            self.inner.hub.untrack(id);
        }
        self.inner.store.backend.deregister(self.inner.id, self.inner.cfg.max_lost).map(|_| ())
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let _ = self.shutdown(Duration::ZERO);
    }
}

struct WakeState {
    woken: AtomicBool,
    current: Mutex<Option<Arc<Slot>>>,
}

/// Interrupts a [`Worker`]'s claim from any thread (e.g. a Ruby unblocking function or a
/// signal-handling thread). A wake while no claim waits makes the next claim return at once.
#[derive(Clone)]
pub struct WorkerWaker(Arc<WakeState>);

impl WorkerWaker {
    pub fn wake(&self) {
        self.0.woken.store(true, Ordering::Release);
        if let Some(slot) = self.0.current.lock().as_ref() {
            slot.cancel();
        }
    }
}

/// One worker thread's handle: claim, report progress, complete.
pub struct Worker {
    inner: Arc<Inner>,
    wake: Arc<WakeState>,
}

impl Worker {
    pub fn waker(&self) -> WorkerWaker {
        WorkerWaker(self.wake.clone())
    }

    pub fn dispatcher_id(&self) -> i64 {
        self.inner.id
    }

    /// Blocks until a task is claimed for this worker (`Some`), `timeout` passes or the waker
    /// fires (`None`), or the dispatcher stops (`Error::Stopped`).
    pub fn claim(&self, timeout: Option<Duration>) -> Result<Option<Claimed>> {
        match self.new_slot()? {
            Some(slot) => {
                let sent = self.inner.send(Request::Park(slot.clone()));
                self.wait_slot(slot, sent, timeout)
            }
            None => Ok(None),
        }
    }

    /// A fresh claim slot published to the waker, or `None` if a wake is pending.
    fn new_slot(&self) -> Result<Option<Arc<Slot>>> {
        if self.inner.stopping.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        if self.wake.woken.swap(false, Ordering::AcqRel) {
            return Ok(None);
        }
        let slot = Arc::new(Slot { state: Mutex::new(SlotState::Waiting), cv: Condvar::new() });
        *self.wake.current.lock() = Some(slot.clone());
        if self.wake.woken.swap(false, Ordering::AcqRel) {
            slot.cancel();
        }
        Ok(Some(slot))
    }

    fn wait_slot(&self, slot: Arc<Slot>, sent: Result<()>, timeout: Option<Duration>) -> Result<Option<Claimed>> {
        let result = sent.and_then(|()| {
            let mut deadline = timeout.map(|t| Instant::now() + t);
            // The writer usually answers within a cycle (tens of microseconds): yield the CPU
            // meanwhile rather than sleep, since waking a sleeping thread costs more than that.
            let spin_until = Instant::now() + WORKER_SPIN;
            while Instant::now() < spin_until
                && matches!(*slot.state.lock(), SlotState::Waiting | SlotState::Claiming { .. })
            {
                std::thread::yield_now();
            }
            let mut st = slot.state.lock();
            loop {
                match std::mem::replace(&mut *st, SlotState::Gone) {
                    SlotState::Done(v) => return v.map(|c| c.map(|b| *b)),
                    SlotState::Gone => return Ok(None),
                    SlotState::Waiting if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(None),
                    other => *st = other,
                }
                let timed_out = match deadline {
                    Some(d) => slot.cv.wait_until(&mut st, d).timed_out(),
                    None => {
                        slot.cv.wait(&mut st);
                        false
                    }
                };
                if timed_out {
                    if let SlotState::Claiming { cancel } = &mut *st {
                        // The writer is claiming for this slot and will finish it (Done, or Gone
                        // now that it is cancelled): wait for that instead of spinning on the
                        // lapsed deadline, which also kept the writer off the slot's lock.
                        *cancel = true;
                        deadline = Some(Instant::now() + Duration::from_millis(50));
                    }
                }
            }
        });
        *self.wake.current.lock() = None;
        if matches!(result, Ok(None)) {
            self.wake.woken.store(false, Ordering::Release);
        }
        result
    }

    /// Reports progress of a running task; writes are coalesced (about 10 per second per task)
    /// and the latest value is always stored, at the latest with the outcome.
    pub fn progress(&self, claimed: &Claimed, message: Option<&str>, perc_finished: Option<f64>) -> Result<()> {
        if let Some(p) = perc_finished {
            if !(0.0..=100.0).contains(&p) {
                return Err(Error::invalid("perc_finished", format!("{p} is not between 0 and 100")));
            }
        }
        self.inner.send(Request::Progress(ProgressReq {
            id: claimed.task.id,
            token: claimed.token,
            progress: Progress { message: message.map(String::from), perc: perc_finished },
        }))
    }

    fn send_settle(
        &self,
        claimed: &Claimed,
        settle: Settle,
        next: Option<Arc<Slot>>,
    ) -> Result<Receiver<Result<Settled>>> {
        if claimed.kind != ClaimKind::Run {
            return Err(Error::invalid(
                "claim",
                format!(
                    "task {} was handed over for its on_error callback only; there is no outcome to store",
                    claimed.task.id
                ),
            ));
        }
        // A timed-out run is stored as a Timeout error, whatever the code returned.
        let settle = match (settle, claimed.flag.get()) {
            (Settle::Outcome(_), Some(CancelReason::Timeout)) => {
                let limit = claimed.task.timeout.unwrap_or_default();
                Settle::Outcome(Outcome::Failure(ErrorRecord::new(
                    "Timeout",
                    format!("timed out after {:.3}s", limit.as_secs_f64()),
                )))
            }
            (Settle::Outcome(o), _) => Settle::Outcome(o.normalized()),
            (s, _) => s,
        };
        let (tx, rx) = bounded(1);
        self.inner.send(Request::Settle(
            SettleReq { id: claimed.task.id, token: claimed.token, settle, progress: None },
            tx,
            next,
        ))?;
        Ok(rx)
    }

    fn finish(&self, claimed: &Claimed, rx: Receiver<Result<Settled>>) -> Result<Settled> {
        let out = rx.recv().unwrap_or(Err(Error::Stopped));
        let mut running = self.inner.running.lock();
        running.remove(&claimed.task.id);
        self.inner.hub.untrack(claimed.task.id);
        if running.is_empty() {
            self.inner.idle.notify_all();
        }
        out
    }

    /// Stores the outcome; returns once it is committed. `Error::StaleToken` means the run had
    /// been declared lost (or reset) and the outcome was refused.
    pub fn complete(&self, claimed: &Claimed, outcome: Outcome) -> Result<Settled> {
        let rx = self.send_settle(claimed, Settle::Outcome(outcome), None)?;
        self.finish(claimed, rx)
    }

    /// `complete`, then `claim` in the same transaction: the fast path for workers without
    /// callbacks to run in between.
    pub fn complete_and_claim(
        &self,
        claimed: &Claimed,
        outcome: Outcome,
        timeout: Option<Duration>,
    ) -> (Result<Settled>, Result<Option<Claimed>>) {
        let slot = match self.new_slot() {
            Ok(slot) => slot,
            Err(e) => return (self.complete(claimed, outcome), Err(e)),
        };
        let rx = match self.send_settle(claimed, Settle::Outcome(outcome), slot.clone()) {
            Ok(rx) => rx,
            Err(e) => return (Err(e), Ok(None)),
        };
        let next = match slot {
            Some(slot) => self.wait_slot(slot, Ok(()), timeout),
            None => Ok(None),
        };
        (self.finish(claimed, rx), next)
    }

    /// Hands a claimed task back unstarted (e.g. the worker was told to stop before running it):
    /// it becomes `new` again without counting an attempt.
    pub fn release(&self, claimed: &Claimed) -> Result<Settled> {
        let rx = self.send_settle(claimed, Settle::Release, None)?;
        self.finish(claimed, rx)
    }
}

fn deliver(inner: &Inner, slot: &Slot, row: ClaimedRow) {
    let claimed = match row {
        ClaimedRow::Run { task, token } => {
            let flag = Arc::new(CancelFlag::default());
            if task.cancel_requested {
                flag.raise(CancelReason::Cancelled);
            }
            let deadline = task.timeout.map(|t| Instant::now() + t);
            inner.running.lock().insert(task.id, RunningEntry { flag: flag.clone(), deadline });
            inner.hub.track(task.id, flag.clone());
            if deadline.is_some() {
                let _ = inner.ticker_wake.try_send(());
            }
            Claimed { task, kind: ClaimKind::Run, token, flag }
        }
        ClaimedRow::OnError { task } => {
            Claimed { task, kind: ClaimKind::OnError, token: 0, flag: Arc::new(CancelFlag::default()) }
        }
    };
    slot.finish(Ok(Some(claimed)));
}

struct PendingProgress {
    token: i64,
    progress: Progress,
    dirty: bool,
    last_write: Option<Instant>,
}

fn park(slot: Arc<Slot>, parked: &mut Vec<Arc<Slot>>, stop_claiming: bool) {
    if stop_claiming {
        slot.finish(Err(Error::Stopped));
    } else {
        parked.push(slot);
    }
}

fn writer_loop(inner: Arc<Inner>, rx: Receiver<Request>, changes: Receiver<()>) {
    let policy = RetryPolicy { base: inner.cfg.retry_base, cap: inner.cfg.retry_cap };
    let mut parked: Vec<Arc<Slot>> = Vec::new();
    let mut settles: Vec<(SettleReq, Sender<Result<Settled>>)> = Vec::new();
    let mut progress: HashMap<TaskId, PendingProgress> = HashMap::new();
    let mut maybe_work = true;
    let mut next_due: Option<Instant> = None;
    let mut failing_since: Option<Instant> = None;
    let mut retry_at: Option<Instant> = None;
    let mut stop = false;
    let mut stop_claiming = false;
    // The tasks the last cycle handed out to run, and when.
    let mut delivered: (Vec<TaskId>, Instant) = (Vec::new(), Instant::now());

    let handle = |req: Request,
                  parked: &mut Vec<Arc<Slot>>,
                  settles: &mut Vec<(SettleReq, Sender<Result<Settled>>)>,
                  progress: &mut HashMap<TaskId, PendingProgress>,
                  stop: &mut bool,
                  stop_claiming: &mut bool| match req {
        Request::Settle(mut s, reply, next) => {
            if let Some(p) = progress.remove(&s.id) {
                if p.token == s.token {
                    s.progress = Some(p.progress);
                }
            }
            settles.push((s, reply));
            if let Some(slot) = next {
                park(slot, parked, *stop_claiming);
            }
        }
        Request::Park(slot) => park(slot, parked, *stop_claiming),
        Request::Progress(p) => {
            let e = progress.entry(p.id).or_insert(PendingProgress {
                token: p.token,
                progress: Progress { message: None, perc: None },
                dirty: false,
                last_write: None,
            });
            e.token = p.token;
            if p.progress.message.is_some() {
                e.progress.message = p.progress.message;
            }
            if p.progress.perc.is_some() {
                e.progress.perc = p.progress.perc;
            }
            e.dirty = true;
        }
        Request::StopClaiming => {
            *stop_claiming = true;
            for slot in parked.drain(..) {
                slot.finish(Err(Error::Stopped));
            }
        }
        Request::Stop => *stop = true,
    };

    // Held while workers wait and the last claim came up short, so other processes' commits
    // wake this thread. Not while claims are being served: watching the WAL makes every write
    // to it raise an inotify event, our own commits included.
    let mut interest = None;
    loop {
        match (!parked.is_empty() && !maybe_work, interest.is_some()) {
            (true, false) => interest = Some(inner.hub.interest()),
            (false, true) => interest = None,
            _ => {}
        }
        let now = Instant::now();
        let next_progress =
            progress.values().filter(|p| p.dirty).map(|p| p.last_write.map_or(now, |t| t + PROGRESS_INTERVAL)).min();
        let wake_at = [next_due, next_progress, retry_at].into_iter().flatten().min();
        // Claims just handed out come back within microseconds when tasks are short. Until the
        // outcomes of the tasks the last cycle handed out are all in, or COALESCE_WINDOW has
        // passed since, poll instead of sleeping (yielding the CPU, which on a busy machine the
        // workers may need): one transaction then carries them all, and the writer is not woken
        // from sleep for each. Those tasks' outcomes, not a count: with cycles slower than the
        // tasks, another worker's outcome is often already waiting when one cycle ends.
        let mut polled = false;
        while delivered.1.elapsed() < COALESCE_WINDOW
            && delivered.0.iter().any(|id| !settles.iter().any(|(s, _)| s.id == *id))
        {
            match rx.try_recv() {
                Ok(req) => {
                    polled = true;
                    handle(req, &mut parked, &mut settles, &mut progress, &mut stop, &mut stop_claiming)
                }
                Err(_) => std::thread::yield_now(),
            }
        }
        // Whatever the polling took in (an outcome, a parked claim, a stop) is work for now.
        let timeout = if settles.is_empty() && !polled {
            wake_at.map_or(Duration::from_secs(5), |t| t.saturating_duration_since(now))
        } else {
            Duration::ZERO
        };
        select! {
            recv(rx) -> msg => match msg {
                Ok(req) => handle(req, &mut parked, &mut settles, &mut progress, &mut stop, &mut stop_claiming),
                Err(_) => stop = true,
            },
            recv(changes) -> _ => maybe_work = true,
            default(timeout) => {}
        }
        while let Ok(req) = rx.try_recv() {
            handle(req, &mut parked, &mut settles, &mut progress, &mut stop, &mut stop_claiming);
        }
        if changes.try_recv().is_ok() {
            maybe_work = true;
        }
        let now = Instant::now();
        if next_due.is_some_and(|d| d <= now) {
            next_due = None;
            maybe_work = true;
        }
        if retry_at.is_some_and(|r| r > now) && !stop {
            continue;
        }
        retry_at = None;
        parked.retain(|s| matches!(*s.state.lock(), SlotState::Waiting));

        let flush: Vec<ProgressReq> = progress
            .iter_mut()
            .filter(|(_, p)| p.dirty && p.last_write.is_none_or(|t| now >= t + PROGRESS_INTERVAL))
            .map(|(&id, p)| {
                p.dirty = false;
                p.last_write = Some(now);
                ProgressReq { id, token: p.token, progress: p.progress.clone() }
            })
            .collect();
        let claiming: Vec<Arc<Slot>> = if !stop && !stop_claiming && maybe_work && inner.beat_fresh() {
            parked
                .iter()
                .filter(|s| {
                    let mut st = s.state.lock();
                    if matches!(*st, SlotState::Waiting) {
                        *st = SlotState::Claiming { cancel: false };
                        true
                    } else {
                        false
                    }
                })
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        if settles.is_empty() && flush.is_empty() && claiming.is_empty() {
            if stop {
                break;
            }
            continue;
        }
        let reqs: Vec<SettleReq> = settles
            .iter()
            .map(|(s, _)| SettleReq {
                id: s.id,
                token: s.token,
                settle: match &s.settle {
                    Settle::Outcome(o) => Settle::Outcome(o.clone()),
                    Settle::Release => Settle::Release,
                },
                progress: s.progress.clone(),
            })
            .collect();
        let claim = (!claiming.is_empty()).then(|| ClaimReq {
            dispatcher: inner.id,
            runtime: inner.cfg.runtime,
            selection: &inner.cfg.queues,
            want: claiming.len(),
        });
        match inner.store.backend.cycle(&reqs, &flush, claim, &policy) {
            Ok(out) => {
                failing_since = None;
                for ((_, reply), settled) in settles.drain(..).zip(out.settled) {
                    let _ = reply.send(settled);
                }
                let got = out.claimed.len();
                delivered.0.clear();
                delivered.0.extend(out.claimed.iter().filter_map(|row| match row {
                    ClaimedRow::Run { task, .. } => Some(task.id),
                    ClaimedRow::OnError { .. } => None,
                }));
                delivered.1 = Instant::now();
                let mut rows = out.claimed.into_iter();
                for slot in &claiming {
                    match rows.next() {
                        Some(row) => deliver(&inner, slot, row),
                        None => {
                            let mut st = slot.state.lock();
                            *st = match *st {
                                SlotState::Claiming { cancel: true } => SlotState::Gone,
                                _ => SlotState::Waiting,
                            };
                            slot.cv.notify_all();
                        }
                    }
                }
                if !claiming.is_empty() && got < claiming.len() {
                    maybe_work = false;
                }
                next_due = out.next_due.map(|due| {
                    let wait = (due - clock::now_micros()).max(0) as u64;
                    Instant::now() + Duration::from_micros(wait)
                });
            }
            Err(e) => {
                // Nothing was written. Claims wait again; outcomes are retried with backoff and
                // only reported as failed after a long outage (the task then stays `running`
                // until this dispatcher's lease lapses and another recovers it).
                for slot in &claiming {
                    let mut st = slot.state.lock();
                    *st = match *st {
                        SlotState::Claiming { cancel: true } => SlotState::Gone,
                        _ => SlotState::Waiting,
                    };
                    slot.cv.notify_all();
                }
                for p in flush {
                    if let Some(entry) = progress.get_mut(&p.id) {
                        entry.dirty = true;
                    }
                }
                let since = *failing_since.get_or_insert(Instant::now());
                if since.elapsed() > Duration::from_secs(60) || stop {
                    for (_, reply) in settles.drain(..) {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
                retry_at = Some(Instant::now() + Duration::from_millis(50));
                maybe_work = true;
            }
        }
        progress.retain(|id, _| inner.running.lock().contains_key(id));
        if stop && settles.is_empty() {
            break;
        }
    }
    for slot in parked {
        slot.finish(Err(Error::Stopped));
    }
}

fn ticker_loop(inner: Arc<Inner>, wake: Receiver<()>) {
    let backend = &inner.store.backend;
    let mut next_beat = Instant::now();
    let mut next_purge = Instant::now();
    let purge_every = Duration::from_secs(600);
    loop {
        if inner.shut_down.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        if now >= next_beat {
            next_beat = now + inner.cfg.heartbeat;
            let was_fresh = inner.beat_fresh();
            if let Ok(beat) = backend.heartbeat(inner.id, &inner.reg) {
                inner.beat_ok.store(clock::mono_micros(), Ordering::Release);
                for (id, reason) in beat.cancels {
                    inner.hub.raise(id, reason);
                }
                if !was_fresh {
                    // Claims were held back while the heartbeat was stale.
                    inner.hub.notify();
                }
                let _ = backend.recover(inner.cfg.max_lost);
            }
        }
        if now >= next_purge {
            next_purge = now + purge_every;
            let wall = clock::now_micros();
            let _ = backend.purge(
                wall - inner.cfg.keep_successful.as_micros() as i64,
                wall - inner.cfg.keep_failed.as_micros() as i64,
            );
        }
        let mut next_deadline: Option<Instant> = None;
        for entry in inner.running.lock().values() {
            if let Some(d) = entry.deadline {
                if d <= now {
                    entry.flag.raise(CancelReason::Timeout);
                } else {
                    next_deadline = Some(next_deadline.map_or(d, |n: Instant| n.min(d)));
                }
            }
        }
        let until = next_deadline.map_or(next_beat, |d| d.min(next_beat));
        let _ = wake.recv_timeout(until.saturating_duration_since(Instant::now()));
    }
}
