//! Keeping a remote consistent: damage found and repaired, one lease holder at a time, and
//! `gc` beside a push in flight.

use std::path::Path;

use crate::bucket::{Bucket, blob_rel, manifest_rel};
use crate::common::{self, Workspace, parse_lines, statuses, with_status};
use crate::{PIPELINE, outputs};

/// The manifest digest and blob hashes of a workspace's stage output, from its local cache.
fn artifact_of(ws: &Workspace, p: &Path, stage: &str) -> (String, Vec<String>) {
    let plan = ws.json(&["plan", p.to_str().unwrap()], true);
    let key = plan.iter().find(|e| e["stage"] == stage).unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ws.cache().join(format!("runs/{key}.json"))).unwrap(),
    )
    .unwrap();
    let digest = record["outputs"]["out"].as_str().unwrap().to_string();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            ws.cache()
                .join(format!("artifacts/{}/{digest}.json", &digest[..2])),
        )
        .unwrap(),
    )
    .unwrap();
    let blobs = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["blake3"].as_str().unwrap().to_string())
        .collect();
    (digest, blobs)
}

/// A remote entry that lost a blob or a manifest is found by `verify` and repaired by
/// `push` from a machine that has the data; `push` used to skip every key with a record.
#[test]
fn verify_finds_missing_blobs_and_manifests_and_push_repairs_them() {
    for bucket in Bucket::both("repair") {
        let a = Workspace::new();
        let p = a.write("p.toml", PIPELINE);
        common::assert_ok(&bucket.run(&a, &p));
        let (small, small_blobs) = artifact_of(&a, &p, "small");
        let (big, big_blobs) = artifact_of(&a, &p, "big");
        let case = bucket.url();

        // A blob vanishes; the record stays. `push` alone puts it back.
        bucket.delete(&blob_rel(&small_blobs[0]));
        let out = bucket.flow(&a, &["push", p.to_str().unwrap(), "--json"]);
        common::assert_ok(&out);
        assert!(
            bucket.has(&blob_rel(&small_blobs[0])),
            "{case}: push repairs a blob"
        );
        assert_eq!(
            parse_lines(&out.stdout).pop().unwrap()["transfer"]["files"],
            1
        );

        // A blob and a manifest vanish: verify names both and evicts the records.
        bucket.delete(&blob_rel(&small_blobs[1]));
        bucket.delete(&manifest_rel(&big));
        let out = bucket.flow(&a, &["cache", "verify", "--remote-cache", "--json"]);
        assert_eq!(out.status.code(), Some(1), "{case}");
        let report = &parse_lines(&out.stdout)[0];
        assert_eq!(
            report["missing_objects"],
            serde_json::json!([small_blobs[1]]),
            "{case}"
        );
        assert_eq!(
            report["missing_manifests"],
            serde_json::json!([big]),
            "{case}"
        );
        // `small` and `big`; `join` names neither artifact.
        assert_eq!(
            report["evicted_records"].as_array().unwrap().len(),
            2,
            "{case}"
        );

        // Push repairs from local data; then verify is clean and a fresh machine reuses all.
        common::assert_ok(&bucket.flow(&a, &["push", p.to_str().unwrap()]));
        assert!(bucket.has(&manifest_rel(&big)) && bucket.has(&blob_rel(&big_blobs[0])));
        assert!(bucket.has(&manifest_rel(&small)));
        let out = bucket.flow(&a, &["cache", "verify", "--remote-cache", "--json"]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{case}: {:?}",
            parse_lines(&out.stdout)
        );
        let b = Workspace::new();
        let q = b.write("p.toml", PIPELINE);
        let out = bucket.run(&b, &q);
        common::assert_ok(&out);
        let s = statuses(&parse_lines(&out.stdout));
        assert_eq!(with_status(&s, "cached").len(), 3, "{case}: {s:?}");
        assert_eq!(outputs(&a, &p), outputs(&b, &q));
    }
}

