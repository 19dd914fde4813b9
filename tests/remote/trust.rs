//! Trust boundaries: a remote is untrusted input. Anyone who can write to the bucket plants
//! objects; a fresh machine then runs against it. Nothing outside its cache may change, and
//! nothing of its may be uploaded.

use crate::bucket::{Bucket, blob_rel};
use crate::common::{self, Workspace, parse_lines, statuses};

const VICTIM: &str = "[stage.a]\nkind = \"command\"\nrun = \"echo hello > $FLOW_OUT/out.txt\"\n";

/// A fresh machine about to run [`VICTIM`], with files beside (outside) its cache that a
/// remote must not reach: `sentinel` must keep its bytes, `secret` must neither change nor
/// reach the bucket, and `outside`, `abs-created`, `planted.json` must not appear.
struct Victim {
    ws: Workspace,
    p: std::path::PathBuf,
    key: String,
    secret: Vec<u8>,
}

impl Victim {
    fn new() -> Victim {
        let ws = Workspace::new();
        let p = ws.write("p.toml", VICTIM);
        ws.write("sentinel", "original\n");
        let secret = format!("secret of {:?}\n", ws.path()).into_bytes();
        std::fs::write(ws.path().join("secret"), &secret).unwrap();
        let plan = ws.json(&["plan", p.to_str().unwrap()], true);
        let key = plan.iter().find(|e| e["stage"] == "a").unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string();
        Victim { ws, p, key, secret }
    }

    /// An absolute path beside the cache, as a string a planted object can carry.
    fn abs(&self, name: &str) -> String {
        self.ws.path().join(name).display().to_string()
    }

    fn assert_untouched(&self, bucket: &Bucket, case: &str) {
        let dir = self.ws.path();
        assert_eq!(
            std::fs::read_to_string(dir.join("sentinel")).unwrap(),
            "original\n",
            "{case}: a file outside the cache was overwritten"
        );
        for name in ["outside", "abs-created", "planted.json"] {
            assert!(!dir.join(name).exists(), "{case}: {name} was created");
        }
        assert_eq!(
            std::fs::read(dir.join("secret")).ok().as_deref(),
            Some(self.secret.as_slice()),
            "{case}: a file outside the cache was changed or deleted"
        );
        let leaked = blob_rel(&blake3::hash(&self.secret).to_hex());
        assert!(!bucket.has(&leaked), "{case}: a local file was uploaded");
    }

    /// Runs the pipeline against a bucket holding a planted object: it must be refused with
    /// an error naming it and its bad field, and nothing outside the cache may change.
    fn run_planted(
        &self,
        bucket: &Bucket,
        object: &str,
        field: &str,
        case: &str,
    ) -> std::process::Output {
        let out = bucket.run(&self.ws, &self.p);
        self.assert_refused(&out, object, field, case);
        self.assert_untouched(bucket, case);
        out
    }

    /// The planted object was refused with an error naming it, and no process panicked.
    fn assert_refused(&self, out: &std::process::Output, object: &str, field: &str, case: &str) {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{case}: {stderr}");
        assert!(
            stderr.contains(object) && stderr.contains(field),
            "{case}: the error should name {object} and {field}: {stderr}"
        );
    }

    /// Stage `a`'s status in a `flow run --json` output.
    fn status(out: &std::process::Output) -> String {
        statuses(&parse_lines(&out.stdout))
            .into_iter()
            .find(|(s, _)| s == "a")
            .map(|(_, st)| st)
            .unwrap_or_default()
    }
}

#[test]
fn a_planted_checkpoint_index_writes_nothing_outside_scratch() {
    for bucket in Bucket::both("ckpt-names") {
        let blob = bucket.put_blob(b"pwned\n");
        for name in ["../../../outside", "abs-created", "sentinel"] {
            let v = Victim::new();
            let name = match name {
                "../../../outside" => name.to_string(),
                other => v.abs(other),
            };
            let index = serde_json::json!({ &name: {"blake3": blob, "size": 6} });
            let rel = format!("scratch/{}/index.json", v.key);
            bucket.put(&rel, index.to_string().as_bytes());
            let case = format!("{} checkpoint `{name}`", bucket.url());
            let out = v.run_planted(&bucket, &rel, &name, &case);
            assert_eq!(out.status.code(), Some(1), "{case}: the stage must fail");
            assert_eq!(Victim::status(&out), "failed", "{case}");
        }
    }
}

