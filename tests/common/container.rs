//! Real Docker containers for tests: a registry image built from Debian's `docker-registry`
//! binary (no pull needed), a busybox image, and containers that clean up after themselves.
//!
//! Everything goes through the `docker` CLI so that the helpers do not depend on the code under
//! test. Names, tags and ports are unique per process and call, so tests may run in parallel.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Registry 2's config path (the upstream `registry:2` image).
pub const REGISTRY2_CONFIG: &str = "/etc/docker/registry/config.yml";
/// Registry 3's config path (the upstream `registry:3` image).
pub const REGISTRY3_CONFIG: &str = "/etc/distribution/config.yml";
/// The storage root every test image's config names.
pub const STORAGE_ROOT: &str = "/var/lib/registry";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name no other test or process uses: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Runs `docker ARGS`, returning its output whatever the status.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("cannot run the docker CLI")
}

/// Runs `docker ARGS`, panics with its stderr on failure, returns trimmed stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether a Docker daemon answers. Without one, tests print why and return early (skip),
/// except when `CI` is set: then a missing daemon is a failure.
pub fn docker_available() -> bool {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    let reason = match out {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
        Err(e) => format!("cannot run docker: {e}"),
    };
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but no Docker daemon is available: {reason}");
    }
    eprintln!("skipping: no Docker daemon ({reason})");
    false
}

/// Tests that look for "the one running registry" take this exclusively; every test that runs a
/// registry container holds it shared, so discovery never sees another test's registry.
static DISCOVERY: RwLock<()> = RwLock::new(());

/// Shared hold for tests that run registry containers.
pub fn shared_lock() -> RwLockReadGuard<'static, ()> {
    DISCOVERY.read().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive hold for tests that rely on which registry containers are running.
pub fn exclusive_lock() -> RwLockWriteGuard<'static, ()> {
    DISCOVERY.write().unwrap_or_else(|e| e.into_inner())
}

/// A locally built image; its tag is removed when the last handle goes.
#[derive(Clone)]
pub struct Image {
    inner: Arc<ImageInner>,
}

struct ImageInner {
    tag: String,
}

impl Image {
    /// The `name:tag` to run.
    pub fn tag(&self) -> &str {
        &self.inner.tag
    }
}

// Builds and removals are serialised: removing the last tag of an image while another thread
// builds the same content from the layer cache could delete layers under that build.
static IMAGES: Mutex<Option<HashMap<String, Weak<ImageInner>>>> = Mutex::new(None);

impl Drop for ImageInner {
    fn drop(&mut self) {
        let _guard = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
        let _ = docker(&["rmi", "-f", &self.tag]);
    }
}

