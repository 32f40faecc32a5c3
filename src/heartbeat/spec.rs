//! `heartbeat.yaml`: parsing into checked entries (every error names the file, the line and the key), planning an
//! entry's next run from its cadence and the tier multiplier, and writing the file back.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::tasks::TaskRegistry;
use super::HeartbeatError;
use crate::config::yaml;

/// How long one run may take when the entry does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest timeout an entry may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// The shortest `every`: a heartbeat faster than this is a busy loop.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// The checked contents of `heartbeat.yaml`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeartbeatFile {
    pub entries: Vec<Entry>,
}

/// One scheduled entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub cadence: Cadence,
    pub task: String,
    pub enabled: bool,
    pub params: Map<String, Value>,
    /// As written in the file (`"30s"`), if it was.
    pub timeout_text: Option<String>,
    pub timeout: Duration,
}

/// When an entry fires: on a cron schedule (UTC) or at a fixed interval.
#[derive(Clone, Debug, PartialEq)]
pub enum Cadence {
    Cron {
        expr: String,
        cron: Box<croner::Cron>,
    },
    Every {
        text: String,
        interval: Duration,
    },
}

impl Cadence {
    /// Parses a cron expression: 5 fields, or 6 with leading seconds.
    pub fn cron(expr: &str) -> Result<Cadence, String> {
        let expr = expr.trim();
        let fields = expr.split_whitespace().count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "cron expression {expr:?} has {fields} fields; expected 5 (minute hour day month weekday) or 6 \
                 (with leading seconds)"
            ));
        }
        let cron = croner::Cron::from_str(expr)
            .map_err(|e| format!("invalid cron expression {expr:?}: {e}"))?;
        // An expression that never fires (`0 0 31 2 *`) would silently do nothing.
        cron.find_next_occurrence(&Utc::now(), false)
            .map_err(|e| format!("cron expression {expr:?} never fires: {e}"))?;
        Ok(Cadence::Cron {
            expr: expr.to_string(),
            cron: Box::new(cron),
        })
    }

    /// Parses an interval like `30s`, `5m`, `1h 30m`, `1d`.
    pub fn every(text: &str) -> Result<Cadence, String> {
        let interval = parse_duration(text)?;
        if interval < MIN_EVERY {
            return Err(format!(
                "interval {text:?} is shorter than the minimum of 1s"
            ));
        }
        Ok(Cadence::Every {
            text: text.trim().to_string(),
            interval,
        })
    }

    /// `"*/15 * * * *"` for cron, `"every 5m"` for intervals: what `heartbeat list` shows.
    pub fn describe(&self) -> String {
        match self {
            Cadence::Cron { expr, .. } => expr.clone(),
            Cadence::Every { text, .. } => format!("every {text}"),
        }
    }

    /// The first run of an entry that never ran: an interval entry runs at once, a cron entry at its next time.
    pub fn first_run(&self, now: DateTime<Utc>, multiplier: f64) -> Option<DateTime<Utc>> {
        match self {
            Cadence::Every { .. } => Some(now),
            Cadence::Cron { .. } => self.next_after(now, multiplier),
        }
    }

    /// The next run after one that started at `base`, with every gap stretched by `multiplier` (the survival
    /// tier's slowdown). A cron entry still fires on one of its own times: the first at or after the stretched
    /// gap, so `0 9 * * *` stretched ×2 runs at 09:00 every other day.
    pub fn next_after(&self, base: DateTime<Utc>, multiplier: f64) -> Option<DateTime<Utc>> {
        let multiplier = if multiplier.is_finite() {
            multiplier.clamp(0.01, 1000.0)
        } else {
            1.0
        };
        match self {
            Cadence::Every { interval, .. } => {
                let gap = interval.mul_f64(multiplier).max(MIN_EVERY);
                Some(base + chrono::Duration::from_std(gap).ok()?)
            }
            Cadence::Cron { cron, .. } => {
                let natural = cron.find_next_occurrence(&base, false).ok()?;
                if multiplier <= 1.0 {
                    return Some(natural);
                }
                let gap = (natural - base).to_std().ok()?.mul_f64(multiplier);
                let earliest = base + chrono::Duration::from_std(gap).ok()?;
                cron.find_next_occurrence(&earliest, true).ok()
            }
        }
    }
}

