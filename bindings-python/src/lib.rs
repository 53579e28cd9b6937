//! `queue_dispatcher._native`: the private native module under the `queue_dispatcher` package.
//! It converts values, releases the GIL around every blocking engine call, maps engine errors to
//! the package's exceptions and runs native worker threads; all behaviour lives in the engine
//! (`queue_dispatcher_core`), and the Python API is curated by the pure-Python package.

use pyo3::prelude::*;

mod errors;
mod fork;
mod json;
mod process;
mod store;
mod worker;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", queue_dispatcher_core::VERSION)?;
    errors::register(m)?;
    m.add_class::<store::PyStore>()?;
    m.add_class::<store::Batch>()?;
    m.add_class::<store::Template>()?;
    m.add_class::<store::TaskRecord>()?;
    m.add_class::<store::ErrorInfo>()?;
    m.add_class::<store::QueueCountsRecord>()?;
    m.add_class::<store::DispatcherRecord>()?;
    m.add_class::<worker::Registered>()?;
    m.add_class::<worker::RunningTask>()?;
    m.add_class::<worker::WorkerPool>()?;
    m.add_class::<process::PyPidFile>()?;
    m.add_function(wrap_pyfunction!(worker::current_task, m)?)?;
    m.add_function(wrap_pyfunction!(json::encode_json, m)?)?;
    m.add_function(wrap_pyfunction!(json::decode_json, m)?)?;
    m.add_function(wrap_pyfunction!(json::encode_args_py, m)?)?;
    m.add_function(wrap_pyfunction!(process::parse_age, m)?)?;
    m.add_function(wrap_pyfunction!(process::set_process_title, m)?)?;
    m.add_function(wrap_pyfunction!(store::_core_enqueue_rate, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_before_fork, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_after_fork, m)?)?;
    m.add_function(wrap_pyfunction!(fork::_after_fork_child, m)?)?;
    m.add_function(wrap_pyfunction!(store::_core_drain_rate, m)?)?;
    Ok(())
}
