//! Turns a Kubernetes Pod object into the facts the agent needs, or the reason it leaves
//! the pod alone.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::{
    api::core::v1::{Container, Pod as KubePod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::super::cgroups::QosClass;
use super::super::{PodIdentity, ProbeExemption};

/// Pod annotation or namespace label that enrols pods: `"true"` enrols, and a pod
/// annotation `"false"` opts one pod of an enrolled namespace out.
pub const ENABLED_KEY: &str = "tokenmesh.io/enabled";
/// Pod annotation naming the token-creator plugin whose client credentials the pod's
/// outbound requests use, among the plugins whose selector matches the pod.
pub const CREDENTIALS_KEY: &str = "tokenmesh.io/credentials";
/// Pod annotation listing the ports whose inbound requests need a token, such as
/// `"8080,9090"`; without it every TCP `containerPort` of the pod is protected.
pub const PROTECTED_PORTS_KEY: &str = "tokenmesh.io/protected-ports";

/// An enrolled, running pod before its cgroup and network namespace are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub uid: String,
    pub identity: PodIdentity,
    pub labels: BTreeMap<String, String>,
    pub ip: Ipv4Addr,
    pub qos: QosClass,
    pub protected_ports: Vec<u16>,
    pub credentials: Option<String>,
    pub probe_exemption: ProbeExemption,
}

/// The reason a pod of this node is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    HostNetwork,
    NotRunning(String),
    NotEnrolled,
    Terminating,
    Invalid(String),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::HostNetwork => f.write_str("uses the host network"),
            Skip::NotRunning(phase) => write!(f, "is in phase {phase}, not Running"),
            Skip::NotEnrolled => write!(
                f,
                "is not enrolled (no {ENABLED_KEY}=\"true\" annotation or namespace label)"
            ),
            Skip::Terminating => f.write_str("is being deleted"),
            Skip::Invalid(reason) => f.write_str(reason),
        }
    }
}

/// Decides whether `pod` is steered. `namespace_enrolled` is true when its namespace
/// carries the enrolment label; `probe_sources` are the extra probe sources configured.
/// `sandbox_ip` is the address of a sandbox the CNI plugin reported: with it, a pod is
/// steered while still `Pending`, from that address.
pub fn candidate(
    pod: &KubePod,
    namespace_enrolled: bool,
    probe_exemption: bool,
    probe_sources: &[ipnet::IpNet],
    sandbox_ip: Option<Ipv4Addr>,
) -> Result<Candidate, Skip> {
    let meta = &pod.metadata;
    let spec = pod
        .spec
        .as_ref()
        .ok_or(Skip::Invalid("has no spec".into()))?;
    let status = pod.status.as_ref();
    // Checked first: a host-network pod shares the node's namespace, and steering it would
    // steer the node itself.
    if spec.host_network == Some(true) {
        return Err(Skip::HostNetwork);
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let enrolled = match annotations.get(ENABLED_KEY).map(String::as_str) {
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(Skip::Invalid(format!(
                "has annotation {ENABLED_KEY}={other:?}; use \"true\" or \"false\""
            )));
        }
        None => namespace_enrolled,
    };
    if !enrolled {
        return Err(Skip::NotEnrolled);
    }
    let phase = status.and_then(|s| s.phase.clone()).unwrap_or_default();
    let starting = sandbox_ip.is_some() && matches!(phase.as_str(), "" | "Pending");
    if phase != "Running" && !starting {
        return Err(Skip::NotRunning(phase));
    }
    if meta.deletion_timestamp.is_some() {
        return Err(Skip::Terminating);
    }

    let uid = meta
        .uid
        .clone()
        .ok_or(Skip::Invalid("has no metadata.uid".into()))?;
    let identity = PodIdentity {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".to_string()),
    };
    let status_ip = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .find_map(|pod_ip| pod_ip.ip.parse::<Ipv4Addr>().ok());
    let ip = sandbox_ip
        .or(status_ip)
        .ok_or(Skip::Invalid("has no IPv4 address in status.podIPs".into()))?;
    let qos = status
        .and_then(|s| s.qos_class.as_deref())
        .and_then(QosClass::parse)
        .ok_or(Skip::Invalid("has no known status.qosClass".into()))?;

    let containers: Vec<&Container> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    let protected_ports = match annotations.get(PROTECTED_PORTS_KEY) {
        Some(list) => parse_ports(list)?,
        None => container_ports(&containers),
    };

    let mut exemption = ProbeExemption::default();
    if probe_exemption {
        exemption.sources = status
            .and_then(|s| s.host_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|host_ip| host_ip.ip.parse::<IpAddr>().ok())
            .map(ipnet::IpNet::from)
            .chain(probe_sources.iter().copied())
            .collect();
        exemption.ports = probe_ports(&containers)
            .into_iter()
            .filter(|port| protected_ports.contains(port))
            .collect();
    }

    Ok(Candidate {
        uid,
        identity,
        labels: meta.labels.clone().unwrap_or_default(),
        ip,
        qos,
        protected_ports,
        credentials: annotations.get(CREDENTIALS_KEY).cloned(),
        probe_exemption: exemption,
    })
}

