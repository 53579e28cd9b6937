//! Shared helpers: every test gets a fresh temporary database, and the semantic suite runs
//! against every store this build has.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use queue_dispatcher_core::*;

pub struct TestDb {
    pub dir: tempfile::TempDir,
    pub store: Store,
    /// Set for a PostgreSQL test database (dropped after the store, see `PgSchema`).
    pub pg: Option<PgSchema>,
}

impl TestDb {
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("queue.db")
    }

    /// Runs one statement directly against the database, bypassing the engine: `sqlite` on an
    /// SQLite store, `pg` (tables unqualified: the schema is on the search path) on PostgreSQL.
    pub fn exec(&self, sqlite: &str, pg: &str) -> Result<u64, String> {
        match &self.pg {
            None => rusqlite::Connection::open(self.path())
                .and_then(|c| c.execute(sqlite, []))
                .map(|n| n as u64)
                .map_err(|e| e.to_string()),
            Some(p) => p.client().execute(pg, &[]).map_err(|e| match e.as_db_error() {
                Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
                None => e.to_string(),
            }),
        }
    }

    /// A boolean query, run directly like [`TestDb::exec`].
    pub fn query_bool(&self, sqlite: &str, pg: &str) -> bool {
        match &self.pg {
            None => rusqlite::Connection::open(self.path()).unwrap().query_row(sqlite, [], |r| r.get(0)).unwrap(),
            Some(p) => p.client().query_one(pg, &[]).unwrap().get(0),
        }
    }
}

/// Environment variable naming the PostgreSQL server the suite also runs against.
pub const PG_ENV: &str = "QUEUE_DISPATCHER_TEST_PG";

/// A schema of its own for one test; dropped (with everything in it) when this is dropped.
pub struct PgSchema {
    pub url: String,
    pub schema: String,
}

impl PgSchema {
    pub fn client(&self) -> postgres::Client {
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).expect("connect to test PostgreSQL");
        c.batch_execute(&format!("SET search_path = \"{}\"", self.schema)).unwrap();
        c
    }

    /// The URL a Store opens for this schema.
    pub fn store_url(&self) -> String {
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}schema={}", self.url, self.schema)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.url, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema));
        }
    }
}

/// The test server's URL, or `None` (said once per process) when PostgreSQL tests are skipped.
pub fn pg_url() -> Option<String> {
    static SAID: std::sync::Once = std::sync::Once::new();
    let url = std::env::var(PG_ENV).ok().filter(|u| !u.is_empty());
    if url.is_none() {
        // Straight to the process's stderr: the test harness captures eprintln! of passing tests.
        SAID.call_once(|| {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "PostgreSQL store SKIPPED: set {PG_ENV}=postgres://user@host:port/db to test it"
            );
        });
    }
    url
}

/// A fresh schema name, unique across processes and runs.
pub fn pg_schema_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("qd_test_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), fastrand::u32(..))
}

/// A store on a fresh schema of the test PostgreSQL server, if one is configured.
pub fn postgres() -> Option<TestDb> {
    let url = pg_url()?;
    let pg = PgSchema { url, schema: pg_schema_name() };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&Config::parse(&pg.store_url()).expect("parse URL")).expect("open PostgreSQL store");
    Some(TestDb { dir, store, pg: Some(pg) })
}

pub fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&Config::new(dir.path().join("queue.db"))).expect("open store");
    TestDb { dir, store, pg: None }
}

/// Every store the semantic suite must pass on (PostgreSQL when `QUEUE_DISPATCHER_TEST_PG` is set).
pub fn stores() -> Vec<(&'static str, TestDb)> {
    let mut all = vec![("sqlite", sqlite())];
    all.extend(postgres().map(|db| ("postgres", db)));
    all
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

/// Forks `rounds` times while two workers of a dispatcher and an enqueuer keep the engine busy
/// (the preload-and-fork pattern of app servers), with the engine's fork hooks around each fork.
/// Each child runs `child` on the inherited Store and leaves with its return value as exit code;
/// the parent requires exit code 0 within 20 s, and its own Store to keep working. `before` runs
/// once the engine is busy, `after` (given what `before` returned) after the last fork, both
/// while the busy threads still run. Call it from a process of its own: fork() and the threads of
/// other tests do not mix.
pub fn fork_while_busy<B>(
    store: &Store,
    rounds: usize,
    child: fn(&Store) -> i32,
    before: impl FnOnce() -> B,
    after: impl FnOnce(B),
) {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let d = dispatcher(store, Runtime::Python);
    let stop = AtomicBool::new(false);
    /// Stops the busy threads even when an assertion fails, so the failure is reported.
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        for _ in 0..2 {
            let (w, stop) = (d.worker(), &stop);
            s.spawn(move || {
                while !stop.load(Relaxed) {
                    if let Ok(Some(c)) = w.claim(Some(Duration::from_millis(20))) {
                        let _ = w.complete(&c, Outcome::Success("null".into()));
                    }
                }
            });
        }
        let stop_ref = &stop;
        s.spawn(move || {
            while !stop_ref.load(Relaxed) {
                store.enqueue(py("busy")).unwrap();
            }
        });
        std::thread::sleep(Duration::from_millis(200));
        let state = before();
        for round in 0..rounds {
            fork::prepare();
            // SAFETY: the child only makes engine calls, prepared for by the fork hooks, and
            // leaves with _exit, never returning into the test harness.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                fork::after_in_child();
                let code = child(store);
                unsafe { libc::_exit(code) };
            }
            fork::after_in_parent();
            assert!(pid > 0, "fork failed");
            let (mut status, deadline) = (0, Instant::now() + Duration::from_secs(20));
            // SAFETY: waiting on our own child.
            while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != pid {
                if Instant::now() > deadline {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    panic!("round {round}: child {pid} hung after fork");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "round {round}: child status {status}");
            store.enqueue(py("parent_after_fork")).expect("the parent's store still works");
        }
        after(state);
        stop.store(true, Relaxed);
    });
    drop(d);
}
