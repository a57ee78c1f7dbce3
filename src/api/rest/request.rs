//! Building a request message from a REST call: body, path variables and
//! query parameters, as Google's front end does.
//!
//! - The body (for `body: "*"`) is ProtoJSON; unknown fields and wrong types
//!   are refused. An empty body is an empty message.
//! - Path variables set their fields; a field the body already set to
//!   another value is refused (`{"name": ...}` must match the path).
//! - Query parameters name fields by proto name or JSON name
//!   (`page_size`/`pageSize`, dotted for nested fields). `+` and `%20` are
//!   spaces. Booleans are `true/false/True/False/1/0`. Google's system
//!   parameters are accepted and are not fields; anything else unknown, a
//!   path-bound field, or a repeated singular field is refused.

use std::collections::HashSet;

use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, ReflectMessage,
    Value,
};

use super::rules::BodyRule;
use crate::{error::Error, json::JsonOptions};

/// Google system parameters (with or without `$`); see
/// <https://cloud.google.com/apis/docs/system-parameters>.
const SYSTEM_PARAMETERS: &[&str] = &[
    "alt",
    "prettyPrint",
    "fields",
    "key",
    "access_token",
    "oauth_token",
    "quotaUser",
    ".xgafv",
    "callback",
    "userProject",
    "uploadType",
    "upload_protocol",
    "trace",
    "userIp",
];

/// The system parameters that change the response.
#[derive(Clone, Copy, Debug)]
pub struct Presentation {
    pub pretty: bool,
    pub json: JsonOptions,
}

impl Default for Presentation {
    fn default() -> Self {
        Self {
            pretty: true,
            json: JsonOptions::default(),
        }
    }
}

/// The query's `key=value` pairs, with `+` and `%XX` decoded. A name or
/// value that is not UTF-8 once decoded is refused (a form decoder would
/// replace the bytes and answer something else than was asked).
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, Error> {
    let decode = |text: &str| {
        let spaced = text.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|decoded| decoded.into_owned())
    };
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key).map_err(|_| {
            Error::invalid(
                "query",
                format!("the parameter name {key:?} is not UTF-8 once percent-decoded"),
            )
        })?;
        let value = decode(value).map_err(|_| {
            Error::invalid(
                key.clone(),
                format!("{value:?} is not UTF-8 once percent-decoded"),
            )
        })?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Splits the query into field parameters and the response presentation.
pub fn split_query(query: &str) -> Result<(Vec<(String, String)>, Presentation), Error> {
    let mut fields = Vec::new();
    let mut presentation = Presentation::default();
    for (key, value) in query_pairs(query)? {
        let bare = key.strip_prefix('$').unwrap_or(&key);
        if !SYSTEM_PARAMETERS.contains(&bare) {
            fields.push((key, value));
            continue;
        }
        match bare {
            "alt" => match value.as_str() {
                "json" => presentation.json.enum_numbers = false,
                "json;enum-encoding=int" => presentation.json.enum_numbers = true,
                other => {
                    return Err(Error::invalid(
                        key.as_str(),
                        format!(
                            "{other:?} is not supported; use `json` or `json;enum-encoding=int`"
                        ),
                    ))
                }
            },
            "prettyPrint" => presentation.pretty = parse_bool(&key, &value)?,
            // Accepted and ignored: opsd has no API keys, quotas, JSONP or
            // partial responses, and renders errors in the v1 format.
            _ => {}
        }
    }
    Ok((fields, presentation))
}

/// Builds the request message for one call, encoded: the bytes the gRPC
/// handler's request type decodes from.
pub fn build(
    descriptor: MessageDescriptor,
    body_rule: &BodyRule,
    body: &[u8],
    path_values: Vec<(String, String)>,
    query: Vec<(String, String)>,
) -> Result<Vec<u8>, Error> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    if blank && query.is_empty() {
        if let Some(encoded) = encode_path_only(&descriptor, &path_values) {
            return Ok(encoded);
        }
    }
    build_dynamic(descriptor, body_rule, body, path_values, query)
        .map(|m| prost::Message::encode_to_vec(&m))
}

