//! Engine benchmarks: `make bench` (`cargo bench -p queue_dispatcher_core --bench engine`).
//!
//! Prints one JSON line per figure, `{"bench": NAME, "value": NUMBER, "unit": UNIT, ...}`, and
//! asserts nothing. `BENCH_SHORT=1` is a quick pass for CI: every figure, fewer tasks and samples.
//! `BENCH_FILTER=word` runs only the groups of figures whose names contain `word`.
//! Every database lives in a fresh temporary directory.
//!
//! Figures that are compared with each other (raw SQLite inserts vs `Store::enqueue`) are measured
//! in interleaved rounds, reported as medians, and their ratio is the median of the per-round
//! ratios, so load from other processes on a shared machine skews both sides alike.
//!
//! The cross-process latency figure re-executes this binary as the enqueuing process (see
//! [`ENQUEUER_ENV`]).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use queue_dispatcher_core::{
    clock, Claimed, Config, Dispatcher, DispatcherConfig, NewTask, Outcome, Runtime, Store, Synchronous, Worker,
};
use rusqlite::Connection;
use serde_json::{json, Value};

/// When set, this process is the cross-process enqueuer: it opens the database named by the
/// variable and enqueues one task per line read on stdin.
const ENQUEUER_ENV: &str = "QD_BENCH_ENQUEUER";

const TARGET: &str = "bench.jobs:noop";

/// How long a worker waits for a task it knows exists before the bench gives up.
const CLAIM_WAIT: Duration = Duration::from_secs(10);

/// Pause between latency samples, so the worker is parked in `claim` when the next task arrives.
const LATENCY_GAP: Duration = Duration::from_millis(2);

struct Plan {
    /// Interleaved rounds of the baseline/enqueue comparison (short ones: noise shows most there).
    insert_rounds: usize,
    /// Rounds of the drain figures.
    drain_rounds: usize,
    /// Transactions per round at synchronous=NORMAL (baseline and enqueue).
    inserts_normal: usize,
    /// Transactions per round at synchronous=FULL (an fsync each: several times slower).
    inserts_full: usize,
    /// Parallel tasks drained per round.
    drain: usize,
    idle: Duration,
    latency_samples: usize,
}

impl Plan {
    fn new(short: bool) -> Plan {
        if short {
            Plan {
                insert_rounds: 3,
                drain_rounds: 1,
                inserts_normal: 5_000,
                inserts_full: 500,
                drain: 5_000,
                idle: Duration::from_millis(1500),
                latency_samples: 300,
            }
        } else {
            Plan {
                insert_rounds: 5,
                drain_rounds: 5,
                inserts_normal: 20_000,
                inserts_full: 2_000,
                drain: 30_000,
                idle: Duration::from_secs(3),
                latency_samples: 2_000,
            }
        }
    }
}

