//! Schema and migrations of the SQLite store. Runs once per open under BEGIN IMMEDIATE and
//! re-reads user_version inside the transaction, so two processes opening a fresh file cannot
//! both migrate it. The schema itself enforces what must never break: one running task per named
//! queue (unique partial index), known runtimes and states (CHECK), and dependency bookkeeping
//! (triggers), so even rows written by hand are handled by the same rules.

use rusqlite::Connection;

use crate::error::{Error, Result};

/// 'QDSP': marks a file as ours, so a foreign SQLite file is refused instead of modified.
pub const APPLICATION_ID: i64 = 0x5144_5350;
pub const SCHEMA_VERSION: i64 = 2;

/// Recomputes the head of one named queue: its lowest (priority, id) ready task, or NULL while a
/// task of it runs or a restarted task (retry or lost run) waits, which keeps its place.
fn recompute_head(queue_expr: &str) -> String {
    format!(
        "UPDATE queues SET (head_id, head_priority, head_runtime) = (
           SELECT h.id, h.priority, h.runtime FROM tasks h
            WHERE h.queue = queues.name AND h.state = 'new' AND h.pending_deps = 0
              AND h.failed_dep IS NULL AND h.delayed = 0
              AND NOT EXISTS (SELECT 1 FROM tasks r WHERE r.queue = queues.name AND r.state = 'running')
              AND (h.attempts > 0 OR h.lost > 0 OR NOT EXISTS (
                     SELECT 1 FROM tasks w WHERE w.queue = queues.name AND w.state = 'new'
                        AND (w.attempts > 0 OR w.lost > 0)))
            ORDER BY h.priority, h.id LIMIT 1)
         WHERE name = {queue_expr};"
    )
}

