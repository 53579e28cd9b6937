//! The semantic suite (DESIGN.md "Semantics"), run against every store in `common::stores()`.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use queue_dispatcher_core::*;

/// Runs `body` once per store.
fn each_store(body: impl Fn(&Store, &TestDb)) {
    for (name, db) in stores() {
        eprintln!("-- store: {name}");
        body(&db.store, &db);
    }
}

fn fast_dispatcher(store: &Store, runtime: Runtime, lease: Duration) -> Dispatcher {
    let mut cfg = DispatcherConfig::new(runtime);
    cfg.lease = lease;
    cfg.heartbeat = lease / 5;
    cfg.retry_base = Duration::from_millis(20);
    cfg.retry_cap = Duration::from_millis(50);
    Dispatcher::start(store, cfg).unwrap()
}

#[test]
fn enqueue_stores_fields_with_defaults() {
    each_store(|s, _| {
        let e = s.enqueue(py("send").args(r#"{"args":[1,"x"],"kwargs":{"to":"a@b"}}"#).meta(r#"{"user":7}"#)).unwrap();
        assert!(!e.existing);
        let t = s.task(e.id).unwrap();
        assert_eq!(t.state, State::New);
        assert_eq!(t.priority, DEFAULT_PRIORITY);
        assert_eq!(t.runtime, Runtime::Python);
        assert_eq!(t.target, "tests.jobs:send");
        assert_eq!(t.args, r#"{"args":[1,"x"],"kwargs":{"to":"a@b"}}"#, "payload stored byte for byte");
        assert_eq!(t.meta.as_deref(), Some(r#"{"user":7}"#));
        assert_eq!((t.attempts, t.retries, t.lost), (0, 0, 0));
        assert!(t.enqueued_at > 0 && t.run_at >= t.enqueued_at);
        assert!(matches!(s.task(e.id + 1000), Err(Error::NotFound(_))));
    });
}

#[test]
fn bad_input_is_refused_with_the_field_named() {
    each_store(|s, _| {
        let cases: Vec<(NewTask, &str)> = vec![
            (py("x").args("{not json"), "args"),
            (py("x").args("[1,2]"), "args"),
            (py("x").args(r#"{"args": 5}"#), "args"),
            (py("x").args(r#"{"args": [NaN]}"#), "args"),
            (py("x").meta("[1]"), "meta"),
            (py("x").queue(""), "queue"),
            (NewTask::new(Runtime::Python, "no_colon"), "target"),
            (NewTask::new(Runtime::Python, "mod:_private"), "target"),
            (NewTask::new(Runtime::Ruby, "Kernel#system"), "target"),
            (NewTask::new(Runtime::Ruby, "LongRunningMailJob.class_eval"), "target"),
            (py("x").unique_key(""), "unique_key"),
            (NewTask::new(Runtime::Ruby, "Report#build"), "receiver"),
            (NewTask { receiver: Some("7".into()), ..NewTask::new(Runtime::Ruby, "Report.build") }, "receiver"),
            (NewTask { receiver: Some("7".into()), ..py("x") }, "receiver"),
        ];
        for (task, field) in cases {
            match s.enqueue(task.clone()) {
                Err(Error::InvalidInput { field: f, message }) => {
                    assert_eq!(f, field, "{task:?}: {message}");
                    assert!(!message.is_empty());
                }
                other => panic!("{task:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            s.enqueue(py("x").depends_on([424242])),
            Err(Error::MissingDependency { dependency: 424242, .. })
        ));
        assert!(s.list(&TaskFilter::default()).unwrap().is_empty(), "nothing stored by refused enqueues");
    });
}

#[test]
fn enqueue_many_is_all_or_nothing() {
    each_store(|s, _| {
        let ids = s.enqueue_many(&[py("a"), py("b").queue("q"), py("c")]).unwrap();
        assert_eq!(ids.len(), 3);
        let err = s.enqueue_many(&[py("d"), py("e").args("oops"), py("f")]);
        assert!(matches!(err, Err(Error::InvalidInput { .. })));
        assert_eq!(s.list(&TaskFilter::default()).unwrap().len(), 3, "none of the failed batch is visible");
    });
}

#[test]
fn lower_priority_value_runs_first_then_id() {
    each_store(|s, _| {
        let a = s.enqueue(py("a").priority(100)).unwrap().id;
        let b = s.enqueue(py("b").priority(5)).unwrap().id;
        let c = s.enqueue(py("c").priority(100)).unwrap().id;
        let q = s.enqueue(py("q").queue("mail").priority(50)).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let order: Vec<TaskId> = (0..4)
            .map(|_| {
                let c = claim(&w);
                ok(&w, &c);
                c.task.id
            })
            .collect();
        assert_eq!(order, vec![b, q, a, c]);
    });
}

/// Tasks enqueued one per call and tasks enqueued together are ordered alike, whichever claim
/// sees them first (SQLite keeps the former out of its ready index until a claim).
#[test]
fn priority_order_holds_across_single_and_batch_enqueues() {
    each_store(|s, _| {
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let warm = s.enqueue(py("warm")).unwrap().id;
        assert_eq!(claim(&w).task.id, warm, "an idle worker gets a lone task");
        let late = s.enqueue(py("late").priority(200)).unwrap().id;
        let batch = s.enqueue_many(&[py("b1").priority(50), py("b2").priority(150)]).unwrap();
        let first = s.enqueue(py("first").priority(1)).unwrap().id;
        let mid = s.enqueue(py("mid").priority(100)).unwrap().id;
        let order: Vec<TaskId> = (0..5)
            .map(|_| {
                let c = claim(&w);
                ok(&w, &c);
                c.task.id
            })
            .collect();
        assert_eq!(order, vec![first, batch[0].id, mid, batch[1].id, late]);
    });
}

/// Ids of purged tasks may be handed out again; a task that gets one is claimed all the same.
#[test]
fn a_task_enqueued_after_the_newest_tasks_were_purged_is_claimed() {
    each_store(|s, _| {
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let ids: Vec<TaskId> = (0..3).map(|i| s.enqueue(py(&format!("old{i}"))).unwrap().id).collect();
        for _ in 0..3 {
            let c = claim(&w);
            ok(&w, &c);
        }
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.purge(Duration::ZERO).unwrap(), 3);
        let fresh = s.enqueue(py("fresh")).unwrap().id;
        let c = claim(&w);
        assert_eq!(c.task.id, fresh, "purged ids {ids:?}");
        ok(&w, &c);
        assert_eq!(s.task(fresh).unwrap().state, State::Successful);
    });
}

#[test]
fn named_queue_is_serial_and_skips_tasks_that_are_not_ready() {
    each_store(|s, _| {
        let blocker = s.enqueue(py("blocker")).unwrap().id;
        let q1 = s.enqueue(py("q1").queue("mail")).unwrap().id;
        let waiting = s.enqueue(py("waits").queue("mail").depends_on([blocker])).unwrap().id;
        let later = s.enqueue(py("later").queue("mail").delay(Duration::from_secs(3600))).unwrap().id;
        let q2 = s.enqueue(py("q2").queue("mail")).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let (w1, w2) = (d.worker(), d.worker());
        let first = claim(&w1);
        let second = claim(&w2);
        let got: HashSet<TaskId> = [first.task.id, second.task.id].into();
        assert_eq!(got, HashSet::from([q1, blocker]), "queue head and the parallel task run together");
        let w3 = d.worker();
        claim_none(&w3, Duration::from_millis(150));
        let (qc, other) = if first.task.id == q1 { (&first, &second) } else { (&second, &first) };
        ok(&w1, qc);
        let next = claim(&w3);
        assert_eq!(next.task.id, q2, "blocked and delayed tasks are skipped, not waited for");
        ok(&w3, &next);
        ok(&w2, other);
        let after = claim(&w3);
        assert_eq!(after.task.id, waiting);
        ok(&w3, &after);
        assert_eq!(s.task(later).unwrap().state, State::New);
    });
}

#[test]
fn the_schema_itself_refuses_a_second_running_task_in_a_queue() {
    let db = sqlite();
    let a = db.store.enqueue(py("a").queue("q")).unwrap().id;
    let b = db.store.enqueue(py("b").queue("q")).unwrap().id;
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    conn.execute("UPDATE tasks SET state = 'running' WHERE id = ?1", [a]).unwrap();
    let err = conn.execute("UPDATE tasks SET state = 'running' WHERE id = ?1", [b]).unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");
    let bad_runtime = conn.execute("INSERT INTO tasks (runtime, target) VALUES ('perl', 'x')", []).unwrap_err();
    assert!(bad_runtime.to_string().contains("CHECK"), "{bad_runtime}");
}

#[test]
fn parallel_tasks_run_concurrently_across_threads() {
    each_store(|s, _| {
        for i in 0..8 {
            s.enqueue(py(&format!("p{i}"))).unwrap();
        }
        let d = dispatcher(s, Runtime::Python);
        let workers: Vec<Worker> = (0..8).map(|_| d.worker()).collect();
        // Each claim finds a ready task: it must not wait for the writer's idle timeout (5 s).
        let held: Vec<Claimed> = workers
            .iter()
            .map(|w| w.claim(Some(Duration::from_secs(2))).unwrap().expect("a ready task, claimed without delay"))
            .collect();
        assert_eq!(held.iter().map(|c| c.task.id).collect::<HashSet<_>>().len(), 8);
        for (w, c) in workers.iter().zip(&held) {
            ok(w, c);
        }
    });
}

#[test]
fn a_named_queue_never_runs_two_at_once_across_many_threads() {
    each_store(|s, _| {
        let n = 200;
        for i in 0..n {
            s.enqueue(py("t").queue(if i % 2 == 0 { "even" } else { "odd" }).args(format!(r#"{{"args":[{i}]}}"#)))
                .unwrap();
        }
        let d = dispatcher(s, Runtime::Python);
        let running = std::sync::Mutex::new(HashSet::<String>::new());
        let done = std::sync::atomic::AtomicUsize::new(0);
        let order = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..6 {
                let w = d.worker();
                let (running, done, order) = (&running, &done, &order);
                scope.spawn(move || {
                    while done.load(std::sync::atomic::Ordering::SeqCst) < n {
                        let Some(c) = w.claim(Some(Duration::from_millis(50))).unwrap() else { continue };
                        let q = c.task.queue.clone().unwrap();
                        assert!(running.lock().unwrap().insert(q.clone()), "two tasks of {q} at once");
                        order.lock().unwrap().push((q.clone(), c.task.id));
                        std::thread::sleep(Duration::from_micros(200));
                        running.lock().unwrap().remove(&q);
                        ok(&w, &c);
                        done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                });
            }
        });
        for q in ["even", "odd"] {
            let ids: Vec<TaskId> = order.lock().unwrap().iter().filter(|(n, _)| n == q).map(|(_, id)| *id).collect();
            let mut sorted = ids.clone();
            sorted.sort();
            assert_eq!(ids, sorted, "queue {q} ran in id order");
        }
    });
}

#[test]
fn dependencies_cross_queues_and_wait_for_success() {
    each_store(|s, _| {
        let a = s.enqueue(py("a").queue("one")).unwrap().id;
        let b = s.enqueue(py("b").queue("two").depends_on([a])).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let c = claim(&w);
        assert_eq!(c.task.id, a);
        claim_none(&d.worker(), Duration::from_millis(100));
        ok(&w, &c);
        let c = claim(&w);
        assert_eq!(c.task.id, b);
        assert_eq!(s.task(b).unwrap().depends_on, vec![a]);
        ok(&w, &c);
    });
}

#[test]
fn dependencies_added_later_only_while_new_and_never_claimed() {
    each_store(|s, _| {
        let a = s.enqueue(py("a")).unwrap().id;
        let b = s.enqueue(py("b")).unwrap().id;
        let c = s.enqueue(py("c")).unwrap().id;
        s.add_dependencies(b, &[a]).unwrap();
        s.add_dependencies(c, &[b]).unwrap();
        assert!(
            matches!(s.add_dependencies(a, &[c]), Err(Error::DependencyCycle { task, dependency }) if task == a && dependency == c)
        );
        assert!(matches!(s.add_dependencies(a, &[a]), Err(Error::DependencyCycle { .. })));
        assert!(matches!(s.add_dependencies(a, &[999_999]), Err(Error::MissingDependency { .. })));
        assert!(matches!(s.add_dependencies(999_999, &[a]), Err(Error::NotFound(999_999))));
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let got = claim(&w);
        assert_eq!(got.task.id, a);
        let x = s.enqueue(py("x")).unwrap().id;
        let err = s.add_dependencies(a, &[x]).unwrap_err();
        assert!(matches!(err, Error::InvalidState { task, .. } if task == a), "{err}");
        assert!(err.to_string().contains("cannot add a dependency"), "{err}");
        ok(&w, &got);
        let err = s.add_dependencies(a, &[x]).unwrap_err();
        assert!(matches!(err, Error::InvalidState { state: State::Successful, .. }), "{err}");
    });
}

#[test]
fn a_failed_dependency_fails_dependents_transitively_without_running_them() {
    each_store(|s, _| {
        let a = s.enqueue(py("a").queue("q1")).unwrap().id;
        let b = s.enqueue(rb("b").queue("q2").depends_on([a])).unwrap().id;
        let c = s.enqueue(py("c").depends_on([b])).unwrap().id;
        let unrelated = s.enqueue(py("ok").queue("q2")).unwrap().id;
        let py_d = dispatcher(s, Runtime::Python);
        let rb_d = dispatcher(s, Runtime::Ruby);
        let (pw, rw) = (py_d.worker(), rb_d.worker());
        let first = claim(&pw);
        assert_eq!(first.task.id, a);
        assert!(matches!(fail(&pw, &first, "boom"), Settled::Failed(_)));
        // The Ruby dependent is handed to a Ruby worker for its on_error callback, not run.
        let handed = claim(&rw);
        assert_eq!((handed.task.id, handed.kind), (b, ClaimKind::OnError));
        assert_eq!(handed.task.state, State::Error);
        let err = handed.task.error.clone().unwrap();
        assert_eq!(err.class, "DependencyFailed");
        assert!(err.message.contains(&format!("dependency {a}")) && err.message.contains("boom"), "{}", err.message);
        assert!(rw.complete(&handed, Outcome::Success("1".into())).is_err(), "nothing to complete for a handover");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let x = claim(&pw);
            seen.push((x.task.id, x.kind));
            if x.kind == ClaimKind::Run {
                ok(&pw, &x);
            }
        }
        seen.sort();
        assert_eq!(seen, vec![(c, ClaimKind::OnError), (unrelated, ClaimKind::Run)]);
        let ct = s.task(c).unwrap();
        assert_eq!(ct.state, State::Error);
        assert!(ct.error.unwrap().message.contains(&format!("dependency {b}")));
        assert_eq!(ct.attempts, 0, "never ran");
    });
}

#[test]
fn dependents_enqueued_while_their_dependencies_finish_are_never_missed() {
    each_store(|s, _| {
        // Ruby dependencies, finished by a Ruby worker while four threads add Python dependents.
        let good = s.enqueue(rb("good")).unwrap().id;
        let bad = s.enqueue(rb("bad")).unwrap().id;
        let rd = dispatcher(s, Runtime::Ruby);
        let rw = rd.worker();
        let made: Vec<(TaskId, TaskId)> = std::thread::scope(|sc| {
            let enqueuers: Vec<_> = (0..4)
                .map(|t| {
                    sc.spawn(move || {
                        (0..60)
                            .map(|i| {
                                let dep = if (t + i) % 2 == 0 { good } else { bad };
                                (s.enqueue(py(&format!("d{t}_{i}")).depends_on([dep])).unwrap().id, dep)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(5));
            for _ in 0..2 {
                let c = claim(&rw);
                if c.task.id == good {
                    ok(&rw, &c);
                } else {
                    fail(&rw, &c, "boom");
                }
            }
            enqueuers.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(made.len(), 240);
        // Each dependent of `good` runs once; each dependent of `bad` is handed over, never run.
        let should_run: HashSet<TaskId> = made.iter().filter(|(_, d)| *d == good).map(|(id, _)| *id).collect();
        let should_fail: HashSet<TaskId> = made.iter().filter(|(_, d)| *d == bad).map(|(id, _)| *id).collect();
        let pd = dispatcher(s, Runtime::Python);
        let pw = pd.worker();
        let (mut ran, mut handed) = (HashSet::new(), HashSet::new());
        while ran.len() + handed.len() < made.len() {
            let c = pw
                .claim(Some(Duration::from_secs(5)))
                .unwrap()
                .unwrap_or_else(|| panic!("{} ran and {} were handed over, of 240", ran.len(), handed.len()));
            match c.kind {
                ClaimKind::Run => {
                    assert!(ran.insert(c.task.id));
                    ok(&pw, &c);
                }
                ClaimKind::OnError => assert!(handed.insert(c.task.id)),
            }
        }
        assert_eq!(ran, should_run, "every dependent of the successful task ran, and only those");
        assert_eq!(handed, should_fail, "every dependent of the failed task failed without running");
    });
}

#[test]
fn a_dependency_on_a_missing_row_fails_the_dependent() {
    let db = sqlite();
    let t = db.store.enqueue(py("t")).unwrap().id;
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    let dependent = db.store.enqueue(py("d")).unwrap().id;
    conn.execute("INSERT INTO task_deps (task_id, depends_on) VALUES (?1, 777777)", [dependent]).unwrap();
    let d = dispatcher(&db.store, Runtime::Python);
    let w = d.worker();
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let c = claim(&w);
        kinds.push((c.task.id, c.kind));
        if c.kind == ClaimKind::Run {
            ok(&w, &c);
        }
    }
    kinds.sort();
    assert_eq!(kinds, vec![(t, ClaimKind::Run), (dependent, ClaimKind::OnError)]);
    let msg = db.store.task(dependent).unwrap().error.unwrap().message;
    assert!(msg.contains("777777") && msg.contains("does not exist"), "{msg}");
}

#[test]
fn delayed_tasks_wait_for_run_at() {
    each_store(|s, _| {
        let start = Instant::now();
        let id = s.enqueue(py("later").delay(Duration::from_millis(300))).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let c = claim(&w);
        assert_eq!(c.task.id, id);
        assert!(start.elapsed() >= Duration::from_millis(290), "ran after {:?}", start.elapsed());
        assert!(start.elapsed() < Duration::from_secs(3), "woke up for run_at, {:?}", start.elapsed());
        ok(&w, &c);
    });
}

#[test]
fn retries_back_off_keep_history_and_hold_their_queue() {
    each_store(|s, _| {
        let id = s.enqueue(py("flaky").queue("q").retries(2)).unwrap().id;
        let next_in_queue = s.enqueue(py("next").queue("q")).unwrap().id;
        let d = fast_dispatcher(s, Runtime::Python, Duration::from_secs(5));
        let w = d.worker();
        for attempt in 1..=2 {
            let c = claim(&w);
            assert_eq!(c.task.id, id, "the retrying task keeps its queue's place (attempt {attempt})");
            assert_eq!(c.task.attempts, attempt);
            match fail(&w, &c, &format!("fail {attempt}")) {
                Settled::Retrying { run_at, error } => {
                    assert!(run_at > clock::now_micros() - 1_000_000);
                    assert_eq!(error.message, format!("fail {attempt}"));
                }
                other => panic!("{other:?}"),
            }
            let t = s.task(id).unwrap();
            assert_eq!(t.state, State::New);
            assert_eq!(s.task(next_in_queue).unwrap().state, State::New, "nothing else of the queue started");
        }
        let c = claim(&w);
        assert_eq!(c.task.id, id);
        assert!(matches!(fail(&w, &c, "fail 3"), Settled::Failed(_)));
        let t = s.task(id).unwrap();
        assert_eq!((t.state, t.attempts), (State::Error, 3));
        let history: Vec<&str> = t.error_history.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(history, vec!["fail 1", "fail 2", "fail 3"]);
        let c = claim(&w);
        assert_eq!(c.task.id, next_in_queue);
        ok(&w, &c);
    });
}

#[test]
fn timeouts_raise_the_flag_and_store_a_timeout_error() {
    each_store(|s, _| {
        let id = s.enqueue(py("slow").timeout(Duration::from_millis(100)).retries(1)).unwrap().id;
        let d = fast_dispatcher(s, Runtime::Python, Duration::from_secs(5));
        let w = d.worker();
        let c = claim(&w);
        wait_until("timeout flag", Duration::from_secs(3), || c.cancelled() == Some(CancelReason::Timeout));
        match w.complete(&c, Outcome::Success("1".into())).unwrap() {
            Settled::Retrying { error, .. } => assert_eq!(error.class, "Timeout"),
            other => panic!("{other:?}"),
        }
        let c = claim(&w);
        assert_eq!(c.cancelled(), None, "a new attempt starts with a clear flag");
        wait_until("timeout flag", Duration::from_secs(3), || c.cancelled().is_some());
        assert!(
            matches!(w.complete(&c, Outcome::Success("1".into())).unwrap(), Settled::Failed(e) if e.class == "Timeout")
        );
        assert_eq!(s.task(id).unwrap().state, State::Error);
    });
}

#[test]
fn unique_key_returns_the_unfinished_holder() {
    each_store(|s, _| {
        let a = s.enqueue(py("a").unique_key("report-1")).unwrap();
        let again = s.enqueue(py("a").unique_key("report-1")).unwrap();
        assert_eq!((again.id, again.existing), (a.id, true));
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let c = claim(&w);
        assert_eq!(s.enqueue(py("a").unique_key("report-1")).unwrap().id, a.id, "still held while running");
        ok(&w, &c);
        let fresh = s.enqueue(py("a").unique_key("report-1")).unwrap();
        assert!(!fresh.existing && fresh.id != a.id);
    });
}

#[test]
fn listings_filter_by_state_queue_runtime_and_meta() {
    each_store(|s, _| {
        let a = s.enqueue(py("a").queue("q").meta(r#"{"user": 7, "kind": "mail"}"#)).unwrap().id;
        let b = s.enqueue(py("b").meta(r#"{"user": 8}"#)).unwrap().id;
        let c = s.enqueue(rb("c").meta(r#"{"user": 7}"#)).unwrap().id;
        let ids = |f: TaskFilter| s.list(&f).unwrap().iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(ids(TaskFilter { meta: vec![("user".into(), "7".into())], ..Default::default() }), vec![a, c]);
        assert_eq!(ids(TaskFilter { meta: vec![("kind".into(), "\"mail\"".into())], ..Default::default() }), vec![a]);
        assert_eq!(ids(TaskFilter { queue: Some(None), ..Default::default() }), vec![b, c]);
        assert_eq!(ids(TaskFilter { queue: Some(Some("q".into())), ..Default::default() }), vec![a]);
        assert_eq!(ids(TaskFilter { runtime: Some(Runtime::Ruby), ..Default::default() }), vec![c]);
        assert_eq!(ids(TaskFilter { states: vec![State::Running], ..Default::default() }), Vec::<TaskId>::new());
        assert_eq!(ids(TaskFilter { limit: Some(1), descending: true, ..Default::default() }), vec![c]);
    });
}

#[test]
fn cancel_aborts_new_tasks_and_flags_running_ones() {
    each_store(|s, _| {
        let queued = s.enqueue(py("queued").delay(Duration::from_secs(60))).unwrap().id;
        let running = s.enqueue(py("running")).unwrap().id;
        assert_eq!(s.cancel(queued).unwrap(), State::Aborted);
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        // The task cancelled while new still owes its on_error callback to a worker.
        let h = claim(&w);
        assert_eq!((h.task.id, h.kind, h.task.state), (queued, ClaimKind::OnError, State::Aborted));
        let c = claim(&w);
        assert_eq!(c.task.id, running);
        assert_eq!(s.cancel(running).unwrap(), State::Running);
        assert_eq!(c.cancelled(), Some(CancelReason::Cancelled), "in-process cancel is seen at once");
        assert!(matches!(ok(&w, &c), Settled::Aborted(e) if e.class == "Cancelled"));
        assert_eq!(s.task(running).unwrap().state, State::Aborted);
        claim_none(&w, Duration::from_millis(100));
        assert_eq!(s.cancel(running).unwrap(), State::Aborted, "finished tasks are left alone");
    });
}

#[test]
fn progress_is_visible_to_other_connections_while_running() {
    let db = sqlite();
    let id = db.store.enqueue(py("p")).unwrap().id;
    let d = dispatcher(&db.store, Runtime::Python);
    let w = d.worker();
    let c = claim(&w);
    w.progress(&c, Some("half way"), Some(50.0)).unwrap();
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    wait_until("progress row", Duration::from_secs(2), || {
        conn.query_row("SELECT message, perc_finished FROM tasks WHERE id = ?1", [id], |r| {
            Ok(r.get::<_, Option<String>>(0)?.as_deref() == Some("half way")
                && r.get::<_, Option<f64>>(1)? == Some(50.0))
        })
        .unwrap()
    });
    for i in 0..100 {
        w.progress(&c, Some(&format!("step {i}")), Some(i as f64)).unwrap();
    }
    assert!(w.progress(&c, None, Some(150.0)).is_err());
    ok(&w, &c);
    let t = db.store.task(id).unwrap();
    assert_eq!((t.message.as_deref(), t.perc_finished), (Some("step 99"), Some(99.0)), "the last report is kept");
}

#[test]
fn lost_runs_are_recovered_counted_apart_and_stale_outcomes_refused() {
    each_store(|s, db| {
        let id = s.enqueue(py("t").queue("q")).unwrap().id;
        let mut cfg = DispatcherConfig::new(Runtime::Python);
        cfg.heartbeat = Duration::from_secs(30);
        cfg.lease = Duration::from_secs(60);
        let victim = Dispatcher::start(s, cfg).unwrap();
        let vw = victim.worker();
        let c = claim(&vw);
        // Its heartbeat goes stale (as if it hung): age it past its lease, once its ticker has
        // done its first heartbeat (which would otherwise undo the ageing).
        let beat = format!("SELECT heartbeat_at > started_at FROM dispatchers WHERE id = {}", victim.id());
        wait_until("the victim's first heartbeat", Duration::from_secs(5), || db.query_bool(&beat, &beat));
        db.exec(
            &format!("UPDATE dispatchers SET beat_mono = beat_mono - 120000000 WHERE id = {}", victim.id()),
            &format!("UPDATE dispatchers SET heartbeat_at = heartbeat_at - 120000000 WHERE id = {}", victim.id()),
        )
        .unwrap();
        let rescuer = fast_dispatcher(s, Runtime::Python, Duration::from_millis(500));
        let rw = rescuer.worker();
        let again = claim(&rw);
        assert_eq!(again.task.id, id);
        assert_eq!((again.task.lost, again.task.attempts), (1, 1), "lost run counted apart from attempts");
        assert!(
            matches!(vw.complete(&c, Outcome::Success("\"late\"".into())), Err(Error::StaleToken { task }) if task == id)
        );
        ok(&rw, &again);
        let t = s.task(id).unwrap();
        assert_eq!(
            (t.state, t.result.as_deref()),
            (State::Successful, Some("null")),
            "stale outcome overwrote nothing"
        );
    });
}

#[test]
fn too_many_lost_runs_abort_the_task_and_owe_on_error() {
    let db = sqlite();
    let id = db.store.enqueue(py("t")).unwrap().id;
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    conn.execute("UPDATE tasks SET state = 'running', lost = 5, dispatcher_id = 9999, token = 1 WHERE id = ?1", [id])
        .unwrap();
    let d = fast_dispatcher(&db.store, Runtime::Python, Duration::from_millis(500));
    let w = d.worker();
    let h = claim(&w);
    assert_eq!((h.task.id, h.kind, h.task.state), (id, ClaimKind::OnError, State::Aborted));
    assert_eq!(h.task.error.unwrap().class, "WorkerLost");
}

#[test]
fn reset_aborts_everything_unfinished() {
    each_store(|s, _| {
        let run = s.enqueue(py("run")).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let c = claim(&w);
        assert_eq!(c.task.id, run);
        let waiting: Vec<TaskId> = (0..3).map(|i| s.enqueue(py(&format!("w{i}")).queue("q")).unwrap().id).collect();
        assert_eq!(s.reset().unwrap(), 4);
        assert_eq!(c.cancelled(), Some(CancelReason::Reset));
        assert!(matches!(ok(&w, &c), Settled::Aborted(e) if e.class == "Reset"));
        for id in waiting {
            assert_eq!(s.task(id).unwrap().state, State::Aborted);
        }
    });
}

#[test]
fn paused_queues_hold_their_tasks_until_resumed() {
    each_store(|s, _| {
        s.pause("mail").unwrap();
        let id = s.enqueue(py("m").queue("mail")).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        claim_none(&w, Duration::from_millis(150));
        assert!(s.counts().unwrap().iter().any(|c| c.queue.as_deref() == Some("mail") && c.paused && c.new == 1));
        s.resume("mail").unwrap();
        assert_eq!(claim(&w).task.id, id);
    });
}

#[test]
fn purge_removes_old_finished_tasks_but_keeps_needed_dependencies() {
    each_store(|s, _| {
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let done = s.enqueue(py("done")).unwrap().id;
        let needed = s.enqueue(py("needed")).unwrap().id;
        for _ in 0..2 {
            let c = claim(&w);
            ok(&w, &c);
        }
        let dependent = s.enqueue(py("dependent").depends_on([needed]).delay(Duration::from_secs(3600))).unwrap().id;
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(s.purge(Duration::from_secs(3600)).unwrap(), 0, "nothing that old");
        assert_eq!(s.purge(Duration::ZERO).unwrap(), 1);
        assert!(matches!(s.task(done), Err(Error::NotFound(_))));
        assert_eq!(s.task(needed).unwrap().state, State::Successful, "an unfinished task depends on it");
        assert_eq!(s.task(dependent).unwrap().state, State::New);
    });
}

#[test]
fn counts_and_dispatcher_liveness() {
    each_store(|s, _| {
        s.enqueue(py("a").queue("q")).unwrap();
        s.enqueue(py("b").queue("q").delay(Duration::from_secs(60))).unwrap();
        s.enqueue(py("c")).unwrap();
        assert!(!s.dispatcher_alive(None).unwrap());
        let d = dispatcher(s, Runtime::Python);
        assert!(s.dispatcher_alive(Some(Runtime::Python)).unwrap());
        assert!(!s.dispatcher_alive(Some(Runtime::Ruby)).unwrap());
        let w = d.worker();
        let c = claim(&w);
        let counts = s.counts().unwrap();
        let q = counts.iter().find(|c| c.queue.as_deref() == Some("q")).unwrap();
        let none = counts.iter().find(|c| c.queue.is_none()).unwrap();
        assert_eq!(q.new + q.running, 2);
        assert_eq!(q.waiting, 1, "the delayed task is waiting");
        assert_eq!(none.new + none.running, 1);
        let info = s.dispatchers().unwrap();
        assert_eq!(info.len(), 1);
        assert_eq!((info[0].runtime, info[0].running, info[0].pid), (Runtime::Python, 1, std::process::id() as i64));
        ok(&w, &c);
        d.shutdown(Duration::from_secs(1)).unwrap();
        assert!(!s.dispatcher_alive(None).unwrap(), "a clean shutdown removes the heartbeat row");
    });
}

#[test]
fn batches_become_visible_together_and_roll_back_whole() {
    each_store(|s, _| {
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let batch = s.begin_batch().unwrap();
        let first = s.enqueue(py("first")).unwrap().id;
        let second = s.enqueue(py("second")).unwrap().id;
        // The original idiom: link after enqueue, race-free inside the batch.
        s.add_dependencies(first, &[second]).unwrap();
        assert_eq!(s.task(first).unwrap().depends_on, vec![second], "visible to its own thread");
        let other = s.clone();
        let seen = std::thread::spawn(move || other.list(&TaskFilter::default()).unwrap().len()).join().unwrap();
        assert_eq!(seen, 0, "invisible to others until the batch ends");
        batch.commit().unwrap();
        let c = claim(&w);
        assert_eq!(c.task.id, second, "the dependency added in the batch held");
        ok(&w, &c);
        let c = claim(&w);
        assert_eq!(c.task.id, first);
        ok(&w, &c);

        let batch = s.begin_batch().unwrap();
        let gone = s.enqueue(py("gone")).unwrap().id;
        assert!(s.enqueue(py("bad").args("nope")).is_err(), "a failed enqueue leaves the batch usable");
        batch.rollback().unwrap();
        assert!(matches!(s.task(gone), Err(Error::NotFound(_))));
        {
            let _dropped = s.begin_batch().unwrap();
            s.enqueue(py("dropped")).unwrap();
        }
        assert!(s.list(&TaskFilter { states: vec![State::New], ..Default::default() }).unwrap().is_empty());
    });
}

#[test]
fn a_waker_interrupts_a_blocked_claim_promptly() {
    each_store(|s, _| {
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let waker = w.waker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            waker.wake();
        });
        let start = Instant::now();
        assert!(w.claim(None).unwrap().is_none());
        assert!(start.elapsed() < Duration::from_secs(2));
        t.join().unwrap();
        // A stop makes every waiting claim return Stopped.
        let w2 = d.worker();
        let waiter = std::thread::spawn(move || w2.claim(None));
        std::thread::sleep(Duration::from_millis(50));
        d.stop_claiming();
        assert!(matches!(waiter.join().unwrap(), Err(Error::Stopped)));
    });
}

#[test]
fn a_queue_whose_next_task_is_another_runtimes_waits_for_it() {
    each_store(|s, _| {
        let ruby_first = s.enqueue(rb("first").queue("mixed")).unwrap().id;
        let python_second = s.enqueue(py("second").queue("mixed")).unwrap().id;
        let pyd = dispatcher(s, Runtime::Python);
        let pw = pyd.worker();
        claim_none(&pw, Duration::from_millis(150));
        let rbd = dispatcher(s, Runtime::Ruby);
        let rw = rbd.worker();
        let c = claim(&rw);
        assert_eq!(c.task.id, ruby_first);
        ok(&rw, &c);
        assert_eq!(claim(&pw).task.id, python_second);
    });
}

#[test]
fn queue_selection_limits_what_a_dispatcher_claims() {
    each_store(|s, _| {
        let mail = s.enqueue(py("m").queue("mail")).unwrap().id;
        s.enqueue(py("r").queue("reports")).unwrap();
        s.enqueue(py("p")).unwrap();
        let mut cfg = DispatcherConfig::new(Runtime::Python);
        cfg.queues = QueueSelection { named: Some(vec!["mail".into()]), parallel: false };
        let d = Dispatcher::start(s, cfg).unwrap();
        let w = d.worker();
        let c = claim(&w);
        assert_eq!(c.task.id, mail);
        ok(&w, &c);
        claim_none(&w, Duration::from_millis(150));
    });
}

#[test]
fn release_hands_a_task_back_without_an_attempt() {
    each_store(|s, _| {
        let id = s.enqueue(py("t")).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let c = claim(&w);
        assert_eq!(w.release(&c).unwrap(), Settled::Released);
        let t = s.task(id).unwrap();
        assert_eq!((t.state, t.attempts), (State::New, 0));
        assert_eq!(claim(&w).task.id, id);
    });
}

#[test]
fn results_that_are_not_json_are_stored_as_text() {
    each_store(|s, _| {
        let id = s.enqueue(py("t")).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let c = claim(&w);
        w.complete(&c, Outcome::Success("<object at 0x1>".into())).unwrap();
        assert_eq!(s.task(id).unwrap().result.as_deref(), Some("\"<object at 0x1>\""));
    });
}

#[test]
fn wait_returns_when_the_task_finishes() {
    each_store(|s, _| {
        let id = s.enqueue(py("t")).unwrap().id;
        let d = dispatcher(s, Runtime::Python);
        let w = d.worker();
        let store = s.clone();
        let waiter = std::thread::spawn(move || store.wait(id, Some(Duration::from_secs(5))).unwrap());
        let c = claim(&w);
        std::thread::sleep(Duration::from_millis(50));
        ok(&w, &c);
        assert_eq!(waiter.join().unwrap().state, State::Successful);
        let unfinished = s.enqueue(py("never").delay(Duration::from_secs(600))).unwrap().id;
        assert_eq!(s.wait(unfinished, Some(Duration::from_millis(50))).unwrap().state, State::New);
    });
}

#[test]
fn a_dispatcher_that_cannot_heartbeat_stops_claiming() {
    let db = sqlite();
    let d = fast_dispatcher(&db.store, Runtime::Python, Duration::from_millis(600));
    let w = d.worker();
    // Make every heartbeat fail while claims could still succeed at the SQL level.
    let conn = rusqlite::Connection::open(db.path()).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER refuse_beats BEFORE UPDATE ON dispatchers BEGIN SELECT RAISE(ABORT, 'no heartbeat'); END;
         CREATE TRIGGER refuse_rejoin BEFORE INSERT ON dispatchers BEGIN SELECT RAISE(ABORT, 'no heartbeat'); END;",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let id = db.store.enqueue(py("t")).unwrap().id;
    claim_none(&w, Duration::from_millis(400));
    conn.execute_batch("DROP TRIGGER refuse_beats; DROP TRIGGER refuse_rejoin;").unwrap();
    let c = claim(&w);
    assert_eq!(c.task.id, id, "claims resume once the heartbeat succeeds again");
    ok(&w, &c);
}

#[test]
fn status_report_shows_dispatchers_queues_and_running_tasks() {
    let db = sqlite();
    db.store.enqueue(py("a").queue("mail")).unwrap();
    db.store.enqueue(py("b").queue("mail")).unwrap();
    let d = dispatcher(&db.store, Runtime::Python);
    let w = d.worker();
    let c = claim(&w);
    w.progress(&c, Some("sending"), Some(40.0)).unwrap();
    wait_until("progress", Duration::from_secs(2), || db.store.task(c.task.id).unwrap().message.is_some());
    let report = admin::status_report(&db.store).unwrap();
    for needle in ["dispatchers:", "python", "alive", "mail", "running tasks:", "tests.jobs:a", "40%", "sending"] {
        assert!(report.contains(needle), "{needle:?} missing from:\n{report}");
    }
    ok(&w, &c);
}

#[test]
fn rows_written_by_an_older_sqlite_shell_get_time_defaults() {
    // Debian 12's sqlite3 shell is 3.40: the schema's defaults must not need newer functions.
    let Ok(out) = std::process::Command::new("sqlite3").arg("--version").output() else {
        eprintln!("no sqlite3 shell on PATH; make setup-ruby installs it");
        return;
    };
    assert!(out.status.success());
    let db = sqlite();
    let id = db.store.enqueue(py("first")).unwrap().id;
    let status = std::process::Command::new("sqlite3")
        .arg(db.path())
        .arg("PRAGMA busy_timeout = 5000; INSERT INTO tasks (runtime, target) VALUES ('python', 'tests.jobs:by_hand');")
        .status()
        .unwrap();
    assert!(status.success(), "the shell could insert a row with defaults");
    let t = db.store.task(id + 1).unwrap();
    let now = clock::now_micros();
    assert!((now - t.enqueued_at).abs() < 60_000_000 && t.run_at <= now, "defaults are now, in microseconds: {t:?}");
    let d = dispatcher(&db.store, Runtime::Python);
    let w = d.worker();
    let got: HashSet<TaskId> = [claim(&w).task.id, claim(&w).task.id].into();
    assert_eq!(got, HashSet::from([id, id + 1]), "the hand-written row is claimable");
}

#[test]
fn dispatchers_apply_automatic_retention() {
    each_store(|s, _| {
        let old = s.enqueue(py("old")).unwrap().id;
        let failed = s.enqueue(py("failed")).unwrap().id;
        {
            let d = dispatcher(s, Runtime::Python);
            let w = d.worker();
            for _ in 0..2 {
                let c = claim(&w);
                if c.task.id == old {
                    ok(&w, &c);
                } else {
                    fail(&w, &c, "boom");
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
        // Keep successful tasks for 0 s but failed ones for an hour: only the successful one goes.
        let mut cfg = DispatcherConfig::new(Runtime::Python);
        cfg.keep_successful = Duration::ZERO;
        cfg.keep_failed = Duration::from_secs(3600);
        let _d = Dispatcher::start(s, cfg).unwrap();
        wait_until("retention purge", Duration::from_secs(5), || matches!(s.task(old), Err(Error::NotFound(_))));
        assert_eq!(s.task(failed).unwrap().state, State::Error, "failed tasks are kept longer");
    });
}
