//! Applies a [`Plan`] and returns a [`Report`]. Each tree step is checked again just before it
//! runs (inside the root, no symbolic link, the link still names the expected digest).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::plan::{Action, Check, Plan, Step};
use crate::probe;
use crate::service::Service;
use crate::storage::{RepoName, Storage};

/// How one step went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", content = "detail", rename_all = "kebab-case")]
pub enum StepResult {
    /// Done, with an optional detail for output.
    Done(String),
    /// The path was already gone (a re-run).
    AlreadyGone,
    /// Not run, and why (not a failure by itself).
    Skipped(String),
    /// Failed, and why.
    Failed(String),
}

/// A step with its result.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The step as planned.
    #[serde(flatten)]
    pub step: Step,
    /// What happened.
    pub result: StepResult,
    /// For garbage collection: what the collector printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gc_output: Option<String>,
}

/// Everything that happened.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Every step in order.
    pub outcomes: Vec<Outcome>,
    /// Whether Ctrl-C stopped the run.
    pub interrupted: bool,
    /// Bytes of blob data that disappeared from disk during the run, when measured.
    pub freed_bytes: Option<u64>,
}

impl Report {
    /// Number of failed steps.
    pub fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.result, StepResult::Failed(_)))
            .count()
    }

    /// Whether any tree edit was made.
    pub fn changed_tree(&self) -> bool {
        self.outcomes
            .iter()
            .any(|o| o.step.action.is_tree_edit() && o.result == StepResult::Done(String::new()))
    }
}

/// What the executor needs besides the plan.
pub struct Context<'a> {
    /// The tree.
    pub storage: &'a Storage,
    /// The registry process, when GC, restart or offline steps are planned.
    pub service: Option<Box<dyn Service>>,
    /// Where verification asks when the user named it (`--registry-url`); otherwise the service
    /// says, as its address may change on restart.
    pub endpoint: Option<String>,
    /// Set by the Ctrl-C handler.
    pub interrupted: &'a AtomicBool,
}

