//! UNETR's pretext order heads (LWI-VMS): one Linear per tapped transformer depth, on tokens
//! pooled per depth slab.

use crate::model::blocks::Linear;
use crate::model::slab_order::{Grouping, grid_moved, slab_axis_moved};
use tch::{Kind, Tensor, nn};

/// The token-grid axis UNETR's slabs run along in its own recipe: MONAI's RAS z, the last.
pub const HOME_AXIS: usize = 2;

/// The pretext task's order-prediction heads: `Linear(hidden → m)` on the features after blocks
/// L/4, L/2, 3L/4 and on the final normed tokens, named `vit.temp_head{1..4}` as LWI-VMS names them.
#[derive(Debug)]
pub struct OrderHeads {
    pub heads: [Linear; 4],
}

impl OrderHeads {
    /// `p` is the model root; the heads live under `vit.`.
    pub fn new(p: &nn::Path, hidden: i64, classes: i64) -> Self {
        let vit = p / "vit";
        OrderHeads {
            heads: std::array::from_fn(|i| {
                Linear::new(
                    &(&vit / format!("temp_head{}", i + 1)),
                    hidden,
                    classes,
                    true,
                )
            }),
        }
    }

    /// The number of slabs the heads classify.
    pub fn slabs(&self) -> i64 {
        self.heads[0].weight.size()[0]
    }

    /// Order logits `[B, m, m]` of each head from the four token features `[B, N, H]` of a
    /// `tokens` grid, the slabs along grid axis `axis` (`Slab`), or consecutive runs of N/m tokens
    /// in sequence order (`Released`, the released code's X-slabs).
    pub fn logits(
        &self,
        features: &[Tensor; 4],
        grouping: Grouping,
        axis: usize,
        tokens: [i64; 3],
    ) -> Vec<Tensor> {
        let m = self.slabs();
        features
            .iter()
            .zip(&self.heads)
            .map(|(f, head)| {
                let s = f.size();
                let (b, h) = (s[0], s[2]);
                let pooled = match grouping {
                    Grouping::Slab => {
                        let g = grid_moved(tokens, axis, HOME_AXIS);
                        slab_axis_moved(f, tokens, axis, HOME_AXIS)
                            .reshape([b, g[0] * g[1], m, g[2] / m, h])
                            .mean_dim(&[1i64, 3][..], false, Kind::Float)
                    }
                    Grouping::Released => {
                        f.reshape([b, m, s[1] / m, h])
                            .mean_dim(2, false, Kind::Float)
                    }
                };
                head.forward(&pooled)
            })
            .collect()
    }
}
