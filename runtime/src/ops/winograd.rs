//! Winograd's minimal filtering F(4×4, 3×3) for the 3×3, stride-1 convolutions (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 4×4 output tile is
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` from its 6×6 input tile `d`, so that across channels the
//! convolution becomes 36 independent GEMMs, one per point ξ of the 6×6 transformed tile:
//!
//! ```text
//! forward          M[ξ] (O×P)  = U[ξ] (O×C) · V[ξ] (C×P)         U = G g Gᵀ,  V = Bᵀ d B
//! filter gradient  ∂U[ξ] (O×C) = Σ ∂M[ξ] (O×P) · V[ξ]ᵀ (P×C)     ∂M = A ∂Y Aᵀ, ∂g = Gᵀ ∂U G
//! ```
//!
//! for P tiles at a time: 36·O·C multiply-adds per tile where the direct convolution (or im2col +
//! GEMM) does 9·16·O·C, four times fewer. The input gradient is the forward of ∂Y with the
//! flipped kernel (conv.rs), so it runs here too. The filter gradient is the exact adjoint of the
//! forward's transforms: the gradient of the same linear map, not an approximation of it.
//!
//! The price is rounding: the transforms scale values by up to 8 and 1/24, so f32 results differ
//! from im2col's by a few units of 1e-6 relative where those differ from f64 by 1e-7 (measured in
//! the tests below). The tiles of a block are taken across samples, so the GEMMs are as long for
//! a 32² image (64 tiles) as for a large one; a block's transforms run 16 tiles to a vector.

use candle_core::WithDType;

use crate::ops::conv::{matmul, per_sample, sum_partials, SharedOut, Strided, COL_TILE};

/// Output tile side, input tile side (4 + 3 − 1), and points of the transformed tile.
const M: usize = 4;
const A: usize = 6;
const POINTS: usize = A * A;
/// Tiles per vector of a transform; blocks are whole multiples of it (the last one padded with
/// tiles that read zeros and write nothing).
const LANES: usize = 16;

/// The tiling of one convolution: a batch of (C, H, W) images, padded by `pad`, into 4×4 output
/// tiles, numbered across the batch (sample, tile row, tile column).
#[derive(Clone, Copy)]
pub(crate) struct Tiles {
    c: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    rows: usize,
    cols: usize,
    count: usize,
    pad: [usize; 2],
}

impl Tiles {
    fn new([b, c, h, w]: [usize; 4], pad: [usize; 2]) -> Self {
        let (ho, wo) = (h + 2 * pad[0] - 2, w + 2 * pad[1] - 2);
        let (rows, cols) = (ho.div_ceil(M), wo.div_ceil(M));
        Tiles {
            c,
            h,
            w,
            ho,
            wo,
            rows,
            cols,
            count: b * rows * cols,
            pad,
        }
    }

    /// (sample, first output row, first output column) of tile `t`.
    fn locate(&self, t: usize) -> (usize, usize, usize) {
        let per = self.rows * self.cols;
        let (b, r) = (t / per, t % per);
        (b, (r / self.cols) * M, (r % self.cols) * M)
    }

    /// Tiles per block, in whole vectors: the block's transformed input and output (36·(C + O)·P
    /// values) at most about one im2col band, and blocks enough for four per thread where the
    /// batch has the tiles (a batch of 32² images is 64 tiles each).
    fn block(&self, o: usize) -> usize {
        let fits = COL_TILE / (POINTS * (self.c + o)).max(1);
        let threads = candle_core::utils::get_num_threads().max(1);
        let shared = self.count.div_ceil(4 * threads);
        fits.min(shared).div_ceil(LANES).max(1) * LANES
    }
}

