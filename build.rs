//! Compiles the CSI v1.12 interface. protoc comes from the `protoc-bin-vendored` crate so a
//! build needs no system protoc (CI and the container image stay hermetic).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Build scripts are single-threaded, and PROTOC only steers this process.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    Ok(())
}
