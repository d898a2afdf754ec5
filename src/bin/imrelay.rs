//! The imrelay binary: parses flags, raises the fd limit, runs the server until SIGINT or
//! SIGTERM, then shuts down cleanly.
//!
//! Run: `cargo run --release --bin imrelay -- --listen 127.0.0.1:7700`
//!
//! Every setting is a flag and a key of the `--config` TOML file (the same name, default
//! and help, from one struct, [`Args`]); flags win over the file, and `--print-config`
//! prints the effective settings as such a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::LazyLock;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use log::{error, info, warn};
use serde::{Deserialize, Serialize};

use imrelay::auth::{parse_ttl, read_secret_file, Algorithm, Mint, RoomGrant, Verifier};
use imrelay::proto::{UserId, DEFAULT_MAX_FRAME};
use imrelay::relay::{AuthConfig, Config, DEFAULT_TOKEN_NOTICE};
use imrelay::server::{raise_fd_limit, Server, DEFAULT_SEND_BUFFER, RESERVED_FDS};

/// A fast single-threaded IM relay. Protocol: protocol.md.
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Read settings from this TOML file: its keys are the long flags' names
    /// (`max-frame = 65536`, `listen = "127.0.0.1:7700"`, durations in seconds); a flag
    /// given on the command line wins over the file. An unknown key is an error.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective settings (defaults, then --config, then flags) as TOML, in the
    /// form --config reads, and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    args: Args,
}

