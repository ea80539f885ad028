//! The demo as a picture: what each replica answered per 10 ms, whose copy the player got,
//! the kill, and the gap (or its absence).
//!
//! The replicas log every answer with its sequence number and the wall clock (`--log-answers`);
//! the player logs what it received. The copy delivered is the one sent first: in `copies`
//! mode the proxy forwards the first copy to arrive, and on loopback the first sent arrives
//! first. The proxy's own first-answer counters are kept beside it, for a cross-check.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::results::{COLORS, legend_mark, plot_err};

/// Width of the timeline's buckets.
pub const BUCKET: Duration = Duration::from_millis(10);

/// One replica's line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicaLine {
    /// Its address.
    pub addr: String,
    /// Answers it sent, per bucket.
    pub answers: Vec<u32>,
    /// Answers whose copy from this replica was sent first (the one delivered), per bucket.
    pub first: Vec<u32>,
    /// The proxy's `spotable_replica_first_answers_total` for it at the end of the run.
    pub proxy_first_answers: u64,
}

/// The whole picture's data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Bucket width, ms.
    pub bucket_ms: f64,
    /// When the replica was killed, ms from the start.
    pub kill_ms: f64,
    /// Which replica (0-based) was killed.
    pub killed: usize,
    /// Interval between two datagrams of the player, ms.
    pub interval_ms: f64,
    /// Per replica, in order.
    pub replicas: Vec<ReplicaLine>,
    /// Distinct answers the player received, per bucket.
    pub player: Vec<u32>,
    /// Longest silence the player heard from the kill on, ms.
    pub gap_after_ms: f64,
}

/// `(seq, µs since the Unix epoch)` from a replica's `answered SEQ MICROS` lines.
pub fn parse_answers(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|l| {
            let mut it = l.strip_prefix("answered ")?.split(' ');
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
        .collect()
}

/// Buckets each replica's answers (`answers[i]`: replica i's `(seq, µs)`) and the player's
/// first arrivals (`player`: `(seq, time since start)`), from `start_us` on, over `span`.
pub fn build(
    answers: &[Vec<(u64, u64)>],
    player: &[(u64, Duration)],
    start_us: u64,
    span: Duration,
) -> (Vec<ReplicaLine>, Vec<u32>) {
    let buckets = (span.as_micros() / BUCKET.as_micros()) as usize + 1;
    let bucket_of = |us: u64| (us.saturating_sub(start_us) / BUCKET.as_micros() as u64) as usize;
    let mut lines: Vec<ReplicaLine> = answers
        .iter()
        .map(|_| ReplicaLine {
            answers: vec![0; buckets],
            first: vec![0; buckets],
            ..ReplicaLine::default()
        })
        .collect();
    // The first sender of each number, and when.
    let mut first: HashMap<u64, (u64, usize)> = HashMap::new();
    for (i, sent) in answers.iter().enumerate() {
        for &(seq, us) in sent {
            if let Some(n) = lines[i].answers.get_mut(bucket_of(us)) {
                *n += 1;
            }
            let e = first.entry(seq).or_insert((us, i));
            if us < e.0 {
                *e = (us, i);
            }
        }
    }
    for (us, i) in first.into_values() {
        if let Some(n) = lines[i].first.get_mut(bucket_of(us)) {
            *n += 1;
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut got = vec![0u32; buckets];
    for &(seq, at) in player {
        if seen.insert(seq)
            && let Some(n) = got.get_mut((at.as_micros() / BUCKET.as_micros()) as usize)
        {
            *n += 1;
        }
    }
    (lines, got)
}

/// Draws `t` as an SVG at `path`: answers per replica on top, the player's stream below with
/// each bucket's answers coloured by the replica whose copy won.
pub fn plot(t: &Timeline, path: &Path) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (top, bottom) = root.split_vertically(300);
    let xmax = t.player.len() as f64 * t.bucket_ms / 1000.0;
    let ymax = t
        .replicas
        .iter()
        .flat_map(|r| r.answers.iter().copied())
        .chain(t.player.iter().copied())
        .max()
        .unwrap_or(1) as f64
        * 2.0; // the upper half for the legend
    let secs = |k: usize| k as f64 * t.bucket_ms / 1000.0;
    let kill = t.kill_ms / 1000.0;
    let kill_line =
        |ymax: f64| PathElement::new(vec![(kill, 0.0), (kill, ymax)], RED.stroke_width(2));

    let mut chart = ChartBuilder::on(&top)
        .caption("What each replica answered (per 10 ms)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .y_desc("answers")
        .x_label_formatter(&|x| format!("{x:.1} s"))
        .draw()
        .map_err(plot_err)?;
    for (i, r) in t.replicas.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = r
            .answers
            .iter()
            .enumerate()
            .map(|(k, &n)| (secs(k), f64::from(n)))
            .collect();
        let dead = if i == t.killed { " (SIGKILLed)" } else { "" };
        // Live replicas answer alike and their lines coincide: the first drawn widest, so
        // each stays visible under the next.
        let width = 2 * (t.replicas.len() - i) as u32 - 1;
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(width)))
            .map_err(plot_err)?
            .label(format!("replica {} {}{dead}", i + 1, r.addr))
            .legend(move |at| legend_mark(at, color.stroke_width(width)));
    }
    chart
        .draw_series(std::iter::once(kill_line(ymax)))
        .map_err(plot_err)?
        .label(format!("SIGKILL replica {} at {kill:.2} s", t.killed + 1))
        .legend(|at| legend_mark(at, RED.stroke_width(2)));
    legend(&mut chart)?;

    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!(
                "What the player received (per 10 ms), coloured by the copy delivered; \
                 longest gap after the kill {:.1} ms, one datagram every {:.1} ms",
                t.gap_after_ms, t.interval_ms
            ),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("time since the player started")
        .y_desc("answers")
        .x_label_formatter(&|x| format!("{x:.1} s"))
        .draw()
        .map_err(plot_err)?;
    // Stacked bars: replica 1's wins at the bottom, the next on top of them, and so on.
    let w = t.bucket_ms / 1000.0;
    let mut base = vec![0u32; t.player.len()];
    for (i, r) in t.replicas.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = r
            .first
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(k, &n)| {
                let b = base.get(k).copied().unwrap_or(0);
                Rectangle::new(
                    [(secs(k), f64::from(b)), (secs(k) + w, f64::from(b + n))],
                    color.mix(0.6).filled(),
                )
            })
            .collect();
        for (k, &n) in r.first.iter().enumerate() {
            if let Some(b) = base.get_mut(k) {
                *b += n;
            }
        }
        chart
            .draw_series(bars)
            .map_err(plot_err)?
            .label(format!(
                "copy delivered from replica {} ({} per the proxy)",
                i + 1,
                r.proxy_first_answers
            ))
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.mix(0.6).filled())
            });
    }
    let received: Vec<(f64, f64)> = t
        .player
        .iter()
        .enumerate()
        .map(|(k, &n)| (secs(k) + w / 2.0, f64::from(n)))
        .collect();
    chart
        .draw_series(LineSeries::new(received, BLACK.stroke_width(1)))
        .map_err(plot_err)?
        .label("answers the player received")
        .legend(|at| legend_mark(at, BLACK.stroke_width(1)));
    chart
        .draw_series(std::iter::once(kill_line(ymax)))
        .map_err(plot_err)?;
    legend(&mut chart)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The legend, top right, over the data it may cover.
