//! The SQLite store: every state transition as SQL over one connection inside one transaction.
//! Runs on the caller's thread (enqueue, admin) or a dispatcher's writer thread (cycle).
//! Guarantees: a transition is atomic and durable on return; outcomes carrying a stale attempt
//! token change nothing; one running task per named queue is enforced by a unique index.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use rusqlite::types::{ToSql, Value};
use rusqlite::{params, Connection, OptionalExtension, Row};

use super::db::Db;
use super::process_local::ProcessLocal;
use super::{
    Backend, Beat, ClaimReq, ClaimedRow, Config, CycleOut, ProgressReq, Registration, RetryPolicy, Settle, SettleReq,
};
use crate::clock;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::retry;
use crate::target;
use crate::task::{
    CancelReason, DispatcherInfo, Enqueued, ErrorRecord, NewTask, Outcome, QueueCounts, Settled, State, Task,
    TaskFilter, TaskId,
};

const TASK_COLS: &str = "id, queue, runtime, target, receiver, args, priority, state, attempts, retries, lost, \
    run_at, timeout_ms, unique_key, meta, result, error, error_history, message, perc_finished, enqueued_at, \
    started_at, finished_at, dispatcher_id, cancel";

fn conversion(e: Error) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

fn task_from_row(r: &Row) -> rusqlite::Result<Task> {
    let runtime: String = r.get(2)?;
    let state: String = r.get(7)?;
    let error: Option<String> = r.get(16)?;
    let history: Option<String> = r.get(17)?;
    let timeout_ms: Option<i64> = r.get(12)?;
    Ok(Task {
        id: r.get(0)?,
        queue: r.get(1)?,
        runtime: runtime.parse().map_err(conversion)?,
        target: r.get(3)?,
        receiver: r.get(4)?,
        args: r.get(5)?,
        priority: r.get(6)?,
        state: state.parse().map_err(conversion)?,
        attempts: r.get(8)?,
        retries: r.get(9)?,
        lost: r.get(10)?,
        run_at: r.get(11)?,
        timeout: timeout_ms.filter(|&t| t > 0).map(|t| std::time::Duration::from_millis(t as u64)),
        unique_key: r.get(13)?,
        meta: r.get(14)?,
        result: r.get(15)?,
        error: error.as_deref().map(ErrorRecord::from_json),
        error_history: history
            .as_deref()
            .and_then(|h| serde_json::from_str::<Vec<serde_json::Value>>(h).ok())
            .map(|v| v.iter().map(|e| ErrorRecord::from_json(&e.to_string())).collect())
            .unwrap_or_default(),
        message: r.get(18)?,
        perc_finished: r.get(19)?,
        enqueued_at: r.get(20)?,
        started_at: r.get(21)?,
        finished_at: r.get(22)?,
        dispatcher_id: r.get(23)?,
        depends_on: Vec::new(),
        cancel_requested: r.get::<_, i64>(24)? > 0,
    })
}

pub(super) fn cancel_record(code: i64) -> ErrorRecord {
    match code {
        2 => ErrorRecord::new("Reset", "aborted by reset"),
        _ => ErrorRecord::new("Cancelled", "cancelled"),
    }
}

pub(super) fn history_entry(attempt: i64, e: &ErrorRecord) -> String {
    serde_json::json!({"attempt": attempt, "class": e.class, "message": e.message, "backtrace": e.backtrace})
        .to_string()
}

pub(super) fn check_json(field: &str, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::invalid(field, format!("not valid JSON ({e}): {}", abbreviate(text))))
}

fn abbreviate(text: &str) -> String {
    if text.chars().count() > 80 {
        format!("{}...", text.chars().take(80).collect::<String>())
    } else {
        text.to_string()
    }
}

/// Refuses what workers would refuse, with a message naming the field.
pub(super) fn validate(t: &NewTask) -> Result<()> {
    target::validate(t.runtime, &t.target)?;
    let args = check_json("args", &t.args)?;
    let Some(obj) = args.as_object() else {
        return Err(Error::invalid("args", "must be a JSON object {\"args\": [...], \"kwargs\": {...}}"));
    };
    if obj.get("args").is_some_and(|a| !a.is_array()) {
        return Err(Error::invalid("args", "\"args\" must be a JSON array"));
    }
    if obj.get("kwargs").is_some_and(|k| !k.is_object()) {
        return Err(Error::invalid("args", "\"kwargs\" must be a JSON object"));
    }
    if let Some(unknown) = obj.keys().find(|k| *k != "args" && *k != "kwargs") {
        return Err(Error::invalid("args", format!("unknown key {unknown:?} (only \"args\" and \"kwargs\")")));
    }
    if let Some(q) = &t.queue {
        if q.is_empty() || q.len() > 200 || q.chars().any(char::is_control) {
            return Err(Error::invalid("queue", format!("{q:?}: a queue name is 1 to 200 printable characters")));
        }
    }
    if let Some(m) = &t.meta {
        if !check_json("meta", m)?.is_object() {
            return Err(Error::invalid("meta", "must be a JSON object"));
        }
    }
    if let Some(r) = &t.receiver {
        check_json("receiver", r)?;
    }
    target::validate_receiver(t.runtime, &t.target, t.receiver.as_deref())?;
    if t.unique_key.as_deref() == Some("") {
        return Err(Error::invalid("unique_key", "must not be empty"));
    }
    if t.timeout.is_some_and(|d| d.is_zero()) {
        return Err(Error::invalid("timeout", "must be positive"));
    }
    Ok(())
}

