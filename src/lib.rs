//! docker-delete: delete tags and repositories from a self-hosted Docker Distribution registry by
//! editing its storage tree, then garbage-collect, clean up and restart the registry.

pub mod cli;
pub mod config;
pub mod docker;
pub mod exec;
pub mod output;
pub mod plan;
pub mod probe;
pub mod service;
pub mod storage;

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;

use cli::{Cli, Command};
use config::{Config, Confirm, Purpose};
use output::Output;
use plan::{Action, Plan};
use storage::{Reference, RepoName, Storage};

/// The process exit codes, also listed in `--help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done, nothing to do, or a dry run.
    Ok = 0,
    /// Ran, but some steps failed.
    Failed = 1,
    /// Refused before touching anything.
    Refused = 2,
    /// Interrupted by Ctrl-C.
    Interrupted = 130,
}

/// An error raised before anything was touched: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(String);

/// Parses the command line (translating the original script's flags) and runs it.
pub fn run(args: Vec<OsString>) -> Exit {
    let cli = match Cli::try_parse_from(cli::translate_legacy(args)) {
        Ok(c) => c,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return if code == 0 { Exit::Ok } else { Exit::Refused };
        }
    };
    let out = Output::new(cli.global.color, cli.global.json, cli.global.verbose);
    match dispatch(&cli, &out) {
        Ok(exit) => exit,
        Err(e) => {
            out.error(format!("{e:#}"));
            Exit::Refused
        }
    }
}

fn dispatch(cli: &Cli, out: &Output) -> Result<Exit> {
    match &cli.command {
        Some(Command::Ls { repo, quiet }) => list(cli, out, repo.as_ref(), *quiet),
        Some(Command::DeleteRepo { repos, all }) => {
            let cfg = config::resolve(&cli.global, Purpose::Modify)?;
            let storage = Storage::open(&cfg.root)?;
            let _lock = storage.lock()?;
            let pending = read_pending(&storage, out)?;
            let names = if *all {
                let (names, problems) = storage.list_repositories()?;
                out.problems(storage.v2(), &problems);
                names
            } else {
                let mut repos = repos.clone();
                if let Some(p) = &pending {
                    repos.retain(|r| {
                        storage.repo_exists(r)
                            || !plan::covered_by(p, &Reference::AllTags(r.clone()))
                    });
                }
                ensure_repos_exist(&storage, &repos)?;
                repos
            };
            let mut snaps = Vec::new();
            for n in &names {
                let snap = storage.read_repo(n)?;
                // The whole repository goes, so what could not be read in it blocks nothing.
                out.problems(storage.v2(), &snap.problems);
                snaps.push(snap);
            }
            let tree = plan::build_repo_plan(&snaps);
            let plan = with_pending(pending, tree, cfg.finish);
            let what = if *all {
                format!("every repository ({})", names.len())
            } else {
                format!(
                    "{} repositor{}",
                    names.len(),
                    if names.len() == 1 { "y" } else { "ies" }
                )
            };
            carry_out(out, &cfg, &storage, plan, &what, false)
        }
        Some(Command::Gc) => {
            let cfg = config::resolve(&cli.global, Purpose::Modify)?;
            let storage = Storage::open(&cfg.root)?;
            let _lock = storage.lock()?;
            let pending = read_pending(&storage, out)?;
            let plan = plan::finish_plan(
                pending
                    .map(|p| plan::resume(p, Plan::default()))
                    .unwrap_or_default(),
                cfg.finish,
                true,
            );
            carry_out(
                out,
                &cfg,
                &storage,
                plan,
                "no image (collection only)",
                false,
            )
        }
        None => {
            if cli.references.is_empty() {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                let _ = cmd.print_help();
                return Ok(Exit::Refused);
            }
            let cfg = config::resolve(&cli.global, Purpose::Modify)?;
            let storage = Storage::open(&cfg.root)?;
            let _lock = storage.lock()?;
            let pending = read_pending(&storage, out)?;
            let mut refs = cli.references.clone();
            // A reference an interrupted run already half-deleted is finished by its journal.
            if let Some(p) = &pending {
                refs.retain(|r| storage.repo_exists(r.repo()) || !plan::covered_by(p, r));
            }
            let repos: Vec<RepoName> = dedup(refs.iter().map(Reference::repo).cloned());
            ensure_repos_exist(&storage, &repos)?;
            let mut snaps = Vec::new();
            for r in &repos {
                let snap = storage.read_repo(r)?;
                out.problems(storage.v2(), &snap.problems);
                snaps.push(snap);
            }
            let unreadable = snaps.iter().any(|s| !s.problems.is_empty());
            let tree = match plan::build_delete_plan(&snaps, &refs) {
                Ok(t) => t,
                Err(errs) => {
                    let covered = |e: &plan::SelectError| {
                        pending
                            .as_ref()
                            .is_some_and(|p| plan::covered_by(p, &e.reference()))
                    };
                    if errs.iter().all(covered) {
                        refs.retain(|r| !errs.iter().any(|e| &e.reference() == r));
                        plan::build_delete_plan(&snaps, &refs).map_err(refusal_of)?
                    } else {
                        return Err(
                            refusal_of(errs.into_iter().filter(|e| !covered(e)).collect()).into(),
                        );
                    }
                }
            };
            let plan = with_pending(pending, tree, cfg.finish);
            let refs: Vec<String> = cli.references.iter().map(|r| r.to_string()).collect();
            carry_out(out, &cfg, &storage, plan, &refs.join(", "), unreadable)
        }
    }
}

