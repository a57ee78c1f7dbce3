//! HTTP rules: where the REST routes come from.
//!
//! Three sources, in order of precedence:
//!
//! 1. Google service-config YAML files (`--http-rules FILE`): the `http:
//!    rules:` entries whose selector is a `google.longrunning.Operations`
//!    method, with their `additional_bindings`. The YAML is read into the
//!    `google.api.Http` message through prost-reflect, so every source
//!    shares one shape.
//! 2. The `google.api.http` options of the vendored operations.proto (and
//!    of the worker API's polling report), read from the embedded
//!    descriptor set.
//! 3. Unless `--rest-routes strict`: the URL shapes Google Cloud's APIs use
//!    for their operations, under any version segment ([`google_routes`]),
//!    so the URLs of Google's reference pages work with no configuration.

use std::path::Path;

use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, Value};

use super::template::Template;
use crate::pb::google::api::{http_rule::Pattern, Http, HttpRule};

const SERVICE: &str = "google.longrunning.Operations";
const WORKERS: &str = "opsd.v1.Workers";
const CONSOLE: &str = "opsd.v1.Console";

/// The origin of the default Google Cloud shapes, in logs and errors.
pub const GOOGLE_SHAPES: &str = "Google Cloud URL shapes";

/// The operation URLs of Google Cloud APIs, under any API version (`v1`,
/// `v2beta`, `v1beta1`, ...): what a bare `opsd serve` answers besides
/// operations.proto's own rules.
const GOOGLE_RULES: &[(&str, &str, &str, RestMethod)] = &[
    ("GET", "/$version/{name=operations}", "", RestMethod::List),
    (
        "GET",
        "/$version/{name=*/**}/operations",
        "",
        RestMethod::List,
    ),
    (
        "GET",
        "/$version/{name=**/operations/*}",
        "",
        RestMethod::Get,
    ),
    (
        "DELETE",
        "/$version/{name=**/operations/*}",
        "",
        RestMethod::Delete,
    ),
    (
        "POST",
        "/$version/{name=**/operations/*}:cancel",
        "*",
        RestMethod::Cancel,
    ),
    (
        "POST",
        "/$version/{name=**/operations/*}:wait",
        "*",
        RestMethod::Wait,
    ),
];

/// The methods REST can call: the Operations API, the polling report, and
/// the console's operation infos.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestMethod {
    List,
    Get,
    Delete,
    Cancel,
    Wait,
    Report,
    ListInfos,
    GetInfo,
    /// A server-sent-events stream of changes.
    WatchChanges,
}

impl RestMethod {
    /// The gRPC method's full name.
    pub fn selector(self) -> &'static str {
        match self {
            Self::List => "google.longrunning.Operations.ListOperations",
            Self::Get => "google.longrunning.Operations.GetOperation",
            Self::Delete => "google.longrunning.Operations.DeleteOperation",
            Self::Cancel => "google.longrunning.Operations.CancelOperation",
            Self::Wait => "google.longrunning.Operations.WaitOperation",
            Self::Report => "opsd.v1.Workers.GetOperationReport",
            Self::ListInfos => "opsd.v1.Console.ListOperationInfos",
            Self::GetInfo => "opsd.v1.Console.GetOperationInfo",
            Self::WatchChanges => "opsd.v1.Console.WatchOperationChanges",
        }
    }

    /// Whether a service-config file may map it: only the Operations API
    /// (opsd's own methods keep the routes of their protos).
    fn is_operations(self) -> bool {
        !matches!(
            self,
            Self::Report | Self::ListInfos | Self::GetInfo | Self::WatchChanges
        )
    }

    fn from_selector(selector: &str) -> Option<Self> {
        match selector {
            "opsd.v1.Workers.GetOperationReport" => return Some(Self::Report),
            "opsd.v1.Console.ListOperationInfos" => return Some(Self::ListInfos),
            "opsd.v1.Console.GetOperationInfo" => return Some(Self::GetInfo),
            "opsd.v1.Console.WatchOperationChanges" => return Some(Self::WatchChanges),
            _ => {}
        }
        match selector.strip_prefix(SERVICE)?.strip_prefix('.')? {
            "ListOperations" => Some(Self::List),
            "GetOperation" => Some(Self::Get),
            "DeleteOperation" => Some(Self::Delete),
            "CancelOperation" => Some(Self::Cancel),
            "WaitOperation" => Some(Self::Wait),
            _ => None,
        }
    }

    /// The request message's full name.
    pub fn input_type(self) -> &'static str {
        match self {
            Self::List => "google.longrunning.ListOperationsRequest",
            Self::Get => "google.longrunning.GetOperationRequest",
            Self::Delete => "google.longrunning.DeleteOperationRequest",
            Self::Cancel => "google.longrunning.CancelOperationRequest",
            Self::Wait => "google.longrunning.WaitOperationRequest",
            Self::Report => "opsd.v1.GetOperationReportRequest",
            Self::ListInfos => "google.longrunning.ListOperationsRequest",
            Self::GetInfo => "google.longrunning.GetOperationRequest",
            Self::WatchChanges => "opsd.v1.WatchOperationChangesRequest",
        }
    }
}

