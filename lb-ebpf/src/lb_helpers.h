/* Small helpers used by the programs. */
#ifndef LB_HELPERS_H
#define LB_HELPERS_H

#include "lb_maps.h"

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline void emit(__u32 kind, const struct lb_sock *s, __u64 bytes)
{
	struct lb_event ev = {
		.kind = kind,
		.conn_id = s->conn_id,
		.dir = s->dir,
		.bytes = bytes,
	};

	if (bpf_ringbuf_output(&events, &ev, sizeof(ev), 0))
		stat_inc(STAT_EVENT_DROPPED);
}

#endif
