//! Checks of `token-creator` parameters. A route override in `urls:` runs the same
//! checks on its merged parameters.

use std::{sync::Arc, time::Duration};

use super::{Checker, CreatorSettings, Parameters, validator};
use crate::oauth::{
    ClientAuthMethod,
    assertion::{AssertionOptions, AssertionSigner},
    retry::RetryPolicy,
    token::{
        ClientAuthentication, ClientCredentials, DEFAULT_MIN_REQUEST_INTERVAL,
        TokenEndpointAuthMethod,
    },
};

const MAX_TOKEN_REQUEST_ATTEMPTS: u32 = 10;
/// Maximum total time for one token request with its retries. Pods wait this long for a
/// response when no token is cached.
const MAX_TOKEN_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Shortest interval between token requests for one key, so a provider that repeats a
/// token or keeps failing is not flooded.
const MIN_TOKEN_REQUEST_INTERVAL: Duration = Duration::from_millis(100);
const MAX_TOKEN_REQUEST_INTERVAL: Duration = Duration::from_secs(300);
const MIN_ASSERTION_LIFETIME: Duration = Duration::from_secs(5);
const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);

impl Checker<'_> {
    pub(super) fn creator(
        &mut self,
        id: &str,
        params: &Parameters,
    ) -> Option<Arc<CreatorSettings>> {
        for (field, present) in validator::validator_only_fields(params) {
            self.forbidden(field, present, "token-creator");
        }
        let token_endpoint = self.url("token_endpoint", &params.token_endpoint);
        let client_id = self.client_id("client_id", &params.client_id);
        let authentication = self.client_authentication(params);
        let scopes = self.scopes("scopes", &params.scopes);
        let audience = self.audience(params);
        let resources = self.resources(params);
        let retry = self.retry_policy(params);
        let min_request_interval = self.duration_between(
            "token_request_min_interval",
            params.token_request_min_interval,
            DEFAULT_MIN_REQUEST_INTERVAL,
            MIN_TOKEN_REQUEST_INTERVAL,
            MAX_TOKEN_REQUEST_INTERVAL,
        );
        let header = self.token_header(params);

        let mut credentials = ClientCredentials::new(token_endpoint?, client_id?, authentication?);
        credentials.scopes = scopes;
        credentials.audience = audience?;
        credentials.resources = resources?;
        credentials.retry = retry?;
        credentials.min_request_interval = min_request_interval?;
        Some(Arc::new(CreatorSettings {
            plugin_id: id.to_string(),
            credentials,
            header: header?,
        }))
    }

    fn client_authentication(&mut self, params: &Parameters) -> Option<ClientAuthentication> {
        let method = match params.client_auth_method.unwrap_or_default() {
            TokenEndpointAuthMethod::ClientSecretBasic => ClientAuthMethod::ClientSecretBasic,
            TokenEndpointAuthMethod::ClientSecretPost => ClientAuthMethod::ClientSecretPost,
            TokenEndpointAuthMethod::PrivateKeyJwt => return self.private_key_jwt(params),
        };
        for (field, present) in private_key_fields(params) {
            if present {
                self.problem(
                    field,
                    "applies only to client_auth_method private_key_jwt; remove it or set \
                     client_auth_method: private_key_jwt",
                );
            }
        }
        let secret = self.secret("client_secret", &params.client_secret)?;
        Some(ClientAuthentication::Secret { secret, method })
    }

    fn private_key_jwt(&mut self, params: &Parameters) -> Option<ClientAuthentication> {
        if params.client_secret.is_some() {
            self.problem(
                "client_secret",
                "is not used with client_auth_method private_key_jwt; remove it",
            );
        }
        let key_id = self.optional_text("key_id", &params.key_id);
        let audience = self.optional_text("assertion_audience", &params.assertion_audience);
        let lifetime = self.duration_between(
            "assertion_lifetime",
            params.assertion_lifetime,
            crate::oauth::assertion::DEFAULT_ASSERTION_LIFETIME,
            MIN_ASSERTION_LIFETIME,
            MAX_ASSERTION_LIFETIME,
        );
        let Some(reference) = params.private_key.as_deref() else {
            self.problem(
                "private_key",
                "is missing; client_auth_method private_key_jwt needs a PEM private key \
                 reference such as file:keys/client.pem",
            );
            return None;
        };
        let pem = self.secret("private_key", &params.private_key)?;
        let options = AssertionOptions {
            algorithm: params.signing_alg,
            key_id: key_id?,
            audience: audience?,
            lifetime: Some(lifetime?),
        };
        match AssertionSigner::from_pem(pem.expose(), reference.trim(), options) {
            Ok(signer) => Some(ClientAuthentication::PrivateKeyJwt(Arc::new(signer))),
            Err(e) => {
                self.problem("private_key", e.to_string());
                None
            }
        }
    }

    /// Checks an optional text that must not be blank when given.
    fn optional_text(&mut self, field: &str, value: &Option<String>) -> Option<Option<String>> {
        match value.as_deref().map(str::trim) {
            None => Some(None),
            Some("") => {
                self.problem(field, "is empty; remove it or give a value");
                None
            }
            Some(text) => Some(Some(text.to_string())),
        }
    }

    fn audience(&mut self, params: &Parameters) -> Option<Option<String>> {
        self.optional_text("audience", &params.audience)
    }

    /// Resource indicators must be absolute URIs without a fragment (RFC 8707 section 2).
    fn resources(&mut self, params: &Parameters) -> Option<Vec<String>> {
        let mut resources = Vec::new();
        let mut valid = true;
        for (i, text) in params.resources.iter().flatten().enumerate() {
            let field = format!("resources[{i}]");
            let text = text.trim();
            match url::Url::parse(text) {
                Ok(url) if url.fragment().is_some() => {
                    self.problem(
                        &field,
                        format!(
                            "{text:?} has a fragment; RFC 8707 resource indicators must not, \
                             remove the part from #"
                        ),
                    );
                    valid = false;
                }
                Ok(_) => resources.push(text.to_string()),
                Err(e) => {
                    self.problem(
                        &field,
                        format!(
                            "{text:?} is not an absolute URI ({e}); use the API's URI, such \
                             as https://api.example.com/"
                        ),
                    );
                    valid = false;
                }
            }
        }
        valid.then_some(resources)
    }

    fn retry_policy(&mut self, params: &Parameters) -> Option<RetryPolicy> {
        let defaults = RetryPolicy::default();
        let attempts = params
            .token_request_attempts
            .unwrap_or(defaults.max_attempts);
        let attempts_valid = (1..=MAX_TOKEN_REQUEST_ATTEMPTS).contains(&attempts);
        if !attempts_valid {
            self.problem(
                "token_request_attempts",
                format!(
                    "{attempts} is out of range; use 1 (no retry) to \
                     {MAX_TOKEN_REQUEST_ATTEMPTS}"
                ),
            );
        }
        let timeout = self.duration_between(
            "token_request_timeout",
            params.token_request_timeout,
            defaults.timeout,
            Duration::from_millis(1),
            MAX_TOKEN_REQUEST_TIMEOUT,
        );
        Some(RetryPolicy {
            max_attempts: attempts_valid.then_some(attempts)?,
            timeout: timeout?,
        })
    }

    /// Returns `value`, or `default` when it is not set, after checking it lies within
    /// `min..=max`.
    fn duration_between(
        &mut self,
        field: &str,
        value: Option<Duration>,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let duration = value.unwrap_or(default);
        if duration < min || duration > max {
            self.problem(
                field,
                format!(
                    "{} is out of range; use a duration from {} to {}",
                    humantime_serde::re::humantime::format_duration(duration),
                    humantime_serde::re::humantime::format_duration(min),
                    humantime_serde::re::humantime::format_duration(max)
                ),
            );
            return None;
        }
        Some(duration)
    }
}

