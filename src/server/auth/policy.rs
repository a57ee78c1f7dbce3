//! Who may do what: the policy file (`--auth-policy`), the principal a
//! call runs as, and the decision for one call.
//!
//! A policy maps subjects (a token's `sub` or `email`, a client
//! certificate's SAN) to grants: name patterns by whole segments
//! ([`NamePattern`]) and the permissions they give there. Every call of
//! opsd's services needs one permission ([`Permission::of_method`]) on what
//! it names ([`Target`]):
//!
//! - an operation (Get, Wait, Cancel, Delete, Update, Complete, the report,
//!   the operation info): a grant with the permission must match the name,
//!   parsed by the registry's own parser first (a name that does not parse
//!   goes on to its handler, which refuses it with INVALID_ARGUMENT);
//! - a listing (List, the console's infos and change feed, a worker's
//!   stream): some grant with the permission must be able to match a name
//!   under the parent, else PERMISSION_DENIED; the call then sees only the
//!   names those grants match ([`Visibility`], applied in the store's query);
//! - a creation: the name the operation will get (`{parent}/operations/{id}`;
//!   with no id, every id: only a grant whose last segment is a wildcard
//!   covers a generated one);
//! - RegisterTypes: any grant with `workers.registerTypes`.
//!
//! A refusal is the same PERMISSION_DENIED, with the same message, whether
//! the operation exists or not, decided before the store is read.

use std::{collections::HashMap, fmt, path::Path, str::FromStr, sync::Arc};

use serde::Deserialize;

use crate::{
    error::{Error, PERMISSION_DENIED},
    pb::{
        google::longrunning::{
            CancelOperationRequest, DeleteOperationRequest, GetOperationRequest,
            ListOperationsRequest, WaitOperationRequest,
        },
        opsd::v1::{
            CompleteOperationRequest, CreateOperationRequest, GetOperationReportRequest,
            RegisterTypesRequest, UpdateOperationRequest, WatchOperationChangesRequest,
            WatchOperationsRequest,
        },
    },
    registry::{check_id, check_parent_name, parse_list_target, OperationName, Visibility},
    store::filter::NamePattern,
};

/// The scope a token must carry unless the policy names another.
pub const DEFAULT_SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// One permission of the policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    OperationsList,
    OperationsGet,
    OperationsWait,
    OperationsCancel,
    OperationsDelete,
    WorkersCreate,
    WorkersUpdate,
    WorkersComplete,
    WorkersWatch,
    WorkersRegisterTypes,
    ReportsGet,
}

impl Permission {
    const ALL: [Permission; 11] = [
        Permission::OperationsList,
        Permission::OperationsGet,
        Permission::OperationsWait,
        Permission::OperationsCancel,
        Permission::OperationsDelete,
        Permission::WorkersCreate,
        Permission::WorkersUpdate,
        Permission::WorkersComplete,
        Permission::WorkersWatch,
        Permission::WorkersRegisterTypes,
        Permission::ReportsGet,
    ];

