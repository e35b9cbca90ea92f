//! Shared helpers for the end-to-end test binary `tests/e2e.rs`: a local
//! cluster of real `raftmq-namesrv` and `raftmq-broker` processes on loopback.

use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

/// Where cargo put the workspace binaries (next to the test binary's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} missing: run `cargo build --workspace --bins` first (scripts/test.sh does)", p.display());
    p
}

/// Free loopback ports (bound then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("bind")).collect();
    listeners.iter().map(|l| l.local_addr().expect("addr").port()).collect()
}

/// A running test cluster. Killed on drop.
pub struct Cluster {
    pub dir: PathBuf,
    /// The group's broker name.
    pub name: String,
    pub namesrv_addr: String,
    pub nodes: Vec<(u64, String)>,
    /// Each node's Prometheus metrics address (`metrics_listen`), by index.
    pub metrics_addrs: Vec<String>,
    namesrv: Option<Child>,
    brokers: Vec<Option<Child>>,
    extra_config: String,
}

impl Cluster {
    /// Starts a name server and a group of `n` brokers; `extra_config` is
    /// appended to every node's TOML.
    pub fn start(dir: &Path, n: usize, extra_config: &str) -> Cluster {
        Self::start_group(dir, "broker-a", n, extra_config, None)
    }

    /// Starts group `name` of `n` brokers registering with `namesrv`, or
    /// with a name server of its own (owned: stopped with the group) when
    /// `None`. `extra_config` holds TOML tables appended to every node's
    /// config.
    pub fn start_group(dir: &Path, name: &str, n: usize, extra_config: &str, namesrv: Option<&str>) -> Cluster {
        let ports = free_ports(2 * n + 1);
        let nodes: Vec<(u64, String)> = (0..n).map(|i| (i as u64 + 1, format!("127.0.0.1:{}", ports[i + 1]))).collect();
        let metrics_addrs = (0..n).map(|i| format!("127.0.0.1:{}", ports[n + 1 + i])).collect();
        let (namesrv_addr, namesrv) = match namesrv {
            Some(a) => (a.to_string(), None),
            None => {
                let addr = format!("127.0.0.1:{}", ports[0]);
                let log = std::fs::File::create(dir.join("namesrv.log")).expect("log file");
                let child = Command::new(bin("raftmq-namesrv"))
                    .args(["--listen", &addr])
                    .stdout(log.try_clone().expect("clone"))
                    .stderr(log)
                    .spawn()
                    .expect("start namesrv");
                (addr, Some(child))
            }
        };
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            namesrv_addr,
            nodes,
            metrics_addrs,
            namesrv,
            brokers: (0..n).map(|_| None).collect(),
            extra_config: extra_config.to_string(),
        };
        for i in 0..n {
            c.write_config(i);
            c.start_node(i);
        }
        c
    }

    fn write_config(&self, i: usize) {
        self.write_config_with(i, true);
    }

    /// Writes node index `i`'s TOML. `extra_config` may carry its own `[log]`
    /// table; otherwise small test segments are used.
    fn write_config_with(&self, i: usize, bootstrap: bool) {
        let (id, _) = &self.nodes[i];
        let peers: String = self.nodes.iter().map(|(id, a)| format!("{id} = \"{a}\"\n")).collect();
        let log = if self.extra_config.contains("[log]") {
            ""
        } else {
            "[log]\nsegment_bytes = 16777216\nmax_entry_bytes = 8388608\n"
        };
        let toml = format!(
            "broker_name = \"{}\"\nnode_id = {id}\nbootstrap = {bootstrap}\ndata_dir = \"{}\"\nnamesrv = [\"{}\"]\nmetrics_listen = \"{}\"\n[peers]\n{peers}\n{}\n{log}",
            self.name,
            self.dir.join(self.file_stem(*id)).display(),
            self.namesrv_addr,
            self.metrics_addrs[i],
            self.extra_config,
        );
        std::fs::write(self.dir.join(format!("{}.toml", self.file_stem(*id))), toml).expect("write config");
    }

    /// Starts one more node process that does not bootstrap: it waits to be
    /// added to the group (membership change). Returns its id and address.
    pub fn add_node_process(&mut self) -> (u64, String) {
        let id = self.nodes.iter().map(|(id, _)| *id).max().unwrap_or(0) + 1;
        let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
        self.nodes.push((id, addr.clone()));
        self.metrics_addrs.push(format!("127.0.0.1:{}", free_ports(1)[0]));
        self.brokers.push(None);
        let i = self.nodes.len() - 1;
        self.write_config_with(i, false);
        self.start_node(i);
        (id, addr)
    }

    /// Data directory, config and log names of a node: `n<id>` in the
    /// default group, `<group>-n<id>` in others.
    fn file_stem(&self, id: u64) -> String {
        if self.name == "broker-a" { format!("n{id}") } else { format!("{}-n{id}", self.name) }
    }

    /// The TOML file of node `id`.
    pub fn config_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{}.toml", self.file_stem(id)))
    }

    /// Sends SIGHUP to node index `i` (reload its configuration).
    pub fn reload_node(&self, i: usize) {
        if let Some(c) = &self.brokers[i] {
            // SAFETY: plain kill(2) on a child we own.
            unsafe { libc_kill(c.id() as i32, 1) };
        }
    }

    /// The metrics page of node index `i` (`GET /metrics`, plain HTTP/1.1).
    pub fn scrape(&self, i: usize) -> std::io::Result<String> {
        use std::io::Read;
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&self.metrics_addrs[i])?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        match out.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(std::io::Error::other(format!("bad metrics reply: {out}"))),
        }
    }

    /// The log file of node `id`.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{}.log", self.file_stem(id)))
    }

    /// Kills the name server this group owns (routes then come from caches).
    pub fn kill_namesrv(&mut self) {
        if let Some(mut c) = self.namesrv.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts (or restarts) node index `i`.
    pub fn start_node(&mut self, i: usize) {
        let (id, _) = &self.nodes[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(*id)).expect("log file");
        let child = Command::new(bin("raftmq-broker"))
            .args(["--config", &self.dir.join(format!("{}.toml", self.file_stem(*id))).display().to_string()])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(log.try_clone().expect("clone"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start broker");
        self.brokers[i] = Some(child);
    }

    /// kill -9 of node index `i`.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.brokers[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOP (`pause: true`) or SIGCONT of node index `i`.
    pub fn pause_node(&self, i: usize, pause: bool) {
        if let Some(c) = &self.brokers[i] {
            // SAFETY: plain kill(2) on a child we own.
            unsafe { libc_kill(c.id() as i32, if pause { 19 } else { 18 }) };
        }
    }

    /// SIGTERM of node index `i` (clean stop: hands leadership over).
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut c) = self.brokers[i].take() {
            // SAFETY: plain kill(2) on a child we own.
            unsafe { libc_kill(c.id() as i32, 15) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|(_, a)| a.clone()).collect()
    }

    pub fn index_of(&self, node_id: u64) -> usize {
        self.nodes.iter().position(|(id, _)| *id == node_id).expect("node id")
    }

    /// Prints the last lines of every node's log (for failing tests).
    pub fn dump_logs(&self) {
        for (id, _) in &self.nodes {
            let text = std::fs::read_to_string(self.log_path(*id)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            eprintln!("---- {} node {id} log (last 30 lines) ----", self.name);
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.brokers.len() {
            self.kill_node(i);
        }
        if let Some(mut c) = self.namesrv.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
