//! The registry container, through the Docker Engine API: discovery, inspection, exec of the
//! registry's garbage collector, stop/start/restart. The only module that imports bollard or tokio.
//!
//! The API is synchronous: every call builds or reuses a small current-thread tokio runtime and
//! blocks on it. Nothing here writes to stdout or stderr; what the collector printed is returned.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HealthStatusEnum,
    HostConfig, MountPoint, PortMap,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, DownloadFromContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    RestartContainerOptionsBuilder, StopContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures_util::StreamExt;

use crate::config::{DEFAULT_CONTAINER_ROOT, RegistryConfig};
use crate::service::{GcOutcome, Service};

/// Where registry 2 images (`registry:2`) read their config.
pub const REGISTRY2_CONFIG_PATH: &str = "/etc/docker/registry/config.yml";
/// Where registry 3 images (`registry:3`, `distribution/distribution`) read their config.
pub const REGISTRY3_CONFIG_PATH: &str = "/etc/distribution/config.yml";
/// How long [`ContainerService`] waits for the registry to answer after a start or restart.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The socket bollard uses when `DOCKER_HOST` is not set.
const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// Seconds Docker waits after SIGTERM before it kills the registry on stop or restart.
const STOP_GRACE_SECS: i32 = 10;
/// Label put on the one-shot garbage-collect container so that a leftover is recognisable.
const GC_LABEL: &str = "docker-delete.role";
/// A registry config is a few kilobytes; refuse to buffer anything absurd.
const MAX_CONFIG_BYTES: usize = 1 << 20;

/// Why the container could not be used; every variant is a refusal (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The daemon does not answer on its socket.
    #[error(
        "cannot reach the Docker daemon at {host} ({reason}); start Docker (for example `systemctl start docker`) or point DOCKER_HOST at its socket"
    )]
    Unreachable {
        /// `DOCKER_HOST`, or the default socket.
        host: String,
        /// What the connection attempt reported.
        reason: String,
    },
    /// The socket exists but this user may not use it.
    #[error(
        "permission denied on the Docker socket {host}: run docker-delete as root or add your user to the `docker` group"
    )]
    PermissionDenied {
        /// `DOCKER_HOST`, or the default socket.
        host: String,
    },
    /// No container has that name or id prefix.
    #[error(
        "no container named `{spec}` or with an id starting with `{spec}` (see `docker ps` for the registry's name)"
    )]
    NoSuchContainer {
        /// What the user gave (`--container` or `DOCKER_REGISTRY_CONTAINER_ID`).
        spec: String,
    },
    /// The container exists but is not running.
    #[error("container {name} is not running (it is {status}); start it with `{hint}`")]
    NotRunning {
        /// Container name.
        name: String,
        /// Docker's state, such as `exited`.
        status: String,
        /// The command that starts it, such as `docker start registry`.
        hint: String,
    },
    /// The container does not run a Docker Distribution registry.
    #[error(
        "container {name} does not look like a registry: its image `{image}` is not a `registry` or `distribution` image and its command `{command}` does not run `registry serve`"
    )]
    NotARegistry {
        /// Container name.
        name: String,
        /// Its image reference.
        image: String,
        /// Its entrypoint and command, joined with spaces.
        command: String,
    },
    /// Discovery found no running registry container.
    #[error(
        "no running registry container found (looked for images named `registry` or `distribution`, and for commands running `registry serve`); start the registry, or name its container with `--container NAME` or DOCKER_REGISTRY_CONTAINER_ID"
    )]
    NoneFound,
    /// Discovery found registry containers, but none running.
    #[error(
        "no registry container is running; found, but not running: {}; start it with `docker start NAME`",
        stopped.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
    )]
    NoneRunning {
        /// The stopped registry containers.
        stopped: Vec<Candidate>,
    },
    /// Discovery found more than one running registry container.
    #[error(
        "{} running containers look like registries:\n{}\nchoose one with `--container NAME` or DOCKER_REGISTRY_CONTAINER_ID",
        candidates.len(),
        candidates.iter().map(|c| format!("  {c}")).collect::<Vec<_>>().join("\n")
    )]
    Ambiguous {
        /// Every matching container.
        candidates: Vec<Candidate>,
    },
    /// The registry config read out of the container is not valid.
    #[error("the registry config {path} in container {name} cannot be used: {message}")]
    BadConfig {
        /// Container name.
        name: String,
        /// Config path inside the container.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// Any other answer from the Docker API.
    #[error("Docker API error while {action}: {message}")]
    Api {
        /// What was being done, naming the container.
        action: String,
        /// The daemon's or the client's message.
        message: String,
    },
}

impl DockerError {
    /// Whether discovery found no Docker daemon or no registry container, as opposed to an
    /// ambiguity or a problem worth stopping for: the registry may then run as a local service.
    pub fn means_no_container(&self) -> bool {
        matches!(
            self,
            DockerError::Unreachable { .. }
                | DockerError::NoneFound
                | DockerError::NoneRunning { .. }
        )
    }
}

/// A container that discovery considered a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Container name without the leading `/`.
    pub name: String,
    /// Full container id.
    pub id: String,
    /// Image reference as shown by `docker ps`.
    pub image: String,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (id {}, image {})",
            self.name,
            short_id(&self.id),
            self.image
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
    Engine::connect()?.find(spec)
}

/// [`Service`] for a registry running in a container.
pub struct ContainerService {
    container: RegistryContainer,
    engine: Engine,
    verbose: bool,
    ready_timeout: Duration,
}

