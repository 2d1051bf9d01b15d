//! L4 balancing: TCP listeners (byte streams, optionally routed by a TLS ClientHello's server name,
//! with the PROXY protocol either way) and UDP listeners (datagram flows).

pub mod proxy_protocol;
mod relay;
pub mod sni;
pub mod tcp;
pub mod udp;
