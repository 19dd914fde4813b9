//! `flow explain`: every component of a stage's cache key (kind, params, inputs, salt) and
//! the key itself.

use std::process::ExitCode;

use flow::exec::plan::{KeyState, resolve};
use serde_json::json;

use super::{CmdResult, Context, find_stage};
use crate::PipelineArgs;

impl Context {
    pub fn explain(&self, p: &PipelineArgs, name: &str, json: bool) -> CmdResult {
        let pipeline = load_or_exit!(p, json);
        let cache = self.open_cache(Some(&pipeline))?;
        let i = find_stage(&pipeline, name)?;
        let states = resolve(&pipeline, &cache)?;
        let stage = &pipeline.stages[i];
        let inputs: Vec<serde_json::Value> = stage
            .inputs
            .iter()
            .map(|b| {
                json!({"param": b.path, "from": b.sources.iter().map(|s| {
                    let producer = &pipeline.stages[s.stage];
                    let digest = states[s.stage].record().map(|r| r.outputs[&s.output].clone());
                    json!({"stage": producer.name, "output": s.output, "digest": digest})
                }).collect::<Vec<_>>()})
            })
            .collect();
        let (parts, key, done) = match &states[i] {
            KeyState::Known { parts, key, record } => (Some(parts), Some(key), record.is_some()),
            KeyState::Waiting { .. } => (None, None, false),
        };
        let described = stage.described_params();
        let params: serde_json::Map<_, _> = described
            .iter()
            .map(|(k, v, _)| (k.clone(), json!(v)))
            .collect();
        let origins: serde_json::Map<_, _> = described
            .iter()
            .map(|(k, _, o)| (k.clone(), json!(o)))
            .collect();
        if json {
            println!(
                "{}",
                json!({"stage": stage.name, "kind": stage.kind.name, "kind_version": stage.kind.version,
                       "format": flow::key::KEY_FORMAT, "params": params, "origins": origins,
                       "unkeyed": stage.kind.unkeyed,
                       "inputs": inputs,
                       "salt": pipeline.salt, "key": key, "done": done, "parts": parts})
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!("stage        {}", stage.name);
        println!("key format   {}", flow::key::KEY_FORMAT);
        println!(
            "kind         {} (version {})",
            stage.kind.name, stage.kind.version
        );
        for (k, v, origin) in &described {
            let unkeyed = if stage.kind.unkeyed.contains(&k.as_str()) {
                ", not in the key"
            } else {
                ""
            };
            println!("param        {k} = {v}  ({origin}{unkeyed})");
        }
        for b in &stage.inputs {
            for s in &b.sources {
                let producer = &pipeline.stages[s.stage];
                let digest = states[s.stage]
                    .record()
                    .map(|r| r.outputs[&s.output].clone())
                    .unwrap_or_else(|| "(not computed yet)".into());
                println!(
                    "input        {} <- {}.{} = {digest}",
                    b.path, producer.name, s.output
                );
            }
        }
        println!("salt         {:?}", pipeline.salt);
        match key {
            Some(k) => println!(
                "key          {k} ({})",
                if done { "done" } else { "missing" }
            ),
            None => println!("key          unknown until its inputs are computed"),
        }
        Ok(ExitCode::SUCCESS)
    }
}