/// True if `from` (transitively) depends on `to`.
fn depends_transitively(c: &Connection, from: TaskId, to: TaskId) -> Result<bool> {
    let mut stmt = c.prepare_cached(
        "WITH RECURSIVE up(id) AS (SELECT ?1 UNION SELECT d.depends_on FROM task_deps d JOIN up ON d.task_id = up.id)
         SELECT EXISTS (SELECT 1 FROM up WHERE id = ?2)",
    )?;
    Ok(stmt.query_row(params![from, to], |r| r.get(0))?)
}

fn exists(c: &Connection, id: TaskId) -> Result<bool> {
    Ok(c.prepare_cached("SELECT EXISTS (SELECT 1 FROM tasks WHERE id = ?1)")?.query_row([id], |r| r.get(0))?)
}

fn insert_deps(c: &Connection, task: TaskId, deps: &[TaskId]) -> Result<()> {
    let mut ins = c.prepare_cached("INSERT OR IGNORE INTO task_deps (task_id, depends_on) VALUES (?1, ?2)")?;
    for &dep in deps {
        ins.execute(params![task, dep])?;
    }
    Ok(())
}

/// `alone`: the task is the only one of its transaction. A plain one (no queue, dependency or
/// delay) is then left out of the ready index until the next claim promotes it: see TASKS_V2 in
/// schema.rs. Tasks enqueued together go straight into the index, where they cost little more.
fn enqueue_one(c: &Connection, t: &NewTask, now: i64, alone: bool) -> Result<Enqueued> {
    validate(t)?;
    if let Some(key) = &t.unique_key {
        let held: Option<TaskId> = c
            // The state test is written exactly as tasks_unique_key's predicate: SQLite uses a
            // partial index only for a query term that matches it (with IN it scanned the table).
            .prepare_cached("SELECT id FROM tasks WHERE unique_key = ?1 AND (state = 'new' OR state = 'running')")?
            .query_row([key], |r| r.get(0))
            .optional()?;
        if let Some(id) = held {
            return Ok(Enqueued { id, existing: true });
        }
    }
    for &dep in &t.depends_on {
        if !exists(c, dep)? {
            return Err(Error::MissingDependency { task: None, dependency: dep });
        }
    }
    let run_at = t.run_at.unwrap_or(now);
    let indexed = !(alone && t.queue.is_none() && t.depends_on.is_empty() && run_at <= now);
    c.prepare_cached(
        "INSERT INTO tasks (queue, runtime, target, receiver, args, priority, retries, run_at, delayed,
                            timeout_ms, unique_key, meta, enqueued_at, indexed)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
    )?
    .execute(params![
        t.queue,
        t.runtime.as_str(),
        t.target,
        t.receiver,
        t.args,
        t.priority,
        t.retries,
        run_at,
        run_at > now,
        t.timeout.map(|d| d.as_millis().max(1) as i64),
        t.unique_key,
        t.meta,
        now,
        indexed
    ])?;
    let id = c.last_insert_rowid();
    insert_deps(c, id, &t.depends_on)?;
    Ok(Enqueued { id, existing: false })
}