/// Builds (or reuses, while a handle lives) an image from `files` (path in image → host file or
/// text) with `Dockerfile` and tag prefix `repo`.
fn build_image(key: &str, repo: &str, files: &[(String, FileSource)], dockerfile: &str) -> Image {
    let mut guard = IMAGES.lock().unwrap_or_else(|e| e.into_inner());
    let map = guard.get_or_insert_with(HashMap::new);
    if let Some(inner) = map.get(key).and_then(Weak::upgrade) {
        return Image { inner };
    }
    let ctx = TempDir::new().expect("temp dir");
    for (path, src) in files {
        let dest = ctx.path().join(path.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        match src {
            FileSource::Host(p) => {
                std::fs::copy(p, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", p.display()));
            }
            FileSource::Text(t) => std::fs::write(&dest, t).unwrap(),
        }
    }
    std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(
        ctx.path().join(".dockerignore"),
        "Dockerfile\n.dockerignore\n",
    )
    .unwrap();
    let tag = format!(
        "{repo}:{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    );
    docker_ok(&["build", "-q", "-t", &tag, &ctx.path().to_string_lossy()]);
    let inner = Arc::new(ImageInner { tag });
    map.insert(key.to_string(), Arc::downgrade(&inner));
    Image { inner }
}

enum FileSource {
    Host(PathBuf),
    Text(String),
}

/// `/bin/busybox` plus the libraries the registry binary needs at their `ldd` paths.
fn base_files(with_registry: bool) -> Vec<(String, FileSource)> {
    let mut files = vec![(
        "/bin/busybox".to_string(),
        FileSource::Host(PathBuf::from("/bin/busybox")),
    )];
    if with_registry {
        let bin = Path::new("/usr/bin/docker-registry");
        files.push((
            "/bin/registry".to_string(),
            FileSource::Host(bin.to_path_buf()),
        ));
        let ldd = Command::new("ldd").arg(bin).output().expect("ldd");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-... (0x...)`
            let path = match line.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                files.push((p.to_string(), FileSource::Host(PathBuf::from(p))));
            }
        }
    }
    files
}

/// The upstream image's config: filesystem storage at `/var/lib/registry`, in-memory blob
/// descriptor cache, `:5000`.
pub fn registry_config_yaml() -> String {
    format!(
        "version: 0.1\nlog:\n  fields:\n    service: registry\nstorage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {STORAGE_ROOT}\nhttp:\n  addr: :5000\n  headers:\n    X-Content-Type-Options: [nosniff]\n"
    )
}

/// A registry image built from Debian's binary with no pull, its config at `config_path`
/// (`/etc/docker/registry/config.yml` like `registry:2`, or `/etc/distribution/config.yml` like
/// `registry:3`); `ENTRYPOINT ["registry"]`, `CMD ["serve", config_path]`.
pub fn build_registry_image(config_path: &str) -> Image {
    let mut files = base_files(true);
    files.push((
        config_path.to_string(),
        FileSource::Text(registry_config_yaml()),
    ));
    let dockerfile = format!(
        "FROM scratch\nCOPY . /\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nENTRYPOINT [\"registry\"]\nCMD [\"serve\", \"{config_path}\"]\n"
    );
    build_image(
        &format!("registry {config_path}"),
        "docker-delete-test-registry",
        &files,
        &dockerfile,
    )
}

/// A busybox-only image (not a registry) whose default command is `sleep 3600`.
pub fn build_busybox_image() -> Image {
    let dockerfile = "FROM scratch\nCOPY . /\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"sleep\", \"3600\"]\n";
    build_image(
        "busybox",
        "docker-delete-test-busybox",
        &base_files(false),
        dockerfile,
    )
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The status code of `GET url` (plain HTTP), or `None` when nothing answers.
pub fn http_status(url: &str) -> Option<u16> {
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut s = TcpStream::connect(hostport).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Where the registry keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A host temp dir bind-mounted at `/var/lib/registry`.
    BindMount,
    /// A fresh named volume at `/var/lib/registry`.
    NamedVolume,
    /// No mount: the data stays in the container's writable layer.
    Inside,
}

/// How to run a test registry; [`RunOptions::new`] gives the usual set-up.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Where the data lives.
    pub storage: Storage,
    /// Where the mount goes inside the container (a parent of the root is allowed).
    pub mount_at: String,
    /// Publish port 5000 on `127.0.0.1:<free port>`.
    pub publish: bool,
    /// `-e KEY=value` entries.
    pub env: Vec<String>,
    /// `--entrypoint` override.
    pub entrypoint: Option<String>,
    /// Arguments after the image (replace `CMD`).
    pub cmd: Vec<String>,
    /// Create `docker/registry/v2/repositories` below `storage_root` (garbage-collect fails on a
    /// storage tree without it).
    pub seed: bool,
    /// The storage root inside the container, for seeding.
    pub storage_root: String,
    /// Wait until `/v2/` answers.
    pub wait: bool,
    /// With `publish`: let Docker pick the host port (`-p 127.0.0.1::5000`), which it may
    /// change when the container restarts (see [`RegistryContainer::published_port`]).
    pub ephemeral_port: bool,
}

impl RunOptions {
    /// Registry defaults: the given storage at `/var/lib/registry`, published, seeded, waited for.
    pub fn new(storage: Storage) -> Self {
        Self {
            storage,
            mount_at: STORAGE_ROOT.to_string(),
            publish: true,
            env: Vec::new(),
            entrypoint: None,
            cmd: Vec::new(),
            seed: true,
            storage_root: STORAGE_ROOT.to_string(),
            wait: true,
            ephemeral_port: false,
        }
    }
}

/// A registry (or other) container for one test; removed with its volume on drop.
pub struct RegistryContainer {
    /// Unique container name.
    pub name: String,
    /// Full container id.
    pub id: String,
    /// Host port published for 5000, if any.
    pub port: Option<u16>,
    /// The host directory bind-mounted, if [`Storage::BindMount`].
    pub host_dir: Option<TempDir>,
    /// The named volume, if [`Storage::NamedVolume`].
    pub volume: Option<String>,
    image: Image,
}

impl RegistryContainer {
    /// Runs `image` with `storage` at `/var/lib/registry` on a free loopback port; waits for `/v2/`.
    pub fn start(image: &Image, storage: Storage) -> Self {
        Self::run(image, RunOptions::new(storage))
    }

    /// A running container that is not a registry (its image's command just sleeps), with no
    /// port, seed or readiness wait.
    pub fn sleeper(image: &Image) -> Self {
        Self::run(
            image,
            RunOptions {
                publish: false,
                seed: false,
                wait: false,
                ..RunOptions::new(Storage::Inside)
            },
        )
    }

    /// Runs `image` as `opts` says.
    pub fn run(image: &Image, opts: RunOptions) -> Self {
        let name = unique_name("docker-delete-test");
        let mut host_dir = None;
        let mut volume = None;
        let mut mount = None;
        match opts.storage {
            Storage::BindMount => {
                let dir = TempDir::new().expect("temp dir");
                mount = Some(format!("{}:{}", dir.path().display(), opts.mount_at));
                host_dir = Some(dir);
            }
            Storage::NamedVolume => {
                let v = unique_name("docker-delete-test-vol");
                docker_ok(&["volume", "create", &v]);
                mount = Some(format!("{v}:{}", opts.mount_at));
                volume = Some(v);
            }
            Storage::Inside => {}
        }
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let mut port = (opts.publish && !opts.ephemeral_port).then(free_port);
            let mut args: Vec<String> =
                vec!["run".into(), "-d".into(), "--name".into(), name.clone()];
            if let Some(p) = port {
                args.extend(["-p".into(), format!("127.0.0.1:{p}:5000")]);
            } else if opts.publish {
                args.extend(["-p".into(), "127.0.0.1::5000".into()]);
            }
            if let Some(m) = &mount {
                args.extend(["-v".into(), m.clone()]);
            }
            for e in &opts.env {
                args.extend(["-e".into(), e.clone()]);
            }
            if let Some(ep) = &opts.entrypoint {
                args.extend(["--entrypoint".into(), ep.clone()]);
            }
            args.push(image.tag().to_string());
            args.extend(opts.cmd.iter().cloned());
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = docker(&refs);
            if out.status.success() {
                if opts.publish && port.is_none() {
                    port = published_port_of(&name);
                }
                let c = Self {
                    name: name.clone(),
                    id: String::from_utf8_lossy(&out.stdout).trim().to_string(),
                    port,
                    host_dir,
                    volume,
                    image: image.clone(),
                };
                if opts.seed {
                    c.exec(&[
                        "mkdir",
                        "-p",
                        &format!("{}/docker/registry/v2/repositories", opts.storage_root),
                    ]);
                }
                if opts.wait {
                    c.wait_ready(Duration::from_secs(20));
                }
                return c;
            }
            last_err = String::from_utf8_lossy(&out.stderr).into_owned();
            let _ = docker(&["rm", "-f", &name]);
            if !last_err.contains("already allocated")
                && !last_err.contains("address already in use")
            {
                break;
            }
        }
        if let Some(v) = &volume {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
        panic!("docker run {name} failed: {last_err}");
    }

    /// The host port Docker publishes 5000 on right now (it may differ from [`Self::port`]
    /// after a restart when the port was ephemeral).
    pub fn published_port(&self) -> Option<u16> {
        published_port_of(&self.name)
    }

    /// `http://127.0.0.1:<port>` when published (the port as first published).
    pub fn endpoint(&self) -> Option<String> {
        self.port.map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// Runs a command in the container; panics on failure; returns stdout.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["exec", self.name.as_str()];
        args.extend_from_slice(cmd);
        docker_ok(&args)
    }

    /// Waits until `/v2/` answers 200 (from the host when published, else from inside).
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = match self.endpoint() {
                Some(ep) => http_status(&format!("{ep}/v2/")) == Some(200),
                None => docker(&[
                    "exec",
                    &self.name,
                    "wget",
                    "-q",
                    "-O",
                    "/dev/null",
                    "http://127.0.0.1:5000/v2/",
                ])
                .status
                .success(),
            };
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "registry {} did not answer within {timeout:?}; logs:\n{}",
                self.name,
                String::from_utf8_lossy(&docker(&["logs", &self.name]).stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The host directory of the storage root: the temp dir or the volume's mountpoint.
    pub fn host_storage(&self) -> Option<PathBuf> {
        if let Some(d) = &self.host_dir {
            return Some(d.path().to_path_buf());
        }
        let v = self.volume.as_ref()?;
        Some(PathBuf::from(docker_ok(&[
            "volume",
            "inspect",
            "--format",
            "{{.Mountpoint}}",
            v,
        ])))
    }

    /// `docker inspect --format FORMAT` of this container.
    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "--format", format, &self.name])
    }

    /// The image handle this container runs.
    pub fn image(&self) -> &Image {
        &self.image
    }
}

impl Drop for RegistryContainer {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
        if let Some(v) = &self.volume {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
}

/// The host port of `container`'s `5000/tcp` binding on 127.0.0.1, from `docker port`.
fn published_port_of(container: &str) -> Option<u16> {
    let out = docker(&["port", container, "5000/tcp"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("127.0.0.1:")?.parse().ok())
}

/// Writes a blob that no manifest references under `root/docker/registry/v2/blobs`, returning
/// its digest hex and its directory (garbage-collect deletes exactly such blobs).
pub fn write_orphan_blob(root: &Path, content: &[u8]) -> (String, PathBuf) {
    use std::fmt::Write as _;
    // Any 64-hex name works for the collector; derive it from the content to stay unique.
    let mut hex = String::new();
    for (i, b) in content
        .iter()
        .chain(std::iter::repeat(&0u8))
        .take(32)
        .enumerate()
    {
        let _ = write!(hex, "{:02x}", b.wrapping_add(i as u8));
    }
    let dir = root
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(&hex);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("data"), content).unwrap();
    (hex, dir)
}
