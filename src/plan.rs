//! Pure functions from what was read and what the user selected to a [`Plan`]: ordered steps,
//! each with its path, the digest it expects, and its reason. No I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::storage::{
    Digest, ManifestKind, Problem, Reference, RepoName, RepoSnapshot, Tag, layout,
};

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Stop the registry before editing (offline mode).
    StopRegistry,
    /// Remove `_manifests/tags/<tag>/`.
    RemoveTag,
    /// Remove `_manifests/revisions/sha256/<hex>/`.
    RemoveRevision,
    /// Remove `_layers/sha256/<hex>/`.
    RemoveLayerLink,
    /// Remove a directory the removals above leave empty (`_manifests/revisions`, `_layers`);
    /// skipped if something was written to it meanwhile.
    RemoveEmptyDir,
    /// Remove a whole repository (its `_manifests`, `_layers`, `_uploads`), then the parent
    /// directories left empty.
    RemoveRepository,
    /// Run the registry's own garbage collector.
    GarbageCollect,
    /// Remove the empty directories under `blobs/` that garbage collection leaves.
    RemoveEmptyBlobDirs,
    /// Give every manifest that stays in a repository the layer links it needs: a push that ran
    /// while links were being removed was told by the registry's cache that its layers already
    /// existed, and wrote no link.
    RelinkLayers,
    /// Start the registry again (offline mode).
    StartRegistry,
    /// Restart the registry so its in-memory blob cache forgets deleted blobs.
    RestartRegistry,
    /// Ask the registry over HTTP that it answers and that deleted content is gone.
    Verify,
}

impl Action {
    /// Whether the step edits the storage tree directly.
    pub fn is_tree_edit(self) -> bool {
        matches!(
            self,
            Self::RemoveTag
                | Self::RemoveRevision
                | Self::RemoveLayerLink
                | Self::RemoveEmptyDir
                | Self::RemoveRepository
        )
    }

    /// Imperative and past-tense verbs for output.
    pub fn verbs(self) -> (&'static str, &'static str) {
        match self {
            Self::StopRegistry => ("stop registry", "stopped registry"),
            Self::RemoveTag => ("remove tag", "removed tag"),
            Self::RemoveRevision => ("remove revision", "removed revision"),
            Self::RemoveLayerLink => ("remove layer link", "removed layer link"),
            Self::RemoveEmptyDir => ("remove empty dir", "removed empty dir"),
            Self::RemoveRepository => ("remove repository", "removed repository"),
            Self::GarbageCollect => ("garbage-collect", "garbage-collected"),
            Self::RemoveEmptyBlobDirs => ("remove empty blob dirs", "removed empty blob dirs"),
            Self::RelinkLayers => ("check layer links", "checked layer links"),
            Self::StartRegistry => ("start registry", "started registry"),
            Self::RestartRegistry => ("restart registry", "restarted registry"),
            Self::Verify => ("verify", "verified"),
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// What to do.
    pub action: Action,
    /// The repository it concerns, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoName>,
    /// Path relative to `<root>/docker/registry/v2`, for tree edits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The digest the step expects to find at `path` (a tag's current link, a link's content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect: Option<Digest>,
    /// Why the step is there.
    pub reason: String,
}

impl Step {
    fn tree(
        action: Action,
        repo: &RepoName,
        path: PathBuf,
        expect: Option<Digest>,
        reason: String,
    ) -> Self {
        Self {
            action,
            repo: Some(repo.clone()),
            path: Some(path),
            expect,
            reason,
        }
    }

    /// A step that is not a tree edit.
    pub fn service(action: Action, reason: impl Into<String>) -> Self {
        Self {
            action,
            repo: None,
            path: None,
            expect: None,
            reason: reason.into(),
        }
    }

    /// The thing the step acts on, for output: `repo:tag`, `repo@sha256:…`, a path.
    pub fn target(&self) -> String {
        let repo = self.repo.as_ref().map(|r| r.as_str()).unwrap_or("");
        match (self.action, &self.path, &self.expect) {
            (Action::RemoveTag, Some(p), _) => format!(
                "{repo}:{}",
                p.file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default()
            ),
            (Action::RemoveRevision, _, Some(d)) => format!("{repo}@{}", d.short()),
            (Action::RemoveLayerLink, _, Some(d)) => format!("{repo} {}", d.short()),
            (Action::RemoveRepository | Action::RemoveEmptyDir | Action::RelinkLayers, _, _) => {
                repo.to_string()
            }
            _ => String::new(),
        }
    }
}

/// Something the plan deliberately keeps although the selection touched it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// Repository.
    pub repo: RepoName,
    /// The manifest kept.
    pub digest: Digest,
    /// Why.
    pub reason: String,
}

impl fmt::Display for Kept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}: {}", self.repo, self.digest.short(), self.reason)
    }
}

/// A request to the registry after restart that must answer 404.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Check {
    /// `GET /v2/<repo>/manifests/<reference>` must answer 404.
    ManifestGone {
        /// Repository.
        repo: RepoName,
        /// A tag or a digest.
        reference: String,
    },
    /// `HEAD /v2/<repo>/blobs/<digest>` must answer 404.
    BlobGone {
        /// Repository.
        repo: RepoName,
        /// Blob.
        digest: Digest,
    },
}

