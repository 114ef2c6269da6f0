//! Interruption: Ctrl-C during a run exits 130 and keeps the run's journal; the next run finishes
//! what the interrupted one had started, even after its tags are already gone.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn journal(v2: &Path) -> std::path::PathBuf {
    v2.join("docker-delete-journal.json")
}

/// Runs `docker-delete ... <reference>` with a restart command that takes long enough to be
/// interrupted, and sends SIGINT once the restart has begun. Returns the process output.
fn run_and_interrupt(reg: &Registry, dir: &TestDir, reference: &str) -> std::process::Output {
    let marker = dir.join("restart-begun");
    let restart_cmd = format!("touch '{}'; sleep 2", marker.display());
    let child = docker_delete_process()
        .args(["--no-container", "--registry-dir"])
        .arg(reg.root())
        .arg("--config")
        .arg(reg.config_path())
        .args(["--restart-cmd", &restart_cmd, "-y", reference])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn docker-delete");
    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the restart command never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    child.wait_with_output().expect("wait for docker-delete")
}

/// Rewrites the journal's progress as if the run had been interrupted right after its steps of
/// the given actions (e.g. `["remove-tag"]`), to reproduce an earlier interruption exactly.
fn set_progress(v2: &Path, done_actions: &[&str]) {
    let text = fs::read_to_string(journal(v2)).unwrap();
    let first = text.lines().next().unwrap().to_string();
    let plan: serde_json::Value = serde_json::from_str(&first).unwrap();
    let mut out = first.clone();
    out.push('\n');
    for (i, step) in plan["steps"].as_array().unwrap().iter().enumerate() {
        if done_actions.contains(&step["action"].as_str().unwrap()) {
            out.push_str(&format!("{i}\n"));
        }
    }
    fs::write(journal(v2), out).unwrap();
}

