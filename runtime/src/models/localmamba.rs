//! LocalMamba as the reference builds it (`LocalMamba2DModel`, spec/reference/diffusion.md
//! §2.3): the hourglass skeleton of hourglass.rs (patching, mapping network, levels with 2×2
//! merges and lerped splits) with a state-space layer in place of attention and feed-forward:
//!
//! ```text
//! layer:  x + DropPath(SS2D(AdaRMSNorm(x, cond)))          (no MLP)
//! SS2D:   x, z = in_proj(x);  x = SiLU(depthwise k×k conv(x));  z = SiLU(z)
//!         per scan direction k: the tokens in k's order → x_proj → (dt, B, C) → dt_proj
//!         → selective scan (ops/selective_scan.rs, Δ bias, softplus) → back to raster order
//!         → the shared BiAttn channel gate;  y = Σ_k;  out_proj(LayerNorm(y) · z)
//! output: x + Conv2d 3×3(x), zero-initialised (`output_smoother`)
//! ```
//!
//! Scan directions (LocalVMamba's `MultiScan`): `h` raster, `v` column-major, `wK` K×K windows
//! (the grid zero-padded at the bottom and right to multiples of K; windows in raster order,
//! raster order inside each; the padding tokens are scanned too, as the reference's kernels
//! do), each with a `_flip` (reversed) variant. Every direction's output returns to raster
//! order through the exact inverse of its scan; LocalVMamba's `v` inverse is a plain transpose,
//! which misplaces tokens on non-square grids (time series): fixed here.
//!
//! Parameter names are LocalVMamba's (`op.in_proj`, `op.x_proj_weight` (K, R + 2N, E),
//! `op.dt_projs_weight` (K, E, R), `op.dt_projs_bias`, `op.A_logs`, `op.Ds`, `op.out_norm`,
//! `op.out_proj`, `op.multi_scan.attn.*`) under the skeleton's level names; the counts equal the
//! reference's for every preset (runtime/tests/localmamba.rs).

use std::rc::Rc;

use candle_core::{Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::models::hourglass::{AdaRmsNorm, MappingShape, Skeleton};
use crate::models::nn::{dropout, LayerNorm, Linear, Mode, Params};
use crate::models::tape::{Node, Tape};

/// One scan direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scan {
    /// Raster order (`h`).
    Rows { flip: bool },
    /// Column-major order (`v`).
    Columns { flip: bool },
    /// `size`×`size` windows (`w2`, `w7`).
    Windows { size: usize, flip: bool },
}

impl Scan {
    /// The reference's spelling: `h`, `v`, `w7`, `h_flip`, ...
    pub fn parse(s: &str) -> Option<Scan> {
        let (base, flip) = match s.strip_suffix("_flip") {
            Some(b) => (b, true),
            None => (s, false),
        };
        match base {
            "h" => Some(Scan::Rows { flip }),
            "v" => Some(Scan::Columns { flip }),
            _ => base
                .strip_prefix('w')
                .and_then(|k| k.parse().ok())
                .filter(|&k: &usize| k >= 1)
                .map(|size| Scan::Windows { size, flip }),
        }
    }

    /// The grid's raster index (in the grid padded to `padded` columns) of each position of the
    /// sequence, and the padded grid's size.
    fn order(&self, h: usize, w: usize) -> (Vec<usize>, (usize, usize)) {
        let (mut order, padded) = match *self {
            Scan::Rows { .. } => ((0..h * w).collect::<Vec<_>>(), (h, w)),
            Scan::Columns { .. } => (
                (0..w)
                    .flat_map(|j| (0..h).map(move |i| i * w + j))
                    .collect(),
                (h, w),
            ),
            Scan::Windows { size: k, .. } => {
                let (hp, wp) = (h.div_ceil(k) * k, w.div_ceil(k) * k);
                let order = (0..hp / k)
                    .flat_map(|wi| (0..wp / k).map(move |wj| (wi, wj)))
                    .flat_map(|(wi, wj)| {
                        (0..k)
                            .flat_map(move |a| (0..k).map(move |b| (wi * k + a) * wp + wj * k + b))
                    })
                    .collect();
                (order, (hp, wp))
            }
        };
        let flip = match *self {
            Scan::Rows { flip } | Scan::Columns { flip } | Scan::Windows { flip, .. } => flip,
        };
        if flip {
            order.reverse();
        }
        (order, padded)
    }
}

