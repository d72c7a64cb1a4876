//! `cargo xtask`: flatwire's development tasks.

mod bench;
mod crds;
mod demo;
mod fuzz;
mod table;
mod test;
mod tools;

use clap::Parser;

/// flatwire development tasks.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about)]
enum Task {
    /// Install and cache every real tool the tests need, then print tool, version and path.
    Tools,
    /// Start a local planet of real agents in network namespaces (root, controller, three
    /// hosts, two behind NAT), measure it and print a summary; needs root.
    Demo(demo::Args),
    /// Run formatting and lint checks, the whole test suite, and check nothing was left behind.
    Test(test::Args),
    /// Run each cargo-fuzz target for a bounded time and print target/runs/result (not in CI).
    Fuzz(fuzz::Args),
    /// Regenerate crds/*.yaml from the operator's Rust types (`flatwire-operator crds`).
    Crds,
    /// Measure TCP throughput, RTT, CPU per GB and memory of flatwire vs underlay and VXLAN,
    /// and pod ADD/DEL latency through the real CNI plugin.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Task::parse() {
        Task::Tools => tools::run(),
        Task::Demo(args) => demo::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
        Task::Crds => crds::run(),
        Task::Bench(args) => bench::run(&args),
    }
}