    /// Its name in the policy file.
    pub fn name(self) -> &'static str {
        match self {
            Permission::OperationsList => "operations.list",
            Permission::OperationsGet => "operations.get",
            Permission::OperationsWait => "operations.wait",
            Permission::OperationsCancel => "operations.cancel",
            Permission::OperationsDelete => "operations.delete",
            Permission::WorkersCreate => "workers.create",
            Permission::WorkersUpdate => "workers.update",
            Permission::WorkersComplete => "workers.complete",
            Permission::WorkersWatch => "workers.watch",
            Permission::WorkersRegisterTypes => "workers.registerTypes",
            Permission::ReportsGet => "reports.get",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    /// The permission a method of opsd's services needs (by its gRPC
    /// method name, as `Observed` knows it).
    pub fn of_method(method: &str) -> Option<Self> {
        Some(match method {
            "ListOperations" | "ListOperationInfos" | "WatchOperationChanges" => {
                Permission::OperationsList
            }
            "GetOperation" | "GetOperationInfo" => Permission::OperationsGet,
            "WaitOperation" => Permission::OperationsWait,
            "CancelOperation" => Permission::OperationsCancel,
            "DeleteOperation" => Permission::OperationsDelete,
            "CreateOperation" => Permission::WorkersCreate,
            "UpdateOperation" => Permission::WorkersUpdate,
            "CompleteOperation" => Permission::WorkersComplete,
            "WatchOperations" => Permission::WorkersWatch,
            "RegisterTypes" => Permission::WorkersRegisterTypes,
            "GetOperationReport" => Permission::ReportsGet,
            _ => return None,
        })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of permissions (a bit each).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Permissions(u16);

impl Permissions {
    pub fn contains(self, permission: Permission) -> bool {
        self.0 & permission.bit() != 0
    }

    fn all() -> Self {
        Self(Permission::ALL.iter().fold(0, |bits, p| bits | p.bit()))
    }
}

impl FromStr for Permissions {
    type Err = String;

    /// One permission, or `operations.*`, `workers.*`, `*`.
    fn from_str(text: &str) -> Result<Self, String> {
        let family = |prefix: &str| {
            Permission::ALL
                .iter()
                .filter(|p| p.name().starts_with(prefix))
                .fold(0, |bits, p| bits | p.bit())
        };
        match text {
            "*" => Ok(Self::all()),
            "operations.*" => Ok(Self(family("operations."))),
            "workers.*" => Ok(Self(family("workers."))),
            "reports.*" => Ok(Self(family("reports."))),
            _ => Permission::ALL
                .iter()
                .find(|p| p.name() == text)
                .map(|p| Self(p.bit()))
                .ok_or_else(|| {
                    format!(
                        "unknown permission {text:?}: expected one of {}, operations.*, workers.*, *",
                        Permission::ALL.map(Permission::name).join(", ")
                    )
                }),
        }
    }
}

/// Name patterns and what they allow there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub names: Vec<NamePattern>,
    pub permissions: Permissions,
}

impl Grant {
    /// Everything, everywhere: what a caller may do without a policy file.
    pub fn everything() -> Self {
        Self {
            names: vec!["**".parse().expect("a valid pattern")],
            permissions: Permissions::all(),
        }
    }
}

/// Who a call runs as: the subject, and the grants the policy gives it.
/// Cloning it is shallow (a request extension).
#[derive(Clone, Debug)]
pub struct Principal {
    /// The token's `sub` (or `email`), or the client certificate's SAN.
    pub subject: Arc<str>,
    pub grants: Arc<[Grant]>,
}

/// What a call names, for its permission check.
#[derive(Debug)]
pub enum Target<'a> {
    /// One operation.
    Name(&'a str),
    /// The operations under a List target (`-` wildcards allowed).
    Listing(&'a str),
    /// The operation a creation makes: parent and (maybe empty) id.
    Create { parent: &'a str, id: &'a str },
    /// A worker's stream: a parent (maybe empty) and names.
    Watch {
        parent: &'a str,
        names: &'a [String],
    },
    /// Nothing in particular (RegisterTypes).
    Anywhere,
}

/// A request of opsd's services, with what it names.
pub trait Targeted {
    fn target(&self) -> Target<'_>;
}

macro_rules! named {
    ($($request:ty => $field:ident),* $(,)?) => {
        $(impl Targeted for $request {
            fn target(&self) -> Target<'_> {
                Target::Name(&self.$field)
            }
        })*
    };
}

named! {
    GetOperationRequest => name,
    DeleteOperationRequest => name,
    CancelOperationRequest => name,
    WaitOperationRequest => name,
    UpdateOperationRequest => name,
    CompleteOperationRequest => name,
    GetOperationReportRequest => name,
}

impl Targeted for ListOperationsRequest {
    fn target(&self) -> Target<'_> {
        Target::Listing(&self.name)
    }
}

impl Targeted for WatchOperationChangesRequest {
    fn target(&self) -> Target<'_> {
        Target::Listing(&self.parent)
    }
}

