//! `plugins:` entries. Each has an `id`, a `type`, `enabled`, a workload selector and
//! `parameters`; the two types mirror SlashID Gate's OAuth 2.0 plugins: `token-creator`
//! (Gate's `request-oauth2-authenticator`) and `token-validator` (`validate-oauth2-token`).

use std::{collections::HashSet, path::Path, sync::Arc};

use http::HeaderName;
use ipnet::IpNet;
use serde::Deserialize;

use super::{Problems, secret::Secret};
use crate::{
    oauth::{
        ClientAuthMethod, ClientId, introspect::IntrospectionEndpoint, token::ClientCredentials,
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

/// Selects pods by namespace, service account and name; every field given must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelector {
    pub namespace: Option<String>,
    pub service_account: Option<String>,
    pub pods: Option<Vec<String>>,
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
        namespace_ok && account_ok && name_ok
    }
}

/// What an inbound validator does with a connection that is not HTTP/1.x.
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
    pub client_auth_method: Option<ClientAuthMethod>,
    pub scopes: Option<Vec<String>>,

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
    pub introspection: IntrospectionEndpoint,
    pub header: TokenHeader,
    /// Every scope listed must be in the token; empty requires none.
    pub required_scopes: Vec<String>,
    /// Client ids accepted; empty accepts any client.
    pub allowed_client_ids: Vec<ClientId>,
    /// Source networks accepted; empty accepts any source.
    pub allowed_cidrs: Vec<IpNet>,
    pub remove_token_header: bool,
    /// Header in which the app receives the caller's client id.
    pub client_id_header: HeaderName,
    pub non_http: NonHttpAction,
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
        let mut checker = Checker {
            key: format!("{key}.parameters"),
            base_dir,
            env,
            problems,
        };
        let kind = match spec.plugin_type {
            PluginType::TokenCreator => checker
                .creator(&spec.id, &spec.parameters)
                .map(PluginKind::Creator),
            PluginType::TokenValidator => checker
                .validator(&spec.id, &spec.parameters)
                .map(PluginKind::Validator),
        };
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

    fn creator(&mut self, id: &str, params: &Parameters) -> Option<Arc<CreatorSettings>> {
        for (field, present) in [
            ("token_format", params.token_format.is_some()),
            ("introspection_url", params.introspection_url.is_some()),
            (
                "introspection_client_id",
                params.introspection_client_id.is_some(),
            ),
            (
                "introspection_client_secret",
                params.introspection_client_secret.is_some(),
            ),
            (
                "introspection_auth_method",
                params.introspection_auth_method.is_some(),
            ),
            ("required_scopes", params.required_scopes.is_some()),
            ("allowed_client_ids", params.allowed_client_ids.is_some()),
            ("allowed_cidrs", params.allowed_cidrs.is_some()),
            ("remove_token_header", params.remove_token_header.is_some()),
            ("client_id_header", params.client_id_header.is_some()),
            ("non_http", params.non_http.is_some()),
        ] {
            self.forbidden(field, present, "token-creator");
        }
        let token_endpoint = self.url("token_endpoint", &params.token_endpoint);
        let client_id = self.client_id("client_id", &params.client_id);
        let client_secret = self.secret("client_secret", &params.client_secret);
        let scopes = self.scopes("scopes", &params.scopes);
        let header = self.token_header(params);
        Some(Arc::new(CreatorSettings {
            plugin_id: id.to_string(),
            credentials: ClientCredentials {
                token_endpoint: token_endpoint?,
                client_id: client_id?,
                client_secret: client_secret?,
                auth_method: params.client_auth_method.unwrap_or_default(),
                scopes,
            },
            header: header?,
        }))
    }

    fn validator(&mut self, id: &str, params: &Parameters) -> Option<Arc<ValidatorSettings>> {
        for (field, present) in [
            ("token_endpoint", params.token_endpoint.is_some()),
            ("client_id", params.client_id.is_some()),
            ("client_secret", params.client_secret.is_some()),
            ("client_auth_method", params.client_auth_method.is_some()),
            ("scopes", params.scopes.is_some()),
        ] {
            self.forbidden(field, present, "token-validator");
        }
        // NOTE: JWT access tokens are not validated yet; only introspection is.
        if params.token_format == Some(TokenFormat::Jwt) {
            self.problem(
                "token_format",
                "jwt is not supported by this version of the agent; use opaque, which \
                 validates every token by introspection at introspection_url",
            );
        }
        let url = self.url("introspection_url", &params.introspection_url);
        let client_id = self.client_id("introspection_client_id", &params.introspection_client_id);
        let secret = self.secret(
            "introspection_client_secret",
            &params.introspection_client_secret,
        );
        let required_scopes = self.scopes("required_scopes", &params.required_scopes);
        let allowed_client_ids = self.allowed_client_ids(params);
        let allowed_cidrs = self.allowed_cidrs(params);
        let header = self.token_header(params);
        let client_id_header = self.header(
            "client_id_header",
            params.client_id_header.as_deref(),
            DEFAULT_CLIENT_ID_HEADER,
        );
        if let (Some(token), Some(client)) = (&header, &client_id_header)
            && token.name == client
        {
            self.problem(
                "client_id_header",
                "equals header_with_token; the two headers must differ",
            );
        }
        Some(Arc::new(ValidatorSettings {
            plugin_id: id.to_string(),
            introspection: IntrospectionEndpoint {
                url: url?,
                client_id: client_id?,
                client_secret: secret?,
                auth_method: params.introspection_auth_method.unwrap_or_default(),
            },
            header: header?,
            required_scopes,
            allowed_client_ids: allowed_client_ids?,
            allowed_cidrs: allowed_cidrs?,
            remove_token_header: params.remove_token_header.unwrap_or(true),
            client_id_header: client_id_header?,
            non_http: params.non_http.unwrap_or_default(),
        }))
    }

    fn allowed_client_ids(&mut self, params: &Parameters) -> Option<Vec<ClientId>> {
        let ids = params.allowed_client_ids.clone().unwrap_or_default();
        let mut valid = true;
        for (i, id) in ids.iter().enumerate() {
            if id.trim().is_empty() {
                self.problem(&format!("allowed_client_ids[{i}]"), "is empty");
                valid = false;
            }
        }
        valid.then(|| ids.into_iter().map(ClientId).collect())
    }

    fn allowed_cidrs(&mut self, params: &Parameters) -> Option<Vec<IpNet>> {
        let mut nets = Vec::new();
        let mut valid = true;
        for (i, text) in params.allowed_cidrs.iter().flatten().enumerate() {
            match parse_cidr(text) {
                Ok(net) => nets.push(net),
                Err(message) => {
                    self.problem(&format!("allowed_cidrs[{i}]"), message);
                    valid = false;
                }
            }
        }
        valid.then_some(nets)
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