fn main() {
    if let Ok(db) = std::env::var(ENQUEUER_ENV) {
        enqueuer_child(Path::new(&db));
        return;
    }
    let short = std::env::var("BENCH_SHORT").is_ok_and(|v| !v.is_empty() && v != "0");
    let plan = Plan::new(short);
    let filter = std::env::var("BENCH_FILTER").unwrap_or_default();
    let wanted = |names: &[&str]| names.iter().any(|n| n.contains(filter.as_str()));

    if wanted(&["sqlite_insert_tx", "sqlite_insert_tx_full", "core_enqueue", "core_enqueue_full"]) {
        insert_figures(&plan);
    }
    if wanted(&[
        "core_claim_complete_2t",
        "core_claim_complete_2t_backlog",
        "core_claim_complete_2t_queued",
        "core_claim_complete_10w",
    ]) {
        drain_figures(&plan);
    }
    if wanted(&["core_idle_cpu_pct"]) {
        let cpu = idle_cpu_pct(plan.idle);
        report(
            "core_idle_cpu_pct",
            rounded(cpu, 2),
            "%",
            json!({"workers": IDLE_WORKERS, "seconds": plan.idle.as_secs_f64()}),
        );
    }
    if wanted(&["core_latency_p50_ms", "core_latency_p99_ms"]) {
        report_latency("core_latency", &latency_in_process(plan.latency_samples));
    }
    if wanted(&["core_latency_xproc_p50_ms", "core_latency_xproc_p99_ms"]) {
        report_latency("core_latency_xproc", &latency_cross_process(plan.latency_samples));
    }
    if wanted(&[
        "pg_insert_tx",
        "pg_enqueue",
        "pg_claim_complete_2t",
        "pg_claim_complete_10w",
        "pg_latency_p50_ms",
        "pg_latency_p99_ms",
        "pg_latency_xconn_p50_ms",
    ]) {
        pg_figures(&plan, short);
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL (when QUEUE_DISPATCHER_TEST_PG names a server)

/// A dispatcher's default worker count (`DispatcherConfig`, both CLIs), for the `_10w` figures.
const DEFAULT_WORKERS: usize = 10;

/// Threads of the enqueue figure and of its baseline.
const PG_ENQUEUE_THREADS: usize = 8;

/// Every PostgreSQL figure beside its baseline measured in the same round: the raw rate of
/// single-row INSERT transactions (autocommit, prepared, one ~100-byte row, synchronous_commit as
/// the server has it) with the same number of threads, each on its own connection.
fn pg_figures(plan: &Plan, short: bool) {
    let Some(url) = std::env::var("QUEUE_DISPATCHER_TEST_PG").ok().filter(|u| !u.is_empty()) else {
        eprintln!("PostgreSQL figures SKIPPED: set QUEUE_DISPATCHER_TEST_PG=postgres://user@host:port/db");
        return;
    };
    let schema = format!("qd_bench_{}", std::process::id());
    let sep = if url.contains('?') { '&' } else { '?' };
    let spec = format!("{url}{sep}schema={schema}");
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).expect("connect to PostgreSQL");
    let sync: String = admin.query_one("SHOW synchronous_commit", &[]).expect("show").get(0);
    admin
        .batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; DROP SCHEMA IF EXISTS {schema}_raw CASCADE;
             CREATE SCHEMA {schema}_raw;
             CREATE TABLE {schema}_raw.baseline (id bigserial PRIMARY KEY, payload text NOT NULL)"
        ))
        .expect("baseline table");
    let raw = format!("{schema}_raw");
    let store = Store::open(&Config::parse(&spec).expect("URL")).expect("open PostgreSQL store");
    let window = if short { Duration::from_millis(1000) } else { Duration::from_secs(3) };
    let rounds = if short { 2 } else { plan.insert_rounds.min(4) };
    let drain_n = if short { 3_000 } else { 10_000 };
    let (mut base8, mut enq, mut ratio8) = (Vec::new(), Vec::new(), Vec::new());
    let (mut base2, mut drained, mut ratio2, mut drained10) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let b8 = pg_insert_tx(&url, &raw, PG_ENQUEUE_THREADS, window);
        let e = pg_enqueue(&store, PG_ENQUEUE_THREADS, window);
        ratio8.push(e / b8);
        base8.push(b8);
        enq.push(e);
        let b2 = pg_insert_tx(&url, &raw, 2, window);
        let d = pg_drain(&store, 2, drain_n);
        drained10.push(pg_drain(&store, DEFAULT_WORKERS, drain_n));
        ratio2.push(d / b2);
        base2.push(b2);
        drained.push(d);
        admin.batch_execute(&format!("TRUNCATE {raw}.baseline; TRUNCATE {schema}.tasks")).expect("truncate");
    }
    let extra =
        |t: usize| json!({"threads": t, "rounds": rounds, "seconds": window.as_secs_f64(), "synchronous_commit": sync});
    report("pg_insert_tx", rounded(median(&mut base8), 0), "tx/s", extra(PG_ENQUEUE_THREADS));
    report("pg_insert_tx", rounded(median(&mut base2.clone()), 0), "tx/s", extra(2));
    report(
        "pg_enqueue",
        rounded(median(&mut enq), 0),
        "tasks/s",
        json!({"threads": PG_ENQUEUE_THREADS, "baseline": rounded(median(&mut base8), 0),
               "ratio": rounded(median(&mut ratio8), 3), "rounds": rounds}),
    );
    report(
        "pg_claim_complete_2t",
        rounded(median(&mut drained), 0),
        "tasks/s",
        json!({"workers": 2, "baseline": rounded(median(&mut base2), 0), "ratio": rounded(median(&mut ratio2), 3),
               "rounds": rounds, "n": drain_n}),
    );
    // The default worker count: cycles carry more tasks each. No target; beside the 2-worker figure.
    report(
        "pg_claim_complete_10w",
        rounded(median(&mut drained10), 0),
        "tasks/s",
        json!({"workers": DEFAULT_WORKERS, "rounds": rounds, "n": drain_n}),
    );
    report_latency(
        "pg_latency",
        &measure_latency(&store, plan.latency_samples, || {
            store.enqueue(stamped_task()).expect("enqueue");
        }),
    );
    // The enqueuer on connections of its own (another process or host, as far as the server can
    // tell): the wake-up travels through LISTEN/NOTIFY.
    let other = Store::open(&Config::parse(&format!("{spec}&application_name=bench_enqueuer")).expect("URL"))
        .expect("open second store");
    report_latency(
        "pg_latency_xconn",
        &measure_latency(&store, plan.latency_samples, || {
            other.enqueue(stamped_task()).expect("enqueue");
        }),
    );
    drop((store, other));
    admin
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE; DROP SCHEMA {raw} CASCADE"))
        .expect("drop bench schemas");
}

