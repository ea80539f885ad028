//! Reads values out of Prometheus text exposition, for the demo summary and tests.

/// The value of series `name` whose labels include every `labels` pair; the sum when several
/// series match (e.g. a counter across reasons when no label is given).
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all = labels.iter().all(|(k, val)| {
            label_text
                .split(',')
                .any(|kv| kv == format!("{k}=\"{val}\""))
        });
        if all && let Ok(v) = v.parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_series_by_labels() {
        let text = "# HELP x y\nspotable_drops_total{reason=\"empty\"} 3\n\
                    spotable_drops_total{reason=\"not_replica\"} 4\nspotable_sessions 2\n";
        assert_eq!(value(text, "spotable_sessions", &[]), Some(2.0));
        assert_eq!(
            value(text, "spotable_drops_total", &[("reason", "not_replica")]),
            Some(4.0)
        );
        assert_eq!(value(text, "spotable_drops_total", &[]), Some(7.0));
        assert_eq!(value(text, "spotable_drops", &[]), None);
    }
}
