//! One measured run as a JSON file, and the Markdown table and SVG plot made
//! from a directory of them.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use serde::Serialize;

/// The outcome of one workload against one system.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunResult {
    /// `raftmq`, `nats` or `rabbitmq`.
    pub system: String,
    /// `equal` (fsync on a majority before the ack) or `default` (each
    /// system's out-of-the-box durability).
    pub durability: String,
    /// `produce`, `fixed-rate`, `drain` or `e2e`.
    pub workload: String,
    pub producers: usize,
    pub consumers: usize,
    pub size_bytes: usize,
    /// Offered load of fixed-rate and e2e runs, messages per second.
    pub target_rate: Option<f64>,
    /// Messages acknowledged (produce) or received (drain, e2e).
    pub messages: u64,
    pub errors: u64,
    pub seconds: f64,
    pub msgs_per_s: f64,
    pub mb_per_s: f64,
    /// Send-to-ack latency (produce, fixed-rate: from the intended send
    /// time), send-to-receive (e2e) or per-fetch latency (drain).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// CPU seconds of all server processes per million messages.
    pub server_cpu_s_per_million: f64,
    /// Peak of the server processes' summed anonymous resident memory
    /// during the run (sampled every 250 ms; mapped file pages excluded).
    pub server_peak_rss_mib: f64,
    /// Messages per second, one sample per second.
    pub per_second: Vec<u64>,
    /// Anything that qualifies the figures (for example the backlog build time).
    pub note: String,
}

impl RunResult {
    /// The workload's identity within a comparison: what must match for two
    /// systems' runs to be compared.
    pub fn key(&self) -> String {
        let mut k = format!("{} {} B", self.workload, self.size_bytes);
        if self.producers > 0 {
            k += &format!(", {} producers", self.producers);
        }
        if self.consumers > 0 {
            k += &format!(", {} consumers", self.consumers);
        }
        if let Some(r) = self.target_rate {
            k += &format!(", {r:.0} msg/s offered");
        }
        k
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
    }

    pub fn load(path: &Path) -> std::io::Result<Self> {
        let s = std::fs::read_to_string(path)?;
        serde_json::from_str(&s).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))
    }
}

/// Every `*.json` result under `dir`, sorted by file name.
pub fn load_dir(dir: &Path) -> std::io::Result<Vec<RunResult>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    paths.iter().map(|p| RunResult::load(p)).collect()
}

const SYSTEMS: [&str; 3] = ["raftmq", "nats", "rabbitmq"];

fn ratio(ours: f64, theirs: f64) -> String {
    if ours > 0.0 && theirs > 0.0 { format!("{:.2}x", ours / theirs) } else { "-".into() }
}

/// One Markdown table per durability class: a row per workload and system,
/// with RaftMQ's throughput and p99 latency relative to the peer's in the
/// same run (throughput: RaftMQ / peer, higher is better for RaftMQ;
/// latency: peer / RaftMQ, likewise).
pub fn markdown(results: &[RunResult]) -> String {
    let mut out = String::new();
    let mut by_class: BTreeMap<&str, BTreeMap<String, Vec<&RunResult>>> = BTreeMap::new();
    for r in results {
        by_class.entry(&r.durability).or_default().entry(r.key()).or_default().push(r);
    }
    for (class, rows) in by_class.iter().rev() {
        let title = match *class {
            "equal" => "Equal durability: every acknowledged message fsynced on a majority",
            "default" => "Each system's default durability",
            other => other,
        };
        out += &format!("\n**{title}**\n\n");
        out += "| workload | system | msgs/s | MB/s | p50 ms | p99 ms | p999 ms | server CPU s / M msgs | server peak anon RSS MiB | RaftMQ / peer msgs/s | peer / RaftMQ p99 |\n";
        out += "|---|---|---|---|---|---|---|---|---|---|---|\n";
        for (key, runs) in rows {
            let ours = runs.iter().find(|r| r.system == "raftmq");
            for sys in SYSTEMS {
                let Some(r) = runs.iter().find(|r| r.system == sys) else { continue };
                let (tput, lat) = match ours {
                    Some(o) if sys != "raftmq" => (ratio(o.msgs_per_s, r.msgs_per_s), ratio(r.p99_ms, o.p99_ms)),
                    _ => ("".into(), "".into()),
                };
                out += &format!(
                    "| {key} | {sys} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {tput} | {lat} |\n",
                    r.msgs_per_s,
                    r.mb_per_s,
                    r.p50_ms,
                    r.p99_ms,
                    r.p999_ms,
                    r.server_cpu_s_per_million,
                    r.server_peak_rss_mib
                );
            }
        }
    }
    out
}

