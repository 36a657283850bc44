//! containerd's filter language, for `List` (Walk) requests.
//!
//! A request carries several filters; a snapshot matches when any of them matches. One filter
//! is a comma-separated list of selectors that must all match; a selector is
//! `fieldpath[op value]` with `op` one of `==`, `!=`, `~=` (regular expression), and without
//! an operator tests that the field is present. Field path parts and values may be quoted
//! (Go string syntax), e.g. `labels."containerd.io/snapshot.ref"==sha256:abc,parent==""`,
//! which is what containerd sends to find a remote snapshot. Snapshot fields: `name`,
//! `parent` (always present, empty for none), `kind` (`view`, `active`, `committed`) and
//! `labels.KEY`.

use crate::meta::Record;

/// A filter that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid filter {input:?} at byte {pos}: {msg}")]
pub struct FilterError {
    input: String,
    pos: usize,
    msg: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex::Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// Parsed filters: matches when any one of them matches (no filters match everything).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    any: Vec<Vec<Selector>>,
}

impl Filters {
    /// Parses each filter of a request; empty strings match everything.
    pub fn parse(filters: &[String]) -> Result<Filters, FilterError> {
        let mut any = Vec::new();
        for f in filters {
            if f.is_empty() {
                return Ok(Filters::default());
            }
            any.push(Parser::new(f).selectors()?);
        }
        Ok(Filters { any })
    }

    /// Whether `record` passes.
    pub fn matches(&self, record: &Record) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(record)))
    }
}

impl Selector {
    fn matches(&self, r: &Record) -> bool {
        let value: Option<String> = match self.path.first().map(String::as_str) {
            Some("name") => Some(r.name.clone()),
            Some("parent") => Some(r.parent.clone().unwrap_or_default()),
            Some("kind") => Some(r.kind.as_str().to_string()),
            Some("labels") if self.path.len() > 1 => {
                r.labels.get(&self.path[1..].join(".")).cloned()
            }
            _ => None,
        };
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser { input, pos: 0 }
    }

    fn err(&self, msg: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_string(),
            pos: self.pos,
            msg: msg.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn skip_space(&mut self) {
        let trimmed = self.rest().trim_start();
        self.pos = self.input.len() - trimmed.len();
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut out = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.rest().chars().next() {
                None => return Ok(out),
                Some(',') => {
                    self.pos += 1;
                    out.push(self.selector()?);
                }
                Some(c) => return Err(self.err(format!("unexpected {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_space();
            if self.rest().starts_with('.') {
                self.pos += 1;
                path.push(self.field()?);
            } else {
                break;
            }
        }
        self.skip_space();
        let rest = self.rest();
        let op = if rest.is_empty() || rest.starts_with(',') {
            return Ok(Selector {
                path,
                op: Op::Present,
            });
        } else if let Some(op) = ["==", "!=", "~="].into_iter().find(|o| rest.starts_with(o)) {
            self.pos += 2;
            op
        } else {
            return Err(self.err("expected an operator (==, != or ~=)"));
        };
        let value = self.value()?;
        let op = match op {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            _ => Op::Matches(
                regex::Regex::new(&value)
                    .map_err(|e| self.err(format!("bad regular expression: {e}")))?,
            ),
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        match self.rest().chars().next() {
            Some('"') | Some('\'') | Some('`') => self.quoted(),
            Some(c) if c.is_ascii_alphabetic() => {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(self.rest().len());
                let f = self.rest()[..len].to_string();
                self.pos += len;
                Ok(f)
            }
            _ => Err(self.err("expected a field name or a quoted string")),
        }
    }

    fn value(&mut self) -> Result<String, FilterError> {
        self.skip_space();
        match self.rest().chars().next() {
            Some('"') | Some('\'') | Some('`') | Some('/') => self.quoted(),
            Some(_) => {
                let len = self
                    .rest()
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(self.rest().len());
                let v = self.rest()[..len].to_string();
                self.pos += len;
                Ok(v)
            }
            None => Err(self.err("expected a value")),
        }
    }

    /// A quoted string: `"..."` with Go escapes, or raw between `` ` ``, `'` or `/`.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let mut chars = self.rest().char_indices();
        let (_, q) = chars.next().ok_or_else(|| self.err("expected a quote"))?;
        let mut out = String::new();
        while let Some((i, c)) = chars.next() {
            if c == q {
                self.pos += i + c.len_utf8();
                return Ok(out);
            }
            if c == '\\' && q == '"' {
                let (_, e) = chars
                    .next()
                    .ok_or_else(|| self.err("unterminated escape"))?;
                out.push(match e {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    '0' => '\0',
                    other => other,
                });
            } else {
                out.push(c);
            }
        }
        Err(self.err("unterminated quoted string"))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::meta::{Kind, Usage};

    fn rec(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Record {
        Record {
            id: 1,
            name: name.into(),
            kind,
            parent: parent.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            created: 0,
            updated: 0,
            usage: Usage::default(),
            remote: None,
        }
    }

    fn f(filters: &[&str]) -> Filters {
        Filters::parse(&filters.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn the_query_containerd_sends_for_remote_snapshots() {
        let remote = rec(
            "sha256:abc",
            Some("ns/3/sha256:p"),
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        let q = r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/3/sha256:p""#;
        assert!(f(&[q]).matches(&remote));
        let q = r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="""#;
        assert!(!f(&[q]).matches(&remote));
        let base = rec(
            "sha256:abc",
            None,
            Kind::Committed,
            &[("containerd.io/snapshot.ref", "sha256:abc")],
        );
        assert!(f(&[q]).matches(&base));
    }

    #[test]
    fn operators_presence_and_or() {
        let a = rec("a", None, Kind::Active, &[("x", "1"), ("y.z", "hello")]);
        let b = rec("b", Some("a"), Kind::View, &[]);
        assert!(f(&[]).matches(&a));
        assert!(f(&[""]).matches(&b));
        assert!(f(&["labels.x"]).matches(&a));
        assert!(!f(&["labels.x"]).matches(&b));
        assert!(f(&["labels.y.z==hello"]).matches(&a));
        assert!(f(&["kind==active"]).matches(&a));
        assert!(f(&["kind!=active"]).matches(&b));
        assert!(f(&["name~=^[ab]$"]).matches(&b));
        assert!(!f(&["name~=^c"]).matches(&b));
        assert!(f(&["name==a,labels.x==1"]).matches(&a));
        assert!(!f(&["name==a,labels.x==2"]).matches(&a));
        // Several filters: any one.
        assert!(f(&["name==zzz", "parent==a"]).matches(&b));
        assert!(f(&[r#"name=="b""#, "labels.nope"]).matches(&b));
        assert!(f(&["labels.\"x\" == 1"]).matches(&a));
    }

    #[test]
    fn syntax_errors_are_reported() {
        for bad in ["==x", "name=x", "name==\"open", "labels.x==1,", "name~=("] {
            let e = Filters::parse(&[bad.to_string()]);
            assert!(e.is_err(), "{bad} parsed");
        }
    }
}
