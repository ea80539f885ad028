//! What `compare` writes: `results/results.json`, the plots, and `BENCHMARKS.md` beside
//! `results/`, with Spotable's targets checked against the figures of the same run.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use crate::compare::{FailoverResult, JitterResult, PathResult, Proxy, Results};
use crate::peers::PeerPaths;

/// A description of the machine and of the programs measured.
pub fn machine(peers: &PeerPaths) -> Vec<(String, String)> {
    let cmd = |program: &Path, args: &[&str]| {
        std::process::Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "not available".into())
    };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("unknown".into(), |kb| {
            format!("{:.0} GiB", kb as f64 / 1048576.0)
        });
    vec![
        ("CPU".into(), format!("{model}, {cores} cores available")),
        ("memory".into(), mem),
        ("kernel".into(), cmd(Path::new("uname"), &["-sr"])),
        ("rustc".into(), cmd(Path::new("rustc"), &["--version"])),
        (
            "Spotable".into(),
            format!("spotable-proxy {}", env!("CARGO_PKG_VERSION")),
        ),
        ("nginx".into(), cmd(&peers.nginx, &["-v"])),
        ("Quilkin".into(), cmd(&peers.quilkin, &["--version"])),
    ]
}

fn find<'a>(
    r: &'a Results,
    proxy: Proxy,
    fanout: usize,
    dedupe: Option<&str>,
) -> Option<&'a PathResult> {
    r.paths.iter().find(|p| {
        p.path.proxy == proxy
            && p.path.fanout == fanout
            && !p.path.token
            && !p.path.anchor
            && !p.path.baseline
            && (dedupe.is_none() || p.path.dedupe.as_deref() == dedupe)
    })
}

/// One target: what it asks, what was measured, whether it holds (None: not measured).
#[derive(Debug)]
pub struct Target {
    pub what: &'static str,
    pub measured: String,
    pub met: Option<bool>,
}

/// Spotable's stated targets, checked against this run.
pub fn targets(r: &Results) -> Vec<Target> {
    let direct = find(r, Proxy::Direct, 1, None);
    let nginx = find(r, Proxy::Nginx, 1, None);
    let quilkin2 = find(r, Proxy::Quilkin, 2, None);
    let s1 = find(r, Proxy::Spotable, 1, Some("copies"));
    let s2 = find(r, Proxy::Spotable, 2, Some("copies"));
    let added = |p: &PathResult| direct.map(|d| p.latency.rtt_us.p50 - d.latency.rtt_us.p50);
    let mut out = Vec::new();
    out.push(throughput_target(
        "fan-out 1: throughput ≥ nginx's",
        "answers/s",
        s1.zip(nginx),
        1.0,
    ));
    out.push(throughput_target(
        "fan-out 2, deduplicated: throughput ≥ 1.5× Quilkin's unique-answer rate",
        "unique answers/s",
        s2.zip(quilkin2),
        1.5,
    ));
    out.push(match (s1.and_then(added), nginx.and_then(added)) {
        (Some(s), Some(n)) => Target {
            what: "added p50 latency ≤ nginx's",
            measured: format!("{s:.0} µs vs {n:.0} µs"),
            met: Some(s <= n),
        },
        _ => Target {
            what: "added p50 latency ≤ nginx's",
            measured: "not measured".into(),
            met: None,
        },
    });
    let tokened = r
        .paths
        .iter()
        .find(|p| p.path.proxy == Proxy::Spotable && p.path.fanout == 2 && p.path.token);
    out.push(throughput_target(
        "token routing costs ≤ 5 % of fan-out 2 throughput",
        "answers/s",
        tokened.zip(s2),
        0.95,
    ));
    let fo = r.failover.iter().find(|f| f.path.proxy == Proxy::Spotable);
    out.push(match fo {
        Some(f) => Target {
            what: "failover: 0 lost, 0 duplicates",
            measured: format!("{} lost, {} duplicates", f.report.lost, f.report.duplicates),
            met: Some(f.report.lost == 0 && f.report.duplicates == 0),
        },
        None => Target {
            what: "failover: 0 lost, 0 duplicates",
            measured: "not measured".into(),
            met: None,
        },
    });
    for (what, fanout, ours) in [
        (
            "fan-out 1 throughput within 3 % of the baseline build",
            1,
            s1,
        ),
        (
            "fan-out 2 throughput within 3 % of the baseline build",
            2,
            s2,
        ),
    ] {
        let base = r.paths.iter().find(|p| {
            p.path.baseline && p.path.fanout == fanout && p.path.dedupe.as_deref() == Some("copies")
        });
        if base.is_some() {
            out.push(throughput_target(what, "answers/s", ours.zip(base), 0.97));
        }
    }
    if let Some((lost, p99)) = crate::neighbour::goals(&r.neighbour) {
        out.push(Target {
            what: "noisy neighbour: beside a flood over its game's budget, another game loses ≤ 1 %",
            measured: format!("{lost:.2} % lost"),
            met: Some(lost <= 1.0),
        });
        out.push(Target {
            what: "noisy neighbour: its p99 within 1.5× of its p99 beside the floor",
            measured: format!("{p99:.2}×"),
            met: Some(p99 <= 1.5),
        });
    }
    out
}

