//! Pid files for `-b/--background`: the file is locked (flock) for the daemon's lifetime, so a
//! second start on the same pid file is refused even if a stale file was left behind by a crash.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A held pid file; the lock is released (and the file removed) on drop.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    /// Held open for its lock.
    _lock: File,
}

impl PidFile {
    /// Locks `path` and writes this process's pid into it, or refuses if another live process
    /// holds it (the error names that pid).
    pub fn acquire(path: &Path) -> Result<PidFile> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| Error::invalid("pidfile", format!("{}: {e}", path.display())))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut held = String::new();
            let _ = file.read_to_string(&mut held);
            return Err(Error::invalid(
                "pidfile",
                format!("{} is held by running process {}: refusing to start twice", path.display(), held.trim()),
            ));
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(PidFile { path: path.to_path_buf(), _lock: file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qd.pid");
        let held = PidFile::acquire(&p).unwrap();
        let err = PidFile::acquire(&p).unwrap_err().to_string();
        assert!(err.contains("refusing to start twice") && err.contains(&std::process::id().to_string()), "{err}");
        drop(held);
        assert!(!p.exists());
        std::fs::write(&p, "12345\n").unwrap();
        PidFile::acquire(&p).expect("a stale file left by a crash does not block");
    }
}
