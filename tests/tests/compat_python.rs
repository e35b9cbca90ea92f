//! The official Python client (`rocketmq-python-client` from PyPI) against a
//! three-node group: producer sends, simple consumer receives and acks.
//! Installs the client into a venv under /var/tmp (reused between runs);
//! skips with a printed reason when python3 or PyPI is not available.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use raftmq_tests::Cluster;

const CLIENT: &str = "rocketmq-python-client==5.1.2";

fn venv() -> Result<PathBuf, String> {
    let dir = PathBuf::from(std::env::var("RAFTMQ_PYENV").unwrap_or_else(|_| "/var/tmp/raftmq-pyenv".into()));
    let py = dir.join("bin/python");
    let ready = dir.join(".installed-5.1.2");
    if ready.exists() {
        return Ok(py);
    }
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !ok(Command::new("python3").args(["-m", "venv", &dir.display().to_string()])) {
        return Err("python3 -m venv failed (is python3-venv installed? scripts/setup.sh installs it)".into());
    }
    if !ok(Command::new(dir.join("bin/pip")).args(["install", "-q", CLIENT])) {
        return Err(format!("pip install {CLIENT} failed (no PyPI access?)"));
    }
    std::fs::write(ready, b"").map_err(|e| e.to_string())?;
    Ok(py)
}

#[test]
fn official_python_client_sends_receives_and_acks() {
    let py = match venv() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED official_python_client_sends_receives_and_acks: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let a = raftmq_client::Admin::connect(&c.nodes[0].1).unwrap();
            match a.create_topic("pytopic", 4, 1, false).await {
                Ok(_) => break,
                Err(e) if e.to_string().contains("exists") => break,
                Err(e) if std::time::Instant::now() > deadline => panic!("create topic: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/compat/python_smoke.py");
    // One endpoint: with several `ip:port` endpoints the Python client's gRPC
    // core sends `:authority: a:p1,b:p2`, which Rust's HTTP/2 stack (h2)
    // rejects as malformed. Any node serves the whole API, so one is enough;
    // production setups give the client a DNS name (valid authority).
    let endpoints = c.addrs()[1].clone();
    let out = Command::new(&py).args([script, &endpoints, "pytopic", "50"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !out.status.success() {
        c.dump_logs();
        panic!("python client failed:\n{stdout}\n{stderr}");
    }
    assert!(stdout.contains("received and acked 50, missing 0, unexpected 0, ids match True"), "{stdout}");
}
