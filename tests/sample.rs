//! The sample registry shipped in `examples/sample-registry/`: the ignored generator that rebuilds
//! it with the real registry, and a test that the committed tree is still served intact.

mod common;

use std::fs;

use common::*;

/// The pushes that make up the sample, in order: `(repository, tag, image)`.
fn sample_pushes() -> Vec<(&'static str, &'static str, Image)> {
    let v1_old = build_image(Format::Docker, &["sample-base", "sample-app-v1-old"]);
    let v1 = build_image(Format::Docker, &["sample-base", "sample-app-v1"]);
    let v2 = build_image(Format::Docker, &["sample-base", "sample-app-v2"]);
    let cli = build_image(Format::Oci, &["sample-base", "sample-cli"]);
    let multi = build_multi_platform(Format::Oci, "sample-multi");
    let web = build_multi_platform(Format::Docker, "sample-web");
    vec![
        ("demo/app", "v1", v1_old),
        ("demo/app", "v1", v1),
        ("demo/app", "v2", v2.clone()),
        ("demo/app", "latest", v2),
        ("demo/tools/cli", "1.0", cli),
        ("demo/multi", "1", multi),
        ("legacy/web", "stable", web),
    ]
}

/// The tags the sample ends up with and the image each points at (the last push wins).
fn sample_tags() -> Vec<(&'static str, &'static str, Image)> {
    let mut tags: Vec<(&str, &str, Image)> = Vec::new();
    for (repo, tag, image) in sample_pushes() {
        tags.retain(|(r, t, _)| !(*r == repo && *t == tag));
        tags.push((repo, tag, image));
    }
    tags
}

/// Rebuilds `examples/sample-registry/docker/` by pushing the sample to a real registry.
/// Run with `cargo test --test sample -- --ignored regenerate_sample`. The content is
/// deterministic, so regenerating without changing `sample_pushes` changes no file.
#[test]
#[ignore = "rewrites examples/sample-registry; run on purpose"]
fn regenerate_sample() {
    let mut reg = Registry::start();
    for (repo, tag, image) in sample_pushes() {
        reg.push(repo, tag, &image);
    }
    for (repo, tag, _) in sample_tags() {
        reg.pull_verify(repo, tag).unwrap();
    }
    reg.stop();

    let target = sample_registry_dir().join("docker");
    if target.exists() {
        fs::remove_dir_all(&target).expect("remove old sample tree");
    }
    // Git keeps no empty directories, so do not ship any (only emptied `_uploads/` are left).
    copy_tree_without_empty_dirs(&reg.root().join("docker"), &target);
    let size: u64 = walkdir::WalkDir::new(&target)
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    assert!(size < 512 * 1024, "sample grew to {size} bytes");
    eprintln!("wrote {} ({size} bytes)", target.display());
}

/// The committed sample, as a fresh checkout has it, is served by the real registry and every
/// tag pulls back with every blob intact and at the digest the generator pushed.
#[test]
fn shipped_sample_is_intact() {
    let reg = Registry::start_on_copy(&sample_registry_dir());
    let v2 = reg.v2();

    assert_eq!(
        repositories(&v2),
        ["demo/app", "demo/multi", "demo/tools/cli", "legacy/web"]
    );
    for (repo, tag, image) in sample_tags() {
        assert_eq!(tag_current(&v2, repo, tag), image.digest, "{repo}:{tag}");
        reg.pull_verify(repo, tag)
            .unwrap_or_else(|e| panic!("{repo}:{tag}: {e}"));
    }
    assert_eq!(tags(&v2, "demo/app"), ["latest", "v1", "v2"]);
    assert_eq!(
        tag_current(&v2, "demo/app", "latest"),
        tag_current(&v2, "demo/app", "v2")
    );

    // v1 was pushed twice: two digests in its history, the old one still pullable by digest.
    let history = tag_history(&v2, "demo/app", "v1");
    assert_eq!(history.len(), 2, "{history:?}");
    let current = tag_current(&v2, "demo/app", "v1");
    let old = history.iter().find(|d| **d != current).unwrap();
    reg.pull_verify("demo/app", old).unwrap();

    // demo/tools/cli shares the base layer with demo/app: one blob, linked from both.
    let base = build_layer("sample-base").digest;
    assert!(blob_path(&v2, &base).is_file());
    assert!(layer_links(&v2, "demo/app").contains(&base));
    assert!(layer_links(&v2, "demo/tools/cli").contains(&base));

    // Nothing but what the sample's images need is in the blob store.
    let needed: std::collections::BTreeSet<String> = sample_pushes()
        .iter()
        .flat_map(|(_, _, image)| image.blob_digests())
        .collect();
    assert_eq!(blobs_on_disk(&v2), needed);

    for (repo, tag, image) in sample_tags() {
        reg.skopeo_pull(repo, tag, !image.children.is_empty())
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
