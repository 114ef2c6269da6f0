//! End to end with the registry in a real container: the registry image built from Debian's
//! binary runs with its storage bind-mounted (or in a named volume) and its port published on
//! loopback; real images are pushed through that port; then the `docker-delete` binary runs
//! against it and the result is checked on disk, over HTTP, with `skopeo`, and on the container.
//!
//! Tests that rely on "the only running registry container" take the exclusive lock of
//! `common::container`; every other test that runs a registry container holds it shared.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::container::{
    self as ct, REGISTRY2_CONFIG, REGISTRY3_CONFIG, RegistryContainer, RunOptions, Storage,
    build_busybox_image, build_registry_image, docker, docker_available, docker_ok, exclusive_lock,
    http_status, shared_lock, unique_name, write_orphan_blob,
};
use common::{
    Format, Image, TreeSnapshot, blob_path, blobs_on_disk, build_image, build_layer,
    build_multi_platform, docker_delete, docker_delete_process, empty_dirs, layer_link_path,
    pull_verify, push_image, revision_link_path, skopeo_pull, snapshot, status_blob,
    status_manifest, tags,
};

macro_rules! require_docker {
    () => {
        if !docker_available() {
            return;
        }
    };
}

// ---------------------------------------------------------------------------------------------
// A registry container with a few real images in it
// ---------------------------------------------------------------------------------------------

/// The images every scenario pushes: `app:v1` (deleted by most tests), `app:v2` sharing the
/// `base` layer with it, `other:1` (OCI) sharing `base` too, `multi:1` (two-platform OCI index).
struct Images {
    v1: Image,
    v2: Image,
    other: Image,
    multi: Image,
}

impl Images {
    fn new() -> Self {
        Self {
            v1: build_image(Format::Docker, &["base", "app-v1"]),
            v2: build_image(Format::Docker, &["base", "app-v2"]),
            other: build_image(Format::Oci, &["base", "other"]),
            multi: build_multi_platform(Format::Oci, "multi"),
        }
    }

    /// Every `(repo, tag, image, all platforms)` that stays after `app:v1` is deleted.
    fn kept(&self) -> Vec<(&'static str, &'static str, &Image, bool)> {
        vec![
            ("app", "v2", &self.v2, false),
            ("other", "1", &self.other, false),
            ("multi", "1", &self.multi, true),
        ]
    }

    /// The blobs the kept images need.
    fn kept_blobs(&self) -> BTreeSet<String> {
        self.kept()
            .iter()
            .flat_map(|(_, _, img, _)| img.blob_digests())
            .collect()
    }

    /// The blobs only `app:v1` used: what deleting it must free.
    fn v1_only_blobs(&self) -> BTreeSet<String> {
        self.v1
            .blob_digests()
            .difference(&self.kept_blobs())
            .cloned()
            .collect()
    }
}

/// A running registry container with the [`Images`] pushed through its published port.
struct Scene {
    reg: RegistryContainer,
    images: Images,
    /// `http://127.0.0.1:<port>`.
    url: String,
    /// The host directory holding `docker/registry/v2`.
    root: PathBuf,
}

impl Scene {
    fn start(image: &ct::Image, storage: Storage) -> Self {
        Self::run(image, RunOptions::new(storage))
    }

    fn run(image: &ct::Image, opts: RunOptions) -> Self {
        let reg = RegistryContainer::run(image, opts);
        let url = reg.endpoint().expect("published port");
        let root = reg.host_storage().expect("storage on the host");
        let images = Images::new();
        let scene = Self {
            reg,
            images,
            url,
            root,
        };
        scene.push("app", "v1", &scene.images.v1);
        scene.push("app", "v2", &scene.images.v2);
        scene.push("other", "1", &scene.images.other);
        scene.push("multi", "1", &scene.images.multi);
        // Everything is there and pulls before anything is deleted.
        scene.assert_pulls("app", "v1", false);
        for (repo, tag, _, all) in scene.images.kept() {
            scene.assert_pulls(repo, tag, all);
        }
        scene
    }

