//! Where a problem is: the untyped parse of the file that gives every key its
//! position, the collector of problems, and serde_ignored's paths turned into
//! dotted keys and spans.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::Problem;
use super::raw::RawConfig;

/// Collects problems while the raw layer is turned into typed config.
pub(super) struct Report<'a> {
    pub(super) text: &'a str,
    /// The same text parsed without types: where keys are, for errors.
    pub(super) table: Option<Spanned<DeTable<'a>>>,
    pub(super) problems: Vec<Problem>,
    /// The config file's folder: relative certificate paths start there.
    pub(super) base: std::path::PathBuf,
}

impl<'a> Report<'a> {
    pub(super) fn new(text: &'a str, base: std::path::PathBuf) -> Self {
        Report {
            text,
            table: DeTable::parse(text).ok(),
            problems: Vec::new(),
            base,
        }
    }

    pub(super) fn push(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: String,
        fix: &str,
    ) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            line,
            column,
            key: key.into(),
            message,
            fix: fix.to_string(),
        });
    }

    pub(super) fn deserialize(&mut self, text: &str) -> Option<RawConfig> {
        let deserializer = match toml::de::Deserializer::parse(text) {
            Ok(d) => d,
            Err(e) => {
                self.push_toml_error(&e);
                return None;
            }
        };
        let mut unknown = Vec::new();
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(deserializer, |path| unknown.push(segments(&path)));
        for path in unknown {
            let span = self.span_of(&path);
            self.push(
                span,
                dotted(&path),
                "unknown key".to_string(),
                "remove it, or check its spelling against the keys documented in proxy.toml",
            );
        }
        match raw {
            Ok(raw) => Some(raw),
            Err(e) => {
                self.push_toml_error(&e);
                None
            }
        }
    }

    pub(super) fn span_of(&self, path: &[Segment]) -> Range<usize> {
        self.table
            .as_ref()
            .and_then(|t| key_span(t.get_ref(), path))
            .unwrap_or(0..0)
    }

    pub(super) fn push_toml_error(&mut self, e: &toml::de::Error) {
        let span = e.span().unwrap_or(0..0);
        self.push(
            span,
            "(file)",
            e.message().trim().to_string(),
            "correct the TOML at this position; proxy.toml documents every key and its type",
        );
    }
}

pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

/// The path serde_ignored reports, without the fields `Spanned` adds.
fn segments(path: &serde_ignored::Path<'_>) -> Vec<Segment> {
    use serde_ignored::Path;
    let mut out = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments(parent),
    };
    match path {
        Path::Seq { index, .. } => out.push(Segment::Index(*index)),
        Path::Map { key, .. } if !key.starts_with("$__serde_spanned") => {
            out.push(Segment::Key(key.clone()))
        }
        _ => {}
    }
    out
}

fn dotted(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The span of the last key of `path` in the untyped document.
fn key_span(table: &DeTable<'_>, path: &[Segment]) -> Option<Range<usize>> {
    let (Segment::Key(first), rest) = path.split_first()? else {
        return None;
    };
    let (key, value) = table.get_key_value(first.as_str())?;
    let mut span = key.span();
    let mut value: &DeValue<'_> = value.get_ref();
    for segment in rest {
        match (segment, value) {
            (Segment::Key(k), DeValue::Table(t)) => {
                let (key, v) = t.get_key_value(k.as_str())?;
                span = key.span();
                value = v.get_ref();
            }
            (Segment::Index(i), DeValue::Array(a)) => {
                let v = a.get(*i)?;
                span = v.span();
                value = v.get_ref();
            }
            _ => return None,
        }
    }
    Some(span)
}