/// Runs the plan's steps in order, calling `progress` after each. The caller has written the
/// plan's journal; it is removed here once every tree step was tried without interruption.
pub fn execute(plan: &Plan, mut cx: Context<'_>, progress: &mut dyn FnMut(&Outcome)) -> Report {
    let mut report = Report::default();
    let mut broken_repos: BTreeSet<RepoName> = BTreeSet::new();
    let mut stopped = false;

    // Whether any tree edit took effect (or had already, in an earlier interrupted run): if every
    // one failed, collecting and restarting would only interrupt the registry for nothing.
    let mut edited = !plan.edits_tree();
    // Whether this run itself changed the tree.
    let mut changed = false;
    // Index of the current step among the tree edits, as the journal lists them.
    let mut tree_index = 0;
    for (step, index) in plan.steps.iter().zip(tree_indices(plan)) {
        tree_index = index.unwrap_or(tree_index);
        let interrupted = cx.interrupted.load(Ordering::SeqCst);
        // After an interruption only what leaves the registry consistent runs: links a push
        // may have skipped, and bringing back or restarting the registry once the tree changed
        // (its cache would otherwise keep claiming layers whose links are gone).
        let still_runs = match step.action {
            Action::StartRegistry => stopped,
            Action::RelinkLayers | Action::RestartRegistry => changed,
            _ => false,
        };
        if interrupted && !still_runs {
            report.interrupted = true;
            continue;
        }
        if interrupted {
            report.interrupted = true;
        }
        if step.action == Action::Verify && report.interrupted {
            continue;
        }
        let mut gc_output = None;
        if !edited
            && matches!(
                step.action,
                Action::GarbageCollect
                    | Action::RemoveEmptyBlobDirs
                    | Action::RelinkLayers
                    | Action::RestartRegistry
                    | Action::Verify
            )
        {
            let o = Outcome {
                step: step.clone(),
                result: StepResult::Skipped("no edit was made".into()),
                gc_output: None,
            };
            progress(&o);
            report.outcomes.push(o);
            continue;
        }
        let result = match step.action {
            a if a.is_tree_edit() => {
                let repo = step.repo.clone().expect("tree steps name a repository");
                if broken_repos.contains(&repo) {
                    StepResult::Skipped(format!(
                        "an earlier step in {repo} failed, so this one could remove something still needed"
                    ))
                } else {
                    let mut r = tree_step(cx.storage, step);
                    match &r {
                        StepResult::Failed(_) => {
                            broken_repos.insert(repo);
                        }
                        StepResult::Done(_) | StepResult::AlreadyGone => {
                            edited = true;
                            changed |= matches!(r, StepResult::Done(_));
                            if let Err(e) = cx.storage.journal_step_done(tree_index) {
                                r = StepResult::Done(format!("(progress not recorded: {e:#})"));
                            }
                        }
                        StepResult::Skipped(_) => {}
                    }
                    r
                }
            }
            Action::StopRegistry => match service(&mut cx).map(|s| s.stop()) {
                Some(Ok(())) => {
                    stopped = true;
                    StepResult::Done(String::new())
                }
                Some(Err(e)) => {
                    // Nothing was touched: stop here rather than edit a live registry.
                    let r = StepResult::Failed(format!("{e:#}"));
                    let o = Outcome {
                        step: step.clone(),
                        result: r,
                        gc_output: None,
                    };
                    progress(&o);
                    report.outcomes.push(o);
                    return report;
                }
                None => StepResult::Failed("no registry container to stop".into()),
            },
            Action::GarbageCollect => {
                let before = cx.storage.size_below(Path::new("blobs"));
                let r = service(&mut cx).map(|s| s.garbage_collect());
                let after = cx.storage.size_below(Path::new("blobs"));
                report.freed_bytes = Some(before.saturating_sub(after));
                match r {
                    Some(Ok(gc)) => {
                        gc_output = Some(gc.output.clone());
                        if gc.success {
                            StepResult::Done(format!("{} blob(s) deleted", gc.deleted_blob_count()))
                        } else if cx.interrupted.load(Ordering::SeqCst) {
                            StepResult::Failed(
                                "garbage-collect was interrupted; run `docker-delete gc` to collect"
                                    .into(),
                            )
                        } else {
                            StepResult::Failed(format!(
                                "the registry's garbage-collect failed, so nothing was freed (it stops at the first manifest or link it cannot read; mend or remove what the warnings name, then run `docker-delete gc`): {}",
                                gc.output
                                    .lines()
                                    .rev()
                                    .find(|l| !l.trim().is_empty())
                                    .unwrap_or("no output")
                            ))
                        }
                    }
                    Some(Err(e)) => StepResult::Failed(format!("{e:#}")),
                    None => StepResult::Failed("no registry to run garbage-collect in".into()),
                }
            }
            Action::RelinkLayers => {
                let repo = step.repo.as_ref().expect("relink steps name a repository");
                match cx.storage.relink_layers(repo) {
                    Ok(v) if v.is_empty() => StepResult::Done(String::new()),
                    Ok(v) => StepResult::Done(format!(
                        "{repo}: linked {} layer(s) again that a push during the run skipped",
                        v.len()
                    )),
                    Err(e) => StepResult::Failed(format!("{e:#}")),
                }
            }
            Action::RemoveEmptyBlobDirs => {
                match cx.storage.remove_empty_dirs_below(Path::new("blobs")) {
                    Ok(v) => StepResult::Done(format!("{} directories", v.len())),
                    Err(e) => StepResult::Failed(format!("{e:#}")),
                }
            }
            Action::StartRegistry => match service(&mut cx).map(|s| (s.start(), s.start_hint())) {
                Some((Ok(()), _)) => {
                    stopped = false;
                    StepResult::Done(String::new())
                }
                Some((Err(e), hint)) => {
                    StepResult::Failed(format!("{e:#}; start it by hand: {hint}"))
                }
                None => StepResult::Failed("no registry to start".into()),
            },
            Action::RestartRegistry => match service(&mut cx).map(|s| s.restart()) {
                Some(Ok(())) => StepResult::Done(String::new()),
                Some(Err(e)) => StepResult::Failed(format!("{e:#}")),
                None => StepResult::Failed("no way to restart the registry".into()),
            },
            Action::Verify => {
                let url = cx
                    .endpoint
                    .clone()
                    .or_else(|| service(&mut cx).and_then(|s| s.endpoint()));
                verify(url.as_deref(), &plan.checks, &report)
            }
            _ => unreachable!("every action is handled"),
        };
        let o = Outcome {
            step: step.clone(),
            result,
            gc_output,
        };
        progress(&o);
        report.outcomes.push(o);
    }
    if plan.edits_tree() && !report.interrupted {
        // Every tree step was tried; failures are reported, not retried forever.
        if let Err(e) = cx.storage.remove_journal() {
            report.outcomes.push(Outcome {
                step: Step::service(Action::Verify, "remove the journal of this run"),
                result: StepResult::Failed(format!("{e:#}")),
                gc_output: None,
            });
        }
    }
    report
}

/// For each step, its index among the plan's tree edits (the journal's numbering).
fn tree_indices(plan: &Plan) -> Vec<Option<usize>> {
    let mut n = 0;
    plan.steps
        .iter()
        .map(|s| {
            s.action.is_tree_edit().then(|| {
                n += 1;
                n - 1
            })
        })
        .collect()
}

fn service<'a>(cx: &'a mut Context<'_>) -> Option<&'a mut (dyn Service + 'static)> {
    cx.service.as_deref_mut()
}