/// The float types the transforms run in (f32, and f64 for the tests' reference precision), each
/// compiled for the widest vector unit the CPU has (`cpu::vectorised`).
pub(crate) trait Float: 'static + WithDType + Default {
    /// `v[ξ][c][..n]` (a C×n matrix per point ξ) = the transformed 6×6 input tiles of every
    /// channel for tiles `first..first + n`; `d` is scratch of 72·n.
    fn input_tiles(x: &[Self], t: &Tiles, first: usize, n: usize, d: &mut [Self], v: &mut [Self]);
    /// `y` at the block's tiles = Aᵀ M A (+ bias), M the block's `o·n`-strided products.
    #[allow(clippy::too_many_arguments)]
    fn output_tiles(
        m: &[Self],
        t: &Tiles,
        o: usize,
        first: usize,
        n: usize,
        bias: Option<&[Self]>,
        scratch: &mut [Self],
        y: &SharedOut<Self>,
    );
    /// `dm[ξ][o][..n]` = A ∂Y Aᵀ for the block's tiles of ∂Y (zero beyond the output).
    fn gradient_tiles(
        dy: &[Self],
        t: &Tiles,
        o: usize,
        first: usize,
        n: usize,
        d: &mut [Self],
        dm: &mut [Self],
    );
}

macro_rules! float_kernels {
    ($t:ty, $input:ident, $output:ident, $gradient:ident) => {
        crate::ops::cpu::vectorised! {
            fn $input(x: &[$t], t: &Tiles, first: usize, n: usize, d: &mut [$t], v: &mut [$t]) {
                input_tiles(x, t, first, n, d, v)
            }
        }
        crate::ops::cpu::vectorised! {
            fn $output(
                m: &[$t],
                t: &Tiles,
                o: usize,
                first: usize,
                n: usize,
                bias: Option<&[$t]>,
                scratch: &mut [$t],
                y: &SharedOut<$t>,
            ) {
                output_tiles(m, t, o, first, n, bias, scratch, y)
            }
        }
        crate::ops::cpu::vectorised! {
            fn $gradient(
                dy: &[$t],
                t: &Tiles,
                o: usize,
                first: usize,
                n: usize,
                d: &mut [$t],
                dm: &mut [$t],
            ) {
                gradient_tiles(dy, t, o, first, n, d, dm)
            }
        }
        impl Float for $t {
            fn input_tiles(
                x: &[$t],
                t: &Tiles,
                first: usize,
                n: usize,
                d: &mut [$t],
                v: &mut [$t],
            ) {
                $input(x, t, first, n, d, v)
            }
            fn output_tiles(
                m: &[$t],
                t: &Tiles,
                o: usize,
                first: usize,
                n: usize,
                bias: Option<&[$t]>,
                scratch: &mut [$t],
                y: &SharedOut<$t>,
            ) {
                $output(m, t, o, first, n, bias, scratch, y)
            }
            fn gradient_tiles(
                dy: &[$t],
                t: &Tiles,
                o: usize,
                first: usize,
                n: usize,
                d: &mut [$t],
                dm: &mut [$t],
            ) {
                $gradient(dy, t, o, first, n, d, dm)
            }
        }
    };
}
float_kernels!(f32, input_tiles_f32, output_tiles_f32, gradient_tiles_f32);
float_kernels!(f64, input_tiles_f64, output_tiles_f64, gradient_tiles_f64);

// ------------------------------------------------------------------ the transforms, per lane

#[inline(always)]
fn c<T: WithDType>(v: f64) -> T {
    T::from_f64(v)
}

/// Bᵀ d (one column of a 6×6 input tile).
#[inline(always)]
fn input_1d<T: WithDType>(d: [T; A]) -> [T; A] {
    let (two, four, five) = (c::<T>(2.0), c::<T>(4.0), c::<T>(5.0));
    [
        four * d[0] - five * d[2] + d[4],
        d[3] + d[4] - four * (d[1] + d[2]),
        four * (d[1] - d[2]) - d[3] + d[4],
        two * (d[3] - d[1]) - d[2] + d[4],
        two * (d[1] - d[3]) - d[2] + d[4],
        four * d[1] - five * d[3] + d[5],
    ]
}