/// Raw single-row INSERT transactions from `threads` connections for `window`: tx/s.
fn pg_insert_tx(url: &str, schema: &str, threads: usize, window: Duration) -> f64 {
    let payload = args_json();
    let total = AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (total, barrier, payload) = (&total, &barrier, &payload);
            s.spawn(move || {
                let mut c = postgres::Client::connect(url, postgres::NoTls).expect("connect");
                let insert =
                    c.prepare(&format!("INSERT INTO {schema}.baseline (payload) VALUES ($1)")).expect("prepare");
                barrier.wait();
                let end = Instant::now() + window;
                let mut n = 0;
                while Instant::now() < end {
                    c.execute(&insert, &[payload]).expect("insert");
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.into_inner() as f64 / window.as_secs_f64()
}

/// `Store::enqueue` (one task per call, committed before it returns) from `threads` threads.
fn pg_enqueue(store: &Store, threads: usize, window: Duration) -> f64 {
    let task = NewTask::new(Runtime::Python, TARGET).args(args_json());
    let total = AtomicUsize::new(0);
    let barrier = std::sync::Barrier::new(threads);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (total, barrier, task) = (&total, &barrier, &task);
            s.spawn(move || {
                store.enqueue(task.clone()).expect("warm-up enqueue");
                barrier.wait();
                let end = Instant::now() + window;
                let mut n = 0;
                while Instant::now() < end {
                    store.enqueue(task.clone()).expect("enqueue");
                    n += 1;
                }
                total.fetch_add(n, Ordering::Relaxed);
            });
        }
    });
    total.into_inner() as f64 / window.as_secs_f64()
}

