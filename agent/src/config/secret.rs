//! Secrets referenced from the config file: `${VAR}` reads an environment variable and
//! `file:PATH` reads a file. Literal secrets are rejected so they never sit in a ConfigMap.

use std::{fmt, path::Path, sync::Arc};

/// A resolved secret value. `Debug` and `Display` print only where it came from.
#[derive(Clone)]
pub struct Secret {
    value: Arc<str>,
    source: Arc<str>,
}

/// Reasons a secret reference cannot be resolved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("environment variable {0} is not set; export it or use file:PATH instead")]
    MissingEnv(String),
    #[error("secret file {path} could not be read ({reason}); create it or fix the path")]
    Unreadable { path: String, reason: String },
    #[error("secret file {0} is empty; write the secret into it")]
    EmptyFile(String),
    #[error(
        "a literal secret is not accepted; write it to a file and use file:PATH, or use ${{VAR}}"
    )]
    Literal,
}

impl Secret {
    /// Resolves a reference (`${VAR}` or `file:PATH`). `env` looks up environment
    /// variables, so tests pass a map instead of changing the process environment.
    /// A relative `file:` path is taken relative to `base_dir` (the config file's folder).
    pub fn resolve(
        reference: &str,
        base_dir: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Secret, SecretError> {
        let reference = reference.trim();
        if let Some(name) = reference
            .strip_prefix("${")
            .and_then(|r| r.strip_suffix('}'))
        {
            let value = env(name).ok_or_else(|| SecretError::MissingEnv(name.to_string()))?;
            return Ok(Secret::new(&value, &format!("${{{name}}}")));
        }
        if let Some(path) = reference.strip_prefix("file:") {
            let path = base_dir.join(path);
            let shown = path.display().to_string();
            let content = std::fs::read_to_string(&path).map_err(|e| SecretError::Unreadable {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            let value = content.trim_end_matches(['\r', '\n']);
            if value.is_empty() {
                return Err(SecretError::EmptyFile(shown));
            }
            return Ok(Secret::new(value, &format!("file:{shown}")));
        }
        Err(SecretError::Literal)
    }

    /// Builds a secret from a value the caller already has (tests, generated keys).
    pub fn new(value: &str, source: &str) -> Secret {
        Secret {
            value: value.into(),
            source: source.into(),
        }
    }

    /// Returns the secret itself. Callers send it to the identity provider and never log it.
    pub fn expose(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn env_reference_resolves() {
        let env = env_of(&[("FRONTEND_SECRET", "s3cret")]);
        let secret = Secret::resolve("${FRONTEND_SECRET}", Path::new("/"), &env).unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "Secret(${FRONTEND_SECRET})");
    }

    #[test]
    fn missing_env_is_named() {
        let env = env_of(&[]);
        let err = Secret::resolve("${NOPE}", Path::new("/"), &env).unwrap_err();
        assert_eq!(err, SecretError::MissingEnv("NOPE".into()));
        assert!(err.to_string().contains("NOPE"));
    }

    #[test]
    fn file_reference_strips_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "abc\n").unwrap();
        let secret = Secret::resolve("file:secret", dir.path(), &env_of(&[])).unwrap();
        assert_eq!(secret.expose(), "abc");
    }

    #[test]
    fn empty_or_missing_file_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = Secret::resolve("file:empty", dir.path(), &env_of(&[])).unwrap_err();
        assert!(matches!(empty, SecretError::EmptyFile(_)));
        let missing = Secret::resolve("file:absent", dir.path(), &env_of(&[])).unwrap_err();
        assert!(matches!(missing, SecretError::Unreadable { .. }));
    }

    #[test]
    fn literal_rejected() {
        let err = Secret::resolve("hunter2", Path::new("/"), &env_of(&[])).unwrap_err();
        assert_eq!(err, SecretError::Literal);
        assert!(!err.to_string().contains("hunter2"));
    }
}
