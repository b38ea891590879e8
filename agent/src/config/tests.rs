use std::{collections::HashMap, path::Path};

use super::*;

const VALID: &str = r#"
workloads:
  file: workloads.yaml
steering:
  pods_cgroup: tokenmesh/pods
  intercept_ports: [8080]
audit:
  path: audit.jsonl
plugins:
  - id: frontend-token
    type: token-creator
    workloads:
      service_account: frontend
    parameters:
      token_endpoint: http://127.0.0.1:4000/token
      client_id: frontend
      client_secret: ${FRONTEND_SECRET}
      scopes: [admin]
  - id: echo-validator
    type: token-validator
    workloads:
      service_account: echo
    parameters:
      introspection_url: http://127.0.0.1:4000/token/introspection
      introspection_client_id: echo
      introspection_client_secret: ${ECHO_SECRET}
      required_scopes: [admin]
      allowed_client_ids: [frontend]
      allowed_cidrs: [10.0.0.2/32]
"#;

fn env() -> impl Fn(&str) -> Option<String> {
    let map: HashMap<&str, &str> = [("FRONTEND_SECRET", "f-secret"), ("ECHO_SECRET", "e-secret")]
        .into_iter()
        .collect();
    move |name| map.get(name).map(|v| v.to_string())
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("/etc/tokenmesh/agent.yaml"), &env())
}

fn problems(text: &str) -> Vec<Problem> {
    parse(text).unwrap_err().problems
}

#[test]
fn valid_file_parses_with_defaults() {
    let config = parse(VALID).unwrap();
    assert_eq!(
        config.workloads_file.as_deref(),
        Some(Path::new("/etc/tokenmesh/workloads.yaml"))
    );
    assert_eq!(config.kubernetes, None);
    assert_eq!(config.audit.path, Path::new("/etc/tokenmesh/audit.jsonl"));
    assert_eq!(config.steering.outbound_port, 15001);
    assert_eq!(config.steering.inbound_port, 15006);
    assert_eq!(config.steering.on_exit, OnExit::Keep);
    assert_eq!(config.plugins.len(), 2);
    let PluginKind::Validator(validator) = &config.plugins[1].kind else {
        panic!("second plugin is not a validator");
    };
    assert_eq!(validator.allowed_cidrs[0].to_string(), "10.0.0.2/32");
    assert_eq!(validator.client_id_header.as_str(), "x-tokenmesh-client-id");
    assert!(validator.header.bearer);
    assert!(validator.remove_token_header);
    let TokenCheck::Introspection { endpoint, .. } = &validator.token_check else {
        panic!("the validator does not use introspection");
    };
    assert_eq!(endpoint.client_secret.expose(), "e-secret");
}

#[test]
fn debug_output_hides_secrets() {
    let config = parse(VALID).unwrap();
    let printed = format!("{config:?}");
    assert!(!printed.contains("f-secret"), "{printed}");
    assert!(!printed.contains("e-secret"), "{printed}");
    assert!(printed.contains("${FRONTEND_SECRET}"));
}

#[test]
fn unknown_key_names_line() {
    let text = VALID.replace(
        "  intercept_ports: [8080]",
        "  intercept_ports: [8080]\n  colour: red",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1);
    assert!(
        found[0].message.contains("unknown field `colour`"),
        "{found:?}"
    );
    assert_eq!(found[0].location.map(|at| at.line), Some(7), "{found:?}");
    assert!(
        !found[0].message.contains(" at line "),
        "location printed twice: {found:?}"
    );
}

#[test]
fn bad_cidr_named_with_key_and_value() {
    let text = VALID.replace("[10.0.0.2/32]", "[10.0.0.2/33, 10.0.0.9/24]");
    let found = problems(&text);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].key, "plugins[1].parameters.allowed_cidrs[0]");
    assert!(found[0].message.contains("\"10.0.0.2/33\""), "{found:?}");
    assert_eq!(found[1].key, "plugins[1].parameters.allowed_cidrs[1]");
    assert!(
        found[1].message.contains("did you mean 10.0.0.0/24"),
        "{found:?}"
    );
}

#[test]
fn missing_secret_file_named() {
    let text = VALID.replace("${ECHO_SECRET}", "file:/nonexistent/echo-secret");
    let found = problems(&text);
    assert_eq!(found.len(), 1);
    assert_eq!(
        found[0].key,
        "plugins[1].parameters.introspection_client_secret"
    );
    assert!(
        found[0].message.contains("/nonexistent/echo-secret"),
        "{found:?}"
    );
}

#[test]
fn every_problem_reported_at_once() {
    let text = VALID
        .replace("${FRONTEND_SECRET}", "${UNSET_VAR}")
        .replace("http://127.0.0.1:4000/token\n", "ftp://idp/token\n")
        .replace("[8080]", "[15001]");
    let error = parse(&text).unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "steering.outbound_port",
            "plugins[0].parameters.token_endpoint",
            "plugins[0].parameters.client_secret",
        ]
    );
    let shown = error.to_string();
    assert!(
        shown.starts_with("invalid config file /etc/tokenmesh/agent.yaml: 3 problems"),
        "{shown}"
    );
    assert!(shown.contains("UNSET_VAR"), "{shown}");
    assert!(
        shown.contains("  - line 5 column 3: steering.outbound_port"),
        "{shown}"
    );
    assert!(
        shown.contains("  - line 15 column 23: plugins[0].parameters.token_endpoint"),
        "{shown}"
    );
}