/// `humantime` durations (`30s`, `5m`, `1h 30m`, `2d`), with a plain number meaning seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("invalid duration {text:?} ({e}); use e.g. 30s, 5m, 1h, 1d"))
}

impl Entry {
    /// Builds an entry from separate fields (the CLI's flags, the `modify_heartbeat` tool's arguments), checked
    /// as the file would be. Errors name the field (`every: invalid duration …`).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        tasks: &TaskRegistry,
        name: &str,
        cron: Option<&str>,
        every: Option<&str>,
        task: &str,
        params: Map<String, Value>,
        timeout: Option<&str>,
        enabled: bool,
    ) -> Result<Entry, String> {
        check_name(name)?;
        let cadence = match (cron, every) {
            (Some(expr), None) => Cadence::cron(expr).map_err(|e| format!("schedule: {e}"))?,
            (None, Some(every)) => Cadence::every(every).map_err(|e| format!("every: {e}"))?,
            (Some(_), Some(_)) => {
                return Err("give a cron schedule or an interval (every), not both".into())
            }
            (None, None) => return Err("give a cron schedule or an interval (every)".into()),
        };
        let Some(handler) = tasks.get(task) else {
            return Err(format!(
                "task: unknown task {task:?}; known tasks: {}",
                tasks.names().join(", ")
            ));
        };
        handler
            .check_params(&params)
            .map_err(|e| format!("params: task {task}: {e}"))?;
        let (timeout_text, timeout) = match timeout {
            Some(t) => {
                let d = parse_duration(t).map_err(|e| format!("timeout: {e}"))?;
                if d.is_zero() || d > MAX_TIMEOUT {
                    return Err(format!(
                        "timeout: must be between 1s and {}",
                        humantime::format_duration(MAX_TIMEOUT)
                    ));
                }
                (Some(t.trim().to_string()), d)
            }
            None => (None, DEFAULT_TIMEOUT),
        };
        Ok(Entry {
            name: name.to_string(),
            cadence,
            task: task.to_string(),
            enabled,
            params,
            timeout_text,
            timeout,
        })
    }

    /// The schedule as planned in the DB: a change of cadence, enabled flag or multiplier replans the entry.
    pub fn plan_key(&self, multiplier: f64) -> String {
        if !self.enabled {
            return "disabled".to_string();
        }
        let cadence = match &self.cadence {
            Cadence::Cron { expr, .. } => format!("cron {expr}"),
            Cadence::Every { interval, .. } => format!("every {}s", interval.as_secs_f64()),
        };
        format!("{cadence} x{multiplier}")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    entries: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    #[serde(default)]
    schedule: Option<CronText>,
    #[serde(default)]
    every: Option<DurationText>,
    task: String,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    params: Option<Map<String, Value>>,
    #[serde(default)]
    timeout: Option<DurationText>,
}

fn enabled_by_default() -> bool {
    true
}

/// A cron expression checked while deserialising, so a bad one is reported with its line.
struct CronText(Cadence);

impl<'de> Deserialize<'de> for CronText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Cadence::cron(&text)
            .map(CronText)
            .map_err(serde::de::Error::custom)
    }
}

/// A duration checked while deserialising (`"5m"`, or a number of seconds).
struct DurationText(String, Duration);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Secs(u64),
            Text(String),
        }
        let text = match Either::deserialize(d)? {
            Either::Secs(s) => s.to_string(),
            Either::Text(t) => t,
        };
        let duration = parse_duration(&text).map_err(serde::de::Error::custom)?;
        Ok(DurationText(text.trim().to_string(), duration))
    }
}

/// Whether a name can be an entry name: it is used in commands, commit messages and the DB.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid entry name {name:?}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        ))
    }
}

