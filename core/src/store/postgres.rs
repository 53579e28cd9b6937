//! The PostgreSQL store: the same transitions as the SQLite store, for dispatchers on many hosts
//! sharing one database. Runs on the caller's thread (enqueue, admin) or a dispatcher's writer
//! thread (cycle); one listener thread per process turns other connections' NOTIFYs into Hub
//! wake-ups. Guarantees: every transition is one transaction; claims lock rows with SKIP LOCKED
//! (parallel tasks) or lock the queue row (named queues) and re-check the head under that lock,
//! and the schema's unique index refuses a second running task of a queue whatever the caller
//! does; lease times come from the database clock; lost connections are reopened with backoff.
//!
//! Wake-ups: a NOTIFY in every commit would serialise all commits (PostgreSQL takes a global lock
//! for notifying transactions), so writers notify only while some other connection waits idle.
//! An idle waiter holds one of `WAKE_SLOTS` advisory locks exclusively; writers try to take the
//! others shared (`@.wake`), and notify when one is held. A waiter that arrives while a writer
//! holds the slots shared blocks until that commit is visible, then looks for work: no wake-up is
//! ever lost between "nothing to do" and "waiting".
//!
//! Connections: a pool per process and database (`pg_pool`: at most `POOL_SIZE`, opened on
//! demand, never tested on checkout: a lost connection fails the transaction, which is retried
//! on another).
//! Each keeps its own prepared statements. A forked child never uses or drops its parent's pool:
//! it opens its own, and the inherited one is leaked (closing it would close the parent's sockets).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crate::sync::Mutex;
use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Row, Statement};

use super::combine::Combiner;
use super::pg_pool::{self, Connector, Pool};
use super::postgres_schema::{self as schema, qualify, WAKE_SLOTS};
use super::process_local::{OwnedByProcess, ProcessLocal};
use super::sqlite::{cancel_record, check_json, history_entry, validate};
use super::{
    Backend, Beat, ClaimReq, ClaimedRow, Config, CycleOut, ProgressReq, Registration, RetryPolicy, Settle, SettleReq,
};
use crate::clock;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::retry;
use crate::task::{
    CancelReason, DispatcherInfo, Enqueued, ErrorRecord, NewTask, Outcome, QueueCounts, Settled, State, Task,
    TaskFilter, TaskId,
};

/// Schema used when the URL names none.
pub const DEFAULT_SCHEMA: &str = "queue_dispatcher";

/// How long an operation keeps retrying a lost connection before it reports the error.
const RECONNECT_FOR: Duration = Duration::from_secs(20);

/// Where a PostgreSQL store lives: the connection URL (without our own options) and the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// Connection URL as given, minus the `schema` option.
    pub url: String,
    pub schema: String,
}

impl PostgresConfig {
    /// Parses `postgres://user@host:port/db?schema=name&...`; other options go to the client
    /// (e.g. `connect_timeout`, `application_name`).
    pub fn parse(spec: &str) -> Result<PostgresConfig> {
        let bad = |why: String| Error::invalid("database", format!("{}: {why}", redact(spec)));
        let (base, query) = match spec.split_once('?') {
            Some((b, q)) => (b, q),
            None => (spec, ""),
        };
        let mut schema = DEFAULT_SCHEMA.to_string();
        let mut rest = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("schema", v)) => schema = v.to_string(),
                _ => rest.push(pair),
            }
        }
        if schema.is_empty() || schema.len() > 63 || schema.chars().any(|c| c.is_control()) {
            return Err(bad(format!("schema {schema:?} must be 1 to 63 printable characters")));
        }
        let url = if rest.is_empty() { base.to_string() } else { format!("{base}?{}", rest.join("&")) };
        let parsed = postgres::Config::from_str(&url).map_err(|e| bad(format!("not a valid PostgreSQL URL ({e})")))?;
        if parsed.get_dbname().is_none() {
            return Err(bad("the URL names no database (postgres://user@host:port/DATABASE)".into()));
        }
        Ok(PostgresConfig { url, schema })
    }

    fn client_config(&self) -> Result<postgres::Config> {
        let mut c = postgres::Config::from_str(&self.url)
            .map_err(|e| Error::invalid("database", format!("{}: {e}", redact(&self.url))))?;
        if c.get_connect_timeout().is_none() {
            c.connect_timeout(Duration::from_secs(10));
        }
        if c.get_application_name().is_none() {
            c.application_name("queue_dispatcher");
        }
        Ok(c)
    }

    fn describe(&self) -> String {
        format!("{}{}schema={}", redact(&self.url), if self.url.contains('?') { "&" } else { "?" }, self.schema)
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (auth, host) = match rest.split_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// Maps a client error to the engine's error; connection failures say so.
pub(super) fn pg_error(e: &postgres::Error) -> Error {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::QUERY_CANCELED {
            return Error::Busy { message: db.to_string() };
        }
        return Error::Storage { message: format!("PostgreSQL: {} (SQLSTATE {})", db.message(), code.code()) };
    }
    Error::Storage { message: format!("PostgreSQL connection: {e}") }
}

/// Lost connections and conflicts that a retry of the whole transaction resolves.
fn retryable(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c == "40001" || c == "40P01" || c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03"
        }
        // Client-side I/O errors (connection reset, end of stream).
        None => e.as_db_error().is_none(),
    }
}

const TASK_COLS: &str = "t.id, t.queue, t.runtime, t.target, t.receiver, t.args, t.priority, t.state, t.attempts, \
    t.retries, t.lost, t.run_at, t.timeout_ms, t.unique_key, t.meta, t.result, t.error, t.error_history, t.message, \
    t.perc_finished, t.enqueued_at, t.started_at, t.finished_at, t.dispatcher_id, t.cancel";

fn task_from_row(r: &Row) -> Result<Task> {
    let runtime: String = r.get(2);
    let state: String = r.get(7);
    let error: Option<String> = r.get(16);
    let history: Option<String> = r.get(17);
    let timeout_ms: Option<i64> = r.get(12);
    Ok(Task {
        id: r.get(0),
        queue: r.get(1),
        runtime: runtime.parse()?,
        target: r.get(3),
        receiver: r.get(4),
        args: r.get(5),
        priority: r.get(6),
        state: state.parse()?,
        attempts: r.get(8),
        retries: r.get(9),
        lost: r.get(10),
        run_at: r.get(11),
        timeout: timeout_ms.filter(|&t| t > 0).map(|t| Duration::from_millis(t as u64)),
        unique_key: r.get(13),
        meta: r.get(14),
        result: r.get(15),
        error: error.as_deref().map(ErrorRecord::from_json),
        error_history: history
            .as_deref()
            .and_then(|h| serde_json::from_str::<Vec<serde_json::Value>>(h).ok())
            .map(|v| v.iter().map(|e| ErrorRecord::from_json(&e.to_string())).collect())
            .unwrap_or_default(),
        message: r.get(18),
        perc_finished: r.get(19),
        enqueued_at: r.get(20),
        started_at: r.get(21),
        finished_at: r.get(22),
        dispatcher_id: r.get(23),
        depends_on: Vec::new(),
        cancel_requested: r.get::<_, i32>(24) > 0,
    })
}

/// One connection with its prepared statements (keyed by the unqualified SQL text).
pub(super) struct Conn {
    client: Client,
    schema: String,
    stmts: HashMap<&'static str, Statement>,
    /// Its state is unknown (an error left it mid-transaction): the pool closes it.
    broken: bool,
}

/// Opens pooled connections and tells the pool which are broken.
struct Manager {
    client_cfg: postgres::Config,
    cfg: PostgresConfig,
}

impl Connector for Manager {
    type Conn = Conn;

    fn connect(&self) -> Result<Conn> {
        let client = connect(&self.client_cfg, &self.cfg)?;
        Ok(Conn { client, schema: self.cfg.schema.clone(), stmts: HashMap::new(), broken: false })
    }

    /// Connections are not tested on checkout: a lost one shows up as a retryable error of the
    /// transaction, which is retried on another.
    fn is_broken(&self, conn: &mut Conn) -> bool {
        conn.broken || conn.client.is_closed()
    }

    fn exhausted(&self, max: usize, waited: Duration) -> Error {
        Error::Storage {
            message: format!(
                "no PostgreSQL connection to {} within {} s (all {max} of this process are in use)",
                redact(&self.cfg.url),
                waited.as_secs()
            ),
        }
    }
}

/// Connections per process and database, at most (busy and idle together); a thread that finds
/// all busy waits for one.
const POOL_SIZE: usize = 32;

type Pooled = pg_pool::Pooled<Manager>;

/// Hands a connection back to the pool for closing rather than reuse.
fn discard(mut conn: Pooled) {
    conn.broken = true;
}

type PgResult<T> = std::result::Result<T, postgres::Error>;

impl Conn {
    fn stmt(&mut self, sql: &'static str) -> PgResult<Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&qualify(sql, &self.schema))?;
        self.stmts.insert(sql, s.clone());
        Ok(s)
    }

