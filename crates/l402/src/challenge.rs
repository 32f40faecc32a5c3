//! `WWW-Authenticate` challenges: a lenient RFC 7235 parser for every L402/LSAT form, and the exact form we send.
//!
//! Accepted (see `specs/l402.md` §1): scheme `L402` or `LSAT` in any case; the token under `token=` or
//! `macaroon=` (`token` wins when both are present); `version` optional; unknown parameters ignored; any order;
//! quoted or unquoted values; whitespace around `=` and `,`; several headers; several challenges folded into
//! one header beside other schemes. Parsing never panics: garbage yields no challenge.

use crate::identifier::Identifier;
use crate::macaroon::{Macaroon, MacaroonError};

/// Header values longer than this are not looked at (a hostile server could send megabytes).
pub const MAX_HEADER_LEN: usize = 64 * 1024;

/// `L402` or its older name `LSAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    L402,
    Lsat,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::L402 => "L402",
            Scheme::Lsat => "LSAT",
        }
    }

    /// Case-insensitive, as RFC 7235 says auth schemes are.
    pub fn parse(name: &str) -> Option<Scheme> {
        if name.eq_ignore_ascii_case("L402") {
            Some(Scheme::L402)
        } else if name.eq_ignore_ascii_case("LSAT") {
            Some(Scheme::Lsat)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which parameter carried the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenParam {
    Token,
    Macaroon,
}

/// One L402 challenge: a macaroon to buy and the invoice that pays for it.
#[derive(Clone, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: Scheme,
    /// The base64 token exactly as sent (decode with [`Challenge::macaroon`]).
    pub token: String,
    pub token_param: TokenParam,
    pub invoice: String,
    pub version: Option<String>,
}

/// The token is a bearer credential once paid: Debug shows only its length.
impl std::fmt::Debug for Challenge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Challenge")
            .field("scheme", &self.scheme)
            .field("token", &format_args!("[{} chars]", self.token.len()))
            .field("token_param", &self.token_param)
            .field("invoice", &self.invoice)
            .field("version", &self.version)
            .finish()
    }
}

/// Why a 402 carried no usable L402 challenge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("no WWW-Authenticate header")]
    NoHeader,
    #[error("no L402 or LSAT challenge in WWW-Authenticate")]
    NoL402Challenge,
    #[error("the L402 challenge has no macaroon= or token= parameter")]
    MissingToken,
    #[error("the L402 challenge has no invoice= parameter")]
    MissingInvoice,
    #[error("the L402 challenge's token is not a macaroon: {0}")]
    BadToken(MacaroonError),
    #[error("the L402 challenge's macaroon has no valid L402 identifier")]
    BadIdentifier,
}

impl Challenge {
    pub fn macaroon(&self) -> Result<Macaroon, MacaroonError> {
        Macaroon::from_base64(&self.token)
    }

    /// The payment hash the token's identifier commits to, to compare with the invoice's before paying.
    pub fn payment_hash(&self) -> Result<[u8; 32], ChallengeError> {
        let macaroon = self.macaroon().map_err(ChallengeError::BadToken)?;
        Identifier::decode(macaroon.identifier())
            .map(|id| id.payment_hash)
            .map_err(|_| ChallengeError::BadIdentifier)
    }

    /// The header value we send: `L402 macaroon="…", invoice="…"` (the deployed form clients parse today).
    pub fn to_header_value(&self) -> String {
        format_challenge(self.scheme, &self.token, &self.invoice)
    }
}

/// `<scheme> macaroon="<base64>", invoice="<bolt11>"`.
pub fn format_challenge(scheme: Scheme, macaroon_base64: &str, invoice: &str) -> String {
    format!(
        "{scheme} macaroon={}, invoice={}",
        quote(macaroon_base64),
        quote(invoice)
    )
}

/// The spec's current form: `L402 version="0", token="<base64>", invoice="<bolt11>"`.
pub fn format_challenge_v0(macaroon_base64: &str, invoice: &str) -> String {
    format!(
        "L402 version=\"0\", token={}, invoice={}",
        quote(macaroon_base64),
        quote(invoice)
    )
}

/// An RFC 7230 quoted-string (base64 and BOLT11 never need the escapes; anything else stays parseable).
fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The two headers a seller sends, legacy `LSAT` first (Aperture's order).
pub fn challenge_headers(macaroon_base64: &str, invoice: &str) -> [String; 2] {
    [
        format_challenge(Scheme::Lsat, macaroon_base64, invoice),
        format_challenge(Scheme::L402, macaroon_base64, invoice),
    ]
}

/// Any challenge of any scheme, as RFC 7235 reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthChallenge {
    pub scheme: String,
    pub token68: Option<String>,
    /// Parameter names lower-cased, values unquoted, in order.
    pub params: Vec<(String, String)>,
}

