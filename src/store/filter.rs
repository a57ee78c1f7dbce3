//! List filters as data: what a store must select.
//!
//! The registry parses AIP-160 text into a [`Filter`]; a store evaluates it
//! while it scans in key order, before pagination. In-process stores call
//! [`Filter::matches`], the reference evaluator; the PostgreSQL store will
//! translate the same tree to SQL, and differential tests hold both to the
//! same answers.
//!
//! Besides AIP-160's restrictions, the tree has one node no filter text can
//! write: [`Restriction::Granted`], a [`NamePattern`] of whole segments. The
//! server's authorization turns a caller's grants into such nodes, OR-ed
//! and AND-ed with the caller's filter, so a listing selects only what the
//! caller may see before the page is cut.

use std::time::SystemTime;

use super::{ParentPattern, StoredRecord};

/// A filter expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
    Test(Restriction),
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn holds<T: PartialOrd>(self, left: &T, right: &T) -> bool {
        match self {
            Op::Eq => left == right,
            Op::Ne => left != right,
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Gt => left > right,
            Op::Ge => left >= right,
        }
    }
}

/// A string pattern: `*` at the start and/or end is a wildcard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    pub text: String,
    pub prefix_wildcard: bool,
    pub suffix_wildcard: bool,
}

impl Pattern {
    /// Parses `*abc`, `abc*`, `*abc*` or `abc`.
    pub fn new(raw: &str) -> Self {
        let prefix_wildcard = raw.starts_with('*');
        let rest = raw.strip_prefix('*').unwrap_or(raw);
        let suffix_wildcard = rest.ends_with('*') && !rest.is_empty();
        let text = if suffix_wildcard {
            &rest[..rest.len() - 1]
        } else {
            rest
        };
        Self {
            text: text.to_owned(),
            prefix_wildcard,
            suffix_wildcard,
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match (self.prefix_wildcard, self.suffix_wildcard) {
            (false, false) => value == self.text,
            (true, false) => value.ends_with(&self.text),
            (false, true) => value.starts_with(&self.text),
            (true, true) => value.contains(&self.text),
        }
    }
}

/// The optional parts of an operation a presence test (`:*`) looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Error,
    Response,
    Metadata,
}

/// The `Any`s whose `@type` a filter can test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyField {
    Metadata,
    Response,
}

/// The timestamps a filter can compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeField {
    CreateTime,
    UpdateTime,
}

/// One test on one field.
#[derive(Clone, Debug, PartialEq)]
pub enum Restriction {
    /// `done = true`, `done != false` (only `=` and `!=`).
    Done(Op, bool),
    /// `name = "projects/p/*"` (only `=` and `!=`).
    Name(Op, Pattern),
    /// `error.code = 5`, `error.code >= 10`; no match without an error.
    ErrorCode(Op, i64),
    /// `error:*`, `response:*`, `metadata:*`.
    Present(Part),
    /// `metadata.@type = "*acme.Progress"` (only `=` and `!=`), matched
    /// against the full type URL; no match when the field is unset.
    TypeUrl(AnyField, Op, Pattern),
    /// `create_time > "2026-01-01T00:00:00Z"`.
    Time(TimeField, Op, SystemTime),
    /// The name matches a pattern of whole segments (a caller's grant).
    Granted(NamePattern),
}

/// One segment of a [`NamePattern`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// Exactly this segment.
    Literal(String),
    /// `*`: any one segment.
    One,
    /// `**`: any number of segments, none included.
    Any,
}

