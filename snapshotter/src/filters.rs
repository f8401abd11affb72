//! containerd's filter syntax, as `Walk`/`List` callers send it (containerd's GC, CRI, `ctr
//! snapshots ls`, the snapshotter test suite):
//!
//! ```text
//! filters   := filter*            any filter matches (none: everything matches)
//! filter    := selector ("," selector)*    every selector matches
//! selector  := fieldpath (operator value)?  without operator: the field is present
//! fieldpath := field ("." field)*
//! field     := [A-Za-z0-9_]+ | "quoted"
//! operator  := "==" | "!=" | "~="          equal, not equal, regular expression
//! value     := "quoted" | [^\s,]+          after ~= also /quoted/ or |quoted|
//! ```
//!
//! Quoted strings take Go's escapes. Snapshot fields are `kind` (`active`, `view`,
//! `committed`), `name`, `parent` and `labels.<key>` (the key is the rest of the path joined by
//! `.`, so `labels."containerd.io/gc.root"` and `labels.a.b` both work). As in containerd,
//! `name`, `kind` and `parent` are always present (no parent is `""`); `!=` and `~=` compare
//! an absent label as the empty string; `==` never matches an absent one.
use crate::snapshotter::Info;
use crate::store::Kind;

/// A filter string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}: {msg} at byte {pos}")]
pub struct FilterError {
    pub input: String,
    pub pos: usize,
    pub msg: String,
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

/// Parsed filters: matches when any of them does (or when there are none).
#[derive(Debug, Clone, Default)]
pub struct Filters(Vec<Vec<Selector>>);

impl Filters {
    /// Parses every filter string; an empty string matches everything, like no filter.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<Filters, FilterError> {
        let mut all = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                return Ok(Filters::default());
            }
            all.push(Parser::new(f).selectors()?);
        }
        Ok(Filters(all))
    }

    pub fn matches(&self, info: &Info) -> bool {
        self.0.is_empty() || self.0.iter().any(|all| all.iter().all(|s| s.matches(info)))
    }
}

impl Selector {
    fn matches(&self, info: &Info) -> bool {
        let value = field(info, &self.path);
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.is_some_and(|x| x == *v),
            Op::NotEqual(v) => value.unwrap_or_default() != *v,
            Op::Matches(re) => re.is_match(value.as_deref().unwrap_or_default()),
        }
    }
}

