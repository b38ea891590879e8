//! `plugins:` entries. Each has an `id`, a `type`, `enabled`, a workload selector and
//! `parameters`; the two types mirror SlashID Gate's OAuth 2.0 plugins: `token-creator`
//! (Gate's `request-oauth2-authenticator`) and `token-validator` (`validate-oauth2-token`).

mod creator;
mod validator;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::Duration,
};

use http::{HeaderName, Method};
use ipnet::IpNet;
use serde::Deserialize;

use super::{Problems, secret::Secret};
use crate::{
    oauth::{
        ClientAuthMethod, ClientId,
        assertion::SigningAlgorithm,
        introspect::{CachePolicy, IntrospectionEndpoint},
        jwks::KeySource,
        jwt::JwtSettings,
        token::{ClientCredentials, TokenEndpointAuthMethod},
    },
    workloads::Pod,
};

/// A plugin as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    pub id: String,
    #[serde(rename = "type")]
    pub plugin_type: PluginType,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// Pods this plugin applies to; omitted, it applies to every pod.
    #[serde(default)]
    pub workloads: WorkloadSelector,
    #[serde(default)]
    pub parameters: Parameters,
}

fn enabled_by_default() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginType {
    TokenCreator,
    TokenValidator,
}

/// Selects pods by namespace, service account, name and labels; every field given must
/// match, and every label listed must be on the pod with that value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pods: Option<Vec<String>>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl WorkloadSelector {
    pub fn matches(&self, pod: &Pod) -> bool {
        let namespace_ok = self
            .namespace
            .as_ref()
            .is_none_or(|ns| *ns == pod.identity.namespace);
        let account_ok = self
            .service_account
            .as_ref()
            .is_none_or(|sa| *sa == pod.identity.service_account);
        let name_ok = self
            .pods
            .as_ref()
            .is_none_or(|names| names.contains(&pod.identity.name));
        let labels_ok = self
            .labels
            .iter()
            .all(|(key, value)| pod.labels.get(key) == Some(value));
        namespace_ok && account_ok && name_ok && labels_ok
    }
}

/// The inbound validator's action on a connection that is not HTTP/1.x.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonHttpAction {
    /// Close it: it cannot carry a token.
    #[default]
    Deny,
    /// Pass it to the app as plain TCP and audit it as a flow.
    Allow,
}

/// Access token formats a validator accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFormat {
    /// Validated by RFC 7662 introspection at the identity provider.
    #[default]
    Opaque,
    Jwt,
}

/// The union of both plugin types' parameters; `validate` checks which apply.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameters {
    /// Header carrying the token. `Authorization` carries `Bearer <token>`; any other
    /// header carries the raw token. Default `Authorization`.
    pub header_with_token: Option<String>,

    pub token_endpoint: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub client_auth_method: Option<TokenEndpointAuthMethod>,
    pub scopes: Option<Vec<String>>,
    /// `private_key_jwt`: reference (`file:PATH` or `${VAR}`) to a PEM private key.
    pub private_key: Option<String>,
    pub signing_alg: Option<SigningAlgorithm>,
    pub key_id: Option<String>,
    pub assertion_audience: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub assertion_lifetime: Option<Duration>,
    pub audience: Option<String>,
    pub resources: Option<Vec<String>>,
    pub token_request_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub token_request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub token_request_min_interval: Option<Duration>,

    pub token_format: Option<TokenFormat>,
    pub introspection_url: Option<String>,
    pub introspection_client_id: Option<String>,
    pub introspection_client_secret: Option<String>,
    pub introspection_auth_method: Option<ClientAuthMethod>,
    pub required_scopes: Option<Vec<String>>,
    pub allowed_client_ids: Option<Vec<String>>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub remove_token_header: Option<bool>,
    pub client_id_header: Option<String>,
    pub non_http: Option<NonHttpAction>,
    #[serde(default, with = "humantime_serde")]
    pub introspection_cache_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub introspection_negative_cache_ttl: Option<Duration>,
    pub issuer: Option<String>,
    pub jwks_url: Option<String>,
    pub audiences: Option<Vec<String>>,
    pub allowed_algorithms: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub leeway: Option<Duration>,
    pub require_at_jwt_typ: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub jwks_refresh_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub jwks_min_refetch_interval: Option<Duration>,
    /// Scopes required for a request method, in addition to `required_scopes`.
    pub method_required_scopes: Option<BTreeMap<String, Vec<String>>>,
    pub allow_cors_preflight: Option<bool>,
    pub allow_token_in_query: Option<bool>,
}

