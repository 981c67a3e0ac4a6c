//! Learning-rate schedules with linear warmup, as transformers' `get_*_schedule_with_warmup`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl Schedule {
    pub fn constant() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            total_steps: 0,
        }
    }

    /// Multiplier of the base LR at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let rest = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / rest).min(1.0);
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => 1.0 - progress,
            ScheduleKind::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            kind: ScheduleKind::Linear,
            warmup_steps: 2,
            total_steps: 6,
        };
        let f: Vec<f64> = (0..7).map(|i| s.factor(i)).collect();
        assert_eq!(f, vec![0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]);
        let c = Schedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert!((c.factor(2) - 0.5).abs() < 1e-12 && c.factor(4).abs() < 1e-12);
    }
}