/// Where the request body goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BodyRule {
    /// No body; every field not in the path comes from the query.
    None,
    /// The body is the whole request message (`body: "*"`).
    All,
    /// The body is this (top-level) field.
    Field(String),
}

/// One REST route.
#[derive(Clone, Debug)]
pub struct Route {
    pub verb: http::Method,
    pub template: Template,
    pub body: BodyRule,
    pub method: RestMethod,
    /// The method's request type (from the embedded descriptors, which
    /// registered types never change).
    pub input: MessageDescriptor,
    /// Where the rule came from, for logs and errors.
    pub origin: String,
}

/// A rule that could not be turned into a route.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: rule for {selector}: {reason}")]
pub struct RuleError {
    origin: String,
    selector: String,
    reason: String,
}

/// The Google Cloud operation URL shapes under any version segment (see
/// [`GOOGLE_RULES`]).
pub fn google_routes(pool: &DescriptorPool) -> Result<Vec<Route>, RuleError> {
    GOOGLE_RULES
        .iter()
        .map(|(verb, template, body, method)| {
            let fail = |reason: String| RuleError {
                origin: GOOGLE_SHAPES.into(),
                selector: method.selector().into(),
                reason,
            };
            let template = Template::parse_default(template).map_err(|e| fail(e.to_string()))?;
            let body = match *body {
                "*" => BodyRule::All,
                _ => BodyRule::None,
            };
            let input = check_fields(pool, *method, &template, &body).map_err(fail)?;
            Ok(Route {
                verb: http::Method::from_bytes(verb.as_bytes()).expect("a known method"),
                template,
                body,
                method: *method,
                input,
                origin: GOOGLE_SHAPES.to_owned(),
            })
        })
        .collect()
}

/// The routes of the `google.api.http` options of operations.proto and of
/// opsd's own protos (the worker API's polling report, the console's
/// operation infos).
pub fn default_routes(pool: &DescriptorPool) -> Result<Vec<Route>, RuleError> {
    let mut routes = service_routes(pool, SERVICE, "operations.proto")?;
    routes.extend(service_routes(pool, WORKERS, OPSD_PROTOS)?);
    routes.extend(service_routes(pool, CONSOLE, OPSD_PROTOS)?);
    Ok(routes)
}

/// The origin of the routes of opsd's own protos.
const OPSD_PROTOS: &str = "opsd/v1 protos";

fn service_routes(
    pool: &DescriptorPool,
    name: &str,
    origin: &str,
) -> Result<Vec<Route>, RuleError> {
    let fail = |reason: &str| RuleError {
        origin: origin.into(),
        selector: name.into(),
        reason: reason.into(),
    };
    let service = pool
        .get_service_by_name(name)
        .ok_or_else(|| fail("the service is missing from the descriptor set"))?;
    let extension = pool
        .get_extension_by_name("google.api.http")
        .ok_or_else(|| fail("the google.api.http extension is missing"))?;
    let mut routes = Vec::new();
    for method in service.methods() {
        let options = method.options();
        if !options.has_extension(&extension) {
            continue;
        }
        let Value::Message(rule) = options.get_extension(&extension).into_owned() else {
            continue;
        };
        let rule: HttpRule = rule
            .transcode_to()
            .map_err(|e| fail(&format!("bad google.api.http option: {e}")))?;
        let rule = HttpRule {
            selector: method.full_name().to_owned(),
            ..rule
        };
        add_rule(&mut routes, &rule, origin, pool)?;
    }
    Ok(routes)
}