/// Claim + complete of `n` ready no-op tasks by 2 workers (the `core_claim_complete_2t` shape).
fn pg_drain(store: &Store, workers: usize, n: usize) -> f64 {
    let task = NewTask::new(Runtime::Python, TARGET).args(args_json());
    for chunk in vec![task; n].chunks(2_000) {
        store.enqueue_many(chunk).expect("enqueue_many");
    }
    let d = drain(store, workers, n, 0);
    n as f64 / d.parallel.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Enqueue vs raw SQLite

fn insert_figures(plan: &Plan) {
    for (sync, n, suffix) in
        [(Synchronous::Normal, plan.inserts_normal, ""), (Synchronous::Full, plan.inserts_full, "_full")]
    {
        let mut baseline = Vec::new();
        let mut no_checkpoint = Vec::new();
        let mut core = Vec::new();
        let mut ratio = Vec::new();
        for _ in 0..plan.insert_rounds {
            let raw = sqlite_insert_tx(sync, n, true);
            no_checkpoint.push(sqlite_insert_tx(sync, n, false));
            let engine = core_enqueue(sync, n);
            // Per round: other processes' disk load (fsync latency above all) drifts over
            // seconds, so a round's two figures share conditions that the next round may not.
            ratio.push(engine / raw);
            baseline.push(raw);
            core.push(engine);
        }
        let baseline = median(&mut baseline);
        let core = median(&mut core);
        report(
            &format!("sqlite_insert_tx{suffix}"),
            rounded(baseline, 0),
            "tx/s",
            json!({"no_checkpoint": rounded(median(&mut no_checkpoint), 0), "rounds": plan.insert_rounds, "n": n}),
        );
        report(
            &format!("core_enqueue{suffix}"),
            rounded(core, 0),
            "tasks/s",
            json!({"baseline": rounded(baseline, 0), "ratio": rounded(median(&mut ratio), 3), "rounds": plan.insert_rounds, "n": n}),
        );
    }
}

/// Arguments of ~100 bytes, also used as the baseline's row, so both write comparable rows.
fn args_json() -> String {
    format!(r#"{{"args":["{}"],"kwargs":{{}}}}"#, "x".repeat(76))
}

/// Raw SQLite, one ~100-byte row per transaction (BEGIN IMMEDIATE; INSERT; COMMIT), on the same
/// kind of directory and with the PRAGMAs of the engine's write connection (`store::db::configure`)
/// except one: the engine turns autocheckpoint off because a thread of its own checkpoints, and
/// here `autocheckpoint` keeps SQLite's default (a checkpoint inside every commit that takes the
/// WAL past 1000 pages), the sustainable rate of one connection. Without it (`no_checkpoint` in
/// the report) nothing ever checkpoints and the WAL grows by a page per row: an upper bound that
/// no long-running writer can keep up.
fn sqlite_insert_tx(sync: Synchronous, n: usize, autocheckpoint: bool) -> f64 {
    let dir = tempdir();
    let cfg = Config::new(dir.path().join("baseline.db"));
    let conn = Connection::open(&cfg.path).expect("open baseline database");
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).expect("WAL mode");
    assert_eq!(mode, "wal");
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {};
         PRAGMA wal_autocheckpoint = {};
         PRAGMA journal_size_limit = {};
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -8000;
         PRAGMA foreign_keys = OFF;
         CREATE TABLE t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL);",
        sync_name(sync),
        if autocheckpoint { 1000 } else { 0 },
        cfg.wal_limit_bytes
    ))
    .expect("configure baseline database");
    let payload = args_json();
    let mut begin = conn.prepare("BEGIN IMMEDIATE").expect("prepare");
    let mut insert = conn.prepare("INSERT INTO t (payload) VALUES (?1)").expect("prepare");
    let mut commit = conn.prepare("COMMIT").expect("prepare");
    let mut tx = || {
        begin.execute([]).expect("begin");
        insert.execute([&payload]).expect("insert");
        commit.execute([]).expect("commit");
    };
    for _ in 0..warmup(n) {
        tx();
    }
    let start = Instant::now();
    for _ in 0..n {
        tx();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `Store::enqueue`, one task per call from one thread; each is durable when the call returns.
fn core_enqueue(sync: Synchronous, n: usize) -> f64 {
    let (_dir, store) = fresh_store(sync);
    let task = NewTask::new(Runtime::Python, TARGET).args(args_json());
    for _ in 0..warmup(n) {
        store.enqueue(task.clone()).expect("enqueue");
    }
    let tasks = vec![task; n];
    let start = Instant::now();
    for t in tasks {
        store.enqueue(t).expect("enqueue");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn warmup(n: usize) -> usize {
    (n / 10).max(50)
}

fn sync_name(sync: Synchronous) -> &'static str {
    match sync {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    }
}

// ---------------------------------------------------------------------------------------------
// Claim + complete throughput

const BLOCKED: usize = 10_000;
const QUEUES: usize = 100;
/// 100 tasks per queue.
const QUEUED: usize = QUEUES * 100;

fn drain_figures(plan: &Plan) {
    let mut plain = Vec::new();
    let mut backlog = Vec::new();
    let mut queued = Vec::new();
    let mut ten = Vec::new();
    for _ in 0..plan.drain_rounds {
        let d = drain_fresh(DEFAULT_WORKERS, plan.drain, false);
        ten.push(plan.drain as f64 / d.parallel.as_secs_f64());
        let d = drain_fresh(2, plan.drain, false);
        plain.push(plan.drain as f64 / d.parallel.as_secs_f64());
        let d = drain_fresh(2, plan.drain, true);
        backlog.push(plan.drain as f64 / d.parallel.as_secs_f64());
        queued.push(QUEUED as f64 / d.queued.as_secs_f64());
    }
    let plain = median(&mut plain);
    let backlog = median(&mut backlog);
    report(
        "core_claim_complete_2t",
        rounded(plain, 0),
        "tasks/s",
        json!({"n": plan.drain, "rounds": plan.drain_rounds}),
    );
    report(
        "core_claim_complete_2t_backlog",
        rounded(backlog, 0),
        "tasks/s",
        json!({"n": plan.drain, "blocked": BLOCKED, "queued": QUEUED, "ratio": rounded(backlog / plain, 3), "rounds": plan.drain_rounds}),
    );
    // The default worker count (no target; cycles carry more tasks each).
    report(
        "core_claim_complete_10w",
        rounded(median(&mut ten), 0),
        "tasks/s",
        json!({"n": plan.drain, "workers": DEFAULT_WORKERS, "rounds": plan.drain_rounds}),
    );
    // The backlog's serial tasks, drained after the parallel ones (claims take the lowest id).
    report(
        "core_claim_complete_2t_queued",
        rounded(median(&mut queued), 0),
        "tasks/s",
        json!({"n": QUEUED, "queues": QUEUES, "blocked": BLOCKED, "rounds": plan.drain_rounds}),
    );
}

/// A fresh database with `parallel` ready tasks (and the backlog if asked), drained by `workers`.
fn drain_fresh(workers: usize, parallel: usize, with_backlog: bool) -> Drained {
    let (dir, store) = fresh_store(Synchronous::Normal);
    if with_backlog {
        fill_backlog(&store, parallel);
    } else {
        enqueue_parallel(&store, parallel);
    }
    checkpoint(dir.path());
    drain(&store, workers, parallel, if with_backlog { QUEUED } else { 0 })
}

fn enqueue_parallel(store: &Store, n: usize) {
    let task = NewTask::new(Runtime::Python, TARGET);
    for chunk in vec![task; n].chunks(5_000) {
        store.enqueue_many(chunk).expect("enqueue_many");
    }
}

/// 10,000 tasks blocked by a dependency that never finishes (a Ruby task, which the Python
/// dispatcher under test never claims), then `parallel` ready tasks, then 100 serial queues of
/// 100 tasks, enqueued round-robin.
fn fill_backlog(store: &Store, parallel: usize) {
    let blocker = store.enqueue(NewTask::new(Runtime::Ruby, "Bench.block")).expect("enqueue blocker").id;
    let blocked = NewTask::new(Runtime::Python, TARGET).depends_on([blocker]);
    for chunk in vec![blocked; BLOCKED].chunks(5_000) {
        store.enqueue_many(chunk).expect("enqueue_many");
    }
    enqueue_parallel(store, parallel);
    let queued: Vec<NewTask> =
        (0..QUEUED).map(|i| NewTask::new(Runtime::Python, TARGET).queue(format!("q{}", i % QUEUES))).collect();
    for chunk in queued.chunks(5_000) {
        store.enqueue_many(chunk).expect("enqueue_many");
    }
}

/// How long the parallel tasks took from the start, and the queued ones after that.
struct Drained {
    parallel: Duration,
    queued: Duration,
}

/// Counts completions of one kind of task and notes when the last one was stored.
struct Counter {
    expected: usize,
    done: AtomicUsize,
    finished_at: OnceLock<Instant>,
}

impl Counter {
    fn new(expected: usize) -> Counter {
        Counter { expected, done: AtomicUsize::new(0), finished_at: OnceLock::new() }
    }

    fn add(&self) {
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            let _ = self.finished_at.set(Instant::now());
        }
    }

    fn finished_at(&self, otherwise: Instant) -> Instant {
        *self.finished_at.get().unwrap_or(&otherwise)
    }
}

/// Claims are reserved before they are made, so a worker only asks for a task it knows exists
/// and finishes with a plain `complete`: the clock stops at the last commit, not at a claim
/// timing out on an empty queue.
struct Tally {
    total: usize,
    reserved: AtomicUsize,
    parallel: Counter,
    queued: Counter,
}

impl Tally {
    fn reserve(&self) -> bool {
        self.reserved.fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| (r < self.total).then_some(r + 1)).is_ok()
    }

    fn completed(&self, c: &Claimed) {
        match c.task.queue {
            None => self.parallel.add(),
            Some(_) => self.queued.add(),
        }
    }
}

