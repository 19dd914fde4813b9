//! `flow show`: the output files, metrics and resolved params (with where each was written)
//! of a finished stage, checking its outputs first (a damaged one is evicted).

use std::process::ExitCode;

use anyhow::bail;
use flow::exec::plan::{KeyState, resolve};
use flow::pipeline::Pipeline;
use serde_json::json;

use super::{CmdResult, Context, find_stage};
use crate::PipelineArgs;

impl Context {
    pub fn show(&self, p: &PipelineArgs, name: &str, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let i = find_stage(&pipeline, name)?;
        let states = resolve(&pipeline, &cache)?;
        let (key, record) = match &states[i] {
            KeyState::Known {
                key,
                record: Some(r),
                ..
            } => (key.clone(), r.clone()),
            _ => bail!(
                "stage `{name}` is not done: run `flow run {}` first",
                p.pipeline.display()
            ),
        };
        let mut outputs = serde_json::Map::new();
        let mut files = Vec::new();
        for (out, digest) in &record.outputs {
            let bad = cache.check_artifact(digest)?;
            if !bad.is_empty() {
                cache.evict_artifact(digest, &bad)?;
                cache.remove_record(&key)?;
                bail!(
                    "output `{out}` of `{name}` was damaged ({}); it was evicted: run the pipeline again",
                    bad.iter()
                        .map(|b| b.path.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            let dir = cache.view_path(digest);
            if let Some(m) = cache.read_manifest(digest)? {
                files.extend(
                    m.files
                        .into_iter()
                        .map(|f| json!({"output": out, "path": f.path, "size": f.size})),
                );
            }
            outputs.insert(out.clone(), json!(dir.display().to_string()));
        }
        let default = stage_default_output(&pipeline, i);
        let output = outputs
            .get(default)
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        let described = pipeline.stages[i].described_params();
        if json {
            let params: serde_json::Map<_, _> = described
                .iter()
                .map(|(k, v, o)| (k.clone(), json!({"value": v, "from": o})))
                .collect();
            println!(
                "{}",
                json!({"stage": name, "key": key, "output": output, "outputs": outputs,
                       "files": files, "metrics": record.metrics, "duration_s": record.duration_s,
                       "params": params})
            );
        } else {
            println!("stage    {name}\nkey      {key}");
            for (n, d) in &outputs {
                println!("output   {n} = {}", d.as_str().unwrap_or_default());
            }
            for f in &files {
                println!(
                    "  {:>10}  {}/{}",
                    f["size"],
                    f["output"].as_str().unwrap_or_default(),
                    f["path"].as_str().unwrap_or_default()
                );
            }
            for (k, v) in &record.metrics {
                println!("metric   {k} = {v}");
            }
            for (k, v, origin) in &described {
                println!("param    {k} = {v}  ({origin})");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn stage_default_output(pipeline: &Pipeline, i: usize) -> &'static str {
    pipeline.stages[i].kind.outputs[0]
}
