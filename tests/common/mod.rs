//! Test environment for the integration tests: temp dirs, the real Docker Distribution registry on a
//! loopback port, real images pushed through its HTTP API, pull-back verification (our own client
//! and `skopeo`), registry-tree inspection, and the `docker-delete` binary under test.
//!
//! Every test crate includes this with `mod common;` and uses only part of it, hence the
//! crate-wide `dead_code` allowance below.
#![allow(dead_code)]

pub mod container;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------------------------
// Media types
// ---------------------------------------------------------------------------------------------

/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list (multi-platform).
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzipped layer.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index (multi-platform).
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzipped layer.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// The OCI "empty" descriptor media type (content `{}`), used as an artifact's config.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Artifact type given to the signature referrers built by [`build_referrer`].
pub const SIGNATURE_ARTIFACT: &str = "application/vnd.example.signature.v1+json";

/// Every manifest media type, as sent in `Accept` when pulling.
pub const ALL_MANIFEST_TYPES: [&str; 5] = [
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_MANIFEST,
    OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

// ---------------------------------------------------------------------------------------------
// Temp dirs and small utilities
// ---------------------------------------------------------------------------------------------

/// A fresh temporary directory for one test, removed on drop.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    /// Creates an empty temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("docker-delete-test-")
            .tempdir()
            .expect("create temp dir");
        Self { dir }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `path()/rel`.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of `sha256:<hex>`; panics on anything else.
pub fn digest_hex(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest:?}"))
}

/// `examples/sample-registry/`, the shipped sample tree (see its README); serve a copy of it with
/// [`Registry::start_on_copy`], never the original.
pub fn sample_registry_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/sample-registry")
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Finds an executable by name on `PATH`.
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The registry binary: `docker-registry` (Debian) or `registry` (upstream) on `PATH`.
pub fn registry_binary() -> PathBuf {
    find_on_path("docker-registry")
        .or_else(|| find_on_path("registry"))
        .expect(
            "neither `docker-registry` nor `registry` is on PATH; \
             install Debian's package: apt-get install docker-registry (./scripts/test.sh does)",
        )
}

// ---------------------------------------------------------------------------------------------
// The real registry
// ---------------------------------------------------------------------------------------------

/// How long [`Registry`] waits for `GET /v2/` to answer after starting the process.
pub const REGISTRY_START_TIMEOUT: Duration = Duration::from_secs(10);

/// A real Docker Distribution registry (`docker-registry serve`) on `127.0.0.1:<port>`, storing
/// into a filesystem root. The process is killed on drop; the temp dirs it owns are removed after.
pub struct Registry {
    port: u16,
    root: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    // Dropped after `child` is killed (see `Drop`). Holds the config, log and, for `start`, the root.
    _dir: TestDir,
}

impl Registry {
    /// Starts a registry on a fresh, empty root in a temp dir.
    pub fn start() -> Self {
        let dir = TestDir::new();
        let root = dir.join("root");
        fs::create_dir_all(&root).expect("create registry root");
        Self::launch(dir, root)
    }

    /// Starts a registry serving an existing root (for example a copy of a shipped tree). The root
    /// is not removed on drop; the config and log live in a temp dir of their own.
    pub fn start_on(root: &Path) -> Self {
        assert!(
            root.is_dir(),
            "registry root {} is not a directory",
            root.display()
        );
        let root = root.canonicalize().expect("canonicalize registry root");
        Self::launch(TestDir::new(), root)
    }

    /// Starts a registry on a private copy of `tree` (a directory holding `docker/registry/v2`),
    /// copied without empty directories as a git checkout has it; the copy is removed on drop.
    pub fn start_on_copy(tree: &Path) -> Self {
        let dir = TestDir::new();
        let root = dir.join("root");
        copy_tree_without_empty_dirs(tree, &root);
        Self::launch(dir, root)
    }

