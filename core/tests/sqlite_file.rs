//! The SQLite file itself: locks held by other connections, the -wal file's bound under a
//! long-lived reader, files that are not ours (left byte for byte unchanged), racing first opens
//! and corruption.

mod common;

use std::collections::HashSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{child_env, py, spawn_child_process, ChildEnv};
use queue_dispatcher_core::*;
use rusqlite::Connection;

fn sqlite(path: &Path) -> Connection {
    Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn integrity(path: &Path) -> String {
    sqlite(path).query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check")
}

fn wal_path(db: &Path) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push("-wal");
    PathBuf::from(p)
}

fn wal_size(db: &Path) -> u64 {
    fs::metadata(wal_path(db)).map(|m| m.len()).unwrap_or(0)
}

fn all_tasks(store: &Store) -> Vec<Task> {
    store.list(&TaskFilter::default()).expect("list")
}

// ---------------------------------------------------------------------------------------------
// a. Another connection holds the write lock

/// Takes the write lock on another connection (as another process would), optionally writes to
/// task `touch`, and holds the lock for `hold` before committing. Returns once the lock is held.
fn hold_write_lock(db: &Path, hold: Duration, touch: Option<TaskId>) -> JoinHandle<()> {
    let (locked_tx, locked_rx) = mpsc::channel();
    let db = db.to_path_buf();
    let holder = std::thread::spawn(move || {
        let conn = sqlite(&db);
        conn.execute_batch("BEGIN IMMEDIATE").expect("BEGIN IMMEDIATE");
        if let Some(id) = touch {
            conn.execute("UPDATE tasks SET message = 'written under the lock' WHERE id = ?1", [id]).expect("update");
        }
        locked_tx.send(()).unwrap();
        std::thread::sleep(hold);
        conn.execute_batch("COMMIT").expect("COMMIT");
    });
    locked_rx.recv().expect("holder took the lock");
    holder
}

#[test]
fn enqueue_waits_for_a_write_lock_held_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let store = Store::open(&Config::new(&db)).expect("open");
    let seed = store.enqueue(py("seed")).expect("enqueue").id;

    let hold = Duration::from_secs(1);
    let holder = hold_write_lock(&db, hold, Some(seed));
    let started = Instant::now();
    let id =
        store.enqueue(py("waits")).unwrap_or_else(|e| panic!("enqueue under a held lock must wait, not fail: {e}")).id;
    let waited = started.elapsed();
    holder.join().expect("holder");

    assert!(
        waited >= hold - Duration::from_millis(200),
        "enqueue returned after {waited:?} although the lock was held for {hold:?}"
    );
    assert_eq!(store.task(id).expect("task").state, State::New);
    assert_eq!(store.task(seed).expect("seed").message.as_deref(), Some("written under the lock"));
    assert_eq!(all_tasks(&store).len(), 2);
    assert_eq!(integrity(&db), "ok");
}

#[test]
fn enqueue_fails_busy_after_the_busy_timeout_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let busy_timeout = Duration::from_millis(200);
    let store = Store::open(&Config { busy_timeout, ..Config::new(&db) }).expect("open");
    let tasks: Vec<NewTask> = (0..20).map(|i| py("kept").queue(format!("q{}", i % 3)).priority(i)).collect();
    store.enqueue_many(&tasks).expect("enqueue");
    let before = all_tasks(&store);

    let holder = hold_write_lock(&db, Duration::from_millis(1500), None);
    let started = Instant::now();
    let result = store.enqueue(py("too_late"));
    let waited = started.elapsed();
    let batch = store.enqueue_many(&[py("too_late_1"), py("too_late_2")]);
    holder.join().expect("holder");

    match result {
        Err(Error::Busy { message }) => assert!(!message.is_empty()),
        other => panic!("expected Error::Busy past a {busy_timeout:?} busy timeout, got {other:?}"),
    }
    assert!(matches!(batch, Err(Error::Busy { .. })), "enqueue_many: expected Error::Busy, got {batch:?}");
    assert!(
        waited >= busy_timeout - Duration::from_millis(20) && waited < Duration::from_millis(1200),
        "enqueue gave up after {waited:?}; busy timeout {busy_timeout:?}"
    );
    assert_eq!(integrity(&db), "ok");
    assert_eq!(all_tasks(&store), before, "a failed enqueue changed stored tasks");
    let after = store.enqueue(py("on_time")).expect("the store works again once the lock is released");
    assert_eq!(all_tasks(&store).len(), before.len() + 1);
    assert_eq!(store.task(after.id).expect("task").state, State::New);
}

// ---------------------------------------------------------------------------------------------
// b. The -wal file stays bounded once a long-lived reader goes away

