//! Developer tasks: `cargo xtask test`, `cargo xtask vm -- CMD`, `cargo xtask demo`, benches.
use anyhow::Result;
use clap::{Parser, Subcommand};

mod deps;

#[derive(Parser)]
#[command(name = "xtask", about = "CORA developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the tests need, then run every test (the README's test command).
    Test,
    /// Install the Debian packages the project needs (apt-get when root).
    Deps,
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Deps => deps::ensure(deps::TEST_PACKAGES),
        Cmd::Test => test(),
    }
}

fn test() -> Result<()> {
    deps::ensure(deps::TEST_PACKAGES)?;
    deps::run("cargo", &["fmt", "--all", "--", "--check"])?;
    deps::run(
        "cargo",
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    deps::run("cargo", &["test", "--workspace", "--release"])?;
    Ok(())
}