fn dependency_failure(c: &Connection, dep: TaskId) -> Result<ErrorRecord> {
    let row: Option<(String, String, Option<String>)> = c
        .prepare_cached("SELECT state, target, error FROM tasks WHERE id = ?1")?
        .query_row([dep], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let message = match row {
        None => format!("dependency {dep} does not exist"),
        Some((state, target, error)) => {
            let cause = error.as_deref().map(ErrorRecord::from_json).unwrap_or_default();
            match state.as_str() {
                "aborted" => format!("dependency {dep} ({target}) was aborted: {}", cause.message),
                "error" => format!("dependency {dep} ({target}) failed: {}: {}", cause.class, cause.message),
                other => format!("dependency {dep} ({target}) is {other}"),
            }
        }
    };
    Ok(ErrorRecord::new("DependencyFailed", message))
}

/// The earliest run_at of a delayed task, if any.
fn next_due(c: &Connection) -> Result<Option<i64>> {
    Ok(c.prepare_cached("SELECT min(run_at) FROM tasks WHERE state = 'new' AND delayed = 1")?
        .query_row([], |r| r.get(0))?)
}

/// Tasks of this runtime that ended without running (a failed dependency, or aborted while
/// another dispatcher held them) and still owe their on_error callback.
fn handovers(c: &Connection, req: &ClaimReq<'_>, now: i64, out: &mut Vec<ClaimedRow>) -> Result<()> {
    let rt = req.runtime.as_str();
    let want = req.want as i64;
    let failed: Vec<(TaskId, TaskId)> = c
        .prepare_cached("SELECT id, failed_dep FROM tasks WHERE state = 'new' AND failed_dep IS NOT NULL AND runtime = ?1 ORDER BY id LIMIT ?2")?
        .query_map(params![rt, want], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (id, dep) in failed {
        let err = dependency_failure(c, dep)?;
        let task = c
            .prepare_cached(&format!(
                "UPDATE tasks SET state = 'error', error = ?2, finished_at = ?3, dispatcher_id = ?4
                  WHERE id = ?1 AND state = 'new' RETURNING {TASK_COLS}"
            ))?
            .query_row(params![id, err.to_json(), now, req.dispatcher], task_from_row)?;
        out.push(ClaimedRow::OnError { task });
    }
    if out.len() < req.want {
        let left = (req.want - out.len()) as i64;
        let tasks: Vec<Task> = c
            .prepare_cached(&format!(
                "UPDATE tasks SET handover = 0 WHERE id IN
                   (SELECT id FROM tasks WHERE handover = 1 AND runtime = ?1 ORDER BY id LIMIT ?2)
                 RETURNING {TASK_COLS}"
            ))?
            .query_map(params![rt, left], task_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        out.extend(tasks.into_iter().map(|task| ClaimedRow::OnError { task }));
    }
    Ok(())
}

/// Claim candidates, read whole (no column of `queues` shares a name with one of TASK_COLS).
/// Built once: claims run in every cycle.
static PARALLEL_CANDIDATES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {TASK_COLS} FROM tasks
          WHERE runtime = ?1 AND state = 'new' AND queue IS NULL AND pending_deps = 0
            AND failed_dep IS NULL AND delayed = 0 AND indexed = 1 AND run_at <= ?2
          ORDER BY priority, id LIMIT ?3"
    )
});
static QUEUE_HEADS: LazyLock<String> = LazyLock::new(|| queue_heads(""));
static SELECTED_QUEUE_HEADS: LazyLock<String> =
    LazyLock::new(|| queue_heads("AND q.name IN (SELECT value FROM json_each(?3))"));

fn queue_heads(filter: &str) -> String {
    format!(
        "SELECT {TASK_COLS} FROM queues q JOIN tasks t ON t.id = q.head_id
          WHERE q.head_runtime = ?1 AND q.head_id IS NOT NULL AND q.paused = 0 {filter}
          ORDER BY q.head_priority, q.head_id LIMIT ?2"
    )
}

