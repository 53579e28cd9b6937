//! `QueueDispatcher::Error < StandardError` and one subclass per engine error variant. The match in
//! [`to_ruby`] is exhaustive on purpose: a new engine variant must get its Ruby class here.
//! Runs on Ruby threads only (it creates exception objects).

use magnus::{exception::ExceptionClass, prelude::*, value::Lazy, Error, RModule, Ruby, Value};
use queue_dispatcher_core::Error as CoreError;

fn class(ruby: &Ruby, name: &str) -> ExceptionClass {
    let top: RModule = ruby.class_object().const_get("QueueDispatcher").expect("QueueDispatcher defined at init");
    top.const_get(name).expect("error classes defined at init")
}

macro_rules! error_classes {
    ($($stat:ident => $name:literal),* $(,)?) => {
        $(pub static $stat: Lazy<ExceptionClass> = Lazy::new(|ruby| class(ruby, $name));)*
        const NAMES: &[&str] = &[$($name),*];
    };
}

error_classes! {
    INVALID_INPUT => "InvalidInputError",
    NOT_FOUND => "NotFoundError",
    MISSING_DEPENDENCY => "MissingDependencyError",
    DEPENDENCY_CYCLE => "DependencyCycleError",
    INVALID_STATE => "InvalidStateError",
    STALE_TOKEN => "StaleTokenError",
    NOT_A_DATABASE => "NotADatabaseError",
    SCHEMA_TOO_NEW => "SchemaTooNewError",
    BUSY => "BusyError",
    STOPPED => "StoppedError",
    STORAGE => "StorageError",
}

/// Defines `QueueDispatcher::Error` and its subclasses (reopened with docs by the Ruby library).
pub fn define(ruby: &Ruby, top: RModule) -> Result<(), Error> {
    let base = top.define_error("Error", ruby.exception_standard_error())?;
    for name in NAMES {
        top.define_error(*name, base)?;
    }
    Ok(())
}

/// The Ruby exception for an engine error; `field` / `task_id` are set where the variant has them.
pub fn to_ruby(e: CoreError) -> Error {
    let ruby = Ruby::get().expect("engine errors are converted on Ruby threads");
    let message = e.to_string();
    let (class, field, task): (&Lazy<ExceptionClass>, Option<String>, Option<i64>) = match e {
        CoreError::InvalidInput { field, .. } => (&INVALID_INPUT, Some(field), None),
        CoreError::NotFound(id) => (&NOT_FOUND, None, Some(id)),
        CoreError::MissingDependency { task, .. } => (&MISSING_DEPENDENCY, None, task),
        CoreError::DependencyCycle { task, .. } => (&DEPENDENCY_CYCLE, None, Some(task)),
        CoreError::InvalidState { task, .. } => (&INVALID_STATE, None, Some(task)),
        CoreError::StaleToken { task } => (&STALE_TOKEN, None, Some(task)),
        CoreError::NotADatabase { .. } => (&NOT_A_DATABASE, None, None),
        CoreError::SchemaTooNew { .. } => (&SCHEMA_TOO_NEW, None, None),
        CoreError::Busy { .. } => (&BUSY, None, None),
        CoreError::Stopped => (&STOPPED, None, None),
        CoreError::Storage { .. } => (&STORAGE, None, None),
    };
    let class = ruby.get_inner(class);
    match class.new_instance((message.as_str(),)) {
        Ok(exc) => {
            let _: Result<Value, _> = exc.funcall("instance_variable_set", ("@field", field));
            let _: Result<Value, _> = exc.funcall("instance_variable_set", ("@task_id", task));
            Error::from(exc)
        }
        Err(err) => err,
    }
}

/// An InvalidInputError raised by the binding itself (argument conversion), naming the field.
pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Error {
    to_ruby(CoreError::InvalidInput { field: field.into(), message: message.into() })
}

pub trait IntoRb<T> {
    fn rb(self) -> Result<T, Error>;
}

impl<T> IntoRb<T> for Result<T, CoreError> {
    fn rb(self) -> Result<T, Error> {
        self.map_err(to_ruby)
    }
}
