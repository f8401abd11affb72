//! Waking a queue thread when a miss completes on another thread.
//!
//! A queue thread sleeps in `io_uring_enter`, so waking a task's `Waker` from a fetch thread
//! is not enough: the waker also writes the queue's eventfd ([`Doorbell`]), whose readability
//! is polled inside the queue ring, which makes the ring wait return and the executor run.
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use cora_read::Miss;

/// An eventfd a queue thread polls in its ring; rung when a miss of that queue completes.
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory arguments; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(Doorbell {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    pub fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64. EAGAIN (counter saturated) still leaves it
        // readable, which is all the poller needs.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the counter so the next poll waits for a new ring.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when already zero is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[derive(Default)]
struct Slot {
    ready: bool,
    waker: Option<Waker>,
}

/// Resolves once `miss` may be finished without blocking; rings `doorbell` when it is.
pub fn ready(miss: &mut Miss, doorbell: Arc<Doorbell>) -> impl Future<Output = ()> + use<> {
    let slot = Arc::new(Mutex::new(Slot::default()));
    let theirs = slot.clone();
    miss.when_ready(move || {
        let waker = {
            let mut s = theirs.lock().unwrap_or_else(|e| e.into_inner());
            s.ready = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        doorbell.ring();
    });
    Ready { slot }
}

struct Ready {
    slot: Arc<Mutex<Slot>>,
}

impl Future for Ready {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.ready {
            Poll::Ready(())
        } else {
            slot.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cora_read::PendingRead;
    use std::sync::mpsc;

    /// Completes when the test sends on its channel, from another thread.
    struct Released {
        go: Option<mpsc::Receiver<()>>,
    }
    impl PendingRead for Released {
        fn when_ready(&mut self, wake: Box<dyn FnOnce() + Send>) {
            let go = self.go.take().expect("when_ready called once");
            std::thread::spawn(move || {
                if go.recv().is_ok() {
                    wake();
                }
            });
        }
        fn finish(self: Box<Self>, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(7);
            Ok(())
        }
    }

    fn poll_readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    #[test]
    fn a_completed_miss_wakes_its_task_and_rings_the_doorbell() {
        let (tx, rx) = mpsc::channel();
        let mut miss = Miss::new(Released { go: Some(rx) });
        let bell = Arc::new(Doorbell::new().unwrap());
        let fut = ready(&mut miss, bell.clone());
        assert!(
            !poll_readable(bell.raw_fd(), 0),
            "rung before the miss completed"
        );
        tx.send(()).unwrap();
        smol::block_on(fut);
        assert!(poll_readable(bell.raw_fd(), 5000));
        bell.drain();
        let mut buf = [0u8; 4];
        miss.finish(&mut buf).unwrap();
        assert_eq!(buf, [7; 4]);
    }
}
