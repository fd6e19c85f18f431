// SPDX-License-Identifier: GPL-2.0 OR MIT
/*
 * The in-kernel splice: a stream verdict on the `sources` SOCKHASH that sends every
 * skb received on a spliced socket out of its peer socket (looked up in `targets`).
 *
 * Kernel behaviours this relies on (measured, see docs/ARCHITECTURE.md):
 * - a FIN arrives as a zero-length skb. Redirecting it breaks the peer's transmit
 *   path. Passing it is not safe either: when skbs redirected *to* this socket are
 *   still queued on its psock, the passed skb joins that queue and the 0-byte
 *   "transmit" sets EPIPE on the socket. So it is dropped: TCP has already marked the
 *   receive side shut, userspace sees recv() == 0 and propagates the half-close;
 * - redirected bytes stop counting against the source's receive buffer, so the
 *   program reports every `lag_check_step` bytes and the daemon throttles a direction
 *   whose peer does not read by taking the source out of `sources`.
 */
#include "lb_helpers.h"

/* Bytes redirected per direction between two lag-check events (set at load time). */
volatile const __u64 lag_check_step = 1 << 20;

SEC("sk_skb/stream_verdict")
int mqttlb_verdict(struct __sk_buff *skb)
{
	__u64 cookie, peer, total;
	struct lb_sock *s;
	long verdict;

	if (skb->len == 0) {
		stat_inc(STAT_FIN_DROPPED);
		return SK_DROP;
	}

	cookie = bpf_get_socket_cookie(skb);
	s = bpf_map_lookup_elem(&socks, &cookie);
	if (!s) {
		stat_inc(STAT_UNKNOWN_SOCKET);
		return SK_PASS;
	}

	peer = s->peer_cookie;
	verdict = bpf_sk_redirect_hash(skb, &targets, &peer, 0);
	if (verdict != SK_PASS) {
		stat_inc(STAT_PEER_GONE);
		emit(EVENT_PEER_GONE, s, s->bytes);
		return SK_DROP;
	}

	total = __sync_add_and_fetch(&s->bytes, skb->len);
	__sync_fetch_and_add(&s->packets, 1);
	if (total - s->checked >= lag_check_step) {
		s->checked = total;
		stat_inc(STAT_LAG_EVENT);
		emit(EVENT_LAG_CHECK, s, total);
	}
	stat_inc(STAT_REDIRECTED);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