/// The common call made of its URL path alone (`GET /v1/{name=...}`): when
/// every path value sets a top-level string field, the request is encoded
/// directly, without a dynamic message. `None`: any other shape.
fn encode_path_only(
    descriptor: &MessageDescriptor,
    path_values: &[(String, String)],
) -> Option<Vec<u8>> {
    let mut encoded = Vec::with_capacity(path_values.iter().map(|(_, v)| v.len() + 8).sum());
    for (path, value) in path_values {
        let field = descriptor.get_field_by_name(path)?;
        if !matches!(field.kind(), Kind::String) || field.is_list() {
            return None;
        }
        prost::encoding::string::encode(field.number(), value, &mut encoded);
    }
    Some(encoded)
}

/// [`build`] for every shape: body, path values and query through a
/// dynamic message.
fn build_dynamic(
    descriptor: MessageDescriptor,
    body_rule: &BodyRule,
    body: &[u8],
    path_values: Vec<(String, String)>,
    query: Vec<(String, String)>,
) -> Result<DynamicMessage, Error> {
    let blank = body.iter().all(u8::is_ascii_whitespace);
    let mut message = match body_rule {
        BodyRule::All if !blank => parse_json(descriptor.clone(), body, "body")?,
        BodyRule::Field(field) if !blank => {
            let mut message = DynamicMessage::new(descriptor.clone());
            let target = descriptor.get_field_by_name(field).ok_or_else(|| {
                Error::invalid(
                    "body",
                    format!("the rule's body field {field:?} does not exist"),
                )
            })?;
            let Kind::Message(inner) = target.kind() else {
                return Err(Error::invalid(
                    "body",
                    format!("{field} is not a message field"),
                ));
            };
            let value = parse_json(inner, body, "body")?;
            message.set_field(&target, Value::Message(value));
            message
        }
        BodyRule::None if !blank => {
            return Err(Error::invalid("body", "this method takes no request body"))
        }
        _ => DynamicMessage::new(descriptor.clone()),
    };

    let mut bound = HashSet::new();
    for (path, value) in path_values {
        let field = resolve(&descriptor, &path)
            .ok_or_else(|| Error::invalid(path.clone(), "the route binds an unknown field"))?;
        let target = nested_mut(&mut message, &field);
        let leaf = field.last().expect("a field path is never empty");
        if target.has_field(leaf) && target.get_field(leaf).as_str() != Some(value.as_str()) {
            return Err(Error::invalid(
                leaf.name(),
                format!(
                    "the body says {:?} but the URL path says {value:?}",
                    target.get_field(leaf).as_str().unwrap_or_default()
                ),
            ));
        }
        target.set_field(leaf, Value::String(value));
        bound.insert(path);
    }

    if *body_rule == BodyRule::All {
        if let Some((key, _)) = query.first() {
            return Err(Error::invalid(
                key.clone(),
                "unknown query parameter: this method takes its fields from the request body",
            ));
        }
        return Ok(message);
    }
    let mut seen = HashSet::new();
    for (key, value) in query {
        let field = resolve(&descriptor, &key)
            .ok_or_else(|| Error::invalid(key.clone(), "unknown query parameter"))?;
        let path = field.iter().map(|f| f.name()).collect::<Vec<_>>().join(".");
        if bound.contains(&path) {
            return Err(Error::invalid(
                key,
                "this field is bound by the URL path and cannot be repeated in the query",
            ));
        }
        if let BodyRule::Field(body_field) = body_rule {
            if field[0].name() == body_field {
                return Err(Error::invalid(
                    key,
                    "this field comes from the request body",
                ));
            }
        }
        let leaf = field.last().expect("a field path is never empty").clone();
        if !leaf.is_list() && !seen.insert(path) {
            return Err(Error::invalid(key, "given more than once"));
        }
        let parsed = parse_scalar(&key, &leaf, &value)?;
        let target = nested_mut(&mut message, &field);
        if leaf.is_list() {
            if let Value::List(items) = target.get_field_mut(&leaf) {
                items.push(parsed);
            }
        } else {
            target.set_field(&leaf, parsed);
        }
    }
    Ok(message)
}

fn parse_json(
    descriptor: MessageDescriptor,
    body: &[u8],
    field: &str,
) -> Result<DynamicMessage, Error> {
    let invalid = |e: serde_json::Error| {
        Error::invalid(field, format!("the JSON body is not a valid request: {e}"))
    };
    let json: serde_json::Value = serde_json::from_slice(body).map_err(invalid)?;
    check_times(&json, &descriptor, field)?;
    let options = DeserializeOptions::new().deny_unknown_fields(true);
    DynamicMessage::deserialize_with_options(descriptor, json, &options).map_err(invalid)
}

