//! The cluster under test: real `raftmq-namesrv` and `raftmq-broker`
//! processes, a fault proxy in front of each node's Raft port, and (as root)
//! a network namespace per host joined by veth pairs to a bridge.
//!
//! Modes:
//! - `netns`: host `n<i>` is namespace `rmqj-n<i>` at 10.77.0.<i>, the name
//!   server `rmqj-nsrv` at 10.77.0.200, the tool's clients `rmqj-cli` at
//!   10.77.0.100; the veths meet on bridge `br0` in namespace `rmqj-hub`.
//!   Partitions and packet loss are iptables rules inside the node
//!   namespaces: they cut real links.
//! - `loopback` (no root): node `i` listens on 127.0.0.<10+i> and binds that
//!   address for its outgoing connections; partitions, loss and delay are the
//!   proxies' rules.
//!
//! Every namespace and process created is written to a state file first, so
//! `cleanup` (run at every start, on Ctrl-C, and by `raftmq-jepsen cleanup`)
//! removes them even after the tool itself crashed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use serde::Deserialize;
use serde::Serialize;

use crate::proxy::Rules;

pub const STATE_FILE: &str = "/tmp/raftmq-jepsen.state";
const NS_PREFIX: &str = "rmqj-";
pub const CLIENT_NS: &str = "rmqj-cli";
/// The broker's client/admin port and its proxy's port in netns mode.
const NODE_PORT: u16 = 9000;
const PROXY_PORT: u16 = 9100;
const NAMESRV_PORT: u16 = 9876;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Netns,
    Loopback,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Netns => "netns (a network namespace per host, veth pairs to a bridge, iptables faults)",
            Mode::Loopback => "loopback (fault proxies between the nodes; no root needed)",
        })
    }
}

/// What cleanup must undo.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    namespaces: Vec<String>,
    pids: Vec<u32>,
}

fn load_state() -> State {
    std::fs::read_to_string(STATE_FILE).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

fn save_state(s: &State) {
    let _ = std::fs::write(STATE_FILE, serde_json::to_vec(s).expect("state encodes"));
}

fn remember(f: impl FnOnce(&mut State)) {
    let mut s = load_state();
    f(&mut s);
    save_state(&s);
}

/// Removes every process and namespace a run (maybe a crashed one) left.
pub fn cleanup() {
    let s = load_state();
    for pid in &s.pids {
        // A pid from an old state file may have been reused by now: only
        // processes that are still ours (RaftMQ binaries) are killed.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("raftmq") {
            continue;
        }
        // SAFETY: kill(2) of a process we started (checked above); SIGCONT
        // first wakes a paused one.
        unsafe {
            libc::kill(*pid as i32, libc::SIGCONT);
            libc::kill(*pid as i32, libc::SIGKILL);
        }
    }
    for ns in &s.namespaces {
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
    }
    // Namespaces of ours not in the state file (a crash between creating
    // one and recording it).
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next().filter(|n| n.starts_with(NS_PREFIX)) {
                let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
            }
        }
    }
    let _ = std::fs::remove_file(STATE_FILE);
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Picks the mode: netns when running as root with `ip netns` and iptables
/// working, else loopback. `forced` overrides.
pub fn choose_mode(forced: Option<Mode>) -> (Mode, String) {
    if let Some(m) = forced {
        return (m, "chosen with --mode".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return (Mode::Loopback, "not root".into());
    }
    if Command::new("iptables").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return (Mode::Loopback, "iptables is missing (scripts/setup.sh installs it)".into());
    }
    let probe = format!("{NS_PREFIX}probe");
    let ok = sh(&["ip", "netns", "add", &probe]).is_ok();
    let _ = sh(&["ip", "netns", "del", &probe]);
    if ok {
        (Mode::Netns, "root, ip netns and iptables work".into())
    } else {
        (Mode::Loopback, "ip netns add failed".into())
    }
}

