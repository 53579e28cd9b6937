//! The Ruby binding of queue_dispatcher: `QueueDispatcher::Native`, a thin layer that converts
//! values, releases the GVL around every blocking engine call and maps engine errors to
//! `QueueDispatcher::Error` subclasses. Behaviour lives in `queue_dispatcher_core`; the Ruby
//! library in `lib/` builds the user-facing API (enqueue proxy, registry, CLI) on top of this.
//!
//! Threads: every function here runs on a Ruby thread. Nothing here calls Ruby from a thread
//! Rust started; the engine's own threads never touch Ruby values.

use magnus::{function, method, prelude::*, Error, Ruby};

mod admin;
mod errors;
mod json;
mod nogvl;
mod store;
mod worker;

#[magnus::init(name = "queue_dispatcher_native")]
fn init(ruby: &Ruby) -> Result<(), Error> {
    let top = ruby.define_module("QueueDispatcher")?;
    errors::define(ruby, top)?;
    let native = top.define_module("Native")?;
    native.const_set("VERSION", queue_dispatcher_core::VERSION)?;
    native.const_set("DB_ENV", queue_dispatcher_core::DB_ENV)?;
    native.const_set("DEFAULT_DB", queue_dispatcher_core::DEFAULT_DB)?;
    native.define_module_function("dump_json", function!(json::dump_json, 2))?;
    native.define_module_function("validate_target", function!(admin::validate_target, 1))?;
    native.define_module_function("parse_age", function!(admin::parse_age, 1))?;
    native.define_module_function("bench_sqlite_insert", function!(admin::bench_sqlite_insert, 3))?;
    native.define_module_function("bench_core_enqueue", function!(admin::bench_core_enqueue, 4))?;
    native.define_module_function("bench_core_drain", function!(admin::bench_core_drain, 2))?;
    native.define_module_function("before_fork", function!(admin::before_fork, 0))?;
    native.define_module_function("after_fork", function!(admin::after_fork, 1))?;

    let pid = native.define_class("PidFile", ruby.class_object())?;
    pid.define_singleton_method("acquire", function!(admin::RbPidFile::acquire, 1))?;
    pid.define_method("release", method!(admin::RbPidFile::release, 0))?;
    pid.define_method("path", method!(admin::RbPidFile::path, 0))?;

    let st = native.define_class("Store", ruby.class_object())?;
    st.define_singleton_method("open", function!(store::RbStore::open, 1))?;
    st.define_method("describe", method!(store::RbStore::describe, 0))?;
    st.define_method("enqueue", method!(store::RbStore::enqueue, 5))?;
    st.define_method("add_dependencies", method!(store::RbStore::add_dependencies, 2))?;
    st.define_method("task", method!(store::RbStore::task, 1))?;
    st.define_method("wait", method!(store::RbStore::wait, 2))?;
    st.define_method("cancel", method!(store::RbStore::cancel, 1))?;
    st.define_method("reset", method!(store::RbStore::reset, 0))?;
    st.define_method("pause", method!(store::RbStore::pause, 1))?;
    st.define_method("resume", method!(store::RbStore::resume, 1))?;
    st.define_method("purge", method!(store::RbStore::purge, 1))?;
    st.define_method("counts", method!(store::RbStore::counts, 0))?;
    st.define_method("list", method!(store::RbStore::list, 1))?;
    st.define_method("dispatchers", method!(store::RbStore::dispatchers, 0))?;
    st.define_method("dispatcher_alive?", method!(store::RbStore::dispatcher_alive, 0))?;
    st.define_method("status_report", method!(store::RbStore::status_report, 0))?;
    st.define_method("batch_begin", method!(store::RbStore::batch_begin, 0))?;
    st.define_method("batch_end", method!(store::RbStore::batch_end, 1))?;
    st.define_method("batch_depth", method!(store::RbStore::batch_depth, 0))?;

    let d = native.define_class("Dispatcher", ruby.class_object())?;
    d.define_singleton_method("start", function!(worker::RbDispatcher::start, 2))?;
    d.define_method("id", method!(worker::RbDispatcher::id, 0))?;
    d.define_method("worker", method!(worker::RbDispatcher::worker, 0))?;
    d.define_method("running", method!(worker::RbDispatcher::running, 0))?;
    d.define_method("stop_claiming", method!(worker::RbDispatcher::stop_claiming, 0))?;
    d.define_method("shutdown", method!(worker::RbDispatcher::shutdown, 1))?;

    let w = native.define_class("Worker", ruby.class_object())?;
    w.define_method("claim", method!(worker::RbWorker::claim, 1))?;
    w.define_method("complete", method!(worker::RbWorker::complete, 3))?;
    w.define_method("complete_and_claim", method!(worker::RbWorker::complete_and_claim, 4))?;
    w.define_method("release", method!(worker::RbWorker::release, 1))?;
    w.define_method("progress", method!(worker::RbWorker::progress, 3))?;
    w.define_method("wake", method!(worker::RbWorker::wake, 0))?;

    let c = native.define_class("Claimed", ruby.class_object())?;
    c.define_method("id", method!(worker::RbClaimed::id, 0))?;
    c.define_method("kind", method!(worker::RbClaimed::kind, 0))?;
    c.define_method("target", method!(worker::RbClaimed::target, 0))?;
    c.define_method("receiver", method!(worker::RbClaimed::receiver, 0))?;
    c.define_method("args", method!(worker::RbClaimed::args, 0))?;
    c.define_method("queue", method!(worker::RbClaimed::queue, 0))?;
    c.define_method("attempts", method!(worker::RbClaimed::attempts, 0))?;
    c.define_method("error", method!(worker::RbClaimed::error, 0))?;
    c.define_method("cancelled", method!(worker::RbClaimed::cancelled, 0))?;
    c.define_method("to_h", method!(worker::RbClaimed::to_h, 0))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use magnus::{prelude::*, Error, Value};
    use queue_dispatcher_core::{Error as CoreError, State};

    use crate::{errors, json};

    /// One test: Ruby can be initialised once per process, on this thread only.
    #[test]
    fn conversion_and_error_mapping_in_embedded_ruby() {
        // SAFETY: the only Ruby VM of this test process, started on this thread.
        let ruby = unsafe { magnus::embed::init() };
        crate::init(&ruby).expect("init");

        let v: Value = ruby.eval(r#"[1, "x", :s, nil, true, 2.5, {a: [false], "b" => {}}]"#).unwrap();
        assert_eq!(json::dump_json(v, "args".into()).unwrap(), r#"[1,"x","s",null,true,2.5,{"a":[false],"b":{}}]"#);
        for (code, needle) in [
            ("[Time.at(0)]", "args[0]"),
            ("[{k: Object.new}]", "args[0][:k]"),
            ("[0.0/0]", "NaN"),
            ("[2**64]", "64-bit"),
            ("[{1 => 2}]", "String or Symbol"),
        ] {
            let v: Value = ruby.eval(code).unwrap();
            let err = json::dump_json(v, "args".into()).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(needle), "{code}: {msg}");
        }

        let base: magnus::RClass = ruby.eval("QueueDispatcher::Error").unwrap();
        let variants = [
            CoreError::InvalidInput { field: "f".into(), message: "m".into() },
            CoreError::NotFound(1),
            CoreError::MissingDependency { task: None, dependency: 2 },
            CoreError::DependencyCycle { task: 1, dependency: 2 },
            CoreError::InvalidState { task: 1, state: State::Running, action: "x" },
            CoreError::StaleToken { task: 1 },
            CoreError::NotADatabase { path: "p".into(), message: "m".into() },
            CoreError::SchemaTooNew { found: 9, supported: 1 },
            CoreError::Busy { message: "m".into() },
            CoreError::Stopped,
            CoreError::Storage { message: "m".into() },
        ];
        let mut classes = std::collections::HashSet::new();
        for e in variants {
            let err: Error = errors::to_ruby(e);
            let exc = err.value().expect("an exception object");
            assert!(exc.is_kind_of(base), "{exc:?}");
            classes.insert(unsafe { exc.classname() }.into_owned());
        }
        assert_eq!(classes.len(), 11, "one class per variant: {classes:?}");
    }
}
