//! Config errors: every problem found in one load, each naming file, key and line.

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

/// Where a config value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A line of the config file (1-based), when it could be located.
    File { line: Option<usize> },
    /// An environment variable override such as `WALHOOK_SOURCE__URL`.
    Env { var: String },
}

/// One config problem.
#[derive(Debug, Clone)]
pub struct ConfigError {
    /// The config file name as given (e.g. `walhook.toml`).
    pub file: String,
    /// Dotted key path, e.g. `tables[1].rules[0].when`; empty for the whole file.
    pub key: String,
    /// 1-based line in the file, when the key is in the file.
    pub line: Option<usize>,
    /// The env var the value came from, when it came from an override.
    pub env_var: Option<String>,
    /// What is wrong and, where there is one, the fix. Never contains a secret.
    pub message: String,
    /// The underlying error, when there is one worth keeping.
    pub cause: Option<Arc<dyn StdError + Send + Sync>>,
}

impl ConfigError {
    pub(crate) fn new(file: &str, key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_string(),
            key: key.into(),
            line: None,
            env_var: None,
            message: message.into(),
            cause: None,
        }
    }

    pub(crate) fn with_cause(mut self, cause: impl StdError + Send + Sync + 'static) -> Self {
        self.cause = Some(Arc::new(cause));
        self
    }

    pub(crate) fn at(mut self, origin: Option<Origin>) -> Self {
        match origin {
            Some(Origin::File { line }) => self.line = line,
            Some(Origin::Env { var }) => self.env_var = Some(var),
            None => {}
        }
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.env_var, self.line) {
            (Some(var), _) => write!(f, "{} (env {var})", self.file)?,
            (None, Some(line)) => write!(f, "{}:{line}", self.file)?,
            (None, None) => write!(f, "{}", self.file)?,
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found while loading a config; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    /// The problems, ordered by line (env overrides last).
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    pub(crate) fn single(error: ConfigError) -> Self {
        ConfigErrors {
            errors: vec![error],
        }
    }

    /// Iterates over the problems.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.errors.iter()
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.errors.len()
    }

    /// Always false for a returned error; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{n} config error{}:", if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

impl StdError for ConfigError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn StdError + 'static))
    }
}

/// No `source()`: a list has no one cause, and its message already holds each problem.
impl StdError for ConfigErrors {}
