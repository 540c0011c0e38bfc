//! The figures of a run: a table on stdout and the same (with more detail) as JSON.

use std::path::Path;

use serde_json::{json, Map, Value};

/// One line of the table.
pub struct Row {
    pub metric: String,
    pub value: String,
    pub target: String,
    /// Met, missed, or no target.
    pub ok: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub json: Map<String, Value>,
}

impl Report {
    /// A figure without a target.
    pub fn fig(&mut self, metric: &str, value: impl Into<String>) {
        self.rows.push(Row {
            metric: metric.into(),
            value: value.into(),
            target: String::new(),
            ok: None,
        });
    }

    /// A figure against a target.
    pub fn target(&mut self, metric: &str, value: impl Into<String>, target: &str, ok: bool) {
        self.rows.push(Row {
            metric: metric.into(),
            value: value.into(),
            target: target.into(),
            ok: Some(ok),
        });
    }

    pub fn set(&mut self, key: &str, v: Value) {
        self.json.insert(key.into(), v);
    }

    pub fn print(&self, title: &str) {
        let w0 = self
            .rows
            .iter()
            .map(|r| r.metric.len())
            .max()
            .unwrap_or(6)
            .max(6);
        let w1 = self
            .rows
            .iter()
            .map(|r| r.value.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let w2 = self
            .rows
            .iter()
            .map(|r| r.target.len())
            .max()
            .unwrap_or(6)
            .max(6);
        println!("\n{title}");
        println!("{:<w0$}  {:>w1$}  {:<w2$}  ", "metric", "value", "target");
        println!("{}", "-".repeat(w0 + w1 + w2 + 12));
        for r in &self.rows {
            let verdict = match r.ok {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            };
            println!(
                "{:<w0$}  {:>w1$}  {:<w2$}  {verdict}",
                r.metric, r.value, r.target
            );
        }
    }

    pub fn write(&mut self, path: &Path) -> Result<(), String> {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| json!({"metric": r.metric, "value": r.value, "target": r.target, "met": r.ok}))
            .collect();
        self.json.insert("table".into(), Value::Array(rows));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&Value::Object(self.json.clone()))
            .map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// p50, p99, max and mean of microsecond samples, in milliseconds.
pub fn summary_ms(samples: &mut [u32]) -> Value {
    if samples.is_empty() {
        return json!({"n": 0});
    }
    samples.sort_unstable();
    let n = samples.len();
    let pct = |q: f64| {
        let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
        f64::from(samples[i]) / 1_000.0
    };
    let mean = samples.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64 / 1_000.0;
    json!({
        "n": n,
        "p50_ms": round3(pct(0.50)),
        "p90_ms": round3(pct(0.90)),
        "p99_ms": round3(pct(0.99)),
        "max_ms": round3(pct(1.0)),
        "mean_ms": round3(mean),
    })
}

pub fn round3(v: f64) -> f64 {
    (v * 1_000.0).round() / 1_000.0
}

/// `p50 / p99 / max` of a [`summary_ms`], for the table.
pub fn pcts(s: &Value) -> String {
    if s["n"].as_u64().unwrap_or(0) == 0 {
        return "no samples".into();
    }
    format!(
        "{:.2} / {:.2} / {:.2} ms",
        s["p50_ms"].as_f64().unwrap_or(0.0),
        s["p99_ms"].as_f64().unwrap_or(0.0),
        s["max_ms"].as_f64().unwrap_or(0.0)
    )
}

/// Min, mean and max of a list of counts.
pub fn spread(v: &[f64]) -> Value {
    if v.is_empty() {
        return json!({"n": 0});
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    json!({"n": v.len(), "min": round3(min), "mean": round3(mean), "max": round3(max)})
}
