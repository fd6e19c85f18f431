/* Constants shared with lb-common/src/lib.rs: keep both in step. */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

#define MAX_SPLICED 262144          /* lb_common::MAX_SPLICED */
#define MAX_BACKENDS 4096           /* lb_common::MAX_BACKENDS */

#define DIR_CLIENT_TO_SERVER 0
#define DIR_SERVER_TO_CLIENT 1

/* Indices of the per-CPU `stats` map (lb_common::Stat). */
enum lb_stat {
	STAT_REDIRECTED = 0,
	STAT_FIN_DROPPED = 1,
	STAT_UNKNOWN_SOCKET = 2,
	STAT_PEER_GONE = 3,
	STAT_LAG_EVENT = 4,
	STAT_EVENT_DROPPED = 5,
	STAT_PASSED = 6,
	STAT_OVERLAP_TRIMMED = 7,
	STAT_DUPLICATE_DROPPED = 8,
	STAT_STREAM_BROKEN = 9,
	STAT_COUNT = 10,
};

/* lb_sock.flags */
#define SOCK_SEQ_KNOWN 1
/* Set by the daemon: follow MQTT packet boundaries in this socket's bytes (`mqtt`). */
#define SOCK_TRACK_MQTT 2
/* Set by the program: the stream was cut at a boundary for an eviction; every later
 * skb is dropped. */
#define SOCK_EVICT_CUT 4

/*
 * Immediate of the kfunc call to bpf_cast_to_kern_ctx: aya 0.14 does not resolve
 * kfuncs, so the loader replaces this value with the function's BTF id in vmlinux
 * (lb_common::KFUNC_PLACEHOLDER).
 */
#define KFUNC_PLACEHOLDER 0x7eadbeef

#define DAEMON_STAT_COUNT 63        /* lb_common::DaemonStat::COUNT */

/*
 * `ctrl` map value: bit 63 asks the program to pass (not redirect) the socket's bytes;
 * the low bits are how many passed bytes the daemon has read and forwarded
 * (lb_common::CTRL_THROTTLE).
 */
#define CTRL_THROTTLE (1ULL << 63)
/*
 * Bit 62, with CTRL_THROTTLE, asks the program to end the socket's stream at the next
 * MQTT packet boundary (evacuation): lb_sock.evict_end says where in the passed bytes
 * it ends, later skbs are dropped (lb_common::CTRL_EVICT).
 */
#define CTRL_EVICT (1ULL << 62)
#define CTRL_FLAGS (CTRL_THROTTLE | CTRL_EVICT)

/* Ring-buffer event kinds (lb_common::EVENT_*). */
#define EVENT_LAG_CHECK 1
#define EVENT_PEER_GONE 2
#define EVENT_STREAM_BROKEN 3
#define EVENT_FIN 4
#define EVENT_PASSED 5
#define EVENT_EVICT_CUT 6

#endif
