//! What workers tell each other through their control sockets: health results
//! (worker 0 checks, the others follow) and runtime changes made through worker 0's
//! admin API (every worker makes them).

use std::{sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    limits::LogOnce,
    runtime::Shared,
    stats::Observed,
    views::{BackendView, Totals},
};

/// How often a worker takes worker 0's health results.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

/// Sends `request` to the control socket of worker `index` of `instance`, off the
/// async threads.
pub async fn ask(instance: &str, index: u32, request: &str) -> std::io::Result<serde_json::Value> {
    let path = super::socket_path(instance, index);
    let request = request.to_owned();
    tokio::task::spawn_blocking(move || crate::control::query_at(&path, &request))
        .await
        .map_err(std::io::Error::other)?
}

/// A worker other than 0: takes worker 0's health verdicts four times a second, by
/// cluster and server name. While worker 0 does not answer (restarting), the last
/// verdicts stay. In a shutdown worker 0 may be gone first (it has no connections to
/// wait for): that is not worth a warning.
pub async fn follow_health(shared: Arc<Shared>, instance: String) {
    let unreachable = LogOnce::new(Duration::from_secs(30));
    let mut tick = tokio::time::interval(FOLLOW_EVERY);
    loop {
        tick.tick().await;
        let views: Vec<BackendView> = match ask(&instance, 0, "backends").await {
            Ok(v) => match serde_json::from_value(v["backends"].clone()) {
                Ok(views) => views,
                Err(_) => continue,
            },
            Err(e) => {
                if !shared.is_stopping() && unreachable.allow() {
                    warn!(error = %e, "worker 0 (health checks) does not answer; servers keep their last health state");
                }
                continue;
            }
        };
        for c in shared.clusters().iter() {
            for s in &c.pool.servers {
                let Some(v) = views
                    .iter()
                    .find(|v| v.cluster == c.config.name && v.name == s.config.name)
                else {
                    continue;
                };
                let down = v.flags.iter().any(|f| f == "health-down");
                if s.live.follow_health(down) {
                    info!(cluster = %c.config.name, server = %s.config.name, down, "health state from worker 0");
                }
            }
        }
    }
}

/// Sends `request` to every other worker of this one's instance, one after the
/// other; each answer (or its `field`), read as a `T`, by worker index (none without
/// workers).
async fn ask_others<T: serde::de::DeserializeOwned>(
    shared: &Shared,
    request: &str,
    field: Option<&str>,
) -> Vec<(u32, std::io::Result<T>)> {
    let Some((instance, seat)) = shared.seat.get() else {
        return Vec::new();
    };
    let mut answers = Vec::new();
    for k in (0..seat.count).filter(|&k| k != seat.index) {
        let answer = ask(instance, k, request).await.and_then(|mut v| {
            let v = match field {
                Some(f) => v[f].take(),
                None => v,
            };
            serde_json::from_value::<T>(v).map_err(std::io::Error::other)
        });
        answers.push((k, answer));
    }
    answers
}

/// The counters and servers of the whole instance: this worker's and every other
/// worker's (a worker that does not answer is left out, and named in the log).
pub async fn totals(shared: &Shared) -> Totals {
    let mut totals = Totals::local(shared);
    let counters = ask_others::<Vec<(String, u64)>>(shared, "stats", Some("stats")).await;
    let servers = ask_others::<Vec<BackendView>>(shared, "backends", Some("backends")).await;
    for ((k, counters), (_, servers)) in counters.into_iter().zip(servers) {
        match (counters, servers) {
            (Ok(c), Ok(s)) => totals.add(&c, &s),
            (Err(e), _) | (_, Err(e)) => {
                warn!(worker = k, error = %e, "worker left out of the totals")
            }
        }
    }
    totals
}

/// The durations and connection ends of the whole instance (see [`totals`]).
pub async fn observed(shared: &Shared) -> Observed {
    let mut sum = shared.stats.observed();
    for (k, theirs) in ask_others::<Observed>(shared, "observed", Some("observed")).await {
        match theirs {
            Ok(o) => sum.add(&o),
            Err(e) => warn!(worker = k, error = %e, "worker left out of the histograms"),
        }
    }
    sum
}

/// Makes a runtime change `request` (a control socket line) on every other worker,
/// after this one (worker 0, through its admin API) made it; returns their answers.
/// A worker that does not answer is named in the log; the change stands on the
/// others.
pub async fn forward(shared: &Shared, request: &str) -> Vec<serde_json::Value> {
    let mut answers = Vec::new();
    for (k, answer) in ask_others::<serde_json::Value>(shared, request, None).await {
        match answer {
            Ok(a) => answers.push(a),
            Err(e) => {
                warn!(worker = k, request, error = %e, "runtime change not made on this worker")
            }
        }
    }
    answers
}
