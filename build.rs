//! Generates the gRPC code and the encoded descriptor set.
//!
//! protox compiles the protos in-process, so no system `protoc` is needed. The
//! descriptor set is written in protox's encoded form, which keeps extension
//! options such as `google.api.http` (prost's own `FileDescriptorSet` would drop
//! them): reflection serves it and the REST transcoder reads its HTTP rules. It
//! keeps the protos' source info too, so `grpcurl describe` shows the comments
//! of every service, method and field.
//!
//! The code is generated twice. The messages and the clients go to `pb`,
//! below every other module. The server stubs go to `api::grpc`, with the
//! messages taken from `pb` and opsd's own codec (`api::codec`), which turns a
//! request that does not decode into INVALID_ARGUMENT through the one error
//! mapping; the stubs sit with the protocol faces that implement them, so
//! `pb` depends on nothing of opsd's.

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
        .build_server(false)
        .compile_fds_with_config(fds.clone(), config)?;

    let servers = out.join("servers");
    fs::create_dir_all(&servers)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&servers)
        .extern_path(".google", "crate::pb::google")
        .extern_path(".opsd", "crate::pb::opsd")
        .codec_path("crate::api::codec::Codec")
        .compile_fds_with_config(fds, prost_build::Config::new())?;
    Ok(())
}
