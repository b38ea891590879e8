//! `token-validator` parameters: defaults, and each rejected value with its message.

use std::path::Path;

use super::*;
use crate::config::{PluginKind, PluginType, plugins::check_parameters};

const OPAQUE: &str = "
introspection_url: http://127.0.0.1:1/token/introspection
introspection_client_id: validator
introspection_client_secret: ${SECRET}
";

const JWT: &str = "
token_format: jwt
issuer: http://127.0.0.1:1
audiences: [urn:tokenmesh:mesh]
";

fn check(yaml: &str) -> Result<Arc<ValidatorSettings>, Vec<(String, String)>> {
    let params: Parameters = serde_yaml::from_str(yaml).expect("parameters parse");
    let mut problems = crate::config::Problems::default();
    let env = |name: &str| (name == "SECRET").then(|| "from-env".to_string());
    let kind = check_parameters(
        PluginType::TokenValidator,
        "v",
        &params,
        "plugins[0].parameters",
        Path::new("/etc/tokenmesh"),
        &env,
        &mut problems,
    );
    if !problems.0.is_empty() {
        return Err(problems.0.into_iter().map(|p| (p.key, p.message)).collect());
    }
    match kind {
        Some(PluginKind::Validator(settings)) => Ok(settings),
        _ => panic!("no validator settings and no problem"),
    }
}

fn problem_for(yaml: &str, field: &str) -> String {
    let problems = check(yaml).expect_err("the parameters must be rejected");
    let key = format!("plugins[0].parameters.{field}");
    problems
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, message)| message)
        .unwrap_or_else(|| panic!("no problem for {key}"))
}

#[test]
fn opaque_defaults() {
    let settings = check(OPAQUE).unwrap();
    let TokenCheck::Introspection { cache, .. } = &settings.token_check else {
        panic!("opaque tokens use introspection");
    };
    assert_eq!(cache.max_ttl, Duration::from_secs(30));
    assert_eq!(cache.negative_ttl, Duration::ZERO);
    assert!(!settings.allow_cors_preflight);
    assert!(!settings.allow_token_in_query);
    assert!(settings.method_required_scopes.is_empty());
}

#[test]
fn jwt_defaults() {
    let settings = check(JWT).unwrap();
    let TokenCheck::Jwt(jwt) = &settings.token_check else {
        panic!("token_format jwt");
    };
    assert_eq!(jwt.issuer, "http://127.0.0.1:1");
    assert_eq!(jwt.audiences, ["urn:tokenmesh:mesh"]);
    assert_eq!(jwt.algorithms, DEFAULT_ALGORITHMS);
    assert_eq!(jwt.leeway, Duration::from_secs(60));
    assert!(!jwt.require_at_jwt_typ);
    assert_eq!(
        jwt.keys.source,
        KeySource::Issuer("http://127.0.0.1:1".into())
    );
    assert_eq!(jwt.keys.refresh_interval, Duration::from_secs(300));
    assert_eq!(jwt.keys.min_refetch_interval, Duration::from_secs(10));
}

#[test]
fn jwt_options_parse() {
    let yaml = format!(
        "{JWT}jwks_url: http://127.0.0.1:1/jwks\nallowed_algorithms: [ES256, PS384]\n\
         leeway: 5s\nrequire_at_jwt_typ: true\njwks_refresh_interval: 1m\n\
         jwks_min_refetch_interval: 2s\nmethod_required_scopes: {{POST: [write], DELETE: [admin]}}\n\
         allow_cors_preflight: true\nallow_token_in_query: true\n"
    );
    let settings = check(&yaml).unwrap();
    let TokenCheck::Jwt(jwt) = &settings.token_check else {
        panic!("token_format jwt");
    };
    assert_eq!(
        jwt.keys.source,
        KeySource::JwksUrl("http://127.0.0.1:1/jwks".into())
    );
    assert_eq!(
        jwt.algorithms,
        [
            jsonwebtoken::Algorithm::ES256,
            jsonwebtoken::Algorithm::PS384
        ]
    );
    assert_eq!(jwt.leeway, Duration::from_secs(5));
    assert!(jwt.require_at_jwt_typ);
    assert_eq!(jwt.keys.refresh_interval, Duration::from_secs(60));
    assert_eq!(jwt.keys.min_refetch_interval, Duration::from_secs(2));
    assert_eq!(settings.method_required_scopes[&Method::POST], ["write"]);
    assert_eq!(settings.method_required_scopes[&Method::DELETE], ["admin"]);
    assert!(settings.allow_cors_preflight);
    assert!(settings.allow_token_in_query);
}

