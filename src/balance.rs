//! Spreads reads over the nodes that may take them, in proportion to their weights.
//!
//! Every shared counter is an atomic: `pick` neither locks nor allocates, so any number of sessions
//! may call it at once. The counters are hints for spreading load, never for correctness, so
//! relaxed ordering is enough throughout.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::config::{Balance, ReadAffinity};
use crate::topology::NodeId;

/// SplitMix64's increment (2^64 divided by the golden ratio), from Steele, Lea and Flood, "Fast
/// splittable pseudorandom number generators" (OOPSLA 2014).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Spreads reads over candidate nodes by weight.
#[derive(Debug)]
pub struct Balancer {
    /// Picks made so far: the position in the weighted round-robin cycle, which also breaks
    /// least-connections ties.
    turn: AtomicU64,
    /// SplitMix64 state; each draw adds `GOLDEN_GAMMA`, so concurrent draws never share a value.
    random: AtomicU64,
    /// Units of work in flight on each node, indexed by `NodeId`.
    in_flight: Box<[Count]>,
    /// Sessions whose reads stay on each node (see [`ReadHome`]), indexed by `NodeId`.
    read_sessions: Box<[Count]>,
}

/// One node's count, alone on its cache line so that sessions busy on different nodes do not
/// slow each other down by writing to the same line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Count(AtomicU32);

impl Count {
    fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn sub(&self) {
        // An unmatched call must not wrap the count to u32::MAX and starve the node; the
        // closure refuses to go below 0, and that refusal is all the Err means.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn get(&self) -> u64 {
        u64::from(self.0.load(Ordering::Relaxed))
    }
}

/// A session's claim on the node its reads stay on (`routing.read_affinity = "session"`):
/// `least_connections` counts it there until it is dropped.
#[derive(Debug)]
pub struct ReadHome {
    balancer: Arc<Balancer>,
    node: NodeId,
}

impl ReadHome {
    /// The node the session's reads stay on.
    pub fn node(&self) -> NodeId {
        self.node
    }
}

impl Drop for ReadHome {
    fn drop(&mut self) {
        if let Some(count) = self.balancer.read_sessions.get(self.node) {
            count.sub();
        }
    }
}

impl Balancer {
    /// A balancer for `node_count` nodes.
    pub fn new(node_count: usize) -> Balancer {
        Balancer::with_seed(node_count, rand::random())
    }

    /// A balancer whose random picks follow from `seed`.
    fn with_seed(node_count: usize, seed: u64) -> Balancer {
        Balancer {
            turn: AtomicU64::new(0),
            random: AtomicU64::new(seed),
            in_flight: (0..node_count).map(|_| Count::default()).collect(),
            read_sessions: (0..node_count).map(|_| Count::default()).collect(),
        }
    }

    /// Picks one of `candidates` (node id, weight > 0) by `mode`; None when the slice is empty or
    /// all weights are 0. `least_connections` counts the units in flight on each node, or under
    /// session `affinity` the sessions whose reads stay there (the pick places a session, and
    /// its units in flight at that moment say little about the sessions already placed).
    pub fn pick(
        &self,
        candidates: &[(NodeId, u32)],
        mode: Balance,
        affinity: ReadAffinity,
    ) -> Option<NodeId> {
        let total: u64 = candidates.iter().map(|&(_, w)| u64::from(w)).sum();
        if total == 0 {
            return None;
        }
        let index = match mode {
            Balance::RoundRobin => weighted_turn(candidates, self.next_turn(total)),
            Balance::Random => nth_slot(candidates, self.next_random(total)),
            Balance::LeastConnections => {
                let counts = match affinity {
                    ReadAffinity::Unit => &self.in_flight,
                    ReadAffinity::Session => &self.read_sessions,
                };
                weighted_turn(candidates, self.next_turn(total))
                    .map(|first| least_loaded(counts, candidates, first))
            }
        };
        index.and_then(|i| candidates.get(i)).map(|&(node, _)| node)
    }

    /// A unit of work started on `node` (counts for least_connections).
    pub fn started(&self, node: NodeId) {
        if let Some(count) = self.in_flight.get(node) {
            count.add();
        }
    }

    /// A unit of work on `node` ended.
    pub fn finished(&self, node: NodeId) {
        if let Some(count) = self.in_flight.get(node) {
            count.sub();
        }
    }

    /// Makes `node` the home of a session's reads until the returned claim is dropped.
    pub fn claim_read_home(self: &Arc<Self>, node: NodeId) -> ReadHome {
        if let Some(count) = self.read_sessions.get(node) {
            count.add();
        }
        ReadHome {
            balancer: Arc::clone(self),
            node,
        }
    }