    fn query(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Vec<Row>> {
        let s = self.stmt(sql)?;
        self.client.query(&s, params)
    }

    fn opt(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Option<Row>> {
        let s = self.stmt(sql)?;
        self.client.query_opt(&s, params)
    }

    fn one(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<Row> {
        let s = self.stmt(sql)?;
        self.client.query_one(&s, params)
    }

    fn exec(&mut self, sql: &'static str, params: &[&(dyn ToSql + Sync)]) -> PgResult<u64> {
        let s = self.stmt(sql)?;
        self.client.execute(&s, params)
    }
}

/// An error inside a transaction body: a client error (maybe retryable) or an engine verdict.
enum TxError {
    Pg(postgres::Error),
    Engine(Error),
}

impl From<postgres::Error> for TxError {
    fn from(e: postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Engine(e)
    }
}

type TxResult<T> = std::result::Result<T, TxError>;

impl From<TxError> for Error {
    fn from(e: TxError) -> Error {
        match e {
            TxError::Pg(e) => pg_error(&e),
            TxError::Engine(e) => e,
        }
    }
}

struct BatchConn {
    conn: Pooled,
    depth: u32,
}

/// Everything one process shares for one database and schema.
impl OwnedByProcess for Shared {
    fn pid(&self) -> u32 {
        self.pid
    }
}

struct Shared {
    pid: u32,
    cfg: PostgresConfig,
    client_cfg: postgres::Config,
    channel: String,
    lock_key: i32,
    /// Not shared with a forked child: a child builds its own Shared and leaks the inherited one
    /// (PgStore::s), so it never closes its parent's connections.
    pool: Pool<Manager>,
    batches: Mutex<HashMap<ThreadId, BatchConn>>,
    /// Entries in `batches`: at 0 (the common case) no store call takes that lock.
    open_batches: AtomicUsize,
    hub: Arc<Hub>,
    /// The wake slot this process's listener holds (-1: none); our own writers skip it.
    own_slot: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    listener: Mutex<Option<JoinHandle<()>>>,
    /// Tokens of claims whose commit outcome is unknown (connection lost during COMMIT): any such
    /// task still running under its token is handed back at the next cycle.
    in_doubt: Mutex<Vec<i64>>,
    /// Plain single-task enqueues of this process's threads, combined (see `enqueue_plain`).
    enqueues: Combiner<NewTask, Result<TaskId>>,
}

type Registry = Vec<(u32, PostgresConfig, Weak<Shared>)>;
static REGISTRY: std::sync::Mutex<Registry> = std::sync::Mutex::new(Vec::new());

fn connect(cfg: &postgres::Config, pc: &PostgresConfig) -> Result<Client> {
    cfg.connect(NoTls).map_err(|e| match e.as_db_error() {
        Some(db) => Error::Storage {
            message: format!(
                "cannot open PostgreSQL database {}: {} (SQLSTATE {})",
                redact(&pc.url),
                db.message(),
                db.code().code()
            ),
        },
        None => Error::Storage { message: format!("cannot connect to PostgreSQL at {}: {e}", redact(&pc.url)) },
    })
}

impl Shared {
    fn get(cfg: &PostgresConfig) -> Result<Arc<Shared>> {
        let pid = std::process::id();
        let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
        reg.retain(|(p, _, w)| *p == pid && w.strong_count() > 0);
        if let Some(s) = reg.iter().find(|(_, c, _)| c == cfg).and_then(|(_, _, w)| w.upgrade()) {
            return Ok(s);
        }
        let s = Shared::open(cfg)?;
        reg.push((pid, cfg.clone(), Arc::downgrade(&s)));
        Ok(s)
    }

    fn open(cfg: &PostgresConfig) -> Result<Arc<Shared>> {
        let client_cfg = cfg.client_config()?;
        let channel = format!("qd_{}", cfg.schema);
        let mut client = connect(&client_cfg, cfg)?;
        schema::migrate(&mut client, &cfg.schema, &channel, &cfg.describe())?;
        drop(client);
        let manager = Manager { client_cfg: client_cfg.clone(), cfg: cfg.clone() };
        let pool = Pool::new(manager, POOL_SIZE, Duration::from_secs(60), Duration::from_secs(5));
        let shared = Arc::new(Shared {
            pid: std::process::id(),
            cfg: cfg.clone(),
            client_cfg,
            channel,
            lock_key: schema::lock_key(&cfg.schema),
            pool,
            batches: Mutex::new(HashMap::new()),
            open_batches: AtomicUsize::new(0),
            hub: Arc::new(Hub::default()),
            own_slot: Arc::new(AtomicI32::new(-1)),
            stop: Arc::new(AtomicBool::new(false)),
            listener: Mutex::new(None),
            in_doubt: Mutex::new(Vec::new()),
            enqueues: Combiner::default(),
        });
        let handle = spawn_listener(&shared)?;
        *shared.listener.lock() = Some(handle);
        Ok(shared)
    }

    /// A pooled connection: an idle one, else a new one, else the next one handed back. Dropping
    /// it hands it back.
    fn checkout(&self) -> Result<Pooled> {
        self.pool.get()
    }

    fn own(&self) -> i32 {
        self.own_slot.load(Ordering::Acquire)
    }

    /// Runs `f` in a transaction (a savepoint inside this thread's open batch). Lost connections
    /// and deadlocks before COMMIT are retried with backoff; a failure of COMMIT itself is
    /// reported (its outcome is unknown). `wake`: notify idle waiters of other connections.
    fn tx<R>(&self, wake: bool, mut f: impl FnMut(&mut Conn) -> TxResult<R>) -> Result<R> {
        if let Some(r) = self.in_batch(&mut f) {
            return r;
        }
        let mut retry = Retry::new();
        loop {
            let mut conn = self.checkout_retrying(&mut retry)?;
            let body = (|| -> TxResult<R> {
                conn.client.batch_execute("BEGIN")?;
                let r = f(&mut conn)?;
                if wake {
                    let own = self.own();
                    conn.exec("SELECT @.wake($1)", &[&own])?;
                }
                Ok(r)
            })();
            match body {
                Ok(r) => {
                    return match conn.client.batch_execute("COMMIT") {
                        Ok(()) => {
                            if wake {
                                self.hub.notify();
                            }
                            Ok(r)
                        }
                        Err(e) => {
                            discard(conn);
                            Err(pg_error(&e))
                        }
                    }
                }
                Err(err) => {
                    if conn.client.is_closed() || conn.client.batch_execute("ROLLBACK").is_err() {
                        discard(conn);
                    }
                    match err {
                        TxError::Pg(e) if retry.after(&e) => {}
                        err => return Err(err.into()),
                    }
                }
            }
        }
    }

    /// Runs `f` on this thread's open batch; `None` when it has none. Only the owning thread
    /// uses an entry, and it is taken out of the map while `f` runs (put back even if `f`
    /// panics): holding the map's lock across a statement let a batch blocked on a row another
    /// thread's batch held keep that batch from ever committing, and stalled every store call.
    fn with_batch<R>(&self, f: impl FnOnce(&mut BatchConn) -> R) -> Option<R> {
        if self.open_batches.load(Ordering::Acquire) == 0 {
            return None;
        }
        struct Taken<'a> {
            batches: &'a Mutex<HashMap<ThreadId, BatchConn>>,
            me: ThreadId,
            batch: Option<BatchConn>,
        }
        impl Drop for Taken<'_> {
            fn drop(&mut self) {
                if let Some(b) = self.batch.take() {
                    self.batches.lock().insert(self.me, b);
                }
            }
        }
        let me = std::thread::current().id();
        let batch = self.batches.lock().remove(&me)?;
        let mut taken = Taken { batches: &self.batches, me, batch: Some(batch) };
        Some(f(taken.batch.as_mut().expect("taken above")))
    }

    fn has_batch(&self) -> bool {
        self.open_batches.load(Ordering::Acquire) > 0 && self.batches.lock().contains_key(&std::thread::current().id())
    }

    /// Inside this thread's batch: `f` under a savepoint. `None` when no batch is open here.
    fn in_batch<R>(&self, f: &mut impl FnMut(&mut Conn) -> TxResult<R>) -> Option<Result<R>> {
        self.with_batch(|b| {
            let conn = &mut b.conn;
            let run = (|| -> TxResult<R> {
                conn.client.batch_execute("SAVEPOINT op")?;
                let r = f(conn)?;
                conn.client.batch_execute("RELEASE op")?;
                Ok(r)
            })();
            run.map_err(|e| {
                let _ = conn.client.batch_execute("ROLLBACK TO op; RELEASE op");
                Error::from(e)
            })
        })
    }

    /// A read outside any transaction (on the batch connection while this thread holds one).
    fn read<R>(&self, mut f: impl FnMut(&mut Conn) -> TxResult<R>) -> Result<R> {
        if let Some(r) = self.with_batch(|b| f(&mut b.conn).map_err(Error::from)) {
            return r;
        }
        let mut retry = Retry::new();
        loop {
            let mut conn = self.checkout_retrying(&mut retry)?;
            match f(&mut conn) {
                Ok(r) => return Ok(r),
                Err(TxError::Pg(e)) if retry.after(&e) => discard(conn),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A pooled connection; while none can be had, retried as `retry` allows.
    fn checkout_retrying(&self, retry: &mut Retry) -> Result<Pooled> {
        loop {
            match self.checkout() {
                Err(_) if retry.again() => {}
                got => return got,
            }
        }
    }
}

/// One operation's tries against lost connections and conflicts: backoff between them, for
/// at most `RECONNECT_FOR`.
struct Retry {
    started: Instant,
    attempt: u32,
}

impl Retry {
    fn new() -> Retry {
        Retry { started: Instant::now(), attempt: 0 }
    }

    /// Backs off and returns true while there is time for another try.
    fn again(&mut self) -> bool {
        if self.started.elapsed() >= RECONNECT_FOR {
            return false;
        }
        backoff(&mut self.attempt);
        true
    }

    /// Whether `e` is worth another try (backing off first if so).
    fn after(&mut self, e: &postgres::Error) -> bool {
        retryable(e) && self.again()
    }
}

fn backoff(attempt: &mut u32) {
    let ms = (10u64 << (*attempt).min(7)).min(1000);
    *attempt += 1;
    std::thread::sleep(Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2)));
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.listener.lock().take() {
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// The listener: LISTENs on the schema's channel; while local waiters are interested it holds a
/// wake slot (see the module doc) and turns notifications into Hub wake-ups. Reconnects with
/// backoff when its connection is lost.
fn spawn_listener(shared: &Arc<Shared>) -> Result<JoinHandle<()>> {
    let listener = Listener {
        cfg: shared.client_cfg.clone(),
        pc: shared.cfg.clone(),
        channel: shared.channel.clone(),
        key: shared.lock_key,
        hub: shared.hub.clone(),
        own: shared.own_slot.clone(),
        stop: shared.stop.clone(),
        pool: shared.pool.clone(),
    };
    let handle = std::thread::Builder::new().name("qd-pg-listen".into()).spawn(move || {
        let mut attempt = 0u32;
        while !listener.stop.load(Ordering::Acquire) {
            let ok = listener.session();
            listener.own.store(-1, Ordering::Release);
            if listener.stop.load(Ordering::Acquire) {
                return;
            }
            // Whatever happened while the connection was down: let every waiter look again.
            listener.hub.notify();
            if ok {
                attempt = 0;
            }
            backoff(&mut attempt);
        }
    })?;
    Ok(handle)
}

/// What the listener thread works with (none of it keeps the Shared alive).
struct Listener {
    cfg: postgres::Config,
    pc: PostgresConfig,
    channel: String,
    key: i32,
    hub: Arc<Hub>,
    own: Arc<AtomicI32>,
    stop: Arc<AtomicBool>,
    /// Its idle connections are closed here once they have idled too long.
    pool: Pool<Manager>,
}

impl Listener {
    /// One listener connection's life. Returns whether it got as far as listening.
    fn session(&self) -> bool {
        let Listener { cfg, pc, channel, key, hub, own, stop, pool } = self;
        let key = *key;
        let Ok(mut client) = connect(cfg, pc) else { return false };
        let listen = format!("LISTEN {}; SET lock_timeout = '100ms'", schema::ident(channel));
        if client.batch_execute(&listen).is_err() {
            return false;
        }
        let first = (std::process::id() as i32).rem_euclid(WAKE_SLOTS);
        let linger = Duration::from_millis(200);
        let mut held: Option<i32> = None;
        let mut last_interest = Instant::now();
        let mut next_try = Instant::now();
        let mut last_reap = Instant::now();
        while !stop.load(Ordering::Acquire) {
            if last_reap.elapsed() > Duration::from_secs(1) {
                pool.reap();
                last_reap = Instant::now();
            }
            let interested = hub.interested();
            if interested {
                last_interest = Instant::now();
            }
            match held {
                None if interested && Instant::now() >= next_try => {
                    for i in 0..WAKE_SLOTS {
                        let k = (first + i) % WAKE_SLOTS;
                        match client.execute("SELECT pg_advisory_lock($1, $2)", &[&key, &k]) {
                            Ok(_) => {
                                held = Some(k);
                                own.store(k, Ordering::Release);
                                break;
                            }
                            Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => continue,
                            Err(_) => return true,
                        }
                    }
                    // Commits made before the slot was held may have notified no one: look once.
                    hub.notify();
                    if held.is_none() {
                        // Every slot taken by other idle processes: fall back to polling.
                        next_try = Instant::now() + Duration::from_millis(50);
                    }
                }
                Some(k) if !interested && last_interest.elapsed() > linger => {
                    own.store(-1, Ordering::Release);
                    if client.execute("SELECT pg_advisory_unlock($1, $2)", &[&key, &k]).is_err() {
                        return true;
                    }
                    held = None;
                }
                None if !interested => {
                    hub.wait_for_interest(Duration::from_millis(100));
                }
                _ => {}
            }
            let wait = Duration::from_millis(if held.is_some() || interested { 50 } else { 1 });
            {
                let mut notes = client.notifications();
                let first = notes.timeout_iter(wait).next();
                match first {
                    Ok(Some(_)) => hub.notify(),
                    Ok(None) => {}
                    Err(_) => return true,
                }
                // Coalesce whatever else is already buffered.
                while let Ok(Some(_)) = notes.iter().next() {}
            }
            if client.is_closed() {
                return true;
            }
        }
        true
    }
}

pub(super) struct PgStore {
    config: PostgresConfig,
    /// The Shared of this process. In a forked child the inherited connections are leaked on
    /// purpose (never closed) and new ones are opened.
    shared: ProcessLocal<Shared>,
}

impl PgStore {
    pub fn open(config: &Config) -> Result<PgStore> {
        let pc = config.postgres.clone().ok_or_else(|| Error::invalid("database", "not a PostgreSQL URL"))?;
        let shared = ProcessLocal::new(Shared::get(&pc)?);
        Ok(PgStore { config: pc, shared })
    }

    fn s(&self) -> Result<Arc<Shared>> {
        self.shared.get(|| Shared::get(&self.config))
    }

    fn write<R>(&self, wake: bool, f: impl FnMut(&mut Conn) -> TxResult<R>) -> Result<R> {
        self.s()?.tx(wake, f)
    }

    fn read<R>(&self, f: impl FnMut(&mut Conn) -> TxResult<R>) -> Result<R> {
        self.s()?.read(f)
    }
}

fn exists(c: &mut Conn, id: TaskId) -> PgResult<bool> {
    Ok(c.one("SELECT EXISTS (SELECT 1 FROM @.tasks WHERE id = $1)", &[&id])?.get(0))
}

fn insert_deps(c: &mut Conn, task: TaskId, deps: &[TaskId]) -> PgResult<()> {
    if deps.is_empty() {
        return Ok(());
    }
    // Sorted: concurrent writers lock dependency rows in one order (no deadlocks between them).
    let mut deps = deps.to_vec();
    deps.sort_unstable();
    deps.dedup();
    c.exec(
        "INSERT INTO @.task_deps (task_id, depends_on) SELECT $1, d FROM unnest($2::bigint[]) AS d
         ON CONFLICT DO NOTHING",
        &[&task, &deps],
    )?;
    Ok(())
}

const INSERT_PLAIN: &str = "INSERT INTO @.tasks (queue, runtime, target, receiver, args, priority, retries, run_at,
                          timeout_ms, unique_key, meta, token)
     VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, @.now_us()), $9, $10, $11, $12) RETURNING id";

/// A unique_key an unfinished task holds makes this insert nothing (the partial unique index).
const INSERT_UNIQUE: &str = "INSERT INTO @.tasks (queue, runtime, target, receiver, args, priority, retries, run_at,
                          timeout_ms, unique_key, meta, token)
     VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, @.now_us()), $9, $10, $11, $12)
     ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND state IN ('new', 'running') DO NOTHING
     RETURNING id";