    fn launch(dir: TestDir, root: PathBuf) -> Self {
        let config_path = dir.join("config.yml");
        let log_path = dir.join("registry.log");
        let mut registry = Self {
            port: 0,
            root,
            config_path,
            log_path,
            child: None,
            _dir: dir,
        };
        // Another test may grab the port between `free_port` and the registry's bind; try again.
        let mut last_error = String::new();
        for _ in 0..5 {
            registry.port = free_port();
            fs::write(
                &registry.config_path,
                config_yaml(registry.port, &registry.root),
            )
            .expect("write registry config");
            match registry.spawn_and_wait() {
                Ok(()) => return registry,
                Err(e) => {
                    registry.stop();
                    last_error = e;
                }
            }
        }
        panic!("registry did not start: {last_error}")
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:<port>`, the registry's host as image references spell it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The port the registry listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `storage.filesystem.rootdirectory`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The registry's `config.yml`.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `<root>/docker/registry/v2`, where the layout starts.
    pub fn v2(&self) -> PathBuf {
        self.root.join("docker/registry/v2")
    }

    /// The registry process's combined stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the registry process and waits for it to exit. Harmless when already stopped.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the registry (if running) and starts it again on the same port and root, which
    /// drops its in-memory caches. Panics if it does not answer within the timeout.
    pub fn restart(&mut self) {
        self.stop();
        // The old listener is gone once the process is reaped, but be patient with the kernel.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(_) if Instant::now() < deadline => {
                    self.stop();
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("registry did not restart on port {}: {e}", self.port),
            }
        }
    }

    /// Runs `<registry> garbage-collect [args] <config>` against this registry's config and
    /// returns its output (it is not checked; see [`Registry::garbage_collect_ok`]).
    pub fn garbage_collect(&self, args: &[&str]) -> Output {
        Command::new(registry_binary())
            .arg("garbage-collect")
            .args(args)
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .output()
            .expect("run registry garbage-collect")
    }

    /// [`Registry::garbage_collect`], panicking with its output unless it succeeded.
    pub fn garbage_collect_ok(&self, args: &[&str]) -> String {
        let out = self.garbage_collect(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "garbage-collect failed: {text}");
        text
    }

    /// Pushes `image` (its blobs, children and manifest) to `repo` under `tag`; panics on error.
    pub fn push(&self, repo: &str, tag: &str, image: &Image) {
        push_image(&self.url(), repo, Some(tag), image)
            .unwrap_or_else(|e| panic!("push {repo}:{tag}: {e}\nregistry log:\n{}", self.log()));
    }

    /// Pushes `image` to `repo` by digest only (no tag); panics on error.
    pub fn push_untagged(&self, repo: &str, image: &Image) {
        push_image(&self.url(), repo, None, image).unwrap_or_else(|e| {
            panic!(
                "push {repo}@{}: {e}\nregistry log:\n{}",
                image.digest,
                self.log()
            )
        });
    }

    /// [`pull_verify`] against this registry.
    pub fn pull_verify(&self, repo: &str, reference: &str) -> Result<(), String> {
        pull_verify(&self.url(), repo, reference)
    }

    /// [`status_manifest`] against this registry.
    pub fn status_manifest(&self, repo: &str, reference: &str) -> u16 {
        status_manifest(&self.url(), repo, reference)
    }

    /// [`status_blob`] against this registry.
    pub fn status_blob(&self, repo: &str, digest: &str) -> u16 {
        status_blob(&self.url(), repo, digest)
    }

    /// [`skopeo_pull`] against this registry.
    pub fn skopeo_pull(&self, repo: &str, reference: &str, all: bool) -> Result<(), String> {
        skopeo_pull(&self.addr(), repo, reference, all)
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| format!("open {}: {e}", self.log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", registry_binary().display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + REGISTRY_START_TIMEOUT;
        let url = format!("{}/v2/", self.url());
        loop {
            if !self.is_running() {
                return Err(format!(
                    "registry exited during start-up; log:\n{}",
                    self.log()
                ));
            }
            // Connect first so a not-yet-listening port does not cost an HTTP error round.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && let Ok(resp) = agent().get(&url).call()
                && resp.status().as_u16() == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "GET {url} did not answer 200 within {REGISTRY_START_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The config the tests run the registry with (see registry-storage.md, "Verified recipes").
/// `storage.delete.enabled` is deliberately absent: docker-delete edits the tree, not the API.
pub fn config_yaml(port: u16, root: &Path) -> String {
    format!(
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: true\n\
         storage:\n  filesystem:\n    rootdirectory: '{root}'\n  cache:\n    blobdescriptor: inmemory\n\
         http:\n  addr: 127.0.0.1:{port}\n  secret: docker-delete-tests\n",
        // Single-quoted YAML: only `'` needs escaping (doubled).
        root = root.display().to_string().replace('\'', "''")
    )
}

// ---------------------------------------------------------------------------------------------
// Images: real layers, configs and manifests, built deterministically from seed strings
// ---------------------------------------------------------------------------------------------

/// Which family of media types an image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Docker schema 2 manifest; a multi-platform image is a Docker manifest list.
    Docker,
    /// OCI image manifest; a multi-platform image is an OCI image index.
    Oci,
}

/// A content-addressed blob (layer, config, or a manifest's bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// The media type its descriptor carries.
    pub media_type: String,
    /// The content.
    pub bytes: Vec<u8>,
}

impl Blob {
    /// Wraps `bytes`, computing the digest.
    pub fn new(media_type: &str, bytes: Vec<u8>) -> Self {
        Self {
            digest: sha256_digest(&bytes),
            media_type: media_type.to_string(),
            bytes,
        }
    }

