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
