//! Checks of `token-validator` parameters. A route override in `urls:` runs the same
//! checks on its merged parameters.

use std::{collections::HashMap, sync::Arc, time::Duration};

use http::Method;
use ipnet::IpNet;

use super::{
    Checker, DEFAULT_CLIENT_ID_HEADER, Parameters, TokenCheck, TokenFormat, ValidatorSettings,
    parse_cidr,
};
use crate::oauth::{
    ClientId,
    introspect::{CachePolicy, IntrospectionEndpoint},
    jwks::{KeySetConfig, KeySource},
    jwt::{DEFAULT_ALGORITHMS, JwtSettings, public_key_algorithm},
};

/// Clock skew allowed on `exp`, `nbf` and `iat` by default.
const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// Largest leeway accepted: more would keep expired tokens valid for long.
const MAX_LEEWAY: Duration = Duration::from_secs(300);
const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
const DEFAULT_JWKS_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// Shortest interval between JWKS fetches, so tokens with made-up `kid` values cannot
/// turn the agent into a flood of requests to the issuer.
const MIN_JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_INTROSPECTION_CACHE_TTL: Duration = Duration::from_secs(30);
/// Inactive results are kept briefly at most, because a token that was not yet known to
/// the provider may become valid.
const MAX_NEGATIVE_CACHE_TTL: Duration = Duration::from_secs(60);

