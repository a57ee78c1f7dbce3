//! Operation names and List targets.
//!
//! A name is `{parent}/operations/{id}`, where the parent is zero or more
//! `collection/id` pairs (`projects/p/locations/l`) and `operations` is never
//! a collection inside the parent, so a name splits one way only. Segments are
//! non-empty, `[A-Za-z0-9._~-]`, never `.` or `..`; `-` alone is reserved as
//! the AIP-159 wildcard and appears only in List targets; a name is at most
//! 1024 bytes.

use std::fmt;

use crate::{error::Error, store::ParentPattern};

/// The longest name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;

/// The collection segment of every operation.
const OPERATIONS: &str = "operations";

/// A valid, canonical operation name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OperationName(String);

/// A reason a name was refused, for `BadRequest` descriptions.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(String);

impl NameError {
    /// The INVALID_ARGUMENT (with `BadRequest`) for the request field that
    /// held the refused name.
    pub fn for_field(self, field: &str) -> Error {
        Error::invalid(field, self.0)
    }
}

/// A refused `name` field.
impl From<NameError> for Error {
    fn from(err: NameError) -> Self {
        err.for_field("name")
    }
}

impl OperationName {
    /// Parses a full name such as `projects/p/operations/123`.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let segments = split(name, "operation name")?;
        let n = segments.len();
        if n < 2 || n % 2 != 0 || segments[n - 2] != OPERATIONS {
            return Err(NameError(format!(
                "\"{}\" is not an operation name: expected `[{{collection}}/{{id}}/...]operations/{{id}}`",
                truncated(name)
            )));
        }
        check_parent(&segments[..n - 2], false)?;
        check_id(segments[n - 1])?;
        Ok(Self(name.to_owned()))
    }

    /// Builds `{parent}/operations/{id}` from a parent (possibly empty) and an id.
    pub fn new(parent: &str, id: &str) -> Result<Self, NameError> {
        let name = if parent.is_empty() {
            format!("{OPERATIONS}/{id}")
        } else {
            format!("{parent}/{OPERATIONS}/{id}")
        };
        Self::parse(&name)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for OperationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a parent given on its own (as in `CreateOperationRequest.parent`):
/// empty, or `collection/id` pairs without wildcards.
pub fn check_parent_name(parent: &str) -> Result<(), NameError> {
    if parent.is_empty() {
        return Ok(());
    }
    let segments = split(parent, "parent")?;
    if segments.len() % 2 != 0 {
        return Err(NameError(format!(
            "parent \"{}\" must be `collection/id` pairs such as `projects/p/locations/l`",
            truncated(parent)
        )));
    }
    check_parent(&segments, false)
}

/// Checks an operation id (one segment).
pub fn check_id(id: &str) -> Result<(), NameError> {
    check_segment(id)?;
    if id == "-" {
        return Err(NameError(
            "\"-\" is reserved as a wildcard and cannot be an operation id".into(),
        ));
    }
    Ok(())
}

/// Parses the `name` of a List request: the parent (`projects/p`), the
/// collection (`projects/p/operations`, or `operations` alone for bare
/// names), with `-` allowed as an id segment of the parent; a lone `-` (or
/// `-/operations`) is every operation at every depth.
pub fn parse_list_target(name: &str) -> Result<ParentPattern, NameError> {
    if name.is_empty() {
        return Err(NameError(
            "the name of the operations collection is required, e.g. `operations`, `projects/p/locations/l`, or `-` for every operation".into(),
        ));
    }
    if name == "-" || name == "-/operations" {
        return Ok(ParentPattern::everything());
    }
    let mut segments = split(name, "collection name")?;
    if segments.len() % 2 == 1 {
        if segments.last() != Some(&OPERATIONS) {
            return Err(NameError(format!(
                "\"{}\" is neither a parent (`collection/id` pairs) nor its `operations` collection",
                truncated(name)
            )));
        }
        segments.pop();
    }
    check_parent(&segments, true)?;
    Ok(ParentPattern::new(
        segments.into_iter().map(str::to_owned).collect(),
    ))
}

fn split<'a>(name: &'a str, what: &str) -> Result<Vec<&'a str>, NameError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameError(format!(
            "the {what} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    let segments: Vec<&str> = name.split('/').collect();
    for segment in &segments {
        check_segment(segment)
            .map_err(|e| NameError(format!("{e} (in \"{}\")", truncated(name))))?;
    }
    Ok(segments)
}

