//! A disk's configuration: what `ebb --disk` takes and what `GET /vm` reports.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::options::{parse_switch, split_options, switch_arg, ParseError};

/// Most bytes in a disk ID: the virtio-blk serial number (GET_ID) is 20 bytes.
pub const MAX_ID_LEN: usize = 20;

/// Disk configuration (`--disk path=IMAGE[,readonly=on|off][,id=NAME]`).
///
/// [`FromStr`] reads the `--disk` syntax (a bare first item is the path; paths cannot
/// contain commas); [`Display`] prints every option back in it, e.g.
/// `path=/var/lib/ebb/root.img,readonly=off,id=root.img`.
///
/// [`Display`]: fmt::Display
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image: a raw file (or block device) whose size is a multiple of 512.
    pub path: PathBuf,
    /// Attach read-only (the image is opened read-only; the guest sees a read-only disk).
    pub readonly: bool,
    /// The disk's name: its serial number in the guest (`/dev/disk/by-id/virtio-ID`),
    /// and its name in the API and metrics. 1 to 20 of `A-Z a-z 0-9 . _ -`; by default
    /// derived from the image's file name ([`DiskConfig::id_from_path`]).
    pub id: String,
}

impl DiskConfig {
    /// The ID a disk gets without `id=`: the image's file name, each character outside
    /// `A-Z a-z 0-9 . _ -` replaced by `_`, cut to 20 bytes (`disk` when nothing is left).
    pub fn id_from_path(path: &str) -> String {
        let name = path.rsplit('/').find(|p| !p.is_empty()).unwrap_or("");
        let id: String = name
            .chars()
            .map(|c| if id_char(c) { c } else { '_' })
            .take(MAX_ID_LEN)
            .collect();
        if id.is_empty() {
            "disk".to_string()
        } else {
            id
        }
    }
}

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks an ID given with `id=`.
fn check_id(id: &str) -> Result<(), ParseError> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(ParseError(format!(
            "invalid disk id '{id}': 1 to {MAX_ID_LEN} characters (it is the disk's serial \
             number)"
        )));
    }
    if let Some(c) = id.chars().find(|c| !id_char(*c)) {
        return Err(ParseError(format!(
            "invalid disk id '{id}': '{c}' is not allowed (use A-Z, a-z, 0-9, '.', '_', '-')"
        )));
    }
    Ok(())
}

impl FromStr for DiskConfig {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let (positional, pairs) = split_options(text)?;
        let mut path = positional;
        let mut readonly = false;
        let mut id = None;
        for (key, value) in pairs {
            match key {
                "path" => path = Some(value),
                "readonly" => readonly = parse_switch(key, value)?,
                "id" => {
                    check_id(value)?;
                    id = Some(value.to_string());
                }
                _ => {
                    return Err(ParseError(format!(
                        "unknown disk option '{key}' (known: path, readonly, id)"
                    )))
                }
            }
        }
        let path = match path {
            Some(p) if !p.is_empty() => p,
            _ => {
                return Err(ParseError(format!(
                    "'{text}' gives no disk image (path=IMAGE)"
                )))
            }
        };
        Ok(DiskConfig {
            path: PathBuf::from(path),
            readonly,
            id: id.unwrap_or_else(|| DiskConfig::id_from_path(path)),
        })
    }
}

impl fmt::Display for DiskConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "path={},readonly={},id={}",
            self.path.display(),
            switch_arg(self.readonly),
            self.id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line_syntax() {
        let d: DiskConfig = "path=/img/root.raw,readonly=on,id=root".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img/root.raw".into(),
                readonly: true,
                id: "root".into()
            }
        );
        let d: DiskConfig = "/img/data.img".parse().unwrap();
        assert_eq!((d.readonly, d.id.as_str()), (false, "data.img"));
        let d: DiskConfig = "path=a=b.img,readonly=off".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("a=b.img"));
    }

    #[test]
    fn ids_derived_from_the_path() {
        for (path, id) in [
            (
                "/var/lib/ebb/debian-12-generic-amd64.raw",
                "debian-12-generic-am",
            ),
            ("disk image (1).img", "disk_image__1_.img"),
            ("/dev/vdb/", "vdb"),
            ("/", "disk"),
            ("/x/éé.img", "__.img"),
        ] {
            assert_eq!(DiskConfig::id_from_path(path), id, "{path}");
            assert!(check_id(&DiskConfig::id_from_path(path)).is_ok());
        }
    }

    #[test]
    fn errors_name_the_offending_text() {
        for (bad, message) in [
            (
                "readonly=on",
                "'readonly=on' gives no disk image (path=IMAGE)",
            ),
            ("path=", "'path=' gives no disk image (path=IMAGE)"),
            (
                "path=a,bogus=1",
                "unknown disk option 'bogus' (known: path, readonly, id)",
            ),
            (
                "path=a,readonly=maybe",
                "invalid value 'maybe' for readonly: expected on or off",
            ),
            (
                "path=a,id=abcdefghijklmnopqrstu",
                "invalid disk id 'abcdefghijklmnopqrstu': 1 to 20 characters (it is the \
                 disk's serial number)",
            ),
            (
                "path=a,id=my disk",
                "invalid disk id 'my disk': ' ' is not allowed (use A-Z, a-z, 0-9, '.', \
                 '_', '-')",
            ),
            (
                "path=a,id=x\"y",
                "invalid disk id 'x\"y': '\"' is not allowed (use A-Z, a-z, 0-9, '.', '_', \
                 '-')",
            ),
            (
                "path=a,b",
                "option 'b' in 'path=a,b' needs a value (key=value)",
            ),
        ] {
            assert_eq!(bad.parse::<DiskConfig>().unwrap_err().to_string(), message);
        }
    }

    #[test]
    fn display_is_the_command_line_syntax_and_reads_back() {
        let d: DiskConfig = "/img/root.raw".parse().unwrap();
        assert_eq!(d.to_string(), "path=/img/root.raw,readonly=off,id=root.raw");
        for text in ["path=/a,readonly=on,id=x", "b.img", "path=c,id=A_b-9.z"] {
            let d: DiskConfig = text.parse().unwrap();
            assert_eq!(d.to_string().parse::<DiskConfig>().unwrap(), d);
        }
    }
}