/// `workers` threads of one dispatcher drain every claimable task with `complete_and_claim`.
fn drain(store: &Store, workers: usize, parallel: usize, queued: usize) -> Drained {
    let mut cfg = DispatcherConfig::new(Runtime::Python);
    cfg.workers = workers;
    let d = Dispatcher::start(store, cfg).expect("start dispatcher");
    let tally = Tally {
        total: parallel + queued,
        reserved: AtomicUsize::new(0),
        parallel: Counter::new(parallel),
        queued: Counter::new(queued),
    };
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            let w = d.worker();
            let tally = &tally;
            s.spawn(move || drain_worker(&w, tally));
        }
    });
    d.shutdown(Duration::from_secs(1)).expect("shutdown");
    let parallel_end = tally.parallel.finished_at(start);
    Drained { parallel: parallel_end - start, queued: tally.queued.finished_at(parallel_end) - parallel_end }
}

fn drain_worker(w: &Worker, tally: &Tally) {
    let claim = |c: Option<Claimed>| c.expect("a reserved task within the claim timeout");
    let mut current = tally.reserve().then(|| claim(w.claim(Some(CLAIM_WAIT)).expect("claim")));
    while let Some(c) = current {
        current = if tally.reserve() {
            let (settled, next) = w.complete_and_claim(&c, success(), Some(CLAIM_WAIT));
            settled.expect("complete");
            Some(claim(next.expect("claim")))
        } else {
            w.complete(&c, success()).expect("complete");
            None
        };
        tally.completed(&c);
    }
}

