//! The `qgjob` command line: parses arguments, runs the command, turns errors into one
//! `error: …` line and an exit code (0 passed, 1 test failed, 2 usage, 3 infrastructure).

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use qgjob_cli::cli::{AppCommand, Cli, Command, Conn};
use qgjob_cli::client::Client;
use qgjob_cli::commands;
use qgjob_cli::config;
use qgjob_cli::error::{CliError, Result};

/// A client for the server named by the flags after the command, else before it, else
/// the environment and the config file.
fn client(after: &Conn, before: &Conn) -> Result<Client> {
    let conn = after.or(before);
    let s = config::resolve(conn.server, conn.token)?;
    qgjob_cli::client::load_server_roots()?;
    Ok(Client::new(s.server, s.token))
}

fn run(cli: Cli) -> Result<u8> {
    let before = &cli.conn;
    if before.is_set() && !cli.command.uses_server() {
        // Accepting them silently would suggest they did something.
        return Err(CliError::Usage(format!(
            "--server and --token are for client commands and agents, not `{}`",
            cli.command.name()
        )));
    }
    match &cli.command {
        Command::Submit(a) => commands::submit(&client(&a.conn, before)?, a),
        Command::Status(a) => commands::status(&client(&a.conn, before)?, a),
        Command::Wait(a) => commands::wait(&client(&a.conn, before)?, a),
        Command::List(a) => commands::list(&client(&a.conn, before)?, a),
        Command::Cancel(a) => commands::cancel(&client(&a.conn, before)?, a),
        Command::Logs(a) => commands::logs(&client(&a.conn, before)?, a),
        Command::App(AppCommand::Upload(a)) => commands::app_upload(&client(&a.conn, before)?, a),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "qgjob", &mut std::io::stdout());
            Ok(0)
        }
        Command::Agent(a) => qgjob_cli::agent::agent(client(&a.conn, before)?, a),
        Command::Simulate(a) => qgjob_cli::simulate::simulate(a),
        Command::Server(a) => qgjob_cli::local::server(a),
        Command::Up(a) => qgjob_cli::local::up(a),
        Command::Demo(a) => qgjob_cli::local::demo(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
