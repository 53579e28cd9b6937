//! SQLite connections of one database file in this process: one write connection behind a
//! reentrant, thread-owned lock (so a batch can hold it across calls), a pool of read
//! connections, a watcher thread that turns other processes' commits into wake-ups, and a
//! maintenance thread that checkpoints the WAL and keeps it under its size limit.
//! Every write transaction starts with BEGIN IMMEDIATE (a deferred one that reads then writes
//! would fail with SQLITE_BUSY at once, whatever the busy timeout).

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use rusqlite::{Connection, OpenFlags};

use super::schema;
use super::Config;
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::sync::{Condvar, Mutex, ReentrantMutex, RwLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Synchronous {
    Normal,
    Full,
}

impl FromStr for Synchronous {
    type Err = Error;
    fn from_str(s: &str) -> Result<Synchronous> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Synchronous::Normal),
            "full" => Ok(Synchronous::Full),
            _ => Err(Error::invalid("synchronous", format!("{s:?} (expected normal or full)"))),
        }
    }
}

pub(super) struct Writer {
    pub conn: Connection,
    /// Open batch nesting depth of the owning thread (0: no batch).
    pub batch: Cell<u32>,
}

pub(super) struct Db {
    pub pid: u32,
    pub path: PathBuf,
    pub config: Config,
    // ManuallyDrop: in a forked child these connections belong to the parent and must never be
    // closed (closing would release the parent's POSIX locks); Drop leaks them there.
    pub writer: ManuallyDrop<ReentrantMutex<Writer>>,
    readers: ManuallyDrop<Mutex<Vec<Connection>>>,
    /// Every use of any connection of this Db holds it shared; a fork takes it exclusively, so
    /// no SQLite transaction of this process is in flight when the child is made.
    quiesce: Arc<RwLock<()>>,
    pub hub: Arc<Hub>,
    stop: Arc<AtomicBool>,
    /// Set by every local commit; the maintenance thread checkpoints when it finds it set.
    dirty: Arc<AtomicBool>,
    stop_maintenance: Sender<()>,
    /// The writer's WAL hook sends here once the WAL holds enough frames to be worth rewinding.
    rewind: Receiver<()>,
    wal: Arc<WalFrames>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_pipe: [libc::c_int; 2],
}

/// (pid, file, options) → the Db of that process; entries of other pids are stale after fork.
type Registry = Vec<(u32, PathBuf, Config, Weak<Db>)>;
static REGISTRY: std::sync::Mutex<Registry> = std::sync::Mutex::new(Vec::new());

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Absolute, symlink-free path of a file that may not exist yet.
fn normalize(path: &Path) -> Result<PathBuf> {
    let abs = if path.is_absolute() { path.to_path_buf() } else { std::env::current_dir()?.join(path) };
    let (Some(dir), Some(name)) = (abs.parent(), abs.file_name()) else {
        return Err(Error::invalid("database", format!("{} is not a file path", path.display())));
    };
    let dir = dir
        .canonicalize()
        .map_err(|e| Error::invalid("database", format!("{}: directory {}: {e}", path.display(), dir.display())))?;
    Ok(dir.join(name))
}

fn open_connection(path: &Path, config: &Config) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::Storage { message: format!("cannot open {}: {e}", path.display()) })?;
    let timeout = config.busy_timeout;
    let mut started = Instant::now();
    // Short sleeps first: within one machine, locks are held for tens of microseconds.
    conn.busy_handler(Some(move |n: i32| {
        if n == 0 {
            started = Instant::now();
        }
        if started.elapsed() >= timeout {
            return false;
        }
        let micros = (20u64 << (n.clamp(0, 10) as u32)).min(2_000);
        std::thread::sleep(Duration::from_micros(micros));
        true
    }))?;
    // The bundled SQLite has STAT4, which re-prepares a statement whenever a bound value might
    // change its plan: on every claim and outcome here. A stable plan is what we want anyway.
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    conn.set_prepared_statement_cache_capacity(128);
    Ok(conn)
}

