//! `flow dag`: print the stage DAG as Graphviz dot or Mermaid.

use std::process::ExitCode;

use super::{CmdResult, Context};
use crate::{DagFormat, PipelineArgs};

impl Context {
    pub fn dag(&self, p: &PipelineArgs, format: DagFormat) -> CmdResult {
        let pipeline = load_or_exit!(p, false);
        print!(
            "{}",
            match format {
                DagFormat::Dot => flow::graph::to_dot(&pipeline),
                DagFormat::Mermaid => flow::graph::to_mermaid(&pipeline),
            }
        );
        Ok(ExitCode::SUCCESS)
    }
}