impl HeartbeatFile {
    /// Parses and checks the text of `heartbeat.yaml` (read from `path`, which errors name).
    pub fn parse(
        text: &str,
        path: &Path,
        tasks: &TaskRegistry,
    ) -> Result<HeartbeatFile, HeartbeatError> {
        let invalid =
            |line: Option<usize>, key: Option<String>, message: String| HeartbeatError::Invalid {
                path: path.to_path_buf(),
                line,
                key,
                message,
            };
        // A file of nothing but comments is an empty schedule, not an error.
        match yaml::to_json_value(text) {
            Ok(Value::Object(map)) if map.is_empty() => return Ok(HeartbeatFile::default()),
            Ok(Value::Object(_)) | Err(_) => {}
            Ok(_) => {
                return Err(invalid(
                    Some(1),
                    None,
                    "expected a mapping with an `entries:` list".into(),
                ))
            }
        }
        let raw: RawFile = yaml::from_str(text).map_err(|e| {
            let message = if e.message.starts_with("unknown field") {
                format!("unknown key ({})", e.message)
            } else {
                e.message
            };
            // serde_yaml reports a value's own errors at the start of its entry; find the key's line instead.
            let line = e
                .key
                .as_deref()
                .and_then(entry_key)
                .and_then(|(index, key)| locate_key(text, index, key))
                .or(e.line);
            invalid(line, e.key, message)
        })?;
        let mut entries = Vec::with_capacity(raw.entries.len());
        for (index, raw) in raw.entries.into_iter().enumerate() {
            let at = |key: &str, message: String| {
                invalid(
                    locate(text, index, key),
                    Some(format!("entries[{index}].{key}")),
                    message,
                )
            };
            check_name(&raw.name).map_err(|m| at("name", m))?;
            if entries.iter().any(|e: &Entry| e.name == raw.name) {
                return Err(at(
                    "name",
                    format!("duplicate entry name {:?}; names must be unique", raw.name),
                ));
            }
            let cadence = match (raw.schedule, raw.every) {
                (Some(CronText(c)), None) => c,
                (None, Some(DurationText(text, _))) => {
                    Cadence::every(&text).map_err(|m| at("every", m))?
                }
                (Some(_), Some(_)) => {
                    return Err(at(
                        "every",
                        format!(
                            "entry {:?} has both `schedule` and `every`; give exactly one",
                            raw.name
                        ),
                    ))
                }
                (None, None) => {
                    return Err(at(
                        "name",
                        format!(
                        "entry {:?} needs `schedule` (a cron expression) or `every` (a duration)",
                        raw.name
                    ),
                    ))
                }
            };
            let Some(task) = tasks.get(&raw.task) else {
                return Err(at(
                    "task",
                    format!(
                        "unknown task {:?}; known tasks: {}",
                        raw.task,
                        tasks.names().join(", ")
                    ),
                ));
            };
            let params = raw.params.unwrap_or_default();
            task.check_params(&params)
                .map_err(|m| at("params", format!("task {}: {m}", raw.task)))?;
            let (timeout_text, timeout) = match raw.timeout {
                Some(DurationText(text, d)) => (Some(text), d),
                None => (None, DEFAULT_TIMEOUT),
            };
            if timeout.is_zero() || timeout > MAX_TIMEOUT {
                return Err(at(
                    "timeout",
                    format!(
                        "timeout must be between 1s and {}",
                        humantime::format_duration(MAX_TIMEOUT)
                    ),
                ));
            }
            entries.push(Entry {
                name: raw.name,
                cadence,
                task: raw.task,
                enabled: raw.enabled,
                params,
                timeout_text,
                timeout,
            });
        }
        Ok(HeartbeatFile { entries })
    }

