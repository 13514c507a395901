//! The init-train pretext task (method §1.1): shuffle the volume's depth slabs, mask cubes, and
//! learn to reconstruct the shuffled unmasked volume and to tell each slab's original position.

use crate::error::{Error, Result};
pub use crate::model::Grouping;
use crate::model::SlabPooling;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretextConfig {
    /// m: slabs along z (the cranio-caudal axis after RAS).
    pub slabs: i64,
    pub mask_ratio: f64,
    /// Edge of the masked cubes, voxels.
    pub cube: i64,
    pub grouping: Grouping,
    /// One permutation and cube set for the whole batch (the released code) instead of per sample.
    pub per_batch: bool,
    pub alpha_rec: f64,
    pub alpha_cls: f64,
    /// The token-grid axis the slabs run along: the cranio-caudal axis of the recipe's pipeline
    /// (set by the run; `None`: the architecture's own).
    #[serde(skip)]
    pub axis: Option<usize>,
}

impl Default for PretextConfig {
    fn default() -> Self {
        PretextConfig {
            slabs: 6,
            mask_ratio: 0.4,
            cube: 16,
            grouping: Grouping::Slab,
            per_batch: false,
            alpha_rec: 1.0,
            alpha_cls: 1.0,
            axis: None,
        }
    }
}

impl PretextConfig {
    /// The roi and token grid must split evenly into slabs (along roi axis `depth`) and cubes. A
    /// refusal names the values that would work for this roi.
    pub fn validate(&self, roi: [i64; 3], tokens: [i64; 3], depth: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.mask_ratio) {
            return Err(Error::invalid(format!(
                "pretext mask_ratio {} must be in [0, 1]",
                self.mask_ratio
            )));
        }
        let slabs_ok = |m: i64| {
            m >= 2
                && roi[depth] % m == 0
                && match self.grouping {
                    Grouping::Slab => tokens[depth] % m == 0,
                    Grouping::Released => tokens.iter().product::<i64>() % m == 0,
                }
        };
        let cube_ok = |c: i64| c >= 1 && roi.iter().all(|r| r % c == 0);
        if slabs_ok(self.slabs) && cube_ok(self.cube) {
            return Ok(());
        }
        let list = |ok: &dyn Fn(i64) -> bool| {
            let v: Vec<String> = (1..=roi[0].max(roi[1]).max(roi[2]))
                .filter(|&v| ok(v))
                .map(|v| v.to_string())
                .collect();
            if v.is_empty() {
                "none".into()
            } else {
                v.join(", ")
            }
        };
        Err(Error::invalid(format!(
            "pretext slabs {} and cube {} do not fit the roi {roi:?} ({tokens:?} tokens, {:?} \
             grouping): the slabs must split the roi depth and the token depth evenly, the cube \
             every roi edge; values that work here: slabs {}; cube {}",
            self.slabs,
            self.cube,
            self.grouping,
            list(&slabs_ok),
            list(&cube_ok)
        )))
    }
}

/// One pretext batch: the network input (shuffled and masked), the target (shuffled, unmasked)
/// and `perm[b][k]`, the original index of the slab now at position k.
pub struct PretextBatch {
    pub input: Tensor,
    pub target: Tensor,
    pub perms: Tensor,
}

/// Shuffles the slabs along `axis` (4 for MONAI's pipeline's `[B, 1, X, Y, Z]`, 2 for nnU-Net's
/// `[B, 1, z, y, x]`) and masks cubes of `x`, every draw from `rng`.
pub fn transform(x: &Tensor, cfg: &PretextConfig, axis: i64, rng: &mut impl Rng) -> PretextBatch {
    let draws = Draws::new(x, cfg);
    let shared = cfg.per_batch.then(|| draws.draw(rng));
    transform_with(x, cfg, axis, shared, &mut |_| draws.draw(rng))
}

