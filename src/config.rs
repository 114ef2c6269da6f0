//! Turns flags, environment, the registry's `config.yml` and container discovery into one plain
//! [`Config`]. Nothing past this module sees clap types.

use anyhow::{Context, Result};

/// The parts of a registry `config.yml` that docker-delete uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryConfig {
    /// `storage.filesystem.rootdirectory`, if the filesystem driver is configured.
    pub root_directory: Option<String>,
    /// Whether `storage.filesystem` is present at all (another driver otherwise).
    pub has_filesystem: bool,
    /// `http.addr`, such as `:5000` or `127.0.0.1:5000`.
    pub http_addr: Option<String>,
    /// Whether `http.tls` is configured.
    pub tls: bool,
}

/// Registry 2's image default for `storage.filesystem.rootdirectory`.
pub const DEFAULT_CONTAINER_ROOT: &str = "/var/lib/registry";

impl RegistryConfig {
    /// Parses the YAML text of a registry config; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(text).with_context(|| format!("{source} is not valid YAML"))?;
        let get = |path: &[&str]| -> Option<&serde_yaml::Value> {
            let mut v = &doc;
            for key in path {
                v = v.get(key)?;
            }
            Some(v)
        };
        let filesystem = get(&["storage", "filesystem"]);
        Ok(Self {
            root_directory: filesystem
                .and_then(|f| f.get("rootdirectory"))
                .and_then(|v| v.as_str())
                .map(str::to_string),
            has_filesystem: filesystem.is_some(),
            http_addr: get(&["http", "addr"])
                .and_then(|v| v.as_str())
                .map(str::to_string),
            tls: get(&["http", "tls"]).is_some_and(|v| !v.is_null()),
        })
    }

    /// The URL at which this host reaches the registry, from `http.addr`: an empty or wildcard
    /// host becomes `127.0.0.1`. `None` when there is no `http.addr` or it is a unix socket.
    pub fn endpoint(&self) -> Option<String> {
        let addr = self.http_addr.as_deref()?.trim();
        let (host, port) = addr.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        let host = match host.trim_matches(['[', ']']) {
            "" | "0.0.0.0" | "::" => "127.0.0.1".to_string(),
            h if h.contains(':') => format!("[{h}]"),
            h => h.to_string(),
        };
        let scheme = if self.tls { "https" } else { "http" };
        Some(format!("{scheme}://{host}:{port}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_root_and_addr() {
        let c = RegistryConfig::parse(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: /var/lib/registry\nhttp:\n  addr: :5000\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.root_directory.as_deref(), Some("/var/lib/registry"));
        assert_eq!(c.endpoint().as_deref(), Some("http://127.0.0.1:5000"));
    }

    #[test]
    fn other_driver_has_no_root() {
        let c = RegistryConfig::parse("storage:\n  s3:\n    bucket: b\n", "t").unwrap();
        assert!(!c.has_filesystem);
        assert_eq!(c.root_directory, None);
        assert_eq!(c.endpoint(), None);
    }
}
