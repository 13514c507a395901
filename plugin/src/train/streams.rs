//! The random streams of training, keyed so that a data-parallel job draws what one process does:
//! per epoch, a shared stream (the case order, per-batch draws; the same on every rank) and one
//! stream per slot of the global batch (a sample's crop, augmentation and pretext draws), so that
//! W ranks × b samples draw exactly what 1 process × W·b samples draws, and a run resumed at an
//! epoch boundary draws what an uninterrupted one does.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// An epoch's streams on one rank: the shared one and those of its slots.
pub(super) struct Epoch {
    pub shared: ChaCha8Rng,
    pub slots: Vec<ChaCha8Rng>,
}

impl Epoch {
    pub(super) fn new(seed: u64, epoch: u64, mine: std::ops::Range<u64>) -> Epoch {
        Epoch {
            shared: shared(seed, epoch),
            slots: mine.map(|j| slot(seed, epoch, j)).collect(),
        }
    }
}

/// The stream shared by every rank in `epoch`.
pub(super) fn shared(seed: u64, epoch: u64) -> ChaCha8Rng {
    stream(seed, epoch, u64::MAX)
}

/// The stream of global batch slot `slot` in `epoch`.
pub(super) fn slot(seed: u64, epoch: u64, slot: u64) -> ChaCha8Rng {
    stream(seed, epoch, slot)
}

fn stream(seed: u64, epoch: u64, which: u64) -> ChaCha8Rng {
    let mut h = Sha256::new();
    h.update(b"lwi training stream");
    for v in [seed, epoch, which] {
        h.update(v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// The slots of a global batch of `slots` that rank `rank` of `world` holds: a contiguous run
/// (rank r: r·b … (r+1)·b − 1), so that one rank's rows are in global-batch order.
pub(super) fn local_slots(slots: u64, rank: u32, world: u32) -> std::ops::Range<u64> {
    let per = slots / u64::from(world);
    u64::from(rank) * per..(u64::from(rank) + 1) * per
}

/// One epoch's case order for `steps` steps of `slots` cases, from a permutation of `n` cases:
/// PyTorch's `DistributedSampler` (the permutation padded by repeating its head) when the
/// epoch is one pass, fresh permutations back to back when it is longer.
pub(super) fn epoch_order(
    n: usize,
    steps: usize,
    slots: usize,
    one_pass: bool,
    rng: &mut ChaCha8Rng,
) -> Vec<usize> {
    let total = steps * slots;
    let mut permutation = || {
        let mut p: Vec<usize> = (0..n).collect();
        rand::seq::SliceRandom::shuffle(p.as_mut_slice(), rng);
        p
    };
    let mut order = Vec::with_capacity(total);
    if one_pass {
        let p = permutation();
        order.extend(p.iter().cycle().take(total));
    } else {
        while order.len() < total {
            let p = permutation();
            order.extend(p.into_iter().take(total - order.len()));
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_depend_on_seed_epoch_and_slot_only() {
        let first = |mut r: ChaCha8Rng| r.random::<u64>();
        assert_eq!(first(slot(1, 2, 3)), first(slot(1, 2, 3)));
        let others = [slot(1, 2, 4), slot(1, 3, 3), slot(2, 2, 3), shared(1, 2)];
        for o in others {
            assert_ne!(first(o), first(slot(1, 2, 3)));
        }
    }

    #[test]
    fn the_order_is_distributed_samplers_and_ranks_take_contiguous_slots() {
        // 5 cases, 2 ranks × 1 slot: ceil(5/2) = 3 steps, the permutation padded by its head
        let mut rng = shared(0, 0);
        let order = epoch_order(5, 3, 2, true, &mut rng);
        assert_eq!(order.len(), 6);
        assert_eq!(order[5], order[0]);
        let mut seen = order[..5].to_vec();
        seen.sort();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        // with 1 slot per rank, rank r's cases are DistributedSampler's indices[r::W]
        let rank1: Vec<usize> = (0..3).map(|s| order[s * 2 + 1]).collect();
        let sampler: Vec<usize> = order.iter().skip(1).step_by(2).copied().collect();
        assert_eq!(rank1, sampler);
        assert_eq!(local_slots(4, 0, 2), 0..2);
        assert_eq!(local_slots(4, 1, 2), 2..4);
        // more slots than cases: the head repeats as often as needed
        assert_eq!(epoch_order(2, 1, 5, true, &mut rng).len(), 5);
        // longer epochs: whole fresh passes
        let long = epoch_order(3, 4, 2, false, &mut rng);
        for pass in long.chunks(3).take(2) {
            let mut p = pass.to_vec();
            p.sort();
            assert_eq!(p, vec![0, 1, 2]);
        }
    }
}
