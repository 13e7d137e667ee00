//! Bearer-token auth: token specs from options or a tokens file, the [`Caller`] extractor,
//! and the checks every handler makes (org isolation, agent-only, admin-only).
//!
//! Only sha256 digests of tokens are kept in memory and in the store; a presented token is
//! hashed and compared with every known digest in constant time, so neither timing nor a
//! leaked database reveals a token. Tokens are never logged.

use std::path::Path;
use std::sync::RwLock;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use qgjob_core::OrgId;
use sha2::{Digest, Sha256};

use crate::error::{ApiError, ServerError};
use crate::state::AppState;
use crate::store::{TokenKind, TokenRecord};

/// A token the server accepts, as configured (the plain token is hashed at start).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSpec {
    /// The secret itself.
    pub token: String,
    /// What it may do.
    pub kind: TokenKind,
    /// Its org (required for `org` tokens, ignored otherwise).
    pub org_id: Option<OrgId>,
}

impl std::fmt::Debug for TokenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, even in debug output.
        f.debug_struct("TokenSpec")
            .field("kind", &self.kind)
            .field("org_id", &self.org_id)
            .finish_non_exhaustive()
    }
}

impl TokenSpec {
    /// Parses one line of a tokens file: `admin TOKEN`, `agent TOKEN` or `org ORG_ID TOKEN`.
    /// Blank lines and lines starting with `#` give `None`.
    pub fn parse_line(line: &str) -> Result<Option<TokenSpec>, String> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return Ok(None);
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let spec = match parts.as_slice() {
            ["admin", t] => TokenSpec {
                token: (*t).to_string(),
                kind: TokenKind::Admin,
                org_id: None,
            },
            ["agent", t] => TokenSpec {
                token: (*t).to_string(),
                kind: TokenKind::Agent,
                org_id: None,
            },
            ["org", org, t] => TokenSpec {
                token: (*t).to_string(),
                kind: TokenKind::Org,
                org_id: Some(OrgId::new(*org).map_err(|e| e.to_string())?),
            },
            _ => return Err("expected `admin TOKEN`, `agent TOKEN` or `org ORG_ID TOKEN`".into()),
        };
        if spec.token.len() < 16 {
            return Err("tokens must be at least 16 characters".into());
        }
        Ok(Some(spec))
    }

    /// Reads a tokens file (one [`TokenSpec::parse_line`] per line).
    pub fn load_file(path: &Path) -> Result<Vec<TokenSpec>, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("tokens file {}: {e}", path.display())))?;
        let mut out: Vec<TokenSpec> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            match TokenSpec::parse_line(line) {
                Ok(Some(t)) if out.iter().any(|o| o.token == t.token) => {
                    // One secret with two meanings: whichever won would surprise someone.
                    return Err(ServerError::Config(format!(
                        "{}:{}: this token is already listed on an earlier line",
                        path.display(),
                        i + 1
                    )));
                }
                Ok(Some(t)) => out.push(t),
                Ok(None) => {}
                Err(e) => {
                    return Err(ServerError::Config(format!(
                        "{}:{}: {e}",
                        path.display(),
                        i + 1
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The record kept for this token (its digest, not the token).
    pub fn record(&self) -> Result<TokenRecord, ServerError> {
        if self.kind == TokenKind::Org && self.org_id.is_none() {
            return Err(ServerError::Config("an org token needs an org id".into()));
        }
        Ok(TokenRecord {
            hash: hash_token(&self.token),
            kind: self.kind,
            org_id: if self.kind == TokenKind::Org {
                self.org_id.clone()
            } else {
                None
            },
        })
    }
}

/// Hex sha256 of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token (256 bits, hex).
pub fn new_token() -> Result<String, ApiError> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(format!("qg_{}", hex::encode(buf)))
}

/// Equality of two byte strings that takes the same time wherever they differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An admin token (or any request on an open server): may do everything.
    Admin,
    /// An org token.
    Org(OrgId),
    /// An agent token.
    Agent,
}

impl Caller {
    /// For the user API: `Ok(None)` for an admin (every org), `Ok(Some(org))` for an org token.
    pub fn user_scope(&self) -> Result<Option<&OrgId>, ApiError> {
        match self {
            Caller::Admin => Ok(None),
            Caller::Org(o) => Ok(Some(o)),
            Caller::Agent => Err(ApiError::forbidden(
                "an agent token may only use the agent protocol",
            )),
        }
    }

    /// Whether this caller may see `org`'s jobs (user API).
    pub fn sees(&self, org: &OrgId) -> bool {
        match self {
            Caller::Admin => true,
            Caller::Org(o) => o == org,
            Caller::Agent => false,
        }
    }

    /// Requires a caller allowed to act for `org` (403 otherwise).
    pub fn require_org(&self, org: &OrgId) -> Result<(), ApiError> {
        self.user_scope()?;
        if self.sees(org) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token may not act for org {org}"
            )))
        }
    }

    /// Requires an agent (or admin) token.
    pub fn require_agent(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin | Caller::Agent => Ok(()),
            Caller::Org(_) => Err(ApiError::forbidden(
                "the agent protocol needs an agent token",
            )),
        }
    }

    /// Requires an admin token.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            _ => Err(ApiError::forbidden("an admin token is required")),
        }
    }
}

