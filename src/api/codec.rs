//! The gRPC codec of opsd's services: prost's encoder, and a decoder for
//! which a request message that does not decode is the client's mistake.
//!
//! tonic decodes a request before the service method runs, and prost's own
//! codec answers a message that does not decode (invalid UTF-8 in a string,
//! a varint of 11 bytes, a length past the end) with INTERNAL, as if the
//! server had failed. Here such a message is INVALID_ARGUMENT with a
//! `BadRequest` that names the field where prost knows it (its
//! `DecodeError` carries the path), built by the one error mapping
//! (`Error::MalformedMessage`). The generated server stubs of `api::grpc`
//! use this codec (build.rs). Message sizes are checked before decoding, by
//! the server's gRPC request guard (RESOURCE_EXHAUSTED).

use std::marker::PhantomData;

use prost::Message;
use tonic::{
    codec::{BufferSettings, Codec as TonicCodec, DecodeBuf, Decoder as TonicDecoder},
    Status,
};
use tonic_prost::ProstEncoder;

use crate::error::Error;

/// Encodes `T` with prost, decodes `U` with [`Decoder`].
#[derive(Debug)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(PhantomData)
    }
}

/// Decodes `U`; a message that does not decode is INVALID_ARGUMENT.
#[derive(Debug)]
pub struct Decoder<U>(PhantomData<U>);

impl<U: Message + Default> TonicDecoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::from(malformed(&e)))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// The error for a message that does not decode: the field path (outermost
/// first, dotted) and prost's description of what was wrong.
///
/// prost keeps the (message, field) pairs it unwound through private and
/// prints them innermost first, `failed to decode Protobuf message:
/// Any.value: CreateOperationRequest.metadata: <description>`, so the path
/// is read back from that text. A pair is `Message.field` with identifier
/// characters only, which no description starts with.
pub fn malformed(error: &prost::DecodeError) -> Error {
    let text = error.to_string();
    let rest = text
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(&text);
    let mut fields = Vec::new();
    let mut description = rest;
    while let Some((pair, after)) = description.split_once(": ") {
        let Some((message, field)) = pair.split_once('.') else {
            break;
        };
        let ident =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ident(message) || !ident(field) {
            break;
        }
        fields.push(field);
        description = after;
    }
    fields.reverse();
    Error::MalformedMessage {
        field: (!fields.is_empty()).then(|| fields.join(".")),
        description: description.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::pb::{
        google::longrunning::{GetOperationRequest, ListOperationsRequest, WaitOperationRequest},
        opsd::v1::CreateOperationRequest,
    };

    fn field_of<M: Message + Default + std::fmt::Debug>(bytes: &[u8]) -> (Option<String>, String) {
        match malformed(&M::decode(bytes).unwrap_err()) {
            Error::MalformedMessage { field, description } => (field, description),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_failing_field_is_named_outermost_first() {
        // GetOperationRequest.name = "operations/\xff"
        let mut bad_name = vec![0x0a, 12];
        bad_name.extend_from_slice(b"operations/\xff");
        let (field, description) = field_of::<GetOperationRequest>(&bad_name);
        assert_eq!(field.as_deref(), Some("name"));
        assert!(description.contains("UTF-8"), "{description}");

        // ListOperationsRequest.page_size (2) as an 11-byte varint.
        let mut long_varint = vec![0x10];
        long_varint.extend_from_slice(&[0xff; 10]);
        long_varint.push(0x01);
        let (field, _) = field_of::<ListOperationsRequest>(&long_varint);
        assert_eq!(field.as_deref(), Some("page_size"));

        // WaitOperationRequest.timeout (2) holding a truncated Duration.
        let truncated = [0x12, 0x02, 0x08, 0xff];
        let (field, _) = field_of::<WaitOperationRequest>(&truncated);
        assert_eq!(field.as_deref(), Some("timeout.seconds"));

        // CreateOperationRequest.metadata (4) claiming 4 GiB.
        let huge = [0x22, 0x80, 0x80, 0x80, 0x80, 0x10];
        let (field, description) = field_of::<CreateOperationRequest>(&huge);
        assert_eq!(field.as_deref(), Some("metadata"), "{description}");
    }

    #[test]
    fn garbage_without_a_field_still_explains_itself() {
        let (field, description) = field_of::<GetOperationRequest>(&[0xff, 0xff, 0xff]);
        assert_eq!(field, None);
        assert!(!description.is_empty());
        let status = Status::from(malformed(
            &GetOperationRequest::decode(&[0x0a, 0x01, 0xc3][..]).unwrap_err(),
        ));
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("(field name)"),
            "{}",
            status.message()
        );
    }
}
