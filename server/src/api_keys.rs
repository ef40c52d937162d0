/*!
API keys: the configured keys, kept as SHA-256 digests, and the lookup of a presented key.

A presented key is hashed and compared with every configured digest in constant time
(`subtle`), so the comparison reveals neither a key's content nor its length, and no early
exit tells which key came close. This module knows nothing of HTTP; [`crate::auth`] is the
middleware that asks it.
*/

use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// An `--api-key` that could never be sent in an `Authorization` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--api-key number {position}: keys must not contain spaces or control characters")]
pub struct BadApiKey {
    /// The key's position among the flags, from 1.
    pub position: usize,
}

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
    pub fn new(keys: &[String]) -> Result<Self, BadApiKey> {
        let mut digests = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let k = k.trim();
            if k.is_empty() {
                continue;
            }
            if k.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(BadApiKey { position: i + 1 });
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
}
