//! How many background-fill requests to keep in flight: as many as the link carries without
//! a queue building up in front of the demand reads that share it.
//!
//! A fill that keeps a fixed number of 1 MiB requests in flight either leaves a fast link idle
//! or, on a slow one, queues megabytes ahead of every demand read: at 50 MB/s, sixteen
//! requests are 330 ms that a container's next miss waits behind. Delay tells which: a fill
//! request's time beyond the fastest one seen (its floor: round trip plus transfer on an empty
//! link) is time it spent queued. The pacer adds a request in flight per round while that
//! queueing stays under a quarter of the floor, and takes one away whenever it passes half
//! of it, so a demand read waits behind at most about half a fill request's own time (the
//! idea of TCP Vegas and LEDBAT, applied to whole requests).

use std::sync::Mutex;
use std::time::Duration;

/// Requests smaller than this say little about queueing (the round trip dominates them, and
/// a short tail batch would set a floor no full request can meet); they are not observed.
pub const MIN_OBSERVED_BYTES: u64 = 512 << 10;

#[derive(Debug)]
pub struct Pacer {
    max: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    slots: usize,
    /// Fastest observed request: fill requests are all about the same size (1 MiB), so the
    /// fastest one is the link's round trip plus transfer with nothing queued.
    floor: Option<Duration>,
    /// Requests under the low mark since `slots` last changed.
    calm: usize,
}

impl Pacer {
    /// Starts with one request in flight; never more than `max`.
    pub fn new(max: usize) -> Pacer {
        Pacer {
            max: max.max(1),
            state: Mutex::new(State {
                slots: 1,
                floor: None,
                calm: 0,
            }),
        }
    }

    /// Fill requests that may be in flight now.
    pub fn slots(&self) -> usize {
        self.lock().slots
    }

    /// The floor seen so far (for logs).
    pub fn floor(&self) -> Option<Duration> {
        self.lock().floor
    }

    /// A fill request of `bytes` took `took`, from sending it to its last byte.
    pub fn observe(&self, bytes: u64, took: Duration) {
        if bytes < MIN_OBSERVED_BYTES {
            return;
        }
        let mut st = self.lock();
        let floor = match st.floor {
            Some(f) if f <= took => f,
            _ => {
                st.floor = Some(took);
                took
            }
        };
        let queued = took.saturating_sub(floor);
        if queued > floor / 2 {
            st.slots = st.slots.saturating_sub(1).max(1);
            st.calm = 0;
        } else if queued < floor / 4 {
            // One more per round: after as many calm requests as are in flight.
            st.calm += 1;
            if st.calm >= st.slots {
                st.slots = (st.slots + 1).min(self.max);
                st.calm = 0;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A 1 MiB request over a FIFO link of `rtt_ms` and `rate` bytes/s, behind `ahead` other
    /// 1 MiB requests' bytes.
    fn link(rtt_ms: u64, rate: u64, ahead: usize) -> Duration {
        ms(rtt_ms) + Duration::from_secs_f64(((1 + ahead as u64) * MIB) as f64 / rate as f64)
    }

    #[test]
    fn grows_while_the_link_has_room_and_settles_where_a_queue_starts() {
        // 25 ms, 50 MB/s: a 1 MiB request alone takes 46 ms; the link is full at ~2 in flight.
        let p = Pacer::new(16);
        for _ in 0..200 {
            let n = p.slots();
            // Requests in flight beyond what fills the link wait for the others' bytes.
            p.observe(MIB, link(25, 50_000_000, n.saturating_sub(2)));
        }
        let n = p.slots();
        assert!((2..=3).contains(&n), "settled at {n} in flight");
        assert_eq!(p.floor(), Some(link(25, 50_000_000, 0)));
    }

    #[test]
    fn backs_off_to_one_when_the_link_slows_and_never_below() {
        let p = Pacer::new(16);
        for _ in 0..200 {
            p.observe(MIB, ms(10));
        }
        assert_eq!(p.slots(), 16, "an uncongested link gets every slot");
        for _ in 0..100 {
            p.observe(MIB, ms(40));
        }
        assert_eq!(p.slots(), 1);
    }

    #[test]
    fn small_requests_are_not_observed() {
        let p = Pacer::new(8);
        p.observe(64 << 10, ms(1));
        assert_eq!(p.floor(), None);
        p.observe(MIB, ms(30));
        p.observe(100 << 10, ms(500));
        assert_eq!((p.slots(), p.floor()), (2, Some(ms(30))));
    }
}
