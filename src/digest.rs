//! SHA-256 digests: how keys are stored and looked up, and how files are fingerprinted.
//! Below both the config (which stores key digests) and auth (which hashes presented keys).

/// SHA-256 digest of an API key: the only form in which keys are stored.
pub type KeyDigest = [u8; 32];

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> KeyDigest {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Lower-case hex, for digests.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}