/// Ordered steps plus what was kept, what could not be read, and what to verify afterwards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Steps in execution order.
    pub steps: Vec<Step>,
    /// Manifests the selection touched but that stay, with the reason.
    pub kept: Vec<Kept>,
    /// What could not be read; nothing depending on it is deleted.
    pub problems: Vec<Problem>,
    /// Requests that must answer 404 once the registry is back.
    pub checks: Vec<Check>,
    /// What garbage collection will free once the edits are done, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freed: Option<crate::gc::Freed>,
}

impl Plan {
    /// Whether the plan edits the storage tree.
    pub fn edits_tree(&self) -> bool {
        self.steps.iter().any(|s| s.action.is_tree_edit())
    }

    /// Number of steps with the given action.
    pub fn count(&self, action: Action) -> usize {
        self.steps.iter().filter(|s| s.action == action).count()
    }
}

/// Why a selection cannot be planned; each is a refusal before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// The repository has no tag of that name.
    #[error(
        "tag `{tag}` not found in repository `{repo}` (list its tags with `docker-delete ls {repo}`)"
    )]
    UnknownTag {
        /// Repository.
        repo: RepoName,
        /// Tag.
        tag: Tag,
    },
    /// The repository has no manifest with that digest.
    #[error(
        "manifest {digest} not found in repository `{repo}` (list its tags and digests with `docker-delete ls {repo}`)"
    )]
    UnknownDigest {
        /// Repository.
        repo: RepoName,
        /// Digest.
        digest: Digest,
    },
    /// `repo` alone, on a repository without tags.
    #[error(
        "repository `{repo}` has no tags to delete (delete the whole repository with `docker-delete delete-repo {repo}`)"
    )]
    NoTags {
        /// Repository.
        repo: RepoName,
    },
}

impl SelectError {
    /// The reference that could not be resolved.
    pub fn reference(&self) -> Reference {
        match self {
            Self::UnknownTag { repo, tag } => Reference::Tag(repo.clone(), tag.clone()),
            Self::UnknownDigest { repo, digest } => Reference::Digest(repo.clone(), digest.clone()),
            Self::NoTags { repo } => Reference::AllTags(repo.clone()),
        }
    }
}

/// What goes in one repository: tags (each with its reason), and manifests that go unless
/// something kept needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Tags to delete, with the reason.
    pub tags: BTreeMap<Tag, String>,
    /// Manifests to delete unless a kept tag, index or referrer needs them.
    pub digests: BTreeSet<Digest>,
    /// Layer links to remove unless a manifest that stays uses them (an interrupted run's).
    pub layers: BTreeSet<Digest>,
}

/// Selections by repository.
pub type Selections = BTreeMap<RepoName, Selection>;

/// Plans the deletion of the referenced tags and manifests.
pub fn build_delete_plan(
    snaps: &[RepoSnapshot],
    refs: &[Reference],
) -> Result<Plan, Vec<SelectError>> {
    Ok(plan_selections(snaps, select(snaps, refs)?))
}