    /// The descriptor JSON (`mediaType`, `digest`, `size`).
    pub fn descriptor(&self) -> Value {
        json!({ "mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len() })
    }
}

/// A layer: a gzipped tar and the digest of the uncompressed tar (its `diff_id`).
#[derive(Debug, Clone)]
pub struct Layer {
    /// The gzipped tar, as pushed.
    pub gz: Vec<u8>,
    /// `sha256:` of the gzipped tar (the blob digest).
    pub digest: String,
    /// `sha256:` of the uncompressed tar (goes into the config's `rootfs.diff_ids`).
    pub diff_id: String,
}

/// Builds a small real layer from `seed`: a gzipped tar holding `seed/<seed>.txt` and 2 KiB of
/// pseudo-random bytes in `seed/<seed>.bin`. The same seed always gives the same bytes.
pub fn build_layer(seed: &str) -> Layer {
    let name = seed.replace(['/', ':', ' '], "_");
    let text = format!("layer seed: {seed}\n").into_bytes();
    // A SHA-256 chain: incompressible, so the blob keeps a realistic size of a few KB.
    let mut random = Vec::with_capacity(2048);
    let mut block = Sha256::digest(seed.as_bytes()).to_vec();
    while random.len() < 2048 {
        random.extend_from_slice(&block);
        block = Sha256::digest(&block).to_vec();
    }
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in [
        (format!("seed/{name}.txt"), &text),
        (format!("seed/{name}.bin"), &random),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, &path, data.as_slice())
            .expect("append to tar");
    }
    let tar = builder.into_inner().expect("finish tar");
    // GzBuilder writes mtime 0 and no file name, so the output is deterministic.
    let mut gz = flate2::GzBuilder::new().write(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip layer");
    let gz = gz.finish().expect("finish gzip");
    Layer {
        digest: sha256_digest(&gz),
        diff_id: sha256_digest(&tar),
        gz,
    }
}

/// A built image: a single-platform manifest (with config and layers), an index / manifest list
/// (with children), or a referrer (with `subject`). Push it with [`push_image`].
#[derive(Debug, Clone)]
pub struct Image {
    /// `sha256:` of `manifest`.
    pub digest: String,
    /// The manifest's media type (also sent as `Content-Type` on push).
    pub media_type: String,
    /// The manifest's exact bytes.
    pub manifest: Vec<u8>,
    /// The config blob; `None` for an index.
    pub config: Option<Blob>,
    /// The layer blobs, in order; empty for an index.
    pub layers: Vec<Blob>,
    /// The platform images of an index, pushed by digest before it.
    pub children: Vec<Image>,
    /// `(os, architecture)` of a single-platform image.
    pub platform: Option<(String, String)>,
    /// The digest in `subject`, for a referrer.
    pub subject: Option<String>,
}

impl Image {
    /// The config's digest, if this is a single-platform image or a referrer.
    pub fn config_digest(&self) -> Option<&str> {
        self.config.as_ref().map(|c| c.digest.as_str())
    }

    /// The layer digests, in manifest order.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }

    /// The digests of the children of an index, in index order.
    pub fn child_digests(&self) -> Vec<String> {
        self.children.iter().map(|c| c.digest.clone()).collect()
    }

    /// Every blob this image uses: its manifest, config and layers and, for an index, the same for
    /// every child. These are the files under `blobs/` the image needs.
    pub fn blob_digests(&self) -> BTreeSet<String> {
        let mut all = BTreeSet::new();
        all.insert(self.digest.clone());
        all.extend(self.config.iter().map(|c| c.digest.clone()));
        all.extend(self.layers.iter().map(|l| l.digest.clone()));
        for child in &self.children {
            all.extend(child.blob_digests());
        }
        all
    }

    /// The manifest digests this image consists of: its own and its children's.
    pub fn manifest_digests(&self) -> BTreeSet<String> {
        let mut all = BTreeSet::from([self.digest.clone()]);
        for child in &self.children {
            all.extend(child.manifest_digests());
        }
        all
    }

    /// The descriptor other manifests use to point at this one (with `platform` when known).
    pub fn descriptor(&self) -> Value {
        let mut d = json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.manifest.len(),
        });
        if let Some((os, arch)) = &self.platform {
            d["platform"] = json!({ "architecture": arch, "os": os });
        }
        d
    }
}

/// A linux/amd64 image with one layer per seed.
pub fn build_image(format: Format, layer_seeds: &[&str]) -> Image {
    build_image_for(format, "amd64", layer_seeds)
}

