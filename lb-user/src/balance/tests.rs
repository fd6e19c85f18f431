//! Selection by every algorithm, the Maglev table, leases and passive health.

use std::{collections::HashMap, net::Ipv4Addr, num::NonZeroU32, time::Duration};

use super::*;
use crate::config::Config;

fn cluster(balance: &str, servers: &[(u32, bool, &str)]) -> Cluster {
    let mut text = format!(
        "[[listeners]]\nname='l'\nbind='127.0.0.1:1'\ncluster='c'\n[[clusters]]\nname='c'\nbalance='{balance}'\n"
    );
    for (i, (w, backup, state)) in servers.iter().enumerate() {
        text += &format!(
            "[[clusters.servers]]\nname='s{i}'\naddress='127.0.0.1:{}'\nweight={w}\nbackup={backup}\nstate='{state}'\n",
            1000 + i
        );
    }
    Config::parse(&text).expect("valid").clusters.remove(0)
}

fn pool(servers: &[(u32, bool, &str)]) -> Pool {
    Pool::new(&cluster("round-robin", servers), None)
}

fn key(id: &str) -> Key<'_> {
    Key {
        client_id: id,
        source: IpAddr::V4(Ipv4Addr::LOCALHOST),
    }
}

fn pick(p: &Pool) -> Option<usize> {
    p.select(&key("x"), &vec![false; p.servers.len()])
        .map(|l| l.index)
}

fn counts(picks: impl Iterator<Item = usize>, n: usize) -> Vec<usize> {
    let mut c = vec![0; n];
    for i in picks {
        c[i] += 1;
    }
    c
}

#[test]
fn weighted_round_robin_is_smooth_and_exact() {
    let p = pool(&[(3, false, "up"), (2, false, "up"), (1, false, "up")]);
    let picks: Vec<usize> = (0..12).filter_map(|_| pick(&p)).collect();
    assert_eq!(counts(picks.iter().copied(), 3), [6, 4, 2]);
    // Smooth: the heaviest server is never picked three times in a row.
    assert!(
        !picks.windows(3).any(|w| w.iter().all(|&i| i == 0)),
        "{picks:?}"
    );
}

#[test]
fn skips_drained_down_and_tried_servers_and_uses_backups_last() {
    for balance in ["round-robin", "least-conn", "random", "client-id", "source"] {
        let p = Pool::new(
            &cluster(
                balance,
                &[
                    (1, false, "drain"),
                    (1, false, "up"),
                    (1, false, "down"),
                    (1, true, "up"),
                ],
            ),
            None,
        );
        for id in ["a", "b", "c", "d", "e"] {
            let l = p.select(&key(id), &[false; 4]).map(|l| l.index);
            assert_eq!(l, Some(1), "{balance}");
        }
        assert_eq!(
            p.select(&key("a"), &[false, true, false, false])
                .map(|l| l.index),
            None,
            "{balance}: backup only when no primary is up"
        );
        let only_backup = Pool::new(
            &cluster(balance, &[(1, false, "down"), (1, true, "up")]),
            None,
        );
        assert_eq!(pick(&only_backup), Some(1), "{balance}");
    }
}

#[test]
fn passive_failures_take_a_server_out_for_fail_timeout() {
    let p = pool(&[(1, false, "up"), (1, false, "up")]);
    let lease = p.select(&key("x"), &[false, true]).expect("server 0");
    assert!(lease.failed(), "max_fails = 1 marks it down");
    drop(lease);
    for _ in 0..4 {
        assert_eq!(pick(&p), Some(1));
    }
    assert!(p.servers[0].available(Instant::now() + Duration::from_secs(11)));
    assert_eq!(p.servers[0].live.health_flips.load(Ordering::Relaxed), 1);
}

#[test]
fn leases_count_active_connections_and_respect_max() {
    let mut c = cluster("round-robin", &[(1, false, "up")]);
    c.servers[0].max_connections = NonZeroU32::new(2);
    let p = Pool::new(&c, None);
    let a = p.select(&key("x"), &[false]).expect("1");
    let b = p.select(&key("x"), &[false]).expect("2");
    assert!(p.select(&key("x"), &[false]).is_none(), "full");
    assert_eq!(p.servers[0].live.active.load(Ordering::Relaxed), 2);
    drop((a, b));
    assert_eq!(p.servers[0].live.active.load(Ordering::Relaxed), 0);
}

