//! Pieces of `cora cache stats|gc|prune [--dir DIR] [--to SIZE]`, returning printable reports.

use super::{CacheError, ChunkCache, Result};
use std::path::PathBuf;

/// Default cache directory of the `cora` tools.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/cora/cache";

/// `cora cache [--dir DIR] <stats|gc|prune --to SIZE>`.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheArgs {
    /// Cache directory.
    #[arg(long, global = true, default_value = DEFAULT_CACHE_DIR)]
    pub dir: PathBuf,
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum CacheCommand {
    /// Entries and bytes on disk.
    Stats,
    /// Remove stale temp files, stray files and entries whose content does not match their name.
    Gc,
    /// Evict least recently used entries until the cache holds at most SIZE.
    Prune {
        /// Target size: bytes, or with a K/M/G/T suffix (powers of 1024), e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        to: u64,
    },
}

/// Run a cache subcommand and return its report. Opens the cache without a size limit, so the
/// command itself never evicts beyond what was asked.
pub fn run_cli(args: &CacheArgs) -> Result<String> {
    let cache = ChunkCache::open(&args.dir, u64::MAX)?;
    let header = format!("cache {}\n", args.dir.display());
    let body = match &args.command {
        CacheCommand::Stats => {
            let s = cache.stats()?;
            format!(
                "entries:   {}\nbytes:     {} ({})\n",
                s.entries,
                s.bytes,
                format_size(s.bytes)
            )
        }
        CacheCommand::Gc => cache.gc()?.to_string(),
        CacheCommand::Prune { to } => format!("{}\n", cache.prune(*to)?),
    };
    Ok(header + &body)
}

/// Parse a size: `1024`, `512K`, `512M`, `10G`, `1T` (case-insensitive; optional `B`/`iB`
/// after the unit; units are powers of 1024). No fractions.
pub fn parse_size(input: &str) -> Result<u64> {
    let err = |reason| CacheError::InvalidSize {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(err(
            "expected a number, optionally followed by K, M, G or T",
        ));
    }
    let n: u64 = digits.parse().map_err(|_| err("number too large"))?;
    let unit = unit.trim_start().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(err("unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("size does not fit in 64 bits"))
}

/// Human-readable size with binary units, e.g. `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use proptest::prelude::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("1024").ok(), Some(1024));
        assert_eq!(parse_size("512M").ok(), Some(512 << 20));
        assert_eq!(parse_size("10G").ok(), Some(10 << 30));
        assert_eq!(parse_size("10g").ok(), Some(10 << 30));
        assert_eq!(parse_size("10GiB").ok(), Some(10 << 30));
        assert_eq!(parse_size("10GB").ok(), Some(10 << 30));
        assert_eq!(parse_size("4k").ok(), Some(4096));
        assert_eq!(parse_size(" 2 T ").ok(), Some(2 << 40));
        assert_eq!(parse_size("0").ok(), Some(0));
    }

    #[test]
    fn rejects_bad_sizes_with_reason() {
        for bad in [
            "",
            "G",
            "-1",
            "1.5G",
            "10X",
            "10GG",
            "99999999999999999999",
            "16777216T",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.to_string().contains("invalid size"), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn parse_size_never_panics(s in "\\PC{0,12}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn parse_size_round_trips(n in 0u64..(1 << 20), unit in 0usize..5) {
            let suffix = ["", "K", "M", "G", "T"][unit];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")).ok(), Some(n << (10 * unit)));
        }
    }

    #[test]
    fn format_size_is_readable() {
        assert_eq!(format_size(100), "100 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(10 << 30), "10.0 GiB");
    }

    #[derive(Parser)]
    struct Top {
        #[command(subcommand)]
        cmd: TopCmd,
    }
    #[derive(clap::Subcommand)]
    enum TopCmd {
        Cache(CacheArgs),
    }

    #[test]
    fn cli_parses_and_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8 temp path");
        let cache = ChunkCache::open(dir.path(), u64::MAX).expect("open");
        for i in 0..4u8 {
            let data = vec![i; 1000];
            cache
                .insert(&super::super::sha256(&data), &data)
                .expect("insert");
        }
        let run = |args: &[&str]| {
            let top = Top::try_parse_from(args).expect("parse");
            let TopCmd::Cache(a) = top.cmd;
            run_cli(&a).expect("run")
        };
        let out = run(&["cora", "cache", "stats", "--dir", d]);
        assert!(out.contains("entries:   4"), "{out}");
        let out = run(&["cora", "cache", "--dir", d, "gc"]);
        assert!(out.contains("verified 4 entries"), "{out}");
        let out = run(&["cora", "cache", "prune", "--dir", d, "--to", "2K"]);
        assert!(out.contains("evicted 2 of 4"), "{out}");
        assert!(Top::try_parse_from(["cora", "cache", "prune", "--to", "lots"]).is_err());
    }
}