fn success() -> Outcome {
    Outcome::Success("null".into())
}

// ---------------------------------------------------------------------------------------------
// Idle CPU

const IDLE_WORKERS: usize = 10;

/// Process CPU (user + system, every thread) while 10 workers wait in `claim` and nothing is
/// enqueued, as a percentage of one core.
fn idle_cpu_pct(window: Duration) -> f64 {
    let (_dir, store) = fresh_store(Synchronous::Normal);
    let mut cfg = DispatcherConfig::new(Runtime::Python);
    cfg.workers = IDLE_WORKERS;
    let d = Dispatcher::start(&store, cfg).expect("start dispatcher");
    let workers: Vec<Worker> = (0..IDLE_WORKERS).map(|_| d.worker()).collect();
    let pct = std::thread::scope(|s| {
        for w in &workers {
            s.spawn(move || assert!(w.claim(None).expect("claim").is_none(), "nothing was enqueued"));
        }
        // Let startup (registration, first heartbeat, first empty claims) pass.
        std::thread::sleep(Duration::from_millis(500));
        let (cpu0, t0) = (process_cpu(), Instant::now());
        std::thread::sleep(window);
        let (cpu1, t1) = (process_cpu(), Instant::now());
        for w in &workers {
            w.waker().wake();
        }
        (cpu1 - cpu0).as_secs_f64() / (t1 - t0).as_secs_f64() * 100.0
    });
    d.shutdown(Duration::from_secs(1)).expect("shutdown");
    pct
}

fn process_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut ru), 0, "getrusage");
        ru
    };
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ---------------------------------------------------------------------------------------------
// Wake-up latency

