//! The PostgreSQL store's connection pool: at most `max` connections per process and database,
//! opened on demand by the thread that needs one, reused most-recently-returned first (so hot
//! connections keep their prepared statements), closed when broken or idle too long.
//!
//! Written here rather than taken from r2d2 because a pool must keep working in a forked child
//! (gunicorn --preload, Puma preload_app!): r2d2 and its helper thread pool wait on parking_lot
//! condition variables, whose global table a parent thread may hold locked at the instant of
//! fork, which hangs the child's first checkout. This pool uses only `crate::sync` (std locks,
//! whose state lives in the lock) and starts no threads.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::sync::{Condvar, Mutex};

/// Opens connections and tells broken ones apart.
pub(super) trait Connector: Send + Sync + 'static {
    type Conn: Send;
    fn connect(&self) -> Result<Self::Conn>;
    /// True when the connection must be closed instead of reused.
    fn is_broken(&self, conn: &mut Self::Conn) -> bool;
    /// The error for a caller that found every connection busy for the whole wait.
    fn exhausted(&self, max: usize, waited: Duration) -> crate::error::Error;
}

pub(super) struct Pool<C: Connector> {
    shared: Arc<Shared<C>>,
}

impl<C: Connector> Clone for Pool<C> {
    fn clone(&self) -> Self {
        Pool { shared: self.shared.clone() }
    }
}

struct Shared<C: Connector> {
    connector: C,
    max: usize,
    idle_timeout: Duration,
    wait: Duration,
    state: Mutex<State<C::Conn>>,
    returned: Condvar,
}

struct State<T> {
    /// Idle connections with the time each was handed back, oldest first.
    idle: Vec<(T, Instant)>,
    /// Connections that exist: idle, checked out, or being opened.
    open: usize,
}

/// A checked-out connection; dropping it hands it back (or closes it when broken).
pub(super) struct Pooled<C: Connector> {
    conn: Option<C::Conn>,
    pool: Arc<Shared<C>>,
}

impl<C: Connector> Pool<C> {
    pub fn new(connector: C, max: usize, idle_timeout: Duration, wait: Duration) -> Pool<C> {
        Pool {
            shared: Arc::new(Shared {
                connector,
                max,
                idle_timeout,
                wait,
                state: Mutex::new(State { idle: Vec::new(), open: 0 }),
                returned: Condvar::new(),
            }),
        }
    }

    fn pooled(&self, conn: C::Conn) -> Pooled<C> {
        Pooled { conn: Some(conn), pool: self.shared.clone() }
    }

    /// An idle connection, else a new one (opened on this thread; its error is returned as is),
    /// else the next one handed back within the pool's wait.
    pub fn get(&self) -> Result<Pooled<C>> {
        let s = &self.shared;
        let deadline = Instant::now() + s.wait;
        let mut state = s.state.lock();
        loop {
            if let Some((conn, _)) = state.idle.pop() {
                return Ok(self.pooled(conn));
            }
            if state.open < s.max {
                state.open += 1;
                drop(state);
                return match s.connector.connect() {
                    Ok(conn) => Ok(self.pooled(conn)),
                    Err(e) => {
                        s.state.lock().open -= 1;
                        s.returned.notify_one();
                        Err(e)
                    }
                };
            }
            if s.returned.wait_until(&mut state, deadline).timed_out() && state.idle.is_empty() && state.open >= s.max {
                return Err(s.connector.exhausted(s.max, s.wait));
            }
        }
    }

    /// Closes the connections idle for longer than the idle timeout.
    pub fn reap(&self) {
        let s = &self.shared;
        let expired: Vec<C::Conn> = {
            let mut state = s.state.lock();
            let n = state.idle.iter().take_while(|(_, at)| at.elapsed() > s.idle_timeout).count();
            state.open -= n;
            state.idle.drain(..n).map(|(c, _)| c).collect()
        };
        if !expired.is_empty() {
            s.returned.notify_all();
        }
        // Closed outside the lock: each close may wait for the server.
        drop(expired);
    }

