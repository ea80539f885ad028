//! `spotable-proxy`: see the crate docs and `--help`.

fn main() -> std::process::ExitCode {
    spotable_proxy::cli::main()
}
