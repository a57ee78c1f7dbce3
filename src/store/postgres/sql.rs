//! List queries in SQL: the AIP-160 filter tree ([`Filter`]) and the parent
//! pattern become a parameterised `WHERE`, never SQL text built from user
//! input: every value is a bind parameter, and the SQL text depends only on
//! the filter's shape.
//!
//! The translation must select exactly what [`Filter::matches`] selects
//! (a differential property test holds them together), so:
//!
//! - every restriction is wrapped in `COALESCE(…, FALSE)`, so `NOT` never
//!   meets SQL's NULL (an unset field does not match, even with `!=`);
//! - times are compared as (seconds, nanoseconds) pairs, exactly as
//!   `SystemTime` compares them (`timestamptz` keeps only microseconds);
//! - names are `text COLLATE "C"` (byte order, as the in-memory stores
//!   order them) and patterns use `starts_with`, `right` and `strpos`,
//!   never `LIKE`, whose `%` and `_` a value could contain;
//! - a grant's name pattern ([`Restriction::Granted`]) is a POSIX regular
//!   expression over `'/' || name`, built from validated segments
//!   ([`crate::store::filter::NamePattern::to_regex`]) and bound as a
//!   parameter;
//! - type URLs are `bytea` (a worker may send any string, NUL included),
//!   compared bytewise;
//! - a page examines at most `scan_budget` records in name order, as the
//!   in-memory scan does, and stops on the same record.

use std::time::{Duration, SystemTime};

use tokio_postgres::types::{ToSql, Type};

use crate::store::{
    filter::{AnyField, Filter, Op, Part, Pattern, Restriction, TimeField},
    ListQuery, ParentPattern,
};

/// Bind parameters collected while the SQL text is written.
#[derive(Default)]
pub(super) struct Params {
    values: Vec<(Box<dyn ToSql + Sync + Send>, Type)>,
}

impl Params {
    /// Adds a value; returns its placeholder.
    fn push<T: ToSql + Sync + Send + 'static>(&mut self, value: T, ty: Type) -> String {
        self.values.push((Box::new(value), ty));
        format!("${}", self.values.len())
    }

    /// The parameters as `query_typed` takes them.
    pub(super) fn typed(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        self.values
            .iter()
            .map(|(value, ty)| (&**value as &(dyn ToSql + Sync), ty.clone()))
            .collect()
    }
}

/// A time as (whole seconds since the epoch, nanoseconds 0..1e9), the pair
/// that orders exactly as `SystemTime` does.
pub(super) fn split_time(at: SystemTime) -> (i64, i32) {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos() as i32,
        ),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, (1_000_000_000 - n) as i32),
            }
        }
    }
}

/// A deadline as nanoseconds since the epoch (saturating: about ±292 years
/// around 1970 are exact).
pub(super) fn nanos(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos())
            .map(|n| -n)
            .unwrap_or(i64::MIN),
    }
}

/// The time [`nanos`] stands for.
pub(super) fn from_nanos(nanos: i64) -> SystemTime {
    if nanos >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
    }
}

fn op_sql(op: Op) -> &'static str {
    match op {
        Op::Eq => "=",
        Op::Ne => "<>",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
    }
}

/// `filter` as a boolean SQL expression over `opsd_operations`, never NULL.
pub(super) fn filter(filter: &Filter, params: &mut Params) -> String {
    let join = |all: &[Filter], params: &mut Params, op: &str, empty: &str| {
        if all.is_empty() {
            return empty.to_owned();
        }
        let parts: Vec<String> = all.iter().map(|f| self::filter(f, params)).collect();
        format!("({})", parts.join(op))
    };
    match filter {
        Filter::And(all) => join(all, params, " AND ", "TRUE"),
        Filter::Or(any) => join(any, params, " OR ", "FALSE"),
        Filter::Not(inner) => format!("(NOT {})", self::filter(inner, params)),
        Filter::Test(test) => format!("COALESCE({}, FALSE)", restriction(test, params)),
    }
}

fn negate_if(op: Op, hit: String) -> String {
    if op == Op::Ne {
        format!("(NOT {hit})")
    } else {
        hit
    }
}