    /// Sessions whose reads stay on `node`; 0 for a node this balancer does not know.
    pub fn read_sessions(&self, node: NodeId) -> u64 {
        self.read_sessions.get(node).map_or(0, Count::get)
    }

    /// Work in flight on `node`; 0 for a node this balancer does not know.
    #[cfg(test)]
    fn load(&self, node: NodeId) -> u64 {
        self.in_flight.get(node).map_or(0, Count::get)
    }

    /// The next position in a cycle of `total` slots.
    fn next_turn(&self, total: u64) -> u64 {
        self.turn.fetch_add(1, Ordering::Relaxed) % total
    }

    /// A pseudo-random slot in `0..total` (SplitMix64, scaled by a multiply rather than `%`).
    fn next_random(&self, total: u64) -> u64 {
        let mut z = self
            .random
            .fetch_add(GOLDEN_GAMMA, Ordering::Relaxed)
            .wrapping_add(GOLDEN_GAMMA);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((u128::from(z) * u128::from(total)) >> 64) as u64
    }
}

/// The candidate with the least of `counts` for its weight; among equals, the first one at or
/// after `first` in candidate order (wrapping), so that idle nodes still take turns by weight.
fn least_loaded(counts: &[Count], candidates: &[(NodeId, u32)], first: usize) -> usize {
    let load = |node: NodeId| counts.get(node).map_or(0, Count::get);
    let n = candidates.len();
    let mut best = first;
    let (best_node, best_weight) = candidates[first];
    let (mut best_load, mut best_weight) = (load(best_node), u64::from(best_weight));
    for i in (1..n).map(|k| (first + k) % n) {
        let (node, weight) = candidates[i];
        let (load, weight) = (load(node), u64::from(weight));
        // load / weight < best_load / best_weight, without division; weight 0 never wins.
        if weight > 0 && load * best_weight < best_load * weight {
            (best, best_load, best_weight) = (i, load, weight);
        }
    }
    best
}

/// The candidate whose turn is at `position` (below the sum of the weights) in an interleaved
/// weighted round robin: the cycle is made of rounds, and round `r` gives one turn, in candidate
/// order, to every candidate whose weight is above `r`. Weights (1, 2, 3) give A B C, B C, C.
fn weighted_turn(candidates: &[(NodeId, u32)], position: u64) -> Option<usize> {
    let turns_before = |round: u64| -> u64 {
        candidates
            .iter()
            .map(|&(_, w)| u64::from(w).min(round))
            .sum()
    };
    // Binary search for the round holding `position`: turns_before(low) <= position <
    // turns_before(high), which holds at the start because turns_before(max weight) is the total.
    let (mut low, mut high) = (0, candidates.iter().map(|&(_, w)| u64::from(w)).max()?);
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if turns_before(middle) <= position {
            low = middle;
        } else {
            high = middle;
        }
    }
    let in_round = position - turns_before(low);
    let mut in_this_round = candidates
        .iter()
        .enumerate()
        .filter(|&(_, &(_, w))| u64::from(w) > low);
    in_this_round
        .nth(usize::try_from(in_round).ok()?)
        .map(|(i, _)| i)
}