/// ProtoJSON writes durations and timestamps with at most 9 fractional
/// digits (nanoseconds) and accepts no more; prost-types would drop the
/// extra digits silently. Checks every such string of a JSON body, through
/// nested messages and lists, before it is parsed.
fn check_times(
    json: &serde_json::Value,
    descriptor: &MessageDescriptor,
    path: &str,
) -> Result<(), Error> {
    let serde_json::Value::Object(object) = json else {
        return Ok(());
    };
    for (key, value) in object {
        let Some(field) = descriptor
            .get_field_by_json_name(key)
            .or_else(|| descriptor.get_field_by_name(key))
        else {
            continue; // refused as unknown by the parser
        };
        let Kind::Message(message) = field.kind() else {
            continue;
        };
        let path = if path == "body" {
            field.name().to_owned()
        } else {
            format!("{path}.{}", field.name())
        };
        let items = match value {
            serde_json::Value::Array(items) if field.is_list() => items.iter().collect(),
            serde_json::Value::Object(map) if field.is_map() => map.values().collect(),
            other => vec![other],
        };
        for item in items {
            match item {
                serde_json::Value::String(text) => check_time_text(&message, text)
                    .map_err(|reason| Error::invalid(path.clone(), reason))?,
                serde_json::Value::Object(_) => check_times(item, &message, &path)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// A `google.protobuf.Duration` or `Timestamp` string with more than 9
/// fractional digits is refused (ProtoJSON); other texts are the parser's.
fn check_time_text(message: &MessageDescriptor, text: &str) -> Result<(), String> {
    let kind = message.full_name();
    if kind != "google.protobuf.Duration" && kind != "google.protobuf.Timestamp" {
        return Ok(());
    }
    // The fraction follows the seconds: after the last ':' of a timestamp.
    let seconds = text.rfind(':').map_or(text, |colon| &text[colon..]);
    if let Some((_, after)) = seconds.split_once('.') {
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if digits > 9 {
            return Err(format!(
                "{text:?} is not a {kind}: it has {digits} fractional digits; at most 9 (nanoseconds)"
            ));
        }
    }
    Ok(())
}

/// The fields of a dotted path, each by proto name or JSON name.
fn resolve(descriptor: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut fields = Vec::new();
    let mut current = descriptor.clone();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let field = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))?;
        if i + 1 < parts.len() {
            match field.kind() {
                Kind::Message(inner) if !field.is_list() && !field.is_map() => current = inner,
                _ => return None,
            }
        } else if field.is_map() || (field.is_list() && matches!(field.kind(), Kind::Message(_))) {
            return None;
        }
        fields.push(field);
    }
    Some(fields)
}

/// The message that holds the last field of `path`, creating parents.
fn nested_mut<'a>(
    message: &'a mut DynamicMessage,
    path: &[FieldDescriptor],
) -> &'a mut DynamicMessage {
    let mut current = message;
    for field in &path[..path.len() - 1] {
        current = match current.get_field_mut(field) {
            Value::Message(inner) => inner,
            _ => unreachable!("resolve() only walks through singular message fields"),
        };
    }
    current
}

fn parse_bool(key: &str, value: &str) -> Result<bool, Error> {
    match value {
        "true" | "True" | "1" => Ok(true),
        "false" | "False" | "0" => Ok(false),
        other => Err(Error::invalid(
            key,
            format!("{other:?} is not a boolean (true, false, True, False, 1, 0)"),
        )),
    }
}

