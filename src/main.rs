//! The `walhook` binary: parses the command line, sets up logging, runs a subcommand,
//! and turns how it ended into the exit status ([`Exit`]: 0, 1, or 78 for an invalid
//! config).

use std::process::ExitCode;

use clap::Parser;
use walhook::cli::{Cli, Command, Exit, check, tail};

// Every delivery allocates a few dozen small objects on whichever worker thread runs
// it; glibc's allocator spent a quarter of the daemon's CPU on that, much of it
// contending for arena locks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Arenas commit memory as it is used, not ahead, and freed memory goes back to the
/// system 10 ms after it was freed. With mimalloc's default of committing arenas
/// eagerly the daemon held about twice its working set: ingesting a 1M-change backlog,
/// peak RSS 94 -> 57 MiB at the same speed. The purge delay is set explicitly: the
/// mimalloc 3 that libmimalloc-sys builds defaults to 1000 ms (mimalloc 2 had 10), and
/// with that ingesting and delivering a 1M-change backlog (`bench/ingest-loop run`)
/// peaked at 71-78 MiB instead of 56-58, for 2-4 % less CPU per event (dispatch alone
/// 28.6 against 29.8 µs). Purging at once (delay 0) saved another 2-3 MiB but cost 8 %
/// of the CPU per delivered event (an madvise and its TLB shootdown, then page faults,
/// for memory in use again a moment later). `MIMALLOC_PURGE_DELAY` and
/// `MIMALLOC_ARENA_EAGER_COMMIT` in the environment still win.
///
/// It runs as an ELF constructor, before the Rust runtime's first allocation: mimalloc
/// reserves its first arena then, and the eager-commit option only counts before that.
#[cfg(target_os = "linux")]
extern "C" fn tune_allocator() {
    // Their numbers in `mi_option_t` of the mimalloc 3 that libmimalloc-sys builds (its
    // Rust bindings do not name them).
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    for (option, env, value) in [
        (ARENA_EAGER_COMMIT, c"MIMALLOC_ARENA_EAGER_COMMIT", 0),
        (PURGE_DELAY, c"MIMALLOC_PURGE_DELAY", 10),
    ] {
        // SAFETY: getenv reads the environment the process started with (nothing sets
        // it this early); mi_option_set sets a process-wide option, and no other thread
        // exists yet.
        unsafe {
            if libc::getenv(env.as_ptr()).is_null() {
                libmimalloc_sys::mi_option_set(option, value);
            }
        }
    }
}

#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static TUNE_ALLOCATOR: extern "C" fn() = tune_allocator;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that only print something the binary knows need no runtime nor logging.
    match &cli.command {
        Command::Completions(args) => return walhook::cli::completions::run(args).into(),
        Command::Man(args) => return walhook::cli::man::run(args).into(),
        Command::Keys(args) => return walhook::cli::keys::run(args).into(),
        _ => {}
    }
    // The daemon logs as its config says; other commands log warnings to stderr.
    let mut run_config = None;
    if let Command::Run(args) = &cli.command {
        match args.config.load() {
            Ok(config) => {
                init_logging(
                    &config.log.level,
                    config.log.format == walhook::config::LogFormat::Json,
                );
                run_config = Some(config);
            }
            Err(errors) => {
                eprintln!("error: {errors}");
                return Exit::Config.into();
            }
        }
    } else if let Command::Demo(_) = &cli.command {
        // The demo prints what happens itself; only problems are logged.
        init_logging("warn", false);
    } else {
        init_logging("info", false);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let config = run_config.expect("loaded above");
                walhook::cli::run::run(config, args.config.path)
                    .await
                    .map(|()| Exit::Success)
            }
            Command::Setup(args) => walhook::cli::setup::run(args).await.map(|()| Exit::Success),
            Command::Tail(args) => tail::run(args).await.map(|()| Exit::Success),
            Command::Check(args) => check::run(args).await,
            Command::Deliveries(args) => walhook::cli::deliveries::run(args)
                .await
                .map(|()| Exit::Success),
            Command::Subscriptions(args) => walhook::cli::subscriptions::run(args)
                .await
                .map(|()| Exit::Success),
            Command::Backfill(args) => walhook::cli::backfill::run(args)
                .await
                .map(Exit::from_success),
            Command::Demo(args) => walhook::cli::demo::run(args).await.map(Exit::from_success),
            Command::Config(args) => walhook::cli::config_schema::run(args).map(|()| Exit::Success),
            Command::Completions(_) | Command::Man(_) | Command::Keys(_) => Ok(Exit::Success),
        }
    });
    match result {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!("error: {}", walhook::cli::error_chain(&err));
            Exit::for_error(&err).into()
        }
    }
}

/// Logs go to stderr; `WALHOOK_LOG` (an EnvFilter) overrides the level. tokio-postgres
/// stays at `info` unless named: its debug lines carry statement parameters (row data).
fn init_logging(level: &str, json: bool) {
    let directives = std::env::var("WALHOOK_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| level.to_owned());
    let filter = if directives.contains("tokio_postgres") {
        tracing_subscriber::EnvFilter::new(directives)
    } else {
        tracing_subscriber::EnvFilter::new(format!("{directives},tokio_postgres=info"))
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