fn v1() -> String {
    format!(
        r#"
-- Time defaults use julianday(), not unixepoch('subsec') (SQLite 3.42+), so rows written by hand
-- with an older sqlite3 shell (Debian 12 ships 3.40) still get them.
CREATE TABLE tasks (
  id            INTEGER PRIMARY KEY,
  queue         TEXT CHECK (queue IS NULL OR length(queue) BETWEEN 1 AND 200),
  runtime       TEXT NOT NULL CHECK (runtime IN ('python', 'ruby')),
  target        TEXT NOT NULL,
  receiver      TEXT,
  args          TEXT NOT NULL DEFAULT '{{"args":[],"kwargs":{{}}}}',
  priority      INTEGER NOT NULL DEFAULT 100,
  state         TEXT NOT NULL DEFAULT 'new'
                CHECK (state IN ('new', 'running', 'successful', 'error', 'aborted')),
  attempts      INTEGER NOT NULL DEFAULT 0,
  retries       INTEGER NOT NULL DEFAULT 0 CHECK (retries >= 0),
  lost          INTEGER NOT NULL DEFAULT 0,
  run_at        INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
  delayed       INTEGER NOT NULL DEFAULT 0,
  timeout_ms    INTEGER,
  unique_key    TEXT,
  meta          TEXT,
  result        TEXT,
  error         TEXT,
  error_history TEXT,
  message       TEXT,
  perc_finished REAL,
  enqueued_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
  started_at    INTEGER,
  finished_at   INTEGER,
  dispatcher_id INTEGER,
  token         INTEGER,
  pending_deps  INTEGER NOT NULL DEFAULT 0,
  failed_dep    INTEGER,
  cancel        INTEGER NOT NULL DEFAULT 0,
  handover      INTEGER NOT NULL DEFAULT 0
);

CREATE UNIQUE INDEX tasks_one_running_per_queue ON tasks(queue)
  WHERE state = 'running' AND queue IS NOT NULL;
CREATE INDEX tasks_ready_parallel ON tasks(runtime, priority, id)
  WHERE state = 'new' AND queue IS NULL AND pending_deps = 0 AND failed_dep IS NULL AND delayed = 0;
CREATE INDEX tasks_ready_queued ON tasks(queue, priority, id)
  WHERE state = 'new' AND pending_deps = 0 AND failed_dep IS NULL AND delayed = 0 AND queue IS NOT NULL;
CREATE INDEX tasks_restarted ON tasks(queue)
  WHERE state = 'new' AND (attempts > 0 OR lost > 0) AND queue IS NOT NULL;
CREATE INDEX tasks_delayed ON tasks(run_at) WHERE state = 'new' AND delayed = 1;
CREATE INDEX tasks_failed_dep ON tasks(runtime) WHERE state = 'new' AND failed_dep IS NOT NULL;
CREATE INDEX tasks_handover ON tasks(runtime) WHERE handover = 1;
CREATE INDEX tasks_running ON tasks(dispatcher_id) WHERE state = 'running';
CREATE UNIQUE INDEX tasks_unique_key ON tasks(unique_key)
  WHERE unique_key IS NOT NULL AND state IN ('new', 'running');

CREATE TABLE task_deps (
  task_id    INTEGER NOT NULL,
  depends_on INTEGER NOT NULL,
  PRIMARY KEY (task_id, depends_on)
) WITHOUT ROWID;
CREATE INDEX task_deps_reverse ON task_deps(depends_on, task_id);

CREATE TABLE queues (
  name          TEXT PRIMARY KEY,
  paused        INTEGER NOT NULL DEFAULT 0,
  head_id       INTEGER,
  head_priority INTEGER,
  head_runtime  TEXT
);
CREATE INDEX queues_heads ON queues(head_runtime, head_priority, head_id)
  WHERE head_id IS NOT NULL AND paused = 0;

CREATE TABLE dispatchers (
  id           INTEGER PRIMARY KEY,
  runtime      TEXT NOT NULL CHECK (runtime IN ('python', 'ruby')),
  name         TEXT NOT NULL,
  host         TEXT NOT NULL,
  pid          INTEGER NOT NULL,
  workers      INTEGER NOT NULL,
  queues       TEXT,
  started_at   INTEGER NOT NULL,
  heartbeat_at INTEGER NOT NULL,
  beat_mono    INTEGER NOT NULL,
  boot_id      TEXT NOT NULL,
  lease_ms     INTEGER NOT NULL
);

-- A dependency counts as pending while it is unfinished; a failed, aborted or missing one marks
-- the dependent so that a worker of its runtime fails it without running it.
CREATE TRIGGER task_deps_added AFTER INSERT ON task_deps BEGIN
  UPDATE tasks SET pending_deps = pending_deps + 1
   WHERE id = NEW.task_id
     AND EXISTS (SELECT 1 FROM tasks d WHERE d.id = NEW.depends_on AND d.state IN ('new', 'running'));
  UPDATE tasks SET failed_dep = NEW.depends_on
   WHERE id = NEW.task_id AND failed_dep IS NULL
     AND NOT EXISTS (SELECT 1 FROM tasks d WHERE d.id = NEW.depends_on
                      AND d.state IN ('new', 'running', 'successful'));
END;

{task_triggers}
"#,
        task_triggers = task_triggers(),
    )
}

/// The triggers on `tasks`, the same in v1 and v2 (v2 creates them again after rebuilding the
/// table): dependency bookkeeping on outcomes and deletes, and the head of each named queue.
fn task_triggers() -> String {
    format!(
        r#"
CREATE TRIGGER tasks_succeeded AFTER UPDATE OF state ON tasks
WHEN NEW.state = 'successful' AND OLD.state <> 'successful' BEGIN
  UPDATE tasks SET pending_deps = pending_deps - 1
   WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = NEW.id) AND pending_deps > 0;
END;

CREATE TRIGGER tasks_failed AFTER UPDATE OF state ON tasks
WHEN NEW.state IN ('error', 'aborted') AND OLD.state NOT IN ('error', 'aborted') BEGIN
  UPDATE tasks SET failed_dep = NEW.id
   WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = NEW.id)
     AND state = 'new' AND failed_dep IS NULL;
END;

