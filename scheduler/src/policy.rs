//! Scheduling policies: which waiting sequence is admitted next, and which running sequence
//! is preempted first when KV blocks run out.
//!
//! A policy is a pair of sort keys over [`Candidate`]s, so the step planner has no special
//! cases for tenants or priorities: it admits the waiting sequence with the smallest
//! [`Policy::admit_key`] and preempts the running one with the largest
//! [`Policy::victim_key`].
//!
//! Three policies ship:
//!
//! - [`Fcfs`]: first come, first served; preempts the most recently admitted.
//! - [`PriorityFirst`]: higher [`Candidate::priority`] first, then arrival; preempts the
//!   lowest priority, most recently admitted.
//! - [`FairShare`] (**the default**): the tenant with the fewest running sequences goes
//!   first, then priority, then arrival; preempts from the tenant with the most running
//!   sequences. A tenant that bursts 1,000 requests gets the engine while nobody else wants
//!   it, but another tenant's request is admitted as soon as a slot frees, ahead of the burst.
//!   With a single tenant (or none), it behaves as [`PriorityFirst`].

use std::fmt;

/// What a policy may look at to order a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// The tenant the request belongs to; `""` when it named none.
    pub tenant: &'a str,
    /// Larger is more urgent; 0 by default.
    pub priority: i32,
    /// Arrival order (0 = first request the scheduler saw). Preempted sequences keep theirs,
    /// so FCFS resumes them before later arrivals.
    pub arrival: u64,
    /// Order of the sequence's latest admission to the running set (0 while never admitted).
    pub admitted: u64,
    /// Running sequences of this candidate's tenant right now (itself included when running).
    pub tenant_running: usize,
    /// Of those, the ones of its subtenant.
    pub subtenant_running: usize,
}

/// A sort key: compared lexicographically.
pub type SortKey = [i64; 4];

/// Orders waiting sequences for admission and running sequences for preemption.
pub trait Policy: Send + fmt::Debug {
    /// Name, for logs.
    fn name(&self) -> &'static str;
    /// The waiting sequence with the smallest key is admitted next.
    fn admit_key(&self, c: &Candidate<'_>) -> SortKey;
    /// The running sequence with the largest key is preempted first.
    fn victim_key(&self, c: &Candidate<'_>) -> SortKey;
}

/// Which of the shipped policies to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PolicyKind {
    /// [`Fcfs`].
    Fcfs,
    /// [`PriorityFirst`].
    Priority,
    /// [`FairShare`], the default.
    #[default]
    FairShare,
}

impl PolicyKind {
    /// The policy object.
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::Fcfs => Box::new(Fcfs),
            PolicyKind::Priority => Box::new(PriorityFirst),
            PolicyKind::FairShare => Box::new(FairShare),
        }
    }
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fcfs" => Ok(PolicyKind::Fcfs),
            "priority" => Ok(PolicyKind::Priority),
            "fair" | "fair-share" => Ok(PolicyKind::FairShare),
            other => Err(format!(
                "unknown scheduling policy `{other}`: use fcfs, priority or fair-share"
            )),
        }
    }
}

fn clamp(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// First come, first served.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fcfs;

impl Policy for Fcfs {
    fn name(&self) -> &'static str {
        "fcfs"
    }
    fn admit_key(&self, c: &Candidate<'_>) -> SortKey {
        [clamp(c.arrival), 0, 0, 0]
    }
    fn victim_key(&self, c: &Candidate<'_>) -> SortKey {
        [clamp(c.admitted), 0, 0, 0]
    }
}

/// Higher priority first, FCFS among equals.
#[derive(Debug, Clone, Copy, Default)]
pub struct PriorityFirst;

impl Policy for PriorityFirst {
    fn name(&self) -> &'static str {
        "priority"
    }
    fn admit_key(&self, c: &Candidate<'_>) -> SortKey {
        [-i64::from(c.priority), clamp(c.arrival), 0, 0]
    }
    fn victim_key(&self, c: &Candidate<'_>) -> SortKey {
        [-i64::from(c.priority), clamp(c.admitted), 0, 0]
    }
}

/// Fair share between tenants, then between a tenant's subtenants: fewest running
/// sequences first. A subtenant is compared only within its tenant, so subdividing a
/// tenant never enlarges its share.
#[derive(Debug, Clone, Copy, Default)]
pub struct FairShare;

