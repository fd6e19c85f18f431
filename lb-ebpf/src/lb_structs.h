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
	__u32 conn_id;
	__u32 dir;
};
_Static_assert(sizeof(struct lb_sock) == 48, "lb_sock layout");

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

#endif
