//! Compiles the CSI v1.12 interface. protoc comes from the `protoc-bin-vendored` crate so a
//! build needs no system protoc (CI and the container image stay hermetic).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Build scripts are single-threaded, and PROTOC only steers this process.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // A request that is not a valid message (e.g. a string field that is not UTF-8) is the
        // client's fault: INVALID_ARGUMENT, not prost's INTERNAL (src/codec.rs).
        .codec_path("crate::codec::CsiCodec")
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    Ok(())
}