/// The model's shape, as the config's `[model]` and `[model.extras]` give it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalMambaShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// The input patch (p_h, p_w); merges inside are always 2×2.
    pub patch: [usize; 2],
    /// Per level, outermost first; the last is the middle level.
    pub dims: Vec<usize>,
    pub depths: Vec<usize>,
    /// N, the state size of the scans.
    pub d_state: usize,
    /// E / width (`ssm_ratio`, the contract's `expand`).
    pub ssm_ratio: f64,
    /// The depthwise convolution's kernel (`d_conv`, odd; padded to keep the grid).
    #[serde(default = "three")]
    pub d_conv: usize,
    /// The rank of Δ's projection (`ssm_dt_rank`); `None`: ⌈width / 16⌉ ("auto").
    #[serde(default)]
    pub dt_rank: Option<usize>,
    pub scans: Vec<Scan>,
    pub mapping_width: usize,
    pub mapping_depth: usize,
    pub mapping_d_ff: usize,
    pub class_rows: usize,
    pub mapping_cond_dim: usize,
    /// The mapping network's dropout.
    pub dropout: f64,
    /// Per level, dropout on SS2D's output (LocalVMamba's after `out_proj`; `dropout_rate`).
    #[serde(default)]
    pub level_dropout: Vec<f64>,
    /// Stochastic depth of each layer's residual branch.
    pub drop_path: f64,
}

fn three() -> usize {
    3
}

/// LocalVMamba's `BiAttn` channel gate: t · σ(channel_select(GELU(global_reduce(mean over
/// tokens of LayerNorm(t))))), with E/8 hidden channels.
struct BiAttn {
    norm: LayerNorm,
    global_reduce: Linear,
    channel_select: Linear,
}

/// A linear with N(0, 0.02²) weights and zero bias (VMamba's `_init_weights`).
fn small_linear(p: &mut Params, name: &str, din: usize, dout: usize, bias: bool) -> Result<Linear> {
    let weight = p.normal(format!("{name}.weight"), &[dout, din], 0.02)?;
    let bias = bias
        .then(|| p.constant(format!("{name}.bias"), &[dout], 0.0))
        .transpose()?;
    Linear::from_parts(weight, bias)
}

impl BiAttn {
    fn new(p: &mut Params, name: &str, e: usize) -> Result<Self> {
        let reduced = e / 8;
        Ok(BiAttn {
            norm: LayerNorm::new(p, &format!("{name}.norm"), e)?,
            global_reduce: small_linear(p, &format!("{name}.global_reduce"), e, reduced, true)?,
            channel_select: small_linear(p, &format!("{name}.channel_select"), reduced, e, true)?,
        })
    }

    /// t (B, L, E).
    fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let g = self.norm.forward(t)?.mean_keepdim(1)?;
        let g = crate::ops::gelu::gelu(&self.global_reduce.forward(&g)?)?;
        let gate = candle_nn::ops::sigmoid(&self.channel_select.forward(&g)?)?;
        t.broadcast_mul(&gate)
    }
}

/// The selective-scan layer over a 2-D grid.
struct Ss2d {
    scans: Vec<Scan>,
    e: usize,
    rank: usize,
    state: usize,
    in_proj: Linear,
    /// Depthwise k×k: (E, 1, k, k) and (E).
    conv_weight: Tensor,
    conv_bias: Tensor,
    x_proj_weight: Tensor,
    dt_projs_weight: Tensor,
    dt_projs_bias: Tensor,
    a_logs: Tensor,
    ds: Tensor,
    out_norm: LayerNorm,
    out_proj: Linear,
    attn: BiAttn,
}

