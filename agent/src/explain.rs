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
    let url = url::Url::parse(url).with_context(|| format!("{url:?} is not a URL such as http://10.0.0.3:8080/api"))?;
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
    writeln!(out, "  required scopes: {}", list(&settings.required_scopes, "(none)"))?;
    let clients: Vec<String> = settings.allowed_client_ids.iter().map(|c| c.0.clone()).collect();
    writeln!(out, "  allowed client ids: {}", list(&clients, "(any)"))?;
    let networks: Vec<String> = settings.allowed_cidrs.iter().map(ToString::to_string).collect();
    writeln!(out, "  allowed source networks: {}", list(&networks, "(any)"))?;
    let source_ip = IpAddr::from(source.ip);
    let source_allowed =
        settings.allowed_cidrs.is_empty() || settings.allowed_cidrs.iter().any(|n| n.contains(&source_ip));
    let verdict = if source_allowed { "allowed" } else { "REJECTED with 403 source_ip_not_allowed" };
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
        [] => bail!("no pod {name:?} in the workloads file; give its name or namespace/name"),
        _ => bail!("{name:?} names several pods; give namespace/name"),
    }
}

fn describe_rule(out: &mut String, policy: &Policy, target: &Target<'_>) -> std::fmt::Result {
    match policy.rule_for(target) {
        Some(rule) => writeln!(out, "  rule: urls[{}] {:?} matches (first match wins)", rule.index, rule.pattern.to_string()),
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
            writeln!(out, "  scopes requested: {}", list(&credentials.scopes, "(none: the client's default scopes)"))?;
            writeln!(out, "  token header: {}", settings.header.name)
        }
        None => writeln!(
            out,
            "  no enabled token-creator selects this pod here: the request is forwarded without a token"
        ),
    }
}

fn list(items: &[String], empty: &str) -> String {
    if items.is_empty() { empty.to_string() } else { items.join(", ") }
}
