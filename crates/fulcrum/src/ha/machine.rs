//! The VRRP v3 state machine (RFC 5798 §6.4), without I/O: events in, actions out, time passed in.
//!
//! Beside the RFC's Initialize, Backup and Master it has Fault (as keepalived does for a failed
//! tracked check): an instance whose listeners cannot serve leaves the election, releasing the address
//! with a priority 0 advert if it held it, and comes back as Backup when it can serve again.

use std::net::Ipv4Addr;
use std::time::Duration;

use tokio::time::Instant;

/// Where an instance stands in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not started, or stopped.
    Initialize,
    /// Watching the master's adverts, ready to take over.
    Backup,
    /// Holding the virtual IP and announcing it.
    Master,
    /// Out of the election: its listeners cannot serve.
    Fault,
}

impl Role {
    /// The name in the admin API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Initialize => "initialize",
            Role::Backup => "backup",
            Role::Master => "master",
            Role::Fault => "fault",
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advert with this priority (0: leaving).
    Advertise(u8),
    /// Add the virtual IP to the interface and announce it with gratuitous ARP.
    TakeAddress,
    /// Remove the virtual IP from the interface.
    ReleaseAddress,
    /// The role changed, and why (for the log, the API and the metrics).
    Became(Role, &'static str),
}

/// The settings that may change while the machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// 1-254 (255, the address owner, is not offered: fulcrum never owns the address).
    pub priority: u8,
    /// How often a master advertises.
    pub interval: Duration,
    /// Whether a higher priority takes the address from a lower one.
    pub preempt: bool,
}

/// One instance's state machine.
#[derive(Debug)]
pub struct Machine {
    params: Params,
    /// This instance's primary address (ties between equal priorities go to the higher address).
    local: Ipv4Addr,
    role: Role,
    /// The interval the current master advertises with (Backup adopts it, §6.4.2).
    master_interval: Duration,
    /// When the next timer fires: Master_Down_Timer in Backup, Adver_Timer in Master.
    deadline: Option<Instant>,
    /// The master as last heard from (its address and priority), while Backup.
    master: Option<(Ipv4Addr, u8)>,
}

impl Machine {
    /// A machine in Initialize.
    pub fn new(params: Params, local: Ipv4Addr) -> Machine {
        Machine {
            params,
            local,
            role: Role::Initialize,
            master_interval: params.interval,
            deadline: None,
            master: None,
        }
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// When [`Machine::on_timer`] is due, if a timer runs.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The master as last heard from while Backup: its address and priority.
    pub fn master(&self) -> Option<(Ipv4Addr, u8)> {
        self.master
    }

    /// The current settings.
    pub fn params(&self) -> Params {
        self.params
    }

    /// Skew_Time: lower priorities wait longer, so the highest backup wins the race to take over.
    fn skew(&self) -> Duration {
        self.master_interval * (256 - u32::from(self.params.priority)) / 256
    }

    /// Master_Down_Interval: how long a backup waits without an advert.
    pub fn master_down_interval(&self) -> Duration {
        self.master_interval * 3 + self.skew()
    }

    /// Starts (Initialize → Backup), or as Master at once when `holding` (a successor taking over
    /// from a predecessor that held the address: the group sees no change).
    pub fn start(&mut self, now: Instant, holding: bool) -> Vec<Action> {
        if holding {
            return self.become_master(now, "took over from the previous process");
        }
        self.become_backup(now, "started")
    }

    fn become_backup(&mut self, now: Instant, why: &'static str) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role == Role::Master {
            out.push(Action::ReleaseAddress);
        }
        self.role = Role::Backup;
        self.master_interval = self.params.interval;
        self.deadline = Some(now + self.master_down_interval());
        out.push(Action::Became(Role::Backup, why));
        out
    }

    fn become_master(&mut self, now: Instant, why: &'static str) -> Vec<Action> {
        self.role = Role::Master;
        self.master = None;
        self.deadline = Some(now + self.params.interval);
        vec![
            Action::Advertise(self.params.priority),
            Action::TakeAddress,
            Action::Became(Role::Master, why),
        ]
    }