impl Ss2d {
    fn new(p: &mut Params, name: &str, d: usize, s: &LocalMambaShape) -> Result<Self> {
        let e = (s.ssm_ratio * d as f64) as usize;
        let (k, n, rank) = (
            s.scans.len(),
            s.d_state,
            s.dt_rank.unwrap_or(d.div_ceil(16)),
        );
        if s.d_conv.is_multiple_of(2) {
            candle_core::bail!("{name}: the depthwise kernel {} must be odd", s.d_conv);
        }
        // PyTorch's Conv2d init: U(±1/√fan_in), fan_in = k² for a depthwise kernel.
        let c = s.d_conv;
        let bound = 1.0 / c as f64;
        let conv_weight = p.uniform(format!("{name}.conv2d.weight"), &[e, 1, c, c], bound)?;
        let conv_bias = p.uniform(format!("{name}.conv2d.bias"), &[e], bound)?;
        let x_proj_weight = p.uniform(
            format!("{name}.x_proj_weight"),
            &[k, rank + 2 * n, e],
            1.0 / (e as f64).sqrt(),
        )?;
        let dt_projs_weight = p.uniform(
            format!("{name}.dt_projs_weight"),
            &[k, e, rank],
            1.0 / (rank as f64).sqrt(),
        )?;
        // Mamba's dt init: dt log-uniform in [1e-3, 0.1] (at least 1e-4), the bias its
        // softplus inverse, so softplus(bias) starts at dt.
        let u = p.draw_uniform(&[k, e], 1.0)?;
        let (lo, hi) = (1e-3f64.ln(), 0.1f64.ln());
        let dt = (((u + 1.0)? / 2.0)? * (hi - lo))?
            .affine(1.0, lo)?
            .exp()?
            .maximum(1e-4)?;
        let inverse = (&dt + dt.neg()?.exp()?.affine(-1.0, 1.0)?.log()?)?; // dt + log(1 − e^−dt)
        let dt_projs_bias = p.trainable(format!("{name}.dt_projs_bias"), &inverse)?;
        // S4D-real: A = −(1, 2, ..., N) in every row, stored as its log.
        let rows: Vec<f32> = (0..k * e)
            .flat_map(|_| (1..=n).map(|i| (i as f32).ln()))
            .collect();
        let a_logs = p.trainable(
            format!("{name}.A_logs"),
            &Tensor::from_vec(rows, (k * e, n), x_proj_weight.device())?,
        )?;
        Ok(Ss2d {
            scans: s.scans.clone(),
            e,
            rank,
            state: n,
            in_proj: small_linear(p, &format!("{name}.in_proj"), d, 2 * e, false)?,
            conv_weight,
            conv_bias,
            x_proj_weight,
            dt_projs_weight,
            dt_projs_bias,
            a_logs,
            ds: p.constant(format!("{name}.Ds"), &[k * e], 1.0)?,
            out_norm: LayerNorm::new(p, &format!("{name}.out_norm"), e)?,
            out_proj: small_linear(p, &format!("{name}.out_proj"), e, d, false)?,
            attn: BiAttn::new(p, &format!("{name}.multi_scan.attn"), e)?,
        })
    }

    /// The depthwise k×k convolution (padding k/2) of x (B, E, H, W) as k² shifted products,
    /// in ops with a backward.
    fn depthwise(&self, x: &Tensor) -> Result<Tensor> {
        let (_, e, h, w) = x.dims4()?;
        let k = self.conv_weight.dim(3)?;
        let padded = x
            .pad_with_zeros(2, k / 2, k / 2)?
            .pad_with_zeros(3, k / 2, k / 2)?;
        let mut sum = self
            .conv_bias
            .reshape((1, e, 1, 1))?
            .broadcast_as(x.shape())?
            .contiguous()?;
        for a in 0..k {
            for b in 0..k {
                let tap = self
                    .conv_weight
                    .narrow(2, a, 1)?
                    .narrow(3, b, 1)?
                    .reshape((1, e, 1, 1))?;
                let shifted = padded.narrow(2, a, h)?.narrow(3, b, w)?;
                sum = (sum + shifted.broadcast_mul(&tap)?)?;
            }
        }
        Ok(sum)
    }

