//! How request data reaches the kernel's pages: the data modes a device can run in, and the
//! choice of the best one the kernel offers (kernel-notes/ublk.md has which kernel has what).
use libublk::sys;
use serde::{Deserialize, Serialize};

/// Data modes, from the plainest to the most direct; `Ord` follows preference.
///
/// `SUPPORT_ZERO_COPY` with explicit `REGISTER_IO_BUF` / `UNREGISTER_IO_BUF` commands (6.15)
/// is not a mode of its own: every kernel that has it but not AUTO_BUF_REG is a 6.15, which no
/// Debian release ships, and the author measured AUTO_BUF_REG at +50 % IOPS over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataMode {
    /// Per-tag buffers shared with the kernel, which copies them into the request on commit
    /// (every kernel).
    Buffered,
    /// `UBLK_F_USER_COPY` (6.5): the server writes into the request's pages with `pwrite` on
    /// `/dev/ublkcN`; memory-resident data goes in one copy.
    UserCopy,
    /// `UBLK_F_AUTO_BUF_REG` (6.16): the kernel registers each request's pages in the queue's
    /// io_uring at dispatch; data that lies in files (a plain image) is read into them by
    /// io_uring with no copy in user space. Data from memory still goes through user copy.
    AutoBufReg,
}

impl DataMode {
    pub const ALL: [DataMode; 3] = [DataMode::Buffered, DataMode::UserCopy, DataMode::AutoBufReg];

    pub fn name(self) -> &'static str {
        match self {
            DataMode::Buffered => "buffered",
            DataMode::UserCopy => "user-copy",
            DataMode::AutoBufReg => "auto-buf-reg",
        }
    }

    /// The UBLK_F_* bits the mode asks for at ADD_DEV. AUTO_BUF_REG keeps USER_COPY for the
    /// requests whose data is in memory (metadata blocks, fetched chunks, the zero tail).
    fn flags(self) -> u64 {
        let f = match self {
            DataMode::Buffered => 0,
            DataMode::UserCopy => sys::UBLK_F_USER_COPY,
            DataMode::AutoBufReg => sys::UBLK_F_AUTO_BUF_REG | sys::UBLK_F_USER_COPY,
        };
        u64::from(f)
    }

    /// The best mode at most `at_most` that `features` (GET_FEATURES) has every bit of.
    pub fn best(features: u64, at_most: DataMode) -> DataMode {
        DataMode::ALL
            .into_iter()
            .rev()
            .find(|m| *m <= at_most && features & m.flags() == m.flags())
            .unwrap_or(DataMode::Buffered)
    }

    /// The mode a device runs in, from the flags the kernel granted it.
    pub fn of_flags(flags: u64) -> DataMode {
        DataMode::ALL
            .into_iter()
            .rev()
            .find(|m| flags & m.flags() == m.flags())
            .unwrap_or(DataMode::Buffered)
    }

    /// Asks for this mode's bits in `flags` (ADD_DEV), replacing any other mode's.
    pub fn apply(self, flags: u64) -> u64 {
        let all = DataMode::ALL.iter().fold(0, |a, m| a | m.flags());
        (flags & !all) | self.flags()
    }
}

impl std::fmt::Display for DataMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DataMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DataMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = DataMode::ALL.iter().map(|m| m.name()).collect();
                format!("unknown ublk data mode {s:?} (one of {})", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F_6_12: u64 = 0xff; // GET_FEATURES on Debian's 6.12 (kernel-notes/ublk.md)
    const F_7_3: u64 = 0x1f_ffff; // on Debian's 7.3.4

    #[test]
    fn best_mode_follows_the_kernel_and_the_cap() {
        assert_eq!(
            DataMode::best(F_7_3, DataMode::AutoBufReg),
            DataMode::AutoBufReg
        );
        assert_eq!(
            DataMode::best(F_7_3, DataMode::UserCopy),
            DataMode::UserCopy
        );
        assert_eq!(
            DataMode::best(F_6_12, DataMode::AutoBufReg),
            DataMode::UserCopy
        );
        assert_eq!(DataMode::best(0, DataMode::AutoBufReg), DataMode::Buffered);
        // AUTO_BUF_REG without USER_COPY cannot serve data from memory: not chosen.
        let no_copy = F_7_3 & !u64::from(sys::UBLK_F_USER_COPY);
        assert_eq!(
            DataMode::best(no_copy, DataMode::AutoBufReg),
            DataMode::Buffered
        );
    }

    #[test]
    fn granted_flags_name_the_mode_and_modes_round_trip() {
        for m in DataMode::ALL {
            assert_eq!(DataMode::of_flags(m.apply(0x48)), m);
            assert_eq!(m.apply(0x48) & 0x48, 0x48, "other flags kept");
            assert_eq!(m.name().parse::<DataMode>(), Ok(m));
        }
        assert!("zero-copy".parse::<DataMode>().is_err());
    }
}
