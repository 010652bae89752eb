//! Classification and regression metrics of one evaluation, the selection score, and the running
//! training loss between log lines.

use std::collections::BTreeSet;

use crate::tasks::{TaskKind, TaskSpec};

/// Batch-size-weighted running averages of the training loss between log lines.
pub(super) struct Running {
    loss: f64,
    tasks: Vec<f64>,
    n: usize,
}

impl Running {
    pub(super) fn new(k: usize) -> Self {
        Running {
            loss: 0.0,
            tasks: vec![0.0; k],
            n: 0,
        }
    }
    pub(super) fn add(&mut self, loss: f64, per_task: &[f64], n: usize) {
        self.loss += loss * n as f64;
        for (a, b) in self.tasks.iter_mut().zip(per_task) {
            *a += b * n as f64;
        }
        self.n += n;
    }
    pub(super) fn loss(&self) -> f64 {
        self.loss / self.n.max(1) as f64
    }
    pub(super) fn task(&self, i: usize) -> f64 {
        self.tasks[i] / self.n.max(1) as f64
    }
}

/// Predictions and targets of one evaluation.
pub struct Metrics {
    pub(super) loss_sum: f64,
    pub(super) n: usize,
    pub(super) preds: Vec<Vec<f32>>,
    pub(super) targets: Vec<Vec<f32>>,
}

impl Metrics {
    pub(super) fn new(tasks: &[TaskSpec]) -> Self {
        Metrics {
            loss_sum: 0.0,
            n: 0,
            preds: vec![vec![]; tasks.len()],
            targets: vec![vec![]; tasks.len()],
        }
    }

    /// accuracy and macro-F1 (classification), MAE and MSE (regression), and the loss.
    pub fn scalars(&self, tasks: &[TaskSpec]) -> Vec<(String, f64)> {
        let mut out = vec![("loss".to_string(), self.loss_sum / self.n.max(1) as f64)];
        for (i, t) in tasks.iter().enumerate() {
            let (p, y) = (&self.preds[i], &self.targets[i]);
            match t.kind {
                TaskKind::Classification => {
                    out.push((format!("accuracy/{}", t.name), accuracy(p, y)));
                    out.push((format!("f1/{}", t.name), macro_f1(p, y, t.outputs)));
                }
                TaskKind::Regression => {
                    let n = p.len().max(1) as f64;
                    out.push((
                        format!("mae/{}", t.name),
                        p.iter()
                            .zip(y)
                            .map(|(a, b)| (a - b).abs() as f64)
                            .sum::<f64>()
                            / n,
                    ));
                    out.push((
                        format!("mse/{}", t.name),
                        p.iter()
                            .zip(y)
                            .map(|(a, b)| ((a - b) as f64).powi(2))
                            .sum::<f64>()
                            / n,
                    ));
                }
            }
        }
        out
    }

    /// Selection score, higher is better: Σ w_t s_t / Σ w_t with s_t = accuracy, or
    /// 1 / (1 + MAE) for regression (the reference maximised the MAE itself).
    pub fn score(&self, tasks: &[TaskSpec], weights: &[f64]) -> f64 {
        let (mut num, mut den) = (0.0, 0.0);
        for (i, (t, w)) in tasks.iter().zip(weights).enumerate() {
            let (p, y) = (&self.preds[i], &self.targets[i]);
            let s = match t.kind {
                TaskKind::Classification => accuracy(p, y),
                TaskKind::Regression => {
                    1.0 / (1.0
                        + p.iter()
                            .zip(y)
                            .map(|(a, b)| (a - b).abs() as f64)
                            .sum::<f64>()
                            / p.len().max(1) as f64)
                }
            };
            num += w * s;
            den += w;
        }
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    }

    pub(super) fn describe(&self, tasks: &[TaskSpec]) -> String {
        self.scalars(tasks)
            .iter()
            .map(|(k, v)| format!("{k} {v:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn accuracy(p: &[f32], y: &[f32]) -> f64 {
    p.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / p.len().max(1) as f64
}

/// Macro-F1 over the classes present in targets or predictions (sklearn's average="macro",
/// zero_division=0).
pub fn macro_f1(p: &[f32], y: &[f32], classes: usize) -> f64 {
    let present: BTreeSet<usize> = p
        .iter()
        .chain(y)
        .map(|&c| c as usize)
        .filter(|&c| c < classes)
        .collect();
    if present.is_empty() {
        return 0.0;
    }
    let f1s = present.iter().map(|&c| {
        let tp = p
            .iter()
            .zip(y)
            .filter(|(a, b)| **a as usize == c && **b as usize == c)
            .count() as f64;
        let fp = p
            .iter()
            .zip(y)
            .filter(|(a, b)| **a as usize == c && **b as usize != c)
            .count() as f64;
        let fnn = p
            .iter()
            .zip(y)
            .filter(|(a, b)| **a as usize != c && **b as usize == c)
            .count() as f64;
        if tp == 0.0 {
            0.0
        } else {
            2.0 * tp / (2.0 * tp + fp + fnn)
        }
    });
    f1s.sum::<f64>() / present.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_f1_matches_sklearn() {
        // sklearn.metrics.f1_score([0,1,1,2], [0,1,2,2], average="macro") = 0.7777...
        let y = [0.0, 1.0, 1.0, 2.0];
        let p = [0.0, 1.0, 2.0, 2.0];
        assert!((macro_f1(&p, &y, 3) - 7.0 / 9.0).abs() < 1e-12);
    }
}
