//! `flow cache verify`: re-hash every stored object of the local (or, with
//! `--remote-cache`, the remote) cache; report and evict damaged ones.

use super::{CmdResult, Context, exit_code};

impl Context {
    pub fn verify(&self, json: bool) -> CmdResult {
        let cache = self.open_cache(None)?;
        let report = cache.verify()?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "checked {} objects ({:.1} MiB): {} damaged objects, {} damaged artifacts, {} run records evicted",
                report.objects_checked,
                report.bytes_checked as f64 / (1024.0 * 1024.0),
                report.bad_objects.len(),
                report.bad_artifacts.len(),
                report.evicted_records.len()
            );
            for o in &report.bad_objects {
                println!("  damaged object {o}");
            }
            for k in &report.evicted_records {
                println!("  evicted run {k}: it will run again");
            }
        }
        Ok(exit_code(report.is_clean()))
    }

    pub fn verify_remote(&self, json: bool) -> CmdResult {
        let remote = self.global_remote()?;
        let tmp = std::env::temp_dir();
        let report = remote.verify(&tmp)?;
        if json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!(
                "checked {} remote objects: {} damaged, {} missing; {} damaged and {} missing manifests; {} run records evicted",
                report.objects_checked,
                report.bad_objects.len(),
                report.missing_objects.len(),
                report.bad_manifests.len(),
                report.missing_manifests.len(),
                report.evicted_records.len()
            );
            for key in &report.evicted_records {
                println!("  evicted {key} (`flow push` from a machine that has it repairs it)");
            }
        }
        Ok(exit_code(report.is_clean()))
    }
}
