/* Map value layouts, mirrored by lb-common (same order, sizes asserted on both sides). */
#ifndef LB_STRUCTS_H
#define LB_STRUCTS_H

#include <linux/types.h>

/*
 * Per spliced socket (key: its cookie), written by the program after the daemon
 * creates it. bytes/packets: redirected from it to the peer; passed: bytes left in the
 * socket's own queue for the daemon to read (throttled, see `ctrl`).
 */
struct lb_sock {
	__u64 peer_cookie;
	__u64 bytes;
	__u64 packets;
	__u64 checked;      /* `bytes` at the last lag-check event */
	__u64 passed;
	__u64 trimmed;      /* bytes cut from the head of overlapping retransmissions */
	__u32 conn_id;
	__u32 dir;
	__u32 next_seq;     /* TCP sequence number of the next byte not yet verdicted */
	__u32 flags;        /* SOCK_SEQ_KNOWN once next_seq is set; SOCK_TRACK_MQTT... */
	/*
	 * With SOCK_TRACK_MQTT: where the MQTT packets verdicted so far stand (bits 0-31
	 * body bytes left, 32-35 fixed-header bytes seen, 36-63 length decoded so far;
	 * 0 between two packets), as lb-user's mqtt::boundary::Boundary packs it.
	 */
	__u64 mqtt;
	/* SOCK_EVICT_CUT: how many passed bytes come before the cut (the daemon
	 * forwards those and no more). */
	__u64 evict_end;
};
_Static_assert(sizeof(struct lb_sock) == 80, "lb_sock layout");

/* Per spliced connection (key: connection id); written by the daemon only. */
struct lb_conn {
	__u8 client_addr[16];
	__u8 server_addr[16];
	__u64 client_cookie;
	__u64 server_cookie;
	__u64 started_unix;
	__u16 client_port;
	__u16 server_port;
	__u32 server_index;
	__u32 flags;
	__u32 _pad;
};
_Static_assert(sizeof(struct lb_conn) == 72, "lb_conn layout");

struct lb_event {
	__u32 kind;
	__u32 conn_id;
	__u32 dir;
	__u32 _pad;
	__u64 bytes;
};
_Static_assert(sizeof(struct lb_event) == 24, "lb_event layout");

/* Per server (key: backend slot); written by the daemon only (lb_common::BackendInfo). */
struct lb_backend {
	__u8 cluster[32];
	__u8 name[32];
	__u8 addr[16];
	__u16 port;
	__u8 state;
	__u8 flags;
	__u32 weight;
	__u32 active;
	__u32 max_connections;
	__u64 connections;
	__u64 bytes_c2s;
	__u64 bytes_s2c;
	__u64 connect_failures;
	__u64 health_flips;
};
_Static_assert(sizeof(struct lb_backend) == 136, "lb_backend layout");

/* Sticky table key and value (lb_common::StickyKey / StickyValue). */
struct lb_sticky_key {
	__u32 cluster;
	__u8 kind;
	__u8 hashed;
	__u16 len;
	__u8 key[64];
};
_Static_assert(sizeof(struct lb_sticky_key) == 72, "lb_sticky_key layout");

struct lb_sticky_value {
	__u8 server_addr[16];
	__u16 server_port;
	__u16 _pad;
	__u32 server_index;
	__u64 last_used_ms;
	__u64 expires_ms;
};
_Static_assert(sizeof(struct lb_sticky_value) == 40, "lb_sticky_value layout");

#endif
