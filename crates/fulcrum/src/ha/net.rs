//! What VRRP needs from the host: the interface, a raw socket for protocol 112, the virtual IP added
//! and removed through netlink (`rtnetlink`), and gratuitous ARP through an `AF_PACKET` socket
//! (`pnet_datalink`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use futures_util::TryStreamExt;
use socket2::{Domain, Protocol, Socket, Type};

use super::vrrp;
use crate::config::HaConfig;

/// The interface the group lives on.
#[derive(Debug, Clone)]
pub struct Link {
    /// Its name (`eth0`).
    pub name: String,
    /// Its index.
    pub index: u32,
    /// Its hardware address (gratuitous ARP comes from it).
    pub mac: [u8; 6],
    /// Its primary IPv4 address: the source of adverts, and the tie-breaker between equal priorities.
    pub primary: Ipv4Addr,
}

/// Why `[ha]` cannot run here; the message says what to fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostError(pub String);

fn needs_capability(what: &str, cap: &str, e: &io::Error) -> HostError {
    if e.kind() == io::ErrorKind::PermissionDenied {
        HostError(format!(
            "ha: cannot {what}: {e}; VRRP needs CAP_NET_RAW and CAP_NET_ADMIN (run as root, or \
             `setcap cap_net_raw,cap_net_admin+ep` on the binary, or AmbientCapabilities= in systemd) \
             — missing: {cap}"
        ))
    } else {
        HostError(format!("ha: cannot {what}: {e}"))
    }
}

impl Link {
    /// Looks up `ha.interface`: it must exist, have a hardware address and an IPv4 address other than
    /// the virtual IP.
    pub fn find(cfg: &HaConfig) -> Result<Link, HostError> {
        let all = pnet_datalink::interfaces();
        let Some(iface) = all.iter().find(|i| i.name == cfg.interface) else {
            let names: Vec<_> = all.iter().map(|i| i.name.as_str()).collect();
            return Err(HostError(format!(
                "ha.interface: no interface {:?} here (there are: {})",
                cfg.interface,
                names.join(", ")
            )));
        };
        let mac = iface
            .mac
            .map(|m| m.octets())
            .filter(|m| m != &[0; 6])
            .ok_or_else(|| {
                HostError(format!(
                    "ha.interface: {:?} has no hardware address (VRRP needs an Ethernet link)",
                    cfg.interface
                ))
            })?;
        let vip = cfg.virtual_ip.addr();
        let primary = iface
            .ips
            .iter()
            .filter_map(|n| match n.ip() {
                IpAddr::V4(a) if a != vip => Some(a),
                _ => None,
            })
            .next()
            .ok_or_else(|| {
                HostError(format!(
                    "ha.interface: {:?} has no IPv4 address of its own (adverts are sent from it)",
                    cfg.interface
                ))
            })?;
        Ok(Link {
            name: iface.name.clone(),
            index: iface.index,
            mac,
            primary,
        })
    }
}

/// The raw socket adverts go out of and come in on. Driven as a tokio `UdpSocket`: `recv` and
/// `sendto` mean the same on a raw socket (a read is one whole IP packet, header included).
#[derive(Debug)]
pub struct VrrpSocket {
    socket: tokio::net::UdpSocket,
}

impl VrrpSocket {
    /// Opens it on `link`, joined to 224.0.0.18, TTL 255, precedence as keepalived sends (CS6).
    /// Call inside a tokio runtime.
    pub fn open(link: &Link) -> Result<VrrpSocket, HostError> {
        let socket = VrrpSocket::raw(link)
            .map_err(|e| needs_capability("open a raw socket for VRRP", "CAP_NET_RAW", &e))?;
        let socket = tokio::net::UdpSocket::from_std(socket.into())
            .map_err(|e| HostError(format!("ha: {e}")))?;
        Ok(VrrpSocket { socket })
    }

