//! Python values ⇄ the stored JSON text. Runs with the GIL held, on the calling thread.
//! Arguments are JSON only (never pickle): the encoder accepts None, bool, int (within i64),
//! finite float, str, list, tuple and dict with str keys, and refuses anything else with a
//! message naming the argument and the path inside it. The decoder builds Python objects straight
//! from the text, keeping key order.

use std::fmt::Write as _;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// Nesting deeper than this is refused (it is almost certainly a self-referencing container).
const MAX_DEPTH: usize = 200;

/// Why a value could not be encoded: the path inside the value and what is wrong there.
pub struct EncodeError {
    pub path: String,
    pub message: String,
}

impl EncodeError {
    fn new(path: &str, message: impl Into<String>) -> EncodeError {
        EncodeError { path: path.to_string(), message: message.into() }
    }
}

impl From<PyErr> for EncodeError {
    fn from(e: PyErr) -> EncodeError {
        EncodeError { path: String::new(), message: e.to_string() }
    }
}

fn type_name(v: &Bound<'_, PyAny>) -> String {
    v.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

fn push_str(out: &mut String, s: &str) {
    // SAFETY: serde_json writes a quoted, escaped copy of a &str, which is valid UTF-8, and
    // writing into a Vec cannot fail half-way.
    let _ = serde_json::to_writer(unsafe { out.as_mut_vec() }, s);
}

/// Appends the JSON text of `v` to `out`; `path` names where `v` sits, for error messages.
pub fn encode(v: &Bound<'_, PyAny>, out: &mut String, path: &mut String, depth: usize) -> Result<(), EncodeError> {
    if depth > MAX_DEPTH {
        return Err(EncodeError::new(
            path,
            format!("nested deeper than {MAX_DEPTH} levels (a container that contains itself?)"),
        ));
    }
    if v.is_none() {
        out.push_str("null");
    } else if let Ok(s) = v.cast::<PyString>() {
        push_str(out, &s.to_cow()?);
    } else if let Ok(b) = v.cast::<PyBool>() {
        out.push_str(if b.is_true() { "true" } else { "false" });
    } else if let Ok(i) = v.cast::<PyInt>() {
        match i.extract::<i64>() {
            Ok(n) => {
                let _ = write!(out, "{n}");
            }
            Err(_) => {
                return Err(EncodeError::new(
                    path,
                    format!(
                        "integer {} is outside the 64-bit signed range JSON tasks can carry",
                        i.str().map(|s| s.to_string()).unwrap_or_default()
                    ),
                ))
            }
        }
    } else if let Ok(f) = v.cast::<PyFloat>() {
        let x = f.value();
        if !x.is_finite() {
            return Err(EncodeError::new(path, format!("{x} is not allowed (JSON has no NaN or Infinity)")));
        }
        out.push_str(&serde_json::Number::from_f64(x).map(|n| n.to_string()).unwrap_or_default());
    } else if let Ok(d) = v.cast::<PyDict>() {
        out.push('{');
        for (n, (k, item)) in d.iter().enumerate() {
            let Ok(key) = k.cast::<PyString>() else {
                return Err(EncodeError::new(
                    path,
                    format!(
                        "dict key {} is a {}: JSON object keys must be str",
                        k.repr().map(|r| r.to_string()).unwrap_or_default(),
                        type_name(&k)
                    ),
                ));
            };
            let key = key.to_cow()?;
            if n > 0 {
                out.push(',');
            }
            push_str(out, &key);
            out.push(':');
            let len = path.len();
            let _ = write!(path, "[{:?}]", key.as_ref());
            encode(&item, out, path, depth + 1)?;
            path.truncate(len);
        }
        out.push('}');
    } else if v.is_instance_of::<PyList>() || v.is_instance_of::<PyTuple>() {
        out.push('[');
        for (n, item) in v.try_iter()?.enumerate() {
            if n > 0 {
                out.push(',');
            }
            let len = path.len();
            let _ = write!(path, "[{n}]");
            encode(&item?, out, path, depth + 1)?;
            path.truncate(len);
        }
        out.push(']');
    } else {
        return Err(EncodeError::new(
            path,
            format!("a {} cannot be stored: task data is JSON (None, bool, int, float, str, list, tuple, dict with str keys)", type_name(v)),
        ));
    }
    Ok(())
}

/// Encodes one value, or says what is wrong (with `what` naming the value).
pub fn encode_value(v: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let mut out = String::with_capacity(64);
    let mut path = String::new();
    encode(v, &mut out, &mut path, 0)
        .map_err(|e| crate::errors::invalid(what, format!("{what}{}: {}", e.path, e.message)))?;
    Ok(out)
}

/// The stored argument text `{"args": [...], "kwargs": {...}}`; a refusal names the argument
/// (`argument 0`, `keyword argument 'subject'`) and the path inside it.
pub fn encode_args(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    let mut out = String::with_capacity(64);
    let mut path = String::new();
    let fail = |what: String, e: EncodeError| {
        crate::errors::invalid("args", format!("{what}{} cannot be enqueued: {}", e.path, e.message))
    };
    out.push_str("{\"args\":[");
    for (n, item) in args.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        path.clear();
        encode(&item, &mut out, &mut path, 1).map_err(|e| fail(format!("argument {n}"), e))?;
    }
    out.push_str("],\"kwargs\":{");
    if let Some(kw) = kwargs {
        for (n, (k, item)) in kw.iter().enumerate() {
            let key = k
                .cast::<PyString>()
                .map_err(|_| crate::errors::invalid("args", "keyword argument names must be str"))?
                .to_cow()?;
            if n > 0 {
                out.push(',');
            }
            push_str(&mut out, &key);
            out.push(':');
            path.clear();
            encode(&item, &mut out, &mut path, 1)
                .map_err(|e| fail(format!("keyword argument {:?}", key.as_ref()), e))?;
        }
    }
    out.push_str("}}");
    Ok(out)
}

