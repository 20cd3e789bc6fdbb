//! The `taskd` binary: flags and config, the listening socket, then the server.

use std::process::ExitCode;

use clap::Parser;
use taskd::cli::{self, Cli};
use taskd::mail::{outbox::Outbox, MailApp};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match cli::load(&cli) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("taskd: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        print!("{}", settings.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = taskd::logging::init(&settings.server.log_level) {
        eprintln!("taskd: {e}");
        return ExitCode::from(2);
    }
    // Fail now, with the option's name, rather than in every task process later.
    if let Err(e) = Outbox::open(&settings.mail.outbox) {
        eprintln!("taskd: invalid outbox: cannot open {}: {e}", settings.mail.outbox.display());
        return ExitCode::from(2);
    }
    let server = &settings.server;
    let listener = match taskd::net::bind_listener(&server.host, server.port, server.backlog) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("taskd: {e}");
            return ExitCode::from(1);
        }
    };
    match taskd::run(server, listener, MailApp::new(settings.mail.clone())) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("taskd: {e}");
            ExitCode::from(1)
        }
    }
}
