//! A small, strict XML tree shared by the domain definition and the migration cookie.
//!
//! Input is parsed with quick-xml into a tree of [`Element`]s under hard limits: a maximum
//! input size, a maximum nesting depth, no DTD (`<!DOCTYPE`), no processing instructions,
//! no entity references other than the five predefined ones and character references.
//! The schema-specific code then walks the tree with [`Element::allow`], which refuses any
//! attribute or child element outside the supported subset, naming it.

use quick_xml::Reader;
use quick_xml::escape::escape;
use quick_xml::events::Event;

/// Deepest element nesting accepted; the supported documents need four levels.
const MAX_DEPTH: usize = 16;

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("document is {len} bytes, more than the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("DTD and entity declarations (<!DOCTYPE ...>) are not accepted")]
    Doctype,
    #[error("entity reference '&{0};' is not accepted")]
    Entity(String),
    #[error("processing instructions are not accepted")]
    ProcessingInstruction,
    #[error("elements nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("malformed XML: {0}")]
    Malformed(String),
    #[error("unsupported element <{element}> in <{parent}>")]
    UnsupportedElement { element: String, parent: String },
    #[error("unsupported attribute '{attribute}' on <{element}>")]
    UnsupportedAttribute { attribute: String, element: String },
    #[error("<{element}> is missing {what}")]
    Missing { element: String, what: String },
    #[error("invalid value '{value}' for {what} in <{element}>: {reason}")]
    Invalid {
        element: String,
        what: String,
        value: String,
        reason: String,
    },
}

/// One element: name, attributes in document order, child elements, concatenated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Element>,
    pub text: String,
}

fn malformed(e: impl std::fmt::Display) -> XmlError {
    XmlError::Malformed(e.to_string())
}

fn start_element(e: &quick_xml::events::BytesStart<'_>) -> Result<Element, XmlError> {
    let name = e.name().as_ref().to_string();
    let mut el = Element::new(name);
    for attr in e.attributes() {
        let attr = attr.map_err(malformed)?;
        let key = attr.key.as_ref().to_string();
        if el.get(&key).is_some() {
            return Err(malformed(format!(
                "duplicate attribute '{key}' on <{}>",
                el.name
            )));
        }
        let value =
            attr.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .map_err(|err| match err {
                    quick_xml::Error::Escape(
                        quick_xml::escape::EscapeError::UnrecognizedEntity(_, name),
                    ) => XmlError::Entity(name),
                    other => malformed(other),
                })?;
        // A character reference can name what the document may not contain literally.
        refuse_control_characters(&value)?;
        el.attrs.push((key, value.into_owned()));
    }
    Ok(el)
}

/// Escapes an attribute value so that it parses back to itself: besides the markup
/// characters, tab, newline and carriage return become character references, because a
/// parser normalizes literal ones in attribute values to spaces (XML 1.0, 3.3.3).
fn escape_attribute(value: &str) -> String {
    escape(value)
        .replace('\t', "&#9;")
        .replace('\n', "&#10;")
        .replace('\r', "&#13;")
}

