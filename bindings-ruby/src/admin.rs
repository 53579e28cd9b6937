//! Small pieces the Ruby CLI and benchmark need: target-name checks, ages, pid files, and the
//! same-run engine/SQLite baselines the Ruby benchmark compares itself with. Called on Ruby
//! threads; the baselines run without the GVL (the drain on Rust threads that never touch Ruby).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use magnus::Error;
use queue_dispatcher_core::{
    admin, target, Config, Dispatcher, DispatcherConfig, NewTask, Outcome, PidFile, Runtime, Store,
};
use rusqlite::Connection;

use crate::errors::{invalid, IntoRb};
use crate::nogvl::{no_ubf, without_gvl};

/// Raises InvalidInputError unless `name` may be a Ruby task target (syntax, private names,
/// methods of Object/Kernel/BasicObject/Module/Class) — the part of the rule a name shows.
pub fn validate_target(name: String) -> Result<(), Error> {
    target::validate(Runtime::Ruby, &name).rb()
}

/// `7d`, `12h`, `90` ... as seconds.
pub fn parse_age(text: String) -> Result<f64, Error> {
    Ok(admin::parse_age(&text).rb()?.as_secs_f64())
}

/// A held pid file (`-b/--background`); `release` (or process exit) lets it go.
#[magnus::wrap(class = "QueueDispatcher::Native::PidFile", free_immediately, size)]
pub struct RbPidFile(Mutex<Option<PidFile>>);

impl RbPidFile {
    pub fn acquire(path: String) -> Result<RbPidFile, Error> {
        Ok(RbPidFile(Mutex::new(Some(PidFile::acquire(Path::new(&path)).rb()?))))
    }

    pub fn release(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn path(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|p| p.path().display().to_string())
    }
}

/// Raw SQLite baseline: `n` transactions of one INSERT of `payload` each, with the engine's
/// connection settings (WAL, synchronous=NORMAL). Returns transactions per second.
pub fn bench_sqlite_insert(path: String, n: usize, payload: String) -> Result<f64, Error> {
    without_gvl(
        move || -> rusqlite::Result<f64> {
            let conn = Connection::open(&path)?;
            let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            conn.execute_batch(
                "PRAGMA synchronous = NORMAL; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -8000;
                 CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload TEXT NOT NULL);",
            )?;
            let mut begin = conn.prepare("BEGIN IMMEDIATE")?;
            let mut insert = conn.prepare("INSERT INTO t (payload) VALUES (?1)")?;
            let mut commit = conn.prepare("COMMIT")?;
            let mut tx = || -> rusqlite::Result<()> {
                begin.execute([])?;
                insert.execute([&payload])?;
                commit.execute([])?;
                Ok(())
            };
            for _ in 0..(n / 10).max(50) {
                tx()?;
            }
            let start = Instant::now();
            for _ in 0..n {
                tx()?;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        },
        no_ubf,
    )?
    .map_err(|e| invalid("bench", e.to_string()))
}

/// The engine's own `Store::enqueue` loop on `path` (the `core_enqueue` figure): `n` tasks of
/// `target` with `args_json`, one per call. Returns tasks per second.
pub fn bench_core_enqueue(path: String, n: usize, target: String, args_json: String) -> Result<f64, Error> {
    let store = without_gvl(|| Store::open(&Config::new(&path)), no_ubf)?.rb()?;
    let task = NewTask::new(Runtime::Ruby, target).args(args_json);
    without_gvl(
        move || -> queue_dispatcher_core::Result<f64> {
            for _ in 0..(n / 10).max(50) {
                store.enqueue(task.clone())?;
            }
            let start = Instant::now();
            for _ in 0..n {
                store.enqueue(task.clone())?;
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        },
        no_ubf,
    )?
    .rb()
}

/// The engine's own drain ceiling (the `core_claim_complete_2t` shape): `workers` Rust threads of
/// one dispatcher on `path` loop `complete_and_claim` until no task comes for 300 ms. Returns
/// tasks per second. Rust threads only: no Ruby code runs while it drains.
pub fn bench_core_drain(path: String, workers: usize) -> Result<f64, Error> {
    let idle = Duration::from_millis(300);
    let drained = without_gvl(
        move || -> queue_dispatcher_core::Result<f64> {
            let store = Store::open(&Config::new(&path))?;
            let mut cfg = DispatcherConfig::new(Runtime::Ruby);
            cfg.workers = workers;
            let d = Dispatcher::start(&store, cfg)?;
            let done = AtomicUsize::new(0);
            let start = Instant::now();
            std::thread::scope(|s| {
                for _ in 0..workers {
                    let (w, done) = (d.worker(), &done);
                    s.spawn(move || {
                        let mut next = w.claim(Some(idle)).ok().flatten();
                        while let Some(c) = next {
                            done.fetch_add(1, Ordering::Relaxed);
                            next =
                                w.complete_and_claim(&c, Outcome::Success("null".into()), Some(idle)).1.ok().flatten();
                        }
                    });
                }
            });
            let secs = (start.elapsed().saturating_sub(idle)).as_secs_f64();
            d.shutdown(Duration::ZERO)?;
            Ok(done.load(Ordering::Relaxed) as f64 / secs)
        },
        no_ubf,
    )?;
    drained.rb()
}

/// `Process._fork` hook, before the fork: waits (without the GVL, so a thread finishing a batch
/// can run) until no engine transaction is in flight, then holds the engine's and SQLite's locks.
pub fn before_fork() -> Result<(), Error> {
    without_gvl(queue_dispatcher_core::fork::prepare, no_ubf)
}

/// `Process._fork` hook, after the fork: releases them (in the child only SQLite's: the
/// inherited databases are abandoned and opened again at their next use).
pub fn after_fork(in_child: bool) {
    if in_child {
        queue_dispatcher_core::fork::after_in_child();
    } else {
        queue_dispatcher_core::fork::after_in_parent();
    }
}