impl Targeted for CreateOperationRequest {
    fn target(&self) -> Target<'_> {
        Target::Create {
            parent: &self.parent,
            id: &self.operation_id,
        }
    }
}

impl Targeted for WatchOperationsRequest {
    fn target(&self) -> Target<'_> {
        Target::Watch {
            parent: &self.parent,
            names: &self.names,
        }
    }
}

impl Targeted for RegisterTypesRequest {
    fn target(&self) -> Target<'_> {
        Target::Anywhere
    }
}

/// A segment no name can have (braces are not name characters): it
/// stands for an id the registry will generate, so only wildcards match it.
const ANY_ID: &str = "{generated}";

impl Principal {
    /// The name patterns where this principal has `permission`.
    fn patterns(&self, permission: Permission) -> impl Iterator<Item = &NamePattern> {
        self.grants
            .iter()
            .filter(move |g| g.permissions.contains(permission))
            .flat_map(|g| g.names.iter())
    }

    fn may(&self, permission: Permission, name: &str) -> bool {
        self.patterns(permission).any(|p| p.matches(name))
    }

    fn denied(&self, permission: Permission, resource: &str) -> Error {
        Error::PermissionDenied {
            reason: PERMISSION_DENIED,
            message: format!(
                "Permission '{permission}' denied on resource '{resource}' (or it may not exist)."
            ),
            scope: None,
        }
    }

    /// The visibility of a listing under `parent`, or the refusal when no
    /// grant can match a name there.
    fn listing(&self, permission: Permission, parent: &str) -> Result<Visibility, Error> {
        let names: Vec<NamePattern> = self.patterns(permission).cloned().collect();
        if let Ok(pattern) = parse_list_target(parent) {
            if !names.iter().any(|p| p.overlaps(&pattern)) {
                return Err(self.denied(permission, parent));
            }
        }
        Ok(Visibility {
            caller: self.subject.to_string(),
            names,
        })
    }

    /// Decides one call: `Ok` with what a listing may see (`None` for the
    /// other calls), or PERMISSION_DENIED. A name that does not parse is
    /// let through: its handler refuses it with INVALID_ARGUMENT.
    pub fn authorize(
        &self,
        permission: Permission,
        target: Target<'_>,
    ) -> Result<Option<Visibility>, Error> {
        match target {
            Target::Name(name) => {
                if OperationName::parse(name).is_ok() && !self.may(permission, name) {
                    return Err(self.denied(permission, name));
                }
                Ok(None)
            }
            Target::Listing(parent) => self.listing(permission, parent).map(Some),
            Target::Create { parent, id } => {
                if check_parent_name(parent).is_err() || (!id.is_empty() && check_id(id).is_err()) {
                    return Ok(None);
                }
                let id = if id.is_empty() { ANY_ID } else { id };
                let name = if parent.is_empty() {
                    format!("operations/{id}")
                } else {
                    format!("{parent}/operations/{id}")
                };
                if !self.may(permission, &name) {
                    return Err(self.denied(permission, &name));
                }
                Ok(None)
            }
            Target::Watch { parent, names } => {
                let everything = parent.is_empty() && names.is_empty();
                let visibility = self.listing(permission, if everything { "-" } else { parent })?;
                for name in names {
                    if OperationName::parse(name).is_ok() && !visibility.covers(name) {
                        return Err(self.denied(permission, name));
                    }
                }
                Ok(Some(visibility))
            }
            Target::Anywhere => {
                if self.patterns(permission).next().is_none() {
                    return Err(self.denied(permission, "*"));
                }
                Ok(None)
            }
        }
    }
}

