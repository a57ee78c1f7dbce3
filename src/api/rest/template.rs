//! Path templates of `google.api.http` rules, parsed and matched.
//!
//! The grammar (google/api/http.proto):
//!
//! ```text
//! Template = "/" Segments [ Verb ] ;
//! Segments = Segment { "/" Segment } ;
//! Segment  = "*" | "**" | LITERAL | Variable ;
//! Variable = "{" FieldPath [ "=" Segments ] "}" ;
//! FieldPath = IDENT { "." IDENT } ;
//! Verb     = ":" LITERAL ;
//! ```
//!
//! `*` matches one segment, `**` zero or more (only as the last segment), a
//! variable without `=` is `{var=*}`. A path is split on `/` before decoding,
//! so an encoded `%2F` never splits a segment. A variable of one segment is
//! fully percent-decoded; a variable of several segments is decoded except
//! `%2F`/`%2f`, which stay as they are.

use std::fmt;

use percent_encoding::percent_decode_str;

/// A parsed path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
    source: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Star,
    DoubleStar,
}

/// A variable: a field path bound to segments `start..end` of the template.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Variable {
    field: String,
    start: usize,
    end: usize,
}

/// Why a template could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid path template {template:?}: {reason}")]
pub struct TemplateError {
    template: String,
    reason: String,
}

/// A request path split on `/` once, for matching against many templates.
#[derive(Clone, Debug)]
pub struct SplitPath<'a> {
    /// The segments after the leading `/`, still percent-encoded.
    segments: Vec<&'a str>,
    /// The last segment's text before and after its last `:`, if it has one.
    verb: Option<(&'a str, &'a str)>,
}

impl<'a> SplitPath<'a> {
    /// `None` for a path that does not start with `/`.
    pub fn new(path: &'a str) -> Option<Self> {
        let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        let verb = segments.last().and_then(|last| last.rsplit_once(':'));
        Some(Self { segments, verb })
    }
}

/// Why a path matched a template but its values could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(String);