/// The header an access token travels in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenHeader {
    pub name: HeaderName,
    /// True for `Authorization`, whose value is `Bearer <token>` (RFC 6750 section 2.1).
    pub bearer: bool,
}

/// A validated plugin.
#[derive(Debug, Clone)]
pub struct Plugin {
    pub id: String,
    pub enabled: bool,
    pub workloads: WorkloadSelector,
    pub kind: PluginKind,
}

#[derive(Debug, Clone)]
pub enum PluginKind {
    Creator(Arc<CreatorSettings>),
    Validator(Arc<ValidatorSettings>),
}

impl PluginKind {
    /// URLs of the identity provider this plugin calls.
    pub fn endpoints(&self) -> Vec<&str> {
        match self {
            PluginKind::Creator(creator) => vec![creator.credentials.token_endpoint.as_str()],
            PluginKind::Validator(validator) => match &validator.token_check {
                TokenCheck::Introspection { endpoint, .. } => vec![endpoint.url.as_str()],
                TokenCheck::Jwt(jwt) => match &jwt.keys.source {
                    KeySource::JwksUrl(url) => vec![url.as_str(), jwt.issuer.as_str()],
                    KeySource::Issuer(issuer) => vec![issuer.as_str()],
                },
            },
        }
    }
}

/// Outbound: how a pod's requests get their access token.
#[derive(Debug)]
pub struct CreatorSettings {
    pub plugin_id: String,
    pub credentials: ClientCredentials,
    pub header: TokenHeader,
}

/// Inbound: what a request to a protected pod must prove.
#[derive(Debug)]
pub struct ValidatorSettings {
    pub plugin_id: String,
    pub token_check: TokenCheck,
    pub header: TokenHeader,
    /// Every scope listed must be in the token; empty requires none.
    pub required_scopes: Vec<String>,
    /// Scopes a request with this method needs in addition to `required_scopes`.
    pub method_required_scopes: HashMap<Method, Vec<String>>,
    /// Client ids accepted; empty accepts any client.
    pub allowed_client_ids: Vec<ClientId>,
    /// Source networks accepted; empty accepts any source.
    pub allowed_cidrs: Vec<IpNet>,
    pub remove_token_header: bool,
    /// Header in which the app receives the caller's client id.
    pub client_id_header: HeaderName,
    pub non_http: NonHttpAction,
    /// Pass CORS preflight requests (`OPTIONS` with `Origin` and
    /// `Access-Control-Request-Method`) to the app without a token.
    pub allow_cors_preflight: bool,
    /// Accept the token in the `access_token` query parameter (RFC 6750 section 2.3).
    pub allow_token_in_query: bool,
}

/// How a validator decides that a token is valid.
#[derive(Debug)]
pub enum TokenCheck {
    /// RFC 7662 introspection at the identity provider, with a result cache.
    Introspection {
        endpoint: IntrospectionEndpoint,
        cache: CachePolicy,
    },
    /// JWT access tokens (RFC 9068) checked with the issuer's public keys.
    Jwt(JwtSettings),
}

const DEFAULT_CLIENT_ID_HEADER: &str = "x-tokenmesh-client-id";

/// Checks every plugin, records each problem, and returns the plugins that are valid.
pub(super) fn validate(
    specs: &[PluginSpec],
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Vec<Plugin> {
    let mut ids = HashSet::new();
    let mut plugins = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let key = format!("plugins[{i}]");
        if spec.id.trim().is_empty() {
            problems.push(
                format!("{key}.id"),
                "is empty; give each plugin a unique id",
            );
        } else if !ids.insert(spec.id.as_str()) {
            problems.push(
                format!("{key}.id"),
                format!(
                    "{:?} is used by an earlier plugin; ids must be unique",
                    spec.id
                ),
            );
        }
        let kind = check_parameters(
            spec.plugin_type,
            &spec.id,
            &spec.parameters,
            &format!("{key}.parameters"),
            base_dir,
            env,
            problems,
        );
        if let Some(kind) = kind {
            plugins.push(Plugin {
                id: spec.id.clone(),
                enabled: spec.enabled,
                workloads: spec.workloads.clone(),
                kind,
            });
        }
    }
    plugins
}

