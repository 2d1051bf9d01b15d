//! `[ha]`: balancer redundancy with a virtual IP that moves — VRRP version 3 (RFC 5798) for IPv4,
//! built in.
//!
//! Instances with the same `router_id` on one network elect the highest `priority`. The master adds
//! `virtual_ip` to `interface`, announces it with gratuitous ARP and advertises every
//! `advert_interval`; a backup takes over when the adverts stop (3 intervals plus a skew), or after
//! the skew alone when the master leaves cleanly (a priority 0 advert). An instance whose listeners
//! cannot serve (`fault_when`) leaves the election until they can. keepalived peers in the same group
//! interoperate (`vrrp_version 3`).
//!
//! [`vrrp`] is the wire format, [`machine`] the state machine (no I/O, time passed in), [`net`] the
//! host side (raw socket, netlink, ARP); [`run`] drives them on the control thread and publishes a
//! [`Status`] for the admin API, metrics and dashboard. See `docs/ha.md`.

pub mod machine;
pub mod net;
pub mod vrrp;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;

use crate::config::{Config, FaultWhen, HaConfig};
use crate::runtime::Shared;
use machine::{Action, Machine, Params, Role};
use net::{Addresses, Link, VrrpSocket};

/// How many transitions the admin API keeps.
const HISTORY: usize = 20;
/// Gratuitous ARPs sent on taking the address, and again a little later (as keepalived does) for
/// neighbours that missed the first burst.
const GARP_COUNT: usize = 5;
const GARP_REPEAT_AFTER: Duration = Duration::from_secs(2);
/// How often the listeners' ability to serve (and a reloaded `[ha]`) is looked at.
const TRACK_EVERY: Duration = Duration::from_millis(100);

/// One change of role.
#[derive(Debug, Clone, Serialize)]
pub struct Transition {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub from: &'static str,
    pub to: &'static str,
    pub reason: &'static str,
}

/// What the admin API shows of the group.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// `initialize`, `backup`, `master` or `fault`.
    pub state: &'static str,
    pub interface: String,
    pub virtual_ip: String,
    pub router_id: u8,
    pub priority: u8,
    pub advert_interval_ms: u64,
    pub preempt: bool,
    /// This instance's own address on the interface (the advert source).
    pub address: Option<String>,
    /// The master: this instance when master, else the last one heard (absent when none is heard).
    pub master: Option<String>,
    pub master_priority: Option<u8>,
    /// Whether this instance holds the virtual IP now.
    pub holding: bool,
    /// Whether the listeners can serve (`fault_when`).
    pub can_serve: bool,
    /// The last host error (a failed address change, a socket error), if any.
    pub last_error: Option<String>,
    /// The last transitions, oldest first.
    pub transitions: VecDeque<Transition>,
}

/// The group as this instance sees it, shared with the admin side.
#[derive(Debug)]
pub struct Status {
    snapshot: Mutex<Snapshot>,
    /// Adverts sent, received from the group, and dropped as malformed or foreign.
    pub adverts_sent: AtomicU64,
    pub adverts_received: AtomicU64,
    pub adverts_rejected: AtomicU64,
    /// Entries into each role: backup, master, fault.
    pub became_backup: AtomicU64,
    pub became_master: AtomicU64,
    pub became_fault: AtomicU64,
    /// Set when a successor process takes over the sockets: this one then leaves the address as is.
    keep_address: AtomicBool,
}

impl Status {
    fn new(cfg: &HaConfig) -> Status {
        Status {
            snapshot: Mutex::new(Snapshot {
                state: Role::Initialize.as_str(),
                interface: cfg.interface.clone(),
                virtual_ip: cfg.virtual_ip.to_string(),
                router_id: cfg.router_id,
                priority: cfg.priority,
                advert_interval_ms: cfg.advert_interval.as_millis() as u64,
                preempt: cfg.preempt,
                address: None,
                master: None,
                master_priority: None,
                holding: false,
                can_serve: true,
                last_error: None,
                transitions: VecDeque::new(),
            }),
            adverts_sent: AtomicU64::new(0),
            adverts_received: AtomicU64::new(0),
            adverts_rejected: AtomicU64::new(0),
            became_backup: AtomicU64::new(0),
            became_master: AtomicU64::new(0),
            became_fault: AtomicU64::new(0),
            keep_address: AtomicBool::new(false),
        }
    }

    /// The group now.
    pub fn snapshot(&self) -> Snapshot {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.snapshot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current role's name.
    pub fn state(&self) -> &'static str {
        self.lock().state
    }

    /// A successor took over the listening sockets: leave the virtual IP where it is on exit (the
    /// successor starts as master holding it).
    pub fn keep_address_on_exit(&self) {
        self.keep_address.store(true, Ordering::Relaxed);
    }