/// The relay's settings: every flag's name, help and default is defined here once, and a
/// --config file has the same keys (kebab-case, as the long flags) and the same defaults.
/// The limits' defaults are the library's own ([`Config::default`]).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
struct Args {
    /// Login tokens: `jwt` checks a signed token at every LOGIN (protocol.md section 16);
    /// `off` accepts any LOGIN (development: only on a loopback address unless
    /// --insecure-no-auth). Default: `jwt` when a key file is given, else `off`.
    #[arg(long, value_enum)]
    auth: Option<AuthMode>,
    /// HS256: a file holding the shared secret (at least 32 bytes; one trailing newline is
    /// ignored).
    #[arg(long, conflicts_with = "auth_public_key_file")]
    auth_secret_file: Option<std::path::PathBuf>,
    /// RS256 or ES256 (--auth-algorithm): the token issuer's public key, PEM.
    #[arg(long)]
    auth_public_key_file: Option<std::path::PathBuf>,
    /// The algorithm of the tokens: HS256 with --auth-secret-file (the default there),
    /// RS256 (the default) or ES256 with --auth-public-key-file.
    #[arg(long)]
    #[serde(with = "as_string")]
    auth_algorithm: Option<Algorithm>,
    /// Seconds before a token expires that the relay sends TOKEN_EXPIRING.
    #[arg(long, default_value_t = DEFAULT_TOKEN_NOTICE.as_secs())]
    token_notice: u64,
    /// Allow --auth off on an address other than loopback: anyone who can connect can log
    /// in as anyone.
    #[arg(long)]
    insecure_no_auth: bool,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Serve GET /metrics (Prometheus text), /healthz and /readyz over HTTP on this
    /// address (off unless given; not the --listen address). Anyone who can reach it reads
    /// the counters: keep it on loopback or a private network.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Cluster mode: act as one relay with every node that shares this Redis (Valkey
    /// works too), given as redis://HOST:PORT (protocol.md, section 18). Off unless given.
    #[arg(long)]
    cluster: Option<String>,
    /// This node's name in the cluster, for logs and Redis's CLIENT LIST. Default: the
    /// host name and process id.
    #[arg(long)]
    node_name: Option<String>,
    /// Largest frame accepted, header included, in bytes (at most 1 MiB).
    #[arg(long, default_value_t = DEFAULT_MAX_FRAME)]
    max_frame: u32,
    /// Most connections at once. Default: what the fd limit allows.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Most connections one user may be logged in on.
    #[arg(long, default_value_t = DEFAULTS.max_devices_per_user)]
    max_devices: usize,
    /// Per-connection output queue cap in bytes.
    #[arg(long, default_value_t = DEFAULTS.out_cap)]
    out_cap: usize,
    /// Seconds a new connection has to log in.
    #[arg(long, default_value_t = DEFAULTS.login_timeout.as_secs_f64())]
    login_timeout: f64,
    /// Seconds a text-mode connection (a person typing LOGIN by hand) has to log in.
    #[arg(long, default_value_t = DEFAULTS.text_login_timeout.as_secs_f64())]
    text_login_timeout: f64,
    /// Seconds of client silence before the relay sends PING.
    #[arg(long, default_value_t = DEFAULTS.ping_interval.as_secs_f64())]
    ping_interval: f64,
    /// Seconds of client silence before the relay closes the connection.
    #[arg(long, default_value_t = DEFAULTS.idle_timeout.as_secs_f64())]
    idle_timeout: f64,
    /// Shortest heartbeat interval, in seconds, announced in LOGIN_OK to clients that ask
    /// for heartbeat bounds: they do not PING more often than this. At most the ping
    /// interval. Default: 10, or the ping interval when that is shorter.
    #[arg(long)]
    heartbeat_min: Option<f64>,
    /// Most rooms one connection may be in.
    #[arg(long, default_value_t = DEFAULTS.max_rooms_per_connection)]
    max_rooms: usize,
    /// Most connections one room may hold.
    #[arg(long, default_value_t = DEFAULTS.max_members_per_room)]
    max_room_members: usize,
    /// ROOM_SEND/BROADCAST frames per second per connection (0 = unlimited).
    #[arg(long, default_value_t = DEFAULTS.room_send_rate)]
    room_rate: u32,
    /// ROOM_SEND/BROADCAST burst allowed before the rate applies.
    #[arg(long, default_value_t = DEFAULTS.room_send_burst)]
    room_burst: u32,
    /// A user id allowed to BROADCAST to everyone (repeat for several).
    #[arg(long)]
    admin: Vec<u64>,
    /// DEDUP message ids remembered per sender (protocol.md, section 13).
    #[arg(long, default_value_t = DEFAULTS.dedup_window)]
    dedup_window: usize,
    /// Seconds a sender's DEDUP ids are remembered after its last DEDUP SEND.
    #[arg(long, default_value_t = DEFAULTS.dedup_ttl.as_secs_f64())]
    dedup_ttl: f64,
    /// DEDUP message ids remembered over all senders.
    #[arg(long, default_value_t = DEFAULTS.dedup_max_entries)]
    dedup_max_entries: usize,
    /// Where stored messages are kept: a data directory (created on first start), or
    /// `memory` (lost when the relay stops; ACKs do not wait for a disk).
    #[arg(long, default_value = "imrelay-data")]
    store: String,
    /// Stored messages one user's inbox may hold.
    #[arg(long, default_value_t = DEFAULTS.inbox_max_messages)]
    inbox_max_messages: usize,
    /// Stored payload bytes one user's inbox may hold.
    #[arg(long, default_value_t = DEFAULTS.inbox_max_bytes)]
    inbox_max_bytes: usize,
    /// Seconds a stored message waits for its recipient.
    #[arg(long, default_value_t = DEFAULTS.inbox_ttl.as_secs_f64())]
    inbox_ttl: f64,
    /// Devices of one user whose stored-delivery cursors are kept (past it the least
    /// recently seen is forgotten).
    #[arg(long, default_value_t = DEFAULTS.inbox_max_devices)]
    inbox_max_devices: usize,
    /// Seconds a device may go without syncing before its cursor is forgotten (it then no
    /// longer holds messages back).
    #[arg(long, default_value_t = DEFAULTS.device_retention.as_secs_f64())]
    device_retention: f64,
    /// Users with an inbox.
    #[arg(long, default_value_t = DEFAULTS.store_max_users)]
    store_max_users: usize,
    /// Stored payload bytes over all inboxes.
    #[arg(long, default_value_t = DEFAULTS.store_max_bytes)]
    store_max_bytes: usize,
    /// Compact the store's log once it passes this many bytes (and twice the live data).
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    store_compact_at: u64,
    /// Start even if the store's log is damaged before its end: skip the damaged records,
    /// keep every valid one, rewrite the log and log what was lost.
    #[arg(long)]
    store_repair: bool,
    /// Seconds between metrics log lines (0 = none); a line that would say what the last
    /// one said is not logged, so an idle relay stays quiet.
    #[arg(long, default_value_t = 60)]
    stats_interval: u64,
    /// Spin on the poller instead of sleeping: lowest latency, one core always busy.
    #[arg(long)]
    busy_poll: bool,
    /// Serve the H5 live-room demo page on a plain HTTP GET of / (WebSocket is always on).
    #[arg(long)]
    demo: bool,
    /// Bytes all connections may hold together (output queues and partial input).
    /// Default: half the machine's physical memory.
    #[arg(long)]
    max_memory: Option<usize>,
    /// Seconds a started frame, text line, HTTP head or WebSocket message has to arrive
    /// whole, however slowly its bytes come.
    #[arg(long, default_value_t = DEFAULTS.frame_timeout.as_secs_f64())]
    frame_timeout: f64,
    /// Most connections open at once from one IP address (0 = no limit).
    #[arg(long, default_value_t = DEFAULTS.max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Apply --max-connections-per-ip to loopback addresses too.
    #[arg(long)]
    limit_loopback: bool,
    /// ROOM_SEND frames per second into one room from all its members (0 = unlimited).
    #[arg(long, default_value_t = DEFAULTS.room_total_rate)]
    room_total_rate: u32,
    /// Kernel send buffer (SO_SNDBUF) of each client socket in bytes; 0 = the kernel's
    /// autotuning (which lets a client that does not read hold megabytes).
    #[arg(long, default_value_t = DEFAULT_SEND_BUFFER)]
    socket_send_buffer: usize,
    /// ROOM_SEND frames one room takes at once before its total rate applies.
    #[arg(long, default_value_t = DEFAULTS.room_total_burst)]
    room_total_burst: u32,
    /// TLS on the listening port, beside plaintext: the server's certificate chain, PEM,
    /// leaf first (with --tls-key). Clients that start with a TLS handshake get TLS,
    /// WebSocket (wss://) included.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert, PEM (PKCS#8, PKCS#1 RSA or SEC1 EC; may be the same
    /// file).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Mutual TLS: every TLS client must present a certificate that chains to a CA in this
    /// PEM file.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Refuse plaintext: a connection that does not start with a TLS handshake is closed.
    #[arg(long, requires = "tls_cert")]
    tls_required: bool,
}