impl Template {
    /// Parses a template such as `/v1/{name=projects/*/operations/*}:cancel`.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let fail = |reason: &str| TemplateError {
            template: template.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| fail("must start with '/'"))?;
        // The verb follows the last ':' that is outside braces.
        let mut depth = 0i32;
        let mut verb_at = None;
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ':' if depth == 0 => verb_at = Some(i),
                _ => {}
            }
        }
        let (body, verb) = match verb_at {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Some(verb) = verb {
            if verb.is_empty() || !verb.chars().all(is_literal_char) {
                return Err(fail("the verb must be a non-empty literal"));
            }
        }

        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(after) = chars.strip_prefix('{') {
                let close = after.find('}').ok_or_else(|| fail("unclosed '{'"))?;
                let inner = &after[..close];
                if inner.contains('{') {
                    return Err(fail("variables cannot nest"));
                }
                let (field, pattern) = match inner.split_once('=') {
                    Some((field, pattern)) => (field, pattern),
                    None => (inner, "*"),
                };
                let valid_field = !field.is_empty()
                    && field.split('.').all(|part| {
                        part.chars()
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    });
                if !valid_field {
                    return Err(fail(&format!("{field:?} is not a field path")));
                }
                if variables.iter().any(|v: &Variable| v.field == field) {
                    return Err(fail(&format!("field {field:?} is bound twice")));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(parse_segment(part).map_err(|r| fail(&r))?);
                }
                variables.push(Variable {
                    field: field.to_owned(),
                    start,
                    end: segments.len(),
                });
                chars = &after[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                if part.contains('{') || part.contains('}') {
                    return Err(fail("a variable must fill a whole segment"));
                }
                segments.push(parse_segment(part).map_err(|r| fail(&r))?);
                chars = &chars[end..];
            }
            match chars.strip_prefix('/') {
                Some("") => return Err(fail("empty segment")),
                Some(after) => chars = after,
                None if chars.is_empty() => {}
                None => return Err(fail("a variable must fill a whole segment")),
            }
        }
        if segments.is_empty() {
            return Err(fail("no segments"));
        }
        if let Some(i) = segments.iter().position(|s| *s == Segment::DoubleStar) {
            if i != segments.len() - 1 {
                return Err(fail("'**' must be the last segment"));
            }
        }
        Ok(Self {
            segments,
            variables,
            verb: verb.map(str::to_owned),
            source: template.to_owned(),
        })
    }

    /// The field paths this template binds.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.variables.iter().map(|v| v.field.as_str())
    }

    /// Whether the template has a `:verb`.
    pub fn has_verb(&self) -> bool {
        self.verb.is_some()
    }

    /// Whether the template ends in `**`.
    pub fn has_double_star(&self) -> bool {
        self.segments.last() == Some(&Segment::DoubleStar)
    }

    /// The number of literal segments (more is more specific).
    pub fn literal_count(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count()
    }

    /// Matches a raw (still percent-encoded) request path. `None`: no match;
    /// `Some(Err)`: a match whose values do not decode.
    #[cfg(test)]
    pub fn matches(&self, path: &str) -> Option<Result<Vec<(String, String)>, DecodeError>> {
        self.matches_split(&SplitPath::new(path)?)
    }

    /// Matches a raw (still percent-encoded) request path, already split
    /// (once for all routes). `None`: no match; `Some(Err)`: a match whose
    /// values do not decode.
    pub fn matches_split(
        &self,
        path: &SplitPath<'_>,
    ) -> Option<Result<Vec<(String, String)>, DecodeError>> {
        // A verb is the part of the last segment after its last ':'; the
        // rest of that segment stands in for it.
        let last = match &self.verb {
            Some(verb) => {
                let (head, tail) = path.verb?;
                if tail != verb {
                    return None;
                }
                Some(head)
            }
            None => None,
        };
        let count = path.segments.len();
        let part = |i: usize| match last {
            Some(head) if i + 1 == count => head,
            _ => path.segments[i],
        };
        let n = self.segments.len();
        let fixed = if self.has_double_star() { n - 1 } else { n };
        if count < fixed || (!self.has_double_star() && count != n) {
            return None;
        }
        // Which raw segments each template segment covers.
        for (i, segment) in self.segments.iter().enumerate().take(fixed) {
            let part = part(i);
            match segment {
                Segment::Literal(literal) => {
                    if !decodes_to(part, literal) {
                        return None;
                    }
                }
                Segment::Star if part.is_empty() => return None,
                Segment::Star | Segment::DoubleStar => {}
            }
        }
        if self.has_double_star() && (fixed..count).any(|i| part(i).is_empty()) {
            return None;
        }
        let mut values = Vec::new();
        for variable in &self.variables {
            let end = if variable.end == n && self.has_double_star() {
                count
            } else {
                variable.end
            };
            let value = if variable.end - variable.start == 1 && !self.has_double_star_in(variable)
            {
                decode(part(variable.start))
            } else {
                decode_segments((variable.start..end).map(part))
            };
            match value {
                Ok(value) => values.push((variable.field.clone(), value)),
                Err(err) => return Some(Err(err)),
            }
        }
        Some(Ok(values))
    }

    fn has_double_star_in(&self, variable: &Variable) -> bool {
        self.segments[variable.start..variable.end].contains(&Segment::DoubleStar)
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '%')
}

fn parse_segment(part: &str) -> Result<Segment, String> {
    match part {
        "" => Err("empty segment".into()),
        "*" => Ok(Segment::Star),
        "**" => Ok(Segment::DoubleStar),
        literal if literal.chars().all(is_literal_char) => Ok(Segment::Literal(literal.to_owned())),
        other => Err(format!("{other:?} is not a valid segment")),
    }
}

fn decode(segment: &str) -> Result<String, DecodeError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            DecodeError(format!(
                "the path segment {segment:?} is not UTF-8 once decoded"
            ))
        })
}

/// Whether a raw segment percent-decodes to `literal` (without allocating).
fn decodes_to(raw: &str, literal: &str) -> bool {
    if raw.contains('%') {
        percent_decode_str(raw).eq(literal.bytes())
    } else {
        raw == literal
    }
}

/// Decodes the segments of a multi-segment variable and joins them with
/// `/`, keeping each `%2F` encoded.
fn decode_segments<'a>(parts: impl Iterator<Item = &'a str>) -> Result<String, DecodeError> {
    let mut out = String::new();
    for (i, part) in parts.enumerate() {
        if i > 0 {
            out.push('/');
        }
        let mut rest = part;
        while let Some(at) = encoded_slash(rest) {
            out.push_str(&decode(&rest[..at])?);
            out.push_str(&rest[at..at + 3]);
            rest = &rest[at + 3..];
        }
        if rest.contains('%') {
            out.push_str(&decode(rest)?);
        } else {
            out.push_str(rest);
        }
    }
    Ok(out)
}