/// [`transform`] for a batch whose rows belong to `rngs.len()` equal groups (the slots of a
/// data-parallel batch): a `per_batch` draw comes from `shared`, a row's own from its group's RNG.
pub fn transform_grouped<R: Rng>(
    x: &Tensor,
    cfg: &PretextConfig,
    axis: i64,
    shared: &mut R,
    rngs: &mut [R],
) -> PretextBatch {
    let draws = Draws::new(x, cfg);
    let per_group = (x.size()[0] / rngs.len().max(1) as i64).max(1);
    let shared = cfg.per_batch.then(|| draws.draw(shared));
    transform_with(x, cfg, axis, shared, &mut |row| {
        draws.draw(&mut rngs[(row / per_group) as usize])
    })
}

/// One sample's draws: the slab permutation and the cube mask.
type Draw = (Vec<i64>, Tensor);

/// What a draw needs to know of the batch.
struct Draws {
    slabs: i64,
    cube: i64,
    grid: [i64; 3],
    masked: usize,
    device: tch::Device,
}

impl Draws {
    fn new(x: &Tensor, cfg: &PretextConfig) -> Draws {
        let s = x.size();
        let grid = [s[2] / cfg.cube, s[3] / cfg.cube, s[4] / cfg.cube];
        let cubes = grid.iter().product::<i64>();
        Draws {
            slabs: cfg.slabs,
            cube: cfg.cube,
            grid,
            masked: (cubes as f64 * cfg.mask_ratio).floor() as usize,
            device: x.device(),
        }
    }

    fn draw(&self, rng: &mut (impl Rng + ?Sized)) -> Draw {
        let mut perm: Vec<i64> = (0..self.slabs).collect();
        perm.shuffle(rng);
        let cubes = self.grid.iter().product::<i64>();
        let mut idx: Vec<i64> = (0..cubes).collect();
        idx.shuffle(rng);
        let mut keep = vec![1f32; cubes as usize];
        for &i in &idx[..self.masked] {
            keep[i as usize] = 0.0;
        }
        let mask = Tensor::from_slice(&keep)
            .view(self.grid)
            .repeat_interleave_self_int(self.cube, 0, None)
            .repeat_interleave_self_int(self.cube, 1, None)
            .repeat_interleave_self_int(self.cube, 2, None)
            .to_device(self.device);
        (perm, mask)
    }
}

fn transform_with(
    x: &Tensor,
    cfg: &PretextConfig,
    axis: i64,
    shared: Option<Draw>,
    own: &mut dyn FnMut(i64) -> Draw,
) -> PretextBatch {
    let s = x.size();
    let (b, depth) = (s[0], s[axis as usize]);
    let len = depth / cfg.slabs;
    let mut targets = Vec::new();
    let mut inputs = Vec::new();
    let mut perms = Vec::new();
    for i in 0..b {
        let (perm, mask) = match &shared {
            Some((p, m)) => (p.clone(), m.shallow_clone()),
            None => own(i),
        };
        let xi = x.get(i);
        let slabs: Vec<Tensor> = perm
            .iter()
            .map(|&p| xi.narrow(axis - 1, p * len, len))
            .collect();
        let shuffled = Tensor::cat(&slabs, axis - 1);
        inputs.push(&shuffled * mask.to_kind(shuffled.kind()));
        targets.push(shuffled);
        perms.extend(perm);
    }
    PretextBatch {
        input: Tensor::stack(&inputs, 0),
        target: Tensor::stack(&targets, 0),
        perms: Tensor::from_slice(&perms)
            .view([b, cfg.slabs])
            .to_device(x.device()),
    }
}

/// The order heads pool as the task is configured.
impl From<&PretextConfig> for SlabPooling {
    fn from(cfg: &PretextConfig) -> SlabPooling {
        SlabPooling {
            grouping: cfg.grouping,
            axis: cfg.axis,
        }
    }
}

