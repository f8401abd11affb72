//! Generates containerd's API (the snapshots service, plus the content, images, leases and diff
//! clients `cora rpull` uses, and CRI's image service for tests) from the vendored .proto
//! files with protox (pure Rust, so no protoc is needed on the build machine).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    const API: &str = "github.com/containerd/containerd/api/services";
    let mut protos: Vec<String> = ["snapshots", "content", "images", "leases", "diff"]
        .iter()
        .map(|s| format!("proto/{API}/{s}/v1/{s}.proto"))
        .collect();
    protos.push("proto/cri_image.proto".into());
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(&protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
