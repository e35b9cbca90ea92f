//! What a run measures: latency samples, throughput per second, and the
//! servers' CPU time and peak memory read from `/proc`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Latency samples in microseconds; percentiles by sorting (a run keeps at
/// most a few million samples).
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples_us: Vec<u64>,
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        self.samples_us.push(d.as_micros() as u64);
    }

    pub fn record_us(&mut self, us: u64) {
        self.samples_us.push(us);
    }

    pub fn merge(&mut self, other: Latencies) {
        self.samples_us.extend(other.samples_us);
    }

    pub fn len(&self) -> usize {
        self.samples_us.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples_us.is_empty()
    }

    /// The `p` quantiles (each 0..=1) in milliseconds, from one sort.
    pub fn percentiles_ms(&self, ps: &[f64]) -> Vec<f64> {
        let mut v = self.samples_us.clone();
        v.sort_unstable();
        ps.iter()
            .map(|p| {
                if v.is_empty() {
                    return 0.0;
                }
                let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
                v[i] as f64 / 1000.0
            })
            .collect()
    }

    /// The `p` quantile (0..=1) in milliseconds.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        self.percentiles_ms(&[p])[0]
    }
}

/// Counts events and samples the count once a second, for a
/// throughput-over-time plot.
#[derive(Clone, Default)]
pub struct Meter {
    count: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Meter {
    pub fn add(&self, messages: u64, bytes: u64) {
        self.count.fetch_add(messages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Samples the count every second until the returned handle is aborted
    /// or `max_secs` samples were taken; the samples are messages per second.
    pub fn sample_every_second(
        &self,
        max_secs: usize,
    ) -> (tokio::task::JoinHandle<()>, Arc<std::sync::Mutex<Vec<u64>>>) {
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, series) = (self.count.clone(), out.clone());
        // The count now, not when the task first runs.
        let mut last = count.load(Ordering::Relaxed);
        let h = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            for _ in 0..max_secs {
                tick.tick().await;
                let now = count.load(Ordering::Relaxed);
                series.lock().unwrap().push(now - last);
                last = now;
            }
        });
        (h, out)
    }
}

/// CPU seconds (user + system) used so far by the processes whose pids are
/// given (from `/proc/<pid>/stat`); a pid that is gone counts 0.
pub fn pids_cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| parse_stat_cpu_ticks(&s))
        .map(|ticks| ticks / hz)
        .sum()
}

/// utime + stime in clock ticks from a `/proc/<pid>/stat` line (fields 14
/// and 15; the command name in parentheses may contain spaces).
fn parse_stat_cpu_ticks(stat: &str) -> Option<f64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
}

/// The sum of the processes' resident anonymous memory (`RssAnon`: heap
/// and stacks), in KiB. File pages a process maps (RaftMQ reads its
/// CommitLog through mmap) are page cache shared with the kernel and not
/// counted, so the systems compare on the memory they allocate.
pub fn pids_anon_rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| status_field_kib(&s, "RssAnon:"))
        .sum()
}

fn status_field_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples [`pids_anon_rss_kib`] every 250 ms and keeps the largest.
pub struct PeakRss {
    peak_kib: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl PeakRss {
    pub fn start(pids: &[u32]) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(pids_anon_rss_kib(pids)));
        let (pids, peak) = (pids.to_vec(), peak_kib.clone());
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                peak.fetch_max(pids_anon_rss_kib(&pids), Ordering::Relaxed);
            }
        });
        Self { peak_kib, task }
    }

    /// The peak so far in MiB.
    pub fn peak_mib(&self) -> f64 {
        self.peak_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }
}

impl Drop for PeakRss {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// CPU seconds (user + system) used by this process so far.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut l = Latencies::default();
        for i in 1..=1000 {
            l.record(Duration::from_micros(i * 1000));
        }
        assert_eq!(l.percentiles_ms(&[0.5, 0.99, 0.999, 1.0]), vec![500.0, 990.0, 999.0, 1000.0]);
        assert_eq!(Latencies::default().percentile_ms(0.5), 0.0);
    }

    #[test]
    fn proc_parsing() {
        let stat = "123 (a b) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(300.0));
        assert_eq!(status_field_kib("Name: x\nRssAnon:\t  20480 kB\n", "RssAnon:"), Some(20480));
        assert!(pids_anon_rss_kib(&[std::process::id()]) > 0);
        assert!(process_cpu_seconds() >= 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn meter_samples_per_second() {
        let m = Meter::default();
        let (h, series) = m.sample_every_second(3);
        for _ in 0..3 {
            m.add(5, 50);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        h.await.unwrap();
        assert_eq!(series.lock().unwrap().iter().sum::<u64>(), 15);
        assert_eq!(m.bytes(), 150);
    }
}