impl Policy for FairShare {
    fn name(&self) -> &'static str {
        "fair-share"
    }
    fn admit_key(&self, c: &Candidate<'_>) -> SortKey {
        [
            clamp(c.tenant_running as u64),
            clamp(c.subtenant_running as u64),
            -i64::from(c.priority),
            clamp(c.arrival),
        ]
    }
    fn victim_key(&self, c: &Candidate<'_>) -> SortKey {
        [
            clamp(c.tenant_running as u64),
            clamp(c.subtenant_running as u64),
            -i64::from(c.priority),
            clamp(c.admitted),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(tenant: &str, priority: i32, arrival: u64, tenant_running: usize) -> Candidate<'_> {
        Candidate {
            tenant,
            priority,
            arrival,
            admitted: arrival,
            tenant_running,
            subtenant_running: 0,
        }
    }

    fn first<'a>(p: &dyn Policy, cs: &'a [Candidate<'a>]) -> &'a str {
        cs.iter()
            .min_by_key(|c| p.admit_key(c))
            .map(|c| c.tenant)
            .unwrap_or("")
    }

    #[test]
    fn fcfs_admits_by_arrival_and_preempts_the_latest() {
        let cs = [cand("a", 0, 5, 0), cand("b", 9, 3, 0), cand("c", 0, 4, 0)];
        assert_eq!(first(&Fcfs, &cs), "b");
        let victim = cs.iter().max_by_key(|c| Fcfs.victim_key(c)).unwrap();
        assert_eq!(victim.tenant, "a");
    }

    #[test]
    fn priority_admits_urgent_first_and_preempts_the_least_urgent() {
        let cs = [
            cand("low", -1, 1, 0),
            cand("high", 5, 9, 0),
            cand("mid", 0, 2, 0),
        ];
        assert_eq!(first(&PriorityFirst, &cs), "high");
        let victim = cs
            .iter()
            .max_by_key(|c| PriorityFirst.victim_key(c))
            .unwrap();
        assert_eq!(victim.tenant, "low");
    }

    #[test]
    fn fair_share_prefers_the_tenant_with_the_fewest_running() {
        let cs = [
            cand("a", 0, 1, 8),
            cand("a", 0, 2, 8),
            cand("b", 0, 1000, 0),
        ];
        assert_eq!(first(&FairShare, &cs), "b");
        let running = [cand("a", 0, 1, 3), cand("b", 0, 2, 1)];
        let victim = running
            .iter()
            .max_by_key(|c| FairShare.victim_key(c))
            .unwrap();
        assert_eq!(victim.tenant, "a");
    }

    #[test]
    fn subtenants_share_their_tenant_s_slots_and_never_enlarge_them() {
        // Tenant a runs 2 (both of subtenant x), tenant b runs 3: a goes first whatever its
        // subtenant, and within a, the subtenant with fewer running goes first.
        let mk = |tenant, arrival, tenant_running, subtenant_running| Candidate {
            tenant,
            priority: 0,
            arrival,
            admitted: arrival,
            tenant_running,
            subtenant_running,
        };
        let cs = [mk("b", 1, 3, 0), mk("a", 2, 2, 2), mk("a", 3, 2, 0)];
        let next = cs.iter().min_by_key(|c| FairShare.admit_key(c)).unwrap();
        assert_eq!((next.tenant, next.arrival), ("a", 3));
        // A fresh subtenant of b (0 of its own running) still waits behind a.
        let cs = [mk("b", 1, 3, 0), mk("a", 2, 2, 2)];
        let next = cs.iter().min_by_key(|c| FairShare.admit_key(c)).unwrap();
        assert_eq!(next.tenant, "a");
    }

    #[test]
    fn policy_names_parse() {
        assert_eq!("fcfs".parse::<PolicyKind>(), Ok(PolicyKind::Fcfs));
        assert_eq!(
            "fair-share".parse::<PolicyKind>(),
            Ok(PolicyKind::FairShare)
        );
        assert!("lifo"
            .parse::<PolicyKind>()
            .unwrap_err()
            .contains("fcfs, priority or fair-share"));
        assert_eq!(PolicyKind::default(), PolicyKind::FairShare);
    }
}