/// One tree edit, re-checked against the tree as it is now.
fn tree_step(storage: &Storage, step: &Step) -> StepResult {
    let path = step.path.as_deref().expect("tree steps carry a path");
    if let Err(e) = storage.ensure_no_symlink(path) {
        return StepResult::Failed(format!("{e:#}"));
    }
    let abs = storage.abs(path);
    match step.action {
        Action::RemoveRepository => return remove_repository(storage, path),
        Action::RemoveEmptyDir => {
            return match storage.remove_empty_dir(path) {
                Ok(Some(crate::storage::Removed::Done)) => StepResult::Done(String::new()),
                Ok(Some(crate::storage::Removed::AlreadyGone)) => StepResult::AlreadyGone,
                Ok(None) => StepResult::Skipped(format!(
                    "{} is not empty: something was written to it meanwhile",
                    abs.display()
                )),
                Err(e) => StepResult::Failed(format!("{e:#}")),
            };
        }
        _ => {}
    }
    if std::fs::symlink_metadata(&abs).is_err() {
        return StepResult::AlreadyGone;
    }
    if let Some(expect) = &step.expect {
        let link = match step.action {
            Action::RemoveTag => path.join("current/link"),
            _ => path.join("link"),
        };
        match storage.read_link(&link) {
            Ok(now) if &now == expect => {}
            Ok(now) => {
                return StepResult::Failed(format!(
                    "{} now names {now}, not {expect} as planned (pushed meanwhile?); left in place",
                    abs.join(link.file_name().unwrap_or_default()).display()
                ));
            }
            Err(e) => {
                return StepResult::Failed(format!(
                    "{}: {e}; left in place",
                    storage.abs(&link).display()
                ));
            }
        }
    }
    match storage.remove_dir(path) {
        Ok(crate::storage::Removed::Done) => StepResult::Done(String::new()),
        Ok(crate::storage::Removed::AlreadyGone) => StepResult::AlreadyGone,
        Err(e) => StepResult::Failed(format!("{e:#}")),
    }
}

fn remove_repository(storage: &Storage, path: &Path) -> StepResult {
    let mut removed_any = false;
    // Tags first, so that an interruption never leaves a tag whose manifest is gone.
    for sub in ["_manifests/tags", "_manifests", "_layers", "_uploads"] {
        match storage.remove_dir(&path.join(sub)) {
            Ok(crate::storage::Removed::Done) => removed_any = true,
            Ok(crate::storage::Removed::AlreadyGone) => {}
            Err(e) => return StepResult::Failed(format!("{e:#}")),
        }
    }
    // The repository directory and its parents, unless they still hold another repository.
    match storage.remove_empty_upwards(path, Path::new("repositories")) {
        Ok(dirs) if removed_any || !dirs.is_empty() => StepResult::Done(String::new()),
        Ok(_) => StepResult::AlreadyGone,
        Err(e) => StepResult::Failed(format!("{e:#}")),
    }
}

fn verify(endpoint: Option<&str>, checks: &[Check], report: &Report) -> StepResult {
    let Some(url) = endpoint else {
        return StepResult::Skipped(
            "the registry's address is unknown (give --registry-url or a config with http.addr)"
                .into(),
        );
    };
    let restarted = report.outcomes.iter().any(|o| {
        matches!(
            o.step.action,
            Action::RestartRegistry | Action::StartRegistry
        ) && matches!(o.result, StepResult::Done(_))
    });
    if !restarted {
        return StepResult::Failed(
            "the registry was not restarted, so its cache may still serve deleted blobs".into(),
        );
    }
    match probe::wait_until_up(url, std::time::Duration::from_secs(30)) {
        Ok(probe::Up::Open) => {}
        Ok(probe::Up::AuthRequired) => {
            return StepResult::Skipped(format!(
                "{url} answers but requires authentication; deleted content not checked"
            ));
        }
        Err(e) => return StepResult::Failed(format!("{e:#}")),
    }
    let mut still = Vec::new();
    for c in checks {
        let (path, head) = match c {
            Check::ManifestGone { repo, reference } => {
                (format!("/v2/{repo}/manifests/{reference}"), false)
            }
            Check::BlobGone { repo, digest } => (format!("/v2/{repo}/blobs/{digest}"), true),
        };
        match probe::status(url, &path, head) {
            Ok(404) => {}
            Ok(code) => still.push(format!("{path} answers {code}")),
            Err(e) => still.push(format!("{path}: {e:#}")),
        }
    }
    if still.is_empty() {
        StepResult::Done(format!(
            "{url} answers; {} deleted reference(s) answer 404",
            checks.len()
        ))
    } else {
        StepResult::Failed(format!(
            "deleted content is still served: {}{}",
            still.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
            if still.len() > 5 {
                format!(" (and {} more)", still.len() - 5)
            } else {
                String::new()
            }
        ))
    }
}
