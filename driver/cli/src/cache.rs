//! Pieces of `cora cache stats|gc|verify|prune [--dir DIR] [--to SIZE]`, returning printable
//! reports.

pub use cora_api::size::{format_size, parse_size};
use lazy::cache::{ChunkCache, Result};
use std::path::PathBuf;

pub use lazy::cache::DEFAULT_DIR as DEFAULT_CACHE_DIR;

/// `cora cache [--dir DIR] <stats|gc|verify|prune --to SIZE>`.
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
    /// Seal dead writers' segments, remove stray files and entries whose content does not
    /// match their name.
    Gc,
    /// Check every entry's sha256 and report, changing nothing.
    Verify,
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
                "entries:   {}\nbytes:     {} ({})\non disk:   {} ({}) in {} segments\n",
                s.entries,
                s.bytes,
                format_size(s.bytes),
                s.disk_bytes,
                format_size(s.disk_bytes),
                s.segments
            )
        }
        CacheCommand::Gc => cache.gc()?.to_string(),
        CacheCommand::Verify => {
            let r = cache.verify()?;
            let bad = r.count(lazy::cache::RemovedReason::Corrupt);
            let mut out = format!(
                "verified {} entries ({}); {bad} corrupt{}\n",
                r.verified,
                format_size(r.verified_bytes),
                if bad > 0 {
                    " (`cora cache gc` drops them)"
                } else {
                    ""
                }
            );
            for c in &r.removed {
                out += &format!("  corrupt entry in {}\n", c.path.display());
            }
            out
        }
        CacheCommand::Prune { to } => format!("{}\n", cache.prune(*to)?),
    };
    Ok(header + &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

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
        let mut opts = lazy::cache::CacheOptions::new(u64::MAX);
        opts.segment_bytes = 1; // a segment per entry, so prune can take some and leave some
        let cache = ChunkCache::open_with(dir.path(), opts).expect("open");
        for i in 0..4u8 {
            let data = vec![i; 1000];
            cache
                .insert(&lazy::cache::sha256(&data), &data)
                .expect("insert");
        }
        drop(cache);
        let run = |args: &[&str]| {
            let top = Top::try_parse_from(args).expect("parse");
            let TopCmd::Cache(a) = top.cmd;
            run_cli(&a).expect("run")
        };
        let out = run(&["cora", "cache", "stats", "--dir", d]);
        assert!(out.contains("entries:   4"), "{out}");
        assert!(out.contains("in 4 segments"), "{out}");
        let out = run(&["cora", "cache", "--dir", d, "verify"]);
        assert!(out.contains("verified 4 entries"), "{out}");
        assert!(out.contains("0 corrupt"), "{out}");
        let out = run(&["cora", "cache", "--dir", d, "gc"]);
        assert!(out.contains("verified 4 entries"), "{out}");
        let out = run(&["cora", "cache", "prune", "--dir", d, "--to", "2K"]);
        assert!(out.contains("evicted 3 of 4"), "{out}");
        assert!(Top::try_parse_from(["cora", "cache", "prune", "--to", "lots"]).is_err());
    }
}
