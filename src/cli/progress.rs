//! Progress bars for the terminal: drawn on stderr when it is a terminal, never when it is
//! piped or with `--no-progress`.

use std::io::IsTerminal;
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::util::progress::{Progress, ProgressHandle};

struct Bar(ProgressBar);

impl Progress for Bar {
    fn set_total(&self, bytes: u64) {
        self.0.set_length(bytes);
    }
    fn add(&self, bytes: u64) {
        self.0.inc(bytes);
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

/// A bar labelled `what`, or silence when bars are off or stderr is not a terminal.
pub fn bar(what: &str, enabled: bool) -> ProgressHandle {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressHandle::default();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    ProgressHandle(Arc::new(Bar(bar)))
}