/// Resolves references against the snapshots (each repository named must have a snapshot).
pub fn select(snaps: &[RepoSnapshot], refs: &[Reference]) -> Result<Selections, Vec<SelectError>> {
    let mut by_repo = Selections::new();
    let mut errors = Vec::new();
    for r in refs {
        let Some(snap) = snaps.iter().find(|s| s.repo() == r.repo()) else {
            continue;
        };
        let entry = by_repo.entry(snap.repo().clone()).or_default();
        match r {
            Reference::Tag(repo, tag) => {
                if snap.tags.contains_key(tag) {
                    entry
                        .tags
                        .entry(tag.clone())
                        .or_insert_with(|| format!("named as {r}"));
                } else {
                    errors.push(SelectError::UnknownTag {
                        repo: repo.clone(),
                        tag: tag.clone(),
                    });
                }
            }
            Reference::AllTags(repo) => {
                if snap.tags.is_empty() {
                    errors.push(SelectError::NoTags { repo: repo.clone() });
                }
                for tag in snap.tags.keys() {
                    entry
                        .tags
                        .entry(tag.clone())
                        .or_insert_with(|| format!("every tag of {repo}"));
                }
            }
            Reference::Digest(repo, digest) => {
                let known = snap.revisions.contains(digest)
                    || snap.tags.values().any(|t| t.current.as_ref() == Ok(digest));
                if !known {
                    errors.push(SelectError::UnknownDigest {
                        repo: repo.clone(),
                        digest: digest.clone(),
                    });
                    continue;
                }
                entry.digests.insert(digest.clone());
                for (tag, t) in &snap.tags {
                    if t.current.as_ref() == Ok(digest) {
                        entry
                            .tags
                            .entry(tag.clone())
                            .or_insert_with(|| format!("points at named {}", digest.short()));
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(by_repo)
    } else {
        Err(errors)
    }
}

/// Plans the selections, repository by repository.
pub fn plan_selections(snaps: &[RepoSnapshot], selections: Selections) -> Plan {
    let mut plan = Plan::default();
    let mut tags_steps = Vec::new();
    let mut rev_steps = Vec::new();
    let mut layer_steps = Vec::new();
    let mut empty_dir_steps = Vec::new();
    for (repo, sel) in selections {
        let Some(snap) = snaps.iter().find(|s| *s.repo() == repo) else {
            continue;
        };
        let rp = plan_repo(snap, sel.tags, sel.digests, &sel.layers);
        tags_steps.extend(rp.tags);
        rev_steps.extend(rp.revisions);
        layer_steps.extend(rp.layers);
        empty_dir_steps.extend(rp.empty_dirs);
        plan.kept.extend(rp.kept);
        plan.problems.extend(rp.problems);
        plan.checks.extend(rp.checks);
    }
    // Order across repositories: every tag first, then revisions, then layer links, so that an
    // interruption at any point leaves unselected images intact.
    plan.steps.extend(tags_steps);
    plan.steps.extend(rev_steps);
    plan.steps.extend(layer_steps);
    plan.steps.extend(empty_dir_steps);
    plan
}

/// Joins plans, keeping the order of actions (tags, revisions, layer links, empty directories,
/// repositories) across them and dropping a step the first plan already has.
pub fn join(mut a: Plan, b: Plan) -> Plan {
    for s in b.steps {
        if !a
            .steps
            .iter()
            .any(|t| t.action == s.action && t.path == s.path)
        {
            a.steps.push(s);
        }
    }
    a.steps.sort_by_key(|s| s.action);
    a.kept.extend(b.kept);
    a.problems.extend(b.problems);
    for c in b.checks {
        if !a.checks.contains(&c) {
            a.checks.push(c);
        }
    }
    a
}

struct RepoPlan {
    tags: Vec<Step>,
    revisions: Vec<Step>,
    layers: Vec<Step>,
    empty_dirs: Vec<Step>,
    kept: Vec<Kept>,
    problems: Vec<Problem>,
    checks: Vec<Check>,
}

/// The fixpoint at the heart of deletion, for one repository:
/// candidates are the selected digests and the current and historic digests of deleted tags,
/// with the children of candidate indexes and the referrers of candidates; everything reachable
/// from a remaining tag or a revision that is not a candidate is kept; the rest goes. Signature
/// tags (`sha256-<hex>.sig`) of manifests that go are deleted too, which can free more.
fn plan_repo(
    snap: &RepoSnapshot,
    mut del_tags: BTreeMap<Tag, String>,
    digests: BTreeSet<Digest>,
    layer_candidates: &BTreeSet<Digest>,
) -> RepoPlan {
    let repo = snap.repo();
    let mut problems = Vec::new();
    let mut kept = Vec::new();
    let current_of = |t: &Tag| snap.tags.get(t).and_then(|e| e.current.as_ref().ok());

    let (delete, keep_reason, blocked, unlinked) = loop {
        // Candidates, each with the reason it became one.
        let mut cand: BTreeMap<Digest, String> = BTreeMap::new();
        for d in &digests {
            cand.insert(d.clone(), "selected".into());
        }
        for tag in del_tags.keys() {
            let e = &snap.tags[tag];
            if let Ok(c) = &e.current {
                cand.entry(c.clone())
                    .or_insert_with(|| format!("tag {tag} pointed at it"));
            }
            for h in &e.history {
                cand.entry(h.clone())
                    .or_insert_with(|| format!("in the history of tag {tag}"));
            }
        }
        loop {
            let mut added = Vec::new();
            for d in cand.keys() {
                if let Some(m) = snap.manifest(d) {
                    for c in m.children() {
                        if !cand.contains_key(c) {
                            added.push((c.clone(), format!("platform of {}", d.short())));
                        }
                    }
                }
            }
            for r in &snap.revisions {
                if let Some(s) = snap.manifest(r).and_then(|m| m.subject.as_ref())
                    && cand.contains_key(s)
                    && !cand.contains_key(r)
                {
                    added.push((
                        r.clone(),
                        format!("signature or attestation of {}", s.short()),
                    ));
                }
            }
            if added.is_empty() {
                break;
            }
            for (d, why) in added {
                cand.entry(d).or_insert(why);
            }
        }

        // Roots that stay: remaining tags' current digests, and every revision that is not a
        // candidate. A remaining tag whose target is unknown blocks all revision removal here.
        let mut blocked = None;
        let mut roots: Vec<(Digest, String)> = Vec::new();
        for (tag, e) in &snap.tags {
            if del_tags.contains_key(tag) {
                continue;
            }
            match &e.current {
                Ok(d) => roots.push((d.clone(), format!("tag {tag} points at it"))),
                Err(_) => {
                    blocked = Some(format!(
                        "the current link of remaining tag {tag} cannot be read, so what it needs is unknown"
                    ))
                }
            }
        }
        for r in &snap.revisions {
            if !cand.contains_key(r) {
                roots.push((r.clone(), "not selected".into()));
            }
        }
        let mut keep: BTreeMap<Digest, String> = BTreeMap::new();
        while let Some((d, why)) = roots.pop() {
            if keep.contains_key(&d) {
                continue;
            }
            match snap.manifests.get(&d) {
                Some(Ok(m)) => {
                    for c in m.children() {
                        roots.push((c.clone(), format!("platform of kept index {}", d.short())));
                    }
                    if let Some(s) = &m.subject {
                        roots.push((s.clone(), format!("subject of kept referrer {}", d.short())));
                    }
                }
                Some(Err(_)) | None => {
                    if cand.contains_key(&d) || snap.revisions.contains(&d) {
                        // A kept manifest we cannot read might be an index of candidates.
                        blocked.get_or_insert_with(|| {
                            format!(
                                "kept manifest {} cannot be read, so what it needs is unknown",
                                d.short()
                            )
                        });
                    }
                }
            }
            keep.insert(d, why);
        }

        let mut delete: BTreeMap<Digest, String> = BTreeMap::new();
        let mut unlinked: BTreeSet<Digest> = BTreeSet::new();
        for (d, why) in &cand {
            if keep.contains_key(d) {
                continue;
            }
            if !snap.revisions.contains(d) {
                // No revision link to remove (only in a tag's history, or removed earlier, for
                // example through the registry's API): its layer links may still go.
                if snap.manifest(d).is_some() {
                    unlinked.insert(d.clone());
                }
                continue;
            }
            match snap.manifests.get(d) {
                Some(Ok(m)) if m.kind == ManifestKind::Unknown => kept.push(Kept {
                    repo: repo.clone(),
                    digest: d.clone(),
                    reason: format!(
                        "media type {} is not understood; its revision link stays",
                        m.media_type
                    ),
                }),
                Some(Ok(_)) => {
                    delete.insert(d.clone(), why.clone());
                }
                Some(Err(e)) => problems.push(Problem {
                    path: layout::revision_dir(repo, d),
                    message: format!("kept: its manifest cannot be read ({e})"),
                }),
                None => {}
            }
        }
        if blocked.is_some() {
            delete.clear();
        }

        let sig_tags: Vec<Tag> = snap
            .tags
            .keys()
            .filter(|t| !del_tags.contains_key(*t))
            .filter(|t| t.signed_digest().is_some_and(|d| delete.contains_key(&d)))
            .cloned()
            .collect();
        if sig_tags.is_empty() {
            let keep_reason: BTreeMap<Digest, String> = cand
                .keys()
                .filter_map(|d| keep.get(d).map(|w| (d.clone(), w.clone())))
                .collect();
            break (delete, keep_reason, blocked, unlinked);
        }
        for t in sig_tags {
            let d = t.signed_digest().expect("filtered");
            del_tags.insert(t, format!("signature tag of deleted {}", d.short()));
        }
    };

    if let Some(why) = &blocked {
        problems.push(Problem {
            path: layout::repo(repo),
            message: format!("no revision or layer link removed in {repo}: {why}"),
        });
    }
    for (d, why) in &keep_reason {
        if snap.revisions.contains(d) {
            kept.push(Kept {
                repo: repo.clone(),
                digest: d.clone(),
                reason: why.clone(),
            });
        }
    }

    // Layer links used only by deleted manifests.
    let mut layers = Vec::new();
    if blocked.is_none()
        && !(delete.is_empty() && unlinked.is_empty() && layer_candidates.is_empty())
    {
        let mut remaining: BTreeSet<Digest> = snap
            .revisions
            .iter()
            .filter(|d| !delete.contains_key(*d))
            .cloned()
            .collect();
        for (tag, e) in &snap.tags {
            if !del_tags.contains_key(tag)
                && let Ok(c) = &e.current
            {
                remaining.insert(c.clone());
            }
        }
        let mut still_used = BTreeSet::new();
        let mut unknown = None;
        for d in &remaining {
            match snap.manifests.get(d) {
                Some(Ok(m)) => still_used.extend(m.blobs()),
                _ => {
                    unknown.get_or_insert(d.clone());
                }
            }
        }
        if let Some(d) = unknown {
            problems.push(Problem {
                path: layout::revision_dir(repo, &d),
                message: format!(
                    "no layer link removed in {repo}: remaining manifest {} cannot be read",
                    d.short()
                ),
            });
        } else {
            let mut gone: BTreeMap<Digest, String> = BTreeMap::new();
            for d in delete.keys().chain(&unlinked) {
                for b in snap.manifest(d).map(|m| m.blobs()).unwrap_or_default() {
                    gone.entry(b)
                        .or_insert_with(|| format!("used only by deleted {}", d.short()));
                }
            }
            for b in layer_candidates {
                gone.entry(b.clone())
                    .or_insert_with(|| "left by an interrupted run".into());
            }
            for (b, why) in gone {
                if !still_used.contains(&b) && snap.layers.contains(&b) {
                    layers.push(Step::tree(
                        Action::RemoveLayerLink,
                        repo,
                        layout::layer_dir(repo, &b),
                        Some(b.clone()),
                        why,
                    ));
                }
            }
        }
    }

    // Directories the removals leave empty; `_manifests/tags` stays, as the registry answers
    // NAME_UNKNOWN for a repository without it.
    let mut empty_dirs = Vec::new();
    if !delete.is_empty() && snap.revisions.iter().all(|d| delete.contains_key(d)) {
        for rel in ["_manifests/revisions/sha256", "_manifests/revisions"] {
            empty_dirs.push(Step::tree(
                Action::RemoveEmptyDir,
                repo,
                layout::repo(repo).join(rel),
                None,
                "no revision left".into(),
            ));
        }
    }
    if !layers.is_empty() && layers.len() == snap.layers.len() {
        for rel in ["_layers/sha256", "_layers"] {
            empty_dirs.push(Step::tree(
                Action::RemoveEmptyDir,
                repo,
                layout::repo(repo).join(rel),
                None,
                "no layer link left".into(),
            ));
        }
    }

    let mut checks = Vec::new();
    let tags = del_tags
        .iter()
        .map(|(tag, why)| {
            checks.push(Check::ManifestGone {
                repo: repo.clone(),
                reference: tag.to_string(),
            });
            Step::tree(
                Action::RemoveTag,
                repo,
                layout::tag_dir(repo, tag),
                current_of(tag).cloned(),
                why.clone(),
            )
        })
        .collect();
    let revisions = delete
        .iter()
        .map(|(d, why)| {
            checks.push(Check::ManifestGone {
                repo: repo.clone(),
                reference: d.to_string(),
            });
            Step::tree(
                Action::RemoveRevision,
                repo,
                layout::revision_dir(repo, d),
                Some(d.clone()),
                why.clone(),
            )
        })
        .collect();
    for s in &layers {
        checks.push(Check::BlobGone {
            repo: repo.clone(),
            digest: s.expect.clone().expect("layer steps carry a digest"),
        });
    }
    RepoPlan {
        tags,
        revisions,
        layers,
        empty_dirs,
        kept,
        problems,
        checks,
    }
}

/// Plans the removal of whole repositories.
pub fn build_repo_plan(snaps: &[RepoSnapshot]) -> Plan {
    let mut plan = Plan::default();
    for snap in snaps {
        let repo = snap.repo();
        plan.steps.push(Step::tree(
            Action::RemoveRepository,
            repo,
            layout::repo(repo),
            None,
            [
                counted(snap.tags.len(), "tag", "tags"),
                counted(snap.revisions.len(), "manifest", "manifests"),
                counted(snap.layers.len(), "layer link", "layer links"),
                counted(snap.uploads.len(), "upload", "uploads"),
            ]
            .join(", "),
        ));
        for tag in snap.tags.keys() {
            plan.checks.push(Check::ManifestGone {
                repo: repo.clone(),
                reference: tag.to_string(),
            });
        }
        for b in &snap.layers {
            plan.checks.push(Check::BlobGone {
                repo: repo.clone(),
                digest: b.clone(),
            });
        }
    }
    plan
}

/// The tree edits and checks of a plan: what the journal records before the first edit.
pub fn journal_of(plan: &Plan) -> Plan {
    Plan {
        steps: plan
            .steps
            .iter()
            .filter(|s| s.action.is_tree_edit())
            .cloned()
            .collect(),
        checks: plan.checks.clone(),
        ..Plan::default()
    }
}

/// Checks a journal read from disk: only tree edits, each at the path its repository and digest
/// call for, so a damaged or edited journal cannot aim a removal anywhere else.
pub fn ensure_valid_journal(journal: &Plan) -> Result<(), String> {
    for s in &journal.steps {
        let (Some(repo), Some(path)) = (&s.repo, &s.path) else {
            return Err(format!("a {:?} step has no repository or path", s.action));
        };
        let ok = match (s.action, &s.expect) {
            (Action::RemoveTag, _) => {
                path.parent() == Some(layout::repo(repo).join("_manifests/tags").as_path())
                    && path
                        .file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|t| Tag::parse(t).is_ok())
            }
            (Action::RemoveRevision, Some(d)) => *path == layout::revision_dir(repo, d),
            (Action::RemoveLayerLink, Some(d)) => *path == layout::layer_dir(repo, d),
            (Action::RemoveRepository, None) => *path == layout::repo(repo),
            (Action::RemoveEmptyDir, None) => [
                "_manifests/revisions/sha256",
                "_manifests/revisions",
                "_layers/sha256",
                "_layers",
            ]
            .iter()
            .any(|rel| *path == layout::repo(repo).join(rel)),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "step {:?} on {} does not match the storage layout",
                s.action,
                path.display()
            ));
        }
    }
    Ok(())
}

/// Whether an interrupted run's pending steps already cover a reference that no longer resolves
/// (its tag or manifest was removed before the interruption).
pub fn covered_by(pending: &Plan, r: &Reference) -> bool {
    pending.steps.iter().any(|s| {
        s.repo.as_ref() == Some(r.repo())
            && match (r, s.action) {
                (_, Action::RemoveRepository) => true,
                (Reference::Tag(repo, tag), Action::RemoveTag) => {
                    s.path.as_deref() == Some(layout::tag_dir(repo, tag).as_path())
                }
                (Reference::AllTags(_), Action::RemoveTag) => true,
                (Reference::Digest(_, d), Action::RemoveTag | Action::RemoveRevision) => {
                    s.expect.as_ref() == Some(d)
                }
                _ => false,
            }
    })
}

/// Turns the steps an interrupted run did not get to into work checked against the tree as it is
/// now: its tags that still point where they did, its manifests and layer links (which go only if
/// nothing that stays needs them, so an image pushed since is safe), and its repositories that
/// have no tag again. Returns the selections, the repositories to remove whole, notes on what is
/// no longer done, and the empty-directory steps (safe as they are).
pub fn pending_selections(
    pending: &Plan,
    snaps: &[RepoSnapshot],
) -> (Selections, Vec<RepoName>, Vec<Problem>, Vec<Step>) {
    let mut sel = Selections::new();
    let mut empty_dirs = Vec::new();
    let mut whole = Vec::new();
    let mut notes = Vec::new();
    for s in &pending.steps {
        let (Some(repo), Some(path)) = (&s.repo, &s.path) else {
            continue;
        };
        let Some(snap) = snaps.iter().find(|x| x.repo() == repo) else {
            continue; // the repository is gone: nothing left to do there
        };
        match s.action {
            Action::RemoveTag => {
                let Some(tag) = path
                    .file_name()
                    .and_then(|f| f.to_str())
                    .and_then(|t| Tag::parse(t).ok())
                else {
                    continue;
                };
                let Some(entry) = snap.tags.get(&tag) else {
                    continue; // already removed
                };
                if entry.current.as_ref().ok() == s.expect.as_ref() {
                    sel.entry(repo.clone())
                        .or_default()
                        .tags
                        .insert(tag, "left by an interrupted run".into());
                } else {
                    notes.push(Problem {
                        path: path.clone(),
                        message: format!(
                            "not deleted: an interrupted run meant to, but {repo}:{tag} was pushed again since"
                        ),
                    });
                }
            }
            Action::RemoveRevision => {
                if let Some(d) = &s.expect {
                    sel.entry(repo.clone())
                        .or_default()
                        .digests
                        .insert(d.clone());
                }
            }
            Action::RemoveLayerLink => {
                if let Some(d) = &s.expect {
                    sel.entry(repo.clone())
                        .or_default()
                        .layers
                        .insert(d.clone());
                }
            }
            // Removed only if still empty, so safe whatever happened since.
            Action::RemoveEmptyDir => empty_dirs.push(s.clone()),
            Action::RemoveRepository => {
                if snap.tags.is_empty() {
                    whole.push(repo.clone());
                } else {
                    notes.push(Problem {
                        path: path.clone(),
                        message: format!(
                            "not deleted: an interrupted run meant to, but {repo} has tags again; run `docker-delete delete-repo {repo}` if it should still go"
                        ),
                    });
                }
            }
            _ => {}
        }
    }
    (sel, whole, notes, empty_dirs)
}

/// "1 tag", "2 tags".
fn counted(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// How the registry is driven after the tree edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Finish {
    /// Stop the registry before editing and start it afterwards.
    pub offline: bool,
    /// Run garbage collection.
    pub gc: bool,
    /// Restart the registry after GC (ignored with `offline`: the start flushes the cache).
    pub restart: bool,
    /// Verify over HTTP afterwards.
    pub verify: bool,
}

/// Wraps tree steps with the service steps: stop, GC, empty-directory clean-up, layer-link
/// repair (in the repositories edited, and in `relink`), start/restart, verification. With no
/// tree edit and `force` unset, the plan stays empty.
pub fn finish_plan(mut plan: Plan, finish: Finish, force: bool, relink: &[RepoName]) -> Plan {
    if !plan.edits_tree() && !force {
        return plan;
    }
    let mut steps = Vec::new();
    if finish.offline {
        steps.push(Step::service(
            Action::StopRegistry,
            "no push may race with the edits and the collection",
        ));
    }
    steps.append(&mut plan.steps);
    if finish.gc {
        steps.push(Step::service(
            Action::GarbageCollect,
            "free the blobs no manifest references any more",
        ));
        steps.push(Step::service(
            Action::RemoveEmptyBlobDirs,
            "garbage collection leaves empty blobs/sha256/xx directories",
        ));
    }
    // Repositories whose layer links this plan edits (and that stay), and those asked for.
    let mut touched: Vec<RepoName> = relink.to_vec();
    for s in &steps {
        if let Some(r) = &s.repo
            && s.action.is_tree_edit()
            && !touched.contains(r)
        {
            touched.push(r.clone());
        }
    }
    let gone: Vec<&RepoName> = steps
        .iter()
        .filter(|s| s.action == Action::RemoveRepository)
        .filter_map(|s| s.repo.as_ref())
        .collect();
    touched.retain(|r| !gone.contains(&r));
    for repo in touched {
        steps.push(Step {
            action: Action::RelinkLayers,
            // No path: the step removes nothing, and the paths a plan lists are what goes.
            path: None,
            repo: Some(repo),
            expect: None,
            reason: "a push during the edits may have skipped layers the cache still claimed"
                .into(),
        });
    }
    let restarts = if finish.offline {
        steps.push(Step::service(
            Action::StartRegistry,
            "bring the registry back",
        ));
        true
    } else if finish.restart {
        steps.push(Step::service(
            Action::RestartRegistry,
            "flush the registry's in-memory blob cache, or a re-push of a deleted layer is skipped and breaks",
        ));
        true
    } else {
        false
    };
    if restarts && finish.verify {
        steps.push(Step::service(
            Action::Verify,
            "the registry answers and deleted content answers 404",
        ));
    }
    plan.steps = steps;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Manifest, TagEntry};

    fn d(n: u8) -> Digest {
        Digest::from_hex(&format!("{n:02x}").repeat(32)).unwrap()
    }

    fn image(config: u8, layers: &[u8]) -> Manifest {
        Manifest {
            media_type: crate::storage::media::OCI_MANIFEST.into(),
            kind: ManifestKind::Image {
                config: Some(d(config)),
                layers: layers.iter().map(|l| d(*l)).collect(),
            },
            subject: None,
            size: 100,
        }
    }

    fn index(children: &[u8]) -> Manifest {
        Manifest {
            media_type: crate::storage::media::OCI_INDEX.into(),
            kind: ManifestKind::Index {
                children: children.iter().map(|c| d(*c)).collect(),
            },
            subject: None,
            size: 100,
        }
    }

    /// A repository builder on an in-memory snapshot.
    struct Repo(RepoSnapshot);

    impl Repo {
        fn new(name: &str) -> Self {
            Repo(RepoSnapshot {
                name: Some(RepoName::parse(name).unwrap()),
                has_manifests: true,
                ..Default::default()
            })
        }
        fn manifest(mut self, n: u8, m: Manifest) -> Self {
            self.0.revisions.insert(d(n));
            self.0.layers.extend(m.blobs());
            self.0.manifests.insert(d(n), Ok(m));
            self
        }
        fn tag(mut self, t: &str, current: u8, history: &[u8]) -> Self {
            let mut h: Vec<Digest> = history.iter().map(|x| d(*x)).collect();
            h.push(d(current));
            self.0.tags.insert(
                Tag::parse(t).unwrap(),
                TagEntry {
                    current: Ok(d(current)),
                    history: h,
                },
            );
            self
        }
    }

    fn plan(snaps: &[RepoSnapshot], refs: &[&str]) -> Plan {
        let refs: Vec<Reference> = refs.iter().map(|r| Reference::parse(r).unwrap()).collect();
        build_delete_plan(snaps, &refs).unwrap()
    }

    fn of(plan: &Plan, a: Action) -> Vec<String> {
        plan.steps
            .iter()
            .filter(|s| s.action == a)
            .map(|s| match a {
                Action::RemoveTag => s.target(),
                _ => s.expect.as_ref().unwrap().short().to_string(),
            })
            .collect()
    }

    fn shorts(ns: &[u8]) -> Vec<String> {
        ns.iter().map(|n| d(*n).short().to_string()).collect()
    }

    #[test]
    fn shared_digest_tag_stays() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2, 3]))
            .tag("v1", 10, &[])
            .tag("latest", 10, &[])
            .0;
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveTag), vec!["app:v1"]);
        assert!(of(&p, Action::RemoveRevision).is_empty());
        assert!(of(&p, Action::RemoveLayerLink).is_empty());
        assert_eq!(p.kept.len(), 1);
    }

    #[test]
    fn unique_image_goes_shared_layers_stay() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2, 3]))
            .manifest(11, image(4, &[2, 5]))
            .tag("v1", 10, &[])
            .tag("v2", 11, &[])
            .0;
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[10]));
        assert_eq!(of(&p, Action::RemoveLayerLink), shorts(&[1, 3]));
    }

    #[test]
    fn history_goes_unless_current_elsewhere() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .manifest(11, image(1, &[3]))
            .manifest(12, image(4, &[5]))
            .tag("v1", 11, &[10, 12])
            .tag("other", 12, &[])
            .0;
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[10, 11]));
        assert_eq!(of(&p, Action::RemoveLayerLink), shorts(&[1, 2, 3]));
    }

    #[test]
    fn index_children_go_with_index_but_not_when_shared() {
        let s = Repo::new("multi")
            .manifest(20, image(1, &[2]))
            .manifest(21, image(3, &[4]))
            .manifest(22, image(5, &[6]))
            .manifest(30, index(&[20, 21]))
            .manifest(31, index(&[21, 22]))
            .tag("a", 30, &[])
            .tag("b", 31, &[])
            .0;
        let p = plan(&[s], &["multi:a"]);
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[20, 30]));
        assert_eq!(of(&p, Action::RemoveLayerLink), shorts(&[1, 2]));
    }

    #[test]
    fn untagged_unrelated_revision_is_untouched() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .manifest(11, image(3, &[4]))
            .tag("v1", 10, &[])
            .0;
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[10]));
        assert_eq!(of(&p, Action::RemoveLayerLink), shorts(&[1, 2]));
    }

    #[test]
    fn referrers_and_signature_tags_follow_their_subject() {
        let mut sig = image(7, &[8]);
        sig.subject = Some(d(10));
        let cosign = format!("sha256-{}.sig", d(10).hex());
        let s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .manifest(40, sig)
            .manifest(41, image(9, &[9]))
            .tag("v1", 10, &[])
            .tag(&cosign, 41, &[])
            .0;
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveTag).len(), 2);
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[10, 40, 41]));
    }

    #[test]
    fn digest_selection_takes_every_tag_on_it() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .manifest(11, image(3, &[4]))
            .tag("v1", 10, &[])
            .tag("latest", 10, &[])
            .tag("v2", 11, &[])
            .0;
        let p = plan(&[s], &[&format!("app@{}", d(10))]);
        assert_eq!(of(&p, Action::RemoveTag), vec!["app:latest", "app:v1"]);
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[10]));
    }

    #[test]
    fn layer_links_of_a_manifest_whose_revision_is_already_gone_are_removed() {
        let mut s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .manifest(11, image(3, &[2]))
            .tag("v1", 10, &[])
            .tag("v2", 11, &[])
            .0;
        s.revisions.remove(&d(10));
        let p = plan(&[s], &["app:v1"]);
        assert!(of(&p, Action::RemoveRevision).is_empty());
        assert_eq!(of(&p, Action::RemoveLayerLink), shorts(&[1]));
    }

    #[test]
    fn unreadable_remaining_tag_blocks_revision_removal() {
        let mut s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .tag("v1", 10, &[])
            .0;
        s.tags.insert(
            Tag::parse("broken").unwrap(),
            TagEntry {
                current: Err("link file is empty".into()),
                history: vec![],
            },
        );
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveTag), vec!["app:v1"]);
        assert!(of(&p, Action::RemoveRevision).is_empty());
        assert!(!p.problems.is_empty());
    }

    #[test]
    fn unreadable_candidate_is_kept() {
        let mut s = Repo::new("app").tag("v1", 10, &[]).0;
        s.revisions.insert(d(10));
        s.manifests.insert(d(10), Err("not valid JSON".into()));
        let p = plan(&[s], &["app:v1"]);
        assert_eq!(of(&p, Action::RemoveTag), vec!["app:v1"]);
        assert!(of(&p, Action::RemoveRevision).is_empty());
        assert_eq!(p.problems.len(), 1);
    }

    #[test]
    fn unknown_tag_and_digest_are_refused() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .tag("v1", 10, &[])
            .0;
        let refs = vec![
            Reference::parse("app:nope").unwrap(),
            Reference::parse(&format!("app@{}", d(99))).unwrap(),
        ];
        let errs = build_delete_plan(&[s], &refs).unwrap_err();
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn pending_steps_cover_half_deleted_references_and_merge_in_order() {
        let s = Repo::new("app")
            .manifest(10, image(1, &[2]))
            .manifest(11, image(3, &[4]))
            .tag("v1", 10, &[])
            .tag("v2", 11, &[])
            .0;
        let pending = journal_of(&finish_plan(
            plan(std::slice::from_ref(&s), &["app:v1"]),
            Finish {
                offline: true,
                gc: true,
                restart: true,
                verify: true,
            },
            false,
            &[],
        ));
        assert!(pending.steps.iter().all(|s| s.action.is_tree_edit()));
        ensure_valid_journal(&pending).unwrap();
        let mut evil = pending.clone();
        evil.steps[0].path = Some(PathBuf::from("repositories/other/_manifests/tags/v1"));
        assert!(ensure_valid_journal(&evil).is_err());
        evil.steps[0].path = Some(PathBuf::from("../../etc"));
        assert!(ensure_valid_journal(&evil).is_err());
        assert!(covered_by(&pending, &Reference::parse("app:v1").unwrap()));
        assert!(covered_by(
            &pending,
            &Reference::parse(&format!("app@{}", d(10))).unwrap()
        ));
        assert!(!covered_by(&pending, &Reference::parse("app:v2").unwrap()));
        assert!(!covered_by(
            &pending,
            &Reference::parse("other:v1").unwrap()
        ));

        // Replanned against the tree as it is now: the tag was removed before the interruption,
        // and the same image was pushed again as v3 since. Nothing of it may go.
        let mut now = s.clone();
        now.tags.remove(&Tag::parse("v1").unwrap());
        let (sel, whole, notes, _) = pending_selections(&pending, std::slice::from_ref(&now));
        assert!(whole.is_empty() && notes.is_empty());
        assert!(sel[&RepoName::parse("app").unwrap()].tags.is_empty());
        let p = plan_selections(std::slice::from_ref(&now), sel.clone());
        assert_eq!(of(&p, Action::RemoveRevision), shorts(&[10]), "{p:?}");
        now.tags.insert(
            Tag::parse("v3").unwrap(),
            TagEntry {
                current: Ok(d(10)),
                history: vec![d(10)],
            },
        );
        let p = plan_selections(std::slice::from_ref(&now), sel);
        assert!(of(&p, Action::RemoveRevision).is_empty(), "{p:?}");
        assert!(of(&p, Action::RemoveLayerLink).is_empty(), "{p:?}");

        // A tag pushed again to another digest is not removed, and says so.
        let mut moved = s.clone();
        moved
            .tags
            .get_mut(&Tag::parse("v1").unwrap())
            .unwrap()
            .current = Ok(d(11));
        let (sel, _, notes, _) = pending_selections(&pending, &[moved]);
        assert!(sel[&RepoName::parse("app").unwrap()].tags.is_empty());
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn steps_are_ordered_tags_then_revisions_then_layers_across_repos() {
        let a = Repo::new("a")
            .manifest(10, image(1, &[2]))
            .tag("v1", 10, &[])
            .0;
        let b = Repo::new("b")
            .manifest(11, image(3, &[4]))
            .tag("v1", 11, &[])
            .0;
        let p = plan(&[a, b], &["a:v1", "b:v1"]);
        let actions: Vec<Action> = p.steps.iter().map(|s| s.action).collect();
        let mut sorted = actions.clone();
        sorted.sort();
        assert_eq!(actions, sorted);
        let f = finish_plan(
            p,
            Finish {
                offline: false,
                gc: true,
                restart: true,
                verify: true,
            },
            false,
            &[],
        );
        assert_eq!(f.steps.last().unwrap().action, Action::Verify);
        assert_eq!(f.count(Action::RestartRegistry), 1);
        // Both edited repositories get their layer links checked, after collection and before
        // the restart.
        assert_eq!(f.count(Action::RelinkLayers), 2);
        let pos = |a: Action| f.steps.iter().position(|s| s.action == a).unwrap();
        assert!(pos(Action::GarbageCollect) < pos(Action::RelinkLayers));
        assert!(pos(Action::RelinkLayers) < pos(Action::RestartRegistry));
    }
}
