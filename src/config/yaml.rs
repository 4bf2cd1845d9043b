//! Minimal YAML front end for the configuration loader.
//!
//! Builds a small tree of [`Node`]s from yaml-rust2's pull parser so that every key and value
//! keeps its line number, without ever recursing on input-controlled depth: nesting is tracked on
//! an explicit stack and capped at [`MAX_DEPTH`]. Aliases (`*name`), unknown tags and
//! multi-document streams are rejected; anchors (`&name`) are accepted and ignored.
//!
//! Scalars are resolved the way PyYAML (which LMCache uses) resolves them for the forms that
//! occur in LMCache configurations: quoted and block scalars are always strings; plain scalars
//! resolve to null, booleans, integers and floats by the rules in [`resolve`].

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

/// Deepest nesting of sequences/mappings accepted. LMCache configurations use two levels.
pub(crate) const MAX_DEPTH: usize = 64;

/// Prefix of the YAML core schema tags (`!!str` resolves to `tag:yaml.org,2002:str`).
const CORE_TAG_HANDLE: &str = "tag:yaml.org,2002:";

/// A YAML node with the (1-based) line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// What the node holds.
    pub kind: NodeKind,
    /// 1-based line of the node's first character.
    pub line: usize,
}

/// The payload of a [`Node`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum NodeKind {
    /// A scalar. `plain` is false for quoted, block (`|`, `>`) and `!!str`-tagged scalars,
    /// which are always strings.
    Scalar {
        /// The scalar's text after YAML unescaping.
        text: String,
        /// Whether the scalar is plain (unquoted, untagged) and so subject to [`resolve`].
        plain: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order (duplicates are kept; callers report them).
    Map(Vec<(Node, Node)>),
}

/// A resolved scalar value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar<'a> {
    /// `null`, `Null`, `NULL`, `~` or empty.
    Null,
    /// `true`/`True`/`TRUE`/`false`/`False`/`FALSE`.
    Bool(bool),
    /// A decimal integer that fits in an `i128`.
    Int(i128),
    /// A decimal integer too large for an `i128`.
    BigInt,
    /// A float, including `.inf` and `.nan` forms.
    Float(f64),
    /// Anything else, and every non-plain scalar.
    Str(&'a str),
}

/// Why the text could not be loaded.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LoadError {
    /// The YAML scanner/parser rejected the text.
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// Valid YAML that this loader does not accept (aliases, tags, depth, several documents).
    Structure {
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl Node {
    /// A plain null scalar at `line`.
    pub(crate) fn null(line: usize) -> Node {
        Node {
            kind: NodeKind::Scalar {
                text: String::new(),
                plain: true,
            },
            line,
        }
    }

    /// A plain scalar (resolved like unquoted YAML) at `line`.
    pub(crate) fn plain(text: impl Into<String>, line: usize) -> Node {
        Node {
            kind: NodeKind::Scalar {
                text: text.into(),
                plain: true,
            },
            line,
        }
    }

    /// A string scalar (never resolved) at `line`.
    pub(crate) fn string(text: impl Into<String>, line: usize) -> Node {
        Node {
            kind: NodeKind::Scalar {
                text: text.into(),
                plain: false,
            },
            line,
        }
    }

    /// The resolved scalar, or `None` for collections.
    pub(crate) fn scalar(&self) -> Option<Scalar<'_>> {
        match &self.kind {
            NodeKind::Scalar { text, plain: true } => Some(resolve(text)),
            NodeKind::Scalar { text, plain: false } => Some(Scalar::Str(text)),
            NodeKind::Seq(_) | NodeKind::Map(_) => None,
        }
    }

    /// Whether this node is a (plain) null.
    pub(crate) fn is_null(&self) -> bool {
        matches!(self.scalar(), Some(Scalar::Null))
    }
}

/// Resolves a plain scalar the way PyYAML does for the forms used in configurations.
pub(crate) fn resolve(text: &str) -> Scalar<'_> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" => return Scalar::Bool(true),
        "false" | "False" | "FALSE" => return Scalar::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Scalar::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return Scalar::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Scalar::Float(f64::NAN),
        _ => {}
    }
    let unsigned = text
        .strip_prefix('-')
        .or_else(|| text.strip_prefix('+'))
        .unwrap_or(text);
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return match text.parse::<i128>() {
            Ok(n) => Scalar::Int(n),
            Err(_) => Scalar::BigInt,
        };
    }
    if looks_like_float(unsigned) {
        if let Ok(f) = text.parse::<f64>() {
            return Scalar::Float(f);
        }
    }
    Scalar::Str(text)
}