    fn push(&self, repo: &str, tag: &str, img: &Image) -> common::PushReport {
        push_image(&self.url, repo, Some(tag), img).unwrap_or_else(|e| {
            panic!(
                "push {repo}:{tag} to {}: {e}\n{}",
                self.reg.name,
                self.logs()
            )
        })
    }

    fn v2(&self) -> PathBuf {
        self.root.join("docker/registry/v2")
    }

    /// `127.0.0.1:<port>` for skopeo.
    fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", "--tail", "40", &self.reg.name]);
        format!(
            "container logs:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn started_at(&self) -> String {
        self.reg.inspect("{{.State.StartedAt}}")
    }

    fn assert_pulls(&self, repo: &str, tag: &str, all: bool) {
        pull_verify(&self.url, repo, tag)
            .unwrap_or_else(|e| panic!("pull_verify {repo}:{tag}: {e}\n{}", self.logs()));
        skopeo_pull(&self.addr(), repo, tag, all)
            .unwrap_or_else(|e| panic!("skopeo {repo}:{tag}: {e}"));
    }

    /// Everything that must hold after `app:v1` was deleted, collected and the registry restarted.
    fn assert_v1_deleted(&self) {
        let imgs = &self.images;
        let v2 = self.v2();
        assert_eq!(status_manifest(&self.url, "app", "v1"), 404, "app:v1");
        assert_eq!(
            status_manifest(&self.url, "app", &imgs.v1.digest),
            404,
            "app@v1 digest"
        );
        let v1_layer = build_layer("app-v1").digest;
        assert_eq!(status_blob(&self.url, "app", &v1_layer), 404, "v1 layer");
        for (repo, tag, _, all) in imgs.kept() {
            self.assert_pulls(repo, tag, all);
        }
        // On disk: exactly what the kept images need; the shared layer stays.
        assert_eq!(blobs_on_disk(&v2), imgs.kept_blobs());
        for d in imgs.v1_only_blobs() {
            assert!(!blob_path(&v2, &d).exists(), "v1 blob {d} still on disk");
        }
        assert!(blob_path(&v2, &build_layer("base").digest).is_file());
        assert_eq!(tags(&v2, "app"), ["v2"]);
        assert!(!revision_link_path(&v2, "app", &imgs.v1.digest).exists());
        assert!(!layer_link_path(&v2, "app", &v1_layer).exists());
        let empty = empty_dirs(&v2.join("blobs"));
        assert!(empty.is_empty(), "empty dirs under blobs/: {empty:?}");
    }

    /// `docker-delete` with `--container <name>` already given.
    fn cmd(&self) -> assert_cmd::Command {
        let mut c = docker_delete();
        c.args(["--container", &self.reg.name]);
        c
    }
}

/// What a run of the binary gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.took, self.stdout, self.stderr
        )
    }
}

fn run(mut cmd: assert_cmd::Command) -> Run {
    let t = Instant::now();
    let out = cmd.output().expect("run docker-delete");
    let r = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: t.elapsed(),
    };
    eprintln!("docker-delete: {r}");
    r
}

/// The success lines every complete delete-collect-restart run prints.
fn assert_full_run(r: &Run, deleted_blobs: usize) {
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("removed tag app:v1"), "{r}");
    assert!(
        r.stderr.contains(&format!(
            "garbage-collected: {deleted_blobs} blob(s) deleted"
        )),
        "{r}"
    );
    assert!(r.stderr.contains("removed empty blob dirs"), "{r}");
    assert!(r.stderr.contains("verified: "), "{r}");
    assert!(r.stderr.contains("deleted reference(s) answer 404"), "{r}");
    assert!(r.stderr.contains("done: deleted 1 tag"), "{r}");
    assert!(!r.stderr.contains("error:"), "{r}");
}