/// Checks one plugin's parameters, recording problems under `key`, and builds its settings.
pub(super) fn check_parameters(
    plugin_type: PluginType,
    id: &str,
    parameters: &Parameters,
    key: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<PluginKind> {
    let mut checker = Checker {
        key: key.to_string(),
        base_dir,
        env,
        problems,
    };
    match plugin_type {
        PluginType::TokenCreator => checker.creator(id, parameters).map(PluginKind::Creator),
        PluginType::TokenValidator => checker.validator(id, parameters).map(PluginKind::Validator),
    }
}

struct Checker<'a> {
    key: String,
    base_dir: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: &'a mut Problems,
}

impl Checker<'_> {
    fn problem(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(format!("{}.{field}", self.key), message);
    }

    fn required<'v>(&mut self, field: &str, value: &'v Option<String>) -> Option<&'v str> {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => Some(v),
            _ => {
                self.problem(field, "is missing");
                None
            }
        }
    }

    fn forbidden(&mut self, field: &str, present: bool, plugin_type: &str) {
        if present {
            self.problem(
                field,
                format!("does not apply to a {plugin_type} plugin; remove it"),
            );
        }
    }

    fn url(&mut self, field: &str, value: &Option<String>) -> Option<String> {
        let text = self.required(field, value)?;
        match url::Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") => Some(text.to_string()),
            Ok(url) => {
                self.problem(
                    field,
                    format!("{text:?} has scheme {:?}; use http or https", url.scheme()),
                );
                None
            }
            Err(e) => {
                self.problem(field, format!("{text:?} is not a valid URL: {e}"));
                None
            }
        }
    }

    fn secret(&mut self, field: &str, value: &Option<String>) -> Option<Secret> {
        let reference = self.required(field, value)?;
        match Secret::resolve(reference, self.base_dir, self.env) {
            Ok(secret) => Some(secret),
            Err(e) => {
                self.problem(field, e.to_string());
                None
            }
        }
    }

    fn header(&mut self, field: &str, value: Option<&str>, default: &str) -> Option<HeaderName> {
        let text = value.unwrap_or(default);
        match HeaderName::from_bytes(text.as_bytes()) {
            Ok(name) => Some(name),
            Err(_) => {
                self.problem(field, format!("{text:?} is not a valid HTTP header name"));
                None
            }
        }
    }

    fn token_header(&mut self, params: &Parameters) -> Option<TokenHeader> {
        let name = self.header(
            "header_with_token",
            params.header_with_token.as_deref(),
            "authorization",
        )?;
        let bearer = name == http::header::AUTHORIZATION;
        Some(TokenHeader { name, bearer })
    }

    fn scopes(&mut self, field: &str, value: &Option<Vec<String>>) -> Vec<String> {
        let scopes = value.clone().unwrap_or_default();
        for (i, scope) in scopes.iter().enumerate() {
            let valid = !scope.is_empty()
                && scope
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
            if !valid {
                self.problem(
                    &format!("{field}[{i}]"),
                    format!(
                        "{scope:?} is not a valid scope token (RFC 6749 section 3.3: \
                         printable ASCII without spaces, quotes or backslashes)"
                    ),
                );
            }
        }
        scopes
    }

    fn client_id(&mut self, field: &str, value: &Option<String>) -> Option<ClientId> {
        self.required(field, value)
            .map(|id| ClientId(id.to_string()))
    }
}

/// Parses `10.0.0.0/24`, or a bare address as a single-host network.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    if let Ok(addr) = text.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!(
        "{text:?} is not a CIDR such as 10.0.0.0/24 or an address such as 10.0.0.7"
    ))
}
