//! `lwi render`: pictures a person checks at a glance. Overlays: axial, coronal and sagittal planes
//! through the labelled organs, the prediction and (when given) the reference side by side, at the
//! voxels' true aspect, with a legend of the model's organ names and colours. Curves: the training
//! loss and validation Dice per epoch of both stages, from the history a model file keeps.

use font8x8::UnicodeFonts;
use std::collections::BTreeMap;

/// Distinct colours for label values 1, 2, …
pub const PALETTE: [[u8; 3]; 12] = [
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

fn colour(label: usize) -> [u8; 3] {
    PALETTE[(label - 1) % PALETTE.len()]
}

/// An RGB canvas with the few drawing operations the pictures need.
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize, background: [u8; 3]) -> Canvas {
        Canvas {
            w,
            h,
            rgb: background.repeat(w * h),
        }
    }
    fn set(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..self.w as i64).contains(&x) && (0..self.h as i64).contains(&y) {
            let i = (y as usize * self.w + x as usize) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }
    fn rect(&mut self, x: i64, y: i64, w: i64, h: i64, c: [u8; 3]) {
        for yy in y..y + h {
            for xx in x..x + w {
                self.set(xx, yy, c);
            }
        }
    }
    /// Text in an 8×8 bitmap font, `scale` pixels per font pixel.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: [u8; 3]) {
        for (i, ch) in s.chars().enumerate() {
            let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        let (px, py) = (x + (i as i64 * 8 + col) * scale, y + row as i64 * scale);
                        self.rect(px, py, scale, scale, c);
                    }
                }
            }
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3]) {
        let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            self.rect(x.round() as i64 - 1, y.round() as i64 - 1, 2, 2, c);
        }
    }
    /// The picture as a PNG file's bytes.
    fn png(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .and_then(|mut wr| wr.write_image_data(&self.rgb))
            .expect("encoding into memory cannot fail: the header matches the pixels");
        bytes
    }
}

/// A volume to draw: dims, voxel size (mm) and values, x fastest.
pub struct Grid<'a> {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub values: &'a [f32],
}

impl Grid<'_> {
    fn at(&self, v: [usize; 3]) -> f32 {
        self.values[v[0] + self.dims[0] * (v[1] + self.dims[1] * v[2])]
    }
}

/// The voxel where the three planes cross: the centre of the labelled voxels, else the middle.
fn centre(grid: &Grid, labels: Option<&[f32]>) -> [usize; 3] {
    let [nx, ny, _] = grid.dims;
    let (mut sum, mut n) = ([0.0f64; 3], 0.0);
    for (i, &l) in labels.unwrap_or(&[]).iter().enumerate() {
        if l > 0.0 {
            let v = [i % nx, (i / nx) % ny, i / (nx * ny)];
            (0..3).for_each(|d| sum[d] += v[d] as f64);
            n += 1.0;
        }
    }
    if n == 0.0 {
        return grid.dims.map(|d| d / 2);
    }
    sum.map(|s| (s / n).round() as usize)
}

/// The three planes: (name, horizontal axis, vertical axis, fixed axis). Vertical axes are drawn
/// with their positive direction up, so RAS volumes show anterior / superior at the top.
const PLANES: [(&str, usize, usize, usize); 3] = [
    ("axial", 0, 1, 2),
    ("coronal", 0, 2, 1),
    ("sagittal", 1, 2, 0),
];

/// Pixels per mm, so that the largest plane is about `target` pixels across.
fn scale_for(grid: &Grid, target: f64) -> f64 {
    let extent = (0..3)
        .map(|d| grid.dims[d] as f64 * grid.spacing[d])
        .fold(0.0, f64::max);
    target / extent.max(1e-6)
}

/// Where the planes cross, how many pixels a millimetre takes, and the grey-level window.
struct View {
    at: [usize; 3],
    px_per_mm: f64,
    window: [f32; 2],
}