impl ContainerService {
    /// Wraps a container found by [`find_registry`]; connects to the daemon.
    pub fn new(container: RegistryContainer, verbose: bool) -> Result<Self> {
        Ok(Self {
            container,
            engine: Engine::connect()?,
            verbose,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        })
    }

    /// Sets how long [`Service::start`] and [`Service::restart`] wait for the registry to answer.
    pub fn with_ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// The container this service drives (its endpoint is refreshed after each start).
    pub fn container(&self) -> &RegistryContainer {
        &self.container
    }

    /// Whether the caller asked for verbose output; this module itself never prints.
    pub fn verbose(&self) -> bool {
        self.verbose
    }

    /// Whether the container is running right now.
    pub fn is_running(&self) -> Result<bool> {
        let info = self
            .engine
            .inspect_named(&self.container.id, &self.container.name)?;
        Ok(is_running(&info))
    }

    fn api<T>(&self, action: &str, r: Result<T, bollard::errors::Error>) -> Result<T> {
        r.map_err(|e| {
            anyhow!(DockerError::Api {
                action: format!("{action} container {}", self.container.name),
                message: error_message(&e),
            })
        })
    }

    /// Runs the collector with `docker exec` in the running container.
    fn gc_exec(&self, info: &ContainerInspectResponse) -> Result<GcOutcome> {
        let docker = &self.engine.docker;
        let cmd = vec![
            registry_binary(info),
            "garbage-collect".to_string(),
            self.container.config_path.clone(),
        ];
        let (output, code) = self
            .engine
            .rt
            .block_on(async {
                let exec = docker
                    .create_exec(
                        &self.container.id,
                        CreateExecOptions {
                            attach_stdout: Some(true),
                            attach_stderr: Some(true),
                            cmd: Some(cmd),
                            ..Default::default()
                        },
                    )
                    .await?;
                let mut text = String::new();
                if let StartExecResults::Attached { mut output, .. } =
                    docker.start_exec(&exec.id, None).await?
                {
                    while let Some(chunk) = output.next().await {
                        text.push_str(&chunk?.to_string());
                    }
                }
                let inspected = docker.inspect_exec(&exec.id).await?;
                Ok::<_, bollard::errors::Error>((text, inspected.exit_code))
            })
            .map_err(|e| {
                anyhow!(DockerError::Api {
                    action: format!(
                        "running `registry garbage-collect` in container {}",
                        self.container.name
                    ),
                    message: error_message(&e),
                })
            })?;
        Ok(GcOutcome {
            success: code == Some(0),
            output: with_exit_note(output, code),
        })
    }

