//! `ListOperations`: targets, filters, page sizes and page tokens.
//!
//! Listing is keyset pagination over the store's name order: a page token
//! carries the last name returned, so a page costs the same however deep the
//! walk is, and operations created or deleted during a walk do not shift the
//! others. The filter is applied in the store, before the page is cut, and a
//! page examines at most `scan_budget` records (a selective filter over a
//! large store then returns a short page and a token, never a long stall).
//!
//! Tokens are opaque to clients: URL-safe base64 of a version, an expiry,
//! the last name and an HMAC-SHA256 tag (16 bytes) over all of it and over
//! the request's `name` and `filter`, keyed with the store's secret (or
//! `--page-token-key-file`). Forged, truncated, foreign, expired or
//! mismatched tokens are INVALID_ARGUMENT, never data.
//!
//! With auth on, the server's authorization hands each List a
//! [`Visibility`]: the name patterns the caller may list. They join the
//! filter the store evaluates (OR-ed, AND-ed with the caller's filter), so
//! nothing the caller may not see is ever read into a page, and a page
//! token is bound to the caller too (another caller's token is
//! INVALID_ARGUMENT).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

use super::{expired, filter, name::parse_list_target, operation, OperationName, Record, Registry};
use crate::{
    error::Error,
    store::{
        filter::{Filter, NamePattern, Restriction},
        ListQuery, ParentPattern,
    },
};

/// The page size used when the request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page size; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: usize = 1000;

const TOKEN_VERSION: u8 = 2;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 8;

/// A List request as the protocol faces receive it.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    pub name: String,
    pub filter: String,
    pub page_size: i32,
    pub page_token: String,
    /// What the caller may see (`None`: everything, auth off).
    pub visibility: Option<Visibility>,
}

/// What one caller may see: operations whose names match one of its
/// patterns. The server's authorization builds it from the caller's
/// grants; the registry applies it to List, the change follower and worker
/// streams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Visibility {
    /// Who the caller is: page tokens are bound to it.
    pub caller: String,
    /// The names the caller may see.
    pub names: Vec<NamePattern>,
}

impl Visibility {
    /// Whether the caller may see `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.names.iter().any(|p| p.matches(name))
    }

    /// `filter`, restricted to what the caller may see.
    pub(super) fn restrict(
        visibility: Option<&Self>,
        filter: Option<Arc<Filter>>,
    ) -> Option<Arc<Filter>> {
        let Some(visibility) = visibility else {
            return filter;
        };
        let granted = Filter::Or(
            visibility
                .names
                .iter()
                .map(|p| Filter::Test(Restriction::Granted(p.clone())))
                .collect(),
        );
        Some(Arc::new(match filter {
            Some(filter) => Filter::And(vec![granted, Filter::clone(&filter)]),
            None => granted,
        }))
    }
}

/// One page of operations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListPage {
    pub records: Vec<Record>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// Signs and checks page tokens.
#[derive(Clone)]
pub(super) struct PageTokens {
    key: [u8; 32],
    ttl: Duration,
}

impl PageTokens {
    pub(super) fn new(key: [u8; 32], ttl: Duration) -> Self {
        Self { key, ttl }
    }

    fn tag(&self, header: &[u8], binding: &str, last: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"opsd page token\0");
        mac.update(header);
        mac.update(&(binding.len() as u64).to_be_bytes());
        mac.update(binding.as_bytes());
        mac.update(last.as_bytes());
        mac
    }

    fn encode(&self, binding: &str, last: &str, now: SystemTime) -> String {
        let expiry = (now + self.ttl)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut raw = Vec::with_capacity(HEADER_LEN + last.len() + TAG_LEN);
        raw.push(TOKEN_VERSION);
        raw.extend_from_slice(&expiry.to_be_bytes());
        let tag = self.tag(&raw, binding, last).finalize().into_bytes();
        raw.extend_from_slice(last.as_bytes());
        raw.extend_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn decode(
        &self,
        token: &str,
        binding: &str,
        parent: &ParentPattern,
        now: SystemTime,
    ) -> Result<String, Error> {
        let invalid = |why: &str| {
            Error::invalid(
                "page_token",
                format!("{why}; pass the next_page_token of the previous page unchanged, with the same name and filter"),
            )
        };
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid("the page token is malformed"))?;
        if raw.len() <= HEADER_LEN + TAG_LEN || raw[0] != TOKEN_VERSION {
            return Err(invalid("the page token is malformed"));
        }
        let (body, tag) = raw.split_at(raw.len() - TAG_LEN);
        let (header, last) = body.split_at(HEADER_LEN);
        let last = std::str::from_utf8(last).map_err(|_| invalid("the page token is malformed"))?;
        self.tag(header, binding, last)
            .verify_truncated_left(tag)
            .map_err(|_| invalid("the page token is not valid for this listing"))?;
        let expiry = u64::from_be_bytes(header[1..].try_into().expect("8 bytes"));
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(expiry);
        if expiry <= now {
            return Err(invalid(
                "the page token has expired; start the listing again",
            ));
        }
        // The last key examined may lie outside the parent pattern (a scan
        // budget can stop on any key under the prefix); the tag vouches for it.
        let in_listing =
            OperationName::parse(last).is_ok() && last.starts_with(&parent.key_prefix());
        if !in_listing {
            return Err(invalid("the page token is malformed"));
        }
        Ok(last.to_owned())
    }
}

/// What a token is bound to: the listing's parent and its filter, and the
/// caller when auth is on.
fn binding(parent: &ParentPattern, filter: &str, visibility: Option<&Visibility>) -> String {
    match visibility {
        None => format!("{}\0{}", parent.as_string(), filter),
        Some(v) => format!("{}\0{}\0{}", parent.as_string(), filter, v.caller),
    }
}

