//! The network layer below the services: TLS material ([`tls`]), the
//! development CA and certificates ([`certs`]), and the outbound HTTPS
//! client ([`client`]) that terminals' tools, the demo, the tests and
//! settlement's sends use. It knows nothing of the gateway's state.

pub mod certs;
pub mod client;
pub mod tls;
