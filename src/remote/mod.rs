//! A remote cache in object storage (`s3://`, `gs://`, `az://`, `file://`), mirroring the
//! local layout so a team or a second machine reuses results:
//!
//! ```text
//! PREFIX/objects/blake3/ab/cdef...   blobs, uploaded once (multipart above 8 MiB)
//! PREFIX/artifacts/ab/<digest>.json  manifests
//! PREFIX/runs/<key>.json             run records, put last and create-only
//! PREFIX/leases/<key>/<generation>.json  who is computing a key, until when (lease.rs)
//! PREFIX/scratch/<key>/index.json   the last checkpoint snapshot: path -> blob
//! ```
//! Pushing a key uploads its blobs, then its manifests, then its record: a reader that finds
//! a record finds everything it names. Every download is re-hashed before it enters the local
//! cache. Whatever is read from a remote is untrusted (anyone who can write to the bucket can
//! plant it): keys and digests must be 64 lowercase hex digits, a record must be filed under
//! its own key, and names that become local paths must stay inside their directory. An
//! object that fails a check is refused with an error naming it, before anything is written
//! locally. S3 settings come from the standard `AWS_*` variables; object_store retries
//! transient errors with backoff, and credentials never appear in its errors.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutPayload, WriteMultipart};

use crate::store::hash::is_digest;
use crate::store::{Cache, Manifest, RunRecord};

mod lease;
mod maintenance;
pub use lease::LeaseAttempt;
pub use maintenance::VerifyReport;

/// An object found by listing a prefix.
struct Listed {
    /// The path below the prefix.
    rel: String,
    size: u64,
    /// Seconds since it was last modified.
    age: u64,
}

/// Files above this size are uploaded in parts, never read into memory whole.
const MULTIPART_ABOVE: u64 = 8 << 20;
const PART: usize = 8 << 20;
/// Objects a push reuses that are older than this are uploaded again (see
/// `Remote::is_fresh_async`); `gc`'s grace period must be longer than this plus the longest
/// push.
pub const FRESHEN_AFTER_SECONDS: u64 = 3600;
/// How old an unreferenced remote object must be before `gc` deletes it, by default: a push
/// in flight uploads blobs and manifests before the record that references them.
pub const GC_GRACE_SECONDS: u64 = 24 * 3600;
/// Blob transfers in flight at once (many small files are latency-bound).
const CONCURRENCY: usize = 16;

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("remote {url}: {message}")]
    Store { url: String, message: String },
    #[error("remote {url}: {what} is damaged (expected blake3 {expected}, got {found})")]
    Corrupt {
        url: String,
        what: String,
        expected: String,
        found: String,
    },
    /// An object whose content flow refuses (a name that would leave the cache, a record
    /// under another key...): anyone who can write to the bucket can plant one.
    #[error("remote object {url}/{object}: {message}")]
    Invalid {
        url: String,
        object: String,
        message: String,
    },
    /// A lease renewal found the lease taken over (it had expired: this machine stalled
    /// longer than the lease time); another machine computes the key now.
    #[error("remote {url}: the lease on {key} expired and was taken over by {holder}")]
    LeaseLost {
        url: String,
        key: String,
        holder: String,
    },
    #[error("local cache: {0}")]
    Local(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RemoteError>;

/// What a push or pull moved.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Transfer {
    pub files: u64,
    pub bytes: u64,
    /// Blobs the other side already had.
    pub skipped: u64,
}

impl std::ops::AddAssign for Transfer {
    fn add_assign(&mut self, o: Transfer) {
        self.files += o.files;
        self.bytes += o.bytes;
        self.skipped += o.skipped;
    }
}