impl Registry {
    /// Lists the operations under a parent, in name order.
    pub async fn list(&self, request: ListRequest) -> Result<ListPage, Error> {
        let parent = parse_list_target(&request.name).map_err(|e| e.for_field("name"))?;
        let limit = page_size(request.page_size)?;
        let visibility = request.visibility.as_ref();
        let filter =
            Visibility::restrict(visibility, filter::parse(&request.filter)?.map(Arc::new));
        let binding = binding(&parent, &request.filter, visibility);
        let now = self.now();
        let tokens = &self.shared.page_tokens;
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(tokens.decode(&request.page_token, &binding, &parent, now)?)
        };

        let settings = &self.shared.settings;
        let scan = self
            .store()
            .list(&ListQuery {
                parent,
                after,
                limit,
                filter,
                scan_budget: settings.list_scan_budget,
            })
            .await?;
        let mut page = ListPage::default();
        let mut bytes = 0;
        let mut cut_after = None;
        let mut last_examined = String::new();
        for stored in scan.records {
            let record = Record::from_stored(stored)?;
            let op = operation(&record);
            // Field tag and length prefix of the repeated entry.
            let len = op.encoded_len() + 8;
            if bytes > 0 && bytes + len > settings.max_page_bytes {
                cut_after = Some(last_examined.clone());
                break;
            }
            bytes += len;
            last_examined.clone_from(&record.name);
            if !expired(&record, now) {
                page.records.push(record);
            }
        }
        if let Some(last) = cut_after.or(scan.resume_after) {
            page.next_page_token = tokens.encode(&binding, &last, now);
        }
        Ok(page)
    }
}

/// The number of records a page holds for a requested `page_size`.
fn page_size(requested: i32) -> Result<usize, Error> {
    match requested {
        n if n < 0 => Err(Error::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pattern(s: &str) -> ParentPattern {
        parse_list_target(s).unwrap()
    }

    fn tokens() -> PageTokens {
        PageTokens::new([7; 32], Duration::from_secs(3 * 24 * 3600))
    }

    #[test]
    fn page_size_rules() {
        assert_eq!(page_size(0).unwrap(), DEFAULT_PAGE_SIZE);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(5000).unwrap(), MAX_PAGE_SIZE);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_the_listing() {
        let now = SystemTime::now();
        let p = pattern("projects/p");
        let b = binding(&p, "", None);
        let token = tokens().encode(&b, "projects/p/operations/x", now);
        assert_eq!(
            tokens().decode(&token, &b, &p, now).unwrap(),
            "projects/p/operations/x"
        );
        let q = pattern("projects/q");
        assert!(tokens()
            .decode(&token, &binding(&q, "", None), &q, now)
            .is_err());
        assert!(tokens()
            .decode(&token, &binding(&p, "done = true", None), &p, now)
            .is_err());
        // Another caller.
        let alice = Visibility {
            caller: "alice".into(),
            names: vec!["**".parse().unwrap()],
        };
        let bob = Visibility {
            caller: "bob".into(),
            ..alice.clone()
        };
        let token = tokens().encode(
            &binding(&p, "", Some(&alice)),
            "projects/p/operations/x",
            now,
        );
        assert!(tokens()
            .decode(&token, &binding(&p, "", Some(&alice)), &p, now)
            .is_ok());
        assert!(tokens()
            .decode(&token, &binding(&p, "", Some(&bob)), &p, now)
            .is_err());
        assert!(tokens().decode(&token, &b, &p, now).is_err());
        let token = tokens().encode(&b, "projects/p/operations/x", now);
        // Another server key.
        let other = PageTokens::new([8; 32], Duration::from_secs(60));
        assert!(other.decode(&token, &b, &p, now).is_err());
        // Expired.
        let later = now + Duration::from_secs(3 * 24 * 3600 + 1);
        let err = tokens()
            .decode(&token, &b, &p, later)
            .unwrap_err()
            .to_string();
        assert!(err.contains("expired"), "{err}");
    }

    proptest! {
        #[test]
        fn mutated_tokens_are_all_invalid(flip in 0usize..200, bit in 0u8..8, cut in 0usize..200, swap in 0usize..200) {
            let now = SystemTime::now();
            let p = pattern("projects/p");
            let b = binding(&p, "", None);
            let token = tokens().encode(&b, "projects/p/operations/x", now);
            let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();

            let mut flipped = raw.clone();
            let i = flip % flipped.len();
            flipped[i] ^= 1 << bit;
            prop_assert!(tokens().decode(&URL_SAFE_NO_PAD.encode(&flipped), &b, &p, now).is_err());

            let truncated = &token[..cut % token.len()];
            prop_assert!(tokens().decode(truncated, &b, &p, now).is_err());

            // Other base64 alphabets and padding.
            let standard = base64::engine::general_purpose::STANDARD.encode(&raw);
            if standard != token {
                prop_assert!(tokens().decode(&standard, &b, &p, now).is_err());
            }
            let padded = format!("{token}=");
            prop_assert!(tokens().decode(&padded, &b, &p, now).is_err());

            // Swapped segments.
            let j = swap % raw.len();
            let mut swapped = raw[j..].to_vec();
            swapped.extend_from_slice(&raw[..j]);
            if swapped != raw {
                prop_assert!(tokens().decode(&URL_SAFE_NO_PAD.encode(&swapped), &b, &p, now).is_err());
            }
        }
    }
}
