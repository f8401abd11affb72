//! Misses run on worker threads; their completion wakes the queue thread's executor.
//!
//! A queue thread sleeps in `io_uring_enter`, so waking a task's `Waker` from a worker is not
//! enough: the worker also writes the queue's eventfd ([`Doorbell`]), whose readability is
//! polled inside the queue ring, which makes the ring wait return and the executor run.
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;

use super::source::BlockSource;

/// An eventfd a queue thread polls in its ring; workers ring it after completing a miss.
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

/// Where a worker leaves the outcome of one miss for the task awaiting it.
#[derive(Default)]
struct Slot {
    done: Option<(io::Result<()>, Vec<u8>)>,
    waker: Option<Waker>,
}

/// Future for a miss handed to the pool: resolves to the read result and the buffer back.
pub struct MissFuture {
    slot: Arc<Mutex<Slot>>,
}

impl Future for MissFuture {
    type Output = (io::Result<()>, Vec<u8>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.done.take() {
            Some(out) => Poll::Ready(out),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

struct Job {
    source: Arc<dyn BlockSource>,
    offset: u64,
    // The buffer is owned by the job, not borrowed from the task: if the queue goes away while
    // the worker reads, nothing dangles.
    buf: Vec<u8>,
    slot: Arc<Mutex<Slot>>,
    doorbell: Arc<Doorbell>,
}

/// A fixed set of threads running `BlockSource::read_at` for misses.
pub struct MissPool {
    tx: Mutex<Option<Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl MissPool {
    pub fn new(workers: usize) -> io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("ublk-miss-{i}"))
                    .spawn(move || worker(&rx))?,
            );
        }
        Ok(MissPool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Reads `buf.len()` bytes at `offset` on a worker; the future completes (and `doorbell`
    /// rings) when done.
    pub fn submit(
        &self,
        source: Arc<dyn BlockSource>,
        offset: u64,
        buf: Vec<u8>,
        doorbell: Arc<Doorbell>,
    ) -> MissFuture {
        let slot = Arc::new(Mutex::new(Slot::default()));
        let job = Job {
            source,
            offset,
            buf,
            slot: slot.clone(),
            doorbell,
        };
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let unsent = match tx.as_ref() {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = unsent {
            // Pool shut down: fail the read instead of hanging the tag.
            finish(
                &job.slot,
                Err(io::Error::other("miss pool stopped")),
                job.buf,
            );
        }
        MissFuture { slot }
    }

    /// Stops accepting jobs and waits for the workers to finish the queued ones.
    pub fn shutdown(&self) {
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for MissPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn finish(slot: &Mutex<Slot>, res: io::Result<()>, buf: Vec<u8>) {
    let waker = {
        let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
        s.done = Some((res, buf));
        s.waker.take()
    };
    if let Some(w) = waker {
        w.wake();
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        let Job {
            source,
            offset,
            mut buf,
            slot,
            doorbell,
        } = job;
        // A panicking source must fail one read, not leave a tag hanging forever.
        let res = std::panic::catch_unwind(AssertUnwindSafe(|| source.read_at(offset, &mut buf)))
            .unwrap_or_else(|_| Err(io::Error::other("block source panicked")));
        finish(&slot, res, buf);
        doorbell.ring();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Pattern {
        fail: AtomicBool,
    }
    impl BlockSource for Pattern {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_local(&self, _: u64, _: &mut [u8]) -> io::Result<bool> {
            Ok(false)
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                panic!("injected");
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((offset as usize + i) % 253) as u8;
            }
            Ok(())
        }
    }

    fn poll_readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 5000) == 1 }
    }

    #[test]
    fn miss_completes_wakes_and_rings() {
        let pool = MissPool::new(2).unwrap();
        let bell = Arc::new(Doorbell::new().unwrap());
        let src: Arc<dyn BlockSource> = Arc::new(Pattern {
            fail: AtomicBool::new(false),
        });
        let fut = pool.submit(src.clone(), 1000, vec![0; 300], bell.clone());
        let (res, buf) = smol::block_on(fut);
        res.unwrap();
        assert!(
            buf.iter()
                .enumerate()
                .all(|(i, b)| *b == ((1000 + i) % 253) as u8)
        );
        assert!(poll_readable(bell.raw_fd()));
        bell.drain();
    }

    #[test]
    fn panicking_source_fails_the_read() {
        let pool = MissPool::new(1).unwrap();
        let bell = Arc::new(Doorbell::new().unwrap());
        let src: Arc<dyn BlockSource> = Arc::new(Pattern {
            fail: AtomicBool::new(true),
        });
        let (res, _) = smol::block_on(pool.submit(src, 0, vec![0; 10], bell));
        assert!(res.is_err());
    }

    #[test]
    fn submit_after_shutdown_fails_fast() {
        let pool = MissPool::new(1).unwrap();
        pool.shutdown();
        let bell = Arc::new(Doorbell::new().unwrap());
        let src: Arc<dyn BlockSource> = Arc::new(Pattern {
            fail: AtomicBool::new(false),
        });
        let (res, buf) = smol::block_on(pool.submit(src, 0, vec![0; 10], bell));
        assert!(res.is_err());
        assert_eq!(buf.len(), 10);
    }
}
