//! Shared pieces of the benchmarks: where results go, statistics, and the run stamp.
//!
//! Results contract: each bench writes `<bench>.json` into `$CORA_BENCH_OUT` (default
//! `bench/results/latest` under the repository); `cargo xtask bench report` composes them.
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The results directory (created): `$CORA_BENCH_OUT`, else `<repo>/bench/results/latest`.
pub fn out_dir() -> Result<PathBuf> {
    let dir = match std::env::var_os("CORA_BENCH_OUT") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results/latest"),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Writes `value` (with a `stamp` added when it is an object) as `<name>.json` in
/// [`out_dir`], through a temporary name so a reader never sees half a file.
pub fn write_json(name: &str, value: &serde_json::Value) -> Result<PathBuf> {
    let mut value = value.clone();
    if let Some(obj) = value.as_object_mut() {
        obj.insert("stamp".into(), stamp());
    }
    let dir = out_dir()?;
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!(".{name}.json.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&value)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(path)
}

/// Mean and sample standard deviation (n − 1); `None` for an empty slice, std 0 for one value.
pub fn mean_std(xs: &[f64]) -> Option<(f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() == 1 {
        return Some((mean, 0.0));
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    Some((mean, var.sqrt()))
}

/// `{"mean": m, "std": s, "n": k}` of `xs` (zeros when empty).
pub fn stat_json(xs: &[f64]) -> serde_json::Value {
    let (m, s) = mean_std(xs).unwrap_or((0.0, 0.0));
    serde_json::json!({"mean": m, "std": s, "n": xs.len()})
}

/// Where and when a result was measured: date, git commit, kernel, CPU, cores, emulation.
pub fn stamp() -> serde_json::Value {
    let out = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpu_model(&cpuinfo);
    serde_json::json!({
        "date": out("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "git_commit": out("git", &["rev-parse", "--short=12", "HEAD"]),
        "git_dirty": !out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty(),
        "kernel": out("uname", &["-r"]),
        "cpu_model": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "emulated": emulated(&cpuinfo),
    })
}

fn cpu_model(cpuinfo: &str) -> String {
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// QEMU's TCG CPU models name themselves ("QEMU TCG CPU", "QEMU Virtual CPU"); a KVM guest
/// passes the host's model through, so this flags only software emulation.
fn emulated(cpuinfo: &str) -> bool {
    let model = cpu_model(cpuinfo);
    model.contains("QEMU") || model.contains("TCG")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]).expect("non-empty");
        assert!((m - 5.0).abs() < 1e-12);
        // Sample std (n-1) of this set is sqrt(32/7).
        assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_std(&[]), None);
        assert_eq!(mean_std(&[3.5]), Some((3.5, 0.0)));
    }

    #[test]
    fn cpu_model_and_emulation_from_cpuinfo() {
        let tcg = "processor\t: 0\nmodel name\t: QEMU TCG CPU version 2.5+\n";
        assert_eq!(cpu_model(tcg), "QEMU TCG CPU version 2.5+");
        assert!(emulated(tcg));
        let host = "model name\t: AMD EPYC 7B13 64-Core Processor\n";
        assert!(!emulated(host));
        assert_eq!(cpu_model(""), "unknown");
    }

    #[test]
    fn write_json_adds_stamp() -> Result<()> {
        let dir = tempfile::tempdir()?;
        // SAFETY: this is the only test in the crate that touches CORA_BENCH_OUT.
        unsafe { std::env::set_var("CORA_BENCH_OUT", dir.path()) };
        let path = write_json("unit", &serde_json::json!({"x": 1}))?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
        assert_eq!(v["x"], 1);
        assert!(v["stamp"]["cores"].as_u64().unwrap_or(0) >= 1);
        assert_eq!(path, dir.path().join("unit.json"));
        Ok(())
    }
}

/// What one child process cost: wall time, CPU time (user + system) and peak RSS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChildCost {
    pub wall_secs: f64,
    pub cpu_secs: f64,
    pub peak_rss_bytes: u64,
}

/// Runs `cmd` to completion (stdout discarded, stderr inherited) under GNU time and measures
/// it; fails unless it exits 0. Not from our own `wait4` rusage: a child's `ru_maxrss` starts
/// from the RSS of the process it was forked (or vforked) from, so a big bench process would
/// be counted in every child it runs; `/usr/bin/time` is a small parent.
pub fn run_measured(cmd: &Command) -> Result<ChildCost> {
    let report = tempfile::NamedTempFile::new()?;
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%U %S %M", "-o"])
        .arg(report.path())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdout(std::process::Stdio::null());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => timed.env(k, v),
            None => timed.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        timed.current_dir(dir);
    }
    let started = std::time::Instant::now();
    let st = timed
        .status()
        .with_context(|| format!("running {cmd:?} under /usr/bin/time (package `time`)"))?;
    let wall_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(st.success(), "{cmd:?} failed: {st}");
    let text = std::fs::read_to_string(report.path())?;
    let f: Vec<&str> = text.split_whitespace().collect();
    let num = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("GNU time printed {text:?}"))
    };
    Ok(ChildCost {
        wall_secs,
        cpu_secs: num(0)? + num(1)?,
        // GNU time prints KiB.
        peak_rss_bytes: num(2)? as u64 * 1024,
    })
}