    /// (idle, open) connections, for tests.
    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let state = self.shared.state.lock();
        (state.idle.len(), state.open)
    }
}

impl<C: Connector> Deref for Pooled<C> {
    type Target = C::Conn;
    fn deref(&self) -> &C::Conn {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl<C: Connector> DerefMut for Pooled<C> {
    fn deref_mut(&mut self) -> &mut C::Conn {
        self.conn.as_mut().expect("present until dropped")
    }
}

impl<C: Connector> Drop for Pooled<C> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        let s = &self.pool;
        if s.connector.is_broken(&mut conn) {
            drop(conn);
            s.state.lock().open -= 1;
        } else {
            let now = Instant::now();
            let expired = {
                let mut state = s.state.lock();
                state.idle.push((conn, now));
                // The oldest idle connection, if it has been idle too long.
                match state.idle.first() {
                    Some((_, at)) if now.duration_since(*at) > s.idle_timeout => {
                        state.open -= 1;
                        Some(state.idle.remove(0).0)
                    }
                    _ => None,
                }
            };
            drop(expired);
        }
        s.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Connections are numbers; odd ones count as broken when `break_odd` is set.
    struct Numbers {
        opened: AtomicUsize,
        fail: std::sync::atomic::AtomicBool,
    }

    impl Connector for Numbers {
        type Conn = usize;
        fn connect(&self) -> Result<usize> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(Error::Storage { message: "cannot connect".into() });
            }
            Ok(self.opened.fetch_add(1, Ordering::SeqCst))
        }
        fn is_broken(&self, conn: &mut usize) -> bool {
            *conn >= 1000
        }
        fn exhausted(&self, max: usize, _: Duration) -> Error {
            Error::Storage { message: format!("all {max} busy") }
        }
    }

    fn pool(max: usize, idle: Duration, wait: Duration) -> Pool<Numbers> {
        Pool::new(Numbers { opened: AtomicUsize::new(0), fail: false.into() }, max, idle, wait)
    }

    #[test]
    fn connections_are_reused_newest_first_and_opened_only_on_demand() {
        let p = pool(4, Duration::from_secs(60), Duration::from_millis(50));
        assert_eq!(p.counts(), (0, 0));
        let a = p.get().unwrap();
        let b = p.get().unwrap();
        assert_eq!((*a, *b), (0, 1));
        drop(a);
        drop(b);
        assert_eq!(p.counts(), (2, 2));
        assert_eq!(*p.get().unwrap(), 1, "the most recently returned first");
    }

    #[test]
    fn a_full_pool_waits_for_a_return_then_names_the_exhaustion() {
        let p = pool(1, Duration::from_secs(60), Duration::from_millis(300));
        let held = p.get().unwrap();
        let waiter = {
            let p = p.clone();
            std::thread::spawn(move || *p.get().unwrap())
        };
        std::thread::sleep(Duration::from_millis(30));
        drop(held);
        assert_eq!(waiter.join().unwrap(), 0);
        let _held = p.get().unwrap();
        match p.get() {
            Err(Error::Storage { message }) => assert_eq!(message, "all 1 busy"),
            other => panic!("{:?}", other.map(|c| *c)),
        }
    }

    #[test]
    fn broken_and_long_idle_connections_are_closed_and_failed_opens_free_their_place() {
        let p = pool(2, Duration::from_millis(20), Duration::from_millis(50));
        let mut c = p.get().unwrap();
        *c = 1000;
        drop(c);
        assert_eq!(p.counts(), (0, 0), "a broken connection is closed, not kept");
        drop(p.get().unwrap());
        assert_eq!(p.counts(), (1, 1));
        std::thread::sleep(Duration::from_millis(40));
        p.reap();
        assert_eq!(p.counts(), (0, 0), "idle past the timeout");
        p.shared.connector.fail.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(p.get(), Err(Error::Storage { .. })));
        }
        assert_eq!(p.counts(), (0, 0), "a failed open does not take a place");
    }
}
