//! `flow kinds`: the stage kinds this build knows, with their params and outputs, as text or
//! as the Markdown tables of the README's reference.

use std::process::ExitCode;

use anyhow::bail;

use super::CmdResult;

/// `flow kinds`: the reference of every stage kind, from the registry itself.
pub fn kinds(only: Option<&str>, markdown: bool) -> CmdResult {
    use flow_stages::Default as D;
    let kinds: Vec<_> = flow_stages::registry()
        .into_iter()
        .filter(|k| only.is_none_or(|o| o == k.name))
        .collect();
    if kinds.is_empty() {
        let names: Vec<&str> = flow_stages::registry().iter().map(|k| k.name).collect();
        bail!(
            "no kind `{}` (kinds: {})",
            only.unwrap_or_default(),
            names.join(", ")
        );
    }
    for k in kinds {
        let default = |d: &D| match d {
            D::Required => "required".to_string(),
            D::Optional => "none".to_string(),
            D::Value(v) => format!("`{v}`"),
            D::PipelineSeed => "`[pipeline] seed`".to_string(),
        };
        if markdown {
            println!("### `{}` (version {})\n{}.\n", k.name, k.version, k.doc);
            println!(
                "Outputs: {}.\n",
                k.outputs
                    .iter()
                    .map(|o| format!("`{o}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            println!("| param | type | default | meaning |\n|---|---|---|---|");
            for p in k.params {
                println!(
                    "| `{}` | {} | {} | {} |",
                    p.name,
                    p.ty.describe(),
                    default(&p.default),
                    p.doc
                );
            }
            println!();
        } else {
            println!(
                "{} (v{}): {}\n  outputs: {}",
                k.name,
                k.version,
                k.doc,
                k.outputs.join(", ")
            );
            for p in k.params {
                println!(
                    "  {:<16} {:<40} {:<18} {}",
                    p.name,
                    p.ty.describe(),
                    default(&p.default),
                    p.doc
                );
            }
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}