/// Creates the hub, the bridge and one namespace per host (netns mode).
/// Hosts: `n1..nN`, `nsrv`, `cli`.
pub fn setup_netns(nodes: usize) -> anyhow::Result<()> {
    let hub = format!("{NS_PREFIX}hub");
    remember(|s| s.namespaces.push(hub.clone()));
    sh(&["ip", "netns", "add", &hub])?;
    sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
    let mut hosts: Vec<(String, u8)> = (1..=nodes).map(|i| (format!("n{i}"), i as u8)).collect();
    hosts.push(("nsrv".into(), 200));
    hosts.push(("cli".into(), 100));
    for (h, k) in hosts {
        let ns = format!("{NS_PREFIX}{h}");
        let veth = format!("{NS_PREFIX}{h}");
        remember(|s| s.namespaces.push(ns.clone()));
        sh(&["ip", "netns", "add", &ns])?;
        sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        sh(&["ip", "link", "set", &veth, "netns", &hub])?;
        sh(&["ip", "-n", &hub, "link", "set", &veth, "master", "br0"])?;
        sh(&["ip", "-n", &hub, "link", "set", &veth, "up"])?;
        sh(&["ip", "-n", &ns, "addr", "add", &format!("10.77.0.{k}/24"), "dev", "eth0"])?;
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

/// Moves the calling thread (call it before any other thread starts, so
/// every later thread inherits it) into a namespace.
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns with a valid namespace fd.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct Node {
    pub id: u64,
    /// Client and admin address (clients connect here).
    pub listen: SocketAddr,
    /// The proxy in front of it: the address in the group's membership.
    pub proxy: SocketAddr,
    pub ns: Option<String>,
    pub dir: PathBuf,
    pub rules: PathBuf,
    pub fs_control: PathBuf,
    pub clock_control: PathBuf,
    pub log: PathBuf,
}

impl Node {
    pub fn ip(&self) -> IpAddr {
        self.listen.ip()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

pub struct Cluster {
    pub mode: Mode,
    pub nodes: Vec<Node>,
    pub namesrv: SocketAddr,
    bin_dir: PathBuf,
    out: PathBuf,
    procs: BTreeMap<String, Child>,
}

fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl Cluster {
    pub fn new(mode: Mode, nodes: usize, bin_dir: &Path, out: &Path) -> anyhow::Result<Self> {
        let mut list = Vec::new();
        for i in 1..=nodes as u64 {
            let dir = out.join("nodes").join(format!("n{i}"));
            std::fs::create_dir_all(&dir)?;
            let (listen, proxy, ns) = match mode {
                Mode::Netns => {
                    let ip: IpAddr = format!("10.77.0.{i}").parse()?;
                    (SocketAddr::new(ip, NODE_PORT), SocketAddr::new(ip, PROXY_PORT), Some(format!("{NS_PREFIX}n{i}")))
                }
                Mode::Loopback => {
                    let ip: IpAddr = format!("127.0.0.{}", 10 + i).parse()?;
                    (SocketAddr::new(ip, free_port(ip)), SocketAddr::new(ip, free_port(ip)), None)
                }
            };
            let node = Node {
                id: i,
                listen,
                proxy,
                ns,
                rules: dir.join("proxy-rules.json"),
                fs_control: dir.join("fs-control"),
                clock_control: dir.join("clock-offset-ms"),
                log: dir.join("broker.log"),
                dir,
            };
            std::fs::write(&node.rules, serde_json::to_vec(&Rules::default())?)?;
            std::fs::write(&node.fs_control, "ok")?;
            std::fs::write(&node.clock_control, "0")?;
            list.push(node);
        }
        let namesrv = match mode {
            Mode::Netns => SocketAddr::new("10.77.0.200".parse()?, NAMESRV_PORT),
            Mode::Loopback => {
                let ip: IpAddr = "127.0.0.1".parse()?;
                SocketAddr::new(ip, free_port(ip))
            }
        };
        let c = Cluster {
            mode,
            nodes: list,
            namesrv,
            bin_dir: bin_dir.to_path_buf(),
            out: out.to_path_buf(),
            procs: BTreeMap::new(),
        };
        for n in &c.nodes {
            c.write_config(n)?;
        }
        Ok(c)
    }

    fn write_config(&self, n: &Node) -> anyhow::Result<()> {
        let peers: String = self.nodes.iter().map(|p| format!("{} = \"{}\"\n", p.id, p.proxy)).collect();
        let toml = format!(
            "broker_name = \"jepsen\"\nnode_id = {}\nlisten = \"{}\"\nbind_source = {}\ndata_dir = \"{}\"\nnamesrv = [\"{}\"]\n\
             [peers]\n{peers}\n[log]\nsegment_bytes = 8388608\nmax_entry_bytes = 2097152\n[limits]\nmax_body_bytes = 1048576\n",
            n.id,
            n.listen,
            self.mode == Mode::Loopback,
            n.data_dir().display(),
            self.namesrv,
        );
        std::fs::write(n.dir.join("broker.toml"), toml)?;
        Ok(())
    }

    fn command(&self, ns: Option<&str>, program: &Path) -> Command {
        match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<()> {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        remember(|s| s.pids.push(pid));
        self.procs.insert(name.to_string(), child);
        Ok(())
    }

    /// Starts the name server, the proxies and every broker.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let ns = (self.mode == Mode::Netns).then(|| format!("{NS_PREFIX}nsrv"));
        let mut cmd = self.command(ns.as_deref(), &self.bin_dir.join("raftmq-namesrv"));
        cmd.args(["--listen", &self.namesrv.to_string()]);
        let log = self.out.join("nodes").join("namesrv.log");
        self.spawn("namesrv", cmd, &log)?;
        for i in 0..self.nodes.len() {
            self.start_proxy(i)?;
            self.start_node(i)?;
        }
        Ok(())
    }

    fn start_proxy(&mut self, i: usize) -> anyhow::Result<()> {
        let n = self.nodes[i].clone();
        let me = std::env::current_exe()?;
        let mut cmd = self.command(n.ns.as_deref(), &me);
        cmd.arg("proxy")
            .args(["--listen", &n.proxy.to_string(), "--to", &n.listen.to_string()])
            .arg("--rules")
            .arg(&n.rules);
        self.spawn(&format!("proxy-{}", n.id), cmd, &n.dir.join("proxy.log"))
    }

    /// Starts (or restarts) broker `i` (index into `nodes`).
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let n = self.nodes[i].clone();
        std::fs::write(&n.fs_control, "ok")?;
        let mut cmd = self.command(n.ns.as_deref(), &self.bin_dir.join("raftmq-broker"));
        cmd.arg("--config")
            .arg(n.dir.join("broker.toml"))
            // RAFTMQ_JEPSEN_NODE_LOG: the nodes' RUST_LOG, to look closer
            // at a failed run (default "info,openraft=warn").
            .env("RUST_LOG", std::env::var("RAFTMQ_JEPSEN_NODE_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
            .env("RAFTMQ_CLOCK_OFFSET_FILE", &n.clock_control)
            .env("RAFTMQ_FAULT_FS_CONTROL", &n.fs_control);
        self.spawn(&format!("n{}", n.id), cmd, &n.log)
    }

    fn pid_of(&self, name: &str) -> Option<i32> {
        self.procs.get(name).map(|c| c.id() as i32)
    }

    /// Whether broker `id` runs (has not exited).
    pub fn running(&mut self, id: u64) -> bool {
        match self.procs.get_mut(&format!("n{id}")) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn kill(&mut self, id: u64) {
        if let Some(mut c) = self.procs.remove(&format!("n{id}")) {
            // SAFETY: kill(2) of our own child (SIGCONT first: it may be paused).
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn signal(&self, id: u64, sig: i32) {
        if let Some(pid) = self.pid_of(&format!("n{id}")) {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(pid, sig) };
        }
    }

    pub fn index(&self, id: u64) -> usize {
        self.nodes.iter().position(|n| n.id == id).expect("node id")
    }

    pub fn client_addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.listen.to_string()).collect()
    }

    /// Stops everything it started.
    pub fn stop(&mut self) {
        for (_, mut c) in std::mem::take(&mut self.procs) {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for broker `id` to exit on its own (a simulated power loss aborts it).
    pub fn wait_exit(&mut self, id: u64, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if !self.running(id) {
                self.procs.remove(&format!("n{id}"));
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
