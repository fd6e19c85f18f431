//! mqttlb: a load balancer for MQTT broker clusters.
//!
//! # Layout
//!
//! - [`config`]: the TOML file, parsed once into typed values and checked.
//! - [`mqtt`]: the first-packet codec (CONNECT decoder, CONNACK refusals).
//! - [`proxy_protocol`]: PROXY v1/v2 headers, sent to servers (with TLS TLVs) and
//!   read from a load balancer in front.
//! - [`balance`]: server pools and selection (round robin, least connections, random
//!   two choices, Maglev consistent hashing by client id or address; passive health).
//! - [`sticky`]: the sticky table (pinned BPF LRU map, or memory without BPF).
//! - [`health`]: active health checks.
//! - [`tls`]: TLS termination (rustls configuration, client certificate identity).
//! - [`ws`]: MQTT over WebSocket (the upgrade and the frames before the CONNECT).
//! - [`runtime`]: the state connections share and a reload replaces (clusters with
//!   their live pools, listeners with their resolved cluster and TLS state).
//! - [`conn`]: one client connection's life, from accept to hand-off, a module a step.
//! - [`limits`]: what protects the process itself: the pre-CONNECT memory budget, the
//!   descriptor limit behind `max_connections`, local resource errors.
//! - [`dataplane`]: what carries bytes after the hand-off: [`dataplane::sockmap`]
//!   (in-kernel splice) and [`dataplane::copy`] (userspace), behind one trait,
//!   [`dataplane::auto`] (copy first, promoted to the splice), and
//!   [`dataplane::stream`] (the userspace relay for TLS clients).
//! - [`bpf`]: loading the eBPF program, the pinned maps, and reading them back.
//! - [`registry`]: every connection held, whatever carries it (`ctl conns`), served
//!   on the control socket by [`control`]. [`addr`]: addresses as stored and shown.
//! - [`admin`]: the admin HTTP listener (stats page, Prometheus metrics, health
//!   endpoints, JSON API with runtime changes to servers); [`views`]: what it and the
//!   control socket show.
//! - [`stats`]: daemon counters. [`ctl`]: `mqttlb ctl`. [`daemon`]: `mqttlb run`.
//! - [`sys`]: the socket syscalls std and tokio do not wrap.
//! - [`upgrade`]: hot binary upgrade (`mqttlb upgrade`, SIGUSR2): listeners and
//!   connections handed to a new process.
//! - [`workers`]: `[global] workers`: the supervisor, the worker selection program,
//!   and what workers tell each other.

pub mod addr;
pub mod admin;
pub mod admission;
pub mod balance;
pub mod bpf;
pub mod config;
pub mod conn;
pub mod control;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod evacuate;
pub mod guard;
pub mod health;
pub mod limits;
pub mod mqtt;
pub mod privilege;
pub mod proxy_protocol;
pub mod registry;
pub mod runtime;
pub mod stats;
pub mod sticky;
pub mod sys;
pub mod tls;
pub mod upgrade;
pub mod views;
pub mod workers;
pub mod ws;
