//! The spanned TOML document behind a config: deserializing it while collecting every problem,
//! and mapping between field paths (`listener[1].port`) and lines.

use serde::{de::IntoDeserializer, Deserialize};
use toml::{
    de::{DeArray, DeTable, DeValue},
    Spanned,
};

use super::{Config, Problem};

/// At most this many problems are reported from one file.
const MAX_PROBLEMS: usize = 100;

/// Deserializes `src` into a `Config`, reporting every value serde rejects. A rejected entry
/// is removed from the document and deserialization runs again; the config returned (if any)
/// is what remains. Also returns the paths removed, so that problems they cause further on (a
/// table now missing a required key, a list now empty) are not reported as well.
pub fn deserialize(src: &str) -> (Option<Config>, Vec<Problem>, Vec<String>) {
    let original = match DeTable::parse(src) {
        Ok(t) => t,
        Err(e) => {
            let line = e.span().map_or(1, |s| line_of(src, s.start));
            let problem = Problem {
                line,
                path: "toml".into(),
                message: e.message().trim().to_string(),
            };
            return (None, vec![problem], Vec::new());
        }
    };
    let mut working = original.clone();
    let mut problems = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        let e = match Config::deserialize(working.clone().into_deserializer()) {
            Ok(config) => return (Some(config), problems, removed),
            Err(e) => e,
        };
        let span = e.span().unwrap_or(0..0);
        let path = path_at(&original, &span).unwrap_or_else(|| "toml".into());
        if !removed.iter().any(|r| is_within(r, &path) && r != &path) {
            problems.push(Problem {
                line: line_of(src, span.start),
                path: path.clone(),
                message: e.message().trim().to_string(),
            });
        }
        removed.push(path);
        if problems.len() >= MAX_PROBLEMS || !remove_at(working.get_mut(), &span) {
            return (None, problems, removed);
        }
    }
}

/// Is field `path` `ancestor` or inside it (`listener[0].port` is within `listener[0]`)?
pub fn is_within(path: &str, ancestor: &str) -> bool {
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// 1-based line of byte `offset`.
fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].matches('\n').count() + 1
}

fn contains(outer: &std::ops::Range<usize>, inner: &std::ops::Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end && outer != &(0..0)
}

/// One step from a table into a value: a key, or an index into an array.
#[derive(Clone, Debug)]
enum Step {
    Key(String),
    Index(usize),
}

/// The steps to the innermost entry (key or array element) whose key or value holds `span`.
/// A table's own span is only its header, so every table is searched whatever its span.
fn locate(table: &DeTable<'_>, span: &std::ops::Range<usize>) -> Option<Vec<Step>> {
    fn in_value(v: &Spanned<DeValue<'_>>, span: &std::ops::Range<usize>) -> Option<Vec<Step>> {
        let inner = match v.get_ref() {
            DeValue::Table(t) => locate(t, span),
            DeValue::Array(a) => a.iter().enumerate().find_map(|(i, e)| {
                in_value(e, span).map(|mut steps| {
                    steps.insert(0, Step::Index(i));
                    steps
                })
            }),
            _ => None,
        };
        inner.or_else(|| contains(&v.span(), span).then(Vec::new))
    }
    table.iter().find_map(|(k, v)| {
        let steps = in_value(v, span).or_else(|| contains(&k.span(), span).then(Vec::new))?;
        let mut path = vec![Step::Key(k.get_ref().to_string())];
        path.extend(steps);
        Some(path)
    })
}

/// `listener[1].port`.
fn path_string(steps: &[Step]) -> String {
    let mut out = String::new();
    for step in steps {
        match step {
            Step::Key(k) if out.is_empty() => out.push_str(k),
            Step::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The field path of the innermost entry of `table` that holds `span`.
fn path_at(table: &Spanned<DeTable<'_>>, span: &std::ops::Range<usize>) -> Option<String> {
    locate(table.get_ref(), span).map(|steps| path_string(&steps))
}

/// Removes the innermost entry (key or array element) that holds `span`; false if none does.
fn remove_at(table: &mut DeTable<'_>, span: &std::ops::Range<usize>) -> bool {
    let Some(steps) = locate(table, span) else {
        return false;
    };
    remove_steps(table, &steps);
    true
}

fn remove_steps(table: &mut DeTable<'_>, steps: &[Step]) {
    let Some(Step::Key(key)) = steps.first() else {
        return;
    };
    let rest = &steps[1..];
    if rest.is_empty() {
        table.remove(key.as_str());
        return;
    }
    let Some(value) = table.get_mut(key.as_str()) else {
        return;
    };
    remove_in_value(value.get_mut(), rest);
}

fn remove_in_value(value: &mut DeValue<'_>, steps: &[Step]) {
    match (value, steps.first()) {
        (DeValue::Table(t), Some(Step::Key(_))) => remove_steps(t, steps),
        (DeValue::Array(a), Some(&Step::Index(i))) => {
            if steps.len() == 1 {
                let old = std::mem::replace(a, DeArray::new());
                *a = old
                    .into_iter()
                    .enumerate()
                    .filter_map(|(j, e)| (j != i).then_some(e))
                    .collect();
            } else if let Some(e) = a.as_mut().get_mut(i) {
                remove_in_value(e.get_mut(), &steps[1..]);
            }
        }
        _ => {}
    }
}

/// The line where field `path` (`target_group[0].target[2].weight`) is written; the nearest
/// written ancestor's line when the field itself is not in the file (a default).
pub fn line_of_path(src: &str, path: &str) -> usize {
    let Ok(root) = DeTable::parse(src) else {
        return 1;
    };
    let mut best = 1;
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    for segment in path.split('.') {
        let (name, indices) = match segment.find('[') {
            Some(i) => (&segment[..i], &segment[i..]),
            None => (segment, ""),
        };
        let Some(t) = table else { break };
        let Some((k, v)) = t.get_key_value(name) else {
            break;
        };
        best = line_of(src, k.span().start);
        let mut value = Some(v);
        for index in indices.split(['[', ']']).filter(|s| !s.is_empty()) {
            let (Ok(i), Some(DeValue::Array(a))) =
                (index.parse::<usize>(), value.map(|v| v.get_ref()))
            else {
                break;
            };
            let Some(e) = a.get(i) else { break };
            best = line_of(src, e.span().start);
            value = Some(e);
        }
        table = match value.map(|v| v.get_ref()) {
            Some(DeValue::Table(t)) => Some(t),
            _ => None,
        };
    }
    best
}
