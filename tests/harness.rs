//! Proves the test environment in `tests/common` against the real registry: what a push writes to
//! the tree, that pull-back verification passes on good images and fails on damaged ones, that
//! `skopeo` agrees, and the registry's cache behaviour after garbage collection.

mod common;

use std::fs;
use std::io::Read;

use common::*;

/// Asserts that everything `image` needs is on disk and linked from `repo`.
fn assert_stored(reg: &Registry, repo: &str, image: &Image) {
    let v2 = reg.v2();
    for digest in image.blob_digests() {
        assert!(
            blob_path(&v2, &digest).is_file(),
            "{repo}: blob {digest} missing"
        );
    }
    for digest in image.manifest_digests() {
        assert_eq!(read_link(&revision_link_path(&v2, repo, &digest)), digest);
    }
    let mut single = vec![image];
    single.extend(&image.children);
    for img in single {
        for blob in img.config.iter().chain(&img.layers) {
            let link = layer_link_path(&v2, repo, &blob.digest);
            assert_eq!(read_link(&link), blob.digest, "{repo}: layer link");
        }
    }
}

fn verify_both_clients(reg: &Registry, repo: &str, reference: &str, all: bool) {
    reg.pull_verify(repo, reference)
        .unwrap_or_else(|e| panic!("pull_verify {repo}:{reference}: {e}"));
    reg.skopeo_pull(repo, reference, all)
        .unwrap_or_else(|e| panic!("skopeo {repo}:{reference}: {e}"));
}

#[test]
fn layers_are_deterministic_real_gzipped_tars() {
    let a = build_layer("base");
    let b = build_layer("base");
    assert_eq!(a.gz, b.gz, "same seed, same bytes");
    assert_ne!(a.digest, build_layer("other").digest);
    assert_eq!(a.digest, sha256_digest(&a.gz));
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(a.gz.as_slice())
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(a.diff_id, sha256_digest(&tar));
    let mut archive = tar::Archive::new(tar.as_slice());
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    assert_eq!(names, ["seed/base.txt", "seed/base.bin"]);
    assert!(
        (2048..8192).contains(&a.gz.len()),
        "a few KB: {}",
        a.gz.len()
    );

    let img = build_image(Format::Docker, &["base", "app"]);
    let config: serde_json::Value =
        serde_json::from_slice(&img.config.as_ref().unwrap().bytes).unwrap();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["os"], "linux");
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([a.diff_id, build_layer("app").diff_id])
    );
    assert_eq!(img.blob_digests().len(), 4, "manifest, config, two layers");
}

#[test]
fn upload_location_forms_are_handled() {
    let base = "http://127.0.0.1:5000";
    assert_eq!(
        upload_url(base, "/v2/a/blobs/uploads/u", "digest=sha256:1"),
        "http://127.0.0.1:5000/v2/a/blobs/uploads/u?digest=sha256:1"
    );
    assert_eq!(
        upload_url(base, "http://h:1/v2/a/blobs/uploads/u?_state=x", "digest=d"),
        "http://h:1/v2/a/blobs/uploads/u?_state=x&digest=d"
    );
}

#[test]
fn multi_layer_images_push_and_pull_in_both_formats() {
    let reg = Registry::start();
    let docker = build_image(Format::Docker, &["base", "libs", "app"]);
    let oci = build_image(Format::Oci, &["base", "oci-app"]);
    reg.push("demo/docker", "v1", &docker);
    reg.push("demo/oci", "v1", &oci);

    for (repo, img) in [("demo/docker", &docker), ("demo/oci", &oci)] {
        assert_stored(&reg, repo, img);
        assert_eq!(tag_current(&reg.v2(), repo, "v1"), img.digest);
        assert_eq!(tag_history(&reg.v2(), repo, "v1"), vec![img.digest.clone()]);
        verify_both_clients(&reg, repo, "v1", false);
        verify_both_clients(&reg, repo, &img.digest, false);
    }
    // The shared "base" layer is one file on disk, linked from both repositories.
    let base = build_layer("base").digest;
    assert!(blob_path(&reg.v2(), &base).is_file());
    let expected: std::collections::BTreeSet<String> = docker
        .blob_digests()
        .union(&oci.blob_digests())
        .cloned()
        .collect();
    assert_eq!(blobs_on_disk(&reg.v2()), expected);
    assert_eq!(repositories(&reg.v2()), ["demo/docker", "demo/oci"]);
}