/// A target on throughput: ours at least `factor` times theirs (both measured in this run).
fn throughput_target(
    what: &'static str,
    unit: &str,
    pair: Option<(&PathResult, &PathResult)>,
    factor: f64,
) -> Target {
    match pair {
        Some((ours, theirs)) => {
            let (a, b) = (
                ours.throughput.answers_per_sec,
                theirs.throughput.answers_per_sec,
            );
            Target {
                what,
                measured: format!("{a:.0} vs {b:.0} {unit} ({:.2}×)", a / b.max(1.0)),
                met: Some(a >= factor * b),
            }
        }
        None => Target {
            what,
            measured: "not measured".into(),
            met: None,
        },
    }
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    }
}

/// BENCHMARKS.md.
pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `spotable-bench compare` (see the README's Benchmarks section) in {:.0} s. \
         Every figure comes from this one run; compare paths by the ratios, since the \
         machine is shared and absolute numbers move between runs. Each figure is the median of \
         the rounds, which ran the paths interleaved.\n",
        r.seconds
    );
    let _ = writeln!(md, "## Machine and settings\n\n| | |\n|---|---|");
    for (k, v) in r.machine.iter().chain(&r.settings) {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(
        md,
        "\nThe load generator, every proxy and every replica share the machine's cores.\n"
    );

    let _ = writeln!(
        md,
        "## Targets\n\n| Spotable's target | measured | |\n|---|---|---|"
    );
    for t in targets(r) {
        let _ = writeln!(md, "| {} | {} | {} |", t.what, t.measured, verdict(t.met));
    }

    let direct = find(r, Proxy::Direct, 1, None);
    let _ = writeln!(
        md,
        "\n## Throughput and latency\n\n\
         Closed loop ({} flows, a window per flow) for throughput: *answers/s* counts each request's \
         first answer; *received/s* counts every datagram the player got, duplicates included. \
         Open loop at a fixed rate for latency, measured from each datagram's intended send time; \
         *added* is the path's round trip minus the direct path's.\n",
        r.paths.first().map_or(0, |p| p.throughput.flows)
    );
    let _ = writeln!(
        md,
        "| path | answers/s | × direct | received/s | duplicates delivered per request | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | lost (open loop) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for p in &r.paths {
        let t = &p.throughput;
        let l = &p.latency;
        let ratio = direct.map_or(f64::NAN, |d| {
            t.answers_per_sec / d.throughput.answers_per_sec.max(1.0)
        });
        let firsts = (t.unique + t.late).max(1) as f64;
        let (a50, a99) = direct.map_or((f64::NAN, f64::NAN), |d| {
            (
                l.rtt_us.p50 - d.latency.rtt_us.p50,
                l.rtt_us.p99 - d.latency.rtt_us.p99,
            )
        });
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {:+.0} | {:+.0} | {} of {} |",
            p.path.name(),
            t.answers_per_sec,
            ratio,
            t.received_per_sec,
            t.duplicates as f64 / firsts,
            l.rtt_us.p50,
            l.rtt_us.p99,
            l.rtt_us.p999,
            a50,
            a99,
            l.lost,
            l.sent
        );
    }
    for (name, why) in &r.skipped {
        let _ = writeln!(md, "| {name} | not measured: {why} | | | | | | | | | |");
    }

    let big: Vec<&PathResult> = r.paths.iter().filter(|p| p.large.is_some()).collect();
    if let Some(size) = big
        .first()
        .and_then(|p| p.large.as_ref())
        .map(|l| l.payload)
    {
        let base = direct
            .and_then(|d| d.large.as_ref())
            .map(|l| l.answers_per_sec);
        let _ = writeln!(
            md,
            "\n### Large datagrams ({size} B)\n\nClosed loop as above, same rounds.\n\n\
             | path | answers/s | × direct | received/s | MB/s delivered (first answers) |\n\
             |---|---:|---:|---:|---:|"
        );
        for p in big {
            let Some(l) = &p.large else { continue };
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.2} | {:.0} | {:.1} |",
                p.path.name(),
                l.answers_per_sec,
                base.map_or(f64::NAN, |b| l.answers_per_sec / b.max(1.0)),
                l.received_per_sec,
                l.answers_per_sec * size as f64 / 1e6
            );
        }
    }

    let plain = find(r, Proxy::Spotable, 1, Some("copies"));
    if let Some(a) = r.paths.iter().find(|p| p.path.anchor) {
        let _ = writeln!(
            md,
            "\n### The identity anchor's cost\n\n\
             `Spotable ×1 (copies, PROXY v2 + anchor)` puts a PROXY v2 header before every \
             datagram and an anchor (`spotable-wrapper anchor`, in-process in `spotable-bench \
             anchor`) in front of the replica; `Spotable ×1 (copies)` is the same path without \
             them, in the same rounds. CPU is the anchor process's user and system time over \
             the closed-loop pass, per datagram it carried (in and out each count).\n\n\
             | | answers/s | × plain | p50 µs | added p50 µs vs plain | p99 µs | anchor CPU µs per datagram |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        );
        for p in [plain, Some(a)].into_iter().flatten() {
            let base = plain.map_or(f64::NAN, |b| b.throughput.answers_per_sec.max(1.0));
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.2} | {:.0} | {:+.0} | {:.0} | {} |",
                p.path.name(),
                p.throughput.answers_per_sec,
                p.throughput.answers_per_sec / base,
                p.latency.rtt_us.p50,
                plain.map_or(f64::NAN, |b| p.latency.rtt_us.p50 - b.latency.rtt_us.p50),
                p.latency.rtt_us.p99,
                p.anchor_cpu_us
                    .map_or("-".to_string(), |c| format!("{c:.1}")),
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## Failover\n\nOpen loop; one of the two replicas is SIGKILLed mid-run. A gap is \
         the longest time without a new answer while sending.\n\n\
         | path | sent | lost | duplicates delivered | longest gap ms | kill at ms |\n|---|---:|---:|---:|---:|---:|"
    );
    for f in &r.failover {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.1} | {:.0} |",
            f.path.name(),
            f.report.sent,
            f.report.lost,
            f.report.duplicates,
            f.report.longest_gap_ms,
            f.kill_at_ms
        );
    }
    jitter_section(&mut md, r);
    crate::tick_rows::markdown(&mut md, &r.tick, &r.tick_setting);
    crate::neighbour::markdown(&mut md, &r.neighbour);
    crate::move_cost::markdown(&mut md, &r.moves);
    let _ = writeln!(
        md,
        "\n## Plots\n\n![Throughput by fan-out](results/throughput.svg)\n\n\
         ![Round-trip time CDF](results/latency-cdf.svg)\n\n\
         ![Failover timeline](results/failover.svg)\n"
    );
    if !r.jitter.is_empty() {
        let _ = writeln!(
            md,
            "![Round trips over jittery links](results/jitter-cdf.svg)\n"
        );
    }
    md
}