/// A task whose args carry the enqueuer's `clock::mono_micros()` (CLOCK_BOOTTIME, comparable
/// across processes), read just before the enqueue.
fn stamped_task() -> NewTask {
    NewTask::new(Runtime::Python, TARGET).args(format!(r#"{{"args":[{}],"kwargs":{{}}}}"#, clock::mono_micros()))
}

fn latency_in_process(samples: usize) -> Vec<f64> {
    let (_dir, store) = fresh_store(Synchronous::Normal);
    measure_latency(&store, samples, || {
        store.enqueue(stamped_task()).expect("enqueue");
    })
}

/// The enqueues come from a child process (this binary again, see [`enqueuer_child`]), so the
/// worker learns of them through the database file, not through this process's memory.
fn latency_cross_process(samples: usize) -> Vec<f64> {
    let (dir, store) = fresh_store(Synchronous::Normal);
    let mut child = Command::new(std::env::current_exe().expect("current_exe"))
        .env(ENQUEUER_ENV, db_path(dir.path()))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn enqueuer process");
    let mut to_child = child.stdin.take().expect("child stdin");
    let lat = measure_latency(&store, samples, || {
        writeln!(to_child, "enqueue").and_then(|()| to_child.flush()).expect("signal enqueuer");
    });
    drop(to_child);
    assert!(child.wait().expect("wait for enqueuer").success(), "enqueuer process failed");
    lat
}

/// Child side of the cross-process latency: one stamped enqueue per line on stdin, until EOF.
fn enqueuer_child(db: &Path) {
    let store = Store::open(&Config::new(db)).expect("open store");
    for line in std::io::stdin().lock().lines() {
        line.expect("read stdin");
        store.enqueue(stamped_task()).expect("enqueue");
    }
}

/// One worker thread waits in `claim`; `enqueue` adds one stamped task at a time, after the
/// previous one completed and a pause. Returns milliseconds from the stamp to `claim` returning.
fn measure_latency(store: &Store, samples: usize, mut enqueue: impl FnMut()) -> Vec<f64> {
    let mut cfg = DispatcherConfig::new(Runtime::Python);
    cfg.workers = 1;
    let d = Dispatcher::start(store, cfg).expect("start dispatcher");
    let w = d.worker();
    let waker = w.waker();
    let warm = samples / 20 + 10;
    let (tx, rx) = mpsc::channel::<i64>();
    let mut out = Vec::with_capacity(samples);
    std::thread::scope(|s| {
        s.spawn(move || {
            // Ends when woken at the end (or, if the main thread failed, after CLAIM_WAIT).
            while let Some(c) = w.claim(Some(CLAIM_WAIT)).expect("claim") {
                let micros = clock::mono_micros() - stamp(&c);
                w.complete(&c, success()).expect("complete");
                if tx.send(micros).is_err() {
                    return;
                }
            }
        });
        for i in 0..warm + samples {
            std::thread::sleep(LATENCY_GAP);
            enqueue();
            let micros = rx.recv_timeout(CLAIM_WAIT).expect("task claimed in time");
            if i >= warm {
                out.push(micros as f64 / 1000.0);
            }
        }
        waker.wake();
    });
    d.shutdown(Duration::from_secs(1)).expect("shutdown");
    out
}

fn stamp(c: &Claimed) -> i64 {
    let args: Value = serde_json::from_str(&c.task.args).expect("args JSON");
    args["args"][0].as_i64().expect("a stamped task")
}

fn report_latency(prefix: &str, samples_ms: &[f64]) {
    let mut v = samples_ms.to_vec();
    v.sort_by(f64::total_cmp);
    for (p, name) in [(50, "p50"), (99, "p99")] {
        // Nearest rank.
        let idx = (v.len() * p).div_ceil(100).saturating_sub(1);
        report(&format!("{prefix}_{name}_ms"), rounded(v[idx], 3), "ms", json!({"samples": v.len()}));
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn db_path(dir: &Path) -> PathBuf {
    dir.join("queue.db")
}

fn fresh_store(sync: Synchronous) -> (tempfile::TempDir, Store) {
    let dir = tempdir();
    let mut cfg = Config::new(db_path(dir.path()));
    cfg.synchronous = sync;
    let store = Store::open(&cfg).expect("open store");
    (dir, store)
}

/// Folds a bulk setup's writes into the database file now, so the measurement that follows does
/// not pay for the engine's background checkpoint of them.
fn checkpoint(dir: &Path) {
    let conn = Connection::open(db_path(dir)).expect("open for checkpoint");
    conn.busy_timeout(Duration::from_secs(5)).expect("busy_timeout");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).expect("checkpoint");
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A number for the report: an integer when `decimals` is 0.
fn rounded(v: f64, decimals: i32) -> Value {
    if decimals == 0 {
        json!(v.round() as i64)
    } else {
        let f = 10f64.powi(decimals);
        json!((v * f).round() / f)
    }
}

/// Prints one figure as a JSON line, its name, value and unit first, then `extra`'s keys.
fn report(bench: &str, value: Value, unit: &str, extra: Value) {
    let mut line = format!(r#"{{"bench":{},"value":{value},"unit":{}"#, json!(bench), json!(unit));
    for (k, v) in extra.as_object().into_iter().flatten() {
        line += &format!(",{}:{v}", json!(k));
    }
    println!("{line}}}");
}