/// A linux/`arch` image with one layer per seed. The config records the seeds as a label, so
/// the same seeds and architecture always give the same digest, and different seeds a different one.
pub fn build_image_for(format: Format, arch: &str, layer_seeds: &[&str]) -> Image {
    let (manifest_type, config_type, layer_type) = match format {
        Format::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
        Format::Oci => (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    };
    let built: Vec<Layer> = layer_seeds.iter().map(|s| build_layer(s)).collect();
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Cmd": ["/bin/sh"],
            "Labels": { "org.example.seeds": layer_seeds.join(",") },
        },
        "rootfs": {
            "type": "layers",
            "diff_ids": built.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": layer_seeds.iter()
            .map(|s| json!({ "created": "1970-01-01T00:00:00Z", "created_by": format!("layer {s}") }))
            .collect::<Vec<_>>(),
    });
    let config = Blob::new(config_type, to_json(&config));
    let layers: Vec<Blob> = built
        .into_iter()
        .map(|l| Blob::new(layer_type, l.gz))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    let manifest = to_json(&manifest);
    Image {
        digest: sha256_digest(&manifest),
        media_type: manifest_type.to_string(),
        manifest,
        config: Some(config),
        layers,
        children: Vec::new(),
        platform: Some(("linux".to_string(), arch.to_string())),
        subject: None,
    }
}

/// An OCI image index (`Format::Oci`) or Docker manifest list (`Format::Docker`) over `children`.
pub fn build_index(format: Format, children: Vec<Image>) -> Image {
    let media_type = match format {
        Format::Docker => DOCKER_MANIFEST_LIST,
        Format::Oci => OCI_INDEX,
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": children.iter().map(Image::descriptor).collect::<Vec<_>>(),
    });
    let manifest = to_json(&manifest);
    Image {
        digest: sha256_digest(&manifest),
        media_type: media_type.to_string(),
        manifest,
        config: None,
        layers: Vec::new(),
        children,
        platform: None,
        subject: None,
    }
}

/// A two-platform image (linux/amd64 and linux/arm64) in `format`'s index type. Each child has a
/// layer `<seed>-common` (the same blob in both) and a layer `<seed>-<arch>`.
pub fn build_multi_platform(format: Format, seed: &str) -> Image {
    let common = format!("{seed}-common");
    let children = ["amd64", "arm64"]
        .iter()
        .map(|arch| build_image_for(format, arch, &[&common, &format!("{seed}-{arch}")]))
        .collect();
    build_index(format, children)
}

/// An OCI artifact manifest whose `subject` is `subject` and whose `artifactType` is
/// [`SIGNATURE_ARTIFACT`]: a stand-in for a signature. Push it by digest with
/// [`Registry::push_untagged`].
pub fn build_referrer(subject: &Image, seed: &str) -> Image {
    let config = Blob::new(OCI_EMPTY, b"{}".to_vec());
    let payload = format!("{{\"signed\":\"{}\",\"seed\":\"{seed}\"}}", subject.digest);
    let layer = Blob::new(SIGNATURE_ARTIFACT, payload.into_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE_ARTIFACT,
        "config": config.descriptor(),
        "layers": [layer.descriptor()],
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.manifest.len(),
        },
        "annotations": { "org.example.seed": seed },
    });
    let manifest = to_json(&manifest);
    Image {
        digest: sha256_digest(&manifest),
        media_type: OCI_MANIFEST.to_string(),
        manifest,
        config: Some(config),
        layers: vec![layer],
        children: Vec::new(),
        platform: None,
        subject: Some(subject.digest.clone()),
    }
}

fn to_json(value: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(value).expect("serialise JSON")
}

// ---------------------------------------------------------------------------------------------
// Registry HTTP API: push
// ---------------------------------------------------------------------------------------------

/// The HTTP agent the helpers use: no proxy (loopback only), 4xx/5xx are answers, not errors,
/// no redirects followed, 30 s overall timeout.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

fn read_body(resp: &mut ureq::http::Response<ureq::Body>) -> Result<Vec<u8>, String> {
    resp.body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_to_vec()
        .map_err(|e| format!("reading response body: {e}"))
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn unexpected(what: &str, mut resp: ureq::http::Response<ureq::Body>) -> String {
    let status = resp.status().as_u16();
    let body = read_body(&mut resp).unwrap_or_default();
    format!("{what}: HTTP {status}: {}", String::from_utf8_lossy(&body))
}

/// Turns an upload `Location` (relative or absolute, with or without a query) into an absolute
/// URL with `extra` (`key=value`) appended to its query.
pub fn upload_url(base_url: &str, location: &str, extra: &str) -> String {
    let absolute = if location.starts_with("http://") || location.starts_with("https://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{base_url}{location}")
    } else {
        format!("{base_url}/{location}")
    };
    let sep = if absolute.contains('?') { '&' } else { '?' };
    format!("{absolute}{sep}{extra}")
}

