//! UNETR++'s pretext order heads (LWI-VMS): one Linear per encoder stage, on that stage's tokens
//! pooled per depth slab.

use crate::model::blocks::Linear;
use crate::model::slab_order::{Grouping, slab_axis_moved};
use tch::{Kind, Tensor, nn};

/// The token-grid axis UNETR++'s slabs run along in its own recipe: nnU-Net's stored z, the first.
pub const HOME_AXIS: usize = 0;

/// The pretext task's order heads: `temp_head{1..4}` = Linear(dims[i] → slabs) on each encoder
/// stage's tokens pooled by upstream's rule.
#[derive(Debug)]
pub struct PpOrderHeads {
    heads: Vec<Linear>,
    slabs: i64,
}

impl PpOrderHeads {
    pub fn new(p: &nn::Path, dims: [i64; 4], slabs: i64) -> Self {
        PpOrderHeads {
            heads: (0..4)
                .map(|i| Linear::new(&(p / format!("temp_head{}", i + 1)), dims[i], slabs, true))
                .collect(),
            slabs,
        }
    }

    /// Upstream's pooling (LWI-VMS `unetr_pp_synapse.py:153-179`): group g holds the tokens whose
    /// index n ≡ g (mod slabs), that is the last-axis index mod slabs, so the groups never follow
    /// the shuffled slabs (method §7.1). `[B, N, C]` → `[B, slabs, C]`.
    pub fn pool_released(&self, tokens: &Tensor) -> Tensor {
        let [b, n, c] = tokens.size()[..] else {
            unreachable!("tokens are [B, N, C]")
        };
        tokens
            .reshape([b, n / self.slabs, self.slabs, c])
            .mean_dim(1, false, Kind::Float)
    }

    /// The pooling over the shuffled slabs: tokens are ordered `d·(H·W) + h·W + w` with the slabs
    /// along d, so slab g is the g-th run of N/slabs tokens. `[B, N, C]` → `[B, slabs, C]`.
    pub fn pool_slabs(&self, tokens: &Tensor) -> Tensor {
        let [b, n, c] = tokens.size()[..] else {
            unreachable!("tokens are [B, N, C]")
        };
        tokens
            .reshape([b, self.slabs, n / self.slabs, c])
            .mean_dim(2, false, Kind::Float)
    }

    /// Order logits `[B, slabs, slabs]` per stage from each stage's tokens, pooled as upstream.
    pub fn forward(&self, tokens: &[Tensor; 4]) -> [Tensor; 4] {
        self.forward_grouped(tokens, Grouping::Released)
    }

    /// Order logits with the slabs along axis `axis` of each stage's token grid `grids[i]`.
    pub fn forward_along(
        &self,
        tokens: &[Tensor; 4],
        grouping: Grouping,
        axis: usize,
        grids: [[i64; 3]; 4],
    ) -> [Tensor; 4] {
        let tokens: [Tensor; 4] = std::array::from_fn(|i| match grouping {
            Grouping::Slab => slab_axis_moved(&tokens[i], grids[i], axis, HOME_AXIS),
            Grouping::Released => tokens[i].shallow_clone(),
        });
        self.forward_grouped(&tokens, grouping)
    }

    /// Order logits with the tokens pooled by `grouping`.
    fn forward_grouped(&self, tokens: &[Tensor; 4], grouping: Grouping) -> [Tensor; 4] {
        std::array::from_fn(|i| {
            let pooled = match grouping {
                Grouping::Slab => self.pool_slabs(&tokens[i]),
                Grouping::Released => self.pool_released(&tokens[i]),
            };
            self.heads[i].forward(&pooled)
        })
    }
}
