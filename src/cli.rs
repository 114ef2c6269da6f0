//! Command-line syntax: clap derive types, value parsers, and the translation of the original
//! script's flags (`-sr`, `-st`, `-dr`, `-dt`). No I/O.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::storage::{Reference, RepoName};

const AFTER_HELP: &str = "\
References:
  repo:tag                 one tag; other tags on the same digest stay pullable
  repo                     every tag of the repository
  repo@sha256:<64 hex>     that manifest and every tag pointing at it
  Nested names work: team/app:v1, a/b/c.

Compatible with the original script:
  -sr                      = ls
  -st REPO                 = ls -q REPO
  -dr REPO | -dr -all      = delete-repo REPO | delete-repo --all
  -dt REPO TAG | -dt REPO  = REPO:TAG | REPO

Environment:
  DOCKER_REGISTRY_DIR           storage root (the host directory mounted at /var/lib/registry)
  DOCKER_REGISTRY_CONTAINER_ID  the registry container (name or id prefix)
  NO_COLOR                      disables colour

Exit codes:
  0    done, nothing to do, or a dry run
  1    ran, but a step failed or something could not be read (the output says what)
  2    refused before touching anything (usage, unknown repository or tag,
       config, Docker, no confirmation, another run holds the lock)
  130  interrupted; the next run finishes the job";

/// Delete images from a self-hosted Docker registry's storage, garbage-collect, and restart it.
#[derive(Debug, Parser)]
#[command(
    name = "docker-delete",
    version,
    after_help = AFTER_HELP,
    override_usage = "docker-delete [OPTIONS] REFERENCE...\n       \
                      docker-delete [OPTIONS] ls [-q] [REPO]\n       \
                      docker-delete [OPTIONS] delete-repo (REPO... | --all)\n       \
                      docker-delete [OPTIONS] gc",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Images to delete: repo:tag, repo (every tag), repo@sha256:<digest>.
    #[arg(value_name = "REFERENCE", value_parser = parse_reference)]
    pub references: Vec<Reference>,

    /// Subcommands.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Options shared by every command.
    #[command(flatten)]
    pub global: Global,
}

/// Subcommands besides the main form.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List repositories, or the tags of one repository with their digests and media types.
    Ls {
        /// The repository whose tags to list.
        #[arg(value_parser = parse_repo)]
        repo: Option<RepoName>,
        /// Names only, one per line.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Delete whole repositories (tags, untagged manifests, layer links, uploads).
    DeleteRepo {
        /// Repositories to delete.
        #[arg(value_parser = parse_repo, required_unless_present = "all", conflicts_with = "all")]
        repos: Vec<RepoName>,
        /// Delete every repository.
        #[arg(long)]
        all: bool,
    },
    /// Only garbage-collect, clean up empty directories, and restart the registry.
    Gc,
}

/// Options that apply to every command.
#[derive(Debug, Args)]
pub struct Global {
    /// Storage root: the directory holding docker/registry/v2.
    #[arg(long, env = "DOCKER_REGISTRY_DIR", value_name = "DIR", global = true)]
    pub registry_dir: Option<PathBuf>,

    /// The config.yml of a registry run on this host (for garbage-collect, the storage root and
    /// its address); a container's config is read from the container.
    #[arg(long, value_name = "PATH", global = true)]
    pub config: Option<PathBuf>,

    /// The registry container, by name or id prefix.
    #[arg(
        long,
        env = "DOCKER_REGISTRY_CONTAINER_ID",
        value_name = "NAME|ID",
        global = true
    )]
    pub container: Option<String>,

    /// Do not look for a registry container; run the registry binary on this host.
    #[arg(long, global = true, conflicts_with = "container")]
    pub no_container: bool,

    /// Registry binary for garbage-collect on this host [default: registry, then docker-registry].
    #[arg(long, value_name = "PATH", global = true)]
    pub registry_bin: Option<PathBuf>,

    /// Shell command that restarts the registry on this host (e.g. "systemctl restart docker-registry").
    #[arg(long, value_name = "CMD", global = true)]
    pub restart_cmd: Option<String>,

    /// Where to reach the registry for verification [default: from the config's http.addr].
    #[arg(long, value_name = "URL", global = true)]
    pub registry_url: Option<String>,

    /// Stop the registry container before editing and start it after GC (no push can race).
    #[arg(long, global = true)]
    pub offline: bool,

    /// Skip garbage collection (and the clean-up that follows it).
    #[arg(long, global = true)]
    pub no_gc: bool,

    /// Skip the restart (the registry's cache may then serve deleted blobs).
    #[arg(long, global = true)]
    pub no_restart: bool,

    /// Print the plan and change nothing.
    #[arg(short = 'n', long, global = true)]
    pub dry_run: bool,

    /// Do not ask for confirmation.
    #[arg(short, long, global = true)]
    pub yes: bool,

    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,

    /// Show everything the garbage collector prints.
    #[arg(short, long, global = true)]
    pub verbose: bool,

    /// When to use colour.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto, value_name = "WHEN", global = true)]
    pub color: ColorChoice,

    /// Set by the translation of the original script's flags; those forms never asked before
    /// deleting, so without a terminal they do not ask now.
    #[arg(long, hide = true, global = true)]
    pub legacy_noninteractive: bool,
}

