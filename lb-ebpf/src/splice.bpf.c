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
 *   receive side shut, userspace sees recv() == 0 and propagates the half-close. The
 *   daemon does not watch a spliced socket's readability (that woke it for every skb):
 *   the program reports the FIN (a zero-length skb, or data carrying it) as an event;
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
 * - a retransmission that partly overlaps bytes already received is queued whole
 *   (tcp_data_queue does not trim it; recvmsg skips the overlap using copied_seq),
 *   and tcp_read_skb, which feeds this program, hands it over whole: redirected or
 *   passed as is, its overlapping head would arrive twice. On the loopback under a
 *   slow reader this happens when the sender collapses two skbs into one
 *   retransmission (one skb of ~64 KiB duplicated, a few times per GiB). So the
 *   program keeps the sequence number of the next new byte per socket (seeded from
 *   copied_seq at the first verdict, when it is exact), reads each skb's own sequence
 *   number from its TCP control block, cuts the overlap from the head
 *   (bpf_skb_adjust_room, at most 4095 bytes per call) and drops an skb with nothing
 *   new. If the cut fails the stream cannot be carried exactly: the daemon is told to
 *   reset the connection.
 */
#include "lb_helpers.h"

/* Bytes redirected per direction between two lag-check events (set at load time). */
volatile const __u64 lag_check_step = 1 << 20;

/*
 * The kernel structures read here, reduced to the fields used; CO-RE relocations
 * give the real offsets at load time (the ___lb suffix is a CO-RE flavour).
 */
struct sk_buff___lb {
	char cb[48];
} __attribute__((preserve_access_index));

struct tcp_sock___lb {
	__u32 copied_seq;
} __attribute__((preserve_access_index));

#define LB_STR_(x) #x
#define LB_STR(x) LB_STR_(x)

/* Most bytes one bpf_skb_adjust_room call may cut from an sk_skb. */
#define ADJUST_MAX 4095
/* Cuts of up to 64 x 4095 bytes: more than a 64 KiB GSO skb. */
#define ADJUST_ROUNDS 64

/*
 * The TCP sequence number at `offset` in the skb's control block: 0 the first byte
 * (seq), 4 the byte after it, counting the FIN, which takes one (end_seq).
 * The kernel skb comes from the kfunc bpf_cast_to_kern_ctx, called with a raw
 * instruction whose immediate the loader patches (see KFUNC_PLACEHOLDER).
 */
static __always_inline __u32 skb_seq(struct __sk_buff *skb, int offset)
{
	struct sk_buff___lb *kskb;

	asm volatile("r1 = %[ctx]\n\t"
		     /* call bpf_cast_to_kern_ctx: code 0x85, src_reg 2 (kfunc), off 0 */
		     ".long 0x00002085\n\t"
		     ".long " LB_STR(KFUNC_PLACEHOLDER) "\n\t"
		     "%[kskb] = r0\n\t"
		     : [kskb] "=r"(kskb)
		     : [ctx] "r"(skb)
		     : "r0", "r1", "r2", "r3", "r4", "r5");
	return *(__u32 *)&kskb->cb[offset];
}

/* Cuts `n` bytes from the head of the skb; 0 on success. */
static __always_inline int cut_head(struct __sk_buff *skb, __u32 n)
{
	for (int i = 0; i < ADJUST_ROUNDS && n > 0; i++) {
		__u32 step = n > ADJUST_MAX ? ADJUST_MAX : n;

		if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0))
			return -1;
		n -= step;
	}
	return n > 0 ? -1 : 0;
}

/*
 * Removes what this socket already delivered from the head of the skb. Returns 1 to
 * go on with the (possibly shortened) skb, 0 when it holds nothing new, -1 when the
 * overlap could not be cut.
 */
static __always_inline int only_new_bytes(struct __sk_buff *skb, struct lb_sock *s)
{
	__u32 seq = skb_seq(skb, 0), end = seq + skb->len, overlap;

	if (!(s->flags & SOCK_SEQ_KNOWN)) {
		struct bpf_sock *sk = skb->sk;
		struct tcp_sock___lb *tp;

		if (!sk)
			return -1;
		tp = (struct tcp_sock___lb *)bpf_skc_to_tcp_sock(sk);
		if (!tp)
			return -1;
		/* Nothing verdicted yet: copied_seq is what userspace has read. */
		s->next_seq = tp->copied_seq;
		s->flags |= SOCK_SEQ_KNOWN;
	}
	if ((__s32)(end - s->next_seq) <= 0) {
		stat_inc(STAT_DUPLICATE_DROPPED);
		return 0;
	}
	overlap = s->next_seq - seq;
	if ((__s32)overlap > 0) {
		if (cut_head(skb, overlap))
			return -1;
		s->trimmed += overlap;
		stat_inc(STAT_OVERLAP_TRIMMED);
	}
	s->next_seq = end;
	return 1;
}

/*
 * Whether this socket's bytes must go to the daemon rather than to the peer: 0 no,
 * 1 throttled (the daemon reads when the peer catches up), 2 catching up (the daemon
 * has not yet forwarded every passed byte and must be told to read again).
 */
static __always_inline int throttled(__u64 cookie, const struct lb_sock *s)
{
	__u64 *word = bpf_map_lookup_elem(&ctrl, &cookie);
	__u64 w;

	if (!word)
		return 0;
	w = *(volatile __u64 *)word;
	if (w & CTRL_THROTTLE)
		return 1;
	return (w & ~CTRL_THROTTLE) != s->passed ? 2 : 0;
}

SEC("sk_skb/stream_verdict")
int mqttlb_verdict(struct __sk_buff *skb)
{
	__u64 cookie, peer, total;
	struct lb_sock *s;
	long verdict;
	int mode;

	cookie = bpf_get_socket_cookie(skb);
	s = bpf_map_lookup_elem(&socks, &cookie);
	if (skb->len == 0) {
		stat_inc(STAT_FIN_DROPPED);
		if (s)
			emit(EVENT_FIN, s, s->bytes);
		return SK_DROP;
	}
	if (!s) {
		stat_inc(STAT_UNKNOWN_SOCKET);
		return SK_PASS;
	}

	switch (only_new_bytes(skb, s)) {
	case 0:
		return SK_DROP;
	case -1:
		stat_inc(STAT_STREAM_BROKEN);
		emit(EVENT_STREAM_BROKEN, s, s->bytes);
		return SK_DROP;
	}
	/* Data carrying the FIN: it takes one sequence number past the data's end. */
	if (skb_seq(skb, 4) != s->next_seq)
		emit(EVENT_FIN, s, s->bytes);

	mode = throttled(cookie, s);
	if (mode) {
		__sync_fetch_and_add(&s->passed, skb->len);
		stat_inc(STAT_PASSED);
		if (mode == 2)
			emit(EVENT_PASSED, s, s->passed);
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
