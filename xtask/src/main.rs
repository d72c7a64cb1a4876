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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_operator_sizes_out_of_range_are_refused_naming_the_flag() {
        for (flag, value) in [
            ("--operator-pods", "0"),
            ("--operator-pods", "3001"),
            ("--operator-members", "0"),
            ("--operator-edits", "0"),
            ("--operator-pods", "many"),
        ] {
            let err = Task::try_parse_from(["cargo xtask", "bench", flag, value])
                .expect_err("an out-of-range size must be refused");
            assert!(err.to_string().contains(flag), "{flag} {value}: {err}");
        }
        let ok = Task::try_parse_from(["cargo xtask", "bench", "--operator-pods", "3000"]);
        assert!(ok.is_ok(), "{ok:?}");
        let both = Task::try_parse_from(["cargo xtask", "bench", "--only-pods", "--only-operator"]);
        assert!(
            both.is_err(),
            "--only-pods and --only-operator exclude each other"
        );
        for other in ["--only-pods", "--only-operator"] {
            let both = Task::try_parse_from(["cargo xtask", "bench", "--only-link", other]);
            assert!(both.is_err(), "--only-link and {other} exclude each other");
        }
    }
}