fn draw_plane(
    canvas: &mut Canvas,
    origin: (i64, i64),
    grid: &Grid,
    labels: Option<&[f32]>,
    plane: (usize, usize, usize),
    view: &View,
) -> (i64, i64) {
    let (u, v, fixed) = plane;
    let (at, px_per_mm, window) = (view.at, view.px_per_mm, view.window);
    let w = (grid.dims[u] as f64 * grid.spacing[u] * px_per_mm)
        .round()
        .max(1.0) as i64;
    let h = (grid.dims[v] as f64 * grid.spacing[v] * px_per_mm)
        .round()
        .max(1.0) as i64;
    for py in 0..h {
        for px in 0..w {
            let mut voxel = [0usize; 3];
            voxel[fixed] = at[fixed];
            voxel[u] = ((px as f64 + 0.5) / w as f64 * grid.dims[u] as f64) as usize;
            voxel[v] =
                grid.dims[v] - 1 - ((py as f64 + 0.5) / h as f64 * grid.dims[v] as f64) as usize;
            let g =
                ((grid.at(voxel) - window[0]) / (window[1] - window[0])).clamp(0.0, 1.0) * 255.0;
            let mut c = [g; 3];
            if let Some(l) = labels {
                let label = Grid { values: l, ..*grid }.at(voxel).round() as usize;
                if label > 0 {
                    let p = colour(label);
                    c = std::array::from_fn(|k| 0.45 * c[k] + 0.55 * p[k] as f32);
                }
            }
            canvas.set(origin.0 + px, origin.1 + py, c.map(|v| v as u8));
        }
    }
    (w, h)
}

