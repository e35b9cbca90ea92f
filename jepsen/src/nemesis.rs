//! Faults: what each nemesis does, how it is healed, and the schedule
//! (normal interval, fault interval, then heal; all healed at the end).

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use raftmq_client::Admin;
use rand::Rng;
use rand::seq::IndexedRandom;
use rand::seq::SliceRandom;
use tokio::sync::Mutex;

use crate::cluster::Cluster;
use crate::cluster::Mode;
use crate::history::Event;
use crate::history::F;
use crate::history::Kind;
use crate::history::Recorder;
use crate::proxy::Rules;

pub const ALL: &[&str] = &[
    "kill-leader",
    "kill-random",
    "kill-minority",
    "kill-majority",
    "pause-leader",
    "pause-random",
    "partition-halves",
    "partition-leader",
    "partition-bridge",
    "partition-ring",
    "partition-oneway",
    "loss",
    "delay",
    "clock-skew",
    "disk-power-loss",
    "disk-truncate-tail",
    "disk-flip",
    "disk-full",
];

pub fn parse(list: &str, nodes: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for n in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if n == "all" {
            out.extend(ALL.iter().map(|s| s.to_string()).filter(|s| nodes == 5 || !needs_five(s)));
            continue;
        }
        if !ALL.contains(&n) {
            bail!("unknown nemesis {n:?}; choose from: {}", ALL.join(", "));
        }
        if needs_five(n) && nodes != 5 {
            bail!("nemesis {n} needs --nodes 5");
        }
        out.push(n.to_string());
    }
    Ok(out)
}

fn needs_five(n: &str) -> bool {
    matches!(n, "partition-bridge" | "partition-ring")
}

/// How to undo an active fault.
#[derive(Debug, Clone)]
enum Heal {
    Restart(Vec<u64>),
    Resume(Vec<u64>),
    Network,
    Clock(Vec<u64>),
    /// Restart after a disk fault; a node whose log refuses to open is
    /// repaired by wiping its data (it then catches up from the group).
    Disk(Vec<u64>),
}

pub struct Nemesis {
    pub cluster: Arc<Mutex<Cluster>>,
    rec: Arc<Recorder>,
    active: Vec<(String, Heal)>,
}

async fn leader(cluster: &Arc<Mutex<Cluster>>) -> Option<u64> {
    let addrs: Vec<(u64, String)> = cluster.lock().await.nodes.iter().map(|n| (n.id, n.listen.to_string())).collect();
    for (id, addr) in addrs {
        let Ok(a) = Admin::connect(&addr) else { continue };
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(500), a.node_status()).await
            && s.role == "leader"
        {
            return Some(id);
        }
    }
    None
}