    /// Runs the collector in a one-shot container from the same image that shares the stopped
    /// registry's volumes and environment; the helper is removed whatever happens.
    fn gc_one_shot(&self, info: &ContainerInspectResponse) -> Result<GcOutcome> {
        let docker = &self.engine.docker;
        let config = info.config.clone().unwrap_or_default();
        let image = info
            .image
            .clone()
            .or(config.image.clone())
            .context("the registry container has no image")?;
        let name = format!(
            "docker-delete-gc-{}-{}",
            short_id(&self.container.id),
            std::process::id()
        );
        let body = ContainerCreateBody {
            image: Some(image),
            entrypoint: Some(vec![registry_binary(info)]),
            cmd: Some(vec![
                "garbage-collect".to_string(),
                self.container.config_path.clone(),
            ]),
            env: config.env.clone(),
            user: config.user.clone(),
            working_dir: config.working_dir.clone(),
            labels: Some(HashMap::from([(
                GC_LABEL.to_string(),
                format!("garbage-collect {}", self.container.name),
            )])),
            host_config: Some(HostConfig {
                volumes_from: Some(vec![self.container.id.clone()]),
                network_mode: Some("none".to_string()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self.api(
            "creating a garbage-collect helper for",
            self.engine.rt.block_on(docker.create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )),
        )?;
        let result = self.engine.rt.block_on(async {
            docker.start_container(&created.id, None).await?;
            let mut code = None;
            let mut wait = docker.wait_container(
                &created.id,
                Some(
                    WaitContainerOptionsBuilder::default()
                        .condition("not-running")
                        .build(),
                ),
            );
            while let Some(r) = wait.next().await {
                match r {
                    Ok(w) => code = Some(w.status_code),
                    // bollard reports a non-zero exit status as an error.
                    Err(bollard::errors::Error::DockerContainerWaitError { code: c, .. }) => {
                        code = Some(c)
                    }
                    Err(e) => return Err(e),
                }
            }
            let mut text = String::new();
            let mut logs = docker.logs(
                &created.id,
                Some(
                    LogsOptionsBuilder::default()
                        .stdout(true)
                        .stderr(true)
                        .build(),
                ),
            );
            while let Some(chunk) = logs.next().await {
                text.push_str(&chunk?.to_string());
            }
            Ok((text, code))
        });
        let removed = self.engine.rt.block_on(
            docker.remove_container(
                &created.id,
                Some(
                    RemoveContainerOptionsBuilder::default()
                        .force(true)
                        .v(false)
                        .build(),
                ),
            ),
        );
        let (output, code) = self.api("running a garbage-collect helper for", result)?;
        self.api("removing the garbage-collect helper of", removed)
            .with_context(|| format!("remove it with `docker rm -f {name}`"))?;
        Ok(GcOutcome {
            success: code == Some(0),
            output: with_exit_note(output, code),
        })
    }

    /// Waits until the registry answers `GET /v2/` (200 or 401), or, without an endpoint, until
    /// the container runs (and is healthy if it has a healthcheck).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.ready_timeout;
        // A restart may move an ephemeral published port: read the endpoint again.
        let info = self
            .engine
            .inspect_named(&self.container.id, &self.container.name)?;
        if let Some(ep) = self.engine.endpoint_of(&info, &self.container) {
            self.container.endpoint = Some(ep);
        }
        let mut last: String;
        loop {
            let info = self
                .engine
                .inspect_named(&self.container.id, &self.container.name)?;
            let state = info.state.clone().unwrap_or_default();
            match state.status {
                Some(ContainerStateStatusEnum::EXITED) | Some(ContainerStateStatusEnum::DEAD) => {
                    bail!(
                        "container {} stopped instead of starting (exit code {}); see `docker logs {}`",
                        self.container.name,
                        state.exit_code.unwrap_or(-1),
                        self.container.name
                    );
                }
                _ => {}
            }
            if state.running == Some(true) {
                let health = state.health.and_then(|h| h.status);
                let healthy = matches!(
                    health,
                    None | Some(HealthStatusEnum::HEALTHY)
                        | Some(HealthStatusEnum::NONE)
                        | Some(HealthStatusEnum::EMPTY)
                );
                match &self.container.endpoint {
                    Some(ep) => match probe_v2(ep) {
                        Ok(code) if code == 200 || code == 401 => return Ok(()),
                        Ok(code) => last = format!("GET {ep}/v2/ answered {code}"),
                        Err(e) => last = format!("GET {ep}/v2/: {e}"),
                    },
                    None if healthy => return Ok(()),
                    None => {
                        last = format!("health is {}", health.unwrap_or(HealthStatusEnum::EMPTY))
                    }
                }
            } else {
                last = format!(
                    "container is {}",
                    state.status.unwrap_or(ContainerStateStatusEnum::EMPTY)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "registry container {} did not come back within {} s ({last}); check `docker logs {}`",
                    self.container.name,
                    self.ready_timeout.as_secs(),
                    self.container.name
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Service for ContainerService {
    fn describe(&self) -> String {
        format!(
            "container {} ({})",
            self.container.name,
            short_id(&self.container.id)
        )
    }

    fn garbage_collect(&mut self) -> Result<GcOutcome> {
        let info = self
            .engine
            .inspect_named(&self.container.id, &self.container.name)?;
        if is_running(&info) {
            self.gc_exec(&info)
        } else {
            self.gc_one_shot(&info)
        }
    }

    fn can_restart(&self) -> bool {
        true
    }

    fn restart(&mut self) -> Result<()> {
        let r = self.engine.rt.block_on(
            self.engine.docker.restart_container(
                &self.container.id,
                Some(
                    RestartContainerOptionsBuilder::default()
                        .t(STOP_GRACE_SECS)
                        .build(),
                ),
            ),
        );
        self.api("restarting", r)?;
        self.wait_ready()
    }

    fn stop(&mut self) -> Result<()> {
        let r = self.engine.rt.block_on(
            self.engine.docker.stop_container(
                &self.container.id,
                Some(
                    StopContainerOptionsBuilder::default()
                        .t(STOP_GRACE_SECS)
                        .build(),
                ),
            ),
        );
        self.api("stopping", r)
    }

    fn start(&mut self) -> Result<()> {
        let r = self
            .engine
            .rt
            .block_on(self.engine.docker.start_container(&self.container.id, None));
        // 304: already running, which is what we want.
        match r {
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => {}
            r => self.api("starting", r)?,
        }
        self.wait_ready()
    }

    fn endpoint(&self) -> Option<String> {
        self.container.endpoint.clone()
    }

    fn start_hint(&self) -> String {
        format!("docker start {}", self.container.name)
    }
}

/// A connection to the daemon plus the runtime that drives it.
struct Engine {
    rt: tokio::runtime::Runtime,
    docker: Docker,
}

impl Engine {
    fn connect() -> Result<Self, DockerError> {
        Self::connect_to(&docker_host())
    }

    /// Connects to `host` (`unix:///path`, `tcp://...`) and checks that the daemon answers.
    fn connect_to(host: &str) -> Result<Self, DockerError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DockerError::Api {
                action: "starting the Docker client".to_string(),
                message: e.to_string(),
            })?;
        let docker = Docker::connect_with_host(host).map_err(|e| connect_error(host, &e))?;
        // Connecting does not touch the socket; asking for the version does, so an absent or
        // forbidden daemon is reported here, before any real work. (bollard 0.21 builds its
        // URLs without the `/v1.xx` prefix, so the daemon answers in its own API version.)
        let docker = rt
            .block_on(docker.negotiate_version())
            .map_err(|e| connect_error(host, &e))?;
        Ok(Self { rt, docker })
    }

    fn inspect(&self, spec: &str) -> Result<ContainerInspectResponse, bollard::errors::Error> {
        self.rt.block_on(self.docker.inspect_container(spec, None))
    }

    fn inspect_named(&self, id: &str, name: &str) -> Result<ContainerInspectResponse> {
        self.inspect(id).map_err(|e| match e {
            bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            } => anyhow!(DockerError::NoSuchContainer {
                spec: name.to_string()
            }),
            e => anyhow!(DockerError::Api {
                action: format!("inspecting container {name}"),
                message: error_message(&e),
            }),
        })
    }

    fn find(&self, spec: Option<&str>) -> Result<RegistryContainer, DockerError> {
        let spec = spec.map(str::trim).filter(|s| !s.is_empty());
        let info = match spec {
            Some(spec) => self.inspect(spec).map_err(|e| match e {
                bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                } => DockerError::NoSuchContainer {
                    spec: spec.to_string(),
                },
                e => DockerError::Api {
                    action: format!("inspecting container {spec}"),
                    message: error_message(&e),
                },
            })?,
            None => {
                let id = self.discover()?;
                self.inspect(&id).map_err(|e| DockerError::Api {
                    action: format!("inspecting container {}", short_id(&id)),
                    message: error_message(&e),
                })?
            }
        };
        let name = container_name(&info);
        if !is_running(&info) {
            let state = info.state.clone().unwrap_or_default();
            let status = state
                .status
                .map(|s| s.to_string())
                .unwrap_or_else(|| "not running".to_string());
            let hint = if state.paused == Some(true) {
                format!("docker unpause {name}")
            } else {
                format!("docker start {name}")
            };
            return Err(DockerError::NotRunning { name, status, hint });
        }
        let image = image_of(&info);
        let command = process_args(&info);
        if !image_is_registry(&image) && !command_runs_registry(&command) {
            return Err(DockerError::NotARegistry {
                name,
                image,
                command: command.join(" "),
            });
        }
        self.read_setup(&info)
    }

    /// The id of the one running container that looks like a registry.
    fn discover(&self) -> Result<String, DockerError> {
        let list = self
            .rt
            .block_on(self.docker.list_containers(Some(
                ListContainersOptionsBuilder::default().all(true).build(),
            )))
            .map_err(|e| DockerError::Api {
                action: "listing containers".to_string(),
                message: error_message(&e),
            })?;
        let (running, stopped): (Vec<_>, Vec<_>) = list
            .into_iter()
            .partition(|c| c.state.as_ref().is_some_and(|s| s.to_string() == "running"));
        let candidates = registry_candidates(running);
        if candidates.is_empty() {
            let stopped = registry_candidates(stopped);
            if !stopped.is_empty() {
                return Err(DockerError::NoneRunning { stopped });
            }
        }
        match candidates.len() {
            0 => Err(DockerError::NoneFound),
            1 => Ok(candidates[0].id.clone()),
            _ => Err(DockerError::Ambiguous { candidates }),
        }
    }

    /// Reads the config out of the container and works out roots and the endpoint.
    fn read_setup(
        &self,
        info: &ContainerInspectResponse,
    ) -> Result<RegistryContainer, DockerError> {
        let name = container_name(info);
        let id = info.id.clone().unwrap_or_default();
        let env = info
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let args = process_args(info);

        let explicit =
            config_path_from_args(&args).or_else(|| env_value(&env, "REGISTRY_CONFIGURATION_PATH"));
        let candidates = match &explicit {
            Some(p) => vec![p.clone()],
            None => vec![
                REGISTRY2_CONFIG_PATH.to_string(),
                REGISTRY3_CONFIG_PATH.to_string(),
            ],
        };
        let mut config_path = candidates[0].clone();
        let mut config_yaml = None;
        for path in &candidates {
            match self.read_file(&id, path) {
                Ok(Some(text)) => {
                    config_path = path.clone();
                    config_yaml = Some(text);
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(DockerError::Api {
                        action: format!("reading {path} from container {name}"),
                        message: error_message(&e),
                    });
                }
            }
        }
        let parsed = match &config_yaml {
            Some(text) => {
                RegistryConfig::parse(text, &config_path).map_err(|e| DockerError::BadConfig {
                    name: name.clone(),
                    path: config_path.clone(),
                    message: format!("{e:#}"),
                })?
            }
            None => RegistryConfig::default(),
        };
        let root_in_container = env_value(&env, "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
            .or(parsed.root_directory.clone())
            .unwrap_or_else(|| DEFAULT_CONTAINER_ROOT.to_string());

        let mut container = RegistryContainer {
            id,
            name,
            image: image_of(info),
            config_path,
            config_yaml,
            root_in_container,
            host_root: None,
            endpoint: None,
        };
        container.host_root = self.host_root_of(info, &container.root_in_container)?;
        container.endpoint = self.endpoint_of(info, &container);
        Ok(container)
    }

    fn host_root_of(
        &self,
        info: &ContainerInspectResponse,
        root: &str,
    ) -> Result<Option<PathBuf>, DockerError> {
        let mounts = info.mounts.clone().unwrap_or_default();
        let Some((mount, rest)) = mount_for(&mounts, root) else {
            return Ok(None);
        };
        let mut source = mount.source.clone().filter(|s| !s.is_empty());
        if source.is_none()
            && mount.typ.as_deref() == Some("volume")
            && let Some(volume) = &mount.name
        {
            let v = self
                .rt
                .block_on(self.docker.inspect_volume(volume))
                .map_err(|e| DockerError::Api {
                    action: format!("inspecting volume {volume}"),
                    message: error_message(&e),
                })?;
            source = Some(v.mountpoint).filter(|s| !s.is_empty());
        }
        Ok(source.map(|s| Path::new(&s).join(rest)))
    }

    fn endpoint_of(
        &self,
        info: &ContainerInspectResponse,
        c: &RegistryContainer,
    ) -> Option<String> {
        let env = info
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let parsed = c
            .config_yaml
            .as_deref()
            .and_then(|t| RegistryConfig::parse(t, &c.config_path).ok())
            .unwrap_or_default();
        let addr = env_value(&env, "REGISTRY_HTTP_ADDR")
            .or(parsed.http_addr.clone())
            .unwrap_or_else(|| ":5000".to_string());
        let tls = parsed.tls
            || env_value(&env, "REGISTRY_HTTP_TLS_CERTIFICATE").is_some_and(|v| !v.is_empty());
        let network_mode = info
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default();
        if network_mode == "host" {
            // No port mapping: the registry listens on the host itself.
            return RegistryConfig {
                http_addr: Some(addr),
                tls,
                ..Default::default()
            }
            .endpoint();
        }
        let ports = info.network_settings.as_ref()?.ports.as_ref()?;
        endpoint_from_ports(ports, http_port(&addr)?, tls)
    }

    /// Reads one file out of the container with the archive API; `None` when it does not exist.
    /// Follows symbolic links a few levels deep.
    fn read_file(&self, id: &str, path: &str) -> Result<Option<String>, bollard::errors::Error> {
        let mut path = path.to_string();
        for _ in 0..8 {
            let opts = DownloadFromContainerOptionsBuilder::default()
                .path(&path)
                .build();
            let bytes = self.rt.block_on(async {
                let mut stream = self.docker.download_from_container(id, Some(opts));
                let mut buf = Vec::new();
                while let Some(chunk) = stream.next().await {
                    buf.extend_from_slice(&chunk?);
                    if buf.len() > MAX_CONFIG_BYTES * 2 {
                        break;
                    }
                }
                Ok::<_, bollard::errors::Error>(buf)
            });
            let bytes = match bytes {
                Ok(b) => b,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => return Ok(None),
                Err(e) => return Err(e),
            };
            match first_tar_entry(&bytes)? {
                TarEntry::File(text) => return Ok(Some(text)),
                TarEntry::Link(target) => path = resolve_link(&path, &target),
                TarEntry::Other => return Ok(None),
            }
        }
        Ok(None)
    }
}

enum TarEntry {
    File(String),
    Link(String),
    Other,
}

fn first_tar_entry(bytes: &[u8]) -> Result<TarEntry, bollard::errors::Error> {
    let io = |e: std::io::Error| bollard::errors::Error::IOError { err: e };
    let mut archive = tar::Archive::new(bytes);
    let mut entries = archive.entries().map_err(io)?;
    let Some(entry) = entries.next() else {
        return Ok(TarEntry::Other);
    };
    let mut entry = entry.map_err(io)?;
    let kind = entry.header().entry_type();
    if kind.is_symlink() {
        let target = entry
            .link_name()
            .map_err(io)?
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(TarEntry::Link(target));
    }
    if !kind.is_file() {
        return Ok(TarEntry::Other);
    }
    let mut text = String::new();
    entry
        .by_ref()
        .take(MAX_CONFIG_BYTES as u64)
        .read_to_string(&mut text)
        .map_err(io)?;
    Ok(TarEntry::File(text))
}

fn resolve_link(path: &str, target: &str) -> String {
    if target.starts_with('/') {
        return target.to_string();
    }
    let dir = Path::new(path).parent().unwrap_or(Path::new("/"));
    dir.join(target).to_string_lossy().into_owned()
}

/// `DOCKER_HOST` as bollard will use it, for messages.
fn docker_host() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string())
}

/// Sorts a connection failure into "not there" and "not allowed".
fn connect_error(host: &str, e: &bollard::errors::Error) -> DockerError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::PermissionDenied
        {
            return DockerError::PermissionDenied {
                host: host.to_string(),
            };
        }
        source = err.source();
    }
    let message = error_message(e);
    if message.to_lowercase().contains("permission denied") {
        return DockerError::PermissionDenied {
            host: host.to_string(),
        };
    }
    DockerError::Unreachable {
        host: host.to_string(),
        reason: message,
    }
}

