//! Per-sandbox bearer tokens, terminal tokens and sealed values, all derived from one server
//! secret so that none needs storing.

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Per-sandbox bearer tokens derived from one server secret, so none needs storing.
#[derive(Clone)]
pub struct Tokens {
    secret: Vec<u8>,
}

impl Tokens {
    pub fn new(secret: Vec<u8>) -> Self {
        Tokens { secret }
    }

    pub fn for_sandbox(&self, sandbox_id: &str) -> String {
        self.derive("sandbox", sandbox_id)
    }

    /// A keyed digest of `purpose` and `value`.
    fn digest(&self, purpose: &str, value: &str) -> [u8; 32] {
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret) else {
            return [0; 32]; // HMAC takes keys of any length
        };
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(value.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// What tells two secrets apart without revealing either: a keyed digest of a fixed
    /// string, shortened (stored, so every replica can check it has the same secret).
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.digest("fingerprint", "server secret")[..12])
    }

    /// A keyed digest of `purpose` and `value`, in hex (tokens, tty attach tokens).
    pub fn derive(&self, purpose: &str, value: &str) -> String {
        hex::encode(self.digest(purpose, value))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(&self.digest("seal", "").into())
    }

    /// Encrypts a client's secret (a webhook token) under a key derived from the server secret,
    /// so the store only ever holds ciphertext. The result is `hex(nonce || ciphertext)`.
    pub fn seal(&self, plaintext: &str) -> String {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut chacha20poly1305::aead::OsRng);
        match self.cipher().encrypt(&nonce, plaintext.as_bytes()) {
            Ok(sealed) => hex::encode([nonce.as_slice(), &sealed].concat()),
            Err(_) => String::new(),
        }
    }

    /// Decrypts what `seal` produced; `None` if it was tampered with or the secret changed.
    pub fn open(&self, sealed: &str) -> Option<String> {
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() < 24 {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(24);
        let plain = self
            .cipher()
            .decrypt(XNonce::from_slice(nonce), ciphertext)
            .ok()?;
        String::from_utf8(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_sandbox_and_secret() {
        let a = Tokens::new(b"one".to_vec());
        let b = Tokens::new(b"two".to_vec());
        assert_eq!(a.for_sandbox("s1"), a.for_sandbox("s1"));
        assert_ne!(a.for_sandbox("s1"), a.for_sandbox("s2"));
        assert_ne!(a.for_sandbox("s1"), b.for_sandbox("s1"));
        assert_eq!(a.for_sandbox("s1").len(), 64);
    }

    #[test]
    fn sealed_secrets_open_only_with_the_same_secret_and_intact() {
        let a = Tokens::new(b"one".to_vec());
        let sealed = a.seal("hook-token");
        assert!(!sealed.contains("hook-token"));
        assert_ne!(sealed, a.seal("hook-token"), "a fresh nonce each time");
        assert_eq!(a.open(&sealed).as_deref(), Some("hook-token"));
        assert_eq!(Tokens::new(b"two".to_vec()).open(&sealed), None);
        let mut tampered = sealed.clone().into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(a.open(&String::from_utf8(tampered).expect("hex")), None);
        assert_eq!(a.open("zz"), None);
        assert_eq!(a.open(""), None);
    }
}
