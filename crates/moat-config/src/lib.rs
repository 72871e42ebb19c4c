//! moat's configuration file (version 1): YAML in, a validated [`Config`]
//! out, or every problem found as a [`Diagnostic`] with its line and column.
//!
//! Two stages:
//! 1. Parsing (`raw`): the YAML is read into serde structs that mirror the
//!    file. Unknown keys, wrong types, missing required keys and YAML syntax
//!    errors stop here, one error at the first such problem.
//! 2. Validation (`validate`): every rule of the contract is checked and
//!    *all* violations are reported at once, each positioned at the
//!    offending value and naming the objects involved (customers, tunnels,
//!    prefixes). Errors are sorted by position. Capacity limits of the data
//!    plane's tables are checked here too, so an oversized configuration is
//!    rejected before anything is applied.
//!
//! Conventions chosen where the contract is silent:
//! - **Expressions** (mitigation and firewall rules) are parsed and checked
//!   by [`expr`]: syntax, fields, operators and values for each field's
//!   type, and every `$list` defined; an error points at the column inside
//!   the expression. The data plane enforces every rule.
//! - **`interface_address`** is an IPv4 /31 or /30 written as its network
//!   (host bits clear). Ours is the first address and the customer's the
//!   other: in a /31 the lower and the upper address; in a /30 the first
//!   host (network + 1) and the second (network + 2). Our side becomes a
//!   node address of the data plane.
//! - A **unicast** IPv4 address is one that is not 0.0.0.0/8, loopback
//!   (127.0.0.0/8), multicast (224.0.0.0/4), reserved (240.0.0.0/4) or the
//!   broadcast address.
//! - Prefixes of one customer may nest (a /24 and a /26 inside it); the
//!   same prefix twice in one customer is an error. Prefixes of different
//!   customers may neither be equal nor overlap.
//! - The summary line always uses plural nouns (`1 customers`) so that
//!   scripts can match it with one pattern.

/// The rule expression language (its own crate, shared with the data plane).
pub use moat_expr as expr;
mod model;
mod raw;
mod spec;
mod validate;

use std::fmt;
use std::path::Path;

pub use model::*;

/// A position in the file, both 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a file: `FILE:LINE:COL: error: MESSAGE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: Pos,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.pos.line, self.pos.col, severity, self.message
        )
    }
}

/// A valid configuration and the warnings found on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<Diagnostic>,
}

/// Reads and validates the file at `path`. A file that cannot be read is
/// one error at 1:1. Diagnostics name the file as `path` is written.
pub fn load(path: &Path) -> Result<Loaded, Vec<Diagnostic>> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(e) => Err(vec![Diagnostic {
            file,
            pos: Pos { line: 1, col: 1 },
            severity: Severity::Error,
            message: format!("cannot read the file: {e}"),
        }]),
    }
}

/// Parses and validates `text`; `file` is the name used in diagnostics.
/// Errors come sorted by position.
pub fn parse(text: &str, file: &str) -> Result<Loaded, Vec<Diagnostic>> {
    validate::parse(text, file)
}
