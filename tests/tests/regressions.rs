//! Regression tests for faults the fault-injection suite (`raftmq-jepsen`)
//! found. Each names the run that found it; README lists them under
//! "Faults found and fixed".

use std::time::Duration;

use raftmq_client::Admin;
use raftmq_client::OutMessage;
use raftmq_client::Producer;
use raftmq_client::ProducerOptions;
use raftmq_client::PullConsumer;
use raftmq_tests::Cluster;

use crate::cluster::create_topic;
use crate::cluster::runtime;
use crate::cluster::wait_caught_up;
use crate::cluster::wait_for_leader;

/// jepsen offsets register (partition-leader, disk-power-loss, clock-skew,
/// kill-majority; 3 nodes): a consumer offset committed through one node
/// was read back older through another: GetOffset read the local state of
/// a follower that had not applied the commit yet. It now waits for the
/// leader's read index first.
#[test]
fn committed_offsets_are_never_read_back_stale_from_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "reg", 1).await;
        let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        let batch: Vec<OutMessage> = (0..300).map(|i| OutMessage::new(format!("m{i}"))).collect();
        p.send_batch("reg", &batch).await.unwrap();
        let leader_addr = c.nodes[c.index_of(leader)].1.clone();
        let followers: Vec<String> = c.nodes.iter().filter(|(id, _)| *id != leader).map(|(_, a)| a.clone()).collect();
        let writer = PullConsumer::new(std::slice::from_ref(&leader_addr), "g").unwrap();
        let readers: Vec<PullConsumer> =
            followers.iter().map(|a| PullConsumer::new(std::slice::from_ref(a), "g").unwrap()).collect();
        for v in 1..=200u64 {
            writer.commit("reg", 0, v).await.unwrap();
            let r = &readers[v as usize % readers.len()];
            let got = r.committed("reg", 0).await.unwrap();
            assert!(got >= v, "committed {v} through the leader, read back {got} through a follower");
        }
    });
}

/// jepsen offsets register (same run, after the fix above; kill-majority):
/// a leader killed and restarted with a majority resumed leadership in its
/// old term from its stored committed vote, knowing only a lagging commit
/// index; its ReadIndex reads returned offsets older than acknowledged
/// commits. A restarted leader now has to win a new election.
#[test]
fn a_restarted_leader_never_serves_reads_older_than_acknowledged_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "reg", 1).await;
        let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        // Offsets are clamped to the queue's end: room for every value.
        let batch: Vec<OutMessage> = (0..600).map(|i| OutMessage::new(format!("m{i}"))).collect();
        p.send_batch("reg", &batch).await.unwrap();
        let follower = c.nodes.iter().map(|(id, _)| *id).find(|id| *id != leader).unwrap();
        for round in 0..5u64 {
            let (leader, _) = wait_for_leader(&c, Duration::from_secs(20)).await;
            let leader_addr = c.nodes[c.index_of(leader)].1.clone();
            let writer = PullConsumer::new(std::slice::from_ref(&leader_addr), "g").unwrap();
            let last = 100 * (round + 1);
            for v in 100 * round + 1..=last {
                writer.commit("reg", 0, v).await.unwrap();
            }
            // Crash the leader and a follower right after the last
            // acknowledgement, restart them, and read through the old
            // leader as early as it answers.
            let other = c.nodes.iter().map(|(id, _)| *id).find(|id| *id != leader && *id != follower).unwrap();
            let victim = if round % 2 == 0 { follower } else { other };
            c.kill_node(c.index_of(leader));
            c.kill_node(c.index_of(victim));
            c.start_node(c.index_of(leader));
            c.start_node(c.index_of(victim));
            let reader = PullConsumer::new(std::slice::from_ref(&leader_addr), "g").unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let mut reads = 0;
            while reads < 20 {
                match reader.committed("reg", 0).await {
                    Ok(got) => {
                        assert_eq!(got, last, "round {round}: read through the restarted leader {leader_addr}");
                        reads += 1;
                    }
                    Err(e) => {
                        assert!(std::time::Instant::now() < deadline, "{leader_addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        }
    });
}

/// Zeroes the last `n` bytes written to node `id`'s newest segment (a disk
/// that lost an fsynced tail). Returns the range zeroed.
fn zero_log_tail(c: &Cluster, id: u64, n: u64) -> (std::path::PathBuf, u64, u64) {
    let data = c.dir.join(format!("n{id}")).join("log").join("data");
    let mut segs: Vec<_> = std::fs::read_dir(&data).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    let seg = segs.pop().expect("a segment");
    let bytes = std::fs::read(&seg).unwrap();
    let end = bytes.iter().rposition(|&b| b != 0).map(|p| p as u64 + 1).unwrap_or(0);
    let from = end.saturating_sub(n);
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (end - from) as usize], from).unwrap();
    f.sync_all().unwrap();
    (seg, from, end)
}