    /// The socket, set up but not registered with the runtime (to check at startup that it can be).
    pub fn raw(link: &Link) -> io::Result<Socket> {
        let s = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(i32::from(vrrp::PROTOCOL))),
        )?;
        s.bind_device(Some(link.name.as_bytes()))?;
        s.set_multicast_if_v4(&link.primary)?;
        s.set_multicast_ttl_v4(u32::from(vrrp::TTL))?;
        s.set_multicast_loop_v4(false)?;
        s.set_tos_v4(0xc0)?;
        s.join_multicast_v4(&vrrp::GROUP, &link.primary)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }

    /// Sends one advert to the group.
    pub async fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let to = std::net::SocketAddr::V4(SocketAddrV4::new(vrrp::GROUP, 0));
        self.socket.send_to(bytes, to).await.map(|_| ())
    }

    /// Receives one packet (IP header included) into `buf`; returns its length.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.socket.recv(buf).await
    }
}

/// Adds and removes the virtual IP through netlink.
#[derive(Debug, Clone)]
pub struct Addresses {
    handle: rtnetlink::Handle,
    index: u32,
    net: ipnet::Ipv4Net,
}

impl Addresses {
    /// A netlink connection, driven by a task on the current runtime.
    pub fn open(link: &Link, net: ipnet::Ipv4Net) -> Result<Addresses, HostError> {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| needs_capability("open a netlink socket", "CAP_NET_ADMIN", &e))?;
        tokio::spawn(connection);
        Ok(Addresses {
            handle,
            index: link.index,
            net,
        })
    }

    /// Whether the interface holds the virtual IP now.
    pub async fn present(&self) -> io::Result<bool> {
        Ok(!self.find().await?.is_empty())
    }

    async fn find(&self) -> io::Result<Vec<rtnetlink::packet_route::address::AddressMessage>> {
        let mut found = Vec::new();
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(IpAddr::V4(self.net.addr()))
            .execute();
        while let Some(msg) = stream.try_next().await.map_err(netlink_error)? {
            found.push(msg);
        }
        Ok(found)
    }

    /// Adds the virtual IP (already there: fine).
    pub async fn add(&self) -> io::Result<()> {
        self.handle
            .address()
            .add(
                self.index,
                IpAddr::V4(self.net.addr()),
                self.net.prefix_len(),
            )
            .replace()
            .execute()
            .await
            .map_err(netlink_error)
    }

    /// Removes the virtual IP (absent: fine).
    pub async fn remove(&self) -> io::Result<()> {
        for msg in self.find().await? {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(netlink_error)?;
        }
        Ok(())
    }
}

fn netlink_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// Sends `count` gratuitous ARPs for `ip` on `link` (blocking; a few microseconds each).
pub fn announce(link: &Link, ip: Ipv4Addr, count: usize) -> io::Result<()> {
    let all = pnet_datalink::interfaces();
    let iface = all
        .into_iter()
        .find(|i| i.index == link.index)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "interface gone"))?;
    let config = pnet_datalink::Config {
        promiscuous: false,
        write_timeout: Some(Duration::from_millis(100)),
        read_timeout: Some(Duration::from_millis(1)),
        ..Default::default()
    };
    let mut tx = match pnet_datalink::channel(&iface, config)? {
        pnet_datalink::Channel::Ethernet(tx, _rx) => tx,
        _ => return Err(io::Error::other("not an Ethernet channel")),
    };
    let frame = vrrp::gratuitous_arp(link.mac, ip);
    for _ in 0..count {
        tx.send_to(&frame, None)
            .unwrap_or_else(|| Err(io::Error::other("no send")))?;
    }
    Ok(())
}

/// Checks at startup that this process may do what VRRP needs, so that a missing capability is an
/// error at start rather than a silent backup that can never take over.
pub fn check(cfg: &HaConfig) -> Result<Link, HostError> {
    let link = Link::find(cfg)?;
    VrrpSocket::raw(&link)
        .map_err(|e| needs_capability("open a raw socket for VRRP", "CAP_NET_RAW", &e))?;
    let iface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.index == link.index);
    if let Some(iface) = iface {
        let config = pnet_datalink::Config {
            promiscuous: false,
            ..Default::default()
        };
        pnet_datalink::channel(&iface, config).map_err(|e| {
            needs_capability("open a packet socket for gratuitous ARP", "CAP_NET_RAW", &e)
        })?;
    }
    Ok(link)
}
