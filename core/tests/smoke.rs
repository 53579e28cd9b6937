mod common;
use common::*;
use queue_dispatcher_core::*;
use std::time::Duration;

#[test]
fn smoke() {
    let db = sqlite();
    let a = db.store.enqueue(py("a").queue("q")).unwrap();
    let b = db.store.enqueue(py("b").queue("q")).unwrap();
    let p = db.store.enqueue(py("p")).unwrap();
    let d = dispatcher(&db.store, Runtime::Python);
    let w1 = d.worker();
    let w2 = d.worker();
    let c1 = claim(&w1);
    let c2 = claim(&w2);
    let ids = [c1.task.id, c2.task.id];
    assert!(ids.contains(&a.id) && ids.contains(&p.id), "{ids:?}");
    claim_none(&w2, Duration::from_millis(100));
    ok(&w1, &c1);
    ok(&w2, &c2);
    let c3 = claim(&w1);
    assert_eq!(c3.task.id, b.id);
    ok(&w1, &c3);
    assert_eq!(db.store.task(b.id).unwrap().state, State::Successful);
    d.shutdown(Duration::from_secs(1)).unwrap();
}
