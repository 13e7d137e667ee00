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
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            match TokenSpec::parse_line(line) {
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

    /// Who presents `authorization` (the header's value, if any).
    pub fn caller(&self, authorization: Option<&str>) -> Result<Caller, ApiError> {
        if self.open {
            return Ok(Caller::Admin);
        }
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
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