/// Claims for `req`; also returns the earliest run_at of a still-delayed task. Statements are
/// few on purpose (this runs in every cycle of every dispatcher): one probe says what else is
/// needed, and candidates are read whole, so taking one is a single UPDATE.
fn claim(c: &Connection, req: &ClaimReq<'_>, now: i64) -> Result<(Vec<ClaimedRow>, Option<i64>)> {
    let mut out = Vec::new();
    let rt = req.runtime.as_str();
    // Promotion (see TASKS_V2 in schema.rs): tasks enqueued alone since the last claim wait above
    // the mark, outside the ready index, whatever their runtime. Handovers: tasks that end
    // without running still owe their on_error callback (rare; two small partial indexes).
    // any_heads: whether any named queue of this runtime has a task to take, so a dispatcher of
    // parallel tasks only does not read the queue table each cycle.
    let (mark, last, mut due, owed, mut any_heads): (i64, i64, Option<i64>, bool, bool) = c
        .prepare_cached(
            "SELECT (SELECT mark FROM promotion), (SELECT coalesce(max(id), 0) FROM tasks),
                    (SELECT min(run_at) FROM tasks WHERE state = 'new' AND delayed = 1),
                    EXISTS (SELECT 1 FROM tasks WHERE state = 'new' AND failed_dep IS NOT NULL AND runtime = ?1)
                      OR EXISTS (SELECT 1 FROM tasks WHERE handover = 1 AND runtime = ?1),
                    EXISTS (SELECT 1 FROM queues WHERE head_runtime = ?1 AND head_id IS NOT NULL AND paused = 0)",
        )?
        .query_row([rt], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))?;
    if last > mark {
        c.prepare_cached("UPDATE tasks SET indexed = 1 WHERE id > ?1 AND indexed = 0")?.execute([mark])?;
        c.prepare_cached("UPDATE promotion SET mark = ?1")?.execute([last])?;
    }
    // Releasing delayed tasks and failing tasks of failed dependencies can move queue heads.
    any_heads |= owed || due.is_some_and(|d| d <= now);
    if due.is_some_and(|d| d <= now) {
        c.prepare_cached("UPDATE tasks SET delayed = 0 WHERE state = 'new' AND delayed = 1 AND run_at <= ?1")?
            .execute([now])?;
        due = next_due(c)?;
    }
    if owed {
        handovers(c, req, now, &mut out)?;
    }
    if out.len() >= req.want {
        return Ok((out, due));
    }
    let left = (req.want - out.len()) as i64;

    // Candidates: ready parallel tasks, and the head of every free named queue.
    let mut candidates: Vec<Task> = Vec::new();
    if req.selection.parallel {
        let mut stmt = c.prepare_cached(&PARALLEL_CANDIDATES)?;
        let rows = stmt.query_map(params![rt, now, left], task_from_row)?;
        candidates.extend(rows.collect::<rusqlite::Result<Vec<_>>>()?);
    }
    let named: Vec<Task> = match &req.selection.named {
        _ if !any_heads => Vec::new(),
        None => c
            .prepare_cached(&QUEUE_HEADS)?
            .query_map(params![rt, left], task_from_row)?
            .collect::<rusqlite::Result<_>>()?,
        Some(names) if names.is_empty() => Vec::new(),
        Some(names) => {
            let list = serde_json::to_string(names).expect("strings serialize");
            c.prepare_cached(&SELECTED_QUEUE_HEADS)?
                .query_map(params![rt, left, list], task_from_row)?
                .collect::<rusqlite::Result<_>>()?
        }
    };
    candidates.extend(named);
    candidates.sort_unstable_by_key(|t| (t.priority, t.id));
    candidates.truncate(left as usize);

    // No RETURNING: it would collect the row in a throwaway b-tree first; the row was just read.
    let mut take = c.prepare_cached(
        "UPDATE tasks SET state = 'running', attempts = attempts + 1, started_at = ?2, dispatcher_id = ?3,
                          token = ?4, cancel = 0
          WHERE id = ?1 AND state = 'new'",
    )?;
    for mut task in candidates {
        let token = fastrand::i64(1..i64::MAX);
        if take.execute(params![task.id, now, req.dispatcher, token])? == 1 {
            task.state = State::Running;
            task.attempts += 1;
            task.started_at = Some(now);
            task.dispatcher_id = Some(req.dispatcher);
            task.cancel_requested = false;
            out.push(ClaimedRow::Run { task, token });
        }
    }
    Ok((out, due))
}

