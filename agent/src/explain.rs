//! `tokenmesh-agent explain`: which rule and plugins would apply to a request from a pod to
//! a URL, and why, computed from the files alone without touching the node.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{Context, bail};

use crate::{
    config::Config,
    policy::{Policy, Selection, pattern::Target},
    workloads::Pod,
};

/// Describes what the agent would do with a request from `from` (a pod name or
/// `namespace/name`) to `url`.
pub fn explain(config: &Config, pods: &[Pod], from: &str, url: &str) -> anyhow::Result<String> {
    let source = find_pod(pods, from)?;
    let url = url::Url::parse(url)
        .with_context(|| format!("{url:?} is not a URL such as http://10.0.0.3:8080/api"))?;
    let host = url.host_str().context("the URL has no host")?;
    let port = url
        .port_or_known_default()
        .context("the URL has no port and its scheme has no default port")?;
    let destination_pod = pods
        .iter()
        .find(|pod| pod.ip.to_string() == host || pod.identity.name == host);
    let ip: IpAddr = match (host.parse::<IpAddr>(), destination_pod) {
        (Ok(ip), _) => ip,
        (Err(_), Some(pod)) => pod.ip.into(),
        (Err(_), None) => Ipv4Addr::UNSPECIFIED.into(),
    };
    let target = Target {
        host: Some(host),
        ip,
        port,
        path: url.path(),
    };
    let policy = Policy::from_config(config, 1);
    let mut out = String::new();

    writeln!(out, "request: {} -> {url}", source.identity)?;
    if url.scheme() != "http" {
        writeln!(
            out,
            "\n{} is not plain HTTP: the agent does not terminate TLS, so on an intercepted port the connection passes through as TCP without a token and is audited as a flow; at a protected port the validator's non_http setting decides (deny closes it)",
            url.scheme()
        )?;
        return Ok(out);
    }
    writeln!(out, "\noutbound (leaving {}):", source.identity)?;
    if !config.steering.intercept_ports.contains(&port) {
        writeln!(
            out,
            "  port {port} is not in steering.intercept_ports: the connection is not steered, no token is added and nothing is audited"
        )?;
    } else {
        describe_rule(&mut out, &policy, &target)?;
        let creator = policy.creator_for(source, &target);
        describe_creator(&mut out, &creator)?;
    }

    writeln!(out, "\ninbound:")?;
    let Some(destination) = destination_pod else {
        writeln!(
            out,
            "  {host} is not a pod in the workloads file: no validator of this agent applies"
        )?;
        return Ok(out);
    };
    if !destination.protected_ports.contains(&port) {
        writeln!(
            out,
            "  port {port} is not a protected port of {}: the request reaches the app unchecked",
            destination.identity
        )?;
        return Ok(out);
    }
    describe_rule(&mut out, &policy, &target)?;
    let validator = policy.validator_for(destination, &target);
    let Some(settings) = &validator.settings else {
        writeln!(
            out,
            "  no enabled token-validator selects {} here: the request reaches the app unchecked",
            destination.identity
        )?;
        return Ok(out);
    };
    writeln!(out, "  validator: {}", settings.plugin_id)?;
    writeln!(
        out,
        "  required scopes: {}",
        list(&settings.required_scopes, "(none)")
    )?;
    let clients: Vec<String> = settings
        .allowed_client_ids
        .iter()
        .map(|c| c.0.clone())
        .collect();
    writeln!(out, "  allowed client ids: {}", list(&clients, "(any)"))?;
    let networks: Vec<String> = settings
        .allowed_cidrs
        .iter()
        .map(ToString::to_string)
        .collect();
    writeln!(
        out,
        "  allowed source networks: {}",
        list(&networks, "(any)")
    )?;
    let source_ip = IpAddr::from(source.ip);
    let source_allowed = settings.allowed_cidrs.is_empty()
        || settings
            .allowed_cidrs
            .iter()
            .any(|n| n.contains(&source_ip));
    let verdict = if source_allowed {
        "allowed"
    } else {
        "REJECTED with 403 source_ip_not_allowed"
    };
    writeln!(out, "  source address {source_ip}: {verdict}")?;
    Ok(out)
}

fn find_pod<'p>(pods: &'p [Pod], name: &str) -> anyhow::Result<&'p Pod> {
    let found: Vec<&Pod> = pods
        .iter()
        .filter(|pod| pod.identity.to_string() == name || pod.identity.name == name)
        .collect();
    match found.as_slice() {
        [pod] => Ok(pod),
        [] => {
            let known: Vec<String> = pods.iter().map(|pod| pod.identity.to_string()).collect();
            bail!(
                "no pod {name:?} in the workloads file; give its name or namespace/name, one of: {}",
                known.join(", ")
            )
        }
        _ => bail!("{name:?} names several pods; give namespace/name"),
    }
}

