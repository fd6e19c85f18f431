//! The support library of the integration tests (`tests/tests/`), and the MQTT client
//! packets the load generator shares with them:
//!
//! - [`harness`]: the `mqttlb` binary under test ([`Daemon`]), free ports, temporary
//!   directories, waiting, process probes.
//! - [`echo`]: in-test echo server and byte streams, for tests about bytes.
//! - [`mosquitto`]: a real Debian mosquitto per test.
//! - [`pki`]: certificates made with `openssl`.
//! - [`ws_bridge`]: a WebSocket terminator in front of a broker.
//! - [`http`]: a minimal HTTP/1.1 client for the admin API.
//! - [`packets`]: client packets on the project's codec; [`mqttc`] a raw MQTT client,
//!   [`wsc`] a raw WebSocket client.

pub mod echo;
pub mod harness;
pub mod http;
pub mod mosquitto;
pub mod mqttc;
pub mod netns;
pub mod packets;
pub mod pki;
pub mod ws_bridge;
pub mod wsc;

pub use echo::*;
pub use harness::*;
pub use mosquitto::*;
pub use packets::connect_packet;
pub use pki::*;
pub use ws_bridge::*;
