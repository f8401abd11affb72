//! Generates the containerd snapshots API from the vendored .proto files with protox (pure Rust,
//! so no protoc is needed on the build machine).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/containerd/services/snapshots/v1/snapshots.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
