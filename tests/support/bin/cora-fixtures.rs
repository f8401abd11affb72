//! Builds the named fixture trees (cached under `target/cora-fixtures/trees`) and prints their
//! paths, for the VM preps and benches that need them outside `cargo test`.

use anyhow::Result;

fn main() -> Result<()> {
    let names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        anyhow::bail!("usage: cora-fixtures NAME... (small, base, python-layer, base-ssl-updated)");
    }
    for name in names {
        println!("{}", cora_tests::fixtures::named_tree(&name)?.display());
    }
    Ok(())
}