fn configure(conn: &Connection, config: &Config) -> Result<()> {
    // Two connections switching a fresh file to WAL at once: the loser gets SQLITE_BUSY at once
    // (a lock upgrade the busy handler is not asked about). Retry within the busy timeout.
    let started = Instant::now();
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(e)
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && started.elapsed() < config.busy_timeout =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => break other?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Storage {
            message: format!("cannot switch {} to WAL mode (got {mode})", config.path.display()),
        });
    }
    let sync = match config.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {sync};
         PRAGMA wal_autocheckpoint = 0;
         PRAGMA journal_size_limit = {};
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -8000;
         PRAGMA foreign_keys = OFF;",
        config.wal_limit_bytes
    ))?;
    Ok(())
}

impl super::process_local::OwnedByProcess for Db {
    fn pid(&self) -> u32 {
        self.pid
    }
}

impl Db {
    /// The process-wide Db of this file (shared by every Store of this process), opened if needed.
    pub fn get(config: &Config) -> Result<Arc<Db>> {
        let path = normalize(&config.path)?;
        let pid = std::process::id();
        let mut reg = registry();
        reg.retain(|(p, _, _, w)| *p == pid && w.strong_count() > 0);
        // Same file with the same options: share it. Other options get their own connections.
        let same = |c: &Config| {
            c.synchronous == config.synchronous
                && c.busy_timeout == config.busy_timeout
                && c.wal_limit_bytes == config.wal_limit_bytes
        };
        if let Some(db) = reg.iter().find(|(_, p, c, _)| *p == path && same(c)).and_then(|(_, _, _, w)| w.upgrade()) {
            return Ok(db);
        }
        let db = Db::open(path.clone(), config)?;
        reg.push((pid, path, config.clone(), Arc::downgrade(&db)));
        Ok(db)
    }