/// `digits.digits?`, `.digits` or `digits` with an optional exponent (at least one digit in the
/// mantissa; an exponent or a dot required so that plain integers stay integers).
fn looks_like_float(s: &str) -> bool {
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((a, b)) => (a, Some(b)),
        None => (mantissa, None),
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = digits(int_part)
        && frac_part.is_none_or(digits)
        && (int_part.len() + frac_part.map_or(0, str::len)) > 0;
    let exponent_ok = match exponent {
        None => frac_part.is_some(),
        Some(e) => {
            let e = e
                .strip_prefix('-')
                .or_else(|| e.strip_prefix('+'))
                .unwrap_or(e);
            !e.is_empty() && digits(e)
        }
    };
    mantissa_ok && exponent_ok
}

/// A collection being built.
enum Frame {
    Seq {
        line: usize,
        items: Vec<Node>,
    },
    Map {
        line: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Core-schema tags the loader understands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum CoreTag {
    Str,
    Int,
    Float,
    Bool,
    Null,
    Seq,
    Map,
}

fn core_tag(tag: &Tag, line: usize) -> Result<CoreTag, LoadError> {
    // `!` alone (non-specific tag) forces a string, like quoting.
    if tag.handle.is_empty() && tag.suffix == "!" {
        return Ok(CoreTag::Str);
    }
    if tag.handle == CORE_TAG_HANDLE {
        let t = match tag.suffix.as_str() {
            "str" => Some(CoreTag::Str),
            "int" => Some(CoreTag::Int),
            "float" => Some(CoreTag::Float),
            "bool" => Some(CoreTag::Bool),
            "null" => Some(CoreTag::Null),
            "seq" => Some(CoreTag::Seq),
            "map" => Some(CoreTag::Map),
            _ => None,
        };
        if let Some(t) = t {
            return Ok(t);
        }
    }
    let shown = if tag.handle == CORE_TAG_HANDLE {
        format!("!!{}", tag.suffix)
    } else {
        format!("{}{}", tag.handle, tag.suffix)
    };
    Err(LoadError::Structure {
        line,
        message: format!(
            "unsupported YAML tag `{}`; configuration values take no tags",
            truncate(&shown, 40)
        ),
    })
}

/// Builds the scalar node for `text`, checking any core tag against its value.
fn scalar_node(
    text: String,
    style: TScalarStyle,
    tag: Option<Tag>,
    line: usize,
) -> Result<Node, LoadError> {
    let plain = style == TScalarStyle::Plain;
    let tag = match tag {
        None => None,
        Some(t) => Some(core_tag(&t, line)?),
    };
    let plain = match tag {
        None => plain,
        Some(CoreTag::Str) => false,
        Some(CoreTag::Seq | CoreTag::Map) => {
            return Err(LoadError::Structure {
                line,
                message: "collection tag (`!!seq`/`!!map`) on a scalar".to_owned(),
            })
        }
        Some(t) => {
            let resolved = resolve(&text);
            let ok = match t {
                CoreTag::Int => matches!(resolved, Scalar::Int(_) | Scalar::BigInt),
                CoreTag::Float => matches!(resolved, Scalar::Float(_) | Scalar::Int(_)),
                CoreTag::Bool => matches!(resolved, Scalar::Bool(_)),
                CoreTag::Null => matches!(resolved, Scalar::Null),
                _ => false,
            };
            if !ok {
                return Err(LoadError::Structure {
                    line,
                    message: format!(
                        "tagged value `{}` does not match its tag",
                        truncate(&text, 40)
                    ),
                });
            }
            true
        }
    };
    Ok(Node {
        kind: NodeKind::Scalar { text, plain },
        line,
    })
}

fn check_collection_tag(tag: Option<Tag>, want: CoreTag, line: usize) -> Result<(), LoadError> {
    match tag {
        None => Ok(()),
        Some(t) => {
            if core_tag(&t, line)? == want {
                Ok(())
            } else {
                Err(LoadError::Structure {
                    line,
                    message: "tag does not match the collection it is on".to_owned(),
                })
            }
        }
    }
}

/// Parses `text` as a single YAML document. Returns `Ok(None)` for a stream without a document
/// (empty or comments only).
pub(crate) fn load(text: &str) -> Result<Option<Node>, LoadError> {
    check_printable(text)?;
    // A byte-order mark may open a YAML stream; yaml-rust2 would make it part of the first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    let mut documents = 0usize;
    loop {
        let (event, mark) = parser.next_token().map_err(|e| LoadError::Syntax {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info().to_owned(),
        })?;
        let line = mark.line().max(1);
        let finished = match event {
            Event::StreamEnd => break,
            Event::Nothing | Event::StreamStart | Event::DocumentEnd => None,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    return Err(LoadError::Structure {
                        line,
                        message: "a configuration file holds one YAML document; found a second \
                                  one (`---`)"
                            .to_owned(),
                    });
                }
                None
            }
            Event::Alias(_) => {
                return Err(LoadError::Structure {
                    line,
                    message: "YAML aliases (`*name`) are not supported in configuration files"
                        .to_owned(),
                })
            }
            Event::Scalar(text, style, _anchor, tag) => Some(scalar_node(text, style, tag, line)?),
            Event::SequenceStart(_anchor, tag) => {
                check_collection_tag(tag, CoreTag::Seq, line)?;
                push_frame(
                    &mut stack,
                    Frame::Seq {
                        line,
                        items: Vec::new(),
                    },
                    line,
                )?;
                None
            }
            Event::MappingStart(_anchor, tag) => {
                check_collection_tag(tag, CoreTag::Map, line)?;
                push_frame(
                    &mut stack,
                    Frame::Map {
                        line,
                        entries: Vec::new(),
                        key: None,
                    },
                    line,
                )?;
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq { line, items }) => Some(Node {
                    kind: NodeKind::Seq(items),
                    line,
                }),
                Some(Frame::Map { line, entries, key }) => {
                    if key.is_some() {
                        return Err(unbalanced(line));
                    }
                    Some(Node {
                        kind: NodeKind::Map(entries),
                        line,
                    })
                }
                None => return Err(unbalanced(line)),
            },
        };
        if let Some(node) = finished {
            match stack.last_mut() {
                None => {
                    if root.is_some() {
                        return Err(unbalanced(line));
                    }
                    root = Some(node);
                }
                Some(Frame::Seq { items, .. }) => items.push(node),
                Some(Frame::Map { entries, key, .. }) => match key.take() {
                    None => *key = Some(node),
                    Some(k) => entries.push((k, node)),
                },
            }
        }
    }
    if !stack.is_empty() {
        return Err(unbalanced(0));
    }
    Ok(root)
}