struct PySeed<'py>(Python<'py>);

impl<'de, 'py> DeserializeSeed<'de> for PySeed<'py> {
    type Value = Bound<'py, PyAny>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

fn py_err<E: serde::de::Error>(e: PyErr) -> E {
    E::custom(e.to_string())
}

impl<'de, 'py> Visitor<'de> for PySeed<'py> {
    type Value = Bound<'py, PyAny>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.0.None().into_bound(self.0))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(PyBool::new(self.0, v).to_owned().into_any())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into_pyobject(self.0).unwrap().into_any())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into_pyobject(self.0).unwrap().into_any())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(PyFloat::new(self.0, v).into_any())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(PyString::new(self.0, v).into_any())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let list = PyList::empty(self.0);
        while let Some(item) = seq.next_element_seed(PySeed(self.0))? {
            list.append(item).map_err(py_err)?;
        }
        Ok(list.into_any())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let dict = PyDict::new(self.0);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value = map.next_value_seed(PySeed(self.0))?;
            dict.set_item(key.as_ref(), value).map_err(py_err)?;
        }
        Ok(dict.into_any())
    }
}

/// Parses JSON text into Python objects (dicts keep the stored key order).
pub fn decode<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = PySeed(py).deserialize(&mut de).map_err(|e| PyValueError::new_err(format!("invalid JSON: {e}")))?;
    de.end().map_err(|e| PyValueError::new_err(format!("invalid JSON: {e}")))?;
    Ok(v)
}

/// The stored arguments as a call: (args tuple, kwargs dict).
pub fn decode_args<'py>(py: Python<'py>, text: &str) -> PyResult<(Bound<'py, PyTuple>, Bound<'py, PyDict>)> {
    let v = decode(py, text)?;
    let d = v.cast::<PyDict>().map_err(|_| PyValueError::new_err("stored arguments are not a JSON object"))?;
    let args = match d.get_item("args")? {
        Some(a) => PyTuple::new(
            py,
            a.cast::<PyList>().map_err(|_| PyValueError::new_err("stored \"args\" is not a list"))?.iter(),
        )?,
        None => PyTuple::empty(py),
    };
    let kwargs = match d.get_item("kwargs")? {
        Some(k) => k.cast_into::<PyDict>().map_err(|_| PyValueError::new_err("stored \"kwargs\" is not an object"))?,
        None => PyDict::new(py),
    };
    Ok((args, kwargs))
}

/// `encode_json(value)`: the JSON text the package stores for `value` (refusing what it refuses).
#[pyfunction]
pub fn encode_json(value: &Bound<'_, PyAny>) -> PyResult<String> {
    encode_value(value, "value")
}

/// `decode_json(text)`: parses stored JSON text, keeping key order.
#[pyfunction]
pub fn decode_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    decode(py, text)
}

/// `encode_args(args, kwargs)`: the stored argument text of a call.
#[pyfunction]
#[pyo3(name = "encode_args", signature = (args, kwargs=None))]
pub fn encode_args_py(args: &Bound<'_, PyTuple>, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<String> {
    encode_args(args, kwargs)
}
