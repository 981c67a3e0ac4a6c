//! Progress of a long command: an interactive bar on a terminal; elsewhere (logs, CI, `nohup`)
//! one plain line every few seconds with what is done, the rate and the time left, so a run
//! that is not watched live still shows it is alive.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: u64,
    bar: Option<indicatif::ProgressBar>,
    plain: Option<Mutex<Plain>>,
}

struct Plain {
    done: u64,
    start: Instant,
    last: Instant,
    every: Duration,
}

/// Seconds between plain lines: `FEDLLM_PROGRESS_SECS`, default 5.
fn interval() -> Duration {
    let secs = std::env::var("FEDLLM_PROGRESS_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(5.0);
    Duration::from_secs_f64(secs)
}

impl Progress {
    /// `unit` names what is counted ("clients", "questions"); `show` false shows nothing.
    pub fn new(label: &str, unit: &str, total: u64, show: bool) -> Self {
        let label = format!("{label}: {{}}/{total} {unit}");
        if !show {
            return Self {
                label,
                total,
                bar: None,
                plain: None,
            };
        }
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            let template = format!(
                "{} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed}} (ETA {{eta}})",
                label.split(':').next().unwrap_or_default()
            );
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            return Self {
                label,
                total,
                bar: Some(bar),
                plain: None,
            };
        }
        let now = Instant::now();
        let plain = Plain {
            done: 0,
            start: now,
            last: now,
            every: interval(),
        };
        Self {
            label,
            total,
            bar: None,
            plain: Some(Mutex::new(plain)),
        }
    }

    /// Counts `n` more done.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(p) = &self.plain {
            let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
            p.done += n;
            let now = Instant::now();
            if now.duration_since(p.last) >= p.every || p.done == self.total {
                p.last = now;
                eprintln!("{}", self.line(p.done, now.duration_since(p.start)));
            }
        }
    }

    fn line(&self, done: u64, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64();
        let eta = if done > 0 && done < self.total {
            format!(
                ", ETA {:.0} s",
                secs / done as f64 * (self.total - done) as f64
            )
        } else {
            String::new()
        };
        format!(
            "{}, {secs:.0} s{eta}",
            self.label.replace("{}", &done.to_string())
        )
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_says_done_total_and_eta() {
        let p = Progress::new("round 2/3", "clients", 4, false);
        assert_eq!(
            p.line(1, Duration::from_secs(10)),
            "round 2/3: 1/4 clients, 10 s, ETA 30 s"
        );
        assert_eq!(
            p.line(4, Duration::from_secs(40)),
            "round 2/3: 4/4 clients, 40 s"
        );
    }
}
