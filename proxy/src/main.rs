//! `lb-proxy`: parse the command line, run, print any error chain once, exit non-zero on error.

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = lb_proxy::cli::parse();
    match cli.invocation().and_then(lb_proxy::commands::execute) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
