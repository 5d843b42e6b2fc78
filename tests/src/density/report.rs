//! Density results: the table, `density.json` and the plot of host memory over time.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{DensityConfig, RunResult};

/// Everything a density benchmark produced. Top-level keys as documented in the README.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DensityReport {
    /// Host memory (GiB).
    pub host_gib: f64,
    /// Memory of each guest (GiB).
    pub guest_gib: f64,
    /// Memory each guest touched and freed (GiB).
    pub touch_gib: f64,
    /// One entry per run.
    pub runs: Vec<RunResult>,
    /// The full configuration.
    pub config: DensityConfig,
    /// When (UTC, RFC 3339) and where it ran.
    pub started_utc: String,
    /// `uname -a`-like description of the machine and how guests ran.
    pub machine: String,
    /// Wall time of the whole benchmark.
    pub wall_s: f64,
}

impl DensityReport {
    /// Writes `density.json` and `density.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("density.json"), json + "\n")?;
        std::fs::write(dir.join("density.svg"), self.svg())?;
        std::fs::write(dir.join("density.txt"), self.table())?;
        Ok(())
    }

    /// The summary table (`cache` workload runs say how much each guest read first).
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "Density: {} GiB host, {} GiB guests touching {} GiB{} ({})",
            self.host_gib,
            self.guest_gib,
            self.touch_gib,
            if self.config.cache_mib > 0 {
                format!(" after reading {} MiB from disk", self.config.cache_mib)
            } else {
                String::new()
            },
            self.started_utc
        );
        t.push_str(
            "vmm    reporting guests fit  idle MiB  residual MiB reclaim s p50   wall s  stopped by\n",
        );
        for r in &self.runs {
            let stopped = match &r.failure {
                Some(f) => format!("guest {} {:?}: {}", f.guest, f.kind, short(&f.detail, 90)),
                None => format!("max guests ({})", self.config.max_guests),
            };
            let _ = writeln!(
                t,
                "{:<6} {:>9} {:>10} {:>9} {:>13} {:>13} {:>8.0}  {}",
                r.vmm.as_str(),
                mode(r),
                r.guests_fit,
                r.idle_mib_per_guest
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "-".into()),
                r.residual_mib_per_guest
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "-".into()),
                r.reclaim_s_median
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "-".into()),
                r.wall_s,
                stopped
            );
        }
        t
    }

    /// Host memory in use over time, one line per run, guest launches marked.
    pub fn svg(&self) -> String {
        let (w, h) = (960.0, 540.0);
        let (left, right, top, bottom) = (70.0, 200.0, 40.0, 50.0);
        let pw = w - left - right;
        let ph = h - top - bottom;
        let t_max = self
            .runs
            .iter()
            .flat_map(|r| r.timeline.last().map(|s| s.t_s))
            .fold(1.0f64, f64::max);
        let y_max = (self.host_gib * 1024.0).max(
            self.runs
                .iter()
                .flat_map(|r| r.timeline.iter().map(|s| s.host_used_mib))
                .fold(1.0, f64::max),
        );
        let x = |t: f64| left + pw * t / t_max;
        let y = |m: f64| top + ph * (1.0 - m / y_max);
        let colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="15">Host memory in use: {} GiB host, {} GiB guests touching {} GiB</text>"#,
            left, self.host_gib, self.guest_gib, self.touch_gib
        );
        // Axes and grid.
        let gib_step = if y_max > 8192.0 { 2048.0 } else { 512.0 };
        let mut m = 0.0;
        while m <= y_max + 1.0 {
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{}" y="{:.1}" text-anchor="end">{:.1} GiB</text>"##,
                left + pw,
                left - 6.0,
                y(m) + 4.0,
                m / 1024.0,
                y = y(m)
            );
            m += gib_step;
        }
        let t_step = nice_step(t_max / 8.0);
        let mut t = 0.0;
        while t <= t_max + 0.1 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0}</text>"#,
                x(t),
                top + ph + 18.0,
                t
            );
            t += t_step;
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">seconds since the run started</text>"#,
            left + pw / 2.0,
            h - 10.0
        );
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{:.1}" y2="{:.1}" stroke="#b00" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" fill="#b00">host limit</text>"##,
            left + pw,
            y(self.host_gib * 1024.0),
            y(self.host_gib * 1024.0),
            left + pw + 6.0,
            y(self.host_gib * 1024.0) + 4.0
        );
        for (i, r) in self.runs.iter().enumerate() {
            let c = colors[i % colors.len()];
            let pts: Vec<String> = r
                .timeline
                .iter()
                .map(|p| format!("{:.1},{:.1}", x(p.t_s), y(p.host_used_mib)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
            for g in &r.guests {
                let _ = writeln!(
                    s,
                    r#"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="{c}" stroke-width="1"/><text x="{x:.1}" y="{}" fill="{c}" font-size="9" text-anchor="middle">{}</text>"#,
                    top + ph,
                    top + ph - 10.0,
                    top + ph - 12.0 - 10.0 * i as f64,
                    g.guest,
                    x = x(g.launched_at_s)
                );
            }
            let ly = top + 20.0 + 40.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{} reporting {}</text><text x="{}" y="{}">{} guests fit</text>"#,
                left + pw + 10.0,
                left + pw + 30.0,
                left + pw + 36.0,
                ly + 4.0,
                r.vmm.as_str(),
                mode(r),
                left + pw + 36.0,
                ly + 20.0,
                r.guests_fit
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" font-size="10">ticks on the time axis: guest launches</text>"#,
            left + pw + 10.0,
            top + ph
        );
        s.push_str("</svg>\n");
        s
    }
}

