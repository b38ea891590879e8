use std::path::{Path, PathBuf};

use super::super::{PluginKind, PluginType, check_parameters};
use super::*;
use crate::config::Problems;
use crate::oauth::assertion::SigningAlgorithm;

/// The folder of the unit-test keys, so `file:ec-p256.pem` resolves.
fn key_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/client-keys")
}

fn env(name: &str) -> Option<String> {
    (name == "FRONTEND_SECRET").then(|| "s3cret".to_string())
}

/// Checks `yaml` as the parameters of `plugin_type` and returns the settings and every
/// problem as `key: message`.
fn check(plugin_type: PluginType, yaml: &str) -> (Option<PluginKind>, Vec<String>) {
    let params: Parameters = serde_yaml::from_str(yaml).unwrap();
    let mut problems = Problems::default();
    let kind = check_parameters(
        plugin_type,
        "test",
        &params,
        "plugins[0].parameters",
        &key_dir(),
        &env,
        &mut problems,
    );
    let messages = problems
        .0
        .iter()
        .map(|p| format!("{}: {}", p.key, p.message))
        .collect();
    (kind, messages)
}

fn creator(yaml: &str) -> Result<Arc<CreatorSettings>, Vec<String>> {
    match check(PluginType::TokenCreator, yaml) {
        (Some(PluginKind::Creator(settings)), problems) if problems.is_empty() => Ok(settings),
        (_, problems) => Err(problems),
    }
}

/// Asserts that `problems` has exactly one entry, for `key`, containing `text`.
fn assert_one_problem(problems: &[String], key: &str, text: &str) {
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let prefix = format!("plugins[0].parameters.{key}: ");
    assert!(problems[0].starts_with(&prefix), "{problems:#?}");
    assert!(problems[0].contains(text), "{problems:#?}");
}

const BASE: &str = "token_endpoint: https://idp.example.test/token\nclient_id: frontend\n";

#[test]
fn secret_creator_gets_defaults() {
    let settings = creator(&format!("{BASE}client_secret: ${{FRONTEND_SECRET}}\n")).unwrap();
    let creds = &settings.credentials;
    assert!(matches!(
        &creds.authentication,
        ClientAuthentication::Secret { method: ClientAuthMethod::ClientSecretBasic, secret }
            if secret.expose() == "s3cret"
    ));
    assert_eq!(creds.retry, RetryPolicy::default());
    assert_eq!(creds.retry.max_attempts, 4);
    assert_eq!(creds.retry.timeout, Duration::from_secs(10));
    assert_eq!(creds.min_request_interval, Duration::from_secs(2));
    assert_eq!(creds.audience, None);
    assert!(creds.resources.is_empty());
}

#[test]
fn all_token_options_apply() {
    let settings = creator(&format!(
        "{BASE}client_secret: ${{FRONTEND_SECRET}}\nclient_auth_method: client_secret_post\n\
         scopes: [read]\naudience: https://api.example.test\n\
         resources: [\"https://a.example.test/\", \"urn:example:b\"]\n\
         token_request_attempts: 1\ntoken_request_timeout: 3s\n\
         token_request_min_interval: 500ms\n"
    ))
    .unwrap();
    let creds = &settings.credentials;
    assert!(matches!(
        creds.authentication,
        ClientAuthentication::Secret {
            method: ClientAuthMethod::ClientSecretPost,
            ..
        }
    ));
    assert_eq!(creds.scopes, ["read"]);
    assert_eq!(creds.audience.as_deref(), Some("https://api.example.test"));
    assert_eq!(
        creds.resources,
        ["https://a.example.test/", "urn:example:b"]
    );
    assert_eq!(creds.retry.max_attempts, 1);
    assert_eq!(creds.retry.timeout, Duration::from_secs(3));
    assert_eq!(creds.min_request_interval, Duration::from_millis(500));
}

#[test]
fn private_key_jwt_loads_key() {
    let settings = creator(&format!(
        "{BASE}client_auth_method: private_key_jwt\nprivate_key: file:ec-p256.pem\n\
         key_id: k1\nassertion_lifetime: 2m\n"
    ))
    .unwrap();
    let ClientAuthentication::PrivateKeyJwt(signer) = &settings.credentials.authentication else {
        panic!("expected a private key");
    };
    assert_eq!(signer.algorithm(), SigningAlgorithm::ES256);
    let printed = format!("{settings:?}");
    assert!(printed.contains("file:ec-p256.pem"), "{printed}");
    let key_line = std::fs::read_to_string(key_dir().join("ec-p256.pem")).unwrap();
    assert!(
        !printed.contains(key_line.lines().nth(1).unwrap()),
        "{printed}"
    );
}

