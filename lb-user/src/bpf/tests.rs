//! The C constants against lb-common.

use lb_common::{
    CTRL_THROTTLE, DIR_CLIENT_TO_SERVER, DIR_SERVER_TO_CLIENT, DaemonStat, EVENT_LAG_CHECK,
    EVENT_PEER_GONE, MAX_SPLICED, Stat,
};

const CONSTS_H: &str = include_str!("../../../lb-ebpf/src/lb_consts.h");

/// The value of `NAME` in lb_consts.h, as `#define NAME v` or enum `NAME = v,`.
fn c_const(name: &str) -> u64 {
    let value = CONSTS_H
        .lines()
        .find_map(|line| {
            let line = line.split("/*").next().unwrap_or_default().trim();
            let rest = line.strip_prefix("#define").unwrap_or(line).trim_start();
            let rest = rest.strip_prefix(name)?;
            let v = rest
                .trim()
                .trim_start_matches('=')
                .trim_end_matches(',')
                .trim();
            (rest.starts_with([' ', '\t']) && !v.is_empty()).then(|| v.to_owned())
        })
        .unwrap_or_else(|| panic!("{name} not in lb_consts.h"));
    let v = value.trim_start_matches('(').trim_end_matches(')');
    if let Some(shift) = v.strip_prefix("1ULL << ") {
        return 1 << shift.parse::<u32>().expect("shift");
    }
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
    .unwrap_or_else(|| panic!("{name} = {value}"))
}

#[test]
fn c_constants_match_lb_common() {
    assert_eq!(c_const("MAX_SPLICED"), u64::from(MAX_SPLICED));
    assert_eq!(
        c_const("KFUNC_PLACEHOLDER"),
        u64::from(lb_common::KFUNC_PLACEHOLDER)
    );
    assert_eq!(
        c_const("SOCK_SEQ_KNOWN"),
        u64::from(lb_common::SOCK_SEQ_KNOWN)
    );
    assert_eq!(
        c_const("EVENT_STREAM_BROKEN"),
        u64::from(lb_common::EVENT_STREAM_BROKEN)
    );
    assert_eq!(c_const("STAT_STREAM_BROKEN"), Stat::StreamBroken as u64);
    assert_eq!(c_const("MAX_BACKENDS"), u64::from(lb_common::MAX_BACKENDS));
    assert_eq!(
        c_const("DIR_CLIENT_TO_SERVER"),
        u64::from(DIR_CLIENT_TO_SERVER)
    );
    assert_eq!(
        c_const("DIR_SERVER_TO_CLIENT"),
        u64::from(DIR_SERVER_TO_CLIENT)
    );
    assert_eq!(c_const("EVENT_LAG_CHECK"), u64::from(EVENT_LAG_CHECK));
    assert_eq!(c_const("EVENT_FIN"), u64::from(lb_common::EVENT_FIN));
    assert_eq!(c_const("EVENT_PASSED"), u64::from(lb_common::EVENT_PASSED));
    assert_eq!(c_const("EVENT_PEER_GONE"), u64::from(EVENT_PEER_GONE));
    assert_eq!(c_const("STAT_COUNT"), u64::from(Stat::COUNT));
    assert_eq!(c_const("DAEMON_STAT_COUNT"), u64::from(DaemonStat::COUNT));
    assert_eq!(c_const("STAT_PASSED"), Stat::Passed as u64);
    assert_eq!(c_const("STAT_EVENT_DROPPED"), Stat::EventDropped as u64);
    assert_eq!(c_const("CTRL_THROTTLE"), CTRL_THROTTLE);
    assert_eq!(c_const("CTRL_EVICT"), lb_common::CTRL_EVICT);
    assert_eq!(
        c_const("EVENT_EVICT_CUT"),
        u64::from(lb_common::EVENT_EVICT_CUT)
    );
    for (name, v) in [
        ("SOCK_TRACK_MQTT", lb_common::SOCK_TRACK_MQTT),
        ("SOCK_EVICT_CUT", lb_common::SOCK_EVICT_CUT),
    ] {
        assert_eq!(c_const(name), u64::from(v), "{name}");
    }
}
