//! The registry's storage tree: typed names (`Digest`, `RepoName`, `Tag`), the layout that
//! computes paths, manifest parsing, and every read and removal docker-delete makes in the tree.
//!
//! Nothing outside this module touches the storage tree, so that a second backend (object
//! storage) can implement the same reads and removals.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

// ---------------------------------------------------------------------------------------------
// Names

/// A content digest, `sha256:` followed by 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let Some(hex) = s.strip_prefix("sha256:") else {
            return Err(format!(
                "`{s}` is not a digest: it must start with `sha256:`"
            ));
        };
        Self::from_hex(hex).map_err(|_| {
            format!("`{s}` is not a digest: `sha256:` must be followed by 64 lowercase hex digits")
        })
    }

    /// Builds a digest from the 64 hex digits alone (a directory name in the tree).
    pub fn from_hex(hex: &str) -> Result<Self, String> {
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Self(format!("sha256:{hex}")))
        } else {
            Err(format!("`{hex}` is not 64 lowercase hex digits"))
        }
    }

    /// The digest of some bytes.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(bytes))
        ))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    /// The full `sha256:<hex>` form.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A 12-digit abbreviation for human output.
    pub fn short(&self) -> &str {
        &self.0[..("sha256:".len() + 12)]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl TryFrom<String> for Digest {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

/// `Display` and `Debug` as the plain string, and conversion into `String`, for a validated name.
macro_rules! string_newtype {
    ($t:ident) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }

        impl TryFrom<String> for $t {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(&s)
            }
        }
    };
}

/// A repository name following the distribution grammar: lowercase alphanumeric components joined
/// by `/`, with `.`, `_`, `__` or one or more `-` between alphanumeric runs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct RepoName(String);

impl RepoName {
    /// Parses and validates a repository name.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("the repository name is empty".into());
        }
        if s.len() > 255 {
            return Err(format!(
                "repository name `{s}` is longer than 255 characters"
            ));
        }
        for component in s.split('/') {
            if !valid_component(component) {
                return Err(format!(
                    "`{s}` is not a valid repository name: each `/`-separated part must be lowercase \
                     letters and digits, joined by `.`, `_`, `__` or dashes (offending part: `{component}`)"
                ));
            }
        }
        Ok(Self(s.to_string()))
    }

    /// The name as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_component(c: &str) -> bool {
    // [a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    let run = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && alnum(b[*i]) {
            *i += 1;
        }
        *i > start
    };
    if !run(&mut i) {
        return false;
    }
    while i < b.len() {
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if !run(&mut i) {
            return false;
        }
    }
    true
}

string_newtype!(RepoName);

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Tag(String);

impl Tag {
    /// Parses and validates a tag.
    pub fn parse(s: &str) -> Result<Self, String> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..]
                .iter()
                .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(format!(
                "`{s}` is not a valid tag: up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"
            ))
        }
    }

    /// The tag as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For a cosign-style signature tag `sha256-<hex>.sig|.att|.sbom`, the digest it signs.
    pub fn signed_digest(&self) -> Option<Digest> {
        let rest = self.0.strip_prefix("sha256-")?;
        let (hex, suffix) = rest.split_once('.')?;
        matches!(suffix, "sig" | "att" | "sbom")
            .then(|| Digest::from_hex(hex).ok())
            .flatten()
    }
}

string_newtype!(Tag);

/// What a user names on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// `repo:tag`: one tag.
    Tag(RepoName, Tag),
    /// `repo`: every tag of the repository.
    AllTags(RepoName),
    /// `repo@sha256:...`: one manifest and every tag pointing at it.
    Digest(RepoName, Digest),
}