/// The overlay picture (PNG bytes): a row per label map (prediction, then reference), the three planes
/// in each, and a legend of the label values present with their names.
pub fn overlays(
    grid: &Grid,
    rows: &[(&str, &[f32])],
    names: &BTreeMap<u32, String>,
    window: [f32; 2],
) -> Vec<u8> {
    let first = rows.first().map(|r| r.1);
    let at = centre(grid, first);
    let px_per_mm = scale_for(grid, 320.0);
    let size = |d: usize| (grid.dims[d] as f64 * grid.spacing[d] * px_per_mm).round() as i64;
    let (gap, title) = (12i64, 28i64);
    // Each column is as wide as its plane or its title ("reference: sagittal", 16 px a letter).
    let longest = rows.iter().map(|r| r.0.len()).max().unwrap_or(5) as i64;
    let panel_w: Vec<i64> = PLANES
        .iter()
        .map(|p| size(p.1).max(16 * (longest + 2 + p.0.len() as i64)))
        .collect();
    let panel_h = PLANES.iter().map(|p| size(p.2)).max().unwrap_or(1);
    let mut present: Vec<usize> = rows
        .iter()
        .flat_map(|r| {
            r.1.iter()
                .filter(|&&l| l > 0.0)
                .map(|&l| l.round() as usize)
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    present.truncate(24);
    let legend_w = 24
        + 8 * 2
            * present
                .iter()
                .map(|&l| label_text(l, names).len() as i64 + 3)
                .max()
                .unwrap_or(8);
    let n_rows = rows.len().max(1) as i64;
    let width = gap + panel_w.iter().map(|w| w + gap).sum::<i64>() + legend_w;
    let height =
        (gap + n_rows * (title + panel_h + gap)).max(gap + 24 * present.len() as i64 + title);
    let mut canvas = Canvas::new(width as usize, height as usize, [24, 24, 24]);
    let view = View {
        at,
        px_per_mm,
        window,
    };
    let white = [235, 235, 235];
    let draw_rows: Vec<(&str, Option<&[f32]>)> = if rows.is_empty() {
        vec![("image", None)]
    } else {
        rows.iter().map(|(n, l)| (*n, Some(*l))).collect()
    };
    for (r, (name, labels)) in draw_rows.iter().enumerate() {
        let y = gap + r as i64 * (title + panel_h + gap);
        let mut x = gap;
        for (p, &(plane, u, v, fixed)) in PLANES.iter().enumerate() {
            canvas.text(x, y + 4, &format!("{name}: {plane}"), 2, white);
            draw_plane(
                &mut canvas,
                (x, y + title),
                grid,
                *labels,
                (u, v, fixed),
                &view,
            );
            x += panel_w[p] + gap;
        }
    }
    let lx = width - legend_w + 8;
    canvas.text(lx, gap + 4, "labels", 2, white);
    for (i, &l) in present.iter().enumerate() {
        let y = gap + title + 24 * i as i64;
        canvas.rect(lx, y, 16, 16, colour(l));
        canvas.text(lx + 24, y, &label_text(l, names), 2, white);
    }
    canvas.png()
}

fn label_text(l: usize, names: &BTreeMap<u32, String>) -> String {
    match names.get(&(l as u32)) {
        Some(n) => format!("{l} {n}"),
        None => l.to_string(),
    }
}

/// One stage's per-epoch history: (epoch, loss, validation Dice).
pub type History = Vec<(u64, f64, Option<f64>)>;

/// The training curves (PNG bytes): loss per epoch (init-train, then fine-tune after it) on the left
/// axis, validation Dice (0..1) as dots on the right axis.
pub fn curves(stages: &[(&str, History)]) -> Result<Vec<u8>, String> {
    let (w, h, left, right, top, bottom) = (900.0, 480.0, 90.0, 70.0, 50.0, 60.0);
    let epochs: u64 = stages.iter().map(|s| s.1.len() as u64).sum();
    if epochs == 0 {
        return Err("the model file has no training history (it was imported, or trained before lwi kept one)".into());
    }
    let max_loss = stages
        .iter()
        .flat_map(|s| s.1.iter().map(|e| e.1))
        .filter(|l| l.is_finite())
        .fold(1e-9, f64::max);
    let mut c = Canvas::new(w as usize, h as usize, [255, 255, 255]);
    let (grey, black) = ([200, 200, 200], [30, 30, 30]);
    let x_of = |i: f64| left + (w - left - right) * i / (epochs.max(2) - 1) as f64;
    let y_loss = |l: f64| top + (h - top - bottom) * (1.0 - l / max_loss);
    let y_dice = |d: f64| top + (h - top - bottom) * (1.0 - d);
    for k in 0..=4 {
        let y = top + (h - top - bottom) * k as f64 / 4.0;
        c.line((left, y), (w - right, y), grey);
        let loss = max_loss * (1.0 - k as f64 / 4.0);
        c.text(8, y as i64 - 4, &format!("{loss:.3}"), 1, black);
        c.text(
            (w - right + 8.0) as i64,
            y as i64 - 4,
            &format!("{:.2}", 1.0 - k as f64 / 4.0),
            1,
            black,
        );
    }
    c.text(
        left as i64,
        12,
        "loss (lines), validation Dice (dots)",
        2,
        black,
    );
    c.text(8, (top - 18.0) as i64, "loss", 1, black);
    c.text(
        (w - right + 8.0) as i64,
        (top - 18.0) as i64,
        "Dice",
        1,
        black,
    );
    let mut offset = 0.0;
    for (s, (name, history)) in stages.iter().enumerate() {
        let col = [[0, 90, 200], [220, 60, 30]][s % 2];
        let points: Vec<(f64, f64)> = history
            .iter()
            .enumerate()
            .filter(|(_, e)| e.1.is_finite())
            .map(|(i, e)| (x_of(offset + i as f64), y_loss(e.1)))
            .collect();
        points.windows(2).for_each(|p| c.line(p[0], p[1], col));
        for (i, e) in history.iter().enumerate() {
            if let Some(d) = e.2 {
                let (x, y) = (x_of(offset + i as f64), y_dice(d.clamp(0.0, 1.0)));
                c.rect(x as i64 - 3, y as i64 - 3, 7, 7, [20, 150, 60]);
            }
        }
        let label = format!("{name} ({} epochs)", history.len());
        c.text(
            x_of(offset) as i64,
            (h - bottom + 10.0) as i64 + 12 * s as i64,
            &label,
            1,
            col,
        );
        offset += history.len() as f64;
    }
    c.line((left, h - bottom), (w - right, h - bottom), black);
    c.text((w / 2.0) as i64 - 20, (h - 20.0) as i64, "epoch", 2, black);
    Ok(c.png())
}