/// The relay core's defaults, which the flags' defaults are read from.
static DEFAULTS: LazyLock<Config> = LazyLock::new(Config::default);

/// Every setting at its default: what an empty command line gives, so a --config file
/// that leaves a key out gets the flag's default.
impl Default for Args {
    fn default() -> Args {
        let matches = settings_command()
            .try_get_matches_from(["imrelay"])
            .expect("the defaults parse");
        Args::from_arg_matches(&matches).expect("the defaults parse")
    }
}

/// The command line without the flags' `requires` and `conflicts_with` rules: with
/// --config they are checked on the merged settings instead ([`merge`]), so a flag may
/// complete a file (`--tls-cert` given, `tls-key` in the file).
fn relaxed_command() -> clap::Command {
    let mut command = Cli::command();
    let ids: Vec<clap::Id> = command
        .get_arguments()
        .map(|arg| arg.get_id().clone())
        .collect();
    for id in ids {
        command = command.mut_arg(id, |arg| {
            arg.requires(clap::builder::Resettable::Reset)
                .conflicts_with(clap::builder::Resettable::Reset)
        });
    }
    command
}

/// A command with the settings' flags only.
fn settings_command() -> clap::Command {
    <Args as clap::Args>::augment_args(clap::Command::new("imrelay"))
}

