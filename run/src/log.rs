//! `--log FILE --log-format text|json`: where rqemu-run reports, in runc's shapes. Engines
//! read the last JSON line's `msg` (podman) when a command fails.

use std::io::Write;
use std::path::PathBuf;

use crate::state::now_rfc3339;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Default)]
pub struct Logger {
    pub file: Option<PathBuf>,
    pub format: Format,
    pub debug: bool,
    /// Also print errors to stderr (not in the monitor, whose stderr is the container's).
    pub stderr: bool,
}

impl Logger {
    pub fn line(&self, level: &str, msg: &str) -> String {
        match self.format {
            Format::Json => {
                serde_json::json!({"level": level, "msg": msg, "time": now_rfc3339()}).to_string()
            }
            Format::Text => format!("time=\"{}\" level={level} msg={msg:?}", now_rfc3339()),
        }
    }

    fn write(&self, level: &str, msg: &str) {
        if let Some(path) = &self.file {
            let line = self.line(level, msg);
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{line}");
            }
        }
    }

    pub fn error(&self, msg: &str) {
        self.write("error", msg);
        if self.stderr {
            eprintln!("rqemu-run: error: {msg}");
        }
    }

    pub fn warn(&self, msg: &str) {
        self.write("warning", msg);
    }

    pub fn debug(&self, msg: &str) {
        if self.debug {
            self.write("debug", msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_text_lines() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("log.json");
        let l = Logger {
            file: Some(file.clone()),
            format: Format::Json,
            ..Default::default()
        };
        l.error("first");
        l.error("boom \"quoted\"");
        let text = std::fs::read_to_string(&file).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(last["msg"], "boom \"quoted\"");
        assert_eq!(last["level"], "error");
        let t = Logger::default().line("error", "x y");
        assert!(t.contains("level=error msg=\"x y\""), "{t}");
    }
}
