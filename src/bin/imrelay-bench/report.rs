//! Turning what the engine measured into a summary (stderr) and one JSON line (stdout).

use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};

use crate::engine::Outcome;

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn progress_bar(total: u64, mode: &str) -> ProgressBar {
    progress_bar_of(total, mode, "deliveries")
}

/// A progress bar counting `unit`.
pub fn progress_bar_of(total: u64, mode: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(&format!(
        "{{prefix}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}}"
    )) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(mode.to_string());
    bar
}

/// The figures of one run.
pub struct Report {
    json: Map<String, Value>,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    errors: u64,
    msgs_per_sec: f64,
    /// Messages delivered, for figures per million.
    delivered: u64,
    summary: String,
}

impl Report {
    pub fn new(
        mode: &str,
        params: Value,
        outcomes: Vec<Outcome>,
        elapsed: Duration,
        size: usize,
        relay_cpu: Option<f64>,
        relay_memory: Option<(u64, u64)>,
    ) -> Report {
        let mut hist: Histogram<u64> =
            Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
        let mut acks_hist: Histogram<u64> =
            Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
        let (mut received, mut expected, mut dup, mut reord, mut acks, mut errors) =
            (0, 0, 0, 0, 0, 0);
        let mut copies = 0;
        for o in &outcomes {
            hist.add(&o.latency_ns).expect("same bounds");
            acks_hist.add(&o.ack_latency_ns).expect("same bounds");
            received += o.received;
            expected += o.expected;
            dup += o.duplicated;
            reord += o.reordered;
            copies += o.copies;
            acks += o.acks;
            errors += o.errors;
        }
        let secs = elapsed.as_secs_f64();
        let msgs_per_sec = received as f64 / secs;
        let frame = (32 + size.max(crate::engine::MIN_PAYLOAD)) as f64;
        let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let latency = json!({
            "p50": us(0.5), "p90": us(0.9), "p99": us(0.99), "p999": us(0.999),
            "max": hist.max() as f64 / 1000.0,
        });
        let cpu_per_million = relay_cpu.map(|c| c / (received as f64 / 1e6));
        let mut j = Map::new();
        j.insert("mode".into(), json!(mode));
        j.insert("params".into(), params);
        j.insert("elapsed_s".into(), json!(secs));
        j.insert("delivered".into(), json!(received));
        j.insert("msgs_per_sec".into(), json!(msgs_per_sec.round()));
        j.insert("mb_per_sec".into(), json!(msgs_per_sec * frame / 1e6));
        j.insert("latency_us".into(), latency);
        let ack_us = |q: f64| acks_hist.value_at_quantile(q) as f64 / 1000.0;
        if !acks_hist.is_empty() {
            j.insert(
                "ack_latency_us".into(),
                json!({
                    "p50": ack_us(0.5), "p90": ack_us(0.9), "p99": ack_us(0.99),
                    "p999": ack_us(0.999), "max": acks_hist.max() as f64 / 1000.0,
                }),
            );
        }
        j.insert("lost".into(), json!(expected - received));
        j.insert("duplicated".into(), json!(dup));
        j.insert("reordered".into(), json!(reord));
        if copies > 0 {
            j.insert("copies".into(), json!(copies));
        }
        j.insert("acks".into(), json!(acks));
        j.insert("errors".into(), json!(errors));
        j.insert("relay_cpu_s".into(), json!(relay_cpu));
        j.insert("relay_cpu_s_per_million".into(), json!(cpu_per_million));
        j.insert("relay_rss_kib".into(), json!(relay_memory.map(|m| m.0)));
        j.insert("relay_hwm_kib".into(), json!(relay_memory.map(|m| m.1)));
        let summary = format!(
            "{mode}: {received} deliveries in {secs:.2} s = {:.3} M msgs/s ({:.1} MB/s); one-way latency us p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}; lost {} dup {dup} reordered {reord} errors {errors}{}",
            msgs_per_sec / 1e6,
            msgs_per_sec * frame / 1e6,
            us(0.5),
            us(0.9),
            us(0.99),
            us(0.999),
            hist.max() as f64 / 1000.0,
            expected - received,
            match cpu_per_million {
                Some(c) => format!("; relay CPU {c:.3} s per million"),
                None => String::new(),
            },
        ) + &if acks_hist.is_empty() {
            String::new()
        } else {
            format!(
                "; ACK latency us p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
                ack_us(0.5),
                ack_us(0.9),
                ack_us(0.99),
                ack_us(0.999),
                acks_hist.max() as f64 / 1000.0
            )
        };
        Report {
            json: j,
            lost: expected - received,
            duplicated: dup,
            reordered: reord,
            errors,
            msgs_per_sec,
            delivered: received,
            summary,
        }
    }

    /// A report built by a mode of its own (`logins`): its JSON line, its summary, how
    /// many operations did not finish (`lost`) and how many the relay refused (`errors`).
    pub fn from_parts(json: Map<String, Value>, summary: String, lost: u64, errors: u64) -> Report {
        Report {
            json,
            lost,
            duplicated: 0,
            reordered: 0,
            errors,
            msgs_per_sec: 0.0,
            delivered: 0,
            summary,
        }
    }

    /// Adds the floor's figures and the relay/floor ratio.
    pub fn compare(&mut self, floor: &Report) {
        let ratio = self.msgs_per_sec / floor.msgs_per_sec;
        self.summary.push_str(&format!(
            // The floor's summary starts with its own label ("floor: …").
            "\n{}\nrelay/floor = {ratio:.3}",
            floor.summary
        ));
        self.json.insert(
            "floor_msgs_per_sec".into(),
            json!(floor.msgs_per_sec.round()),
        );
        self.json
            .insert("floor".into(), Value::Object(floor.json.clone()));
        self.json.insert("ratio".into(), json!(ratio));
        self.lost += floor.lost;
        self.duplicated += floor.duplicated;
        self.reordered += floor.reordered;
    }

    /// How many relay nodes served the run; with more than one (a cluster), each node's
    /// CPU seconds (the report's relay CPU is their sum) and the Redis server's CPU.
    pub fn nodes(&mut self, nodes: usize, cpu_per_node: Option<Vec<f64>>, redis_cpu: Option<f64>) {
        self.json.insert("nodes".into(), json!(nodes));
        if nodes < 2 {
            return;
        }
        let per_million = |c: f64| c / (self.delivered as f64 / 1e6);
        self.json
            .insert("relay_cpu_s_per_node".into(), json!(&cpu_per_node));
        self.json.insert("redis_cpu_s".into(), json!(redis_cpu));
        self.json.insert(
            "redis_cpu_s_per_million".into(),
            json!(redis_cpu.map(per_million)),
        );
        self.summary.push_str(&format!("; {nodes} nodes"));
        if cpu_per_node.is_some() {
            self.summary.push_str(" (relay CPU and memory summed)");
        }
        if let Some(c) = redis_cpu {
            self.summary
                .push_str(&format!("; Redis CPU {:.3} s per million", per_million(c)));
        }
    }

    pub fn set_mode(&mut self, mode: &str) {
        self.json.insert("mode".into(), json!(mode));
        self.summary = format!("{mode} ({})", self.summary);
    }

    pub fn extra(&mut self, key: &str, value: Value) {
        self.json.insert(key.into(), value);
    }

    /// No loss, duplication, reordering or relay error.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0 && self.errors == 0
    }

    pub fn print(&self) {
        eprintln!("{}", self.summary);
        println!("{}", Value::Object(self.json.clone()));
    }
}