struct InsertArgs {
    runtime: &'static str,
    retries: i64,
    timeout_ms: Option<i64>,
    token: i64,
}

impl InsertArgs {
    fn of(t: &NewTask) -> InsertArgs {
        InsertArgs {
            runtime: t.runtime.as_str(),
            retries: i64::from(t.retries),
            timeout_ms: t.timeout.map(|d| d.as_millis().max(1) as i64),
            // Marks the row until its first claim, so an enqueue whose commit reply was lost can
            // tell whether it was stored.
            token: fastrand::i64(1..i64::MAX),
        }
    }

    /// $1..$12 of the INSERT statements: queue, runtime, target, receiver, args, priority,
    /// retries, run_at, timeout_ms, unique_key, meta, token.
    fn params<'a>(&'a self, t: &'a NewTask) -> [&'a (dyn ToSql + Sync); 12] {
        [
            &t.queue,
            &self.runtime,
            &t.target,
            &t.receiver,
            &t.args,
            &t.priority,
            &self.retries,
            &t.run_at,
            &self.timeout_ms,
            &t.unique_key,
            &t.meta,
            &self.token,
        ]
    }
}

fn enqueue_one(c: &mut Conn, t: &NewTask) -> TxResult<Enqueued> {
    validate(t)?;
    for &dep in &t.depends_on {
        if !exists(c, dep)? {
            return Err(Error::MissingDependency { task: None, dependency: dep }.into());
        }
    }
    let a = InsertArgs::of(t);
    loop {
        let params = a.params(t);
        let id: Option<TaskId> = if t.unique_key.is_some() {
            c.opt(INSERT_UNIQUE, &params)?.map(|r| r.get(0))
        } else {
            Some(c.one(INSERT_PLAIN, &params)?.get(0))
        };
        if let Some(id) = id {
            insert_deps(c, id, &t.depends_on)?;
            return Ok(Enqueued { id, existing: false });
        }
        let held =
            c.opt("SELECT id FROM @.tasks WHERE unique_key = $1 AND state IN ('new', 'running')", &[&t.unique_key])?;
        if let Some(r) = held {
            return Ok(Enqueued { id: r.get(0), existing: true });
        }
        // The holder finished between the two statements: try again.
    }
}

