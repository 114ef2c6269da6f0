//! docker-delete: delete tags and repositories from a self-hosted Docker Distribution registry by
//! editing its storage tree, then garbage-collect, clean up and restart the registry.

pub mod cli;
pub mod config;
pub mod docker;
pub mod exec;
pub mod gc;
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

/// What a modifying command asks for.
enum Request<'a> {
    /// Tags and manifests (the main form).
    Refs(&'a [Reference]),
    /// Whole repositories.
    Repos(&'a [RepoName]),
    /// Every repository.
    AllRepos,
    /// Collection only.
    Gc,
}

fn dispatch(cli: &Cli, out: &Output) -> Result<Exit> {
    match &cli.command {
        Some(Command::Ls { repo, quiet }) => list(cli, out, repo.as_ref(), *quiet),
        Some(Command::DeleteRepo { repos, all: true }) if repos.is_empty() => {
            modify(cli, out, Request::AllRepos)
        }
        Some(Command::DeleteRepo { repos, .. }) => modify(cli, out, Request::Repos(repos)),
        Some(Command::Gc) => modify(cli, out, Request::Gc),
        None if cli.references.is_empty() => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let _ = cmd.print_help();
            Ok(Exit::Refused)
        }
        None => modify(cli, out, Request::Refs(&cli.references)),
    }
}