/// Serde for a value that clap reads with `FromStr` (an optional one): its `Display`
/// string in the file, as on the command line.
mod as_string {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<T: Display, S: Serializer>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => serializer.collect_str(value),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, T, D>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        Option::<String>::deserialize(deserializer)?
            .map(|s| s.parse().map_err(de::Error::custom))
            .transpose()
    }
}

/// The effective settings: the --config file's (`None`: the defaults), with every flag
/// given on the command line (`matches`, the parse of `flags`) put over it.
fn merge(file: Option<&Path>, flags: Args, matches: &ArgMatches) -> Result<Args, String> {
    let Some(path) = file else {
        return Ok(flags);
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let from_file: Args = toml::from_str(&text)
        .map_err(|e| format!("{}: {}", path.display(), e.to_string().trim_end()))?;
    let mut merged = toml::Table::try_from(&from_file).map_err(|e| e.to_string())?;
    let given = toml::Table::try_from(&flags).map_err(|e| e.to_string())?;
    for arg in settings_command().get_arguments() {
        let (Some(key), Some(ValueSource::CommandLine)) =
            (arg.get_long(), matches.value_source(arg.get_id().as_str()))
        else {
            continue;
        };
        match given.get(key) {
            Some(value) => merged.insert(key.to_string(), value.clone()),
            None => merged.remove(key),
        };
    }
    // The flags' rules (`requires`, `conflicts_with`) bind the file's settings too: they are
    // checked by parsing the merged settings as a command line.
    if let Err(e) = settings_command().try_get_matches_from(as_command_line(&merged)) {
        let e = e.render().to_string();
        let e = e.split("\n\nUsage:").next().unwrap_or_default();
        let e = e.trim_start_matches("error: ").trim_end();
        return Err(format!("{} and the flags: {e}", path.display()));
    }
    Args::deserialize(merged).map_err(|e| e.to_string())
}

/// `settings` as the command line that gives them (a key per long flag).
fn as_command_line(settings: &toml::Table) -> Vec<String> {
    let mut line = vec!["imrelay".to_string()];
    for arg in settings_command().get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        let values = match settings.get(key) {
            Some(toml::Value::Array(values)) => values.iter().collect(),
            Some(value) => vec![value],
            None => Vec::new(),
        };
        for value in values {
            let value = match value {
                toml::Value::Boolean(false) => continue,
                toml::Value::Boolean(true) => None,
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(n) => Some(n.to_string()),
                toml::Value::Float(x) => Some(x.to_string()),
                other => Some(other.to_string()),
            };
            line.push(format!("--{key}"));
            line.extend(value);
        }
    }
    line
}

/// `settings` as a --config file: each key under its flag's help as a comment, in the
/// flags' order; a setting with no value (its default is worked out at start) commented
/// out.
fn print_config(settings: &Args) -> Result<String, String> {
    let table = toml::Table::try_from(settings).map_err(|e| e.to_string())?;
    let mut out = String::from("# imrelay settings (imrelay --config FILE): each key is a flag.\n");
    for arg in settings_command().get_arguments() {
        let Some(key) = arg.get_long() else { continue };
        out.push('\n');
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        for line in wrap(&help, 88 - 2) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        match table.get(key) {
            Some(value) => {
                let mut one = toml::Table::new();
                one.insert(key.to_string(), value.clone());
                out.push_str(&toml::to_string(&one).map_err(|e| e.to_string())?);
            }
            None => out.push_str(&format!("# {key}: not set\n")),
        }
    }
    Ok(out)
}

/// `text` in lines of at most `width` characters, broken at spaces.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AuthMode {
    Off,
    Jwt,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Mints an HS256 login token for development and tests (the app's backend issues
    /// tokens in production). Prints the token.
    Token {
        /// The shared secret's file, as given to the relay's --auth-secret-file.
        #[arg(long)]
        secret_file: std::path::PathBuf,
        /// The user id the token is for.
        #[arg(long)]
        user: u64,
        /// Lifetime: a number and a unit, s, m, h or d (`90s`, `30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// A room the user may JOIN and ROOM_SEND to (repeat for several).
        #[arg(long)]
        room: Vec<u64>,
        /// Every room.
        #[arg(long, conflicts_with = "room")]
        all_rooms: bool,
        /// The user may BROADCAST.
        #[arg(long)]
        admin: bool,
        /// A device name to pin in the token.
        #[arg(long)]
        device: Option<String>,
    },
}

