//! A listener's admission limits, checked once the CONNECT is read (so a refusal can
//! answer in the client's MQTT version) and before any server is chosen:
//! `max_connections_per_source` (open at once, CONNACK 0x97 Quota exceeded),
//! `connect_rate_per_source` and `connect_rate_per_client_id` (new connections a
//! second, 0x9F Connection rate exceeded), then `new_connection_rate`, which does not
//! refuse but spaces connections out: each waits for its slot, and only when
//! `new_connection_queue` connections already wait is one refused (0x9F). 3.x clients
//! get CONNACK 3 (Server unavailable) for all of them.
//!
//! Rates are GCRA (one theoretical arrival time per key). The per-source and
//! per-client-id tables drop entries that no longer hold anything back once they pass
//! [`TABLE_SWEEP`] entries, so a flood of one-off sources or ids costs bounded memory.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use lb_common::DaemonStat;

use crate::{
    config::{Limits, Rate},
    mqtt,
};

/// Table size past which entries that hold nothing back are dropped.
const TABLE_SWEEP: usize = 65_536;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections_per_source`.
    SourceConnections,
    /// `connect_rate_per_source`.
    SourceRate,
    /// `connect_rate_per_client_id`.
    ClientIdRate,
    /// `new_connection_rate`'s queue was full.
    NewConnectionRate,
}

impl Refusal {
    /// Its counter.
    pub fn stat(self) -> DaemonStat {
        match self {
            Self::SourceConnections => DaemonStat::LimitSourceConnections,
            Self::SourceRate => DaemonStat::LimitSourceRate,
            Self::ClientIdRate => DaemonStat::LimitClientIdRate,
            Self::NewConnectionRate => DaemonStat::LimitNewConnectionRate,
        }
    }

    /// The MQTT 5 CONNACK reason code.
    pub fn v5_reason(self) -> u8 {
        match self {
            Self::SourceConnections => mqtt::V5_QUOTA_EXCEEDED,
            _ => mqtt::V5_CONNECTION_RATE_EXCEEDED,
        }
    }

    /// The configuration key that refused.
    pub fn key(self) -> &'static str {
        match self {
            Self::SourceConnections => "max_connections_per_source",
            Self::SourceRate => "connect_rate_per_source",
            Self::ClientIdRate => "connect_rate_per_client_id",
            Self::NewConnectionRate => "new_connection_rate",
        }
    }
}

/// GCRA: whether an event at `now` conforms to `rate`, advancing `tat` when it does.
fn conform(tat: &mut Instant, now: Instant, rate: Rate) -> bool {
    let interval = Duration::from_secs_f64(1.0 / rate.rate);
    let tolerance = interval * (rate.burst - 1);
    let t = (*tat).max(now);
    if t - now > tolerance {
        return false;
    }
    *tat = t + interval;
    true
}

#[derive(Debug)]
struct Source {
    open: u32,
    tat: Instant,
}

/// One listener's limits and their state.
#[derive(Debug)]
pub struct Admission {
    /// The listener's name (a key of the workers' shared client id table).
    listener: String,
    limits: Limits,
    sources: Mutex<HashMap<IpAddr, Source>>,
    /// Client ids by a keyed hash (the ids themselves are not kept).
    client_ids: Mutex<HashMap<u64, Instant>>,
    hasher: RandomState,
    /// `new_connection_rate`'s theoretical arrival time.
    gate: Mutex<Instant>,
    waiting: AtomicU32,
}

/// A connection admitted: holds its place among its source's open connections.
#[derive(Debug)]
pub struct Admitted {
    admission: Arc<Admission>,
    source: Option<IpAddr>,
    /// It waited for `new_connection_rate`.
    pub delayed: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(ip) = self.source {
            let mut sources = self.admission.sources.lock().expect("sources lock");
            if let Some(s) = sources.get_mut(&ip) {
                s.open = s.open.saturating_sub(1);
            }
        }
    }
}

impl Admission {
    /// The state for `limits` of the listener named `listener`.
    pub fn new(listener: &str, limits: Limits) -> Self {
        Self {
            listener: listener.to_owned(),
            limits,
            sources: Mutex::default(),
            client_ids: Mutex::default(),
            hasher: RandomState::new(),
            gate: Mutex::new(Instant::now()),
            waiting: AtomicU32::new(0),
        }
    }

    /// Whether any limit is set (none: [`Admission::admit`] is not needed).
    pub fn any(&self) -> bool {
        let l = &self.limits;
        l.max_connections_per_source.is_some()
            || l.per_source.is_some()
            || l.per_client_id.is_some()
            || l.new_connections.is_some()
    }

    /// Admits a connection from `source` with `client_id`, waiting for
    /// `new_connection_rate` when it is set, or says why not.
    pub async fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        client_id: &str,
    ) -> Result<Admitted, Refusal> {
        let now = Instant::now();
        let counted = self.check_source(source, now)?;
        // From here a refusal must give the source's place back: `Admitted` does.
        let mut admitted = Admitted {
            admission: self.clone(),
            source: counted.then_some(source),
            delayed: false,
        };
        self.check_client_id(client_id, now)?;
        if let Some(rate) = self.limits.new_connections {
            let at = self.slot(rate, now)?;
            if at > now {
                admitted.delayed = true;
                self.waiting.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep_until(at).await;
                self.waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
        Ok(admitted)
    }

    /// A connection a hot upgrade handed over, counted among its source's open ones
    /// (never refused: it is open already); `None` when no such count is kept.
    pub fn adopted(self: &Arc<Self>, source: IpAddr) -> Option<Admitted> {
        self.limits.max_connections_per_source?;
        let mut sources = self.sources.lock().expect("sources lock");
        let now = Instant::now();
        sources
            .entry(source)
            .or_insert(Source { open: 0, tat: now })
            .open += 1;
        Some(Admitted {
            admission: self.clone(),
            source: Some(source),
            delayed: false,
        })
    }

    /// `max_connections_per_source` and `connect_rate_per_source`; true when the
    /// source's open count was raised (and must be lowered at the end).
    fn check_source(&self, source: IpAddr, now: Instant) -> Result<bool, Refusal> {
        let l = &self.limits;
        if l.max_connections_per_source.is_none() && l.per_source.is_none() {
            return Ok(false);
        }
        let mut sources = self.sources.lock().expect("sources lock");
        if sources.len() >= TABLE_SWEEP {
            sources.retain(|_, s| s.open > 0 || s.tat > now);
        }
        let s = sources
            .entry(source)
            .or_insert(Source { open: 0, tat: now });
        if l.max_connections_per_source
            .is_some_and(|max| s.open >= max)
        {
            return Err(Refusal::SourceConnections);
        }
        if let Some(rate) = l.per_source
            && !conform(&mut s.tat, now, rate)
        {
            return Err(Refusal::SourceRate);
        }
        let counted = l.max_connections_per_source.is_some();
        if counted {
            s.open += 1;
        }
        Ok(counted)
    }

    /// `connect_rate_per_client_id` (clients with an empty id are not limited by it),
    /// in the table the workers share when there is one.
    fn check_client_id(&self, client_id: &str, now: Instant) -> Result<(), Refusal> {
        let Some(rate) = self.limits.per_client_id else {
            return Ok(());
        };
        if client_id.is_empty() {
            return Ok(());
        }
        let conforms = match crate::workers::rates::shared() {
            Some(table) => table.conform(&self.listener, client_id, rate),
            None => {
                let key = self.hasher.hash_one(client_id);
                let mut ids = self.client_ids.lock().expect("client ids lock");
                if ids.len() >= TABLE_SWEEP {
                    ids.retain(|_, tat| *tat > now);
                }
                conform(ids.entry(key).or_insert(now), now, rate)
            }
        };
        if conforms {
            Ok(())
        } else {
            Err(Refusal::ClientIdRate)
        }
    }

    /// When this connection may go on under `rate`, or a refusal when
    /// `new_connection_queue` connections already wait.
    fn slot(&self, rate: Rate, now: Instant) -> Result<Instant, Refusal> {
        let interval = Duration::from_secs_f64(1.0 / rate.rate);
        let tolerance = interval * (rate.burst - 1);
        let mut tat = self.gate.lock().expect("gate lock");
        let t = (*tat).max(now);
        let wait = (t - now).saturating_sub(tolerance);
        if !wait.is_zero()
            && self.waiting.load(Ordering::Relaxed) >= self.limits.new_connection_queue
        {
            return Err(Refusal::NewConnectionRate);
        }
        *tat = t + interval;
        Ok(now + wait)
    }

    /// Connections waiting for `new_connection_rate` now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut Limits)) -> Arc<Admission> {
        let mut l = Limits::default();
        f(&mut l);
        Arc::new(Admission::new("mqtt", l))
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test]
    async fn open_connections_per_source_are_counted_and_given_back() {
        let adm = limits(|l| l.max_connections_per_source = Some(2));
        let one = adm.admit(A, "a").await.expect("first");
        let _two = adm.admit(A, "b").await.expect("second");
        assert_eq!(
            adm.admit(A, "c").await.err(),
            Some(Refusal::SourceConnections)
        );
        assert!(
            adm.admit(B, "d").await.is_ok(),
            "another source is not affected"
        );
        drop(one);
        assert!(
            adm.admit(A, "e").await.is_ok(),
            "a place freed by a closed connection"
        );
    }

    #[tokio::test]
    async fn connections_a_hot_upgrade_hands_over_fill_their_source_places() {
        let adm = limits(|l| l.max_connections_per_source = Some(2));
        let moved = [adm.adopted(A), adm.adopted(A), adm.adopted(A)];
        assert!(
            moved.iter().all(Option::is_some),
            "adopted past the limit too"
        );
        assert_eq!(
            adm.admit(A, "a").await.err(),
            Some(Refusal::SourceConnections)
        );
        drop(moved);
        assert!(adm.admit(A, "b").await.is_ok(), "their places given back");
        assert!(
            limits(|_| {}).adopted(A).is_none(),
            "nothing counted without the limit"
        );
    }

    #[tokio::test]
    async fn rates_allow_the_burst_then_refuse() {
        let rate = Rate {
            rate: 1.0,
            burst: 3,
        };
        let adm = limits(|l| l.per_client_id = Some(rate));
        for _ in 0..3 {
            assert!(adm.admit(A, "same").await.is_ok());
        }
        assert_eq!(
            adm.admit(A, "same").await.err(),
            Some(Refusal::ClientIdRate)
        );
        assert!(
            adm.admit(A, "other").await.is_ok(),
            "other ids are not affected"
        );
        assert!(adm.admit(A, "").await.is_ok(), "empty ids are not limited");
        let adm = limits(|l| l.per_source = Some(rate));
        for _ in 0..3 {
            assert!(adm.admit(A, "x").await.is_ok());
        }
        assert_eq!(adm.admit(A, "x").await.err(), Some(Refusal::SourceRate));
        assert_eq!(Refusal::SourceRate.v5_reason(), 0x9F);
        assert_eq!(Refusal::SourceConnections.v5_reason(), 0x97);
    }

    #[tokio::test(start_paused = true)]
    async fn the_listener_rate_spaces_connections_and_refuses_past_its_queue() {
        let adm = limits(|l| {
            l.new_connections = Some(Rate {
                rate: 10.0,
                burst: 1,
            });
            l.new_connection_queue = 5;
        });
        let start = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let adm = adm.clone();
            tasks.push(tokio::spawn(async move {
                adm.admit(A, &format!("c{i}"))
                    .await
                    .map(|a| (a.delayed, tokio::time::Instant::now()))
            }));
            tokio::task::yield_now().await;
        }
        let mut ok = Vec::new();
        let mut refused = 0;
        for t in tasks {
            match t.await.expect("task") {
                Ok((_, at)) => ok.push(at - start),
                Err(r) => {
                    assert_eq!(r, Refusal::NewConnectionRate);
                    refused += 1;
                }
            }
        }
        // The first at once, five waiting 100 ms apart, the other two refused.
        assert_eq!((ok.len(), refused), (6, 2), "{ok:?}");
        ok.sort();
        // (The timer wheel ticks in milliseconds.)
        for (i, at) in ok.iter().enumerate() {
            let ms = at.as_millis();
            assert!(
                (100 * i as u128..=100 * i as u128 + 2).contains(&ms),
                "{ok:?}"
            );
        }
    }
}