/// The value of a snapshot's field, `None` when it has none.
fn field(info: &Info, path: &[String]) -> Option<String> {
    let (first, rest) = path.split_first()?;
    match (first.as_str(), rest) {
        ("kind", []) => Some(
            match info.kind {
                Kind::Active => "active",
                Kind::View => "view",
                Kind::Committed => "committed",
            }
            .to_owned(),
        ),
        ("name", []) => Some(info.name.clone()),
        // Always present, as in containerd: `parent==""` selects snapshots without a parent
        // (containerd's remote-snapshot lookup sends exactly that for a bottom layer).
        ("parent", []) => Some(info.parent.clone().unwrap_or_default()),
        ("labels", [_, ..]) => info.labels.get(&rest.join(".")).cloned(),
        _ => None,
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Parser<'a> {
        Parser { input, pos: 0 }
    }

    fn err(&self, pos: usize, msg: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_owned(),
            pos,
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

    fn peek(&mut self) -> Option<char> {
        self.skip_space();
        self.rest().chars().next()
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => return Err(self.err(self.pos, format!("unexpected {c:?}"))),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        let op =
            match self.peek() {
                None | Some(',') => Op::Present,
                Some('=' | '!' | '~') => {
                    let start = self.pos;
                    let len = self
                        .rest()
                        .find(|c| !matches!(c, '=' | '!' | '~'))
                        .unwrap_or(self.rest().len());
                    let op = &self.rest()[..len];
                    self.pos += len;
                    match op {
                        "==" => Op::Equal(self.value(false)?),
                        "!=" => Op::NotEqual(self.value(false)?),
                        "~=" => {
                            let at = self.pos;
                            let re = self.value(true)?;
                            Op::Matches(regex::Regex::new(&re).map_err(|e| {
                                self.err(at, format!("bad regular expression: {e}"))
                            })?)
                        }
                        _ => return Err(self.err(start, format!("unsupported operator {op:?}"))),
                    }
                }
                Some(c) => {
                    return Err(self.err(
                        self.pos,
                        format!("expected an operator (==, != or ~=), found {c:?}"),
                    ));
                }
            };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted('"'),
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let len = self
                    .rest()
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(self.rest().len());
                let f = self.rest()[..len].to_owned();
                self.pos += len;
                Ok(f)
            }
            Some(c) => Err(self.err(self.pos, format!("expected a field, found {c:?}"))),
            None => Err(self.err(self.pos, "expected a field, found the end")),
        }
    }

    /// A value; `alt_quotes` (after `~=`) also allows `/.../` and `|...|`.
    fn value(&mut self, alt_quotes: bool) -> Result<String, FilterError> {
        match self.peek() {
            Some(q @ '"') => self.quoted(q),
            Some(q @ ('/' | '|')) if alt_quotes => self.quoted(q),
            Some(c @ ('/' | '|' | '.' | ',' | '=' | '!' | '~')) => {
                Err(self.err(self.pos, format!("expected a value, found {c:?}")))
            }
            Some(_) => {
                let len = self
                    .rest()
                    .find(|c: char| c == ',' || c.is_whitespace())
                    .unwrap_or(self.rest().len());
                let v = self.rest()[..len].to_owned();
                self.pos += len;
                Ok(v)
            }
            None => Err(self.err(self.pos, "expected a value, found the end")),
        }
    }

    /// A string quoted by `q` with Go's escapes (and `\q`); `pos` is at the opening quote.
    fn quoted(&mut self, q: char) -> Result<String, FilterError> {
        let start = self.pos;
        let mut chars = self.rest().char_indices().skip(1).peekable();
        let mut out = String::new();
        let bad = |p: &Self, at: usize, msg: &str| p.err(start + at, msg);
        loop {
            let Some((i, c)) = chars.next() else {
                return Err(bad(self, self.rest().len(), "quoted string not terminated"));
            };
            match c {
                c if c == q => {
                    self.pos += i + c.len_utf8();
                    return Ok(out);
                }
                '\n' => return Err(bad(self, i, "newline in a quoted string")),
                '\\' => {
                    let Some((j, e)) = chars.next() else {
                        return Err(bad(self, i, "quoted string not terminated"));
                    };
                    let simple = match e {
                        'a' => Some('\x07'),
                        'b' => Some('\x08'),
                        'f' => Some('\x0c'),
                        'n' => Some('\n'),
                        'r' => Some('\r'),
                        't' => Some('\t'),
                        'v' => Some('\x0b'),
                        '\\' => Some('\\'),
                        e if e == q => Some(q),
                        _ => None,
                    };
                    if let Some(s) = simple {
                        out.push(s);
                        continue;
                    }
                    let (radix, digits) = match e {
                        '0'..='7' => (8, 3),
                        'x' => (16, 2),
                        'u' => (16, 4),
                        'U' => (16, 8),
                        _ => return Err(bad(self, j, "illegal escape sequence")),
                    };
                    let mut n: u32 = 0;
                    let mut first = (e != 'x' && e != 'u' && e != 'U').then_some(e);
                    for _ in 0..digits {
                        let d = match first.take() {
                            Some(d) => Some(d),
                            None => chars.next().map(|(_, d)| d),
                        };
                        let Some(v) = d.and_then(|d| d.to_digit(radix)) else {
                            return Err(bad(self, j, "illegal numeric escape sequence"));
                        };
                        n = n * radix + v;
                    }
                    let Some(ch) = char::from_u32(n) else {
                        return Err(bad(self, j, "escape is not a character"));
                    };
                    out.push(ch);
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn info(name: &str, parent: Option<&str>, kind: Kind, labels: &[(&str, &str)]) -> Info {
        Info {
            name: name.into(),
            parent: parent.map(Into::into),
            kind,
            created: 0,
            updated: 0,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
                .into_iter()
                .collect(),
        }
    }

    /// The cases of containerd's snapshotter test suite (`checkWalk`).
    #[test]
    fn the_test_suites_walks_select_what_containerd_selects() {
        let gc = ("containerd.io/gc.root", "check-walk");
        let all = [
            info("a-np", None, Kind::Active, &[gc]),
            info("p", None, Kind::Committed, &[gc]),
            info("a", Some("p"), Kind::Active, &[gc]),
            info("v", Some("p"), Kind::View, &[gc]),
            info("p-wl", None, Kind::Committed, &[("l", "1"), gc]),
            info("a-wl", Some("p-wl"), Kind::Active, &[("l", "2"), gc]),
            info("v-wl", Some("p-wl"), Kind::View, &[("l", "3"), gc]),
            info("a-np-wl", None, Kind::Active, &[("l", "2"), gc]),
        ];
        let cases: &[(&[&str], &[&str])] = &[
            (
                &["labels.\"containerd.io/gc.root\"==check-walk"],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &["kind==active,labels.\"containerd.io/gc.root\"==check-walk"],
                &["a-np", "a", "a-wl", "a-np-wl"],
            ),
            (
                &["kind==view,labels.\"containerd.io/gc.root\"==check-walk"],
                &["v", "v-wl"],
            ),
            (
                &["kind==committed,labels.\"containerd.io/gc.root\"==check-walk"],
                &["p", "p-wl"],
            ),
            (&["name==p", "name==a-np-wl"], &["p", "a-np-wl"]),
            (&["name==a-wl,labels.l"], &["a-wl"]),
            (&["parent==p"], &["a", "v"]),
            (
                &["parent!=\"\",labels.\"containerd.io/gc.root\"==check-walk"],
                &["a", "v", "a-wl", "v-wl"],
            ),
            (&["labels.l"], &["p-wl", "a-wl", "v-wl", "a-np-wl"]),
            (&["labels.l==2"], &["a-wl", "a-np-wl"]),
            // containerd's lookup of a remote snapshot (metadata/snapshot.go).
            (
                &["labels.\"containerd.io/gc.root\"==check-walk,parent==\"\""],
                &["a-np", "p", "p-wl", "a-np-wl"],
            ),
            (
                &["parent"],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &[],
                &["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (&["name~=^a-.*wl$"], &["a-wl", "a-np-wl"]),
            (&["name~=/^v(-wl)?$/"], &["v", "v-wl"]),
            (&[" kind == view , labels.l == 3 "], &["v-wl"]),
        ];
        for (filters, want) in cases {
            let f = Filters::parse(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
            let mut got: Vec<&str> = all
                .iter()
                .filter(|i| f.matches(i))
                .map(|i| i.name.as_str())
                .collect();
            let mut want = want.to_vec();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{filters:?}");
        }
    }

    #[test]
    fn quoted_strings_take_gos_escapes() {
        let i = info("a\"b\tc\u{e9}", None, Kind::View, &[("k.x", "v")]);
        for f in [
            r#"name=="a\"b\tc\u00e9""#,
            r#"name=="a\x22b\011c\U000000e9""#,
            "\"name\"==\"a\\\"b\tc\u{e9}\"",
        ] {
            let parsed = Filters::parse(&[f]).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(parsed.matches(&i), "{f}");
        }
        assert!(!Filters::parse(&[r#"name=="a""#]).unwrap().matches(&i));
        assert!(Filters::parse(&[r#"labels."k.x"==v"#]).unwrap().matches(&i));
        assert!(Filters::parse(&["labels.k.x==v"]).unwrap().matches(&i));
        assert!(Filters::parse(&["labels.k.x==w"]).is_ok_and(|f| !f.matches(&i)));
    }

    #[test]
    fn bad_filters_are_errors_not_panics() {
        for bad in [
            "name==",
            "name=",
            "name=>x",
            "==x",
            ".name==x",
            "name==x,",
            "name==x y",
            "name==\"unterminated",
            "name==\"bad \\q escape\"",
            "name==\"\\x4\"",
            "name==/x/",
            "name~=/(/",
            "labels.",
            "name==x,,kind==view",
            "na me==x",
            "\"\\",
            "é==x",
            "labels.containerd.io/gc.root",
        ] {
            let e = Filters::parse(&[bad]).expect_err(bad);
            assert!(e.pos <= bad.len(), "{bad}: {e}");
            assert!(e.to_string().contains("filter"), "{bad}: {e}");
        }
    }
}
