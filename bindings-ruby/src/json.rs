//! Ruby values to the stored JSON text (DESIGN.md "Stored format"): nil, true, false, Integer
//! (64-bit), finite Float, String (UTF-8), Symbol (stored as its name), Array, and Hash with
//! String or Symbol keys. Anything else is refused with an `InvalidInputError` naming where it
//! sits (`args[1]`, `kwargs[:to]`, `meta["user"]`...). Never Marshal, YAML or `to_json` hooks.
//! Runs on the calling Ruby thread with the GVL held.

use std::fmt::Write as _;

use magnus::{
    prelude::*, r_hash::ForEach, rb_sys::AsRawValue, Error, Float, Integer, RArray, RHash, RString, Symbol, Value,
};

use crate::errors::invalid;

const MAX_DEPTH: usize = 64;

fn push_str(out: &mut String, s: &str) {
    // serde_json's escaping (control characters, quotes, backslashes; UTF-8 kept as is).
    // SAFETY: serde_json writes valid UTF-8 (an escaped copy of a &str).
    let _ = serde_json::to_writer(unsafe { out.as_mut_vec() }, s);
}

fn describe(v: Value) -> String {
    // SAFETY: classname is only read here, on a Ruby thread, while `v` is alive on the stack.
    let name = unsafe { v.classname() }.into_owned();
    let inspect = v.inspect();
    let shown: String = inspect.chars().take(60).collect();
    if shown.len() < inspect.len() {
        format!("{shown}... (a {name})")
    } else {
        format!("{shown} (a {name})")
    }
}

fn refuse(path: &str, v: Value) -> Error {
    invalid(
        path,
        format!(
            "{} is not JSON; arguments must be nil, true, false, Integer, Float, String, Symbol, Array or Hash \
             (pass an id and load the object in the task instead)",
            describe(v)
        ),
    )
}

fn key_string(path: &str, k: Value) -> Result<String, Error> {
    if let Some(s) = RString::from_value(k) {
        return s.to_string().map_err(|_| invalid(path, format!("hash key {} is not valid UTF-8", describe(k))));
    }
    if let Some(s) = Symbol::from_value(k) {
        return Ok(s.name()?.into_owned());
    }
    Err(invalid(path, format!("hash key {} must be a String or Symbol", describe(k))))
}

/// Appends `v` as JSON to `out`; `path` names it in errors.
pub fn write(out: &mut String, v: Value, path: &mut String, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(invalid(path.as_str(), format!("nested more than {MAX_DEPTH} levels deep (a cycle?)")));
    }
    if v.is_nil() {
        out.push_str("null");
    } else if let Some(s) = RString::from_value(v) {
        let text =
            s.to_string().map_err(|_| invalid(path.as_str(), format!("{} is not valid UTF-8 text", describe(v))))?;
        push_str(out, &text);
    } else if let Some(i) = Integer::from_value(v) {
        let n = i
            .to_i64()
            .map_err(|_| invalid(path.as_str(), format!("{} is outside the 64-bit integer range", describe(v))))?;
        let _ = write!(out, "{n}");
    } else if let Some(s) = Symbol::from_value(v) {
        push_str(out, &s.name()?);
    } else if let Some(f) = Float::from_value(v) {
        let x = f.to_f64();
        match serde_json::Number::from_f64(x) {
            Some(n) => {
                let _ = write!(out, "{n}");
            }
            None => {
                return Err(invalid(path.as_str(), format!("{x} is not a JSON number (NaN and Infinity are refused)")))
            }
        }
    } else if let Some(a) = RArray::from_value(v) {
        out.push('[');
        let base = path.len();
        for (i, item) in a.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(path, "[{i}]");
            write(out, item, path, depth + 1)?;
            path.truncate(base);
        }
        out.push(']');
    } else if let Some(h) = RHash::from_value(v) {
        write_hash(out, h, path, depth)?;
    } else if v.as_raw() == rb_sys::special_consts::Qtrue as rb_sys::VALUE {
        out.push_str("true");
    } else if v.as_raw() == rb_sys::special_consts::Qfalse as rb_sys::VALUE {
        out.push_str("false");
    } else {
        return Err(refuse(path, v));
    }
    Ok(())
}

fn write_hash(out: &mut String, h: RHash, path: &mut String, depth: usize) -> Result<(), Error> {
    out.push('{');
    let base = path.len();
    let mut first = true;
    try_foreach(h, |k: Value, val: Value| {
        let key = key_string(&path[..], k)?;
        if !first {
            out.push(',');
        }
        first = false;
        push_str(out, &key);
        out.push(':');
        if Symbol::from_value(k).is_some() {
            let _ = write!(path, "[:{key}]");
        } else {
            let _ = write!(path, "[{key:?}]");
        }
        let r = write(out, val, path, depth + 1);
        path.truncate(base);
        r
    })?;
    out.push('}');
    Ok(())
}

/// `{"args": [...], "kwargs": {...}}` of a call.
pub fn dump_args(args: RArray, kwargs: Option<RHash>) -> Result<String, Error> {
    let mut out = String::with_capacity(64);
    let mut path = String::from("args");
    out.push_str("{\"args\":");
    write(&mut out, args.as_value(), &mut path, 0)?;
    out.push_str(",\"kwargs\":");
    match kwargs {
        Some(h) if !h.is_empty() => {
            let mut path = String::from("kwargs");
            write_hash(&mut out, h, &mut path, 0)?;
        }
        _ => out.push_str("{}"),
    }
    out.push('}');
    Ok(out)
}

/// `QueueDispatcher::Native.dump_json(value, name)`: JSON text of `value`, or an
/// InvalidInputError naming `name` and the offending part.
pub fn dump_json(value: Value, name: String) -> Result<String, Error> {
    let mut out = String::new();
    let mut path = name;
    write(&mut out, value, &mut path, 0)?;
    Ok(out)
}

/// `RHash#each` with a fallible body: stops at the first error and returns it. The error travels
/// out of the block as a value, so nothing unwinds through Ruby's iteration.
pub fn try_foreach<K, V>(hash: RHash, mut f: impl FnMut(K, V) -> Result<(), Error>) -> Result<(), Error>
where
    K: magnus::TryConvert,
    V: magnus::TryConvert,
{
    let mut result = Ok(());
    hash.foreach(|k: K, v: V| match f(k, v) {
        Ok(()) => Ok(ForEach::Continue),
        Err(e) => {
            result = Err(e);
            Ok(ForEach::Stop)
        }
    })?;
    result
}