fn describe_rule(out: &mut String, policy: &Policy, target: &Target<'_>) -> std::fmt::Result {
    match policy.rule_for(target) {
        Some(rule) => writeln!(
            out,
            "  rule: urls[{}] {:?} matches (first match wins)",
            rule.index,
            rule.pattern.to_string()
        ),
        None => writeln!(out, "  rule: none matches; plugins apply as defined"),
    }
}

fn describe_creator(
    out: &mut String,
    creator: &Selection<crate::config::CreatorSettings>,
) -> std::fmt::Result {
    match &creator.settings {
        Some(settings) => {
            let credentials = &settings.credentials;
            writeln!(out, "  token creator: {}", settings.plugin_id)?;
            writeln!(out, "  client id: {}", credentials.client_id)?;
            writeln!(
                out,
                "  scopes requested: {}",
                list(&credentials.scopes, "(none: the client's default scopes)")
            )?;
            writeln!(out, "  token header: {}", settings.header.name)
        }
        None => writeln!(
            out,
            "  no enabled token-creator selects this pod here: the request is forwarded without a token"
        ),
    }
}

fn list(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_string()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

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
      scopes: [admin]
  - id: echo-validator
    type: token-validator
    workloads: { service_account: echo }
    parameters:
      introspection_url: http://127.0.0.1:4000/token/introspection
      introspection_client_id: echo
      introspection_client_secret: ${SECRET}
      required_scopes: [admin]
      allowed_client_ids: [frontend]
      allowed_cidrs: [10.0.0.2/32]
urls:
  - pattern: "*/healthz"
    plugins:
      echo-validator: { enabled: false }
"#;

    fn pod(name: &str, ip: [u8; 4]) -> Pod {
        Pod {
            identity: crate::workloads::PodIdentity {
                namespace: "shop".into(),
                name: name.into(),
                service_account: name.into(),
            },
            ip: ip.into(),
            netns: format!("/run/netns/{name}").into(),
            cgroup: format!("/sys/fs/cgroup/{name}").into(),
            protected_ports: if name == "echo" { vec![8080] } else { vec![] },
            labels: Default::default(),
            credentials: None,
            probe_exemption: Default::default(),
        }
    }

    fn setup() -> (Config, Vec<Pod>) {
        let env = |_: &str| Some("s".to_string());
        let config = Config::parse(CONFIG, Path::new("/etc/agent.yaml"), &env).unwrap();
        let pods = vec![
            pod("frontend", [10, 0, 0, 2]),
            pod("echo", [10, 0, 0, 3]),
            pod("other", [10, 0, 0, 4]),
        ];
        (config, pods)
    }

    #[test]
    fn allowed_call_explained() {
        let (config, pods) = setup();
        let text = explain(&config, &pods, "frontend", "http://10.0.0.3:8080/api").unwrap();
        assert!(text.contains("token creator: frontend-token"), "{text}");
        assert!(text.contains("validator: echo-validator"), "{text}");
        assert!(text.contains("source address 10.0.0.2: allowed"), "{text}");
    }

    #[test]
    fn rule_and_source_explained() {
        let (config, pods) = setup();
        let text = explain(&config, &pods, "shop/other", "http://echo:8080/healthz").unwrap();
        assert!(
            text.contains("rule: urls[0] \"*/healthz\" matches"),
            "{text}"
        );
        assert!(
            text.contains("no enabled token-validator selects shop/echo"),
            "{text}"
        );
        assert!(
            text.contains("no enabled token-creator selects this pod"),
            "{text}"
        );
        let text = explain(&config, &pods, "other", "http://10.0.0.3:8080/api").unwrap();
        assert!(
            text.contains("REJECTED with 403 source_ip_not_allowed"),
            "{text}"
        );
    }

    #[test]
    fn https_is_not_http() {
        let (config, pods) = setup();
        let text = explain(&config, &pods, "frontend", "https://10.0.0.3:8080/api").unwrap();
        assert!(text.contains("https is not plain HTTP"), "{text}");
        assert!(!text.contains("token creator"), "{text}");
    }

    #[test]
    fn uncaught_port_and_unknown_pod() {
        let (config, pods) = setup();
        let text = explain(&config, &pods, "frontend", "http://10.0.0.3:9090/").unwrap();
        assert!(
            text.contains("port 9090 is not in steering.intercept_ports"),
            "{text}"
        );
        let error = explain(&config, &pods, "ghost", "http://10.0.0.3:8080/").unwrap_err();
        assert!(error.to_string().contains("no pod \"ghost\""), "{error}");
    }
}