/// Uploads `bytes` to `repo` as one monolithic blob upload (POST, then PUT `?digest=`), without
/// asking first whether the registry has it. Returns the digest.
pub fn push_blob(url: &str, repo: &str, bytes: &[u8]) -> Result<String, String> {
    let digest = sha256_digest(bytes);
    let agent = agent();
    let start = format!("{url}/v2/{repo}/blobs/uploads/");
    let resp = agent
        .post(&start)
        .send_empty()
        .map_err(|e| format!("POST {start}: {e}"))?;
    if resp.status().as_u16() != 202 {
        return Err(unexpected(&format!("POST {start}"), resp));
    }
    let location = header(&resp, "Location").ok_or(format!("POST {start}: no Location"))?;
    let put = upload_url(url, &location, &format!("digest={digest}"));
    let resp = agent
        .put(&put)
        .header("Content-Type", "application/octet-stream")
        .send(bytes)
        .map_err(|e| format!("PUT {put}: {e}"))?;
    if resp.status().as_u16() != 201 {
        return Err(unexpected(&format!("PUT blob {digest} to {repo}"), resp));
    }
    Ok(digest)
}

/// Asks the registry to mount `digest` from `from_repo` into `repo`. Returns the status: 201 when
/// mounted; on 202 (the registry started an upload instead) that upload is cancelled first.
pub fn mount_blob(url: &str, repo: &str, from_repo: &str, digest: &str) -> Result<u16, String> {
    let agent = agent();
    let post = format!("{url}/v2/{repo}/blobs/uploads/?mount={digest}&from={from_repo}");
    let resp = agent
        .post(&post)
        .send_empty()
        .map_err(|e| format!("POST {post}: {e}"))?;
    let status = resp.status().as_u16();
    if status == 202
        && let Some(location) = header(&resp, "Location")
    {
        // An unfinished upload would leave `_uploads/<uuid>/` in the tree; do not leave litter.
        let cancel = upload_url(url, &location, "cancel=1");
        let _ = agent.delete(&cancel).call();
    }
    Ok(status)
}

/// PUTs a manifest to `/v2/<repo>/manifests/<reference>` (a tag or its digest) with
/// `Content-Type: media_type`. Returns the `Docker-Content-Digest` the registry answered.
pub fn push_manifest(
    url: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    bytes: &[u8],
) -> Result<String, String> {
    let put = format!("{url}/v2/{repo}/manifests/{reference}");
    let resp = agent()
        .put(&put)
        .header("Content-Type", media_type)
        .send(bytes)
        .map_err(|e| format!("PUT {put}: {e}"))?;
    if resp.status().as_u16() != 201 {
        return Err(unexpected(&format!("PUT {put}"), resp));
    }
    Ok(header(&resp, "Docker-Content-Digest").unwrap_or_else(|| sha256_digest(bytes)))
}

/// What [`push_image`] sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// Blobs uploaded.
    pub uploaded: Vec<String>,
    /// Blobs skipped because `HEAD` said the repository already had them (as Docker does).
    pub skipped: Vec<String>,
    /// Manifests PUT, in order, as `reference -> digest`.
    pub manifests: Vec<(String, String)>,
}

/// Pushes `image` to `repo` the way a client does: for each blob, `HEAD` it and upload it only when
/// missing; push an index's children by digest first; then PUT the manifest under `tag`, or
/// under its digest when `tag` is `None`.
pub fn push_image(
    url: &str,
    repo: &str,
    tag: Option<&str>,
    image: &Image,
) -> Result<PushReport, String> {
    let mut report = PushReport::default();
    push_into(url, repo, tag, image, &mut report)?;
    Ok(report)
}