fn iptables(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("ip").args(["netns", "exec", ns, "iptables"]).args(args).output()?;
    if !out.status.success() {
        bail!("iptables {} in {ns}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Last written byte + 1 of a segment file (its unwritten tail reads zero).
fn written_len(path: &std::path::Path) -> std::io::Result<u64> {
    let data = std::fs::read(path)?;
    Ok(data.iter().rposition(|&b| b != 0).map(|p| p as u64 + 1).unwrap_or(0))
}

fn segments(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(data_dir.join("log").join("data"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|e| e == "seg")).collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Nemesis {
    pub fn new(cluster: Arc<Mutex<Cluster>>, rec: Arc<Recorder>) -> Self {
        Nemesis { cluster, rec, active: Vec::new() }
    }

    fn log(&self, kind: F, value: String) {
        self.rec.log(&Event::new("nemesis", Kind::Event, kind, value));
    }

    async fn ids(&self) -> Vec<u64> {
        self.cluster.lock().await.nodes.iter().map(|n| n.id).collect()
    }

    async fn random_ids(&self, k: usize) -> Vec<u64> {
        let mut ids = self.ids().await;
        ids.shuffle(&mut rand::rng());
        ids.truncate(k);
        ids
    }

    async fn leader_or_random(&self) -> u64 {
        match leader(&self.cluster).await {
            Some(l) => l,
            None => self.random_ids(1).await[0],
        }
    }

    /// Cuts the links between every pair in `cut` (both ways unless `one_way`:
    /// then only from the first to the second).
    async fn cut(&self, cut: &[(u64, u64)], one_way: bool) -> anyhow::Result<()> {
        let c = self.cluster.lock().await;
        match c.mode {
            Mode::Netns => {
                for &(a, b) in cut {
                    let (na, nb) = (&c.nodes[c.index(a)], &c.nodes[c.index(b)]);
                    let (ia, ib) = (na.ip().to_string(), nb.ip().to_string());
                    iptables(nb.ns.as_deref().expect("netns"), &["-A", "INPUT", "-s", &ia, "-j", "DROP"])?;
                    if !one_way {
                        iptables(na.ns.as_deref().expect("netns"), &["-A", "INPUT", "-s", &ib, "-j", "DROP"])?;
                    }
                }
            }
            Mode::Loopback => {
                let mut rules: Vec<Rules> = c.nodes.iter().map(|n| read_rules(&n.rules)).collect();
                for &(a, b) in cut {
                    let (ia, ib) = (c.index(a), c.index(b));
                    rules[ib].blocked.insert(c.nodes[ia].ip());
                    if !one_way {
                        rules[ia].blocked.insert(c.nodes[ib].ip());
                    }
                }
                for (n, r) in c.nodes.iter().zip(rules) {
                    write_rules(&n.rules, &r)?;
                }
            }
        }
        Ok(())
    }

    /// Splits the nodes into components; links between components are cut.
    async fn partition(&self, components: &[Vec<u64>]) -> anyhow::Result<()> {
        let mut cut = Vec::new();
        for (i, a) in components.iter().enumerate() {
            for b in &components[i + 1..] {
                for x in a {
                    for y in b {
                        cut.push((*x, *y));
                    }
                }
            }
        }
        self.cut(&cut, false).await
    }

    async fn heal_network(&self) -> anyhow::Result<()> {
        let c = self.cluster.lock().await;
        for n in &c.nodes {
            if let Some(ns) = &n.ns {
                iptables(ns, &["-F"])?;
            }
            write_rules(&n.rules, &Rules::default())?;
        }
        Ok(())
    }

    /// Applies one fault by name; returns a description for the history.
    pub async fn start(&mut self, name: &str) -> anyhow::Result<String> {
        let ids = self.ids().await;
        let n = ids.len();
        let (desc, heal) = match name {
            "kill-leader" | "kill-random" | "kill-minority" | "kill-majority" => {
                let targets = match name {
                    "kill-leader" => vec![self.leader_or_random().await],
                    "kill-random" => self.random_ids(1).await,
                    "kill-minority" => self.random_ids((n - 1) / 2).await,
                    _ => self.random_ids(n / 2 + 1).await,
                };
                let mut c = self.cluster.lock().await;
                for id in &targets {
                    c.kill(*id);
                }
                (format!("{name} {targets:?}"), Heal::Restart(targets))
            }
            "pause-leader" | "pause-random" => {
                let targets =
                    if name == "pause-leader" { vec![self.leader_or_random().await] } else { self.random_ids(1).await };
                let c = self.cluster.lock().await;
                for id in &targets {
                    c.signal(*id, libc::SIGSTOP);
                }
                (format!("{name} {targets:?}"), Heal::Resume(targets))
            }
            "partition-halves" => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(&mut rand::rng());
                let (a, b) = shuffled.split_at(n / 2);
                self.partition(&[a.to_vec(), b.to_vec()]).await?;
                (format!("{name} {a:?} | {b:?}"), Heal::Network)
            }
            "partition-leader" => {
                let l = self.leader_or_random().await;
                let rest: Vec<u64> = ids.iter().copied().filter(|i| *i != l).collect();
                self.partition(&[vec![l], rest.clone()]).await?;
                (format!("{name} [{l}] | {rest:?}"), Heal::Network)
            }
            "partition-bridge" => {
                // Two halves joined by one node that sees both.
                let mut s = ids.clone();
                s.shuffle(&mut rand::rng());
                let (a, bridge, b) = (&s[0..2], s[2], &s[3..5]);
                let mut cut = Vec::new();
                for x in a {
                    for y in b {
                        cut.push((*x, *y));
                    }
                }
                self.cut(&cut, false).await?;
                (format!("{name} {a:?} <{bridge}> {b:?}"), Heal::Network)
            }
            "partition-ring" => {
                // Each node sees itself and its two ring neighbours: a
                // majority each, no two the same.
                let mut s = ids.clone();
                s.shuffle(&mut rand::rng());
                let mut cut = Vec::new();
                for i in 0..5 {
                    for j in i + 1..5 {
                        let d = (j - i).min(5 - (j - i));
                        if d > 1 {
                            cut.push((s[i], s[j]));
                        }
                    }
                }
                self.cut(&cut, false).await?;
                (format!("{name} ring {s:?}"), Heal::Network)
            }
            "partition-oneway" => {
                let l = self.leader_or_random().await;
                let others: Vec<(u64, u64)> = ids.iter().filter(|i| **i != l).map(|i| (l, *i)).collect();
                self.cut(&others, true).await?;
                (format!("{name} {l} cannot reach the others (they reach it)"), Heal::Network)
            }
            "loss" | "delay" => {
                let c = self.cluster.lock().await;
                let (loss, delay_ms) = if name == "loss" { (0.2, 0) } else { (0.0, 60) };
                for node in &c.nodes {
                    if name == "loss"
                        && let Some(ns) = &node.ns
                    {
                        for peer in c.nodes.iter().filter(|p| p.id != node.id) {
                            let ip = peer.ip().to_string();
                            iptables(
                                ns,
                                &[
                                    "-A",
                                    "INPUT",
                                    "-s",
                                    &ip,
                                    "-m",
                                    "statistic",
                                    "--mode",
                                    "random",
                                    "--probability",
                                    "0.2",
                                    "-j",
                                    "DROP",
                                ],
                            )?;
                        }
                        continue;
                    }
                    let mut r = read_rules(&node.rules);
                    r.loss = loss;
                    r.delay_ms = delay_ms;
                    write_rules(&node.rules, &r)?;
                }
                (
                    if name == "loss" {
                        format!("{name} 20% of packets between nodes")
                    } else {
                        format!("{name} {delay_ms} ms per hop")
                    },
                    Heal::Network,
                )
            }
            "clock-skew" => {
                let targets = self.random_ids(1).await;
                let skew: i64 = {
                    let mut r = rand::rng();
                    let s = r.random_range(5_000..120_000);
                    if r.random_bool(0.5) { s } else { -s }
                };
                let c = self.cluster.lock().await;
                for id in &targets {
                    std::fs::write(&c.nodes[c.index(*id)].clock_control, skew.to_string())?;
                }
                (format!("{name} {targets:?} by {skew} ms"), Heal::Clock(targets))
            }
            "disk-power-loss" => {
                let id = self.random_ids(1).await[0];
                let mut c = self.cluster.lock().await;
                let path = c.nodes[c.index(id)].fs_control.clone();
                std::fs::write(&path, "power-loss")?;
                let exited = c.wait_exit(id, Duration::from_secs(5));
                if !exited {
                    c.kill(id);
                }
                (format!("{name} [{id}] (unsynced writes lost)"), Heal::Disk(vec![id]))
            }
            "disk-truncate-tail" | "disk-flip" => {
                let id = self.random_ids(1).await[0];
                let mut c = self.cluster.lock().await;
                c.kill(id);
                let dir = c.nodes[c.index(id)].data_dir();
                let segs = segments(&dir);
                let what = if name == "disk-truncate-tail" {
                    // Zero the last 4 KiB written: a lost tail.
                    match segs.last() {
                        Some(p) => {
                            let end = written_len(p)?;
                            let from = end.saturating_sub(4096);
                            let f = std::fs::OpenOptions::new().write(true).open(p)?;
                            std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (end - from) as usize], from)?;
                            f.sync_all()?;
                            format!("zeroed {}..{end} of {}", from, p.display())
                        }
                        None => "no segment yet".into(),
                    }
                } else {
                    match segs.choose(&mut rand::rng()) {
                        Some(p) => {
                            let end = written_len(p)?;
                            if end == 0 {
                                "segment empty".into()
                            } else {
                                let at = rand::rng().random_range(0..end);
                                raft_log::fault::flip_byte(p, at)?;
                                format!("flipped byte {at} of {}", p.display())
                            }
                        }
                        None => "no segment yet".into(),
                    }
                };
                (format!("{name} [{id}] {what}"), Heal::Disk(vec![id]))
            }
            "disk-full" => {
                let id = self.random_ids(1).await[0];
                let c = self.cluster.lock().await;
                std::fs::write(&c.nodes[c.index(id)].fs_control, "enospc 0")?;
                (format!("{name} [{id}]"), Heal::Disk(vec![id]))
            }
            other => bail!("unknown nemesis {other}"),
        };
        self.log(F::NemesisStart, desc.clone());
        self.active.push((name.to_string(), heal));
        Ok(desc)
    }

    /// Heals every active fault.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        let mut notes = Vec::new();
        for (name, heal) in std::mem::take(&mut self.active) {
            match heal {
                Heal::Restart(ids) => {
                    let mut c = self.cluster.lock().await;
                    for id in ids {
                        let i = c.index(id);
                        c.start_node(i)?;
                    }
                }
                Heal::Resume(ids) => {
                    let c = self.cluster.lock().await;
                    for id in ids {
                        c.signal(id, libc::SIGCONT);
                    }
                }
                Heal::Network => self.heal_network().await?,
                Heal::Clock(ids) => {
                    let c = self.cluster.lock().await;
                    for id in ids {
                        std::fs::write(&c.nodes[c.index(id)].clock_control, "0")?;
                    }
                }
                Heal::Disk(ids) => {
                    for id in ids {
                        if let Some(n) = self.repair_disk(id).await? {
                            notes.push(n);
                        }
                    }
                }
            }
            let _ = name;
        }
        let note = if notes.is_empty() { "healed".to_string() } else { format!("healed; {}", notes.join("; ")) };
        self.log(F::NemesisStop, note);
        Ok(())
    }

    /// Restarts a node after a disk fault. If it will not come up (its log
    /// refuses to open), its data is wiped and it rejoins empty.
    async fn repair_disk(&self, id: u64) -> anyhow::Result<Option<String>> {
        let mut c = self.cluster.lock().await;
        let i = c.index(id);
        std::fs::write(&c.nodes[i].fs_control, "ok")?;
        if c.running(id) {
            // disk-full: the node may have stopped writing but still runs;
            // restart it so its log reopens cleanly.
            c.kill(id);
        }
        c.start_node(i)?;
        drop(c);
        let addr = self.cluster.lock().await.nodes[i].listen.to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if !self.cluster.lock().await.running(id) {
                break;
            }
            if let Ok(a) = Admin::connect(&addr)
                && let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), a.node_status()).await
            {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut c = self.cluster.lock().await;
        c.kill(id);
        let dir = c.nodes[i].data_dir();
        let reason = std::fs::read_to_string(&c.nodes[i].log)
            .ok()
            .and_then(|l| l.lines().rev().find(|l| l.contains("Error") || l.contains("error")).map(str::to_string))
            .unwrap_or_default();
        std::fs::remove_dir_all(&dir).ok();
        c.start_node(i)?;
        Ok(Some(format!("node {id} did not start ({}); data wiped, it rejoins empty", reason.trim())))
    }
}

fn read_rules(p: &std::path::Path) -> Rules {
    std::fs::read_to_string(p).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn write_rules(p: &std::path::Path, r: &Rules) -> anyhow::Result<()> {
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(r)?)?;
    std::fs::rename(&tmp, p)?;
    Ok(())
}

/// The nemesis schedule: `normal` without faults, then one fault (the next
/// of `names`, round robin) for `fault`, healed; until `until`.
pub async fn schedule(
    mut nemesis: Nemesis,
    names: Vec<String>,
    normal: Duration,
    fault: Duration,
    until: tokio::time::Instant,
) -> anyhow::Result<Nemesis> {
    let mut k = 0;
    while !names.is_empty() && tokio::time::Instant::now() + normal + fault <= until {
        tokio::time::sleep(normal).await;
        let name = &names[k % names.len()];
        k += 1;
        match nemesis.start(name).await {
            Ok(desc) => eprintln!("nemesis: {desc}"),
            Err(e) => eprintln!("nemesis {name} failed to start: {e:#}"),
        }
        tokio::time::sleep(fault).await;
        nemesis.heal_all().await?;
        eprintln!("nemesis: healed");
    }
    Ok(nemesis)
}