/// The policy file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    required_scope: Option<String>,
    #[serde(default)]
    principals: Vec<PrincipalEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrincipalEntry {
    subject: String,
    #[serde(default)]
    grants: Vec<GrantEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantEntry {
    names: Vec<String>,
    permissions: Vec<String>,
}

/// The checked policy: the required scope and each subject's grants.
#[derive(Clone, Debug)]
pub struct Policy {
    pub required_scope: String,
    /// `None`: no policy file, every authenticated caller may do everything.
    subjects: Option<HashMap<String, Arc<[Grant]>>>,
}

impl Default for Policy {
    /// No policy file: the default scope, everything allowed.
    fn default() -> Self {
        Self {
            required_scope: DEFAULT_SCOPE.to_owned(),
            subjects: None,
        }
    }
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses a policy (YAML).
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: PolicyFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        let required_scope = file
            .required_scope
            .unwrap_or_else(|| DEFAULT_SCOPE.to_owned());
        if required_scope.is_empty() || required_scope.contains(' ') {
            return Err(format!(
                "required_scope {required_scope:?} must be one scope, without spaces"
            ));
        }
        let mut subjects = HashMap::new();
        for entry in file.principals {
            if entry.subject.is_empty() {
                return Err("a principal's subject cannot be empty".into());
            }
            let grants = entry
                .grants
                .into_iter()
                .map(|grant| {
                    let names = grant
                        .names
                        .iter()
                        .map(|n| n.parse::<NamePattern>())
                        .collect::<Result<Vec<_>, _>>()?;
                    let permissions = grant
                        .permissions
                        .iter()
                        .map(|p| p.parse::<Permissions>())
                        .collect::<Result<Vec<_>, _>>()?
                        .into_iter()
                        .fold(Permissions::default(), |all, p| Permissions(all.0 | p.0));
                    Ok(Grant { names, permissions })
                })
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| format!("principal {:?}: {e}", entry.subject))?;
            if subjects
                .insert(entry.subject.clone(), grants.into())
                .is_some()
            {
                return Err(format!("principal {:?} is listed twice", entry.subject));
            }
        }
        Ok(Self {
            required_scope,
            subjects: Some(subjects),
        })
    }

    /// The principal for the first of `identities` the policy names (a
    /// token's `sub`, then its `email`; a certificate's SANs in order):
    /// without a policy file, every grant; unknown, none.
    pub fn principal<'a>(&self, identities: impl IntoIterator<Item = &'a str>) -> Principal {
        let mut identities = identities.into_iter().peekable();
        let first: Arc<str> = identities.peek().copied().unwrap_or_default().into();
        let Some(subjects) = &self.subjects else {
            return Principal {
                subject: first,
                grants: Arc::new([Grant::everything()]),
            };
        };
        for identity in identities {
            if let Some(grants) = subjects.get(identity) {
                return Principal {
                    subject: identity.into(),
                    grants: grants.clone(),
                };
            }
        }
        Principal {
            subject: first,
            grants: Arc::new([]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
principals:
  - subject: alice@example.com
    grants:
      - names: ["projects/a/**"]
        permissions: ["operations.get", "operations.list", "operations.wait"]
  - subject: worker-a
    grants:
      - names: ["projects/a/**"]
        permissions: ["workers.*"]
"#;

    fn principal(subject: &str) -> Principal {
        Policy::parse(POLICY).unwrap().principal([subject])
    }

    fn allowed(p: &Principal, method: &str, target: Target<'_>) -> bool {
        p.authorize(Permission::of_method(method).unwrap(), target)
            .is_ok()
    }

    #[test]
    fn the_policy_parses_with_its_defaults() {
        let policy = Policy::parse(POLICY).unwrap();
        assert_eq!(policy.required_scope, DEFAULT_SCOPE);
        assert_eq!(policy.principal(["nobody"]).grants.len(), 0);
        let worker = policy.principal(["x", "worker-a"]);
        assert_eq!(&*worker.subject, "worker-a");
        assert!(worker.grants[0]
            .permissions
            .contains(Permission::WorkersRegisterTypes));
        for bad in [
            "principals: [{subject: a, grants: [{names: ['projects/a/..'], permissions: ['*']}]}]",
            "principals: [{subject: a, grants: [{names: ['a'], permissions: ['operations.frob']}]}]",
            "principals: [{subject: a}, {subject: a}]",
            "required_scope: 'a b'",
            "principal: []",
        ] {
            assert!(Policy::parse(bad).is_err(), "{bad}");
        }
        let open = Policy::default().principal(["anyone"]);
        assert!(allowed(
            &open,
            "DeleteOperation",
            Target::Name("projects/z/operations/x")
        ));
    }

    #[test]
    fn names_are_checked_by_whole_segments() {
        let alice = principal("alice@example.com");
        assert!(allowed(
            &alice,
            "GetOperation",
            Target::Name("projects/a/operations/x")
        ));
        assert!(!allowed(
            &alice,
            "GetOperation",
            Target::Name("projects/ab/operations/x")
        ));
        assert!(!allowed(
            &alice,
            "CancelOperation",
            Target::Name("projects/a/operations/x")
        ));
        // A name that does not parse is the handler's to refuse.
        assert!(allowed(
            &alice,
            "GetOperation",
            Target::Name("projects/a/../b/operations/x")
        ));
        let err = alice
            .authorize(
                Permission::OperationsGet,
                Target::Name("projects/b/operations/x"),
            )
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Permission 'operations.get' denied on resource 'projects/b/operations/x' (or it may not exist)."
        );
    }

    #[test]
    fn listings_need_a_grant_that_can_match_under_the_parent() {
        let alice = principal("alice@example.com");
        assert!(allowed(
            &alice,
            "ListOperations",
            Target::Listing("projects/a")
        ));
        assert!(allowed(
            &alice,
            "ListOperations",
            Target::Listing("projects/-")
        ));
        assert!(allowed(&alice, "ListOperations", Target::Listing("-")));
        assert!(!allowed(
            &alice,
            "ListOperations",
            Target::Listing("projects/ab")
        ));
        assert!(!allowed(
            &alice,
            "ListOperations",
            Target::Listing("operations")
        ));
        let visibility = alice
            .authorize(Permission::OperationsList, Target::Listing("-"))
            .unwrap()
            .unwrap();
        assert_eq!(visibility.caller, "alice@example.com");
        assert!(visibility.covers("projects/a/operations/x"));
        assert!(!visibility.covers("projects/ab/operations/x"));
    }

    #[test]
    fn workers_create_and_watch_under_their_names_only() {
        let worker = principal("worker-a");
        let create = |parent, id| Target::Create { parent, id };
        assert!(allowed(
            &worker,
            "CreateOperation",
            create("projects/a", "")
        ));
        assert!(allowed(
            &worker,
            "CreateOperation",
            create("projects/a", "x")
        ));
        assert!(!allowed(
            &worker,
            "CreateOperation",
            create("projects/ab", "")
        ));
        assert!(!allowed(&worker, "CreateOperation", create("", "")));
        let exact = Policy::parse(
            "principals: [{subject: w, grants: [{names: ['projects/a/operations/x'], permissions: ['workers.create']}]}]",
        )
        .unwrap()
        .principal(["w"]);
        assert!(allowed(
            &exact,
            "CreateOperation",
            create("projects/a", "x")
        ));
        // A generated id is not `x`.
        assert!(!allowed(
            &exact,
            "CreateOperation",
            create("projects/a", "")
        ));
        let watch = |parent, names| Target::Watch { parent, names };
        assert!(allowed(
            &worker,
            "WatchOperations",
            watch("projects/a", &[])
        ));
        assert!(allowed(&worker, "WatchOperations", watch("", &[])));
        assert!(!allowed(
            &worker,
            "WatchOperations",
            watch("projects/b", &[])
        ));
        let other = ["projects/b/operations/x".to_owned()];
        assert!(!allowed(&worker, "WatchOperations", watch("", &other)));
        assert!(allowed(&worker, "RegisterTypes", Target::Anywhere));
        let alice = principal("alice@example.com");
        assert!(!allowed(&alice, "RegisterTypes", Target::Anywhere));
        assert!(!allowed(
            &alice,
            "WatchOperations",
            watch("projects/a", &[])
        ));
        assert!(!allowed(
            &alice,
            "UpdateOperation",
            Target::Name("projects/a/operations/x")
        ));
    }
}
