//! REST responses as ProtoJSON: the same operation as over gRPC, and the
//! worker's own types once registered (RegisterTypes, --descriptor-set).

mod common;

use common::{
    any_string, create, op,
    rest::{config, decode_operation, Rest},
};
use opsd::{
    pb::{
        google::longrunning::GetOperationRequest,
        opsd::v1::{CreateOperationRequest, RegisterTypesRequest},
    },
    Config,
};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn grpc_and_rest_views_of_an_operation_are_equal() {
    let rest = Rest::start().await;
    let mut workers = rest.server.workers().await;
    let request = CreateOperationRequest {
        metadata: Some(any_string("halfway")),
        ..op("projects/p/locations/l", "same")
    };
    let name = create(&mut workers, request).await.name;
    let mut ops = rest.server.operations().await;
    for step in 0..2 {
        let grpc = ops
            .get_operation(GetOperationRequest { name: name.clone() })
            .await
            .unwrap()
            .into_inner();
        for path in [
            "/v1/projects/p/locations/l/operations/same",
            "/v2/projects/p/locations/l/operations/same",
            "/v1/projects/p/locations/l/operations/same?alt=json;enum-encoding=int&prettyPrint=false",
        ] {
            let (status, body) = rest.get(path).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(decode_operation(&body), grpc, "{path} at step {step}");
        }
        assert_eq!(
            rest.get("/v1/projects/p/locations/l/operations/same")
                .await
                .1["metadata"],
            json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "halfway"})
        );
        rest.post(
            "/v1/projects/p/locations/l/operations/same:cancel",
            Some("{}"),
        )
        .await;
    }
    rest.server.stop().await;
}

#[tokio::test]
async fn worker_types_render_once_registered_and_fall_back_before() {
    let rest = Rest::start().await;
    // acme.Progress { int32 percent = 1; }
    let descriptor_set = prost_types::FileDescriptorSet {
        file: vec![prost_types::FileDescriptorProto {
            name: Some("acme/progress.proto".into()),
            package: Some("acme".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("Progress".into()),
                field: vec![prost_types::FieldDescriptorProto {
                    name: Some("percent".into()),
                    json_name: Some("percent".into()),
                    number: Some(1),
                    r#type: Some(5),
                    label: Some(1),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        }],
    };
    let metadata = prost_types::Any {
        type_url: "type.googleapis.com/acme.Progress".into(),
        value: vec![0x08, 42],
    };
    let mut workers = rest.server.workers().await;
    let request = CreateOperationRequest {
        metadata: Some(metadata.clone()),
        ..op("", "typed")
    };
    create(&mut workers, request).await;

    let (status, body) = rest.get("/v1/operations/typed").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["metadata"],
        json!({"@type": "type.googleapis.com/acme.Progress", "value": "CCo="})
    );

    let registered = workers
        .register_types(RegisterTypesRequest {
            descriptor_set: Some(descriptor_set),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(registered.message_types, ["acme.Progress"]);
    let (_, body) = rest.get("/v1/operations/typed").await;
    assert_eq!(
        body["metadata"],
        json!({"@type": "type.googleapis.com/acme.Progress", "percent": 42})
    );
    // gRPC returns the bytes unchanged either way.
    let mut ops = rest.server.operations().await;
    let got = ops
        .get_operation(GetOperationRequest {
            name: "operations/typed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.metadata, Some(metadata));
    rest.server.stop().await;
}

#[tokio::test]
async fn descriptor_set_files_are_loaded_at_start_up() {
    // google.protobuf.Duration's file under another package name would clash;
    // a fresh message type is enough: acme.Size { int64 bytes = 1; }.
    let set = prost_types::FileDescriptorSet {
        file: vec![prost_types::FileDescriptorProto {
            name: Some("acme/size.proto".into()),
            package: Some("acme".into()),
            message_type: vec![prost_types::DescriptorProto {
                name: Some("Size".into()),
                field: vec![prost_types::FieldDescriptorProto {
                    name: Some("bytes".into()),
                    json_name: Some("bytes".into()),
                    number: Some(1),
                    r#type: Some(3),
                    label: Some(1),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        }],
    };
    let path = std::env::temp_dir().join(format!("opsd-fds-{}.bin", std::process::id()));
    std::fs::write(&path, prost::Message::encode_to_vec(&set)).unwrap();
    let mut config = config();
    config.descriptor_sets = vec![path.clone()];
    let rest = Rest::start_with(config).await;
    let mut workers = rest.server.workers().await;
    let metadata = prost_types::Any {
        type_url: "type.googleapis.com/acme.Size".into(),
        value: vec![0x08, 0x80, 0x08],
    };
    create(
        &mut workers,
        CreateOperationRequest {
            metadata: Some(metadata),
            ..op("", "sized")
        },
    )
    .await;
    let (_, body) = rest.get("/v1/operations/sized").await;
    // int64 renders as a string in ProtoJSON.
    assert_eq!(
        body["metadata"],
        json!({"@type": "type.googleapis.com/acme.Size", "bytes": "1024"})
    );
    rest.server.stop().await;
    let _ = std::fs::remove_file(&path);

    // A file that is not a descriptor set stops start-up, naming the file.
    let junk = std::env::temp_dir().join(format!("opsd-fds-junk-{}.bin", std::process::id()));
    std::fs::write(&junk, b"\xff\xff\xff").unwrap();
    let mut config = Config::for_tests();
    config.descriptor_sets = vec![junk.clone()];
    let err = opsd::server::Server::new(config)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("opsd-fds-junk"), "{err}");
    let _ = std::fs::remove_file(&junk);
}