/// `--color`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    /// Colour when the output is a terminal and `NO_COLOR` is unset.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

fn parse_reference(s: &str) -> Result<Reference, String> {
    Reference::parse(s)
}

fn parse_repo(s: &str) -> Result<RepoName, String> {
    RepoName::parse(s)
}

/// Rewrites the original script's command line into this tool's: `-sr` → `ls`, `-st REPO` →
/// `ls -q REPO`, `-dr REPO` → `delete-repo REPO`, `-dr -all` → `delete-repo --all`,
/// `-dt REPO TAG` → `REPO:TAG`, `-dt REPO` → `REPO`. Other arguments are kept in place.
pub fn translate_legacy(args: Vec<OsString>) -> Vec<OsString> {
    let Some(pos) = args
        .iter()
        .skip(1)
        .position(|a| matches!(a.to_str(), Some("-sr" | "-st" | "-dr" | "-dt")))
        .map(|p| p + 1)
    else {
        return args;
    };
    let operand = |i: usize| {
        args.get(i)
            .and_then(|a| a.to_str())
            .filter(|a| !a.starts_with('-') || *a == "-all")
            .map(str::to_string)
    };
    let flag = args[pos].to_str().unwrap_or_default().to_string();
    let (replacement, used): (Vec<String>, usize) = match flag.as_str() {
        "-sr" => (vec!["ls".into()], 0),
        "-st" => match operand(pos + 1) {
            Some(r) => (vec!["ls".into(), "-q".into(), r], 1),
            None => (vec!["ls".into()], 0),
        },
        "-dr" => match operand(pos + 1).as_deref() {
            Some("-all") => (vec!["delete-repo".into(), "--all".into()], 1),
            Some(r) => (vec!["delete-repo".into(), r.to_string()], 1),
            None => (vec!["delete-repo".into()], 0),
        },
        _ => match (operand(pos + 1), operand(pos + 2)) {
            (Some(r), Some(t)) => (
                vec![format!("{r}:{t}"), "--legacy-noninteractive".into()],
                2,
            ),
            (Some(r), None) => (vec![r], 1),
            _ => (vec![], 0),
        },
    };
    let mut out: Vec<OsString> = Vec::with_capacity(args.len() + 2);
    out.push(args[0].clone());
    // Subcommands must come before their operands; other flags are global and may follow.
    out.extend(replacement.iter().map(OsString::from));
    if flag == "-dr" && used == 1 {
        out.push("--legacy-noninteractive".into());
    }
    for (i, a) in args.iter().enumerate().skip(1) {
        if i < pos || i > pos + used {
            out.push(a.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(args: &[&str]) -> Vec<String> {
        let mut v: Vec<OsString> = vec!["docker-delete".into()];
        v.extend(args.iter().map(OsString::from));
        translate_legacy(v)
            .into_iter()
            .skip(1)
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn legacy_forms() {
        assert_eq!(tr(&["-sr"]), ["ls"]);
        assert_eq!(tr(&["-st", "team/app"]), ["ls", "-q", "team/app"]);
        assert_eq!(
            tr(&["-dr", "app"]),
            ["delete-repo", "app", "--legacy-noninteractive"]
        );
        assert_eq!(
            tr(&["-dr", "-all"]),
            ["delete-repo", "--all", "--legacy-noninteractive"]
        );
        assert_eq!(
            tr(&["-dt", "app", "v1"]),
            ["app:v1", "--legacy-noninteractive"]
        );
        assert_eq!(tr(&["-dt", "app"]), ["app"]);
        assert_eq!(
            tr(&["-n", "-dt", "app", "v1"]),
            ["app:v1", "--legacy-noninteractive", "-n"]
        );
        assert_eq!(tr(&["app:v1", "-y"]), ["app:v1", "-y"]);
    }

    #[test]
    fn parses_main_form_and_subcommands() {
        let c = Cli::try_parse_from(["docker-delete", "a:v1", "team/b", "-n"]).unwrap();
        assert_eq!(c.references.len(), 2);
        assert!(c.global.dry_run);
        let c = Cli::try_parse_from(["docker-delete", "ls", "team/app"]).unwrap();
        assert!(matches!(c.command, Some(Command::Ls { repo: Some(_), .. })));
        let c = Cli::try_parse_from(["docker-delete", "delete-repo", "--all", "-y"]).unwrap();
        assert!(matches!(
            c.command,
            Some(Command::DeleteRepo { all: true, .. })
        ));
        assert!(Cli::try_parse_from(["docker-delete", "delete-repo"]).is_err());
        assert!(Cli::try_parse_from(["docker-delete", "../etc:v1"]).is_err());
        assert!(Cli::try_parse_from(["docker-delete", "delete-repo", "a", "--all"]).is_err());
        // Global options may come before the subcommand.
        let c = Cli::try_parse_from(["docker-delete", "--registry-dir", "/x", "-n", "ls"]).unwrap();
        assert!(matches!(c.command, Some(Command::Ls { repo: None, .. })));
        let c = Cli::try_parse_from(["docker-delete", "--registry-dir", "/x", "gc", "-y"]).unwrap();
        assert!(matches!(c.command, Some(Command::Gc)));
    }
}