impl Reference {
    /// Parses `repo`, `repo:tag` or `repo@sha256:<hex>`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some((host, rest)) = s.split_once('/')
            && host.contains(':')
            && !rest.is_empty()
        {
            return Err(format!(
                "`{s}` names a registry host (`{host}`); docker-delete works on the storage tree, so name the image without it: `{rest}`"
            ));
        }
        if let Some((repo, digest)) = s.split_once('@') {
            return Ok(Self::Digest(RepoName::parse(repo)?, Digest::parse(digest)?));
        }
        let last_slash = s.rfind('/').map_or(0, |i| i + 1);
        match s[last_slash..].find(':') {
            Some(i) => {
                let (repo, tag) = s.split_at(last_slash + i);
                Ok(Self::Tag(RepoName::parse(repo)?, Tag::parse(&tag[1..])?))
            }
            None => Ok(Self::AllTags(RepoName::parse(s)?)),
        }
    }

    /// The repository this reference is in.
    pub fn repo(&self) -> &RepoName {
        match self {
            Self::Tag(r, _) | Self::AllTags(r) | Self::Digest(r, _) => r,
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(r, t) => write!(f, "{r}:{t}"),
            Self::AllTags(r) => write!(f, "{r}"),
            Self::Digest(r, d) => write!(f, "{r}@{d}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layout

/// Paths inside `<root>/docker/registry/v2`, all relative to that directory.
pub mod layout {
    use super::*;

    /// `repositories/<name>`.
    pub fn repo(name: &RepoName) -> PathBuf {
        Path::new("repositories").join(name.as_str())
    }
    /// `repositories/<name>/_manifests/tags/<tag>`.
    pub fn tag_dir(name: &RepoName, tag: &Tag) -> PathBuf {
        repo(name).join("_manifests/tags").join(tag.as_str())
    }
    /// `.../tags/<tag>/current/link`.
    pub fn tag_current_link(name: &RepoName, tag: &Tag) -> PathBuf {
        tag_dir(name, tag).join("current/link")
    }
    /// `repositories/<name>/_manifests/revisions/sha256/<hex>`.
    pub fn revision_dir(name: &RepoName, d: &Digest) -> PathBuf {
        repo(name).join("_manifests/revisions/sha256").join(d.hex())
    }
    /// `repositories/<name>/_layers/sha256/<hex>`.
    pub fn layer_dir(name: &RepoName, d: &Digest) -> PathBuf {
        repo(name).join("_layers/sha256").join(d.hex())
    }
    /// `blobs/sha256/<2>/<hex>`.
    pub fn blob_dir(d: &Digest) -> PathBuf {
        Path::new("blobs/sha256").join(&d.hex()[..2]).join(d.hex())
    }
    /// `blobs/sha256/<2>/<hex>/data`.
    pub fn blob_data(d: &Digest) -> PathBuf {
        blob_dir(d).join("data")
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests

/// Manifest media types the registry stores.
pub mod media {
    /// Docker image manifest, schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list (multi-platform).
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index (multi-platform).
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker schema 1, signed (legacy).
    pub const SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    /// Docker schema 1, unsigned (legacy).
    pub const SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
}

/// What a manifest references, by kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ManifestKind {
    /// An image: its config and layers are blobs of the repository.
    Image {
        /// The config blob, if any (schema 1 has none).
        config: Option<Digest>,
        /// Layer blobs.
        layers: Vec<Digest>,
    },
    /// A multi-platform index or manifest list: its children are manifests of the repository.
    Index {
        /// Child manifests.
        children: Vec<Digest>,
    },
    /// A media type docker-delete does not understand: kept, never deleted.
    Unknown,
}

/// A parsed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// The media type, from the document or inferred from its shape.
    pub media_type: String,
    /// What it references.
    pub kind: ManifestKind,
    /// For a referrer (signature, SBOM, attestation): the manifest it is about.
    pub subject: Option<Digest>,
    /// Size of the manifest blob in bytes.
    pub size: u64,
}

impl Manifest {
    /// Parses a manifest blob. Errors name what is wrong; callers add the path.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
        if !v.is_object() {
            return Err("not a JSON object".into());
        }
        let digest_at = |v: &serde_json::Value, what: &str| -> Result<Digest, String> {
            let s = v
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| format!("{what} has no digest"))?;
            Digest::parse(s).map_err(|e| format!("{what}: {e}"))
        };
        let list = |key: &str, what: &str| -> Result<Vec<Digest>, String> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(Vec::new()),
                Some(serde_json::Value::Array(items)) => {
                    items.iter().map(|i| digest_at(i, what)).collect()
                }
                Some(_) => Err(format!("`{key}` is not an array")),
            }
        };
        let schema_version = v.get("schemaVersion").and_then(|s| s.as_u64());
        let declared = v.get("mediaType").and_then(|m| m.as_str());
        let media_type = match declared {
            Some(m) => m.to_string(),
            None if schema_version == Some(1) => media::SCHEMA1_SIGNED.to_string(),
            None if v.get("manifests").is_some() => media::OCI_INDEX.to_string(),
            None if v.get("config").is_some() => media::OCI_MANIFEST.to_string(),
            None => String::from("(none)"),
        };
        let subject = match v.get("subject") {
            Some(s) if !s.is_null() => Some(digest_at(s, "subject")?),
            _ => None,
        };
        let kind = match media_type.as_str() {
            media::DOCKER_MANIFEST | media::OCI_MANIFEST => ManifestKind::Image {
                config: match v.get("config") {
                    Some(c) if !c.is_null() => Some(digest_at(c, "config")?),
                    _ => None,
                },
                layers: list("layers", "a layer")?,
            },
            media::DOCKER_LIST | media::OCI_INDEX => ManifestKind::Index {
                children: list("manifests", "a child manifest")?,
            },
            media::SCHEMA1_SIGNED | media::SCHEMA1 => {
                let layers = match v.get("fsLayers") {
                    Some(serde_json::Value::Array(items)) => items
                        .iter()
                        .map(|i| {
                            i.get("blobSum")
                                .and_then(|b| b.as_str())
                                .ok_or_else(|| "an fsLayer has no blobSum".to_string())
                                .and_then(Digest::parse)
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => Vec::new(),
                };
                let mut unique = Vec::new();
                for l in layers {
                    if !unique.contains(&l) {
                        unique.push(l);
                    }
                }
                ManifestKind::Image {
                    config: None,
                    layers: unique,
                }
            }
            _ => ManifestKind::Unknown,
        };
        Ok(Self {
            media_type,
            kind,
            subject,
            size: bytes.len() as u64,
        })
    }

    /// Blobs of the repository this manifest uses directly (config and layers), not children.
    pub fn blobs(&self) -> Vec<Digest> {
        match &self.kind {
            ManifestKind::Image { config, layers } => {
                config.iter().chain(layers.iter()).cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// Child manifests (for an index).
    pub fn children(&self) -> &[Digest] {
        match &self.kind {
            ManifestKind::Index { children } => children,
            _ => &[],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model read from the tree

/// Something in the tree that could not be read; reported, never deleted because of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The path, relative to the storage root's `docker/registry/v2`.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.message)
    }
}

/// One tag of a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEntry {
    /// The digest `current/link` names, or why it could not be read.
    pub current: Result<Digest, String>,
    /// Every digest listed in `index/sha256/` (the tag's history), valid ones only.
    pub history: Vec<Digest>,
}

/// Everything docker-delete knows about one repository.
#[derive(Debug, Clone, Default)]
pub struct RepoSnapshot {
    /// Its name.
    pub name: Option<RepoName>,
    /// Tags by name.
    pub tags: BTreeMap<Tag, TagEntry>,
    /// Digests with a revision link (`_manifests/revisions/sha256/<hex>`).
    pub revisions: BTreeSet<Digest>,
    /// Digests with a layer link (`_layers/sha256/<hex>`).
    pub layers: BTreeSet<Digest>,
    /// Manifests of every digest the repository names (revisions and tag targets): parsed, or why
    /// not (`Err`: missing blob, unreadable, invalid).
    pub manifests: BTreeMap<Digest, Result<Manifest, String>>,
    /// Upload directories (`_uploads/<uuid>`).
    pub uploads: Vec<String>,
    /// Whether `_manifests` exists.
    pub has_manifests: bool,
    /// What could not be read.
    pub problems: Vec<Problem>,
}

impl RepoSnapshot {
    /// The repository's name (always set for snapshots read from a tree).
    pub fn repo(&self) -> &RepoName {
        self.name.as_ref().expect("snapshot has a name")
    }

    /// The manifest of `d` if it was read successfully.
    pub fn manifest(&self, d: &Digest) -> Option<&Manifest> {
        self.manifests.get(d).and_then(|m| m.as_ref().ok())
    }
}

// ---------------------------------------------------------------------------------------------
// The filesystem store

/// File name of the journal in `docker/registry/v2` (the registry ignores files there).
const JOURNAL: &str = "docker-delete-journal.json";
/// Directory in `docker/registry/v2` that removals are renamed into before being deleted.
const TRASH: &str = "docker-delete-trash";
static TRASH_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The storage tree on local disk: `<root>/docker/registry/v2`.
#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
    v2: PathBuf,
}

/// How a removal went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The path was removed.
    Done,
    /// It was already gone (a re-run after an interruption).
    AlreadyGone,
}

impl Storage {
    /// Opens the tree under `root` (the registry's `rootdirectory`). Fails with a message naming
    /// the path when `docker/registry/v2/repositories` is missing or unreadable.
    pub fn open(root: &Path) -> Result<Self> {
        let v2 = root.join("docker/registry/v2");
        let repos = v2.join("repositories");
        match fs::symlink_metadata(&repos) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => bail!("{} is not a directory", repos.display()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "{} does not exist: {} is not a registry storage root (expected docker/registry/v2/repositories below it)",
                repos.display(),
                root.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", repos.display())),
        }
        fs::read_dir(&repos).with_context(|| format!("cannot read {}", repos.display()))?;
        Ok(Self {
            root: root.to_path_buf(),
            v2,
        })
    }

    /// The storage root as given.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/docker/registry/v2`.
    pub fn v2(&self) -> &Path {
        &self.v2
    }

    /// The absolute path of a tree-relative path.
    pub fn abs(&self, rel: &Path) -> PathBuf {
        self.v2.join(rel)
    }

    /// Takes the advisory lock that keeps two runs off the same tree. The returned file holds the
    /// lock until dropped.
    pub fn lock(&self) -> Result<fs::File> {
        let f = fs::File::open(&self.v2)
            .with_context(|| format!("cannot open {} to lock it", self.v2.display()))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(fs::TryLockError::WouldBlock) => bail!(
                "another docker-delete is running on {} (it holds the lock on that directory); wait for it to finish",
                self.v2.display()
            ),
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", self.v2.display()))
            }
        }
    }

    /// Where an unfinished run records its tree steps, so that any later run finishes them.
    pub fn journal_path(&self) -> PathBuf {
        self.v2.join(JOURNAL)
    }

    /// Reads the journal of an interrupted run, if there is one.
    pub fn read_journal(&self) -> Result<Option<Vec<u8>>> {
        let path = self.journal_path();
        match fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the journal atomically (temporary file, fsync, rename).
    pub fn write_journal(&self, contents: &[u8]) -> Result<()> {
        use std::io::Write as _;
        let path = self.journal_path();
        let tmp = self.v2.join(format!("{JOURNAL}.tmp"));
        let write = || -> io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(contents)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("cannot write {}", path.display()))
    }

    /// Records in the journal that its tree step `index` took effect, so that a later run does
    /// not take a tag or manifest pushed again since for one this run never reached.
    pub fn journal_step_done(&self, index: usize) -> Result<()> {
        use std::io::Write as _;
        let path = self.journal_path();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(f, "{index}")
            .and_then(|()| f.sync_data())
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// Removes the journal once its steps are done.
    pub fn remove_journal(&self) -> Result<()> {
        let path = self.journal_path();
        if !path.exists() {
            return Ok(());
        }
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    /// Every repository below `repositories/` (a directory holding `_manifests`, `_layers` or
    /// `_uploads`), sorted, with problems for directories whose names are not valid.
    pub fn list_repositories(&self) -> Result<(Vec<RepoName>, Vec<Problem>)> {
        let base = self.v2.join("repositories");
        let mut repos = Vec::new();
        let mut problems = Vec::new();
        let mut walker = walkdir::WalkDir::new(&base)
            .follow_links(false)
            .min_depth(1)
            .sort_by_file_name()
            .into_iter();
        while let Some(entry) = walker.next() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let path = e.path().map(|p| self.rel(p)).unwrap_or_default();
                    problems.push(Problem {
                        path,
                        message: format!("cannot read: {}", io_message(&e.to_string())),
                    });
                    continue;
                }
            };
            let name = entry.file_name().to_string_lossy();
            if entry.path_is_symlink() {
                problems.push(Problem {
                    path: self.rel(entry.path()),
                    message: "is a symbolic link; not followed".into(),
                });
                continue;
            }
            if !entry.file_type().is_dir() {
                continue;
            }
            if name.starts_with('_') {
                // `_manifests`, `_layers`, `_uploads`: the parent is a repository.
                walker.skip_current_dir();
                continue;
            }
            let is_repo = ["_manifests", "_layers", "_uploads"]
                .iter()
                .any(|m| entry.path().join(m).is_dir());
            if is_repo {
                let rel = entry.path().strip_prefix(&base).unwrap_or(entry.path());
                let s = rel.to_string_lossy();
                match RepoName::parse(&s) {
                    Ok(r) => repos.push(r),
                    Err(e) => problems.push(Problem {
                        path: self.rel(entry.path()),
                        message: e,
                    }),
                }
            }
        }
        Ok((repos, problems))
    }

    /// Whether `repositories/<name>` is a repository directory.
    pub fn repo_exists(&self, name: &RepoName) -> bool {
        let dir = self.abs(&layout::repo(name));
        ["_manifests", "_layers", "_uploads"]
            .iter()
            .any(|m| is_real_dir(&dir.join(m)))
            && self.ensure_no_symlink(&layout::repo(name)).is_ok()
    }

    /// Reads one repository: tags, revisions, layer links, uploads, and the manifests it names.
    pub fn read_repo(&self, name: &RepoName) -> Result<RepoSnapshot> {
        let repo_rel = layout::repo(name);
        self.ensure_no_symlink(&repo_rel)?;
        let mut snap = RepoSnapshot {
            name: Some(name.clone()),
            ..Default::default()
        };
        let manifests_rel = repo_rel.join("_manifests");
        snap.has_manifests = is_real_dir(&self.abs(&manifests_rel));
        if !snap.has_manifests {
            snap.problems.push(Problem {
                path: manifests_rel.clone(),
                message: "missing: the repository has no manifests directory".into(),
            });
        }

        // Tags.
        let tags_rel = manifests_rel.join("tags");
        for (tag_name, _) in self.list_dir(&tags_rel, &mut snap.problems) {
            let tag = match Tag::parse(&tag_name) {
                Ok(t) => t,
                Err(e) => {
                    snap.problems.push(Problem {
                        path: tags_rel.join(&tag_name),
                        message: e,
                    });
                    continue;
                }
            };
            let current = self.read_link(&layout::tag_current_link(name, &tag));
            if let Err(e) = &current {
                snap.problems.push(Problem {
                    path: layout::tag_current_link(name, &tag),
                    message: e.clone(),
                });
            }
            let index_rel = layout::tag_dir(name, &tag).join("index/sha256");
            let history = self.read_link_dir(&index_rel, &mut snap.problems);
            snap.tags.insert(tag, TagEntry { current, history });
        }

        // Revisions and layer links: `<dir>/sha256/<hex>/link`.
        let revisions_rel = manifests_rel.join("revisions/sha256");
        snap.revisions = self
            .read_link_dir(&revisions_rel, &mut snap.problems)
            .into_iter()
            .collect();
        let layers_rel = repo_rel.join("_layers/sha256");
        snap.layers = self
            .read_link_dir(&layers_rel, &mut snap.problems)
            .into_iter()
            .collect();

        // Uploads.
        snap.uploads = self
            .list_dir(&repo_rel.join("_uploads"), &mut snap.problems)
            .into_iter()
            .map(|(n, _)| n)
            .collect();

        // Manifests named by revisions and tags, and their children.
        let mut named: Vec<Digest> = snap.revisions.iter().cloned().collect();
        for t in snap.tags.values() {
            named.extend(t.current.iter().cloned());
            named.extend(t.history.iter().cloned());
        }
        self.read_manifests_into(&mut snap, named);
        Ok(snap)
    }

    /// The digests of a `sha256/<hex>/link` directory (tag history, revisions, layer links):
    /// each link must name the digest of its own directory; anything else is a problem.
    fn read_link_dir(&self, dir: &Path, problems: &mut Vec<Problem>) -> Vec<Digest> {
        let mut out = Vec::new();
        for (hex, _) in self.list_dir(dir, problems) {
            let link = dir.join(&hex).join("link");
            match (Digest::from_hex(&hex), self.read_link(&link)) {
                (Ok(d), Ok(l)) if d == l => out.push(d),
                (Ok(_), Ok(l)) => problems.push(Problem {
                    path: link,
                    message: format!("names {l}, not the digest of its directory"),
                }),
                (Err(e), _) | (_, Err(e)) => problems.push(Problem {
                    path: link,
                    message: e,
                }),
            }
        }
        out
    }

    /// Reads the manifests of `digests` (and their children and subjects) into the snapshot,
    /// for digests it does not name any more, such as those an interrupted run unlinked.
    pub fn read_manifests_into(&self, snap: &mut RepoSnapshot, digests: Vec<Digest>) {
        let mut queue = digests;
        while let Some(d) = queue.pop() {
            if snap.manifests.contains_key(&d) {
                continue;
            }
            let m = self.read_manifest(&d);
            if let Ok(m) = &m {
                queue.extend(m.children().iter().cloned());
                queue.extend(m.subject.iter().cloned());
            }
            snap.manifests.insert(d, m);
        }
    }

    /// Reads and parses the manifest blob of `d`.
    pub fn read_manifest(&self, d: &Digest) -> Result<Manifest, String> {
        let rel = layout::blob_data(d);
        self.ensure_no_symlink(&rel).map_err(|e| format!("{e:#}"))?;
        let bytes = fs::read(self.abs(&rel)).map_err(|e| {
            format!(
                "cannot read manifest blob {}: {}",
                rel.display(),
                io_message(&e.to_string())
            )
        })?;
        Manifest::parse(&bytes).map_err(|e| format!("manifest blob {} is {e}", rel.display()))
    }

    /// Size of a blob's data file, if present.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        fs::symlink_metadata(self.abs(&layout::blob_data(d)))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len())
    }

    /// Whether a blob's data file exists.
    pub fn blob_exists(&self, d: &Digest) -> bool {
        self.blob_size(d).is_some()
    }

    /// Reads a link file: `sha256:<hex>`, nothing else (a trailing newline is tolerated).
    pub fn read_link(&self, rel: &Path) -> Result<Digest, String> {
        self.ensure_no_symlink(rel).map_err(|e| format!("{e:#}"))?;
        let text = fs::read(self.abs(rel))
            .map_err(|e| format!("cannot read link: {}", io_message(&e.to_string())))?;
        let text = String::from_utf8_lossy(&text);
        let trimmed = text.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err("link file is empty".into());
        }
        Digest::parse(trimmed).map_err(|e| format!("malformed link file: {e}"))
    }

    /// Entries of a directory (name, is_dir), sorted; a missing directory is empty; other errors
    /// and symlinks become problems.
    fn list_dir(&self, rel: &Path, problems: &mut Vec<Problem>) -> Vec<(String, bool)> {
        let abs = self.abs(rel);
        let rd = match fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                problems.push(Problem {
                    path: rel.to_path_buf(),
                    message: format!("cannot read: {}", io_message(&e.to_string())),
                });
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            match entry.file_type() {
                Ok(t) if t.is_symlink() => problems.push(Problem {
                    path: rel.join(&name),
                    message: "is a symbolic link; not followed".into(),
                }),
                Ok(t) => out.push((name, t.is_dir())),
                Err(e) => problems.push(Problem {
                    path: rel.join(&name),
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        out.sort();
        out
    }

    /// A tree-relative path for an absolute one (for messages).
    pub fn rel(&self, abs: &Path) -> PathBuf {
        abs.strip_prefix(&self.v2).unwrap_or(abs).to_path_buf()
    }

    /// Refuses paths that could leave the tree: absolute, `..`, or any existing component that is
    /// a symbolic link.
    pub fn ensure_no_symlink(&self, rel: &Path) -> Result<()> {
        let mut cur = self.v2.clone();
        for c in rel.components() {
            match c {
                Component::Normal(part) => cur.push(part),
                _ => bail!(
                    "{} is not a plain path inside the storage tree",
                    rel.display()
                ),
            }
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_symlink() => bail!(
                    "{} is a symbolic link; docker-delete never follows links in the storage tree",
                    cur.display()
                ),
                Ok(_) => {}
                Err(_) => break, // the rest does not exist
            }
        }
        Ok(())
    }

    /// Removes a directory tree (`rel` relative to v2) after checking that no component is a
    /// symbolic link. A missing path is [`Removed::AlreadyGone`].
    pub fn remove_dir(&self, rel: &Path) -> Result<Removed> {
        self.ensure_no_symlink(rel)?;
        let abs = self.abs(rel);
        // Rename into the trash first: a rename either happens whole or not at all, so a removal
        // that fails half-way (permissions, immutable files) never leaves a half-removed tag.
        let trash = self.v2.join(TRASH);
        fs::create_dir_all(&trash).with_context(|| format!("cannot create {}", trash.display()))?;
        let dest = trash.join(format!(
            "{}-{}",
            std::process::id(),
            TRASH_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        match fs::rename(&abs, &dest) {
            Ok(()) => {
                // Gone from the registry's view; what cannot be cleaned up now is by the next run.
                let _ = fs::remove_dir_all(&dest);
                let _ = fs::remove_dir(&trash);
                Ok(Removed::Done)
            }
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(&abs).is_err() =>
            {
                Ok(Removed::AlreadyGone)
            }
            Err(e) if e.kind() == io::ErrorKind::CrossesDevices => match fs::remove_dir_all(&abs) {
                Ok(()) => Ok(Removed::Done),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Removed::AlreadyGone),
                Err(e) => Err(e).with_context(|| format!("cannot remove {}", abs.display())),
            },
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", abs.display())),
        }
    }

    /// Writes the missing `_layers` links of every manifest the repository keeps (config and
    /// layers whose blob is on disk). Returns the blobs linked again. Unreadable manifests are
    /// left alone: what they need is unknown.
    pub fn relink_layers(&self, name: &RepoName) -> Result<Vec<Digest>> {
        let snap = self.read_repo(name)?;
        let mut linked = Vec::new();
        for rev in &snap.revisions {
            let Some(m) = snap.manifest(rev) else {
                continue;
            };
            for b in m.blobs() {
                if snap.layers.contains(&b) || linked.contains(&b) || !self.blob_exists(&b) {
                    continue;
                }
                let dir = layout::layer_dir(name, &b);
                self.ensure_no_symlink(&dir)?;
                let abs = self.abs(&dir);
                fs::create_dir_all(&abs)
                    .and_then(|()| fs::write(abs.join("link"), b.as_str()))
                    .with_context(|| format!("cannot write {}", abs.join("link").display()))?;
                linked.push(b);
            }
        }
        Ok(linked)
    }

    /// Empties the trash an earlier run could not (the registry never looks there).
    pub fn empty_trash(&self) -> Result<()> {
        let trash = self.v2.join(TRASH);
        match fs::remove_dir_all(&trash) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", trash.display())),
        }
    }

    /// Whether this process can write the tree: creates and removes a file in
    /// `docker/registry/v2`, so that a dry run refuses what the real run would.
    pub fn ensure_writable(&self) -> Result<()> {
        let probe = self
            .v2
            .join(format!("{JOURNAL}.probe-{}", std::process::id()));
        fs::write(&probe, b"")
            .and_then(|()| fs::remove_file(&probe))
            .with_context(|| format!("cannot write to {}", self.v2.display()))
    }

    /// Removes `rel` if it is an empty directory: `Some(Done)`, `Some(AlreadyGone)` if missing,
    /// `None` if it is not empty.
    pub fn remove_empty_dir(&self, rel: &Path) -> Result<Option<Removed>> {
        self.ensure_no_symlink(rel)?;
        let abs = self.abs(rel);
        match fs::remove_dir(&abs) {
            Ok(()) => Ok(Some(Removed::Done)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Some(Removed::AlreadyGone)),
            Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", abs.display())),
        }
    }

    /// Removes `rel` if it is an empty directory, then each parent that becomes empty, stopping at
    /// `stop` (exclusive, tree-relative) and at the first parent that still holds anything.
    /// Returns the directories removed.
    pub fn remove_empty_upwards(&self, rel: &Path, stop: &Path) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut cur = rel.to_path_buf();
        while cur.starts_with(stop) && cur != stop {
            self.ensure_no_symlink(&cur)?;
            let abs = self.abs(&cur);
            match fs::remove_dir(&abs) {
                Ok(()) => removed.push(cur.clone()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) if fs::read_dir(&abs).is_ok_and(|mut d| d.next().is_some()) => break,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", abs.display()));
                }
            }
            if !cur.pop() {
                break;
            }
        }
        Ok(removed)
    }

    /// Empty directories below `rel` (deepest first), never `rel` itself; symlinks are not
    /// followed.
    pub fn empty_dirs_below(&self, rel: &Path) -> Vec<PathBuf> {
        let base = self.abs(rel);
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(&base)
            .follow_links(false)
            .min_depth(1)
            .contents_first(true)
            .into_iter()
            .flatten()
        {
            if entry.file_type().is_dir() {
                let p = entry.path();
                let empty = fs::read_dir(p).is_ok_and(|mut d| {
                    d.all(|e| e.is_ok_and(|e| out.contains(&self.rel(&e.path()))))
                });
                if empty {
                    out.push(self.rel(p));
                }
            }
        }
        out
    }

    /// Removes empty directories below `rel` (deepest first). Returns those removed.
    pub fn remove_empty_dirs_below(&self, rel: &Path) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for d in self.empty_dirs_below(rel) {
            self.ensure_no_symlink(&d)?;
            match fs::remove_dir(self.abs(&d)) {
                Ok(()) => removed.push(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                // Something was written meanwhile (a push): leave it.
                Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => {}
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot remove {}", self.abs(&d).display()));
                }
            }
        }
        Ok(removed)
    }

    /// Every blob on disk (`blobs/sha256/<2>/<hex>/data`) with its size.
    pub fn list_blobs(&self) -> Result<Vec<(Digest, u64)>> {
        let base = self.v2.join("blobs/sha256");
        let mut out = Vec::new();
        let read = |p: &Path| -> Result<Vec<fs::DirEntry>> {
            match fs::read_dir(p) {
                Ok(rd) => Ok(rd.flatten().collect()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
            }
        };
        for prefix in read(&base)? {
            if !prefix.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for blob in read(&prefix.path())? {
                let name = blob.file_name();
                let Ok(d) = Digest::from_hex(&name.to_string_lossy()) else {
                    continue;
                };
                if let Ok(m) = fs::symlink_metadata(blob.path().join("data"))
                    && m.is_file()
                {
                    out.push((d, m.len()));
                }
            }
        }
        Ok(out)
    }

    /// Total size of the files below a tree-relative directory (not following links).
    pub fn size_below(&self, rel: &Path) -> u64 {
        walkdir::WalkDir::new(self.abs(rel))
            .follow_links(false)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

fn is_real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

fn io_message(s: &str) -> String {
    s.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        for ok in [
            "a", "team/app", "a/b/c", "my-app", "my--app", "a.b", "a_b", "a__b", "x9",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a//b", "/a", "a/", "..", "a/../b", "a/./b", "-a", "a-", "a___b", "a..b",
            "a b", "a:b", "a@b", "a/.b", "_a",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tags() {
        for ok in ["v1", "latest", "_x", "1.0-rc.1", &"a".repeat(128)] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129), "..", "a b"] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests() {
        let hex = "ab".repeat(32);
        assert!(Digest::parse(&format!("sha256:{hex}")).is_ok());
        assert!(Digest::parse(&format!("sha256:{}", hex.to_uppercase())).is_err());
        assert!(Digest::parse(&format!("sha512:{hex}")).is_err());
        assert!(Digest::parse(&format!("sha256:{}", &hex[1..])).is_err());
        assert!(Digest::parse("sha256:../../etc").is_err());
    }

    #[test]
    fn references() {
        let hex = "cd".repeat(32);
        assert_eq!(
            Reference::parse("team/app:v1").unwrap(),
            Reference::Tag(
                RepoName::parse("team/app").unwrap(),
                Tag::parse("v1").unwrap()
            )
        );
        assert_eq!(
            Reference::parse("a/b/c").unwrap(),
            Reference::AllTags(RepoName::parse("a/b/c").unwrap())
        );
        assert!(matches!(
            Reference::parse(&format!("app@sha256:{hex}")).unwrap(),
            Reference::Digest(..)
        ));
        for bad in [
            "app:",
            ":v1",
            "app:v1:v2",
            "../app:v1",
            "/abs/app",
            "app@sha256:12",
            "app@",
            "App:v1",
            "localhost:5000/app:v1",
            "a//b:v1",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signature_tags() {
        let hex = "ef".repeat(32);
        let t = Tag::parse(&format!("sha256-{hex}.sig")).unwrap();
        assert_eq!(
            t.signed_digest(),
            Some(Digest::parse(&format!("sha256:{hex}")).unwrap())
        );
        assert_eq!(Tag::parse("v1.sig").unwrap().signed_digest(), None);
    }

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    #[test]
    fn parses_every_media_type() {
        let img = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            media::DOCKER_MANIFEST,
            d(1),
            d(2)
        );
        let m = Manifest::parse(img.as_bytes()).unwrap();
        assert_eq!(m.blobs().len(), 2);

        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{}"}},"layers":[],"subject":{{"digest":"{}"}}}}"#,
            d(1),
            d(3)
        );
        let m = Manifest::parse(oci.as_bytes()).unwrap();
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        assert_eq!(m.subject.unwrap().as_str(), d(3));

        let list = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"digest":"{}"}},{{"digest":"{}"}}]}}"#,
            media::DOCKER_LIST,
            d(4),
            d(5)
        );
        assert_eq!(
            Manifest::parse(list.as_bytes()).unwrap().children().len(),
            2
        );

        let s1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{}"}},{{"blobSum":"{}"}}]}}"#,
            d(6),
            d(6)
        );
        let m = Manifest::parse(s1.as_bytes()).unwrap();
        assert_eq!(m.blobs().len(), 1);

        let unknown = r#"{"schemaVersion":2,"mediaType":"application/x-weird"}"#;
        assert_eq!(
            Manifest::parse(unknown.as_bytes()).unwrap().kind,
            ManifestKind::Unknown
        );
        assert!(Manifest::parse(b"not json").is_err());
        assert!(Manifest::parse(b"[1,2]").is_err());
        let bad_layer = format!(
            r#"{{"mediaType":"{}","layers":[{{"digest":"sha256:zz"}}]}}"#,
            media::OCI_MANIFEST
        );
        assert!(Manifest::parse(bad_layer.as_bytes()).is_err());
    }
}