/// An opened remote cache.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    url: String,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Opens `s3://bucket/prefix` (settings from `AWS_*`), `gs://bucket/prefix`
    /// (`GOOGLE_*`), `az://container/prefix` (`AZURE_*`) or `file:///dir`.
    pub fn open(url: &str) -> Result<Remote> {
        Remote::open_with(url, &[])
    }

    /// [`Remote::open`] with S3 settings given here rather than in the environment
    /// (object_store's config keys: `aws_endpoint`, `aws_access_key_id`, ...), for a
    /// program that talks to more than one store; ignored for other schemes.
    pub fn open_with(url: &str, s3_options: &[(&str, &str)]) -> Result<Remote> {
        let fail = |message: String| RemoteError::Store {
            url: url.to_string(),
            message,
        };
        let parsed = url::Url::parse(url).map_err(|e| fail(format!("not a URL: {e}")))?;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match parsed.scheme() {
            "s3" => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env().with_url(url);
                for (name, value) in s3_options {
                    let key = name.parse().map_err(|e| fail(format!("{e}")))?;
                    builder = builder.with_config(key, *value);
                }
                let store = builder.build().map_err(|e| fail(e.to_string()))?;
                (Arc::new(store), parsed.path().trim_matches('/').to_string())
            }
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|_| fail("not a local path".into()))?;
                std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| fail(e.to_string()))?;
                (Arc::new(store), String::new())
            }
            "gs" => {
                let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                (Arc::new(store), parsed.path().trim_matches('/').to_string())
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let store = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url)
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                (Arc::new(store), parsed.path().trim_matches('/').to_string())
            }
            other => {
                return Err(fail(format!(
                    "`{other}://` is not an object store (use s3://, gs://, az:// or file://)"
                )));
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting the I/O runtime: {e}")))?;
        Ok(Remote {
            store,
            prefix,
            url: url.to_string(),
            runtime,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, rel: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn err(&self, e: object_store::Error) -> RemoteError {
        RemoteError::Store {
            url: self.url.clone(),
            message: e.to_string(),
        }
    }

    fn invalid(&self, object: &str, message: impl Into<String>) -> RemoteError {
        RemoteError::Invalid {
            url: self.url.trim_end_matches('/').to_string(),
            object: object.to_string(),
            message: message.into(),
        }
    }

    /// Callers pass digests that were checked (by parsing) or computed here.
    fn object_rel(hash: &str) -> String {
        debug_assert!(is_digest(hash), "{hash}");
        format!("objects/blake3/{}/{}", &hash[..2], &hash[2..])
    }

    fn manifest_rel(digest: &str) -> String {
        debug_assert!(is_digest(digest), "{digest}");
        format!("artifacts/{}/{digest}.json", &digest[..2])
    }

    fn record_rel(key: &str) -> String {
        format!("runs/{key}.json")
    }

    /// Stores a text as a content-addressed object (create-only) and returns its blake3.
    pub fn put_text(&self, text: &str) -> Result<String> {
        let hash = blake3::hash(text.as_bytes()).to_hex().to_string();
        self.put_small(&Self::object_rel(&hash), text.as_bytes().to_vec())?;
        Ok(hash)
    }

    /// A text stored by [`Remote::put_text`], verified against its blake3 (a job spec names
    /// it, and the bucket is as untrusted as any other remote object).
    pub fn get_text(&self, hash: &str) -> Result<String> {
        if !is_digest(hash) {
            let why = format!("`{hash}` is not a blake3 digest");
            return Err(self.invalid(&format!("objects/blake3/{hash}"), why));
        }
        let rel = Self::object_rel(hash);
        let bytes = self
            .get_bytes(&rel)?
            .ok_or_else(|| self.invalid(&rel, "missing"))?;
        if blake3::hash(&bytes).to_hex().as_str() != hash {
            return Err(self.invalid(&rel, "content does not match its blake3"));
        }
        String::from_utf8(bytes).map_err(|_| self.invalid(&rel, "not UTF-8 text"))
    }

    /// Whether an object exists.
    fn exists(&self, rel: &str) -> Result<bool> {
        self.runtime.block_on(self.exists_async(rel))
    }

    async fn exists_async(&self, rel: &str) -> Result<bool> {
        match self.store.head(&self.path(rel)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Puts small bytes, create-only: an existing object (same content-addressed name, or a
    /// record another machine committed) is left as it is.
    fn put_small(&self, rel: &str, bytes: Vec<u8>) -> Result<bool> {
        self.runtime.block_on(self.put_small_async(rel, bytes))
    }

    async fn put_small_async(&self, rel: &str, bytes: Vec<u8>) -> Result<bool> {
        let path = self.path(rel);
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), PutMode::Create.into())
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Uploads a local file; large files stream in parts, and a failed upload is aborted.
    /// Small files are put create-only (`create_only`) or overwritten.
    async fn put_file_async(&self, rel: &str, file: &Path, create_only: bool) -> Result<u64> {
        let f = std::fs::File::open(file).map_err(|e| RemoteError::Io {
            path: file.display().to_string(),
            source: e,
        })?;
        self.put_open_file_async(rel, f, file, create_only).await
    }

    /// Uploads an open file from its start (`name` is for errors). Reading through one
    /// descriptor means the bytes are those of the file that was opened, even if the path
    /// is renamed over meanwhile (a checkpoint's `latest.json`).
    async fn put_open_file_async(
        &self,
        rel: &str,
        mut f: std::fs::File,
        name: &Path,
        create_only: bool,
    ) -> Result<u64> {
        use std::io::Seek;
        let io = |e: std::io::Error| RemoteError::Io {
            path: name.display().to_string(),
            source: e,
        };
        f.seek(std::io::SeekFrom::Start(0)).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        if size <= MULTIPART_ABOVE {
            let mut bytes = Vec::with_capacity(size as usize);
            f.read_to_end(&mut bytes).map_err(io)?;
            if create_only {
                self.put_small_async(rel, bytes).await?;
            } else {
                self.store
                    .put(&self.path(rel), PutPayload::from(bytes))
                    .await
                    .map_err(|e| self.err(e))?;
            }
            return Ok(size);
        }
        let upload = self
            .store
            .put_multipart(&self.path(rel))
            .await
            .map_err(|e| self.err(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; PART];
        let result: Result<()> = async {
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                writer.wait_for_capacity(2).await.map_err(|e| self.err(e))?;
                writer.write(&buf[..n]);
            }
        }
        .await;
        match result {
            Ok(()) => writer.finish().await.map(|_| size).map_err(|e| self.err(e)),
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Streams an object into `dest` (a temp path), hashing it on the way; returns the blake3.
    fn get_to_file(&self, rel: &str, dest: &Path) -> Result<Option<(String, u64)>> {
        self.runtime.block_on(self.get_to_file_async(rel, dest))
    }

    async fn get_to_file_async(&self, rel: &str, dest: &Path) -> Result<Option<(String, u64)>> {
        let io = |e: std::io::Error| RemoteError::Io {
            path: dest.display().to_string(),
            source: e,
        };
        let get = match self.store.get(&self.path(rel)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = std::io::BufWriter::new(std::fs::File::create(dest).map_err(io)?);
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        let mut stream = get.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err(e))?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).map_err(io)?;
        }
        out.flush().map_err(io)?;
        Ok(Some((hasher.finalize().to_hex().to_string(), size)))
    }

    fn get_bytes(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(rel);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(g) => g
                    .bytes()
                    .await
                    .map(|b| Some(b.to_vec()))
                    .map_err(|e| self.err(e)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(e)),
            }
        })
    }

    /// The keys the remote has run records for; other names under `runs/` are not flow's
    /// and are skipped with a warning (a bucket is shared, and untrusted).
    pub fn record_keys(&self) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        for (rel, _) in self.list("runs")? {
            if maintenance::is_record_name(&rel) {
                keys.push(rel.trim_end_matches(".json").to_string());
            } else {
                tracing::warn!("{}/runs/{rel} is not a run record; skipped", self.url);
            }
        }
        Ok(keys)
    }

    /// Whether the remote has a run record for `key`.
    pub fn has_record(&self, key: &str) -> Result<bool> {
        self.exists(&Self::record_rel(key))
    }

    /// Pushes a committed key so that the remote holds all of it: the blobs it lacks, then
    /// the manifests, then the record, so a reader that finds the record finds everything.
    /// A key the remote already has is checked and repaired, not skipped: the blobs and
    /// manifests its record names that are missing there are uploaded again from here
    /// (after `cache verify --remote-cache` evicted damage, or a half-finished push). A
    /// record the remote holds under the key wins over ours (a stage that is not
    /// bit-reproducible may have produced other digests there); one flow refuses is
    /// replaced.
    pub fn push(&self, cache: &Cache, record: &RunRecord) -> Result<Transfer> {
        let rel = Self::record_rel(&record.key);
        let mut theirs = match self.record(&record.key) {
            Ok(r) => r,
            Err(e @ RemoteError::Invalid { .. }) => {
                tracing::warn!("{e}; replacing it");
                self.delete(&rel)?;
                None
            }
            Err(e) => return Err(e),
        };
        let mut t = Transfer::default();
        if let Some(other) = theirs.as_ref().filter(|r| r.outputs != record.outputs) {
            let mut whole = true;
            for digest in other.outputs.values() {
                match self.push_artifact(cache, &record.key, digest)? {
                    Some(moved) => t += moved,
                    None => whole = false,
                }
            }
            if whole {
                return Ok(t);
            }
            // Theirs names what neither side can supply: ours replaces it.
            tracing::warn!(
                "{url}/{rel} names artifacts the remote lacks; replacing it with this machine's",
                url = self.url
            );
            self.delete(&rel)?;
            theirs = None;
        }
        for digest in record.outputs.values() {
            t += self
                .push_artifact(cache, &record.key, digest)?
                .ok_or_else(|| RemoteError::Store {
                    url: self.url.clone(),
                    message: format!(
                        "the local cache lacks artifact {digest} of key {}",
                        record.key
                    ),
                })?;
        }
        if theirs.is_none() {
            let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
            self.put_small(&rel, bytes)?;
        }
        Ok(t)
    }

    /// Makes one artifact whole on the remote: its blobs, then its manifest, from the local
    /// cache. Without it here, whether the remote's copy is whole already: None when it is
    /// not (missing, damaged or refused), which only the machine that made it can repair.
    fn push_artifact(&self, cache: &Cache, key: &str, digest: &str) -> Result<Option<Transfer>> {
        let Some(manifest) = cache.read_manifest(digest)? else {
            let manifest = match self.fetch_manifest(digest) {
                Ok((_, m)) => m,
                Err(e @ (RemoteError::Invalid { .. } | RemoteError::Corrupt { .. })) => {
                    tracing::warn!("key {key}: {e}");
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            for f in &manifest.files {
                let rel = Self::object_rel(&f.blake3);
                if self.runtime.block_on(self.head_async(&rel))?.is_none() {
                    tracing::warn!("key {key}: artifact {digest} lacks {} ({rel})", f.path);
                    return Ok(None);
                }
            }
            return Ok(Some(Transfer::default()));
        };
        let mut t = Transfer::default();
        let mut jobs = Vec::new();
        for f in &manifest.files {
            jobs.push((Self::object_rel(&f.blake3), cache.object_path(&f.blake3)?));
        }
        let results: Vec<Result<Option<u64>>> = self.runtime.block_on(
            futures::stream::iter(jobs)
                .map(|(rel, file)| async move {
                    if self.is_fresh_async(&rel).await? {
                        return Ok(None);
                    }
                    self.put_file_async(&rel, &file, false).await.map(Some)
                })
                .buffer_unordered(CONCURRENCY)
                .collect(),
        );
        for r in results {
            match r? {
                Some(n) => {
                    t.files += 1;
                    t.bytes += n;
                }
                None => t.skipped += 1,
            }
        }
        let rel = Self::manifest_rel(digest);
        if !self.runtime.block_on(self.is_fresh_async(&rel))? {
            let path = cache.manifest_path(digest)?;
            let bytes = std::fs::read(&path).map_err(|e| RemoteError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
            self.put_overwrite(&rel, bytes)?;
        }
        Ok(Some(t))
    }

    /// Whether a content-addressed object exists and was written recently enough that no
    /// `gc` will take it while a push that relies on it is in flight. An older one is
    /// uploaded again ("freshened", as git does with the loose objects a push reuses):
    /// `gc` removes only unreferenced objects older than its grace period, and an object
    /// a push reuses is unreferenced until the push's record lands.
    async fn is_fresh_async(&self, rel: &str) -> Result<bool> {
        Ok(self
            .head_async(rel)
            .await?
            .is_some_and(|modified| age_seconds(modified) < FRESHEN_AFTER_SECONDS))
    }

    /// An object's last-modified time, None when it does not exist.
    async fn head_async(&self, rel: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        match self.store.head(&self.path(rel)).await {
            Ok(meta) => Ok(Some(meta.last_modified)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Puts small bytes, replacing what is there (content-addressed objects being
    /// freshened, whose bytes cannot differ).
    fn put_overwrite(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.path(rel);
        self.runtime.block_on(async {
            self.store
                .put(&path, PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| self.err(e))
        })
    }

    /// Pulls a key the remote has finished into the local cache (verifying every byte) and
    /// commits it locally. Ok(None) when the remote has no record for the key. The record and
    /// every manifest it names are fetched and checked before anything is written here.
    pub fn pull(&self, cache: &Cache, key: &str) -> Result<Option<(RunRecord, Transfer)>> {
        let Some(record) = self.record(key)? else {
            return Ok(None);
        };
        let manifests = record
            .outputs
            .values()
            .map(|digest| Ok((digest, self.fetch_manifest(digest)?)))
            .collect::<Result<Vec<_>>>()?;
        let mut t = Transfer::default();
        for (digest, (bytes, manifest)) in manifests {
            t += self.pull_artifact(cache, digest, &bytes, &manifest)?;
        }
        cache.write_record(&record)?;
        Ok(Some((record, t)))
    }

    /// Downloads one blob into the local object store, verified; a damaged download is
    /// fetched once more before giving up.
    async fn fetch_blob(&self, cache: &Cache, hash: &str, digest: &str) -> Result<u64> {
        let rel = Self::object_rel(hash);
        let mut found = String::new();
        for attempt in 0..2 {
            let tmp = cache
                .tmp_dir()
                .join(format!("pull-{}-{attempt}-{hash}", std::process::id()));
            match self.get_to_file_async(&rel, &tmp).await? {
                None => {
                    return Err(RemoteError::Store {
                        url: self.url.clone(),
                        message: format!("blob {hash} of artifact {digest} is missing"),
                    });
                }
                Some((h, size)) if h == hash => {
                    cache.adopt_download(&tmp, hash)?;
                    return Ok(size);
                }
                Some((h, _)) => {
                    let _ = std::fs::remove_file(&tmp);
                    found = h;
                }
            }
        }
        Err(RemoteError::Corrupt {
            url: self.url.clone(),
            what: rel,
            expected: hash.into(),
            found,
        })
    }

    /// An artifact's manifest, checked: its bytes hash to `digest` and every entry names a
    /// path inside the artifact and a blake3 digest (see `store::checked`).
    fn fetch_manifest(&self, digest: &str) -> Result<(Vec<u8>, Manifest)> {
        let rel = Self::manifest_rel(digest);
        let bytes = self
            .get_bytes(&rel)?
            .ok_or_else(|| self.invalid(&rel, "missing (the run record names it)"))?;
        let found = blake3::hash(&bytes).to_hex().to_string();
        if found != digest {
            return Err(RemoteError::Corrupt {
                url: self.url.clone(),
                what: rel,
                expected: digest.into(),
                found,
            });
        }
        let manifest = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(&rel, format!("unreadable manifest: {e}")))?;
        Ok((bytes, manifest))
    }

    /// Stores a checked manifest, fetches its missing blobs, then materializes its view.
    fn pull_artifact(
        &self,
        cache: &Cache,
        digest: &str,
        bytes: &[u8],
        manifest: &Manifest,
    ) -> Result<Transfer> {
        let mut t = Transfer::default();
        cache.put_manifest(digest, bytes)?;
        let mut missing = Vec::new();
        for f in &manifest.files {
            if !cache.object_path(&f.blake3)?.is_file() {
                missing.push(f.blake3.as_str());
            }
        }
        t.skipped += (manifest.files.len() - missing.len()) as u64;
        let results: Vec<Result<u64>> = self.runtime.block_on(
            futures::stream::iter(missing)
                .map(|hash| self.fetch_blob(cache, hash, digest))
                .buffer_unordered(CONCURRENCY)
                .collect(),
        );
        for r in results {
            t.bytes += r?;
            t.files += 1;
        }
        if !cache.materialize(digest)? {
            return Err(RemoteError::Store {
                url: self.url.clone(),
                message: format!("artifact {digest} could not be materialized after the pull"),
            });
        }
        Ok(t)
    }

    fn scratch_rel(key: &str, rel: &str) -> String {
        format!("scratch/{key}/{rel}")
    }

    fn delete(&self, rel: &str) -> Result<()> {
        let path = self.path(rel);
        self.runtime.block_on(async {
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err(e)),
            }
        })
    }

    /// Every object under a prefix (`runs`, `artifacts`, `objects/blake3`, `scratch`), as
    /// (path below the prefix, size).
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>> {
        Ok(self
            .list_aged(rel_prefix)?
            .into_iter()
            .map(|o| (o.rel, o.size))
            .collect())
    }

    /// Every object under a prefix with its size and age.
    fn list_aged(&self, rel_prefix: &str) -> Result<Vec<Listed>> {
        let prefix = self.path(rel_prefix);
        let strip = format!("{prefix}/");
        self.runtime.block_on(async {
            let mut out = Vec::new();
            let mut stream = self.store.list(Some(&prefix));
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(|e| self.err(e))?;
                let loc = meta.location.to_string();
                out.push(Listed {
                    rel: loc.strip_prefix(&strip).unwrap_or(&loc).to_string(),
                    size: meta.size,
                    age: age_seconds(meta.last_modified),
                });
            }
            Ok(out)
        })
    }

    /// Pushes a snapshot of a scratch directory: changed files go up as content-addressed
    /// blobs (large ones in parts), then `scratch/<key>/index.json` (path -> blake3, size) is
    /// overwritten last. A reader sees a whole earlier snapshot or a whole later one, never a
    /// checkpoint half from each, whatever order or timestamps the files have. Paths with a
    /// component ending in `.tmp` are work in progress by the stage's convention (a
    /// checkpoint being written, or being deleted) and are left out; each file is hashed
    /// and uploaded through one descriptor, so a file renamed over meanwhile cannot put
    /// one file's bytes under another's digest.
    pub fn push_scratch(
        &self,
        key: &str,
        dir: &Path,
        seen: &mut std::collections::HashMap<String, (u64, std::time::SystemTime, String)>,
    ) -> Result<Transfer> {
        let mut t = Transfer::default();
        let mut index = std::collections::BTreeMap::new();
        let mut changed = false;
        let mut files: Vec<_> = walkdir::WalkDir::new(dir)
            .min_depth(1)
            .into_iter()
            .filter_entry(|e| !e.file_name().to_string_lossy().ends_with(".tmp"))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file())
            .collect();
        files.sort_by(|a, b| a.path().cmp(b.path()));
        for entry in files {
            let rel = entry
                .path()
                .strip_prefix(dir)
                .expect("child")
                .to_string_lossy()
                .replace('\\', "/");
            // Gone since the listing (a checkpoint replaced): not part of this snapshot.
            let Ok(mut file) = std::fs::File::open(entry.path()) else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            let (size, mtime) = (meta.len(), meta.modified().unwrap_or(std::time::UNIX_EPOCH));
            let hash = match seen.get(&rel) {
                Some((s, m, h)) if (*s, *m) == (size, mtime) => h.clone(),
                _ => {
                    let hash = crate::store::hash::hash_open_file(&mut file, entry.path())?;
                    let blob = Self::object_rel(&hash);
                    if !self.exists(&blob)? {
                        t.bytes += self.runtime.block_on(self.put_open_file_async(
                            &blob,
                            file,
                            entry.path(),
                            true,
                        ))?;
                        t.files += 1;
                        tracing::info!(file = %rel, "checkpoint file pushed");
                    }
                    seen.insert(rel.clone(), (size, mtime, hash.clone()));
                    changed = true;
                    hash
                }
            };
            index.insert(rel, serde_json::json!({"blake3": hash, "size": size}));
        }
        if changed || seen.len() != index.len() {
            seen.retain(|rel, _| index.contains_key(rel));
            let body = serde_json::to_vec(&index).expect("index serializes");
            self.put_overwrite(&Self::scratch_rel(key, "index.json"), body)?;
        }
        Ok(t)
    }

    /// The files of a key's remote checkpoint snapshot, as (path in scratch, blob), every
    /// one checked: a relative path inside the scratch directory and a blake3 digest.
    fn scratch_index(&self, key: &str) -> Result<std::collections::BTreeMap<String, String>> {
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(deserialize_with = "crate::store::checked::blake3")]
            blake3: String,
        }
        let rel = Self::scratch_rel(key, "index.json");
        if !is_digest(key) {
            return Err(self.invalid(&rel, format!("`{key}` is not a flow key")));
        }
        let Some(bytes) = self.get_bytes(&rel)? else {
            return Ok(Default::default());
        };
        let index: std::collections::BTreeMap<String, Entry> = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(&rel, format!("unreadable checkpoint index: {e}")))?;
        let mut out = std::collections::BTreeMap::new();
        for (name, entry) in index {
            flow_stages::relpath::checked_rel_path(&name)
                .map_err(|e| self.invalid(&rel, format!("checkpoint file {e}")))?;
            out.insert(name, entry.blake3);
        }
        Ok(out)
    }

    /// Restores a key's last pushed checkpoint snapshot into `dir` (a resume on this
    /// machine); every file is blake3-verified, and copied (the stage may rewrite it). The
    /// whole index is checked before the first file is written.
    pub fn pull_scratch(&self, cache: &Cache, key: &str, dir: &Path) -> Result<Transfer> {
        let mut t = Transfer::default();
        for (rel, hash) in self.scratch_index(key)? {
            let object = cache.object_path(&hash)?;
            if !object.is_file() {
                t.bytes += self
                    .runtime
                    .block_on(self.fetch_blob(cache, &hash, "a checkpoint"))?;
            }
            t.files += 1;
            let dest = flow_stages::relpath::join_checked(dir, &rel)
                .map_err(|e| self.invalid(&Self::scratch_rel(key, "index.json"), e))?;
            restore_file(&object, &dest)?;
        }
        Ok(t)
    }

    /// Forgets a key's remote checkpoints (after its record is pushed); the blobs go with
    /// the next `gc --remote-cache`.
    pub fn delete_scratch(&self, key: &str) -> Result<()> {
        self.delete(&Self::scratch_rel(key, "index.json"))
    }

    /// The record of a key the remote has done, for deciding what is done: a record flow
    /// refuses (see [`Remote::record`]) means the key is not done there, with a warning,
    /// rather than an error that stops `status`, a Slurm submission or `gc`.
    pub fn done_record(&self, key: &str) -> Result<Option<RunRecord>> {
        match self.record(key) {
            Err(e @ RemoteError::Invalid { .. }) => {
                eprintln!("warning: {e}; treating the key as not done");
                Ok(None)
            }
            other => other,
        }
    }

    /// Reads a remote run record, checked: `key` is a key, the record is the one for `key`
    /// (a record filed under another name is refused, not written under its own), and it
    /// names at least one output, each by a digest. Ok(None) when there is none.
    pub fn record(&self, key: &str) -> Result<Option<RunRecord>> {
        let rel = Self::record_rel(key);
        if !is_digest(key) {
            return Err(self.invalid(&rel, format!("`{key}` is not a flow key")));
        }
        let Some(bytes) = self.get_bytes(&rel)? else {
            return Ok(None);
        };
        let record: RunRecord = serde_json::from_slice(&bytes)
            .map_err(|e| self.invalid(&rel, format!("unreadable run record: {e}")))?;
        if record.key != key {
            let why = format!("key `{}` is not the key it is filed under", record.key);
            return Err(self.invalid(&rel, why));
        }
        if record.outputs.is_empty() {
            return Err(self.invalid(&rel, "`outputs` is empty"));
        }
        Ok(Some(record))
    }
}

/// Copies a verified blob to `dest` (through a temp name beside it), writable: checkpoints
/// are rewritten by the stage that resumes from them.
fn restore_file(object: &Path, dest: &Path) -> Result<()> {
    let io = |e: std::io::Error| RemoteError::Io {
        path: dest.display().to_string(),
        source: e,
    };
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = dest.with_file_name(format!(".flow-pull-{}", std::process::id()));
    std::fs::copy(object, &tmp).map_err(io)?;
    let mut perms = std::fs::metadata(&tmp).map_err(io)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&tmp, perms).map_err(io)?;
    std::fs::rename(&tmp, dest).map_err(io)
}

/// The digest a manifest's path (`ab/<digest>.json`) names.
fn manifest_digest(rel: &str) -> String {
    rel.rsplit('/')
        .next()
        .unwrap_or("")
        .trim_end_matches(".json")
        .to_string()
}

/// Seconds since an object was last modified (0 for a time in the future: clocks differ).
fn age_seconds(modified: chrono::DateTime<chrono::Utc>) -> u64 {
    now().saturating_sub(modified.timestamp().max(0) as u64)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