fn settle(c: &Connection, s: &SettleReq, now: i64, policy: &RetryPolicy) -> Result<Result<Settled>> {
    // The common case in one statement: a success with no cancel pending.
    if let (Settle::Outcome(Outcome::Success(json)), None) = (&s.settle, &s.progress) {
        let done = c
            .prepare_cached(
                "UPDATE tasks SET state = 'successful', result = ?3, error = NULL, finished_at = ?4
                  WHERE id = ?1 AND token = ?2 AND state = 'running' AND cancel = 0",
            )?
            .execute(params![s.id, s.token, json, now])?;
        if done == 1 {
            return Ok(Ok(Settled::Successful));
        }
    }
    let row: Option<(i64, i64, i64)> = c
        .prepare_cached(
            "SELECT attempts, retries, cancel FROM tasks WHERE id = ?1 AND token = ?2 AND state = 'running'",
        )?
        .query_row(params![s.id, s.token], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((attempts, retries, cancel)) = row else {
        return Ok(Err(Error::StaleToken { task: s.id }));
    };
    let released = Outcome::Success("null".into());
    let outcome = match &s.settle {
        Settle::Outcome(o) => o,
        // A cancelled task that never started is aborted like one that did.
        Settle::Release if cancel > 0 => &released,
        Settle::Release => {
            c.prepare_cached(
                "UPDATE tasks SET state = 'new', attempts = max(attempts - 1, 0), token = NULL, cancel = 0 WHERE id = ?1",
            )?
            .execute([s.id])?;
            return Ok(Ok(Settled::Released));
        }
    };
    let (message, perc) = match &s.progress {
        Some(p) => (p.message.clone(), p.perc),
        None => (None, None),
    };
    let failure = match outcome {
        Outcome::Failure(e) => Some(e),
        Outcome::Success(_) => None,
    };
    let history = failure.map(|e| history_entry(attempts, e));
    let (state, result, error, run_at, settled) = if cancel > 0 {
        let err = cancel_record(cancel);
        ("aborted", None, Some(err.clone()), None, Settled::Aborted(err))
    } else {
        match outcome {
            Outcome::Success(json) => ("successful", Some(json.clone()), None, None, Settled::Successful),
            Outcome::Failure(e) if attempts <= retries => {
                let delay = retry::backoff(attempts as u32, policy.base, policy.cap);
                let at = now + delay.as_micros() as i64;
                ("new", None, Some(e.clone()), Some(at), Settled::Retrying { run_at: at, error: e.clone() })
            }
            Outcome::Failure(e) => ("error", None, Some(e.clone()), None, Settled::Failed(e.clone())),
        }
    };
    c.prepare_cached(
        "UPDATE tasks SET state = ?2, result = ?3, error = ?4,
                error_history = CASE WHEN ?5 IS NULL THEN error_history
                                     ELSE json_insert(coalesce(error_history, '[]'), '$[#]', json(?5)) END,
                run_at = coalesce(?6, run_at), delayed = (?6 IS NOT NULL),
                finished_at = CASE WHEN ?6 IS NULL THEN ?7 ELSE NULL END,
                message = coalesce(?8, message), perc_finished = coalesce(?9, perc_finished), cancel = 0
          WHERE id = ?1",
    )?
    .execute(params![s.id, state, result, error.map(|e| e.to_json()), history, run_at, now, message, perc])?;
    Ok(Ok(settled))
}

/// Running tasks whose dispatcher is not alive go back to `new` (a lost run, not an attempt), or
/// to `aborted` when cancelled or lost too often. `only` limits it to one dispatcher's tasks.
fn release_lost(c: &Connection, now: i64, max_lost: u32, only: Option<i64>) -> Result<u64> {
    let lost_msg =
        ErrorRecord::new("WorkerLost", format!("worker lost more than {max_lost} times; given up")).to_json();
    let scope = match only {
        Some(_) => "dispatcher_id = ?6",
        None => {
            "(dispatcher_id IS NULL OR dispatcher_id NOT IN
                  (SELECT id FROM dispatchers WHERE boot_id = ?6 AND beat_mono + lease_ms * 1000 >= ?7))"
        }
    };
    let sql = format!(
        "UPDATE tasks SET
            lost = lost + 1, attempts = max(attempts - 1, 0), token = NULL,
            state = CASE WHEN cancel > 0 OR lost + 1 > ?2 THEN 'aborted' ELSE 'new' END,
            error = CASE WHEN cancel = 2 THEN ?4 WHEN cancel > 0 THEN ?5 WHEN lost + 1 > ?2 THEN ?3 ELSE error END,
            finished_at = CASE WHEN cancel > 0 OR lost + 1 > ?2 THEN ?1 ELSE NULL END,
            handover = CASE WHEN cancel > 0 OR lost + 1 > ?2 THEN 1 ELSE 0 END,
            delayed = 0, cancel = 0
          WHERE state = 'running' AND {scope}"
    );
    let mut stmt = c.prepare_cached(&sql)?;
    let (reset, cancelled) = (cancel_record(2).to_json(), cancel_record(1).to_json());
    let n = match only {
        Some(id) => stmt.execute(params![now, max_lost, lost_msg, reset, cancelled, id])?,
        None => {
            stmt.execute(params![now, max_lost, lost_msg, reset, cancelled, clock::boot_id(), clock::mono_micros()])?
        }
    };
    Ok(n as u64)
}

fn dispatcher_row(c: &Connection, id: Option<i64>, reg: &Registration, now: i64) -> Result<i64> {
    Ok(c.prepare_cached(
        "INSERT INTO dispatchers (id, runtime, name, host, pid, workers, queues, started_at, heartbeat_at,
                                  beat_mono, boot_id, lease_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?11) RETURNING id",
    )?
    .query_row(
        params![
            id,
            reg.runtime.as_str(),
            reg.name,
            clock::hostname(),
            std::process::id(),
            reg.workers as i64,
            reg.queues,
            now,
            clock::mono_micros(),
            clock::boot_id(),
            reg.lease.as_millis() as i64
        ],
        |r| r.get(0),
    )?)
}