#[test]
fn a_planted_checkpoint_digest_reads_and_uploads_no_local_file() {
    for bucket in Bucket::both("ckpt-digests") {
        for bad in ["ab/SECRET", "a", "aé"] {
            let v = Victim::new();
            // `ab` + an absolute path once resolved to that file, which was copied into
            // scratch and pushed with the next checkpoint; short digests panicked.
            let digest = bad.replace("/SECRET", &v.abs("secret"));
            let index = serde_json::json!({"ckpt": {"blake3": &digest, "size": 1}});
            let rel = format!("scratch/{}/index.json", v.key);
            bucket.put(&rel, index.to_string().as_bytes());
            let case = format!("{} checkpoint digest `{digest}`", bucket.url());
            let out = v.run_planted(&bucket, &rel, "blake3", &case);
            assert_eq!(out.status.code(), Some(1), "{case}: the stage must fail");
        }
    }
}

/// A genuine run record of [`VICTIM`], as JSON, made on a machine of its own.
fn genuine_record() -> serde_json::Value {
    let v = Victim::new();
    v.ws.run_statuses(&v.p, &[]);
    let bytes = std::fs::read(v.ws.cache().join(format!("runs/{}.json", v.key))).unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn a_planted_manifest_links_and_deletes_nothing_outside_the_cache() {
    let template = genuine_record();
    for bucket in Bucket::both("manifests") {
        let blob = bucket.put_blob(b"pwned\n");
        let cases = [
            ("../../../outside", blob.clone(), "path"),
            ("ABS/abs-created", blob.clone(), "path"),
            ("out.txt", "a".to_string(), "blake3"),
            ("out.txt", "ab/SECRET".to_string(), "blake3"),
        ];
        for (path, digest, field) in cases {
            let v = Victim::new();
            let path = path.replace("ABS/", &format!("{}/", v.ws.path().display()));
            let digest = digest.replace("/SECRET", &v.abs("secret"));
            let manifest = serde_json::json!({"format": "flow-artifact-v1",
                "files": [{"path": &path, "size": 6, "blake3": &digest}]})
            .to_string();
            let d = blake3::hash(manifest.as_bytes()).to_hex().to_string();
            let manifest_rel = format!("artifacts/{}/{d}.json", &d[..2]);
            bucket.put(&manifest_rel, manifest.as_bytes());
            let mut record = template.clone();
            record["outputs"] = serde_json::json!({"out": d});
            bucket.put(
                &format!("runs/{}.json", v.key),
                record.to_string().as_bytes(),
            );
            let case = format!("{} manifest entry `{path}` / `{digest}`", bucket.url());
            let out = v.run_planted(&bucket, &manifest_rel, field, &case);
            common::assert_ok(&out);
            assert_eq!(Victim::status(&out), "ran", "{case}: not pulled, computed");
        }
    }
}

#[test]
fn a_planted_run_record_is_checked_against_the_key_it_was_asked_for() {
    for bucket in Bucket::both("records") {
        // A genuine result on the remote: only the record is then tampered with.
        let a = Victim::new();
        common::assert_ok(&bucket.run(&a.ws, &a.p));
        let record_rel = format!("runs/{}.json", a.key);
        let genuine = genuine_record();
        let other_key = "0".repeat(64);
        let cases: [(&str, serde_json::Value, &str); 5] = [
            ("key", serde_json::json!("../../planted"), "key"),
            ("key", serde_json::json!(other_key), "key"),
            ("outputs", serde_json::json!({"out": "ab"}), "outputs.out"),
            (
                "outputs",
                serde_json::json!({"out": "ab/../../../x"}),
                "outputs.out",
            ),
            ("outputs", serde_json::json!({}), "outputs"),
        ];
        for (field, value, named) in cases {
            let v = Victim::new();
            let mut record = genuine.clone();
            record[field] = value.clone();
            bucket.put(&record_rel, record.to_string().as_bytes());
            let case = format!("{} record with {field} = {value}", bucket.url());
            let out = v.run_planted(&bucket, &record_rel, named, &case);
            common::assert_ok(&out);
            assert_eq!(Victim::status(&out), "ran", "{case}: not pulled, computed");
            let runs = v.ws.cache().join("runs");
            assert!(
                !runs.join(format!("{other_key}.json")).exists(),
                "{case}: a record was written under the key it claims"
            );
            assert!(!runs.join("../planted.json").exists(), "{case}");
        }
        // The genuine record still pulls: the checks refuse only what is wrong.
        bucket.put(&record_rel, genuine.to_string().as_bytes());
        let v = Victim::new();
        let out = bucket.run(&v.ws, &v.p);
        common::assert_ok(&out);
        assert_eq!(Victim::status(&out), "cached", "{}", bucket.url());
    }
}