fn restriction(test: &Restriction, params: &mut Params) -> String {
    match test {
        Restriction::Done(op, value) => {
            format!("done {} {}", op_sql(*op), params.push(*value, Type::BOOL))
        }
        Restriction::Name(op, pattern) => negate_if(*op, text_pattern("name", pattern, params)),
        Restriction::ErrorCode(op, code) => format!(
            "(error_code IS NOT NULL AND error_code::int8 {} {})",
            op_sql(*op),
            params.push(*code, Type::INT8)
        ),
        Restriction::Present(Part::Error) => "error_code IS NOT NULL".into(),
        Restriction::Present(Part::Response) => "response_type IS NOT NULL".into(),
        Restriction::Present(Part::Metadata) => "metadata_type IS NOT NULL".into(),
        Restriction::TypeUrl(field, op, pattern) => {
            let column = match field {
                AnyField::Metadata => "metadata_type",
                AnyField::Response => "response_type",
            };
            let hit = negate_if(*op, bytes_pattern(column, pattern, params));
            format!("({column} IS NOT NULL AND {hit})")
        }
        Restriction::Time(field, op, at) => {
            let (secs, nanos) = match field {
                TimeField::CreateTime => ("create_s", "create_ns"),
                TimeField::UpdateTime => ("update_s", "update_ns"),
            };
            let (s, n) = split_time(*at);
            format!(
                "({secs} IS NOT NULL AND ({secs}, {nanos}) {} ({}, {}))",
                op_sql(*op),
                params.push(s, Type::INT8),
                params.push(n, Type::INT4)
            )
        }
        Restriction::Granted(pattern) => {
            format!(
                "('/' || name) ~ {}",
                params.push(pattern.to_regex(), Type::TEXT)
            )
        }
    }
}

/// `*` patterns over a text column (names: never NUL, so a pattern with a
/// NUL matches nothing).
fn text_pattern(column: &str, pattern: &Pattern, params: &mut Params) -> String {
    if pattern.text.contains('\0') {
        return "FALSE".into();
    }
    let text = pattern.text.clone();
    match (pattern.prefix_wildcard, pattern.suffix_wildcard) {
        (false, false) => format!("{column} = {}", params.push(text, Type::TEXT)),
        _ if text.is_empty() => "TRUE".into(),
        (true, false) => {
            let p = params.push(text, Type::TEXT);
            format!("right({column}, char_length({p})) = {p}")
        }
        (false, true) => format!("starts_with({column}, {})", params.push(text, Type::TEXT)),
        (true, true) => format!("strpos({column}, {}) > 0", params.push(text, Type::TEXT)),
    }
}

/// `*` patterns over a bytea column, bytewise.
fn bytes_pattern(column: &str, pattern: &Pattern, params: &mut Params) -> String {
    let bytes = pattern.text.as_bytes().to_vec();
    match (pattern.prefix_wildcard, pattern.suffix_wildcard) {
        (false, false) => format!("{column} = {}", params.push(bytes, Type::BYTEA)),
        _ if bytes.is_empty() => "TRUE".into(),
        (true, false) => {
            let p = params.push(bytes, Type::BYTEA);
            format!(
                "(length({column}) >= length({p}) AND \
                 substring({column} from length({column}) - length({p}) + 1) = {p})"
            )
        }
        (false, true) => {
            let p = params.push(bytes, Type::BYTEA);
            format!("substring({column} from 1 for length({p})) = {p}")
        }
        (true, true) => format!(
            "position({} in {column}) > 0",
            params.push(bytes, Type::BYTEA)
        ),
    }
}

/// Whether the record's parent matches the pattern (AIP-159 `-` segments),
/// as [`ParentPattern::matches_parent`] decides it.
fn parent(pattern: &ParentPattern, params: &mut Params) -> String {
    if pattern.is_everything() {
        return "TRUE".to_owned();
    }
    let segments = pattern.segments();
    if !pattern.has_wildcard() {
        return format!("parent = {}", params.push(pattern.as_string(), Type::TEXT));
    }
    let slashes = i32::try_from(segments.len() - 1).unwrap_or(i32::MAX);
    let mut parts = vec![format!(
        "parent <> '' AND length(parent) - length(replace(parent, '/', '')) = {}",
        params.push(slashes, Type::INT4)
    )];
    for (i, segment) in segments.iter().enumerate() {
        if segment != "-" {
            let at = i32::try_from(i + 1).unwrap_or(i32::MAX);
            parts.push(format!(
                "split_part(parent, '/', {}) = {}",
                params.push(at, Type::INT4),
                params.push(segment.clone(), Type::TEXT)
            ));
        }
    }
    format!("({})", parts.join(" AND "))
}