/// A throughput-over-time line chart (messages per second, one line per
/// run) as a standalone SVG.
pub fn svg_plot(title: &str, runs: &[&RunResult]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 300.0;
    const L: f64 = 70.0;
    const B: f64 = 40.0;
    const COLORS: [&str; 4] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"];
    let max_x = runs.iter().map(|r| r.per_second.len()).max().unwrap_or(0).max(1) as f64;
    let max_y = runs.iter().flat_map(|r| r.per_second.iter().copied()).max().unwrap_or(0).max(1) as f64 * 1.1;
    let (pw, ph) = (W - L - 20.0, H - B - 30.0);
    let x = |i: f64| L + i / max_x * pw;
    let y = |v: f64| 30.0 + ph - v / max_y * ph;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{L}\" y=\"18\" font-size=\"13\">{}</text>\n\
         <line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{L}\" y1=\"30\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>\n\
         <text x=\"{}\" y=\"{}\" text-anchor=\"middle\">seconds</text>\n",
        xml_escape(title),
        30.0 + ph,
        L + pw,
        30.0 + ph,
        30.0 + ph,
        L + pw / 2.0,
        H - 5.0
    );
    for k in 0..=4 {
        let v = max_y / 1.1 * k as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.0}</text><line x1=\"{L}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n",
            L - 4.0,
            y(v) + 4.0,
            v,
            y(v),
            L + pw,
            y(v)
        );
    }
    s += &format!(
        "<text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">msgs/s</text>\n",
        30.0 + ph / 2.0,
        30.0 + ph / 2.0
    );
    for (n, r) in runs.iter().enumerate() {
        let c = COLORS[n % COLORS.len()];
        let pts: Vec<String> = r
            .per_second
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i as f64 + 1.0), y(*v as f64)))
            .collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>\n", pts.join(" "));
        s += &format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{c}\">{}</text>\n",
            L + pw - 150.0,
            45 + 14 * n,
            xml_escape(&format!("{} ({:.0} msg/s)", r.system, r.msgs_per_s))
        );
    }
    s + "</svg>\n"
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The file-name form of a workload key.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(system: &str, msgs_per_s: f64, p99_ms: f64) -> RunResult {
        RunResult {
            system: system.into(),
            durability: "equal".into(),
            workload: "produce".into(),
            producers: 64,
            consumers: 0,
            size_bytes: 1024,
            target_rate: None,
            messages: 100,
            errors: 0,
            seconds: 1.0,
            msgs_per_s,
            mb_per_s: 0.1,
            p50_ms: 1.0,
            p99_ms,
            p999_ms: 3.0,
            server_cpu_s_per_million: 10.0,
            server_peak_rss_mib: 100.0,
            per_second: vec![90, 110],
            note: String::new(),
        }
    }

    #[test]
    fn table_shows_ratios_against_raftmq_of_the_same_workload() {
        let t = markdown(&[run("nats", 1000.0, 4.0), run("raftmq", 3000.0, 2.0), run("rabbitmq", 500.0, 8.0)]);
        let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| produce")).collect();
        assert_eq!(rows.len(), 3);
        assert!(rows[0].contains("| raftmq |"), "{t}");
        assert!(rows[1].contains("| nats |") && rows[1].contains("| 3.00x | 2.00x |"), "{t}");
        assert!(rows[2].contains("| rabbitmq |") && rows[2].contains("| 6.00x | 4.00x |"), "{t}");
        assert!(t.contains("Equal durability"));
    }

    #[test]
    fn json_round_trip_and_plot() {
        let dir = tempfile::tempdir().unwrap();
        let r = run("raftmq", 3000.0, 2.0);
        r.save(&dir.path().join("a.json")).unwrap();
        assert_eq!(load_dir(dir.path()).unwrap(), vec![r.clone()]);
        let svg = svg_plot("produce <1 KiB>", &[&r]);
        assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("&lt;1 KiB&gt;"));
        assert_eq!(slug(&r.key()), "produce-1024-b-64-producers");
    }
}