/// The jitter table: redundancy as a cut of the tail, against the one-replica paths.
fn jitter_section(md: &mut String, r: &Results) {
    if r.jitter.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "\n## Redundancy against jitter\n\nReplica links jitter: {}. Round trips of the \
         first answer to each datagram, in µs. With copies, the first copy to come back wins \
         (Spotable delivers it and suppresses the rest; Quilkin delivers every copy, so the \
         player gets the duplicates too). Ratios are against the direct path of this run.\n\n\
         | path | p50 | p99 | p99.9 | max | p99 vs direct | p99.9 vs direct | lost | duplicates delivered |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|",
        r.jitter_setting
    );
    let base = r
        .jitter
        .iter()
        .find(|j| j.path.proxy == Proxy::Direct)
        .map(|j| j.report.rtt_us);
    for j in &r.jitter {
        let p = j.report.rtt_us;
        let ratio = |f: fn(&crate::loadgen::Percentiles) -> f64| {
            base.map_or("–".to_string(), |b| {
                format!("{:.2}", f(&p) / f(&b).max(1e-9))
            })
        };
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} |",
            j.path.name(),
            p.p50,
            p.p99,
            p.p999,
            p.max,
            ratio(|x| x.p99),
            ratio(|x| x.p999),
            j.report.lost,
            j.report.duplicates
        );
    }
}

