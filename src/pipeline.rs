//! Parallel work whose results are used in order: jobs are taken from an
//! iterator by worker threads, and the results handed to one consumer in job
//! order, whatever thread finished first, so what the consumer builds is
//! deterministic. Workers run at most `ahead` jobs beyond the last one
//! consumed, which bounds the memory of results in flight.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};

struct State<I: Iterator, R> {
    jobs: I,
    exhausted: bool,
    /// Sequence number of the next job to hand out.
    next: u64,
    /// Finished results waiting for their turn.
    done: BTreeMap<u64, R>,
    /// Sequence number of the next result to consume.
    consumed: u64,
    stop: bool,
}

/// Runs `work` over `jobs` on `threads` threads and passes each result to
/// `consume` in job order. Stops at the first error of either, returning it
/// (later results are dropped). A panicking `work` becomes `panicked()`.
pub fn ordered<J, R, E, I>(
    jobs: I,
    threads: usize,
    ahead: usize,
    work: impl Fn(J) -> Result<R, E> + Sync,
    mut consume: impl FnMut(R) -> Result<(), E>,
    panicked: impl Fn() -> E + Sync,
) -> Result<(), E>
where
    I: Iterator<Item = J> + Send,
    J: Send,
    R: Send,
    E: Send,
{
    if threads <= 1 {
        for j in jobs {
            consume(work(j)?)?;
        }
        return Ok(());
    }
    let ahead = ahead.max(threads) as u64;
    let state = Mutex::new(State {
        jobs,
        exhausted: false,
        next: 0,
        done: BTreeMap::new(),
        consumed: 0,
        stop: false,
    });
    // Workers wait on `room` (the look-ahead is full), the consumer on `ready`
    // (its next result is not there yet): each wakes only who can proceed.
    let room = Condvar::new();
    let ready = Condvar::new();
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let (seq, job) = {
                    let mut st = lock();
                    loop {
                        if st.stop || st.exhausted {
                            return;
                        }
                        if st.next < st.consumed + ahead {
                            match st.jobs.next() {
                                Some(j) => {
                                    let seq = st.next;
                                    st.next += 1;
                                    break (seq, j);
                                }
                                None => {
                                    st.exhausted = true;
                                    ready.notify_one();
                                    room.notify_all();
                                    return;
                                }
                            }
                        }
                        st = room.wait(st).unwrap_or_else(|e| e.into_inner());
                    }
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(job)))
                    .unwrap_or_else(|_| Err(panicked()));
                let mut st = lock();
                st.done.insert(seq, r);
                if seq == st.consumed {
                    ready.notify_one();
                }
            });
        }
        let result = (|| loop {
            let r = {
                let mut st = lock();
                loop {
                    let c = st.consumed;
                    if let Some(r) = st.done.remove(&c) {
                        break r;
                    }
                    if st.exhausted && st.next == c {
                        return Ok(());
                    }
                    st = ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            consume(r?)?;
            lock().consumed += 1;
            room.notify_one();
        })();
        lock().stop = true;
        room.notify_all();
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_come_in_job_order_with_any_thread_count() {
        for threads in [1, 2, 3, 8] {
            let mut got = Vec::new();
            ordered(
                0..1000u64,
                threads,
                4,
                |j| {
                    if j % 7 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                    Ok::<_, String>(j * 2)
                },
                |r| {
                    got.push(r);
                    Ok(())
                },
                || "panic".to_string(),
            )
            .unwrap();
            assert_eq!(
                got,
                (0..1000).map(|j| j * 2).collect::<Vec<_>>(),
                "{threads}"
            );
        }
    }

    #[test]
    fn errors_and_panics_stop_the_run() {
        let e = ordered(
            0..100u32,
            2,
            4,
            |j| {
                if j == 50 {
                    Err(format!("job {j}"))
                } else {
                    Ok(j)
                }
            },
            |_| Ok(()),
            || "panic".to_string(),
        );
        assert_eq!(e, Err("job 50".to_string()));
        let e = ordered(
            0..100u32,
            2,
            4,
            |j| {
                assert!(j != 10, "boom");
                Ok(j)
            },
            |_| Ok(()),
            || "a worker panicked".to_string(),
        );
        assert_eq!(e, Err("a worker panicked".to_string()));
        let mut n = 0;
        let e = ordered(
            0..100u32,
            3,
            4,
            Ok,
            |_| {
                n += 1;
                if n == 5 {
                    Err("consumer".to_string())
                } else {
                    Ok(())
                }
            },
            || "p".into(),
        );
        assert_eq!(e, Err("consumer".to_string()));
    }
}
