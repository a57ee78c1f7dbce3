//! The AIP-160 filter language of ListOperations, parsed into a store
//! [`Filter`].
//!
//! Grammar (AIP-160; `OR` binds tighter than `AND`, juxtaposition is `AND`):
//!
//! ```text
//! filter      : [expression]
//! expression  : sequence {AND sequence}
//! sequence    : factor {factor}
//! factor      : term {OR term}
//! term        : [NOT | -] simple
//! simple      : restriction | "(" expression ")"
//! restriction : field comparator value
//! comparator  : = | != | < | <= | > | >= | :
//! ```
//!
//! Fields: `done` (`=`, `!=`; `true`/`false`), `name` (`=`, `!=`; `*` wildcards
//! at either end), `error.code` (all comparisons; a number or a google.rpc.Code
//! name), `error:*`, `response:*`, `metadata:*` (presence), `metadata.@type`
//! and `response.@type` (`=`, `!=`, wildcards; the full type URL),
//! `create_time` and `update_time` (all comparisons; RFC 3339, quoted when it
//! has a UTC offset or time). Traversal into an unset `error`, `response` or
//! `metadata` does not match, even with `!=`. At most 4 KiB and 32 levels of
//! nesting. Anything else is INVALID_ARGUMENT with `BadRequest{field:
//! "filter"}` and the position of the problem.

use std::{str::FromStr, time::SystemTime};

use crate::{
    error::Error,
    pb::google::rpc,
    store::filter::{AnyField, Filter, Op, Part, Pattern, Restriction, TimeField},
};

/// The longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;
/// The deepest nesting of parentheses and negations accepted.
pub const MAX_DEPTH: usize = 32;

/// Parses a filter; an empty or blank one is `None` (everything).
pub fn parse(text: &str) -> Result<Option<Filter>, Error> {
    if text.len() > MAX_FILTER_LEN {
        return Err(invalid(format!(
            "the filter is {} bytes long; the limit is {MAX_FILTER_LEN}",
            text.len()
        )));
    }
    let tokens = lex(text)?;
    if tokens.is_empty() {
        return Ok(None);
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
        len: text.len(),
    };
    let filter = parser.expression()?;
    if let Some(token) = parser.peek() {
        return Err(parser.unexpected(token, "AND, OR or the end of the filter"));
    }
    Ok(Some(filter))
}