#[test]
fn wal_shrinks_under_its_limit_after_a_long_reader_ends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let limit: u64 = 1 << 20;
    let store = Store::open(&Config { wal_limit_bytes: limit, ..Config::new(&db) }).expect("open");
    store.enqueue(py("seed")).expect("enqueue");

    let reader = sqlite(&db);
    reader.execute_batch("BEGIN").expect("BEGIN");
    let seen: i64 = reader.query_row("SELECT count(*) FROM tasks", [], |r| r.get(0)).expect("read");
    assert_eq!(seen, 1);

    let dispatcher = Dispatcher::start(&store, DispatcherConfig::new(Runtime::Python)).expect("dispatcher");
    let stop = AtomicBool::new(false);
    let payload = format!(r#"{{"args":["{}"],"kwargs":{{}}}}"#, "x".repeat(2000));
    std::thread::scope(|s| {
        let worker = dispatcher.worker();
        let stop = &stop;
        let completer = s.spawn(move || {
            let mut done = 0u64;
            while !stop.load(Ordering::Acquire) {
                if let Some(c) = worker.claim(Some(Duration::from_millis(20))).expect("claim") {
                    worker.complete(&c, Outcome::Success("null".into())).expect("complete");
                    done += 1;
                }
            }
            done
        });

        // The reader's snapshot pins every frame: the WAL cannot be reset and grows.
        let end = Instant::now() + Duration::from_secs(10);
        while wal_size(&db) <= limit + limit / 4 && Instant::now() < end {
            let batch: Vec<NewTask> = (0..50).map(|_| py("big").args(payload.clone())).collect();
            store.enqueue_many(&batch).expect("enqueue while a reader is open");
            std::thread::sleep(Duration::from_millis(5));
        }
        let grown = wal_size(&db);
        assert!(
            grown > limit,
            "the -wal file did not outgrow its {limit} byte limit ({grown} bytes) while a reader pinned it"
        );
        let still: i64 = reader.query_row("SELECT count(*) FROM tasks", [], |r| r.get(0)).expect("read");
        assert_eq!(still, 1, "the long reader's snapshot moved");
        reader.execute_batch("COMMIT").expect("end read");

        let released = Instant::now();
        let end = released + Duration::from_secs(5);
        let mut size = wal_size(&db);
        while size > limit && Instant::now() < end {
            store.enqueue(py("small")).expect("enqueue");
            std::thread::sleep(Duration::from_millis(20));
            size = wal_size(&db);
        }
        eprintln!("-wal grew to {grown} bytes behind the reader; {size} bytes {:?} after it ended", released.elapsed());
        assert!(size <= limit, "the -wal file is still {size} bytes (limit {limit}) 5 s after the reader ended");

        stop.store(true, Ordering::Release);
        let done = completer.join().expect("completer");
        assert!(done > 0, "the dispatcher claimed no task during the test");
    });
    dispatcher.shutdown(Duration::from_secs(1)).expect("shutdown");
    drop(reader);
    assert_eq!(integrity(&db), "ok");
}

/// A busy writer with no reader pinning the WAL: the maintenance thread rewinds it whenever a
/// quarter of the limit has been written, so the same file is overwritten again and again (never
/// truncated and regrown, which costs the kernel a fresh zeroed page per frame).
#[test]
fn a_busy_writer_reuses_the_wal_instead_of_growing_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let config = Config::new(&db);
    let limit = config.wal_limit_bytes;
    let store = Store::open(&config).expect("open");
    let payload = format!(r#"{{"args":["{}"],"kwargs":{{}}}}"#, "x".repeat(100));
    let (mut largest, mut shrank, mut written) = (0, 0, 0u64);
    let mut last = 0;
    // Every enqueue appends at least one 4 KiB frame: this writes 15 times the limit.
    while written < 15 * limit {
        for _ in 0..100 {
            store.enqueue(py("busy").args(payload.clone())).expect("enqueue");
        }
        written += 100 * 4096;
        let size = wal_size(&db);
        largest = largest.max(size);
        if size < last {
            shrank += 1;
        }
        last = size;
    }
    eprintln!("wrote over {written} bytes of frames; the -wal file peaked at {largest} bytes, shrank {shrank} times");
    assert!(largest <= limit, "the -wal file reached {largest} bytes (limit {limit}) with no reader holding it");
    assert_eq!(shrank, 0, "the -wal file was truncated {shrank} times instead of being rewound and reused");
    assert_eq!(integrity(&db), "ok");
}

// ---------------------------------------------------------------------------------------------
// c. Files that are not ours are refused and left unchanged

