//! Command-line option values: the parse error and the `key=value,...` list syntax that
//! `--balloon` (and the VMM's `--memory`) use.

/// A configuration value that could not be parsed; the message quotes the offending text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl ParseError {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

/// Parses `on`/`off` (also `true`/`false`, `yes`/`no`, `1`/`0`) for option `key`.
pub fn parse_switch(key: &str, value: &str) -> Result<bool, ParseError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(ParseError(format!(
            "invalid value '{value}' for {key}: expected on or off"
        ))),
    }
}

/// `on` or `off`, as [`parse_switch`] reads it.
pub fn switch_arg(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// An option list: the optional positional value and the `key=value` pairs.
pub type OptionList<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>);

/// Splits `key=value,key=value` option lists; a bare first item is returned as the
/// positional value (`5G,thp=on` -> positional `5G`).
pub fn split_options(text: &str) -> Result<OptionList<'_>, ParseError> {
    let mut positional = None;
    let mut pairs = Vec::new();
    for (i, item) in text.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            return Err(ParseError(format!("empty option in '{text}'")));
        }
        match item.split_once('=') {
            Some((k, v)) => pairs.push((k.trim(), v.trim())),
            None if i == 0 => positional = Some(item),
            None => {
                return Err(ParseError(format!(
                    "option '{item}' in '{text}' needs a value (key=value)"
                )))
            }
        }
    }
    Ok((positional, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_lists() {
        assert_eq!(
            split_options("5G,thp=on").unwrap(),
            (Some("5G"), vec![("thp", "on")])
        );
        assert_eq!(split_options("a=1").unwrap(), (None, vec![("a", "1")]));
        assert!(split_options("a=1,,b=2")
            .unwrap_err()
            .0
            .contains("empty option"));
        assert!(split_options("a=1,b")
            .unwrap_err()
            .0
            .contains("needs a value"));
    }

    #[test]
    fn switches() {
        for (text, on) in [("on", true), ("YES", true), ("0", false), ("off", false)] {
            assert_eq!(parse_switch("k", text), Ok(on));
            assert_eq!(parse_switch("k", switch_arg(on)), Ok(on));
        }
        assert_eq!(
            parse_switch("thp", "maybe").unwrap_err().0,
            "invalid value 'maybe' for thp: expected on or off"
        );
    }
}
