//! Serves a plain image file as `MOUNTPOINT/image` until Ctrl-C (or SIGTERM), or until the
//! FUSE mount is unmounted from outside:
//!
//! ```sh
//! cargo run -p cora-fuse --example file_image -- IMAGE MOUNTPOINT
//! mount -t erofs -o ro MOUNTPOINT/image /mnt/x     # in another shell
//! ```
//!
//! `CORA_LOG=debug` shows the INIT negotiation with the kernel.
use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;

use cora_fuse::{FuseOptions, Unmounter};
use cora_read::FileSource;

fn main() -> Result<(), Box<dyn Error>> {
    cora_api::logging::init_default("warn");
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [image, mountpoint] = &args[..] else {
        return Err("usage: file_image IMAGE MOUNTPOINT".into());
    };
    // Before any thread starts, so every thread inherits the mask and the signals wait for
    // sigwait below instead of killing the process with the mount still up.
    let signals = block_signals()?;
    let source = Arc::new(FileSource::open(image)?);
    let mount = cora_fuse::mount(source, mountpoint, &FuseOptions::default())?;
    println!(
        "serving {} as {}; Ctrl-C or `umount {}` to stop",
        image.display(),
        mount.image_path().display(),
        mount.mountpoint().display()
    );
    let unmounter = mount.unmounter();
    std::thread::spawn(move || unmount_on_signal(&signals, &unmounter));
    mount.join()?;
    println!("unmounted");
    Ok(())
}

fn block_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: the set is initialised by sigemptyset before use; the calls only touch it and
    // this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(set),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

fn unmount_on_signal(signals: &libc::sigset_t, unmounter: &Unmounter) {
    loop {
        let mut sig = 0;
        // SAFETY: waits for one of the blocked signals; both pointers are live.
        let rc = unsafe { libc::sigwait(signals, &mut sig) };
        if rc != 0 {
            eprintln!("sigwait: {}", std::io::Error::from_raw_os_error(rc));
            return;
        }
        match unmounter.unmount() {
            Ok(()) => return,
            // Busy: an erofs mount still uses the file; keep serving and let a second signal
            // retry once it is gone.
            Err(e) => eprintln!("{e}; unmount what uses it, then signal again"),
        }
    }
}
