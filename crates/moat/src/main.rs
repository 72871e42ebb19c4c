//! The `moat` command line. Thin: the work lives in the library crates.

mod demo;

use clap::{Parser, Subcommand};

/// moat: L3 DDoS protection and GRE transit with an XDP data plane.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a throw-away namespace topology, carry traffic through moat's
    /// data plane and a customer GRE tunnel, and print what happened.
    Demo {
        /// Requests to send through the tunnel.
        #[arg(long, default_value_t = 200)]
        requests: u32,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo { requests } => demo::run(requests),
    }
}
