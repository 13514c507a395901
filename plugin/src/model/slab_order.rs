//! How order heads read a network's tokens: which tokens make up each depth slab (method §7.1),
//! shared by every architecture's heads.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// How the order heads pool tokens into per-slab features (§7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// Tokens of each shuffled depth slab (the method's intent; default).
    Slab,
    /// The released code: each architecture's reference pooling, whatever the slabs.
    Released,
}

/// The grouping and the token-grid axis the slabs run along: the cranio-caudal axis of the
/// pipeline that prepares the volumes (MONAI's RAS z is its last axis, nnU-Net's stored z its
/// first). `None`: the axis of the architecture's own recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlabPooling {
    pub grouping: Grouping,
    pub axis: Option<usize>,
}

/// Tokens `[B, N, C]` of a `grid` (token n = (i·g1 + j)·g2 + k) reordered so that grid axis `from`
/// sits at `to`: a head that pools slabs along its own axis `to` then pools them along `from`.
/// The same tensor where the axes agree.
pub fn slab_axis_moved(tokens: &Tensor, grid: [i64; 3], from: usize, to: usize) -> Tensor {
    if from == to {
        return tokens.shallow_clone();
    }
    let s = tokens.size();
    tokens
        .reshape([s[0], grid[0], grid[1], grid[2], s[2]])
        .movedim_int(1 + from as i64, 1 + to as i64)
        .reshape([s[0], s[1], s[2]])
}

/// `grid` with axis `from` moved to `to` (the grid [`slab_axis_moved`]'s tokens now have).
pub fn grid_moved(grid: [i64; 3], from: usize, to: usize) -> [i64; 3] {
    let mut axes = vec![grid[0], grid[1], grid[2]];
    let a = axes.remove(from);
    axes.insert(to, a);
    [axes[0], axes[1], axes[2]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn moving_an_axis_matches_a_permuted_grid() {
        let grid = [2, 3, 4];
        let cube =
            Tensor::arange(2 * 24 * 5, (Kind::Float, tch::Device::Cpu)).view([2, 2, 3, 4, 5]);
        let tokens = cube.reshape([2, 24, 5]);
        for (from, to) in [(0, 2), (2, 0), (1, 0), (0, 1), (2, 1)] {
            let moved = slab_axis_moved(&tokens, grid, from, to);
            let want = cube.movedim_int(1 + from as i64, 1 + to as i64);
            assert_eq!(want.size()[1..4], grid_moved(grid, from, to)[..]);
            assert!(moved.equal(&want.reshape([2, 24, 5])), "{from} → {to}");
        }
        assert!(slab_axis_moved(&tokens, grid, 1, 1).equal(&tokens));
    }
}