fn legend<'a>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_answers_first_senders_and_the_players_stream() {
        let lines: Vec<String> = ["listening x", "answered 0 1000", "answered 1 15000", "junk"]
            .iter()
            .map(|s| (*s).to_string())
            .collect();
        let a = parse_answers(&lines);
        assert_eq!(a, vec![(0, 1000), (1, 15000)]);
        let b = vec![(0, 1200), (1, 14000), (2, 25000)];
        let player = [
            (0, Duration::from_micros(1500)),
            (1, Duration::from_micros(14500)),
            (1, Duration::from_micros(15500)),
        ];
        let (reps, got) = build(&[a, b], &player, 0, Duration::from_millis(30));
        assert_eq!(reps[0].answers, vec![1, 1, 0, 0]);
        assert_eq!(reps[1].answers, vec![1, 1, 1, 0]);
        assert_eq!(reps[0].first, vec![1, 0, 0, 0], "0 from replica 0 first");
        assert_eq!(
            reps[1].first,
            vec![0, 1, 1, 0],
            "1 and 2 from replica 1 first"
        );
        assert_eq!(got, vec![1, 1, 0, 0], "a repeat counts once");
    }

    #[test]
    fn the_plot_is_written() {
        let dir = std::env::temp_dir().join(format!("spotable-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        let t = Timeline {
            bucket_ms: 10.0,
            kill_ms: 20.0,
            killed: 1,
            interval_ms: 5.0,
            replicas: vec![
                ReplicaLine {
                    addr: "127.0.0.1:1".into(),
                    answers: vec![2, 2, 2, 2],
                    first: vec![1, 1, 2, 2],
                    proxy_first_answers: 6,
                },
                ReplicaLine {
                    addr: "127.0.0.1:2".into(),
                    answers: vec![2, 2, 0, 0],
                    first: vec![1, 1, 0, 0],
                    proxy_first_answers: 2,
                },
            ],
            player: vec![2, 2, 2, 2],
            gap_after_ms: 5.0,
        };
        plot(&t, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("SIGKILL replica 2"),
            "{svg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