fn dependency_failure(dep: TaskId, row: Option<(String, String, Option<String>)>) -> ErrorRecord {
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
    ErrorRecord::new("DependencyFailed", message)
}

const HANDOVERS: &str = "SELECT t.id, t.failed_dep, t.state, d.id, d.state, d.target, d.error
       FROM @.tasks t LEFT JOIN @.tasks d ON d.id = t.failed_dep
      WHERE t.runtime = $1 AND ((t.state = 'new' AND t.failed_dep IS NOT NULL) OR t.handover = 1)
      ORDER BY t.id LIMIT $2 FOR UPDATE OF t SKIP LOCKED";

/// Candidates, locked: ready parallel tasks (row locks, SKIP LOCKED) and the heads of free named
/// queues (queue row locks, SKIP LOCKED, so one claimer at a time decides a queue's next task).
const CANDIDATES: &str = "WITH p AS (
       SELECT priority, id, NULL::text AS queue FROM @.tasks
        WHERE $3 AND runtime = $1 AND state = 'new' AND queue IS NULL AND pending_deps = 0
          AND failed_dep IS NULL AND run_at <= @.now_us()
        ORDER BY priority, id LIMIT $2 FOR UPDATE SKIP LOCKED),
     h AS (
       SELECT hd.priority, hd.id, q.name AS queue FROM @.queues q
        CROSS JOIN LATERAL (
          SELECT t.priority, t.id, t.runtime FROM @.tasks t
           WHERE t.queue = q.name AND t.state = 'new' AND t.pending_deps = 0 AND t.failed_dep IS NULL
             AND t.run_at <= @.now_us()
             AND (t.attempts > 0 OR t.lost > 0 OR NOT EXISTS (
                   SELECT 1 FROM @.tasks w WHERE w.queue = q.name AND w.state = 'new'
                      AND (w.attempts > 0 OR w.lost > 0)))
           ORDER BY t.priority, t.id LIMIT 1) hd
        WHERE $4 AND NOT q.paused AND ($5::text[] IS NULL OR q.name = ANY($5)) AND hd.runtime = $1
          AND NOT EXISTS (SELECT 1 FROM @.tasks r WHERE r.queue = q.name AND r.state = 'running')
        ORDER BY hd.priority, hd.id LIMIT $2
        FOR UPDATE OF q SKIP LOCKED)
     SELECT priority, id FROM p UNION ALL SELECT priority, id FROM h ORDER BY 1, 2 LIMIT $2";

/// Takes candidates, re-checking readiness and (for queued ones) headship with a snapshot taken
/// after the queue locks were granted, so no other claim can have started a task of the queue.
const TAKE: &str = "UPDATE @.tasks t SET state = 'running', attempts = t.attempts + 1, started_at = @.now_us(),
                          dispatcher_id = $1, token = c.token, cancel = 0
       FROM unnest($2::bigint[], $3::bigint[]) AS c(id, token)
      WHERE t.id = c.id
        -- Per row, inside a CASE: see cycle_fast in postgres_schema.rs (the rows must be found by
        -- primary key, never by scanning a partial index whose predicate these would match).
        AND CASE WHEN t.state = 'new' AND t.pending_deps = 0 AND t.failed_dep IS NULL
                  AND t.run_at <= @.now_us() THEN true ELSE false END
        AND (t.queue IS NULL OR (
              NOT EXISTS (SELECT 1 FROM @.tasks r WHERE r.queue = t.queue AND r.state = 'running')
              AND (t.attempts > 0 OR t.lost > 0 OR NOT EXISTS (
                    SELECT 1 FROM @.tasks w WHERE w.queue = t.queue AND w.state = 'new'
                       AND (w.attempts > 0 OR w.lost > 0)))
              AND NOT EXISTS (
                    SELECT 1 FROM @.tasks b
                     WHERE b.queue = t.queue AND b.state = 'new' AND b.pending_deps = 0 AND b.failed_dep IS NULL
                       AND b.run_at <= @.now_us() AND (b.priority, b.id) < (t.priority, t.id)
                       AND (b.attempts > 0 OR b.lost > 0 OR NOT EXISTS (
                             SELECT 1 FROM @.tasks w WHERE w.queue = t.queue AND w.state = 'new'
                                AND (w.attempts > 0 OR w.lost > 0))))))
      RETURNING t.id, t.queue, t.runtime, t.target, t.receiver, t.args, t.priority, t.state, t.attempts,
                t.retries, t.lost, t.run_at, t.timeout_ms, t.unique_key, t.meta, t.result, t.error,
                t.error_history, t.message, t.perc_finished, t.enqueued_at, t.started_at, t.finished_at,
                t.dispatcher_id, t.cancel, c.token";

fn claim(c: &mut Conn, req: &ClaimReq<'_>) -> TxResult<Vec<ClaimedRow>> {
    let rt = req.runtime.as_str();
    let want = req.want as i64;
    let mut out = Vec::new();
    // Handovers: tasks that end without running still owe their on_error callback.
    for r in c.query(HANDOVERS, &[&rt, &want])? {
        let id: TaskId = r.get(0);
        let failed_dep: Option<TaskId> = r.get(1);
        let state: String = r.get(2);
        let row = match (state.as_str(), failed_dep) {
            ("new", Some(dep)) => {
                let dep_row: Option<TaskId> = r.get(3);
                let err = dependency_failure(dep, dep_row.map(|_| (r.get(4), r.get(5), r.get(6))));
                c.one(
                    "UPDATE @.tasks t SET state = 'error', error = $2, finished_at = @.now_us(), dispatcher_id = $3
                      WHERE id = $1 RETURNING t.id, t.queue, t.runtime, t.target, t.receiver, t.args, t.priority,
                        t.state, t.attempts, t.retries, t.lost, t.run_at, t.timeout_ms, t.unique_key, t.meta,
                        t.result, t.error, t.error_history, t.message, t.perc_finished, t.enqueued_at,
                        t.started_at, t.finished_at, t.dispatcher_id, t.cancel",
                    &[&id, &err.to_json(), &req.dispatcher],
                )?
            }
            _ => c.one(
                "UPDATE @.tasks t SET handover = 0 WHERE id = $1
                  RETURNING t.id, t.queue, t.runtime, t.target, t.receiver, t.args, t.priority,
                    t.state, t.attempts, t.retries, t.lost, t.run_at, t.timeout_ms, t.unique_key, t.meta,
                    t.result, t.error, t.error_history, t.message, t.perc_finished, t.enqueued_at,
                    t.started_at, t.finished_at, t.dispatcher_id, t.cancel",
                &[&id],
            )?,
        };
        out.push(ClaimedRow::OnError { task: task_from_row(&row)? });
    }
    if out.len() >= req.want {
        return Ok(out);
    }
    let left = (req.want - out.len()) as i64;
    let named = req.selection.named.as_deref();
    let any_named = named.is_none_or(|n| !n.is_empty());
    let candidates = c.query(CANDIDATES, &[&rt, &left, &req.selection.parallel, &any_named, &named])?;
    if candidates.is_empty() {
        return Ok(out);
    }
    let ids: Vec<TaskId> = candidates.iter().map(|r| r.get(1)).collect();
    let tokens: Vec<i64> = ids.iter().map(|_| fastrand::i64(1..i64::MAX)).collect();
    let mut taken: Vec<(i64, TaskId, ClaimedRow)> = Vec::new();
    for r in c.query(TAKE, &[&req.dispatcher, &ids, &tokens])? {
        let task = task_from_row(&r)?;
        let token: i64 = r.get(25);
        taken.push((task.priority, task.id, ClaimedRow::Run { task, token }));
    }
    taken.sort_by_key(|(p, id, _)| (*p, *id));
    out.extend(taken.into_iter().map(|(_, _, row)| row));
    Ok(out)
}

