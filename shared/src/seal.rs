//! NaCl box sealing of inference requests and response chunks.
//!
//! The primitive is `crypto_box` (X25519, HSalsa20, XSalsa20-Poly1305), the same
//! crate the provider agent uses. A sealed message on the wire is standard base64
//! (with padding) of a fresh random 24-byte nonce followed by the box output.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use crypto_box::aead::{Aead, AeadCore, OsRng};
use crypto_box::{PublicKey, SalsaBox, SecretKey};

use crate::protocol::EncryptedPayload;

const NONCE_LEN: usize = 24;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("public key is not base64 of 32 bytes")]
    InvalidPublicKey,
    #[error("ciphertext is not valid base64")]
    InvalidBase64,
    #[error("ciphertext is shorter than its nonce and tag")]
    TooShort,
    #[error("box could not be opened with these keys")]
    OpenFailed,
}

/// An X25519 key pair. A coordinator makes a fresh one for every dispatch attempt,
/// so a request's plaintext cannot be recovered from another request's keys.
pub struct KeyPair {
    secret: SecretKey,
}

impl KeyPair {
    pub fn generate() -> Self {
        Self {
            secret: SecretKey::generate(&mut OsRng),
        }
    }

    /// Returns the public half as standard base64 (44 characters).
    pub fn public_base64(&self) -> String {
        BASE64.encode(self.secret.public_key().as_bytes())
    }

    /// Seals `plaintext` to `recipient` and returns the wire payload, whose
    /// `ephemeral_public_key` is this pair's public key.
    pub fn seal(&self, recipient: &PeerKey, plaintext: &[u8]) -> EncryptedPayload {
        let salsa = SalsaBox::new(&recipient.0, &self.secret);
        let nonce = SalsaBox::generate_nonce(&mut OsRng);
        let sealed = salsa
            .encrypt(&nonce, plaintext)
            .expect("XSalsa20-Poly1305 encryption of an in-memory buffer cannot fail");

        let mut wire = Vec::with_capacity(NONCE_LEN + sealed.len());
        wire.extend_from_slice(nonce.as_slice());
        wire.extend_from_slice(&sealed);

        EncryptedPayload {
            ephemeral_public_key: self.public_base64(),
            ciphertext: BASE64.encode(wire),
        }
    }

    /// Opens base64 `ciphertext` that `sender` sealed to this pair.
    pub fn open(&self, sender: &PeerKey, ciphertext: &str) -> Result<Vec<u8>, SealError> {
        let wire = BASE64
            .decode(ciphertext)
            .map_err(|_| SealError::InvalidBase64)?;
        if wire.len() < NONCE_LEN + 16 {
            return Err(SealError::TooShort);
        }

        let (nonce, sealed) = wire.split_at(NONCE_LEN);
        let salsa = SalsaBox::new(&sender.0, &self.secret);
        salsa
            .decrypt(nonce.into(), sealed)
            .map_err(|_| SealError::OpenFailed)
    }
}

/// The public X25519 key of the other side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerKey(PublicKey);

impl PeerKey {
    /// Parses standard base64 of exactly 32 bytes.
    pub fn from_base64(encoded: &str) -> Result<Self, SealError> {
        let bytes = BASE64
            .decode(encoded)
            .map_err(|_| SealError::InvalidPublicKey)?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| SealError::InvalidPublicKey)?;
        Ok(Self(PublicKey::from(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trip() {
        let coordinator = KeyPair::generate();
        let provider = KeyPair::generate();
        let provider_key = PeerKey::from_base64(&provider.public_base64()).unwrap();
        let coordinator_key = PeerKey::from_base64(&coordinator.public_base64()).unwrap();

        let payload = coordinator.seal(&provider_key, b"{\"model\":\"m\"}");
        assert_eq!(payload.ephemeral_public_key, coordinator.public_base64());

        let opened = provider
            .open(&coordinator_key, &payload.ciphertext)
            .unwrap();
        assert_eq!(opened, b"{\"model\":\"m\"}");
    }

    #[test]
    fn wire_layout_is_nonce_tag_and_body() {
        let sender = KeyPair::generate();
        let recipient = KeyPair::generate();
        let recipient_key = PeerKey::from_base64(&recipient.public_base64()).unwrap();

        let payload = sender.seal(&recipient_key, b"hello");
        let wire = BASE64.decode(&payload.ciphertext).unwrap();
        assert_eq!(wire.len(), 24 + 16 + 5);
        assert_eq!(payload.ephemeral_public_key.len(), 44);
    }

    #[test]
    fn nonces_differ_between_seals() {
        let sender = KeyPair::generate();
        let recipient_key = PeerKey::from_base64(&KeyPair::generate().public_base64()).unwrap();
        let first = sender.seal(&recipient_key, b"same");
        let second = sender.seal(&recipient_key, b"same");
        assert_ne!(first.ciphertext, second.ciphertext);
    }

    #[test]
    fn open_with_wrong_key_fails() {
        let sender = KeyPair::generate();
        let recipient = KeyPair::generate();
        let stranger = KeyPair::generate();
        let recipient_key = PeerKey::from_base64(&recipient.public_base64()).unwrap();
        let sender_key = PeerKey::from_base64(&sender.public_base64()).unwrap();

        let payload = sender.seal(&recipient_key, b"secret");
        assert_eq!(
            stranger.open(&sender_key, &payload.ciphertext),
            Err(SealError::OpenFailed)
        );
    }

    #[test]
    fn open_rejects_tampered_and_short_input() {
        let sender = KeyPair::generate();
        let recipient = KeyPair::generate();
        let recipient_key = PeerKey::from_base64(&recipient.public_base64()).unwrap();
        let sender_key = PeerKey::from_base64(&sender.public_base64()).unwrap();

        let payload = sender.seal(&recipient_key, b"secret");
        let mut wire = BASE64.decode(&payload.ciphertext).unwrap();
        let last = wire.len() - 1;
        wire[last] ^= 1;
        assert_eq!(
            recipient.open(&sender_key, &BASE64.encode(&wire)),
            Err(SealError::OpenFailed)
        );
        assert_eq!(
            recipient.open(&sender_key, "AAAA"),
            Err(SealError::TooShort)
        );
        assert_eq!(
            recipient.open(&sender_key, "data: {}"),
            Err(SealError::InvalidBase64)
        );
    }

    #[test]
    fn peer_key_must_be_32_bytes() {
        assert_eq!(
            PeerKey::from_base64("AAAA"),
            Err(SealError::InvalidPublicKey)
        );
        assert_eq!(
            PeerKey::from_base64("not base64!"),
            Err(SealError::InvalidPublicKey)
        );
    }
}
