//! Turns flags, environment, the registry's `config.yml` and container discovery into one plain
//! [`Config`]. Nothing past this module sees clap types.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cli::Global;
use crate::docker::{self, ContainerService, RegistryContainer};
use crate::plan::Finish;
use crate::service::{LocalService, Service};

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

/// Whether and how to ask before deleting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// Ask on the terminal.
    Ask,
    /// Go ahead (`--yes`, or a legacy form without a terminal).
    Yes,
    /// No terminal and no `--yes`: refuse.
    Refuse,
}

/// How the registry process is reached.
pub enum Registry {
    /// A container, through the Docker API.
    Container(RegistryContainer),
    /// A program on this host.
    Local(LocalService),
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Container(c) => write!(f, "Container({})", c.name),
            Self::Local(l) => write!(f, "Local({:?})", l),
        }
    }
}

/// Everything a run needs, resolved once.
#[derive(Debug)]
pub struct Config {
    /// The storage root (holding `docker/registry/v2`).
    pub root: PathBuf,
    /// The registry process.
    pub registry: Registry,
    /// Where the registry answers, as far as is known before any restart.
    pub endpoint: Option<String>,
    /// `--registry-url`, which overrides what the registry's set-up says.
    pub registry_url: Option<String>,
    /// Service steps after the edits.
    pub finish: Finish,
    /// Print the plan only.
    pub dry_run: bool,
    /// Confirmation mode.
    pub confirm: Confirm,
    /// Show all GC output.
    pub verbose: bool,
    /// Keeps a generated GC config alive for the run.
    _gc_config: Option<tempfile::TempPath>,
}

impl Config {
    /// The registry as a [`Service`] (creating the container client as needed).
    pub fn service(&self) -> Result<Box<dyn Service>> {
        Ok(match &self.registry {
            Registry::Container(c) => Box::new(ContainerService::new(c.clone(), self.verbose)?),
            Registry::Local(l) => Box::new(l.clone()),
        })
    }

    /// A description of where GC and restart happen, for the plan header.
    pub fn describe_registry(&self) -> String {
        match &self.registry {
            Registry::Container(c) => format!("container {} ({})", c.name, c.image),
            Registry::Local(l) => match &l.registry_bin {
                Some(b) => format!("local registry, garbage-collect with {}", b.display()),
                None => "local registry".to_string(),
            },
        }
    }
}

/// Which command the configuration is for; decides what must be available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Listing: only the tree is needed.
    Read,
    /// Deleting or collecting: the registry must be reachable for GC and restart.
    Modify,
}

