//! Which plugins apply to which pod, and the inbound checks a request must pass.

pub mod inbound;

use std::sync::Arc;

use crate::{
    config::{CreatorSettings, Plugin, PluginKind, ValidatorSettings},
    workloads::Pod,
};

/// The plugins that apply to one pod.
#[derive(Debug, Clone, Default)]
pub struct PodPolicy {
    /// Adds tokens to the pod's outbound requests.
    pub creator: Option<Arc<CreatorSettings>>,
    /// Validates requests to the pod's protected ports.
    pub validator: Option<Arc<ValidatorSettings>>,
}

impl PodPolicy {
    /// Picks, for each plugin type, the first enabled plugin whose selector matches `pod`.
    pub fn for_pod(plugins: &[Plugin], pod: &Pod) -> PodPolicy {
        let mut policy = PodPolicy::default();
        for plugin in plugins
            .iter()
            .filter(|p| p.enabled && p.workloads.matches(pod))
        {
            match &plugin.kind {
                PluginKind::Creator(settings) if policy.creator.is_none() => {
                    policy.creator = Some(settings.clone());
                }
                PluginKind::Validator(settings) if policy.validator.is_none() => {
                    policy.validator = Some(settings.clone());
                }
                _ => {}
            }
        }
        policy
    }
}
