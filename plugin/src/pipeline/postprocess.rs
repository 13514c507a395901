//! Optional post-processing of label maps: keep the largest connected component of each label
//! (26-connectivity, as MONAI's `KeepLargestConnectedComponent` by default), after any pipeline.

use crate::error::Result;
use crate::volume::DType;
use tch::Tensor;

/// Keeps, for every non-zero label, only its largest 26-connected component; the rest becomes 0.
/// `labels` is x fastest with `dims`.
pub fn keep_largest_components(labels: &mut [u32], dims: [usize; 3]) {
    let n = labels.len();
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let idx = |x: usize, y: usize, z: usize| x + dims[0] * (y + dims[1] * z);
    for z in 0..dims[2] {
        for y in 0..dims[1] {
            for x in 0..dims[0] {
                let i = idx(x, y, z);
                if labels[i] == 0 {
                    continue;
                }
                // Neighbours already visited (13 of the 26).
                for dz in -1i64..=0 {
                    for dy in -1i64..=1 {
                        for dx in -1i64..=1 {
                            if (dz, dy, dx) >= (0, 0, 0) {
                                continue;
                            }
                            let (nx, ny, nz) = (x as i64 + dx, y as i64 + dy, z as i64 + dz);
                            if nx < 0
                                || ny < 0
                                || nz < 0
                                || nx >= dims[0] as i64
                                || ny >= dims[1] as i64
                            {
                                continue;
                            }
                            let j = idx(nx as usize, ny as usize, nz as usize);
                            if labels[j] == labels[i] {
                                let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                                if a != b {
                                    parent[a.max(b)] = a.min(b);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    let mut size = vec![0usize; n];
    for i in 0..n {
        if labels[i] != 0 {
            let r = find(&mut parent, i);
            size[r] += 1;
        }
    }
    let mut best: std::collections::HashMap<u32, (usize, usize)> = Default::default();
    for i in 0..n {
        if labels[i] != 0 && parent[i] == i {
            let e = best.entry(labels[i]).or_insert((i, 0));
            if size[i] > e.1 {
                *e = (i, size[i]);
            }
        }
    }
    for i in 0..n {
        if labels[i] != 0 {
            let r = find(&mut parent, i);
            if best[&labels[i]].0 != r {
                labels[i] = 0;
            }
        }
    }
}

/// Each label reduced to its largest 26-connected component (a uint32 round trip through
/// `postprocess`, which works on plain voxel values).
pub fn largest_components(labels: &Tensor, dims: [i64; 3]) -> Result<Tensor> {
    let bytes = DType::U32.le_bytes_from_tensor(labels)?;
    let mut values: Vec<u32> = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let size = [dims[0] as usize, dims[1] as usize, dims[2] as usize];
    keep_largest_components(&mut values, size);
    let back: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    DType::U32.tensor_from_le_bytes(&back, dims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_largest_component_of_each_label_stays() {
        let dims = [10, 10, 10];
        let mut l = vec![0u32; 1000];
        let at = |x: usize, y: usize, z: usize| x + 10 * (y + 10 * z);
        for x in 0..4 {
            for y in 0..4 {
                l[at(x, y, 0)] = 1; // 16 voxels
            }
        }
        l[at(8, 8, 8)] = 1; // a stray voxel
        l[at(5, 5, 5)] = 2;
        l[at(6, 6, 6)] = 2; // diagonal neighbour: the same 26-connected component
        l[at(9, 0, 9)] = 2;
        keep_largest_components(&mut l, dims);
        assert_eq!(l.iter().filter(|&&v| v == 1).count(), 16);
        assert_eq!(l[at(8, 8, 8)], 0);
        assert_eq!((l[at(5, 5, 5)], l[at(6, 6, 6)], l[at(9, 0, 9)]), (2, 2, 0));
    }
}