/// Aᵀ s (one column of a 6×6 product tile to 4 outputs).
#[inline(always)]
fn output_1d<T: WithDType>(s: [T; A]) -> [T; M] {
    let (two, four, eight) = (c::<T>(2.0), c::<T>(4.0), c::<T>(8.0));
    let (sum12, diff12) = (s[1] + s[2], s[1] - s[2]);
    let (sum34, diff34) = (s[3] + s[4], s[3] - s[4]);
    [
        s[0] + sum12 + sum34,
        diff12 + two * diff34,
        sum12 + four * sum34,
        diff12 + eight * diff34 + s[5],
    ]
}

/// A g (the adjoint of `output_1d`: 4 output gradients to the 6 points).
#[inline(always)]
fn output_adjoint_1d<T: WithDType>(g: [T; M]) -> [T; A] {
    let (two, four, eight) = (c::<T>(2.0), c::<T>(4.0), c::<T>(8.0));
    let (even1, odd1) = (g[0] + g[2], g[1] + g[3]);
    let (even2, odd2) = (g[0] + four * g[2], two * g[1] + eight * g[3]);
    [
        g[0],
        even1 + odd1,
        even1 - odd1,
        even2 + odd2,
        even2 - odd2,
        g[3],
    ]
}

/// G k (one column of a 3×3 kernel to the 6 points).
#[inline(always)]
fn filter_1d<T: WithDType>(k: [T; 3]) -> [T; A] {
    let (k0, k1, k2) = (k[0], k[1], k[2]);
    [
        k0 / c(4.0),
        (k0 + k1 + k2) / c(-6.0),
        (k0 - k1 + k2) / c(-6.0),
        k0 / c(24.0) + k1 / c(12.0) + k2 / c(6.0),
        k0 / c(24.0) - k1 / c(12.0) + k2 / c(6.0),
        k2,
    ]
}

/// Gᵀ u (the adjoint of `filter_1d`: 6 point gradients to the 3 taps).
#[inline(always)]
fn filter_adjoint_1d<T: WithDType>(u: [T; A]) -> [T; 3] {
    [
        u[0] / c(4.0) - (u[1] + u[2]) / c(6.0) + (u[3] + u[4]) / c(24.0),
        (u[2] - u[1]) / c(6.0) + (u[3] - u[4]) / c(12.0),
        (u[3] + u[4] - u[1] - u[2]) / c(6.0) + u[5],
    ]
}

/// A separable 2-D transform of `n` tiles at once, `f` applied to the columns then the rows:
/// `src` holds the I×I tile as I·I rows (row `r·I + j`, `src_stride` apart) of `n` lanes, `dst`
/// gets the O×O result likewise (`dst_stride` apart); `tmp` holds O·I rows of n.
#[inline(always)]
fn transform_2d<T: WithDType + Default, const I: usize, const O: usize>(
    src: &[T],
    src_stride: usize,
    dst: &mut [T],
    dst_stride: usize,
    n: usize,
    tmp: &mut [T],
    f: impl Fn([T; I]) -> [T; O] + Copy,
) {
    // Columns: line j is elements (k·I + j) of src, into tmp rows i·I + j.
    transform_lines(I, src, (src_stride, I * src_stride), tmp, (n, I * n), n, f);
    // Rows: line i (of O) is tmp rows i·I + k, into dst rows i·O + j.
    transform_lines(O, tmp, (I * n, n), dst, (O * dst_stride, dst_stride), n, f);
}

