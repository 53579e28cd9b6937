//! What a target name may look like, checked at enqueue for both runtimes. This is only the part
//! of the security rule that the name itself shows (syntax, private names, methods every Ruby
//! object inherits); the worker's registry lookup is the real gate.

use crate::error::{Error, Result};
use crate::task::Runtime;

/// Methods of Object, Kernel, BasicObject, Module and Class that a row must never name.
const RUBY_FORBIDDEN: &[&str] = &[
    "__id__",
    "__send__",
    "instance_eval",
    "instance_exec",
    "class_eval",
    "class_exec",
    "module_eval",
    "module_exec",
    "send",
    "public_send",
    "method",
    "public_method",
    "singleton_method",
    "methods",
    "define_method",
    "define_singleton_method",
    "remove_method",
    "undef_method",
    "alias_method",
    "instance_variable_get",
    "instance_variable_set",
    "instance_variables",
    "remove_instance_variable",
    "class_variable_get",
    "class_variable_set",
    "remove_class_variable",
    "const_get",
    "const_set",
    "const_missing",
    "remove_const",
    "const_source_location",
    "new",
    "allocate",
    "superclass",
    "include",
    "extend",
    "prepend",
    "included_modules",
    "ancestors",
    "instance_method",
    "public_instance_method",
    "attr",
    "attr_reader",
    "attr_writer",
    "attr_accessor",
    "private",
    "public",
    "protected",
    "module_function",
    "private_constant",
    "public_constant",
    "refine",
    "using",
    "eval",
    "system",
    "exec",
    "spawn",
    "fork",
    "syscall",
    "open",
    "require",
    "require_relative",
    "load",
    "autoload",
    "exit",
    "exit!",
    "abort",
    "at_exit",
    "trap",
    "sleep",
    "binding",
    "caller",
    "caller_locations",
    "raise",
    "fail",
    "throw",
    "catch",
    "loop",
    "lambda",
    "proc",
    "freeze",
    "dup",
    "clone",
    "tap",
    "then",
    "yield_self",
    "display",
    "puts",
    "print",
    "p",
    "pp",
    "printf",
    "putc",
    "gets",
    "readline",
    "readlines",
    "select",
    "sprintf",
    "format",
    "srand",
    "rand",
    "set_trace_func",
    "trace_var",
    "untrace_var",
    "global_variables",
    "local_variables",
    "object_id",
    "respond_to?",
    "respond_to_missing?",
    "method_missing",
    "instance_of?",
    "kind_of?",
    "is_a?",
    "frozen?",
    "nil?",
    "hash",
    "inspect",
    "to_s",
    "class",
    "singleton_class",
    "equal?",
    "eql?",
    "instance_variable_defined?",
    "extend_object",
    "extended",
    "included",
    "inherited",
    "method_added",
    "prepended",
    "initialize",
    "initialize_copy",
    "initialize_clone",
    "initialize_dup",
    "private_class_method",
    "public_class_method",
    "module_function",
    "instance_methods",
    "public_instance_methods",
    "private_instance_methods",
    "protected_instance_methods",
    "constants",
    "const_defined?",
    "class_variables",
    "class_variable_defined?",
    "name",
    "to_enum",
    "enum_for",
    "itself",
    "find",
];

fn is_ident(s: &str, first_upper: Option<bool>) -> bool {
    let mut chars = s.chars();
    let Some(c0) = chars.next() else { return false };
    let first_ok = match first_upper {
        Some(true) => c0.is_ascii_uppercase(),
        Some(false) => c0.is_ascii_lowercase() || c0 == '_',
        None => c0.is_ascii_alphabetic() || c0 == '_',
    };
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Checks a target name for `runtime`; the message names what is wrong.
/// Whether `target` takes a receiver: only a Ruby instance-method target (`Const#method`) does,
/// and it needs one (the id its class finds the instance by).
pub fn validate_receiver(runtime: Runtime, target: &str, receiver: Option<&str>) -> Result<()> {
    let why = match (runtime, receiver) {
        (Runtime::Ruby, None) if target.contains('#') => {
            format!("{target}: an instance-method target needs a receiver (the instance's id)")
        }
        (Runtime::Ruby, Some(_)) if !target.contains('#') => {
            format!("{target}: only a Ruby \"Const#method\" target takes a receiver")
        }
        (Runtime::Python, Some(_)) => "only Ruby instance-method targets take a receiver".to_string(),
        _ => return Ok(()),
    };
    Err(Error::invalid("receiver", why))
}

pub fn validate(runtime: Runtime, target: &str) -> Result<()> {
    let bad = |why: String| Err(Error::invalid("target", format!("{target:?}: {why}")));
    if target.is_empty() || target.len() > 500 {
        return bad("must be 1 to 500 characters".into());
    }
    match runtime {
        Runtime::Python => {
            let Some((module, qualname)) = target.split_once(':') else {
                return bad("a Python target is \"module:qualname\"".into());
            };
            if !module.split('.').all(|p| is_ident(p, None)) {
                return bad(format!("{module:?} is not a module path"));
            }
            for part in qualname.split('.') {
                if !is_ident(part, None) {
                    return bad(format!("{qualname:?} is not a qualified name"));
                }
                if part.starts_with('_') {
                    return bad(format!("{part:?} is private (starts with '_')"));
                }
            }
            Ok(())
        }
        Runtime::Ruby => {
            let Some(split) = target.find(['.', '#']) else {
                return bad("a Ruby target is \"Const.method\" or \"Const#method\"".into());
            };
            let (konst, method) = (&target[..split], &target[split + 1..]);
            if !konst.split("::").all(|p| is_ident(p, Some(true))) {
                return bad(format!("{konst:?} is not a constant path"));
            }
            let stem = method.strip_suffix(['?', '!']).unwrap_or(method);
            if !is_ident(stem, Some(false)) {
                return bad(format!("{method:?} is not a method name"));
            }
            if method.starts_with('_') {
                return bad(format!("{method:?} is private (starts with '_')"));
            }
            if RUBY_FORBIDDEN.contains(&method) {
                return bad(format!(
                    "{method:?} is a method of Object/Kernel/BasicObject/Module/Class and can never be a task"
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_targets() {
        assert!(validate(Runtime::Python, "myapp.jobs:send_mail").is_ok());
        assert!(validate(Runtime::Python, "myapp.jobs:Mailer.send").is_ok());
        assert!(validate(Runtime::Python, "myapp.jobs:_private").is_err());
        assert!(validate(Runtime::Python, "myapp.jobs:Mailer.__init__").is_err());
        assert!(validate(Runtime::Python, "myapp.jobs").is_err());
        assert!(validate(Runtime::Python, "os:system; rm").is_err());
    }

    #[test]
    fn ruby_targets() {
        assert!(validate(Runtime::Ruby, "LongRunningMailJob.send_mail").is_ok());
        assert!(validate(Runtime::Ruby, "Mail::Job#deliver!").is_ok());
        for bad in [
            "Kernel#system",
            "LongRunningMailJob.class_eval",
            "Object.const_get",
            "Foo.send",
            "Foo.new",
            "foo.bar",
            "Foo._x",
            "Foo",
        ] {
            assert!(validate(Runtime::Ruby, bad).is_err(), "{bad} accepted");
        }
    }
}
