//! `headroom`: the agent's command line. Errors map to exit codes: 0 success, 1 a job or
//! the server failed, 2 bad input (a plan that does not parse or validate, a bad flag).

fn main() -> std::process::ExitCode {
    agent::cli::main()
}