/// The Operations routes of a Google service-config YAML file.
pub fn routes_from_yaml(path: &Path, pool: &DescriptorPool) -> Result<Vec<Route>, RuleError> {
    let origin = path.display().to_string();
    let fail = |reason: String| RuleError {
        origin: origin.clone(),
        selector: "(file)".into(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let document: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| fail(format!("not YAML: {e}")))?;
    let Some(http) = document.get("http") else {
        return Err(fail("no `http:` section".into()));
    };
    let descriptor = pool
        .get_message_by_name("google.api.Http")
        .ok_or_else(|| fail("google.api.Http is missing from the descriptor set".into()))?;
    let http: Http = DynamicMessage::deserialize(descriptor, http.clone())
        .map_err(|e| fail(format!("the `http:` section is not a google.api.Http: {e}")))?
        .transcode_to()
        .map_err(|e| fail(e.to_string()))?;
    let mut routes = Vec::new();
    for rule in &http.rules {
        if RestMethod::from_selector(&rule.selector).is_some() {
            add_rule(&mut routes, rule, &origin, pool)?;
        } else {
            tracing::debug!(file = %origin, selector = %rule.selector, "skipping a rule for another service");
        }
    }
    Ok(routes)
}

/// Adds the routes of `rule` and of its additional bindings.
fn add_rule(
    routes: &mut Vec<Route>,
    rule: &HttpRule,
    origin: &str,
    pool: &DescriptorPool,
) -> Result<(), RuleError> {
    let fail = |reason: String| RuleError {
        origin: origin.to_owned(),
        selector: rule.selector.clone(),
        reason,
    };
    let method = RestMethod::from_selector(&rule.selector)
        .ok_or_else(|| fail("not a google.longrunning.Operations method".into()))?;
    if !method.is_operations() && origin != OPSD_PROTOS {
        return Err(fail(
            "only google.longrunning.Operations methods can be mapped".into(),
        ));
    }
    let mut bindings = vec![rule.clone()];
    bindings.extend(rule.additional_bindings.iter().cloned());
    for (i, binding) in bindings.iter().enumerate() {
        if i > 0 && !binding.additional_bindings.is_empty() {
            return Err(fail("additional bindings cannot nest".into()));
        }
        let (verb, template) = match &binding.pattern {
            Some(Pattern::Get(t)) => (http::Method::GET, t),
            Some(Pattern::Post(t)) => (http::Method::POST, t),
            Some(Pattern::Put(t)) => (http::Method::PUT, t),
            Some(Pattern::Delete(t)) => (http::Method::DELETE, t),
            Some(Pattern::Patch(t)) => (http::Method::PATCH, t),
            Some(Pattern::Custom(custom)) => (
                http::Method::from_bytes(custom.kind.as_bytes())
                    .map_err(|_| fail(format!("{:?} is not an HTTP method", custom.kind)))?,
                &custom.path,
            ),
            None => return Err(fail("no HTTP method and path".into())),
        };
        let template = Template::parse(template).map_err(|e| fail(e.to_string()))?;
        let body = match binding.body.as_str() {
            "" => BodyRule::None,
            "*" => BodyRule::All,
            field if field.contains('.') => {
                return Err(fail(format!(
                    "body field {field:?} must be a top-level field"
                )))
            }
            field => BodyRule::Field(field.to_owned()),
        };
        if !binding.response_body.is_empty() {
            return Err(fail("`response_body` is not supported".into()));
        }
        let input = check_fields(pool, method, &template, &body).map_err(fail)?;
        routes.push(Route {
            verb,
            template,
            body,
            method,
            input,
            origin: origin.to_owned(),
        });
    }
    Ok(())
}

/// Path variables must name singular string fields of the request, and a
/// body field must be a message field of it.
fn check_fields(
    pool: &DescriptorPool,
    method: RestMethod,
    template: &Template,
    body: &BodyRule,
) -> Result<MessageDescriptor, String> {
    let request = pool
        .get_message_by_name(method.input_type())
        .ok_or_else(|| format!("{} is missing from the descriptor set", method.input_type()))?;
    for path in template.fields() {
        let mut message = request.clone();
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let field = message.get_field_by_name(part).ok_or_else(|| {
                format!(
                    "{template} binds {path:?}, which {} does not have",
                    method.input_type()
                )
            })?;
            let last = i + 1 == parts.len();
            match (field.kind(), last) {
                (Kind::String, true) if !field.is_list() => {}
                (Kind::Message(inner), false) if !field.is_list() && !field.is_map() => {
                    message = inner
                }
                _ => {
                    return Err(format!(
                        "{template} binds {path:?}, which is not a string field"
                    ))
                }
            }
        }
    }
    if let BodyRule::Field(field) = body {
        match request.get_field_by_name(field).map(|f| f.kind()) {
            Some(Kind::Message(_)) => {}
            _ => {
                return Err(format!(
                    "body field {field:?} is not a message field of {}",
                    method.input_type()
                ))
            }
        }
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::base_pool;

    #[test]
    fn operations_proto_gives_the_four_default_routes() {
        let mut routes = default_routes(&base_pool()).unwrap();
        let opsd: Vec<(RestMethod, String)> = routes
            .split_off(4)
            .into_iter()
            .map(|r| (r.method, r.template.to_string()))
            .collect();
        assert_eq!(
            opsd,
            [
                (RestMethod::Report, "/v1/{name=**}:report".to_owned()),
                (
                    RestMethod::ListInfos,
                    "/v1/{name=*/**}/operations:info".to_owned()
                ),
                (
                    RestMethod::ListInfos,
                    "/v1/{name=operations}:info".to_owned()
                ),
                (
                    RestMethod::GetInfo,
                    "/v1/{name=**/operations/*}:info".to_owned()
                ),
                (
                    RestMethod::WatchChanges,
                    "/v1/{parent=*/**}/operations:watch".to_owned()
                ),
                (
                    RestMethod::WatchChanges,
                    "/v1/{parent=operations}:watch".to_owned()
                ),
            ]
        );
        let summary: Vec<(String, String, RestMethod)> = routes
            .iter()
            .map(|r| (r.verb.to_string(), r.template.to_string(), r.method))
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "GET".into(),
                    "/v1/{name=operations}".into(),
                    RestMethod::List
                ),
                (
                    "GET".into(),
                    "/v1/{name=operations/**}".into(),
                    RestMethod::Get
                ),
                (
                    "DELETE".into(),
                    "/v1/{name=operations/**}".into(),
                    RestMethod::Delete
                ),
                (
                    "POST".into(),
                    "/v1/{name=operations/**}:cancel".into(),
                    RestMethod::Cancel
                ),
            ]
        );
        assert_eq!(routes[3].body, BodyRule::All);
    }

    #[test]
    fn google_shapes_cover_every_method_under_any_version() {
        let routes = google_routes(&base_pool()).unwrap();
        let find = |verb: &str, path: &str| {
            let split = super::super::template::SplitPath::new(path).unwrap();
            routes
                .iter()
                .find(|r| r.verb.as_str() == verb && r.template.matches_split(&split).is_some())
                .map(|r| (r.method, r.template.matches_split(&split).unwrap().unwrap()))
        };
        let name = |v: &str| vec![("name".to_owned(), v.to_owned())];
        assert_eq!(
            find("POST", "/v2beta/projects/p/locations/l/operations/x:cancel"),
            Some((
                RestMethod::Cancel,
                name("projects/p/locations/l/operations/x")
            ))
        );
        assert_eq!(
            find("POST", "/v1beta1/organizations/1/operations/x:wait"),
            Some((RestMethod::Wait, name("organizations/1/operations/x")))
        );
        assert_eq!(
            find("GET", "/v2/operations/x"),
            Some((RestMethod::Get, name("operations/x")))
        );
        assert_eq!(
            find("DELETE", "/v1alpha/projects/p/operations/x"),
            Some((RestMethod::Delete, name("projects/p/operations/x")))
        );
        assert_eq!(
            find("GET", "/v1/projects/p/locations/l/operations"),
            Some((RestMethod::List, name("projects/p/locations/l")))
        );
        assert_eq!(
            find("GET", "/v3/operations"),
            Some((RestMethod::List, name("operations")))
        );
        assert_eq!(find("GET", "/api/projects/p/operations/x"), None);
    }

    #[test]
    fn service_configs_add_their_operations_rules() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/service-configs");
        let run = routes_from_yaml(&dir.join("run_v2.yaml"), &base_pool()).unwrap();
        assert_eq!(run.len(), 4);
        let wait = run.iter().find(|r| r.method == RestMethod::Wait).unwrap();
        assert_eq!(wait.verb, http::Method::POST);
        assert_eq!(wait.body, BodyRule::All);
        let beyondcorp = routes_from_yaml(&dir.join("beyondcorp_v1.yaml"), &base_pool()).unwrap();
        assert_eq!(beyondcorp.len(), 4, "IAM and Locations rules are skipped");
    }

    #[test]
    fn bad_rules_name_their_file_and_selector() {
        let dir = std::env::temp_dir().join(format!("opsd-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.yaml");
        std::fs::write(
            &file,
            "http:\n  rules:\n  - selector: google.longrunning.Operations.GetOperation\n    get: '/v1/{name=operations/**}/x/**'\n",
        )
        .unwrap();
        let err = routes_from_yaml(&file, &base_pool())
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.yaml"), "{err}");
        assert!(err.contains("GetOperation"), "{err}");
        std::fs::write(
            &file,
            "http:\n  rules:\n  - selector: google.longrunning.Operations.ListOperations\n    get: '/v1/{page_size}/x'\n",
        )
        .unwrap();
        let err = routes_from_yaml(&file, &base_pool())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a string field"), "{err}");
        std::fs::write(
            &file,
            "http:\n  rules:\n  - selector: google.longrunning.Operations.GetOperation\n    get: '/v1/{nmae=operations/*}'\n",
        )
        .unwrap();
        assert!(routes_from_yaml(&file, &base_pool()).is_err());
        std::fs::write(&file, "http:\n  rules: 7\n").unwrap();
        assert!(routes_from_yaml(&file, &base_pool()).is_err());
        std::fs::write(&file, "name: x\n").unwrap();
        assert!(routes_from_yaml(&file, &base_pool()).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