#[test]
fn pull_verify_fails_on_damaged_or_missing_blobs() {
    let reg = Registry::start();
    let img = build_image(Format::Docker, &["base", "app"]);
    reg.push("demo/app", "v1", &img);
    reg.pull_verify("demo/app", "v1").unwrap();

    assert!(reg.pull_verify("demo/app", "nope").is_err());
    assert_eq!(reg.status_manifest("demo/app", "nope"), 404);
    assert!(reg.pull_verify("demo/nothing", "v1").is_err());

    // Same length, different content: only a hash check notices.
    let layer = blob_path(&reg.v2(), &img.layers[1].digest);
    let mut bytes = fs::read(&layer).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&layer, &bytes).unwrap();
    let err = reg.pull_verify("demo/app", "v1").unwrap_err();
    assert!(err.contains("hashes to"), "{err}");
    assert!(reg.skopeo_pull("demo/app", "v1", false).is_err());

    // Gone from disk: the running registry still believes in it (in-memory descriptor cache),
    // answers HEAD 200 and breaks off the GET; after a restart it is a plain 404.
    fs::remove_dir_all(layer.parent().unwrap()).unwrap();
    assert_eq!(reg.status_blob("demo/app", &img.layers[1].digest), 200);
    assert!(reg.pull_verify("demo/app", "v1").is_err());
    let mut reg = reg;
    reg.restart();
    assert_eq!(reg.status_blob("demo/app", &img.layers[1].digest), 404);
    let err = reg.pull_verify("demo/app", "v1").unwrap_err();
    assert!(err.contains("404"), "{err}");
}

#[test]
fn two_tags_on_one_digest() {
    let reg = Registry::start();
    let img = build_image(Format::Docker, &["base", "two-tags"]);
    reg.push("demo/app", "v2", &img);
    reg.push("demo/app", "latest", &img);
    let v2 = reg.v2();
    assert_eq!(tags(&v2, "demo/app"), ["latest", "v2"]);
    assert_eq!(tag_current(&v2, "demo/app", "v2"), img.digest);
    assert_eq!(tag_current(&v2, "demo/app", "latest"), img.digest);
    assert_eq!(revisions(&v2, "demo/app"), vec![img.digest.clone()]);
    verify_both_clients(&reg, "demo/app", "v2", false);
    verify_both_clients(&reg, "demo/app", "latest", false);
}

#[test]
fn nested_repository_names() {
    let reg = Registry::start();
    let img = build_image(Format::Oci, &["base", "nested"]);
    for repo in ["team/app", "a/b/c", "a/b"] {
        reg.push(repo, "1.0", &img);
    }
    assert_eq!(repositories(&reg.v2()), ["a/b", "a/b/c", "team/app"]);
    assert!(repo_path(&reg.v2(), "a/b/c").join("_manifests").is_dir());
    for repo in ["team/app", "a/b/c", "a/b"] {
        assert_stored(&reg, repo, &img);
        verify_both_clients(&reg, repo, "1.0", false);
    }
    // One set of blobs for three repositories.
    assert_eq!(blobs_on_disk(&reg.v2()), img.blob_digests());
}

#[test]
fn retagging_keeps_the_old_digest_in_the_tag_history() {
    let reg = Registry::start();
    let old = build_image(Format::Docker, &["base", "v1-first"]);
    let new = build_image(Format::Docker, &["base", "v1-second"]);
    reg.push("demo/app", "v1", &old);
    reg.push("demo/app", "v1", &new);
    let v2 = reg.v2();
    let mut both = vec![old.digest.clone(), new.digest.clone()];
    both.sort();
    assert_eq!(tag_history(&v2, "demo/app", "v1"), both);
    assert_eq!(tag_current(&v2, "demo/app", "v1"), new.digest);
    assert_eq!(revisions(&v2, "demo/app"), both);
    // The tag serves the new image; the old one stays pullable by digest.
    let (digest, _, _) = get_manifest(&reg.url(), "demo/app", "v1").unwrap();
    assert_eq!(digest, new.digest);
    verify_both_clients(&reg, "demo/app", "v1", false);
    verify_both_clients(&reg, "demo/app", &old.digest, false);
}