/// A name pattern by whole segments: `projects/a/**`, `projects/*/operations/*`.
/// `*` is one segment and `**` any number of them, so `projects/a/**` never
/// matches `projects/ab/...`. Literal segments follow the operation name
/// rules (`[A-Za-z0-9._~-]`, never `.` or `..`), so a pattern compares with
/// names as they are stored, after parsing, with no decoding left to do.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamePattern {
    segments: Vec<Segment>,
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            match segment {
                Segment::Literal(text) => f.write_str(text)?,
                Segment::One => f.write_str("*")?,
                Segment::Any => f.write_str("**")?,
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for NamePattern {
    type Err = String;

    /// Parses `projects/a/**`; segments are `*`, `**` or name segments.
    fn from_str(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("a name pattern cannot be empty (`**` matches every name)".into());
        }
        let segments = text
            .split('/')
            .map(|segment| match segment {
                "*" => Ok(Segment::One),
                "**" => Ok(Segment::Any),
                "" => Err(format!("{text:?} has an empty segment")),
                "." | ".." => Err(format!("{text:?}: `.` and `..` are not name segments")),
                literal
                    if literal
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b)) =>
                {
                    Ok(Segment::Literal(literal.to_owned()))
                }
                other => Err(format!(
                    "{text:?}: segment {other:?} is neither `*`, `**` nor made of [A-Za-z0-9._~-]"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { segments })
    }
}

impl NamePattern {
    /// The pattern's segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether `name` (a stored, parsed name) matches, segment by segment:
    /// wildcard matching with `**` as the star, backtracking to the last
    /// `**` only (linear in practice, O(segments²) at worst). It runs on
    /// every call with auth on, so it allocates nothing but the segment list.
    pub fn matches(&self, name: &str) -> bool {
        let name: Vec<&str> = name.split('/').collect();
        let pattern = &self.segments;
        let (mut p, mut n) = (0, 0);
        // The last `**` seen, and the name segment its match ends before.
        let mut star: Option<(usize, usize)> = None;
        while n < name.len() {
            match pattern.get(p) {
                Some(Segment::Any) => {
                    star = Some((p, n));
                    p += 1;
                }
                Some(Segment::One) => {
                    p += 1;
                    n += 1;
                }
                Some(Segment::Literal(text)) if text == name[n] => {
                    p += 1;
                    n += 1;
                }
                _ => match star {
                    // The last `**` takes one more segment.
                    Some((at, taken)) => {
                        star = Some((at, taken + 1));
                        p = at + 1;
                        n = taken + 1;
                    }
                    None => return false,
                },
            }
        }
        pattern[p..].iter().all(|s| *s == Segment::Any)
    }

    /// Whether some operation under `parent` (a List target, with its `-`
    /// wildcards) could match: false means a listing of `parent` can show
    /// nothing this pattern grants.
    pub fn overlaps(&self, parent: &ParentPattern) -> bool {
        let mut names: Vec<Segment> = if parent.is_everything() {
            vec![Segment::Any]
        } else {
            parent
                .segments()
                .iter()
                .map(|s| match s.as_str() {
                    "-" => Segment::One,
                    s => Segment::Literal(s.to_owned()),
                })
                .collect()
        };
        names.push(Segment::Literal("operations".to_owned()));
        names.push(Segment::One);
        overlap(&self.segments, &names)
    }

    /// A POSIX regular expression (PostgreSQL's `~`) that matches `'/' ||
    /// name` exactly when [`NamePattern::matches`] matches `name`: each
    /// segment is `/` and the literal, `/[^/]+` for `*`, `(/[^/]+)*` for
    /// `**`, anchored at both ends. Literals hold only `[A-Za-z0-9._~-]`, of
    /// which `.` is the one to escape.
    pub fn to_regex(&self) -> String {
        let mut regex = String::from("^");
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => {
                    regex.push('/');
                    regex.push_str(&text.replace('.', "\\."));
                }
                Segment::One => regex.push_str("/[^/]+"),
                Segment::Any => regex.push_str("(/[^/]+)*"),
            }
        }
        regex.push('$');
        regex
    }
}

/// Whether two segment patterns match a common sequence of segments (a
/// literal-only pattern is a name): a search over pairs of positions, each
/// visited once, so its cost is bounded by the product of the lengths.
fn overlap(a: &[Segment], b: &[Segment]) -> bool {
    let mut seen = vec![false; (a.len() + 1) * (b.len() + 1)];
    let mut todo = vec![(0usize, 0usize)];
    while let Some((i, j)) = todo.pop() {
        let at = i * (b.len() + 1) + j;
        if seen[at] {
            continue;
        }
        seen[at] = true;
        if i == a.len() && j == b.len() {
            return true;
        }
        // `**` may match nothing.
        if a.get(i) == Some(&Segment::Any) {
            todo.push((i + 1, j));
        }
        if b.get(j) == Some(&Segment::Any) {
            todo.push((i, j + 1));
        }
        // Both take one segment.
        if let (Some(x), Some(y)) = (a.get(i), b.get(j)) {
            let common = match (x, y) {
                (Segment::Literal(x), Segment::Literal(y)) => x == y,
                _ => true,
            };
            if common {
                let next_i = if *x == Segment::Any { i } else { i + 1 };
                let next_j = if *y == Segment::Any { j } else { j + 1 };
                todo.push((next_i, next_j));
            }
        }
    }
    false
}

impl Filter {
    /// The reference evaluator.
    pub fn matches(&self, record: &StoredRecord) -> bool {
        match self {
            Filter::And(all) => all.iter().all(|f| f.matches(record)),
            Filter::Or(any) => any.iter().any(|f| f.matches(record)),
            Filter::Not(inner) => !inner.matches(record),
            Filter::Test(restriction) => restriction.matches(record),
        }
    }
}

