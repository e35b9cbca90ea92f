//! Telemetry sessions: one bidirectional stream per endpoint, kept open for
//! the life of a client. The client's Settings go first (and again every few
//! minutes); what the broker pushes (its Settings reply, orphaned-transaction
//! checks) is handed to the owner through a bounded channel. A broken stream
//! is reopened with exponential backoff (1 s doubling to 30 s).

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use raftmq_proto::rocketmq as pb;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

use crate::Endpoints;

/// First wait before reopening a broken stream.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// Longest wait before reopening.
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A stream that lived this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Settings are sent again this often on an open stream (like the Python client).
const RESEND_SETTINGS: Duration = Duration::from_secs(300);
/// Longest wait for the broker to accept a stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A command the broker pushed, and the endpoint whose stream carried it.
pub(crate) type Inbound = (usize, pb::TelemetryCommand);

/// The next wait before reconnecting, after waiting `current`.
pub(crate) fn next_backoff(current: Duration) -> Duration {
    (current * 2).clamp(RECONNECT_MIN, RECONNECT_MAX)
}

/// Opens a session to every endpoint; they run until `shutdown` turns true
/// (or its sender is dropped). Commands that do not fit in `inbound` are
/// dropped with a warning: the broker repeats what matters (checks).
pub(crate) fn spawn_sessions(
    endpoints: Arc<Endpoints>,
    settings: pb::Settings,
    inbound: mpsc::Sender<Inbound>,
    shutdown: watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    (0..endpoints.addrs.len())
        .map(|i| tokio::spawn(session(endpoints.clone(), i, settings.clone(), inbound.clone(), shutdown.clone())))
        .collect()
}

fn settings_command(settings: &pb::Settings) -> pb::TelemetryCommand {
    pb::TelemetryCommand { status: None, command: Some(pb::telemetry_command::Command::Settings(settings.clone())) }
}

/// Sleeps `d`; false when shut down meanwhile.
pub(crate) async fn sleep_or_shutdown(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => !*shutdown.borrow(),
        _ = shutdown.changed() => false,
    }
}

async fn session(
    endpoints: Arc<Endpoints>,
    i: usize,
    settings: pb::Settings,
    inbound: mpsc::Sender<Inbound>,
    mut shutdown: watch::Receiver<bool>,
) {
    let addr = endpoints.addrs[i].clone();
    let mut backoff = RECONNECT_MIN;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let (tx, rx) = mpsc::channel::<pb::TelemetryCommand>(8);
        // Cannot fail: the receiver is right here.
        let _ = tx.try_send(settings_command(&settings));
        let mut client = endpoints.clients[i].clone();
        let opened = tokio::select! {
            r = tokio::time::timeout(OPEN_TIMEOUT, client.telemetry(ReceiverStream::new(rx))) => r,
            _ = shutdown.changed() => return,
        };
        let started = Instant::now();
        match opened {
            Ok(Ok(resp)) => {
                tracing::debug!(endpoint = %addr, "telemetry stream open");
                let mut stream = resp.into_inner();
                let mut resend =
                    tokio::time::interval_at(tokio::time::Instant::now() + RESEND_SETTINGS, RESEND_SETTINGS);
                loop {
                    tokio::select! {
                        m = stream.message() => match m {
                            Ok(Some(cmd)) => {
                                backoff = RECONNECT_MIN;
                                if let Err(e) = inbound.try_send((i, cmd)) {
                                    match e {
                                        mpsc::error::TrySendError::Full(_) => {
                                            tracing::warn!(endpoint = %addr, "telemetry command dropped: handler busy");
                                        }
                                        mpsc::error::TrySendError::Closed(_) => return,
                                    }
                                }
                            }
                            Ok(None) => {
                                tracing::info!(endpoint = %addr, "telemetry stream closed by the broker");
                                break;
                            }
                            Err(s) => {
                                tracing::warn!(endpoint = %addr, code = ?s.code(), message = s.message(), "telemetry stream broke");
                                break;
                            }
                        },
                        _ = resend.tick() => {
                            if tx.send(settings_command(&settings)).await.is_err() {
                                break;
                            }
                        }
                        _ = shutdown.changed() => return,
                    }
                }
            }
            Ok(Err(s)) => {
                endpoints.failed(i);
                tracing::warn!(endpoint = %addr, code = ?s.code(), message = s.message(), "telemetry stream refused");
            }
            Err(_) => {
                endpoints.failed(i);
                tracing::warn!(endpoint = %addr, "telemetry stream did not open in time");
            }
        }
        if started.elapsed() >= HEALTHY_AFTER {
            backoff = RECONNECT_MIN;
        }
        tracing::debug!(endpoint = %addr, wait_ms = backoff.as_millis() as u64, "reopening telemetry stream");
        if !sleep_or_shutdown(backoff, &mut shutdown).await {
            return;
        }
        backoff = next_backoff(backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_doubles_up_to_the_cap() {
        let mut d = RECONNECT_MIN;
        let mut seen = vec![d];
        for _ in 0..8 {
            d = next_backoff(d);
            seen.push(d);
        }
        let secs: Vec<u64> = seen.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 16, 30, 30, 30, 30]);
    }

    #[tokio::test]
    async fn sessions_stop_on_shutdown_even_without_a_broker() {
        let e = Arc::new(Endpoints::new(&["127.0.0.1:1".into()]).unwrap());
        let (tx, _rx) = mpsc::channel(4);
        let (stop, stopped) = watch::channel(false);
        let handles = spawn_sessions(e, pb::Settings::default(), tx, stopped);
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.send_replace(true);
        for h in handles {
            tokio::time::timeout(Duration::from_secs(5), h).await.unwrap().unwrap();
        }
    }
}
