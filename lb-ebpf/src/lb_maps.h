/* Maps of the splice data plane; all pinned under /sys/fs/bpf/mqttlb/<instance>/. */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lb_consts.h"
#include "lb_structs.h"

/* Sockets whose received bytes go through the verdict program (until the pair ends). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2 * MAX_SPLICED);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sources SEC(".maps");

/* Every spliced socket, as a redirect destination (no program attached). */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2 * MAX_SPLICED);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} targets SEC(".maps");

/*
 * Socket cookie -> peer cookie, connection, direction and redirected byte counters.
 * Per-connection maps are not preallocated: memory follows the live connections
 * (preallocated, these maps alone held about 120 MiB of vmalloc per instance).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * MAX_SPLICED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct lb_sock);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} socks SEC(".maps");

/*
 * Socket cookie -> throttle word, written only by the daemon (CTRL_THROTTLE | bytes it
 * has consumed). One 8-byte word, so the program never sees half an update; no
 * preallocation, so a replaced element stays valid until the program is done with it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * MAX_SPLICED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ctrl SEC(".maps");

/* Connection id -> addresses and cookies of the pair (for `mqttlb ctl conns`). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SPLICED);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct lb_conn);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conns SEC(".maps");

/* Backend slot -> server as the daemon sees it (for `mqttlb ctl backends`). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} backends SEC(".maps");

/*
 * The sticky table: key -> server. LRU, so a full table forgets the least recently
 * used keys; the daemon sets max_entries from the clusters' sticky_table_size at
 * load time. The pin outlives the daemon, so a restarted daemon keeps the entries.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 100000);
	__type(key, struct lb_sticky_key);
	__type(value, struct lb_sticky_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} sticky SEC(".maps");

/* Per-CPU counters of the programs, indexed by enum lb_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

/* The daemon's own counters, published for `mqttlb ctl stats` (never written here). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, DAEMON_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} daemon_stats SEC(".maps");

/* Events for the daemon: lag checks (backpressure) and failed redirects. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

#endif
