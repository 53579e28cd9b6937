//! Combining concurrent calls into one: each caller queues its item; whichever caller finds no
//! batch under way runs everything queued so far as one batch (for the PostgreSQL store: one
//! multi-row INSERT and one commit for the plain enqueues of all threads), then hands each
//! caller its own result. A lone caller runs its item at once, alone; under concurrency the
//! commits, and the per-statement work of the server, are shared by the batch.

use std::collections::HashMap;

use crate::sync::{Condvar, Mutex};

pub(super) struct Combiner<T, R> {
    state: Mutex<State<T, R>>,
    done: Condvar,
}

struct State<T, R> {
    queued: Vec<(u64, T)>,
    results: HashMap<u64, R>,
    /// A caller is running a batch.
    running: bool,
    next_ticket: u64,
}

impl<T, R> Default for Combiner<T, R> {
    fn default() -> Self {
        Combiner {
            state: Mutex::new(State { queued: Vec::new(), results: HashMap::new(), running: false, next_ticket: 0 }),
            done: Condvar::new(),
        }
    }
}

/// While a batch runs: if it unwinds, answers its callers with `on_panic`'s result and clears
/// `running`, so the next caller runs the next batch instead of waiting forever.
struct Running<'a, T, R, F: Fn() -> R> {
    combiner: &'a Combiner<T, R>,
    tickets: &'a [u64],
    on_panic: F,
}

impl<T, R, F: Fn() -> R> Drop for Running<'_, T, R, F> {
    fn drop(&mut self) {
        let mut st = self.combiner.state.lock();
        for &t in self.tickets {
            st.results.insert(t, (self.on_panic)());
        }
        st.running = false;
        drop(st);
        self.combiner.done.notify_all();
    }
}

impl<T, R> Combiner<T, R> {
    /// Runs `item` in a batch with the items other threads submit meanwhile. `run` gets the
    /// batch in submission order and must return one result per item, in the same order;
    /// `on_panic` stands in for the results of a batch whose `run` panicked.
    pub fn submit(&self, item: T, run: impl Fn(Vec<T>) -> Vec<R>, on_panic: impl Fn() -> R) -> R {
        let mut st = self.state.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queued.push((ticket, item));
        loop {
            if let Some(r) = st.results.remove(&ticket) {
                return r;
            }
            if st.running {
                self.done.wait(&mut st);
                continue;
            }
            // Our item is still queued (a batch that took it would have left its result).
            st.running = true;
            let (tickets, items): (Vec<u64>, Vec<T>) = std::mem::take(&mut st.queued).into_iter().unzip();
            drop(st);
            let guard = Running { combiner: self, tickets: &tickets, on_panic: &on_panic };
            let n = items.len();
            let results = run(items);
            assert_eq!(results.len(), n, "one result per item");
            std::mem::forget(guard);
            st = self.state.lock();
            st.results.extend(tickets.into_iter().zip(results));
            st.running = false;
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_lone_call_runs_alone_and_concurrent_calls_share_batches() {
        let c: Combiner<usize, usize> = Combiner::default();
        assert_eq!(c.submit(7, |items| items.iter().map(|i| i * 2).collect(), || 0), 14);
        let c = Arc::new(c);
        let batches = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (c, batches) = (c.clone(), batches.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let item = t * 1000 + i;
                        let got = c.submit(
                            item,
                            |items| {
                                batches.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_micros(200));
                                items.iter().map(|i| i * 2).collect()
                            },
                            || 0,
                        );
                        assert_eq!(got, item * 2, "each caller gets its own result");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let batches = batches.load(Ordering::SeqCst);
        assert!(batches < 1600, "some calls shared a batch ({batches} batches for 1600 calls)");
    }

    #[test]
    fn a_panicking_batch_answers_its_callers_and_the_next_batch_runs() {
        let c: Arc<Combiner<usize, Option<usize>>> = Arc::new(Combiner::default());
        let c2 = c.clone();
        let r = std::thread::spawn(move || c2.submit(1, |_| panic!("in the batch"), || None)).join();
        assert!(r.is_err(), "the runner's own call unwinds");
        assert_eq!(c.submit(2, |items| items.into_iter().map(Some).collect(), || None), Some(2));
    }
}
