//! Line and column of each key in a YAML document, so problems found after parsing can
//! point at the place in the file.

use std::collections::HashMap;

use yaml_rust2::{
    parser::{Event, MarkedEventReceiver, Parser},
    scanner::Marker,
};

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// Positions of the values in a document by dotted key, such as `plugins[1].parameters`.
#[derive(Debug, Default)]
pub struct Locations {
    by_key: HashMap<String, Location>,
}

impl Locations {
    /// Records where every value of `text` starts; a document that does not parse gives
    /// no locations.
    pub fn of(text: &str) -> Locations {
        let mut walker = Walker::default();
        if Parser::new_from_str(text).load(&mut walker, false).is_err() {
            return Locations::default();
        }
        Locations {
            by_key: walker.by_key,
        }
    }

    /// Returns the location of `key`, or of its nearest parent that exists (a missing field is
    /// reported where its mapping starts).
    pub fn find(&self, key: &str) -> Option<Location> {
        let mut key = key;
        loop {
            if let Some(location) = self.by_key.get(key) {
                return Some(*location);
            }
            let cut = key.rfind(['.', '['])?;
            key = &key[..cut];
        }
    }
}

enum Frame {
    /// `first_key_seen` is false until the first key arrives: the parser marks a block
    /// mapping's start at its first `:`, so the mapping is placed at its first key instead.
    Mapping {
        key: Option<String>,
        first_key_seen: bool,
    },
    Sequence {
        index: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    /// The dotted key of each open container.
    paths: Vec<String>,
    by_key: HashMap<String, Location>,
}

impl Walker {
    /// Returns the key of the next value in the current container, or `None` when the next
    /// scalar is a mapping key.
    fn next_value_key(&mut self) -> Option<String> {
        let parent = self.paths.last().cloned().unwrap_or_default();
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Sequence { index }) => {
                let key = format!("{parent}[{index}]");
                *index += 1;
                Some(key)
            }
            Some(Frame::Mapping { key, .. }) => {
                let name = key.take()?;
                Some(if parent.is_empty() {
                    name
                } else {
                    format!("{parent}.{name}")
                })
            }
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let location = Location {
            line: mark.line(),
            column: mark.col() + 1,
        };
        match event {
            Event::Scalar(value, ..) => match self.next_value_key() {
                Some(key) => {
                    self.by_key.entry(key).or_insert(location);
                }
                None => {
                    if let Some(Frame::Mapping {
                        key,
                        first_key_seen,
                    }) = self.stack.last_mut()
                    {
                        *key = Some(value);
                        if !*first_key_seen {
                            *first_key_seen = true;
                            let path = self.paths.last().cloned().unwrap_or_default();
                            self.by_key.insert(path, location);
                        }
                    }
                }
            },
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let key = self.next_value_key().unwrap_or_default();
                self.by_key.entry(key.clone()).or_insert(location);
                self.paths.push(key);
                self.stack.push(match event {
                    Event::MappingStart(..) => Frame::Mapping {
                        key: None,
                        first_key_seen: false,
                    },
                    _ => Frame::Sequence { index: 0 },
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.paths.pop();
            }
            Event::Alias(_) => {
                self.next_value_key();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
steering:
  intercept_ports: [8080, 9090]
plugins:
  - id: a
    parameters:
      allowed_cidrs:
        - 10.0.0.1/33
  - id: b
";

    #[test]
    fn keys_have_lines_and_columns() {
        let locations = Locations::of(TEXT);
        let at = |key| locations.find(key).map(|l| (l.line, l.column));
        assert_eq!(at("steering.intercept_ports"), Some((2, 20)));
        assert_eq!(at("steering.intercept_ports[1]"), Some((2, 27)));
        assert_eq!(at("plugins[0].id"), Some((4, 9)));
        assert_eq!(at("plugins[0].parameters.allowed_cidrs[0]"), Some((7, 11)));
        assert_eq!(at("plugins[1].id"), Some((8, 9)));
    }

    #[test]
    fn missing_key_falls_back_to_parent() {
        let locations = Locations::of(TEXT);
        let missing = locations
            .find("plugins[1].parameters.client_secret")
            .unwrap();
        assert_eq!((missing.line, missing.column), (8, 5));
    }
}