fn expect_not_a_database(path: &Path) -> String {
    let before = fs::read(path).expect("read file");
    let err = Store::open(&Config::new(path)).expect_err("opening a file that is not a queue_dispatcher database");
    let after = fs::read(path).expect("read file");
    assert!(
        before == after,
        "Store::open modified {} ({} bytes before, {} after)",
        path.display(),
        before.len(),
        after.len()
    );
    let Error::NotADatabase { path: named, message } = &err else {
        panic!("{}: expected NotADatabase, got {err:?}", path.display())
    };
    let canonical = path.canonicalize().expect("canonicalize");
    assert_eq!(Path::new(named), canonical, "the error names another path");
    assert!(err.to_string().contains(&canonical.display().to_string()), "message does not name the file: {err}");
    message.clone()
}

#[test]
fn a_text_file_is_not_a_database_and_stays_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    fs::write(&path, "Shopping list\n- milk\n- bread\n".repeat(200)).expect("write");
    let message = expect_not_a_database(&path);
    assert!(!message.is_empty());
}

#[test]
fn another_applications_sqlite_database_is_refused_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let with_tables = dir.path().join("crm.sqlite");
    let conn = sqlite(&with_tables);
    conn.execute_batch(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO customers (name) VALUES ('Ada'), ('Grace');",
    )
    .expect("create foreign db");
    drop(conn);
    let message = expect_not_a_database(&with_tables);
    assert!(message.contains("another application"), "{message}");

    // No tables, but a user_version of its own: still not ours.
    let versioned = dir.path().join("settings.sqlite");
    sqlite(&versioned).execute_batch("PRAGMA user_version = 7").expect("set user_version");
    assert!(fs::metadata(&versioned).expect("stat").len() > 0);
    expect_not_a_database(&versioned);
}

#[test]
fn a_database_from_a_newer_version_is_refused_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let store = Store::open(&Config::new(&db)).expect("open");
    store.enqueue(py("from_the_future")).expect("enqueue");
    drop(store);

    let conn = sqlite(&db);
    let supported: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version");
    assert!(supported > 0);
    conn.execute_batch(&format!("PRAGMA user_version = {}", supported + 1)).expect("bump user_version");
    drop(conn);
    assert_eq!(wal_size(&db), 0, "the last close should have checkpointed the WAL into the file");

    let before = fs::read(&db).expect("read");
    let result = Store::open(&Config::new(&db));
    let after = fs::read(&db).expect("read");
    match result {
        Err(Error::SchemaTooNew { found, supported: s }) => assert_eq!((found, s), (supported + 1, supported)),
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
    assert!(before == after, "Store::open modified a database it refused");
    assert_eq!(wal_size(&db), 0, "Store::open left writes in the -wal file of a database it refused");
    let version: i64 = sqlite(&db).query_row("PRAGMA user_version", [], |r| r.get(0)).expect("user_version");
    assert_eq!(version, supported + 1);
}

// ---------------------------------------------------------------------------------------------
// d. Racing first opens of a fresh file

const OPEN_PROCS: usize = 8;
const OPEN_THREADS: usize = 3;
const OPEN_ROUNDS: usize = 10;

/// Entry point of the child processes; does nothing in a normal test run.
#[test]
fn child_entry() {
    let Some(ChildEnv { role, db, dir, arg }) = child_env() else {
        return;
    };
    match role.as_str() {
        "open" => {
            File::create(dir.join(format!("ready-{arg}"))).expect("ready file");
            wait_for_file(&dir.join("go"), Duration::from_secs(30));
            open_and_enqueue(&db, &format!("proc-{arg}"));
        }
        other => panic!("unknown child role {other:?}"),
    }
}