    fn error(&self, message: String) {
        tracing::error!(error = %message, "ha");
        self.lock().last_error = Some(message);
    }
}

fn params(cfg: &HaConfig) -> Params {
    Params {
        priority: cfg.priority,
        interval: cfg.advert_interval,
        preempt: cfg.preempt,
    }
}

/// Whether the listeners can serve under `rule`: the pools they send traffic to (default pools and
/// routes' pools) have an available server — every one of them, or at least one.
pub fn can_serve(state: &crate::runtime::State, rule: FaultWhen) -> bool {
    let config: &Config = &state.config;
    let mut used: Vec<usize> = Vec::new();
    for l in &config.listeners {
        used.push(l.pool);
        used.extend(l.routes.iter().map(|r| r.pool));
    }
    used.sort_unstable();
    used.dedup();
    let up = |i: &usize| {
        state
            .pools
            .get(*i)
            .is_some_and(|p| p.pool.snapshot().servers.iter().any(|s| s.is_available()))
    };
    match rule {
        FaultWhen::Never => true,
        FaultWhen::EveryPoolDown => used.iter().any(up),
        FaultWhen::AnyPoolDown => used.iter().all(up),
    }
}

/// The host side, opened at startup so that a missing capability or interface stops the start.
#[derive(Debug)]
pub struct Prepared {
    link: Link,
    status: Arc<Status>,
}

impl Prepared {
    /// Checks the interface and the capabilities `[ha]` needs.
    pub fn new(cfg: &HaConfig) -> Result<Prepared, net::HostError> {
        let link = net::check(cfg)?;
        let status = Arc::new(Status::new(cfg));
        status.lock().address = Some(link.primary.to_string());
        Ok(Prepared { link, status })
    }

    /// The status the admin side reads.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }
}

/// The driver: runs the group on the control runtime until the system stops. `inherited`: this
/// process took over from a predecessor (which may hold the address for the group).
pub async fn run(shared: Arc<Shared>, prepared: Prepared, inherited: bool) {
    let Prepared { link, status } = prepared;
    let Some(cfg) = shared.state().config.ha.clone() else {
        return;
    };
    let socket = match VrrpSocket::open(&link) {
        Ok(s) => s,
        Err(e) => return status.error(e.0),
    };
    let addresses = match Addresses::open(&link, cfg.virtual_ip) {
        Ok(a) => a,
        Err(e) => return status.error(e.0),
    };
    let mut driver = Driver {
        machine: Machine::new(params(&cfg), link.primary),
        cfg,
        link,
        status,
        socket,
        addresses,
    };
    driver.main(shared, inherited).await;
}

struct Driver {
    cfg: HaConfig,
    link: Link,
    status: Arc<Status>,
    socket: VrrpSocket,
    addresses: Addresses,
    machine: Machine,
}