fn parse_scalar(key: &str, field: &FieldDescriptor, value: &str) -> Result<Value, Error> {
    let bad = |what: &str| Error::invalid(key, format!("{value:?} is not {what}"));
    Ok(match field.kind() {
        Kind::String => Value::String(value.to_owned()),
        Kind::Bool => Value::Bool(parse_bool(key, value)?),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            Value::I32(value.parse().map_err(|_| bad("a 32-bit integer"))?)
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            Value::I64(value.parse().map_err(|_| bad("a 64-bit integer"))?)
        }
        Kind::Uint32 | Kind::Fixed32 => Value::U32(
            value
                .parse()
                .map_err(|_| bad("an unsigned 32-bit integer"))?,
        ),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(
            value
                .parse()
                .map_err(|_| bad("an unsigned 64-bit integer"))?,
        ),
        Kind::Float => Value::F32(value.parse().map_err(|_| bad("a number"))?),
        Kind::Double => Value::F64(value.parse().map_err(|_| bad("a number"))?),
        Kind::Bytes => {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(value))
                .map_err(|_| bad("base64"))?;
            Value::Bytes(decoded.into())
        }
        Kind::Enum(enumeration) => {
            let number = enumeration
                .get_value_by_name(value)
                .map(|v| v.number())
                .or_else(|| value.parse().ok())
                .ok_or_else(|| bad(&format!("a value of {}", enumeration.full_name())))?;
            Value::EnumNumber(number)
        }
        // Well-known types given as their JSON string form (`timeout=5s`).
        Kind::Message(message) => {
            check_time_text(&message, value).map_err(|reason| Error::invalid(key, reason))?;
            let json = serde_json::Value::String(value.to_owned());
            let parsed = DynamicMessage::deserialize(message.clone(), json)
                .map_err(|_| bad(&format!("a {}", message.full_name())))?;
            debug_assert_eq!(parsed.descriptor().full_name(), message.full_name());
            Value::Message(parsed)
        }
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use prost::Message;

    use super::*;
    use crate::{
        api::types::base_pool,
        pb::google::longrunning::{GetOperationRequest, ListOperationsRequest},
    };

    fn list_descriptor() -> MessageDescriptor {
        base_pool()
            .get_message_by_name("google.longrunning.ListOperationsRequest")
            .unwrap()
    }

    fn list(query: &str) -> Result<ListOperationsRequest, Error> {
        let (fields, _) = split_query(query)?;
        let message = build(
            list_descriptor(),
            &BodyRule::None,
            b"",
            vec![("name".into(), "operations".into())],
            fields,
        )?;
        Ok(ListOperationsRequest::decode(message.as_slice()).unwrap())
    }

    #[test]
    fn path_only_requests_encode_as_the_dynamic_message_does() {
        let descriptor = base_pool()
            .get_message_by_name("google.longrunning.GetOperationRequest")
            .unwrap();
        let path = vec![("name".to_owned(), "projects/p/operations/a%2Fb".to_owned())];
        let direct = encode_path_only(&descriptor, &path).unwrap();
        let dynamic = build_dynamic(descriptor.clone(), &BodyRule::None, b"", path, vec![])
            .unwrap()
            .encode_to_vec();
        assert_eq!(direct, dynamic);
        assert_eq!(
            GetOperationRequest::decode(direct.as_slice()).unwrap().name,
            "projects/p/operations/a%2Fb"
        );
        // A nested or non-string field takes the dynamic path.
        let list = list_descriptor();
        assert!(encode_path_only(&list, &[("page_size".into(), "5".into())]).is_none());
        assert!(encode_path_only(&list, &[("name.x".into(), "5".into())]).is_none());
    }

    #[test]
    fn camel_case_and_proto_names_both_work() {
        let a = list("pageSize=5&pageToken=t&filter=done%20%3D+true&returnPartialSuccess=True")
            .unwrap();
        let b = list("page_size=5&page_token=t&filter=done+%3D%20true&return_partial_success=1")
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.page_size, 5);
        assert_eq!(a.filter, "done = true");
        assert!(a.return_partial_success);
        assert_eq!(a.name, "operations");
    }

    #[test]
    fn defaults_mean_unset_and_system_parameters_are_not_fields() {
        let unset = list("filter=&pageSize=0&pageToken=&returnPartialSuccess=false").unwrap();
        assert_eq!(unset, list("").unwrap());
        let system = "$alt=json&alt=json;enum-encoding=int&$prettyPrint=false&prettyPrint=true&$fields=x&key=k\
                      &access_token=t&quotaUser=q&$.xgafv=2&$callback=c&$userProject=u&%24alt=json";
        assert_eq!(list(system).unwrap(), list("").unwrap());
        let (_, presentation) =
            split_query("alt=json;enum-encoding=int&prettyPrint=false").unwrap();
        assert!(presentation.json.enum_numbers);
        assert!(!presentation.pretty);
        assert!(split_query("alt=proto").is_err());
    }

    #[test]
    fn bad_parameters_are_invalid_arguments_naming_the_parameter() {
        for (query, field) in [
            ("unknown=1", "unknown"),
            ("name=operations", "name"),
            ("pageSize=abc", "pageSize"),
            ("pageSize=99999999999", "pageSize"),
            ("returnPartialSuccess=yes", "returnPartialSuccess"),
            ("pageSize=1&page_size=2", "page_size"),
            ("filter.x=1", "filter.x"),
        ] {
            match list(query) {
                Err(Error::InvalidArgument { field: f, .. }) => assert_eq!(f, field, "{query}"),
                other => panic!("{query}: {other:?}"),
            }
        }
    }

    #[test]
    fn bodies_must_agree_with_the_path() {
        let descriptor = base_pool()
            .get_message_by_name("google.longrunning.CancelOperationRequest")
            .unwrap();
        let path = || vec![("name".to_owned(), "operations/a".to_owned())];
        for body in [&b""[..], b"{}", b"  ", br#"{"name": "operations/a"}"#] {
            assert!(build(descriptor.clone(), &BodyRule::All, body, path(), vec![]).is_ok());
        }
        for body in [
            &br#"{"name": "operations/b"}"#[..],
            b"{",
            br#"{"nmae": "x"}"#,
            br#"{"name": 5}"#,
            b"[]",
            b"{} {}",
        ] {
            assert!(build(descriptor.clone(), &BodyRule::All, body, path(), vec![]).is_err());
        }
        assert!(build(
            descriptor.clone(),
            &BodyRule::All,
            b"",
            path(),
            vec![("x".into(), "1".into())]
        )
        .is_err());
        assert!(build(descriptor, &BodyRule::None, b"{}", path(), vec![]).is_err());
    }

    #[test]
    fn text_that_is_not_utf8_once_decoded_is_refused() {
        match list("filter=name%20%3D%20%22%FF%22") {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "filter"),
            other => panic!("{other:?}"),
        }
        assert!(list("%FF=1").is_err());
        assert_eq!(list("filter=%C3%A9").unwrap().filter, "é");
    }

    #[test]
    fn durations_and_timestamps_take_at_most_nine_fractional_digits() {
        let wait = base_pool()
            .get_message_by_name("google.longrunning.WaitOperationRequest")
            .unwrap();
        let path = || vec![("name".to_owned(), "operations/a".to_owned())];
        let body = |t: &str| format!("{{\"timeout\": \"{t}\"}}");
        assert!(build(
            wait.clone(),
            &BodyRule::All,
            body("1.000000001s").as_bytes(),
            path(),
            vec![]
        )
        .is_ok());
        match build(
            wait.clone(),
            &BodyRule::All,
            body("1.0000000001s").as_bytes(),
            path(),
            vec![],
        ) {
            Err(Error::InvalidArgument { field, .. }) => assert_eq!(field, "timeout"),
            other => panic!("{other:?}"),
        }
        let query = |t: &str| vec![("timeout".to_owned(), t.to_owned())];
        assert!(build(wait.clone(), &BodyRule::None, b"", vec![], query("2.5s")).is_ok());
        assert!(build(wait, &BodyRule::None, b"", vec![], query("2.0000000001s")).is_err());
        let timestamp = base_pool()
            .get_message_by_name("google.protobuf.Timestamp")
            .unwrap();
        assert!(check_time_text(&timestamp, "2026-01-02T15:04:05.123456789Z").is_ok());
        assert!(check_time_text(&timestamp, "2026-01-02T15:04:05.1234567891Z").is_err());
        assert!(check_time_text(&timestamp, "2026-01-02T15:04:05Z").is_ok());
    }

    #[test]
    fn well_known_types_parse_from_their_json_strings() {
        let descriptor = base_pool()
            .get_message_by_name("google.longrunning.WaitOperationRequest")
            .unwrap();
        let message = build(
            descriptor,
            &BodyRule::None,
            b"",
            vec![],
            vec![("timeout".into(), "1.5s".into())],
        )
        .unwrap();
        let request =
            crate::pb::google::longrunning::WaitOperationRequest::decode(message.as_slice())
                .unwrap();
        assert_eq!(
            request.timeout,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 500_000_000
            })
        );
    }

    proptest! {
        #[test]
        fn arbitrary_queries_never_panic(query in "[a-zA-Z_$.=&%0-9+]{0,40}") {
            let _ = list(&query);
        }

        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let descriptor = base_pool().get_message_by_name("google.longrunning.CancelOperationRequest").unwrap();
            let _ = build(descriptor, &BodyRule::All, &body, vec![("name".into(), "operations/a".into())], vec![]);
        }
    }
}