/// Where the first `%2F` (or `%2f`) of `segment` starts.
fn encoded_slash(segment: &str) -> Option<usize> {
    segment
        .as_bytes()
        .windows(3)
        .position(|w| w[0] == b'%' && w[1] == b'2' && w[2].eq_ignore_ascii_case(&b'f'))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn matched(template: &str, path: &str) -> Option<Vec<(String, String)>> {
        Template::parse(template)
            .unwrap()
            .matches(path)
            .map(|r| r.unwrap())
    }

    fn one(template: &str, path: &str) -> Option<String> {
        matched(template, path).map(|mut v| v.remove(0).1)
    }

    #[test]
    fn google_operations_templates() {
        let get = "/v1/{name=operations/**}";
        assert_eq!(
            one(get, "/v1/operations/a").as_deref(),
            Some("operations/a")
        );
        assert_eq!(
            one(get, "/v1/operations/a/b/c").as_deref(),
            Some("operations/a/b/c")
        );
        assert_eq!(one(get, "/v1/operations").as_deref(), Some("operations"));
        assert_eq!(one(get, "/v1/other/a"), None);
        assert_eq!(one(get, "/v1/operations/a//b"), None);

        let cancel = "/v1/{name=projects/*/locations/*/operations/*}:cancel";
        assert_eq!(
            one(cancel, "/v1/projects/p/locations/l/operations/x:cancel").as_deref(),
            Some("projects/p/locations/l/operations/x")
        );
        assert_eq!(one(cancel, "/v1/projects/p/locations/l/operations/x"), None);
        assert_eq!(
            one(cancel, "/v1/projects/p/locations/l/operations/x:wait"),
            None
        );
        assert_eq!(
            one(cancel, "/v1/projects/p/locations/operations/x:cancel"),
            None
        );

        let list = "/v1/{name=projects/*/locations/*}/operations";
        assert_eq!(
            one(list, "/v1/projects/p/locations/l/operations").as_deref(),
            Some("projects/p/locations/l")
        );
        assert_eq!(
            one("/v1/{name=operations}", "/v1/operations").as_deref(),
            Some("operations")
        );
    }

    #[test]
    fn percent_decoding_follows_http_proto() {
        // One segment: fully decoded (so an encoded '/' becomes '/').
        assert_eq!(one("/v1/{id}", "/v1/a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(one("/v1/{id}", "/v1/a%20b").as_deref(), Some("a b"));
        // Several segments: decoded except %2F.
        assert_eq!(
            one("/v1/{name=operations/**}", "/v1/operations/a%2Fb%41").as_deref(),
            Some("operations/a%2FbA")
        );
        assert_eq!(
            one("/v1/{name=x/*}", "/v1/x/a%2fb").as_deref(),
            Some("x/a%2fb")
        );
        assert!(Template::parse("/v1/{id}")
            .unwrap()
            .matches("/v1/%FF")
            .unwrap()
            .is_err());
    }

    #[test]
    fn several_variables_and_verbs() {
        let got = matched(
            "/v1/{parent=projects/*}/things/{id}:do",
            "/v1/projects/p/things/t:do",
        )
        .unwrap();
        assert_eq!(
            got,
            [
                ("parent".into(), "projects/p".into()),
                ("id".into(), "t".into())
            ]
        );
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "",
            "v1/x",
            "/v1/{name",
            "/v1/{name=**}/x",
            "/v1//x",
            "/v1/x:",
            "/v1/{a}/{a}",
            "/v1/x{name}",
            "/v1/{na me}",
            "/v1/{a={b}}",
            "/v1/a b",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    proptest! {
        #[test]
        fn parsing_and_matching_never_panic(template in "[/{}=*:a-z.%]{0,24}", path in "[/:a-z%0-9]{0,24}") {
            if let Ok(t) = Template::parse(&template) {
                let _ = t.matches(&path);
            }
        }

        #[test]
        fn generated_names_round_trip(ids in proptest::collection::vec("[a-z0-9._~-]{1,8}", 1..4)) {
            let path = format!("/v1/operations/{}", ids.join("/"));
            let name = one("/v1/{name=operations/**}", &path).unwrap();
            prop_assert_eq!(name, format!("operations/{}", ids.join("/")));
        }
    }
}
