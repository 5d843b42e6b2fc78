//! The host's memory pressure for the balloon policy: PSI (`/proc/pressure/memory`),
//! opened once before the system call filters go on, then re-read from its start at each
//! decision (`lseek` and `read`, which the event loop may call).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ebb_balloon::policy::HostPressure;

/// An open PSI file.
#[derive(Debug)]
pub struct PsiFile {
    file: File,
}

impl PsiFile {
    /// Opens `path` (normally `/proc/pressure/memory`); `None`, logged, when the kernel
    /// has no PSI (then the policy decides from the guest alone).
    pub fn open(path: &Path) -> Option<Self> {
        match File::open(path) {
            Ok(file) => Some(Self { file }),
            Err(e) => {
                tracing::info!(
                    "balloon policy: no host memory pressure ({}: {e}); deciding from the \
                     guest's statistics alone",
                    path.display()
                );
                None
            }
        }
    }
}

impl HostPressure for PsiFile {
    fn memory_some_avg10(&mut self) -> Option<f64> {
        let mut text = String::new();
        self.file.seek(SeekFrom::Start(0)).ok()?;
        // PSI files are a few hundred bytes; a bound keeps a strange file from growing this.
        (&mut self.file).take(4096).read_to_string(&mut text).ok()?;
        some_avg10(&text)
    }
}

/// The `avg10` of the `some` line of a PSI file.
fn some_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_some_line() {
        let text = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\n\
                    full avg10=2.00 avg60=0.00 avg300=0.00 total=45\n";
        assert_eq!(some_avg10(text), Some(12.5));
        assert_eq!(some_avg10("full avg10=1.00\n"), None);
        assert_eq!(some_avg10("some avg10=x\n"), None);
    }

    #[test]
    fn rereads_the_file_from_its_start() {
        let dir = std::env::temp_dir().join(format!("ebb-psi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        std::fs::write(&path, "some avg10=1.00 avg60=0 avg300=0 total=1\n").unwrap();
        let mut psi = PsiFile::open(&path).unwrap();
        assert_eq!(psi.memory_some_avg10(), Some(1.0));
        std::fs::write(&path, "some avg10=7.25 avg60=0 avg300=0 total=2\n").unwrap();
        assert_eq!(psi.memory_some_avg10(), Some(7.25));
        assert!(PsiFile::open(&dir.join("missing")).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
