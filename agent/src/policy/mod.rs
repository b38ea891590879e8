//! Plugin selection per request: the pod's plugins, chosen by workload selectors,
//! adjusted by the first `urls:` rule whose pattern matches the request. A `Policy` is an
//! immutable snapshot; a reload builds a new one and swaps it in whole.

pub mod inbound;
pub mod pattern;

use std::sync::Arc;

use crate::{
    config::{Config, CreatorSettings, Plugin, PluginKind, UrlRule, ValidatorSettings},
    workloads::Pod,
};
use pattern::Target;

/// The plugins and rules of one configuration.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Counts reloads, starting at 1, for logs.
    pub generation: u64,
    plugins: Vec<Plugin>,
    rules: Vec<UrlRule>,
}

/// The plugin that applies to a request, and why.
#[derive(Debug, Clone)]
pub struct Selection<T> {
    pub settings: Option<Arc<T>>,
    /// Index of the `urls:` rule that matched, if any.
    pub rule: Option<usize>,
}

impl Policy {
    pub fn from_config(config: &Config, generation: u64) -> Policy {
        Policy {
            generation,
            plugins: config.plugins.clone(),
            rules: config.urls.clone(),
        }
    }

    /// Returns the first rule whose pattern matches `target`.
    pub fn rule_for(&self, target: &Target<'_>) -> Option<&UrlRule> {
        self.rules.iter().find(|rule| rule.pattern.matches(target))
    }

    /// Selects the token creator for a request that `pod` sends to `target`.
    pub fn creator_for(&self, pod: &Pod, target: &Target<'_>) -> Selection<CreatorSettings> {
        self.select(pod, target, |kind| match kind {
            PluginKind::Creator(settings) => Some(settings.clone()),
            PluginKind::Validator(_) => None,
        })
    }

    /// Selects the token validator for a request to `pod` at `target`.
    pub fn validator_for(&self, pod: &Pod, target: &Target<'_>) -> Selection<ValidatorSettings> {
        self.select(pod, target, |kind| match kind {
            PluginKind::Validator(settings) => Some(settings.clone()),
            PluginKind::Creator(_) => None,
        })
    }

    /// Picks the first plugin of the wanted type that selects `pod` and is enabled, after
    /// the matching rule's overrides.
    fn select<T>(
        &self,
        pod: &Pod,
        target: &Target<'_>,
        settings_of: impl Fn(&PluginKind) -> Option<Arc<T>>,
    ) -> Selection<T> {
        let rule = self.rule_for(target);
        for plugin in &self.plugins {
            let Some(base) = settings_of(&plugin.kind) else {
                continue;
            };
            if !plugin.workloads.matches(pod) {
                continue;
            }
            // The pod's `tokenmesh.io/credentials` annotation picks one creator among those
            // that select it, so it cannot borrow the credentials of another workload.
            if let (PluginKind::Creator(_), Some(id)) = (&plugin.kind, &pod.credentials)
                && plugin.id != *id
            {
                continue;
            }
            let adjusted = rule.and_then(|rule| rule.plugins.get(&plugin.id));
            let enabled = adjusted.and_then(|a| a.enabled).unwrap_or(plugin.enabled);
            if !enabled {
                continue;
            }
            let settings = adjusted
                .and_then(|a| a.settings.as_ref())
                .and_then(&settings_of)
                .unwrap_or(base);
            return Selection {
                settings: Some(settings),
                rule: rule.map(|r| r.index),
            };
        }
        Selection {
            settings: None,
            rule: rule.map(|r| r.index),
        }
    }
}

#[cfg(test)]
mod tests;