/// Two machines racing for one expired lease: exactly one takes it, every time; the other
/// is told who holds it. A holder whose lease expired and was taken over learns it at its
/// next renewal. (Takeover used to be delete-then-create: both racers could hold it.)
#[test]
fn exactly_one_of_two_machines_racing_for_an_expired_lease_takes_it() {
    use flow::remote::LeaseAttempt;
    for bucket in Bucket::both("leases") {
        let (one, two) = (bucket.open(), bucket.open());
        for round in 0..40u32 {
            let key = format!("{round:064x}");
            bucket.put(
                &format!("leases/{key}/{:020}.json", 7),
                br#"{"holder": "a machine that died", "expires": 1}"#,
            );
            let barrier = std::sync::Barrier::new(2);
            let take = |remote: &flow::remote::Remote, me: &str| {
                barrier.wait();
                remote.try_lease(&key, me, 60).unwrap()
            };
            let (first, second) = std::thread::scope(|s| {
                let a = s.spawn(|| take(&one, "one"));
                let b = s.spawn(|| take(&two, "two"));
                (a.join().unwrap(), b.join().unwrap())
            });
            let taken = [&first, &second]
                .iter()
                .filter(|r| matches!(r, LeaseAttempt::Taken(_)))
                .count();
            assert_eq!(
                taken,
                1,
                "{} round {round}: {first:?} {second:?}",
                bucket.url()
            );
            let winner = if matches!(first, LeaseAttempt::Taken(_)) {
                "one"
            } else {
                "two"
            };
            assert_eq!(one.lease_holder(&key).unwrap().as_deref(), Some(winner));
        }

        // A lease left to expire (ttl 0) is taken over; the old holder's renewal fails.
        let key = "f".repeat(64);
        let LeaseAttempt::Taken(g) = one.try_lease(&key, "one", 0).unwrap() else {
            panic!("a fresh key is free");
        };
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let LeaseAttempt::Taken(h) = two.try_lease(&key, "two", 60).unwrap() else {
            panic!("an expired lease is taken over");
        };
        assert!(h > g);
        let lost = one.renew_lease(&key, "one", g, 60).unwrap_err();
        assert!(lost.to_string().contains("taken over by two"), "{lost}");
        assert_eq!(one.lease_holder(&key).unwrap().as_deref(), Some("two"));
        assert_eq!(
            one.try_lease(&key, "one", 60).unwrap(),
            LeaseAttempt::HeldBy("two".into())
        );
        two.release_lease(&key, "two", h).unwrap();
        assert!(matches!(
            one.try_lease(&key, "one", 60).unwrap(),
            LeaseAttempt::Taken(_)
        ));
    }
}

/// `gc` spares what a push in flight has uploaded before its record (young objects), and a
/// push uploads again an old object it reuses, so a `gc` running beside it does not take
/// it. Here the push in flight is a pushed key whose record is not there (yet).
#[test]
fn remote_gc_spares_a_push_in_flight() {
    for bucket in Bucket::both("gc-push") {
        let a = Workspace::new();
        let p = a.write("p.toml", PIPELINE);
        let o = a.write(
            "o.toml",
            "[stage.other]\nkind = \"command\"\nrun = \"echo o > $FLOW_OUT/o\"\n",
        );
        common::assert_ok(&bucket.run(&a, &p));
        let (small, blobs) = artifact_of(&a, &p, "small");
        let plan = a.json(&["plan", p.to_str().unwrap()], true);
        let key = plan.iter().find(|e| e["stage"] == "small").unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string();
        bucket.delete(&format!("runs/{key}.json"));
        let case = bucket.url();

        // gc keeping another pipeline only: the young, unreferenced objects stay.
        let gc = |grace: &str| {
            let args = [
                "gc",
                "--keep",
                o.to_str().unwrap(),
                "--remote-cache",
                "--delete",
            ];
            let mut args = args.to_vec();
            if !grace.is_empty() {
                args.extend(["--grace", grace]);
            }
            common::assert_ok(&bucket.flow(&a, &args));
        };
        gc("");
        assert!(
            bucket.has(&manifest_rel(&small)),
            "{case}: gc took a young manifest"
        );
        assert!(
            blobs.iter().all(|b| bucket.has(&blob_rel(b))),
            "{case}: gc took young blobs"
        );
        // The push completes: the key is whole.
        common::assert_ok(&bucket.flow(&a, &["push", p.to_str().unwrap()]));
        let b = Workspace::new();
        let q = b.write("p.toml", PIPELINE);
        let s = statuses(&parse_lines(&bucket.run(&b, &q).stdout));
        assert_eq!(with_status(&s, "cached").len(), 3, "{case}: {s:?}");

        // Freshening: objects a push reuses that are older than an hour are uploaded again.
        if let Bucket::File(dir) = &bucket {
            let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86400);
            for blob in &blobs {
                let f = std::fs::File::options()
                    .write(true)
                    .open(dir.path().join(blob_rel(blob)))
                    .unwrap();
                f.set_modified(old).unwrap();
            }
            common::assert_ok(&bucket.flow(&a, &["push", p.to_str().unwrap()]));
            for blob in &blobs {
                let modified = std::fs::metadata(dir.path().join(blob_rel(blob)))
                    .unwrap()
                    .modified()
                    .unwrap();
                assert!(
                    modified > old + std::time::Duration::from_secs(86400),
                    "{blob} not freshened"
                );
            }
        }
        // Without the grace period, unreferenced objects go (what gc did to pushes in flight).
        bucket.delete(&format!("runs/{key}.json"));
        gc("0");
        assert!(
            !bucket.has(&manifest_rel(&small)),
            "{case}: --grace 0 collects"
        );
    }
}
