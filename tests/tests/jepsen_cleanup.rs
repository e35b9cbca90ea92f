//! raftmq-jepsen cleans up after itself even when it is killed: a run
//! killed with SIGKILL leaves namespaces and processes that the next
//! `raftmq-jepsen cleanup` (also run at every start) removes.

use std::process::Command;
use std::time::Duration;
use std::time::Instant;

fn our_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("rmqj-"))
        .map(str::to_string)
        .collect()
}

fn alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn a_killed_run_is_cleaned_up() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 || Command::new("iptables").arg("--version").output().is_err() {
        eprintln!("SKIPPED a_killed_run_is_cleaned_up: needs root and iptables (network namespaces)");
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let bin = raftmq_tests::bin("raftmq-jepsen");
    let mut run = Command::new(&bin)
        .args(["run", "--nodes", "3", "--nemesis", "kill-random", "--time-limit", "120", "--out"])
        .arg(out.path().join("run"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the cluster is up (its namespaces and brokers exist).
    let deadline = Instant::now() + Duration::from_secs(60);
    while our_namespaces().len() < 6 || !out.path().join("run/history.jsonl").exists() {
        assert!(Instant::now() < deadline, "the run never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    let state = std::fs::read_to_string("/tmp/raftmq-jepsen.state").unwrap();
    let list = state.split("\"pids\":[").nth(1).and_then(|r| r.split(']').next()).unwrap_or("");
    let pids: Vec<i32> = list.split(',').filter_map(|s| s.trim().parse().ok()).collect();
    assert!(pids.len() >= 7, "the state file lists the name server, proxies and brokers: {state}");
    run.kill().unwrap();
    run.wait().unwrap();
    assert!(!our_namespaces().is_empty(), "a killed run leaves its namespaces");
    let status = Command::new(&bin).arg("cleanup").status().unwrap();
    assert!(status.success());
    assert!(our_namespaces().is_empty(), "left: {:?}", our_namespaces());
    std::thread::sleep(Duration::from_millis(300));
    let left: Vec<i32> = pids.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes still alive: {left:?}");
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
