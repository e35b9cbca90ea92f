//! Prometheus text exposition (format 0.0.4) and the small HTTP/1.1 server
//! that answers `GET /metrics` with it, shared by the broker and the name
//! server. The server reads at most one request head per connection
//! ([`MAX_REQUEST_BYTES`], [`REQUEST_TIMEOUT`]), answers and closes; at most
//! [`MAX_CONNECTIONS`] are served at once.

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;

/// Longest request head read (request line and headers).
pub const MAX_REQUEST_BYTES: usize = 8 << 10;
/// A client must send its request head within this.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 64;

/// A metrics page being written: families with their samples.
#[derive(Debug, Default)]
pub struct Exposition {
    out: String,
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its `# HELP` and `# TYPE` lines. Samples of it follow.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample line: `name{labels} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    /// A one-sample family.
    pub fn single(&mut self, name: &str, help: &str, kind: Kind, labels: &[(&str, &str)], value: f64) {
        self.family(name, help, kind);
        self.sample(name, labels, value);
    }

    /// A histogram's samples from non-cumulative bucket counts
    /// (`counts[i]` for values up to `bounds[i]`, the last for the rest) and
    /// the sum of observed values, all in the unit of `bounds`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) {
        assert_eq!(counts.len(), bounds.len() + 1, "one count per bound plus +Inf");
        let mut cumulative = 0u64;
        let bucket = format!("{name}_bucket");
        for (i, c) in counts.iter().enumerate() {
            cumulative += c;
            let le = bounds.get(i).map_or_else(|| "+Inf".to_string(), |b| format_value(*b));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Serves `GET /metrics` on `addr` with what `render` returns, until
/// `shutdown` resolves. Other paths get 404, other methods 405.
pub async fn serve<F>(
    addr: SocketAddr,
    render: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_on(listener, render, shutdown).await
}

/// As [`serve`], on a bound listener.
pub async fn serve_on<F>(
    listener: tokio::net::TcpListener,
    render: F,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let render = Arc::new(render);
    accept_bounded(listener, MAX_CONNECTIONS, REQUEST_TIMEOUT * 2, shutdown, move |stream| {
        let render = render.clone();
        async move {
            let _ = answer(stream, &*render).await;
        }
    })
    .await;
    Ok(())
}

/// Accepts connections on `listener` until `shutdown` resolves and hands
/// each to `handle`: at most `max_connections` at once (more wait in the
/// listen backlog), each given up after `timeout`. Shared by the metrics
/// page and the console.
pub async fn accept_bounded<H, Fut>(
    listener: tokio::net::TcpListener,
    max_connections: usize,
    timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
    handle: H,
) where
    H: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return,
            p = slots.clone().acquire_owned() => p.expect("never closed"),
        };
        let (stream, _) = tokio::select! {
            () = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of descriptors and the like: try again shortly.
                Err(_) => { tokio::time::sleep(Duration::from_millis(100)).await; continue; }
            },
        };
        let work = handle(stream);
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(timeout, work).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, render: &(dyn Fn() -> String + Send + Sync)) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_REQUEST_BYTES {
                return Ok(false);
            }
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
        }
    })
    .await;
    let (status, body) = match complete {
        Ok(Ok(true)) => route(&head, render),
        Ok(Ok(false)) => ("400 Bad Request", "request head missing or too long\n".to_string()),
        Ok(Err(e)) => return Err(e),
        Err(_) => ("408 Request Timeout", "request head not received in time\n".to_string()),
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn route(head: &[u8], render: &(dyn Fn() -> String + Send + Sync)) -> (&'static str, String) {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", render()),
        ("GET", _) => ("404 Not Found", "metrics are at /metrics\n".to_string()),
        _ => ("405 Method Not Allowed", "only GET\n".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_families_samples_and_escaped_labels() {
        let mut e = Exposition::new();
        e.family("raftmq_up", "1 while serving.", Kind::Gauge);
        e.sample("raftmq_up", &[("node", "1"), ("group", "a\"b\\c")], 1.0);
        e.single("raftmq_ratio", "A ratio.", Kind::Gauge, &[], 0.25);
        let out = e.finish();
        assert!(out.contains("# HELP raftmq_up 1 while serving.\n# TYPE raftmq_up gauge\n"), "{out}");
        assert!(out.contains("raftmq_up{node=\"1\",group=\"a\\\"b\\\\c\"} 1\n"), "{out}");
        assert!(out.contains("raftmq_ratio 0.25\n"), "{out}");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut e = Exposition::new();
        e.family("x_seconds", "X.", Kind::Histogram);
        e.histogram("x_seconds", &[("n", "1")], &[0.001, 0.01], &[2, 0, 3], 0.5);
        let out = e.finish();
        assert!(out.contains("x_seconds_bucket{n=\"1\",le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{n=\"1\",le=\"0.01\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{n=\"1\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_count{n=\"1\"} 5\n"), "{out}");
        assert!(out.contains("x_seconds_sum{n=\"1\"} 0.5\n"), "{out}");
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_other_requests() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_on(listener, || "m 1\n".to_string(), async move {
            let _ = stop_rx.await;
        }));
        async fn get(addr: SocketAddr, req: &str) -> String {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nm 1\n"), "{ok}");
        assert!(get(addr, "GET / HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 404"));
        assert!(get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await.starts_with("HTTP/1.1 405"));
        let long = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert!(get(addr, &long).await.starts_with("HTTP/1.1 400"));
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
