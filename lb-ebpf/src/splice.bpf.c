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
 * - redirected bytes stop counting against the source's receive buffer, so the peer's
 *   queue can grow without bound. The program reports every `lag_check_step` bytes;
 *   the daemon throttles a direction whose peer does not read by setting
 *   CTRL_THROTTLE in `ctrl`, and from then on its skbs are passed: they stay in the
 *   source socket's own queue, charged to its receive buffer, so TCP flow control
 *   holds the sender back. (Taking the socket out of `sources` instead loses the skb
 *   the kernel is verdicting at that moment: with no program it is dropped although
 *   TCP acknowledged it.)
 * - resuming cannot just clear the bit: passed bytes the daemon has not forwarded yet
 *   would be overtaken by redirected ones. So the program keeps passing until the
 *   daemon reports (low bits of `ctrl`) that it forwarded exactly as many bytes as
 *   were passed; the verdict runs under the socket lock, one skb at a time, so the
 *   switch back happens between two skbs.
 */
#include "lb_helpers.h"

/* Bytes redirected per direction between two lag-check events (set at load time). */
volatile const __u64 lag_check_step = 1 << 20;

/* Whether this socket's bytes must go to the daemon rather than to the peer. */
static __always_inline int throttled(__u64 cookie, const struct lb_sock *s)
{
	__u64 *word = bpf_map_lookup_elem(&ctrl, &cookie);
	__u64 w;

	if (!word)
		return 0;
	w = *(volatile __u64 *)word;
	return (w & CTRL_THROTTLE) || (w & ~CTRL_THROTTLE) != s->passed;
}

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

	if (throttled(cookie, s)) {
		__sync_fetch_and_add(&s->passed, skb->len);
		stat_inc(STAT_PASSED);
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
