//! Runs blocking engine calls without the GVL, so other Ruby threads run meanwhile, with an
//! unblocking function (UBF) that Ruby calls on Thread#kill, Thread#raise or a signal for this
//! thread; the UBF must make the call return soon (e.g. wake a waiting claim).
//! Guarantees: the closure never touches Ruby; a panic in it becomes a Ruby fatal error, never an
//! unwind into C; a pending interrupt is processed with the GVL held through a protected call.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use magnus::{rb_sys::protect, Error, Ruby};

struct Call<F, R> {
    f: Option<F>,
    out: Option<std::thread::Result<R>>,
}

unsafe extern "C" fn run<F: FnOnce() -> R, R>(data: *mut c_void) -> *mut c_void {
    // SAFETY: `data` is the `Call` that `without_gvl` keeps alive on its stack for this call.
    let call = unsafe { &mut *(data as *mut Call<F, R>) };
    if let Some(f) = call.f.take() {
        call.out = Some(catch_unwind(AssertUnwindSafe(f)));
    }
    std::ptr::null_mut()
}

unsafe extern "C" fn unblock<U: Fn()>(data: *mut c_void) {
    // SAFETY: `data` is the UBF that `without_gvl` keeps alive on its stack for this call. It
    // may run on another thread (Ruby's timer thread): U is Sync.
    let ubf = unsafe { &*(data as *const U) };
    let _ = catch_unwind(AssertUnwindSafe(ubf));
}

/// Calls `f` with the GVL released; `ubf` interrupts it. If an interrupt is already pending,
/// it is processed first (which may raise: Thread#kill, Interrupt...), then `f` runs.
pub fn without_gvl<F, R, U>(f: F, ubf: U) -> Result<R, Error>
where
    F: FnOnce() -> R,
    U: Fn() + Sync,
{
    let mut call = Call { f: Some(f), out: None };
    loop {
        // SAFETY: both pointers refer to locals that outlive the call; `run` never touches Ruby.
        unsafe {
            rb_sys::rb_thread_call_without_gvl2(
                Some(run::<F, R>),
                &mut call as *mut Call<F, R> as *mut c_void,
                Some(unblock::<U>),
                &ubf as *const U as *mut c_void,
            );
        }
        match call.out.take() {
            Some(Ok(r)) => return Ok(r),
            Some(Err(panic)) => {
                let ruby = Ruby::get().expect("called on a Ruby thread");
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".into());
                return Err(Error::new(
                    ruby.exception_runtime_error(),
                    format!("queue_dispatcher native code panicked: {msg}"),
                ));
            }
            // `_2` returns without running `f` while an interrupt is pending: handle it, retry.
            None => check_interrupts()?,
        }
    }
}

/// Processes pending interrupts (runs trap handlers, raises for Thread#kill/raise) with the GVL
/// held; an exception comes back as `Err`, never as a longjmp through Rust frames.
pub fn check_interrupts() -> Result<(), Error> {
    protect(|| {
        // SAFETY: called with the GVL held, inside rb_protect.
        unsafe { rb_sys::rb_thread_check_ints() };
        rb_sys::special_consts::Qnil as rb_sys::VALUE
    })
    .map(|_| ())
}

/// A UBF for calls that finish on their own within a bounded time (a commit): nothing to wake.
pub fn no_ubf() {}