impl Driver {
    async fn main(&mut self, shared: Arc<Shared>, inherited: bool) {
        let holding = match self.addresses.present().await {
            Ok(present) => present,
            Err(e) => {
                self.status.error(format!(
                    "ha: cannot read the addresses of {}: {e}",
                    self.link.name
                ));
                false
            }
        };
        let take_over = inherited && holding;
        if holding && !take_over {
            // Left by a predecessor that was killed: a backup must not answer for the address.
            tracing::info!(vip = %self.cfg.virtual_ip, "ha: removing a virtual IP left on the interface");
            if let Err(e) = self.addresses.remove().await {
                self.status
                    .error(format!("ha: cannot remove the stale virtual IP: {e}"));
            }
        }
        let actions = self.machine.start(Instant::now(), take_over);
        self.apply(actions).await;
        let stop = shared.stopping();
        let mut track = tokio::time::interval(TRACK_EVERY);
        track.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = vec![0u8; 2048];
        loop {
            let deadline = self.machine.deadline();
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    let keep = self.status.keep_address.load(Ordering::Relaxed);
                    let actions = self.machine.shutdown(keep);
                    self.apply(actions).await;
                    return;
                }
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)).await },
                    if deadline.is_some() =>
                {
                    let actions = self.machine.on_timer(Instant::now());
                    self.apply(actions).await;
                }
                read = self.socket.recv(&mut buf) => match read {
                    Ok(n) => self.received(&buf[..n]).await,
                    Err(e) => {
                        self.status.error(format!("ha: receiving adverts: {e}"));
                        tokio::time::sleep(TRACK_EVERY).await;
                    }
                },
                _ = track.tick() => self.track(&shared).await,
            }
        }
    }

    async fn received(&mut self, packet: &[u8]) {
        match vrrp::decode(packet) {
            Ok(rx) if rx.advert.router_id != self.cfg.router_id => {}
            Ok(rx) if rx.from == self.link.primary => {}
            Ok(rx) => {
                self.status.adverts_received.fetch_add(1, Ordering::Relaxed);
                let a = rx.advert;
                let actions =
                    self.machine
                        .on_advert(Instant::now(), rx.from, a.priority, a.interval);
                if let Some((master, priority)) = self.machine.master() {
                    let mut s = self.status.lock();
                    s.master = Some(master.to_string());
                    s.master_priority = Some(priority);
                }
                self.apply(actions).await;
            }
            Err(e) => {
                let n = self.status.adverts_rejected.fetch_add(1, Ordering::Relaxed);
                if n < 10 || n.is_power_of_two() {
                    tracing::warn!(reason = %e, dropped = n + 1, "ha: dropped a VRRP packet");
                }
            }
        }
    }

    /// Follows the listeners' ability to serve and a reloaded `[ha]`.
    async fn track(&mut self, shared: &Arc<Shared>) {
        let state = shared.state();
        if let Some(new) = &state.config.ha {
            if params(new) != self.machine.params() {
                tracing::info!(priority = new.priority, interval = ?new.advert_interval, preempt = new.preempt, "ha: new settings");
                self.machine.reconfigure(params(new));
                self.cfg.priority = new.priority;
                self.cfg.advert_interval = new.advert_interval;
                self.cfg.preempt = new.preempt;
                let mut s = self.status.lock();
                s.priority = new.priority;
                s.advert_interval_ms = new.advert_interval.as_millis() as u64;
                s.preempt = new.preempt;
            }
            self.cfg.fault_when = new.fault_when;
        }
        let healthy = can_serve(&state, self.cfg.fault_when);
        self.status.lock().can_serve = healthy;
        let actions = self.machine.set_healthy(Instant::now(), healthy);
        self.apply(actions).await;
    }

    async fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Advertise(priority) => {
                    let advert = vrrp::Advert {
                        router_id: self.cfg.router_id,
                        priority,
                        interval: self.machine.params().interval,
                        addresses: vec![self.cfg.virtual_ip.addr()],
                    };
                    match self.socket.send(&advert.encode(self.link.primary)).await {
                        Ok(()) => {
                            self.status.adverts_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => self.status.error(format!("ha: sending an advert: {e}")),
                    }
                }
                Action::TakeAddress => {
                    match self.addresses.add().await {
                        Ok(()) => self.status.lock().holding = true,
                        Err(e) => self.status.error(format!(
                            "ha: cannot add {} to {}: {e}",
                            self.cfg.virtual_ip, self.link.name
                        )),
                    }
                    self.announce();
                }
                Action::ReleaseAddress => {
                    match self.addresses.remove().await {
                        Ok(()) => {}
                        Err(e) => self.status.error(format!(
                            "ha: cannot remove {} from {}: {e}",
                            self.cfg.virtual_ip, self.link.name
                        )),
                    }
                    self.status.lock().holding = false;
                }
                Action::Became(role, reason) => self.became(role, reason),
            }
        }
    }

    /// Gratuitous ARP now and once more a little later, while still master.
    fn announce(&self) {
        let link = self.link.clone();
        let ip = self.cfg.virtual_ip.addr();
        let status = self.status.clone();
        tokio::spawn(async move {
            for round in 0..2 {
                if round > 0 {
                    tokio::time::sleep(GARP_REPEAT_AFTER).await;
                    if status.state() != Role::Master.as_str() {
                        return;
                    }
                }
                let link = link.clone();
                let sent =
                    tokio::task::spawn_blocking(move || net::announce(&link, ip, GARP_COUNT)).await;
                if let Ok(Err(e)) = sent {
                    status.error(format!("ha: gratuitous ARP for {ip}: {e}"));
                }
            }
        });
    }

    fn became(&self, role: Role, reason: &'static str) {
        let counter = match role {
            Role::Backup => Some(&self.status.became_backup),
            Role::Master => Some(&self.status.became_master),
            Role::Fault => Some(&self.status.became_fault),
            Role::Initialize => None,
        };
        if let Some(c) = counter {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let mut s = self.status.lock();
        let from = s.state;
        s.state = role.as_str();
        match role {
            Role::Master => {
                s.master = Some(self.link.primary.to_string());
                s.master_priority = Some(self.machine.params().priority);
            }
            _ => {
                s.master = self.machine.master().map(|(a, _)| a.to_string());
                s.master_priority = self.machine.master().map(|(_, p)| p);
            }
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.transitions.push_back(Transition {
            at_ms,
            from,
            to: role.as_str(),
            reason,
        });
        while s.transitions.len() > HISTORY {
            s.transitions.pop_front();
        }
        drop(s);
        tracing::info!(from, to = role.as_str(), reason, vip = %self.cfg.virtual_ip, "ha: state");
    }
}
