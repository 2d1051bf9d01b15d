//! L3 checks: an ICMP echo request to the server's address (its port is ignored).
//!
//! Sending ICMP needs an unprivileged ping socket (`net.ipv4.ping_group_range` including the process's
//! group) or a raw socket (`CAP_NET_RAW`). [`available`] tells at start-up and in `fulcrum check`, so a
//! missing permission is a clear error rather than every server marked down.

use std::net::IpAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use surge_ping::{Client, Config, PingIdentifier, PingSequence, ICMP};

/// Whether this process may send ICMP echo requests; the error says how to allow it.
pub fn available() -> Result<(), String> {
    let datagram = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::ICMPV4));
    if datagram.is_ok() {
        return Ok(());
    }
    match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "icmp health checks cannot open an ICMP socket ({e}): run fulcrum with CAP_NET_RAW \
             (e.g. `setcap cap_net_raw+ep fulcrum`) or allow unprivileged ping sockets with \
             `sysctl net.ipv4.ping_group_range=\"0 2147483647\"`, or use kind = \"tcp\""
        )),
    }
}

/// ICMP clients, one per address family, created on the runtime that runs the checks.
#[derive(Clone)]
pub struct Pinger {
    v4: Client,
    v6: Option<Client>,
}

impl std::fmt::Debug for Pinger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pinger")
    }
}

impl Pinger {
    /// Opens the ICMP sockets (IPv6 only if the host allows it). Needs a tokio runtime.
    pub fn new() -> Result<Self, String> {
        let v4 = Client::new(&Config::default()).map_err(|e| format!("icmp socket: {e}"))?;
        let v6 = Client::new(&Config::builder().kind(ICMP::V6).build()).ok();
        Ok(Pinger { v4, v6 })
    }

    /// One echo request; `Ok` with the round trip, or why it failed.
    pub async fn ping(
        &self,
        ip: IpAddr,
        ident: u16,
        seq: u16,
        timeout: Duration,
    ) -> Result<String, String> {
        let client = match ip {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => self.v6.as_ref().ok_or("no ICMPv6 socket on this host")?,
        };
        let mut pinger = client.pinger(ip, PingIdentifier(ident)).await;
        pinger.timeout(timeout);
        match pinger
            .ping(PingSequence(seq), b"fulcrum-health-check")
            .await
        {
            Ok((_, rtt)) => Ok(format!(
                "ICMP echo reply in {:.3} ms",
                rtt.as_secs_f64() * 1e3
            )),
            Err(surge_ping::SurgeError::Timeout { .. }) => {
                Err(format!("no ICMP echo reply within {timeout:?}"))
            }
            Err(e) => Err(format!("icmp: {e}")),
        }
    }
}