#[test]
fn multi_platform_images_in_both_formats() {
    let reg = Registry::start();
    for (repo, format, media_type) in [
        ("demo/multi", Format::Oci, OCI_INDEX),
        ("legacy/web", Format::Docker, DOCKER_MANIFEST_LIST),
    ] {
        let index = build_multi_platform(format, repo);
        assert_eq!(index.media_type, media_type);
        assert_eq!(index.children.len(), 2);
        reg.push(repo, "1", &index);
        assert_stored(&reg, repo, &index);
        let v2 = reg.v2();
        // Only the index is tagged; the children have revision links only.
        assert_eq!(tags(&v2, repo), ["1"]);
        assert_eq!(tag_current(&v2, repo, "1"), index.digest);
        let mut revs: Vec<String> = index.manifest_digests().into_iter().collect();
        revs.sort();
        assert_eq!(revisions(&v2, repo), revs);
        let (_, content_type, _) = get_manifest(&reg.url(), repo, "1").unwrap();
        assert_eq!(content_type, media_type);
        reg.pull_verify(repo, "1").unwrap();
        for child in &index.children {
            reg.pull_verify(repo, &child.digest).unwrap();
        }
        reg.skopeo_pull(repo, "1", true)
            .unwrap_or_else(|e| panic!("{e}"));
        reg.skopeo_pull(repo, "1", false)
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn referrer_is_stored_by_digest_with_its_subject() {
    let reg = Registry::start();
    let img = build_image(Format::Oci, &["base", "signed"]);
    let sig = build_referrer(&img, "sig-1");
    reg.push("demo/signed", "v1", &img);
    reg.push_untagged("demo/signed", &sig);
    assert_stored(&reg, "demo/signed", &sig);
    let v2 = reg.v2();
    assert_eq!(tags(&v2, "demo/signed"), ["v1"]);
    assert!(revisions(&v2, "demo/signed").contains(&sig.digest));
    let (_, _, body) = get_manifest(&reg.url(), "demo/signed", &sig.digest).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(manifest["subject"]["digest"], img.digest.as_str());
    assert_eq!(manifest["artifactType"], SIGNATURE_ARTIFACT);
    reg.pull_verify("demo/signed", &sig.digest).unwrap();
    reg.pull_verify("demo/signed", "v1").unwrap();
}

#[test]
fn cross_repository_mount_links_the_existing_blob() {
    let reg = Registry::start();
    let img = build_image(Format::Docker, &["base", "mount"]);
    reg.push("demo/app", "v1", &img);
    let base = img.layers[0].digest.clone();
    assert_eq!(
        mount_blob(&reg.url(), "demo/tools/cli", "demo/app", &base).unwrap(),
        201
    );
    assert_eq!(
        read_link(&layer_link_path(&reg.v2(), "demo/tools/cli", &base)),
        base
    );
    assert_eq!(reg.status_blob("demo/tools/cli", &base), 200);
    // A push after the mount skips that layer, as Docker does.
    let report = push_image(&reg.url(), "demo/tools/cli", Some("1.0"), &img).unwrap();
    assert!(report.skipped.contains(&base), "{report:?}");
    reg.pull_verify("demo/tools/cli", "1.0").unwrap();
    assert_eq!(blobs_on_disk(&reg.v2()), img.blob_digests());
    // No upload was left behind.
    for repo in ["demo/app", "demo/tools/cli"] {
        let uploads = repo_path(&reg.v2(), repo).join("_uploads");
        assert!(
            !uploads.exists() || fs::read_dir(&uploads).unwrap().next().is_none(),
            "{repo}: leftover upload"
        );
    }
}

#[test]
fn pulling_does_not_change_the_tree_and_everything_survives_restart() {
    let mut reg = Registry::start();
    let single = build_image(Format::Docker, &["base", "restart"]);
    let index = build_multi_platform(Format::Oci, "restart-multi");
    let sig = build_referrer(&single, "restart-sig");
    reg.push("demo/app", "v1", &single);
    reg.push("demo/multi", "1", &index);
    reg.push_untagged("demo/app", &sig);

    let before = snapshot(reg.root());
    reg.pull_verify("demo/app", "v1").unwrap();
    reg.pull_verify("demo/multi", "1").unwrap();
    snapshot(reg.root()).assert_unchanged(&before);

    let port = reg.port();
    reg.restart();
    assert_eq!(reg.port(), port);
    verify_both_clients(&reg, "demo/app", "v1", false);
    verify_both_clients(&reg, "demo/multi", "1", true);
    reg.pull_verify("demo/app", &sig.digest).unwrap();

    reg.stop();
    assert!(!reg.is_running());
    assert!(reg.pull_verify("demo/app", "v1").is_err());
    reg.restart();
    reg.pull_verify("demo/app", "v1").unwrap();
    snapshot(reg.root()).assert_unchanged(&before);
}

#[test]
fn snapshot_diff_reports_changes() {
    let dir = TestDir::new();
    fs::create_dir_all(dir.join("a/b")).unwrap();
    fs::create_dir_all(dir.join("a/empty")).unwrap();
    fs::write(dir.join("a/b/link"), "sha256:00").unwrap();
    let before = snapshot(dir.path());
    assert_eq!(
        empty_dirs(dir.path()),
        [std::path::PathBuf::from("a/empty")]
    );
    fs::write(dir.join("a/b/link"), "sha256:11").unwrap();
    fs::remove_dir(dir.join("a/empty")).unwrap();
    fs::write(dir.join("a/new"), "x").unwrap();
    let diff = before.diff(&snapshot(dir.path()));
    assert_eq!(diff.len(), 3, "{diff:?}");
    assert!(diff[0].starts_with("~ a/b/link"), "{diff:?}");
    assert!(diff[1].starts_with("- a/empty"), "{diff:?}");
    assert!(diff[2].starts_with("+ a/new"), "{diff:?}");
    assert!(empty_dirs(dir.path()).is_empty());
}

#[test]
fn a_copied_tree_without_empty_dirs_is_served() {
    let img = build_image(Format::Docker, &["base", "copy"]);
    let index = build_multi_platform(Format::Docker, "copy-multi");
    let reg = Registry::start();
    reg.push("team/app", "v1", &img);
    reg.push("legacy/web", "stable", &index);
    // A finished push leaves only the emptied `_uploads/` behind; git would drop those.
    let empties = empty_dirs(reg.root());
    assert!(
        !empties.is_empty() && empties.iter().all(|p| p.ends_with("_uploads")),
        "empty dirs after a push: {empties:?}"
    );
    let copy = TestDir::new();
    copy_tree_without_empty_dirs(reg.root(), copy.path());
    drop(reg);
    assert!(empty_dirs(copy.path()).is_empty());
    let served = Registry::start_on(copy.path());
    verify_both_clients(&served, "team/app", "v1", false);
    verify_both_clients(&served, "legacy/web", "stable", true);
}

/// The premise of the restart-after-GC rule (registry-storage.md, "Cache"): after garbage
/// collection removes a blob, a running registry with the in-memory blob descriptor cache still
/// claims to have it, so a re-push skips the upload and the image is broken after a restart.
#[test]
fn stale_cache_after_gc_corrupts_a_repushed_image_until_restart() {
    let mut reg = Registry::start();
    let repo = "demo/stale";
    let img = build_image(Format::Docker, &["stale-base", "stale-app"]);
    reg.push(repo, "v1", &img);
    let v2 = reg.v2();

    // Delete the image by hand, as a tree-editing tool does, then collect garbage.
    fs::remove_dir_all(tag_path(&v2, repo, "v1")).unwrap();
    fs::remove_dir_all(revision_link_path(&v2, repo, &img.digest).parent().unwrap()).unwrap();
    for blob in img.config.iter().chain(&img.layers) {
        fs::remove_dir_all(layer_link_path(&v2, repo, &blob.digest).parent().unwrap()).unwrap();
    }
    let gc = reg.garbage_collect_ok(&[]);
    for digest in img.blob_digests() {
        assert!(!blob_path(&v2, &digest).exists(), "GC kept {digest}:\n{gc}");
    }

    // Without a restart the registry still answers from its cache.
    let layer = img.layers[1].digest.clone();
    assert_eq!(reg.status_blob(repo, &layer), 200, "cache claims the blob");
    let report = push_image(&reg.url(), repo, Some("v1"), &img).expect("re-push accepted");
    assert!(
        report.uploaded.is_empty(),
        "nothing re-uploaded: {report:?}"
    );
    assert_eq!(report.manifests, [("v1".to_string(), img.digest.clone())]);
    assert!(!blob_path(&v2, &layer).exists(), "layer is still gone");

    reg.restart();
    assert_eq!(reg.status_blob(repo, &layer), 404, "after restart: gone");
    assert!(reg.pull_verify(repo, "v1").is_err());

    // With a restart between GC and the re-push, the push uploads the blobs and works.
    let mut fresh = Registry::start();
    fresh.push(repo, "v1", &img);
    let v2 = fresh.v2();
    fs::remove_dir_all(repo_path(&v2, repo)).unwrap();
    fresh.garbage_collect_ok(&[]);
    fresh.restart();
    assert_eq!(fresh.status_blob(repo, &layer), 404);
    let report = push_image(&fresh.url(), repo, Some("v1"), &img).unwrap();
    assert_eq!(report.uploaded.len(), 3, "{report:?}");
    fresh.restart();
    fresh.pull_verify(repo, "v1").unwrap();
}
