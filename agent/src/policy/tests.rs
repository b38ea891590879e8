use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use super::{Policy, pattern::Target};
use crate::{
    config::Config,
    workloads::{Pod, PodIdentity},
};

const CONFIG: &str = r#"
workloads:
  file: workloads.yaml
steering:
  pods_cgroup: pods
  intercept_ports: [8080]
plugins:
  - id: frontend-token
    type: token-creator
    workloads: { service_account: frontend }
    parameters:
      token_endpoint: http://127.0.0.1:4000/token
      client_id: frontend
      client_secret: ${SECRET}
      scopes: [read]
  - id: labelled-token
    type: token-creator
    workloads: { labels: { team: payments } }
    parameters:
      token_endpoint: http://127.0.0.1:4000/token
      client_id: payments
      client_secret: ${SECRET}
  - id: echo-validator
    type: token-validator
    workloads: { service_account: echo }
    parameters:
      introspection_url: http://127.0.0.1:4000/token/introspection
      introspection_client_id: echo
      introspection_client_secret: ${SECRET}
      required_scopes: [read]
  - id: strict-validator
    type: token-validator
    enabled: false
    parameters:
      introspection_url: http://127.0.0.1:4000/token/introspection
      introspection_client_id: echo
      introspection_client_secret: ${SECRET}
      required_scopes: [admin]
urls:
  - pattern: "*/healthz"
    plugins:
      echo-validator: { enabled: false }
  - pattern: "*/api/admin*"
    plugins:
      strict-validator: { enabled: true }
      frontend-token: { parameters: { scopes: [admin] } }
  - pattern: "*/api/*"
    plugins:
      echo-validator: { parameters: { required_scopes: [read, write] } }
  - pattern: "*/api/admin/never"
    plugins:
      echo-validator: { enabled: false }
"#;

fn policy(text: &str) -> Policy {
    let env = |_: &str| Some("secret".to_string());
    let config = Config::parse(text, Path::new("/etc/tokenmesh/agent.yaml"), &env).unwrap();
    Policy::from_config(&config, 1)
}

fn pod(name: &str, account: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        identity: PodIdentity {
            namespace: "shop".into(),
            name: name.into(),
            service_account: account.into(),
        },
        ip: Ipv4Addr::new(10, 0, 0, 3),
        netns: format!("/run/netns/{name}").into(),
        cgroup: format!("/sys/fs/cgroup/pods/{name}").into(),
        protected_ports: vec![8080],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        credentials: None,
        probe_exemption: Default::default(),
    }
}

fn target(path: &str) -> Target<'_> {
    Target {
        host: Some("echo.shop"),
        ip: "10.0.0.3".parse().unwrap(),
        port: 8080,
        path,
    }
}

#[test]
fn rule_precedence_table() {
    let policy = policy(CONFIG);
    let echo = pod("echo", "echo", &[]);
    // (path, rule index, validator id, required scopes)
    let cases: &[(&str, Option<usize>, Option<&str>, &[&str])] = &[
        ("/healthz", Some(0), None, &[]),
        (
            "/api/admin/users",
            Some(1),
            Some("echo-validator"),
            &["read"],
        ),
        (
            "/api/orders",
            Some(2),
            Some("echo-validator"),
            &["read", "write"],
        ),
        (
            "/api/admin/never",
            Some(1),
            Some("echo-validator"),
            &["read"],
        ),
        ("/other", None, Some("echo-validator"), &["read"]),
    ];
    for (path, rule, id, scopes) in cases {
        let selection = policy.validator_for(&echo, &target(path));
        assert_eq!(selection.rule, *rule, "{path}");
        let settings = selection.settings;
        assert_eq!(
            settings.as_ref().map(|s| s.plugin_id.as_str()),
            *id,
            "{path}"
        );
        if let Some(settings) = settings {
            assert_eq!(settings.required_scopes, *scopes, "{path}");
        }
    }
}