    fn open(path: PathBuf, config: &Config) -> Result<Arc<Db>> {
        let display = path.display().to_string();
        let not_db = |e: Error| match e {
            Error::NotADatabase { message, .. } => Error::NotADatabase { path: display.clone(), message },
            other => other,
        };
        let conn = open_connection(&path, config)?;
        // Inspect before anything can write to the file (a foreign or newer file stays untouched).
        schema::inspect(&conn, &display).map_err(not_db)?;
        configure(&conn, config).map_err(not_db)?;
        schema::migrate(&conn, &display).map_err(not_db)?;
        let mut conn = conn;
        let (rewind_tx, rewind_rx) = bounded(1);
        let rewind_frames = rewind_frames(config);
        let wal = Arc::new(WalFrames::default());
        let frames_seen = wal.clone();
        // Called after every commit of this process with the frames now in the WAL: a commit
        // that takes it past the threshold wakes the maintenance thread at once.
        conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: libc::c_int| {
            frames_seen.frames.store(frames as u64, Ordering::Release);
            if frames as u64 >= rewind_frames {
                let _ = rewind_tx.try_send(());
            }
            Ok(())
        }))?;

        let mut pipe = [0; 2];
        // SAFETY: pipe writes two fds into the array we own.
        if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let (stop_tx, stop_rx) = bounded(1);
        let db = Arc::new(Db {
            pid: std::process::id(),
            path: path.clone(),
            config: config.clone(),
            writer: ManuallyDrop::new(ReentrantMutex::new(Writer { conn, batch: Cell::new(0) })),
            readers: ManuallyDrop::new(Mutex::new(Vec::new())),
            quiesce: Arc::new(RwLock::new(())),
            hub: Arc::new(Hub::default()),
            stop: Arc::new(AtomicBool::new(false)),
            dirty: Arc::new(AtomicBool::new(false)),
            stop_maintenance: stop_tx,
            rewind: rewind_rx,
            wal,
            threads: Mutex::new(Vec::new()),
            stop_pipe: pipe,
        });
        let watcher = spawn_watcher(&db)?;
        let maintenance = spawn_maintenance(&db, stop_rx)?;
        db.threads.lock().extend([watcher, maintenance]);
        Ok(db)
    }

    /// Runs `f` in a write transaction (a savepoint inside an open batch of this thread).
    pub fn write<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        let guard = self.writer.lock();
        let quiet = self.quiesce.read();
        let conn = &guard.conn;
        let in_batch = guard.batch.get() > 0;
        let (begin, commit, rollback) = if in_batch {
            ("SAVEPOINT op", "RELEASE op", "ROLLBACK TO op; RELEASE op")
        } else {
            ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")
        };
        let before = conn.total_changes();
        // Cached statements: parsing BEGIN/COMMIT on every call is measurable on the enqueue path.
        conn.prepare_cached(begin)?.execute([])?;
        match f(conn) {
            Ok(r) => match conn.prepare_cached(commit).and_then(|mut s| s.execute([])) {
                Ok(_) => {
                    // Only real changes wake waiters: an empty claim must not wake its own writer.
                    let changed = conn.total_changes() != before;
                    // Both released before throttling: the rewind it waits for takes `quiesce`
                    // exclusively, so holding it shared would stall every writer for the whole
                    // 100 ms timeout.
                    drop(quiet);
                    drop(guard);
                    if changed && !in_batch {
                        self.committed();
                        self.wal.throttle(2 * rewind_frames(&self.config));
                    }
                    Ok(r)
                }
                Err(e) => {
                    let _ = conn.execute_batch(rollback);
                    Err(e.into())
                }
            },
            Err(e) => {
                let _ = conn.execute_batch(rollback);
                Err(e)
            }
        }
    }

    /// After a local commit: wake local waiters and let the maintenance thread look at the WAL.
    pub fn committed(&self) {
        self.hub.notify();
        self.dirty.store(true, Ordering::Release);
    }

    /// Runs `f` on a read connection (on the write connection while this thread holds a batch,
    /// so it sees its own uncommitted tasks).
    pub fn read<R>(&self, f: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        if self.writer.is_owned_by_current_thread() {
            let guard = self.writer.lock();
            return f(&guard.conn);
        }
        let conn = match self.readers.lock().pop() {
            Some(c) => c,
            None => {
                let c = open_connection(&self.path, &self.config)?;
                c.execute_batch("PRAGMA query_only = 1; PRAGMA cache_size = -2000;")?;
                c
            }
        };
        let out = {
            let _quiet = self.quiesce.read();
            f(&conn)
        };
        let mut pool = self.readers.lock();
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    pub fn begin_batch(&self) -> Result<()> {
        let guard = self.writer.lock();
        let depth = guard.batch.get();
        let sql = if depth == 0 { "BEGIN IMMEDIATE".to_string() } else { format!("SAVEPOINT batch{depth}") };
        guard.conn.execute_batch(&sql)?;
        guard.batch.set(depth + 1);
        // The lock stays held by this thread until end_batch.
        std::mem::forget(guard);
        Ok(())
    }

    pub fn end_batch(&self, commit: bool) -> Result<()> {
        if !self.writer.is_owned_by_current_thread() {
            return Err(Error::invalid("batch", "a batch must end on the thread that began it"));
        }
        let outcome = {
            let guard = self.writer.lock();
            let depth = guard.batch.get();
            if depth == 0 {
                return Err(Error::invalid("batch", "no batch is open on this thread"));
            }
            let sql = match (depth, commit) {
                (1, true) => "COMMIT".to_string(),
                (1, false) => "ROLLBACK".to_string(),
                (d, true) => format!("RELEASE batch{}", d - 1),
                (d, false) => format!("ROLLBACK TO batch{n}; RELEASE batch{n}", n = d - 1),
            };
            let mut res = guard.conn.execute_batch(&sql).map_err(Error::from);
            if res.is_err() && depth == 1 {
                let _ = guard.conn.execute_batch("ROLLBACK");
            }
            if res.is_ok() && depth == 1 && !commit {
                res = Ok(());
            }
            guard.batch.set(depth - 1);
            (res, depth == 1 && commit)
        };
        // SAFETY: begin_batch forgot the guard it took on this thread (checked above).
        unsafe { self.writer.force_unlock() };
        if outcome.1 && outcome.0.is_ok() {
            self.committed();
        }
        outcome.0
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Inherited across fork: the threads do not exist here and the connections are the
            // parent's. Leak them.
            return;
        }
        self.stop.store(true, Ordering::Release);
        // SAFETY: writing one byte to the pipe we own wakes the watcher's poll.
        unsafe { libc::write(self.stop_pipe[1], [1u8].as_ptr().cast(), 1) };
        let _ = self.stop_maintenance.try_send(());
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        // SAFETY: both fds are ours and no thread uses them any more.
        unsafe {
            libc::close(self.stop_pipe[0]);
            libc::close(self.stop_pipe[1]);
            ManuallyDrop::drop(&mut self.readers);
            ManuallyDrop::drop(&mut self.writer);
        }
    }
}

