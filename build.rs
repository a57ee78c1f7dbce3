//! Generates the gRPC code and the encoded descriptor set.
//!
//! protox compiles the protos in-process, so no system `protoc` is needed. The
//! descriptor set is written in protox's encoded form, which keeps extension
//! options such as `google.api.http` (prost's own `FileDescriptorSet` would drop
//! them): reflection serves it and the REST transcoder reads its HTTP rules. It
//! keeps the protos' source info too, so `grpcurl describe` shows the comments
//! of every service, method and field.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "google/longrunning/operations.proto",
    "google/rpc/code.proto",
    "google/rpc/error_details.proto",
    "google/rpc/status.proto",
    "opsd/v1/workers.proto",
    "opsd/v1/console.proto",
    // Well-known types that workers often put in `Any`, so REST renders them.
    "google/protobuf/duration.proto",
    "google/protobuf/empty.proto",
    "google/protobuf/field_mask.proto",
    "google/protobuf/struct.proto",
    "google/protobuf/timestamp.proto",
    "google/protobuf/wrappers.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out = PathBuf::from(env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    let encoded = compiler.encode_file_descriptor_set();
    fs::write(out.join("opsd_descriptor.bin"), &encoded)?;

    let fds = prost_types::FileDescriptorSet::decode(encoded.as_slice())?;
    let mut config = prost_build::Config::new();
    config
        .enable_type_names()
        .type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
