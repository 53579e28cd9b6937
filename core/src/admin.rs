//! What both command-line front ends print and parse the same way: the status report and ages
//! such as `7d`. Runs on the caller's thread; read-only.

use std::fmt::Write as _;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::store::Store;
use crate::task::{State, TaskFilter};

/// Parses an age like `90s`, `15m`, `12h`, `7d` or `2w` (a bare number is seconds).
pub fn parse_age(text: &str) -> Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        Error::invalid("age", format!("{text:?}: expected a number with an optional unit s, m, h, d or w (e.g. 7d)"))
    })?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(Error::invalid("age", format!("{text:?}: unknown unit {unit:?} (use s, m, h, d or w)"))),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

fn ago(micros: i64, now: i64) -> String {
    let s = (now - micros).max(0) / 1_000_000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).chain([header[i].len()]).max().unwrap_or(0))
        .collect();
    let line = |cells: Vec<&str>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header.to_vec()));
    for r in rows {
        let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// The human-readable status: dispatchers, per-queue counts, running tasks with progress.
pub fn status_report(store: &Store) -> Result<String> {
    let now = crate::clock::now_micros();
    let mut out = String::new();
    let _ = writeln!(out, "database: {}\n", store.describe());

    let dispatchers = store.dispatchers()?;
    let rows: Vec<Vec<String>> = dispatchers
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.runtime.to_string(),
                d.name.clone(),
                d.pid.to_string(),
                d.workers.to_string(),
                d.running.to_string(),
                d.queues.clone().unwrap_or_else(|| "*".into()),
                if d.alive { "alive".into() } else { "stale".into() },
                ago(d.heartbeat_at, now),
            ]
        })
        .collect();
    if rows.is_empty() {
        let _ = writeln!(out, "dispatchers: none running\n");
    } else {
        let _ = writeln!(out, "dispatchers:");
        table(&mut out, &["ID", "RUNTIME", "NAME", "PID", "WORKERS", "RUNNING", "QUEUES", "STATE", "HEARTBEAT"], &rows);
        out.push('\n');
    }

    let counts = store.counts()?;
    let rows: Vec<Vec<String>> = counts
        .iter()
        .map(|c| {
            vec![
                c.queue.clone().unwrap_or_else(|| "(parallel)".into()),
                (c.new - c.waiting).to_string(),
                c.waiting.to_string(),
                c.running.to_string(),
                c.successful.to_string(),
                c.error.to_string(),
                c.aborted.to_string(),
                if c.paused { "paused".into() } else { String::new() },
            ]
        })
        .collect();
    if rows.is_empty() {
        let _ = writeln!(out, "queues: no tasks\n");
    } else {
        let _ = writeln!(out, "queues:");
        table(&mut out, &["QUEUE", "READY", "WAITING", "RUNNING", "SUCCESSFUL", "ERROR", "ABORTED", ""], &rows);
        out.push('\n');
    }

    let running = store.list(&TaskFilter { states: vec![State::Running], limit: Some(50), ..Default::default() })?;
    if !running.is_empty() {
        let rows: Vec<Vec<String>> = running
            .iter()
            .map(|t| {
                vec![
                    t.id.to_string(),
                    t.runtime.to_string(),
                    t.target.clone(),
                    t.queue.clone().unwrap_or_else(|| "-".into()),
                    t.perc_finished.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "-".into()),
                    t.message.clone().unwrap_or_default(),
                    t.started_at.map(|s| ago(s, now)).unwrap_or_default(),
                ]
            })
            .collect();
        let _ = writeln!(out, "running tasks:");
        table(&mut out, &["ID", "RUNTIME", "TARGET", "QUEUE", "DONE", "MESSAGE", "STARTED"], &rows);
    }
    Ok(out.trim_end().to_string() + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("15m").unwrap(), Duration::from_secs(900));
        assert!(parse_age("7 days").is_err());
        assert!(parse_age("d").is_err());
    }
}
