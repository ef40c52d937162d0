/*!
Optional API keys on the generation routes.

Clients send `Authorization: Bearer <key>`. Keys are kept as SHA-256 digests and a presented
key is hashed and compared with every configured digest in constant time (`subtle`), so the
comparison reveals neither a key's content nor its length, and no early exit tells which
key came close. Liveness, readiness, model metadata and `/metrics` stay open: probes and
scrapers carry no keys.
*/

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::error::{ApiError, Protocol};
use crate::state::AppState;

/// The configured keys, as digests.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} key(s))", self.digests.len())
    }
}

impl ApiKeys {
    /// Keys from the flags; blank entries (a trailing comma in `GPTJ_API_KEY`) are skipped,
    /// and keys with spaces or control characters refused (they could never be sent).
    pub fn new(keys: &[String]) -> Result<Self, String> {
        let mut digests = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let k = k.trim();
            if k.is_empty() {
                continue;
            }
            if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "--api-key number {}: keys must not contain spaces or control characters",
                    i + 1
                ));
            }
            digests.push(Sha256::digest(k.as_bytes()).into());
        }
        Ok(Self { digests })
    }

    /// True when no key is configured (everything is open).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// True if `presented` is one of the keys.
    pub fn accepts(&self, presented: &str) -> bool {
        self.find(presented).is_some()
    }

    /// The position of `presented` among the keys. Every key is compared, in constant time.
    pub fn find(&self, presented: &str) -> Option<usize> {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, k) in self.digests.iter().enumerate() {
            let hit = k.ct_eq(&d);
            index.conditional_assign(&(i as u64), hit);
            found |= hit;
        }
        bool::from(found).then_some(index as usize)
    }
}

/// Which key authenticated a request (its position among `--api-key`s): the scheduler's
/// tenant when no tenant header is sent, so keys share the batch fairly.
#[derive(Debug, Clone, Copy)]
pub struct KeyIndex(pub usize);

/// Whether a request needs a key: every POST (all generation) and every OpenAI route.
pub fn needs_key(method: &Method, path: &str) -> bool {
    method == Method::POST || path.starts_with("/openai/")
}

/// The protocol a path belongs to (for the error body).
pub fn protocol_of(path: &str) -> Protocol {
    if path.starts_with("/openai/") {
        Protocol::OpenAi
    } else if path.starts_with("/v2/") {
        Protocol::KserveV2
    } else {
        Protocol::KserveV1
    }
}

/// Middleware: 401 on protected routes without a valid `Authorization: Bearer` key.
pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let keys = &state.config().api_keys;
    if keys.is_empty() || !needs_key(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    match presented.and_then(|key| keys.find(key)) {
        Some(i) => {
            req.extensions_mut().insert(KeyIndex(i));
            next.run(req).await
        }
        None => ApiError::Unauthorized.into_response_for(protocol_of(req.uri().path())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_exactly() {
        let k = ApiKeys::new(&["secret-1".into(), " ".into(), "other".into()]).unwrap();
        assert!(k.accepts("secret-1"));
        assert!(k.accepts("other"));
        assert_eq!(k.find("other"), Some(1));
        assert_eq!(k.find("secret-1"), Some(0));
        assert!(!k.accepts("SECRET-1"));
        assert!(!k.accepts("secret-"));
        assert!(!k.accepts(""));
        assert!(ApiKeys::new(&[]).unwrap().is_empty());
        assert!(ApiKeys::new(&["a b".into()]).is_err());
    }

    #[test]
    fn which_routes_need_a_key() {
        assert!(needs_key(&Method::POST, "/v1/models/m:predict"));
        assert!(needs_key(&Method::GET, "/openai/v1/models"));
        assert!(!needs_key(&Method::GET, "/v1/models/m"));
        assert!(!needs_key(&Method::GET, "/metrics"));
    }
}