/// The error and its causes on one line: bollard's own messages are often just "client error".
fn error_message(e: &bollard::errors::Error) -> String {
    if let bollard::errors::Error::DockerResponseServerError { message, .. } = e {
        return message.trim().to_string();
    }
    let mut parts = vec![e.to_string()];
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        source = err.source();
    }
    parts.join(": ")
}

fn with_exit_note(mut output: String, code: Option<i64>) -> String {
    if code != Some(0) {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        match code {
            Some(c) => output.push_str(&format!("(garbage-collect exited with status {c})\n")),
            None => output.push_str("(garbage-collect exit status unknown)\n"),
        }
    }
    output
}

fn short_id(id: &str) -> &str {
    let id = id.strip_prefix("sha256:").unwrap_or(id);
    &id[..id.len().min(12)]
}

fn container_name(info: &ContainerInspectResponse) -> String {
    info.name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_string())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| short_id(info.id.as_deref().unwrap_or("")).to_string())
}

fn image_of(info: &ContainerInspectResponse) -> String {
    info.config
        .as_ref()
        .and_then(|c| c.image.clone())
        .or_else(|| info.image.clone())
        .unwrap_or_default()
}

fn is_running(info: &ContainerInspectResponse) -> bool {
    info.state
        .as_ref()
        .is_some_and(|s| s.running == Some(true) && s.paused != Some(true))
}

