//! ProtoJSON through prost-reflect, for the REST surface and JSON errors.
//!
//! Messages are rendered from their encoded bytes over a descriptor pool (the
//! embedded one plus the types workers registered), so `Any` fields render
//! with `@type` and their own fields. An `Any` whose type the pool does not
//! know (or whose bytes do not decode) renders in opsd's documented fallback
//! form, `{"@type": <type URL>, "value": <base64 of the bytes>}`, instead of
//! failing the whole response.

use base64::{engine::general_purpose::STANDARD, Engine};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use prost_types::Any;
use serde_json::{Map, Value};

/// How to render: enum numbers instead of names (`$alt=json;enum-encoding=int`).
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonOptions {
    pub enum_numbers: bool,
}

impl JsonOptions {
    fn serialize(self) -> SerializeOptions {
        SerializeOptions::new()
            .use_enum_numbers(self.enum_numbers)
            .skip_default_fields(true)
            .stringify_64_bit_integers(true)
    }
}

/// Renders a prost message of type `full_name` through `pool`.
pub fn message_to_json<M: Message>(
    message: &M,
    full_name: &str,
    pool: &DescriptorPool,
    options: JsonOptions,
) -> Result<Value, String> {
    tree(&message.encode_to_vec(), full_name, pool, options)
}

/// [`message_to_json`] of an encoded message.
fn tree(
    bytes: &[u8],
    full_name: &str,
    pool: &DescriptorPool,
    options: JsonOptions,
) -> Result<Value, String> {
    let text = serialize(bytes, full_name, pool, options, false)?;
    let mut value: Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    empty_any_without_value(&mut value);
    Ok(value)
}

/// Renders a prost message of type `full_name` through `pool` straight to
/// JSON text, indented as `serde_json::to_vec_pretty` does when `pretty`:
/// the text of [`message_to_json`]'s tree. Only a message that holds an
/// `Any` of `google.protobuf.Empty` goes through the tree, whose correction
/// needs it; the tree is parsed from the same text, so both agree to the
/// last digit.
pub fn render_message<M: Message>(
    message: &M,
    full_name: &str,
    pool: &DescriptorPool,
    options: JsonOptions,
    pretty: bool,
) -> Result<Vec<u8>, String> {
    let bytes = message.encode_to_vec();
    if contains(&bytes, EMPTY_TYPE.as_bytes()) {
        return Ok(write_json(&tree(&bytes, full_name, pool, options)?, pretty));
    }
    serialize(&bytes, full_name, pool, options, pretty)
}

/// The ProtoJSON text of an encoded message, as prost-reflect writes it.
fn serialize(
    bytes: &[u8],
    full_name: &str,
    pool: &DescriptorPool,
    options: JsonOptions,
    pretty: bool,
) -> Result<Vec<u8>, String> {
    let descriptor = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("unknown message type {full_name}"))?;
    let dynamic = DynamicMessage::decode(descriptor, bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(64 + 2 * bytes.len());
    let options = options.serialize();
    let written = if pretty {
        dynamic.serialize_with_options(&mut serde_json::Serializer::pretty(&mut out), &options)
    } else {
        dynamic.serialize_with_options(&mut serde_json::Serializer::new(&mut out), &options)
    };
    written.map_err(|e| e.to_string())?;
    Ok(out)
}

/// A JSON value as text, indented when `pretty`.
pub fn write_json(value: &Value, pretty: bool) -> Vec<u8> {
    let written = if pretty {
        serde_json::to_vec_pretty(value)
    } else {
        serde_json::to_vec(value)
    };
    // Serializing a `Value` into memory cannot fail.
    written.unwrap_or_else(|_| b"{}".to_vec())
}

/// The message name whose `Any` form [`empty_any_without_value`] corrects.
const EMPTY_TYPE: &str = "google.protobuf.Empty";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// An `Any` holding `google.protobuf.Empty` is `{"@type": ".../google.protobuf.Empty"}`
/// in the ProtoJSON of protobuf's own runtimes (Empty has no special JSON
/// form, so no `value` wrapper); prost-reflect writes `"value": {}`, which
/// Python's `json_format` rejects. This puts it right, at any depth.
fn empty_any_without_value(value: &mut Value) {
    match value {
        Value::Object(object) => {
            let is_empty_any = object
                .get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with("/google.protobuf.Empty"));
            if is_empty_any
                && object
                    .get("value")
                    .is_some_and(|v| v.as_object().is_some_and(Map::is_empty))
            {
                object.remove("value");
            }
            object.values_mut().for_each(empty_any_without_value);
        }
        Value::Array(items) => items.iter_mut().for_each(empty_any_without_value),
        _ => {}
    }
}

/// Renders an `Any`, falling back to `{"@type", "value"}` when its type is
/// unknown to `pool`.
pub fn any_to_json(any: &Any, pool: &DescriptorPool, options: JsonOptions) -> Value {
    message_to_json(any, "google.protobuf.Any", pool, options).unwrap_or_else(|_| {
        let mut fallback = Map::new();
        fallback.insert("@type".into(), Value::String(any.type_url.clone()));
        fallback.insert("value".into(), Value::String(STANDARD.encode(&any.value)));
        Value::Object(fallback)
    })
}