#[test]
fn disabled_plugin_enabled_by_rule() {
    let policy = policy(CONFIG);
    // The strict validator selects every pod but is off unless a rule enables it. The
    // echo validator comes first for echo, so another pod is used to reach the strict one.
    let other = pod("other", "other", &[]);
    assert!(
        policy
            .validator_for(&other, &target("/x"))
            .settings
            .is_none()
    );
    let strict = policy
        .validator_for(&other, &target("/api/admin/x"))
        .settings
        .unwrap();
    assert_eq!(strict.plugin_id, "strict-validator");
    assert_eq!(strict.required_scopes, ["admin"]);
}

#[test]
fn rule_overrides_creator_parameters() {
    let policy = policy(CONFIG);
    let frontend = pod("frontend", "frontend", &[]);
    let plain = policy
        .creator_for(&frontend, &target("/api/orders"))
        .settings
        .unwrap();
    assert_eq!(plain.credentials.scopes, ["read"]);
    let admin = policy
        .creator_for(&frontend, &target("/api/admin/x"))
        .settings
        .unwrap();
    assert_eq!(admin.credentials.scopes, ["admin"]);
    assert_eq!(admin.credentials.client_id.0, "frontend");
}

#[test]
fn labels_select_plugin() {
    let policy = policy(CONFIG);
    let payments = pod("pay", "pay", &[("team", "payments"), ("tier", "web")]);
    let creator = policy
        .creator_for(&payments, &target("/"))
        .settings
        .unwrap();
    assert_eq!(creator.plugin_id, "labelled-token");
    let unlabelled = pod("pay", "pay", &[("team", "search")]);
    assert!(
        policy
            .creator_for(&unlabelled, &target("/"))
            .settings
            .is_none()
    );
}

#[test]
fn rule_errors_name_their_keys() {
    let text = CONFIG.replace("*/healthz", "/healthz").replace(
        "      echo-validator: { parameters: { required_scopes: [read, write] } }",
        "      echo-validator: { parameters: { required_scopes: [read], allowed_cidrs: [10.0.0.1/33] } }\n      missing-plugin: { enabled: true }",
    );
    let env = |_: &str| Some("secret".to_string());
    let error = Config::parse(&text, Path::new("/a.yaml"), &env).unwrap_err();
    let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "urls[0].pattern",
            "urls[2].plugins.echo-validator.parameters.allowed_cidrs[0]",
            "urls[2].plugins.missing-plugin",
        ]
    );
}

#[test]
fn unknown_rule_parameter_has_location() {
    let text = CONFIG.replace("scopes: [admin] } }", "scopes: [admin], colour: red } }");
    let env = |_: &str| Some("secret".to_string());
    let error = Config::parse(&text, Path::new("/a.yaml"), &env).unwrap_err();
    assert_eq!(error.problems.len(), 1);
    let message = &error.problems[0].message;
    assert!(message.contains("unknown field `colour`"), "{message}");
    assert_eq!(
        error.problems[0].location.map(|at| at.line),
        Some(46),
        "{message}"
    );
}

#[test]
fn credentials_annotation_narrows_creators() {
    let policy = policy(CONFIG);
    // Matches frontend-token (service account) and labelled-token (label).
    let mut both = pod("front", "frontend", &[("team", "payments")]);
    let first = policy.creator_for(&both, &target("/")).settings.unwrap();
    assert_eq!(first.plugin_id, "frontend-token");

    both.credentials = Some("labelled-token".into());
    let chosen = policy.creator_for(&both, &target("/")).settings.unwrap();
    assert_eq!(chosen.plugin_id, "labelled-token");

    // A plugin whose selector does not match the pod cannot be chosen.
    let mut unlabelled = pod("front", "frontend", &[]);
    unlabelled.credentials = Some("labelled-token".into());
    assert!(
        policy
            .creator_for(&unlabelled, &target("/"))
            .settings
            .is_none()
    );

    // The annotation does not change which validator applies.
    let mut echo = pod("echo", "echo", &[]);
    echo.credentials = Some("labelled-token".into());
    assert!(policy.validator_for(&echo, &target("/")).settings.is_some());
}