pub(super) struct SqliteStore {
    config: Config,
    /// The Db of this process. After fork the inherited one is abandoned (never closed: that
    /// would drop the parent's locks) and the file is opened again.
    db: ProcessLocal<Db>,
}

impl SqliteStore {
    pub fn open(config: &Config) -> Result<SqliteStore> {
        Ok(SqliteStore { config: config.clone(), db: ProcessLocal::new(Db::get(config)?) })
    }

    fn db(&self) -> Result<Arc<Db>> {
        self.db.get(|| Db::get(&self.config))
    }

    fn write<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        self.db()?.write(f)
    }

    fn read<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        self.db()?.read(f)
    }
}

impl Backend for SqliteStore {
    fn hub(&self) -> Arc<Hub> {
        match self.db() {
            Ok(db) => db.hub.clone(),
            Err(_) => Arc::new(Hub::default()),
        }
    }

    fn describe(&self) -> String {
        format!("sqlite://{}", self.config.path.display())
    }

    fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Enqueued>> {
        let now = clock::now_micros();
        let alone = tasks.len() == 1;
        self.write(|c| tasks.iter().map(|t| enqueue_one(c, t, now, alone)).collect())
    }

    fn add_dependencies(&self, task: TaskId, deps: &[TaskId]) -> Result<()> {
        self.write(|c| {
            let row: Option<(String, i64, i64)> = c
                .prepare_cached("SELECT state, attempts, lost FROM tasks WHERE id = ?1")?
                .query_row([task], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((state, attempts, lost)) = row else { return Err(Error::NotFound(task)) };
            let state: State = state.parse()?;
            if state != State::New || attempts > 0 || lost > 0 {
                return Err(Error::InvalidState {
                    task,
                    state: if state == State::New { State::Running } else { state },
                    action: "add a dependency to",
                });
            }
            for &dep in deps {
                if !exists(c, dep)? {
                    return Err(Error::MissingDependency { task: Some(task), dependency: dep });
                }
                if dep == task || depends_transitively(c, dep, task)? {
                    return Err(Error::DependencyCycle { task, dependency: dep });
                }
            }
            insert_deps(c, task, deps)
        })
    }

    fn cancel(&self, id: TaskId) -> Result<State> {
        let now = clock::now_micros();
        let db = self.db()?;
        let state = db.write(|c| {
            let state: Option<String> =
                c.prepare_cached("SELECT state FROM tasks WHERE id = ?1")?.query_row([id], |r| r.get(0)).optional()?;
            let state: State = state.ok_or(Error::NotFound(id))?.parse()?;
            match state {
                State::New => {
                    c.prepare_cached(
                        "UPDATE tasks SET state = 'aborted', error = ?2, finished_at = ?3, handover = 1 WHERE id = ?1",
                    )?
                    .execute(params![id, cancel_record(1).to_json(), now])?;
                    Ok(State::Aborted)
                }
                State::Running => {
                    c.prepare_cached("UPDATE tasks SET cancel = 1 WHERE id = ?1 AND cancel = 0")?.execute([id])?;
                    Ok(State::Running)
                }
                finished => Ok(finished),
            }
        })?;
        if state == State::Running {
            db.hub.raise(id, CancelReason::Cancelled);
        }
        Ok(state)
    }

    fn reset(&self) -> Result<u64> {
        let now = clock::now_micros();
        let db = self.db()?;
        let (aborted, running) = db.write(|c| {
            let aborted = c
                .prepare_cached("UPDATE tasks SET state = 'aborted', error = ?1, finished_at = ?2, handover = 1 WHERE state = 'new'")?
                .execute(params![cancel_record(2).to_json(), now])?;
            let running: Vec<TaskId> = c
                .prepare_cached("UPDATE tasks SET cancel = 2 WHERE state = 'running' AND cancel = 0 RETURNING id")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok((aborted as u64, running))
        })?;
        for &id in &running {
            db.hub.raise(id, CancelReason::Reset);
        }
        Ok(aborted + running.len() as u64)
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        if queue.is_empty() {
            return Err(Error::invalid("queue", "a queue name must not be empty"));
        }
        self.write(|c| {
            c.prepare_cached("INSERT INTO queues (name, paused) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET paused = excluded.paused")?
                .execute(params![queue, paused])?;
            Ok(())
        })
    }

    fn purge(&self, successful_before: i64, failed_before: i64) -> Result<u64> {
        // Walks the table by id ranges (no index on finish times: it would cost every outcome a
        // page write), each range its own short write transaction.
        const SPAN: i64 = 5_000;
        let (lo, hi): (Option<i64>, Option<i64>) =
            self.read(|c| Ok(c.query_row("SELECT min(id), max(id) FROM tasks", [], |r| Ok((r.get(0)?, r.get(1)?)))?))?;
        let (Some(mut lo), Some(hi)) = (lo, hi) else { return Ok(0) };
        let mut total = 0;
        while lo <= hi {
            total += self.write(|c| {
                Ok(c.prepare_cached(
                    "DELETE FROM tasks WHERE id IN (
                       SELECT t.id FROM tasks t
                        WHERE t.id >= ?3 AND t.id < ?4 AND t.state IN ('successful', 'error', 'aborted')
                          AND t.finished_at < CASE WHEN t.state = 'successful' THEN ?1 ELSE ?2 END
                          AND t.handover = 0
                          AND NOT EXISTS (SELECT 1 FROM task_deps d JOIN tasks u ON u.id = d.task_id
                                           WHERE d.depends_on = t.id AND u.state IN ('new', 'running')))",
                )?
                .execute(params![successful_before, failed_before, lo, lo + SPAN])? as u64)
            })?;
            lo += SPAN;
        }
        Ok(total)
    }

