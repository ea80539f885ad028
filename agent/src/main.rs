fn main() -> std::process::ExitCode {
    spotable_agent::cli::main()
}
