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
 *
 * Evacuation: for MQTT 5 pairs the daemon enters the server socket with
 * SOCK_TRACK_MQTT and the program follows where the server's packets end
 * (lb_sock.mqtt). An eviction sets CTRL_EVICT with CTRL_THROTTLE: the skb holding the
 * next boundary is passed with evict_end marking the boundary in the passed bytes,
 * later skbs are dropped, and the daemon writes the DISCONNECT after exactly that
 * many bytes.
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

/* The socket's `ctrl` word (0 when it has none). */
static __always_inline __u64 ctrl_word(__u64 cookie)
{
	__u64 *word = bpf_map_lookup_elem(&ctrl, &cookie);

	return word ? *(volatile __u64 *)word : 0;
}

/*
 * Whether this socket's bytes must go to the daemon rather than to the peer: 0 no,
 * 1 throttled (the daemon reads when the peer catches up), 2 catching up (the daemon
 * has not yet forwarded every passed byte and must be told to read again).
 */
static __always_inline int throttled(__u64 w, const struct lb_sock *s)
{
	if (w & CTRL_THROTTLE)
		return 1;
	return (w & ~CTRL_FLAGS) != s->passed ? 2 : 0;
}

/*
 * MQTT packet boundaries (evacuation): a spliced MQTT 5 connection is ended with a
 * DISCONNECT the daemon writes between two of the server's packets, so the program
 * follows where the server's packets end, reading only fixed headers (a body is
 * skipped by its length), in `lb_sock.mqtt` (layout in lb_structs.h).
 */
#define MQTT_MAX_HEADER 5
#define MQTT_BROKEN ((__u64)(MQTT_MAX_HEADER + 1) << 32)
#define NO_BOUNDARY 0xffffffffu
/* Loop rounds per skb: one per fixed-header byte or body, so more than any skb needs. */
#define TRACK_ROUNDS (1 << 20)

struct track {
	struct __sk_buff *skb;
	__u64 state;
	__u32 pos;
	__u32 len;
	__u32 stop;     /* stop at the first boundary (an eviction cuts there) */
	__u32 boundary; /* offset of the first boundary reached, or NO_BOUNDARY */
};

/* One step: a body skipped, or one fixed-header byte read (bpf_loop callback). */
static long track_step(__u64 index, void *data)
{
	struct track *t = data;
	__u64 st = t->state, left = st & 0xffffffff, header = (st >> 32) & 0xf;
	__u64 length = st >> 36;
	__u8 b;

	if (t->pos >= t->len || header > MQTT_MAX_HEADER)
		return 1;
	if (left > 0) {
		__u64 take = t->len - t->pos;

		if (take > left)
			take = left;
		t->pos += take;
		st = left - take;
	} else {
		if (bpf_skb_load_bytes(t->skb, t->pos, &b, 1)) {
			t->state = MQTT_BROKEN;
			return 1;
		}
		t->pos++;
		if (header == 0)
			st = 1ULL << 32; /* the type byte */
		else {
			length |= (__u64)(b & 0x7f) << (7 * (header - 1));
			if (!(b & 0x80))
				st = length; /* the body follows */
			else if (header + 1 == MQTT_MAX_HEADER)
				st = MQTT_BROKEN; /* a fifth length byte: not MQTT */
			else
				st = ((header + 1) << 32) | (length << 36);
		}
	}
	t->state = st;
	if (st == 0 && t->boundary == NO_BOUNDARY) {
		t->boundary = t->pos;
		if (t->stop)
			return 1;
	}
	return 0;
}

/*
 * Follows the skb's bytes from the socket's position; returns the offset of the first
 * boundary in it (0: it starts at one) or NO_BOUNDARY, and in `next` the position
 * after the whole skb (not meaningful when `stop` found a boundary).
 */
static __always_inline __u32 follow_mqtt(struct __sk_buff *skb, const struct lb_sock *s,
					  int stop, __u64 *next)
{
	struct track t = {
		.skb = skb,
		.state = s->mqtt,
		.len = skb->len,
		.stop = stop,
		.boundary = s->mqtt == 0 ? 0 : NO_BOUNDARY,
	};

	if (stop && t.boundary == 0) {
		*next = 0;
		return 0;
	}
	bpf_loop(TRACK_ROUNDS, track_step, &t, 0);
	if (t.pos < t.len && !(stop && t.boundary != NO_BOUNDARY))
		t.state = MQTT_BROKEN;
	*next = t.state;
	return t.boundary;
}

/* The position after an skb, stored in one 8-byte write. */
static __always_inline void next_position(struct lb_sock *s, __u64 next)
{
	*(volatile __u64 *)&s->mqtt = next;
}

SEC("sk_skb/stream_verdict")
int mqttlb_verdict(struct __sk_buff *skb)
{
	__u64 cookie, peer, total, w, next = 0;
	__u32 cut = NO_BOUNDARY;
	struct lb_sock *s;
	long verdict;
	int mode, track, evict, cutting;

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
	/* Past an eviction's cut nothing more reaches the client. */
	if (s->flags & SOCK_EVICT_CUT)
		return SK_DROP;

	w = ctrl_word(cookie);
	track = s->flags & SOCK_TRACK_MQTT;
	/* An eviction is honoured while the daemon forwards the bytes (passing). */
	evict = track && (w & CTRL_EVICT) && (w & CTRL_THROTTLE);
	if (track)
		cut = follow_mqtt(skb, s, evict, &next);

	mode = throttled(w, s);
	if (mode) {
		cutting = evict && cut != NO_BOUNDARY;
		if (cutting) {
			/*
			 * Where the stream ends, then the flag, then `passed`: a daemon
			 * that sees a `passed` count including this skb sees the flag, and
			 * with the flag the end.
			 */
			s->evict_end = s->passed + cut;
			__sync_fetch_and_or(&s->flags, SOCK_EVICT_CUT);
			emit(EVENT_EVICT_CUT, s, s->evict_end);
			if (cut == 0)
				return SK_DROP;
		}
		__sync_fetch_and_add(&s->passed, skb->len);
		/* The position after the count: seen, it comes with the bytes it counts. */
		if (track && !cutting)
			next_position(s, next);
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
	if (track)
		next_position(s, next);
	if (total - s->checked >= lag_check_step) {
		s->checked = total;
		stat_inc(STAT_LAG_EVENT);
		emit(EVENT_LAG_CHECK, s, total);
	}
	stat_inc(STAT_REDIRECTED);
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