    fn task(&self, id: TaskId) -> Result<Task> {
        self.read(|c| {
            let mut task = c
                .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))?
                .query_row([id], task_from_row)
                .optional()?
                .ok_or(Error::NotFound(id))?;
            task.depends_on = c
                .prepare_cached("SELECT depends_on FROM task_deps WHERE task_id = ?1 ORDER BY depends_on")?
                .query_map([id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(task)
        })
    }

    fn list(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let mut sql = format!("SELECT {TASK_COLS} FROM tasks WHERE 1");
        let mut args: Vec<Value> = Vec::new();
        if !f.states.is_empty() {
            let list: Vec<&str> = f.states.iter().map(|s| s.as_str()).collect();
            args.push(Value::Text(serde_json::to_string(&list).expect("strings serialize")));
            sql += &format!(" AND state IN (SELECT value FROM json_each(?{}))", args.len());
        }
        match &f.queue {
            Some(Some(q)) => {
                args.push(Value::Text(q.clone()));
                sql += &format!(" AND queue = ?{}", args.len());
            }
            Some(None) => sql += " AND queue IS NULL",
            None => {}
        }
        if let Some(rt) = f.runtime {
            args.push(Value::Text(rt.as_str().into()));
            sql += &format!(" AND runtime = ?{}", args.len());
        }
        for (key, value) in &f.meta {
            check_json("meta filter value", value)?;
            args.push(Value::Text(format!("$.\"{}\"", key.replace('"', "\\\""))));
            args.push(Value::Text(value.clone()));
            sql += &format!(" AND json_extract(meta, ?{}) IS json_extract(?{}, '$')", args.len() - 1, args.len());
        }
        sql += if f.descending { " ORDER BY id DESC" } else { " ORDER BY id" };
        sql += &format!(" LIMIT {} OFFSET {}", f.limit.map_or(-1, i64::from), f.offset.unwrap_or(0));
        self.read(|c| {
            let params: Vec<&dyn ToSql> = args.iter().map(|v| v as &dyn ToSql).collect();
            Ok(c.prepare(&sql)?.query_map(params.as_slice(), task_from_row)?.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn counts(&self) -> Result<Vec<QueueCounts>> {
        let now = clock::now_micros();
        self.read(|c| {
            let mut by_queue: HashMap<Option<String>, QueueCounts> = HashMap::new();
            let mut stmt = c.prepare_cached(
                "SELECT queue, state, count(*),
                        sum(state = 'new' AND (pending_deps > 0 OR failed_dep IS NOT NULL OR delayed = 1 OR run_at > ?1))
                   FROM tasks GROUP BY queue, state",
            )?;
            let rows = stmt.query_map([now], |r| {
                Ok((r.get::<_, Option<String>>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?))
            })?;
            for row in rows {
                let (queue, state, n, waiting) = row?;
                let e = by_queue.entry(queue.clone()).or_insert_with(|| QueueCounts { queue, ..Default::default() });
                let n = n as u64;
                match state.parse::<State>()? {
                    State::New => {
                        e.new = n;
                        e.waiting = waiting as u64;
                    }
                    State::Running => e.running = n,
                    State::Successful => e.successful = n,
                    State::Error => e.error = n,
                    State::Aborted => e.aborted = n,
                }
            }
            let mut stmt = c.prepare_cached("SELECT name, paused FROM queues")?;
            for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))? {
                let (name, paused) = row?;
                if paused || by_queue.contains_key(&Some(name.clone())) {
                    let e = by_queue.entry(Some(name.clone())).or_insert_with(|| QueueCounts { queue: Some(name), ..Default::default() });
                    e.paused = paused;
                }
            }
            let mut out: Vec<QueueCounts> = by_queue.into_values().collect();
            out.sort_by(|a, b| a.queue.cmp(&b.queue));
            Ok(out)
        })
    }

    fn dispatchers(&self) -> Result<Vec<DispatcherInfo>> {
        let mono = clock::mono_micros();
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT d.id, d.runtime, d.name, d.host, d.pid, d.workers, d.queues, d.started_at, d.heartbeat_at,
                        d.boot_id = ?1 AND d.beat_mono + d.lease_ms * 1000 >= ?2,
                        (SELECT count(*) FROM tasks t WHERE t.state = 'running' AND t.dispatcher_id = d.id)
                   FROM dispatchers d ORDER BY d.id",
            )?;
            let rows = stmt.query_map(params![clock::boot_id(), mono], |r| {
                let runtime: String = r.get(1)?;
                Ok(DispatcherInfo {
                    id: r.get(0)?,
                    runtime: runtime.parse().map_err(conversion)?,
                    name: r.get(2)?,
                    host: r.get(3)?,
                    pid: r.get(4)?,
                    workers: r.get(5)?,
                    queues: r.get(6)?,
                    started_at: r.get(7)?,
                    heartbeat_at: r.get(8)?,
                    alive: r.get(9)?,
                    running: r.get::<_, i64>(10)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
    }

    fn register(&self, reg: &Registration) -> Result<i64> {
        let now = clock::now_micros();
        self.write(|c| dispatcher_row(c, None, reg, now))
    }

    fn heartbeat(&self, id: i64, reg: &Registration) -> Result<Beat> {
        let now = clock::now_micros();
        self.write(|c| {
            let n = c
                .prepare_cached("UPDATE dispatchers SET heartbeat_at = ?2, beat_mono = ?3, boot_id = ?4 WHERE id = ?1")?
                .execute(params![id, now, clock::mono_micros(), clock::boot_id()])?;
            // Declared dead while it could not heartbeat: its runs were recovered (their tokens
            // are stale now); it comes back under the same id.
            if n == 0 {
                dispatcher_row(c, Some(id), reg, now)?;
            }
            let cancels = c
                .prepare_cached(
                    "SELECT id, cancel FROM tasks WHERE state = 'running' AND dispatcher_id = ?1 AND cancel > 0",
                )?
                .query_map([id], |r| {
                    let code: i64 = r.get(1)?;
                    Ok((r.get(0)?, if code == 2 { CancelReason::Reset } else { CancelReason::Cancelled }))
                })?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Beat { cancels })
        })
    }

    fn recover(&self, max_lost: u32) -> Result<u64> {
        let now = clock::now_micros();
        let mono = clock::mono_micros();
        let db = self.db()?;
        let n = db.write(|c| {
            let n = release_lost(c, now, max_lost, None)?;
            c.prepare_cached("DELETE FROM dispatchers WHERE boot_id <> ?1 OR beat_mono + lease_ms * 1000 < ?2")?
                .execute(params![clock::boot_id(), mono])?;
            Ok(n)
        })?;
        Ok(n)
    }

    fn deregister(&self, id: i64, max_lost: u32) -> Result<u64> {
        let now = clock::now_micros();
        self.write(|c| {
            let n = release_lost(c, now, max_lost, Some(id))?;
            c.prepare_cached("DELETE FROM dispatchers WHERE id = ?1")?.execute([id])?;
            Ok(n)
        })
    }

    fn cycle(
        &self,
        settles: &[SettleReq],
        progress: &[ProgressReq],
        claim_req: Option<ClaimReq<'_>>,
        retry: &RetryPolicy,
    ) -> Result<CycleOut> {
        let now = clock::now_micros();
        self.write(|c| {
            let settled = settles.iter().map(|s| settle(c, s, now, retry)).collect::<Result<Vec<_>>>()?;
            let mut write_progress = c.prepare_cached(
                "UPDATE tasks SET message = coalesce(?3, message), perc_finished = coalesce(?4, perc_finished)
                  WHERE id = ?1 AND token = ?2 AND state = 'running'",
            )?;
            for p in progress {
                write_progress.execute(params![p.id, p.token, p.progress.message, p.progress.perc])?;
            }
            let (claimed, next_due) = match &claim_req {
                Some(req) if req.want > 0 => claim(c, req, now)?,
                _ => (Vec::new(), next_due(c)?),
            };
            Ok(CycleOut { settled, claimed, next_due })
        })
    }

    fn begin_batch(&self) -> Result<()> {
        self.db()?.begin_batch()
    }

    fn end_batch(&self, commit: bool) -> Result<()> {
        self.db()?.end_batch(commit)
    }
}