#[test]
fn least_conn_weighs_open_connections() {
    let p = Pool::new(
        &cluster("least-conn", &[(2, false, "up"), (1, false, "up")]),
        None,
    );
    // Holding every lease: loads must stay at 2:1.
    let leases: Vec<Lease> = (0..30)
        .map(|_| p.select(&key("x"), &[false, false]).expect("lease"))
        .collect();
    assert_eq!(counts(leases.iter().map(|l| l.index), 2), [20, 10]);
}

/// Selections racing with leases taken and dropped on other threads always find a
/// server: a second reading of the loads, compared against the best of the first,
/// once left none (an empty client id refused with CONNACK 3, seen in the balancing
/// test about once in fifteen runs).
#[test]
fn least_conn_always_finds_a_server_while_loads_move() {
    let p = Pool::new(
        &cluster(
            "least-conn",
            &[(1, false, "up"), (1, false, "up"), (1, false, "up")],
        ),
        None,
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|t| {
        for _ in 0..3 {
            t.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let held: Vec<Lease> = (0..8)
                        .filter_map(|_| p.select(&key("x"), &[false; 3]))
                        .collect();
                    drop(held);
                }
            });
        }
        let missed = (0..200_000)
            .filter(|_| p.select(&key("x"), &[false; 3]).is_none())
            .count();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(missed, 0, "selections that found no server");
    });
}

#[test]
fn least_conn_fills_the_emptied_server() {
    let p = Pool::new(
        &cluster("least-conn", &[(1, false, "up"), (1, false, "up")]),
        None,
    );
    let mut leases: Vec<Lease> = (0..10)
        .map(|_| p.select(&key("x"), &[false, false]).expect("lease"))
        .collect();
    leases.retain(|l| l.index == 0);
    let next: Vec<usize> = (0..5)
        .map(|_| p.select(&key("x"), &[false, false]).expect("lease").index)
        .collect();
    assert!(next.iter().all(|&i| i == 1), "{next:?}");
}

#[test]
fn random_two_choices_balance_and_honour_weights() {
    let p = Pool::new(
        &cluster(
            "random",
            &[(3, false, "up"), (2, false, "up"), (1, false, "up")],
        ),
        None,
    );
    let leases: Vec<Lease> = (0..600)
        .map(|_| p.select(&key("x"), &[false; 3]).expect("lease"))
        .collect();
    let c = counts(leases.iter().map(|l| l.index), 3);
    for (got, want) in c.iter().zip([300.0, 200.0, 100.0]) {
        assert!((*got as f64 - want).abs() <= want * 0.2, "{c:?}");
    }
}

fn id_counts(p: &Pool, n: usize) -> Vec<usize> {
    let ids: Vec<String> = (0..n).map(|i| format!("device-{i}")).collect();
    counts(
        ids.iter().map(|id| {
            p.select(&key(id), &vec![false; p.servers.len()])
                .expect("lease")
                .index
        }),
        p.servers.len(),
    )
}

#[test]
fn empty_client_ids_use_the_fallback_not_one_hash() {
    let p = Pool::new(&cluster("client-id", &[(1, false, "up"); 3]), None);
    // Held leases: least-conn (the default fallback) fills the servers in turn.
    let leases: Vec<Lease> = (0..300)
        .map(|_| p.select(&key(""), &[false; 3]).expect("lease"))
        .collect();
    let c = counts(leases.iter().map(|l| l.index), 3);
    assert_eq!(c, vec![100, 100, 100]);
}

#[test]
fn client_id_spreads_by_weight() {
    let even = Pool::new(&cluster("client-id", &[(1, false, "up"); 3]), None);
    for got in id_counts(&even, 6000) {
        assert!((got as f64 - 2000.0).abs() <= 200.0, "{got}");
    }
    let weighted = Pool::new(
        &cluster(
            "client-id",
            &[(3, false, "up"), (2, false, "up"), (1, false, "up")],
        ),
        None,
    );
    let c = id_counts(&weighted, 6000);
    for (got, want) in c.iter().zip([3000.0, 2000.0, 1000.0]) {
        assert!((*got as f64 - want).abs() <= want * 0.1, "{c:?}");
    }
    // The table itself is exact to a fraction of a percent.
    let slots = counts(weighted.maglev[0].table.iter().map(|&i| i as usize), 3);
    for (got, want) in slots.iter().zip([3.0 / 6.0, 2.0 / 6.0, 1.0 / 6.0]) {
        let share = *got as f64 / MAGLEV_SIZE as f64;
        assert!((share - want).abs() < 0.005, "{slots:?}");
    }
}

