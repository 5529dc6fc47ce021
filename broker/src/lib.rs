//! jetmq-broker: a stateless MQTT 3.1.1 / 5.0 front node over NATS JetStream.
//!
//! Where to look:
//! - the life of a node is [`server`]: `main` calls [`server::run`], which builds the
//!   [`node`] and starts its background tasks ([`server::start`]), then opens the listeners
//!   and shuts down gracefully ([`server::serve`]);
//! - a packet enters in [`client`] (per connection: handshake, the loop, QoS flows),
//!   framed by [`connection`] and decoded by `jetmq-codec`; a connection works through a
//!   [`node::ConnContext`], never the whole [`node::Node`];
//! - the [`node`] holds what is shared: the NATS connection ([`cluster`]), the registry of
//!   live connections (kicks, hand-overs), the context given to connections;
//! - wills are published by [`will`] (for connections, delayed-will timers and the
//!   [`janitor`], which also settles the sessions of dead nodes);
//! - a session lives in [`session`] (records in a JetStream KV bucket, compare-and-set);
//! - a message enters JetStream in [`ingress`] and leaves towards subscribers in
//!   [`routing`] (one ordered read of the stream per node, a subscription trie, replays);
//! - retained messages in [`retained`], authorization in [`auth`], limits and settings in
//!   [`config`];
//! - TLS, WebSocket and connection limits in [`transport`], authentication in [`authn`];
//! - NATS host name resolution in [`dns`], node-local `$SYS/broker/...` in [`sys_topics`].
//!
//! Imports go one way, and no two files import each other or round a circle (checked with a
//! script while restructuring, #17): `main` → [`server`] → [`client`] / [`janitor`] →
//! [`will`] → [`sys_topics`] → [`node`] → [`ingress`] → [`session`] → [`routing`] →
//! [`transport`]. Only a directory module's own files refer back to their `mod.rs`
//! (`super::`), for the type whose methods they split up. Two references still point up a
//! layer without closing a circle between files: `routing::shared` reads session records,
//! and [`config`] holds `transport::tls`'s settings.

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
pub mod node;
pub mod retained;
pub mod routing;
pub mod server;
pub mod session;
pub mod sys_topics;
pub mod telemetry;
pub mod topic;
pub mod transport;
pub mod will;