/// A dry run's header names the storage root (compared as a path: the tool prints a bind or
/// volume root with a trailing `/`) and the container with its image.
fn assert_plan_header(r: &Run, s: &Scene) {
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("Plan for app:v1 in "))
        .unwrap_or_else(|| panic!("no plan header in:\n{r}"));
    let container = format!(" (container {} ({})):", s.reg.name, s.reg.image().tag());
    let root = line
        .strip_prefix("Plan for app:v1 in ")
        .and_then(|l| l.strip_suffix(&container))
        .unwrap_or_else(|| panic!("`{container}` does not end the header:\n{r}"));
    assert_eq!(std::path::Path::new(root), s.root, "{r}");
}

/// Runs a discovery-dependent command until no registry container of another process is
/// running (the machine's Docker engine is shared with whatever else runs here). `None` means
/// foreign registries never went away: the caller skips.
fn run_without_foreign_registries(
    make: impl Fn() -> assert_cmd::Command,
    mine: &[&str],
) -> Option<Run> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = run(make());
        let ambiguous = r.stderr.contains("running containers look like registries");
        let foreign: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| l.starts_with("  ") && l.contains("(id "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| !mine.contains(n))
            .collect();
        if !ambiguous || foreign.is_empty() {
            return Some(r);
        }
        if Instant::now() >= deadline {
            eprintln!("skipping: other registry containers keep running here: {foreign:?}");
            return None;
        }
        eprintln!("other registry containers run here ({foreign:?}); waiting");
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn tree_of(scene: &Scene) -> TreeSnapshot {
    snapshot(&scene.root)
}

// ---------------------------------------------------------------------------------------------
// Deleting through the container
// ---------------------------------------------------------------------------------------------

#[test]
fn discovers_the_registry_with_no_environment_and_deletes() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let busybox = build_busybox_image();
    let _lock = exclusive_lock();
    // Neither a stopped registry nor a running non-registry container counts.
    let stopped = RegistryContainer::start(&image, Storage::Inside);
    docker_ok(&["stop", "-t", "10", &stopped.name]);
    let _sleeper = RegistryContainer::sleeper(&busybox);
    let s = Scene::start(&image, Storage::BindMount);
    let before = s.started_at();
    let tree = tree_of(&s);
    // A dry run shows what was found: the container and the directory it mounts.
    let Some(r) = run_without_foreign_registries(
        || {
            let mut c = docker_delete();
            c.args(["-n", "app:v1"]);
            c
        },
        &[&s.reg.name],
    ) else {
        return;
    };
    assert_eq!(r.code, 0, "{r}");
    assert_plan_header(&r, &s);
    let Some(r) = run_without_foreign_registries(
        || {
            let mut c = docker_delete();
            c.args(["-y", "app:v1"]);
            c
        },
        &[&s.reg.name],
    ) else {
        tree.assert_unchanged(&tree_of(&s));
        return;
    };
    assert_full_run(&r, s.images.v1_only_blobs().len());
    assert!(r.stderr.contains("restarted registry"), "{r}");
    assert_ne!(s.started_at(), before, "the container was not restarted");
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "true");
    s.assert_v1_deleted();
}

#[test]
fn legacy_environment_and_legacy_flags_delete() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let before = s.started_at();
    // The original script's set-up and command line: `docker-delete -dt REPO TAG`, which never
    // asked, so it needs no `-y` without a terminal either.
    let mut c = docker_delete();
    c.env("DOCKER_REGISTRY_DIR", &s.root)
        .env("DOCKER_REGISTRY_CONTAINER_ID", &s.reg.id[..12])
        .args(["-dt", "app", "v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    assert_ne!(s.started_at(), before, "the container was not restarted");
    s.assert_v1_deleted();
}

#[test]
fn container_flag_deletes() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let before = s.started_at();
    let mut c = s.cmd();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    assert!(r.stderr.contains("restarted registry"), "{r}");
    assert_ne!(s.started_at(), before, "the container was not restarted");
    s.assert_v1_deleted();
}

