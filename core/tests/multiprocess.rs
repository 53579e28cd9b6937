//! Several processes sharing one SQLite file: serial queues hold across processes, a SIGKILLed
//! dispatcher's task is recovered by another, and concurrent enqueues from threads and processes
//! never fail with "database is locked".
//!
//! Child processes are this test binary run again with only `child_entry` selected; the role and
//! its parameters travel in environment variables, and start barriers are files in the test's
//! tempdir.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{child_env, py, spawn_child_process, ChildEnv};
use queue_dispatcher_core::*;

const LEASE: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(200);

/// These tests each start several processes; run one at a time so that timings (recovery within
/// the lease) are not distorted by the others on a small machine.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Child processes

struct ChildProc {
    name: String,
    child: std::process::Child,
    output: PathBuf,
}

fn spawn_child(dir: &Path, name: &str, role: &str, db: &Path, arg: &str) -> ChildProc {
    let output = dir.join(format!("{name}.out"));
    let child = spawn_child_process(role, db, dir, arg, &output);
    ChildProc { name: name.to_string(), child, output }
}

impl ChildProc {
    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Waits for `path` to appear; fails early (with the child's output) if the child exits.
    fn wait_for_file(&mut self, path: &Path, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !path.exists() {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("child {} exited ({status}) before creating {}:\n{}", self.name, path.display(), self.output());
            }
            assert!(
                Instant::now() < end,
                "child {} did not create {} within {timeout:?}:\n{}",
                self.name,
                path.display(),
                self.output()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn wait_success(&mut self, timeout: Duration) {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "child {} failed ({status}):\n{}", self.name, self.output());
                return;
            }
            if Instant::now() >= end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("child {} still running after {timeout:?}:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn touch(path: &Path) {
    File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
}

/// Writes `text` so that a reader polling for `path` never sees it half written.
fn publish(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write");
    fs::rename(&tmp, path).expect("rename");
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < end, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_entry() {
    let Some(ChildEnv { role, db, dir, arg }) = child_env() else {
        return;
    };
    let store = Store::open(&Config::new(&db)).unwrap_or_else(|e| panic!("child {role}: open {}: {e}", db.display()));
    match role.as_str() {
        "drain" => child_drain(&store, &dir, &arg),
        "hang" => child_hang(&store, &dir),
        "enqueue" => child_enqueue(&store, &dir, &arg),
        other => panic!("unknown child role {other:?}"),
    }
}

fn short_lease(workers: usize) -> DispatcherConfig {
    let mut cfg = DispatcherConfig::new(Runtime::Python);
    cfg.workers = workers;
    cfg.lease = LEASE;
    cfg.heartbeat = HEARTBEAT;
    cfg
}

// ---------------------------------------------------------------------------------------------
// a. Several dispatcher processes drain serial queues and parallel tasks

const DRAIN_TASKS: usize = 1500;
const DRAIN_QUEUES: usize = 5;
const DRAIN_WORKERS: [usize; 3] = [2, 3, 4];

/// A deterministic scramble of `i`, to vary priorities and queues without a random source.
fn mix(i: usize) -> usize {
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 31)) as usize
}

fn sleep_args(micros: usize) -> String {
    format!(r#"{{"args":[{micros}],"kwargs":{{}}}}"#)
}

/// arg: "<index> <workers>". Runs until no task is `new` or `running` any more.
fn child_drain(store: &Store, dir: &Path, arg: &str) {
    let (index, workers) = arg.split_once(' ').expect("drain arg");
    let workers: usize = workers.parse().expect("workers");
    let dispatcher = Dispatcher::start(store, DispatcherConfig { workers, ..DispatcherConfig::new(Runtime::Python) })
        .expect("start dispatcher");
    let pid = std::process::id();
    let log_path = dir.join(format!("runs-{pid}.log"));
    let log = Mutex::new(OpenOptions::new().create(true).append(true).open(&log_path).expect("open run log"));
    touch(&dir.join(format!("ready-{index}")));
    wait_for_file(&dir.join("go"), Duration::from_secs(30));
    std::thread::scope(|s| {
        for _ in 0..workers {
            let worker = dispatcher.worker();
            let log = &log;
            s.spawn(move || drain_worker(&worker, store, log, pid));
        }
    });
    dispatcher.shutdown(Duration::from_secs(5)).expect("shutdown");
}

fn drain_worker(worker: &Worker, store: &Store, log: &Mutex<File>, pid: u32) {
    loop {
        let Some(claimed) = worker.claim(Some(Duration::from_millis(100))).expect("claim") else {
            let unfinished: u64 = store.counts().expect("counts").iter().map(|c| c.new + c.running).sum();
            if unfinished == 0 {
                return;
            }
            continue;
        };
        assert_eq!(claimed.kind, ClaimKind::Run, "task {}", claimed.task.id);
        let start = clock::mono_micros();
        let args: serde_json::Value = serde_json::from_str(&claimed.task.args).expect("args json");
        let micros = args["args"][0].as_u64().expect("sleep micros");
        std::thread::sleep(Duration::from_micros(micros));
        let end = clock::mono_micros();
        let line = format!("{start} {end} {} {pid}\n", claimed.task.id);
        log.lock().unwrap().write_all(line.as_bytes()).expect("write run log");
        let settled = worker.complete(&claimed, Outcome::Success("null".into())).expect("complete");
        assert_eq!(settled, Settled::Successful, "task {}", claimed.task.id);
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    start: i64,
    end: i64,
    id: TaskId,
    pid: u32,
}

fn read_runs(dir: &Path) -> Vec<Run> {
    let mut runs = Vec::new();
    for entry in fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("runs-")) {
            continue;
        }
        for line in fs::read_to_string(&path).expect("read run log").lines() {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(f.len(), 4, "malformed run log line {line:?} in {}", path.display());
            runs.push(Run {
                start: f[0].parse().unwrap(),
                end: f[1].parse().unwrap(),
                id: f[2].parse().unwrap(),
                pid: f[3].parse().unwrap(),
            });
        }
    }
    runs
}

#[test]
fn processes_drain_every_task_once_with_serial_queues_in_order() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let store = Store::open(&Config::new(&db)).expect("open");

    let tasks: Vec<NewTask> = (0..DRAIN_TASKS)
        .map(|i| {
            let h = mix(i);
            let task = py("work").priority([90, 100, 110][h % 3]);
            if i % 2 == 0 {
                task.queue(format!("q{}", h / 3 % DRAIN_QUEUES)).args(sleep_args(200))
            } else {
                task.args(sleep_args(h / 3 % 800))
            }
        })
        .collect();
    let ids = store.enqueue_many(&tasks).expect("enqueue");
    let expected: HashMap<TaskId, &NewTask> = ids.iter().map(|e| e.id).zip(&tasks).collect();

    let mut children: Vec<ChildProc> = DRAIN_WORKERS
        .iter()
        .enumerate()
        .map(|(i, workers)| spawn_child(dir.path(), &format!("drain{i}"), "drain", &db, &format!("{i} {workers}")))
        .collect();
    for (i, child) in children.iter_mut().enumerate() {
        child.wait_for_file(&dir.path().join(format!("ready-{i}")), Duration::from_secs(20));
    }
    let started = Instant::now();
    touch(&dir.path().join("go"));
    for child in &mut children {
        child.wait_success(Duration::from_secs(40));
    }
    eprintln!("{} processes drained {DRAIN_TASKS} tasks in {:?}", children.len(), started.elapsed());

    let runs = read_runs(dir.path());
    let mut times_run: HashMap<TaskId, usize> = HashMap::new();
    for r in &runs {
        *times_run.entry(r.id).or_default() += 1;
    }
    let repeated: Vec<_> = times_run.iter().filter(|(_, &n)| n > 1).collect();
    assert!(repeated.is_empty(), "tasks ran more than once (id, runs): {repeated:?}");
    let mut never: Vec<TaskId> = expected.keys().filter(|id| !times_run.contains_key(id)).copied().collect();
    never.sort_unstable();
    assert!(never.is_empty(), "{} tasks never ran: {:?}", never.len(), &never[..never.len().min(20)]);
    let unknown: Vec<_> = times_run.keys().filter(|id| !expected.contains_key(id)).collect();
    assert!(unknown.is_empty(), "runs of tasks that were never enqueued: {unknown:?}");

    let stored = store.list(&TaskFilter::default()).expect("list");
    assert_eq!(stored.len(), DRAIN_TASKS);
    let bad: Vec<_> = stored
        .iter()
        .filter(|t| t.state != State::Successful || t.attempts != 1 || t.lost != 0)
        .map(|t| (t.id, t.state, t.attempts, t.lost))
        .collect();
    assert!(bad.is_empty(), "tasks not successful after exactly one attempt (id, state, attempts, lost): {bad:?}");

    let mut by_queue: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for r in &runs {
        if let Some(q) = expected[&r.id].queue.as_deref() {
            by_queue.entry(q).or_default().push(*r);
        }
    }
    assert_eq!(by_queue.len(), DRAIN_QUEUES);
    let mut handoffs = 0;
    for (queue, runs) in &mut by_queue {
        runs.sort_by_key(|r| r.start);
        for pair in runs.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            handoffs += usize::from(a.pid != b.pid);
            assert!(
                a.end <= b.start,
                "queue {queue}: task {} (pid {}, {}..{}) overlapped task {} (pid {}, {}..{})",
                a.id,
                a.pid,
                a.start,
                a.end,
                b.id,
                b.pid,
                b.start,
                b.end
            );
            let (ka, kb) = ((expected[&a.id].priority, a.id), (expected[&b.id].priority, b.id));
            assert!(
                ka < kb,
                "queue {queue}: task {} (priority {}) ran before task {} (priority {})",
                a.id,
                ka.0,
                b.id,
                kb.0
            );
        }
    }