#[test]
fn creator_parameter_on_validator_rejected() {
    let text = VALID.replace(
        "      required_scopes: [admin]",
        "      required_scopes: [admin]\n      scopes: [read]",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "plugins[1].parameters.scopes");
    assert!(
        found[0]
            .message
            .contains("does not apply to a token-validator")
    );
}

#[test]
fn duplicate_plugin_id_rejected() {
    let text = VALID.replace("id: echo-validator", "id: frontend-token");
    let found = problems(&text);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "plugins[1].id");
}

#[test]
fn jwt_format_rejects_introspection_fields() {
    let text = VALID.replace(
        "      required_scopes: [admin]",
        "      required_scopes: [admin]\n      token_format: jwt",
    );
    let found = problems(&text);
    assert_eq!(found[0].key, "plugins[1].parameters.introspection_url");
    assert!(found[0].message.contains("only with token_format: opaque"));
    assert!(
        found
            .iter()
            .any(|p| p.key == "plugins[1].parameters.issuer")
    );
}

#[test]
fn custom_token_header_is_raw() {
    let text = VALID.replace(
        "      scopes: [admin]",
        "      scopes: [admin]\n      header_with_token: SlashID_Signature",
    );
    let config = parse(&text).unwrap();
    let PluginKind::Creator(creator) = &config.plugins[0].kind else {
        panic!("first plugin is not a creator");
    };
    assert_eq!(creator.header.name.as_str(), "slashid_signature");
    assert!(!creator.header.bearer);
}

#[test]
fn equal_listener_ports_rejected() {
    let text = VALID.replace(
        "  intercept_ports: [8080]",
        "  intercept_ports: [8080]\n  inbound_port: 15001",
    );
    let found = problems(&text);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "steering.inbound_port");
}

#[test]
fn shipped_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("frontend");
    std::fs::write(&secret, "example\n").unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/agent.yaml");
    let text = std::fs::read_to_string(example)
        .unwrap()
        .replace("/etc/tokenmesh/secrets/frontend", secret.to_str().unwrap());
    let env = |name: &str| (name == "ECHO_VALIDATOR_SECRET").then(|| "s".to_string());
    let config = Config::parse(&text, Path::new(example), &env).unwrap();
    assert_eq!(config.plugins.len(), 2);
    assert_eq!(config.urls.len(), 1);
    assert_eq!(config.steering.intercept_ports, [8080]);

    let workloads = config.workloads_file.clone().unwrap();
    let pods = crate::workloads::load_file(&workloads, Path::new("/sys/fs/cgroup")).unwrap();
    assert_eq!(pods.len(), 2);
    let policy = crate::policy::Policy::from_config(&config, 1);
    let target = crate::policy::pattern::Target {
        host: None,
        ip: pods[1].ip.into(),
        port: 8080,
        path: "/",
    };
    let validator = policy.validator_for(&pods[1], &target).settings.unwrap();
    assert_eq!(validator.plugin_id, "echo-validator");
    assert!(policy.creator_for(&pods[1], &target).settings.is_none());
    let health = crate::policy::pattern::Target {
        path: "/healthz",
        ..target
    };
    assert!(policy.validator_for(&pods[1], &health).settings.is_none());
}

#[test]
fn kubernetes_source_without_file() {
    let text = VALID.replace(
        "  file: workloads.yaml",
        "  kubernetes:\n    node_name: ${NODE_NAME}\n    cgroup_driver: systemd",
    );
    let env = |name: &str| match name {
        "NODE_NAME" => Some("worker-3".to_string()),
        _ => Some("secret".to_string()),
    };
    let config = Config::parse(&text, Path::new("/etc/tokenmesh/agent.yaml"), &env).unwrap();
    assert_eq!(config.workloads_file, None);
    let kubernetes = config.kubernetes.unwrap();
    assert_eq!(kubernetes.node_name, "worker-3");
    assert_eq!(
        kubernetes.cgroup_driver,
        Some(crate::workloads::cgroups::CgroupDriver::Systemd)
    );
}

#[test]
fn workloads_without_source_rejected() {
    let text = VALID.replace("  file: workloads.yaml", "  {}");
    let text = text.replace("workloads:\n  {}", "workloads: {}");
    let found = problems(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "workloads");
    assert!(
        found[0].message.contains("names no source"),
        "{}",
        found[0].message
    );
}

#[test]
fn kubernetes_problems_carry_keys() {
    let text = VALID.replace(
        "  file: workloads.yaml",
        "  kubernetes:\n    node_name: ${NO_SUCH_VAR}\n    resolve_retry: 0s",
    );
    let env = |name: &str| (name != "NO_SUCH_VAR").then(|| "secret".to_string());
    let error = Config::parse(&text, Path::new("/etc/tokenmesh/agent.yaml"), &env).unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "workloads.kubernetes.node_name",
            "workloads.kubernetes.resolve_retry"
        ]
    );
}
