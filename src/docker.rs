//! The registry container, through the Docker Engine API: discovery, inspection, exec of the
//! registry's garbage collector, stop/start/restart. The only module that imports bollard or tokio.

use std::path::PathBuf;

use anyhow::Result;

use crate::service::{GcOutcome, Service};

/// Why the container could not be used; every variant is a refusal (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The daemon does not answer.
    #[error("cannot reach the Docker daemon: {message}")]
    Unreachable {
        /// Details.
        message: String,
    },
    /// No running registry container.
    #[error("no running registry container found")]
    NoneFound,
    /// Placeholder until the Docker integration lands.
    #[error("{0}")]
    Other(String),
}

impl DockerError {
    /// Whether discovery found no Docker or no registry container (as opposed to an ambiguity or
    /// an error worth stopping for).
    pub fn means_no_container(&self) -> bool {
        matches!(
            self,
            DockerError::Unreachable { .. } | DockerError::NoneFound
        )
    }
}

/// A running registry container and what was read from it.
#[derive(Debug, Clone)]
pub struct RegistryContainer {
    /// Full container id.
    pub id: String,
    /// Container name without the leading `/`.
    pub name: String,
    /// Image reference as shown by `docker ps`.
    pub image: String,
    /// The registry config file path inside the container.
    pub config_path: String,
    /// The config file's contents, if it could be read.
    pub config_yaml: Option<String>,
    /// `storage.filesystem.rootdirectory` inside the container.
    pub root_in_container: String,
    /// The host directory mounted at `root_in_container` (bind source or volume mountpoint).
    pub host_root: Option<PathBuf>,
    /// `http://127.0.0.1:<port>` when the registry port is published on the host.
    pub endpoint: Option<String>,
}

/// Finds the registry container: by name or id prefix when `spec` is given, else the one running
/// container whose image is a registry.
pub fn find_registry(spec: Option<&str>) -> Result<RegistryContainer, DockerError> {
    match spec {
        None => Err(DockerError::NoneFound),
        Some(s) => Err(DockerError::Other(format!(
            "cannot use container {s}: the Docker integration is not built yet"
        ))),
    }
}

/// [`Service`] for a registry running in a container.
pub struct ContainerService {
    container: RegistryContainer,
}

impl ContainerService {
    /// Wraps a container found by [`find_registry`].
    pub fn new(container: RegistryContainer, _verbose: bool) -> Result<Self> {
        Ok(Self { container })
    }
}

impl Service for ContainerService {
    fn describe(&self) -> String {
        format!("container {}", self.container.name)
    }
    fn garbage_collect(&mut self) -> Result<GcOutcome> {
        anyhow::bail!("not built yet")
    }
    fn can_restart(&self) -> bool {
        true
    }
    fn restart(&mut self) -> Result<()> {
        anyhow::bail!("not built yet")
    }
    fn stop(&mut self) -> Result<()> {
        anyhow::bail!("not built yet")
    }
    fn start(&mut self) -> Result<()> {
        anyhow::bail!("not built yet")
    }
    fn endpoint(&self) -> Option<String> {
        self.container.endpoint.clone()
    }
    fn start_hint(&self) -> String {
        format!("docker start {}", self.container.name)
    }
}
