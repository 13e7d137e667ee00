//! Where the server is and which token to use: flag, then environment, then config file,
//! then the default `http://127.0.0.1:7878`.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{CliError, Result};

/// The server address used when nothing else names one.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7878";

/// The config file's contents (TOML, or JSON when the file name ends in `.json`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Server base URL.
    pub server: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
}

/// The resolved connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Server base URL, without a trailing slash.
    pub server: String,
    /// Bearer token, if any.
    pub token: Option<String>,
}

/// The config file path: `$QGJOB_CONFIG`, else `$XDG_CONFIG_HOME/qgjob/config.toml`, else
/// `~/.config/qgjob/config.toml`.
pub fn config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QGJOB_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(x).join("qgjob").join("config.toml"));
    }
    std::env::var_os("HOME").filter(|p| !p.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".config")
            .join("qgjob")
            .join("config.toml")
    })
}

/// Parses a config file's text; `json` selects JSON over TOML.
pub fn parse_config(text: &str, json: bool) -> std::result::Result<FileConfig, String> {
    if json {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }
}

/// Reads the config file if there is one. A missing default file is fine; a file named by
/// `QGJOB_CONFIG` that is missing, or a malformed one, is an error (silently ignoring it
/// would send jobs to the wrong server).
pub fn load_file() -> Result<FileConfig> {
    let Some(path) = config_path() else {
        return Ok(FileConfig::default());
    };
    let named = std::env::var_os("QGJOB_CONFIG").is_some_and(|p| !p.is_empty());
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
            return Ok(FileConfig::default())
        }
        Err(e) => {
            let from = if named { " (QGJOB_CONFIG)" } else { "" };
            return Err(CliError::Usage(format!(
                "config file {}{from}: {e}",
                path.display()
            )));
        }
    };
    let json = path.extension().is_some_and(|e| e == "json");
    parse_config(&text, json)
        .map_err(|e| CliError::Usage(format!("invalid config file {}: {e}", path.display())))
}

/// Resolves settings from the flags, then `QGJOB_SERVER`/`QGJOB_TOKEN`, then the config
/// file. The file is read only when a value is still missing, to keep start-up cheap.
pub fn resolve(server: Option<String>, token: Option<String>) -> Result<Settings> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let server = server
        .filter(|s| !s.is_empty())
        .or_else(|| env("QGJOB_SERVER"));
    let token = token
        .filter(|t| !t.is_empty())
        .or_else(|| env("QGJOB_TOKEN"));
    let need_file = server.is_none() || token.is_none();
    let file = if need_file {
        load_file()?
    } else {
        FileConfig::default()
    };
    let server = server
        .filter(|s| !s.is_empty())
        .or(file.server)
        .unwrap_or_else(|| DEFAULT_SERVER.to_string());
    let server = normalize_server(&server)?;
    let token = token.filter(|t| !t.is_empty()).or(file.token);
    Ok(Settings { server, token })
}

/// Checks a server URL, or a comma-separated list of them (a server and its standbys),
/// and strips trailing slashes and a trailing `/v1`; a bare `host:port` gets `http://`.
pub fn normalize_server(s: &str) -> Result<String> {
    if s.contains(',') {
        let each: Result<Vec<String>> = s.split(',').map(normalize_one).collect();
        return Ok(each?.join(","));
    }
    normalize_one(s)
}

/// [`normalize_server`] for one URL.
fn normalize_one(s: &str) -> Result<String> {
    let s = s.trim().trim_end_matches('/');
    // The API's paths all start with /v1, so an address copied from one of them (or from
    // the HTTP API document) often ends with it; the server's base URL never does.
    let s = s.strip_suffix("/v1").unwrap_or(s).trim_end_matches('/');
    if s.is_empty() {
        return Err(CliError::Usage("the server address is empty".into()));
    }
    if s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.to_string())
    } else if s.contains("://") {
        Err(CliError::Usage(format!(
            "server {s}: only http:// and https:// addresses are supported"
        )))
    } else {
        Ok(format!("http://{s}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_and_json() {
        let t = parse_config("server = \"http://h:1\"\ntoken = \"abc\"\n", false).unwrap();
        assert_eq!(t.server.as_deref(), Some("http://h:1"));
        assert_eq!(t.token.as_deref(), Some("abc"));
        let j = parse_config(r#"{"server": "http://x:2"}"#, true).unwrap();
        assert_eq!(j.server.as_deref(), Some("http://x:2"));
        assert_eq!(j.token, None);
        assert!(parse_config("bogus = 1", false).is_err());
    }

    #[test]
    fn normalizes_addresses() {
        assert_eq!(
            normalize_server("127.0.0.1:7878/").unwrap(),
            "http://127.0.0.1:7878"
        );
        assert_eq!(normalize_server("http://a:1").unwrap(), "http://a:1");
        assert!(normalize_server("ftp://a").is_err());
        assert_eq!(normalize_server("https://a/").unwrap(), "https://a");
        assert_eq!(
            normalize_server("http://a:1/, b:2").unwrap(),
            "http://a:1,http://b:2"
        );
        assert!(normalize_server("http://a:1,").is_err());
        // The base URL, not the API's: a trailing /v1 goes.
        assert_eq!(normalize_server("http://a:1/v1/").unwrap(), "http://a:1");
        assert_eq!(
            normalize_server("https://h/qgjob/v1,b:2/v1").unwrap(),
            "https://h/qgjob,http://b:2"
        );
        assert_eq!(
            normalize_server("http://a:1/v10").unwrap(),
            "http://a:1/v10"
        );
        assert!(normalize_server("http://a:1,ftp://b").is_err());
    }
}
