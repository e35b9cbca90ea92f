//! The web console (`raftmq console`) in a real browser: headless Chromium
//! (Debian's `chromium`, installed by this test when missing) driven by
//! Playwright (from PyPI, into a venv under /var/tmp) through the cluster
//! page, a topic create and a leadership transfer. Screenshots of the main
//! pages go to `$CARGO_TARGET_DIR/debug/console-screenshots/`.

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use raftmq_tests::Cluster;
use raftmq_tests::bin;
use raftmq_tests::bin_dir;
use raftmq_tests::free_ports;

use crate::cluster::runtime;
use crate::cluster::wait_for_leader;

const PLAYWRIGHT: &str = "playwright==1.65.2";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Chromium and a Python with Playwright, installed when missing.
fn browser_env() -> Result<PathBuf, String> {
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    if !std::path::Path::new(CHROMIUM).exists() {
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
        if !root {
            return Err("Debian's chromium is not installed, and installing it needs root".into());
        }
        let apt = ["-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends", "chromium"];
        if !ok(Command::new("apt-get").args(apt).env("DEBIAN_FRONTEND", "noninteractive").stdout(Stdio::null())) {
            return Err("apt-get install chromium failed".into());
        }
    }
    let dir =
        PathBuf::from(std::env::var("RAFTMQ_CONSOLE_PYENV").unwrap_or_else(|_| "/var/tmp/raftmq-console-pyenv".into()));
    let ready = dir.join(".installed-playwright-1.65.2");
    if !ready.exists() {
        if !ok(Command::new("python3").args(["-m", "venv", &dir.display().to_string()])) {
            return Err("python3 -m venv failed (scripts/setup.sh installs python3-venv)".into());
        }
        if !ok(Command::new(dir.join("bin/pip")).args(["install", "-q", PLAYWRIGHT])) {
            return Err(format!("pip install {PLAYWRIGHT} failed (no PyPI access?)"));
        }
        std::fs::write(&ready, b"").map_err(|e| e.to_string())?;
    }
    Ok(dir.join("bin/python"))
}

/// Kills the console process when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_console_shows_the_cluster_creates_a_topic_and_follows_a_leader_transfer() {
    let py = match browser_env() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED the_console_shows_the_cluster_creates_a_topic_and_follows_a_leader_transfer: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    let (leader, _) = runtime().block_on(wait_for_leader(&c, Duration::from_secs(20)));
    // The name server lists the group once its nodes registered.
    std::thread::sleep(Duration::from_secs(1));

    let listen = format!("127.0.0.1:{}", free_ports(1)[0]);
    let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let _console = Reaped(
        Command::new(bin("raftmq"))
            .args(["--server", &c.addrs().join(","), "--namesrv", &c.namesrv_addr, "console", "--listen", &listen])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start raftmq console"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "the console did not open {listen}");
        std::thread::sleep(Duration::from_millis(100));
    }

    let shots = bin_dir().join("console-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/console/drive.py");
    let out = Command::new(&py)
        .args([script, &format!("http://{listen}"), &shots.display().to_string()])
        .output()
        .expect("run the browser script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "browser script failed:\n{stdout}\n{}\nconsole log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON result");
    println!("console: {seen}");
    assert_eq!(seen["leader_before"], leader, "the cluster page shows the leader the group has");
    assert_ne!(seen["leader_after"], seen["leader_before"], "the page follows the transfer");
    assert_eq!(seen["leader_after"], seen["asked"], "leadership went to the node the button named");
    assert_eq!(seen["topic_queues"], "4");
    assert_eq!(seen["form_kept"], "10.9.9.9:8081", "the 2 s refresh keeps what is typed in the add-node form");
    assert_eq!(seen["navigation_stayed"], true, "a page left while loading does not draw over the next one");

    runtime().block_on(async {
        let (now, admin) = wait_for_leader(&c, Duration::from_secs(10)).await;
        assert_eq!(serde_json::json!(now), seen["leader_after"]);
        let topics = admin.list_topics().await.unwrap();
        let t = topics.iter().find_map(|t| t.config.as_ref().filter(|c| c.name == "console-topic"));
        assert_eq!(t.map(|c| c.queues), Some(4), "the topic the page created exists");
    });
    for name in ["cluster.png", "topics.png", "groups.png", "messages.png", "cluster-after-transfer.png"] {
        let len = std::fs::metadata(shots.join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "screenshot {name} missing or empty");
    }
}