#[test]
fn repush_after_delete_uploads_again_and_survives_a_restart() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let mut c = s.cmd();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    s.assert_v1_deleted();

    // The registry was restarted, so its cache no longer claims the deleted blobs: a client
    // uploads them again instead of skipping them.
    let report = s.push("app", "v1", &s.images.v1);
    let uploaded: BTreeSet<String> = report.uploaded.iter().cloned().collect();
    let v1_layer = build_layer("app-v1").digest;
    assert!(
        uploaded.contains(&v1_layer),
        "layer upload skipped (stale cache): {report:?}"
    );
    assert!(
        report.skipped.contains(&build_layer("base").digest),
        "{report:?}"
    );
    s.assert_pulls("app", "v1", false);

    // And the image is really on disk: it pulls after another restart too.
    docker_ok(&["restart", "-t", "10", &s.reg.name]);
    s.reg.wait_ready(Duration::from_secs(30));
    s.assert_pulls("app", "v1", false);
    for (repo, tag, _, all) in s.images.kept() {
        s.assert_pulls(repo, tag, all);
    }
    let expected: BTreeSet<String> = s
        .images
        .kept_blobs()
        .union(&s.images.v1.blob_digests())
        .cloned()
        .collect();
    assert_eq!(blobs_on_disk(&s.v2()), expected);
}

#[test]
fn offline_stops_collects_in_a_one_shot_container_and_starts() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let before = s.started_at();
    let mut c = s.cmd();
    c.args(["--offline", "-y", "app:v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    // The steps in order: stop, edits, collect, start.
    let pos = |needle: &str| {
        r.stderr
            .find(needle)
            .unwrap_or_else(|| panic!("`{needle}` not in output:\n{r}"))
    };
    assert!(pos("stopped registry") < pos("removed tag app:v1"), "{r}");
    assert!(pos("removed tag app:v1") < pos("garbage-collected"), "{r}");
    assert!(pos("garbage-collected") < pos("started registry"), "{r}");
    assert!(pos("started registry") < pos("verified"), "{r}");
    assert!(!r.stderr.contains("restarted registry"), "{r}");

    // The same container runs again.
    assert_eq!(s.reg.inspect("{{.Id}}"), s.reg.id);
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "true");
    assert_ne!(s.started_at(), before, "the container was not stopped");
    // No garbage-collect helper is left, running or not.
    let helpers = docker_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=docker-delete.role=garbage-collect {}", s.reg.name),
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(helpers, "", "helper containers left behind");
    let by_name = docker_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=docker-delete-gc-{}", &s.reg.id[..12]),
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(by_name, "", "helper containers left behind");
    s.assert_v1_deleted();
}

/// SIGTERM (what `timeout`, systemd or a dropped session send) while the registry is stopped:
/// the registry is started again, the run exits 130, and the next run finishes the job.
#[test]
fn sigterm_during_offline_run_starts_the_registry_again() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let mut child = docker_delete_process()
        .args(["--container", &s.reg.name, "--offline", "-y", "app:v1"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("the run ended before stopping the registry:\n{seen}");
        }
        seen.push_str(&line);
        if line.contains("stopped registry") {
            break;
        }
    }
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("started registry"), "{seen}");
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "true", "{seen}");

    // Whatever was left undone, the next run finishes it.
    let mut c = s.cmd();
    c.args(["-y", "gc"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{r}");
    s.assert_v1_deleted();
}

#[test]
fn named_volume_registry_deletes() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::NamedVolume);
    assert!(
        s.root.starts_with("/var/lib/docker") || s.root.to_string_lossy().contains("volumes"),
        "{}",
        s.root.display()
    );
    // The plan names the storage root found: the volume's mountpoint.
    let mut c = s.cmd();
    c.args(["-n", "app:v1"]);
    assert_plan_header(&run(c), &s);
    let mut c = s.cmd();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    s.assert_v1_deleted();
}