/// Every command that may change the tree: resolve, lock, read, plan (with what an interrupted
/// run left), then show, confirm and execute.
fn modify(cli: &Cli, out: &Output, request: Request<'_>) -> Result<Exit> {
    let cfg = config::resolve(&cli.global, Purpose::Modify)?;
    let storage = Storage::open(&cfg.root)?;
    let _lock = storage.lock()?;
    if cfg.dry_run {
        // The real run's first write would fail: so does the dry run.
        storage
            .ensure_writable()
            .map_err(|e| Refusal(format!("cannot write to the storage tree: {e:#}")))?;
    }
    let pending = read_pending(&storage, out)?;
    // A repository or reference an interrupted run already half-deleted is finished from its
    // journal rather than refused as unknown.
    let covered = |r: &Reference| {
        pending
            .as_ref()
            .is_some_and(|p| plan::covered_by(&p.all, r))
    };

    let (mut refs, mut whole, what): (Vec<Reference>, Vec<RepoName>, String) = match request {
        Request::Refs(refs) => {
            let refs: Vec<Reference> = refs
                .iter()
                .filter(|r| storage.repo_exists(r.repo()) || !covered(r))
                .cloned()
                .collect();
            let names: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
            (refs, Vec::new(), names.join(", "))
        }
        Request::Repos(repos) => {
            let repos: Vec<RepoName> = repos
                .iter()
                .filter(|r| storage.repo_exists(r) || !covered(&Reference::AllTags((*r).clone())))
                .cloned()
                .collect();
            let names: Vec<&str> = repos.iter().map(RepoName::as_str).collect();
            let what = format!("repository {}", names.join(", "));
            (Vec::new(), repos, what)
        }
        Request::AllRepos => {
            let (names, problems) = storage.list_repositories()?;
            out.problems(storage.v2(), &problems);
            let what = format!("every repository ({})", names.len());
            (Vec::new(), names, what)
        }
        Request::Gc => (Vec::new(), Vec::new(), "collection only".to_string()),
    };
    let named: Vec<RepoName> = dedup(refs.iter().map(|r| r.repo().clone()).chain(whole.clone()));
    ensure_repos_exist(&storage, &named)?;
    let pending_repos: Vec<RepoName> = pending
        .iter()
        .flat_map(|p| p.remaining.steps.iter().filter_map(|s| s.repo.clone()))
        .filter(|r| storage.repo_exists(r))
        .collect();

    let mut snaps = Vec::new();
    let mut unreadable = false;
    for r in dedup(named.into_iter().chain(pending_repos)) {
        let snap = storage.read_repo(&r)?;
        out.problems(storage.v2(), &snap.problems);
        // Unreadable entries matter where images are picked out, not where all of it goes.
        unreadable |= !snap.problems.is_empty() && refs.iter().any(|x| *x.repo() == r);
        snaps.push(snap);
    }

    let mut selections = match plan::select(&snaps, &refs) {
        Ok(s) => s,
        Err(errs) => {
            let (done, unknown): (Vec<_>, Vec<_>) =
                errs.into_iter().partition(|e| covered(&e.reference()));
            if !unknown.is_empty() {
                return Err(refusal_of(unknown).into());
            }
            refs.retain(|r| !done.iter().any(|e| &e.reference() == r));
            plan::select(&snaps, &refs).map_err(refusal_of)?
        }
    };
    let mut notes = Vec::new();
    let mut empty_dirs = Vec::new();
    if let Some(p) = &pending {
        let (sel, repos, n, dirs) = plan::pending_selections(&p.remaining, &snaps);
        // Manifests the interrupted run already unlinked: their layer links may still be due.
        for snap in &mut snaps {
            if let Some(s) = sel.get(snap.repo()) {
                storage.read_manifests_into(snap, s.digests.iter().cloned().collect());
            }
        }
        for (repo, s) in sel {
            let e = selections.entry(repo).or_default();
            for (tag, why) in s.tags {
                e.tags.entry(tag).or_insert(why);
            }
            e.digests.extend(s.digests);
            e.layers.extend(s.layers);
        }
        whole.extend(repos);
        notes = n;
        empty_dirs = dirs;
    }
    let whole = dedup(whole.into_iter());
    selections.retain(|repo, _| !whole.contains(repo));
    let whole_snaps: Vec<_> = snaps
        .iter()
        .filter(|s| whole.contains(s.repo()))
        .cloned()
        .collect();
    let mut tree = plan::join(
        plan::plan_selections(&snaps, selections),
        plan::build_repo_plan(&whole_snaps),
    );
    tree.problems.extend(notes);
    let tree = plan::join(
        tree,
        Plan {
            steps: empty_dirs,
            ..Plan::default()
        },
    );
    let force = pending.is_some() || matches!(request, Request::Gc);
    // Collection on its own also repairs the layer links of every repository (a push during an
    // earlier run may have skipped layers the registry's cache still claimed).
    let relink = match request {
        Request::Gc => storage.list_repositories()?.0,
        _ => Vec::new(),
    };
    let mut plan = plan::finish_plan(tree, cfg.finish, force, &relink);
    if plan.count(Action::GarbageCollect) > 0 {
        plan.freed = estimate_freed(&storage, &snaps, &plan, out)?;
    }
    let what = if pending.is_some() {
        format!("{what} and an interrupted run's remaining work")
    } else {
        what
    };
    // Collection alone deletes no image (and an interrupted run's work was confirmed then).
    let ask = !matches!(request, Request::Gc);
    carry_out(out, &cfg, &storage, plan, &what, unreadable, ask)
}

