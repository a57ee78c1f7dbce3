//! `ListOperations`: targets, page sizes and page tokens.
//!
//! Listing is keyset pagination over the store's name order: a page token
//! carries the last name returned, so a page costs the same however deep the
//! walk is, and operations created or deleted during a walk do not shift the
//! others. Tokens are opaque to clients: versioned, URL-safe base64, and bound
//! to the request's `name` and `filter` by a digest, so a token from another
//! listing is refused as INVALID_ARGUMENT. (Signing with a server key and an
//! expiry are the next step; see the README.)

use std::hash::{DefaultHasher, Hash, Hasher};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use prost::Message;

use super::{expired, name::parse_list_target, operation, OperationName, Registry};
use crate::{
    error::Error,
    pb::google::longrunning::Operation,
    store::{parent_of, ListQuery, ParentPattern},
};

/// The page size used when the request asks for 0.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The largest page size; larger requests are clamped to it.
pub const MAX_PAGE_SIZE: usize = 1000;

const TOKEN_VERSION: u8 = 1;
const DIGEST_LEN: usize = 8;

/// A List request as the protocol faces receive it.
#[derive(Clone, Debug, Default)]
pub struct ListRequest {
    pub name: String,
    pub filter: String,
    pub page_size: i32,
    pub page_token: String,
}

/// One page of operations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListPage {
    pub operations: Vec<Operation>,
    /// Empty on the last page.
    pub next_page_token: String,
}

impl Registry {
    /// Lists the operations under a parent, in name order.
    pub async fn list(&self, request: ListRequest) -> Result<ListPage, Error> {
        let parent =
            parse_list_target(&request.name).map_err(|e| Error::invalid_name("name", e))?;
        if !request.filter.trim().is_empty() {
            return Err(Error::Unimplemented {
                reason: "FILTER_NOT_SUPPORTED",
                message: "Filtering is not supported yet: send an empty filter and select operations on the client.".to_owned(),
            });
        }
        let limit = page_size(request.page_size)?;
        let binding = binding(&parent, &request.filter);
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(decode_token(&request.page_token, binding, &parent)?)
        };

        let records = self
            .store()
            .list(&ListQuery {
                parent,
                after,
                limit: limit + 1,
            })
            .await?;
        let now = std::time::SystemTime::now();
        let max_bytes = self.shared.settings.max_page_bytes;
        let mut page = ListPage::default();
        let mut bytes = 0;
        let mut taken = 0;
        for record in records.iter().take(limit) {
            let op = operation(record);
            // Field tag and length prefix of the repeated entry.
            let len = op.encoded_len() + 8;
            if taken > 0 && bytes + len > max_bytes {
                break;
            }
            bytes += len;
            taken += 1;
            if !expired(record, now) {
                page.operations.push(op);
            }
        }
        if taken < records.len() {
            page.next_page_token = encode_token(binding, &records[taken - 1].name);
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

/// The digest that binds a token to one listing.
fn binding(parent: &ParentPattern, filter: &str) -> [u8; DIGEST_LEN] {
    let mut hasher = DefaultHasher::new();
    parent.as_string().hash(&mut hasher);
    filter.hash(&mut hasher);
    hasher.finish().to_be_bytes()
}

fn encode_token(binding: [u8; DIGEST_LEN], last: &str) -> String {
    let mut raw = Vec::with_capacity(1 + DIGEST_LEN + last.len());
    raw.push(TOKEN_VERSION);
    raw.extend_from_slice(&binding);
    raw.extend_from_slice(last.as_bytes());
    URL_SAFE_NO_PAD.encode(raw)
}

fn decode_token(
    token: &str,
    binding: [u8; DIGEST_LEN],
    parent: &ParentPattern,
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
    if raw.len() <= 1 + DIGEST_LEN || raw[0] != TOKEN_VERSION {
        return Err(invalid("the page token is malformed"));
    }
    if raw[1..1 + DIGEST_LEN] != binding {
        return Err(invalid("the page token belongs to another listing"));
    }
    let last = String::from_utf8(raw[1 + DIGEST_LEN..].to_vec())
        .map_err(|_| invalid("the page token is malformed"))?;
    let in_listing = OperationName::parse(&last).is_ok()
        && last.starts_with(&parent.key_prefix())
        && parent.matches_parent(parent_of(&last));
    if !in_listing {
        return Err(invalid("the page token is malformed"));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pattern(s: &str) -> ParentPattern {
        parse_list_target(s).unwrap()
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
        let p = pattern("projects/p");
        let token = encode_token(binding(&p, ""), "projects/p/operations/x");
        assert_eq!(
            decode_token(&token, binding(&p, ""), &p).unwrap(),
            "projects/p/operations/x"
        );
        let q = pattern("projects/q");
        assert!(decode_token(&token, binding(&q, ""), &q).is_err());
        assert!(decode_token(&token, binding(&p, "done"), &p).is_err());
    }

    proptest! {
        #[test]
        fn mangled_tokens_are_refused(flip in 0usize..64, bit in 0u8..8, cut in 0usize..64) {
            let p = pattern("projects/p");
            let b = binding(&p, "");
            let token = encode_token(b, "projects/p/operations/x");
            let mut raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
            let i = flip % raw.len();
            raw[i] ^= 1 << bit;
            let flipped = URL_SAFE_NO_PAD.encode(&raw);
            // A flip in the name part may still name an operation of this
            // parent; it must then decode to that name and nothing else.
            if let Ok(last) = decode_token(&flipped, b, &p) {
                prop_assert!(i > DIGEST_LEN);
                prop_assert!(last.starts_with("projects/p/operations/"));
            }
            let truncated = &token[..cut.min(token.len())];
            if truncated.len() < token.len() - "x".len() {
                prop_assert!(decode_token(truncated, b, &p).is_err());
            }
        }
    }
}
