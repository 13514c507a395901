//! `lwi render`: a PNG of a few slices of a volume with a label map over it — how a person checks
//! a segmentation at a glance.

use std::path::Path;

/// Distinct colours for label values 1, 2, …
const PALETTE: [[u8; 3]; 12] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
    [0, 128, 128],
    [170, 110, 40],
];

/// Writes `slices` slices (along the third voxel axis, through the labelled range when there are
/// labels) side by side: the image windowed to `window` in grey, labels blended in colour.
pub fn render(
    dims: [i64; 3],
    image: &[f32],
    labels: Option<&[f32]>,
    window: [f32; 2],
    slices: usize,
    out: &Path,
) -> Result<(), String> {
    let [nx, ny, nz] = dims.map(|d| d as usize);
    let at = |x: usize, y: usize, z: usize| x + nx * (y + ny * z);
    let (z0, z1) = match labels {
        Some(l) => {
            let zs: Vec<usize> = (0..nz)
                .filter(|&z| (0..nx * ny).any(|i| l[z * nx * ny + i] > 0.0))
                .collect();
            (*zs.first().unwrap_or(&0), *zs.last().unwrap_or(&(nz - 1)))
        }
        None => (0, nz - 1),
    };
    let picks: Vec<usize> = (1..=slices)
        .map(|i| z0 + (z1 - z0) * i / (slices + 1))
        .collect();
    let (w, h) = (nx * picks.len(), ny);
    let mut rgb = vec![0u8; w * h * 3];
    for (s, &z) in picks.iter().enumerate() {
        for y in 0..ny {
            for x in 0..nx {
                let v = ((image[at(x, y, z)] - window[0]) / (window[1] - window[0]))
                    .clamp(0.0, 1.0)
                    * 255.0;
                let mut c = [v, v, v];
                if let Some(l) = labels {
                    let label = l[at(x, y, z)].round() as usize;
                    if label > 0 {
                        let p = PALETTE[(label - 1) % PALETTE.len()];
                        c = std::array::from_fn(|k| 0.45 * c[k] + 0.55 * p[k] as f32);
                    }
                }
                // Rows from the top: y reversed so anterior (RAS +y) is up for RAS volumes.
                let px = ((ny - 1 - y) * w + s * nx + x) * 3;
                rgb[px..px + 3].copy_from_slice(&c.map(|v| v as u8));
            }
        }
    }
    let file = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .and_then(|mut wr| wr.write_image_data(&rgb))
        .map_err(|e| format!("{}: {e}", out.display()))
}
