//! Mark and sweep, the way the registry's own collector does it: every manifest with a revision
//! link in any repository is marked with what it references; every other blob is garbage. Used
//! to tell, before anything runs, exactly what a plan's collection will free.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::plan::{Action, Plan};
use crate::storage::{Digest, ManifestKind, RepoSnapshot};

/// What garbage collection will delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freed {
    /// Number of blobs.
    pub blobs: usize,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// The blobs the registry's collector will delete once `plan`'s tree edits are done. `snaps`
/// must hold every repository of the registry and `blobs` every blob on disk with its size.
/// Fails, naming the manifest, where the collector itself would stop (an unreadable manifest).
pub fn freed_by(
    snaps: &[RepoSnapshot],
    blobs: &[(Digest, u64)],
    plan: &Plan,
) -> Result<Freed, String> {
    let mut marked: BTreeSet<&Digest> = BTreeSet::new();
    for snap in snaps {
        let repo = snap.repo();
        let in_repo = |a: Action| {
            plan.steps
                .iter()
                .filter(move |s| s.action == a && s.repo.as_ref() == Some(repo))
        };
        if in_repo(Action::RemoveRepository).next().is_some() {
            continue;
        }
        let removed: BTreeSet<&Digest> = in_repo(Action::RemoveRevision)
            .filter_map(|s| s.expect.as_ref())
            .collect();
        for rev in snap.revisions.iter().filter(|r| !removed.contains(r)) {
            marked.insert(rev);
            match snap.manifests.get(rev) {
                Some(Ok(m)) if m.kind == ManifestKind::Unknown => {
                    return Err(format!(
                        "{repo}@{rev} has media type {}, which the registry's collector cannot read",
                        m.media_type
                    ));
                }
                Some(Ok(m)) => {
                    if let ManifestKind::Image { config, layers } = &m.kind {
                        marked.extend(config.iter().chain(layers));
                    }
                    marked.extend(m.children());
                }
                Some(Err(e)) => return Err(format!("{repo}@{rev}: {e}")),
                None => return Err(format!("{repo}@{rev} was not read")),
            }
        }
    }
    let garbage: Vec<&(Digest, u64)> = blobs.iter().filter(|(d, _)| !marked.contains(d)).collect();
    Ok(Freed {
        blobs: garbage.len(),
        bytes: garbage.iter().map(|(_, s)| s).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Step;
    use crate::storage::{Manifest, RepoName, layout, media};

    fn d(n: u8) -> Digest {
        Digest::from_hex(&format!("{n:02x}").repeat(32)).unwrap()
    }

    fn repo(name: &str, manifests: &[(u8, Manifest)]) -> RepoSnapshot {
        let mut s = RepoSnapshot {
            name: Some(RepoName::parse(name).unwrap()),
            has_manifests: true,
            ..Default::default()
        };
        for (n, m) in manifests {
            s.revisions.insert(d(*n));
            s.manifests.insert(d(*n), Ok(m.clone()));
        }
        s
    }

    fn image(config: u8, layers: &[u8]) -> Manifest {
        Manifest {
            media_type: media::DOCKER_MANIFEST.into(),
            kind: ManifestKind::Image {
                config: Some(d(config)),
                layers: layers.iter().map(|l| d(*l)).collect(),
            },
            subject: None,
            size: 10,
        }
    }

    #[test]
    fn frees_what_only_removed_manifests_reference() {
        let a = repo("a", &[(10, image(1, &[2, 3])), (11, image(4, &[2]))]);
        let b = repo("b", &[(12, image(5, &[3]))]);
        let blobs: Vec<(Digest, u64)> = [1, 2, 3, 4, 5, 10, 11, 12, 99]
            .iter()
            .map(|n| (d(*n), u64::from(*n)))
            .collect();
        let name = RepoName::parse("a").unwrap();
        let plan = Plan {
            steps: vec![Step {
                action: Action::RemoveRevision,
                repo: Some(name.clone()),
                path: Some(layout::revision_dir(&name, &d(10))),
                expect: Some(d(10)),
                reason: String::new(),
            }],
            ..Plan::default()
        };
        // 10 (the manifest) and 1 (its config) go; 2 and 3 are used elsewhere; 99 was garbage.
        let f = freed_by(&[a.clone(), b.clone()], &blobs, &plan).unwrap();
        assert_eq!(
            f,
            Freed {
                blobs: 3,
                bytes: 10 + 1 + 99
            }
        );

        let mut broken = b;
        broken.manifests.insert(d(12), Err("not valid JSON".into()));
        assert!(freed_by(&[a, broken], &blobs, &plan).is_err());
    }
}
