//! Daemon configuration: command-line flags over the policy file's `[daemon]` section over the
//! embedded defaults (SPEC §4, §8).

use bursar_core::policy::{default_policy, parse_policy, LoadedPolicy, PolicyError};
use std::path::{Path, PathBuf};

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "bursar-data";
pub use bursar_schemas::{default_socket_path, SOCKET_NAME};

/// Everything the daemon needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Policy file, when one is used (SIGHUP and `reload` read it again).
    pub config_file: Option<PathBuf>,
    /// The policy in force at start.
    pub policy: LoadedPolicy,
    /// Socket path.
    pub socket: PathBuf,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Group owning the socket.
    pub socket_group: Option<String>,
    /// Uids allowed to `reload` and `replay` with `apply`.
    pub admin_uids: Vec<u32>,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is invalid.
    #[error("{}", invalid_text(.0))]
    Invalid(Vec<PolicyError>),
}

/// `invalid config: <the error>`, or a count and one error per line.
fn invalid_text(errors: &[PolicyError]) -> String {
    match errors {
        [one] => format!("invalid config: {one}"),
        many => format!(
            "invalid config ({} errors):\n{}",
            many.len(),
            many.iter()
                .map(|e| format!("  {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

/// Read and validate a policy file. Imports are resolved relative to the file's directory.
pub fn parse_policy_file(path: &Path) -> Result<LoadedPolicy, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let read_import = |p: &str| -> Result<String, String> {
        let full = if Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            base.join(p)
        };
        std::fs::read_to_string(&full).map_err(|e| format!("cannot read {}: {e}", full.display()))
    };
    parse_policy(&text, &path.display().to_string(), &read_import).map_err(ConfigError::Invalid)
}

/// [`parse_policy_file`] for a daemon to run (a file with `[cluster]` runs a cluster node).
pub fn load_policy_file(path: &Path) -> Result<LoadedPolicy, ConfigError> {
    parse_policy_file(path)
}

/// This daemon as the actor of the events it appends itself (policies, expiries, SIGHUP).
pub fn own_actor() -> bursar_schemas::event::Actor {
    bursar_schemas::event::Actor {
        uid: own_uid(),
        gid: 0,
        pid: std::process::id(),
    }
}

/// The uid this process runs as.
pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}

impl Config {
    /// Resolve flags, file and defaults.
    pub fn resolve(
        config_file: Option<PathBuf>,
        socket: Option<PathBuf>,
        data_dir: Option<PathBuf>,
    ) -> Result<Config, ConfigError> {
        let policy = match &config_file {
            Some(path) => load_policy_file(path)?,
            None => default_policy(),
        };
        let d = policy.daemon.clone();
        let mut admin_uids = d.admin_uids.clone();
        if admin_uids.is_empty() {
            admin_uids.push(own_uid());
        }
        Ok(Config {
            socket: socket
                .or_else(|| d.socket.map(PathBuf::from))
                .unwrap_or_else(default_socket_path),
            data_dir: data_dir
                .or_else(|| d.data_dir.map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            socket_mode: d.socket_mode,
            socket_group: d.socket_group,
            admin_uids,
            config_file,
            policy,
        })
    }

    /// Read the policy again (for `reload` and SIGHUP): the file, or the embedded default.
    pub fn reload_policy(&self) -> Result<LoadedPolicy, ConfigError> {
        match &self.config_file {
            Some(path) => load_policy_file(path),
            None => Ok(default_policy()),
        }
    }
}