fn parse_ports(list: &str) -> Result<Vec<u16>, Skip> {
    let mut ports = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(port) if port != 0 => ports.push(port),
            _ => {
                return Err(Skip::Invalid(format!(
                    "has annotation {PROTECTED_PORTS_KEY} with {item:?}, which is not a port; use a list such as \"8080,9090\""
                )));
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

fn container_ports(containers: &[&Container]) -> Vec<u16> {
    let mut ports: Vec<u16> = containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .filter(|port| *port != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// Ports of the liveness, readiness and startup probes that the kubelet connects to
/// (HTTP GET, TCP socket and gRPC probes); exec probes open no connection.
fn probe_ports(containers: &[&Container]) -> Vec<u16> {
    let mut ports = HashSet::new();
    for container in containers {
        let probes = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        for probe in probes.into_iter().flatten() {
            ports.extend(probe_port(container, probe));
        }
    }
    let mut ports: Vec<u16> = ports.into_iter().collect();
    ports.sort_unstable();
    ports
}

fn probe_port(container: &Container, probe: &Probe) -> Option<u16> {
    let port = if let Some(action) = &probe.http_get {
        &action.port
    } else if let Some(action) = &probe.tcp_socket {
        &action.port
    } else {
        return probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok());
    };
    match port {
        IntOrString::Int(number) => u16::try_from(*number).ok(),
        // A named probe port refers to a containerPort of the same container.
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(extra: serde_json::Value) -> KubePod {
        let mut base = serde_json::json!({
            "metadata": {"name": "api-0", "namespace": "shop", "uid": "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
                          "labels": {"app": "api"}, "annotations": {}},
            "spec": {
                "serviceAccountName": "api",
                "containers": [{
                    "name": "app",
                    "ports": [{"containerPort": 8080, "name": "http"}, {"containerPort": 5353, "protocol": "UDP"}],
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "readinessProbe": {"tcpSocket": {"port": 9090}}
                }]
            },
            "status": {"phase": "Running", "qosClass": "Burstable",
                        "podIPs": [{"ip": "fd00::5"}, {"ip": "10.244.1.5"}],
                        "hostIPs": [{"ip": "192.0.2.10"}]}
        });
        merge(&mut base, extra);
        serde_json::from_value(base).unwrap()
    }

    fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
        match (base, extra) {
            (serde_json::Value::Object(base), serde_json::Value::Object(extra)) => {
                for (key, value) in extra {
                    merge(base.entry(key).or_insert(serde_json::Value::Null), value);
                }
            }
            (base, extra) => *base = extra,
        }
    }

    #[test]
    fn enrolled_namespace_pod_becomes_candidate() {
        let candidate = candidate(&pod(serde_json::json!({})), true, true, &[], None).unwrap();
        assert_eq!(candidate.identity.to_string(), "shop/api-0");
        assert_eq!(candidate.identity.service_account, "api");
        assert_eq!(candidate.ip, Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(candidate.qos, QosClass::Burstable);
        assert_eq!(candidate.protected_ports, vec![8080]);
        assert_eq!(candidate.labels.get("app").map(String::as_str), Some("api"));
        assert_eq!(candidate.credentials, None);
        // 9090 is probed but not protected, so it needs no exemption.
        assert_eq!(candidate.probe_exemption.ports, vec![8080]);
        assert_eq!(
            candidate.probe_exemption.sources,
            vec!["192.0.2.10/32".parse::<ipnet::IpNet>().unwrap()]
        );
    }

    #[test]
    fn unenrolled_namespace_skipped() {
        let skip = candidate(&pod(serde_json::json!({})), false, true, &[], None).unwrap_err();
        assert_eq!(skip, Skip::NotEnrolled);
    }

    #[test]
    fn pod_annotation_enrols_and_opts_out() {
        let enrolled = pod(serde_json::json!({"metadata": {"annotations": {ENABLED_KEY: "true"}}}));
        assert!(candidate(&enrolled, false, true, &[], None).is_ok());
        let opted_out =
            pod(serde_json::json!({"metadata": {"annotations": {ENABLED_KEY: "false"}}}));
        assert_eq!(
            candidate(&opted_out, true, true, &[], None).unwrap_err(),
            Skip::NotEnrolled
        );
        let invalid = pod(serde_json::json!({"metadata": {"annotations": {ENABLED_KEY: "yes"}}}));
        let skip = candidate(&invalid, true, true, &[], None).unwrap_err();
        assert!(skip.to_string().contains("\"yes\""), "{skip}");
    }

    #[test]
    fn host_network_pod_never_candidate() {
        let host = pod(serde_json::json!({
            "metadata": {"annotations": {ENABLED_KEY: "true"}},
            "spec": {"hostNetwork": true}
        }));
        assert_eq!(
            candidate(&host, true, true, &[], None).unwrap_err(),
            Skip::HostNetwork
        );
    }

    #[test]
    fn pending_and_terminating_pods_skipped() {
        let pending = pod(serde_json::json!({"status": {"phase": "Pending"}}));
        assert_eq!(
            candidate(&pending, true, true, &[], None).unwrap_err(),
            Skip::NotRunning("Pending".into())
        );
        let deleting =
            pod(serde_json::json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}));
        assert_eq!(
            candidate(&deleting, true, true, &[], None).unwrap_err(),
            Skip::Terminating
        );
    }

    #[test]
    fn annotations_set_ports_and_credentials() {
        let annotated = pod(serde_json::json!({"metadata": {"annotations": {
            PROTECTED_PORTS_KEY: "9090, 8080,9090",
            CREDENTIALS_KEY: "payments-token"
        }}}));
        let candidate = candidate(&annotated, true, true, &[], None).unwrap();
        assert_eq!(candidate.protected_ports, vec![8080, 9090]);
        assert_eq!(candidate.credentials.as_deref(), Some("payments-token"));
        assert_eq!(candidate.probe_exemption.ports, vec![8080, 9090]);
    }

    #[test]
    fn invalid_port_annotation_skipped_with_reason() {
        let annotated = pod(
            serde_json::json!({"metadata": {"annotations": {PROTECTED_PORTS_KEY: "8080,http"}}}),
        );
        let skip = candidate(&annotated, true, true, &[], None).unwrap_err();
        assert!(skip.to_string().contains("\"http\""), "{skip}");
    }

    #[test]
    fn probe_exemption_disabled_and_extra_sources() {
        let base = pod(serde_json::json!({}));
        let disabled = candidate(&base, true, false, &[], None).unwrap();
        assert!(disabled.probe_exemption.ports.is_empty());
        assert!(disabled.probe_exemption.sources.is_empty());
        let bridge: ipnet::IpNet = "10.244.1.1/32".parse().unwrap();
        let extra = candidate(&base, true, true, &[bridge], None).unwrap();
        assert_eq!(extra.probe_exemption.sources.len(), 2);
        assert!(extra.probe_exemption.sources.contains(&bridge));
    }

    #[test]
    fn pending_pod_with_sandbox_candidate() {
        let pending = pod(serde_json::json!({"status": {"phase": "Pending", "podIPs": []}}));
        let sandbox_ip = Ipv4Addr::new(10, 244, 1, 9);
        let candidate = candidate(&pending, true, true, &[], Some(sandbox_ip)).unwrap();
        assert_eq!(candidate.ip, sandbox_ip);
        assert_eq!(candidate.identity.name, "api-0");

        let finished = pod(serde_json::json!({"status": {"phase": "Succeeded"}}));
        assert_eq!(
            candidate_of(&finished, Some(sandbox_ip)).unwrap_err(),
            Skip::NotRunning("Succeeded".into())
        );
    }

    fn candidate_of(pod: &KubePod, sandbox_ip: Option<Ipv4Addr>) -> Result<Candidate, Skip> {
        candidate(pod, true, true, &[], sandbox_ip)
    }

    #[test]
    fn ipv6_only_pod_skipped() {
        let v6 = pod(serde_json::json!({"status": {"podIPs": [{"ip": "fd00::5"}]}}));
        let skip = candidate(&v6, true, true, &[], None).unwrap_err();
        assert!(skip.to_string().contains("IPv4"), "{skip}");
    }
}
