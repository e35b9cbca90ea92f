//! The report: `results.json` and `report.html` (send latency over time
//! with the fault intervals shaded, and acknowledged sends per second, as
//! inline SVG: no scripts, works offline).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::checker::Results;
use crate::history::Event;
use crate::history::F;
use crate::history::Kind;

const W: f64 = 1000.0;
const H: f64 = 260.0;
const PAD: f64 = 40.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

pub fn write(out: &Path, history: &[Event], results: &Results, title: &str) -> anyhow::Result<()> {
    std::fs::write(out.join("results.json"), serde_json::to_vec_pretty(results)?)?;
    let t0 = history.first().map(|e| e.time_us).unwrap_or(0);
    let t1 = history.last().map(|e| e.time_us).unwrap_or(t0 + 1).max(t0 + 1);
    let x = |t: u64| PAD + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (W - 2.0 * PAD);

    // Send latencies.
    let mut invokes: HashMap<&str, u64> = HashMap::new();
    let mut points: Vec<(u64, f64, Kind)> = Vec::new();
    for e in history.iter().filter(|e| e.f == F::Send) {
        match e.kind {
            Kind::Invoke => {
                invokes.insert(&e.value, e.time_us);
            }
            k => {
                if let Some(t) = invokes.get(e.value.as_str()) {
                    points.push((e.time_us, (e.time_us - t) as f64 / 1000.0, k));
                }
            }
        }
    }
    let mut lat: Vec<f64> = points.iter().map(|p| p.1).collect();
    lat.sort_by(f64::total_cmp);
    let ymax = lat.get(lat.len().saturating_sub(1) * 999 / 1000).copied().unwrap_or(1.0).max(10.0);
    let y = |ms: f64| H - PAD - (ms.min(ymax) / ymax) * (H - 2.0 * PAD);

    // Fault intervals.
    let mut faults: Vec<(u64, u64, String)> = Vec::new();
    let mut open: Option<(u64, String)> = None;
    for e in history {
        match e.f {
            F::NemesisStart => open = Some((e.time_us, e.value.clone())),
            F::NemesisStop => {
                if let Some((s, name)) = open.take() {
                    faults.push((s, e.time_us, name));
                }
            }
            _ => {}
        }
    }
    if let Some((s, name)) = open {
        faults.push((s, t1, name));
    }
    let shade = |svg: &mut String| {
        for (s, e, name) in &faults {
            let _ = write!(
                svg,
                r##"<rect x="{:.1}" y="{PAD}" width="{:.1}" height="{:.1}" fill="#f4b4b4" opacity="0.5"><title>{}</title></rect>"##,
                x(*s),
                (x(*e) - x(*s)).max(1.0),
                H - 2.0 * PAD,
                esc(name)
            );
        }
    };

    let mut lat_svg = format!(r#"<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" font-size="11">"#);
    shade(&mut lat_svg);
    for (t, ms, k) in &points {
        let color = match k {
            Kind::Ok => "#2a7",
            Kind::Fail => "#c33",
            _ => "#e90",
        };
        let _ = write!(lat_svg, r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{color}"/>"#, x(*t), y(*ms));
    }
    let _ = write!(
        lat_svg,
        r#"<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="black"/><text x="2" y="{PAD}">{ymax:.0} ms</text><text x="2" y="{b}">0</text><text x="{PAD}" y="{tb}">0 s</text><text x="{r2}" y="{tb}">{secs:.0} s</text></svg>"#,
        b = H - PAD,
        r = W - PAD,
        r2 = W - PAD - 30.0,
        tb = H - PAD + 15.0,
        secs = (t1 - t0) as f64 / 1e6
    );

    // Acknowledged sends per second.
    let mut per_sec: BTreeMap<u64, u64> = BTreeMap::new();
    for (t, _, k) in &points {
        if *k == Kind::Ok {
            *per_sec.entry((t - t0) / 1_000_000).or_default() += 1;
        }
    }
    let secs = (t1 - t0) / 1_000_000 + 1;
    let tmax = per_sec.values().copied().max().unwrap_or(1).max(1) as f64;
    let mut tp_svg = format!(r#"<svg width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg" font-size="11">"#);
    shade(&mut tp_svg);
    let pts: Vec<String> = (0..secs)
        .map(|s| {
            let v = per_sec.get(&s).copied().unwrap_or(0) as f64;
            format!("{:.1},{:.1}", x(t0 + s * 1_000_000), H - PAD - v / tmax * (H - 2.0 * PAD))
        })
        .collect();
    let _ = write!(
        tp_svg,
        r##"<polyline fill="none" stroke="#36c" stroke-width="1.5" points="{}"/><line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/><text x="2" y="{PAD}">{tmax:.0}/s</text><text x="2" y="{b}">0</text></svg>"##,
        pts.join(" "),
        b = H - PAD,
        r = W - PAD
    );

    let rows: String = serde_json::to_value(results)?
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| k.as_str() != "unavailability")
                .map(|(k, v)| format!("<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(&v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let fault_rows: String = results
        .unavailability
        .iter()
        .map(|w| {
            format!(
                "<tr><td>{}</td><td>{}</td></tr>",
                esc(&w.fault),
                w.first_ok_after_ms.map(|m| format!("{m:.0} ms")).unwrap_or_else(|| "no ack after it".into())
            )
        })
        .collect();
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>{t}</title>
<style>body{{font-family:sans-serif;margin:2em}} td{{padding:2px 10px;border-bottom:1px solid #ddd}} .v{{font-size:1.4em}}</style></head><body>
<h1>{t}</h1><p class="v">valid: <b>{valid}</b></p>
<h2>Send latency over time</h2><p>green: acknowledged, orange: unknown, red: failed; shaded: faults (hover for the fault)</p>{lat_svg}
<h2>Acknowledged sends per second</h2>{tp_svg}
<h2>Results</h2><table>{rows}</table>
<h2>Faults and unavailability (fault start to the first acknowledged send after it)</h2><table>{fault_rows}</table>
</body></html>"#,
        t = esc(title),
        valid = results.valid,
    );
    std::fs::write(out.join("report.html"), html)?;
    Ok(())
}