fn invalid(message: String) -> Error {
    Error::invalid("filter", message)
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    LParen,
    RParen,
    Minus,
    Comparator(&'static str),
    /// A quoted string.
    Str(String),
    /// An unquoted word (field, keyword, number, `*`, …).
    Word(String),
}

#[derive(Clone, Debug)]
struct Token {
    kind: Kind,
    at: usize,
    text: String,
}

fn is_word_char(c: char, digit_start: bool) -> bool {
    !(c.is_whitespace() || "()\"'=<>!".contains(c) || (c == ':' && !digit_start))
}

fn lex(text: &str) -> Result<Vec<Token>, Error> {
    let mut tokens = Vec::new();
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        let (at, c) = chars[i];
        let next = chars.get(i + 1).map(|(_, c)| *c);
        let token = |kind: Kind, len: usize| Token {
            kind,
            at,
            text: text[at..chars.get(i + len).map_or(text.len(), |(p, _)| *p)].to_owned(),
        };
        match c {
            c if c.is_whitespace() => {
                i += 1;
            }
            '(' => {
                tokens.push(token(Kind::LParen, 1));
                i += 1;
            }
            ')' => {
                tokens.push(token(Kind::RParen, 1));
                i += 1;
            }
            '-' if next.is_some_and(|n| n == '(' || n.is_ascii_alphabetic() || n == '_') => {
                tokens.push(token(Kind::Minus, 1));
                i += 1;
            }
            '=' => {
                tokens.push(token(Kind::Comparator("="), 1));
                i += 1;
            }
            ':' => {
                tokens.push(token(Kind::Comparator(":"), 1));
                i += 1;
            }
            '!' if next == Some('=') => {
                tokens.push(token(Kind::Comparator("!="), 2));
                i += 2;
            }
            '<' | '>' => {
                let (op, len) = match (c, next) {
                    ('<', Some('=')) => ("<=", 2),
                    ('>', Some('=')) => (">=", 2),
                    ('<', _) => ("<", 1),
                    _ => (">", 1),
                };
                tokens.push(token(Kind::Comparator(op), len));
                i += len;
            }
            '"' | '\'' => {
                let mut value = String::new();
                let mut j = i + 1;
                loop {
                    let Some(&(_, d)) = chars.get(j) else {
                        return Err(invalid(format!(
                            "unterminated string starting at position {at}"
                        )));
                    };
                    j += 1;
                    match d {
                        '\\' => {
                            let Some(&(_, e)) = chars.get(j) else {
                                return Err(invalid(format!(
                                    "unterminated string starting at position {at}"
                                )));
                            };
                            j += 1;
                            value.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                other => other,
                            });
                        }
                        d if d == c => break,
                        d => value.push(d),
                    }
                }
                tokens.push(token(Kind::Str(value), j - i));
                i = j;
            }
            '!' => {
                return Err(invalid(format!(
                    "unexpected '!' at position {at}: did you mean != or NOT?"
                )))
            }
            _ => {
                let digit_start = c.is_ascii_digit();
                let mut j = i;
                while j < chars.len() && is_word_char(chars[j].1, digit_start) {
                    j += 1;
                }
                let end = chars.get(j).map_or(text.len(), |(p, _)| *p);
                tokens.push(Token {
                    kind: Kind::Word(text[at..end].to_owned()),
                    at,
                    text: text[at..end].to_owned(),
                });
                i = j;
            }
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
    len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn is_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token { kind: Kind::Word(w), .. }) if w == word)
    }

    fn unexpected(&self, token: &Token, expected: &str) -> Error {
        invalid(format!(
            "unexpected {:?} at position {}: expected {expected}",
            token.text, token.at
        ))
    }

    fn end(&self, expected: &str) -> Error {
        invalid(format!(
            "the filter ends at position {} where {expected} should follow",
            self.len
        ))
    }

    fn expression(&mut self) -> Result<Filter, Error> {
        let mut all = vec![self.sequence()?];
        while self.is_word("AND") {
            self.at += 1;
            all.push(self.sequence()?);
        }
        Ok(flatten(all, Filter::And))
    }

    fn sequence(&mut self) -> Result<Filter, Error> {
        let mut all = vec![self.factor()?];
        // Juxtaposition is AND: another term may follow directly.
        while let Some(token) = self.peek() {
            let starts_term = match &token.kind {
                Kind::LParen | Kind::Minus | Kind::Str(_) => true,
                Kind::Word(w) => w != "AND" && w != "OR",
                Kind::RParen | Kind::Comparator(_) => false,
            };
            if !starts_term {
                break;
            }
            all.push(self.factor()?);
        }
        Ok(flatten(all, Filter::And))
    }

    fn factor(&mut self) -> Result<Filter, Error> {
        let mut any = vec![self.term()?];
        while self.is_word("OR") {
            self.at += 1;
            any.push(self.term()?);
        }
        Ok(flatten(any, Filter::Or))
    }

    fn term(&mut self) -> Result<Filter, Error> {
        let negated = self.is_word("NOT")
            || matches!(
                self.peek(),
                Some(Token {
                    kind: Kind::Minus,
                    ..
                })
            );
        if negated {
            self.at += 1;
        }
        self.enter()?;
        let inner = if negated { self.term() } else { self.simple() };
        self.depth -= 1;
        let inner = inner?;
        Ok(if negated {
            Filter::Not(Box::new(inner))
        } else {
            inner
        })
    }

    fn enter(&mut self) -> Result<(), Error> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            let at = self.peek().map_or(self.len, |t| t.at);
            return Err(invalid(format!(
                "the filter nests deeper than {MAX_DEPTH} levels at position {at}"
            )));
        }
        Ok(())
    }

    fn simple(&mut self) -> Result<Filter, Error> {
        let Some(token) = self.peek().cloned() else {
            return Err(self.end("a field comparison or '('"));
        };
        match &token.kind {
            Kind::LParen => {
                self.at += 1;
                let inner = self.expression()?;
                match self.peek() {
                    Some(Token {
                        kind: Kind::RParen, ..
                    }) => {
                        self.at += 1;
                        Ok(inner)
                    }
                    Some(other) => Err(self.unexpected(other, "')'")),
                    None => Err(self.end("')'")),
                }
            }
            Kind::Word(field) if !matches!(field.as_str(), "AND" | "OR" | "NOT") => {
                self.at += 1;
                self.restriction(field, &token)
            }
            _ => Err(self.unexpected(&token, "a field comparison or '('")),
        }
    }

    fn restriction(&mut self, field: &str, field_token: &Token) -> Result<Filter, Error> {
        let Some(Token {
            kind: Kind::Comparator(op),
            ..
        }) = self.peek().cloned()
        else {
            return Err(invalid(format!(
                "{field:?} at position {} must be compared to a value (e.g. done = true); bare values are not supported",
                field_token.at
            )));
        };
        self.at += 1;
        let Some(value) = self.peek().cloned() else {
            return Err(self.end("a value"));
        };
        let raw = match &value.kind {
            Kind::Str(s) => Value::Str(s.clone()),
            Kind::Word(w) => Value::Word(w.clone()),
            _ => return Err(self.unexpected(&value, "a value")),
        };
        self.at += 1;
        typed(field, field_token.at, op, raw, value.at).map(Filter::Test)
    }
}