    eprintln!("named queues changed process {handoffs} times");
    let pids: HashSet<u32> = runs.iter().map(|r| r.pid).collect();
    assert_eq!(pids.len(), children.len(), "every process should have run tasks; pids seen: {pids:?}");
}

// ---------------------------------------------------------------------------------------------
// b. A SIGKILLed dispatcher's task comes back and another dispatcher completes it

/// Claims one task, reports "<task id> <dispatcher id>" in the file `started`, and hangs until
/// the parent kills it.
fn child_hang(store: &Store, dir: &Path) {
    let dispatcher = Dispatcher::start(store, short_lease(1)).expect("start dispatcher");
    let worker = dispatcher.worker();
    let claimed = worker.claim(Some(Duration::from_secs(10))).expect("claim").expect("a task to hang in");
    publish(&dir.join("started"), &format!("{} {}", claimed.task.id, dispatcher.id()));
    // Only reached if the parent died without killing us.
    std::thread::sleep(Duration::from_secs(30));
    std::process::exit(3);
}

#[test]
fn task_of_a_sigkilled_dispatcher_is_recovered_by_another() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let store = Store::open(&Config::new(&db)).expect("open");
    let first = store.enqueue(py("hangs").queue("mail")).expect("enqueue").id;
    let second = store.enqueue(py("after").queue("mail")).expect("enqueue").id;

    let mut victim = spawn_child(dir.path(), "victim", "hang", &db, "");
    let started = dir.path().join("started");
    victim.wait_for_file(&started, Duration::from_secs(20));
    let report = fs::read_to_string(&started).expect("read started");
    let (task, dead) = report.split_once(' ').expect("started report");
    let (task, dead): (TaskId, i64) = (task.parse().unwrap(), dead.parse().unwrap());
    assert_eq!(task, first);
    let t = store.task(first).expect("task");
    assert_eq!((t.state, t.dispatcher_id, t.attempts), (State::Running, Some(dead), 1));

    let survivor = Dispatcher::start(&store, short_lease(1)).expect("start survivor");
    let worker = survivor.worker();
    // While the victim's lease is live its queue slot is held: nothing to claim.
    if let Some(c) = worker.claim(Some(Duration::from_millis(300))).expect("claim") {
        panic!("claimed task {} while the running dispatcher was alive", c.task.id);
    }

    // SAFETY: sends a signal to a child process we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(victim.pid(), libc::SIGKILL) }, 0, "kill: {}", std::io::Error::last_os_error());
    let status = victim.child.wait().expect("wait victim");
    let killed = Instant::now();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "victim exited with {status}:\n{}", victim.output());
    let last_beat: i64 = rusqlite::Connection::open(&db)
        .expect("open sqlite")
        .query_row("SELECT beat_mono FROM dispatchers WHERE id = ?1", [dead], |r| r.get(0))
        .expect("the dead dispatcher's heartbeat row");

    let claimed = worker.claim(Some(LEASE + Duration::from_secs(4))).expect("claim").unwrap_or_else(|| {
        panic!("the task of the killed dispatcher did not come back within {:?}", LEASE + Duration::from_secs(4))
    });
    let recovery = killed.elapsed();
    let claimed_mono = clock::mono_micros();
    eprintln!("task {first} recovered {recovery:?} after SIGKILL (lease {LEASE:?}, heartbeat {HEARTBEAT:?})");
    assert_eq!(claimed.task.id, first, "the lost task keeps its place at the head of its queue");
    assert_eq!(claimed.kind, ClaimKind::Run);
    assert_eq!((claimed.task.lost, claimed.task.attempts), (1, 1), "a lost run counts as lost, not as an attempt");
    assert!(
        claimed_mono >= last_beat + LEASE.as_micros() as i64,
        "recovered {} µs after the dead dispatcher's last heartbeat, before its lease of {LEASE:?} ran out",
        claimed_mono - last_beat
    );
    assert!(recovery <= LEASE + Duration::from_secs(2), "recovery took {recovery:?}, more than lease + 2 s");
    assert_eq!(worker.complete(&claimed, Outcome::Success("1".into())).expect("complete"), Settled::Successful);

    let next = worker.claim(Some(Duration::from_secs(5))).expect("claim").expect("the queue moves on");
    assert_eq!(next.task.id, second);
    assert_eq!(worker.complete(&next, Outcome::Success("2".into())).expect("complete"), Settled::Successful);

    let t = store.task(first).expect("task");
    assert_eq!((t.state, t.lost, t.attempts, t.result.as_deref()), (State::Successful, 1, 1, Some("1")));
    assert_eq!(t.dispatcher_id, Some(survivor.id()));
    let t = store.task(second).expect("task");
    assert_eq!((t.state, t.lost, t.attempts), (State::Successful, 0, 1));
    let dispatchers = store.dispatchers().expect("dispatchers");
    assert!(
        !dispatchers.iter().any(|d| d.id == dead && d.alive),
        "the killed dispatcher still counts as alive: {dispatchers:?}"
    );
    survivor.shutdown(Duration::from_secs(1)).expect("shutdown");
}