CREATE TRIGGER tasks_deleted AFTER DELETE ON tasks BEGIN
  DELETE FROM task_deps WHERE task_id = OLD.id;
  UPDATE tasks SET failed_dep = OLD.id
   WHERE id IN (SELECT task_id FROM task_deps WHERE depends_on = OLD.id)
     AND state = 'new' AND failed_dep IS NULL;
  DELETE FROM task_deps WHERE depends_on = OLD.id;
END;

CREATE TRIGGER tasks_queued AFTER INSERT ON tasks WHEN NEW.queue IS NOT NULL BEGIN
  INSERT OR IGNORE INTO queues(name) VALUES (NEW.queue);
  {head_new}
END;

CREATE TRIGGER tasks_queue_changed
AFTER UPDATE OF state, pending_deps, failed_dep, delayed, attempts, lost, priority ON tasks
WHEN NEW.queue IS NOT NULL BEGIN
  {head_new}
END;

CREATE TRIGGER tasks_queue_deleted AFTER DELETE ON tasks
WHEN OLD.queue IS NOT NULL AND OLD.state IN ('new', 'running') BEGIN
  {head_old}
END;
"#,
        head_new = recompute_head("NEW.queue"),
        head_old = recompute_head("OLD.queue"),
    )
}

/// The tasks table of v2. Differs from v1 in two ways, both for the cost of every write:
/// - `state` is checked with `=`/`OR`, not `IN (...)`: SQLite builds a throwaway b-tree for an
///   IN list of more than two values inside a CHECK, on every INSERT and UPDATE of the row;
/// - `indexed`: a task enqueued on its own, with no queue, dependency or delay, is stored with
///   `indexed = 0` and left out of the ready index, so its commit writes one b-tree page instead
///   of two. The next claim of any dispatcher promotes every such task (the start of `claim` in sqlite.rs)
///   before it looks at the index: the ids above `promotion.mark`, all in the table's last pages.
const TASKS_V2: &str = r#"
CREATE TABLE tasks_v2 (
  id            INTEGER PRIMARY KEY,
  queue         TEXT CHECK (queue IS NULL OR length(queue) BETWEEN 1 AND 200),
  runtime       TEXT NOT NULL CHECK (runtime = 'python' OR runtime = 'ruby'),
  target        TEXT NOT NULL,
  receiver      TEXT,
  args          TEXT NOT NULL DEFAULT '{"args":[],"kwargs":{}}',
  priority      INTEGER NOT NULL DEFAULT 100,
  state         TEXT NOT NULL DEFAULT 'new'
                CHECK (state = 'new' OR state = 'running' OR state = 'successful' OR state = 'error'
                       OR state = 'aborted'),
  attempts      INTEGER NOT NULL DEFAULT 0,
  retries       INTEGER NOT NULL DEFAULT 0 CHECK (retries >= 0),
  lost          INTEGER NOT NULL DEFAULT 0,
  run_at        INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
  delayed       INTEGER NOT NULL DEFAULT 0,
  timeout_ms    INTEGER,
  unique_key    TEXT,
  meta          TEXT,
  result        TEXT,
  error         TEXT,
  error_history TEXT,
  message       TEXT,
  perc_finished REAL,
  enqueued_at   INTEGER NOT NULL DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)),
  started_at    INTEGER,
  finished_at   INTEGER,
  dispatcher_id INTEGER,
  token         INTEGER,
  pending_deps  INTEGER NOT NULL DEFAULT 0,
  failed_dep    INTEGER,
  cancel        INTEGER NOT NULL DEFAULT 0,
  handover      INTEGER NOT NULL DEFAULT 0,
  indexed       INTEGER NOT NULL DEFAULT 1
);
"#;

const TASK_COLUMNS_V1: &str = "id, queue, runtime, target, receiver, args, priority, state, attempts, retries, lost, \
    run_at, delayed, timeout_ms, unique_key, meta, result, error, error_history, message, perc_finished, enqueued_at, \
    started_at, finished_at, dispatcher_id, token, pending_deps, failed_dep, cancel, handover";