fn refusal_of(errs: Vec<plan::SelectError>) -> Refusal {
    Refusal(
        errs.iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// The journal of an interrupted run, if any; its steps are finished by this run.
fn read_pending(storage: &Storage, out: &Output) -> Result<Option<Plan>> {
    let Some(bytes) = storage.read_journal()? else {
        return Ok(None);
    };
    let plan: Plan = serde_json::from_slice(&bytes)
        .map_err(|e| e.to_string())
        .and_then(|p: Plan| plan::ensure_valid_journal(&p).map(|()| p))
        .map_err(|e| {
            Refusal(format!(
                "{} is not a journal this version can read ({e}); no docker-delete holds the lock, so no run is using it: move it away and run again",
                storage.journal_path().display()
            ))
        })?;
    out.warn(format!(
        "an earlier run was interrupted; its {} remaining step(s) from {} are finished first",
        plan.steps.len(),
        storage.journal_path().display()
    ));
    Ok(Some(plan))
}

fn with_pending(pending: Option<Plan>, tree: Plan, finish: plan::Finish) -> Plan {
    let force = pending.is_some();
    let tree = match pending {
        Some(p) => plan::resume(p, tree),
        None => tree,
    };
    plan::finish_plan(tree, finish, force)
}

fn dedup<T: Ord + Clone>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = it.collect();
    v.sort();
    v.dedup();
    v
}

fn ensure_repos_exist(storage: &Storage, repos: &[RepoName]) -> Result<()> {
    let missing: Vec<&RepoName> = repos.iter().filter(|r| !storage.repo_exists(r)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing.iter().map(|r| format!("`{r}`")).collect();
    Err(Refusal(format!(
        "repository {} not found under {} (list repositories with `docker-delete ls`)",
        names.join(", "),
        storage.v2().join("repositories").display()
    ))
    .into())
}

/// Shows the plan, asks, executes, reports; the exit code follows the report.
fn carry_out(
    out: &Output,
    cfg: &Config,
    storage: &Storage,
    plan: Plan,
    what: &str,
    unreadable: bool,
) -> Result<Exit> {
    // Something in the selected repositories could not be read: the job may be incomplete.
    let had_problems = unreadable || !plan.problems.is_empty();
    if plan.steps.is_empty() {
        out.problems(storage.v2(), &plan.problems);
        out.success(format!("nothing to delete for {what}"));
        return Ok(if had_problems { Exit::Failed } else { Exit::Ok });
    }
    let header = format!(
        "Plan for {what} in {} ({}):",
        storage.root().display(),
        cfg.describe_registry()
    );
    if cfg.dry_run {
        out.plan(&plan, storage.v2(), &header);
        if !out.json {
            out.info("dry run: nothing was changed");
        }
        return Ok(Exit::Ok);
    }
    match cfg.confirm {
        Confirm::Yes => {
            if !out.json {
                // Logs of unattended runs say what was acted on.
                out.info(&header);
                out.notes(&plan, storage.v2());
            }
        }
        Confirm::Refuse => {
            return Err(Refusal(format!(
                "refusing to delete {what} without confirmation: no terminal to ask on; pass --yes (or -y) to confirm, or --dry-run to see the plan"
            ))
            .into());
        }
        Confirm::Ask => {
            out.plan(&plan, storage.v2(), &header);
            let question = confirm_question(&plan);
            if !out.confirm(&question) {
                return Err(Refusal("not confirmed; nothing was changed".into()).into());
            }
        }
    }

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in the same process (tests call run twice).
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let needs_service = plan
        .steps
        .iter()
        .any(|s| !s.action.is_tree_edit() && s.action != Action::Verify);
    let service = if needs_service {
        Some(cfg.service().context("cannot reach the registry")?)
    } else {
        None
    };
    let cx = exec::Context {
        storage,
        service,
        endpoint: cfg.registry_url.clone(),
        interrupted: &interrupted,
    };
    let report = exec::execute(&plan, cx, &mut |o| out.outcome(o));
    out.summary(&report);
    Ok(if report.interrupted {
        Exit::Interrupted
    } else if report.failed() > 0 || had_problems {
        Exit::Failed
    } else {
        Exit::Ok
    })
}

fn confirm_question(plan: &Plan) -> String {
    let parts = output::tally(|a| plan.count(a));
    if parts.is_empty() {
        "Run garbage collection and restart the registry?".into()
    } else {
        format!("Delete {}?", parts.join(", "))
    }
}

#[derive(Serialize)]
struct TagRow<'a> {
    tag: &'a str,
    digest: Option<String>,
    media_type: Option<String>,
    error: Option<String>,
}

fn list(cli: &Cli, out: &Output, repo: Option<&RepoName>, quiet: bool) -> Result<Exit> {
    let cfg = config::resolve(&cli.global, Purpose::Read)?;
    let storage = Storage::open(&cfg.root)?;
    match repo {
        None => {
            let (names, problems) = storage.list_repositories()?;
            out.problems(storage.v2(), &problems);
            if out.json {
                out.json_value(&names);
            } else {
                for n in names {
                    out.data(n);
                }
            }
        }
        Some(r) => {
            ensure_repos_exist(&storage, std::slice::from_ref(r))?;
            let snap = storage.read_repo(r)?;
            out.problems(storage.v2(), &snap.problems);
            let rows: Vec<TagRow> = snap
                .tags
                .iter()
                .map(|(t, e)| TagRow {
                    tag: t.as_str(),
                    digest: e.current.as_ref().ok().map(|d| d.to_string()),
                    media_type: e
                        .current
                        .as_ref()
                        .ok()
                        .and_then(|d| snap.manifest(d))
                        .map(|m| m.media_type.clone()),
                    error: e.current.as_ref().err().cloned(),
                })
                .collect();
            if out.json {
                out.json_value(&rows);
            } else if quiet {
                for row in &rows {
                    out.data(row.tag);
                }
            } else {
                let w = rows.iter().map(|r| r.tag.len()).max().unwrap_or(0);
                for row in &rows {
                    out.data(format!(
                        "{:<w$}  {}  {}",
                        row.tag,
                        row.digest.as_deref().unwrap_or("(unreadable)"),
                        row.media_type.as_deref().unwrap_or("-")
                    ));
                }
            }
        }
    }
    Ok(Exit::Ok)
}
