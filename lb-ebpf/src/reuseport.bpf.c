// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * Worker selection: an SK_REUSEPORT program on each listener's SO_REUSEPORT group
 * (one listening socket per worker, `[global] workers`). A new connection goes to
 * worker `((source port * 0x9E3779B1) >> 16) % workers`: the same worker for the
 * same port, so a client (or a test) that picks its source port picks its worker,
 * and even over ports of one parity (Linux's connect() prefers even ephemeral
 * ports, bind() odd ones: a plain `port % workers` would send every local client to
 * worker 0 of two). lb-user's `workers::select::worker_for_port` is the same
 * function. When that worker's socket is missing (closed between restarts) the verdict
 * is SK_PASS without a choice, and the kernel falls back to its own hash: a
 * connection is never refused here.
 *
 * A listener with per-source limits (`max_connections_per_source`,
 * `connect_rate_per_source`) loads the program with `by_address` set: the worker
 * then comes from the source address, `((folded address * 0x9E3779B1) >> 16) %
 * workers`, so every connection of one client address meets the same worker and
 * its quota stays whole (with the port, each worker would count a share and the
 * quota would grow N times).
 *
 * For TCP the context's data starts at the TCP header, so its first two bytes are
 * the source port (network order); the addresses are read relative to the network
 * header.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Worker index -> that worker's listening socket (max_entries set at load time). */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} worker_sockets SEC(".maps");

/* Number of workers (set at load time). */
volatile const __u32 workers = 1;

/* Non-zero: choose by source address rather than source port (set at load time). */
volatile const __u32 by_address = 0;

/* The source address folded to 32 bits (IPv4 as it is, IPv6 its four words xored);
 * -1 when it cannot be read. Network byte order: only equality matters. */
static __always_inline __s64 source_address(struct sk_reuseport_md *ctx)
{
	__u32 a[4];

	if (ctx->eth_protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes_relative(ctx, 12, a, 4, BPF_HDR_START_NET) != 0)
			return -1;
		return a[0];
	}
	if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes_relative(ctx, 8, a, 16, BPF_HDR_START_NET) != 0)
			return -1;
		return a[0] ^ a[1] ^ a[2] ^ a[3];
	}
	return -1;
}

SEC("sk_reuseport")
int select_worker(struct sk_reuseport_md *ctx)
{
	__u16 port;
	__u32 key, index;
	__s64 address;

	if (ctx->ip_protocol != IPPROTO_TCP || workers == 0)
		return SK_PASS;
	if (by_address) {
		address = source_address(ctx);
		if (address < 0)
			return SK_PASS;
		key = (__u32)address;
	} else {
		if (bpf_skb_load_bytes(ctx, 0, &port, sizeof(port)) != 0)
			return SK_PASS;
		key = bpf_ntohs(port);
	}
	index = ((key * 0x9E3779B1u) >> 16) % workers;
	/* On failure (no socket at index) the kernel's hash chooses. */
	bpf_sk_select_reuseport(ctx, &worker_sockets, &index, 0);
	return SK_PASS;
}