/// Renders a `google.rpc.Status`, each detail on its own (so one unknown
/// detail type does not hide the others).
pub fn status_to_json(
    code: i32,
    message: &str,
    details: &[Any],
    pool: &DescriptorPool,
    options: JsonOptions,
) -> Value {
    let mut object = Map::new();
    if code != 0 {
        object.insert("code".into(), Value::from(code));
    }
    if !message.is_empty() {
        object.insert("message".into(), Value::String(message.to_owned()));
    }
    if !details.is_empty() {
        let details = details
            .iter()
            .map(|d| any_to_json(d, pool, options))
            .collect();
        object.insert("details".into(), Value::Array(details));
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::FILE_DESCRIPTOR_SET;

    fn pool() -> DescriptorPool {
        DescriptorPool::decode(FILE_DESCRIPTOR_SET).unwrap()
    }

    #[test]
    fn known_anys_render_with_their_fields() {
        let info = crate::pb::google::rpc::ErrorInfo {
            reason: "R".into(),
            domain: "d".into(),
            metadata: Default::default(),
        };
        let any = Any::from_msg(&info).unwrap();
        let json = any_to_json(&any, &pool(), JsonOptions::default());
        assert_eq!(
            json,
            serde_json::json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "R", "domain": "d"})
        );
        let empty = Any::from_msg(&()).unwrap();
        assert_eq!(
            any_to_json(&empty, &pool(), JsonOptions::default()),
            serde_json::json!({"@type": "type.googleapis.com/google.protobuf.Empty"})
        );
        let wkt = Any::from_msg(&"hi".to_owned()).unwrap();
        assert_eq!(
            any_to_json(&wkt, &pool(), JsonOptions::default()),
            serde_json::json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": "hi"})
        );
    }

    #[test]
    fn rendered_text_equals_the_serialized_tree() {
        use crate::pb::google::longrunning::{operation::Result as OpResult, Operation};
        let info = crate::pb::google::rpc::ErrorInfo {
            reason: "R".into(),
            domain: "d".into(),
            metadata: [("k".to_owned(), "v".to_owned())].into(),
        };
        let ops = [
            Operation {
                name: "operations/a".into(),
                ..Default::default()
            },
            // A float: f32 digits on every path.
            Operation {
                name: "operations/f".into(),
                metadata: Some(Any::from_msg(&0.1f32).unwrap()),
                ..Default::default()
            },
            Operation {
                name: "operations/g".into(),
                metadata: Some(Any::from_msg(&0.1f32).unwrap()),
                done: true,
                result: Some(OpResult::Response(Any::from_msg(&()).unwrap())),
            },
            Operation {
                name: "projects/p/operations/b".into(),
                metadata: Some(Any::from_msg(&"50%".to_owned()).unwrap()),
                done: true,
                result: Some(OpResult::Error(crate::pb::google::rpc::Status {
                    code: 1,
                    message: "Operation was cancelled.".into(),
                    details: vec![Any::from_msg(&info).unwrap()],
                })),
            },
            Operation {
                name: "operations/c".into(),
                metadata: None,
                done: true,
                result: Some(OpResult::Response(Any::from_msg(&()).unwrap())),
            },
        ];
        for op in &ops {
            for pretty in [false, true] {
                for enum_numbers in [false, true] {
                    let options = JsonOptions { enum_numbers };
                    let tree =
                        message_to_json(op, "google.longrunning.Operation", &pool(), options)
                            .unwrap();
                    let text = render_message(
                        op,
                        "google.longrunning.Operation",
                        &pool(),
                        options,
                        pretty,
                    )
                    .unwrap();
                    assert_eq!(
                        String::from_utf8(text).unwrap(),
                        String::from_utf8(write_json(&tree, pretty)).unwrap()
                    );
                }
            }
        }
        for op in &ops[1..3] {
            let text = render_message(
                op,
                "google.longrunning.Operation",
                &pool(),
                JsonOptions::default(),
                false,
            )
            .unwrap();
            let text = String::from_utf8(text).unwrap();
            assert!(text.contains(r#""value":0.1}"#), "{text}");
        }
        let unknown = Operation {
            name: "operations/d".into(),
            metadata: Some(Any {
                type_url: "type.googleapis.com/acme.Unknown".into(),
                value: vec![1],
            }),
            ..Default::default()
        };
        assert!(render_message(
            &unknown,
            "google.longrunning.Operation",
            &pool(),
            JsonOptions::default(),
            false
        )
        .is_err());
    }

    #[test]
    fn unknown_anys_fall_back_to_type_and_base64() {
        let any = Any {
            type_url: "type.googleapis.com/acme.Unknown".into(),
            value: vec![1, 2, 3],
        };
        assert_eq!(
            any_to_json(&any, &pool(), JsonOptions::default()),
            serde_json::json!({"@type": "type.googleapis.com/acme.Unknown", "value": "AQID"})
        );
    }
}
