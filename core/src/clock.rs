//! Time sources. Stored times are wall-clock microseconds (UTC). Lease decisions never use the wall
//! clock: they compare a machine-wide monotonic clock (CLOCK_BOOTTIME, shared by every process on
//! the host that can open the SQLite file) tagged with the boot id, so clock steps cannot make a
//! live dispatcher look dead and a reboot makes every older heartbeat dead.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

static WALL_OFFSET: AtomicI64 = AtomicI64::new(0);

/// Wall-clock microseconds since the Unix epoch.
pub fn now_micros() -> i64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    d.as_micros() as i64 + WALL_OFFSET.load(Ordering::Relaxed)
}

/// Steps this process's view of the wall clock (tests of clock-step robustness only).
#[doc(hidden)]
pub fn step_wall_clock(micros: i64) {
    WALL_OFFSET.fetch_add(micros, Ordering::Relaxed);
}

/// Monotonic microseconds shared by all processes of this boot.
pub fn mono_micros() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    #[cfg(target_os = "linux")]
    let clock = libc::CLOCK_BOOTTIME;
    #[cfg(not(target_os = "linux"))]
    let clock = libc::CLOCK_MONOTONIC;
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is valid.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    #[allow(clippy::unnecessary_cast)] // time_t is not i64 everywhere
    let micros = ts.tv_sec as i64 * 1_000_000 + ts.tv_nsec as i64 / 1_000;
    micros
}

/// Identifies this boot of this machine; monotonic readings are only comparable within one.
pub fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| format!("{}-{}", hostname(), now_micros() - mono_micros()))
    })
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