/// The process the container runs: `Path` then `Args` (entrypoint and command combined).
fn process_args(info: &ContainerInspectResponse) -> Vec<String> {
    let mut v: Vec<String> = info.path.iter().cloned().collect();
    v.extend(info.args.clone().unwrap_or_default());
    if v.is_empty()
        && let Some(c) = &info.config
    {
        v.extend(c.entrypoint.clone().unwrap_or_default());
        v.extend(c.cmd.clone().unwrap_or_default());
    }
    v
}

/// The binary to give `garbage-collect` to: the container's own when its entrypoint is the
/// registry binary, else `registry` on the image's `PATH` (`/bin/registry` in `registry:2` and
/// `registry:3`, whose entrypoint is the shell script `/entrypoint.sh`).
fn registry_binary(info: &ContainerInspectResponse) -> String {
    match info.path.as_deref() {
        Some(p) if is_registry_binary(p) => p.to_string(),
        _ => "registry".to_string(),
    }
}

fn is_registry_binary(arg: &str) -> bool {
    let base = arg.rsplit('/').next().unwrap_or(arg);
    base == "registry" || base == "docker-registry"
}

/// Whether an image reference names a registry image: the last path component of its repository
/// is `registry` or `distribution`, whatever the host, namespace, tag or digest.
pub fn image_is_registry(image: &str) -> bool {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    // A tag follows the last ':' of the last component; a registry port can only come earlier.
    let repo = last.split(':').next().unwrap_or(last);
    matches!(repo, "registry" | "distribution")
}

