//! The CommitLog under `kill -9`: a child process appends and syncs entries,
//! printing each acknowledged index; it is killed mid-stream; the reopened
//! log holds every acknowledged entry, intact and in order.

use std::io::BufRead;
use std::io::BufReader;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use raft_log::CommitLog;
use raft_log::EntryKind;
use raft_log::LogConfig;
use raft_log::RecordRef;
use raft_log::StdFs;

const CHILD_ENV: &str = "RAFTMQ_TEST_COMMITLOG_WRITER_DIR";

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 1 << 20,
        index_slots_per_file: 4096,
        max_entry_bytes: 64 << 10,
        max_unsynced_bytes: 256 << 10,
        ..LogConfig::default()
    }
}

fn body(index: u64) -> Vec<u8> {
    let len = 100 + (index % 900) as usize;
    (0..len).map(|i| (index as usize + i) as u8).collect()
}

/// The child: appends batches forever, printing `acked <last index>` after each sync.
#[test]
#[ignore = "child process of kill9_loses_no_acknowledged_entry"]
fn commitlog_writer_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else { return };
    let (log, _) = CommitLog::open(&dir, config(), Arc::new(StdFs)).unwrap();
    let mut next = log.last_entry().map(|l| l.index + 1).unwrap_or(0);
    loop {
        let bodies: Vec<Vec<u8>> = (next..next + 7).map(body).collect();
        let recs: Vec<RecordRef<'_>> = (next..)
            .zip(&bodies)
            .map(|(index, b)| RecordRef { index, term: 1, leader_node: 1, kind: EntryKind::Normal, body: b })
            .collect();
        log.append(&recs).unwrap();
        log.sync().unwrap();
        next += 7;
        println!("acked {}", next - 1);
    }
}

#[test]
fn kill9_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let mut acked: Option<u64> = None;
    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "commitlog_kill::commitlog_writer_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let started = Instant::now();
        let mut lines = 0;
        for line in stdout.lines() {
            let line = line.unwrap();
            if let Some(n) = line.strip_prefix("acked ") {
                acked = Some(n.trim().parse().unwrap());
                lines += 1;
            }
            if lines >= 200 + round * 100 || started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        // SIGKILL while it is writing.
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(lines > 0, "the child acknowledged nothing");

        let (log, report) = CommitLog::open(dir.path(), config(), Arc::new(StdFs)).unwrap();
        let last = log.last_entry().expect("entries").index;
        let acked = acked.unwrap();
        assert!(last >= acked, "round {round}: acknowledged {acked}, log ends at {last}");
        for i in 0..=last {
            let r = log.read(i).unwrap_or_else(|e| panic!("entry {i}: {e}"));
            assert_eq!(&r.body[..], &body(i)[..], "entry {i}");
        }
        println!("round {round}: acked {acked}, recovered {last}, recovery {report:?}");
    }
}