/// The group's config for the lost-tail tests: no log checkpoint during the
/// test, so a lost tail is after it and recovery cuts it instead of refusing
/// to open.
const NO_LOG_CHECKPOINT: &str =
    "[log]\nsegment_bytes = 16777216\nmax_entry_bytes = 8388608\ncheckpoint_interval_ms = 600000\n";

/// Sends 200 messages to a new topic `t` (2 queues), waits `settle`, kills a
/// follower, zeroes the last 4 KiB of its CommitLog, restarts it, sends 200
/// more and waits until it applied everything the leader committed.
/// Returns the leader's admin client and the follower's id.
async fn follower_loses_its_log_tail(c: &mut Cluster, settle: Duration) -> (Admin, u64) {
    let (leader, admin) = wait_for_leader(c, Duration::from_secs(20)).await;
    create_topic(&admin, "t", 2).await;
    let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
    for i in 0..200 {
        p.send("t", OutMessage::new(format!("a{i}"))).await.unwrap();
    }
    tokio::time::sleep(settle).await;
    let follower = c.nodes.iter().map(|(id, _)| *id).find(|id| *id != leader).unwrap();
    let fi = c.index_of(follower);
    c.kill_node(fi);
    let (seg, from, end) = zero_log_tail(c, follower, 4096);
    eprintln!("zeroed {from}..{end} of {}", seg.display());
    c.start_node(fi);
    for i in 0..200 {
        p.send("t", OutMessage::new(format!("b{i}"))).await.unwrap_or_else(|e| panic!("send b{i}: {e}"));
    }
    // The follower catches up with everything it lost.
    wait_caught_up(c, &admin, &c.nodes[fi].1, Duration::from_secs(30)).await;
    (admin, follower)
}

/// jepsen run (loss, delay, disk-truncate-tail, disk-flip, disk-full,
/// partition-oneway, kill-minority, pause-random; 3 nodes): a follower whose
/// disk lost the tail of its log came back with fewer entries than it had
/// acknowledged; openraft's leader panicked on the "log reversion", leaving
/// a process that answered but could not replicate (10 s unavailable until
/// another node took over). The leader now resends what the follower lost,
/// and a Raft core that stops on its own ends the process.
#[test]
fn a_follower_that_lost_its_log_tail_does_not_bring_the_leader_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, NO_LOG_CHECKPOINT);
    runtime().block_on(async {
        follower_loses_its_log_tail(&mut c, Duration::ZERO).await;
        for (id, _) in &c.nodes {
            let log = std::fs::read_to_string(c.log_path(*id)).unwrap();
            assert!(!log.contains("panicked"), "node {id} panicked");
        }
    });
}

/// jepsen long run (`--nemesis all`, 2026-11-22; disk-truncate-tail [1]):
/// the node's state had applied (and checkpointed) entries that the zeroed
/// tail of its CommitLog then lost. openraft took the state for a snapshot
/// and purged the whole log, so the node's queues began thousands of
/// messages late (the final read found 9692 of 28392 acknowledged messages).
/// The state is now rebuilt from the log: the follower's queues start at 0
/// and hold every message.
#[test]
fn a_follower_whose_state_outran_its_lost_log_tail_keeps_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, NO_LOG_CHECKPOINT);
    runtime().block_on(async {
        // The state checkpoints every second: let it cover the tail that
        // will be lost.
        let (admin, follower) = follower_loses_its_log_tail(&mut c, Duration::from_millis(2500)).await;
        let f_admin = Admin::connect(&c.nodes[c.index_of(follower)].1).unwrap();
        let ranges = |topics: Vec<raftmq_proto::admin::TopicStatus>| -> Vec<(u64, u64)> {
            let t = topics.into_iter().find(|t| t.config.as_ref().is_some_and(|c| c.name == "t")).expect("topic t");
            t.queues.iter().map(|q| (q.min_offset, q.max_offset)).collect()
        };
        let on_leader = ranges(admin.list_topics().await.unwrap());
        let on_follower = ranges(f_admin.list_topics().await.unwrap());
        assert_eq!(on_leader.iter().map(|r| r.1).sum::<u64>(), 400);
        assert_eq!(on_follower, on_leader, "the follower serves every message, from offset 0");
        let log = std::fs::read_to_string(c.log_path(follower)).unwrap();
        assert!(log.contains("rebuilding the state from the log"), "the follower's state was ahead of its log");
    });
}

