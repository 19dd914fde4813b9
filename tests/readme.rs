//! The README's stage reference is the registry's own description: they cannot drift apart.

mod common;

#[test]
fn readme_reference_matches_flow_kinds() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let begin = readme.find("<!-- kinds:begin -->\n").expect("begin marker")
        + "<!-- kinds:begin -->\n".len();
    let end = readme.find("<!-- kinds:end -->").expect("end marker");
    let ws = common::Workspace::new();
    let out = ws.flow(&["kinds", "--markdown"]);
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    assert!(generated.contains("### `source`") && generated.contains("| `seq_len` |"));
    assert_eq!(
        readme[begin..end],
        generated,
        "README.md is stale: paste `flow kinds --markdown` between the kinds markers"
    );
}
