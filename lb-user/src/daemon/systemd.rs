//! The service manager's protocol (`Type=notify`, `sd_notify(3)`): `READY=1` once every
//! listener is bound, the data plane chosen (BPF loaded where it loads) and the
//! accept loops running; `RELOADING=1` and `READY=1` around a SIGHUP reload;
//! `STOPPING=1` at SIGTERM; `WATCHDOG=1` at half the `WatchdogSec` interval, from
//! the async runtime itself, so a wedged runtime gets the daemon restarted. Without
//! `NOTIFY_SOCKET` (not started by systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::debug;

fn send(states: &[NotifyState]) {
    // The service manager is told best effort: a lost datagram only delays its view.
    if let Err(e) = sd_notify::notify(states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// Serving: every listener bound and accepting.
pub(crate) fn ready(listeners: usize, data_plane: &str) {
    let status = format!("serving {listeners} listeners, data plane {data_plane}");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// Serving with `[global] workers`: every worker accepting.
pub(crate) fn ready_workers(listeners: usize, workers: u32) {
    let status = format!("serving {listeners} listeners with {workers} workers");
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A watchdog ping (the supervisor's loop; a lone daemon uses [`watchdog`]).
pub(crate) fn ping() {
    send(&[NotifyState::Watchdog]);
}

/// A SIGHUP reload starts.
pub(crate) fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// The reload is done (applied or refused: the daemon serves either way).
pub(crate) fn reloaded() {
    send(&[NotifyState::Ready]);
}

/// SIGTERM: stopping.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Pings the watchdog at half its interval when the service manager set one.
pub(super) fn watchdog() -> Option<JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let every = (interval / 2).max(Duration::from_millis(10));
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    }))
}

/// A hot upgrade: `pid` is the service's main process from now on (sent by the old
/// one, the only one the service manager listens to until then).
pub(crate) fn main_pid(pid: u32) {
    send(&[NotifyState::MainPid(pid), NotifyState::Ready]);
}
