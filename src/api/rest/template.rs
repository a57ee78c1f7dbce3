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
//! `*` matches one segment, `**` zero or more (at most once per template,
//! anywhere, so `/v1/{name=**/operations/*}` works), a variable without `=`
//! is `{var=*}`. The server's own default routes also use a version segment,
//! `{version}` (written `$version` to [`Template::parse_default`]): `v`,
//! digits, then optionally `alpha` or `beta` and digits (`v1`, `v2beta`,
//! `v1beta1`, `v1alpha`); service-config files cannot use it. A path is split on `/` before decoding,
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
    /// An API version: `v1`, `v2beta`, `v1beta1`, `v1alpha`, ...
    Version,
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
        Self::parse_with(template, false)
    }

    /// Parses one of the server's own default templates, where a `$version`
    /// segment matches any API version (shown as `{version}`).
    pub fn parse_default(template: &str) -> Result<Self, TemplateError> {
        let mut parsed = Self::parse_with(template, true)?;
        parsed.source = template.replace("$version", "{version}");
        Ok(parsed)
    }

    fn parse_with(template: &str, versions: bool) -> Result<Self, TemplateError> {
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
                    segments.push(parse_segment(part, false).map_err(|r| fail(&r))?);
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
                segments.push(parse_segment(part, versions).map_err(|r| fail(&r))?);
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
        if segments
            .iter()
            .filter(|s| **s == Segment::DoubleStar)
            .count()
            > 1
        {
            return Err(fail("'**' may appear only once"));
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

    /// Whether the template has a `**` (it then matches paths of many lengths).
    pub fn has_double_star(&self) -> bool {
        self.double_star().is_some()
    }

    /// Where the `**` is, if any.
    fn double_star(&self) -> Option<usize> {
        self.segments.iter().position(|s| *s == Segment::DoubleStar)
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
        let star = self.double_star();
        // The path segment where template segment `t` starts: segments after
        // a `**` are counted from the end, the `**` takes what is between.
        let extra = match star {
            Some(_) if count + 1 >= n => count + 1 - n,
            Some(_) => return None,
            None if count == n => 0,
            None => return None,
        };
        let at = |t: usize| match star {
            Some(d) if t > d => t - 1 + extra,
            _ => t,
        };
        for (t, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Literal(literal) => {
                    if !decodes_to(part(at(t)), literal) {
                        return None;
                    }
                }
                Segment::Star => {
                    if part(at(t)).is_empty() {
                        return None;
                    }
                }
                Segment::Version => {
                    if !is_version(part(at(t))) {
                        return None;
                    }
                }
                Segment::DoubleStar => {
                    if (t..t + extra).any(|i| part(i).is_empty()) {
                        return None;
                    }
                }
            }
        }
        let mut values = Vec::new();
        for variable in &self.variables {
            // The path range the variable covers: its first segment's start
            // to its last segment's end.
            let start = at(variable.start);
            let end = at(variable.end - 1)
                + if star == Some(variable.end - 1) {
                    extra
                } else {
                    1
                };
            let value = if variable.end - variable.start == 1 && !self.has_double_star_in(variable)
            {
                decode(part(start))
            } else {
                decode_segments((start..end).map(part))
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

fn parse_segment(part: &str, versions: bool) -> Result<Segment, String> {
    match part {
        "" => Err("empty segment".into()),
        "*" => Ok(Segment::Star),
        "**" => Ok(Segment::DoubleStar),
        "$version" if versions => Ok(Segment::Version),
        literal if literal.chars().all(is_literal_char) => Ok(Segment::Literal(literal.to_owned())),
        other => Err(format!("{other:?} is not a valid segment")),
    }
}

/// `v` + digits + optionally `alpha` or `beta` and digits: `v1`, `v2beta`,
/// `v1beta1`, `v1alpha`, `v1p1beta1` is not one.
fn is_version(segment: &str) -> bool {
    let Some(rest) = segment.strip_prefix('v') else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return false;
    }
    let rest = &rest[digits..];
    let rest = match rest
        .strip_prefix("alpha")
        .or_else(|| rest.strip_prefix("beta"))
    {
        Some(after) => after,
        None => return rest.is_empty(),
    };
    rest.bytes().all(|b| b.is_ascii_digit())
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
    fn a_double_star_inside_takes_what_lies_between() {
        let get = "/v1/{name=**/operations/*}";
        assert_eq!(
            one(get, "/v1/operations/a").as_deref(),
            Some("operations/a")
        );
        assert_eq!(
            one(get, "/v1/projects/p/locations/l/operations/a").as_deref(),
            Some("projects/p/locations/l/operations/a")
        );
        assert_eq!(one(get, "/v1/projects/p/operations"), None);
        assert_eq!(one(get, "/v1/projects//p/operations/a"), None);
        let list = "/v1/{name=**}/operations";
        assert_eq!(
            one(list, "/v1/projects/p/operations").as_deref(),
            Some("projects/p")
        );
        // `**` matches zero segments too; `*/**` at least one.
        assert_eq!(one(list, "/v1/operations").as_deref(), Some(""));
        assert_eq!(one("/v1/{name=*/**}/operations", "/v1/operations"), None);
        assert_eq!(
            one(
                "/v1/{name=*/**}/operations",
                "/v1/projects/p/locations/l/operations"
            )
            .as_deref(),
            Some("projects/p/locations/l")
        );
        assert_eq!(one(list, "/v1/-/operations").as_deref(), Some("-"));
        assert_eq!(
            one(list, "/v1/a%2Fb/c/operations").as_deref(),
            Some("a%2Fb/c")
        );
    }

    #[test]
    fn version_segments_match_google_api_versions() {
        let t = Template::parse_default("/$version/{name=**/operations/*}:cancel").unwrap();
        assert_eq!(t.to_string(), "/{version}/{name=**/operations/*}:cancel");
        for version in [
            "v1", "v2", "v1beta1", "v2beta", "v1alpha", "v3alpha2", "v10",
        ] {
            let path = format!("/{version}/projects/p/operations/x:cancel");
            assert_eq!(
                t.matches(&path).map(|r| r.unwrap()),
                Some(vec![("name".into(), "projects/p/operations/x".into())]),
                "{version}"
            );
        }
        for not in [
            "v",
            "1",
            "vbeta",
            "v1gamma",
            "v1beta1x",
            "V1",
            "v1p1beta1",
            "x1",
        ] {
            let path = format!("/{not}/projects/p/operations/x:cancel");
            assert_eq!(t.matches(&path).map(|r| r.unwrap()), None, "{not}");
        }
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
            "/v1/**/{name=**}",
            "/$version/x",
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
        fn parsing_and_matching_never_panic(template in "[/{}=*:a-z.%$]{0,24}", path in "[/:a-z%0-9]{0,24}") {
            if let Ok(t) = Template::parse(&template) {
                let _ = t.matches(&path);
            }
            if let Ok(t) = Template::parse_default(&template) {
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
