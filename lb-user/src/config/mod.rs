//! The configuration file: TOML parsed once into typed values, checked as a whole, with
//! every problem reported as one line naming the key and its line.
//!
//! The raw (`Raw*`) structs mirror the file and reject unknown keys; [`Config::parse`]
//! turns them into the typed structs the rest of the program uses, which never see
//! strings again.

use std::{fmt, path::Path};

mod check;
mod listener;
mod model;
mod raw;
#[cfg(test)]
mod tests;

use check::{Checker, toml_error};
pub use model::*;
use raw::RawConfig;
pub use raw::{DEFAULT_PROMOTE_MAX_RATE, Dur, parse_duration};

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{key}: {message}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct ConfigError {
    /// 1-based line of the offending key, when known.
    pub line: Option<usize>,
    /// Dotted path of the key, e.g. `clusters[0].servers[1].address`.
    pub key: String,
    /// What is wrong and, where useful, what is accepted.
    pub message: String,
}

/// Every problem found in a file (at least one).
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                line: None,
                key: "file".to_owned(),
                message: format!("cannot read it: {e}"),
            }])
        })?;
        Self::parse_in(&text, path.parent().unwrap_or(Path::new(".")))
    }

    /// Parses and checks configuration text; relative file paths are relative to the
    /// working directory.
    pub fn parse(text: &str) -> Result<Self, ConfigErrors> {
        Self::parse_in(text, Path::new("."))
    }

    /// Parses and checks configuration text whose relative file paths (certificates,
    /// keys) are relative to `dir`, the configuration file's directory.
    pub fn parse_in(text: &str, dir: &Path) -> Result<Self, ConfigErrors> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigErrors(vec![toml_error(text, &e)]))?;
        let mut c = Checker {
            text,
            dir,
            errors: Vec::new(),
        };
        let config = c.check(raw);
        // In file order, whatever order the checks ran in.
        c.errors.sort_by_key(|e| e.line);
        if c.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(c.errors))
        }
    }
}