// ---------------------------------------------------------------------------------------------
// c. Threads of several processes enqueue into one file at once

const ENQUEUE_PROCS: usize = 3;
const ENQUEUE_THREADS: usize = 4;
const ENQUEUE_PER_THREAD: usize = 100;

/// Every thread enqueues ENQUEUE_PER_THREAD tasks tagged `meta.src = "<source>-<thread>-<i>"`:
/// thread 0 inside batches, thread 1 with enqueue_many, the others one at a time.
fn enqueue_from_threads(store: &Store, source: &str) {
    let task = |t: usize, i: usize| {
        let task = py("noop").meta(format!(r#"{{"src":"{source}-{t}-{i}"}}"#));
        if i.is_multiple_of(3) {
            task.queue(format!("q{}", i % 4))
        } else {
            task
        }
    };
    std::thread::scope(|s| {
        for t in 0..ENQUEUE_THREADS {
            s.spawn(move || {
                let fail = |i: usize, e: Error| -> ! { panic!("{source} thread {t}, task {i}: {e}") };
                for chunk in (0..ENQUEUE_PER_THREAD).collect::<Vec<_>>().chunks(10) {
                    match t {
                        0 => {
                            let batch = store.begin_batch().unwrap_or_else(|e| fail(chunk[0], e));
                            for &i in chunk {
                                store.enqueue(task(t, i)).unwrap_or_else(|e| fail(i, e));
                            }
                            batch.commit().unwrap_or_else(|e| fail(chunk[0], e));
                        }
                        1 => {
                            let many: Vec<NewTask> = chunk.iter().map(|&i| task(t, i)).collect();
                            store.enqueue_many(&many).unwrap_or_else(|e| fail(chunk[0], e));
                        }
                        _ => {
                            for &i in chunk {
                                store.enqueue(task(t, i)).unwrap_or_else(|e| fail(i, e));
                            }
                        }
                    }
                }
            });
        }
    });
}

/// arg: the process index.
fn child_enqueue(store: &Store, dir: &Path, arg: &str) {
    touch(&dir.join(format!("ready-{arg}")));
    wait_for_file(&dir.join("go"), Duration::from_secs(30));
    enqueue_from_threads(store, &format!("p{arg}"));
}

#[test]
fn threads_of_several_processes_enqueue_concurrently() {
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let store = Store::open(&Config::new(&db)).expect("open");

    let mut children: Vec<ChildProc> = (0..ENQUEUE_PROCS)
        .map(|i| spawn_child(dir.path(), &format!("enqueue{i}"), "enqueue", &db, &i.to_string()))
        .collect();
    for (i, child) in children.iter_mut().enumerate() {
        child.wait_for_file(&dir.path().join(format!("ready-{i}")), Duration::from_secs(20));
    }
    touch(&dir.path().join("go"));
    enqueue_from_threads(&store, "parent");
    for child in &mut children {
        child.wait_success(Duration::from_secs(30));
    }

    let mut expected: HashSet<String> = HashSet::new();
    let sources = (0..ENQUEUE_PROCS).map(|i| format!("p{i}")).chain(["parent".to_string()]);
    for source in sources {
        for t in 0..ENQUEUE_THREADS {
            for i in 0..ENQUEUE_PER_THREAD {
                expected.insert(format!("{source}-{t}-{i}"));
            }
        }
    }
    let stored = store.list(&TaskFilter::default()).expect("list");
    let mut seen: HashMap<String, usize> = HashMap::new();
    for t in &stored {
        assert_eq!(t.state, State::New, "task {}", t.id);
        let meta: serde_json::Value = serde_json::from_str(t.meta.as_deref().expect("meta")).expect("meta json");
        *seen.entry(meta["src"].as_str().expect("src").to_string()).or_default() += 1;
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(duplicated.is_empty(), "tasks stored twice: {duplicated:?}");
    let mut missing: Vec<&String> = expected.iter().filter(|s| !seen.contains_key(*s)).collect();
    missing.sort();
    assert!(
        missing.is_empty(),
        "{} enqueued tasks missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(stored.len(), expected.len());

    let check: String = rusqlite::Connection::open(&db)
        .expect("open sqlite")
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .expect("integrity_check");
    assert_eq!(check, "ok");
}