/// The token registry.
#[derive(Debug)]
pub struct Auth {
    open: bool,
    tokens: RwLock<Vec<TokenRecord>>,
}

impl Auth {
    /// A registry with these tokens. `open` makes every request act as admin.
    pub fn new(tokens: Vec<TokenRecord>, open: bool) -> Self {
        Auth {
            open,
            tokens: RwLock::new(tokens),
        }
    }

    /// Whether the server runs without auth.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// Adds a token (already stored).
    pub fn add(&self, rec: TokenRecord) {
        let mut g = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        g.retain(|t| t.hash != rec.hash);
        g.push(rec);
    }

    /// Forgets the token with this hash; returns whether it was known.
    pub fn remove(&self, hash: &str) -> bool {
        let mut g = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        let before = g.len();
        g.retain(|t| t.hash != hash);
        g.len() < before
    }

    /// Whether a token with this hash is known.
    pub fn knows(&self, hash: &str) -> bool {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|t| t.hash == hash)
    }

    /// Who presents `authorization` (the header's value, if any).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        if self.open {
            return Ok(Caller::Admin);
        }
        // The scheme is case-insensitive (RFC 9110).
        let token = authorization
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
        let digest = hash_token(token);
        let g = self.tokens.read().unwrap_or_else(|e| e.into_inner());
        // Compare against every record without stopping early, so timing says nothing
        // about which (or whether a) token matched.
        let mut found: Option<&TokenRecord> = None;
        for rec in g.iter() {
            if ct_eq(rec.hash.as_bytes(), digest.as_bytes()) {
                found = Some(rec);
            }
        }
        match found {
            Some(rec) => Ok(match (rec.kind, &rec.org_id) {
                (TokenKind::Admin, _) => Caller::Admin,
                (TokenKind::Agent, _) => Caller::Agent,
                (TokenKind::Org, Some(o)) => Caller::Org(o.clone()),
                (TokenKind::Org, None) => {
                    return Err(ApiError::unauthorized("token has no org"));
                }
            }),
            None => Err(ApiError::unauthorized("unknown token")),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let h = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state.auth.caller(h)
    }
}

/// Whether a `Host` or `Origin` authority (`name[:port]`) names this machine: `localhost`
/// or a loopback address.
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        // `[::1]:7878`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// On an open server (no tokens, loopback only), refuses what a web page could send: a
/// request whose `Origin` is another site (a cross-site form or fetch), or whose `Host`
/// is not a loopback name (DNS rebinding: a site's name resolved to 127.0.0.1). Programs
/// (the CLI, agents, curl) send neither. With tokens this does nothing: a browser cannot
/// attach a bearer token on its own.
pub async fn open_guard(
    axum::extract::State(app): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if app.auth.is_open() {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        if let Some(host) = header(header::HOST) {
            if !loopback_authority(host) {
                return ApiError::forbidden(format!(
                    "this server runs without tokens and answers only to a loopback host name, \
                     not {host:?}"
                ))
                .into_response();
            }
        }
        if let Some(origin) = header(header::ORIGIN) {
            let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
            if !loopback_authority(authority) {
                return ApiError::forbidden(
                    "this server runs without tokens and refuses requests from web pages of \
                     other sites",
                )
                .into_response();
            }
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod guard_tests {
    use super::loopback_authority;

    #[test]
    fn loopback_authorities() {
        for a in [
            "127.0.0.1:7878",
            "localhost",
            "LOCALHOST:1",
            "[::1]:80",
            "127.2.3.4",
        ] {
            assert!(loopback_authority(a), "{a}");
        }
        for a in [
            "evil.example:7878",
            "10.0.0.1:7878",
            "[2001:db8::1]:80",
            "localhost.evil.example",
            "",
            "null",
        ] {
            assert!(!loopback_authority(a), "{a}");
        }
    }
}