/// Whether a command line runs `registry serve` (or `docker-registry serve`), also inside a
/// `sh -c "..."` string.
pub fn command_runs_registry(args: &[String]) -> bool {
    let words: Vec<&str> = args.iter().flat_map(|a| a.split_whitespace()).collect();
    words
        .windows(2)
        .any(|w| is_registry_binary(w[0]) && w[1] == "serve")
}

/// The config file on a registry command line: the last argument ending in `.yml` or `.yaml`.
pub fn config_path_from_args(args: &[String]) -> Option<String> {
    args.iter()
        .flat_map(|a| a.split_whitespace())
        .map(|a| a.trim_matches(['"', '\'']))
        .rfind(|a| a.ends_with(".yml") || a.ends_with(".yaml"))
        .map(str::to_string)
}

/// The value of `KEY` in a container's `KEY=value` environment list (the last one wins).
pub fn env_value(env: &[String], key: &str) -> Option<String> {
    env.iter()
        .rev()
        .filter_map(|e| e.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

/// The TCP port of an `http.addr` such as `:5000`, `0.0.0.0:5000` or `[::]:5000`.
pub fn http_port(addr: &str) -> Option<u16> {
    addr.trim().rsplit_once(':')?.1.parse().ok()
}

/// `http://127.0.0.1:<HostPort>` for the host binding of `container_port/tcp`; a wildcard host
/// address becomes `127.0.0.1`. IPv4 bindings are preferred. `None` when not published.
pub fn endpoint_from_ports(ports: &PortMap, container_port: u16, tls: bool) -> Option<String> {
    let bindings = ports.get(&format!("{container_port}/tcp"))?.as_ref()?;
    let mut best: Option<(bool, String, String)> = None;
    for b in bindings {
        let Some(port) = b.host_port.as_deref().filter(|p| !p.is_empty()) else {
            continue;
        };
        let ip = b.host_ip.as_deref().unwrap_or("");
        let (v4, host) = match ip {
            "" | "0.0.0.0" | "::" => (true, "127.0.0.1".to_string()),
            ip if ip.contains(':') => (false, format!("[{ip}]")),
            ip => (true, ip.to_string()),
        };
        if best.as_ref().is_none_or(|(bv4, _, _)| v4 && !bv4) {
            best = Some((v4, host, port.to_string()));
        }
    }
    let (_, host, port) = best?;
    let scheme = if tls { "https" } else { "http" };
    Some(format!("{scheme}://{host}:{port}"))
}

/// The mount that holds `root` (at `root` itself or at a parent), with the rest of the path below
/// the mount point. The deepest such mount wins; tmpfs mounts have no host directory.
pub fn mount_for<'a>(mounts: &'a [MountPoint], root: &str) -> Option<(&'a MountPoint, PathBuf)> {
    let root = normalize(Path::new(root));
    mounts
        .iter()
        .filter(|m| m.typ.as_deref() != Some("tmpfs"))
        .filter_map(|m| {
            let dest = normalize(Path::new(m.destination.as_deref()?));
            let rest = root.strip_prefix(&dest).ok()?.to_path_buf();
            Some((m, dest.components().count(), rest))
        })
        .max_by_key(|(_, depth, _)| *depth)
        .map(|(m, _, rest)| (m, rest))
}

/// The host directory behind `root`, from the mounts' sources (bind source or volume mountpoint).
pub fn host_root_from_mounts(mounts: &[MountPoint], root: &str) -> Option<PathBuf> {
    let (m, rest) = mount_for(mounts, root)?;
    let source = m.source.as_deref().filter(|s| !s.is_empty())?;
    Some(Path::new(source).join(rest))
}

fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// `GET <endpoint>/v2/` with a bare HTTP/1.1 request; returns the status code. For `https` the
/// TLS port only gets a plain request, which a Go server answers with 400: that still proves the
/// registry is up, so it is reported as 200.
fn probe_v2(endpoint: &str) -> std::io::Result<u16> {
    let (scheme, rest) = endpoint
        .split_once("://")
        .ok_or_else(|| std::io::Error::other("endpoint has no scheme"))?;
    let hostport = rest.trim_end_matches('/');
    let addr = hostport
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other("endpoint does not resolve"))?;
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /v2/ HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: docker-delete\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = stream.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    let code = head
        .strip_prefix("HTTP/")
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| std::io::Error::other("connection closed without an HTTP answer"))?;
    Ok(if scheme == "https" { 200 } else { code })
}