/// Resolves flags, environment, the config file and container discovery into a [`Config`].
/// Every error is a refusal: nothing has been touched.
pub fn resolve(g: &Global, purpose: Purpose) -> Result<Config> {
    let file_config = match &g.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the registry config {}", p.display()))?;
            Some(RegistryConfig::parse(&text, &p.display().to_string())?)
        }
        None => None,
    };

    let (container, discovery_note) = find_container(g)?;
    let note = discovery_note
        .map(|n| format!(" (container discovery: {n})"))
        .unwrap_or_default();

    // The storage root.
    let from_flag = g.registry_dir.clone();
    let root = match (&from_flag, &container) {
        (Some(dir), Some(c)) => {
            let Some(host) = &c.host_root else {
                bail!(
                    "container {} keeps its storage ({}) inside the container, not in a host directory or volume, so {} (from --registry-dir or DOCKER_REGISTRY_DIR) is not its tree; refusing to work on the wrong tree",
                    c.name,
                    c.root_in_container,
                    dir.display()
                );
            };
            if !same_dir(dir, host) {
                bail!(
                    "the storage root {} (from --registry-dir or DOCKER_REGISTRY_DIR) is not the directory container {} mounts at {} ({}); refusing to work on the wrong tree",
                    dir.display(),
                    c.name,
                    c.root_in_container,
                    host.display()
                );
            }
            dir.clone()
        }
        (Some(dir), None) => {
            if let Some(root) = file_config
                .as_ref()
                .and_then(|c| c.root_directory.as_deref())
                && !same_dir(dir, Path::new(root))
                && g.config.is_some()
                && Path::new(root).exists()
            {
                bail!(
                    "the storage root {} (from --registry-dir or DOCKER_REGISTRY_DIR) differs from storage.filesystem.rootdirectory {root} in {}; refusing to work on the wrong tree",
                    dir.display(),
                    g.config
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                );
            }
            dir.clone()
        }
        (None, Some(c)) => match &c.host_root {
            Some(h) => h.clone(),
            None => bail!(
                "container {} keeps its storage ({}) inside the container, not in a host directory or volume; docker-delete needs the tree on the host (mount a volume there, or set DOCKER_REGISTRY_DIR)",
                c.name,
                c.root_in_container
            ),
        },
        (None, None) => match file_config.as_ref() {
            Some(fc) => match &fc.root_directory {
                Some(r) => PathBuf::from(r),
                None => bail!(
                    "{} has no storage.filesystem.rootdirectory (only the filesystem storage driver is supported); give --registry-dir",
                    g.config
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                ),
            },
            None => bail!(
                "no registry storage given: set DOCKER_REGISTRY_DIR or --registry-dir to the directory holding docker/registry/v2, or --config to the registry's config.yml, or run a registry container docker-delete can find{note}"
            ),
        },
    };

    // `/srv/registry/` and `/srv/registry` are the same root; print it one way.
    let root: PathBuf = root.components().collect();

    let endpoint = g
        .registry_url
        .clone()
        .or_else(|| container.as_ref().and_then(|c| c.endpoint.clone()))
        .or_else(|| file_config.as_ref().and_then(|c| c.endpoint()));

    let mut gc_config = None;
    let registry = match container {
        Some(c) => {
            if g.restart_cmd.is_some() {
                bail!(
                    "--restart-cmd is for a registry run on this host; container {} is restarted through Docker",
                    c.name
                );
            }
            Registry::Container(c)
        }
        None => {
            if g.offline && purpose == Purpose::Modify {
                bail!(
                    "--offline needs a registry container (give --container or DOCKER_REGISTRY_CONTAINER_ID)"
                );
            }
            let registry_bin = match &g.registry_bin {
                Some(b) => Some(b.clone()),
                None => which("registry").or_else(|| which("docker-registry")),
            };
            let config_path = match &g.config {
                Some(p) => p.clone(),
                None if purpose == Purpose::Read => PathBuf::new(),
                None => {
                    let tmp = write_gc_config(&root)?;
                    let p = tmp.to_path_buf();
                    gc_config = Some(tmp);
                    p
                }
            };
            Registry::Local(LocalService {
                registry_bin,
                config_path,
                restart_cmd: g.restart_cmd.clone(),
                endpoint: endpoint.clone(),
            })
        }
    };

    let finish = Finish {
        offline: g.offline,
        gc: !g.no_gc,
        restart: !g.no_restart,
        verify: true,
    };

    // Checked for dry runs too: a dry run shows what the real run would do.
    if purpose == Purpose::Modify
        && let Registry::Local(l) = &registry
    {
        {
            if finish.gc && l.registry_bin.is_none() {
                bail!(
                    "no registry binary for garbage-collect: neither `registry` nor `docker-registry` is on PATH; install Debian's docker-registry, give --registry-bin, or skip collection with --no-gc"
                );
            }
            if finish.restart && l.restart_cmd.is_none() {
                bail!(
                    "no way to restart the registry after garbage collection, and without a restart its cache keeps answering for deleted blobs; give --container NAME (or DOCKER_REGISTRY_CONTAINER_ID) for a container, --restart-cmd \"systemctl restart docker-registry\" for a service, or --no-restart and restart it yourself{note}"
                );
            }
        }
    }

    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    let confirm = if g.yes || g.dry_run {
        Confirm::Yes
    } else if interactive {
        Confirm::Ask
    } else if g.legacy_noninteractive {
        Confirm::Yes
    } else {
        Confirm::Refuse
    };

    Ok(Config {
        root,
        registry,
        endpoint,
        registry_url: g.registry_url.clone(),
        finish,
        dry_run: g.dry_run,
        confirm,
        verbose: g.verbose,
        _gc_config: gc_config,
    })
}

/// The container to work with: named, or discovered unless the user set up a local registry.
fn find_container(g: &Global) -> Result<(Option<RegistryContainer>, Option<String>)> {
    if g.no_container {
        return Ok((None, None));
    }
    if let Some(spec) = &g.container {
        if let Some(config) = &g.config {
            bail!(
                "--config {} names a registry run on this host, but a container is named too ({spec}, by --container or DOCKER_REGISTRY_CONTAINER_ID); give one or the other",
                config.display()
            );
        }
        return Ok((Some(docker::find_registry(Some(spec))?), None));
    }
    if g.restart_cmd.is_some() || g.config.is_some() {
        // A registry run on this host: a container elsewhere is not the one meant.
        return Ok((None, None));
    }
    match docker::find_registry(None) {
        Ok(c) => Ok((Some(c), None)),
        // No Docker here, or no registry container: a registry run as a service on this host.
        // What discovery saw is worth saying if nothing else works out.
        Err(e @ docker::DockerError::NoneRunning { .. }) => Ok((None, Some(e.to_string()))),
        Err(e) if e.means_no_container() => Ok((None, None)),
        Err(e) => Err(e.into()),
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A minimal config for running the registry's collector on `root` when no config was given.
fn write_gc_config(root: &Path) -> Result<tempfile::TempPath> {
    let mut f = tempfile::Builder::new()
        .prefix("docker-delete-gc-")
        .suffix(".yml")
        .tempfile()
        .context("cannot create a temporary registry config for garbage-collect")?;
    let root = root
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", root.display()))?;
    let root_yaml = serde_json::to_string(&root.to_string_lossy()).expect("a string serialises");
    write!(
        f,
        "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {root_yaml}\n"
    )
    .context("cannot write the temporary registry config")?;
    Ok(f.into_temp_path())
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