/// `imrelay token`: prints a token, or says why not.
fn mint_token(command: &Command) -> ExitCode {
    let Command::Token {
        secret_file,
        user,
        ttl,
        room,
        all_rooms,
        admin,
        device,
    } = command;
    let ttl = match parse_ttl(ttl) {
        Ok(ttl) => ttl,
        Err(e) => {
            eprintln!("--ttl: {e}");
            return ExitCode::from(2);
        }
    };
    // The same reading (and the same minimum length) as the relay's --auth-secret-file.
    let secret = match read_secret_file(secret_file)
        .and_then(|secret| Verifier::hs256_secret(&secret).map(|_| secret))
    {
        Ok(secret) => secret,
        Err(e) => {
            eprintln!("{}: {e}", secret_file.display());
            return ExitCode::from(2);
        }
    };
    let rooms = if *all_rooms {
        RoomGrant::All
    } else {
        RoomGrant::only(room.iter().copied())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mint = Mint {
        rooms,
        admin: *admin,
        device: device.clone(),
        ..Mint::new(*user, now, ttl)
    };
    match mint.sign(Algorithm::Hs256, &secret) {
        Ok(token) => println!("{token}"),
        Err(e) => {
            eprintln!("cannot sign: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// The token check the flags ask for; `Err` says why the relay must not start.
fn auth_config(args: &Args) -> Result<Option<AuthConfig>, String> {
    let has_key = args.auth_secret_file.is_some() || args.auth_public_key_file.is_some();
    let mode = args.auth.unwrap_or(if has_key {
        AuthMode::Jwt
    } else {
        AuthMode::Off
    });
    if mode == AuthMode::Off {
        if has_key {
            return Err("--auth off with a key file: drop one of them".into());
        }
        if !args.listen.ip().is_loopback() && !args.insecure_no_auth {
            return Err(format!(
                "--auth off on {}: anyone could log in as anyone; give a key \
                 (--auth-secret-file or --auth-public-key-file) or --insecure-no-auth",
                args.listen
            ));
        }
        warn!("--auth off: any LOGIN is accepted as the user it names (development only)");
        return Ok(None);
    }
    let verifier = match (&args.auth_secret_file, &args.auth_public_key_file) {
        (Some(path), _) => {
            if let Some(alg) = args.auth_algorithm.filter(|&alg| alg != Algorithm::Hs256) {
                return Err(format!(
                    "--auth-algorithm {alg} needs --auth-public-key-file; a secret file is HS256"
                ));
            }
            Verifier::from_secret_file(path)
                .map_err(|e| format!("--auth-secret-file {}: {e}", path.display()))?
        }
        (None, Some(path)) => {
            let alg = args.auth_algorithm.unwrap_or(Algorithm::Rs256);
            Verifier::from_public_key_file(path, alg)
                .map_err(|e| format!("--auth-public-key-file {}: {e}", path.display()))?
        }
        (None, None) => {
            return Err("--auth jwt needs --auth-secret-file or --auth-public-key-file".into())
        }
    };
    info!(
        "login tokens: {} (protocol.md section 16)",
        verifier.algorithm()
    );
    let mut auth = AuthConfig::new(verifier);
    auth.notice = Duration::from_secs(args.token_notice);
    Ok(Some(auth))
}

/// `n` and the noun in the right number, for log lines: "1 connection", "2 connections".
fn counted(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    let n = n.try_into().unwrap_or(u64::MAX);
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Half the machine's physical memory (1 GiB if it cannot be read).
fn default_max_memory() -> usize {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (usize::try_from(pages), usize::try_from(page_size)) {
        (Ok(pages), Ok(size)) if pages > 0 && size > 0 => pages.saturating_mul(size) / 2,
        _ => 1 << 30,
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let matches = relaxed_command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.config.is_none() {
        // No file to complete the flags: their rules apply to them alone, reported as
        // clap does.
        Cli::command().get_matches();
    }
    if let Some(command) = &cli.command {
        return mint_token(command);
    }
    let args = match merge(cli.config.as_deref(), cli.args, &matches) {
        Ok(args) => args,
        Err(e) => {
            error!("--config {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        return match print_config(&args) {
            // Not print!, which panics on a closed pipe (`imrelay --print-config | head`).
            Ok(toml) => match std::io::Write::write_all(&mut std::io::stdout(), toml.as_bytes()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("--print-config: {e}");
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                error!("--print-config: {e}");
                ExitCode::from(2)
            }
        };
    }
    let auth = match auth_config(&args) {
        Ok(auth) => auth,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.admin_listen == Some(args.listen) {
        error!(
            "--admin-listen {} is the client --listen address: give it another",
            args.listen
        );
        return ExitCode::from(2);
    }

    let fd_limit = raise_fd_limit();
    let fd_capacity = usize::try_from(fd_limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
    let max_connections = match args.max_connections {
        Some(n) if n > fd_capacity => {
            error!(
                "--max-connections {n} exceeds what the fd limit {fd_limit} allows ({fd_capacity})"
            );
            return ExitCode::from(2);
        }
        Some(n) => n,
        None => fd_capacity,
    };
    let seconds = |s: f64, name: &str| -> Option<Duration> {
        let d = Duration::try_from_secs_f64(s).ok().filter(|d| !d.is_zero());
        if d.is_none() {
            error!("--{name} must be a positive number of seconds, got {s}");
        }
        d
    };
    let heartbeat_min = match args.heartbeat_min {
        None => None,
        Some(s) => match seconds(s, "heartbeat-min") {
            Some(d) => Some(d),
            None => return ExitCode::from(2),
        },
    };
    let (
        Some(login_timeout),
        Some(text_login_timeout),
        Some(ping_interval),
        Some(idle_timeout),
        Some(dedup_ttl),
        Some(inbox_ttl),
        Some(device_retention),
        Some(frame_timeout),
    ) = (
        seconds(args.login_timeout, "login-timeout"),
        seconds(args.text_login_timeout, "text-login-timeout"),
        seconds(args.ping_interval, "ping-interval"),
        seconds(args.idle_timeout, "idle-timeout"),
        seconds(args.dedup_ttl, "dedup-ttl"),
        seconds(args.inbox_ttl, "inbox-ttl"),
        seconds(args.device_retention, "device-retention"),
        seconds(args.frame_timeout, "frame-timeout"),
    )
    else {
        return ExitCode::from(2);
    };
    let config = Config {
        max_frame: args.max_frame,
        demo: args.demo,
        max_connections,
        max_devices_per_user: args.max_devices,
        out_cap: args.out_cap,
        login_timeout,
        text_login_timeout,
        ping_interval,
        idle_timeout,
        heartbeat_min,
        max_rooms_per_connection: args.max_rooms,
        max_members_per_room: args.max_room_members,
        room_send_rate: args.room_rate,
        room_send_burst: args.room_burst,
        admins: args.admin.into_iter().map(UserId).collect(),
        dedup_window: args.dedup_window,
        dedup_ttl,
        dedup_max_entries: args.dedup_max_entries,
        inbox_max_messages: args.inbox_max_messages,
        inbox_max_bytes: args.inbox_max_bytes,
        inbox_ttl,
        inbox_max_devices: args.inbox_max_devices,
        device_retention,
        store_max_users: args.store_max_users,
        store_max_bytes: args.store_max_bytes,
        max_memory: args.max_memory.unwrap_or_else(default_max_memory),
        frame_timeout,
        max_connections_per_ip: args.max_connections_per_ip,
        limit_loopback: args.limit_loopback,
        room_total_rate: args.room_total_rate,
        room_total_burst: args.room_total_burst,
        auth,
    };
    if let Err(e) = config.validate() {
        error!("invalid limits: {e}");
        return ExitCode::from(2);
    }

    let mut server = match Server::bind(args.listen, config) {
        Ok(server) => server,
        Err(e) => {
            error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let loaded = match &args.tls_client_ca {
            Some(ca) => imrelay::server::tls::load_server_config_with_client_ca(cert, key, ca),
            None => imrelay::server::tls::load_server_config(cert, key),
        };
        match loaded {
            Ok(tls) => server.set_tls(Some(tls), args.tls_required),
            Err(e) => {
                error!("TLS: {e}");
                return ExitCode::from(2);
            }
        }
        info!(
            "TLS on {} with {}{}; plaintext {}",
            server.local_addr(),
            cert.display(),
            args.tls_client_ca
                .as_ref()
                .map_or(String::new(), |ca| format!(
                    ", client certificates from {}",
                    ca.display()
                )),
            if args.tls_required {
                "refused"
            } else {
                "on the same port"
            }
        );
    }
    if args.store != "memory" {
        let dir = std::path::Path::new(&args.store);
        if let Err(e) = server.open_store_with(dir, args.store_compact_at, args.store_repair) {
            // The directory lock is taken: say how to run a second relay.
            let hint = match e.kind() {
                std::io::ErrorKind::WouldBlock => {
                    "; use --store DIR for another directory or --store memory"
                }
                _ => "",
            };
            error!("cannot open the store in {}: {e}{hint}", dir.display());
            return ExitCode::from(1);
        }
    }
    if let Some(url) = &args.cluster {
        let redis = match redis_addr(url) {
            Ok(addr) => addr,
            Err(e) => {
                error!("--cluster {url}: {e}");
                return ExitCode::from(2);
            }
        };
        let name = args.node_name.clone().unwrap_or_else(default_node_name);
        server.set_cluster(redis, name, imrelay::rand::Rng::from_entropy().next_u64());
    }
    if let Some(admin) = args.admin_listen {
        if let Err(e) = server.set_admin(admin) {
            error!("--admin-listen: {e}");
            return ExitCode::from(1);
        }
    }
    server.set_busy_poll(args.busy_poll);
    server.set_send_buffer((args.socket_send_buffer > 0).then_some(args.socket_send_buffer));
    server.set_stats_interval(Some(Duration::from_secs(args.stats_interval)));
    info!(
        "imrelay listening on {} (fd limit {fd_limit}: up to {})",
        server.local_addr(),
        counted(max_connections, "connection", "connections")
    );
    if args.demo {
        info!(
            "H5 demo page: http://{}/?user=1&room=7",
            server.local_addr()
        );
    }

    let handle = server.shutdown_handle();
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(signals) => signals,
        Err(e) => {
            error!("cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            info!("signal {signal} received");
            handle.shutdown();
        }
    });

    match server.run() {
        Ok(()) => {
            let m = server.metrics().clone();
            // `run` stopped the store writer (it wrote what was queued and said so) before
            // "shutdown complete"; this stops the admin thread before the last line.
            drop(server);
            info!(
                "exiting: {} served, {} routed, {}",
                counted(m.connections_opened, "connection", "connections"),
                counted(m.messages_routed, "message", "messages"),
                counted(m.deliveries_queued, "delivery", "deliveries")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!("event loop failed: {e}");
            ExitCode::from(1)
        }
    }
}

/// The address of `redis://HOST:PORT` (the port defaults to 6379), resolved once at start.
fn redis_addr(url: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let rest = url
        .strip_prefix("redis://")
        .ok_or("give it as redis://HOST:PORT")?;
    if rest.contains('@') || rest.contains('/') {
        return Err("user names, passwords and database numbers are not supported".into());
    }
    let with_port = if rest
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        rest.to_string()
    } else {
        format!("{rest}:6379")
    };
    with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {with_port}: {e}"))?
        .next()
        .ok_or_else(|| format!("{with_port} resolves to no address"))
}

/// `<host name>-<process id>`: unique among the nodes on one machine and across machines.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".to_string());
    format!("{host}-{}", std::process::id())
}
