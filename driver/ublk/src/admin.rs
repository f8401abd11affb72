//! Listing and deleting ublk devices.
use libublk::ctrl::UblkCtrl;
use libublk::sys;
use serde::Serialize;

use super::ServerError;

/// One ublk device as the kernel (and its libublk json) describes it.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceStatus {
    pub id: u32,
    /// LIVE, QUIESCED (server died, recoverable), DEAD or FAIL_IO.
    pub state: String,
    pub pid: i32,
    pub size: u64,
    pub queues: u16,
    pub depth: u16,
    pub max_io_bytes: u32,
    /// UBLK_F_* flags and their names.
    pub flags: u64,
    pub flag_names: Vec<&'static str>,
    pub read_only: bool,
    pub bdev: String,
    /// libublk target type ("cora" for ours, "loop"/"null" for rublk's).
    pub target: Option<String>,
    /// Our target data (or another server's), from /run/ublksrvd/NNNN.json.
    pub target_data: Option<serde_json::Value>,
}

const FLAG_NAMES: &[(u32, &str)] = &[
    (sys::UBLK_F_SUPPORT_ZERO_COPY, "ZERO_COPY"),
    (sys::UBLK_F_URING_CMD_COMP_IN_TASK, "COMP_IN_TASK"),
    (sys::UBLK_F_NEED_GET_DATA, "NEED_GET_DATA"),
    (sys::UBLK_F_USER_RECOVERY, "USER_RECOVERY"),
    (sys::UBLK_F_USER_RECOVERY_REISSUE, "USER_RECOVERY_REISSUE"),
    (sys::UBLK_F_UNPRIVILEGED_DEV, "UNPRIVILEGED"),
    (sys::UBLK_F_CMD_IOCTL_ENCODE, "CMD_IOCTL_ENCODE"),
    (sys::UBLK_F_USER_COPY, "USER_COPY"),
    (sys::UBLK_F_ZONED, "ZONED"),
    (sys::UBLK_F_USER_RECOVERY_FAIL_IO, "USER_RECOVERY_FAIL_IO"),
    (sys::UBLK_F_UPDATE_SIZE, "UPDATE_SIZE"),
    (sys::UBLK_F_AUTO_BUF_REG, "AUTO_BUF_REG"),
    (sys::UBLK_F_QUIESCE, "QUIESCE"),
    (sys::UBLK_F_PER_IO_DAEMON, "PER_IO_DAEMON"),
    (sys::UBLK_F_BUF_REG_OFF_DAEMON, "BUF_REG_OFF_DAEMON"),
    (sys::UBLK_F_BATCH_IO, "BATCH_IO"),
    (sys::UBLK_F_INTEGRITY, "INTEGRITY"),
    (sys::UBLK_F_SAFE_STOP_DEV, "SAFE_STOP_DEV"),
    (sys::UBLK_F_NO_AUTO_PART_SCAN, "NO_AUTO_PART_SCAN"),
    (sys::UBLK_F_SHMEM_ZC, "SHMEM_ZC"),
];

/// Names of the UBLK_F_* bits set in `flags`.
pub fn flag_names(flags: u64) -> Vec<&'static str> {
    FLAG_NAMES
        .iter()
        .filter(|(bit, _)| flags & u64::from(*bit) != 0)
        .map(|(_, name)| *name)
        .collect()
}

fn state_name(state: u16) -> String {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "DEAD".into(),
        sys::UBLK_S_DEV_LIVE => "LIVE".into(),
        sys::UBLK_S_DEV_QUIESCED => "QUIESCED".into(),
        3 => "FAIL_IO".into(),
        s => format!("UNKNOWN({s})"),
    }
}

fn ctrl_for(id: u32) -> Result<UblkCtrl, ServerError> {
    if !std::path::Path::new(&format!("/sys/class/ublk-char/ublkc{id}")).exists() {
        return Err(ServerError::NoDevice(id));
    }
    UblkCtrl::new_simple(id as i32).map_err(|source| ServerError::Ublk {
        what: "opening device",
        source,
    })
}

/// Status of device `id`.
pub fn status(id: u32) -> Result<DeviceStatus, ServerError> {
    let ctrl = ctrl_for(id)?;
    let info = ctrl.dev_info();
    let mut params = sys::ublk_params::default();
    // Params are unset until the device was started once; report what we have.
    let (size, attrs) = match ctrl.get_params(&mut params) {
        Ok(_) => (params.basic.dev_sectors << 9, params.basic.attrs),
        Err(_) => (0, 0),
    };
    Ok(DeviceStatus {
        id,
        state: state_name(info.state),
        pid: info.ublksrv_pid,
        size,
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        max_io_bytes: info.max_io_buf_bytes,
        flags: info.flags,
        flag_names: flag_names(info.flags),
        read_only: attrs & sys::UBLK_ATTR_READ_ONLY != 0,
        bdev: ctrl.get_bdev_path(),
        target: ctrl.get_target_type_from_json().ok(),
        target_data: ctrl.get_target_data_from_json(),
    })
}

/// All ublk devices, by id.
pub fn list() -> Result<Vec<DeviceStatus>, ServerError> {
    let mut ids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") {
        for e in entries.flatten() {
            if let Some(id) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("ublkc"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    let mut out = Vec::new();
    for id in ids {
        match status(id) {
            Ok(s) => out.push(s),
            // Raced with a delete.
            Err(ServerError::NoDevice(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Stops device `id` (its server sees its queues abort and exits) without deleting it.
pub fn stop(id: u32) -> Result<(), ServerError> {
    ctrl_for(id)?
        .kill_dev()
        .map_err(|source| ServerError::Ublk {
            what: "stopping device",
            source,
        })?;
    Ok(())
}

/// Stops and deletes device `id`. Its server (if alive) sees its queues abort and exits.
pub fn delete(id: u32) -> Result<(), ServerError> {
    let ctrl = ctrl_for(id)?;
    // STOP first so a live server releases /dev/ublkcN, which DEL waits for.
    let _ = ctrl.kill_dev();
    ctrl.del_dev().map_err(|source| ServerError::Ublk {
        what: "deleting device",
        source,
    })?;
    Ok(())
}
