//! The only writer to stdout and stderr: data on stdout, diagnostics and progress on stderr,
//! colour decided once, broken pipes end the program quietly.

use std::fmt::Display;
use std::io::{self, IsTerminal, Write};
use std::path::Path;

use console::Style;
use serde::Serialize;

use crate::cli::ColorChoice;
use crate::exec::{Outcome, Report, StepResult};
use crate::plan::{Action, Plan, Step};
use crate::storage::Problem;

/// Output settings, decided once at start.
#[derive(Debug, Clone)]
pub struct Output {
    color: bool,
    /// Machine-readable mode: stdout carries JSON only.
    pub json: bool,
    /// Show everything the garbage collector prints.
    pub verbose: bool,
}

impl Output {
    /// Decides colour from `--color`, `NO_COLOR` and whether stderr is a terminal.
    pub fn new(choice: ColorChoice, json: bool, verbose: bool) -> Self {
        let color = match choice {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && io::stderr().is_terminal()
            }
        };
        console::set_colors_enabled(color);
        console::set_colors_enabled_stderr(color);
        Self {
            color,
            json,
            verbose,
        }
    }

    fn paint(&self, style: Style, s: impl Display) -> String {
        if self.color {
            style.apply_to(s).to_string()
        } else {
            s.to_string()
        }
    }

    /// A line of data on stdout.
    pub fn data(&self, line: impl Display) {
        let mut out = io::stdout().lock();
        if let Err(e) = writeln!(out, "{line}") {
            quiet_on_broken_pipe(e);
        }
    }

    /// A value as pretty JSON on stdout.
    pub fn json_value<T: Serialize>(&self, v: &T) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => self.data(s),
            Err(e) => self.error(format!("cannot serialise output: {e}")),
        }
    }

    fn err_line(&self, line: impl Display) {
        // A closed stderr (`2>&1 | head -1`) must not stop a run halfway, least of all with the
        // registry stopped: progress is dropped and the run goes on.
        let _ = writeln!(io::stderr().lock(), "{line}");
    }

    /// An informational line on stderr.
    pub fn info(&self, msg: impl Display) {
        self.err_line(msg);
    }

    /// A success line on stderr (green).
    pub fn success(&self, msg: impl Display) {
        self.err_line(self.paint(Style::new().green(), msg));
    }

    /// A warning on stderr.
    pub fn warn(&self, msg: impl Display) {
        let p = self.paint(Style::new().yellow().bold(), "warning:");
        self.err_line(format!("{p} {msg}"));
    }

    /// An error on stderr.
    pub fn error(&self, msg: impl Display) {
        let p = self.paint(Style::new().red().bold(), "error:");
        self.err_line(format!("{p} {msg}"));
    }

    /// Problems found while reading, with absolute paths.
    pub fn problems(&self, v2: &Path, problems: &[Problem]) {
        for p in problems {
            self.warn(format!("{}: {}", v2.join(&p.path).display(), p.message));
        }
    }

    fn step_line(&self, step: &Step, past: bool) -> String {
        let (now, then) = step.action.verbs();
        let verb = if past { then } else { now };
        let target = step.target();
        let path = step
            .path
            .as_ref()
            .map(|p| format!("  [{}]", p.display()))
            .unwrap_or_default();
        if target.is_empty() {
            format!("{verb}  ({})", step.reason)
        } else {
            format!("{verb} {target}  ({}){path}", step.reason)
        }
    }

    /// Prints a plan for a dry run or before confirmation (stderr, or JSON on stdout).
    pub fn plan(&self, plan: &Plan, v2: &Path, header: &str) {
        if self.json {
            self.json_value(plan);
            return;
        }
        self.info(self.paint(Style::new().bold(), header));
        for (i, s) in plan.steps.iter().enumerate() {
            self.info(format!("{:>3}. {}", i + 1, self.step_line(s, false)));
        }
        self.notes(plan, v2);
    }

    /// What the plan keeps although the selection touched it, and what could not be read.
    pub fn notes(&self, plan: &Plan, v2: &Path) {
        for k in &plan.kept {
            self.info(format!("     keep {k}"));
        }
        if let Some(f) = plan.freed {
            self.info(format!(
                "     garbage collection will free {} ({})",
                match f.blobs {
                    1 => "1 blob".to_string(),
                    n => format!("{n} blobs"),
                },
                human_bytes(f.bytes)
            ));
        }
        self.problems(v2, &plan.problems);
    }

    /// Prints one executed step in the past tense.
    pub fn outcome(&self, o: &Outcome) {
        if self.json {
            return;
        }
        let line = self.step_line(&o.step, true);
        match &o.result {
            // Nothing to repair: not worth a line per repository.
            StepResult::Done(detail)
                if detail.is_empty() && o.step.action == Action::RelinkLayers => {}
            StepResult::Done(detail) if detail.is_empty() => self.info(line),
            StepResult::Done(detail) => self.info(format!("{}: {detail}", o.step.action.verbs().1)),
            StepResult::AlreadyGone => {
                self.info(format!("{}: already gone", self.step_line(&o.step, false)))
            }
            StepResult::Skipped(why) => {
                self.warn(format!("skipped {}: {why}", o.step.action.verbs().0))
            }
            StepResult::Failed(why) => {
                self.error(format!("{} failed: {why}", o.step.action.verbs().0))
            }
        }
        if o.step.action == Action::GarbageCollect
            && let Some(text) = &o.gc_output
        {
            let lines: Vec<&str> = text.lines().collect();
            let show: &[&str] = if self.verbose || matches!(o.result, StepResult::Failed(_)) {
                &lines
            } else {
                &[]
            };
            for l in show {
                self.info(format!("    | {l}"));
            }
        }
    }

    /// The closing summary.
    pub fn summary(&self, report: &Report) {
        if self.json {
            self.json_value(report);
            return;
        }
        let failed = report.failed();
        let count = |a: Action| {
            report
                .outcomes
                .iter()
                .filter(|o| {
                    o.step.action == a
                        && matches!(o.result, StepResult::Done(_) | StepResult::AlreadyGone)
                })
                .count()
        };
        let parts = tally(count);
        let what = if parts.is_empty() {
            String::from("nothing deleted")
        } else {
            format!("deleted {}", parts.join(", "))
        };
        let freed = report
            .freed_bytes
            .map(|b| format!("; {} of blob data freed", human_bytes(b)))
            .unwrap_or_default();
        if report.interrupted {
            self.error(format!(
                "interrupted: {what}{freed}; run the same command again to finish"
            ));
        } else if failed > 0 {
            self.error(format!("{failed} step(s) failed: {what}{freed}"));
        } else {
            self.success(format!("done: {what}{freed}"));
        }
    }

    /// Asks a yes/no question on the terminal; `false` on any error.
    pub fn confirm(&self, question: &str) -> bool {
        dialoguer::Confirm::new()
            .with_prompt(question)
            .default(false)
            .interact_on(&console::Term::stderr())
            .unwrap_or(false)
    }
}

/// "1 tag, 3 manifests": how many of each kind of deletion, for the kinds that occur.
pub fn tally(count: impl Fn(Action) -> usize) -> Vec<String> {
    [
        (Action::RemoveRepository, "repository", "repositories"),
        (Action::RemoveTag, "tag", "tags"),
        (Action::RemoveRevision, "manifest", "manifests"),
        (Action::RemoveLayerLink, "layer link", "layer links"),
    ]
    .iter()
    .filter_map(|&(a, one, many)| match count(a) {
        0 => None,
        1 => Some(format!("1 {one}")),
        n => Some(format!("{n} {many}")),
    })
    .collect()
}

/// Bytes as a short human string (KiB, MiB, GiB).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn quiet_on_broken_pipe(e: io::Error) {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
}