    /// x (B, H, W, d) → (B, H, W, d).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = x.dims4()?;
        let (e, n, r) = (self.e, self.state, self.rank);
        let dev = x.device();
        let xz = self.in_proj.forward(x)?;
        let z = xz.narrow(3, e, e)?.silu()?;
        let xc = self
            .depthwise(&xz.narrow(3, 0, e)?.permute((0, 3, 1, 2))?.contiguous()?)?
            .silu()?;
        // Each direction's sequence (B, E, L_k), end-padded with zeros to the longest.
        let orders: Vec<(Vec<usize>, (usize, usize))> =
            self.scans.iter().map(|s| s.order(h, w)).collect();
        let longest = orders.iter().map(|(o, _)| o.len()).max().unwrap_or(0);
        let mut seqs = vec![];
        for (order, (hp, wp)) in &orders {
            let grid = xc
                .pad_with_zeros(2, 0, hp - h)?
                .pad_with_zeros(3, 0, wp - w)?;
            let idx = index(order, dev)?;
            let seq = grid
                .contiguous()?
                .reshape((b, e, hp * wp))?
                .index_select(&idx, 2)?;
            seqs.push(seq.pad_with_zeros(2, 0, longest - order.len())?);
        }
        let xs = Tensor::stack(&seqs, 1)?; // (B, K, E, L)
        let k = self.scans.len();
        let (mut dts, mut bs, mut cs) = (vec![], vec![], vec![]);
        for i in 0..k {
            let xi = xs.narrow(1, i, 1)?.squeeze(1)?; // (B, E, L)
            let dbl = self.x_proj_weight.get(i)?.broadcast_matmul(&xi)?; // (B, R + 2N, L)
            let dt = dbl.narrow(1, 0, r)?;
            dts.push(self.dt_projs_weight.get(i)?.broadcast_matmul(&dt)?); // (B, E, L)
            bs.push(dbl.narrow(1, r, n)?);
            cs.push(dbl.narrow(1, r + n, n)?);
        }
        let u = xs.reshape((b, k * e, longest))?;
        let delta = Tensor::cat(&dts, 1)?;
        let a = self.a_logs.exp()?.neg()?;
        let (bs, cs) = (Tensor::stack(&bs, 1)?, Tensor::stack(&cs, 1)?);
        let bias = self.dt_projs_bias.flatten_all()?;
        let ys = crate::ops::selective_scan::selective_scan(
            &u, &delta, &a, &bs, &cs, &self.ds, &bias, true,
        )?
        .reshape((b, k, e, longest))?;
        // Back to raster order (the inverse of each scan, without its padding), gated, summed.
        let mut y: Option<Tensor> = None;
        for (i, (order, (_, wp))) in orders.iter().enumerate() {
            let position = positions(order, *wp, h, w);
            let yi = ys
                .narrow(1, i, 1)?
                .squeeze(1)?
                .contiguous()?
                .index_select(&index(&position, dev)?, 2)?;
            let gated = self.attn.forward(&yi.transpose(1, 2)?.contiguous()?)?; // (B, HW, E)
            y = Some(match y {
                Some(sum) => (sum + gated)?,
                None => gated,
            });
        }
        let y = y.expect("at least one scan direction");
        let y = (self.out_norm.forward(&y)?.reshape((b, h, w, e))? * z)?;
        self.out_proj.forward(&y)
    }
}

/// `x + DropPath(SS2D(AdaRMSNorm(x, cond)))`.
struct Block {
    norm: AdaRmsNorm,
    op: Ss2d,
}

/// For each cell of the h×w grid in raster order, its position in a sequence that visits the
/// grid padded to `wp` columns in `order`: the inverse of the scan, padding dropped.
fn positions(order: &[usize], wp: usize, h: usize, w: usize) -> Vec<usize> {
    let mut position = vec![0usize; h * w];
    for (s, &cell) in order.iter().enumerate() {
        let (row, col) = (cell / wp, cell % wp);
        if row < h && col < w {
            position[row * w + col] = s;
        }
    }
    position
}

fn index(v: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        v.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        v.len(),
        dev,
    )
}

pub struct LocalMamba {
    shape: LocalMambaShape,
    skeleton: Skeleton<Block>,
    smoother_weight: Tensor,
    smoother_bias: Tensor,
}

impl LocalMamba {
    pub fn new(shape: &LocalMambaShape, p: &mut Params) -> Result<Self> {
        if shape.dims.is_empty() || shape.dims.len() != shape.depths.len() || shape.scans.is_empty()
        {
            candle_core::bail!(
                "LocalMamba needs as many depths as dims ({:?}, {:?}) and a scan direction",
                shape.dims,
                shape.depths
            );
        }
        let m = shape.mapping_width;
        let mapping = MappingShape {
            width: m,
            depth: shape.mapping_depth,
            d_ff: shape.mapping_d_ff,
            class_rows: shape.class_rows,
            cond_dim: shape.mapping_cond_dim,
            dropout: shape.dropout,
            // The reference's LocalMamba takes ln σ / 4 with no guard.
            sigma_eps: 0.0,
        };
        let io = (shape.in_channels, shape.out_channels, shape.patch);
        let skeleton = Skeleton::new(
            p,
            io,
            &mapping,
            (&shape.dims, &shape.depths),
            |p, name, i, _| {
                let d = shape.dims[i];
                Ok(Block {
                    norm: AdaRmsNorm::new(p, &format!("{name}.norm"), d, m)?,
                    op: Ss2d::new(p, &format!("{name}.op"), d, shape)?,
                })
            },
        )?;
        let c = shape.out_channels;
        let smoother_weight = p.constant("output_smoother.weight".into(), &[c, c, 3, 3], 0.0)?;
        let smoother_bias = p.constant("output_smoother.bias".into(), &[c], 0.0)?;
        Ok(LocalMamba {
            shape: shape.clone(),
            skeleton,
            smoother_weight,
            smoother_bias,
        })
    }