#[test]
fn registry3_image_deletes() {
    require_docker!();
    let image = build_registry_image(REGISTRY3_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    assert_eq!(
        s.reg.inspect("{{json .Config.Cmd}}"),
        format!("[\"serve\",\"{REGISTRY3_CONFIG}\"]")
    );
    let mut c = s.cmd();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    s.assert_v1_deleted();
}

#[test]
fn dry_run_touches_no_container() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let before = s.started_at();
    let tree = tree_of(&s);
    let mut c = s.cmd();
    c.args(["--dry-run", "app:v1"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("remove tag app:v1"), "{r}");
    assert!(r.stderr.contains(". garbage-collect"), "{r}");
    assert!(r.stderr.contains(". remove empty blob dirs"), "{r}");
    assert!(r.stderr.contains(". restart registry"), "{r}");
    assert!(r.stderr.contains(". verify"), "{r}");
    assert!(
        r.stderr.contains(&format!("container {}", s.reg.name)),
        "{r}"
    );
    assert!(r.stderr.contains("dry run: nothing was changed"), "{r}");
    assert!(!r.stderr.contains("garbage-collected"), "{r}");

    // Offline dry run: the plan says it would stop and start, and still does nothing.
    let mut c = s.cmd();
    c.args(["--dry-run", "--offline", "app:v1"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("  1. stop registry"), "{r}");
    assert!(r.stderr.contains(". start registry"), "{r}");

    assert_eq!(s.started_at(), before, "a dry run restarted the container");
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "true");
    tree.assert_unchanged(&tree_of(&s));
    s.assert_pulls("app", "v1", false);
}

#[test]
fn gc_subcommand_collects_cleans_and_restarts() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let (hex, blob_dir) = write_orphan_blob(&s.root, b"gc subcommand orphan");
    let before = s.started_at();
    let mut c = s.cmd();
    c.args(["gc", "-y"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{r}");
    assert!(
        r.stderr.contains("garbage-collected: 1 blob(s) deleted"),
        "{r}"
    );
    assert!(r.stderr.contains("removed empty blob dirs"), "{r}");
    assert!(r.stderr.contains("restarted registry"), "{r}");
    assert!(r.stderr.contains("verified"), "{r}");
    assert!(!blob_dir.exists(), "orphan {hex} still there");
    assert!(
        !blob_dir.parent().unwrap().exists(),
        "its emptied prefix dir stays"
    );
    let empty = empty_dirs(&s.v2().join("blobs"));
    assert!(empty.is_empty(), "empty dirs under blobs/: {empty:?}");
    assert_ne!(s.started_at(), before, "the container was not restarted");
    s.assert_pulls("app", "v1", false);
    for (repo, tag, _, all) in s.images.kept() {
        s.assert_pulls(repo, tag, all);
    }
}

#[test]
fn gc_subcommand_offline_collects_with_the_registry_stopped() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::NamedVolume);
    let (_, blob_dir) = write_orphan_blob(&s.root, b"offline gc subcommand orphan");
    let before = s.started_at();
    let mut c = s.cmd();
    c.args(["--offline", "gc", "-y"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{r}");
    for line in [
        "stopped registry",
        "garbage-collected: 1 blob(s) deleted",
        "removed empty blob dirs",
        "started registry",
        "verified",
    ] {
        assert!(r.stderr.contains(line), "`{line}` not in:\n{r}");
    }
    assert!(!blob_dir.exists());
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "true");
    assert_ne!(s.started_at(), before);
    let helpers = docker_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=docker-delete.role=garbage-collect {}", s.reg.name),
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(helpers, "", "helper containers left behind");
    s.assert_pulls("app", "v1", false);
    for (repo, tag, _, all) in s.images.kept() {
        s.assert_pulls(repo, tag, all);
    }
}

#[test]
fn delete_repo_of_a_multi_platform_image() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let mut c = s.cmd();
    c.args(["delete-repo", "multi", "-y"]);
    let r = run(c);
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("removed repository multi"), "{r}");
    assert!(r.stderr.contains("verified"), "{r}");
    assert_eq!(status_manifest(&s.url, "multi", "1"), 404);
    for child in &s.images.multi.children {
        assert_eq!(status_manifest(&s.url, "multi", &child.digest), 404);
    }
    assert!(!s.v2().join("repositories/multi").exists());
    let kept: BTreeSet<String> = [&s.images.v1, &s.images.v2, &s.images.other]
        .iter()
        .flat_map(|i| i.blob_digests())
        .collect();
    assert_eq!(blobs_on_disk(&s.v2()), kept);
    for (repo, tag) in [("app", "v1"), ("app", "v2"), ("other", "1")] {
        s.assert_pulls(repo, tag, false);
    }
    let empty = empty_dirs(&s.v2().join("blobs"));
    assert!(empty.is_empty(), "empty dirs under blobs/: {empty:?}");
}