/// What the plan's collection will free, marking every repository as the registry's collector
/// does. `None`, with a warning, where the collector itself would stop.
fn estimate_freed(
    storage: &Storage,
    read: &[storage::RepoSnapshot],
    plan: &Plan,
    out: &Output,
) -> Result<Option<gc::Freed>> {
    let (names, _) = storage.list_repositories()?;
    let mut snaps: Vec<storage::RepoSnapshot> = Vec::with_capacity(names.len());
    for name in names {
        match read.iter().find(|s| *s.repo() == name) {
            Some(s) => snaps.push(s.clone()),
            None => snaps.push(storage.read_repo(&name)?),
        }
    }
    match gc::freed_by(&snaps, &storage.list_blobs()?, plan) {
        Ok(f) => Ok(Some(f)),
        Err(e) => {
            out.warn(format!(
                "the registry's garbage collector will stop at {e}; nothing will be freed until that is mended"
            ));
            Ok(None)
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

/// An interrupted run's journal: all it meant to do, and the steps it did not get to.
struct Pending {
    all: Plan,
    remaining: Plan,
}

/// The journal of an interrupted run, if any; what it did not get to is planned again against
/// the tree as it is now.
fn read_pending(storage: &Storage, out: &Output) -> Result<Option<Pending>> {
    let Some(bytes) = storage.read_journal()? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut lines = text.lines();
    let pending = serde_json::from_str(lines.next().unwrap_or_default())
        .map_err(|e| e.to_string())
        .and_then(|p: Plan| plan::ensure_valid_journal(&p).map(|()| p))
        .and_then(|all: Plan| {
            // Drop the steps the interrupted run completed: what is there now was put back since.
            let mut done = std::collections::BTreeSet::new();
            for l in lines {
                done.insert(
                    l.trim()
                        .parse::<usize>()
                        .map_err(|_| format!("progress line `{l}` is not a step number"))?,
                );
            }
            let mut remaining = all.clone();
            let mut i = 0;
            remaining.steps.retain(|_| {
                i += 1;
                !done.contains(&(i - 1))
            });
            Ok(Pending { all, remaining })
        })
        .map_err(|e| {
            Refusal(format!(
                "{} is not a journal this version can read ({e}); no docker-delete holds the lock, so no run is using it: move it away and run again",
                storage.journal_path().display()
            ))
        })?;
    out.warn(format!(
        "an earlier run was interrupted ({}); what it had left to do is planned again and finished first",
        storage.journal_path().display()
    ));
    Ok(Some(pending))
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
    ask: bool,
) -> Result<Exit> {
    // Something in the selected repositories could not be read: the job may be incomplete.
    let had_problems = unreadable || !plan.problems.is_empty();
    if plan.steps.is_empty() {
        // Say why: what was named is kept (a platform of a kept index, say) or unreadable.
        out.notes(&plan, storage.v2());
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
    let confirm = if ask { cfg.confirm } else { Confirm::Yes };
    match confirm {
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

    let needs_service = plan.steps.iter().any(|s| {
        matches!(
            s.action,
            Action::StopRegistry
                | Action::GarbageCollect
                | Action::StartRegistry
                | Action::RestartRegistry
        )
    });
    let service = if needs_service {
        Some(cfg.service().context("cannot reach the registry")?)
    } else {
        None
    };

    if let Err(e) = storage.empty_trash() {
        out.warn(format!("{e:#}"));
    }
    // Record the tree edits before anything is touched, so that a later run can finish them if
    // this one is interrupted. Also the first write: a tree this user cannot write is refused here.
    let journal = if plan.edits_tree() {
        // One line of JSON; the run appends the index of each tree step that took effect.
        let mut journal =
            serde_json::to_vec(&plan::journal_of(&plan)).context("cannot serialise the journal")?;
        journal.push(b'\n');
        storage.write_journal(&journal)
    } else {
        // An earlier run's journal whose work is all done.
        storage.remove_journal()
    };
    journal.map_err(|e| {
        Refusal(format!(
            "cannot write to the storage tree, so nothing was changed: {e:#}"
        ))
    })?;

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // Ctrl-C, SIGTERM and SIGHUP; a second handler cannot be installed in the same process.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
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
    let frees = plan
        .freed
        .map(|f| format!(" (frees {})", output::human_bytes(f.bytes)))
        .unwrap_or_default();
    if parts.is_empty() {
        format!("Run garbage collection and restart the registry{frees}?")
    } else {
        format!("Delete {}{frees}?", parts.join(", "))
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
    if let Some(r) = repo {
        ensure_repos_exist(&storage, std::slice::from_ref(r))?;
    }
    if !out.json && !quiet {
        // On stderr: which registry this is, without disturbing the list on stdout.
        let what = repo.map_or("Repositories".to_string(), |r| format!("Tags of {r}"));
        out.info(format!(
            "{what} in {} ({}):",
            storage.root().display(),
            cfg.describe_registry()
        ));
    }
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
