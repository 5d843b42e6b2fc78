//! Hand-written JSON output: one flat object per marker line.

use std::fmt::Write as _;

/// Appends `s` to `out` as a JSON string literal (with the quotes).
pub fn escape_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            // Other control characters (and DEL, which terminals act on) as \u escapes.
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Returns `s` as a JSON string literal.
#[cfg(test)]
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    escape_into(&mut out, s);
    out
}

/// Builder for a flat JSON object; keys keep insertion order.
#[derive(Debug, Clone)]
pub struct Obj {
    buf: String,
}

impl Default for Obj {
    fn default() -> Self {
        Self::new()
    }
}

impl Obj {
    pub fn new() -> Self {
        Obj {
            buf: String::from("{"),
        }
    }

    fn key(&mut self, k: &str) {
        if self.buf.len() > 1 {
            self.buf.push(',');
        }
        escape_into(&mut self.buf, k);
        self.buf.push(':');
    }

    pub fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        escape_into(&mut self.buf, v);
        self
    }

    pub fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.buf.push_str(if v { "true" } else { "false" });
        self
    }

    pub fn int(mut self, k: &str, v: i64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    pub fn uint(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        let _ = write!(self.buf, "{v}");
        self
    }

    /// A finite float (non-finite values become null).
    pub fn float(mut self, k: &str, v: f64) -> Self {
        self.key(k);
        if v.is_finite() {
            let _ = write!(self.buf, "{v}");
        } else {
            self.buf.push_str("null");
        }
        self
    }

    pub fn uint_list(mut self, k: &str, v: &[u64]) -> Self {
        self.key(k);
        self.buf.push('[');
        for (i, n) in v.iter().enumerate() {
            if i > 0 {
                self.buf.push(',');
            }
            let _ = write!(self.buf, "{n}");
        }
        self.buf.push(']');
        self
    }

    pub fn null(mut self, k: &str) -> Self {
        self.key(k);
        self.buf.push_str("null");
        self
    }

    pub fn opt_uint(self, k: &str, v: Option<u64>) -> Self {
        match v {
            Some(v) => self.uint(k, v),
            None => self.null(k),
        }
    }

    pub fn opt_int(self, k: &str, v: Option<i64>) -> Self {
        match v {
            Some(v) => self.int(k, v),
            None => self.null(k),
        }
    }

    pub fn opt_str(self, k: &str, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.str(k, v),
            None => self.null(k),
        }
    }

    pub fn finish(mut self) -> String {
        self.buf.push('}');
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_specials() {
        assert_eq!(escape("plain"), "\"plain\"");
        assert_eq!(escape("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(escape("l1\nl2\r\t"), r#""l1\nl2\r\t""#);
        assert_eq!(escape("\u{0}\u{1b}[0m\u{7f}"), r#""\u0000\u001b[0m\u007f""#);
        assert_eq!(escape("\u{8}\u{c}"), r#""\b\f""#);
        assert_eq!(escape("héllo ✓"), "\"héllo ✓\"");
        assert_eq!(escape(""), "\"\"");
    }

    #[test]
    fn builds_objects() {
        let s = Obj::new()
            .str("cmd", "touch")
            .bool("ok", true)
            .uint("mib", 256)
            .int("neg", -3)
            .null("n")
            .float("f", 1.5)
            .float("g", 5.0)
            .float("h", f64::NAN)
            .opt_uint("some", Some(1))
            .opt_str("none", None)
            .finish();
        assert_eq!(
            s,
            r#"{"cmd":"touch","ok":true,"mib":256,"neg":-3,"n":null,"f":1.5,"g":5,"h":null,"some":1,"none":null}"#
        );
        assert_eq!(Obj::new().finish(), "{}");
        assert_eq!(Obj::new().str("k\"", "v").finish(), r#"{"k\"":"v"}"#);
    }
}
