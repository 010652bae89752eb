//! A forward recorded as segments, so that gradient checkpointing works for any graph of
//! layers (skips and a condition every layer reads included), not only a chain.
//!
//! A model writes its forward once, as `tape.apply(inputs, segment)` calls. Without
//! checkpointing each segment runs as it would inline and Candle's graph holds every
//! activation. With checkpointing each segment's output is detached, so the forward keeps only
//! the segments' outputs; `backward` then walks the segments in reverse, recomputes each from
//! its saved inputs with a graph, and backpropagates the gradient of its output into its
//! parameters and into its inputs' gradients (summed where an input feeds several segments, as
//! the condition and the skips do). Recorded in the order they run, every consumer of a value
//! comes after its producer, so a value's gradient is complete when its producer is reached.
//!
//! Dropout draws come from a seed per segment (`Mode::train(hash(seed, index))`) in both modes,
//! so a recompute drops the same elements and both modes compute the same numbers.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use rand::Rng;

use crate::models::nn::Mode;
use crate::ops::cpu::splitmix64;

/// A value on the tape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Node(usize);

type Segment<'a> = Box<dyn Fn(&[Tensor], &mut Mode) -> Result<Tensor> + 'a>;

pub struct Tape<'a> {
    checkpoint: bool,
    /// The forward's dropout seed; `None` in evaluation.
    seed: Option<u64>,
    values: Vec<Tensor>,
    /// Whether each value is an input (no gradient wanted).
    inputs: Vec<bool>,
    /// Per segment: its inputs, its output and the function (kept only when checkpointing).
    segments: Vec<(Vec<Node>, Node, Option<Segment<'a>>)>,
}

impl<'a> Tape<'a> {
    /// A forward in training (`seed`: dropout's draws) or evaluation (`None`), with or without
    /// checkpointing.
    pub fn new(seed: Option<u64>, checkpoint: bool) -> Self {
        Tape {
            checkpoint,
            seed,
            values: vec![],
            inputs: vec![],
            segments: vec![],
        }
    }

    /// A value the segments read but no gradient flows into (the model's input, σ, labels).
    pub fn input(&mut self, t: &Tensor) -> Node {
        self.values.push(t.clone());
        self.inputs.push(true);
        Node(self.values.len() - 1)
    }

    pub fn value(&self, n: Node) -> &Tensor {
        &self.values[n.0]
    }

    /// `segment(inputs, mode)` run on the values of `inputs`; its output's node.
    pub fn apply(
        &mut self,
        inputs: &[Node],
        segment: impl Fn(&[Tensor], &mut Mode) -> Result<Tensor> + 'a,
    ) -> Result<Node> {
        let index = self.segments.len();
        let values: Vec<Tensor> = inputs.iter().map(|n| self.values[n.0].clone()).collect();
        let out = segment(&values, &mut self.mode(index))?;
        let out = match self.checkpoint {
            true => out.detach(),
            false => out,
        };
        self.values.push(out);
        self.inputs.push(false);
        let node = Node(self.values.len() - 1);
        let kept = self.checkpoint.then(|| Box::new(segment) as Segment<'a>);
        self.segments.push((inputs.to_vec(), node, kept));
        Ok(node)
    }

    /// Segment `index`'s dropout stream.
    fn mode(&self, index: usize) -> Mode {
        match self.seed {
            Some(s) => Mode::train(splitmix64(s ^ ((index as u64 + 1) << 20))),
            None => Mode::eval(),
        }
    }

    /// The plain forward of a model that records itself (`record` on the tape it is given):
    /// its output, with the graph Candle keeps; dropout when `mode` trains.
    pub fn forward(
        mode: &mut Mode,
        record: impl FnOnce(&mut Tape<'a>) -> Result<Node>,
    ) -> Result<Tensor> {
        let mut tape = Tape::new(mode.train.then(|| mode.rng.random::<u64>()), false);
        let out = record(&mut tape)?;
        Ok(tape.values.swap_remove(out.0))
    }

    /// `loss_of(value of out)` and the gradients of every parameter the segments read. Without
    /// checkpointing, the plain backward of the graph.
    pub fn backward(
        self,
        out: Node,
        loss_of: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, GradStore)> {
        if !self.checkpoint {
            let loss = loss_of(&self.values[out.0])?;
            let grads = loss.backward()?;
            return Ok((loss, grads));
        }
        let last = Var::from_tensor(&self.values[out.0])?;
        let loss = loss_of(last.as_tensor())?;
        let mut total = loss.backward()?;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.values.len()];
        grads[out.0] = total.remove(last.as_tensor());
        for (index, (inputs, output, segment)) in self.segments.iter().enumerate().rev() {
            let Some(grad) = grads[output.0].take() else {
                continue;
            };
            let segment = segment.as_ref().expect("kept when checkpointing");
            // Segment outputs become variables, to collect their gradients; inputs stay as they
            // are (detached: nothing flows into them).
            let values: Vec<Tensor> = inputs
                .iter()
                .map(|n| match self.inputs[n.0] {
                    true => Ok(self.values[n.0].clone()),
                    false => Ok(Var::from_tensor(&self.values[n.0])?.as_tensor().clone()),
                })
                .collect::<Result<_>>()?;
            let recomputed = segment(&values, &mut self.mode(index))?;
            // The backward of <segment output, incoming gradient>.
            let mut part = (recomputed * &grad)?.sum_all()?.backward()?;
            part.remove(&grad);
            for (n, v) in inputs.iter().zip(&values) {
                if let Some(g) = part.remove(v) {
                    grads[n.0] = Some(match grads[n.0].take() {
                        Some(sum) => (sum + g)?,
                        None => g,
                    });
                }
            }
            total.extend(part)?;
        }
        Ok((loss, total))
    }
}