impl Restriction {
    fn matches(&self, record: &StoredRecord) -> bool {
        let error = record.error();
        let response = record.response();
        match self {
            Restriction::Done(op, value) => op.holds(&record.done(), value),
            Restriction::Name(op, pattern) => {
                let hit = pattern.matches(&record.name);
                if *op == Op::Ne {
                    !hit
                } else {
                    hit
                }
            }
            Restriction::ErrorCode(op, code) => {
                error.is_some_and(|e| op.holds(&i64::from(e.code), code))
            }
            Restriction::Present(Part::Error) => error.is_some(),
            Restriction::Present(Part::Response) => response.is_some(),
            Restriction::Present(Part::Metadata) => record.metadata.is_some(),
            Restriction::TypeUrl(field, op, pattern) => {
                let any = match field {
                    AnyField::Metadata => record.metadata.as_ref(),
                    AnyField::Response => response,
                };
                any.is_some_and(|any| {
                    let hit = pattern.matches(&any.type_url);
                    if *op == Op::Ne {
                        !hit
                    } else {
                        hit
                    }
                })
            }
            Restriction::Time(field, op, at) => {
                let value = match field {
                    TimeField::CreateTime => &record.create_time,
                    TimeField::UpdateTime => &record.update_time,
                };
                // Every stored record has both times; an unreadable one
                // matches nothing.
                value
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .is_some_and(|value| op.holds(&value, at))
            }
            Restriction::Granted(pattern) => pattern.matches(&record.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_prefixes_suffixes_and_infixes() {
        assert!(Pattern::new("projects/p/*").matches("projects/p/operations/x"));
        assert!(!Pattern::new("projects/p/*").matches("projects/q/operations/x"));
        assert!(Pattern::new("*-42").matches("operations/job-42"));
        assert!(Pattern::new("*job*").matches("operations/job-42"));
        assert!(Pattern::new("exact").matches("exact"));
        assert!(!Pattern::new("exact").matches("exactly"));
        assert!(Pattern::new("*").matches("anything"));
    }

    fn name_pattern(text: &str) -> NamePattern {
        text.parse().unwrap()
    }

    #[test]
    fn name_patterns_match_whole_segments() {
        let a = name_pattern("projects/a/**");
        assert!(a.matches("projects/a/operations/x"));
        assert!(a.matches("projects/a/locations/l/operations/x"));
        assert!(!a.matches("projects/ab/operations/x"));
        assert!(!a.matches("projects/b/operations/x"));
        let one = name_pattern("projects/*/operations/*");
        assert!(one.matches("projects/q/operations/x"));
        assert!(!one.matches("projects/q/locations/l/operations/x"));
        assert!(name_pattern("**").matches("operations/x"));
        assert!(name_pattern("**/operations/x").matches("projects/a/operations/x"));
        assert!(!name_pattern("projects/a").matches("projects/a/operations/x"));
        for bad in [
            "",
            "projects//a",
            "projects/../b",
            "projects/./b",
            "projects/a%2Fb",
            "a/b*",
        ] {
            assert!(bad.parse::<NamePattern>().is_err(), "{bad}");
        }
        assert_eq!(
            name_pattern("projects/a.b/**").to_string(),
            "projects/a.b/**"
        );
    }

    #[test]
    fn name_patterns_overlap_list_targets() {
        let parent = |segments: &[&str]| {
            ParentPattern::new(segments.iter().map(|s| (*s).to_owned()).collect())
        };
        let a = name_pattern("projects/a/**");
        assert!(a.overlaps(&parent(&["projects", "a"])));
        assert!(a.overlaps(&parent(&["projects", "-"])));
        assert!(a.overlaps(&parent(&["projects", "a", "locations", "-"])));
        assert!(a.overlaps(&ParentPattern::everything()));
        assert!(!a.overlaps(&parent(&["projects", "ab"])));
        assert!(!a.overlaps(&parent(&[])));
        assert!(name_pattern("**").overlaps(&parent(&[])));
        assert!(!name_pattern("projects/*/operations/*").overlaps(&parent(&[
            "projects",
            "a",
            "locations",
            "l"
        ])));
    }

    proptest::proptest! {
        /// The regular expression PostgreSQL evaluates selects what the
        /// reference matcher selects (checked with the regex crate, whose
        /// syntax agrees with PostgreSQL's on these expressions).
        #[test]
        fn regexes_select_what_patterns_match(
            pattern in proptest::collection::vec(proptest::sample::select(vec!["a", "ab", "a.b", "*", "**", "operations"]), 1..6),
            name in proptest::collection::vec(proptest::sample::select(vec!["a", "ab", "a.b", "aXb", "operations"]), 1..7),
        ) {
            let pattern = name_pattern(&pattern.join("/"));
            let name = name.join("/");
            let regex = regex::Regex::new(&pattern.to_regex()).unwrap();
            proptest::prop_assert_eq!(regex.is_match(&format!("/{name}")), pattern.matches(&name));
            // The matcher agrees with the overlap search on a literal name.
            let literal: NamePattern = name.parse().unwrap();
            proptest::prop_assert_eq!(overlap(&pattern.segments, &literal.segments), pattern.matches(&name));
        }
    }
}
