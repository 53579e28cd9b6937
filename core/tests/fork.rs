//! A process that forks while engine threads are busy (the preload-and-fork pattern of app
//! servers): with the fork hooks, the child's Store works on its first use and the parent's
//! keeps working. Its own binary: fork and the test harness's threads do not mix with others.

mod common;

use std::time::{Duration, Instant};

use common::*;
use queue_dispatcher_core::*;

fn child_body(store: &Store) -> i32 {
    let Ok(e) = store.enqueue(py("from_child")) else { return 2 };
    match store.task(e.id) {
        Ok(t) if t.state == State::New || t.state == State::Running || t.state == State::Successful => 0,
        _ => 3,
    }
}

/// Enough forks that one lands while a parent thread is inside a lock's slow path (a child of a
/// busy PostgreSQL-backed process hung within 20-odd rounds while locks used parking_lot).
const FORK_ROUNDS: i64 = 100;

#[test]
fn forking_while_the_engine_is_busy_keeps_both_sides_working() {
    let db = sqlite();
    let store = db.store.clone();
    let d = dispatcher(&store, Runtime::Python);
    let stop = std::sync::atomic::AtomicBool::new(false);
    /// Stops the busy threads even when an assertion fails, so the failure is reported.
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        // Keep the writer, the checkpointer and an enqueuer busy while forking.
        for _ in 0..2 {
            let w = d.worker();
            let stop = &stop;
            s.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(Some(c)) = w.claim(Some(Duration::from_millis(20))) {
                        let _ = w.complete(&c, Outcome::Success("null".into()));
                    }
                }
            });
        }
        let enq = store.clone();
        let stop_ref = &stop;
        s.spawn(move || {
            while !stop_ref.load(std::sync::atomic::Ordering::Relaxed) {
                enq.enqueue(py("busy")).unwrap();
            }
        });
        for round in 0..FORK_ROUNDS {
            fork::prepare();
            // SAFETY: the child only runs engine calls prepared for it by fork::prepare/after and
            // leaves with _exit, never returning into the test harness.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                fork::after_in_child();
                let code = child_body(&store);
                unsafe { libc::_exit(code) };
            }
            fork::after_in_parent();
            assert!(pid > 0, "fork failed");
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut status = 0;
            loop {
                // SAFETY: waiting on our own child.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid {
                    break;
                }
                if Instant::now() > deadline {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    panic!("round {round}: child {pid} hung after fork");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "round {round}: child status {status}");
            store.enqueue(py("parent_after_fork")).expect("the parent's store still works");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    let from_children: i64 =
        conn.query_row("SELECT count(*) FROM tasks WHERE target LIKE '%from_child'", [], |r| r.get(0)).unwrap();
    assert_eq!(from_children, FORK_ROUNDS);
}
