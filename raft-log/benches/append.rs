//! CommitLog append benchmark, `sync` flush mode.
//!
//! For batches of 1, 16 and 256 entries of 1 KiB: append the batch, fdatasync
//! it, repeat. Beside it, in the same run and directory, a baseline of plain
//! sequential `write` + `fdatasync` of the same payload bytes to one file.
//! Prints entries/s, payload MB/s and p50/p99 latency of append+sync per batch.
//!
//! Run: `cargo bench -p raft-log --bench append` (add `-- --quick` for a short
//! run; `RAFTLOG_BENCH_DIR` picks the directory, default: a fresh one under
//! /var/tmp, on the same disk as the data of a default install).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use raft_log::CommitLog;
use raft_log::EntryKind;
use raft_log::LogConfig;
use raft_log::RecordRef;
use raft_log::StdFs;

const ENTRY_BYTES: usize = 1024;

struct Result {
    name: String,
    batch: usize,
    batches: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Result {
    fn entries_per_s(&self) -> f64 {
        (self.batches * self.batch) as f64 / self.elapsed.as_secs_f64()
    }

    fn mb_per_s(&self) -> f64 {
        (self.batches * self.batch * ENTRY_BYTES) as f64 / self.elapsed.as_secs_f64() / 1e6
    }

    fn pct(&self, p: f64) -> Duration {
        let mut v = self.latencies.clone();
        v.sort();
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    }
}

fn bench_log(dir: &std::path::Path, batch: usize, batches: usize) -> Result {
    let _ = std::fs::remove_dir_all(dir);
    let (log, _) = CommitLog::open(dir, LogConfig::default(), Arc::new(StdFs)).expect("open");
    let payload = vec![0xA5u8; ENTRY_BYTES];
    let mut index = 0u64;
    let mut latencies = Vec::with_capacity(batches);
    // Warm-up: create the first segment and index file.
    log.append(&[RecordRef { index, term: 1, leader_node: 1, kind: EntryKind::Normal, body: &payload }]).unwrap();
    log.sync().unwrap();
    index += 1;
    let start = Instant::now();
    for _ in 0..batches {
        let recs: Vec<RecordRef<'_>> = (0..batch as u64)
            .map(|k| RecordRef { index: index + k, term: 1, leader_node: 1, kind: EntryKind::Normal, body: &payload })
            .collect();
        let t = Instant::now();
        log.append(&recs).unwrap();
        log.sync().unwrap();
        latencies.push(t.elapsed());
        index += batch as u64;
    }
    let elapsed = start.elapsed();
    drop(log);
    let _ = std::fs::remove_dir_all(dir);
    Result { name: "raft-log".into(), batch, batches, elapsed, latencies }
}

fn bench_baseline(dir: &std::path::Path, batch: usize, batches: usize) -> Result {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("baseline.dat");
    let _ = std::fs::remove_file(&path);
    let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
    let buf = vec![0xA5u8; ENTRY_BYTES * batch];
    f.write_all(&buf[..ENTRY_BYTES]).unwrap();
    f.sync_data().unwrap();
    let mut latencies = Vec::with_capacity(batches);
    let start = Instant::now();
    for _ in 0..batches {
        let t = Instant::now();
        f.write_all(&buf).unwrap();
        f.sync_data().unwrap();
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Result { name: "write+fdatasync".into(), batch, batches, elapsed, latencies }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let base = match std::env::var("RAFTLOG_BENCH_DIR") {
        Ok(d) => std::path::PathBuf::from(d),
        Err(_) => std::env::temp_dir().join(format!("raftlog-bench-{}", std::process::id())),
    };
    let base = if std::env::var("RAFTLOG_BENCH_DIR").is_err() && std::path::Path::new("/var/tmp").exists() {
        std::path::PathBuf::from("/var/tmp").join(base.file_name().unwrap())
    } else {
        base
    };
    // (batch, number of batches): about the same bytes per configuration.
    let plan: &[(usize, usize)] =
        if quick { &[(1, 300), (16, 150), (256, 40)] } else { &[(1, 3000), (16, 1500), (256, 400)] };
    println!("raft-log append benchmark: 1 KiB entries, sync mode (append + fdatasync per batch)");
    println!("directory: {}", base.display());
    println!();
    println!("| writer | batch | batches | entries/s | MB/s | p50 ms | p99 ms | log / baseline MB/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for &(batch, batches) in plan {
        // Two rounds, alternating, so both writers see the same disk state;
        // each writer's figures aggregate both of its rounds.
        let mut b =
            Result { name: "write+fdatasync".into(), batch, batches: 0, elapsed: Duration::ZERO, latencies: vec![] };
        let mut l = Result { name: "raft-log".into(), batch, batches: 0, elapsed: Duration::ZERO, latencies: vec![] };
        for _ in 0..2 {
            for (acc, r) in [
                (&mut b, bench_baseline(&base.join("baseline"), batch, batches)),
                (&mut l, bench_log(&base.join("log"), batch, batches)),
            ] {
                acc.batches += r.batches;
                acc.elapsed += r.elapsed;
                acc.latencies.extend(r.latencies);
            }
        }
        let ratio = l.mb_per_s() / b.mb_per_s();
        for r in [&b, &l] {
            println!(
                "| {} | {} | {} | {:.0} | {:.1} | {:.3} | {:.3} | {} |",
                r.name,
                r.batch,
                r.batches,
                r.entries_per_s(),
                r.mb_per_s(),
                r.pct(0.50).as_secs_f64() * 1e3,
                r.pct(0.99).as_secs_f64() * 1e3,
                if r.name == "raft-log" { format!("{:.0} %", ratio * 100.0) } else { String::new() },
            );
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}