/// Watches the -wal file while some waiter needs it: every commit of any process writes to it,
/// so an inotify event is a cheap, immediate "something changed" with no polling. Nobody waiting
/// (e.g. a busy dispatcher, an enqueue-only process) means no watch, so commits pay nothing for
/// it. Falls back to a 2 ms poll of `PRAGMA data_version` where inotify is unavailable.
fn spawn_watcher(db: &Arc<Db>) -> Result<JoinHandle<()>> {
    let hub = db.hub.clone();
    let stop = db.stop.clone();
    let quiesce = db.quiesce.clone();
    let stop_fd = db.stop_pipe[0];
    let path = db.path.clone();
    let config = db.config.clone();
    let handle = std::thread::Builder::new().name("qd-watcher".into()).spawn(move || {
        #[cfg(target_os = "linux")]
        if watch_inotify(&path, &hub, &stop, stop_fd) {
            return;
        }
        let _ = stop_fd;
        let Ok(conn) = open_connection(&path, &config) else { return };
        let mut last = -1i64;
        while !stop.load(Ordering::Acquire) {
            if !hub.wait_for_interest(Duration::from_millis(200)) {
                continue;
            }
            let version = {
                let _quiet = quiesce.read();
                conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
            };
            if let Ok(v) = version {
                if v != last {
                    last = v;
                    hub.notify();
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })?;
    Ok(handle)
}

/// Returns false if inotify could not be set up (the caller then polls).
#[cfg(target_os = "linux")]
fn watch_inotify(path: &Path, hub: &Hub, stop: &AtomicBool, stop_fd: libc::c_int) -> bool {
    use inotify::{Inotify, WatchMask};
    use std::os::fd::AsRawFd;

    let Ok(mut inotify) = Inotify::init() else { return false };
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return false };
    let mut wal_name = name.to_os_string();
    wal_name.push("-wal");
    let fd = inotify.as_raw_fd();
    let mut buf = [0u8; 4096];
    // A watch is dropped only after nobody needed it for this long, so waiters that come and go
    // with every claim do not add and remove it all the time.
    let linger = Duration::from_millis(200);
    while !stop.load(Ordering::Acquire) {
        if !hub.wait_for_interest(Duration::from_millis(500)) {
            continue;
        }
        let Ok(wd) = inotify.watches().add(dir, WatchMask::MODIFY | WatchMask::CREATE) else { return false };
        // Commits made before the watch existed are not reported: let every waiter look once.
        hub.notify();
        let mut last_interest = Instant::now();
        while !stop.load(Ordering::Acquire) {
            if hub.interested() {
                last_interest = Instant::now();
            } else if last_interest.elapsed() > linger {
                break;
            }
            let mut fds = [
                libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: stop_fd, events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: fds is a valid array of two pollfd structs.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
            if rc <= 0 || fds[1].revents != 0 {
                continue;
            }
            match inotify.read_events(&mut buf) {
                Ok(events) => {
                    if events.into_iter().any(|e| e.name.is_some_and(|n| n == wal_name.as_os_str())) {
                        hub.notify();
                        // Coalesce bursts: under load every commit writes the WAL.
                        std::thread::sleep(Duration::from_micros(100));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
        }
        let _ = inotify.watches().remove(wd);
        while inotify.read_events(&mut buf).is_ok_and(|events| events.into_iter().next().is_some()) {}
    }
    true
}

/// Frames in the WAL after this process's last commit, and the writers held back while the
/// maintenance thread rewinds it.
#[derive(Default)]
struct WalFrames {
    frames: AtomicU64,
    /// True while a rewinding round runs.
    rewinding: Mutex<bool>,
    done: Condvar,
}

impl WalFrames {
    /// Backpressure: a writer that took the WAL to `max` frames waits (100 ms at most) for the
    /// rewind under way, so a writer faster than checkpoints cannot outgrow the limit. With no
    /// round under way (e.g. a reader of another process pins the WAL) it does not wait.
    fn throttle(&self, max: u64) {
        if self.frames.load(Ordering::Acquire) < max {
            return;
        }
        let deadline = Instant::now() + Duration::from_millis(100);
        let mut rewinding = self.rewinding.lock();
        while *rewinding && self.frames.load(Ordering::Acquire) >= max {
            if self.done.wait_until(&mut rewinding, deadline).timed_out() {
                return;
            }
        }
    }

    fn round(&self, running: bool) {
        *self.rewinding.lock() = running;
        if !running {
            self.done.notify_all();
        }
    }

    /// Every frame is in the database and no local writer is active: the next write rewinds.
    fn rewound(&self) {
        self.frames.store(0, Ordering::Release);
    }
}

/// WAL frames (a page and its 24-byte header each) after which the WAL is rewound: a quarter of
/// the size limit, so a file that keeps up with its writer stays well under it.
fn rewind_frames(config: &Config) -> u64 {
    (config.wal_limit_bytes / 4 / (4096 + 24)).max(64)
}

/// Checkpoints from this thread, never inside a committing caller: PASSIVE after writes, and a
/// TRUNCATE once the -wal file has outgrown its limit (e.g. after a long-lived reader held
/// checkpoints back), so the file shrinks again as soon as nothing pins it.
///
/// SQLite rewinds the WAL (the next frames overwrite the file from its start) only when a write
/// begins with every frame already copied back, which PASSIVE rounds racing a busy writer almost
/// never leave behind. So once the WAL holds [`rewind_frames`] (the writer's WAL hook says when,
/// within one commit), a round copies what it
/// can without blocking anyone, then holds this process's writers off for the few frames
/// committed meanwhile: the next write rewinds. Rewriting pages the file already has costs far
/// less than growing it again after a truncation (the kernel allocates and zeroes every page).
fn spawn_maintenance(db: &Arc<Db>, stop_rx: Receiver<()>) -> Result<JoinHandle<()>> {
    let stop = db.stop.clone();
    let rewind_rx = db.rewind.clone();
    let wal = db.wal.clone();
    let dirty = db.dirty.clone();
    let quiesce = db.quiesce.clone();
    let path = db.path.clone();
    let config = db.config.clone();
    let mut wal_path = path.clone().into_os_string();
    wal_path.push("-wal");
    let wal_path = PathBuf::from(wal_path);
    let handle = std::thread::Builder::new().name("qd-checkpoint".into()).spawn(move || {
        let Ok(conn) = open_connection(&path, &config) else { return };
        // Checkpoints must not wait long for locks: the next round retries.
        let _ = conn.busy_timeout(Duration::from_millis(5));
        let limit = config.wal_limit_bytes;
        // Done when every frame is in the database; otherwise a reader pins the WAL: retry.
        let checkpoint = |mode: &str| {
            let res = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            });
            matches!(res, Ok((0, log, done)) if log == done)
        };
        let mut pending = false;
        let mut size = 0;
        loop {
            // A checkpoint every 100 ms at most: each one copies the pages written since the
            // last, so hot pages rewritten by many commits are copied once. Closer to the limit,
            // look more often.
            let interval = if size > limit / 2 { 20 } else { 100 };
            let rewind = crossbeam_channel::select! {
                recv(stop_rx) -> _ => return,
                recv(rewind_rx) -> _ => true,
                default(Duration::from_millis(interval)) => false,
            };
            if stop.load(Ordering::Acquire) {
                return;
            }
            pending |= dirty.swap(false, Ordering::AcqRel);
            size = std::fs::metadata(&wal_path).map(|m| m.len()).unwrap_or(0);
            if size <= limit && !pending {
                continue;
            }
            if size > limit {
                // Over the limit, PASSIVE rounds never catch up with a busy writer, so the
                // truncating checkpoint runs with this process's writers held off; it waits for
                // other processes' readers only briefly (5 ms) and retries next round.
                let _exclusive = quiesce.write();
                pending = !checkpoint("TRUNCATE");
                if !pending {
                    wal.rewound();
                }
                continue;
            }
            wal.round(rewind);
            pending = !{
                let _shared = quiesce.read();
                checkpoint("PASSIVE")
            };
            if rewind {
                let _exclusive = quiesce.write();
                pending = !checkpoint("PASSIVE");
                if !pending {
                    wal.rewound();
                }
            }
            wal.round(false);
        }
    })?;
    Ok(handle)
}

/// A database the forking thread holds quiet between [`prepare_fork`] and the after-fork calls:
/// its writer lock (through a forgotten guard) and its quiesce lock, exclusively.
struct HeldForFork {
    /// Declared first so it is released before `db` (which keeps the lock alive) is dropped.
    quiet: std::sync::RwLockWriteGuard<'static, ()>,
    db: Arc<Db>,
}

thread_local! {
    /// The registry guard the forking thread holds across fork().
    static REGISTRY_HELD: std::cell::RefCell<Option<std::sync::MutexGuard<'static, Registry>>> =
        const { std::cell::RefCell::new(None) };
    /// The databases the forking thread holds across fork().
    static DBS_HELD: std::cell::RefCell<Vec<HeldForFork>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// SQLite's static mutexes, outer ones first (the order SQLite nests them).
const SQLITE_STATIC_MUTEXES: [libc::c_int; 12] = [
    rusqlite::ffi::SQLITE_MUTEX_STATIC_MAIN,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_OPEN,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_VFS1,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_VFS2,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_VFS3,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_APP1,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_APP2,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_APP3,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_PRNG,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_LRU,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_PMEM,
    rusqlite::ffi::SQLITE_MUTEX_STATIC_MEM,
];

fn sqlite_static_mutexes() -> impl DoubleEndedIterator<Item = *mut rusqlite::ffi::sqlite3_mutex> {
    // SAFETY: with a static id, sqlite3_mutex_alloc returns SQLite's own static mutex (null when
    // built without mutexes).
    SQLITE_STATIC_MUTEXES.iter().map(|&id| unsafe { rusqlite::ffi::sqlite3_mutex_alloc(id) }).filter(|m| !m.is_null())
}

/// Before fork(): waits (up to 2 s per database, so a batch held open by a thread that itself
/// waits for the forking thread cannot deadlock it) until no engine transaction of this process
/// is in flight, then holds SQLite's global mutexes, so the child inherits no lock held by a
/// thread that does not exist there.
pub fn prepare_fork() {
    let wait = Duration::from_secs(2);
    let pid = std::process::id();
    let dbs: Vec<Arc<Db>> = registry().iter().filter(|(p, ..)| *p == pid).filter_map(|(.., w)| w.upgrade()).collect();
    let mut held = Vec::new();
    for db in dbs {
        let Some(writer) = db.writer.try_lock_for(wait) else { continue };
        let quiesce: &RwLock<()> = &db.quiesce;
        // SAFETY: the guard borrows the RwLock inside `db.quiesce` (an Arc), which HeldForFork
        // keeps alive and outlives the guard (field order).
        let quiesce: &'static RwLock<()> = unsafe { &*(quiesce as *const RwLock<()>) };
        let Some(quiet) = quiesce.try_write_for(wait) else {
            drop(writer);
            continue;
        };
        std::mem::forget(writer);
        held.push(HeldForFork { quiet, db });
    }
    DBS_HELD.with(|h| *h.borrow_mut() = held);
    let guard = registry();
    REGISTRY_HELD.with(|h| *h.borrow_mut() = Some(guard));
    for m in sqlite_static_mutexes() {
        // SAFETY: a valid static mutex, left again by the after-fork call on this same thread.
        unsafe { rusqlite::ffi::sqlite3_mutex_enter(m) };
    }
}

fn release_sqlite_and_registry() {
    for m in sqlite_static_mutexes().rev() {
        // SAFETY: entered by prepare_fork on this thread (in the child: its copy).
        unsafe { rusqlite::ffi::sqlite3_mutex_leave(m) };
    }
    REGISTRY_HELD.with(|h| drop(h.borrow_mut().take()));
}

/// After fork(), in the parent (on the thread that called [`prepare_fork`]).
pub fn after_fork_in_parent() {
    release_sqlite_and_registry();
    for HeldForFork { quiet, db } in DBS_HELD.with(|h| std::mem::take(&mut *h.borrow_mut())) {
        drop(quiet);
        // SAFETY: prepare_fork took the writer lock on this thread and forgot the guard.
        unsafe { db.writer.force_unlock() };
    }
}

/// After fork(), in the child. The inherited databases are abandoned (each Store opens the file
/// again at its next use), so their locks are left held: nothing here uses them again.
pub fn after_fork_in_child() {
    release_sqlite_and_registry();
    std::mem::forget(DBS_HELD.with(|h| std::mem::take(&mut *h.borrow_mut())));
}