#[test]
fn client_id_is_deterministic_and_moves_only_an_unusable_servers_ids() {
    let servers = [(1, false, "up"); 3];
    let a = Pool::new(&cluster("client-id", &servers), None);
    let b = Pool::new(&cluster("client-id", &servers), None);
    let ids: Vec<String> = (0..3000).map(|i| format!("id-{i}")).collect();
    let place = |p: &Pool, tried: &[bool]| -> Vec<usize> {
        ids.iter()
            .map(|id| p.select(&key(id), tried).expect("lease").index)
            .collect()
    };
    let before = place(&a, &[false; 3]);
    assert_eq!(before, place(&b, &[false; 3]), "same list, same mapping");
    // Server 2 unusable (here: tried): only its ids move.
    let without = place(&a, &[false, false, true]);
    for (x, y) in before.iter().zip(&without) {
        if *x != 2 {
            assert_eq!(x, y);
        }
    }
    assert_eq!(before, place(&a, &[false; 3]), "and they come back");
}

#[test]
fn removing_a_server_from_the_list_moves_under_one_percent_of_the_others() {
    let three = Pool::new(&cluster("client-id", &[(1, false, "up"); 3]), None);
    let mut c = cluster("client-id", &[(1, false, "up"); 3]);
    c.servers.remove(2);
    let two = Pool::new(&c, None);
    let mut kept = 0;
    let mut moved = 0;
    for i in 0..20_000 {
        let id = format!("sensor/{i}");
        let k = key(&id);
        let was = three.table_owner(&k).expect("owner");
        if was != 2 {
            kept += 1;
            if two.table_owner(&k) != Some(was) {
                moved += 1;
            }
        }
    }
    assert!(moved * 100 < kept, "{moved} of {kept} moved");
}

#[test]
fn source_hash_is_stable_per_address() {
    let p = Pool::new(&cluster("source", &[(1, false, "up"); 3]), None);
    let mut seen: HashMap<u8, usize> = HashMap::new();
    for round in 0..3 {
        for last in 0..=255u8 {
            let k = Key {
                client_id: "ignored",
                source: IpAddr::V4(Ipv4Addr::new(10, 0, round, last)),
            };
            let i = p.select(&k, &[false; 3]).expect("lease").index;
            if round == 0 {
                seen.insert(last, i);
            }
            let again = p.select(&k, &[false; 3]).expect("lease").index;
            assert_eq!(i, again);
        }
    }
    let c = counts(seen.values().copied(), 3);
    assert!(c.iter().all(|&n| n > 50), "{c:?}");
}

#[test]
fn health_flips_after_fall_failures_and_rise_successes() {
    let live = ServerLive::default();
    assert_eq!(live.health_result(false, 2, 3), None);
    assert_eq!(live.health_result(false, 2, 3), None);
    assert_eq!(live.health_result(true, 2, 3), None, "streak broken");
    assert_eq!(live.health_result(false, 2, 3), None);
    assert_eq!(live.health_result(false, 2, 3), None);
    assert_eq!(live.health_result(false, 2, 3), Some(Flip::Down));
    assert!(!live.healthy());
    assert_eq!(live.health_result(false, 2, 3), None);
    assert_eq!(live.health_result(true, 2, 3), None);
    assert_eq!(live.health_result(true, 2, 3), Some(Flip::Up));
    assert!(live.healthy());
    assert_eq!(live.health_flips.load(Ordering::Relaxed), 2);
}

#[test]
fn reload_keeps_live_state_of_unchanged_servers() {
    let c = cluster("round-robin", &[(1, false, "up"), (1, false, "up")]);
    let old = Pool::new(&c, None);
    let lease = old.select(&key("x"), &[false, true]).expect("s0");
    let mut changed = c.clone();
    changed.servers[1].address = "127.0.0.1:2000".parse().expect("addr");
    let new = Pool::new(&changed, Some(&old));
    assert_eq!(new.servers[0].live.active.load(Ordering::Relaxed), 1);
    assert!(Arc::ptr_eq(&new.servers[0].live, &old.servers[0].live));
    assert!(!Arc::ptr_eq(&new.servers[1].live, &old.servers[1].live));
    drop(lease);
    assert_eq!(new.servers[0].live.active.load(Ordering::Relaxed), 0);
}