fn open_and_enqueue(db: &Path, source: &str) {
    let store = Store::open(&Config::new(db))
        .unwrap_or_else(|e| panic!("{source}: first open of {} failed: {e}", db.display()));
    store
        .enqueue(py("opened").meta(format!(r#"{{"src":"{source}"}}"#)))
        .unwrap_or_else(|e| panic!("{source}: enqueue: {e}"));
}

fn wait_for_file(path: &Path, timeout: Duration) {
    let end = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < end, "{} did not appear within {timeout:?}", path.display());
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// What a file's schema looks like from outside.
#[derive(Debug, PartialEq)]
struct Schema {
    user_version: i64,
    application_id: i64,
    journal_mode: String,
    /// (type, name, sql) of every schema object.
    objects: Vec<(String, String, Option<String>)>,
}

fn schema_of(db: &Path) -> Schema {
    let conn = sqlite(db);
    let int = |pragma: &str| -> i64 { conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0)).expect(pragma) };
    let objects = conn
        .prepare("SELECT type, name, sql FROM sqlite_schema ORDER BY type, name")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    Schema {
        user_version: int("user_version"),
        application_id: int("application_id"),
        journal_mode: conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("journal_mode"),
        objects,
    }
}

/// Child processes that are killed if the test ends (e.g. fails) before reaping them.
struct Children(Vec<(std::process::Child, PathBuf)>);

impl Children {
    fn wait_all_succeed(&mut self) {
        for (child, output) in &mut self.0 {
            let status = child.wait().expect("wait child");
            assert!(status.success(), "child failed ({status}):\n{}", fs::read_to_string(output).unwrap_or_default());
        }
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// One race: OPEN_PROCS processes and OPEN_THREADS threads open `db`, which does not exist yet,
/// at the same moment, and each enqueues one task.
fn race_first_open(dir: &Path, db: &Path) {
    let mut children = Children(
        (0..OPEN_PROCS)
            .map(|i| {
                let output = dir.join(format!("open{i}.out"));
                let child = spawn_child_process("open", db, dir, &i.to_string(), &output);
                (child, output)
            })
            .collect(),
    );
    for i in 0..OPEN_PROCS {
        wait_for_file(&dir.join(format!("ready-{i}")), Duration::from_secs(20));
    }
    assert!(!db.exists(), "nobody may create the file before the start signal");
    let go = dir.join("go");
    std::thread::scope(|s| {
        for t in 0..OPEN_THREADS {
            let go = &go;
            s.spawn(move || {
                wait_for_file(go, Duration::from_secs(10));
                open_and_enqueue(db, &format!("thread-{t}"));
            });
        }
        File::create(&go).expect("go file");
    });
    children.wait_all_succeed();
}

#[test]
fn concurrent_first_opens_create_the_schema_once() {
    let reference_dir = tempfile::tempdir().expect("tempdir");
    let reference_db = reference_dir.path().join("reference.db");
    drop(Store::open(&Config::new(&reference_db)).expect("open reference"));
    let reference = schema_of(&reference_db);
    let expected: HashSet<String> =
        (0..OPEN_PROCS).map(|i| format!("proc-{i}")).chain((0..OPEN_THREADS).map(|t| format!("thread-{t}"))).collect();

    // The window is a few hundred microseconds wide: several rounds make a race likely.
    for round in 0..OPEN_ROUNDS {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("fresh.db");
        race_first_open(dir.path(), &db);

        assert_eq!(schema_of(&db), reference, "round {round}: the raced file differs from a cleanly created one");
        assert_eq!(integrity(&db), "ok", "round {round}");
        let store = Store::open(&Config::new(&db)).expect("open");
        let tasks = all_tasks(&store);
        let sources: HashSet<String> = tasks
            .iter()
            .map(|t| {
                serde_json::from_str::<serde_json::Value>(t.meta.as_deref().unwrap()).unwrap()["src"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(sources, expected, "round {round}");
        assert_eq!(tasks.len(), expected.len(), "round {round}");
    }
}

// ---------------------------------------------------------------------------------------------
// e. A corrupt file gives an error, not a panic

#[test]
fn a_corrupt_database_gives_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("queue.db");
    let store = Store::open(&Config::new(&db)).expect("open");
    // About one row per 4 KiB page, so the tasks table is most of the file.
    let payload = format!(r#"{{"args":["{}"],"kwargs":{{}}}}"#, "y".repeat(3000));
    let tasks: Vec<NewTask> = (0..600).map(|_| py("doomed").args(payload.clone())).collect();
    store.enqueue_many(&tasks).expect("enqueue");
    drop(store);

    let conn = sqlite(&db);
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)).expect("checkpoint");
    let page_size = conn.query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0)).expect("page_size") as u64;
    drop(conn);
    assert_eq!(wal_size(&db), 0);

    let mut bytes = fs::read(&db).expect("read");
    let pages = bytes.len() as u64 / page_size;
    assert!(pages > 400, "database has only {pages} pages");
    let start = (pages / 2 * page_size) as usize;
    bytes[start..start + 32 * page_size as usize].fill(0xA5);
    fs::write(&db, &bytes).expect("write");
    assert_ne!(integrity(&db), "ok", "the damage did not register");

    let err = match Store::open(&Config::new(&db)) {
        Err(e) => e,
        Ok(store) => store.list(&TaskFilter::default()).expect_err("listing a corrupt table must fail"),
    };
    assert!(matches!(err, Error::Storage { .. } | Error::NotADatabase { .. }), "unexpected error kind: {err:?}");
    let text = err.to_string();
    eprintln!("corrupt database: {text}");
    assert!(
        text.contains("malformed") || text.contains("corrupt"),
        "the error does not say the file is damaged: {text}"
    );
}
