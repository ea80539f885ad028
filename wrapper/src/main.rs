fn main() -> std::process::ExitCode {
    spotable_wrapper::cli::main()
}