    /// The prediction (B, out, H, W) for x (B, in, H, W) at noise levels `sigma` (B,), with
    /// class rows and extra mapping inputs when the shape has them; dropout and drop-path when
    /// `mode` trains.
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        class: Option<&Tensor>,
        mapping_cond: Option<&Tensor>,
        mode: &mut Mode,
    ) -> Result<Tensor> {
        Tape::forward(mode, |tape| {
            self.record(tape, x, (sigma, class, mapping_cond))
        })
    }

    /// The forward on `tape` (models/tape.rs: one segment per block, which is what gradient
    /// checkpointing recomputes).
    pub fn record<'a>(
        &'a self,
        tape: &mut Tape<'a>,
        x: &Tensor,
        conditions: (&Tensor, Option<&Tensor>, Option<&Tensor>),
    ) -> Result<Node> {
        let (drop_path, level_dropout) = (self.shape.drop_path, &self.shape.level_dropout);
        let block =
            move |block: &Block, x: &Tensor, level: usize, cond: &Tensor, mode: &mut Mode| {
                let branch = block.op.forward(&block.norm.forward(x, cond)?)?;
                let p = level_dropout.get(level).copied().unwrap_or(0.0);
                let branch = dropout(&branch, p, mode)?;
                // DropPath: one inverted-dropout draw per sample.
                let ones = Tensor::ones((x.dim(0)?, 1, 1, 1), x.dtype(), x.device())?;
                x + branch.broadcast_mul(&dropout(&ones, drop_path, mode)?)?
            };
        let y = self.skeleton.record(tape, x, conditions, Rc::new(block))?;
        tape.apply(&[y], |v, _| {
            let y = v[0].contiguous()?;
            let smoothed =
                crate::ops::conv::conv(&y, &self.smoother_weight, Some(&self.smoother_bias), 1)?;
            &y + smoothed
        })
    }
}

/// The model's trainable parameters, counted without drawing them.
pub fn count_parameters(shape: &LocalMambaShape) -> Result<usize> {
    let mut p = Params::counting();
    LocalMamba::new(shape, &mut p)?;
    Ok(p.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_visit_every_cell_once_in_their_order() {
        // 3×4 grid, w2 windows: padded to 4×4, windows (0,0) (0,1) (1,0) (1,1).
        let (order, padded) = Scan::Windows {
            size: 2,
            flip: false,
        }
        .order(3, 4);
        assert_eq!(padded, (4, 4));
        assert_eq!(&order[..8], &[0, 1, 4, 5, 2, 3, 6, 7]);
        let (cols, _) = Scan::Columns { flip: true }.order(2, 3);
        assert_eq!(cols, [5, 2, 4, 1, 3, 0]);
        assert_eq!(
            Scan::parse("w7_flip"),
            Some(Scan::Windows {
                size: 7,
                flip: true
            })
        );
        assert_eq!(Scan::parse("v"), Some(Scan::Columns { flip: false }));
        assert_eq!(Scan::parse("x"), None);
    }

    /// Scanning a grid's values and reading them back through the inverse gives the grid, for
    /// every kind of direction, flipped or not, on square, non-square and padded grids.
    #[test]
    fn every_scan_is_undone_exactly() {
        for (h, w) in [(4, 4), (3, 5), (8, 6), (2, 9)] {
            for name in ["h", "v", "w2", "w3", "w7", "h_flip", "v_flip", "w7_flip"] {
                let scan = Scan::parse(name).unwrap();
                let (order, (_, wp)) = scan.order(h, w);
                // The sequence: each padded cell's raster value, None in the padding.
                let seq: Vec<Option<usize>> = order
                    .iter()
                    .map(|&c| (c / wp < h && c % wp < w).then(|| (c / wp) * w + c % wp))
                    .collect();
                let back: Vec<Option<usize>> = positions(&order, wp, h, w)
                    .iter()
                    .map(|&s| seq[s])
                    .collect();
                let want: Vec<Option<usize>> = (0..h * w).map(Some).collect();
                assert_eq!(back, want, "{name} on {h}×{w}");
            }
        }
    }
}
