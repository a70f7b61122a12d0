//! The `specter` command line: parse arguments, set up logging, call the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use specter::commands::{admin_addr, certs, check, demo, demo_config, keys, promote};
use specter::{config, reload, Gateway};

#[derive(Parser)]
#[command(
    name = "specter",
    version,
    about = "An API gateway that keeps development, qa and production apart",
    after_long_help = "Environment: SPECTER_CONFIG sets the default --config path; RUST_LOG the log level (default info).\nSignals (run): SIGHUP reloads the config; SIGTERM and SIGINT drain, then exit."
)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve, reloading the config when it changes or on SIGHUP.
    Run {
        /// The config file.
        #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
        config: PathBuf,
    },
    /// Validate the config (certificates included) without serving.
    Check {
        /// The config file.
        #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
        config: PathBuf,
        /// Print each environment's upstreams, hosts, key count and limits.
        #[arg(long)]
        explain: bool,
        /// Warn about keys expiring within this window.
        #[arg(long, default_value = "14d", value_parser = humantime::parse_duration)]
        expiry_warning: Duration,
    },
    /// Three echo upstreams and a gateway in front of them, on loopback.
    Demo {
        /// Gateway port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Serve https with a fresh self-signed certificate for localhost.
        #[arg(long)]
        tls: bool,
        /// Write the demo as a config of your own into this directory (specter.toml,
        /// and keys.txt with the plaintext keys, mode 0600) instead of serving it.
        #[arg(long, value_name = "DIR", conflicts_with = "tls")]
        write_config: Option<PathBuf>,
        /// Start only the three echo backends (on --backend-port and the next two).
        #[arg(long, conflicts_with_all = ["write_config", "tls"])]
        backends_only: bool,
        /// First port of the echo backends for --backends-only and --write-config (0: free ports).
        #[arg(long, default_value_t = 9001)]
        backend_port: u16,
        /// Let --write-config replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Certificates for local TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Mint API keys; add, revoke, rotate and list the keys of a config file.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Lay FROM's rate_limit, policy and timeouts onto TO (never keys, upstreams or
    /// hosts). Prints a diff of the config file; exit 0 when TO already matches, 2 when
    /// there are changes. --apply writes the file atomically, keeping its comments.
    Promote {
        /// The environment whose settings are copied, e.g. qa.
        from: String,
        /// The environment that receives them, e.g. production.
        to: String,
        /// The config file.
        #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
        config: PathBuf,
        /// Write the change (after validating it like `specter check`).
        #[arg(long)]
        apply: bool,
        /// Promote only these groups (rate_limit, policy, timeouts) or keys inside them
        /// (e.g. policy.allow_paths), comma-separated.
        #[arg(long, value_delimiter = ',')]
        only: Vec<promote::Only>,
        /// Let --apply loosen security-relevant settings (response headers set, request
        /// headers removed, allow_ips, deny_paths, hosts, max_body, methods added).
        #[arg(long)]
        allow_removals: bool,
    },
    /// Shell completions on stdout, e.g. `specter completions bash >
    /// /etc/bash_completion.d/specter`.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page (roff) on stdout, e.g. `specter manpage > /usr/share/man/man1/specter.1`.
    Manpage,
    /// The promotable settings of two environments side by side; writes nothing.
    Diff {
        /// The environment shown in the left column.
        a: String,
        /// The environment shown in the right column.
        b: String,
        /// The config file.
        #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Write a self-signed certificate for localhost, 127.0.0.1 and ::1 (key mode 0600).
    Dev {
        /// The directory that receives localhost.pem and localhost.key (created if missing).
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Replace localhost.pem and localhost.key if they already exist.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh key once, and its [[environments.NAME.keys]] block.
    New {
        /// The environment the key belongs to, e.g. qa.
        #[arg(long)]
        env: String,
        /// The key id shown in logs, metrics and to the upstream [default: a generated one].
        #[arg(long)]
        id: Option<String>,
    },
    /// Per-key request counts and last-seen times from a running gateway.
    Usage {
        /// The gateway's admin listener, as host:port or http://host:port [default: the
        /// config's listen.admin, else 127.0.0.1:9901].
        #[arg(long)]
        admin: Option<String>,
        /// The config whose listen.admin is asked when --admin is not given.
        #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
        config: PathBuf,
    },
    /// Read an existing key from stdin (not echoed) and print its TOML block.
    Hash {
        /// Defaults to the environment in a `spk_<env>_...` key.
        #[arg(long)]
        env: Option<String>,
        /// The key id shown in logs, metrics and to the upstream [default: a generated one].
        #[arg(long)]
        id: Option<String>,
    },
    /// Mint a key and add its hashed block to the config (validated, atomic write).
    /// The key is printed once, alone on stdout; everything else goes to stderr.
    Add {
        #[command(flatten)]
        file: KeysFile,
        /// The environment the key belongs to.
        #[arg(long)]
        env: String,
        /// The key's id (default: ENV-N, one more than the highest in use).
        #[arg(long)]
        id: Option<String>,
        /// The key works from this time on: now, +2h, 2026-12-01T00:00:00Z, 2026-12-01.
        #[arg(long, value_parser = keys::when::parse_arg)]
        not_before: Option<SystemTime>,
        /// The key stops working at this time (same forms as --not-before).
        #[arg(long, value_parser = keys::when::parse_arg, conflicts_with = "ttl")]
        not_after: Option<SystemTime>,
        /// The key stops working this long after --not-before (or now), e.g. 90d.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Store an existing key read from stdin (not echoed) instead of minting one;
        /// it is not printed back.
        #[arg(long)]
        from_stdin: bool,
    },
    /// Make a key stop working: set its not_after to now (or --at), with a comment
    /// saying when it was revoked; --remove deletes its block instead.
    Revoke {
        #[command(flatten)]
        file: KeysFile,
        /// The environment the key belongs to.
        #[arg(long)]
        env: String,
        /// The key's id.
        #[arg(long)]
        id: String,
        /// When the key stops working (now, +2h, 2026-12-01T00:00:00Z, 2026-12-01).
        #[arg(long, value_parser = keys::when::parse_arg, conflicts_with = "remove")]
        at: Option<SystemTime>,
        /// Delete the key's block instead of keeping it with a not_after.
        #[arg(long)]
        remove: bool,
    },
    /// Add a new key (id ID.2, ID.3, ...) printed once on stdout, and end the old one
    /// after --overlap; both work until then.
    Rotate {
        #[command(flatten)]
        file: KeysFile,
        /// The environment the key belongs to.
        #[arg(long)]
        env: String,
        /// The key being replaced.
        #[arg(long)]
        id: String,
        /// How long the old key keeps working beside the new one.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        overlap: Duration,
        /// The new key's id (default: ID.2, then ID.3, ...).
        #[arg(long)]
        new_id: Option<String>,
        /// The new key stops working this long from now, e.g. 90d.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// The config's keys: id, environment, not_before, not_after and state (active,
    /// staged, expiring, expired, revoked); with usage from a running gateway.
    List {
        /// The config file whose keys are listed.
        #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
        config: PathBuf,
        /// Only this environment's keys.
        #[arg(long)]
        env: Option<String>,
        /// The gateway's admin listener, as host:port or http://host:port (default:
        /// listen.admin of the config, if it answers).
        #[arg(long, value_parser = admin_addr::parse)]
        admin: Option<String>,
        /// Also print each key's SHA-256.
        #[arg(long)]
        show_hashes: bool,
        /// Keys ending within this window are listed as expiring.
        #[arg(long, default_value = "14d", value_parser = humantime::parse_duration)]
        expiry_warning: Duration,
    },
}

/// The config file a writing `keys` command edits.
#[derive(clap::Args)]
struct KeysFile {
    /// The config file to edit (a running gateway watching it reloads it).
    #[arg(long, env = "SPECTER_CONFIG", default_value = "config/specter.toml")]
    config: PathBuf,
    /// Print the change as a unified diff and write nothing.
    #[arg(long)]
    dry_run: bool,
}

impl KeysFile {
    fn options(&self) -> keys::EditOptions<'_> {
        keys::EditOptions {
            config: &self.config,
            dry_run: self.dry_run,
            colour: std::io::stdout().is_terminal(),
            now: SystemTime::now(),
        }
    }
}

fn main() -> ExitCode {
    let cli = parse_args();
    let _log_guard = init_logging(cli.log_format);
    match cli.command {
        Command::Check {
            config,
            explain,
            expiry_warning,
        } => {
            let code = check::run(
                &config,
                explain,
                expiry_warning,
                &mut std::io::stdout(),
                &mut std::io::stderr(),
            );
            ExitCode::from(code as u8)
        }
        Command::Keys { command } => keys_command(command),
        Command::Promote {
            from,
            to,
            config,
            apply,
            only,
            allow_removals,
        } => promote_command(&promote::PromoteRequest {
            config: &config,
            from: &from,
            to: &to,
            only: &only,
            apply,
            allow_removals,
            colour: std::io::stdout().is_terminal(),
        }),
        Command::Diff { a, b, config } => {
            match promote::run_diff(&config, &a, &b, &mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("specter diff: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => runtime().block_on(run(config, cli.log_format)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "specter",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Manpage => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("specter manpage: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            write_config: Some(dir),
            port,
            backend_port,
            force,
            ..
        } => match demo_config::write(&dir, port, backend_port, force) {
            Ok(note) => {
                print!("{note}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("specter demo: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            backends_only: true,
            backend_port,
            ..
        } => runtime().block_on(run_backends(backend_port)),
        Command::Demo { port, tls, .. } => runtime().block_on(run_demo(port, tls)),
        Command::Certs {
            command: CertsCommand::Dev { out, force },
        } => match certs::dev(&out, force) {
            Ok((cert, key)) => {
                println!("wrote {} and {} (mode 0600)", cert.display(), key.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("specter certs: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn keys_command(command: KeysCommand) -> ExitCode {
    let result: Result<String, Box<dyn std::error::Error>> = match command {
        KeysCommand::New { env, id } => keys::new(&env, id.as_deref()).map_err(Into::into),
        KeysCommand::Usage { admin, config } => admin_addr::resolve(admin.as_deref(), &config)
            .map_err(Into::into)
            .and_then(|addr| runtime().block_on(keys::usage(&addr)).map_err(Into::into)),
        KeysCommand::Hash { env, id } => keys::read_secret_line()
            .and_then(|line| keys::hash(env.as_deref(), id.as_deref(), &line))
            .map_err(Into::into),
        edit => return keys_edit_command(edit),
    };
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("specter keys: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The keys subcommands that read or edit the config file: they print on stdout and
/// stderr themselves (the plaintext key alone on stdout).
fn keys_edit_command(command: KeysCommand) -> ExitCode {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let result = match command {
        KeysCommand::Add {
            file,
            env,
            id,
            not_before,
            not_after,
            ttl,
            from_stdin,
        } => {
            let key = if from_stdin {
                keys::read_secret_line().map(Some)
            } else {
                Ok(None)
            };
            key.and_then(|key| {
                let request = keys::AddRequest {
                    env: &env,
                    id: id.as_deref(),
                    not_before,
                    not_after,
                    ttl,
                    key,
                };
                keys::add(&file.options(), &request, &mut out, &mut err)
            })
        }
        KeysCommand::Revoke {
            file,
            env,
            id,
            at,
            remove,
        } => keys::revoke(&file.options(), &env, &id, at, remove, &mut out, &mut err),
        KeysCommand::Rotate {
            file,
            env,
            id,
            overlap,
            new_id,
            ttl,
        } => {
            let request = keys::RotateRequest {
                env: &env,
                id: &id,
                overlap,
                new_id: new_id.as_deref(),
                ttl,
            };
            keys::rotate(&file.options(), &request, &mut out, &mut err)
        }
        KeysCommand::List {
            config,
            env,
            admin,
            show_hashes,
            expiry_warning,
        } => {
            let request = keys::ListRequest {
                config: &config,
                env: env.as_deref(),
                admin: admin.as_deref(),
                show_hashes,
                expiry_warning,
                now: SystemTime::now(),
            };
            runtime().block_on(keys::list(&request, &mut out, &mut err))
        }
        KeysCommand::New { .. } | KeysCommand::Usage { .. } | KeysCommand::Hash { .. } => {
            unreachable!("handled by keys_command")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("specter keys: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Usage errors exit 1 (not clap's 2): `specter promote` reserves 2 for "there are
/// changes", which a script must not read into a mistyped option.
fn parse_args() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 })
    })
}

fn promote_command(request: &promote::PromoteRequest<'_>) -> ExitCode {
    match promote::run(request, &mut std::io::stdout()) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("specter promote: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One worker per core by default (`TOKIO_WORKER_THREADS` overrides). With exactly one
/// worker the single-threaded scheduler is used: no work-stealing bookkeeping and no
/// cross-thread wake-ups for a process pinned to one core.
fn runtime() -> tokio::runtime::Runtime {
    let one = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|v| v.trim() == "1");
    let mut builder = if one {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

async fn run(path: PathBuf, format: LogFormat) -> ExitCode {
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(errors) => {
            match format {
                LogFormat::Pretty => eprintln!("{errors}"),
                // One JSON record per problem, so a log pipeline never sees bare text.
                LogFormat::Json => errors.0.iter().for_each(|e| {
                    let file = e.file.display().to_string();
                    tracing::error!(file, line = e.line, col = e.col, "{e}");
                }),
            }
            return ExitCode::FAILURE;
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let gateway = match Gateway::start(loaded.config).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!("cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = reload::watch(gateway.shared().clone(), path.clone()) {
        tracing::error!(
            "cannot watch {} for changes (reload with SIGHUP still works after a restart): {e}",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let state = gateway.shared().state.load();
    tracing::info!(version = state.version, sha256 = %state.config.source.sha256, "specter running");
    drop(state);
    wait_for_stop().await;
    gateway.shutdown().await;
    ExitCode::SUCCESS
}

async fn run_demo(port: u16, tls: bool) -> ExitCode {
    let gateway = match demo::start(port, tls).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("specter demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", demo::banner(&gateway));
    wait_for_stop().await;
    gateway.shutdown().await;
    ExitCode::SUCCESS
}

async fn run_backends(first_port: u16) -> ExitCode {
    match demo_config::start_backends(first_port).await {
        Ok(started) => {
            for (env, addr) in started {
                println!("{env:<12} echo backend on http://{addr}");
            }
            println!("Ctrl-C stops them.");
        }
        Err(e) => {
            eprintln!("specter demo: starting the echo backends: {e}");
            return ExitCode::FAILURE;
        }
    }
    wait_for_stop().await;
    ExitCode::SUCCESS
}

async fn wait_for_stop() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
}

/// Libraries whose records a client can trigger (rustls warns about every ClientHello
/// with an IP address as its server name; hyper, h2 and tokio describe every broken
/// connection). They log at `error` only, unless `RUST_LOG` names them or asks for
/// `debug`/`trace` overall: what a client did is counted on `/metrics` instead. rustls
/// keeps its `logging` feature so that `RUST_LOG=rustls=debug` can still explain an
/// interop problem; a filtered record costs a directive match, never formatting.
const QUIET_LIBRARIES: &[&str] = &[
    "rustls",
    "tokio_rustls",
    "hyper",
    "hyper_util",
    "h2",
    "tokio",
    "mio",
    "notify",
    "redis",
];

/// `info`, [`QUIET_LIBRARIES`] at `error`, then `RUST_LOG`'s directives on top (a
/// directive for the same target replaces the default). A bare `info`, `warn` or
/// `error` (the usual production setting) keeps the libraries quiet; a bare `debug` or
/// `trace` is a debugging session and shows everything.
fn log_filter(rust_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    let rust_log = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let debugging = rust_log.is_some_and(|directives| {
        directives.split(',').any(|d| {
            let d = d.trim();
            d.eq_ignore_ascii_case("debug") || d.eq_ignore_ascii_case("trace")
        })
    });
    let mut defaults = String::from("info");
    if !debugging {
        for library in QUIET_LIBRARIES {
            defaults = defaults + "," + library + "=error";
        }
    }
    let Some(extra) = rust_log else {
        return tracing_subscriber::EnvFilter::new(defaults);
    };
    tracing_subscriber::EnvFilter::try_new(format!("{defaults},{extra}")).unwrap_or_else(|e| {
        eprintln!("specter: RUST_LOG={extra:?} is not a log filter ({e}); using the default");
        tracing_subscriber::EnvFilter::new(defaults)
    })
}

/// The log's guards, dropped in this order: pending access lines are handed to the
/// writer thread, then that thread writes out what it was given.
struct LogGuards {
    _access: Option<specter::proxy::access::FlushOnDrop>,
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

fn init_logging(format: LogFormat) -> LogGuards {
    // Buffered: the writer thread flushes once it has drained every queued line, so a
    // busy gateway writes its access log in batches, not a system call per line.
    let stderr = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    // The queue is counted in messages. Under JSON a message is a line or a batch of
    // access lines (up to 32 KiB): 1,024 of them bound it to about 32 MiB when the
    // log's reader stalls (tracing-appender's default, 128,000, would be 4 GiB). The
    // pretty format sends lines one by one and keeps the default. Beyond the bound,
    // lines are dropped, not waited for.
    let queue = match format {
        LogFormat::Json => 1024,
        LogFormat::Pretty => tracing_appender::non_blocking::DEFAULT_BUFFERED_LINES_LIMIT,
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(queue)
        .lossy(true)
        .finish(stderr);
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer.clone());
    let access = match format {
        LogFormat::Pretty => {
            builder.init();
            None
        }
        LogFormat::Json => {
            builder.json().flatten_event(true).init();
            match specter::proxy::access::write_json_to(writer.clone()) {
                Ok(flush) => Some(flush),
                Err(e) => {
                    // Lines then go through `tracing`, one at a time, as in pretty mode.
                    tracing::warn!(error = %e, "the access log's batching thread did not start");
                    None
                }
            }
        }
    };
    LogGuards {
        _access: access,
        _writer: guard,
    }
}