impl AuthChallenge {
    /// The first parameter of that name (case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Every L402/LSAT challenge in these `WWW-Authenticate` values, in order, duplicates (the same token and
/// invoice under both schemes) kept. Err says why there is none.
pub fn parse_challenges<'a, I>(header_values: I) -> Result<Vec<Challenge>, ChallengeError>
where
    I: IntoIterator<Item = &'a str>,
{
    let mut found = Vec::new();
    let mut any_header = false;
    let mut best_error = ChallengeError::NoL402Challenge;
    for value in header_values {
        any_header = true;
        for auth in parse_auth_challenges(value) {
            let Some(scheme) = Scheme::parse(&auth.scheme) else {
                continue;
            };
            let token = auth
                .param("token")
                .filter(|t| !t.is_empty())
                .map(|t| (t, TokenParam::Token))
                .or_else(|| {
                    auth.param("macaroon")
                        .filter(|t| !t.is_empty())
                        .map(|t| (t, TokenParam::Macaroon))
                });
            let invoice = auth
                .param("invoice")
                .map(str::trim)
                .filter(|i| !i.is_empty());
            match (token, invoice) {
                (Some((token, token_param)), Some(invoice)) => found.push(Challenge {
                    scheme,
                    token: token.trim().to_string(),
                    token_param,
                    invoice: invoice.to_string(),
                    version: auth.param("version").map(str::to_string),
                }),
                (None, _) => best_error = ChallengeError::MissingToken,
                (Some(_), None) => best_error = ChallengeError::MissingInvoice,
            }
        }
    }
    if !found.is_empty() {
        Ok(found)
    } else if !any_header {
        Err(ChallengeError::NoHeader)
    } else {
        Err(best_error)
    }
}

/// The challenge to act on: the first `L402` one, else the first `LSAT` one.
pub fn preferred(challenges: &[Challenge]) -> Option<&Challenge> {
    challenges
        .iter()
        .find(|c| c.scheme == Scheme::L402)
        .or_else(|| challenges.first())
}

/// Splits one `WWW-Authenticate` value into challenges (RFC 7235 §4.1, leniently).
pub fn parse_auth_challenges(value: &str) -> Vec<AuthChallenge> {
    let mut out: Vec<AuthChallenge> = Vec::new();
    if value.len() > MAX_HEADER_LEN {
        return out;
    }
    let mut lx = Lexer {
        s: value.as_bytes(),
        pos: 0,
    };
    // True right after a scheme name, before any comma: the next bare word is that scheme's token68.
    let mut after_scheme = false;
    loop {
        let saw_comma = lx.skip_separators();
        if saw_comma {
            after_scheme = false;
        }
        if lx.at_end() {
            break;
        }
        if lx.peek() == Some(b'"') {
            // A stray quoted string: skip it.
            lx.quoted();
            continue;
        }
        let word = lx.token();
        if word.is_empty() {
            // A character that can start nothing (e.g. a lone '='): skip it.
            lx.pos += 1;
            continue;
        }
        let ws = lx.skip_ws();
        if lx.peek() == Some(b'=') {
            let eq_start = lx.pos;
            let run = lx.count_while(|b| b == b'=');
            let after_run = lx.s.get(eq_start + run).copied();
            let padding_only = matches!(after_run, None | Some(b',' | b' ' | b'\t'));
            let current_is_bare = out
                .last()
                .map(|c| c.token68.is_none() && c.params.is_empty())
                .unwrap_or(false);
            if padding_only && !ws && (after_scheme && current_is_bare || run > 1) {
                // `Scheme abc==`: a token68 with its padding.
                lx.pos = eq_start + run;
                if let Some(current) = out.last_mut().filter(|_| after_scheme) {
                    current.token68 = Some(format!("{word}{}", "=".repeat(run)));
                }
                after_scheme = false;
                continue;
            }
            lx.pos = eq_start + 1;
            lx.skip_ws();
            let value = if lx.peek() == Some(b'"') {
                lx.quoted()
            } else {
                lx.bare_value()
            };
            if let Some(current) = out.last_mut() {
                current.params.push((word.to_ascii_lowercase(), value));
            }
            after_scheme = false;
        } else {
            let current_is_bare = out
                .last()
                .map(|c| c.token68.is_none() && c.params.is_empty())
                .unwrap_or(false);
            if after_scheme && current_is_bare {
                // `Negotiate abc`: a bare word right after a scheme is its token68.
                if let Some(current) = out.last_mut() {
                    current.token68 = Some(word);
                }
                after_scheme = false;
            } else {
                out.push(AuthChallenge {
                    scheme: word,
                    ..AuthChallenge::default()
                });
                after_scheme = true;
            }
        }
    }
    out
}

struct Lexer<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Lexer<'_> {
    fn at_end(&self) -> bool {
        self.pos >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn count_while(&self, f: impl Fn(u8) -> bool) -> usize {
        self.s[self.pos..].iter().take_while(|&&b| f(b)).count()
    }

    /// Skips whitespace; true when there was some.
    fn skip_ws(&mut self) -> bool {
        let n = self.count_while(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
        self.pos += n;
        n > 0
    }

    /// Skips whitespace and commas; true when a comma was among them.
    fn skip_separators(&mut self) -> bool {
        let mut comma = false;
        while let Some(b) = self.peek() {
            match b {
                b',' => comma = true,
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ => break,
            }
            self.pos += 1;
        }
        comma
    }

    /// A run of characters that are not separators, `=` or quotes (lossy UTF-8).
    fn token(&mut self) -> String {
        let n =
            self.count_while(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b',' | b'=' | b'"'));
        let word = String::from_utf8_lossy(&self.s[self.pos..self.pos + n]).into_owned();
        self.pos += n;
        word
    }

    /// An unquoted value: up to whitespace or a comma (so base64 padding `=` stays in it).
    fn bare_value(&mut self) -> String {
        let n = self.count_while(|b| !matches!(b, b' ' | b'\t' | b'\r' | b'\n' | b','));
        let value = String::from_utf8_lossy(&self.s[self.pos..self.pos + n]).into_owned();
        self.pos += n;
        value
    }

    /// A quoted string starting at `"`, with `\` escapes; an unterminated one runs to the end.
    fn quoted(&mut self) -> String {
        let mut out = Vec::new();
        self.pos += 1;
        while let Some(b) = self.peek() {
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.pos += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