/// `α_rec · MSE(recon, target) + α_cls · Σ_heads CE(logits, perm)`; returns (total, rec, cls).
pub fn loss(
    recon: &Tensor,
    batch: &PretextBatch,
    logits: &[Tensor],
    cfg: &PretextConfig,
) -> (Tensor, Tensor, Tensor) {
    let rec = recon
        .to_kind(Kind::Float)
        .mse_loss(&batch.target.to_kind(Kind::Float), tch::Reduction::Mean);
    let labels = batch.perms.reshape([-1]);
    let mut cls = Tensor::zeros([], (Kind::Float, recon.device()));
    for l in logits {
        let flat = l.to_kind(Kind::Float).reshape([-1, cfg.slabs]);
        cls += flat.cross_entropy_loss::<Tensor>(&labels, None, tch::Reduction::Mean, -100, 0.0);
    }
    let total = &rec * cfg.alpha_rec + &cls * cfg.alpha_cls;
    (total, rec, cls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::Device;

    #[test]
    fn slabs_move_where_the_permutation_says_and_exactly_the_stated_cubes_are_zeroed() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // voxel value = its z index + 1, so a slab's origin can be read off its values
        let x = (Tensor::arange(48, (Kind::Float, Device::Cpu)) + 1.0)
            .view([1, 1, 1, 1, 48])
            .expand([2, 1, 32, 32, 48], true)
            .contiguous();
        let cfg = PretextConfig {
            slabs: 6,
            cube: 16,
            mask_ratio: 0.4,
            ..Default::default()
        };
        let b = transform(&x, &cfg, 4, &mut rng);
        for i in 0..2 {
            for k in 0..6 {
                let p = b.perms.int64_value(&[i, k]);
                let slab = b.target.get(i).narrow(3, k * 8, 8);
                let original = x.get(i).narrow(3, p * 8, 8);
                assert!(
                    slab.equal(&original),
                    "sample {i} position {k} holds slab {p}"
                );
            }
            let mut seen: Vec<i64> = (0..6).map(|k| b.perms.int64_value(&[i, k])).collect();
            seen.sort();
            assert_eq!(seen, (0..6).collect::<Vec<_>>());
            // 2·2·3 = 12 cubes, floor(12 · 0.4) = 4 masked; the target is unmasked
            let zeroed = b.input.get(i).eq(0.0).sum(Kind::Int64).int64_value(&[]);
            assert_eq!(zeroed, 4 * 16 * 16 * 16);
            assert_eq!(b.target.get(i).eq(0.0).sum(Kind::Int64).int64_value(&[]), 0);
        }
    }

    #[test]
    fn unetr_pp_slabs_run_along_the_first_network_axis() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        // [B, 1, z, y, x] with value = z index
        let x = Tensor::arange(16, (Kind::Float, Device::Cpu))
            .view([1, 1, 16, 1, 1])
            .expand([1, 1, 16, 8, 8], true)
            .contiguous();
        let cfg = PretextConfig {
            slabs: 4,
            cube: 4,
            mask_ratio: 0.0,
            ..Default::default()
        };
        let b = transform(&x, &cfg, 2, &mut rng);
        for k in 0..4 {
            let p = b.perms.int64_value(&[0, k]);
            assert!(b.target.narrow(2, k * 4, 4).equal(&x.narrow(2, p * 4, 4)));
        }
    }

    #[test]
    fn per_batch_mode_shares_one_permutation() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let x = Tensor::rand([3, 1, 16, 16, 48], (Kind::Float, Device::Cpu));
        let cfg = PretextConfig {
            slabs: 3,
            cube: 16,
            per_batch: true,
            ..Default::default()
        };
        let b = transform(&x, &cfg, 4, &mut rng);
        assert!(b.perms.get(0).equal(&b.perms.get(1)) && b.perms.get(1).equal(&b.perms.get(2)));
        let m0 = b.input.get(0).eq(0.0);
        assert!(m0.equal(&b.input.get(2).eq(0.0)), "same cubes masked");
    }
}