// ---------------------------------------------------------------------------------------------
// Refusals: exit 2, nothing touched
// ---------------------------------------------------------------------------------------------

/// Asserts a refusal: exit 2, one `error:` line containing every needle, nothing else done.
fn assert_refused(r: &Run, needles: &[&str]) {
    assert_eq!(r.code, 2, "{r}");
    assert!(r.stderr.contains("error:"), "{r}");
    for n in needles {
        assert!(r.stderr.contains(n), "`{n}` not in:\n{r}");
    }
    for done in ["removed", "garbage-collected", "restarted", "stopped"] {
        assert!(!r.stderr.contains(done), "{r}");
    }
}

#[test]
fn registry_dir_disagreeing_with_the_mount_is_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    // Another real registry tree: the wrong one, although it has the same repositories.
    let other = common::TestDir::new();
    common::copy_tree(&s.root, other.path());
    let before = s.started_at();
    let tree = tree_of(&s);
    let other_tree = snapshot(other.path());
    for via_env in [true, false] {
        let mut c = docker_delete();
        if via_env {
            c.env("DOCKER_REGISTRY_DIR", other.path())
                .env("DOCKER_REGISTRY_CONTAINER_ID", &s.reg.name);
        } else {
            c.args(["--registry-dir", &other.path().to_string_lossy()])
                .args(["--container", &s.reg.name]);
        }
        c.args(["-y", "app:v1"]);
        let r = run(c);
        assert_refused(
            &r,
            &[
                &other.path().display().to_string(),
                &s.root.display().to_string(),
                &s.reg.name,
                "is not the directory container",
            ],
        );
    }
    tree.assert_unchanged(&tree_of(&s));
    other_tree.assert_unchanged(&snapshot(other.path()));
    assert_eq!(s.started_at(), before, "the container was restarted");
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "true");
}

#[test]
fn registry_dir_naming_the_mount_another_way_is_accepted() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    // The same directory through a symbolic link and with a trailing slash.
    let links = common::TestDir::new();
    let link = links.join("registry-link");
    std::os::unix::fs::symlink(&s.root, &link).unwrap();
    let mut c = docker_delete();
    c.env("DOCKER_REGISTRY_DIR", format!("{}/", link.display()))
        .env("DOCKER_REGISTRY_CONTAINER_ID", &s.reg.name)
        .args(["-y", "app:v1"]);
    let r = run(c);
    assert_full_run(&r, s.images.v1_only_blobs().len());
    s.assert_v1_deleted();
}

#[test]
fn unknown_container_is_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let tree = tree_of(&s);
    let spec = unique_name("nosuch");
    let mut c = docker_delete();
    c.env("DOCKER_REGISTRY_DIR", &s.root)
        .args(["--container", &spec, "-y", "app:v1"]);
    let r = run(c);
    assert_refused(&r, &[&format!("no container named `{spec}`")]);
    tree.assert_unchanged(&tree_of(&s));
}