fn push_into(
    url: &str,
    repo: &str,
    tag: Option<&str>,
    image: &Image,
    report: &mut PushReport,
) -> Result<(), String> {
    for child in &image.children {
        push_into(url, repo, None, child, report)?;
    }
    for blob in image.config.iter().chain(&image.layers) {
        if status_blob(url, repo, &blob.digest) == 200 {
            report.skipped.push(blob.digest.clone());
        } else {
            push_blob(url, repo, &blob.bytes)?;
            report.uploaded.push(blob.digest.clone());
        }
    }
    let reference = tag.unwrap_or(&image.digest);
    let digest = push_manifest(url, repo, reference, &image.media_type, &image.manifest)?;
    if digest != image.digest {
        return Err(format!(
            "registry stored {repo}:{reference} as {digest}, expected {}",
            image.digest
        ));
    }
    report.manifests.push((reference.to_string(), digest));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Registry HTTP API: pull and verify
// ---------------------------------------------------------------------------------------------

fn accept_all() -> String {
    ALL_MANIFEST_TYPES.join(", ")
}

/// `HEAD /v2/<repo>/manifests/<reference>` (accepting every manifest type); the status code.
/// Panics when the registry cannot be reached at all.
pub fn status_manifest(url: &str, repo: &str, reference: &str) -> u16 {
    let head = format!("{url}/v2/{repo}/manifests/{reference}");
    agent()
        .head(&head)
        .header("Accept", accept_all())
        .call()
        .unwrap_or_else(|e| panic!("HEAD {head}: {e}"))
        .status()
        .as_u16()
}

/// `HEAD /v2/<repo>/blobs/<digest>`; the status code. Panics when the registry cannot be reached.
pub fn status_blob(url: &str, repo: &str, digest: &str) -> u16 {
    let head = format!("{url}/v2/{repo}/blobs/{digest}");
    agent()
        .head(&head)
        .call()
        .unwrap_or_else(|e| panic!("HEAD {head}: {e}"))
        .status()
        .as_u16()
}

/// GETs a manifest; returns `(digest, media type, bytes)` after checking that the bytes hash to
/// the digest (the `Docker-Content-Digest` header, or `reference` when it is a digest).
pub fn get_manifest(
    url: &str,
    repo: &str,
    reference: &str,
) -> Result<(String, String, Vec<u8>), String> {
    let get = format!("{url}/v2/{repo}/manifests/{reference}");
    let mut resp = agent()
        .get(&get)
        .header("Accept", accept_all())
        .call()
        .map_err(|e| format!("GET {get}: {e}"))?;
    if resp.status().as_u16() != 200 {
        return Err(unexpected(
            &format!("GET manifest {repo}:{reference}"),
            resp,
        ));
    }
    let media_type = header(&resp, "Content-Type").unwrap_or_default();
    let claimed = header(&resp, "Docker-Content-Digest");
    let body = read_body(&mut resp)?;
    let actual = sha256_digest(&body);
    let expected = if reference.starts_with("sha256:") {
        reference.to_string()
    } else {
        claimed.clone().ok_or(format!(
            "GET manifest {repo}:{reference}: no Docker-Content-Digest"
        ))?
    };
    if actual != expected {
        return Err(format!(
            "manifest {repo}:{reference} hashes to {actual}, expected {expected}"
        ));
    }
    if let Some(claimed) = claimed
        && claimed != actual
    {
        return Err(format!(
            "manifest {repo}:{reference}: Docker-Content-Digest {claimed} but body is {actual}"
        ));
    }
    Ok((actual, media_type, body))
}

/// GETs a blob and checks that it hashes to `digest`; returns its bytes.
pub fn get_blob(url: &str, repo: &str, digest: &str) -> Result<Vec<u8>, String> {
    let get = format!("{url}/v2/{repo}/blobs/{digest}");
    let mut resp = agent()
        .get(&get)
        .call()
        .map_err(|e| format!("GET {get}: {e}"))?;
    if resp.status().as_u16() != 200 {
        return Err(unexpected(&format!("GET blob {repo}@{digest}"), resp));
    }
    let body = read_body(&mut resp)?;
    let actual = sha256_digest(&body);
    if actual != digest {
        return Err(format!("blob {repo}@{digest} hashes to {actual}"));
    }
    Ok(body)
}

/// Pulls `repo:reference` (a tag or digest) completely and checks every byte: the manifest hashes
/// to its digest; an index's children are pulled the same way; the config and every layer are
/// fetched and hash to (and have the size of) their descriptors.
pub fn pull_verify(url: &str, repo: &str, reference: &str) -> Result<(), String> {
    let (_, media_type, body) = get_manifest(url, repo, reference)?;
    let manifest: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("manifest {repo}:{reference} is not JSON: {e}"))?;
    if let Some(children) = manifest.get("manifests").and_then(Value::as_array) {
        if children.is_empty() {
            return Err(format!("index {repo}:{reference} has no manifests"));
        }
        for child in children {
            let digest = descriptor_digest(child, repo, reference)?;
            pull_verify(url, repo, digest)?;
        }
        return Ok(());
    }
    if media_type.contains("prettyjws") {
        for layer in manifest["fsLayers"].as_array().into_iter().flatten() {
            let digest = layer["blobSum"]
                .as_str()
                .ok_or("fsLayers without blobSum")?;
            get_blob(url, repo, digest)?;
        }
        return Ok(());
    }
    let config = manifest
        .get("config")
        .ok_or(format!("manifest {repo}:{reference} has no config"))?;
    let mut descriptors = vec![config];
    descriptors.extend(manifest["layers"].as_array().into_iter().flatten());
    for d in descriptors {
        let digest = descriptor_digest(d, repo, reference)?;
        let bytes = get_blob(url, repo, digest)?;
        if let Some(size) = d.get("size").and_then(Value::as_u64)
            && size != bytes.len() as u64
        {
            return Err(format!(
                "blob {repo}@{digest} is {} bytes, descriptor says {size}",
                bytes.len()
            ));
        }
    }
    Ok(())
}

fn descriptor_digest<'a>(d: &'a Value, repo: &str, reference: &str) -> Result<&'a str, String> {
    d.get("digest").and_then(Value::as_str).ok_or(format!(
        "manifest {repo}:{reference}: descriptor without digest: {d}"
    ))
}

