//! MQTT over WebSocket (`ws` and `wss` listeners): the HTTP/1.1 upgrade and the client
//! frames that carry the CONNECT. No I/O here.
//!
//! A client sends its CONNECT only after the `101 Switching Protocols`, and the server
//! is chosen by that CONNECT, so mqttlb answers the upgrade itself (the same
//! `Sec-WebSocket-Accept` and subprotocol the server will answer), reads the frames
//! until they hold a complete CONNECT (masked binary frames, possibly fragmented, the
//! packet possibly split across frames: MQTT-6.0.0-2), validates it, connects to the
//! server's WebSocket address, forwards the client's request (with `X-Forwarded-For`
//! and `X-Real-IP`), checks the server's `101` against its own, and forwards the frames
//! unchanged. For a server without a WebSocket address, mqttlb terminates the
//! WebSocket itself and speaks plain MQTT to the server
//! (`dataplane::stream::ws_terminate`).
//!
//! [`handshake`]: the upgrade request, our `101`, the request forwarded to a server and
//! its answer. [`frames`]: client frames before and after the CONNECT, and the frames
//! mqttlb writes.

pub mod frames;
pub mod handshake;
#[cfg(test)]
mod tests;

pub use frames::*;
pub use handshake::*;