/// v1 -> v2: the tasks table is rebuilt (a CHECK cannot be altered in place), its rows copied
/// as they are; indexes and triggers are created again in their v2 form.
fn v2() -> String {
    format!(
        r#"
DROP TRIGGER task_deps_added;
{TASKS_V2}
INSERT INTO tasks_v2 ({TASK_COLUMNS_V1}) SELECT {TASK_COLUMNS_V1} FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_v2 RENAME TO tasks;

CREATE UNIQUE INDEX tasks_one_running_per_queue ON tasks(queue)
  WHERE state = 'running' AND queue IS NOT NULL;
CREATE INDEX tasks_ready_parallel ON tasks(runtime, priority, id)
  WHERE state = 'new' AND queue IS NULL AND pending_deps = 0 AND failed_dep IS NULL AND delayed = 0
    AND indexed = 1;
CREATE INDEX tasks_ready_queued ON tasks(queue, priority, id)
  WHERE state = 'new' AND pending_deps = 0 AND failed_dep IS NULL AND delayed = 0 AND queue IS NOT NULL;
CREATE INDEX tasks_restarted ON tasks(queue)
  WHERE state = 'new' AND (attempts > 0 OR lost > 0) AND queue IS NOT NULL;
CREATE INDEX tasks_delayed ON tasks(run_at) WHERE state = 'new' AND delayed = 1;
CREATE INDEX tasks_failed_dep ON tasks(runtime) WHERE state = 'new' AND failed_dep IS NOT NULL;
CREATE INDEX tasks_handover ON tasks(runtime) WHERE handover = 1;
CREATE INDEX tasks_running ON tasks(dispatcher_id) WHERE state = 'running';
CREATE UNIQUE INDEX tasks_unique_key ON tasks(unique_key)
  WHERE unique_key IS NOT NULL AND (state = 'new' OR state = 'running');

-- Tasks with ids above the mark may be waiting for promotion into the ready index.
CREATE TABLE promotion (mark INTEGER NOT NULL);
INSERT INTO promotion (mark) SELECT coalesce(max(id), 0) FROM tasks;

-- A new task takes the id after the largest one left: when the rows above the mark are
-- deleted, the mark comes down with them, so a reused id can never hide below it.
CREATE TRIGGER tasks_mark AFTER DELETE ON tasks
WHEN OLD.id >= (SELECT coalesce(max(id), 0) FROM tasks) BEGIN
  UPDATE promotion SET mark = (SELECT coalesce(max(id), 0) FROM tasks)
   WHERE mark > (SELECT coalesce(max(id), 0) FROM tasks);
END;

CREATE TRIGGER task_deps_added AFTER INSERT ON task_deps BEGIN
  UPDATE tasks SET pending_deps = pending_deps + 1
   WHERE id = NEW.task_id
     AND EXISTS (SELECT 1 FROM tasks d WHERE d.id = NEW.depends_on AND (d.state = 'new' OR d.state = 'running'));
  UPDATE tasks SET failed_dep = NEW.depends_on
   WHERE id = NEW.task_id AND failed_dep IS NULL
     AND NOT EXISTS (SELECT 1 FROM tasks d WHERE d.id = NEW.depends_on
                      AND (d.state = 'new' OR d.state = 'running' OR d.state = 'successful'));
END;

{task_triggers}
"#,
        task_triggers = task_triggers(),
    )
}

