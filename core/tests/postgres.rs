//! What only the PostgreSQL store has: URL handling and its errors, the schema's own refusal of a
//! second running task per queue, several processes hammering one serial queue, wake-ups across
//! connections, and a dispatcher that outlives the termination of its backends. Skipped (and
//! said so) unless `QUEUE_DISPATCHER_TEST_PG` names a server.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use queue_dispatcher_core::*;

fn pg() -> Option<TestDb> {
    postgres()
}

#[test]
fn urls_select_postgres_and_bad_ones_are_named() {
    let c = Config::parse("postgresql://u@h:5433/app?schema=jobs&connect_timeout=3").unwrap();
    let p = c.postgres.expect("a PostgreSQL config");
    assert_eq!(p.schema, "jobs");
    assert!(p.url.contains("connect_timeout=3") && !p.url.contains("schema"), "{}", p.url);
    assert_eq!(Config::parse("postgres://u@h/app").unwrap().postgres.unwrap().schema, "queue_dispatcher");
    assert!(Config::parse("/tmp/x.db").unwrap().postgres.is_none());
    for (bad, needle) in [
        ("postgres://u@h:notaport/app", "not a valid PostgreSQL URL"),
        ("postgres://u@h:5432/app?schema=", "schema"),
        ("postgres://u@h:5432/app?bogus_option=1", "not a valid PostgreSQL URL"),
        ("mysql://u@h/app", "unsupported URL scheme"),
    ] {
        match Config::parse(bad) {
            Err(Error::InvalidInput { field, message }) => {
                assert_eq!(field, "database");
                assert!(message.contains(needle), "{bad}: {message}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // Nothing listens on port 1: the error names the server, quickly.
    let start = Instant::now();
    let err =
        Store::open(&Config::parse("postgres://postgres@127.0.0.1:1/test?connect_timeout=2").unwrap()).unwrap_err();
    assert!(err.to_string().contains("cannot connect to PostgreSQL at postgres://postgres@127.0.0.1:1/test"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn a_schema_of_another_application_is_refused_untouched() {
    let Some(url) = pg_url() else { return };
    let other = PgSchema { url: url.clone(), schema: pg_schema_name() };
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE SCHEMA \"{0}\"; CREATE TABLE \"{0}\".invoices (id int)", other.schema)).unwrap();
    let err = Store::open(&Config::parse(&other.store_url()).unwrap()).unwrap_err();
    assert!(matches!(err, Error::NotADatabase { .. }), "{err:?}");
    assert!(err.to_string().contains("another application") && err.to_string().contains("invoices"), "{err}");
    let tables: i64 =
        c.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = $1", &[&other.schema]).unwrap().get(0);
    assert_eq!(tables, 1, "nothing was created in the foreign schema");

    let newer = PgSchema { url: url.clone(), schema: pg_schema_name() };
    drop(Store::open(&Config::parse(&newer.store_url()).unwrap()).unwrap());
    newer.client().execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'", &[]).unwrap();
    let err = Store::open(&Config::parse(&newer.store_url()).unwrap()).unwrap_err();
    assert!(matches!(err, Error::SchemaTooNew { found: 99, .. }), "{err:?}");
}

#[test]
fn concurrent_first_opens_migrate_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema { url, schema: pg_schema_name() };
    let spec = schema.store_url();
    let stores: Vec<_> = (0..4)
        .map(|_| {
            let spec = spec.clone();
            // Separate processes would each migrate; threads with distinct options stand in for
            // them (each opens its own connections).
            std::thread::spawn(move || {
                let cfg = Config::parse(&format!("{spec}&application_name=t{}", fastrand::u32(..))).unwrap();
                Store::open(&cfg).map(|s| s.enqueue(py("x")).unwrap().id)
            })
        })
        .collect();
    let ids: HashSet<TaskId> = stores.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    assert_eq!(ids.len(), 4);
}

#[test]
fn older_schemas_are_migrated_to_the_current_one_statement_cycle() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema { url, schema: pg_schema_name() };
    let cfg = Config::parse(&schema.store_url()).unwrap();
    drop(Store::open(&cfg).unwrap());
    let cycle_source = |c: &mut postgres::Client| -> Vec<String> {
        c.query(
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = $1 AND p.proname = 'cycle_fast'",
            &[&schema.schema],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    // Version 1 left no cycle function; version 2's had its rows' conditions outside a CASE
    // (stood in for by editing the catalog: the test role is a superuser).
    let v2 = format!(
        "UPDATE pg_proc SET prosrc = replace(prosrc, 'CASE WHEN', 'CASE  WHEN')
          WHERE proname = 'cycle_fast' AND pronamespace = '{}'::regnamespace",
        schema.schema
    );
    for (old, setup) in [("1", "DROP FUNCTION cycle_fast"), ("2", v2.as_str())] {
        drop(Store::open(&cfg).unwrap());
        schema
            .client()
            .batch_execute(&format!("{setup}; UPDATE meta SET value = '{old}' WHERE key = 'schema_version'"))
            .unwrap();
        assert!(!cycle_source(&mut schema.client()).iter().any(|s| s.contains("CASE WHEN")));
        let store = Store::open(&cfg).unwrap();
        let mut c = schema.client();
        let version: String = c.query_one("SELECT value FROM meta WHERE key = 'schema_version'", &[]).unwrap().get(0);
        assert_eq!(version, "4", "migrated from version {old}");
        let source = cycle_source(&mut c);
        assert_eq!(source.len(), 1);
        assert!(source[0].contains("CASE WHEN t.state = 'new'"), "the version 3 cycle");
        let ids: Vec<TaskId> = (0..6).map(|i| store.enqueue(py(&format!("t{i}"))).unwrap().id).collect();
        let d = dispatcher(&store, Runtime::Python);
        let w = d.worker();
        for _ in &ids {
            let got = claim(&w);
            w.complete(&got, Outcome::Success("1".into())).unwrap();
        }
        for id in ids {
            assert_eq!(store.task(id).unwrap().state, State::Successful);
        }
        drop(d);
    }
}

#[test]
fn a_version_3_schema_gains_dependency_flags_for_its_existing_edges() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema { url, schema: pg_schema_name() };
    let cfg = Config::parse(&schema.store_url()).unwrap();
    let store = Store::open(&cfg).unwrap();
    let dep = store.enqueue(py("dep")).unwrap().id;
    let dependent = store.enqueue(py("dependent").depends_on([dep])).unwrap().id;
    let failing = store.enqueue(py("failing")).unwrap().id;
    let doomed = store.enqueue(py("doomed").depends_on([failing])).unwrap().id;
    drop(store);
    // Back to what version 3 had: no flag column, triggers for every finished task.
    schema
        .client()
        .batch_execute(
            "ALTER TABLE tasks DROP COLUMN has_dependents CASCADE;
             CREATE TRIGGER tasks_succeeded AFTER UPDATE OF state ON tasks FOR EACH ROW
               WHEN (NEW.state = 'successful' AND OLD.state <> 'successful') EXECUTE FUNCTION tasks_finished();
             CREATE TRIGGER tasks_failed AFTER UPDATE OF state ON tasks FOR EACH ROW
               WHEN (NEW.state IN ('error', 'aborted') AND OLD.state NOT IN ('error', 'aborted'))
               EXECUTE FUNCTION tasks_finished();
             UPDATE meta SET value = '3' WHERE key = 'schema_version'",
        )
        .unwrap();
    let store = Store::open(&cfg).unwrap();
    let flagged: Vec<i64> = schema
        .client()
        .query("SELECT id FROM tasks WHERE has_dependents ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(flagged, vec![dep, failing]);
    let d = dispatcher(&store, Runtime::Python);
    let w = d.worker();
    let mut seen = HashSet::new();
    while seen.len() < 3 {
        let c = claim(&w);
        seen.insert(c.task.id);
        let outcome = if c.task.id == failing {
            Outcome::Failure(ErrorRecord::new("Boom", "failed on purpose"))
        } else {
            Outcome::Success("1".into())
        };
        w.complete(&c, outcome).unwrap();
    }
    assert_eq!(seen, HashSet::from([dep, dependent, failing]), "the dependent ran once its dependency had");
    assert_eq!(store.task(dependent).unwrap().state, State::Successful);
    wait_until("the doomed task to fail without running", Duration::from_secs(10), || {
        let _ = w.claim(Some(Duration::from_millis(50)));
        store.task(doomed).unwrap().state == State::Error
    });
    drop(d);
}

#[test]
fn the_schema_itself_refuses_a_second_running_task_in_a_queue_on_postgres() {
    let Some(db) = pg() else { return };
    let a = db.store.enqueue(py("a").queue("q")).unwrap().id;
    let b = db.store.enqueue(py("b").queue("q")).unwrap().id;
    db.exec("", &format!("UPDATE tasks SET state = 'running' WHERE id = {a}")).unwrap();
    let err = db.exec("", &format!("UPDATE tasks SET state = 'running' WHERE id = {b}")).unwrap_err();
    assert!(err.contains("tasks_one_running_per_queue") && err.contains("23505"), "{err}");
    let bad = db.exec("", "INSERT INTO tasks (runtime, target) VALUES ('perl', 'x')").unwrap_err();
    assert!(bad.contains("check constraint"), "{bad}");
}

#[test]
fn a_dependency_on_a_missing_row_fails_the_dependent_on_postgres() {
    let Some(db) = pg() else { return };
    let dependent = db.store.enqueue(py("d")).unwrap().id;
    db.exec("", &format!("INSERT INTO task_deps (task_id, depends_on) VALUES ({dependent}, 777777)")).unwrap();
    let d = dispatcher(&db.store, Runtime::Python);
    let w = d.worker();
    let c = claim(&w);
    assert_eq!((c.task.id, c.kind), (dependent, ClaimKind::OnError));
    let msg = c.task.error.unwrap().message;
    assert!(msg.contains("777777") && msg.contains("does not exist"), "{msg}");
}

#[test]
fn lease_times_come_from_the_database_clock() {
    let Some(db) = pg() else { return };
    let d = dispatcher(&db.store, Runtime::Python);
    // A host whose clock is an hour off changes nothing: the lease is judged by the server.
    clock::step_wall_clock(3_600_000_000);
    let alive = db.store.dispatcher_alive(None);
    clock::step_wall_clock(-3_600_000_000);
    assert!(alive.unwrap());
    let info = db.store.dispatchers().unwrap();
    let now = clock::now_micros();
    assert!((info[0].heartbeat_at - now).abs() < 60_000_000, "heartbeat stamped by the server clock");
    drop(d);
}

#[test]
fn an_idle_dispatcher_is_woken_by_another_connection_within_milliseconds() {
    let Some(db) = pg() else { return };
    let d = dispatcher(&db.store, Runtime::Python);
    let w = d.worker();
    claim_none(&w, Duration::from_millis(300));
    // A second store with other options has connections (and a listener) of its own: it is
    // another process as far as the database can tell.
    let spec = format!("{}&application_name=other", db.pg.as_ref().unwrap().store_url());
    let other = Store::open(&Config::parse(&spec).unwrap()).unwrap();
    let mut lat = Vec::new();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        let id = other.enqueue(py("x")).unwrap().id;
        let c = claim(&w);
        lat.push(start.elapsed());
        assert_eq!(c.task.id, id);
        ok(&w, &c);
    }
    lat.sort();
    assert!(lat[lat.len() / 2] < Duration::from_millis(50), "median wake-up {:?}", lat[lat.len() / 2]);
}

/// Every 100 ms, `times` times: terminates the backends whose application_name is `app` (the
/// connections of the store under test). Returns how many were terminated.
fn terminate_repeatedly(admin: &mut postgres::Client, app: &str, times: usize) -> usize {
    let mut kills = 0;
    for _ in 0..times {
        std::thread::sleep(Duration::from_millis(100));
        let k: i64 = admin
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                  WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&app],
            )
            .unwrap()
            .get(0);
        kills += k as usize;
    }
    kills
}

#[test]
fn a_dispatcher_keeps_going_when_its_backends_are_terminated() {
    let Some(db) = pg() else { return };
    let url = db.pg.as_ref().unwrap().url.clone();
    // Its own application_name, so only this test's backends are terminated.
    let app = format!("qd_kill_{}", fastrand::u32(..));
    let spec = format!("{}&application_name={app}", db.pg.as_ref().unwrap().store_url());
    let store = Store::open(&Config::parse(&spec).unwrap()).unwrap();
    let d = dispatcher(&store, Runtime::Python);
    let n = 200;
    let ids: Vec<TaskId> = (0..n).map(|i| store.enqueue(py(&format!("t{i}")).queue("serial")).unwrap().id).collect();
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let kills = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..3 {
            let w = d.worker();
            let done = &done;
            s.spawn(move || {
                let end = Instant::now() + Duration::from_secs(60);
                while done.load(std::sync::atomic::Ordering::SeqCst) < n && Instant::now() < end {
                    let Some(c) = w.claim(Some(Duration::from_millis(100))).unwrap() else { continue };
                    std::thread::sleep(Duration::from_millis(2));
                    // An outcome may be refused only if its run was declared lost meanwhile.
                    match w.complete(&c, Outcome::Success("null".into())) {
                        Ok(_) => {
                            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        Err(e) => panic!("complete failed: {e}"),
                    }
                }
            });
        }
        // Terminate every backend of this process's stores, several times, while they work.
        kills.fetch_add(terminate_repeatedly(&mut admin, &app, 8), std::sync::atomic::Ordering::SeqCst);
    });
    assert!(kills.load(std::sync::atomic::Ordering::SeqCst) >= 5, "backends were terminated");
    for id in ids {
        let t = store.task(id).unwrap();
        assert_eq!(t.state, State::Successful, "task {id}: {t:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Several processes on one serial queue

#[test]
fn child_entry() {
    let Some(ChildEnv { role, db, dir, arg }) = child_env() else {
        return;
    };
    let spec = db.to_str().expect("utf-8 URL").to_string();
    let store = Store::open(&Config::parse(&spec).unwrap()).unwrap_or_else(|e| panic!("child {role}: open: {e}"));
    match role.as_str() {
        "hammer" => child_hammer(&store, &dir, &arg),
        "fork" => child_forks(&store, &spec),
        other => panic!("unknown child role {other:?}"),
    }
}

/// Claims from the shared queue with several workers, logging each run's monotonic interval.
fn child_hammer(store: &Store, dir: &Path, arg: &str) {
    let workers: usize = arg.parse().expect("workers");
    let d = Dispatcher::start(store, DispatcherConfig { workers, ..DispatcherConfig::new(Runtime::Python) })
        .expect("start dispatcher");
    let pid = std::process::id();
    let log = std::sync::Mutex::new(std::fs::File::create(dir.join(format!("runs-{pid}.log"))).unwrap());
    std::fs::write(dir.join(format!("ready-{pid}")), "").unwrap();
    while !dir.join("go").exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::scope(|s| {
        for _ in 0..workers {
            let w = d.worker();
            let log = &log;
            s.spawn(move || loop {
                let Some(c) = w.claim(Some(Duration::from_millis(200))).unwrap() else {
                    let left: u64 = store.counts().unwrap().iter().map(|c| c.new + c.running).sum();
                    if left == 0 {
                        return;
                    }
                    continue;
                };
                let start = clock::mono_micros();
                std::thread::sleep(Duration::from_micros(300));
                let end = clock::mono_micros();
                writeln!(log.lock().unwrap(), "{start} {end} {}", c.task.id).unwrap();
                assert_eq!(w.complete(&c, Outcome::Success("null".into())).unwrap(), Settled::Successful);
            });
        }
    });
    d.shutdown(Duration::from_secs(5)).unwrap();
}

/// Forks while a dispatcher and an enqueuer are busy (the preload-and-fork pattern): each child
/// uses the inherited Store (on connections of its own) and exits; the parent's connections are
/// never closed by a child (its backends all outlive the children) and it keeps working.
/// Enough forks that one lands while a parent thread is inside a lock's slow path (with
/// parking_lot's global table that hung a child within 20-odd rounds; 100 take about 3 s).
const FORK_ROUNDS: usize = 100;

fn child_forks(store: &Store, spec: &str) {
    let backends = |c: &mut postgres::Client| -> HashSet<i32> {
        c.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'qd_fork_test' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
    };
    let url = spec.split("?").next().unwrap().to_string();
    let child = |store: &Store| match store.enqueue(py("from_child")) {
        Ok(e) if store.task(e.id).is_ok() => 0,
        _ => 2,
    };
    fork_while_busy(
        store,
        FORK_ROUNDS,
        child,
        || {
            let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
            let before = backends(&mut admin);
            assert!(before.len() >= 3, "the parent holds connections before forking: {before:?}");
            (admin, before)
        },
        |(mut admin, before)| {
            let after = backends(&mut admin);
            assert!(before.is_subset(&after), "a child closed the parent's connections: {before:?} -> {after:?}");
        },
    );
    let from_children =
        store.list(&TaskFilter::default()).unwrap().iter().filter(|t| t.target.ends_with("from_child")).count();
    assert_eq!(from_children, FORK_ROUNDS);
}

#[test]
fn forked_children_use_their_own_connections_and_never_close_the_parents() {
    let Some(db) = pg() else { return };
    let dir = db.dir.path();
    let url =
        std::path::PathBuf::from(format!("{}&application_name=qd_fork_test", db.pg.as_ref().unwrap().store_url()));
    let mut child = spawn_child_process("fork", &url, dir, "", &dir.join("fork.out"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the forking process hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(dir.join("fork.out")).unwrap_or_default();
    assert!(status.success(), "fork child failed:\n{out}");
}

#[test]
fn processes_hammering_one_serial_queue_never_overlap() {
    let Some(db) = pg() else { return };
    let n = 300;
    let tasks: Vec<NewTask> = (0..n).map(|i| py(&format!("t{i}")).queue("one")).collect();
    let ids: Vec<TaskId> = db.store.enqueue_many(&tasks).unwrap().iter().map(|e| e.id).collect();
    let dir = db.dir.path();
    let url = std::path::PathBuf::from(db.pg.as_ref().unwrap().store_url());
    let mut children: Vec<std::process::Child> =
        (0..4).map(|i| spawn_child_process("hammer", &url, dir, "3", &dir.join(format!("child-{i}.out")))).collect();
    wait_until("children ready", Duration::from_secs(30), || {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("ready-"))
            .count()
            == 4
    });
    std::fs::write(dir.join("go"), "").unwrap();
    for (i, c) in children.iter_mut().enumerate() {
        let status = c.wait().unwrap();
        let out = std::fs::read_to_string(dir.join(format!("child-{i}.out"))).unwrap_or_default();
        assert!(status.success(), "child {i} failed:\n{out}");
    }
    let mut runs: Vec<(i64, i64, TaskId)> = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap().to_string_lossy().starts_with("runs-") {
            for line in std::fs::read_to_string(&p).unwrap().lines() {
                let f: Vec<i64> = line.split(' ').map(|x| x.parse().unwrap()).collect();
                runs.push((f[0], f[1], f[2]));
            }
        }
    }
    runs.sort();
    assert_eq!(runs.len(), n, "every task ran exactly once");
    assert_eq!(runs.iter().map(|r| r.2).collect::<Vec<_>>(), ids, "in queue order");
    for pair in runs.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "runs of tasks {} and {} overlap", pair[0].2, pair[1].2);
    }
    let pids = std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("runs-"))
        .count();
    assert_eq!(pids, 4);
}

#[test]
fn concurrent_plain_enqueues_share_inserts_and_each_gets_its_own_task() {
    let Some(db) = pg() else { return };
    let store = &db.store;
    let later = clock::now_micros() + 3_600_000_000;
    let made: Vec<Vec<(TaskId, NewTask)>> = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|t| {
                s.spawn(move || {
                    (0..150)
                        .map(|i| {
                            // Every optional field both set and unset across the batch's rows.
                            let mut task =
                                py(&format!("t{t}_{i}")).args(format!(r#"{{"args":[{t},{i}],"kwargs":{{}}}}"#));
                            task.priority = (i % 7) as i64;
                            if i % 2 == 0 {
                                task = task.queue(format!("q{t}"));
                            }
                            if i % 3 == 0 {
                                task.run_at = Some(later + i as i64);
                                // A receiver belongs to a Ruby instance-method target.
                                task.runtime = Runtime::Ruby;
                                task.target = format!("Jobs#t{t}_{i}");
                                task.receiver = Some(format!("{i}"));
                                task.meta = Some(format!(r#"{{"i":{i}}}"#));
                                task.timeout = Some(Duration::from_millis(1500));
                                task.retries = 2;
                            }
                            (store.enqueue(task.clone()).unwrap().id, task)
                        })
                        .collect()
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ids = HashSet::new();
    for (id, want) in made.into_iter().flatten() {
        assert!(ids.insert(id), "id {id} handed out twice");
        let got = store.task(id).unwrap();
        assert_eq!(
            (
                got.runtime,
                &got.target,
                &got.args,
                got.priority,
                &got.queue,
                &got.receiver,
                &got.meta,
                got.retries,
                got.timeout
            ),
            (
                want.runtime,
                &want.target,
                &want.args,
                want.priority,
                &want.queue,
                &want.receiver,
                &want.meta,
                i64::from(want.retries),
                want.timeout
            ),
            "task {id}"
        );
        match want.run_at {
            Some(at) => assert_eq!(got.run_at, at),
            None => assert!(got.run_at <= clock::now_micros() && got.run_at > clock::now_micros() - 60_000_000),
        }
    }
    assert_eq!(ids.len(), 1200);
}

#[test]
fn enqueues_survive_terminated_backends_without_loss_or_duplicates() {
    let Some(db) = pg() else { return };
    let pg = db.pg.as_ref().unwrap();
    let app = format!("qd_kill_enq_{}", fastrand::u32(..));
    let store = Store::open(&Config::parse(&format!("{}&application_name={app}", pg.store_url())).unwrap()).unwrap();
    let mut admin = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (kills, made) = std::thread::scope(|s| {
        // Six threads, so plain enqueues are combined into multi-row INSERTs while backends die.
        let threads: Vec<_> = (0..6)
            .map(|t| {
                let (store, stop) = (&store, &stop);
                s.spawn(move || {
                    let mut made = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let target = format!("t{t}_{i}");
                        let id = store.enqueue(py(&target)).unwrap_or_else(|e| panic!("enqueue {target}: {e}")).id;
                        made.push((id, format!("tests.jobs:{target}")));
                        i += 1;
                    }
                    made
                })
            })
            .collect();
        let kills = terminate_repeatedly(&mut admin, &app, 10);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        (kills, threads.into_iter().flat_map(|h| h.join().unwrap()).collect::<Vec<_>>())
    });
    assert!(kills >= 5, "backends were terminated ({kills})");
    let mut c = pg.client();
    let stored: i64 = c.query_one("SELECT count(*) FROM tasks", &[]).unwrap().get(0);
    assert_eq!(stored as usize, made.len(), "one row per successful enqueue, no more (no duplicates), no less");
    let distinct: i64 = c.query_one("SELECT count(DISTINCT target) FROM tasks", &[]).unwrap().get(0);
    assert_eq!(distinct, stored, "no task stored twice");
    for (id, target) in &made {
        assert_eq!(&store.task(*id).unwrap().target, target, "task {id}");
    }
}

#[test]
fn a_batch_waiting_on_another_batch_blocks_neither_that_batch_nor_other_threads() {
    let Some(db) = pg() else { return };
    let store = &db.store;
    let (first_open, second_sent) = (std::sync::Barrier::new(2), std::sync::Barrier::new(2));
    std::thread::scope(|s| {
        s.spawn(|| {
            let b = store.begin_batch().unwrap();
            store.enqueue(py("first").unique_key("k")).unwrap();
            first_open.wait();
            second_sent.wait();
            // The other batch now waits on this one's unique-key entry.
            std::thread::sleep(Duration::from_millis(200));
            let t = Instant::now();
            assert!(store.counts().is_ok(), "an unrelated call");
            b.commit().unwrap();
            assert!(t.elapsed() < Duration::from_secs(5), "the holder committed while the other batch waited");
        });
        s.spawn(|| {
            first_open.wait();
            let b = store.begin_batch().unwrap();
            second_sent.wait();
            let e = store.enqueue(py("second").unique_key("k")).unwrap();
            assert!(e.existing, "the key was taken by the first batch");
            b.commit().unwrap();
        });
    });
    let tasks = store.list(&TaskFilter::default()).unwrap();
    assert_eq!(tasks.len(), 1);
}
