//! Every log line of the test binary, at TRACE level, scanned for key bytes as it is written.
//!
//! Lines are not kept (that would grow the memory the allocator counts): each one is checked
//! against the secrets when it is written, and only the first few offending lines are kept.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tracing_subscriber::fmt::MakeWriter;

/// The log capture: counters, and the offending lines.
pub struct Capture {
    /// Key strings (and distinctive parts of them) that must never appear in a log line.
    needles: Vec<String>,
    lines: AtomicU64,
    bytes: AtomicU64,
    leaks: AtomicU64,
    first_leaks: Mutex<Vec<String>>,
}

static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();

/// Installs the global TRACE subscriber writing into the capture (once per process) and
/// returns the capture. `secrets` must be the same on every call.
pub fn install(secrets: &[&str]) -> &'static Capture {
    CAPTURE.get_or_init(|| {
        let capture: &'static Capture = Box::leak(Box::new(Capture::new(secrets)));
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(capture)
            .finish();
        tracing::subscriber::set_global_default(subscriber)
            .expect("no other global subscriber in this test binary");
        capture
    })
}

impl Capture {
    fn new(secrets: &[&str]) -> Capture {
        // The first 12 characters of a key's random part (after its last `-`): a line that
        // holds the key, or any longer part of it, holds these. Shorter keys whole.
        let mut needles = Vec::new();
        for s in secrets {
            match s.rsplit_once('-') {
                Some((_, tail)) if tail.len() >= 12 => needles.push(tail[..12].to_owned()),
                _ => needles.push((*s).to_owned()),
            }
        }
        needles.sort();
        needles.dedup();
        Capture {
            needles,
            lines: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            leaks: AtomicU64::new(0),
            first_leaks: Mutex::new(Vec::with_capacity(8)),
        }
    }

    /// Whether `text` holds key bytes.
    pub fn holds_key(&self, text: &[u8]) -> bool {
        let text = String::from_utf8_lossy(text);
        self.needles.iter().any(|n| text.contains(n.as_str()))
    }

    fn check(&self, buf: &[u8]) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        if self.holds_key(buf) {
            self.leaks.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_leaks.lock().unwrap_or_else(|p| p.into_inner());
            if first.len() < 5 {
                let line = String::from_utf8_lossy(buf);
                first.push(line.chars().take(400).collect());
            }
        }
    }

    /// Log lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Log bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Lines that held key bytes.
    pub fn leaks(&self) -> u64 {
        self.leaks.load(Ordering::Relaxed)
    }

    /// The first few lines that held key bytes.
    pub fn first_leaks(&self) -> Vec<String> {
        self.first_leaks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One formatted event, checked when written.
pub struct Line(&'static Capture);

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.check(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for &'static Capture {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(self)
    }
}