#[test]
fn private_key_jwt_needs_key() {
    let problems = creator(&format!("{BASE}client_auth_method: private_key_jwt\n")).unwrap_err();
    assert_one_problem(&problems, "private_key", "is missing");
    assert!(problems[0].contains("file:"), "{problems:#?}");
}

#[test]
fn private_key_jwt_rejects_secret() {
    let problems = creator(&format!(
        "{BASE}client_auth_method: private_key_jwt\nprivate_key: file:ec-p256.pem\n\
         client_secret: ${{FRONTEND_SECRET}}\n"
    ))
    .unwrap_err();
    assert_one_problem(&problems, "client_secret", "private_key_jwt");
}

#[test]
fn secret_method_rejects_key_options() {
    let problems = creator(&format!(
        "{BASE}client_secret: ${{FRONTEND_SECRET}}\nprivate_key: file:ec-p256.pem\n\
         signing_alg: ES256\n"
    ))
    .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(problems[0].starts_with("plugins[0].parameters.private_key: applies only"));
    assert!(problems[1].starts_with("plugins[0].parameters.signing_alg: applies only"));
}

#[test]
fn signing_alg_must_fit_key() {
    let problems = creator(&format!(
        "{BASE}client_auth_method: private_key_jwt\nprivate_key: file:ec-p256.pem\n\
         signing_alg: PS256\n"
    ))
    .unwrap_err();
    assert_one_problem(&problems, "private_key", "PS256 needs an RSA key");
}

#[test]
fn unreadable_key_file_named() {
    let problems = creator(&format!(
        "{BASE}client_auth_method: private_key_jwt\nprivate_key: file:absent.pem\n"
    ))
    .unwrap_err();
    assert_one_problem(&problems, "private_key", "absent.pem");
}

#[test]
fn sec1_key_gets_conversion_hint() {
    let problems = creator(&format!(
        "{BASE}client_auth_method: private_key_jwt\nprivate_key: file:ec-p256-sec1.pem\n"
    ))
    .unwrap_err();
    assert_one_problem(&problems, "private_key", "openssl pkcs8");
}

#[test]
fn assertion_lifetime_bounded() {
    for lifetime in ["1s", "2h"] {
        let problems = creator(&format!(
            "{BASE}client_auth_method: private_key_jwt\nprivate_key: file:ec-p256.pem\n\
             assertion_lifetime: {lifetime}\n"
        ))
        .unwrap_err();
        assert_one_problem(&problems, "assertion_lifetime", "out of range");
    }
}

#[test]
fn invalid_resources_rejected() {
    let problems = creator(&format!(
        "{BASE}client_secret: ${{FRONTEND_SECRET}}\n\
         resources: [\"https://api.example.test/#part\", \"/relative\"]\n"
    ))
    .unwrap_err();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with("plugins[0].parameters.resources[0]: ")
            && problems[0].contains("fragment"),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with("plugins[0].parameters.resources[1]: ")
            && problems[1].contains("absolute URI"),
        "{problems:#?}"
    );
}

#[test]
fn empty_audience_rejected() {
    let problems = creator(&format!(
        "{BASE}client_secret: ${{FRONTEND_SECRET}}\naudience: \" \"\n"
    ))
    .unwrap_err();
    assert_one_problem(&problems, "audience", "is empty");
}

#[test]
fn retry_settings_bounded() {
    for (line, key) in [
        ("token_request_attempts: 0", "token_request_attempts"),
        ("token_request_attempts: 11", "token_request_attempts"),
        ("token_request_timeout: 0s", "token_request_timeout"),
        ("token_request_timeout: 10m", "token_request_timeout"),
        (
            "token_request_min_interval: 10ms",
            "token_request_min_interval",
        ),
        (
            "token_request_min_interval: 1h",
            "token_request_min_interval",
        ),
    ] {
        let problems = creator(&format!(
            "{BASE}client_secret: ${{FRONTEND_SECRET}}\n{line}\n"
        ))
        .unwrap_err();
        assert_one_problem(&problems, key, "out of range");
    }
}

#[test]
fn validator_rejects_creator_options() {
    let (_, problems) = check(
        PluginType::TokenValidator,
        "introspection_url: https://idp.example.test/introspect\n\
         introspection_client_id: validator\n\
         introspection_client_secret: ${FRONTEND_SECRET}\n\
         private_key: file:ec-p256.pem\naudience: x\nresources: [\"urn:x\"]\n\
         token_request_attempts: 2\n",
    );
    for field in [
        "private_key",
        "audience",
        "resources",
        "token_request_attempts",
    ] {
        let expected =
            format!("plugins[0].parameters.{field}: does not apply to a token-validator plugin");
        assert!(
            problems.iter().any(|p| p.starts_with(&expected)),
            "{field}: {problems:#?}"
        );
    }
}
