//! The generated protobuf and gRPC code (build.rs: tonic-prost-build over
//! the vendored protos, compiled by protox).

/// The encoded descriptor set of every opsd proto and its imports, with
/// extension options kept (`google.api.http` among them).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/opsd_descriptor.bin"));

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod opsd {
    pub mod v1 {
        tonic::include_proto!("opsd.v1");
    }
}
