//! Data benchmarks (`cargo bench --bench data`); figures go to BENCHMARKS.md.
//!
//! 1. Tokenization throughput of the `tokenize` stage against the Python `tokenizers` package
//!    (same tokenizer.json, same records, same batching) on this machine's cores.
//! 2. Peak memory (`/usr/bin/time -v`) of `flow run` while a 2 GB corpus is read by `source`,
//!    encoded by `tokenize` and packed by `pack` (target < 500 MB).
//!
//! `FLOW_BENCH_CORPUS_MB` sets the throughput corpus size (default 200), `FLOW_BENCH_BIG_MB`
//! the memory corpus (default 2048).

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use flow_stages::data::records::{Record, RecordWriter};
use flow_stages::data::rng::Rng;
use flow_stages::data::synth::general;

fn env_mb(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes general-world documents as text records until `mb` megabytes.
fn corpus(dir: &Path, mb: u64, seed: u64) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = RecordWriter::create(dir).unwrap();
    let mut rng = Rng::new(seed);
    let knowledge = general::Knowledge::new(&mut rng);
    let mut bytes = 0u64;
    while bytes < mb << 20 {
        let (text, _) = general::document(&mut rng, &knowledge);
        bytes += text.len() as u64;
        w.write(&Record::Text { text }).unwrap();
    }
    w.finish().unwrap();
    // The source kind reads .jsonl files: give the file that name.
    std::fs::rename(dir.join("records.jsonl"), dir.join("corpus.jsonl")).unwrap();
    bytes
}

fn flow(cache: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_flow"))
        .args(args)
        .env("FLOW_CACHE", cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn show(cache: &Path, pipeline: &Path, stage: &str) -> serde_json::Value {
    let out = flow(
        cache,
        &["show", pipeline.to_str().unwrap(), stage, "--json"],
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

const PY_BENCH: &str = r#"
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
start = time.perf_counter()
total, batch = 0, []
def flush():
    global total
    for e in tok.encode_batch_fast(batch, add_special_tokens=False):
        total += len(e.ids) + 2
for line in open(sys.argv[2]):
    batch.append(json.loads(line)["text"])
    if len(batch) == 4096:
        flush(); batch = []
if batch:
    flush()
print(total, time.perf_counter() - start)
"#;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mb = env_mb("FLOW_BENCH_CORPUS_MB", 200);
    let bytes = corpus(&dir.path().join("small"), mb, 1);
    let pipeline = dir.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[stage.text]\nkind = \"source\"\nfiles = {:?}\n\n[stage.trainset]\nkind = \"source\"\nfiles = {:?}\nlimit = 20000\n\n[stage.tok]\nkind = \"tokenize\"\nvocab_size = 8192\ntrain_data = [\"trainset\"]\n\n[stage.encode]\nkind = \"tokenize\"\ntokenizer = \"tok.tokenizer\"\ndata = [\"text\"]\n",
            dir.path().join("small/corpus.jsonl").display().to_string(),
            dir.path().join("small/corpus.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    flow(&cache, &["run", pipeline.to_str().unwrap()]);
    let encode = show(&cache, &pipeline, "encode");
    let tokens = encode["metrics"]["tokens"].as_f64().unwrap();
    let secs = encode["duration_s"].as_f64().unwrap();
    let tok_json = Path::new(
        show(&cache, &pipeline, "tok")["outputs"]["tokenizer"]
            .as_str()
            .unwrap(),
    )
    .join("tokenizer.json");
    let text_records = Path::new(
        show(&cache, &pipeline, "text")["outputs"]["train"]
            .as_str()
            .unwrap(),
    )
    .join("records.jsonl");
    println!(
        "corpus: {:.0} MB of text, {} tokens, vocab 8192, {} cores",
        bytes as f64 / 1e6,
        tokens,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "flow tokenize stage (read records, encode, write token files): {:.2} s = {:.2} M tokens/s",
        secs,
        tokens / secs / 1e6
    );
    let py = Command::new("python3")
        .args([
            "-c",
            PY_BENCH,
            tok_json.to_str().unwrap(),
            text_records.to_str().unwrap(),
        ])
        .output()
        .expect("python3");
    assert!(
        py.status.success(),
        "{}",
        String::from_utf8_lossy(&py.stderr)
    );
    let text = String::from_utf8(py.stdout).unwrap();
    let mut parts = text.split_whitespace();
    let py_tokens: f64 = parts.next().unwrap().parse().unwrap();
    let py_secs: f64 = parts.next().unwrap().parse().unwrap();
    assert_eq!(
        py_tokens, tokens,
        "both count the same tokens (BOS and EOS included)"
    );
    println!(
        "python tokenizers 0.23 (read JSON lines, encode_batch_fast): {:.2} s = {:.2} M tokens/s; flow/python = {:.2}x",
        py_secs,
        py_tokens / py_secs / 1e6,
        (tokens / secs) / (py_tokens / py_secs)
    );

    // Peak memory on a large corpus: source (streaming) then tokenize, in a fresh flow run.
    let big_mb = env_mb("FLOW_BENCH_BIG_MB", 2048);
    let t = Instant::now();
    let big_bytes = corpus(&dir.path().join("big"), big_mb, 2);
    println!(
        "generated a {:.2} GB corpus in {:.0} s",
        big_bytes as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let big = dir.path().join("big.toml");
    let mut f = std::fs::File::create(&big).unwrap();
    write!(
        f,
        "[stage.big]\nkind = \"source\"\nfiles = {:?}\n\n[stage.encode]\nkind = \"tokenize\"\ntokenizer_file = {:?}\ndata = [\"big\"]\n\n[stage.rows]\nkind = \"pack\"\ntokens = \"encode.tokens\"\nseq_len = 1024\n",
        dir.path().join("big/corpus.jsonl").display().to_string(),
        tok_json.display().to_string()
    )
    .unwrap();
    drop(f);
    let out = Command::new("/usr/bin/time")
        .arg("-v")
        .arg(env!("CARGO_BIN_EXE_flow"))
        .args(["run", big.to_str().unwrap()])
        .env("FLOW_CACHE", &cache)
        .output()
        .expect("/usr/bin/time (Debian package `time`)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stderr);
    let kb: f64 = report
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .unwrap()
        .parse()
        .unwrap();
    let enc = show(&cache, &big, "encode");
    let rows = show(&cache, &big, "rows");
    println!(
        "2 GB run (source {:.0} s + tokenize {:.0} s + pack {:.0} s, {} tokens, {} rows of 1024): peak RSS {:.0} MB (target < 500 MB)",
        show(&cache, &big, "big")["duration_s"].as_f64().unwrap(),
        enc["duration_s"].as_f64().unwrap(),
        rows["duration_s"].as_f64().unwrap(),
        enc["metrics"]["tokens"],
        rows["metrics"]["rows"],
        kb / 1024.0
    );
}