fn short(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= n {
        one_line
    } else {
        one_line.chars().take(n).collect::<String>() + "..."
    }
}

fn nice_step(raw: f64) -> f64 {
    let mag = 10f64.powf(raw.max(1e-9).log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if raw <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// The reporting column: `on`, `off`, or `auto` (reporting with the automatic policy).
fn mode(r: &RunResult) -> &'static str {
    match (r.policy, r.reporting) {
        (true, _) => "auto",
        (false, true) => "on",
        (false, false) => "off",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::density::{Failure, FailureKind, GuestRecord, Sample, VmmKind};

    fn report() -> DensityReport {
        let run = |vmm, reporting, fit| RunResult {
            vmm,
            reporting,
            policy: false,
            guests_fit: fit,
            idle_mib_per_guest: Some(100.0),
            residual_mib_per_guest: Some(120.0),
            reclaim_s_median: Some(6.5),
            failure: Some(Failure {
                guest: fit + 1,
                kind: FailureKind::Touch,
                detail: "killed".into(),
            }),
            guests: vec![GuestRecord {
                guest: 1,
                launched_at_s: 0.5,
                fits: true,
                ..Default::default()
            }],
            timeline: vec![
                Sample {
                    t_s: 0.0,
                    host_used_mib: 300.0,
                    guest_rss_mib: vec![],
                },
                Sample {
                    t_s: 10.0,
                    host_used_mib: 1300.0,
                    guest_rss_mib: vec![1000.0],
                },
            ],
            baseline_used_mib: 300.0,
            wall_s: 12.0,
            host: "fake".into(),
        };
        DensityReport {
            host_gib: 3.0,
            guest_gib: 1.0,
            touch_gib: 0.9,
            runs: vec![
                run(VmmKind::Ebb, true, 5),
                run(VmmKind::Ebb, false, 2),
                run(VmmKind::Qemu, true, 4),
            ],
            config: DensityConfig::small(),
            started_utc: "2026-11-23T00:00:00Z".into(),
            machine: "test".into(),
            wall_s: 36.0,
        }
    }

    #[test]
    fn json_has_the_documented_top_level_keys_and_round_trips() {
        let r = report();
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for key in ["host_gib", "guest_gib", "touch_gib", "runs"] {
            assert!(v.get(key).is_some(), "{key}");
        }
        for key in [
            "vmm",
            "reporting",
            "guests_fit",
            "residual_mib_per_guest",
            "reclaim_s_median",
            "failure",
        ] {
            assert!(v["runs"][0].get(key).is_some(), "runs[].{key}");
        }
        assert_eq!(v["runs"][0]["vmm"], "ebb");
        assert_eq!(v["runs"][2]["vmm"], "qemu");
        assert_eq!(v["runs"][0]["failure"]["kind"], "touch");
        let back: DensityReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn files_table_and_plot() {
        let dir = std::env::temp_dir().join(format!("ebb-density-report-{}", std::process::id()));
        let r = report();
        r.write(&dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("density.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("qemu reporting on"));
        let table = std::fs::read_to_string(dir.join("density.txt")).unwrap();
        assert!(table.contains("guests fit"));
        assert_eq!(
            table
                .lines()
                .filter(|l| l.starts_with("ebb ") || l.starts_with("qemu "))
                .count(),
            3
        );
        std::fs::remove_dir_all(dir).unwrap();
        assert_eq!(nice_step(7.0), 10.0);
        assert_eq!(nice_step(130.0), 200.0);
    }
}