/// jepsen long run (`--nemesis all`; pause-leader: 10 s without an
/// acknowledged send): a follower forwarding a proposal to a paused leader
/// waited out the whole 5 s forwarding timeout although a new leader was
/// elected within 2 s. It now forwards again once it learns of the new
/// leader: a single send through a follower, allowed 4 s, succeeds.
#[test]
fn a_send_through_a_follower_does_not_wait_for_a_paused_leader() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "t", 2).await;
        let follower = c.nodes.iter().map(|(id, _)| *id).find(|id| *id != leader).unwrap();
        let f_addr = c.nodes[c.index_of(follower)].1.clone();
        let opts =
            ProducerOptions { max_attempts: 1, request_timeout: Duration::from_secs(4), ..ProducerOptions::default() };
        let p = Producer::new(std::slice::from_ref(&f_addr), opts).unwrap();
        p.send("t", OutMessage::new("before")).await.unwrap();
        c.pause_node(c.index_of(leader), true);
        let r = p.send("t", OutMessage::new("during")).await;
        c.pause_node(c.index_of(leader), false);
        r.expect("a send through a follower while the old leader is paused");
    });
}

/// jepsen offsets register (CI, 2026-11-22; partition-halves [1] | [3,2],
/// then pause-leader [2]): a follower forwarded an offset commit to leader 1
/// just as the partition cut it off, gave up when 2 was elected and forwarded
/// the commit there (acknowledged at once). The first forward stayed in a TCP
/// send buffer; retransmitted after the partition healed, it reached node 1
/// 12 s later, when node 1 led again in a newer term, and was applied then:
/// the register went back to a value overwritten long before (write 113, then
/// 122..126 read back, then 113 read). A forward now names the term in which
/// the forwarder saw the receiver lead; in any other term it is refused.
#[test]
fn a_forwarded_proposal_is_refused_outside_the_term_it_was_sent_for() {
    use raftmq_broker::command::Control;
    use raftmq_broker::command::encode_control;
    use raftmq_proto::admin::ProposeRequest;
    use raftmq_proto::admin::admin_service_client::AdminServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, "");
    runtime().block_on(async {
        let (leader, admin) = wait_for_leader(&c, Duration::from_secs(20)).await;
        create_topic(&admin, "reg", 1).await;
        let p = Producer::new(&c.addrs(), ProducerOptions::default()).unwrap();
        let batch: Vec<OutMessage> = (0..10).map(|i| OutMessage::new(format!("m{i}"))).collect();
        p.send_batch("reg", &batch).await.unwrap();
        let term = admin.node_status().await.unwrap().term;
        let leader_addr = c.nodes[c.index_of(leader)].1.clone();
        let mut raw = AdminServiceClient::connect(format!("http://{leader_addr}")).await.unwrap();
        let reader = PullConsumer::new(std::slice::from_ref(&leader_addr), "g").unwrap();
        let commit = |offset: u64| {
            encode_control(&Control::UpdateOffset { group: "g".into(), topic: "reg".into(), queue: 0, offset })
        };

        for stale in [term - 1, term + 1] {
            let r = raw.propose(ProposeRequest { command: commit(7).into(), leader_term: stale }).await;
            assert!(r.is_err(), "a forward for term {stale} was applied by the leader of term {term}");
        }
        let r = raw.propose(ProposeRequest { command: commit(7).into(), leader_term: 0 }).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::InvalidArgument, "a forward naming no term");
        assert_eq!(reader.committed("reg", 0).await.unwrap(), 0, "a refused forward changed the offset");

        raw.propose(ProposeRequest { command: commit(7).into(), leader_term: term }).await.expect("same term");
        assert_eq!(reader.committed("reg", 0).await.unwrap(), 7);
    });
}