/// `f` on `lines` lines: line `l`'s element `k` is the row at `l·src.0 + k·src.1` (n lanes), its
/// output `i` goes to the row at `l·dst.0 + i·dst.1`. `n` is a multiple of `LANES`, so each step
/// works on fixed-size arrays the compiler turns into vector registers.
#[inline(always)]
fn transform_lines<T: WithDType + Default, const I: usize, const O: usize>(
    lines: usize,
    src: &[T],
    (src_line, src_elem): (usize, usize),
    dst: &mut [T],
    (dst_line, dst_elem): (usize, usize),
    n: usize,
    f: impl Fn([T; I]) -> [T; O],
) {
    for line in 0..lines {
        for p0 in (0..n).step_by(LANES) {
            let mut inp = [[T::default(); LANES]; I];
            for (k, lanes) in inp.iter_mut().enumerate() {
                let at = line * src_line + k * src_elem + p0;
                lanes.copy_from_slice(&src[at..at + LANES]);
            }
            let mut out = [[T::default(); LANES]; O];
            for l in 0..LANES {
                let v = f(std::array::from_fn(|k| inp[k][l]));
                for (lanes, v) in out.iter_mut().zip(v) {
                    lanes[l] = v;
                }
            }
            for (i, lanes) in out.iter().enumerate() {
                let at = line * dst_line + i * dst_elem + p0;
                dst[at..at + LANES].copy_from_slice(lanes);
            }
        }
    }
}

// ------------------------------------------------------------- a block of tiles, each way

/// The block's input tiles, channel by channel: gathered (zeros outside the image and for the
/// padding tiles past the batch's last) into 36 rows of n, then Bᵀ d B into `v[ξ][c]`.
#[inline(always)]
fn input_tiles<T: WithDType + Default>(
    x: &[T],
    t: &Tiles,
    first: usize,
    n: usize,
    d: &mut [T],
    v: &mut [T],
) {
    let (gathered, tmp) = d.split_at_mut(POINTS * n);
    let plane = t.h * t.w;
    for ci in 0..t.c {
        for p in 0..n {
            let tile = first + p;
            if tile >= t.count {
                for r in 0..POINTS {
                    gathered[r * n + p] = T::default();
                }
                continue;
            }
            let (b, r0, c0) = t.locate(tile);
            let image = &x[(b * t.c + ci) * plane..][..plane];
            let (top, left) = (r0.wrapping_sub(t.pad[0]), c0.wrapping_sub(t.pad[1]));
            if top.checked_add(A).is_some_and(|end| end <= t.h)
                && left.checked_add(A).is_some_and(|end| end <= t.w)
            {
                // Inside the image (most tiles): six rows of six, no bounds to test.
                for r in 0..A {
                    let src = &image[(top + r) * t.w + left..][..A];
                    for (k, &value) in src.iter().enumerate() {
                        gathered[(r * A + k) * n + p] = value;
                    }
                }
                continue;
            }
            for r in 0..A {
                let row = (r0 + r).checked_sub(t.pad[0]).filter(|&row| row < t.h);
                for k in 0..A {
                    let col = (c0 + k).checked_sub(t.pad[1]).filter(|&col| col < t.w);
                    gathered[(r * A + k) * n + p] = match (row, col) {
                        (Some(row), Some(col)) => image[row * t.w + col],
                        _ => T::default(),
                    };
                }
            }
        }
        transform_2d(
            gathered,
            n,
            &mut v[ci * n..],
            t.c * n,
            n,
            tmp,
            input_1d::<T>,
        );
    }
}

/// The block's output tiles, channel by channel: Aᵀ M A from `m[ξ][o]`, written (plus the
/// bias) where they lie inside the output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_tiles<T: WithDType + Default>(
    m: &[T],
    t: &Tiles,
    o: usize,
    first: usize,
    n: usize,
    bias: Option<&[T]>,
    scratch: &mut [T],
    y: &SharedOut<T>,
) {
    let (tiles, tmp) = scratch.split_at_mut(M * M * n);
    let plane = t.ho * t.wo;
    for oc in 0..o {
        transform_2d(&m[oc * n..], o * n, tiles, n, n, tmp, output_1d::<T>);
        let add = bias.map_or(T::default(), |b| b[oc]);
        for p in 0..n {
            let tile = first + p;
            if tile >= t.count {
                break;
            }
            let (b, r0, c0) = t.locate(tile);
            let (rows, cols) = (M.min(t.ho - r0), M.min(t.wo - c0));
            for a in 0..rows {
                let at = (b * o + oc) * plane + (r0 + a) * t.wo + c0;
                // SAFETY: this tile's own output row segment (tiles never overlap), in y.
                let out = unsafe { y.block(at, cols) };
                for (j, out) in out.iter_mut().enumerate() {
                    *out = tiles[(a * M + j) * n + p] + add;
                }
            }
        }
    }
}

