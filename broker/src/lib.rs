//! jetmq-broker: a stateless MQTT 3.1.1 / 5.0 front node over NATS JetStream.
//!
//! Where to look:
//! - a packet enters in [`client`] (per connection: handshake, the loop, QoS flows),
//!   framed by [`connection`] and decoded by `jetmq-codec`;
//! - a session lives in [`session`] (records in a JetStream KV bucket, compare-and-set);
//! - a message enters JetStream in [`ingress`] and leaves towards subscribers in
//!   [`routing`] (one ordered read of the stream per node, a subscription trie, replays);
//! - retained messages in [`retained`], authorization in [`auth`], limits and settings in
//!   [`config`], start-up, listeners and shutdown in [`server`];
//! - TLS, WebSocket and connection limits in [`transport`], authentication in [`authn`];
//! - NATS host name resolution in [`dns`], node-local `$SYS/broker/...` in [`sys_topics`].

pub mod auth;
pub mod authn;
pub mod check;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod dns;
pub mod ingress;
pub mod janitor;
pub mod retained;
pub mod routing;
pub mod server;
pub mod session;
pub mod sys_topics;
pub mod telemetry;
pub mod topic;
pub mod transport;