    /// The deadline passed: a backup takes over, a master advertises.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        match self.deadline {
            Some(d) if d <= now => {}
            _ => return Vec::new(),
        }
        match self.role {
            Role::Backup => self.become_master(now, "no advert from a master"),
            Role::Master => {
                self.deadline = Some(now + self.params.interval);
                vec![Action::Advertise(self.params.priority)]
            }
            Role::Initialize | Role::Fault => {
                self.deadline = None;
                Vec::new()
            }
        }
    }

    /// An advert of our group arrived from `from`.
    pub fn on_advert(
        &mut self,
        now: Instant,
        from: Ipv4Addr,
        priority: u8,
        interval: Duration,
    ) -> Vec<Action> {
        match self.role {
            Role::Backup => {
                if priority == 0 {
                    // The master is leaving: take over after the skew only (§6.4.2).
                    self.master = None;
                    self.deadline = Some(now + self.skew());
                } else if !self.params.preempt || priority >= self.params.priority {
                    self.master_interval = interval;
                    self.master = Some((from, priority));
                    self.deadline = Some(now + self.master_down_interval());
                }
                // Else a lower priority master that we preempt: let the timer run out.
                Vec::new()
            }
            Role::Master => {
                if priority == 0 {
                    // Another master left: re-assert at once so backups do not take over.
                    self.deadline = Some(now + self.params.interval);
                    return vec![Action::Advertise(self.params.priority)];
                }
                let wins = priority > self.params.priority
                    || (priority == self.params.priority
                        && u32::from(from) > u32::from(self.local));
                if wins {
                    let out = self.become_backup(now, "a higher priority master");
                    self.master_interval = interval;
                    self.master = Some((from, priority));
                    self.deadline = Some(now + self.master_down_interval());
                    return out;
                }
                Vec::new()
            }
            Role::Initialize | Role::Fault => Vec::new(),
        }
    }

    /// Whether this instance's listeners can serve. Losing it leaves the election (Fault); getting it
    /// back rejoins as Backup.
    pub fn set_healthy(&mut self, now: Instant, healthy: bool) -> Vec<Action> {
        match (self.role, healthy) {
            (Role::Fault, true) => self.become_backup(now, "listeners can serve again"),
            (Role::Backup | Role::Master, false) => {
                self.leave(Role::Fault, "listeners cannot serve", true)
            }
            _ => Vec::new(),
        }
    }

    /// Leaves the election for `role`: a master that `hands_over` sends a priority 0 advert (so a
    /// backup takes over after its skew only, §6.4.3) and releases the address.
    fn leave(&mut self, role: Role, why: &'static str, hands_over: bool) -> Vec<Action> {
        let mut out = Vec::new();
        if self.role == Role::Master && hands_over {
            out.push(Action::Advertise(0));
            out.push(Action::ReleaseAddress);
        }
        self.role = role;
        self.deadline = None;
        self.master = None;
        out.push(Action::Became(role, why));
        out
    }

    /// New settings (a reload). A master advertises the new priority at its next advert; a backup
    /// whose new priority is above the master's (with preemption) takes over when its timer runs out.
    pub fn reconfigure(&mut self, params: Params) {
        self.params = params;
        if self.role == Role::Master {
            self.master_interval = params.interval;
        }
    }

    /// Leaves the group: a master hands over at once with a priority 0 advert (§6.4.3) unless
    /// `keep_address` (a successor process takes over the address as it is).
    pub fn shutdown(&mut self, keep_address: bool) -> Vec<Action> {
        self.leave(Role::Initialize, "stopping", !keep_address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
    const MS: Duration = Duration::from_millis(1);

    fn params(priority: u8, preempt: bool) -> Params {
        Params {
            priority,
            interval: Duration::from_secs(1),
            preempt,
        }
    }

    fn became(actions: &[Action]) -> Option<Role> {
        actions.iter().find_map(|a| match a {
            Action::Became(r, _) => Some(*r),
            _ => None,
        })
    }

    #[test]
    fn a_lone_backup_takes_over_after_the_master_down_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, true), A);
        assert_eq!(became(&m.start(t0, false)), Some(Role::Backup));
        // 3 × 1 s + (256 − 100) / 256 s = 3.609375 s.
        assert_eq!(m.master_down_interval(), Duration::from_micros(3_609_375));
        assert!(m.on_timer(t0 + Duration::from_secs(3)).is_empty());
        let out = m.on_timer(t0 + Duration::from_micros(3_609_375));
        assert_eq!(
            out[..2],
            [Action::Advertise(100), Action::TakeAddress],
            "{out:?}"
        );
        assert_eq!(m.role(), Role::Master);
        // Then it advertises every interval.
        let next = m.deadline().unwrap();
        assert_eq!(m.on_timer(next), vec![Action::Advertise(100)]);
    }

    #[test]
    fn adverts_keep_a_backup_waiting_and_it_adopts_the_masters_interval() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, true), A);
        m.start(t0, false);
        let fast = Duration::from_millis(200);
        let t1 = t0 + Duration::from_secs(2);
        assert!(m.on_advert(t1, B, 150, fast).is_empty());
        assert_eq!(m.master(), Some((B, 150)));
        // 3 × 200 ms + 156/256 × 200 ms = 721.875 ms.
        assert_eq!(m.deadline(), Some(t1 + Duration::from_micros(721_875)));
        assert!(m.on_timer(t1 + 700 * MS).is_empty());
        assert_eq!(m.role(), Role::Backup);
    }

    #[test]
    fn a_priority_zero_advert_lets_the_backup_take_over_after_the_skew_only() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, true), A);
        m.start(t0, false);
        m.on_advert(t0, B, 150, Duration::from_secs(1));
        m.on_advert(t0 + 500 * MS, B, 0, Duration::from_secs(1));
        // Skew = 156/256 s = 609.375 ms.
        assert_eq!(
            m.deadline(),
            Some(t0 + 500 * MS + Duration::from_micros(609_375))
        );
        let out = m.on_timer(t0 + 500 * MS + Duration::from_micros(609_375));
        assert_eq!(m.role(), Role::Master, "{out:?}");
    }

    #[test]
    fn preemption_decides_whether_a_lower_master_keeps_the_address() {
        let t0 = Instant::now();
        // Preempting: a lower master's adverts are ignored, so the backup takes over.
        let mut m = Machine::new(params(200, true), A);
        m.start(t0, false);
        m.on_advert(t0 + 100 * MS, B, 100, Duration::from_secs(1));
        assert_eq!(m.master(), None);
        let d = m.deadline().unwrap();
        m.on_timer(d);
        assert_eq!(m.role(), Role::Master);
        // Not preempting: any master's advert resets the timer.
        let mut m = Machine::new(params(200, false), A);
        m.start(t0, false);
        m.on_advert(
            t0 + 3 * Duration::from_secs(1),
            B,
            100,
            Duration::from_secs(1),
        );
        m.on_timer(t0 + Duration::from_millis(3_900));
        assert_eq!(m.role(), Role::Backup);
    }

    #[test]
    fn a_master_yields_to_higher_priority_and_ties_go_to_the_higher_address() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(100, true), A);
        m.start(t0, true);
        assert_eq!(m.role(), Role::Master);
        // Lower priority: ignored.
        assert!(m.on_advert(t0, B, 50, Duration::from_secs(1)).is_empty());
        // Equal priority from a lower address: ignored; from a higher one (B > A): yields.
        assert!(m
            .on_advert(t0, Ipv4Addr::new(10, 0, 0, 5), 100, Duration::from_secs(1))
            .is_empty());
        let out = m.on_advert(t0, B, 100, Duration::from_secs(1));
        assert_eq!(out[0], Action::ReleaseAddress);
        assert_eq!(became(&out), Some(Role::Backup));
        assert_eq!(m.master(), Some((B, 100)));
        // A master that hears a priority 0 advert re-asserts at once.
        let mut m = Machine::new(params(100, true), A);
        m.start(t0, true);
        assert_eq!(
            m.on_advert(t0, B, 0, Duration::from_secs(1)),
            vec![Action::Advertise(100)]
        );
    }

    #[test]
    fn fault_releases_the_address_and_recovery_rejoins_as_backup() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(150, true), A);
        m.start(t0, true);
        let out = m.set_healthy(t0, false);
        assert_eq!(
            out[..2],
            [Action::Advertise(0), Action::ReleaseAddress],
            "{out:?}"
        );
        assert_eq!(m.role(), Role::Fault);
        assert_eq!(m.deadline(), None);
        // A faulty instance ignores adverts and timers.
        assert!(m.on_advert(t0, B, 100, Duration::from_secs(1)).is_empty());
        assert!(m.set_healthy(t0, false).is_empty());
        assert_eq!(became(&m.set_healthy(t0, true)), Some(Role::Backup));
    }

    #[test]
    fn shutdown_hands_over_unless_a_successor_keeps_the_address() {
        let t0 = Instant::now();
        let mut m = Machine::new(params(150, true), A);
        m.start(t0, true);
        let out = m.shutdown(false);
        assert_eq!(out[..2], [Action::Advertise(0), Action::ReleaseAddress]);
        let mut m = Machine::new(params(150, true), A);
        m.start(t0, true);
        let out = m.shutdown(true);
        assert_eq!(out.len(), 1, "{out:?}");
        // A backup leaves quietly.
        let mut m = Machine::new(params(150, true), A);
        m.start(t0, false);
        assert_eq!(m.shutdown(false).len(), 1);
    }
}