/// Parameters of `private_key_jwt` only, with whether each is set.
fn private_key_fields(params: &Parameters) -> [(&'static str, bool); 5] {
    [
        ("private_key", params.private_key.is_some()),
        ("signing_alg", params.signing_alg.is_some()),
        ("key_id", params.key_id.is_some()),
        ("assertion_audience", params.assertion_audience.is_some()),
        ("assertion_lifetime", params.assertion_lifetime.is_some()),
    ]
}

/// Lists every creator-only parameter with whether it is set, for the validator's check.
pub(super) fn creator_only_fields(params: &Parameters) -> Vec<(&'static str, bool)> {
    let mut fields = vec![
        ("token_endpoint", params.token_endpoint.is_some()),
        ("client_id", params.client_id.is_some()),
        ("client_secret", params.client_secret.is_some()),
        ("client_auth_method", params.client_auth_method.is_some()),
        ("scopes", params.scopes.is_some()),
        ("audience", params.audience.is_some()),
        ("resources", params.resources.is_some()),
        (
            "token_request_attempts",
            params.token_request_attempts.is_some(),
        ),
        (
            "token_request_timeout",
            params.token_request_timeout.is_some(),
        ),
        (
            "token_request_min_interval",
            params.token_request_min_interval.is_some(),
        ),
    ];
    fields.extend(private_key_fields(params));
    fields
}

#[cfg(test)]
mod tests;
