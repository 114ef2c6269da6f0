//! How the registry process is driven: its own `garbage-collect`, stop, start and restart.
//!
//! Two implementations: [`LocalService`] runs the registry binary on this host and restarts it
//! with a user-given command (for example `systemctl restart docker-registry`); the container
//! implementation lives in `docker`. The executor only sees this trait.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// What the registry's own garbage collector printed and whether it succeeded.
#[derive(Debug, Clone)]
pub struct GcOutcome {
    /// `true` when the collector exited with status 0.
    pub success: bool,
    /// Everything it wrote to stdout and stderr, in order of arrival where possible.
    pub output: String,
}

impl GcOutcome {
    /// Lines of the form `blob eligible for deletion: sha256:...` or `Deleting blob: ...`.
    pub fn deleted_blob_count(&self) -> usize {
        self.output
            .lines()
            .filter(|l| l.contains("Deleting blob:"))
            .count()
    }
}

/// The registry process as something docker-delete can act on.
pub trait Service {
    /// A short description for messages and plans, such as `container registry (3f2a1c)`.
    fn describe(&self) -> String;
    /// Runs `registry garbage-collect <config>` wherever the registry lives.
    fn garbage_collect(&mut self) -> Result<GcOutcome>;
    /// Whether [`Service::restart`] can do anything.
    fn can_restart(&self) -> bool;
    /// Restarts the registry so that its in-memory blob cache forgets deleted blobs.
    fn restart(&mut self) -> Result<()>;
    /// Stops the registry (offline mode). Implementations that cannot stop return an error.
    fn stop(&mut self) -> Result<()>;
    /// Starts the registry again after [`Service::stop`].
    fn start(&mut self) -> Result<()>;
    /// The base URL (`http://127.0.0.1:5000`) at which this host reaches the registry, if known.
    fn endpoint(&self) -> Option<String>;
    /// Tells the user how to start the registry by hand if docker-delete could not.
    fn start_hint(&self) -> String;
}

/// The registry as a program on this host: GC runs the binary directly, restart runs a shell
/// command given by the user.
#[derive(Debug, Clone)]
pub struct LocalService {
    /// The registry binary (`registry` or `docker-registry`).
    pub registry_bin: Option<PathBuf>,
    /// The config file passed to `garbage-collect`.
    pub config_path: PathBuf,
    /// Shell command that restarts the registry, if any.
    pub restart_cmd: Option<String>,
    /// Where the registry answers, from the config's `http.addr`.
    pub endpoint: Option<String>,
}

impl LocalService {
    fn run_shell(&self, what: &str, cmd: &str) -> Result<()> {
        let status = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .status()
            .with_context(|| format!("could not run the {what} command `{cmd}`"))?;
        if !status.success() {
            bail!("the {what} command `{cmd}` failed with {status}");
        }
        Ok(())
    }
}

impl Service for LocalService {
    fn describe(&self) -> String {
        match &self.registry_bin {
            Some(bin) => format!("local registry ({})", bin.display()),
            None => "local registry".to_string(),
        }
    }

    fn garbage_collect(&mut self) -> Result<GcOutcome> {
        let bin = self.registry_bin.as_ref().context(
            "no registry binary found for garbage-collect: install docker-registry or give --registry-bin",
        )?;
        let out = Command::new(bin)
            .arg("garbage-collect")
            .arg(&self.config_path)
            .output()
            .with_context(|| format!("could not run {} garbage-collect", bin.display()))?;
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok(GcOutcome {
            success: out.status.success(),
            output,
        })
    }

    fn can_restart(&self) -> bool {
        self.restart_cmd.is_some()
    }

    fn restart(&mut self) -> Result<()> {
        match &self.restart_cmd {
            Some(cmd) => self.run_shell("restart", cmd),
            None => bail!("no restart command: give --restart-cmd"),
        }
    }

    fn stop(&mut self) -> Result<()> {
        bail!(
            "--offline needs a registry container (a local registry cannot be stopped by docker-delete)"
        )
    }

    fn start(&mut self) -> Result<()> {
        bail!("a local registry cannot be started by docker-delete")
    }

    fn endpoint(&self) -> Option<String> {
        self.endpoint.clone()
    }

    fn start_hint(&self) -> String {
        match &self.restart_cmd {
            Some(cmd) => format!("run `{cmd}`"),
            None => "start the registry service".to_string(),
        }
    }
}