fn settle(c: &mut Conn, s: &SettleReq, policy: &RetryPolicy) -> TxResult<Result<Settled>> {
    // The common case in one statement: a success with no cancel pending.
    if let (Settle::Outcome(Outcome::Success(json)), None) = (&s.settle, &s.progress) {
        let done = c.exec(
            "UPDATE @.tasks SET state = 'successful', result = $3, error = NULL, finished_at = @.now_us()
              WHERE id = $1 AND token = $2 AND state = 'running' AND cancel = 0",
            &[&s.id, &s.token, json],
        )?;
        if done == 1 {
            return Ok(Ok(Settled::Successful));
        }
    }
    let row = c.opt(
        "SELECT attempts, retries, cancel FROM @.tasks WHERE id = $1 AND token = $2 AND state = 'running' FOR UPDATE",
        &[&s.id, &s.token],
    )?;
    let Some(row) = row else {
        // Our own outcome, stored by a cycle whose COMMIT reply was lost, is acknowledged as
        // stored (a lost run's token was cleared and a new claim has another token).
        let stored = c.opt(
            "SELECT state, error, run_at FROM @.tasks WHERE id = $1 AND token = $2 AND state <> 'running'",
            &[&s.id, &s.token],
        )?;
        let Some(r) = stored else { return Ok(Err(Error::StaleToken { task: s.id })) };
        let error: Option<String> = r.get(1);
        let error = error.as_deref().map(ErrorRecord::from_json).unwrap_or_default();
        return Ok(Ok(match r.get::<_, String>(0).as_str() {
            "successful" => Settled::Successful,
            "error" => Settled::Failed(error),
            "aborted" => Settled::Aborted(error),
            _ => match &s.settle {
                Settle::Release => Settled::Released,
                Settle::Outcome(_) => Settled::Retrying { run_at: r.get(2), error },
            },
        }));
    };
    let (attempts, retries, cancel): (i64, i64, i32) = (row.get(0), row.get(1), row.get(2));
    let released = Outcome::Success("null".into());
    let outcome = match &s.settle {
        Settle::Outcome(o) => o,
        Settle::Release if cancel > 0 => &released,
        Settle::Release => {
            c.exec(
                "UPDATE @.tasks SET state = 'new', attempts = greatest(attempts - 1, 0), token = NULL, cancel = 0
                  WHERE id = $1",
                &[&s.id],
            )?;
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
    let mut delay: Option<i64> = None;
    let (state, result, error, settled) = if cancel > 0 {
        let err = cancel_record(i64::from(cancel));
        ("aborted", None, Some(err.clone()), Settled::Aborted(err))
    } else {
        match outcome {
            Outcome::Success(json) => {
                let stored = json.clone();
                ("successful", Some(stored), None, Settled::Successful)
            }
            Outcome::Failure(e) if attempts <= retries => {
                delay = Some(retry::backoff(attempts as u32, policy.base, policy.cap).as_micros() as i64);
                ("new", None, Some(e.clone()), Settled::Retrying { run_at: 0, error: e.clone() })
            }
            Outcome::Failure(e) => ("error", None, Some(e.clone()), Settled::Failed(e.clone())),
        }
    };
    let row = c.one(
        "UPDATE @.tasks SET state = $2, result = $3, error = $4,
                error_history = CASE WHEN $5::text IS NULL THEN error_history
                                     WHEN error_history IS NULL OR error_history = '[]' THEN '[' || $5 || ']'
                                     ELSE left(error_history, -1) || ',' || $5 || ']' END,
                run_at = CASE WHEN $6::bigint IS NULL THEN run_at ELSE @.now_us() + $6 END,
                finished_at = CASE WHEN $6::bigint IS NULL THEN @.now_us() ELSE NULL END,
                message = coalesce($7, message), perc_finished = coalesce($8, perc_finished), cancel = 0
          WHERE id = $1 RETURNING run_at",
        &[&s.id, &state, &result, &error.map(|e| e.to_json()), &history, &delay, &message, &perc],
    )?;
    Ok(Ok(match settled {
        Settled::Retrying { error, .. } => Settled::Retrying { run_at: row.get(0), error },
        other => other,
    }))
}

/// Running tasks whose dispatcher is not alive (by the database clock) go back to `new` (a lost
/// run, not an attempt), or to `aborted` when cancelled or lost too often. `only`: one
/// dispatcher's tasks, whatever its heartbeat says.
fn release_lost(c: &mut Conn, max_lost: u32, only: Option<i64>) -> PgResult<u64> {
    let lost_msg =
        ErrorRecord::new("WorkerLost", format!("worker lost more than {max_lost} times; given up")).to_json();
    let (reset, cancelled) = (cancel_record(2).to_json(), cancel_record(1).to_json());
    let max = i64::from(max_lost);
    c.exec(
        "UPDATE @.tasks SET
            lost = lost + 1, attempts = greatest(attempts - 1, 0), token = NULL,
            state = CASE WHEN cancel > 0 OR lost + 1 > $1 THEN 'aborted' ELSE 'new' END,
            error = CASE WHEN cancel = 2 THEN $3 WHEN cancel > 0 THEN $4 WHEN lost + 1 > $1 THEN $2 ELSE error END,
            finished_at = CASE WHEN cancel > 0 OR lost + 1 > $1 THEN @.now_us() ELSE NULL END,
            handover = CASE WHEN cancel > 0 OR lost + 1 > $1 THEN 1 ELSE 0 END,
            cancel = 0
          WHERE state = 'running' AND CASE WHEN $5::bigint IS NOT NULL THEN dispatcher_id = $5
                ELSE (dispatcher_id IS NULL OR dispatcher_id NOT IN
                       (SELECT id FROM @.dispatchers WHERE heartbeat_at + lease_ms * 1000 >= @.now_us())) END",
        &[&max, &lost_msg, &reset, &cancelled, &only],
    )
}

fn dispatcher_row(c: &mut Conn, id: Option<i64>, reg: &Registration) -> PgResult<i64> {
    let pid = i64::from(std::process::id());
    let workers = reg.workers as i64;
    let lease = reg.lease.as_millis() as i64;
    Ok(c.one(
        "INSERT INTO @.dispatchers (id, runtime, name, host, pid, workers, queues, started_at, heartbeat_at, lease_ms)
         VALUES (coalesce($1, nextval(pg_get_serial_sequence('@.dispatchers', 'id'))), $2, $3, $4, $5, $6, $7,
                 @.now_us(), @.now_us(), $8)
         RETURNING id",
        &[&id, &reg.runtime.as_str(), &reg.name, &clock::hostname(), &pid, &workers, &reg.queues, &lease],
    )?
    .get(0))
}

impl Backend for PgStore {
    fn hub(&self) -> Arc<Hub> {
        match self.s() {
            Ok(s) => s.hub.clone(),
            Err(_) => Arc::new(Hub::default()),
        }
    }

    fn describe(&self) -> String {
        self.config.describe()
    }

    fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Enqueued>> {
        let s = self.s()?;
        // The common case, one plain task outside a batch: one statement, one round trip.
        if let [t] = tasks {
            if t.unique_key.is_none() && t.depends_on.is_empty() && !s.has_batch() {
                validate(t)?;
                // Concurrent plain enqueues of this process share one INSERT and one commit.
                let id = s.enqueues.submit(
                    t.clone(),
                    |batch| enqueue_plain(&s, &batch),
                    || Err(Error::Storage { message: "enqueue failed: a panic in the batch that carried it".into() }),
                )?;
                s.hub.notify();
                return Ok(vec![Enqueued { id, existing: false }]);
            }
        }
        self.write(true, |c| tasks.iter().map(|t| enqueue_one(c, t)).collect())
    }

    fn add_dependencies(&self, task: TaskId, deps: &[TaskId]) -> Result<()> {
        self.write(false, |c| {
            let row = c.opt("SELECT state, attempts, lost FROM @.tasks WHERE id = $1 FOR UPDATE", &[&task])?;
            let Some(row) = row else { return Err(Error::NotFound(task).into()) };
            let state: State = row.get::<_, String>(0).parse()?;
            let (attempts, lost): (i64, i64) = (row.get(1), row.get(2));
            if state != State::New || attempts > 0 || lost > 0 {
                return Err(Error::InvalidState {
                    task,
                    state: if state == State::New { State::Running } else { state },
                    action: "add a dependency to",
                }
                .into());
            }
            for &dep in deps {
                if !exists(c, dep)? {
                    return Err(Error::MissingDependency { task: Some(task), dependency: dep }.into());
                }
                let cycle: bool = c
                    .one(
                        "WITH RECURSIVE up(id) AS (SELECT $1::bigint UNION SELECT d.depends_on FROM @.task_deps d
                                                   JOIN up ON d.task_id = up.id)
                         SELECT EXISTS (SELECT 1 FROM up WHERE id = $2)",
                        &[&dep, &task],
                    )?
                    .get(0);
                if dep == task || cycle {
                    return Err(Error::DependencyCycle { task, dependency: dep }.into());
                }
            }
            insert_deps(c, task, deps)?;
            Ok(())
        })
    }

    fn cancel(&self, id: TaskId) -> Result<State> {
        let s = self.s()?;
        let state = self.write(true, |c| {
            let row = c.opt("SELECT state FROM @.tasks WHERE id = $1 FOR UPDATE", &[&id])?;
            let state: State = row.ok_or(Error::NotFound(id))?.get::<_, String>(0).parse()?;
            Ok(match state {
                State::New => {
                    c.exec(
                        "UPDATE @.tasks SET state = 'aborted', error = $2, finished_at = @.now_us(), handover = 1
                          WHERE id = $1",
                        &[&id, &cancel_record(1).to_json()],
                    )?;
                    State::Aborted
                }
                State::Running => {
                    c.exec("UPDATE @.tasks SET cancel = 1 WHERE id = $1 AND cancel = 0", &[&id])?;
                    State::Running
                }
                finished => finished,
            })
        })?;
        if state == State::Running {
            s.hub.raise(id, CancelReason::Cancelled);
        }
        Ok(state)
    }

    fn reset(&self) -> Result<u64> {
        let s = self.s()?;
        let (aborted, running) = self.write(true, |c| {
            let aborted = c.exec(
                "UPDATE @.tasks SET state = 'aborted', error = $1, finished_at = @.now_us(), handover = 1
                  WHERE state = 'new'",
                &[&cancel_record(2).to_json()],
            )?;
            let running: Vec<TaskId> = c
                .query("UPDATE @.tasks SET cancel = 2 WHERE state = 'running' AND cancel = 0 RETURNING id", &[])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            Ok((aborted, running))
        })?;
        for &id in &running {
            s.hub.raise(id, CancelReason::Reset);
        }
        Ok(aborted + running.len() as u64)
    }

    fn set_paused(&self, queue: &str, paused: bool) -> Result<()> {
        if queue.is_empty() {
            return Err(Error::invalid("queue", "a queue name must not be empty"));
        }
        self.write(!paused, |c| {
            c.exec(
                "INSERT INTO @.queues (name, paused) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
                &[&queue, &paused],
            )?;
            Ok(())
        })
    }

    fn purge(&self, successful_before: i64, failed_before: i64) -> Result<u64> {
        const SPAN: i64 = 5_000;
        let (lo, hi): (Option<i64>, Option<i64>) = self.read(|c| {
            let r = c.one("SELECT min(id), max(id) FROM @.tasks", &[])?;
            Ok((r.get(0), r.get(1)))
        })?;
        let (Some(mut lo), Some(hi)) = (lo, hi) else { return Ok(0) };
        let mut total = 0;
        while lo <= hi {
            let end = lo + SPAN;
            total += self.write(false, |c| {
                Ok(c.exec(
                    "DELETE FROM @.tasks WHERE id IN (
                       SELECT t.id FROM @.tasks t
                        WHERE t.id >= $3 AND t.id < $4 AND t.state IN ('successful', 'error', 'aborted')
                          AND t.finished_at < CASE WHEN t.state = 'successful' THEN $1::bigint ELSE $2::bigint END
                          AND t.handover = 0
                          AND NOT EXISTS (SELECT 1 FROM @.task_deps d JOIN @.tasks u ON u.id = d.task_id
                                           WHERE d.depends_on = t.id AND u.state IN ('new', 'running'))
                        FOR UPDATE SKIP LOCKED)",
                    &[&successful_before, &failed_before, &lo, &end],
                )?)
            })?;
            lo = end;
        }
        Ok(total)
    }

    fn task(&self, id: TaskId) -> Result<Task> {
        self.read(|c| {
            let row = c
                .opt(
                    "SELECT t.id, t.queue, t.runtime, t.target, t.receiver, t.args, t.priority, t.state, t.attempts,
                            t.retries, t.lost, t.run_at, t.timeout_ms, t.unique_key, t.meta, t.result, t.error,
                            t.error_history, t.message, t.perc_finished, t.enqueued_at, t.started_at, t.finished_at,
                            t.dispatcher_id, t.cancel,
                            ARRAY(SELECT depends_on FROM @.task_deps WHERE task_id = t.id ORDER BY depends_on)
                       FROM @.tasks t WHERE t.id = $1",
                    &[&id],
                )?
                .ok_or(Error::NotFound(id))?;
            let mut task = task_from_row(&row)?;
            task.depends_on = row.get(25);
            Ok(task)
        })
    }

    fn list(&self, f: &TaskFilter) -> Result<Vec<Task>> {
        let mut sql = format!("SELECT {TASK_COLS} FROM @.tasks t WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync>> = Vec::new();
        if !f.states.is_empty() {
            let list: Vec<String> = f.states.iter().map(|s| s.as_str().to_string()).collect();
            args.push(Box::new(list));
            sql += &format!(" AND t.state = ANY(${})", args.len());
        }
        match &f.queue {
            Some(Some(q)) => {
                args.push(Box::new(q.clone()));
                sql += &format!(" AND t.queue = ${}", args.len());
            }
            Some(None) => sql += " AND t.queue IS NULL",
            None => {}
        }
        if let Some(rt) = f.runtime {
            args.push(Box::new(rt.as_str().to_string()));
            sql += &format!(" AND t.runtime = ${}", args.len());
        }
        for (key, value) in &f.meta {
            check_json("meta filter value", value)?;
            args.push(Box::new(key.clone()));
            args.push(Box::new(value.clone()));
            sql += &format!(
                " AND (t.meta::jsonb -> ${}::text) IS NOT DISTINCT FROM ${}::text::jsonb",
                args.len() - 1,
                args.len()
            );
        }
        sql += if f.descending { " ORDER BY t.id DESC" } else { " ORDER BY t.id" };
        if let Some(l) = f.limit {
            sql += &format!(" LIMIT {l}");
        }
        sql += &format!(" OFFSET {}", f.offset.unwrap_or(0));
        let s = self.s()?;
        let sql = qualify(&sql, &s.cfg.schema);
        s.read(|c| {
            let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a.as_ref()).collect();
            let rows = c.client.query(sql.as_str(), &params)?;
            Ok(rows.iter().map(task_from_row).collect::<Result<Vec<_>>>()?)
        })
    }

    fn counts(&self) -> Result<Vec<QueueCounts>> {
        self.read(|c| {
            let mut by_queue: HashMap<Option<String>, QueueCounts> = HashMap::new();
            let rows = c.query(
                "SELECT queue, state, count(*),
                        count(*) FILTER (WHERE state = 'new' AND (pending_deps > 0 OR failed_dep IS NOT NULL
                                                                   OR run_at > @.now_us()))
                   FROM @.tasks GROUP BY queue, state",
                &[],
            )?;
            for r in rows {
                let queue: Option<String> = r.get(0);
                let state: String = r.get(1);
                let (n, waiting): (i64, i64) = (r.get(2), r.get(3));
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
            for r in c.query("SELECT name, paused FROM @.queues", &[])? {
                let (name, paused): (String, bool) = (r.get(0), r.get(1));
                if paused || by_queue.contains_key(&Some(name.clone())) {
                    let e = by_queue
                        .entry(Some(name.clone()))
                        .or_insert_with(|| QueueCounts { queue: Some(name), ..Default::default() });
                    e.paused = paused;
                }
            }
            let mut out: Vec<QueueCounts> = by_queue.into_values().collect();
            out.sort_by(|a, b| a.queue.cmp(&b.queue));
            Ok(out)
        })
    }

    fn dispatchers(&self) -> Result<Vec<DispatcherInfo>> {
        self.read(|c| {
            let rows = c.query(
                "SELECT d.id, d.runtime, d.name, d.host, d.pid, d.workers, d.queues, d.started_at, d.heartbeat_at,
                        d.heartbeat_at + d.lease_ms * 1000 >= @.now_us(),
                        (SELECT count(*) FROM @.tasks t WHERE t.state = 'running' AND t.dispatcher_id = d.id)
                   FROM @.dispatchers d ORDER BY d.id",
                &[],
            )?;
            let mut out = Vec::new();
            for r in rows {
                let runtime: String = r.get(1);
                out.push(DispatcherInfo {
                    id: r.get(0),
                    runtime: runtime.parse()?,
                    name: r.get(2),
                    host: r.get(3),
                    pid: r.get(4),
                    workers: r.get(5),
                    queues: r.get(6),
                    started_at: r.get(7),
                    heartbeat_at: r.get(8),
                    alive: r.get(9),
                    running: r.get::<_, i64>(10) as u64,
                });
            }
            Ok(out)
        })
    }

    fn register(&self, reg: &Registration) -> Result<i64> {
        self.write(false, |c| Ok(dispatcher_row(c, None, reg)?))
    }

    fn heartbeat(&self, id: i64, reg: &Registration) -> Result<Beat> {
        self.write(false, |c| {
            let n = c.exec("UPDATE @.dispatchers SET heartbeat_at = @.now_us() WHERE id = $1", &[&id])?;
            // Declared dead while it could not heartbeat: its runs were recovered (their tokens
            // are stale now); it comes back under the same id.
            if n == 0 {
                dispatcher_row(c, Some(id), reg)?;
            }
            let cancels = c
                .query(
                    "SELECT id, cancel FROM @.tasks WHERE state = 'running' AND dispatcher_id = $1 AND cancel > 0",
                    &[&id],
                )?
                .iter()
                .map(|r| {
                    let code: i32 = r.get(1);
                    (r.get(0), if code == 2 { CancelReason::Reset } else { CancelReason::Cancelled })
                })
                .collect();
            Ok(Beat { cancels })
        })
    }

    fn recover(&self, max_lost: u32) -> Result<u64> {
        let s = self.s()?;
        let n = s.tx(false, |c| {
            let n = release_lost(c, max_lost, None)?;
            c.exec("DELETE FROM @.dispatchers WHERE heartbeat_at + lease_ms * 1000 < @.now_us()", &[])?;
            if n > 0 {
                let own = s.own();
                c.exec("SELECT @.wake($1)", &[&own])?;
            }
            Ok(n)
        })?;
        if n > 0 {
            s.hub.notify();
        }
        Ok(n)
    }

    fn deregister(&self, id: i64, max_lost: u32) -> Result<u64> {
        self.write(true, |c| {
            let n = release_lost(c, max_lost, Some(id))?;
            c.exec("DELETE FROM @.dispatchers WHERE id = $1", &[&id])?;
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
        let s = self.s()?;
        match cycle_fast(&s, settles, progress, claim_req.as_ref())? {
            Fast::Done(out) => Ok(out),
            Fast::NotApplicable => cycle_slow(&s, settles, progress, claim_req, retry),
            Fast::Partly { mut out, leftover, claim_owed } => {
                let rest: Vec<SettleReq> = leftover
                    .iter()
                    .map(|&i| SettleReq {
                        id: settles[i].id,
                        token: settles[i].token,
                        settle: match &settles[i].settle {
                            Settle::Outcome(o) => Settle::Outcome(o.clone()),
                            Settle::Release => Settle::Release,
                        },
                        progress: None,
                    })
                    .collect();
                let claim_req = if claim_owed { claim_req } else { None };
                match cycle_slow(&s, &rest, &[], claim_req, retry) {
                    Ok(slow) => {
                        for (i, settled) in leftover.into_iter().zip(slow.settled) {
                            out.settled[i] = settled;
                        }
                        out.claimed.extend(slow.claimed);
                        out.next_due = slow.next_due.or(out.next_due);
                        Ok(out)
                    }
                    Err(e) => {
                        // The caller takes this cycle as not written: the claims the fast
                        // statement committed are handed back at the next cycle, and the
                        // outcomes it stored are acknowledged then (found under their tokens).
                        s.in_doubt.lock().extend(out.claimed.iter().filter_map(|r| match r {
                            ClaimedRow::Run { token, .. } => Some(*token),
                            ClaimedRow::OnError { .. } => None,
                        }));
                        Err(e)
                    }
                }
            }
        }
    }

    fn begin_batch(&self) -> Result<()> {
        let s = self.s()?;
        let nested = s.with_batch(|b| {
            b.conn.client.batch_execute(&format!("SAVEPOINT batch{}", b.depth)).map_err(|e| pg_error(&e))?;
            b.depth += 1;
            Ok(())
        });
        if let Some(r) = nested {
            return r;
        }
        let mut conn = s.checkout()?;
        conn.client.batch_execute("BEGIN").map_err(|e| pg_error(&e))?;
        s.batches.lock().insert(std::thread::current().id(), BatchConn { conn, depth: 1 });
        s.open_batches.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
    fn end_batch(&self, commit: bool) -> Result<()> {
        let s = self.s()?;
        let me = std::thread::current().id();
        let inner = s.with_batch(|b| {
            if b.depth == 1 {
                return None;
            }
            b.depth -= 1;
            let sql = if commit {
                format!("RELEASE batch{}", b.depth)
            } else {
                format!("ROLLBACK TO batch{0}; RELEASE batch{0}", b.depth)
            };
            Some(b.conn.client.batch_execute(&sql).map_err(|e| pg_error(&e)))
        });
        match inner {
            None => return Err(Error::invalid("batch", "no batch is open on this thread")),
            Some(Some(r)) => return r,
            Some(None) => {}
        }
        let BatchConn { mut conn, .. } = s.batches.lock().remove(&me).expect("present");
        s.open_batches.fetch_sub(1, Ordering::AcqRel);
        let res = if commit {
            let own = s.own();
            conn.exec("SELECT @.wake($1)", &[&own])
                .and_then(|_| conn.client.batch_execute("COMMIT"))
                .map_err(|e| pg_error(&e))
        } else {
            conn.client.batch_execute("ROLLBACK").map_err(|e| pg_error(&e))
        };
        match &res {
            Ok(()) if commit => s.hub.notify(),
            Ok(()) => {}
            Err(_) => discard(conn),
        }
        res
    }
}

/// What the one-statement cycle did.
enum Fast {
    /// Not the common case (or the statement failed): the full path does everything.
    NotApplicable,
    Done(CycleOut),
    /// Committed, but these settles (indexes) were not stored (stale token, cancel pending), and
    /// maybe handovers are owed before claiming: the full path finishes the cycle.
    Partly {
        out: CycleOut,
        leftover: Vec<usize>,
        claim_owed: bool,
    },
}

const CYCLE_FAST: &str = "SELECT * FROM @.cycle_fast($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// The common cycle (plain successes, then claims) in one autocommit statement: see
/// `@.cycle_fast` in postgres_schema.rs. Each claim's token is chosen here, before the statement
/// is sent: if the connection is lost with its outcome unknown, the tokens go in doubt (claims
/// that did commit are handed back by the full path, which runs next, in the same cycle), and an
/// outcome that was stored is found under its token and acknowledged as stored.
fn cycle_fast(
    s: &Shared,
    settles: &[SettleReq],
    progress: &[ProgressReq],
    claim_req: Option<&ClaimReq<'_>>,
) -> Result<Fast> {
    if !progress.is_empty() || !s.in_doubt.lock().is_empty() {
        return Ok(Fast::NotApplicable);
    }
    if s.has_batch() {
        return Ok(Fast::NotApplicable);
    }
    let (mut ids, mut tokens, mut results) = (Vec::new(), Vec::new(), Vec::new());
    for st in settles {
        let (Settle::Outcome(Outcome::Success(json)), None) = (&st.settle, &st.progress) else {
            return Ok(Fast::NotApplicable);
        };
        ids.push(st.id);
        tokens.push(st.token);
        results.push(json.as_str());
    }
    let want = claim_req.map_or(0, |r| r.want);
    if settles.is_empty() && want == 0 {
        return Ok(Fast::NotApplicable);
    }
    let claim_tokens: Vec<i64> = (0..want).map(|_| fastrand::i64(1..i64::MAX)).collect();
    let (rt, dispatcher, parallel, named) = match claim_req {
        Some(r) => (r.runtime.as_str(), r.dispatcher, r.selection.parallel, r.selection.named.as_deref()),
        None => ("python", 0, false, None),
    };
    let any_named = named.is_none_or(|n| !n.is_empty());
    let wake = !settles.is_empty();
    let Ok(mut conn) = s.checkout() else { return Ok(Fast::NotApplicable) };
    let own = s.own();
    let want_i32 = want as i32;
    let params: [&(dyn ToSql + Sync); 12] = [
        &ids,
        &tokens,
        &results,
        &rt,
        &dispatcher,
        &want_i32,
        &parallel,
        &any_named,
        &named,
        &claim_tokens,
        &own,
        &wake,
    ];
    let rows = match conn.query(CYCLE_FAST, &params) {
        Ok(rows) => {
            drop(conn);
            rows
        }
        Err(e) => {
            if !claim_tokens.is_empty() {
                s.in_doubt.lock().extend(claim_tokens);
            }
            drop(conn);
            // A lost connection or a conflict: the full path retries with backoff (and hands
            // back what may have committed). Anything else is a fault worth reporting.
            return if retryable(&e) { Ok(Fast::NotApplicable) } else { Err(pg_error(&e)) };
        }
    };
    let mut claimed: Vec<(i64, TaskId, ClaimedRow)> = Vec::with_capacity(want);
    let (mut stored, mut next_due, mut owed) = (Vec::new(), None, false);
    for r in &rows {
        if r.get::<_, Option<i64>>(0).is_none() {
            stored = r.get::<_, Vec<i64>>(26);
            next_due = r.get(27);
            owed = r.get(28);
            continue;
        }
        let task = match task_from_row(r) {
            Ok(t) => t,
            Err(e) => {
                // Committed, but unreadable: hand the claims back at the next cycle.
                s.in_doubt.lock().extend(claim_tokens);
                return Err(e);
            }
        };
        let token: i64 = r.get(25);
        claimed.push((task.priority, task.id, ClaimedRow::Run { task, token }));
    }
    claimed.sort_by_key(|(p, id, _)| (*p, *id));
    let mut leftover = Vec::new();
    let settled: Vec<Result<Settled>> = settles
        .iter()
        .enumerate()
        .map(|(i, st)| {
            if stored.contains(&st.id) {
                Ok(Settled::Successful)
            } else {
                leftover.push(i);
                Err(Error::StaleToken { task: st.id })
            }
        })
        .collect();
    if wake {
        s.hub.notify();
    }
    let out = CycleOut { settled, claimed: claimed.into_iter().map(|(_, _, r)| r).collect(), next_due };
    let claim_owed = owed && want > 0;
    if leftover.is_empty() && !claim_owed {
        Ok(Fast::Done(out))
    } else {
        Ok(Fast::Partly { out, leftover, claim_owed })
    }
}

/// The full cycle: any settles, progress and claims, in one transaction of several statements.
fn cycle_slow(
    s: &Shared,
    settles: &[SettleReq],
    progress: &[ProgressReq],
    claim_req: Option<ClaimReq<'_>>,
    retry: &RetryPolicy,
) -> Result<CycleOut> {
    let doubt: Vec<i64> = s.in_doubt.lock().clone();
    let wake = !settles.is_empty();
    let mut claimed_tokens: Vec<i64> = Vec::new();
    let res = s.tx(false, |c| {
        if !doubt.is_empty() {
            // Claims whose commit reply was lost: hand back any that did commit.
            c.exec(
                "UPDATE @.tasks SET state = 'new', attempts = greatest(attempts - 1, 0), token = NULL, cancel = 0
                  WHERE token = ANY($1) AND state = 'running'",
                &[&doubt],
            )?;
        }
        let mut settled = Vec::with_capacity(settles.len());
        for st in settles {
            settled.push(settle(c, st, retry)?);
        }
        for p in progress {
            c.exec(
                "UPDATE @.tasks SET message = coalesce($3, message), perc_finished = coalesce($4, perc_finished)
                  WHERE id = $1 AND token = $2 AND state = 'running'",
                &[&p.id, &p.token, &p.progress.message, &p.progress.perc],
            )?;
        }
        let claimed = match &claim_req {
            Some(req) if req.want > 0 => claim(c, req)?,
            _ => Vec::new(),
        };
        claimed_tokens = claimed
            .iter()
            .filter_map(|r| match r {
                ClaimedRow::Run { token, .. } => Some(*token),
                ClaimedRow::OnError { .. } => None,
            })
            .collect();
        let full = claim_req.as_ref().is_some_and(|r| claimed.len() >= r.want);
        let own = s.own();
        let next_due: Option<i64> = if full && !wake {
            None
        } else {
            c.one(
                "SELECT (SELECT min(run_at) FROM @.tasks WHERE state = 'new' AND run_at > @.now_us()),
                        CASE WHEN $2 THEN @.wake($1) END IS NULL",
                &[&own, &wake],
            )?
            .get(0)
        };
        Ok(CycleOut { settled, claimed, next_due })
    });
    match res {
        Ok(out) => {
            if !doubt.is_empty() {
                s.in_doubt.lock().retain(|t| !doubt.contains(t));
            }
            if wake || out.claimed.iter().any(|r| matches!(r, ClaimedRow::OnError { .. })) {
                s.hub.notify();
            }
            Ok(out)
        }
        Err(e) => {
            // A COMMIT that failed may still have committed: remember its claims' tokens.
            if !claimed_tokens.is_empty() {
                s.in_doubt.lock().extend(claimed_tokens);
            }
            Err(e)
        }
    }
}

/// One plain task in one autocommit statement. If the connection is lost with the outcome
/// unknown, the row's enqueue token tells whether it was stored before trying again.
/// Plain tasks (validated; no unique key, no dependencies), each committed before this returns:
/// one alone with `enqueue_single`, several with one multi-row INSERT in one autocommit
/// statement. A batch that fails for another reason than a lost connection is retried task by
/// task, so each caller gets its own task's error.
fn enqueue_plain(s: &Shared, batch: &[NewTask]) -> Vec<Result<TaskId>> {
    if let [t] = batch {
        return vec![enqueue_single(s, t)];
    }
    const SQL: &str = "WITH ins AS (
         INSERT INTO @.tasks (queue, runtime, target, receiver, args, priority, retries, run_at, timeout_ms, meta,
                              token)
         SELECT q, rt, tg, rc, a, p, r, coalesce(ra, @.now_us()), tm, m, tk
           FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[],
                       $8::bigint[], $9::bigint[], $10::text[], $11::bigint[])
                AS u(q, rt, tg, rc, a, p, r, ra, tm, m, tk)
         RETURNING token, id),
       w AS MATERIALIZED (SELECT @.wake($12))
     SELECT ins.token, ins.id FROM ins, w";
    let args: Vec<InsertArgs> = batch.iter().map(InsertArgs::of).collect();
    let queue: Vec<Option<&str>> = batch.iter().map(|t| t.queue.as_deref()).collect();
    let runtime: Vec<&str> = args.iter().map(|a| a.runtime).collect();
    let target: Vec<&str> = batch.iter().map(|t| t.target.as_str()).collect();
    let receiver: Vec<Option<&str>> = batch.iter().map(|t| t.receiver.as_deref()).collect();
    let task_args: Vec<&str> = batch.iter().map(|t| t.args.as_str()).collect();
    let priority: Vec<i64> = batch.iter().map(|t| t.priority).collect();
    let retries: Vec<i64> = args.iter().map(|a| a.retries).collect();
    let run_at: Vec<Option<i64>> = batch.iter().map(|t| t.run_at).collect();
    let timeout: Vec<Option<i64>> = args.iter().map(|a| a.timeout_ms).collect();
    let meta: Vec<Option<&str>> = batch.iter().map(|t| t.meta.as_deref()).collect();
    let tokens: Vec<i64> = args.iter().map(|a| a.token).collect();
    let ids = |rows: &[Row]| -> HashMap<i64, TaskId> { rows.iter().map(|r| (r.get(0), r.get(1))).collect() };
    let mut retry = Retry::new();
    let mut in_doubt = false;
    let failed = loop {
        let mut conn = match s.checkout_retrying(&mut retry) {
            Ok(c) => c,
            Err(e) => break e,
        };
        if in_doubt {
            // The last attempt's commit reply was lost: it stored all of the batch or none (a
            // task claimed since then no longer carries its token: stored, id unknown).
            match conn.query("SELECT token, id FROM @.tasks WHERE token = ANY($1)", &[&tokens]) {
                Ok(rows) if !rows.is_empty() => {
                    let stored = ids(&rows);
                    return tokens.iter().map(|t| stored.get(t).copied().ok_or_else(|| lost_row(*t))).collect();
                }
                Ok(_) => {}
                Err(e) if retry.after(&e) => {
                    discard(conn);
                    continue;
                }
                Err(e) => break pg_error(&e),
            }
        }
        let own = s.own();
        let params: [&(dyn ToSql + Sync); 12] = [
            &queue, &runtime, &target, &receiver, &task_args, &priority, &retries, &run_at, &timeout, &meta, &tokens,
            &own,
        ];
        match conn.query(SQL, &params) {
            Ok(rows) => {
                let stored = ids(&rows);
                return tokens.iter().map(|t| stored.get(t).copied().ok_or_else(|| lost_row(*t))).collect();
            }
            Err(e) if retry.after(&e) => {
                in_doubt = true;
                discard(conn);
            }
            Err(e) => break pg_error(&e),
        }
    };
    if in_doubt {
        // Whether the batch was stored is unknown: retrying each task alone could store one twice.
        return batch.iter().map(|_| Err(failed.clone())).collect();
    }
    batch.iter().map(|t| enqueue_single(s, t)).collect()
}

/// A task of a stored multi-row INSERT whose id cannot be told: its row was already claimed
/// when a lost commit reply was checked.
fn lost_row(token: i64) -> Error {
    Error::Storage {
        message: format!(
            "the task was stored but its id is unknown (the reply to its commit was lost and it was claimed \
             before it could be looked up; token {token})"
        ),
    }
}

fn enqueue_single(s: &Shared, t: &NewTask) -> Result<TaskId> {
    const SQL: &str = "INSERT INTO @.tasks (queue, runtime, target, receiver, args, priority, retries, run_at,
                                           timeout_ms, unique_key, meta, token)
     VALUES ($1, $2, $3, $4, $5, $6, $7, coalesce($8, @.now_us()), $9, $10, $11, $12)
     RETURNING id, @.wake($13)";
    let a = InsertArgs::of(t);
    let mut retry = Retry::new();
    let mut in_doubt = false;
    loop {
        let mut conn = s.checkout_retrying(&mut retry)?;
        if in_doubt {
            match conn.opt("SELECT id FROM @.tasks WHERE token = $1", &[&a.token]) {
                Ok(Some(r)) => return Ok(r.get(0)),
                Ok(None) => {}
                Err(e) if retry.after(&e) => {
                    discard(conn);
                    continue;
                }
                Err(e) => return Err(pg_error(&e)),
            }
        }
        let own = s.own();
        let mut params = a.params(t).to_vec();
        params.push(&own);
        match conn.one(SQL, &params) {
            Ok(r) => return Ok(r.get(0)),
            Err(e) if retry.after(&e) => {
                in_doubt = true;
                discard(conn);
            }
            Err(e) => return Err(pg_error(&e)),
        }
    }
}