/// With nothing named and the only registry container stopped, the refusal says so.
#[test]
fn discovery_names_a_stopped_registry_container() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = exclusive_lock();
    let s = Scene::start(&image, Storage::BindMount);
    docker_ok(&["stop", "-t", "10", &s.reg.name]);
    let tree = tree_of(&s);
    let mut c = docker_delete();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    if r.stderr.contains("running containers look like registries") {
        eprintln!("skipped: another registry container runs on this engine");
        return;
    }
    assert_refused(
        &r,
        &[
            &s.reg.name,
            "no registry container is running",
            "docker start",
        ],
    );
    tree.assert_unchanged(&tree_of(&s));
}

#[test]
fn stopped_registry_container_is_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    docker_ok(&["stop", "-t", "10", &s.reg.name]);
    let tree = tree_of(&s);
    for with_dir in [false, true] {
        let mut c = s.cmd();
        if with_dir {
            c.env("DOCKER_REGISTRY_DIR", &s.root);
        }
        c.args(["-y", "app:v1"]);
        let r = run(c);
        assert_refused(
            &r,
            &[
                &format!("container {} is not running", s.reg.name),
                &format!("docker start {}", s.reg.name),
            ],
        );
    }
    tree.assert_unchanged(&tree_of(&s));
    assert_eq!(s.reg.inspect("{{.State.Running}}"), "false");
}

#[test]
fn non_registry_container_is_refused() {
    require_docker!();
    let busybox = build_busybox_image();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    let sleeper = RegistryContainer::sleeper(&busybox);
    let sleeper_started = sleeper.inspect("{{.State.StartedAt}}");
    let tree = tree_of(&s);
    let mut c = docker_delete();
    c.env("DOCKER_REGISTRY_DIR", &s.root)
        .args(["--container", &sleeper.name, "-y", "app:v1"]);
    let r = run(c);
    assert_refused(
        &r,
        &[
            &format!("container {} does not look like a registry", sleeper.name),
            busybox.tag(),
            "sleep 3600",
        ],
    );
    tree.assert_unchanged(&tree_of(&s));
    assert_eq!(sleeper.inspect("{{.State.StartedAt}}"), sleeper_started);
}

#[test]
fn two_registries_without_a_choice_are_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = exclusive_lock();
    let a = Scene::start(&image, Storage::BindMount);
    let b = Scene::start(&image, Storage::BindMount);
    let (tree_a, tree_b) = (tree_of(&a), tree_of(&b));
    let (started_a, started_b) = (a.started_at(), b.started_at());
    for with_dir in [false, true] {
        let mut c = docker_delete();
        if with_dir {
            // Naming the directory does not name the container.
            c.env("DOCKER_REGISTRY_DIR", &a.root);
        }
        c.args(["-y", "app:v1"]);
        let r = run(c);
        assert_refused(
            &r,
            &[
                "running containers look like registries",
                &a.reg.name,
                &b.reg.name,
                image.tag(),
                "--container NAME",
                "DOCKER_REGISTRY_CONTAINER_ID",
            ],
        );
    }
    tree_a.assert_unchanged(&tree_of(&a));
    tree_b.assert_unchanged(&tree_of(&b));
    assert_eq!(a.started_at(), started_a);
    assert_eq!(b.started_at(), started_b);
}

#[test]
fn unreachable_daemon_is_refused() {
    // Needs no daemon: the tool must not reach one.
    let dir = common::TestDir::new();
    common::copy_tree(&common::sample_registry_dir(), dir.path());
    let tree = snapshot(dir.path());
    let mut c = docker_delete();
    c.env("DOCKER_HOST", "unix:///nonexistent.sock")
        .env("DOCKER_REGISTRY_DIR", dir.path())
        .args(["--container", "x", "-y", "demo/app:v1"]);
    let r = run(c);
    assert_refused(
        &r,
        &[
            "cannot reach the Docker daemon at unix:///nonexistent.sock",
            "DOCKER_HOST",
        ],
    );
    tree.assert_unchanged(&snapshot(dir.path()));
}