/// A few lines for the terminal.
pub fn summary(r: &Results) -> String {
    let mut s = String::new();
    for p in &r.paths {
        let _ = writeln!(
            s,
            "  {:<28} {:>9.0} answers/s {:>9.0} received/s  p50 {:>6.0} µs  p99 {:>6.0} µs",
            p.path.name(),
            p.throughput.answers_per_sec,
            p.throughput.received_per_sec,
            p.latency.rtt_us.p50,
            p.latency.rtt_us.p99
        );
    }
    for f in &r.failover {
        let _ = writeln!(
            s,
            "  failover {:<19} lost {}  duplicates {}  longest gap {:.1} ms",
            f.path.name(),
            f.report.lost,
            f.report.duplicates,
            f.report.longest_gap_ms
        );
    }
    for j in &r.jitter {
        let p = j.report.rtt_us;
        let _ = writeln!(
            s,
            "  jitter {:<21} p50 {:>6.0} µs  p99 {:>6.0} µs  p99.9 {:>6.0} µs  duplicates {}",
            j.path.name(),
            p.p50,
            p.p99,
            p.p999,
            j.report.duplicates
        );
    }
    for t in &r.tick {
        let _ = writeln!(
            s,
            "  tick {:<26} {:.2} per tick, {} from a second world, gap {:.0} ms",
            t.mode, t.per_tick_before, t.second_world, t.gap_at_kill_ms
        );
    }
    for t in targets(r) {
        let _ = writeln!(
            s,
            "  target: {} — {} ({})",
            t.what,
            t.measured,
            verdict(t.met).replace("**", "")
        );
    }
    s
}

/// Writes results.json, the plots and ../BENCHMARKS.md.
pub fn write(r: &Results, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("results.json"), serde_json::to_string_pretty(r)?)?;
    plot_throughput(r, &out.join("throughput.svg"))?;
    plot_cdf(r, &out.join("latency-cdf.svg"))?;
    plot_failover(&r.failover, &out.join("failover.svg"))?;
    if !r.jitter.is_empty() {
        plot_jitter(&r.jitter, &out.join("jitter-cdf.svg"))?;
    }
    let md = out.parent().unwrap_or(out).join("BENCHMARKS.md");
    std::fs::write(&md, markdown(r))?;
    Ok(())
}

pub(crate) const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

pub(crate) fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e:?}")
}