impl Checker<'_> {
    pub(super) fn validator(
        &mut self,
        id: &str,
        params: &Parameters,
    ) -> Option<Arc<ValidatorSettings>> {
        for (field, present) in super::creator::creator_only_fields(params) {
            self.forbidden(field, present, "token-validator");
        }
        let token_check = match params.token_format.unwrap_or_default() {
            TokenFormat::Opaque => self.introspection_check(params),
            TokenFormat::Jwt => self.jwt_check(params),
        };
        let required_scopes = self.scopes("required_scopes", &params.required_scopes);
        let method_required_scopes = self.method_required_scopes(params);
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
            token_check: token_check?,
            header: header?,
            required_scopes,
            method_required_scopes: method_required_scopes?,
            allowed_client_ids: allowed_client_ids?,
            allowed_cidrs: allowed_cidrs?,
            remove_token_header: params.remove_token_header.unwrap_or(true),
            client_id_header: client_id_header?,
            non_http: params.non_http.unwrap_or_default(),
            allow_cors_preflight: params.allow_cors_preflight.unwrap_or(false),
            allow_token_in_query: params.allow_token_in_query.unwrap_or(false),
        }))
    }

    fn only_with(&mut self, format: &str, fields: &[(&str, bool)]) {
        for (field, present) in fields {
            if *present {
                self.problem(
                    field,
                    format!("applies only with token_format: {format}; remove it"),
                );
            }
        }
    }

    fn introspection_check(&mut self, params: &Parameters) -> Option<TokenCheck> {
        self.only_with("jwt", &jwt_fields(params));
        let url = self.url("introspection_url", &params.introspection_url);
        let client_id = self.client_id("introspection_client_id", &params.introspection_client_id);
        let secret = self.secret(
            "introspection_client_secret",
            &params.introspection_client_secret,
        );
        let max_ttl = params
            .introspection_cache_ttl
            .unwrap_or(DEFAULT_INTROSPECTION_CACHE_TTL);
        let negative_ttl = params
            .introspection_negative_cache_ttl
            .unwrap_or(Duration::ZERO);
        if negative_ttl > MAX_NEGATIVE_CACHE_TTL {
            self.problem(
                "introspection_negative_cache_ttl",
                format!(
                    "{negative_ttl:?} is longer than the maximum {MAX_NEGATIVE_CACHE_TTL:?}; \
                     inactive results may be cached only briefly"
                ),
            );
        }
        Some(TokenCheck::Introspection {
            endpoint: IntrospectionEndpoint {
                url: url?,
                client_id: client_id?,
                client_secret: secret?,
                auth_method: params.introspection_auth_method.unwrap_or_default(),
            },
            cache: CachePolicy {
                max_ttl,
                negative_ttl,
            },
        })
    }

    fn jwt_check(&mut self, params: &Parameters) -> Option<TokenCheck> {
        self.only_with("opaque", &introspection_fields(params));
        let issuer = self.url("issuer", &params.issuer);
        let jwks_url = params
            .jwks_url
            .as_ref()
            .map(|_| self.url("jwks_url", &params.jwks_url));
        let audiences = self.audiences(params);
        let algorithms = self.algorithms(params);

        let leeway = params.leeway.unwrap_or(DEFAULT_LEEWAY);
        if leeway > MAX_LEEWAY {
            self.problem(
                "leeway",
                format!(
                    "{leeway:?} is more than {MAX_LEEWAY:?}; synchronize the node clocks \
                     instead of accepting expired tokens this long"
                ),
            );
        }

        let refresh_interval = params
            .jwks_refresh_interval
            .unwrap_or(DEFAULT_JWKS_REFRESH_INTERVAL);
        let min_refetch_interval = params
            .jwks_min_refetch_interval
            .unwrap_or(DEFAULT_JWKS_MIN_REFETCH_INTERVAL);
        for (field, value) in [
            ("jwks_refresh_interval", refresh_interval),
            ("jwks_min_refetch_interval", min_refetch_interval),
        ] {
            if value < MIN_JWKS_REFETCH_INTERVAL {
                self.problem(
                    field,
                    format!("{value:?} is shorter than {MIN_JWKS_REFETCH_INTERVAL:?}"),
                );
            }
        }

        let issuer = issuer?;
        let source = match jwks_url {
            Some(url) => KeySource::JwksUrl(url?),
            None => KeySource::Issuer(issuer.clone()),
        };
        Some(TokenCheck::Jwt(JwtSettings {
            issuer,
            audiences: audiences?,
            algorithms: algorithms?,
            leeway,
            require_at_jwt_typ: params.require_at_jwt_typ.unwrap_or(false),
            keys: KeySetConfig {
                source,
                refresh_interval,
                min_refetch_interval,
            },
        }))
    }

    fn audiences(&mut self, params: &Parameters) -> Option<Vec<String>> {
        let audiences = params.audiences.clone().unwrap_or_default();
        if audiences.is_empty() {
            self.problem(
                "audiences",
                "is missing; list the audience values (aud) that tokens for this service \
                 carry, as RFC 9068 requires",
            );
            return None;
        }
        let mut valid = true;
        for (i, audience) in audiences.iter().enumerate() {
            if audience.trim().is_empty() {
                self.problem(&format!("audiences[{i}]"), "is empty");
                valid = false;
            }
        }
        valid.then_some(audiences)
    }

    fn algorithms(&mut self, params: &Parameters) -> Option<Vec<jsonwebtoken::Algorithm>> {
        let Some(names) = &params.allowed_algorithms else {
            return Some(DEFAULT_ALGORITHMS.to_vec());
        };
        if names.is_empty() {
            self.problem(
                "allowed_algorithms",
                "is empty; omit it to accept RS256, PS256, ES256 and EdDSA",
            );
            return None;
        }
        let mut algorithms = Vec::new();
        let mut valid = true;
        for (i, name) in names.iter().enumerate() {
            let field = format!("allowed_algorithms[{i}]");
            if name.eq_ignore_ascii_case("none") || name.to_ascii_uppercase().starts_with("HS") {
                self.problem(
                    &field,
                    format!(
                        "{name:?} is never accepted: `none` is unsigned, and an HMAC \
                         algorithm would let anyone holding the public key sign tokens"
                    ),
                );
                valid = false;
                continue;
            }
            match public_key_algorithm(name) {
                Some(algorithm) => algorithms.push(algorithm),
                None => {
                    self.problem(
                        &field,
                        format!(
                            "{name:?} is not a supported algorithm; use RS256, RS384, RS512, \
                             PS256, PS384, PS512, ES256, ES384 or EdDSA"
                        ),
                    );
                    valid = false;
                }
            }
        }
        valid.then_some(algorithms)
    }

    fn method_required_scopes(
        &mut self,
        params: &Parameters,
    ) -> Option<HashMap<Method, Vec<String>>> {
        let mut by_method = HashMap::new();
        let mut valid = true;
        for (name, scopes) in params.method_required_scopes.iter().flatten() {
            let field = format!("method_required_scopes.{name}");
            let method = Method::from_bytes(name.as_bytes())
                .ok()
                .filter(|_| name.bytes().all(|b| b.is_ascii_uppercase()));
            let Some(method) = method else {
                self.problem(
                    &field,
                    format!("{name:?} is not an HTTP method in upper case, such as GET or POST"),
                );
                valid = false;
                continue;
            };
            let scopes = self.scopes(&field, &Some(scopes.clone()));
            by_method.insert(method, scopes);
        }
        valid.then_some(by_method)
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

/// Parameters that apply only to `token_format: jwt`, with whether each is set.
fn jwt_fields(params: &Parameters) -> [(&'static str, bool); 8] {
    [
        ("issuer", params.issuer.is_some()),
        ("jwks_url", params.jwks_url.is_some()),
        ("audiences", params.audiences.is_some()),
        ("allowed_algorithms", params.allowed_algorithms.is_some()),
        ("leeway", params.leeway.is_some()),
        ("require_at_jwt_typ", params.require_at_jwt_typ.is_some()),
        (
            "jwks_refresh_interval",
            params.jwks_refresh_interval.is_some(),
        ),
        (
            "jwks_min_refetch_interval",
            params.jwks_min_refetch_interval.is_some(),
        ),
    ]
}

/// Parameters that apply only to `token_format: opaque`, with whether each is set.
fn introspection_fields(params: &Parameters) -> [(&'static str, bool); 6] {
    [
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
        (
            "introspection_cache_ttl",
            params.introspection_cache_ttl.is_some(),
        ),
        (
            "introspection_negative_cache_ttl",
            params.introspection_negative_cache_ttl.is_some(),
        ),
    ]
}

/// Lists every validator-only parameter with whether it is set, for the creator's check.
pub(super) fn validator_only_fields(params: &Parameters) -> Vec<(&'static str, bool)> {
    let mut fields = Vec::new();
    fields.extend(jwt_fields(params));
    fields.extend(introspection_fields(params));
    fields.extend([
        ("token_format", params.token_format.is_some()),
        ("required_scopes", params.required_scopes.is_some()),
        (
            "method_required_scopes",
            params.method_required_scopes.is_some(),
        ),
        ("allowed_client_ids", params.allowed_client_ids.is_some()),
        ("allowed_cidrs", params.allowed_cidrs.is_some()),
        ("remove_token_header", params.remove_token_header.is_some()),
        ("client_id_header", params.client_id_header.is_some()),
        ("non_http", params.non_http.is_some()),
        (
            "allow_cors_preflight",
            params.allow_cors_preflight.is_some(),
        ),
        (
            "allow_token_in_query",
            params.allow_token_in_query.is_some(),
        ),
    ]);
    fields
}

#[cfg(test)]
mod tests;