/// Rejects characters YAML does not allow in a stream (C0/C1 controls other than tab, line
/// feed, carriage return and NEL; DEL; U+FFFE/U+FFFF). yaml-rust2 treats NUL as the end of
/// input, so without this check anything after a NUL would be silently dropped.
fn check_printable(text: &str) -> Result<(), LoadError> {
    let mut line = 1;
    let mut column = 1;
    for c in text.chars() {
        let printable = matches!(c, '\t' | '\n' | '\r' | '\u{85}')
            || (' '..='~').contains(&c)
            || ('\u{a0}'..='\u{fffd}').contains(&c)
            || c >= '\u{10000}';
        if !printable {
            return Err(LoadError::Syntax {
                line,
                column,
                message: format!("character U+{:04X} is not allowed in YAML", c as u32),
            });
        }
        if c == '\n' {
            line += 1;
            column = 1;
        } else {
            column += 1;
        }
    }
    Ok(())
}

fn push_frame(stack: &mut Vec<Frame>, frame: Frame, line: usize) -> Result<(), LoadError> {
    if stack.len() >= MAX_DEPTH {
        return Err(LoadError::Structure {
            line,
            message: format!("nesting deeper than {MAX_DEPTH} levels"),
        });
    }
    stack.push(frame);
    Ok(())
}

/// The parser produced an event sequence this loader did not expect; never expected in
/// practice, reported rather than trusted.
fn unbalanced(line: usize) -> LoadError {
    LoadError::Structure {
        line,
        message: "malformed YAML event stream".to_owned(),
    }
}

