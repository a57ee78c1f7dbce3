//! List filters as data: what a store must select.
//!
//! The registry parses AIP-160 text into a [`Filter`]; a store evaluates it
//! while it scans in key order, before pagination. In-process stores call
//! [`Filter::matches`], the reference evaluator; the PostgreSQL store will
//! translate the same tree to SQL, and differential tests hold both to the
//! same answers.

use std::time::SystemTime;

use super::StoredRecord;

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
}
