//! A remote that a test reads and writes behind flow's back, as anyone with access could.

use std::path::Path;

use crate::common::{S3, Workspace};

/// A remote that a test plants objects in, as anyone with write access could: a `file://`
/// directory, or a prefix of the shared S3 bucket.
pub enum Bucket {
    File(tempfile::TempDir),
    S3(&'static S3, String),
}

impl Bucket {
    /// The same test against both kinds of remote.
    pub fn both(name: &str) -> [Bucket; 2] {
        [
            Bucket::File(tempfile::tempdir().unwrap()),
            Bucket::S3(S3::shared(), format!("evil-{name}")),
        ]
    }

    /// The remote's address, as `--remote` takes it.
    pub fn url(&self) -> String {
        match self {
            Bucket::File(d) => format!("file://{}", d.path().display()),
            Bucket::S3(_, prefix) => format!("s3://flow-test/{prefix}"),
        }
    }

    /// Writes (or overwrites) an object.
    pub fn put(&self, rel: &str, bytes: &[u8]) {
        match self {
            Bucket::File(d) => {
                let p = d.path().join(rel);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(p, bytes).unwrap();
            }
            Bucket::S3(s3, prefix) => s3.put_bytes(&format!("{prefix}/{rel}"), bytes).unwrap(),
        }
    }

    /// Whether an object is there.
    pub fn has(&self, rel: &str) -> bool {
        match self {
            Bucket::File(d) => d.path().join(rel).exists(),
            Bucket::S3(s3, prefix) => s3.exists(&format!("{prefix}/{rel}")),
        }
    }

    /// Stores bytes as a blob where flow looks for them; returns their blake3.
    pub fn put_blob(&self, bytes: &[u8]) -> String {
        let hash = blake3::hash(bytes).to_hex().to_string();
        self.put(&blob_rel(&hash), bytes);
        hash
    }

    /// `flow run --json --remote` of a workspace's pipeline against this remote.
    pub fn run(&self, ws: &Workspace, p: &Path) -> std::process::Output {
        self.flow(ws, &["run", p.to_str().unwrap(), "--json"])
    }

    /// Removes an object, as a lost upload or a careless hand would.
    pub fn delete(&self, rel: &str) {
        match self {
            Bucket::File(d) => std::fs::remove_file(d.path().join(rel)).unwrap(),
            Bucket::S3(s3, prefix) => s3.delete(&format!("{prefix}/{rel}")),
        }
    }

    /// The remote opened in this process, as a second machine would.
    pub fn open(&self) -> flow::remote::Remote {
        match self {
            Bucket::File(_) => flow::remote::Remote::open(&self.url()).unwrap(),
            Bucket::S3(s3, _) => {
                let options = s3.options();
                let options: Vec<(&str, &str)> =
                    options.iter().map(|(k, v)| (*k, v.as_str())).collect();
                flow::remote::Remote::open_with(&self.url(), &options).unwrap()
            }
        }
    }

    /// `flow ARGS --remote URL` in a workspace, against this remote.
    pub fn flow(&self, ws: &Workspace, args: &[&str]) -> std::process::Output {
        let url = self.url();
        let mut cmd = ws.command(args);
        cmd.args(["--remote", &url]);
        if let Bucket::S3(s3, _) = self {
            cmd.envs(s3.env());
        }
        cmd.output().unwrap()
    }
}

/// Where a blob of this blake3 hash lies in a remote.
pub fn blob_rel(hash: &str) -> String {
    format!("objects/blake3/{}/{}", &hash[..2], &hash[2..])
}

/// Where the manifest of this digest lies in a remote.
pub fn manifest_rel(digest: &str) -> String {
    format!("artifacts/{}/{digest}.json", &digest[..2])
}
