//! Logging of every CORA binary: `tracing` to stderr, filtered by one environment variable.

/// The one variable that filters logs of `cora`, `cora-driver` and `cora-snapshotter`, in
/// `tracing_subscriber`'s `EnvFilter` syntax (`debug`, `lazy=trace,warn`, ...).
pub const LOG_ENV: &str = "CORA_LOG";

/// How a binary logs when [`LOG_ENV`] is unset or invalid.
pub struct Logging {
    /// Filter used without a valid [`LOG_ENV`] (`warn` for tools, `info` for daemons).
    pub default_filter: &'static str,
    /// Print the source file and line of each event.
    pub report_caller: bool,
}

/// Installs the global subscriber (once; later calls do nothing).
pub fn init(opts: Logging) {
    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(opts.default_filter));
    let _ = tracing_subscriber::fmt()
        // Colour only on a terminal: logs usually go to files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_file(opts.report_caller)
        .with_line_number(opts.report_caller)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `init` with the given default filter and no caller locations.
pub fn init_default(default_filter: &'static str) {
    init(Logging {
        default_filter,
        report_caller: false,
    });
}
