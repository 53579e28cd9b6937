//! Leases must not be fooled by wall-clock steps. Its own test binary: the step is process-wide.

mod common;

use std::time::Duration;

use common::*;
use queue_dispatcher_core::*;

#[test]
fn wall_clock_steps_do_not_expire_or_extend_leases() {
    let db = sqlite();
    let id = db.store.enqueue(py("long")).unwrap().id;
    let mut cfg = DispatcherConfig::new(Runtime::Python);
    cfg.lease = Duration::from_millis(800);
    cfg.heartbeat = Duration::from_millis(100);
    let owner = Dispatcher::start(&db.store, cfg.clone()).unwrap();
    let w = owner.worker();
    let c = claim(&w);
    let observer = Dispatcher::start(&db.store, cfg).unwrap();
    for step in [2 * 3600, -4 * 3600, 3600] {
        clock::step_wall_clock(step * 1_000_000);
        std::thread::sleep(Duration::from_millis(1500));
        let t = db.store.task(id).unwrap();
        assert_eq!((t.state, t.lost), (State::Running, 0), "a live dispatcher kept its task across a {step} s step");
        assert!(db.store.dispatchers().unwrap().iter().all(|d| d.alive));
    }
    assert_eq!(ok(&w, &c), Settled::Successful);
    drop(observer);
}
