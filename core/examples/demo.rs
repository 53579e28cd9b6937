//! `make demo`: the engine on its embedded SQLite default. Enqueues a serial queue, parallel
//! tasks with progress, and a failing task whose dependent fails without running; one
//! dispatcher with 4 worker threads runs them; then prints what happened.
//! (The Python and Ruby front ends drive this same worker API from their own threads.)

use std::time::{Duration, Instant};

use queue_dispatcher_core::*;

/// What a host's registry would do: look the target up by exact name, run it.
fn run(worker: &Worker, c: &Claimed) -> Outcome {
    let name = c.task.target.split_once(':').map_or("", |(_, f)| f);
    match name {
        "send_mail" | "resize" => {
            for step in 1..=4 {
                std::thread::sleep(Duration::from_millis(60));
                let _ = worker.progress(c, Some(&format!("step {step}/4")), Some(step as f64 * 25.0));
            }
            Outcome::Success(format!("\"{name} #{} done\"", c.task.id))
        }
        "flaky_import" => Outcome::Failure(ErrorRecord::new("IOError", "source file missing")),
        other => Outcome::Failure(ErrorRecord::new("LookupError", format!("{other:?} is not a registered task"))),
    }
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("queue_dispatcher_demo_{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Store::open(&Config::new(dir.join("demo.db")))?;
    let task = |f: &str| NewTask::new(Runtime::Python, format!("demo.jobs:{f}"));

    let mail: Vec<TaskId> = (0..3)
        .map(|i| {
            store
                .enqueue(task("send_mail").queue("mail").args(format!(r#"{{"args":["user{i}@example.com"]}}"#)))
                .map(|e| e.id)
        })
        .collect::<Result<_>>()?;
    let resize: Vec<TaskId> = (0..3).map(|_| store.enqueue(task("resize")).map(|e| e.id)).collect::<Result<_>>()?;
    let import = store.enqueue(task("flaky_import").queue("import").retries(1))?.id;
    let report = store.enqueue(task("send_mail").queue("reports").depends_on([import, mail[2]]))?.id;
    println!("enqueued: mail (serial) {mail:?}, resize (parallel) {resize:?}, import {import} (fails), report {report} (depends on {import} and {})", mail[2]);

    let mut cfg = DispatcherConfig::new(Runtime::Python);
    cfg.workers = 4;
    cfg.retry_base = Duration::from_millis(200);
    let dispatcher = Dispatcher::start(&store, cfg)?;
    let started = Instant::now();
    std::thread::scope(|s| {
        for n in 0..4 {
            let w = dispatcher.worker();
            s.spawn(move || loop {
                let c = match w.claim(Some(Duration::from_millis(100))) {
                    Ok(Some(c)) => c,
                    Ok(None) => continue,
                    Err(_) => return,
                };
                let t = started.elapsed().as_secs_f64();
                match c.kind {
                    ClaimKind::OnError => println!(
                        "{t:6.2}s worker {n}: on_error of task {} ({})",
                        c.task.id,
                        c.task.error.as_ref().map_or("", |e| &e.message)
                    ),
                    ClaimKind::Run => {
                        println!(
                            "{t:6.2}s worker {n}: start task {} {} queue={}",
                            c.task.id,
                            c.task.target,
                            c.task.queue.as_deref().unwrap_or("-")
                        );
                        let outcome = run(&w, &c);
                        let settled = match w.complete(&c, outcome) {
                            Ok(Settled::Successful) => "successful".to_string(),
                            Ok(Settled::Retrying { error, .. }) => {
                                format!("{}: {} (will retry)", error.class, error.message)
                            }
                            Ok(Settled::Failed(e) | Settled::Aborted(e)) => format!("{}: {}", e.class, e.message),
                            Ok(Settled::Released) => "released".to_string(),
                            Err(e) => format!("not stored: {e}"),
                        };
                        println!(
                            "{:6.2}s worker {n}: task {} -> {settled}",
                            started.elapsed().as_secs_f64(),
                            c.task.id
                        );
                    }
                }
            });
        }
        let all: Vec<TaskId> = mail.iter().chain(&resize).chain([&import, &report]).copied().collect();
        for id in &all {
            let _ = store.wait(*id, Some(Duration::from_secs(30)));
        }
        dispatcher.stop_claiming();
    });
    dispatcher.shutdown(Duration::from_secs(5))?;

    println!("\n{:>4}  {:<22} {:<8} {:<11} {:>8}  result / error", "id", "target", "queue", "state", "ms");
    for t in store.list(&TaskFilter::default())? {
        let ms = match (t.started_at, t.finished_at) {
            (Some(s), Some(f)) => format!("{:.0}", (f - s) as f64 / 1000.0),
            _ => "-".into(),
        };
        let outcome = t.error.map(|e| format!("{}: {}", e.class, e.message)).or(t.result).unwrap_or_default();
        println!(
            "{:>4}  {:<22} {:<8} {:<11} {:>8}  {}",
            t.id,
            t.target,
            t.queue.unwrap_or_else(|| "-".into()),
            t.state.as_str(),
            ms,
            outcome
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
