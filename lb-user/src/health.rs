//! Active health checks: one task per server of every cluster whose `[clusters.health]`
//! kind is not `none`. Every `interval`, a check (`tcp`: a connect; `mqtt`: CONNECT,
//! a CONNACK that accepts it, DISCONNECT) must finish within `timeout`. `fall`
//! failures in a row take a server down, `rise` successes in a row bring it back
//! ([`ServerLive::health_result`]); each change is logged once and counted.
//!
//! The tasks of a configuration are replaced on reload; a server that keeps its name
//! and address keeps its health state (it lives in its [`ServerLive`]).

use std::{net::SocketAddr, sync::Arc};

use lb_common::DaemonStat;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
    time::timeout,
};
use tracing::{info, warn};

use crate::{
    balance::{Flip, ServerLive},
    config::{Health, HealthKind},
    mqtt::{self, Version},
    runtime::ClusterRt,
    stats::Stats,
};

/// Starts the checks of `clusters`; abort the handles to stop them.
pub fn spawn(
    clusters: &[Arc<ClusterRt>],
    instance: &str,
    stats: &Arc<Stats>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for cluster in clusters {
        let health = &cluster.config.health;
        if health.kind == HealthKind::None {
            // Checks turned off by a reload: nothing would ever bring a server back.
            for server in &cluster.pool.servers {
                server.live.clear_health();
            }
            continue;
        }
        for server in &cluster.pool.servers {
            let client_id = format!(
                "{}-{}",
                health
                    .client_id
                    .clone()
                    .unwrap_or_else(|| format!("mqttlb-health-{instance}")),
                server.config.name
            );
            tasks.push(tokio::spawn(check_loop(
                health.clone(),
                cluster.config.name.clone(),
                server.config.name.clone(),
                server.config.address,
                client_id,
                server.live.clone(),
                stats.clone(),
            )));
        }
    }
    tasks
}

async fn check_loop(
    health: Health,
    cluster: String,
    server: String,
    address: SocketAddr,
    client_id: String,
    live: Arc<ServerLive>,
    stats: Arc<Stats>,
) {
    let mut tick = tokio::time::interval(health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        let result = timeout(health.timeout, check(health.kind, address, &client_id)).await;
        if !matches!(result, Ok(Err(Failed::Local(_)))) {
            let labels = vec![("cluster", cluster.clone()), ("server", server.clone())];
            let took = started.elapsed().as_secs_f64();
            stats.health_checks.get_or_create(&labels).observe(took);
        }
        let (ok, why) = match result {
            Ok(Ok(())) => (true, String::new()),
            // This host is out of descriptors or buffers: the check says nothing about
            // the server, whose verdict stays as it was.
            Ok(Err(Failed::Local(e))) => {
                stats.inc(DaemonStat::LocalResourceErrors);
                if crate::limits::LOCAL_RESOURCE_LOG.allow() {
                    warn!(%cluster, %server, error = %e, "health check skipped: this host is out of a resource (the server's state is kept)");
                }
                continue;
            }
            Ok(Err(Failed::Server(e))) => (false, e),
            Err(_) => (false, format!("no answer within {:?}", health.timeout)),
        };
        match live.health_result(ok, health.rise.get(), health.fall.get()) {
            Some(Flip::Down) => {
                stats.inc(DaemonStat::HealthFlips);
                warn!(%cluster, %server, %address, reason = %why, fall = health.fall.get(), "server down (health check)");
            }
            Some(Flip::Up) => {
                stats.inc(DaemonStat::HealthFlips);
                info!(%cluster, %server, %address, rise = health.rise.get(), "server up (health check)");
            }
            None => {}
        }
    }
}

/// Why a check failed.
#[derive(Debug)]
enum Failed {
    /// A local resource ran out (descriptors...): no verdict on the server.
    Local(std::io::Error),
    /// The server's fault; says what failed.
    Server(String),
}

impl From<String> for Failed {
    fn from(why: String) -> Self {
        Self::Server(why)
    }
}

/// One check.
async fn check(kind: HealthKind, address: SocketAddr, client_id: &str) -> Result<(), Failed> {
    let mut s = TcpStream::connect(address).await.map_err(|e| {
        if crate::limits::is_local_resource(&e) {
            Failed::Local(e)
        } else {
            Failed::Server(format!("connect: {e}"))
        }
    })?;
    if kind != HealthKind::Mqtt {
        return Ok(());
    }
    s.write_all(&mqtt::encode::connect(Version::V311, client_id, 30, true))
        .await
        .map_err(|e| format!("CONNECT: {e}"))?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)
        .await
        .map_err(|e| format!("CONNACK: {e}"))?;
    match mqtt::decode_connack_v311(connack) {
        Some(mqtt::Connack::Accepted) => {}
        Some(mqtt::Connack::Refused(code)) => {
            return Err(format!("CONNACK refused, return code {code}").into());
        }
        None => return Err(format!("not a CONNACK: {connack:02x?}").into()),
    }
    s.write_all(&mqtt::encode::disconnect())
        .await
        .map_err(|e| format!("DISCONNECT: {e}"))?;
    let _ = s.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    /// A listener answering every CONNECT with `reply`, counting DISCONNECTs.
    async fn fake(reply: [u8; 4]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = vec![0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&reply).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn mqtt_check_needs_an_accepting_connack() {
        let good = fake([0x20, 2, 0, 0]).await;
        assert!(check(HealthKind::Mqtt, good, "h").await.is_ok());
        let refused = fake([0x20, 2, 0, 5]).await;
        let e = check(HealthKind::Mqtt, refused, "h")
            .await
            .expect_err("refused");
        assert!(
            matches!(&e, Failed::Server(why) if why.contains("return code 5")),
            "{e:?}"
        );
        let garbage = fake(*b"HTTP").await;
        assert!(check(HealthKind::Mqtt, garbage, "h").await.is_err());
        // Nothing listening.
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        };
        assert!(matches!(
            check(HealthKind::Tcp, closed, "h").await,
            Err(Failed::Server(_))
        ));
        assert!(check(HealthKind::Tcp, good, "h").await.is_ok());
    }

    #[tokio::test]
    async fn a_dead_server_goes_down_after_fall_checks_and_back_after_rise() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = l.local_addr().expect("addr");
        drop(l);
        let live = Arc::new(ServerLive::default());
        let stats = Arc::new(Stats::default());
        let health = Health {
            kind: HealthKind::Tcp,
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(20),
            rise: 2.try_into().expect("2"),
            fall: 3.try_into().expect("3"),
            client_id: None,
        };
        let task = tokio::spawn(check_loop(
            health,
            "c".into(),
            "s".into(),
            address,
            "h".into(),
            live.clone(),
            stats.clone(),
        ));
        let wait = |want: bool| {
            let live = live.clone();
            async move {
                for _ in 0..200 {
                    if live.healthy() == want {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        assert!(wait(false).await, "down");
        assert_eq!(stats.get(DaemonStat::HealthFlips), 1);
        let _l = TcpListener::bind(address).await.expect("rebind");
        assert!(wait(true).await, "up again");
        assert_eq!(stats.get(DaemonStat::HealthFlips), 2);
        task.abort();
    }
}