    /// Reads and checks `path`; a missing file is an empty schedule.
    pub fn load(
        path: &Path,
        tasks: &TaskRegistry,
    ) -> Result<(HeartbeatFile, Option<String>), HeartbeatError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok((HeartbeatFile::parse(&text, path, tasks)?, Some(text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((HeartbeatFile::default(), None))
            }
            Err(source) => Err(HeartbeatError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.name == name)
    }

    /// The file's text: `header` (comment lines, kept from the old file) then the entries.
    pub fn render(&self, header: &str) -> Result<String, HeartbeatError> {
        #[derive(Serialize)]
        struct Out<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            schedule: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            every: Option<&'a str>,
            task: &'a str,
            enabled: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            timeout: Option<&'a str>,
            #[serde(skip_serializing_if = "Map::is_empty")]
            params: &'a Map<String, Value>,
        }
        let mut text = String::new();
        let header = header.trim_end();
        if !header.is_empty() {
            text.push_str(header);
            text.push('\n');
        }
        if self.entries.is_empty() {
            text.push_str("entries: []\n");
            return Ok(text);
        }
        text.push_str("entries:\n");
        for (i, entry) in self.entries.iter().enumerate() {
            let (schedule, every) = match &entry.cadence {
                Cadence::Cron { expr, .. } => (Some(expr.as_str()), None),
                Cadence::Every { text, .. } => (None, Some(text.as_str())),
            };
            let out = Out {
                name: &entry.name,
                schedule,
                every,
                task: &entry.task,
                enabled: entry.enabled,
                timeout: entry.timeout_text.as_deref(),
                params: &entry.params,
            };
            let body = yaml::to_string(&out).map_err(|e| HeartbeatError::Render(e.message))?;
            if i > 0 {
                text.push('\n');
            }
            for (n, line) in body.lines().enumerate() {
                text.push_str(if n == 0 { "  - " } else { "    " });
                text.push_str(line);
                text.push('\n');
            }
        }
        Ok(text)
    }
}

/// The leading comment block of a heartbeat file (kept when the file is rewritten).
pub fn header_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with('#') || t.is_empty() {
            out.push_str(line);
            out.push('\n');
        } else {
            break;
        }
    }
    out
}

/// Splits `entries[3].every` (or `entries[3].params.reason`) into `(3, "every")`.
fn entry_key(path: &str) -> Option<(usize, &str)> {
    let rest = path.strip_prefix("entries[")?;
    let (index, rest) = rest.split_once(']')?;
    let key = rest.strip_prefix('.')?.split('.').next()?;
    Some((index.parse().ok()?, key))
}

/// Like [`locate`], but only when the key's own line is found.
fn locate_key(text: &str, index: usize, key: &str) -> Option<usize> {
    let found = locate(text, index, key)?;
    let line = text.lines().nth(found - 1)?;
    line.contains(&format!("{key}:")).then_some(found)
}