enum Value {
    Str(String),
    Word(String),
}

impl Value {
    fn text(&self) -> &str {
        match self {
            Value::Str(s) | Value::Word(s) => s,
        }
    }
}

/// Folds a one-element list into its element.
fn flatten(mut items: Vec<Filter>, wrap: fn(Vec<Filter>) -> Filter) -> Filter {
    if items.len() == 1 {
        items.remove(0)
    } else {
        wrap(items)
    }
}

const FIELDS: &str = "done, name, error.code, error, response, metadata, metadata.@type, response.@type, create_time, update_time";

fn typed(
    field: &str,
    at: usize,
    op: &str,
    value: Value,
    value_at: usize,
) -> Result<Restriction, Error> {
    let bad_op = |allowed: &str| {
        invalid(format!(
            "{field} at position {at} does not support '{op}'; use {allowed}"
        ))
    };
    let bad_value = |expected: &str| {
        invalid(format!(
            "{:?} at position {value_at} is not {expected} (for {field})",
            value.text()
        ))
    };
    let equality = || match op {
        "=" => Ok(Op::Eq),
        "!=" => Ok(Op::Ne),
        _ => Err(bad_op("= or !=")),
    };
    let ordering = || match op {
        "=" => Ok(Op::Eq),
        "!=" => Ok(Op::Ne),
        "<" => Ok(Op::Lt),
        "<=" => Ok(Op::Le),
        ">" => Ok(Op::Gt),
        ">=" => Ok(Op::Ge),
        _ => Err(bad_op("=, !=, <, <=, > or >=")),
    };
    let presence = |part: Part| {
        if op != ":" {
            return Err(bad_op(&format!("{field}:*")));
        }
        if value.text() != "*" {
            return Err(bad_value("'*' (presence)"));
        }
        Ok(Restriction::Present(part))
    };
    match field {
        "done" => {
            let op = equality()?;
            let value = match &value {
                Value::Word(w) if w == "true" => true,
                Value::Word(w) if w == "false" => false,
                _ => return Err(bad_value("true or false")),
            };
            Ok(Restriction::Done(op, value))
        }
        "name" => Ok(Restriction::Name(equality()?, Pattern::new(value.text()))),
        "error.code" => {
            let op = ordering()?;
            let text = value.text();
            let code = text
                .parse::<i64>()
                .ok()
                .or_else(|| rpc::Code::from_str_name(text).map(|c| c as i64))
                .ok_or_else(|| bad_value("a number or a google.rpc.Code name"))?;
            Ok(Restriction::ErrorCode(op, code))
        }
        "error" => presence(Part::Error),
        "response" => presence(Part::Response),
        "metadata" => presence(Part::Metadata),
        "metadata.@type" => Ok(Restriction::TypeUrl(
            AnyField::Metadata,
            equality()?,
            Pattern::new(value.text()),
        )),
        "response.@type" => Ok(Restriction::TypeUrl(
            AnyField::Response,
            equality()?,
            Pattern::new(value.text()),
        )),
        "create_time" | "update_time" => {
            let op = ordering()?;
            let at = prost_types::Timestamp::from_str(value.text())
                .ok()
                .and_then(|t| SystemTime::try_from(t).ok())
                .ok_or_else(|| {
                    bad_value("an RFC 3339 timestamp such as \"2026-01-02T15:04:05Z\"")
                })?;
            let which = if field == "create_time" {
                TimeField::CreateTime
            } else {
                TimeField::UpdateTime
            };
            Ok(Restriction::Time(which, op, at))
        }
        other => Err(invalid(format!(
            "unknown field {other:?} at position {at}; filterable fields: {FIELDS}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ok(text: &str) -> Filter {
        parse(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .unwrap()
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Err(Error::InvalidArgument { field, description }) => {
                assert_eq!(field, "filter");
                description
            }
            other => panic!("{text:?} parsed: {other:?}"),
        }
    }

    fn done(value: bool) -> Filter {
        Filter::Test(Restriction::Done(Op::Eq, value))
    }

    fn code(op: Op, code: i64) -> Filter {
        Filter::Test(Restriction::ErrorCode(op, code))
    }

    #[test]
    fn or_binds_tighter_than_and() {
        assert_eq!(
            ok("done = true AND error.code = 1 OR error.code = 2"),
            Filter::And(vec![
                done(true),
                Filter::Or(vec![code(Op::Eq, 1), code(Op::Eq, 2)])
            ])
        );
        // Juxtaposition is AND.
        assert_eq!(
            ok("done = true error.code > 3"),
            Filter::And(vec![done(true), code(Op::Gt, 3)])
        );
    }

    #[test]
    fn negation_and_parentheses() {
        assert_eq!(ok("NOT done = true"), Filter::Not(Box::new(done(true))));
        assert_eq!(ok("-done = true"), Filter::Not(Box::new(done(true))));
        assert_eq!(
            ok("-(done = false OR error:*)"),
            Filter::Not(Box::new(Filter::Or(vec![
                done(false),
                Filter::Test(Restriction::Present(Part::Error))
            ])))
        );
        assert_eq!(ok("error.code = CANCELLED"), code(Op::Eq, 1));
        assert_eq!(ok("error.code >= -1"), code(Op::Ge, -1));
    }

    #[test]
    fn values_of_every_field() {
        ok(r#"name = "projects/p/*""#);
        ok("name != *-42");
        ok(r#"metadata.@type = "type.googleapis.com/acme.Progress""#);
        ok(r#"response.@type = "*Empty""#);
        ok("response:* AND metadata:*");
        ok(
            r#"create_time > "2026-01-02T15:04:05Z" AND update_time <= "2026-01-02T15:04:05-04:00""#,
        );
        ok("create_time >= 2026-01-02T15:04:05Z");
        assert!(parse("").unwrap().is_none());
        assert!(parse("   ").unwrap().is_none());
    }

    #[test]
    fn mistakes_are_pointed_at() {
        assert!(err("colour = red").contains("unknown field \"colour\" at position 0"));
        assert!(err("done = maybe").contains("position 7"));
        assert!(err("done > true").contains("does not support '>'"));
        assert!(err("(done = true").contains("')'"));
        assert!(err("done = true)").contains("position 11"));
        assert!(err("done").contains("bare values"));
        assert!(err("done =").contains("a value"));
        assert!(err("name = \"open").contains("unterminated"));
        assert!(err("error:5").contains("presence"));
        assert!(err("create_time > yesterday").contains("RFC 3339"));
        assert!(err("AND done = true").contains("position 0"));
        assert!(err("done = true AND").contains("ends at position 15"));
        assert!(err("done ! true").contains("'!'"));
        assert!(err(&format!("name = \"{}\"", "x".repeat(MAX_FILTER_LEN))).contains("limit"));
        let deep = format!("{}done = true{}", "(".repeat(40), ")".repeat(40));
        assert!(err(&deep).contains("deeper than 32"));
        let nots = format!("{}done = true", "NOT ".repeat(40));
        assert!(err(&nots).contains("deeper than 32"));
    }

    /// Replays the fuzz corpus (tests/fuzz/corpus/filter) through the parser.
    #[test]
    fn the_fuzz_corpus_parses_without_panicking() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/corpus/filter");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            if let Ok(text) = std::str::from_utf8(&bytes) {
                let _ = parse(text);
            }
            replayed += 1;
        }
        assert!(replayed >= 10, "the corpus at {} is missing", dir.display());
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,80}") {
            let _ = parse(&text);
        }

        #[test]
        fn filter_like_text_never_panics(text in "[ ()=!<>:\"a-z._@*0-9ANDORNT-]{0,60}") {
            let _ = parse(&text);
        }
    }
}