/// Copies `addr/repo` at `reference` (a tag, or a `sha256:` digest) with `skopeo copy` into a
/// throw-away `dir:` destination, as an independent real client. `all` adds `--all` (every
/// platform of an index). `Err` carries skopeo's output.
pub fn skopeo_pull(addr: &str, repo: &str, reference: &str, all: bool) -> Result<(), String> {
    let skopeo = find_on_path("skopeo")
        .expect("`skopeo` is not on PATH; apt-get install skopeo (./scripts/test.sh does)");
    let sep = if reference.starts_with("sha256:") {
        '@'
    } else {
        ':'
    };
    let source = format!("docker://{addr}/{repo}{sep}{reference}");
    let dest = TestDir::new();
    let mut cmd = Command::new(skopeo);
    cmd.args(["--insecure-policy", "copy", "--src-tls-verify=false"]);
    if all {
        cmd.arg("--all");
    }
    let out = cmd
        .arg(&source)
        .arg(format!("dir:{}", dest.join("image").display()))
        .stdin(Stdio::null())
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .output()
        .map_err(|e| format!("run skopeo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "skopeo copy {source} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The registry tree
// ---------------------------------------------------------------------------------------------

/// `v2/blobs/sha256/<2 hex>/<hex>/data` for `digest`.
pub fn blob_path(v2: &Path, digest: &str) -> PathBuf {
    let hex = digest_hex(digest);
    v2.join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// `v2/repositories/<repo>`.
pub fn repo_path(v2: &Path, repo: &str) -> PathBuf {
    v2.join("repositories").join(repo)
}

/// `v2/repositories/<repo>/_manifests/tags/<tag>`.
pub fn tag_path(v2: &Path, repo: &str, tag: &str) -> PathBuf {
    repo_path(v2, repo).join("_manifests/tags").join(tag)
}

/// `.../_manifests/revisions/sha256/<hex>/link`.
pub fn revision_link_path(v2: &Path, repo: &str, digest: &str) -> PathBuf {
    repo_path(v2, repo)
        .join("_manifests/revisions/sha256")
        .join(digest_hex(digest))
        .join("link")
}

/// `.../_layers/sha256/<hex>/link`.
pub fn layer_link_path(v2: &Path, repo: &str, digest: &str) -> PathBuf {
    repo_path(v2, repo)
        .join("_layers/sha256")
        .join(digest_hex(digest))
        .join("link")
}

/// Reads a `link` file (`sha256:<hex>`); panics if it is missing.
pub fn read_link(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read link {}: {e}", path.display()))
}

/// The digest `repo:tag` currently points at, from `current/link`.
pub fn tag_current(v2: &Path, repo: &str, tag: &str) -> String {
    read_link(&tag_path(v2, repo, tag).join("current/link"))
}

/// Every digest in `repo:tag`'s history (`index/sha256/*`), sorted.
pub fn tag_history(v2: &Path, repo: &str, tag: &str) -> Vec<String> {
    list_sha256_dir(&tag_path(v2, repo, tag).join("index/sha256"))
}

/// The digests with a revision link in `repo`, sorted.
pub fn revisions(v2: &Path, repo: &str) -> Vec<String> {
    list_sha256_dir(&repo_path(v2, repo).join("_manifests/revisions/sha256"))
}

/// The digests with a `_layers` link in `repo`, sorted.
pub fn layer_links(v2: &Path, repo: &str) -> Vec<String> {
    list_sha256_dir(&repo_path(v2, repo).join("_layers/sha256"))
}

/// The tag names of `repo`, sorted.
pub fn tags(v2: &Path, repo: &str) -> Vec<String> {
    list_dir_names(&repo_path(v2, repo).join("_manifests/tags"))
}

/// Every digest that has a `data` file in the blob store, sorted.
pub fn blobs_on_disk(v2: &Path) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for prefix in list_dir_names(&v2.join("blobs/sha256")) {
        for hex in list_dir_names(&v2.join("blobs/sha256").join(prefix)) {
            let digest = format!("sha256:{hex}");
            if blob_path(v2, &digest).is_file() {
                all.insert(digest);
            }
        }
    }
    all
}

/// Repository names (every directory below `repositories/` that holds `_manifests`), sorted.
pub fn repositories(v2: &Path) -> Vec<String> {
    let base = v2.join("repositories");
    let mut names: Vec<String> = walkdir::WalkDir::new(&base)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_dir() && e.file_name() == "_manifests")
        .filter_map(|e| {
            let parent = e.path().parent()?.strip_prefix(&base).ok()?;
            Some(parent.to_string_lossy().replace('\\', "/"))
        })
        .collect();
    names.sort();
    names
}

fn list_dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn list_sha256_dir(dir: &Path) -> Vec<String> {
    list_dir_names(dir)
        .into_iter()
        .map(|hex| format!("sha256:{hex}"))
        .collect()
}

/// Every empty directory strictly below `below`, relative to it, sorted.
pub fn empty_dirs(below: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = walkdir::WalkDir::new(below)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_dir())
        .filter(|e| {
            fs::read_dir(e.path())
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        })
        .map(|e| e.path().strip_prefix(below).unwrap().to_path_buf())
        .collect();
    out.sort();
    out
}

/// One entry of a [`TreeSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir,
    /// A regular file: its `sha256:` digest and length.
    File {
        /// `sha256:` of the content.
        digest: String,
        /// Length in bytes.
        len: u64,
    },
    /// A symbolic link and its target.
    Symlink(PathBuf),
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Dir => write!(f, "dir"),
            Entry::File { digest, len } => write!(f, "file {len} bytes {digest}"),
            Entry::Symlink(t) => write!(f, "symlink -> {}", t.display()),
        }
    }
}

