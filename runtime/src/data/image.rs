//! 8-bit image resizing and the diffusion trainer's augmentations, as the reference's torchvision
//! pipeline does them on PIL images: `Resize(R)` (shorter side to R, bilinear), then
//! `CenterCrop(R)` or `RandomCrop(R)`, then `RandomHorizontalFlip()`.
//!
//! The resize is Pillow's (`Resample.c`): separable, horizontal pass first, a triangle filter
//! stretched by the downscale factor (so downscaling averages, as antialiased bilinear), and
//! 22-bit fixed-point coefficients with each pass rounded to 8 bits. The pixels equal Pillow's
//! exactly (runtime/tests/image.rs).

/// Interleaved 8-bit pixels: `channels` values per pixel, rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output index: (first input index, fixed-point weights), Pillow's `precompute_coeffs` and
/// `normalize_coeffs_8bpc` for the bilinear filter.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // bilinear support 1.0, stretched
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| {
                    let d = ((x as f64 - center + 0.5) * ss).abs();
                    if d < 1.0 {
                        1.0 - d
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1u64 << PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|v| {
                    let v = if total != 0.0 { v / total } else { *v };
                    if v < 0.0 {
                        (-0.5 + v * one) as i32
                    } else {
                        (0.5 + v * one) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize((width, height), BILINEAR)`.
pub fn resize(img: &Image, height: usize, width: usize) -> Image {
    let c = img.channels;
    let mut cur = img.clone();
    if width != cur.width {
        let coef = coefficients(cur.width, width);
        let mut out = vec![0u8; cur.height * width * c];
        for y in 0..cur.height {
            for (x, (x0, k)) in coef.iter().enumerate() {
                for ch in 0..c {
                    let mut acc = 1i64 << (PRECISION_BITS - 1);
                    for (j, kj) in k.iter().enumerate() {
                        acc += cur.pixels[(y * cur.width + x0 + j) * c + ch] as i64 * *kj as i64;
                    }
                    out[(y * width + x) * c + ch] = clip8(acc);
                }
            }
        }
        cur = Image {
            pixels: out,
            channels: c,
            height: cur.height,
            width,
        };
    }
    if height != cur.height {
        let coef = coefficients(cur.height, height);
        let mut out = vec![0u8; height * cur.width * c];
        for (y, (y0, k)) in coef.iter().enumerate() {
            for x in 0..cur.width {
                for ch in 0..c {
                    let mut acc = 1i64 << (PRECISION_BITS - 1);
                    for (j, kj) in k.iter().enumerate() {
                        acc += cur.pixels[((y0 + j) * cur.width + x) * c + ch] as i64 * *kj as i64;
                    }
                    out[(y * cur.width + x) * c + ch] = clip8(acc);
                }
            }
        }
        cur = Image {
            pixels: out,
            channels: c,
            height,
            width: cur.width,
        };
    }
    cur
}

/// The rectangle starting at (top, left).
pub fn crop(img: &Image, top: usize, left: usize, height: usize, width: usize) -> Image {
    let c = img.channels;
    let mut pixels = Vec::with_capacity(height * width * c);
    for y in top..top + height {
        let row = (y * img.width + left) * c;
        pixels.extend_from_slice(&img.pixels[row..row + width * c]);
    }
    Image {
        pixels,
        channels: c,
        height,
        width,
    }
}

pub fn flip_horizontal(img: &mut Image) {
    let c = img.channels;
    for y in 0..img.height {
        let row = &mut img.pixels[y * img.width * c..(y + 1) * img.width * c];
        for x in 0..img.width / 2 {
            for ch in 0..c {
                row.swap(x * c + ch, (img.width - 1 - x) * c + ch);
            }
        }
    }
}

/// How a loaded image becomes a `size`×`size` training input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Augment {
    /// Resize the shorter side to the input size first (else the image must already fit).
    pub resize: bool,
    /// Random crop position (training without `center_crop`); else centred.
    pub random_crop: bool,
    pub random_flip: bool,
}

impl Augment {
    /// Apply to `img` for a square output of `size`; `draw` is this sample's random word (crop
    /// position and flip; the same word gives the same augmentation).
    pub fn apply(&self, img: Image, size: usize, draw: u64) -> Image {
        let mut img = img;
        if self.resize && img.height.min(img.width) != size {
            // torchvision: the shorter side becomes `size`, the longer int(size·long/short).
            let (h, w) = (img.height, img.width);
            let (nh, nw) = if h <= w {
                (size, size * w / h)
            } else {
                (size * h / w, size)
            };
            img = resize(&img, nh, nw);
        }
        if self.resize && (img.height, img.width) != (size, size) {
            let (sh, sw) = (
                img.height - size.min(img.height),
                img.width - size.min(img.width),
            );
            let (top, left) = if self.random_crop {
                (
                    (draw % (sh as u64 + 1)) as usize,
                    ((draw >> 20) % (sw as u64 + 1)) as usize,
                )
            } else {
                // torchvision CenterCrop: int(round(offset / 2)), Python's half-to-even round.
                let half = |n: usize| (n as f64 / 2.0).round_ties_even() as usize;
                (half(sh), half(sw))
            };
            img = crop(&img, top, left, size, size);
        }
        if self.random_flip && (draw >> 63) == 1 {
            flip_horizontal(&mut img);
        }
        img
    }
}

/// Samples in [-range, range] as 8-bit pixels: (x/range + 1)/2 · 255, rounded, clamped (for
/// images, torchvision's save).
pub fn to_pixels(x: &[f32], range: f32) -> Vec<u8> {
    x.iter()
        .map(|v| ((v / range + 1.0) * 0.5 * 255.0 + 0.5).clamp(0.0, 255.0) as u8)
        .collect()
}

/// A lossless PNG grid of `n` samples (C, H, W each), 4 per row with 2-pixel black gaps
/// (torchvision's `make_grid(nrow=4, padding=2)`). Returns the PNG and its (C, H, W).
pub fn grid(
    samples: &[f32],
    n: usize,
    input: &[usize],
    range: f32,
) -> anyhow::Result<(Vec<u8>, [usize; 3])> {
    let (c, h, w) = (input[0], input[1], input[2]);
    let cols = n.min(4);
    let rows = n.div_ceil(4);
    let (gh, gw) = (rows * (h + 2) + 2, cols * (w + 2) + 2);
    let px = to_pixels(samples, range);
    let mut out = vec![0u8; gh * gw * c];
    for k in 0..n {
        let (r, q) = (k / 4, k % 4);
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let v = px[((k * c + ch) * h + y) * w + x];
                    out[((2 + r * (h + 2) + y) * gw + 2 + q * (w + 2) + x) * c + ch] = v;
                }
            }
        }
    }
    Ok((crate::data::io::encode_png(&out, c, gh, gw)?, [c, gh, gw]))
}
