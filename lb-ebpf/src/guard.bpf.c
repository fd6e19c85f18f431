// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The front guard: an XDP program on the interfaces `[guard] interfaces` names. It
 * looks only at TCP packets to the guarded ports (the listeners'), before the kernel
 * spends a socket or a SYN-ACK on them:
 * - a source in `guard_allow` passes, whatever else matches;
 * - a source in `guard_deny` is dropped (every packet to a guarded port);
 * - a SYN (without ACK) is charged to its source's token bucket in `guard_sources`
 *   (GCRA: one theoretical arrival time per source; `syn_rate` a second, `syn_burst`
 *   at once) and dropped when over it.
 * Everything else passes untouched, and so does anything the parser does not
 * understand (fragments, IPv6 extension headers, truncated headers): the guard may
 * let a bad packet through, it never drops a good one for being odd.
 *
 * IPv4 sources are looked up as IPv4-mapped IPv6 (::ffff:a.b.c.d), so one trie per
 * list holds both families.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Counter indices of `guard_stats` (lb_common::GuardStat). */
enum {
	GUARD_INSPECTED = 0,   /* TCP packets to a guarded port */
	GUARD_ALLOWED = 1,     /* passed because the source is allowed */
	GUARD_DENIED = 2,      /* dropped: source denied */
	GUARD_SYN_LIMITED = 3, /* dropped: SYN over the source's rate */
	GUARD_SYN_PASSED = 4,  /* SYNs within the rate */
	GUARD_UNPARSED = 5,    /* passed without a verdict: not understood */
	GUARD_STAT_COUNT = 6,
};

#define GUARD_MAX_CIDRS 65536
#define GUARD_MAX_PORTS 64

struct guard_lpm_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* A source address (IPv4 mapped into IPv6). */
struct guard_addr {
	__u8 addr[16];
};

/* Per source: the GCRA state and what the source did. */
struct guard_source {
	__u64 tat_ns;  /* theoretical arrival time of the next SYN */
	__u64 syns;    /* SYNs seen */
	__u64 dropped; /* packets dropped (denied or over the rate) */
	__u64 last_ns; /* last SYN or drop */
};

/* Rate settings, written by the daemon (index 0). */
struct guard_conf {
	__u64 interval_ns;  /* 1e9 / syn_rate; 0: no SYN limit */
	__u64 tolerance_ns; /* (syn_burst - 1) * interval_ns */
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, GUARD_MAX_CIDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct guard_lpm_key);
	__type(value, __u8);
} guard_deny SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, GUARD_MAX_CIDRS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct guard_lpm_key);
	__type(value, __u8);
} guard_allow SEC(".maps");

/* Guarded TCP ports, host byte order. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, GUARD_MAX_PORTS);
	__type(key, __u16);
	__type(value, __u8);
} guard_ports SEC(".maps");

/* Sources seen sending SYNs or dropped; the least recently used go first. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct guard_addr);
	__type(value, struct guard_source);
} guard_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct guard_conf);
} guard_conf SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, GUARD_STAT_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} guard_stats SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&guard_stats, &idx);

	if (v)
		*v += 1; /* per-CPU slot: no atomic needed */
}

/* The source's entry, made when missing. */
static __always_inline struct guard_source *source(struct guard_lpm_key *key)
{
	struct guard_source *s = bpf_map_lookup_elem(&guard_sources, key->addr);
	struct guard_source fresh = {};

	if (s)
		return s;
	bpf_map_update_elem(&guard_sources, key->addr, &fresh, BPF_NOEXIST);
	return bpf_map_lookup_elem(&guard_sources, key->addr);
}

static __always_inline int drop(struct guard_lpm_key *key, __u32 why, __u64 now)
{
	struct guard_source *s = source(key);

	if (s) {
		__sync_fetch_and_add(&s->dropped, 1);
		s->last_ns = now;
	}
	count(why);
	return XDP_DROP;
}

/* GCRA: pass when the theoretical arrival time is within the tolerance of now. */
static __always_inline int syn(struct guard_lpm_key *key)
{
	__u32 zero = 0;
	struct guard_conf *conf = bpf_map_lookup_elem(&guard_conf, &zero);
	__u64 now = bpf_ktime_get_ns();
	struct guard_source *s;
	__u64 tat;

	if (!conf || !conf->interval_ns) {
		count(GUARD_SYN_PASSED);
		return XDP_PASS;
	}
	s = source(key);
	if (!s) {
		count(GUARD_SYN_PASSED);
		return XDP_PASS;
	}
	__sync_fetch_and_add(&s->syns, 1);
	tat = s->tat_ns > now ? s->tat_ns : now;
	if (tat - now > conf->tolerance_ns)
		return drop(key, GUARD_SYN_LIMITED, now);
	/* Racing CPUs may both pass one SYN each: the limit is approximate by that. */
	s->tat_ns = tat + conf->interval_ns;
	s->last_ns = now;
	count(GUARD_SYN_PASSED);
	return XDP_PASS;
}

/* Verdict for a TCP header at `tcp_off`, source already in `key`. */
static __always_inline int tcp(struct xdp_md *ctx, __u64 tcp_off, struct guard_lpm_key *key)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct tcphdr *th = data + tcp_off;
	__u16 port;

	if ((void *)(th + 1) > end) {
		count(GUARD_UNPARSED);
		return XDP_PASS;
	}
	port = bpf_ntohs(th->dest);
	if (!bpf_map_lookup_elem(&guard_ports, &port))
		return XDP_PASS;
	count(GUARD_INSPECTED);
	key->prefixlen = 128;
	if (bpf_map_lookup_elem(&guard_allow, key)) {
		count(GUARD_ALLOWED);
		return XDP_PASS;
	}
	if (bpf_map_lookup_elem(&guard_deny, key))
		return drop(key, GUARD_DENIED, bpf_ktime_get_ns());
	if (th->syn && !th->ack)
		return syn(key);
	return XDP_PASS;
}

SEC("xdp")
int guard(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct guard_lpm_key key = {};
	__u64 off = sizeof(*eth);
	__u16 proto;

	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		__be16 *inner = data + off + 2;

		if ((void *)(inner + 1) > end)
			return XDP_PASS;
		proto = *inner;
		off += 4;
	}
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + off;

		if ((void *)(ip + 1) > end)
			return XDP_PASS;
		/* Non-first fragments carry no TCP header. */
		if (ip->protocol != IPPROTO_TCP || (ip->frag_off & bpf_htons(0x1fff)))
			return XDP_PASS;
		if (ip->ihl < 5) {
			count(GUARD_UNPARSED);
			return XDP_PASS;
		}
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ip->saddr, 4);
		return tcp(ctx, off + ip->ihl * 4, &key);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + off;

		if ((void *)(ip6 + 1) > end)
			return XDP_PASS;
		if (ip6->nexthdr != IPPROTO_TCP)
			return XDP_PASS;
		__builtin_memcpy(key.addr, &ip6->saddr, 16);
		return tcp(ctx, off + sizeof(*ip6), &key);
	}
	return XDP_PASS;
}