#[test]
fn none_and_hmac_algorithms_rejected() {
    for alg in ["none", "HS256", "hs512"] {
        let yaml = format!("{JWT}allowed_algorithms: [ES256, {alg}]\n");
        let message = problem_for(&yaml, "allowed_algorithms[1]");
        assert!(message.contains("never accepted"), "{alg}: {message}");
    }
    let message = problem_for(
        &format!("{JWT}allowed_algorithms: [ES257]\n"),
        "allowed_algorithms[0]",
    );
    assert!(message.contains("not a supported algorithm"), "{message}");
    let message = problem_for(
        &format!("{JWT}allowed_algorithms: []\n"),
        "allowed_algorithms",
    );
    assert!(message.contains("is empty"), "{message}");
}

#[test]
fn jwt_requires_issuer_and_audiences() {
    let message = problem_for("token_format: jwt\naudiences: [a]\n", "issuer");
    assert!(message.contains("missing"), "{message}");
    let message = problem_for(
        "token_format: jwt\nissuer: http://127.0.0.1:1\n",
        "audiences",
    );
    assert!(message.contains("RFC 9068"), "{message}");
    let message = problem_for(
        "token_format: jwt\nissuer: ftp://idp\naudiences: [a]\n",
        "issuer",
    );
    assert!(message.contains("use http or https"), "{message}");
}

#[test]
fn format_specific_fields_rejected_with_the_other_format() {
    let message = problem_for(&format!("{OPAQUE}issuer: http://127.0.0.1:1\n"), "issuer");
    assert!(message.contains("only with token_format: jwt"), "{message}");
    let message = problem_for(
        &format!("{JWT}introspection_url: http://127.0.0.1:1/i\n"),
        "introspection_url",
    );
    assert!(
        message.contains("only with token_format: opaque"),
        "{message}"
    );
    let message = problem_for(
        &format!("{JWT}introspection_cache_ttl: 10s\n"),
        "introspection_cache_ttl",
    );
    assert!(
        message.contains("only with token_format: opaque"),
        "{message}"
    );
}

#[test]
fn limits_rejected() {
    let message = problem_for(&format!("{JWT}leeway: 10m\n"), "leeway");
    assert!(message.contains("synchronize"), "{message}");
    let message = problem_for(
        &format!("{JWT}jwks_min_refetch_interval: 100ms\n"),
        "jwks_min_refetch_interval",
    );
    assert!(message.contains("shorter than"), "{message}");
    let message = problem_for(
        &format!("{OPAQUE}introspection_negative_cache_ttl: 5m\n"),
        "introspection_negative_cache_ttl",
    );
    assert!(message.contains("briefly"), "{message}");
}

#[test]
fn method_names_must_be_upper_case() {
    let message = problem_for(
        &format!("{OPAQUE}method_required_scopes: {{get: [read]}}\n"),
        "method_required_scopes.get",
    );
    assert!(message.contains("upper case"), "{message}");
    let message = problem_for(
        &format!("{OPAQUE}method_required_scopes: {{POST: [\"a b\"]}}\n"),
        "method_required_scopes.POST[0]",
    );
    assert!(message.contains("not a valid scope"), "{message}");
}

#[test]
fn validator_fields_rejected_on_creator() {
    let params: Parameters = serde_yaml::from_str(
        "token_endpoint: http://127.0.0.1:1/token\nclient_id: a\nclient_secret: ${SECRET}\n\
         issuer: http://127.0.0.1:1\nallow_token_in_query: true\n",
    )
    .unwrap();
    let mut problems = crate::config::Problems::default();
    let env = |_: &str| None;
    check_parameters(
        PluginType::TokenCreator,
        "c",
        &params,
        "p",
        Path::new("/"),
        &env,
        &mut problems,
    );
    let keys: Vec<&str> = problems.0.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"p.issuer"), "{keys:?}");
    assert!(keys.contains(&"p.allow_token_in_query"), "{keys:?}");
}
