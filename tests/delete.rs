//! End-to-end deletion against the real registry, in local mode (`--no-container`): every test
//! pushes real images through the HTTP API into a registry of its own, runs the `docker-delete`
//! binary on that registry's tree, restarts the registry (or lets the tool do it with
//! `--restart-cmd`), and checks the result on disk and over HTTP.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Longest a single docker-delete run may take; nothing here should come close.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Running the tool
// ---------------------------------------------------------------------------------------------

/// What one docker-delete run produced.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn describe(&self) -> String {
        format!(
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    #[track_caller]
    fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            code,
            "unexpected exit code:\n{}",
            self.describe()
        );
        self
    }

    #[track_caller]
    fn assert_ok(&self) -> &Self {
        self.assert_code(0)
    }

    #[track_caller]
    fn assert_stderr_has(&self, needle: &str) -> &Self {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.describe()
        );
        self
    }
}

/// Runs docker-delete with `args`, stdin an empty pipe (never a terminal), under a timeout.
fn run(args: &[String]) -> Out {
    run_with_stdin(args, "")
}

fn run_with_stdin(args: &[String], stdin: &str) -> Out {
    let out = docker_delete()
        .args(args)
        .write_stdin(stdin)
        .timeout(RUN_TIMEOUT)
        .output()
        .unwrap_or_else(|e| panic!("docker-delete {args:?} did not finish: {e}"));
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The options that point the tool at a local registry's tree and config.
fn local_opts(root: &Path, config: &Path) -> Vec<String> {
    vec![
        "--no-container".into(),
        "--registry-dir".into(),
        root.display().to_string(),
        "--config".into(),
        config.display().to_string(),
    ]
}

/// `docker-delete <local opts> -y --no-restart <args>`: edits, collects, cleans up; the test
/// restarts the registry itself.
fn dd(reg: &Registry, args: &[&str]) -> Out {
    let mut a = local_opts(reg.root(), reg.config_path());
    a.extend(strings(&["-y", "--no-restart"]));
    a.extend(strings(args));
    run(&a)
}

/// [`dd`], then a restart of the registry so its cache forgets what was deleted.
fn dd_restart(reg: &mut Registry, args: &[&str]) -> Out {
    let out = dd(reg, args);
    reg.restart();
    out
}

/// docker-delete with the local options and `--no-restart` (the test's registry cannot be
/// restarted by the tool), but no `-y`.
fn dd_bare(reg: &Registry, args: &[&str]) -> Out {
    let mut a = local_opts(reg.root(), reg.config_path());
    a.push("--no-restart".into());
    a.extend(strings(args));
    run(&a)
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn assert_pulls(reg: &Registry, repo: &str, reference: &str) {
    reg.pull_verify(repo, reference)
        .unwrap_or_else(|e| panic!("{repo}:{reference} does not pull: {e}"));
}

#[track_caller]
fn assert_skopeo(reg: &Registry, repo: &str, reference: &str, all: bool) {
    reg.skopeo_pull(repo, reference, all)
        .unwrap_or_else(|e| panic!("skopeo {repo}:{reference}: {e}"));
}

#[track_caller]
fn assert_gone(reg: &Registry, repo: &str, reference: &str) {
    assert_eq!(
        reg.status_manifest(repo, reference),
        404,
        "{repo}:{reference} still answers"
    );
}

#[track_caller]
fn assert_blobs_gone(v2: &Path, digests: &BTreeSet<String>) {
    for d in digests {
        assert!(!blob_path(v2, d).exists(), "blob {d} still on disk");
    }
}

#[track_caller]
fn assert_blobs_present(v2: &Path, digests: &BTreeSet<String>) {
    for d in digests {
        assert!(blob_path(v2, d).is_file(), "blob {d} missing from disk");
    }
}

#[track_caller]
fn assert_no_empty_blob_dirs(v2: &Path) {
    let empties = empty_dirs(&v2.join("blobs"));
    assert!(empties.is_empty(), "empty dirs under blobs/: {empties:?}");
}

/// The blobs (manifest, config, layers) of `a` that `b` does not use.
fn only_in(a: &Image, others: &[&Image]) -> BTreeSet<String> {
    let mut out = a.blob_digests();
    for o in others {
        for d in o.blob_digests() {
            out.remove(&d);
        }
    }
    out
}

/// Config and layer digests of a single-platform image (what `_layers` links name).
fn layer_blobs(img: &Image) -> BTreeSet<String> {
    img.config
        .iter()
        .chain(&img.layers)
        .map(|b| b.digest.clone())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A registry the tool can restart itself: started through a pid-file shell script
// ---------------------------------------------------------------------------------------------

/// A registry process not owned by the test process: `restart.sh` kills the one in `pid` (if any),
/// starts a new one with `setsid`, records its pid and waits until `/v2/` answers. The tool gets
/// the script as `--restart-cmd`; drop kills the process by its recorded pid.
struct ScriptRegistry {
    dir: TestDir,
    port: u16,
}

impl ScriptRegistry {
    fn start() -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            let dir = TestDir::new();
            let root = dir.join("root");
            fs::create_dir_all(&root).unwrap();
            let port = free_port();
            fs::write(dir.join("config.yml"), config_yaml(port, &root)).unwrap();
            let script = format!(
                "#!/bin/sh\n\
                 D='{dir}'\n\
                 U='http://127.0.0.1:{port}/v2/'\n\
                 if [ -f \"$D/pid\" ]; then\n\
                 \x20 kill -9 \"$(cat \"$D/pid\")\" 2>/dev/null\n\
                 \x20 i=0; while curl -s -o /dev/null \"$U\" && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done\n\
                 fi\n\
                 setsid '{bin}' serve \"$D/config.yml\" >>\"$D/registry.log\" 2>&1 </dev/null &\n\
                 echo $! > \"$D/pid\"\n\
                 i=0; until curl -s -o /dev/null \"$U\"; do i=$((i+1)); [ $i -gt 200 ] && exit 1; sleep 0.05; done\n\
                 echo restarted >> \"$D/restarts\"\n",
                dir = dir.path().display(),
                bin = registry_binary().display(),
            );
            fs::write(dir.join("restart.sh"), script).unwrap();
            let r = Self { dir, port };
            let st = Command::new("sh").arg(r.script()).status().unwrap();
            if st.success() {
                return r;
            }
            last = r.log();
        }
        panic!("script registry did not start: {last}");
    }

    fn script(&self) -> PathBuf {
        self.dir.join("restart.sh")
    }

    /// The shell command that restarts this registry, for `--restart-cmd`.
    fn restart_cmd(&self) -> String {
        format!("sh '{}'", self.script().display())
    }

    fn restart(&self) {
        let st = Command::new("sh").arg(self.script()).status().unwrap();
        assert!(st.success(), "restart script failed: {}", self.log());
    }

    fn restarts(&self) -> usize {
        fs::read_to_string(self.dir.join("restarts"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    fn v2(&self) -> PathBuf {
        self.root().join("docker/registry/v2")
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.yml")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    fn push(&self, repo: &str, tag: &str, img: &Image) -> PushReport {
        push_image(&self.url(), repo, Some(tag), img)
            .unwrap_or_else(|e| panic!("push {repo}:{tag}: {e}\n{}", self.log()))
    }

    /// docker-delete with `--restart-cmd <cmd>` (the tool restarts and verifies).
    fn dd(&self, restart_cmd: &str, args: &[&str]) -> Out {
        let mut a = local_opts(&self.root(), &self.config());
        a.extend(strings(&["-y", "--restart-cmd", restart_cmd]));
        a.extend(strings(args));
        run(&a)
    }
}

impl Drop for ScriptRegistry {
    fn drop(&mut self) {
        if let Ok(pid) = fs::read_to_string(self.dir.join("pid")) {
            let pid = pid.trim();
            if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Two tags on one digest
// ---------------------------------------------------------------------------------------------

#[test]
fn deleting_one_of_two_tags_on_a_digest_keeps_the_other_complete() {
    let mut reg = Registry::start();
    let img = build_image(Format::Docker, &["t1-base", "t1-libs", "t1-app"]);
    reg.push("app", "v1", &img);
    reg.push("app", "latest", &img);
    let v2 = reg.v2();
    let blobs_before = blobs_on_disk(&v2);
    let layers_before = layer_links(&v2, "app");

    dd_restart(&mut reg, &["app:v1"]).assert_ok();

    assert_eq!(tags(&v2, "app"), ["latest"]);
    assert_gone(&reg, "app", "v1");
    assert_pulls(&reg, "app", "latest");
    assert_skopeo(&reg, "app", "latest", false);
    assert_eq!(
        read_link(&revision_link_path(&v2, "app", &img.digest)),
        img.digest
    );
    assert_eq!(blobs_on_disk(&v2), blobs_before, "no blob may be deleted");
    assert_eq!(layer_links(&v2, "app"), layers_before);
}

// ---------------------------------------------------------------------------------------------
// 2. A unique image: its blobs go, shared ones stay
// ---------------------------------------------------------------------------------------------

#[test]
fn unique_image_is_freed_and_shared_blobs_stay() {
    let mut reg = Registry::start();
    // v1 shares `u-base` with v2 (same repo) and `u-cross` with another repository.
    let v1 = build_image(Format::Oci, &["u-base", "u-cross", "u-only1", "u-only2"]);
    let v2img = build_image(Format::Oci, &["u-base", "u-v2"]);
    let other = build_image(Format::Oci, &["u-cross", "u-other"]);
    reg.push("app", "v1", &v1);
    reg.push("app", "v2", &v2img);
    reg.push("other", "1", &other);
    let v2 = reg.v2();
    let cross = build_layer("u-cross").digest;
    let base = build_layer("u-base").digest;

    dd_restart(&mut reg, &["app:v1"]).assert_ok();

    assert_gone(&reg, "app", "v1");
    assert_gone(&reg, "app", &v1.digest);
    let unique = only_in(&v1, &[&v2img, &other]);
    assert_eq!(
        unique.len(),
        4,
        "manifest, config and two layers: {unique:?}"
    );
    assert_blobs_gone(&v2, &unique);
    assert_blobs_present(&v2, &v2img.blob_digests());
    assert_blobs_present(&v2, &other.blob_digests());
    // `_layers` links of what only v1 used in `app` are gone, `u-cross` included: `app` must not
    // keep serving a blob it no longer uses because `other` holds it.
    let links: BTreeSet<String> = layer_links(&v2, "app").into_iter().collect();
    for d in layer_blobs(&v1) {
        if d == base {
            assert!(links.contains(&d), "shared base link removed");
        } else {
            assert!(!links.contains(&d), "layer link {d} kept");
        }
    }
    assert_eq!(reg.status_blob("app", &cross), 404);
    assert_eq!(reg.status_blob("other", &cross), 200);
    assert!(!revision_link_path(&v2, "app", &v1.digest).exists());
    assert_no_empty_blob_dirs(&v2);
    assert_pulls(&reg, "app", "v2");
    assert_pulls(&reg, "other", "1");
    assert_skopeo(&reg, "other", "1", false);
}

// ---------------------------------------------------------------------------------------------
// 3. Nested names
// ---------------------------------------------------------------------------------------------

#[test]
fn nested_repositories_are_deleted_without_touching_neighbours() {
    let mut reg = Registry::start();
    let app1 = build_image(Format::Oci, &["n-base", "n-app1"]);
    let app2 = build_image(Format::Oci, &["n-base", "n-app2"]);
    let web = build_image(Format::Docker, &["n-base", "n-web"]);
    let team = build_image(Format::Docker, &["n-team"]);
    let abc = build_image(Format::Oci, &["n-abc"]);
    reg.push("team/app", "1", &app1);
    reg.push("team/app", "2", &app2);
    reg.push("team/web", "1", &web);
    reg.push("team", "1", &team);
    reg.push("a/b/c", "1", &abc);
    let v2 = reg.v2();
    assert_eq!(repositories(&v2), ["a/b/c", "team", "team/app", "team/web"]);

    dd_restart(&mut reg, &["team/app:1"]).assert_ok();
    assert_gone(&reg, "team/app", "1");
    assert_pulls(&reg, "team/app", "2");
    assert_blobs_gone(&v2, &only_in(&app1, &[&app2, &web, &team, &abc]));

    dd_restart(&mut reg, &["delete-repo", "team/app", "a/b/c"]).assert_ok();
    assert!(!repo_path(&v2, "team/app").exists());
    // `a/b/c` was the only repository below `a`: every parent left empty goes.
    assert!(!v2.join("repositories/a").exists());
    assert!(v2.join("repositories").is_dir());
    // `team` is a repository itself and holds `team/web`: it stays, whole.
    assert_eq!(repositories(&v2), ["team", "team/web"]);
    assert_eq!(tags(&v2, "team"), ["1"]);
    assert_pulls(&reg, "team", "1");
    assert_pulls(&reg, "team/web", "1");
    assert_skopeo(&reg, "team/web", "1", false);
    assert_gone(&reg, "team/app", "2");
    assert_gone(&reg, "a/b/c", "1");
    assert_blobs_gone(&v2, &only_in(&app2, &[&web, &team]));
    assert_blobs_gone(&v2, &abc.blob_digests());
    assert_blobs_present(&v2, &web.blob_digests());
    assert_no_empty_blob_dirs(&v2);
    let empties = empty_dirs(&v2.join("repositories"));
    assert!(
        empties.iter().all(|p| p.ends_with("_uploads")),
        "empty dirs left under repositories/: {empties:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. A re-pushed tag
// ---------------------------------------------------------------------------------------------

#[test]
fn deleting_a_repushed_tag_frees_both_digests() {
    let mut reg = Registry::start();
    let old = build_image(Format::Docker, &["h-base", "h-old"]);
    let new = build_image(Format::Docker, &["h-base", "h-new"]);
    let keep = build_image(Format::Docker, &["h-base", "h-keep"]);
    reg.push("app", "v1", &old);
    reg.push("app", "v1", &new);
    reg.push("app", "keep", &keep);
    let v2 = reg.v2();
    assert_eq!(tag_history(&v2, "app", "v1").len(), 2);

    dd_restart(&mut reg, &["app:v1"]).assert_ok();

    assert_gone(&reg, "app", "v1");
    assert_gone(&reg, "app", &old.digest);
    assert_gone(&reg, "app", &new.digest);
    assert_eq!(revisions(&v2, "app"), vec![keep.digest.clone()]);
    assert_blobs_gone(&v2, &only_in(&old, &[&keep]));
    assert_blobs_gone(&v2, &only_in(&new, &[&keep]));
    assert_blobs_present(&v2, &keep.blob_digests());
    assert_pulls(&reg, "app", "keep");
    assert_no_empty_blob_dirs(&v2);
}

// ---------------------------------------------------------------------------------------------
// 5. Multi-platform images
// ---------------------------------------------------------------------------------------------

#[test]
fn multi_platform_indexes_take_their_children_unless_shared() {
    let mut reg = Registry::start();
    // OCI: index `ab` over A and B, index `bc` over B and C; B is shared.
    let a = build_image_for(Format::Oci, "amd64", &["mp-a"]);
    let b = build_image_for(Format::Oci, "arm64", &["mp-b"]);
    let c = build_image_for(Format::Oci, "amd64", &["mp-c"]);
    let ab = build_index(Format::Oci, vec![a.clone(), b.clone()]);
    let bc = build_index(Format::Oci, vec![b.clone(), c.clone()]);
    reg.push("multi", "ab", &ab);
    reg.push("multi", "bc", &bc);
    // A lone two-platform OCI index and a Docker manifest list.
    let lone = build_multi_platform(Format::Oci, "mp-lone");
    let list = build_multi_platform(Format::Docker, "mp-list");
    reg.push("lone", "1", &lone);
    reg.push("legacy", "1", &list);
    let keep = build_image(Format::Docker, &["mp-keep"]);
    reg.push("legacy", "keep", &keep);
    let v2 = reg.v2();

    dd_restart(&mut reg, &["multi:ab", "lone:1", "legacy:1"]).assert_ok();

    // `ab` and its own child A go; B stays for `bc`.
    assert_gone(&reg, "multi", "ab");
    assert_gone(&reg, "multi", &ab.digest);
    assert_gone(&reg, "multi", &a.digest);
    let mut want = vec![b.digest.clone(), c.digest.clone(), bc.digest.clone()];
    want.sort();
    assert_eq!(revisions(&v2, "multi"), want);
    assert_blobs_gone(&v2, &a.blob_digests());
    assert!(!blob_path(&v2, &ab.digest).exists());
    assert_blobs_present(&v2, &bc.blob_digests());
    assert_pulls(&reg, "multi", "bc");
    assert_pulls(&reg, "multi", &b.digest);
    assert_skopeo(&reg, "multi", "bc", true);

    // The lone index and the manifest list go with every child and blob.
    for (repo, idx) in [("lone", &lone), ("legacy", &list)] {
        assert_gone(&reg, repo, "1");
        for child in &idx.children {
            assert_gone(&reg, repo, &child.digest);
        }
        assert_blobs_gone(&v2, &idx.blob_digests());
    }
    assert_eq!(revisions(&v2, "lone"), Vec::<String>::new());
    assert_eq!(revisions(&v2, "legacy"), vec![keep.digest.clone()]);
    assert_pulls(&reg, "legacy", "keep");
    assert_no_empty_blob_dirs(&v2);
}

// ---------------------------------------------------------------------------------------------
// 6. Referrers
// ---------------------------------------------------------------------------------------------

#[test]
fn referrers_follow_their_subject() {
    let mut reg = Registry::start();
    let one = build_image(Format::Oci, &["r-base", "r-one"]);
    let two = build_image(Format::Oci, &["r-base", "r-two"]);
    let sig1 = build_referrer(&one, "r-sig1");
    let sig2 = build_referrer(&two, "r-sig2");
    reg.push("signed", "v1", &one);
    reg.push("signed", "v2", &two);
    reg.push_untagged("signed", &sig1);
    reg.push_untagged("signed", &sig2);
    let v2 = reg.v2();

    dd_restart(&mut reg, &["signed:v1"]).assert_ok();

    assert_gone(&reg, "signed", "v1");
    assert_gone(&reg, "signed", &sig1.digest);
    assert!(!revision_link_path(&v2, "signed", &sig1.digest).exists());
    // The signature payload is unique to sig1; its `{}` config is shared with sig2.
    assert_blobs_gone(&v2, &only_in(&sig1, &[&sig2, &two]));
    assert!(!blob_path(&v2, &sig1.layers[0].digest).exists());
    assert_blobs_present(&v2, &sig2.blob_digests());
    assert_pulls(&reg, "signed", &sig2.digest);
    assert_pulls(&reg, "signed", "v2");
    let mut want = vec![two.digest.clone(), sig2.digest.clone()];
    want.sort();
    assert_eq!(revisions(&v2, "signed"), want);
}

// ---------------------------------------------------------------------------------------------
// 7. By digest, and every tag
// ---------------------------------------------------------------------------------------------

#[test]
fn digest_reference_takes_every_tag_and_bare_repo_takes_all_tags() {
    let mut reg = Registry::start();
    let one = build_image(Format::Docker, &["d-base", "d-one"]);
    let two = build_image(Format::Docker, &["d-base", "d-two"]);
    reg.push("app", "v1", &one);
    reg.push("app", "latest", &one);
    reg.push("app", "v2", &two);
    reg.push("app", "v2-alias", &two);
    let v2 = reg.v2();

    let by_digest = format!("app@{}", one.digest);
    dd_restart(&mut reg, &[&by_digest]).assert_ok();
    assert_eq!(tags(&v2, "app"), ["v2", "v2-alias"]);
    assert_gone(&reg, "app", "v1");
    assert_gone(&reg, "app", "latest");
    assert_gone(&reg, "app", &one.digest);
    assert_blobs_gone(&v2, &only_in(&one, &[&two]));
    assert_pulls(&reg, "app", "v2");

    dd_restart(&mut reg, &["app"]).assert_ok();
    assert!(tags(&v2, "app").is_empty());
    assert!(revisions(&v2, "app").is_empty());
    assert!(layer_links(&v2, "app").is_empty());
    assert_gone(&reg, "app", "v2");
    assert_gone(&reg, "app", &two.digest);
    assert!(blobs_on_disk(&v2).is_empty(), "{:?}", blobs_on_disk(&v2));
    assert_no_empty_blob_dirs(&v2);

    // Nothing left to take: a refusal naming the way to delete the repository.
    let before = snapshot(reg.root());
    dd(&reg, &["app"])
        .assert_code(2)
        .assert_stderr_has("delete-repo app");
    snapshot(reg.root()).assert_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------
// 8. The tool's own restart and verification; re-push afterwards
// ---------------------------------------------------------------------------------------------

#[test]
fn restart_cmd_verifies_and_a_repush_uploads_every_blob_again() {
    let reg = ScriptRegistry::start();
    let img = build_image(Format::Docker, &["rp-base", "rp-app"]);
    let keep = build_image(Format::Docker, &["rp-keep"]);
    reg.push("app", "v1", &img);
    reg.push("app", "keep", &keep);
    let restarts = reg.restarts();

    let out = reg.dd(&reg.restart_cmd(), &["app:v1"]);
    out.assert_ok()
        .assert_stderr_has("restarted registry")
        .assert_stderr_has("verified");
    assert!(
        out.stderr.contains("answer 404"),
        "verification line: {}",
        out.describe()
    );
    assert_eq!(
        reg.restarts(),
        restarts + 1,
        "the tool ran the restart command"
    );
    assert_blobs_gone(&reg.v2(), &img.blob_digests());
    assert_eq!(status_manifest(&reg.url(), "app", "v1"), 404);

    // The registry was restarted: it no longer claims the deleted blobs, so a re-push uploads them.
    let report = reg.push("app", "v1", &img);
    assert!(report.skipped.is_empty(), "{report:?}");
    assert_eq!(report.uploaded.len(), 3, "{report:?}");
    assert_blobs_present(&reg.v2(), &img.blob_digests());
    reg.restart();
    pull_verify(&reg.url(), "app", "v1").unwrap();
    pull_verify(&reg.url(), "app", "keep").unwrap();
    skopeo_pull(&reg.addr(), "app", "v1", false).unwrap();
}

/// A registry serving TLS with a certificate for its public name (as real ones do) is still
/// verified on loopback: the probe reads status codes only.
#[test]
fn tls_registry_is_verified_over_https_on_loopback() {
    let reg = ScriptRegistry::start();
    let img = build_image(Format::Oci, &["tls-app"]);
    let keep = build_image(Format::Oci, &["tls-keep"]);
    reg.push("app", "v1", &img);
    reg.push("app", "keep", &keep);

    let (cert, key) = (reg.dir.join("cert.pem"), reg.dir.join("key.pem"));
    let st = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=registry.example.com", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success());
    let mut config = fs::read_to_string(reg.config()).unwrap();
    config.push_str(&format!(
        "  tls:\n    certificate: '{}'\n    key: '{}'\n",
        cert.display(),
        key.display()
    ));
    fs::write(reg.config(), config).unwrap();
    reg.restart();

    let out = reg.dd(&reg.restart_cmd(), &["app:v1"]);
    out.assert_ok()
        .assert_stderr_has(&format!("verified: https://127.0.0.1:{}", reg.port));
    assert_blobs_gone(&reg.v2(), &only_in(&img, &[&keep]));
}

#[test]
fn verification_fails_when_the_restart_command_does_not_restart() {
    let reg = ScriptRegistry::start();
    let img = build_image(Format::Oci, &["nr-base", "nr-app"]);
    let keep = build_image(Format::Oci, &["nr-keep"]);
    reg.push("app", "v1", &img);
    reg.push("app", "keep", &keep);

    let out = reg.dd("true", &["app:v1"]);
    out.assert_code(1)
        .assert_stderr_has("deleted content is still served");
    // The cache answers for blobs whose files are gone.
    let served: Vec<String> = layer_blobs(&img)
        .into_iter()
        .filter(|d| {
            out.stderr
                .contains(&format!("/v2/app/blobs/{d} answers 200"))
        })
        .collect();
    assert!(!served.is_empty(), "{}", out.describe());
    assert!(!blob_path(&reg.v2(), &img.layers[1].digest).exists());
    assert_eq!(status_blob(&reg.url(), "app", &img.layers[1].digest), 200);

    // A real restart makes it right.
    reg.restart();
    assert_eq!(status_blob(&reg.url(), "app", &img.layers[1].digest), 404);
    assert_eq!(status_manifest(&reg.url(), "app", &img.digest), 404);
    pull_verify(&reg.url(), "app", "keep").unwrap();
}

// ---------------------------------------------------------------------------------------------
// 9. Dry run
// ---------------------------------------------------------------------------------------------

/// Paths of the tree steps of a `--json` dry run, relative to v2.
fn planned_paths(json: &str) -> BTreeSet<PathBuf> {
    let plan: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    plan["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s.get("path").and_then(Value::as_str).map(PathBuf::from))
        .collect()
}

/// Removed paths under `repositories/` whose parent was not removed, relative to v2.
fn top_removed(before: &TreeSnapshot, after: &TreeSnapshot) -> BTreeSet<PathBuf> {
    let removed: BTreeSet<&PathBuf> = before
        .entries
        .keys()
        .filter(|p| !after.entries.contains_key(*p))
        .collect();
    removed
        .iter()
        .filter(|p| p.starts_with("repositories"))
        .filter(|p| {
            p.parent()
                .is_none_or(|q| !removed.contains(&q.to_path_buf()))
        })
        .map(|p| p.to_path_buf())
        .collect()
}

fn rich_registry() -> Registry {
    let reg = Registry::start();
    let one = build_image(Format::Docker, &["dr-base", "dr-one"]);
    let two = build_image(Format::Docker, &["dr-base", "dr-two"]);
    let old = build_image(Format::Docker, &["dr-base", "dr-old"]);
    reg.push("app", "v1", &one);
    reg.push("app", "latest", &one);
    reg.push("app", "v2", &old);
    reg.push("app", "v2", &two);
    reg.push("app", "keep", &build_image(Format::Docker, &["dr-keep"]));
    let a = build_image_for(Format::Oci, "amd64", &["dr-a"]);
    let b = build_image_for(Format::Oci, "arm64", &["dr-b"]);
    let c = build_image_for(Format::Oci, "amd64", &["dr-c"]);
    reg.push(
        "team/multi",
        "ab",
        &build_index(Format::Oci, vec![a, b.clone()]),
    );
    reg.push("team/multi", "bc", &build_index(Format::Oci, vec![b, c]));
    let s = build_image(Format::Oci, &["dr-signed"]);
    reg.push("team/signed", "v1", &s);
    reg.push(
        "team/signed",
        "v2",
        &build_image(Format::Oci, &["dr-signed2"]),
    );
    reg.push_untagged("team/signed", &build_referrer(&s, "dr-sig"));
    reg
}

#[test]
fn dry_run_changes_nothing_and_lists_what_the_real_run_removes() {
    let reg = rich_registry();
    let v2 = reg.v2();
    let refs = ["app:v1", "app:v2", "team/multi:ab", "team/signed:v1"];
    let before = snapshot(reg.root());

    let mut args = vec!["--dry-run", "--json"];
    args.extend(refs);
    let dry = dd_bare(&reg, &args);
    dry.assert_ok();
    snapshot(reg.root()).assert_unchanged(&before);
    let planned = planned_paths(&dry.stdout);
    assert!(planned.len() >= 10, "plan: {planned:?}");
    // Same without --json, and without --yes: a dry run never asks.
    let mut args = vec!["-n"];
    args.extend(refs);
    dd_bare(&reg, &args)
        .assert_ok()
        .assert_stderr_has("dry run: nothing was changed");
    snapshot(reg.root()).assert_unchanged(&before);

    let v2_before = snapshot(&v2);
    dd(&reg, &refs).assert_ok();
    let v2_after = snapshot(&v2);
    assert_eq!(top_removed(&v2_before, &v2_after), planned);
}

/// Dry run, then the real run, of deleting every tag of `app` and `team/signed`: (planned tree
/// paths, top-level removed paths under `repositories/`, every removed path).
fn emptying_run() -> (BTreeSet<PathBuf>, BTreeSet<PathBuf>, BTreeSet<PathBuf>) {
    let reg = rich_registry();
    let v2 = reg.v2();
    let dry = dd_bare(&reg, &["-n", "--json", "app", "team/signed"]);
    dry.assert_ok();
    let planned = planned_paths(&dry.stdout);
    let before = snapshot(&v2);
    dd(&reg, &["app", "team/signed"]).assert_ok();
    let after = snapshot(&v2);
    let all_removed = before
        .entries
        .keys()
        .filter(|p| p.starts_with("repositories") && !after.entries.contains_key(*p))
        .cloned()
        .collect();
    (planned, top_removed(&before, &after), all_removed)
}

/// The property at file level: every planned path is removed, every removed path lies under a
/// planned one, and the only other removals are directories the edits left empty (ancestors of
/// planned paths, `_layers/` and `_manifests/revisions/` here).
#[test]
fn dry_run_paths_cover_exactly_what_goes_when_a_repository_is_emptied() {
    let (planned, _, removed) = emptying_run();
    for p in &planned {
        assert!(
            removed.contains(p),
            "planned but not removed: {}",
            p.display()
        );
    }
    for r in &removed {
        let under_planned = planned.iter().any(|p| r.starts_with(p));
        let emptied_parent = planned.iter().any(|p| p.starts_with(r));
        assert!(
            under_planned || emptied_parent,
            "removed but neither planned nor an emptied parent: {}",
            r.display()
        );
        if !under_planned {
            let name = r.file_name().unwrap().to_string_lossy();
            assert!(
                ["_layers", "revisions", "sha256"].contains(&name.as_ref()),
                "unexpected emptied parent removed: {}",
                r.display()
            );
        }
    }
}

/// The strict form of the house property: the dry run lists exactly the paths the real run
/// removes. Emptied `_layers/` and `_manifests/revisions/` directories are removed without being
/// in the plan.
#[test]
fn dry_run_paths_equal_removed_paths_when_a_repository_is_emptied() {
    let (planned, top, _) = emptying_run();
    let planned_top: BTreeSet<PathBuf> = planned
        .iter()
        .filter(|p| !planned.iter().any(|q| q != *p && p.starts_with(q)))
        .cloned()
        .collect();
    assert_eq!(
        top,
        planned_top,
        "removed but not planned: {:?}",
        top.difference(&planned).collect::<Vec<_>>()
    );
}

#[test]
fn dry_run_of_delete_repo_lists_what_goes() {
    let reg = rich_registry();
    let v2 = reg.v2();
    let before = snapshot(reg.root());
    let dry = dd_bare(&reg, &["-n", "--json", "delete-repo", "team/multi"]);
    dry.assert_ok();
    snapshot(reg.root()).assert_unchanged(&before);
    let planned = planned_paths(&dry.stdout);
    assert_eq!(
        planned,
        BTreeSet::from([PathBuf::from("repositories/team/multi")])
    );
    let before = snapshot(&v2);
    dd(&reg, &["delete-repo", "team/multi"]).assert_ok();
    assert_eq!(top_removed(&before, &snapshot(&v2)), planned);
}

// ---------------------------------------------------------------------------------------------
// 10. The original script's flags
// ---------------------------------------------------------------------------------------------

fn legacy(reg: &Registry, flags: &[&str]) -> Out {
    let mut a = strings(flags);
    a.extend(local_opts(reg.root(), reg.config_path()));
    a.push("--no-restart".into());
    run(&a)
}

#[test]
fn legacy_flags_work_without_a_terminal() {
    let mut reg = Registry::start();
    let one = build_image(Format::Docker, &["l-base", "l-one"]);
    let two = build_image(Format::Docker, &["l-base", "l-two"]);
    reg.push("app", "v1", &one);
    reg.push("app", "v2", &two);
    reg.push("team/web", "1", &two);
    reg.push("a/b/c", "1", &one);
    let v2 = reg.v2();

    let sr = legacy(&reg, &["-sr"]);
    sr.assert_ok();
    assert_eq!(
        sr.stdout.lines().collect::<Vec<_>>(),
        ["a/b/c", "app", "team/web"]
    );
    let st = legacy(&reg, &["-st", "app"]);
    st.assert_ok();
    assert_eq!(st.stdout.lines().collect::<Vec<_>>(), ["v1", "v2"]);

    // `-dt REPO TAG`: no terminal, no --yes, and it deletes.
    legacy(&reg, &["-dt", "app", "v1"]).assert_ok();
    reg.restart();
    assert_eq!(tags(&v2, "app"), ["v2"]);
    assert_gone(&reg, "app", "v1");
    assert_pulls(&reg, "app", "v2");

    // `-dt REPO` (every tag) needs --yes without a terminal.
    let before = snapshot(reg.root());
    legacy(&reg, &["-dt", "app"])
        .assert_code(2)
        .assert_stderr_has("--yes");
    snapshot(reg.root()).assert_unchanged(&before);

    legacy(&reg, &["-dr", "a/b/c"]).assert_ok();
    reg.restart();
    assert!(!v2.join("repositories/a").exists());
    assert_gone(&reg, "a/b/c", "1");
    assert_pulls(&reg, "team/web", "1");

    legacy(&reg, &["-dr", "-all"]).assert_ok();
    reg.restart();
    assert!(v2.join("repositories").is_dir());
    assert_eq!(fs::read_dir(v2.join("repositories")).unwrap().count(), 0);
    assert!(blobs_on_disk(&v2).is_empty());
    assert_gone(&reg, "team/web", "1");
    assert_gone(&reg, "app", "v2");
    assert_no_empty_blob_dirs(&v2);
}

// ---------------------------------------------------------------------------------------------
// 11. Refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn refusals_exit_2_and_change_nothing() {
    let reg = Registry::start();
    reg.push("app", "v1", &build_image(Format::Docker, &["rf-app"]));
    let before = snapshot(reg.root());

    dd(&reg, &["nope:v1"])
        .assert_code(2)
        .assert_stderr_has("`nope`")
        .assert_stderr_has("docker-delete ls");
    dd(&reg, &["app:nope"])
        .assert_code(2)
        .assert_stderr_has("`nope`")
        .assert_stderr_has("docker-delete ls app");
    dd(&reg, &["app:v1", "app:nope"]).assert_code(2);
    dd(&reg, &["delete-repo", "nope"])
        .assert_code(2)
        .assert_stderr_has("`nope`");
    for bad in ["../x:v1", "App:v1", "a//b", "/abs", "app@sha256:123"] {
        let out = dd(&reg, &[bad]);
        out.assert_code(2);
        assert!(
            out.stderr.contains(bad) || out.stderr.contains(bad.trim_start_matches('/')),
            "{bad}: {}",
            out.describe()
        );
    }
    // No terminal, no --yes: refuses at once, even with "y" waiting on stdin.
    let started = Instant::now();
    let mut a = local_opts(reg.root(), reg.config_path());
    a.extend(strings(&["--no-restart", "app:v1"]));
    let out = run_with_stdin(&a, "y\ny\n");
    out.assert_code(2).assert_stderr_has("--yes");
    assert!(started.elapsed() < Duration::from_secs(30));
    snapshot(reg.root()).assert_unchanged(&before);

    // The lock: another run holds it.
    let lock = fs::File::open(reg.v2()).unwrap();
    lock.try_lock().unwrap();
    dd(&reg, &["app:v1"])
        .assert_code(2)
        .assert_stderr_has("another docker-delete is running");
    drop(lock);
    snapshot(reg.root()).assert_unchanged(&before);
}

#[test]
fn refusals_for_a_missing_or_wrong_storage_root() {
    let dir = TestDir::new();
    let missing = dir.join("missing");
    let out = run(&strings(&[
        "--no-container",
        "--no-restart",
        "--no-gc",
        "-y",
        "--registry-dir",
        &missing.display().to_string(),
        "app:v1",
    ]));
    out.assert_code(2)
        .assert_stderr_has(&missing.display().to_string());
    assert!(!missing.exists(), "the tool created the missing root");

    let notree = dir.join("notree");
    fs::create_dir_all(notree.join("docker/registry/v2/blobs")).unwrap();
    let before = snapshot(&notree);
    for args in [&["app:v1"][..], &["ls"], &["gc"], &["delete-repo", "--all"]] {
        let mut a = strings(&[
            "--no-container",
            "--no-restart",
            "-y",
            "--registry-dir",
            &notree.display().to_string(),
        ]);
        a.extend(strings(args));
        run(&a)
            .assert_code(2)
            .assert_stderr_has("docker/registry/v2/repositories");
    }
    snapshot(&notree).assert_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------
// 12. Bad input in the tree
// ---------------------------------------------------------------------------------------------

#[test]
fn unreadable_links_and_repositories_are_reported_and_left_alone() {
    let mut reg = Registry::start();
    let one = build_image(Format::Docker, &["b-base", "b-one"]);
    let two = build_image(Format::Docker, &["b-base", "b-two"]);
    let good = build_image(Format::Docker, &["b-good"]);
    let fine = build_image(Format::Docker, &["b-fine"]);
    reg.push("app", "v1", &one);
    reg.push("app", "broken", &two);
    reg.push("good", "v1", &good);
    reg.push("fine", "1", &fine);
    reg.push("nomani", "1", &build_image(Format::Docker, &["b-nomani"]));
    let v2 = reg.v2();

    // app:broken has an empty current link; nomani has lost its _manifests.
    let broken_link = tag_path(&v2, "app", "broken").join("current/link");
    fs::write(&broken_link, "").unwrap();
    fs::remove_dir_all(repo_path(&v2, "nomani").join("_manifests")).unwrap();
    reg.restart();

    let out = dd_restart(&mut reg, &["app:v1", "good:v1"]);
    out.assert_code(1)
        .assert_stderr_has(&broken_link.display().to_string());
    // The tag selected went; nothing that depends on the unreadable link did.
    assert_gone(&reg, "app", "v1");
    assert!(broken_link.is_file());
    assert!(revision_link_path(&v2, "app", &one.digest).is_file());
    assert!(revision_link_path(&v2, "app", &two.digest).is_file());
    for d in layer_blobs(&one).union(&layer_blobs(&two)) {
        assert!(layer_link_path(&v2, "app", d).is_file(), "layer link {d}");
    }
    assert_blobs_present(&v2, &one.blob_digests());
    assert_blobs_present(&v2, &two.blob_digests());
    // The rest of the run went on: good:v1 is deleted and freed, everything else pulls.
    assert_gone(&reg, "good", "v1");
    assert_blobs_gone(&v2, &good.blob_digests());
    assert_pulls(&reg, "fine", "1");
    assert_pulls(&reg, "app", &two.digest);
    assert_pulls(&reg, "app", &one.digest);
    assert_no_empty_blob_dirs(&v2);

    // A repository without _manifests is reported by path.
    let nomani = repo_path(&v2, "nomani").join("_manifests");
    let out = dd(&reg, &["nomani"]);
    out.assert_code(2)
        .assert_stderr_has(&nomani.display().to_string());
    assert!(repo_path(&v2, "nomani").join("_layers").is_dir());
}

/// Why the tool kept something it could not read must be on stderr in a real run too, not only in
/// a dry run or at the confirmation prompt.
#[test]
fn a_confirmed_run_reports_what_it_kept_because_it_could_not_be_read() {
    let reg = Registry::start();
    let bad = build_image(Format::Docker, &["pp-bad"]);
    reg.push("app", "v1", &bad);
    let manifest_blob = blob_path(&reg.v2(), &bad.digest);
    fs::write(&manifest_blob, b"this is not json").unwrap();
    let out = dd(&reg, &["--no-gc", "app:v1"]);
    out.assert_code(1)
        .assert_stderr_has(&digest_hex(&bad.digest)[..12])
        .assert_stderr_has("cannot be read");
}

#[test]
fn a_manifest_that_is_not_json_is_reported_and_kept() {
    let mut reg = Registry::start();
    let bad = build_image(Format::Docker, &["j-base", "j-bad"]);
    let fine = build_image(Format::Docker, &["j-base", "j-fine"]);
    let other = build_image(Format::Docker, &["j-other"]);
    reg.push("app", "v1", &bad);
    reg.push("app", "fine", &fine);
    reg.push("other", "1", &other);
    let v2 = reg.v2();
    let manifest_blob = blob_path(&v2, &bad.digest);
    fs::write(&manifest_blob, b"this is not json").unwrap();
    reg.restart();

    // The dry run names the manifest blob and says the revision is kept.
    let dry = dd_bare(&reg, &["-n", "app:v1", "other:1"]);
    dry.assert_ok()
        .assert_stderr_has(&format!(
            "{}",
            Path::new("blobs/sha256")
                .join(&digest_hex(&bad.digest)[..2])
                .join(digest_hex(&bad.digest))
                .join("data")
                .display()
        ))
        .assert_stderr_has("kept");

    let out = dd_restart(&mut reg, &["app:v1", "other:1"]);
    // The registry's own collector stops at the first manifest it cannot parse, anywhere: nothing
    // is freed, and the tool reports that step as failed.
    out.assert_code(1)
        .assert_stderr_has("garbage-collect failed")
        .assert_stderr_has(&bad.digest);
    assert!(manifest_blob.is_file());
    assert!(revision_link_path(&v2, "app", &bad.digest).is_file());
    for d in layer_blobs(&bad) {
        assert!(layer_link_path(&v2, "app", &d).is_file(), "layer link {d}");
    }
    assert_blobs_present(&v2, &bad.blob_digests());
    assert_gone(&reg, "app", "v1");
    assert_gone(&reg, "other", "1");
    assert_blobs_present(&v2, &other.blob_digests());
    assert_pulls(&reg, "app", "fine");
}

#[test]
fn a_malformed_revision_link_is_reported_and_kept() {
    let mut reg = Registry::start();
    let one = build_image(Format::Docker, &["m-one"]);
    let two = build_image(Format::Docker, &["m-two"]);
    let fine = build_image(Format::Docker, &["m-fine"]);
    reg.push("rev", "v1", &one);
    reg.push("rev", "other", &two);
    reg.push("fine", "1", &fine);
    let v2 = reg.v2();
    let bad_rev = revision_link_path(&v2, "rev", &two.digest);
    fs::write(&bad_rev, "sha256:not-hex").unwrap();
    reg.restart();

    let out = dd_restart(&mut reg, &["rev:v1"]);
    // Reported with its path; the registry's collector then refuses the whole tree.
    out.assert_code(1)
        .assert_stderr_has(&bad_rev.display().to_string())
        .assert_stderr_has("garbage-collect failed");
    assert_eq!(fs::read_to_string(&bad_rev).unwrap(), "sha256:not-hex");
    assert_eq!(tag_current(&v2, "rev", "other"), two.digest);
    assert_blobs_present(&v2, &two.blob_digests());
    for d in layer_blobs(&two) {
        assert!(layer_link_path(&v2, "rev", &d).is_file(), "layer link {d}");
    }
    assert_gone(&reg, "rev", "v1");
    assert!(!revision_link_path(&v2, "rev", &one.digest).exists());
    assert_pulls(&reg, "fine", "1");
}

#[test]
fn symlinks_out_of_the_tree_are_never_followed() {
    let mut reg = Registry::start();
    let one = build_image(Format::Docker, &["s-base", "s-one"]);
    let two = build_image(Format::Docker, &["s-base", "s-two"]);
    reg.push("app", "v1", &one);
    reg.push("app", "v2", &two);
    reg.push("lnk", "v1", &one);
    let v2 = reg.v2();

    // Outside the root: a directory shaped like a tag and like a layer link.
    let outside = TestDir::new();
    let fake_tag = outside.join("tag");
    fs::create_dir_all(fake_tag.join("current")).unwrap();
    fs::write(fake_tag.join("current/link"), &one.digest).unwrap();
    let fake_layer = outside.join("layer");
    fs::create_dir_all(&fake_layer).unwrap();
    fs::write(fake_layer.join("link"), &one.layers[1].digest).unwrap();
    let outside_before = snapshot(outside.path());

    // app:evil is a symlinked tag dir; lnk's layer link for one's unique layer is a symlink.
    std::os::unix::fs::symlink(&fake_tag, tag_path(&v2, "app", "evil")).unwrap();
    let layer_dir = layer_link_path(&v2, "lnk", &one.layers[1].digest)
        .parent()
        .unwrap()
        .to_path_buf();
    fs::remove_dir_all(&layer_dir).unwrap();
    std::os::unix::fs::symlink(&fake_layer, &layer_dir).unwrap();

    let out = dd_restart(&mut reg, &["app:v1", "lnk:v1", "app:evil"]);
    assert_ne!(out.code, 0, "{}", out.describe());
    out.assert_stderr_has("symbolic link");
    snapshot(outside.path()).assert_unchanged(&outside_before);
    assert!(
        fs::symlink_metadata(tag_path(&v2, "app", "evil"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        fs::symlink_metadata(&layer_dir)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_pulls(&reg, "app", "v2");

    // Without naming the symlinked tag, the rest still works.
    let out = dd_restart(&mut reg, &["app:v1", "lnk:v1"]);
    snapshot(outside.path()).assert_unchanged(&outside_before);
    assert!(
        fs::symlink_metadata(&layer_dir)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // The run goes on, and its exit code says something could not be read.
    assert_eq!(out.code, 1, "{}", out.describe());
    assert!(out.stderr.contains("symbolic link"), "{}", out.describe());
    assert_gone(&reg, "app", "v1");
    assert_pulls(&reg, "app", "v2");
}

// ---------------------------------------------------------------------------------------------
// 13. Interruption and re-runs
// ---------------------------------------------------------------------------------------------

/// A registry with app:v1, app:v2 and other:1, and app:v1's tag removed by hand, as an
/// interrupted run leaves it after its first step.
fn interrupted_after_tag_removal() -> (Registry, Image, Image, Image) {
    let mut reg = Registry::start();
    let one = build_image(Format::Docker, &["i-base", "i-one"]);
    let two = build_image(Format::Docker, &["i-base", "i-two"]);
    let other = build_image(Format::Docker, &["i-other"]);
    reg.push("app", "v1", &one);
    reg.push("app", "v2", &two);
    reg.push("other", "1", &other);
    fs::remove_dir_all(tag_path(&reg.v2(), "app", "v1")).unwrap();
    reg.restart();
    (reg, one, two, other)
}

#[test]
fn after_an_interruption_the_digest_form_and_gc_finish_the_job() {
    let (mut reg, one, two, other) = interrupted_after_tag_removal();
    let v2 = reg.v2();
    assert_pulls(&reg, "app", "v2");
    assert_pulls(&reg, "other", "1");

    // gc alone frees nothing of v1 (its revision link still holds it) and changes no link.
    let links_before = snapshot(&repo_path(&v2, "app"));
    dd_restart(&mut reg, &["gc"]).assert_ok();
    snapshot(&repo_path(&v2, "app")).assert_unchanged(&links_before);
    assert_blobs_present(&v2, &one.blob_digests());

    // The manifest is untagged now: deleting it by digest finishes the job.
    let by_digest = format!("app@{}", one.digest);
    dd_restart(&mut reg, &[&by_digest]).assert_ok();
    assert!(!revision_link_path(&v2, "app", &one.digest).exists());
    assert_blobs_gone(&v2, &only_in(&one, &[&two]));
    for d in layer_blobs(&one).difference(&layer_blobs(&two)) {
        assert!(!layer_link_path(&v2, "app", d).exists(), "layer link {d}");
    }
    assert_pulls(&reg, "app", "v2");
    assert_pulls(&reg, "other", "1");
    assert_blobs_present(&v2, &other.blob_digests());

    // Deleting the other tag works as usual, and running it twice is refused unchanged.
    dd_restart(&mut reg, &["app:v2"]).assert_ok();
    assert_gone(&reg, "app", "v2");
    let before = snapshot(reg.root());
    dd(&reg, &["app:v2"])
        .assert_code(2)
        .assert_stderr_has("docker-delete ls app");
    snapshot(reg.root()).assert_unchanged(&before);
    assert_pulls(&reg, "other", "1");
}

#[test]
fn the_same_deletion_twice_is_refused_the_second_time() {
    let mut reg = Registry::start();
    let one = build_image(Format::Oci, &["tw-one"]);
    let two = build_image(Format::Oci, &["tw-two"]);
    reg.push("app", "v1", &one);
    reg.push("app", "v2", &two);
    dd_restart(&mut reg, &["app:v1"]).assert_ok();
    let before = snapshot(reg.root());
    dd(&reg, &["app:v1"])
        .assert_code(2)
        .assert_stderr_has("tag `v1` not found");
    snapshot(reg.root()).assert_unchanged(&before);
    assert_pulls(&reg, "app", "v2");
}

// ---------------------------------------------------------------------------------------------
// 14. ls
// ---------------------------------------------------------------------------------------------

#[test]
fn ls_lists_repositories_and_tags_as_text_and_json() {
    let reg = Registry::start();
    let one = build_image(Format::Docker, &["ls-one"]);
    let idx = build_multi_platform(Format::Oci, "ls-idx");
    reg.push("team/app", "v1", &one);
    reg.push("team/app", "latest", &one);
    reg.push("team/app", "multi", &idx);
    reg.push("a/b/c", "1", &one);
    let before = snapshot(reg.root());

    let ls = dd_bare(&reg, &["ls"]);
    ls.assert_ok();
    assert_eq!(ls.stdout.lines().collect::<Vec<_>>(), ["a/b/c", "team/app"]);

    let ls = dd_bare(&reg, &["ls", "team/app"]);
    ls.assert_ok();
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", ls.describe());
    let line = |tag: &str| {
        *lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(tag))
            .unwrap_or_else(|| panic!("no line for {tag}: {lines:?}"))
    };
    assert!(line("v1").contains(&one.digest) && line("v1").contains(DOCKER_MANIFEST));
    assert!(line("multi").contains(&idx.digest) && line("multi").contains(OCI_INDEX));

    let q = dd_bare(&reg, &["ls", "-q", "team/app"]);
    q.assert_ok();
    assert_eq!(
        q.stdout.lines().collect::<Vec<_>>(),
        ["latest", "multi", "v1"]
    );

    let j = dd_bare(&reg, &["--json", "ls"]);
    j.assert_ok();
    let v: Value = serde_json::from_str(&j.stdout).unwrap();
    assert_eq!(v, serde_json::json!(["a/b/c", "team/app"]));

    let j = dd_bare(&reg, &["ls", "team/app", "--json"]);
    j.assert_ok();
    let v: Value = serde_json::from_str(&j.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let multi = rows.iter().find(|r| r["tag"] == "multi").unwrap();
    assert_eq!(multi["digest"], idx.digest.as_str());
    assert_eq!(multi["media_type"], OCI_INDEX);

    dd_bare(&reg, &["ls", "nope"])
        .assert_code(2)
        .assert_stderr_has("docker-delete ls");
    snapshot(reg.root()).assert_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------
// Refusing early, and finishing what was started
// ---------------------------------------------------------------------------------------------

/// A dry run shows what the real run would do, so it refuses what the real run refuses.
#[test]
fn dry_run_refuses_what_the_real_run_refuses() {
    let reg = Registry::start();
    reg.push("app", "v1", &build_image(Format::Oci, &["dr-refuse"]));
    let mut a = local_opts(reg.root(), reg.config_path());
    a.extend(strings(&["-n", "app:v1"]));
    run(&a)
        .assert_code(2)
        .assert_stderr_has("no way to restart the registry");
}

/// Collection alone deletes no image: cron can run it with no terminal and no `--yes`.
#[test]
fn gc_needs_no_confirmation() {
    let reg = Registry::start();
    reg.push("app", "v1", &build_image(Format::Oci, &["gc-noconfirm"]));
    dd_bare(&reg, &["gc"])
        .assert_ok()
        .assert_stderr_has("garbage-collected");
    assert_pulls(&reg, "app", "v1");
}

/// A tree this user cannot write is refused before anything runs: no collection, no restart.
#[test]
fn unwritable_tree_is_refused_before_the_registry_is_touched() {
    let reg = ScriptRegistry::start();
    reg.push("app", "v1", &build_image(Format::Oci, &["ro-one"]));
    reg.push("app", "v2", &build_image(Format::Oci, &["ro-two"]));
    // Let an unprivileged user read (not write) the test's files.
    fs::set_permissions(reg.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let restarts = reg.restarts();
    let before = snapshot(&reg.root());

    let mut args: Vec<String> = strings(&["--reuid", "nobody", "--regid", "nogroup"]);
    args.push("--clear-groups".into());
    args.push(
        assert_cmd::cargo::cargo_bin("docker-delete")
            .display()
            .to_string(),
    );
    args.extend(local_opts(&reg.root(), &reg.config()));
    args.extend(strings(&[
        "-y",
        "--restart-cmd",
        &reg.restart_cmd(),
        "app:v1",
    ]));
    let out = Command::new("setpriv")
        .args(&args)
        .env("NO_COLOR", "1")
        .env_remove("DOCKER_REGISTRY_DIR")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("cannot write to the storage tree"),
        "stderr:\n{stderr}"
    );
    assert_eq!(reg.restarts(), restarts, "the registry was not restarted");
    snapshot(&reg.root()).assert_unchanged(&before);
}

/// A closed stderr (`2>&1 | head -1`) must not stop a run halfway.
#[test]
fn a_closed_output_pipe_does_not_stop_the_run() {
    let reg = ScriptRegistry::start();
    let one = build_image(Format::Oci, &["pipe-one"]);
    reg.push("app", "v1", &one);
    reg.push("app", "v2", &build_image(Format::Oci, &["pipe-two"]));
    let restarts = reg.restarts();
    let mut cmd = format!(
        "'{}'",
        assert_cmd::cargo::cargo_bin("docker-delete").display()
    );
    for a in local_opts(&reg.root(), &reg.config()) {
        cmd.push_str(&format!(" '{a}'"));
    }
    cmd.push_str(&format!(
        " -y --restart-cmd \"{}\" app:v1 2>&1 | head -c 1 >/dev/null",
        reg.restart_cmd()
    ));
    let st = Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("NO_COLOR", "1")
        .env_remove("DOCKER_REGISTRY_DIR")
        .status()
        .unwrap();
    assert!(st.success());
    // `head` exits first; the run itself goes on to the end.
    let deadline = Instant::now() + Duration::from_secs(60);
    while reg.restarts() == restarts || reg.v2().join("docker-delete-journal.json").exists() {
        assert!(
            Instant::now() < deadline,
            "the run stopped halfway: {}",
            reg.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!revision_link_path(&reg.v2(), "app", &one.digest).exists());
    assert_blobs_gone(&reg.v2(), &one.blob_digests());
    assert_eq!(status_manifest(&reg.url(), "app", "v1"), 404);
    pull_verify(&reg.url(), "app", "v2").unwrap();
}

/// The plan says, before anything runs, exactly how many blobs and bytes collection frees.
#[test]
fn the_plan_says_exactly_what_collection_frees() {
    let mut reg = rich_registry();
    let v2 = reg.v2();
    // Garbage from before (an aborted upload's blob, say) is freed too, and counted.
    let stray = push_blob(&reg.url(), "app", b"a blob no manifest references").unwrap();
    let refs = ["app:v1", "app:v2", "team/multi:ab"];
    let mut args = vec!["--dry-run", "--json"];
    args.extend(refs);
    let dry = dd_bare(&reg, &args);
    dry.assert_ok();
    let plan: Value = serde_json::from_str(&dry.stdout).unwrap();
    let (blobs, bytes) = (
        plan["freed"]["blobs"].as_u64().unwrap(),
        plan["freed"]["bytes"].as_u64().unwrap(),
    );

    let size = |d: &String| fs::metadata(blob_path(&v2, d)).unwrap().len();
    let before: Vec<(String, u64)> = blobs_on_disk(&v2)
        .into_iter()
        .map(|d| {
            let s = size(&d);
            (d, s)
        })
        .collect();
    dd_restart(&mut reg, &refs).assert_ok();
    let after = blobs_on_disk(&v2);
    let gone: Vec<&(String, u64)> = before.iter().filter(|(d, _)| !after.contains(d)).collect();
    assert!(gone.iter().any(|(d, _)| *d == stray), "the stray blob went");
    assert!(gone.len() > 3, "{gone:?}");
    assert_eq!(gone.len() as u64, blobs, "blobs freed");
    assert_eq!(
        gone.iter().map(|(_, s)| s).sum::<u64>(),
        bytes,
        "bytes freed"
    );
}

/// A removal that cannot happen leaves the tag whole: removals are renames into a trash
/// directory, which happen entirely or not at all (a recursive delete would have emptied the tag
/// before failing on its directory).
#[test]
fn a_failed_removal_leaves_the_tag_whole() {
    let reg = Registry::start();
    let one = build_image(Format::Oci, &["immut-one"]);
    reg.push("app", "v1", &one);
    reg.push("app", "v2", &build_image(Format::Oci, &["immut-two"]));
    let tags_dir = reg.v2().join("repositories/app/_manifests/tags");
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .arg(&tags_dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !chattr("+i") {
        eprintln!("skipped: chattr +i is not supported here");
        return;
    }
    let out = dd(&reg, &["app:v1"]);
    let unlocked = chattr("-i");
    assert!(unlocked);
    out.assert_code(1).assert_stderr_has("remove tag failed");
    assert_eq!(tag_current(&reg.v2(), "app", "v1"), one.digest);
    assert!(
        out.stderr.contains("no edit was made"),
        "{}",
        out.describe()
    );
    assert_pulls(&reg, "app", "v1");
}

/// A push while layer links are gone and the registry not yet restarted is told by the cache that
/// its layers exist, uploads nothing and writes no link; the image breaks at the next restart.
/// The next run (a deletion in that repository, or `gc`) links those layers again first.
#[test]
fn a_push_that_skipped_unlinked_layers_is_repaired_by_the_next_run() {
    for next in [&["app:other"][..], &["gc"][..]] {
        let mut reg = Registry::start();
        let old = build_image(Format::Docker, &["race-a", "race-b"]);
        reg.push("app", "v1", &old);
        reg.push(
            "app",
            "other",
            &build_image(Format::Docker, &["race-other"]),
        );
        // Edited, not restarted: the state an interrupted or --no-restart run leaves.
        dd(&reg, &["--no-gc", "app:v1"]).assert_ok();
        let shared = build_layer("race-a").digest;
        assert!(!layer_link_path(&reg.v2(), "app", &shared).exists());

        // The same layers in a new image: the cache says they exist, nothing is uploaded.
        let fresh = build_image(Format::Docker, &["race-a", "race-b", "race-new"]);
        let report = push_image(&reg.url(), "app", Some("fresh"), &fresh).unwrap();
        assert!(
            report.skipped.contains(&shared),
            "the premise: the layer upload was skipped: {report:?}"
        );
        assert!(!layer_link_path(&reg.v2(), "app", &shared).exists());

        let out = dd(&reg, next);
        out.assert_ok().assert_stderr_has("linked");
        reg.restart();
        reg.pull_verify("app", "fresh")
            .unwrap_or_else(|e| panic!("after {next:?}: {e}\n{}", out.describe()));
    }
}