/// `s` cut to at most `max` characters, with `…` when cut.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_plain_scalars_like_pyyaml() {
        assert_eq!(resolve("NULL"), Scalar::Null);
        assert_eq!(resolve("~"), Scalar::Null);
        assert_eq!(resolve(""), Scalar::Null);
        assert_eq!(resolve("True"), Scalar::Bool(true));
        assert_eq!(resolve("FALSE"), Scalar::Bool(false));
        assert_eq!(resolve("1073741824"), Scalar::Int(1_073_741_824));
        assert_eq!(resolve("-3"), Scalar::Int(-3));
        assert_eq!(resolve("+7"), Scalar::Int(7));
        assert_eq!(resolve("0.25"), Scalar::Float(0.25));
        assert_eq!(resolve("1e3"), Scalar::Float(1000.0));
        assert_eq!(resolve(".5"), Scalar::Float(0.5));
        assert_eq!(resolve("5."), Scalar::Float(5.0));
        assert_eq!(resolve("-.inf"), Scalar::Float(f64::NEG_INFINITY));
        assert!(matches!(resolve(".nan"), Scalar::Float(f) if f.is_nan()));
        assert_eq!(resolve("9".repeat(60).as_str()), Scalar::BigInt);
        for s in [
            "1.2.3", "e5", ".", "1e", "-", "+", "inf", "nan", "0x10", "10.0.0.1", "yes",
        ] {
            assert_eq!(resolve(s), Scalar::Str(s), "{s}");
        }
    }

    #[test]
    fn keeps_lines_and_quoting() {
        let root = load("a: 1\nb: \"2\"\nc:\n  - x\n  - 'y'\n")
            .expect("valid")
            .expect("document");
        let NodeKind::Map(entries) = root.kind else {
            panic!("not a map")
        };
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[1].0.line, 2);
        assert_eq!(entries[1].1.scalar(), Some(Scalar::Str("2")));
        let NodeKind::Seq(items) = &entries[2].1.kind else {
            panic!("not a seq")
        };
        assert_eq!(items[1].line, 5);
        assert_eq!(items[1].scalar(), Some(Scalar::Str("y")));
    }

    #[test]
    fn tags() {
        let root = load("a: !!str 5").expect("ok").expect("doc");
        let NodeKind::Map(entries) = root.kind else {
            panic!("not a map")
        };
        assert_eq!(entries[0].1.scalar(), Some(Scalar::Str("5")));
        assert!(load("a: !!int 5").is_ok());
        assert!(matches!(
            load("a: !!int x"),
            Err(LoadError::Structure { .. })
        ));
        assert!(matches!(
            load("a: !foo x"),
            Err(LoadError::Structure { .. })
        ));
    }

    #[test]
    fn empty_and_comment_only_streams_have_no_document() {
        assert_eq!(load(""), Ok(None));
        assert_eq!(load("# nothing\n"), Ok(None));
    }

    #[test]
    fn control_characters_are_rejected_with_their_position() {
        assert_eq!(
            load("a: 1\nb: x\0y\n"),
            Err(LoadError::Syntax {
                line: 2,
                column: 5,
                message: "character U+0000 is not allowed in YAML".to_owned()
            })
        );
        // A leading BOM, non-ASCII text, CRLF line ends and tabs inside values are fine.
        let root = load("\u{feff}a: \"\u{e9}\u{1f600}\"\r\nb: x\ty\r\n")
            .expect("valid")
            .expect("document");
        let NodeKind::Map(entries) = root.kind else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0.scalar(), Some(Scalar::Str("a")));
        assert_eq!(entries[0].1.scalar(), Some(Scalar::Str("\u{e9}\u{1f600}")));
        assert_eq!(entries[1].0.line, 2);
        assert_eq!(entries[1].1.scalar(), Some(Scalar::Str("x\ty")));
        assert!(matches!(load("a: \u{7f}"), Err(LoadError::Syntax { .. })));
        assert!(matches!(load("a: \u{ffff}"), Err(LoadError::Syntax { .. })));
    }

    #[test]
    fn depth_is_capped() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(load(&ok).is_ok());
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(matches!(load(&deep), Err(LoadError::Structure { .. })));
    }
}