/// A legend entry's sample: a short line in the series' style.
pub(crate) fn legend_mark((x, y): (i32, i32), style: ShapeStyle) -> PathElement<(i32, i32)> {
    PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// A per-bucket count as plot points at each bucket's start, in ms.
fn points(timeline: &[u32], bucket_ms: f64) -> Vec<(f64, f64)> {
    timeline
        .iter()
        .enumerate()
        .map(|(k, &n)| (k as f64 * bucket_ms, f64::from(n)))
        .collect()
}

/// Draws the legend at `at` and writes the file.
fn finish<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    root: &DrawingArea<SVGBackend<'a>, plotters::coord::Shift>,
    at: SeriesLabelPosition,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(at)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_throughput(r: &Results, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut add = |name: String, proxy: Proxy, dedupe: Option<&str>, received: bool| {
        let pts: Vec<(f64, f64)> = r
            .paths
            .iter()
            .filter(|p| {
                p.path.proxy == proxy && (dedupe.is_none() || p.path.dedupe.as_deref() == dedupe)
            })
            .map(|p| {
                let t = &p.throughput;
                (
                    p.path.fanout as f64,
                    if received {
                        t.received_per_sec
                    } else {
                        t.answers_per_sec
                    },
                )
            })
            .collect();
        if !pts.is_empty() {
            series.push((name, pts));
        }
    };
    add("direct".into(), Proxy::Direct, None, false);
    add("nginx".into(), Proxy::Nginx, None, false);
    add(
        "Quilkin (unique answers)".into(),
        Proxy::Quilkin,
        None,
        false,
    );
    add(
        "Quilkin (received, with duplicates)".into(),
        Proxy::Quilkin,
        None,
        true,
    );
    add(
        "Spotable copies (deduplicated)".into(),
        Proxy::Spotable,
        Some("copies"),
        false,
    );
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("Throughput by fan-out (closed loop)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..3.5f64, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("replicas per session (fan-out)")
        .y_desc("answers per second")
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .x_labels(3)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(plot_err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |at| legend_mark(at, color.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(plot_err)?;
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperRight)
}

fn plot_cdf(r: &Results, path: &Path) -> anyhow::Result<()> {
    let lines: Vec<(String, &[(f64, f64)])> = r
        .paths
        .iter()
        .filter(|p| p.path.fanout <= 2 && matches!(p.path.dedupe.as_deref(), None | Some("copies")))
        .filter(|p| !p.latency.cdf.is_empty())
        .map(|p| (p.path.name(), &p.latency.cdf[..]))
        .collect();
    plot_nines(path, "Round-trip time (open loop)", &lines, 1.0)
}

/// Round-trip CDFs of the jitter runs.
fn plot_jitter(runs: &[JitterResult], path: &Path) -> anyhow::Result<()> {
    let lines: Vec<(String, &[(f64, f64)])> = runs
        .iter()
        .map(|j| (j.path.name(), &j.report.cdf[..]))
        .collect();
    // From the first percentile: the fastest few answers only stretch the axis.
    let xmin = lines
        .iter()
        .filter_map(|(_, cdf)| cdf.iter().find(|c| c.1 >= 0.01).map(|c| c.0 * 0.9))
        .fold(f64::INFINITY, f64::min);
    plot_nines(
        path,
        "Round trips over jittery replica links (first answers)",
        &lines,
        xmin,
    )
}

/// CDFs (`(µs, quantile)` points) on a log time axis from `xmin`, the quantile on a "nines"
/// scale, -log10(1 - q): 1 = p90, 2 = p99, 3 = p99.9.
fn plot_nines(
    path: &Path,
    caption: &str,
    lines: &[(String, &[(f64, f64)])],
    xmin: f64,
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let xmax = lines
        .iter()
        .flat_map(|(_, cdf)| cdf.iter().map(|c| c.0))
        .fold(10.0, f64::max)
        * 1.2;
    let xmin = xmin.clamp(1.0, xmax / 2.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0f64..4f64)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("round trip, µs")
        .y_desc("percentile")
        .y_labels(5)
        .y_label_formatter(&|y| match y.round() as i64 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            _ => "p99.99".into(),
        })
        .draw()
        .map_err(plot_err)?;
    for (i, (name, cdf)) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = cdf
            .iter()
            .filter(|c| c.0 >= xmin)
            .map(|&(x, q)| (x, -(1.0 - q).max(1e-4).log10()))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |at| legend_mark(at, color.stroke_width(2)));
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperLeft)
}