/// The block's output gradients, channel by channel: each 4×4 tile of ∂Y (zeros outside the
/// output) to A ∂Y Aᵀ in `dm[ξ][o]`.
#[inline(always)]
fn gradient_tiles<T: WithDType + Default>(
    dy: &[T],
    t: &Tiles,
    o: usize,
    first: usize,
    n: usize,
    d: &mut [T],
    dm: &mut [T],
) {
    let (gathered, tmp) = d.split_at_mut(M * M * n);
    let plane = t.ho * t.wo;
    for oc in 0..o {
        for p in 0..n {
            let tile = first + p;
            let inside = (tile < t.count).then(|| t.locate(tile));
            if let Some((b, r0, c0)) =
                inside.filter(|&(_, r0, c0)| r0 + M <= t.ho && c0 + M <= t.wo)
            {
                // A whole tile of the output (most are): four rows of four.
                for a in 0..M {
                    let src = &dy[(b * o + oc) * plane + (r0 + a) * t.wo + c0..][..M];
                    for (j, &value) in src.iter().enumerate() {
                        gathered[(a * M + j) * n + p] = value;
                    }
                }
                continue;
            }
            for a in 0..M {
                for j in 0..M {
                    gathered[(a * M + j) * n + p] = match inside {
                        Some((b, r0, c0)) if r0 + a < t.ho && c0 + j < t.wo => {
                            dy[(b * o + oc) * plane + (r0 + a) * t.wo + c0 + j]
                        }
                        _ => T::default(),
                    };
                }
            }
        }
        transform_2d(
            gathered,
            n,
            &mut dm[oc * n..],
            o * n,
            n,
            tmp,
            output_adjoint_1d::<T>,
        );
    }
}

// ------------------------------------------------------------------------------ the passes

/// U[ξ][o][c] = G g Gᵀ for every (o, c) of the O×C×3×3 kernel `w`.
fn filter_points<T: WithDType + Default>(w: &[T], o: usize, c: usize) -> Vec<T> {
    let mut u = vec![T::default(); POINTS * o * c];
    for (oc_ci, g) in w.chunks_exact(9).enumerate() {
        let cols: [[T; A]; 3] = std::array::from_fn(|j| filter_1d([g[j], g[3 + j], g[6 + j]]));
        for i in 0..A {
            let row = filter_1d([cols[0][i], cols[1][i], cols[2][i]]);
            for (j, value) in row.into_iter().enumerate() {
                u[(i * A + j) * o * c + oc_ci] = value;
            }
        }
    }
    u
}

/// ∂g = Gᵀ ∂U G for every (o, c): the adjoint of `filter_points`.
fn filter_gradient<T: WithDType + Default>(du: &[T], o: usize, c: usize) -> Vec<T> {
    let mut dw = vec![T::default(); o * c * 9];
    for (oc_ci, g) in dw.chunks_exact_mut(9).enumerate() {
        let point = |i: usize, j: usize| du[(i * A + j) * o * c + oc_ci];
        // Columns: for each point column j, the 6 rows to 3 taps.
        let cols: [[T; 3]; A] =
            std::array::from_fn(|j| filter_adjoint_1d(std::array::from_fn(|i| point(i, j))));
        for r in 0..3 {
            let taps = filter_adjoint_1d(std::array::from_fn(|j| cols[j][r]));
            g[r * 3..r * 3 + 3].copy_from_slice(&taps);
        }
    }
    dw
}

/// A thread's buffers for one block of n tiles.
struct Scratch<T> {
    /// Gathered tiles and a transform's intermediate (72 rows of n).
    d: Vec<T>,
    /// The transformed input, 36 × C × n.
    v: Vec<T>,
    /// The products (forward) or transformed output gradients (filter gradient), 36 × O × n.
    m: Vec<T>,
}

