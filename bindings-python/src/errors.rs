//! The package's exception hierarchy and the one mapping from the engine's error enum to it.
//! Runs on whichever thread holds the GIL. Every engine variant maps to its own subclass of
//! `queue_dispatcher.Error` (an exhaustive match: a new variant fails to compile here), and the
//! variant's fields are set as attributes so callers can branch without parsing messages.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyModule;
use queue_dispatcher_core::Error as CoreError;

create_exception!(queue_dispatcher, Error, PyException, "Base class of every queue_dispatcher error.");
create_exception!(queue_dispatcher, InvalidInputError, Error, "An argument is malformed; `field` names it.");
create_exception!(
    queue_dispatcher,
    TaskNotFoundError,
    Error,
    "No task with this id exists (never enqueued, or purged)."
);
create_exception!(queue_dispatcher, MissingDependencyError, Error, "A dependency names a task that does not exist.");
create_exception!(queue_dispatcher, DependencyCycleError, Error, "Adding this dependency would close a cycle.");
create_exception!(
    queue_dispatcher,
    InvalidStateError,
    Error,
    "The task's state does not allow the action (e.g. adding a dependency to a started task)."
);
create_exception!(
    queue_dispatcher,
    StaleTokenError,
    Error,
    "An outcome was refused: the run had been declared lost or the task was reset."
);
create_exception!(queue_dispatcher, NotADatabaseError, Error, "The file is not a queue_dispatcher database.");
create_exception!(queue_dispatcher, SchemaTooNewError, Error, "The database was written by a newer queue_dispatcher.");
create_exception!(
    queue_dispatcher,
    BusyError,
    Error,
    "The database stayed locked by another connection past the busy timeout."
);
create_exception!(queue_dispatcher, StoppedError, Error, "The dispatcher has been stopped.");
create_exception!(
    queue_dispatcher,
    StorageError,
    Error,
    "Any other storage failure (I/O error, disk full, corruption...)."
);

/// Converts an engine error into the matching Python exception, with the variant's fields as
/// attributes (`field`, `task_id`, `dependency`, `state`, `action`, `path`, `found`, `supported`).
pub fn to_py(err: CoreError) -> PyErr {
    Python::attach(|py| {
        let message = err.to_string();
        let (exc, attrs): (PyErr, Vec<(&str, Py<PyAny>)>) = match err {
            CoreError::InvalidInput { field, message: _ } => (
                InvalidInputError::new_err(message),
                vec![("field", field.into_pyobject(py).unwrap().into_any().unbind())],
            ),
            CoreError::NotFound(id) => (TaskNotFoundError::new_err(message), vec![("task_id", int(py, id))]),
            CoreError::MissingDependency { task, dependency } => (
                MissingDependencyError::new_err(message),
                vec![("task_id", opt_int(py, task)), ("dependency", int(py, dependency))],
            ),
            CoreError::DependencyCycle { task, dependency } => (
                DependencyCycleError::new_err(message),
                vec![("task_id", int(py, task)), ("dependency", int(py, dependency))],
            ),
            CoreError::InvalidState { task, state, action } => (
                InvalidStateError::new_err(message),
                vec![("task_id", int(py, task)), ("state", string(py, state.as_str())), ("action", string(py, action))],
            ),
            CoreError::StaleToken { task } => (StaleTokenError::new_err(message), vec![("task_id", int(py, task))]),
            CoreError::NotADatabase { path, message: _ } => {
                (NotADatabaseError::new_err(message), vec![("path", string(py, &path))])
            }
            CoreError::SchemaTooNew { found, supported } => (
                SchemaTooNewError::new_err(message),
                vec![("found", int(py, found)), ("supported", int(py, supported))],
            ),
            CoreError::Busy { message: _ } => (BusyError::new_err(message), vec![]),
            CoreError::Stopped => (StoppedError::new_err(message), vec![]),
            CoreError::Storage { message: _ } => (StorageError::new_err(message), vec![]),
        };
        if !attrs.is_empty() {
            let value = exc.value(py);
            for (name, v) in attrs {
                let _ = value.setattr(name, v);
            }
        }
        exc
    })
}

/// A binding-level refusal of an argument, raised like the engine's `InvalidInput`.
pub fn invalid(field: &str, message: impl Into<String>) -> PyErr {
    to_py(CoreError::InvalidInput { field: field.to_string(), message: message.into() })
}

fn int(py: Python<'_>, v: i64) -> Py<PyAny> {
    v.into_pyobject(py).unwrap().into_any().unbind()
}

fn opt_int(py: Python<'_>, v: Option<i64>) -> Py<PyAny> {
    v.into_pyobject(py).unwrap().into_any().unbind()
}

fn string(py: Python<'_>, v: &str) -> Py<PyAny> {
    v.into_pyobject(py).unwrap().into_any().unbind()
}

/// Test hook: raises the exception mapped from a sample of the named engine variant, so the test
/// suite can check that every variant has its own class.
#[pyfunction]
pub fn _raise_engine_error(variant: &str) -> PyResult<()> {
    use queue_dispatcher_core::State;
    let err = match variant {
        "InvalidInput" => CoreError::InvalidInput { field: "args".into(), message: "sample".into() },
        "NotFound" => CoreError::NotFound(7),
        "MissingDependency" => CoreError::MissingDependency { task: Some(1), dependency: 2 },
        "DependencyCycle" => CoreError::DependencyCycle { task: 1, dependency: 2 },
        "InvalidState" => CoreError::InvalidState { task: 1, state: State::Running, action: "add a dependency to" },
        "StaleToken" => CoreError::StaleToken { task: 3 },
        "NotADatabase" => CoreError::NotADatabase { path: "/tmp/x".into(), message: "sample".into() },
        "SchemaTooNew" => CoreError::SchemaTooNew { found: 99, supported: 1 },
        "Busy" => CoreError::Busy { message: "sample".into() },
        "Stopped" => CoreError::Stopped,
        "Storage" => CoreError::Storage { message: "sample".into() },
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!("unknown engine error variant {other:?}")))
        }
    };
    Err(to_py(err))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    m.add("InvalidInputError", py.get_type::<InvalidInputError>())?;
    m.add("TaskNotFoundError", py.get_type::<TaskNotFoundError>())?;
    m.add("MissingDependencyError", py.get_type::<MissingDependencyError>())?;
    m.add("DependencyCycleError", py.get_type::<DependencyCycleError>())?;
    m.add("InvalidStateError", py.get_type::<InvalidStateError>())?;
    m.add("StaleTokenError", py.get_type::<StaleTokenError>())?;
    m.add("NotADatabaseError", py.get_type::<NotADatabaseError>())?;
    m.add("SchemaTooNewError", py.get_type::<SchemaTooNewError>())?;
    m.add("BusyError", py.get_type::<BusyError>())?;
    m.add("StoppedError", py.get_type::<StoppedError>())?;
    m.add("StorageError", py.get_type::<StorageError>())?;
    m.add_function(wrap_pyfunction!(_raise_engine_error, m)?)?;
    Ok(())
}