/// Every path below a root (relative, sorted) with what is there: to assert "tree unchanged".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSnapshot {
    /// Relative path to entry; the root itself is not included.
    pub entries: BTreeMap<PathBuf, Entry>,
}

impl TreeSnapshot {
    /// Snapshots everything below `root` (not following symlinks).
    pub fn take(root: &Path) -> Self {
        let mut entries = BTreeMap::new();
        for e in walkdir::WalkDir::new(root).min_depth(1) {
            let e = e.unwrap_or_else(|err| panic!("walk {}: {err}", root.display()));
            let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
            let ft = e.file_type();
            let entry = if ft.is_symlink() {
                Entry::Symlink(fs::read_link(e.path()).expect("read symlink"))
            } else if ft.is_dir() {
                Entry::Dir
            } else {
                let bytes = fs::read(e.path()).expect("read file");
                Entry::File {
                    digest: sha256_digest(&bytes),
                    len: bytes.len() as u64,
                }
            };
            entries.insert(rel, entry);
        }
        Self { entries }
    }

    /// Human-readable differences from `self` to `after` (`+` added, `-` removed, `~` changed).
    pub fn diff(&self, after: &TreeSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        for (path, before) in &self.entries {
            match after.entries.get(path) {
                None => out.push(format!("- {} ({before})", path.display())),
                Some(now) if now != before => {
                    out.push(format!("~ {} ({before} -> {now})", path.display()))
                }
                Some(_) => {}
            }
        }
        for (path, now) in &after.entries {
            if !self.entries.contains_key(path) {
                out.push(format!("+ {} ({now})", path.display()));
            }
        }
        out
    }

    /// Panics, listing the differences, unless `after` equals `self`.
    pub fn assert_unchanged(&self, after: &TreeSnapshot) {
        let diff = self.diff(after);
        assert!(diff.is_empty(), "tree changed:\n{}", diff.join("\n"));
    }
}

/// Snapshot of everything below `root`; see [`TreeSnapshot`].
pub fn snapshot(root: &Path) -> TreeSnapshot {
    TreeSnapshot::take(root)
}

/// Copies the tree below `from` into `to` (created), files and directories, empty ones included.
pub fn copy_tree(from: &Path, to: &Path) {
    copy_tree_filtered(from, to, true);
}

/// Copies the files below `from` into `to`, creating only the directories that hold files: what a
/// git checkout of the tree gives.
pub fn copy_tree_without_empty_dirs(from: &Path, to: &Path) {
    copy_tree_filtered(from, to, false);
}

fn copy_tree_filtered(from: &Path, to: &Path, keep_empty_dirs: bool) {
    fs::create_dir_all(to).expect("create copy destination");
    for e in walkdir::WalkDir::new(from).min_depth(1) {
        let e = e.unwrap_or_else(|err| panic!("walk {}: {err}", from.display()));
        let dest = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            if keep_empty_dirs {
                fs::create_dir_all(&dest).expect("create dir");
            }
        } else {
            fs::create_dir_all(dest.parent().unwrap()).expect("create parent dir");
            fs::copy(e.path(), &dest)
                .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The binary under test
// ---------------------------------------------------------------------------------------------

/// `docker-delete` as built by cargo, with the environment it reads cleared
/// (`DOCKER_REGISTRY_DIR`, `DOCKER_REGISTRY_CONTAINER_ID`) and `NO_COLOR=1`.
pub fn docker_delete() -> assert_cmd::Command {
    assert_cmd::Command::from_std(docker_delete_process())
}

/// [`docker_delete`] as a plain process, for tests that spawn it and send it signals.
pub fn docker_delete_process() -> Command {
    let mut cmd = Command::new(assert_cmd::cargo::cargo_bin("docker-delete"));
    cmd.env_remove("DOCKER_REGISTRY_DIR")
        .env_remove("DOCKER_REGISTRY_CONTAINER_ID")
        .env("NO_COLOR", "1");
    cmd
}