/// The containers of a listing that look like registries (not our own collector helpers).
fn registry_candidates(list: Vec<bollard::models::ContainerSummary>) -> Vec<Candidate> {
    list.into_iter()
        // Our own one-shot garbage-collect helper runs the registry image too.
        .filter(|c| !c.labels.as_ref().is_some_and(|l| l.contains_key(GC_LABEL)))
        .filter(|c| {
            let image = c.image.as_deref().unwrap_or("");
            let command: Vec<String> = c
                .command
                .as_deref()
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_string)
                .collect();
            image_is_registry(image) || command_runs_registry(&command)
        })
        .map(|c| Candidate {
            name: c
                .names
                .as_ref()
                .and_then(|n| n.first())
                .map(|n| n.trim_start_matches('/').to_string())
                .unwrap_or_default(),
            id: c.id.unwrap_or_default(),
            image: c.image.unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::PortBinding;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn registry_images_match_on_last_component() {
        for yes in [
            "registry",
            "registry:2",
            "registry:3",
            "registry:2.8.3",
            "library/registry:2",
            "docker.io/library/registry:2",
            "distribution/distribution",
            "distribution/distribution:3.0.0",
            "ghcr.io/distribution/distribution:edge",
            "myhost:5000/library/registry:2",
            "myhost:5000/registry",
            "registry@sha256:0123456789abcdef",
            "registry:2@sha256:0123456789abcdef",
        ] {
            assert!(image_is_registry(yes), "{yes}");
        }
        for no in [
            "",
            "nginx",
            "registry-ui:latest",
            "joxit/docker-registry-ui:2",
            "registry:5000/nginx:latest",
            "myregistry:2",
            "sha256:877e316816b6",
            "registry.example.com/app:1",
        ] {
            assert!(!image_is_registry(no), "{no}");
        }
    }

    #[test]
    fn registry_serve_commands() {
        assert!(command_runs_registry(&s(&["registry", "serve", "/c.yml"])));
        assert!(command_runs_registry(&s(&["/bin/registry", "serve"])));
        assert!(command_runs_registry(&s(&[
            "/usr/bin/docker-registry",
            "serve",
            "/etc/docker/registry/config.yml"
        ])));
        assert!(command_runs_registry(&s(&[
            "sh",
            "-c",
            "exec registry serve /x.yml"
        ])));
        assert!(!command_runs_registry(&s(&["sleep", "3600"])));
        assert!(!command_runs_registry(&s(&[
            "registry",
            "garbage-collect",
            "/x.yml"
        ])));
        assert!(!command_runs_registry(&s(&["serve", "registry"])));
        assert!(!command_runs_registry(&[]));
    }

    #[test]
    fn config_path_from_command_line() {
        assert_eq!(
            config_path_from_args(&s(&["/entrypoint.sh", "/etc/docker/registry/config.yml"]))
                .as_deref(),
            Some("/etc/docker/registry/config.yml")
        );
        assert_eq!(
            config_path_from_args(&s(&["registry", "serve", "/etc/distribution/config.yml"]))
                .as_deref(),
            Some("/etc/distribution/config.yml")
        );
        assert_eq!(
            config_path_from_args(&s(&["sh", "-c", "registry serve '/srv/reg.yaml'"])).as_deref(),
            Some("/srv/reg.yaml")
        );
        assert_eq!(config_path_from_args(&s(&["registry", "serve"])), None);
        assert_eq!(config_path_from_args(&s(&["/bin/yml"])), None);
    }

    #[test]
    fn env_lookup_last_wins() {
        let env = s(&[
            "A=1",
            "REGISTRY_HTTP_ADDR=:6000",
            "B=x=y",
            "REGISTRY_HTTP_ADDR=0.0.0.0:7000",
        ]);
        assert_eq!(
            env_value(&env, "REGISTRY_HTTP_ADDR").as_deref(),
            Some("0.0.0.0:7000")
        );
        assert_eq!(env_value(&env, "B").as_deref(), Some("x=y"));
        assert_eq!(env_value(&env, "C"), None);
    }

    #[test]
    fn ports_of_http_addr() {
        assert_eq!(http_port(":5000"), Some(5000));
        assert_eq!(http_port("0.0.0.0:443"), Some(443));
        assert_eq!(http_port("[::]:5001"), Some(5001));
        assert_eq!(http_port("localhost"), None);
    }

    fn binding(ip: &str, port: &str) -> PortBinding {
        PortBinding {
            host_ip: Some(ip.to_string()),
            host_port: Some(port.to_string()),
        }
    }

    #[test]
    fn endpoint_from_port_bindings() {
        let mut ports = PortMap::new();
        ports.insert(
            "5000/tcp".into(),
            Some(vec![binding("::", "5000"), binding("0.0.0.0", "5000")]),
        );
        assert_eq!(
            endpoint_from_ports(&ports, 5000, false).as_deref(),
            Some("http://127.0.0.1:5000")
        );
        ports.insert("5000/tcp".into(), Some(vec![binding("", "49153")]));
        assert_eq!(
            endpoint_from_ports(&ports, 5000, true).as_deref(),
            Some("https://127.0.0.1:49153")
        );
        ports.insert("5000/tcp".into(), Some(vec![binding("127.0.0.1", "15000")]));
        assert_eq!(
            endpoint_from_ports(&ports, 5000, false).as_deref(),
            Some("http://127.0.0.1:15000")
        );
        ports.insert("5000/tcp".into(), Some(vec![binding("::1", "15000")]));
        assert_eq!(
            endpoint_from_ports(&ports, 5000, false).as_deref(),
            Some("http://[::1]:15000")
        );
        // Exposed but not published.
        ports.insert("5000/tcp".into(), None);
        assert_eq!(endpoint_from_ports(&ports, 5000, false), None);
        // A different container port.
        ports.insert("6000/tcp".into(), Some(vec![binding("0.0.0.0", "6000")]));
        assert_eq!(endpoint_from_ports(&ports, 5000, false), None);
        assert_eq!(
            endpoint_from_ports(&ports, 6000, false).as_deref(),
            Some("http://127.0.0.1:6000")
        );
    }

    fn mount(typ: &str, source: &str, dest: &str) -> MountPoint {
        MountPoint {
            typ: Some(typ.to_string()),
            source: Some(source.to_string()),
            destination: Some(dest.to_string()),
            ..Default::default()
        }
    }

    #[test]
    fn host_root_from_bind_and_volume() {
        let mounts = vec![
            mount("bind", "/srv/config.yml", "/etc/docker/registry/config.yml"),
            mount("bind", "/srv/registry", "/var/lib/registry"),
        ];
        assert_eq!(
            host_root_from_mounts(&mounts, "/var/lib/registry"),
            Some(PathBuf::from("/srv/registry"))
        );
        assert_eq!(
            host_root_from_mounts(&mounts, "/var/lib/registry/"),
            Some(PathBuf::from("/srv/registry"))
        );
        let vol = vec![mount(
            "volume",
            "/var/lib/docker/volumes/regdata/_data",
            "/var/lib/registry",
        )];
        assert_eq!(
            host_root_from_mounts(&vol, "/var/lib/registry"),
            Some(PathBuf::from("/var/lib/docker/volumes/regdata/_data"))
        );
    }

    #[test]
    fn host_root_from_parent_mount_deepest_wins() {
        let mounts = vec![
            mount("bind", "/data", "/var"),
            mount("bind", "/srv/lib", "/var/lib"),
        ];
        assert_eq!(
            host_root_from_mounts(&mounts, "/var/lib/registry"),
            Some(PathBuf::from("/srv/lib/registry"))
        );
        assert_eq!(
            host_root_from_mounts(&mounts, "/var/spool/reg"),
            Some(PathBuf::from("/data/spool/reg"))
        );
    }

    #[test]
    fn host_root_none_when_not_mounted() {
        let mounts = vec![
            mount("bind", "/srv/x", "/var/lib/registry-other"),
            mount("bind", "/srv/y", "/var/lib/registry/docker"),
            mount("tmpfs", "", "/var/lib"),
        ];
        assert_eq!(host_root_from_mounts(&mounts, "/var/lib/registry"), None);
        assert_eq!(host_root_from_mounts(&[], "/var/lib/registry"), None);
    }

    #[test]
    fn link_resolution() {
        assert_eq!(
            resolve_link("/etc/docker/registry/config.yml", "/config/c.yml"),
            "/config/c.yml"
        );
        assert_eq!(
            resolve_link(
                "/etc/docker/registry/config.yml",
                "../../distribution/config.yml"
            ),
            "/etc/docker/registry/../../distribution/config.yml"
        );
    }

    #[test]
    fn absent_daemon_is_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let host = format!("unix://{}/docker.sock", dir.path().display());
        match Engine::connect_to(&host) {
            Err(e @ DockerError::Unreachable { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(&host) && msg.contains("start Docker"), "{msg}");
            }
            Err(e) => panic!("expected Unreachable, got {e}"),
            Ok(_) => panic!("connected to {host}"),
        }
        assert!(matches!(
            Engine::connect_to("bogus://x"),
            Err(DockerError::Unreachable { .. })
        ));
    }

    #[test]
    fn permission_denied_is_recognised() {
        let e = bollard::errors::Error::IOError {
            err: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let msg = connect_error("unix:///var/run/docker.sock", &e).to_string();
        assert!(msg.contains("run docker-delete as root"), "{msg}");
        assert!(msg.contains("`docker` group"), "{msg}");
    }

    /// Meaningful when run as a user outside the `docker` group (root may always connect).
    #[test]
    fn forbidden_socket_is_permission_denied() {
        let socket = "/var/run/docker.sock";
        match std::os::unix::net::UnixStream::connect(socket) {
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
            _ => return,
        }
        match Engine::connect_to(&format!("unix://{socket}")) {
            Err(e @ DockerError::PermissionDenied { .. }) => {
                assert!(e.to_string().contains(socket), "{e}")
            }
            Err(e) => panic!("expected PermissionDenied, got {e}"),
            Ok(_) => panic!("connected although the socket refused us"),
        }
    }

    #[test]
    fn ambiguous_message_lists_candidates() {
        let e = DockerError::Ambiguous {
            candidates: vec![
                Candidate {
                    name: "reg-a".into(),
                    id: "0123456789abcdef0123".into(),
                    image: "registry:2".into(),
                },
                Candidate {
                    name: "reg-b".into(),
                    id: "fedcba9876543210".into(),
                    image: "registry:3".into(),
                },
            ],
        };
        let msg = e.to_string();
        assert!(
            msg.contains("reg-a (id 0123456789ab, image registry:2)"),
            "{msg}"
        );
        assert!(msg.contains("reg-b"), "{msg}");
        assert!(msg.contains("--container NAME"), "{msg}");
        assert!(msg.contains("DOCKER_REGISTRY_CONTAINER_ID"), "{msg}");
    }
}