/// The 1-based line of `key` inside the `index`-th item of the top-level `entries:` list, found by reading the
/// text (the YAML parser reports locations only for errors it raises itself). Falls back to the item's first line.
fn locate(text: &str, index: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == "entries:" || l.starts_with("entries:"))?;
    let mut items = Vec::new();
    let mut item_indent = None;
    for (n, line) in lines.iter().enumerate().skip(start + 1) {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if indent == 0 && !trimmed.starts_with('-') {
            break;
        }
        if trimmed.starts_with("- ") || trimmed == "-" {
            match item_indent {
                None => {
                    item_indent = Some(indent);
                    items.push(n);
                }
                Some(i) if i == indent => items.push(n),
                _ => {}
            }
        }
    }
    let first = *items.get(index)?;
    let end = items.get(index + 1).copied().unwrap_or(lines.len());
    let needle = format!("{key}:");
    (first..end)
        .find(|&n| {
            let t = lines[n]
                .trim_start()
                .trim_start_matches("- ")
                .trim_start_matches('{');
            t.starts_with(&needle)
                || lines[n].contains(&format!(" {needle}"))
                || lines[n].contains(&format!("{{{needle}"))
        })
        .or(Some(first))
        .map(|n| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn parse(text: &str) -> Result<HeartbeatFile, HeartbeatError> {
        HeartbeatFile::parse(
            text,
            Path::new("/h/heartbeat.yaml"),
            &TaskRegistry::builtin(),
        )
    }

    fn err(text: &str) -> (Option<usize>, Option<String>, String) {
        match parse(text).unwrap_err() {
            HeartbeatError::Invalid {
                line, key, message, ..
            } => (line, key, message),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn the_shipped_example_parses() {
        let file = parse(crate::setup::defaults::HEARTBEAT_EXAMPLE).expect("example");
        assert!(file.entries.iter().any(|e| e.task == "status_refresh"));
        assert!(file.entries.iter().any(|e| e.task == "wake_agent"));
    }

    #[test]
    fn broken_files_name_line_and_key() {
        let cases: &[(&str, usize, &str, &str)] = &[
            (
                "entries:\n  - name: a\n    every: 5 parsecs\n    task: wake_agent\n",
                3,
                "entries[0].every",
                "invalid duration",
            ),
            (
                "entries:\n  - name: a\n    schedule: \"61 * * * *\"\n    task: wake_agent\n",
                3,
                "entries[0].schedule",
                "cron",
            ),
            (
                "entries:\n  - name: a\n    every: 5m\n    task: wake_agent\n    colour: red\n",
                5,
                "entries[0].colour",
                "unknown key",
            ),
            (
                "entries:\n  - name: a\n    every: 5m\n    task: wake_agent\n\n  - name: b\n    every: 1m\n    task: fly_to_moon\n",
                8,
                "entries[1].task",
                "unknown task",
            ),
            (
                "entries:\n  - name: a\n    every: 5m\n    task: wake_agent\n  - name: a\n    every: 1m\n    task: wake_agent\n",
                5,
                "entries[1].name",
                "duplicate",
            ),
            (
                "entries:\n  - name: a\n    every: 5m\n    schedule: \"* * * * *\"\n    task: wake_agent\n",
                3,
                "entries[0].every",
                "both",
            ),
            (
                "entries:\n  - name: a\n    task: wake_agent\n",
                2,
                "entries[0].name",
                "needs `schedule`",
            ),
            (
                "entries:\n  - name: a\n    every: 5m\n    task: wake_agent\n    enabled: maybe\n",
                5,
                "entries[0].enabled",
                "invalid type",
            ),
            (
                "entries:\n  - name: a\n    every: 5m\n    task: wake_agent\n    params:\n      reason: 5\n",
                5,
                "entries[0].params",
                "reason",
            ),
        ];
        for (text, line, key, needle) in cases {
            let (l, k, m) = err(text);
            assert_eq!(l, Some(*line), "{text}: {m}");
            assert_eq!(k.as_deref(), Some(*key), "{text}: {m}");
            assert!(m.contains(needle), "{text}: {m}");
        }
    }

    #[test]
    fn error_display_names_the_file() {
        let e =
            parse("entries:\n  - name: a\n    every: nope\n    task: wake_agent\n").unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("/h/heartbeat.yaml:3"), "{text}");
        assert!(text.contains("entries[0].every"), "{text}");
    }

    #[test]
    fn empty_and_comment_only_files_are_empty_schedules() {
        assert!(parse("").unwrap().entries.is_empty());
        assert!(parse("# nothing yet\n").unwrap().entries.is_empty());
        assert!(parse("entries: []\n").unwrap().entries.is_empty());
    }

    #[test]
    fn render_round_trips_and_keeps_the_header() {
        let text = "# my schedule\n\nentries:\n  - name: ping\n    schedule: \"*/15 * * * *\"\n    task: status_refresh\n  - name: nudge\n    every: 1h 30m\n    task: wake_agent\n    enabled: false\n    timeout: 10s\n    params:\n      reason: \"look: around\"\n";
        let file = parse(text).unwrap();
        let out = file.render(&header_of(text)).unwrap();
        assert!(out.starts_with("# my schedule\n"), "{out}");
        assert_eq!(parse(&out).unwrap(), file, "{out}");
    }

    #[test]
    fn intervals_and_cron_stretch_with_the_multiplier() {
        let base = Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap();
        let every = Cadence::every("5m").unwrap();
        assert_eq!(
            every.next_after(base, 1.0),
            Some(base + chrono::Duration::minutes(5))
        );
        assert_eq!(
            every.next_after(base, 4.0),
            Some(base + chrono::Duration::minutes(20))
        );
        let daily = Cadence::cron("0 9 * * *").unwrap();
        assert_eq!(
            daily.next_after(base, 1.0),
            Some(base + chrono::Duration::days(1))
        );
        assert_eq!(
            daily.next_after(base, 2.0),
            Some(base + chrono::Duration::days(2))
        );
        assert_eq!(
            daily.next_after(base, 1.5),
            Some(base + chrono::Duration::days(2))
        );
        let quarter = Cadence::cron("*/15 * * * *").unwrap();
        assert_eq!(
            quarter.next_after(base, 2.0),
            Some(base + chrono::Duration::minutes(30))
        );
        assert_eq!(every.first_run(base, 3.0), Some(base));
        assert!(Cadence::cron("* * *").is_err());
        assert!(Cadence::every("0s").is_err());
    }
}
