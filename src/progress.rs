//! Progress of long work on stderr: items done, items/s, tokens/s, ETA, plus free-form
//! fields such as the loss. One line, rewritten in place on a terminal; one line every few
//! seconds otherwise (logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A progress line for `total` items of some kind.
pub struct Progress {
    label: String,
    total: usize,
    done: usize,
    tokens: usize,
    start: Instant,
    last_print: Option<Instant>,
    terminal: bool,
}

impl Progress {
    /// Starts timing `total` items under `label` (e.g. "predict", "train").
    pub fn new(label: &str, total: usize) -> Progress {
        Progress {
            label: label.to_string(),
            total,
            done: 0,
            tokens: 0,
            start: Instant::now(),
            last_print: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Records `items` more items holding `tokens` tokens, with extra fields to show.
    pub fn advance(&mut self, items: usize, tokens: usize, extra: &str) {
        self.done += items;
        self.tokens += tokens;
        let every = if self.terminal {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        let due = self.last_print.is_none_or(|t| t.elapsed() >= every) || self.done >= self.total;
        if due {
            self.last_print = Some(Instant::now());
            let line = self.line(extra);
            let mut err = std::io::stderr().lock();
            let _ = if self.terminal {
                write!(err, "\r\x1b[2K{line}")
            } else {
                writeln!(err, "{line}")
            };
            if self.terminal && self.done >= self.total {
                let _ = writeln!(err);
            }
        }
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Tokens per second so far.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.elapsed().max(1e-9)
    }

    fn line(&self, extra: &str) -> String {
        let secs = self.elapsed().max(1e-9);
        let rate = self.done as f64 / secs;
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(self.done)) as f64 / rate
        } else {
            f64::NAN
        };
        format!(
            "[{}] {}/{} {:.1}/s {:.0} tok/s ETA {} {}",
            self.label,
            self.done,
            self.total,
            rate,
            self.tokens as f64 / secs,
            clock(eta),
            extra
        )
    }
}

/// `h:mm:ss` (or `?` when unknown).
fn clock(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "?".into();
    }
    let s = seconds.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
