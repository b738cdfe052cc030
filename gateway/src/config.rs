//! Configuration in layers, each overriding the one before: the built-in defaults, a file,
//! the environment, then flags. Profiles (`dev`, `prod`) decide what `serve` accepts.
//!
//! The file (`--config <path>` or `GROUPBUY_CONFIG`) holds `NAME=value` lines named like the
//! environment variables (`GROUPBUY_HTTP_ADDR=0.0.0.0:8080`, `DATABASE_URL=...`); blank lines
//! and lines starting with `#` are skipped. A value from the file is used only where the
//! environment has none, and flags override both (clap reads flags over the environment). An
//! unknown name is an error, so a typo does not silently leave a default in place.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variables groupbuy reads: every flag's, and the log filter's.
pub fn known_names() -> std::collections::BTreeSet<String> {
    use clap::CommandFactory;
    fn collect(command: &clap::Command, names: &mut std::collections::BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                names.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            collect(sub, names);
        }
    }
    let mut names = std::collections::BTreeSet::from(["RUST_LOG".to_owned()]);
    collect(&crate::cli::Cli::command(), &mut names);
    names
}

/// The configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// It could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// Which file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `NAME=value`.
    #[error("{path}:{line}: expected NAME=value")]
    Syntax {
        /// Which file.
        path: PathBuf,
        /// Which line, from 1.
        line: usize,
    },
    /// A line names something groupbuy does not read.
    #[error("{path}:{line}: {name} is not a groupbuy setting")]
    Unknown {
        /// Which file.
        path: PathBuf,
        /// Which line, from 1.
        line: usize,
        /// The name.
        name: String,
    },
}

/// The configuration file named by `--config` in `args`, or by `GROUPBUY_CONFIG`.
pub fn file_from(args: impl IntoIterator<Item = OsString>) -> Option<PathBuf> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        if arg == "--config" {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(PathBuf::from(path));
        }
    }
    std::env::var_os("GROUPBUY_CONFIG").map(PathBuf::from)
}

/// The settings of a configuration file, in order.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let known = known_names();
    let mut settings = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = line.split_once('=').ok_or_else(|| ConfigError::Syntax {
            path: path.to_owned(),
            line: n + 1,
        })?;
        let name = name.trim();
        if !known.contains(name) || name == "GROUPBUY_CONFIG" {
            return Err(ConfigError::Unknown {
                path: path.to_owned(),
                line: n + 1,
                name: name.to_owned(),
            });
        }
        settings.push((name.to_owned(), value.trim().to_owned()));
    }
    Ok(settings)
}

/// Puts the file's settings into the environment where it has none; returns the names it
/// set. Call it before anything reads the environment, and before any thread starts.
pub fn apply(path: &Path) -> Result<Vec<String>, ConfigError> {
    let mut applied = Vec::new();
    for (name, value) in read(path)? {
        if std::env::var_os(&name).is_none() {
            std::env::set_var(&name, value);
            applied.push(name);
        }
    }
    Ok(applied)
}

/// What `serve` accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Profile {
    /// Anything goes: embedded services, generated secrets, the simulated provider.
    Dev,
    /// A production deployment: the real services, and secrets that are set, long and not
    /// known examples.
    Prod,
}

/// Secrets shorter than this are refused in prod.
pub const SECRET_CHARS_MIN: usize = 16;

/// Values from examples and documentation, refused as secrets in prod.
const KNOWN_EXAMPLES: &[&str] = &[
    "op-demo-token",
    "whsec-demo",
    "test-operator-token",
    "test-webhook-secret",
    "test-token-secret",
    "changeme",
    "change-me",
    "secret",
    "password",
];

/// Why a prod configuration is refused; `None` when it is fine. `secrets` are (variable
/// name, value), `services` (variable name, whether set).
pub fn prod_problem(secrets: &[(&str, Option<&str>)], services: &[(&str, bool)]) -> Option<String> {
    for (name, value) in secrets {
        match value.map(str::trim) {
            None | Some("") => return Some(format!("{name} must be set in the prod profile")),
            Some(v) if v.chars().count() < SECRET_CHARS_MIN => {
                return Some(format!(
                "{name} is too short for the prod profile ({SECRET_CHARS_MIN} characters at least)"
            ))
            }
            Some(v) if KNOWN_EXAMPLES.iter().any(|e| v.eq_ignore_ascii_case(e)) => {
                return Some(format!(
                    "{name} is an example value; the prod profile needs a real secret"
                ))
            }
            Some(_) => {}
        }
    }
    let missing: Vec<&str> = services
        .iter()
        .filter(|(_, set)| !set)
        .map(|(name, _)| *name)
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the prod profile runs on the real services; set {}",
            missing.join(", ")
        )
    })
}