/// The candidate owning `slot` (below the sum of the weights) when each candidate owns as many
/// consecutive slots as its weight.
fn nth_slot(candidates: &[(NodeId, u32)], mut slot: u64) -> Option<usize> {
    candidates.iter().position(|&(_, w)| {
        let weight = u64::from(w);
        if slot < weight {
            return true;
        }
        slot -= weight;
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODES: [Balance; 3] = [
        Balance::LeastConnections,
        Balance::RoundRobin,
        Balance::Random,
    ];

    /// Nodes 0, 1 and 2 with weights 1, 2 and 3.
    const ONE_TWO_THREE: [(NodeId, u32); 3] = [(0, 1), (1, 2), (2, 3)];

    /// How often each of nodes 0..3 is picked in `picks` sequential picks.
    fn tally(
        balancer: &Balancer,
        candidates: &[(NodeId, u32)],
        mode: Balance,
        picks: usize,
    ) -> [usize; 3] {
        let mut counts = [0; 3];
        for _ in 0..picks {
            let node = balancer.pick(candidates, mode, ReadAffinity::Unit).unwrap();
            counts[node] += 1;
        }
        counts
    }

    #[test]
    fn every_mode_spreads_by_weight() {
        for mode in MODES {
            // A fixed seed: with a random one, node 0's 500 expected picks would miss the 10%
            // band by chance about once in 70 runs (the band is 2.4 standard deviations wide).
            let balancer = Balancer::with_seed(3, 0x5eed);
            let counts = tally(&balancer, &ONE_TWO_THREE, mode, 3000);
            for (count, expected) in counts.into_iter().zip([500, 1000, 1500]) {
                assert!(
                    count.abs_diff(expected) * 10 <= expected,
                    "{mode:?}: {counts:?} is not within 10% of [500, 1000, 1500]"
                );
            }
        }
    }

    #[test]
    fn round_robin_gives_each_node_its_weight_in_every_window() {
        let balancer = Balancer::new(3);
        let picks: Vec<NodeId> = (0..60)
            .map(|_| {
                balancer
                    .pick(&ONE_TWO_THREE, Balance::RoundRobin, ReadAffinity::Unit)
                    .unwrap()
            })
            .collect();
        for window in picks.windows(6) {
            let mut counts = [0; 3];
            for &node in window {
                counts[node] += 1;
            }
            assert_eq!(counts, [1, 2, 3], "window {window:?}");
        }
        // Interleaved: every node gets a turn before any node gets a second one.
        assert_eq!(picks[..6], [0, 1, 2, 1, 2, 2]);
    }

    #[test]
    fn large_weights_keep_exact_proportions() {
        let candidates = [(0, 1000), (1, 1), (2, 999)];
        let counts = tally(&Balancer::new(3), &candidates, Balance::RoundRobin, 2000);
        assert_eq!(counts, [1000, 1, 999]);
    }

    #[test]
    fn no_candidate_with_weight_gives_none() {
        let balancer = Balancer::new(3);
        for mode in MODES {
            assert_eq!(
                balancer.pick(&[], mode, ReadAffinity::Unit),
                None,
                "{mode:?}"
            );
            assert_eq!(
                balancer.pick(&[(0, 0), (1, 0)], mode, ReadAffinity::Unit),
                None,
                "{mode:?}"
            );
        }
    }

    #[test]
    fn weight_zero_nodes_are_never_picked() {
        let balancer = Balancer::new(3);
        let candidates = [(0, 0), (1, 1), (2, 0)];
        for mode in MODES {
            assert_eq!(
                tally(&balancer, &candidates, mode, 50),
                [0, 50, 0],
                "{mode:?}"
            );
        }
        // Even when the weighted nodes are much busier.
        balancer.started(1);
        balancer.started(1);
        assert_eq!(
            balancer.pick(&candidates, Balance::LeastConnections, ReadAffinity::Unit),
            Some(1)
        );
    }

    #[test]
    fn least_connections_prefers_the_less_busy_node() {
        let balancer = Balancer::new(3);
        let equal = [(0, 1), (1, 1), (2, 1)];
        balancer.started(0);
        balancer.started(0);
        balancer.started(2);
        for _ in 0..5 {
            assert_eq!(
                balancer.pick(&equal, Balance::LeastConnections, ReadAffinity::Unit),
                Some(1)
            );
        }
        balancer.started(1);
        balancer.started(1);
        balancer.finished(0);
        balancer.finished(0);
        assert_eq!(
            balancer.pick(&equal, Balance::LeastConnections, ReadAffinity::Unit),
            Some(0)
        );
    }

    #[test]
    fn least_connections_weighs_load_by_weight() {
        let balancer = Balancer::new(2);
        let candidates = [(0, 3), (1, 1)];
        // Node 0: 2 in flight for weight 3 (0.67 each); node 1: 1 for weight 1.
        balancer.started(0);
        balancer.started(0);
        balancer.started(1);
        assert_eq!(
            balancer.pick(&candidates, Balance::LeastConnections, ReadAffinity::Unit),
            Some(0)
        );
        // 3 for weight 3 ties with 1 for weight 1: the weighted turn order decides, 3 to 1.
        balancer.started(0);
        let counts = tally(&balancer, &candidates, Balance::LeastConnections, 400);
        assert_eq!(counts, [300, 100, 0]);
    }

    #[test]
    fn least_connections_spreads_busy_work_by_weight() {
        // Each pick's work stays in flight, as with many concurrent sessions.
        let balancer = Balancer::new(3);
        for _ in 0..600 {
            let node = balancer
                .pick(
                    &ONE_TWO_THREE,
                    Balance::LeastConnections,
                    ReadAffinity::Unit,
                )
                .unwrap();
            balancer.started(node);
        }
        assert_eq!(
            [balancer.load(0), balancer.load(1), balancer.load(2)],
            [100, 200, 300]
        );
    }

    #[test]
    fn under_session_affinity_least_connections_counts_the_sessions_homed_and_not_the_units() {
        let balancer = Arc::new(Balancer::new(3));
        let equal = [(1, 1), (2, 1)];
        let pick = |affinity| balancer.pick(&equal, Balance::LeastConnections, affinity);
        // Node 1 is busier with units, node 2 with sessions.
        balancer.started(1);
        balancer.started(1);
        let first = balancer.claim_read_home(2);
        let second = balancer.claim_read_home(2);
        let third = balancer.claim_read_home(1);
        assert_eq!(
            [1, 2, 3].map(|node| balancer.read_sessions(node)),
            [1, 2, 0]
        );
        for _ in 0..4 {
            assert_eq!(pick(ReadAffinity::Session), Some(1));
            assert_eq!(pick(ReadAffinity::Unit), Some(2));
        }
        // A dropped claim is given back: 1 against 1, and the weighted turn alternates again.
        drop(first);
        let picks: Vec<_> = (0..4).map(|_| pick(ReadAffinity::Session)).collect();
        assert_eq!(
            picks.iter().filter(|&&p| p == Some(1)).count(),
            2,
            "{picks:?}"
        );
        drop((second, third));
        assert_eq!([1, 2].map(|node| balancer.read_sessions(node)), [0, 0]);
        // Weighted as the units are: 2 sessions for weight 3 are fewer than 1 for weight 1.
        let _homes = [0, 0, 1].map(|node| balancer.claim_read_home(node));
        let weighted = [(0, 3), (1, 1)];
        for _ in 0..4 {
            assert_eq!(
                balancer.pick(&weighted, Balance::LeastConnections, ReadAffinity::Session),
                Some(0)
            );
        }
    }

    #[test]
    fn read_homes_of_unknown_nodes_do_no_harm() {
        let balancer = Arc::new(Balancer::new(2));
        let home = balancer.claim_read_home(7);
        assert_eq!(home.node(), 7);
        assert_eq!(balancer.read_sessions(7), 0);
        drop(home);
        assert_eq!([0, 1].map(|node| balancer.read_sessions(node)), [0, 0]);
    }

    #[test]
    fn unmatched_or_unknown_counts_do_no_harm() {
        let balancer = Balancer::new(2);
        balancer.finished(0);
        balancer.started(7);
        balancer.finished(7);
        assert_eq!(balancer.load(0), 0);
        balancer.started(1);
        assert_eq!(
            balancer.pick(
                &[(0, 1), (1, 1)],
                Balance::LeastConnections,
                ReadAffinity::Unit
            ),
            Some(0)
        );
    }

    /// Picks from 8 threads at once, 6,000 each, choosing the mode by thread and pick number; each
    /// pick's work starts and ends around it. Returns how often each node was picked.
    fn pick_from_threads(balancer: &Balancer, mode: fn(usize, usize) -> Balance) -> [usize; 3] {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    scope.spawn(move || {
                        let mut counts = [0; 3];
                        for i in 0..6000 {
                            let node = balancer
                                .pick(&ONE_TWO_THREE, mode(t, i), ReadAffinity::Unit)
                                .unwrap();
                            balancer.started(node);
                            counts[node] += 1;
                            balancer.finished(node);
                        }
                        counts
                    })
                })
                .collect();
            workers.into_iter().fold([0; 3], |mut sum, worker| {
                let counts = worker.join().unwrap();
                for node in 0..3 {
                    sum[node] += counts[node];
                }
                sum
            })
        })
    }

    #[test]
    fn concurrent_round_robin_picks_share_the_cycle_exactly() {
        // 48,000 picks are 8,000 whole cycles, however the threads interleave.
        let counts = pick_from_threads(&Balancer::new(3), |_, _| Balance::RoundRobin);
        assert_eq!(counts, [8000, 16000, 24000]);
    }

    #[test]
    fn concurrent_picks_in_every_mode_leave_no_work_counted() {
        let balancer = Balancer::new(3);
        let counts = pick_from_threads(&balancer, |t, i| MODES[(t + i) % 3]);
        assert_eq!(counts.iter().sum::<usize>(), 48_000);
        for node in 0..3 {
            assert_eq!(
                balancer.load(node),
                0,
                "node {node} still has work in flight"
            );
        }
    }
}