/// `docker-delete --no-container --registry-dir ROOT --config CFG --no-restart -y ARGS...`:
/// returns the exit code and stderr.
fn rerun(reg: &Registry, args: &[&str]) -> (Option<i32>, String) {
    let out = docker_delete()
        .args(["--no-container", "--registry-dir"])
        .arg(reg.root())
        .arg("--config")
        .arg(reg.config_path())
        .args(["--no-restart", "-y"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn only_in(a: &Image, b: &Image) -> BTreeSet<String> {
    a.blob_digests()
        .difference(&b.blob_digests())
        .cloned()
        .collect()
}

#[test]
fn ctrl_c_exits_130_keeps_the_journal_and_the_next_run_finishes() {
    let mut reg = Registry::start();
    let keep = build_image(Format::Docker, &["resume-base", "resume-keep"]);
    let gone = build_image(Format::Docker, &["resume-base", "resume-gone"]);
    reg.push("app", "keep", &keep);
    reg.push("app", "gone", &gone);
    let v2 = reg.v2();
    let dir = TestDir::new();

    let out = run_and_interrupt(&reg, &dir, "app:gone");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "stderr:\n{stderr}");
    assert!(stderr.contains("interrupted"), "stderr:\n{stderr}");
    assert!(
        journal(&v2).is_file(),
        "an interrupted run keeps its journal"
    );
    assert!(!tag_path(&v2, "app", "gone").exists());

    // Every step had run (the interruption came during the restart), and the journal says so.
    let recorded = fs::read_to_string(journal(&v2)).unwrap();
    assert!(
        recorded.lines().count() > 3,
        "progress recorded:\n{recorded}"
    );
    // Put back the revision and layer links, as if the interruption had come right after the
    // tag was removed: only the journal still knows they were meant to go.
    set_progress(&v2, &["remove-tag"]);
    let gone_manifest = gone.digest.clone();
    let rev = revision_link_path(&v2, "app", &gone_manifest);
    fs::create_dir_all(rev.parent().unwrap()).unwrap();
    fs::write(&rev, &gone_manifest).unwrap();
    let unique = only_in(&gone, &keep);
    // The blobs were collected by the interrupted run; push the image by digest again so that
    // the links point at real blobs, then remove its tag as the interrupted run had.
    reg.restart();
    reg.push_untagged("app", &gone);
    for d in &unique {
        assert!(
            blob_path(&v2, d).is_file(),
            "blob {d} is back for the re-run"
        );
    }

    // The same command again: the tag is gone, the journal finishes the job.
    let (code, stderr) = rerun(&reg, &["app:gone"]);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("an earlier run was interrupted"),
        "stderr:\n{stderr}"
    );
    assert!(!journal(&v2).exists(), "the journal is removed once done");
    assert!(!rev.exists(), "the revision link the journal named is gone");
    for d in &unique {
        assert!(
            !layer_link_path(&v2, "app", d).exists(),
            "layer link {d} is gone"
        );
        assert!(!blob_path(&v2, d).exists(), "blob {d} was collected");
    }

    reg.restart();
    assert_eq!(reg.status_manifest("app", "gone"), 404);
    assert_eq!(reg.status_manifest("app", &gone_manifest), 404);
    reg.pull_verify("app", "keep")
        .expect("the other tag still pulls");
}

#[test]
fn unreadable_journal_refuses_and_changes_nothing() {
    let reg = Registry::start();
    let img = build_image(Format::Oci, &["journal-bad"]);
    reg.push("app", "v1", &img);
    let v2 = reg.v2();
    fs::write(journal(&v2), b"{ not json").unwrap();
    let before = snapshot(reg.root());
    let out = docker_delete()
        .args(["--no-container", "--registry-dir"])
        .arg(reg.root())
        .args(["--no-gc", "--no-restart", "-y", "app:v1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("docker-delete-journal.json"),
        "names the file: {stderr}"
    );
    before.assert_unchanged(&snapshot(reg.root()));
}

/// An interrupted run's journal is planned again against the tree as it is: an image pushed
/// again since (under another tag) is not touched by the next, unrelated, run.
#[test]
fn a_journal_never_deletes_what_was_pushed_after_the_interruption() {
    let mut reg = Registry::start();
    let victim = build_image(Format::Oci, &["journal-victim"]);
    let other = build_image(Format::Oci, &["journal-other"]);
    reg.push("victim", "a", &victim);
    reg.push("other", "1", &other);
    let v2 = reg.v2();
    let dir = TestDir::new();

    let out = run_and_interrupt(&reg, &dir, "victim:a");
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(journal(&v2).is_file());

    // The user changes their mind: the same image goes back in under another tag.
    reg.restart();
    reg.push("victim", "b", &victim);
    reg.pull_verify("victim", "b").expect("pushed again");

    let (code, stderr) = rerun(&reg, &["other:1"]);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert!(!journal(&v2).exists());

    reg.restart();
    assert_eq!(reg.status_manifest("other", "1"), 404);
    reg.pull_verify("victim", "b").unwrap_or_else(|e| {
        panic!("the image pushed after the interruption was damaged: {e}\n{stderr}")
    });
    reg.skopeo_pull("victim", "b", false).unwrap();
}

/// Interrupted after the revision link went but before the layer links did: the next run still
/// removes the layer links (reading the manifest the revision no longer names).
#[test]
fn journal_finishes_layer_links_after_the_revision_was_removed() {
    let mut reg = Registry::start();
    let keep = build_image(Format::Docker, &["late-base", "late-keep"]);
    let gone = build_image(Format::Docker, &["late-base", "late-gone"]);
    reg.push("app", "keep", &keep);
    reg.push("app", "gone", &gone);
    let v2 = reg.v2();
    let dir = TestDir::new();

    let out = run_and_interrupt(&reg, &dir, "app:gone");
    assert_eq!(out.status.code(), Some(130));
    assert!(journal(&v2).is_file());

    // Bring back the blobs and layer links, but not the revision link or the tag: the state an
    // interruption between the revision step and the layer-link steps leaves.
    set_progress(&v2, &["remove-tag", "remove-revision"]);
    reg.restart();
    reg.push_untagged("app", &gone);
    fs::remove_dir_all(
        revision_link_path(&v2, "app", &gone.digest)
            .parent()
            .unwrap(),
    )
    .unwrap();
    let linked = |i: &Image| -> BTreeSet<String> {
        i.layer_digests()
            .into_iter()
            .chain(i.config_digest().map(str::to_string))
            .collect()
    };
    let unique: BTreeSet<String> = linked(&gone).difference(&linked(&keep)).cloned().collect();
    assert!(!unique.is_empty());
    for d in &unique {
        assert!(layer_link_path(&v2, "app", d).is_file());
    }

    let (code, stderr) = rerun(&reg, &["gc"]);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    for d in &unique {
        assert!(
            !layer_link_path(&v2, "app", d).exists(),
            "layer link {d} left behind:\n{stderr}"
        );
        assert!(!blob_path(&v2, d).exists(), "blob {d} not collected");
    }
    reg.restart();
    reg.pull_verify("app", "keep").unwrap();
}

/// A tag the interrupted run had removed, pushed again with the same content before the next
/// run: the journal records that its removal was done, so the next run leaves the new push alone.
#[test]
fn a_tag_pushed_again_after_the_interruption_is_not_deleted_again() {
    let mut reg = Registry::start();
    let img = build_image(Format::Docker, &["again-app"]);
    let other = build_image(Format::Docker, &["again-other"]);
    reg.push("app", "v2", &img);
    reg.push("other", "1", &other);
    let v2 = reg.v2();
    let dir = TestDir::new();
    let out = run_and_interrupt(&reg, &dir, "app:v2");
    assert_eq!(out.status.code(), Some(130));
    assert!(journal(&v2).is_file());
    // As if interrupted right after the tag went; then the same image is pushed again.
    set_progress(&v2, &["remove-tag"]);
    reg.restart();
    reg.push("app", "v2", &img);

    for args in [&["other:1"][..], &["gc"][..]] {
        let (code, stderr) = rerun(&reg, args);
        assert_eq!(code, Some(0), "{args:?}:\n{stderr}");
        reg.restart();
        reg.pull_verify("app", "v2").unwrap_or_else(|e| {
            panic!("app:v2 pushed again was damaged by {args:?}: {e}\n{stderr}")
        });
    }
    assert_eq!(reg.status_manifest("other", "1"), 404);
}

/// Interrupted after the tree changed but before the restart (here: during collection), the run
/// still restarts the registry before it exits, so its cache stops claiming unlinked layers.
#[test]
fn an_interrupted_run_that_changed_the_tree_still_restarts_the_registry() {
    let reg = Registry::start();
    reg.push("app", "v1", &build_image(Format::Oci, &["intr-gc-one"]));
    reg.push("app", "v2", &build_image(Format::Oci, &["intr-gc-two"]));
    let dir = TestDir::new();
    let (gc_begun, restarted) = (dir.join("gc-begun"), dir.join("restarted"));
    // A collector that takes long enough to be interrupted, then does the real work.
    let slow_gc = dir.join("slow-registry");
    fs::write(
        &slow_gc,
        format!(
            "#!/bin/sh\ntouch '{}'\nsleep 2\nexec '{}' \"$@\"\n",
            gc_begun.display(),
            registry_binary().display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&slow_gc)
        .status()
        .unwrap();
    let child = docker_delete_process()
        .args(["--no-container", "--registry-dir"])
        .arg(reg.root())
        .arg("--config")
        .arg(reg.config_path())
        .arg("--registry-bin")
        .arg(&slow_gc)
        .arg("--restart-cmd")
        .arg(format!("touch '{}'", restarted.display()))
        .args(["-y", "app:v1"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !gc_begun.exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "GC never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        restarted.exists(),
        "the registry was not restarted:\n{stderr}"
    );
    assert!(!stderr.contains("verified"), "{stderr}");
}