fn read_header(conn: &Connection, path: &str) -> Result<(i64, i64, i64)> {
    // One statement, one snapshot: another process may commit a migration between two reads.
    conn.query_row(
        "SELECT (SELECT user_version FROM pragma_user_version),
                (SELECT application_id FROM pragma_application_id),
                (SELECT count(*) FROM sqlite_schema)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .map_err(|e| match Error::from(e) {
        // Only SQLite's own verdict means "not a database"; locks and I/O errors stay what they are.
        Error::NotADatabase { message, .. } => Error::NotADatabase { path: path.to_string(), message },
        other => other,
    })
}

/// Reads the header without writing: refuses files that are not ours or are newer than we know.
/// Returns whether the schema needs migrating.
pub fn inspect(conn: &Connection, path: &str) -> Result<bool> {
    let (version, app, objects) = read_header(conn, path)?;
    if app != APPLICATION_ID && (objects > 0 || version != 0) {
        return Err(Error::NotADatabase {
            path: path.to_string(),
            message: format!(
                "it is an SQLite database of another application (application_id {app}, {objects} schema objects)"
            ),
        });
    }
    if version > SCHEMA_VERSION {
        return Err(Error::SchemaTooNew { found: version, supported: SCHEMA_VERSION });
    }
    Ok(version < SCHEMA_VERSION)
}

/// Brings the schema up to date under BEGIN IMMEDIATE, re-inspecting inside the transaction.
pub fn migrate(conn: &Connection, path: &str) -> Result<()> {
    if !inspect(conn, path)? {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let run = || -> Result<()> {
        if !inspect(conn, path)? {
            return Ok(());
        }
        let (version, _, _) = read_header(conn, path)?;
        if version < 1 {
            conn.execute_batch(&v1())?;
        }
        if version < 2 {
            conn.execute_batch(&v2())?;
        }
        conn.execute_batch(&format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
        ))?;
        Ok(())
    };
    match run() {
        Ok(()) => Ok(conn.execute_batch("COMMIT")?),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Dispatcher, DispatcherConfig, Outcome, Runtime, State, Store};
    use std::time::Duration;

    /// Every v1 column of every row, in id order.
    fn rows(conn: &Connection) -> Vec<Vec<rusqlite::types::Value>> {
        let mut stmt = conn.prepare(&format!("SELECT {TASK_COLUMNS_V1} FROM tasks ORDER BY id")).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get(i)).collect()).unwrap().collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn a_v1_file_is_migrated_with_its_tasks_intact_and_keeps_working() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; {} PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1;",
            v1()
        ))
        .unwrap();
        conn.execute_batch(
            "INSERT INTO tasks (id, runtime, target, state, result, finished_at) VALUES (1, 'python', 'm:done', 'successful', '7', 5);
             INSERT INTO tasks (id, runtime, target, queue) VALUES (2, 'python', 'm:first', 'q');
             INSERT INTO tasks (id, runtime, target, queue) VALUES (3, 'python', 'm:second', 'q');
             INSERT INTO tasks (id, runtime, target, priority) VALUES (4, 'ruby', 'Job.run', 3);
             INSERT INTO tasks (id, runtime, target) VALUES (5, 'python', 'm:after');
             INSERT INTO tasks (id, runtime, target) VALUES (6, 'python', 'm:blocked');
             INSERT INTO task_deps (task_id, depends_on) VALUES (5, 1), (6, 2);",
        )
        .unwrap();
        let before = rows(&conn);
        drop(conn);

        let store = Store::open(&Config::new(&path)).expect("migrating a v1 file");
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(rows(&conn), before, "the migration changed stored tasks");
        let (indexed, mark): (i64, i64) = conn
            .query_row("SELECT (SELECT sum(indexed) FROM tasks), (SELECT mark FROM promotion)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((indexed, mark), (6, 6), "every migrated task is in the ready index");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        assert_eq!(check, "ok");

        // Queue order, dependencies and the triggers behind them work on the migrated rows.
        let d = Dispatcher::start(&store, DispatcherConfig::new(Runtime::Python)).unwrap();
        let w = d.worker();
        let mut order = Vec::new();
        while let Some(c) = w.claim(Some(Duration::from_millis(300))).unwrap() {
            order.push(c.task.id);
            w.complete(&c, Outcome::Success("null".into())).unwrap();
        }
        assert_eq!(order, vec![2, 3, 5, 6]);
        assert_eq!(store.task(4).unwrap().state, State::New, "a Ruby task waits for a Ruby dispatcher");
        d.shutdown(Duration::from_secs(1)).unwrap();
    }
}
