//! The `qgjob` command line: parses arguments, runs the command, turns errors into one
//! `error: …` line and an exit code (0 passed, 1 test failed, 2 usage, 3 infrastructure).

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use qgjob_cli::cli::{AppCommand, Cli, Command};
use qgjob_cli::client::Client;
use qgjob_cli::commands;
use qgjob_cli::config;
use qgjob_cli::error::Result;

fn client(conn: &qgjob_cli::cli::Conn) -> Result<Client> {
    let s = config::resolve(conn.server.clone(), conn.token.clone())?;
    Ok(Client::new(s.server, s.token))
}

fn run(cli: Cli) -> Result<u8> {
    match &cli.command {
        Command::Submit(a) => commands::submit(&client(&cli.conn)?, a),
        Command::Status(a) => commands::status(&client(&cli.conn)?, a),
        Command::Wait(a) => commands::wait(&client(&cli.conn)?, a),
        Command::List(a) => commands::list(&client(&cli.conn)?, a),
        Command::Cancel(a) => commands::cancel(&client(&cli.conn)?, a),
        Command::Logs(a) => commands::logs(&client(&cli.conn)?, a),
        Command::App(AppCommand::Upload(a)) => commands::app_upload(&client(&cli.conn)?, a),
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "qgjob", &mut std::io::stdout());
            Ok(0)
        }
        Command::Agent(a) => qgjob_cli::agent::agent(client(&cli.conn)?, a),
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