fn plot_failover(runs: &[FailoverResult], path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let ymax = runs
        .iter()
        .flat_map(|f| f.report.timeline_all.iter().copied())
        .max()
        .unwrap_or(1) as f64
        * 1.3;
    let xmax = runs
        .iter()
        .map(|f| f.report.timeline.len() as f64 * f.report.bucket_ms)
        .fold(100.0, f64::max);
    let bucket = runs.first().map_or(10.0, |f| f.report.bucket_ms);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Failover: answers per 10 ms, one of two replicas SIGKILLed",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax.max(1.0))
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("time since the load started, ms")
        .y_desc(format!("answers per {bucket:.0} ms"))
        .draw()
        .map_err(plot_err)?;
    for (i, f) in runs.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts = points(&f.report.timeline, f.report.bucket_ms);
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(format!(
                "{}: first answers ({} lost)",
                f.path.name(),
                f.report.lost
            ))
            .legend(move |at| legend_mark(at, color.stroke_width(2)));
        // Everything the player received, duplicates included, dashed.
        let faded = color.mix(0.7);
        let all = points(&f.report.timeline_all, f.report.bucket_ms);
        chart
            .draw_series(DashedLineSeries::new(all, 6, 4, faded.stroke_width(1)))
            .map_err(plot_err)?
            .label(format!(
                "{}: all received ({} duplicates)",
                f.path.name(),
                f.report.duplicates
            ))
            .legend(move |at| legend_mark(at, faded.stroke_width(1)));
    }
    if let Some(f) = runs.first() {
        let k = f.kill_at_ms;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(k, 0.0), (k, ymax)],
                RED.stroke_width(2),
            )))
            .map_err(plot_err)?
            .label("SIGKILL")
            .legend(|at| legend_mark(at, RED.stroke_width(2)));
    }
    finish(&mut chart, &root, SeriesLabelPosition::UpperRight)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Route;
    use crate::loadgen::Report;

    fn path(proxy: Proxy, fanout: usize, dedupe: Option<&str>, tput: f64, p50: f64) -> PathResult {
        let mut throughput = Report {
            answers_per_sec: tput,
            received_per_sec: tput,
            unique: 100,
            ..Report::default()
        };
        if proxy == Proxy::Quilkin && fanout == 2 {
            throughput.received_per_sec = 2.0 * tput;
            throughput.duplicates = 100;
        }
        let mut latency = Report::default();
        latency.rtt_us.p50 = p50;
        PathResult {
            path: Route {
                proxy,
                fanout,
                dedupe: dedupe.map(String::from),
                token: false,
                anchor: false,
                baseline: false,
            },
            throughput,
            throughput_rounds: vec![tput],
            latency,
            large: None,
            anchor_cpu_us: None,
        }
    }

    fn results(spotable_1: f64, spotable_p50: f64, failover_dups: u64) -> Results {
        Results {
            machine: vec![("CPU".into(), "test".into())],
            settings: vec![],
            paths: vec![
                path(Proxy::Direct, 1, None, 200.0, 100.0),
                path(Proxy::Nginx, 1, None, 90.0, 150.0),
                path(Proxy::Quilkin, 2, None, 30.0, 160.0),
                path(Proxy::Spotable, 1, Some("copies"), spotable_1, spotable_p50),
                path(Proxy::Spotable, 2, Some("copies"), 60.0, 150.0),
                PathResult {
                    path: Route {
                        token: true,
                        ..path(Proxy::Spotable, 2, Some("copies"), 58.0, 150.0).path
                    },
                    ..path(Proxy::Spotable, 2, Some("copies"), 58.0, 150.0)
                },
                PathResult {
                    path: Route {
                        anchor: true,
                        ..path(Proxy::Spotable, 1, Some("copies"), 80.0, 160.0).path
                    },
                    anchor_cpu_us: Some(3.5),
                    ..path(Proxy::Spotable, 1, Some("copies"), 80.0, 160.0)
                },
            ],
            failover: vec![FailoverResult {
                path: Route {
                    proxy: Proxy::Spotable,
                    fanout: 2,
                    dedupe: Some("copies".into()),
                    token: false,
                    anchor: false,
                    baseline: false,
                },
                kill_at_ms: 2000.0,
                report: Report {
                    duplicates: failover_dups,
                    ..Report::default()
                },
            }],
            jitter: vec![
                JitterResult {
                    path: path(Proxy::Direct, 1, None, 0.0, 0.0).path,
                    report: Report {
                        rtt_us: crate::loadgen::Percentiles {
                            p50: 2100.0,
                            p90: 3000.0,
                            p99: 4000.0,
                            p999: 5000.0,
                            max: 6000.0,
                        },
                        ..Report::default()
                    },
                },
                JitterResult {
                    path: path(Proxy::Spotable, 2, Some("copies"), 0.0, 0.0).path,
                    report: Report {
                        rtt_us: crate::loadgen::Percentiles {
                            p50: 1500.0,
                            p90: 2000.0,
                            p99: 3000.0,
                            p999: 4000.0,
                            max: 4500.0,
                        },
                        ..Report::default()
                    },
                },
            ],
            jitter_setting: "netem".into(),
            tick: vec![crate::tick_rows::TickRow {
                mode: "copies (default)".into(),
                per_tick_before: 1.0,
                second_world: 0,
                steps_back: 0,
                gap_at_kill_ms: 66.0,
                per_tick_after: 0.97,
                players_on_killed: 4,
                sessions_demoted: 8,
            }],
            tick_setting: "Two tick servers.".into(),
            neighbour: crate::neighbour::Neighbour::default(),
            moves: crate::move_cost::MoveCost {
                rows: vec![crate::move_cost::MoveRow {
                    mode: "lazy".into(),
                    mib: 200,
                    pause_ms: vec![120.0, 110.0, 130.0],
                    last_page_ms: vec![900.0, 950.0, 1000.0],
                }],
                skipped: None,
            },
            skipped: vec![("Quilkin ×1".into(), "not installed".into())],
            seconds: 1.0,
        }
    }

    #[test]
    fn targets_hold_or_fail_on_the_figures() {
        let met: Vec<Option<bool>> = targets(&results(100.0, 140.0, 0))
            .iter()
            .map(|t| t.met)
            .collect();
        assert_eq!(met, vec![Some(true); 5], "58 of 60 is within 5 %");
        // Slower than nginx, more added latency, a duplicate in failover.
        let met: Vec<Option<bool>> = targets(&results(80.0, 160.0, 1))
            .iter()
            .map(|t| t.met)
            .collect();
        assert_eq!(
            met,
            vec![
                Some(false),
                Some(true),
                Some(false),
                Some(true),
                Some(false)
            ]
        );
        // Token routing at 56 of 60: over 5 %.
        let mut r = results(100.0, 140.0, 0);
        if let Some(t) = r.paths.iter_mut().find(|p| p.path.token) {
            t.throughput.answers_per_sec = 56.0;
        }
        assert_eq!(targets(&r)[3].met, Some(false));
        // 60 vs 1.5 x 30 = 45 holds; with Quilkin missing it is "not measured".
        let mut r = results(100.0, 140.0, 0);
        r.paths.retain(|p| p.path.proxy != Proxy::Quilkin);
        assert_eq!(targets(&r)[1].met, None);
    }

    #[test]
    fn the_markdown_has_every_path_the_skips_and_the_verdicts() {
        let md = markdown(&results(80.0, 140.0, 0));
        assert!(
            md.contains("| copies (default) | 1.00 | 0 | 0 | 66 | 0.97 | 4 | 8 |"),
            "{md}"
        );
        assert!(md.contains("| Spotable ×1 (copies) | 80 | 0.40 |"), "{md}");
        // Quilkin x2 delivered a duplicate per request.
        assert!(
            md.contains("| Quilkin ×2 | 30 | 0.15 | 60 | 1.00 |"),
            "{md}"
        );
        assert!(md.contains("| Quilkin ×1 | not measured: not installed |"));
        // The move row: medians, then every run.
        assert!(
            md.contains("| 200 MiB | lazy | 120 (120, 110, 130) | 950 (900, 950, 1000) |"),
            "{md}"
        );
        assert!(md.contains("| **not met** |"));
        assert!(
            md.contains(
                "| Spotable ×2 (copies) | 1500 | 3000 | 4000 | 4500 | 0.75 | 0.80 | 0 | 0 |"
            ),
            "the jitter row against direct: {md}"
        );
        assert!(md.contains("+40 |"), "added p50 of Spotable x1: {md}");
        // The anchor's cost against the plain path of the same run.
        assert!(
            md.contains(
                "| Spotable ×1 (copies, PROXY v2 + anchor) | 80 | 1.00 | 160 | +20 | 0 | 3.5 |"
            ),
            "{md}"
        );
    }
}
