//! Optimizers on named fp32 tensors, with torch's exact update rules (`torch.optim.AdamW`,
//! `torch.optim.SGD`), so one step reproduces PyTorch's `after_step` values.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum OptimizerConfig {
    Adamw {
        #[serde(default = "b1")]
        beta1: f64,
        #[serde(default = "b2")]
        beta2: f64,
        #[serde(default = "eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
    },
    Sgd {
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        weight_decay: f64,
        #[serde(default)]
        nesterov: bool,
    },
}

fn b1() -> f64 {
    0.9
}
fn b2() -> f64 {
    0.999
}
fn eps() -> f64 {
    1e-8
}

impl OptimizerConfig {
    pub fn adamw(weight_decay: f64) -> Self {
        OptimizerConfig::Adamw {
            beta1: b1(),
            beta2: b2(),
            eps: eps(),
            weight_decay,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Steps taken (AdamW's bias correction uses it).
    pub steps: u64,
    /// Per parameter: AdamW (exp_avg, exp_avg_sq), SGD (momentum buffer).
    pub state: BTreeMap<String, Vec<Tensor>>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Self {
            config,
            steps: 0,
            state: BTreeMap::new(),
        }
    }

    /// One update of every parameter that has a gradient.
    pub fn step(
        &mut self,
        params: &BTreeMap<String, Var>,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let p = var.as_tensor();
            if g.dims() != p.dims() {
                return Err(TrainError::Config(format!(
                    "gradient of `{name}` has shape {:?}",
                    g.dims()
                )));
            }
            let new = match &self.config {
                OptimizerConfig::Adamw {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let st = self
                        .state
                        .entry(name.clone())
                        .or_insert_with(|| vec![p.zeros_like().unwrap(), p.zeros_like().unwrap()]);
                    let m = ((&st[0] * *beta1)? + (g * (1.0 - beta1))?)?;
                    let v = ((&st[1] * *beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2 = 1.0 - beta2.powi(t);
                    let p = (p * (1.0 - lr * weight_decay))?;
                    let denom = ((v.sqrt()? / bc2.sqrt())? + *eps)?;
                    let upd = ((&m / denom)? * (lr / bc1))?;
                    st[0] = m;
                    st[1] = v;
                    (p - upd)?
                }
                OptimizerConfig::Sgd {
                    momentum,
                    weight_decay,
                    nesterov,
                } => {
                    let mut d = if *weight_decay != 0.0 {
                        (g + (p * *weight_decay)?)?
                    } else {
                        g.clone()
                    };
                    if *momentum != 0.0 {
                        let buf = match self.state.get(name) {
                            Some(st) => ((&st[0] * *momentum)? + &d)?,
                            None => d.clone(),
                        };
                        d = if *nesterov {
                            (&d + (&buf * *momentum)?)?
                        } else {
                            buf.clone()
                        };
                        self.state.insert(name.clone(), vec![buf]);
                    }
                    (p - (d * lr)?)?
                }
            };
            var.set(&new)?;
        }
        Ok(())
    }
}

/// Global L2 norm of all gradients.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut s = 0f64;
    for g in grads.values() {
        s += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn one(v: f32) -> (BTreeMap<String, Var>, BTreeMap<String, Tensor>) {
        let p = Var::new(&[v], &Device::Cpu).unwrap();
        (BTreeMap::from([("p".to_string(), p)]), BTreeMap::new())
    }

    #[test]
    fn adamw_first_step_is_lr_sign() {
        // After one step m̂ = g, v̂ = g², so the update is lr·g/(|g|+eps) plus decoupled decay.
        let (params, mut grads) = one(1.0);
        grads.insert("p".into(), Tensor::new(&[0.5f32], &Device::Cpu).unwrap());
        let mut o = Optimizer::new(OptimizerConfig::adamw(0.1));
        o.step(&params, &grads, 0.01).unwrap();
        let got = params["p"].as_tensor().to_vec1::<f32>().unwrap()[0];
        let want = 1.0 * (1.0 - 0.01 * 0.1) - 0.01 * 0.5 / (0.5 + 1e-8);
        assert!((got as f64 - want).abs() < 1e-7, "{got} vs {want}");
    }

    #[test]
    fn sgd_momentum_matches_torch() {
        let (params, mut grads) = one(1.0);
        grads.insert("p".into(), Tensor::new(&[2.0f32], &Device::Cpu).unwrap());
        let mut o = Optimizer::new(OptimizerConfig::Sgd {
            momentum: 0.9,
            weight_decay: 0.5,
            nesterov: false,
        });
        // torch: d = g + wd·p; buf = d (first), buf = 0.9·buf + d; p -= lr·buf
        o.step(&params, &grads, 0.1).unwrap(); // d = 2.5, buf = 2.5, p = 0.75
        o.step(&params, &grads, 0.1).unwrap(); // d = 2.375, buf = 4.625, p = 0.2875
        let got = params["p"].as_tensor().to_vec1::<f32>().unwrap()[0];
        assert!((got - 0.2875).abs() < 1e-6, "{got}");
    }
}
