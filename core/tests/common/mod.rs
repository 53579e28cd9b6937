//! Shared helpers: every test gets a fresh temporary database, and the semantic suite runs
//! against every store this build has.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use queue_dispatcher_core::*;

pub struct TestDb {
    pub dir: tempfile::TempDir,
    pub store: Store,
}

impl TestDb {
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("queue.db")
    }
}

pub fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&Config::new(dir.path().join("queue.db"))).expect("open store");
    TestDb { dir, store }
}

/// Every store the semantic suite must pass on.
pub fn stores() -> Vec<(&'static str, TestDb)> {
    vec![("sqlite", sqlite())]
}

pub fn py(target: &str) -> NewTask {
    NewTask::new(Runtime::Python, format!("tests.jobs:{target}"))
}

pub fn rb(target: &str) -> NewTask {
    NewTask::new(Runtime::Ruby, format!("Jobs.{target}"))
}

/// A dispatcher with a short lease, for tests.
pub fn dispatcher(store: &Store, runtime: Runtime) -> Dispatcher {
    let mut cfg = DispatcherConfig::new(runtime);
    cfg.retry_base = Duration::from_millis(20);
    cfg.retry_cap = Duration::from_millis(100);
    Dispatcher::start(store, cfg).expect("start dispatcher")
}

pub fn claim(w: &Worker) -> Claimed {
    w.claim(Some(Duration::from_secs(10))).expect("claim").expect("a task within 10 s")
}

pub fn claim_none(w: &Worker, wait: Duration) {
    if let Some(c) = w.claim(Some(wait)).expect("claim") {
        panic!("expected nothing claimable, got task {} ({})", c.task.id, c.task.target);
    }
}

pub fn ok(w: &Worker, c: &Claimed) -> Settled {
    w.complete(c, Outcome::Success("null".into())).expect("complete")
}

pub fn fail(w: &Worker, c: &Claimed, msg: &str) -> Settled {
    w.complete(c, Outcome::Failure(ErrorRecord::new("RuntimeError", msg))).expect("complete")
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Child processes of multi-process tests are the test binary run again with only its
/// `child_entry` test selected; role and parameters travel in these environment variables.
const ROLE_ENV: &str = "QD_TEST_CHILD_ROLE";
const DB_PATH_ENV: &str = "QD_TEST_CHILD_DB";
const DIR_ENV: &str = "QD_TEST_CHILD_DIR";
const ARG_ENV: &str = "QD_TEST_CHILD_ARG";

/// What a child process was started to do.
pub struct ChildEnv {
    pub role: String,
    pub db: std::path::PathBuf,
    pub dir: std::path::PathBuf,
    pub arg: String,
}

/// In `child_entry`: the child's parameters, or `None` in a normal test run.
pub fn child_env() -> Option<ChildEnv> {
    let role = std::env::var(ROLE_ENV).ok()?;
    Some(ChildEnv {
        role,
        db: std::env::var(DB_PATH_ENV).expect("db path").into(),
        dir: std::env::var(DIR_ENV).expect("dir").into(),
        arg: std::env::var(ARG_ENV).unwrap_or_default(),
    })
}

/// Starts this test binary as a child in `role`, its output going to `output`.
pub fn spawn_child_process(
    role: &str,
    db: &std::path::Path,
    dir: &std::path::Path,
    arg: &str,
    output: &std::path::Path,
) -> std::process::Child {
    let out = std::fs::File::create(output).expect("child output file");
    std::process::Command::new(std::env::current_exe().expect("current_exe"))
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env(DB_PATH_ENV, db)
        .env(DIR_ENV, dir)
        .env(ARG_ENV, arg)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone().expect("dup output file"))
        .stderr(out)
        .spawn()
        .expect("spawn child process")
}