impl<T: Default + Clone> Scratch<T> {
    fn new(t: &Tiles, o: usize, n: usize) -> Self {
        Scratch {
            d: vec![T::default(); 2 * POINTS * n],
            v: vec![T::default(); POINTS * t.c * n],
            m: vec![T::default(); POINTS * o * n],
        }
    }
}

/// The forward of a 3×3, stride-1 convolution (`w_dims` = [O, C, 3, 3]), plus `bias`.
pub(crate) fn forward<T: Float>(
    x: &[T],
    x_dims: [usize; 4],
    w: &[T],
    w_dims: [usize; 4],
    bias: Option<&[T]>,
    pad: [usize; 2],
) -> Vec<T> {
    let t = Tiles::new(x_dims, pad);
    let (o, c) = (w_dims[0], w_dims[1]);
    let u = filter_points(w, o, c);
    let n = t.block(o);
    let mut y = vec![T::default(); x_dims[0] * o * t.ho * t.wo];
    let out = SharedOut(y.as_mut_ptr());
    per_sample(
        t.count.div_ceil(n),
        || Scratch::new(&t, o, n),
        |block, s| {
            let first = block * n;
            T::input_tiles(x, &t, first, n, &mut s.d, &mut s.v);
            for xi in 0..POINTS {
                // SAFETY: this thread's own O×n products of point ξ.
                unsafe {
                    matmul(
                        (o, n, c),
                        s.m.as_mut_ptr().add(xi * o * n),
                        n,
                        Strided::rows(&u[xi * o * c..], c),
                        Strided::rows(&s.v[xi * c * n..], n),
                        false,
                    )
                };
            }
            T::output_tiles(&s.m, &t, o, first, n, bias, &mut s.d, &out);
        },
    );
    y
}

