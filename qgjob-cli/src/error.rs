//! The CLI's error type: one readable line per error, and the exit code it maps to.

use thiserror::Error;

/// Exit code: every job passed (or the command simply worked).
pub const EXIT_OK: u8 = 0;
/// Exit code: a test failed.
pub const EXIT_TEST_FAILED: u8 = 1;
/// Exit code: bad usage or invalid input (clap uses it for bad flags too).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: server or infrastructure error, a job in error/canceled, or a timeout.
pub const EXIT_INFRA: u8 = 3;

/// Everything that can go wrong in a command. `Display` is the one line shown after `error: `.
#[derive(Debug, Error)]
pub enum CliError {
    /// The user gave something we cannot use (a missing file, a bad duration, …).
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached at all.
    #[error("cannot reach qgjob server at {url}: {reason}")]
    Unreachable {
        /// The server's base URL.
        url: String,
        /// Why, in a few words (e.g. `connection refused`).
        reason: String,
    },
    /// The TLS handshake with an https server failed (an untrusted certificate, or https
    /// to a plain-HTTP port): waiting will not help.
    #[error(
        "TLS with qgjob server at {url} failed: {reason} (a server with a private CA's \
         certificate needs that CA in QGJOB_CA_CERT)"
    )]
    Tls {
        /// The server's base URL.
        url: String,
        /// What rustls said.
        reason: String,
    },
    /// The server answered with an error document.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The server's error code (e.g. `not_found`).
        code: String,
        /// The server's message.
        message: String,
    },
    /// The server answered something we did not understand, or the transfer broke.
    #[error("{0}")]
    Protocol(String),
    /// A local file or terminal operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for a job or run ran out of time.
    #[error("timed out after {0}")]
    Timeout(String),
    /// Something else on our side or the infrastructure's failed.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// Whether the server is away for now rather than saying no: unreachable, or an answer
    /// of 502, 503 or 504 (a proxy with no server behind it, a server stopping, a standby
    /// about to take over). Commands that follow a job wait through these.
    pub fn is_server_away(&self) -> bool {
        matches!(
            self,
            CliError::Unreachable { .. }
                | CliError::Api {
                    status: 502..=504,
                    ..
                }
        )
    }

    /// The process exit code for this error (2 usage/input, 3 server/infrastructure; see the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            // Every 4xx (bad value, unknown job, missing token, cancel of a finished job) is
            // something the caller must fix; 5xx are the server's problem.
            CliError::Api { status, .. } if (400..500).contains(status) => EXIT_USAGE,
            _ => EXIT_INFRA,
        }
    }

    /// An I/O error on a path the user gave (a missing input file, an output in a folder
    /// that does not exist): theirs to fix, so a usage error (exit 2).
    pub fn input(context: impl std::fmt::Display, source: std::io::Error) -> Self {
        CliError::Usage(format!("{context}: {source}"))
    }

    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias for the CLI.
pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_kind() {
        let api = |status| CliError::Api {
            status,
            code: "x".into(),
            message: "m".into(),
        };
        assert!(api(503).is_server_away() && api(502).is_server_away());
        assert!(!api(500).is_server_away() && !api(404).is_server_away());
        assert_eq!(api(404).exit_code(), EXIT_USAGE);
        assert_eq!(api(409).exit_code(), EXIT_USAGE);
        assert_eq!(api(503).exit_code(), EXIT_INFRA);
        assert_eq!(CliError::Usage("u".into()).exit_code(), EXIT_USAGE);
        assert_eq!(CliError::Timeout("1s".into()).exit_code(), EXIT_INFRA);
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert_eq!(
            CliError::input("reading w.json", missing).exit_code(),
            EXIT_USAGE
        );
        let e = CliError::Unreachable {
            url: "http://h:1".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(e.exit_code(), EXIT_INFRA);
        assert_eq!(
            e.to_string(),
            "cannot reach qgjob server at http://h:1: connection refused"
        );
    }
}