fn check_parent(segments: &[&str], wildcards: bool) -> Result<(), NameError> {
    for pair in segments.chunks(2) {
        if pair[0] == OPERATIONS {
            return Err(NameError(
                "`operations` cannot be a collection inside the parent".into(),
            ));
        }
        if pair[0] == "-" {
            return Err(NameError(
                "\"-\" may stand for an id, not for a collection".into(),
            ));
        }
        if !wildcards && pair[1] == "-" {
            return Err(NameError(
                "\"-\" is a wildcard, accepted only in the name of a List request".into(),
            ));
        }
    }
    Ok(())
}

fn check_segment(segment: &str) -> Result<(), NameError> {
    if segment.is_empty() {
        return Err(NameError("name segments must not be empty".into()));
    }
    if segment == "." || segment == ".." {
        return Err(NameError(format!(
            "\"{segment}\" is not allowed as a name segment"
        )));
    }
    if let Some(bad) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-')))
    {
        return Err(NameError(format!(
            "the character {bad:?} is not allowed in names (allowed: A-Z a-z 0-9 . _ ~ -)"
        )));
    }
    Ok(())
}

/// Keeps messages short when a client sends a huge name.
fn truncated(s: &str) -> &str {
    let mut end = s.len().min(128);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_bare_and_nested_names() {
        for name in [
            "operations/abc",
            "projects/p/operations/1",
            "projects/p/locations/us-east1/operations/op.1_~x",
            "organizations/o/operations/operations",
        ] {
            assert_eq!(OperationName::parse(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_malformed_names() {
        for name in [
            "",
            "operations",
            "operations/",
            "/operations/a",
            "projects/p/operations",
            "projects/operations/a",
            "projects/p/x/operations/a",
            "operations/a/operations/b",
            "projects/p/operations/..",
            "projects/./operations/a",
            "projects/p/operations/a b",
            "projects/p/operations/%2F",
            "projects/-/operations/a",
            "operations/-",
            "operations/é",
        ] {
            assert!(OperationName::parse(name).is_err(), "{name:?} was accepted");
        }
        let long = format!("operations/{}", "a".repeat(MAX_NAME_LEN));
        assert!(OperationName::parse(&long).is_err());
    }

    #[test]
    fn list_targets_accept_parent_or_collection() {
        let a = parse_list_target("projects/p/locations/l").unwrap();
        let b = parse_list_target("projects/p/locations/l/operations").unwrap();
        assert_eq!(a, b);
        assert_eq!(parse_list_target("operations").unwrap().as_string(), "");
        assert!(parse_list_target("projects/p/locations/-")
            .unwrap()
            .has_wildcard());
        assert!(parse_list_target("-").unwrap().is_everything());
        assert!(parse_list_target("-/operations").unwrap().is_everything());
        for bad in [
            "",
            "projects",
            "projects/p/locations",
            "-/p",
            "operations/x",
        ] {
            assert!(parse_list_target(bad).is_err(), "{bad:?} was accepted");
        }
    }

    fn segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._~-]{1,12}".prop_filter("reserved", |s| s != "." && s != ".." && s != "-")
    }

    fn collection() -> impl Strategy<Value = String> {
        segment().prop_filter("operations collection", |s| s != OPERATIONS)
    }

    proptest! {
        #[test]
        fn built_names_parse_back(
            pairs in proptest::collection::vec((collection(), segment()), 0..4),
            id in segment(),
        ) {
            let parent = pairs.iter().map(|(c, i)| format!("{c}/{i}")).collect::<Vec<_>>().join("/");
            let name = OperationName::new(&parent, &id).unwrap();
            prop_assert_eq!(crate::store::parent_of(name.as_str()), parent.as_str());
            prop_assert_eq!(OperationName::parse(name.as_str()).unwrap(), name.clone());
            let target = parse_list_target(if parent.is_empty() { "operations" } else { &parent }).unwrap();
            prop_assert!(target.matches_parent(&parent));
            prop_assert!(name.as_str().starts_with(&target.key_prefix()));
        }

        #[test]
        fn arbitrary_strings_never_panic(s in "\\PC{0,64}") {
            let _ = OperationName::parse(&s);
            let _ = parse_list_target(&s);
            let _ = check_parent_name(&s);
        }

        #[test]
        fn accepted_names_are_canonical(s in "[a-z/.-]{0,24}") {
            if let Ok(name) = OperationName::parse(&s) {
                prop_assert!(!name.as_str().contains("//"));
                prop_assert!(name.as_str().split('/').all(|seg| !seg.is_empty() && seg != "." && seg != ".."));
                let parent = crate::store::parent_of(name.as_str());
                prop_assert!(check_parent_name(parent).is_ok());
            }
        }
    }
}
