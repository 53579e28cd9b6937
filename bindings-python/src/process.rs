//! Process-level helpers for the worker command line: the flock'ed pid file of `-b`, ages such
//! as `7d`, and the status line in the process title. Called from the main thread.

use std::path::PathBuf;

use pyo3::prelude::*;
use queue_dispatcher_core::sync::Mutex;
use queue_dispatcher_core::{admin, PidFile};

use crate::errors::to_py;

/// A held pid file (locked for this process's lifetime; a second holder is refused).
#[pyclass(module = "queue_dispatcher._native", name = "PidFile", frozen)]
pub struct PyPidFile {
    path: PathBuf,
    held: Mutex<Option<PidFile>>,
}

#[pymethods]
impl PyPidFile {
    /// Locks `path` and writes this process's pid into it, or raises InvalidInputError naming
    /// the pid that holds it.
    #[new]
    fn new(path: PathBuf) -> PyResult<PyPidFile> {
        let held = PidFile::acquire(&path).map_err(to_py)?;
        Ok(PyPidFile { path, held: Mutex::new(Some(held)) })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// Unlocks and removes the file.
    fn release(&self) {
        self.held.lock().take();
    }
}

/// Parses an age like `90s`, `15m`, `12h`, `7d` or `2w` (a bare number is seconds) into seconds.
#[pyfunction]
pub fn parse_age(text: &str) -> PyResult<f64> {
    admin::parse_age(text).map(|d| d.as_secs_f64()).map_err(to_py)
}

/// Shows `title` as this process's command line (ps, top), within the space the original command
/// line had; also names the main thread. Returns False where this is not possible.
#[pyfunction]
pub fn set_process_title(title: &str) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return false;
        };
        // Fields after the command name (which may hold spaces) start at field 3 ("state").
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            return false;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        let (Some(start), Some(end)) = (
            fields.get(45).and_then(|s| s.parse::<usize>().ok()),
            fields.get(46).and_then(|s| s.parse::<usize>().ok()),
        ) else {
            return false;
        };
        if end <= start + 1 {
            return false;
        }
        let room = end - start - 1;
        let bytes = title.as_bytes();
        let n = bytes.len().min(room);
        // SAFETY: [arg_start, arg_end) is this process's own argv area, mapped writable by the
        // kernel at exec; Python copied argv at startup and never reads this memory again. We
        // write strictly inside it and NUL-fill the rest.
        unsafe {
            let p = start as *mut u8;
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n);
            std::ptr::write_bytes(p.add(n), 0, end - start - n);
        }
        let mut comm = [0u8; 16];
        let short = title.split(' ').next().unwrap_or("").as_bytes();
        let k = short.len().min(15);
        comm[..k].copy_from_slice(&short[..k]);
        // SAFETY: PR_SET_NAME reads a NUL-terminated buffer of at most 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, comm.as_ptr()) };
        true
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = title;
        false
    }
}