/// Refuses the characters XML 1.0 does not allow (C0 controls other than tab, newline and
/// carriage return; U+FFFE and U+FFFF).
fn refuse_control_characters(text: &str) -> Result<(), XmlError> {
    match text.chars().find(|c| {
        (*c < ' ' && !matches!(c, '\t' | '\n' | '\r')) || matches!(c, '\u{fffe}' | '\u{ffff}')
    }) {
        Some(c) => Err(malformed(format!(
            "character U+{:04X} is not allowed in XML",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// Parses `input` into its root element, refusing anything outside plain XML.
pub fn parse(input: &str, max_len: usize) -> Result<Element, XmlError> {
    if input.len() > max_len {
        return Err(XmlError::TooLarge {
            len: input.len(),
            max: max_len,
        });
    }
    refuse_control_characters(input)?;
    // Text is trimmed once the element is complete, not per text event: quick-xml splits
    // text at every entity reference, and trimming the pieces would eat the spaces next to
    // one (`a &amp; b` would read `a&b`).
    let mut reader = Reader::from_str(input);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader.read_event().map_err(malformed)?;
        match event {
            Event::Start(_) | Event::Empty(_) if root.is_some() => {
                return Err(malformed("content after the root element"));
            }
            Event::Start(e) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                stack.push(start_element(&e)?);
            }
            Event::Empty(e) => {
                let el = start_element(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                // quick-xml checks that end tags match their start tags.
                let mut el = stack.pop().ok_or_else(|| malformed("unexpected end tag"))?;
                let trimmed = el.text.trim();
                if trimmed.len() != el.text.len() {
                    el.text = trimmed.to_string();
                }
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                let text = t.xml10_content();
                match stack.last_mut() {
                    Some(cur) => cur.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(malformed("text outside the root element")),
                }
            }
            Event::CData(t) => {
                let Some(cur) = stack.last_mut() else {
                    return Err(malformed("CDATA outside the root element"));
                };
                cur.text.push_str(&t.xml10_content());
            }
            Event::GeneralRef(r) => {
                let Some(cur) = stack.last_mut() else {
                    return Err(malformed("reference outside the root element"));
                };
                if r.is_char_ref() {
                    let c = r
                        .resolve_char_ref()
                        .map_err(malformed)?
                        .ok_or_else(|| malformed("bad character reference"))?;
                    if c < ' ' && !matches!(c, '\t' | '\n' | '\r') {
                        return Err(malformed(format!(
                            "character U+{:04X} is not allowed in XML",
                            c as u32
                        )));
                    }
                    cur.text.push(c);
                } else {
                    let name = r.xml10_content().into_owned();
                    let c = match name.as_str() {
                        "lt" => '<',
                        "gt" => '>',
                        "amp" => '&',
                        "apos" => '\'',
                        "quot" => '"',
                        _ => return Err(XmlError::Entity(name)),
                    };
                    cur.text.push(c);
                }
            }
            Event::DocType(_) => return Err(XmlError::Doctype),
            Event::PI(_) => return Err(XmlError::ProcessingInstruction),
            Event::Decl(_) | Event::Comment(_) => {}
            Event::Eof => break,
        }
    }
    if !stack.is_empty() {
        return Err(malformed("unexpected end of document"));
    }
    root.ok_or_else(|| malformed("no root element"))
}

impl Element {
    pub fn new(name: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Builder: adds an attribute.
    pub fn with_attr(mut self, key: &str, value: impl ToString) -> Self {
        self.attrs.push((key.to_string(), value.to_string()));
        self
    }

    /// Builder: adds an attribute when there is a value.
    pub fn with_attr_opt(self, key: &str, value: Option<impl ToString>) -> Self {
        match value {
            Some(v) => self.with_attr(key, v),
            None => self,
        }
    }

    /// Builder: adds a child element.
    pub fn with_child(mut self, child: Element) -> Self {
        self.children.push(child);
        self
    }

    /// Builder: sets the text content.
    pub fn with_text(mut self, text: impl ToString) -> Self {
        self.text = text.to_string();
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The attribute `key`, or an error naming the element and attribute.
    pub fn require(&self, key: &str) -> Result<&str, XmlError> {
        self.get(key).ok_or_else(|| XmlError::Missing {
            element: self.name.clone(),
            what: format!("attribute '{key}'"),
        })
    }

    /// Refuses any attribute not in `attrs` and any child element not in `children`.
    pub fn allow(&self, attrs: &[&str], children: &[&str]) -> Result<(), XmlError> {
        if let Some((k, _)) = self
            .attrs
            .iter()
            .find(|(k, _)| !attrs.contains(&k.as_str()))
        {
            return Err(XmlError::UnsupportedAttribute {
                attribute: k.clone(),
                element: self.name.clone(),
            });
        }
        if let Some(c) = self
            .children
            .iter()
            .find(|c| !children.contains(&c.name.as_str()))
        {
            return Err(XmlError::UnsupportedElement {
                element: c.name.clone(),
                parent: self.name.clone(),
            });
        }
        Ok(())
    }

    /// The only child named `name`, if any; more than one is refused.
    pub fn child(&self, name: &str) -> Result<Option<&Element>, XmlError> {
        let mut it = self.children.iter().filter(|c| c.name == name);
        let first = it.next();
        if it.next().is_some() {
            return Err(malformed(format!(
                "<{name}> appears more than once in <{}>",
                self.name
            )));
        }
        Ok(first)
    }

    /// The only child named `name`; missing is refused.
    pub fn require_child(&self, name: &str) -> Result<&Element, XmlError> {
        self.child(name)?.ok_or_else(|| XmlError::Missing {
            element: self.name.clone(),
            what: format!("element <{name}>"),
        })
    }

    /// An error for a bad value of `what` on this element.
    pub fn invalid(&self, what: &str, value: &str, reason: impl ToString) -> XmlError {
        XmlError::Invalid {
            element: self.name.clone(),
            what: what.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Serialises the tree, indented by two spaces, without an XML declaration.
    pub fn write(&self) -> String {
        let mut out = String::new();
        self.write_into(&mut out, 0);
        out
    }

    fn write_into(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        out.push_str(&indent);
        out.push('<');
        out.push_str(&self.name);
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("='");
            out.push_str(&escape_attribute(v));
            out.push('\'');
        }
        if self.children.is_empty() && self.text.is_empty() {
            out.push_str("/>\n");
            return;
        }
        out.push('>');
        if self.children.is_empty() {
            out.push_str(&escape(self.text.as_str()));
        } else {
            out.push('\n');
            if !self.text.is_empty() {
                out.push_str(&indent);
                out.push_str("  ");
                out.push_str(&escape(self.text.as_str()));
                out.push('\n');
            }
            for c in &self.children {
                c.write_into(out, depth + 1);
            }
            out.push_str(&indent);
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push_str(">\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_escaped_text_and_attributes() {
        let el = Element::new("a")
            .with_attr("x", "1 < 2 & 'q'")
            // Found by the domain_parse fuzz target: a tab written literally came back
            // as a space.
            .with_attr("w", "a\tb\nc\rd")
            .with_child(Element::new("b").with_text("x&y<z>"));
        let parsed = parse(&el.write(), 4096).unwrap();
        assert_eq!(parsed, el);
    }

    #[test]
    fn refuses_doctype_and_entities() {
        let doc = "<!DOCTYPE a [<!ENTITY x 'boom'>]><a>&x;</a>";
        assert_eq!(parse(doc, 4096), Err(XmlError::Doctype));
        assert_eq!(parse("<a>&x;</a>", 4096), Err(XmlError::Entity("x".into())));
        assert_eq!(
            parse("<a b='&x;'/>", 4096),
            Err(XmlError::Entity("x".into()))
        );
        assert_eq!(parse("<a>&amp;&#65;</a>", 4096).unwrap().text, "&A");
    }

    #[test]
    fn keeps_spaces_next_to_references_and_refuses_control_characters() {
        // Found by the cookie_decode fuzz target: text around a reference lost its spaces.
        let el = parse("<a>\n  x &amp; y &apos;\n z\n</a>", 4096).unwrap();
        assert_eq!(el.text, "x & y '\n z");
        let el = parse("<a>\n <b> c </b>\n</a>\n", 4096).unwrap();
        assert_eq!((el.text.as_str(), el.children[0].text.as_str()), ("", "c"));
        assert_eq!(parse(&el.write(), 4096).unwrap(), el);
        assert_eq!(
            parse("<a>\u{5}</a>", 4096),
            Err(XmlError::Malformed(
                "character U+0005 is not allowed in XML".into()
            ))
        );
        // Found by the cookie_decode fuzz target: a reference in an attribute value
        // smuggled in a control character the encoder then wrote literally.
        assert_eq!(
            parse("<a b='x&#8;'/>", 4096),
            Err(XmlError::Malformed(
                "character U+0008 is not allowed in XML".into()
            ))
        );
        assert_eq!(
            parse("<a>&#1;</a>", 4096),
            Err(XmlError::Malformed(
                "character U+0001 is not allowed in XML".into()
            ))
        );
    }

    #[test]
    fn refuses_size_depth_and_garbage() {
        assert!(matches!(
            parse("<a/>", 3),
            Err(XmlError::TooLarge { len: 4, max: 3 })
        ));
        let deep = "<a>".repeat(20) + &"</a>".repeat(20);
        assert_eq!(parse(&deep, 4096), Err(XmlError::TooDeep));
        assert!(matches!(
            parse("<a><b></a>", 4096),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(
            parse("<a/><b/>", 4096),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(parse("", 4096), Err(XmlError::Malformed(_))));
        assert_eq!(
            parse("<?xml-stylesheet href='x'?><a/>", 4096),
            Err(XmlError::ProcessingInstruction)
        );
    }

    #[test]
    fn allow_names_the_offender() {
        let el = parse("<disk type='file' bogus='1'><weird/></disk>", 4096).unwrap();
        assert_eq!(
            el.allow(&["type"], &["weird"]).unwrap_err().to_string(),
            "unsupported attribute 'bogus' on <disk>"
        );
        assert_eq!(
            el.allow(&["type", "bogus"], &[]).unwrap_err().to_string(),
            "unsupported element <weird> in <disk>"
        );
    }
}