#[test]
fn storage_inside_the_container_is_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::Inside);
    let url = reg.endpoint().unwrap();
    let img = build_image(Format::Docker, &["inside-base", "inside-app"]);
    push_image(&url, "app", Some("v1"), &img).unwrap();
    let before = reg.inspect("{{.State.StartedAt}}");
    let listing = || reg.exec(&["find", "/var/lib/registry"]);
    let files = listing();
    assert!(files.contains("_manifests/tags/v1"), "{files}");
    let mut c = docker_delete();
    c.args(["--container", &reg.name, "-y", "app:v1"]);
    let r = run(c);
    assert_refused(
        &r,
        &[
            &format!(
                "container {} keeps its storage (/var/lib/registry) inside the container",
                reg.name
            ),
            "DOCKER_REGISTRY_DIR",
        ],
    );
    assert_eq!(listing(), files, "the container's tree changed");
    assert_eq!(reg.inspect("{{.State.StartedAt}}"), before);
    pull_verify(&url, "app", "v1").unwrap();
    assert_eq!(http_status(&format!("{url}/v2/")), Some(200));
}

// ---------------------------------------------------------------------------------------------
// Corners
// ---------------------------------------------------------------------------------------------

#[test]
fn ephemeral_published_port_is_followed_across_the_restart() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let mut s = Scene::run(
        &image,
        RunOptions {
            ephemeral_port: true,
            ..RunOptions::new(Storage::BindMount)
        },
    );
    let first = s.reg.published_port().unwrap();
    let mut c = s.cmd();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    let now = s.reg.published_port().unwrap();
    eprintln!("published port before the run {first}, after {now}");
    s.url = format!("http://127.0.0.1:{now}");
    assert_full_run(&r, s.images.v1_only_blobs().len());
    assert!(
        r.stderr.contains(&format!("verified: {} answers", s.url)),
        "{r}"
    );
    s.assert_v1_deleted();
}

#[test]
fn registry_dir_for_a_container_without_host_storage_is_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let reg = RegistryContainer::start(&image, Storage::Inside);
    let url = reg.endpoint().unwrap();
    let img = build_image(Format::Docker, &["inside-base", "inside-app"]);
    push_image(&url, "app", Some("v1"), &img).unwrap();
    // A host tree that looks right (same repository and tag) but that the container does not use.
    let copy = common::TestDir::new();
    std::process::Command::new("docker")
        .args(["cp", &format!("{}:/var/lib/registry/.", reg.name)])
        .arg(copy.path())
        .status()
        .unwrap();
    assert!(copy.join("docker/registry/v2/repositories/app").is_dir());
    let tree = snapshot(copy.path());
    let before = reg.inspect("{{.State.StartedAt}}");
    let files = reg.exec(&["find", "/var/lib/registry"]);
    let mut c = docker_delete();
    c.env("DOCKER_REGISTRY_DIR", copy.path())
        .args(["--container", &reg.name, "-y", "app:v1"]);
    let r = run(c);
    assert_refused(&r, &[&reg.name, &copy.path().display().to_string()]);
    tree.assert_unchanged(&snapshot(copy.path()));
    assert_eq!(reg.exec(&["find", "/var/lib/registry"]), files);
    assert_eq!(reg.inspect("{{.State.StartedAt}}"), before);
}

#[test]
fn paused_registry_container_is_refused() {
    require_docker!();
    let image = build_registry_image(REGISTRY2_CONFIG);
    let _lock = shared_lock();
    let s = Scene::start(&image, Storage::BindMount);
    docker_ok(&["pause", &s.reg.name]);
    let tree = tree_of(&s);
    let mut c = s.cmd();
    c.args(["-y", "app:v1"]);
    let r = run(c);
    docker_ok(&["unpause", &s.reg.name]);
    assert_refused(
        &r,
        &[
            &format!("container {} is not running", s.reg.name),
            &format!("docker unpause {}", s.reg.name),
        ],
    );
    tree.assert_unchanged(&tree_of(&s));
}
