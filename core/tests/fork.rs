//! A process that forks while engine threads are busy (the preload-and-fork pattern of app
//! servers): with the fork hooks, the child's Store works on its first use and the parent's
//! keeps working. Its own binary: fork and the test harness's threads do not mix with others.

mod common;

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
const FORK_ROUNDS: usize = 100;

#[test]
fn forking_while_the_engine_is_busy_keeps_both_sides_working() {
    let db = sqlite();
    fork_while_busy(&db.store, FORK_ROUNDS, child_body, || (), |()| ());
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    let ok: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(ok, "ok");
    let from_children: i64 =
        conn.query_row("SELECT count(*) FROM tasks WHERE target LIKE '%from_child'", [], |r| r.get(0)).unwrap();
    assert_eq!(from_children as usize, FORK_ROUNDS);
}
