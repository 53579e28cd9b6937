//! The one error type of the engine. Each variant is a case a caller branches on; the bindings map
//! every variant (exhaustively, no catch-all) to a subclass of their package error.

use std::fmt;

use crate::task::{State, TaskId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// An argument is malformed: `field` names it, `message` says what is wrong.
    InvalidInput { field: String, message: String },
    /// No task with this id exists (never enqueued, or purged).
    NotFound(TaskId),
    /// A dependency names a task that does not exist.
    MissingDependency { task: Option<TaskId>, dependency: TaskId },
    /// Adding this dependency would close a cycle.
    DependencyCycle { task: TaskId, dependency: TaskId },
    /// The task is not in a state that allows the action (e.g. adding a dependency to a started task).
    InvalidState { task: TaskId, state: State, action: &'static str },
    /// An outcome or progress report carried an attempt token that is no longer current: the run
    /// was declared lost (or the task was reset) and its result is refused.
    StaleToken { task: TaskId },
    /// The file exists but is not a queue_dispatcher database (or not an SQLite file at all).
    NotADatabase { path: String, message: String },
    /// The database was written by a newer version of queue_dispatcher.
    SchemaTooNew { found: i64, supported: i64 },
    /// The database stayed locked by another connection for longer than the busy timeout.
    Busy { message: String },
    /// The dispatcher has been stopped: no more claims.
    Stopped,
    /// Any other storage failure (I/O error, disk full, corruption...).
    Storage { message: String },
}

impl Error {
    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
        Error::InvalidInput { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidInput { field, message } => write!(f, "invalid {field}: {message}"),
            Error::NotFound(id) => write!(f, "task {id} does not exist"),
            Error::MissingDependency { task: Some(t), dependency } => {
                write!(f, "task {t} cannot depend on task {dependency}: task {dependency} does not exist")
            }
            Error::MissingDependency { task: None, dependency } => {
                write!(f, "dependency on task {dependency} refused: task {dependency} does not exist")
            }
            Error::DependencyCycle { task, dependency } => write!(
                f,
                "task {task} cannot depend on task {dependency}: task {dependency} already depends on task {task} (cycle)"
            ),
            Error::InvalidState { task, state, action } => {
                write!(f, "cannot {action} task {task}: it is {state}")
            }
            Error::StaleToken { task } => write!(
                f,
                "outcome of task {task} refused: this run was declared lost or the task was reset, so its attempt token is stale"
            ),
            Error::NotADatabase { path, message } => {
                write!(f, "{path} is not a queue_dispatcher database: {message}")
            }
            Error::SchemaTooNew { found, supported } => write!(
                f,
                "database schema version {found} is newer than this queue_dispatcher supports ({supported}); upgrade queue_dispatcher"
            ),
            Error::Busy { message } => write!(f, "database stayed locked past the busy timeout: {message}"),
            Error::Stopped => write!(f, "the dispatcher is stopped"),
            Error::Storage { message } => write!(f, "storage error: {message}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Error {
        use rusqlite::ffi::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => Error::Busy { message: e.to_string() },
            Some(ErrorCode::NotADatabase) => Error::NotADatabase { path: String::new(), message: e.to_string() },
            _ => Error::Storage { message: e.to_string() },
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Storage { message: e.to_string() }
    }
}