/// ∂L/∂w of a 3×3, stride-1 convolution: per block, ∂U[ξ] += ∂M[ξ] · V[ξ]ᵀ, each thread summing
/// its blocks, then the threads' sums taken back through Gᵀ · G.
pub(crate) fn backward_filter<T: Float>(
    x: &[T],
    x_dims: [usize; 4],
    dy: &[T],
    w_dims: [usize; 4],
    pad: [usize; 2],
) -> Vec<T> {
    let t = Tiles::new(x_dims, pad);
    let (o, c) = (w_dims[0], w_dims[1]);
    let n = t.block(o);
    let partial = per_sample(
        t.count.div_ceil(n),
        || {
            (
                Scratch::new(&t, o, n),
                vec![T::default(); POINTS * o * c],
                false,
            )
        },
        |block, (s, du, started)| {
            let first = block * n;
            T::input_tiles(x, &t, first, n, &mut s.d, &mut s.v);
            T::gradient_tiles(dy, &t, o, first, n, &mut s.d, &mut s.m);
            for xi in 0..POINTS {
                // SAFETY: this thread's own O×C sum of point ξ.
                unsafe {
                    matmul(
                        (o, c, n),
                        du.as_mut_ptr().add(xi * o * c),
                        c,
                        Strided::rows(&s.m[xi * o * n..], n),
                        Strided::transposed(&s.v[xi * c * n..], n),
                        *started,
                    )
                };
            }
            *started = true;
        },
    );
    let du = sum_partials(
        partial
            .into_iter()
            .filter(|(_, _, started)| *started)
            .map(|(_, du, _)| du),
    );
    filter_gradient(&du, o, c)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::ops::conv::{conv_with, ConvAlgorithm};

    /// Output, input gradient and filter and bias gradients of `conv_with` by each algorithm.
    fn run(
        x: &Var,
        w: &Var,
        b: &Var,
        pad: usize,
        probe: &Tensor,
        algorithm: ConvAlgorithm,
    ) -> Result<[Tensor; 4]> {
        let y = conv_with(
            x.as_tensor(),
            w.as_tensor(),
            Some(b.as_tensor()),
            pad,
            algorithm,
        )?;
        let g = (&y * probe)?.sum_all()?.backward()?;
        let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        Ok([y, grad(x), grad(w), grad(b)])
    }

    /// Winograd equals im2col + GEMM in f64 within 1e-10 of the largest value — output, input,
    /// filter and bias gradients — at odd sizes: channels that fill no vector, images smaller
    /// than a tile (1 pixel) or not whole tiles, padding 0, 1 and 2, blocks that cross samples.
    #[test]
    fn equals_im2col_in_f64_at_odd_sizes() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, in, out, height, width, padding)
        for (b, c, o, h, w, pad) in [
            (2, 3, 5, 7, 6, 1),
            (1, 17, 9, 1, 1, 1),
            (3, 16, 20, 9, 13, 1),
            (1, 5, 4, 4, 4, 0),
            (2, 4, 3, 5, 6, 2),
            (5, 1, 1, 3, 3, 1),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, c, h, w), &dev)?)?;
            let wt = Var::from_tensor(&Tensor::randn(0f64, 1.0, (o, c, 3, 3), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f64, 1.0, o, &dev)?)?;
            let (ho, wo) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let probe = Tensor::randn(0f64, 1.0, (b, o, ho, wo), &dev)?;
            let ours = run(&x, &wt, &bias, pad, &probe, ConvAlgorithm::WinogradF4x3)?;
            let reference = run(&x, &wt, &bias, pad, &probe, ConvAlgorithm::Im2colGemm)?;
            for ((a, r), what) in ours.iter().zip(&reference).zip(["y", "dx", "dw", "db"]) {
                let scale = r.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
                let d = (a - r)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
                assert!(
                    d < 1e-10,
                    "{b}x{c}x{h}x{w} -> {o}, pad {pad}: {what} off by {d}"
                );
            }
        }
        Ok(())
    }

    /// In f32 Winograd rounds more than im2col — the transforms scale values by up to 8 and
    /// 1/24 — but stays at a few 1e-6 of the largest value (measured: max 5.2e-6 … 1.7e-5, rms
    /// 2e-7 … 9e-7 where im2col's are ≤ 9e-7 and ≤ 1e-7), against the f64 convolution, output
    /// and both gradients, with He-initialised weights.
    #[test]
    fn rounds_in_f32_within_a_few_millionths() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, side) in [(48, 96, 32), (192, 192, 16), (384, 384, 8)] {
            let x = Tensor::randn(0f64, 1.0, (2, c, side, side), &dev)?;
            let w =
                (Tensor::randn(0f64, 1.0, (o, c, 3, 3), &dev)? * (2.0 / (9.0 * c as f64)).sqrt())?;
            let probe = Tensor::randn(0f64, 1.0, (2, o, side, side), &dev)?;
            let run = |dtype, algorithm| -> Result<Vec<Tensor>> {
                let x = Var::from_tensor(&x.to_dtype(dtype)?)?;
                let w = Var::from_tensor(&w.to_dtype(dtype)?)?;
                let y = conv_with(x.as_tensor(), w.as_tensor(), None, 1, algorithm)?;
                let g = (&y * probe.to_dtype(dtype)?)?.sum_all()?.backward()?;
                [
                    &y,
                    g.get(x.as_tensor()).unwrap(),
                    g.get(w.as_tensor()).unwrap(),
                ]
                .into_iter()
                .map(|t| t.to_dtype(DType::F64))
                .collect()
            };
            let exact = run(DType::F64, ConvAlgorithm::Im2colGemm)?;
            let ours = run(DType::F32, ConvAlgorithm::WinogradF4x3)?;
            for ((a, e), what) in ours.iter().zip(&exact).zip(["y", "dx", "dw"]) {
                let scale = e.abs()?.max_all()?.to_scalar::<f64>()?;
                let max = (a - e)?.abs()?.max_all()?.to_scalar::<f64>()? / scale;
                let rms = (a - e)?.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt() / scale;
                assert!(
                    max < 5e-5 && rms < 2e-6,
                    "{c}->{o} @{side}: {what} max {max:e} rms {rms:e}"
                );
            }
        }
        Ok(())
    }
}
