//! The concrete stage DAG as a petgraph graph, and its renderings for `flow dag`.

use petgraph::dot::{Config, Dot};
use petgraph::graph::DiGraph;
use petgraph::visit::EdgeRef;

use crate::pipeline::Pipeline;

/// Nodes are stage indices; an edge producer -> consumer carries the consumer's param path.
pub fn build(pipeline: &Pipeline) -> DiGraph<usize, String> {
    let mut g = DiGraph::new();
    let nodes: Vec<_> = (0..pipeline.stages.len()).map(|i| g.add_node(i)).collect();
    for (i, stage) in pipeline.stages.iter().enumerate() {
        for b in &stage.inputs {
            for s in &b.sources {
                g.add_edge(nodes[s.stage], nodes[i], b.path.clone());
            }
        }
    }
    g
}

/// Graphviz text.
pub fn to_dot(pipeline: &Pipeline) -> String {
    let g = build(pipeline);
    let labelled = g.map(
        |_, i| {
            let s = &pipeline.stages[*i];
            format!("{}\n({})", s.name, s.kind.name)
        },
        |_, path| path.clone(),
    );
    format!(
        "{:?}",
        Dot::with_attr_getters(
            &labelled,
            &[Config::GraphContentOnly],
            &|_, _| String::new(),
            &|_, _| "shape=box".to_string(),
        )
    )
    .lines()
    .fold(format!("digraph {:?} {{\n", pipeline.name), |acc, l| {
        acc + l + "\n"
    }) + "}\n"
}

/// Mermaid flowchart text (renders in GitHub markdown).
pub fn to_mermaid(pipeline: &Pipeline) -> String {
    let g = build(pipeline);
    let mut out = String::from("flowchart TD\n");
    for (i, s) in pipeline.stages.iter().enumerate() {
        let label = format!("{} ({})", s.name, s.kind.name).replace('"', "#quot;");
        out.push_str(&format!("    s{i}[\"{label}\"]\n"));
    }
    for e in g.edge_references() {
        out.push_str(&format!(
            "    s{} -->|{}| s{}\n",
            g[e.source()],
            e.weight(),
            g[e.target()]
        ));
    }
    out
}