/// The smallest string above every string that starts with `prefix`
/// (`None`: there is none, or the prefix is empty).
pub(super) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// One page of a [`ListQuery`]: the records examined in name order (at
/// most `scan_budget`), numbered, with whether each is a hit; returned are
/// the hits and the budget's last record, at most `limit + 1` rows.
///
/// Columns: `name`, `revision`, `request_id`, `record`, `hit`, `pos`.
pub(super) fn list(query: &ListQuery, params: &mut Params) -> String {
    let prefix = query.parent.key_prefix();
    let mut range = Vec::new();
    match &query.after {
        Some(after) if after.as_str() >= prefix.as_str() => {
            range.push(format!("name > {}", params.push(after.clone(), Type::TEXT)));
        }
        _ if prefix.is_empty() => {}
        _ => range.push(format!(
            "name >= {}",
            params.push(prefix.clone(), Type::TEXT)
        )),
    }
    if let Some(end) = prefix_end(&prefix) {
        range.push(format!("name < {}", params.push(end, Type::TEXT)));
    }
    let range = if range.is_empty() {
        "TRUE".to_owned()
    } else {
        range.join(" AND ")
    };
    let mut hit = parent(&query.parent, params);
    if let Some(f) = &query.filter {
        hit = format!("{hit} AND {}", filter(f, params));
    }
    let budget = i64::try_from(query.scan_budget.max(1)).unwrap_or(i64::MAX);
    let budget = params.push(budget, Type::INT8);
    let rows = i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX);
    let rows = params.push(rows, Type::INT8);
    format!(
        "SELECT name, revision, request_id, record, hit, pos FROM ( \
           SELECT name, revision, request_id, record, hit, \
             row_number() OVER (ORDER BY name) AS pos FROM ( \
             SELECT name, revision, request_id, record, COALESCE({hit}, FALSE) AS hit \
             FROM opsd_operations WHERE {range} ORDER BY name LIMIT {budget} \
           ) examined \
         ) numbered \
         WHERE hit OR pos = {budget} ORDER BY name LIMIT {rows}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_split_in_the_order_of_system_times() {
        let at = |secs: i64, nanos: u32| {
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::new(secs as u64, nanos)
            } else {
                SystemTime::UNIX_EPOCH - Duration::new((-secs) as u64, 0) + Duration::new(0, nanos)
            }
        };
        assert_eq!(split_time(at(5, 7)), (5, 7));
        assert_eq!(split_time(at(-5, 0)), (-5, 0));
        assert_eq!(split_time(at(-5, 250)), (-5, 250));
        let times = [
            at(-3, 10),
            at(-3, 0),
            at(-2, 999_999_999),
            at(0, 0),
            at(0, 1),
            at(9, 0),
        ];
        for a in times {
            for b in times {
                assert_eq!(a.cmp(&b), split_time(a).cmp(&split_time(b)), "{a:?} {b:?}");
            }
            assert_eq!(from_nanos(nanos(a)), a);
        }
    }

    #[test]
    fn prefix_ends_bound_every_name_under_the_prefix() {
        assert_eq!(
            prefix_end("projects/p/operations/").as_deref(),
            Some("projects/p/operations0")
        );
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }

    #[test]
    fn values_become_parameters_never_sql() {
        let evil = "x'; DROP TABLE opsd_operations; --";
        let f = Filter::And(vec![
            Filter::Test(Restriction::Name(Op::Eq, Pattern::new(&format!("{evil}*")))),
            Filter::Not(Box::new(Filter::Test(Restriction::TypeUrl(
                AnyField::Metadata,
                Op::Ne,
                Pattern::new(evil),
            )))),
        ]);
        let mut params = Params::default();
        let sql = filter(&f, &mut params);
        assert!(!sql.contains("DROP"), "{sql}");
        assert_eq!(params.typed().len(), 2);
    }
}
