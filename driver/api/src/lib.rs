//! What CORA's crates and binaries share, each piece in one place.
pub mod driver;
pub mod logging;
pub mod size;

use std::time::SystemTime;

/// An error and its sources as one line (`a: b: c`), skipping a source whose message the text
/// so far already contains (many errors repeat their source in their own message).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let m = s.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = s.source();
    }
    out
}

/// A UTC time as RFC 3339 (containerd parses `containerd.io/gc.expire` with Go's RFC3339).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Restores the default SIGPIPE action, which Rust's runtime sets to "ignore": a CLI whose
/// output goes to a closed pipe (`cora inspect | head`) should end quietly, not panic in
/// `println!`.
pub fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Moves the calling thread into a new mount namespace whose mounts are all private, so mounts
/// made in the old namespace no longer propagate into it (nor ours out). `cora-driver` serves
/// from such a namespace: a ublk server that exits in a namespace holding a mount of its own
/// device deadlocks tearing it down (libublk-rs#50), and its devices are mounted elsewhere.
///
/// Makes only two syscalls (`unshare`, `mount`) and allocates nothing, so it is
/// async-signal-safe: usable in [`std::os::unix::process::CommandExt::pre_exec`].
pub fn private_mount_namespace() -> std::io::Result<()> {
    // SAFETY: plain syscalls with static, NUL-terminated arguments.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc3339_formats_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339(t), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn error_chain_joins_sources_once() {
        let inner = std::io::Error::other("disk on fire");
        let outer = std::io::Error::other(inner);
        assert_eq!(error_chain(&outer), "disk on fire");
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("reading config")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let w = Wrap(std::io::Error::other("denied"));
        assert_eq!(error_chain(&w), "reading config: denied");
    }
}
