//! `urls:` rules. Each has a `pattern` and, per plugin id, `enabled` and `parameters` that
//! override the plugin's own for requests that match. The first rule that matches a
//! request applies; a request no rule matches uses the plugins as defined.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use super::{
    Problems,
    plugins::{Parameters, PluginKind, PluginSpec, check_parameters},
};
use crate::policy::pattern::Pattern;

/// A rule as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub pattern: String,
    /// Overrides by plugin id.
    #[serde(default)]
    pub plugins: BTreeMap<String, RulePluginSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulePluginSpec {
    pub enabled: Option<bool>,
    /// Parameters that replace the plugin's own, key by key.
    pub parameters: Option<Parameters>,
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct UrlRule {
    /// Position in the file, for logs and `explain`.
    pub index: usize,
    pub pattern: Pattern,
    pub plugins: BTreeMap<String, RulePlugin>,
}

/// A rule's changes to one plugin.
#[derive(Debug, Clone)]
pub struct RulePlugin {
    /// Replaces the plugin's `enabled` when set.
    pub enabled: Option<bool>,
    /// The plugin's settings with the rule's parameters merged in, when it has any.
    pub settings: Option<PluginKind>,
}

/// Checks every rule against the plugins; `document` is the whole file, from which the
/// plugin's and the rule's parameters are merged key by key.
pub(super) fn validate(
    rules: &[RuleSpec],
    plugins: &[PluginSpec],
    document: &serde_yaml::Value,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Vec<UrlRule> {
    let mut validated = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        let key = format!("urls[{index}]");
        let pattern = match Pattern::parse(&rule.pattern) {
            Ok(pattern) => Some(pattern),
            Err(message) => {
                problems.push(format!("{key}.pattern"), message);
                None
            }
        };
        let mut overrides = BTreeMap::new();
        for (id, spec) in &rule.plugins {
            let plugin_key = format!("{key}.plugins.{id}");
            let Some(position) = plugins.iter().position(|p| p.id == *id) else {
                let known: Vec<&str> = plugins.iter().map(|p| p.id.as_str()).collect();
                problems.push(
                    plugin_key,
                    format!("no plugin has id {id:?}; known ids: {}", known.join(", ")),
                );
                continue;
            };
            let settings = match &spec.parameters {
                None => None,
                Some(_) => merged_settings(
                    &plugins[position],
                    document,
                    (position, index),
                    &plugin_key,
                    (base_dir, env),
                    problems,
                ),
            };
            overrides.insert(
                id.clone(),
                RulePlugin {
                    enabled: spec.enabled,
                    settings,
                },
            );
        }
        if let Some(pattern) = pattern {
            validated.push(UrlRule {
                index,
                pattern,
                plugins: overrides,
            });
        }
    }
    validated
}

/// Overlays the rule's parameters on the plugin's and checks the result as a whole.
fn merged_settings(
    plugin: &PluginSpec,
    document: &serde_yaml::Value,
    (plugin_index, rule_index): (usize, usize),
    key: &str,
    (base_dir, env): (&Path, &dyn Fn(&str) -> Option<String>),
    problems: &mut Problems,
) -> Option<PluginKind> {
    let base = &document["plugins"][plugin_index]["parameters"];
    let overlay = &document["urls"][rule_index]["plugins"][plugin.id.as_str()]["parameters"];
    let mut merged = base.as_mapping().cloned().unwrap_or_default();
    for (name, value) in overlay.as_mapping().into_iter().flatten() {
        merged.insert(name.clone(), value.clone());
    }
    let parameters: Parameters = match serde_yaml::from_value(serde_yaml::Value::Mapping(merged)) {
        Ok(parameters) => parameters,
        Err(e) => {
            problems.push(format!("{key}.parameters"), e.to_string());
            return None;
        }
    };
    check_parameters(
        plugin.plugin_type,
        &plugin.id,
        &parameters,
        &format!("{key}.parameters"),
        base_dir,
        env,
        problems,
    )
}
