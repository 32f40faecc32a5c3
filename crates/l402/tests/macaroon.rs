//! Macaroon codec and signatures, pinned to vectors computed independently from the libmacaroons algorithm.

use automaton_l402::identifier::{root_key_id, Identifier};
use automaton_l402::macaroon::{decode_base64_lenient, derive_key, Macaroon, MacaroonError};
use automaton_l402::mint::{mint_with, MintRequest};
use automaton_l402::Service;
use base64::Engine as _;

const SECRET: &[u8] = b"this is our super secret key; only we should know it";

/// libmacaroons' README example: `macaroons.create('http://mybank/', secret, 'we used our secret key')`.
/// Signatures from the README, re-computed with Python's hmac (key = HMAC("macaroons-key-generator", secret)).
#[test]
fn libmacaroons_readme_signatures() {
    let mut m = Macaroon::new(
        SECRET,
        b"we used our secret key".to_vec(),
        Some("http://mybank/"),
    );
    assert_eq!(
        hex::encode(m.signature()),
        "e3d9e02908526c4c0039ae15114115d97fdd68bf2ba379b342aaf0f617d0552f"
    );
    m.add_first_party_caveat("account = 3735928559");
    assert_eq!(
        hex::encode(m.signature()),
        "1efe4763f290dbce0c1d08477367e11f4eee456a64933cf662d79772dbb82128"
    );
    // The V2 binary form, built by hand from the format (version 2; fields type, uvarint length, data; EOS 0).
    let expected = "AgEOaHR0cDovL215YmFuay8CFndlIHVzZWQgb3VyIHNlY3JldCBrZXkAAhRhY2NvdW50ID0gMzczNTkyODU1OQAABiAe/kdj8pDbzgwdCEdzZ+EfTu5FamSTPPZi15dy27ghKA==";
    assert_eq!(m.to_base64(), expected);
    let back = Macaroon::from_base64(expected).unwrap();
    assert_eq!(back, m);
    back.verify_signature(SECRET).unwrap();
    assert_eq!(
        back.verify_signature(b"another key"),
        Err(MacaroonError::BadSignature)
    );
}

#[test]
fn derived_key_is_hmac_with_the_generator_string() {
    assert_eq!(
        derive_key(SECRET),
        automaton_l402::macaroon::hmac_sha256(b"macaroons-key-generator", SECRET)
    );
}

/// An L402 macaroon as Aperture mints one (location `lsat`, 66-byte identifier, services + valid_until),
/// with a fixed root key and token id. Expected bytes and signature computed with Python's hmac/base64.
#[test]
fn l402_mint_vector() {
    let root_key: [u8; 32] = core::array::from_fn(|i| i as u8);
    let payment_hash: [u8; 32] = sha2_of(&[0x11; 32]);
    assert_eq!(
        hex::encode(payment_hash),
        "02d449a31fbb267c8f352e9968a79e3e5fc95c1bbeaa502fd6454ebde5a4bedc"
    );
    let services = [Service::new("status-attestation", 0)];
    let minted = mint_with(
        &MintRequest {
            payment_hash,
            services: &services,
            capabilities: &[],
            valid_until: Some(1_700_000_000),
        },
        root_key,
        [0xab; 32],
    );
    assert_eq!(
        hex::encode(minted.macaroon.signature()),
        "99ff41f58fde0620fc868c2a9de994d291c5004f5cbb8ac1ebdcfa757020bf7d"
    );
    let expected = "AgEEbHNhdAJCAAAC1EmjH7smfI81Lplop54+X8lcG76qUC/WRU695aS+3Kurq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urAAIdc2VydmljZXM9c3RhdHVzLWF0dGVzdGF0aW9uOjAAAilzdGF0dXMtYXR0ZXN0YXRpb25fdmFsaWRfdW50aWw9MTcwMDAwMDAwMAAABiCZ/0H1j94GIPyGjCqd6ZTSkcUAT1y7isHr3Pp1cCC/fQ==";
    assert_eq!(minted.macaroon.to_base64(), expected);
    assert_eq!(minted.root_key_id, root_key_id(&minted.identifier.encode()));
    let id = Identifier::decode(minted.macaroon.identifier()).unwrap();
    assert_eq!(id.payment_hash, payment_hash);
    assert_eq!(id.token_id, [0xab; 32]);
    let caveats: Vec<String> = minted
        .macaroon
        .first_party_caveats()
        .map(|c| c.into_owned())
        .collect();
    assert_eq!(
        caveats,
        [
            "services=status-attestation:0",
            "status-attestation_valid_until=1700000000"
        ]
    );
}

fn sha2_of(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

#[test]
fn roundtrip_with_many_caveats_long_fields_and_third_party() {
    let mut m = Macaroon::new(&[7u8; 32], vec![0u8; 300], None);
    for i in 0..50 {
        m.add_first_party_caveat(format!("cond{i}={}", "v".repeat(i * 7)));
    }
    let bin = m.to_binary();
    assert_eq!(Macaroon::from_binary(&bin).unwrap(), m);
    m.verify_signature(&[7u8; 32]).unwrap();

    // A third-party caveat (with vid and location) decodes and re-encodes byte for byte, but does not verify.
    let mut bytes = vec![2u8];
    bytes.extend([2, 3, b'a', b'b', b'c', 0]);
    bytes.extend([
        1, 4, b'h', b'o', b's', b't', 2, 3, b'c', b'i', b'd', 4, 2, 9, 9, 0,
    ]);
    bytes.push(0);
    bytes.push(6);
    bytes.push(32);
    bytes.extend([5u8; 32]);
    let third = Macaroon::from_binary(&bytes).unwrap();
    assert_eq!(third.caveats()[0].location.as_deref(), Some("host"));
    assert_eq!(
        third.caveats()[0].verification_id.as_deref(),
        Some(&[9u8, 9][..])
    );
    assert_eq!(third.to_binary(), bytes);
    assert_eq!(
        third.verify_signature(b"k"),
        Err(MacaroonError::ThirdPartyCaveat)
    );
}

#[test]
fn base64_forms_are_all_accepted() {
    let m = Macaroon::new(b"k", b"id".to_vec(), Some("lsat"));
    let bin = m.to_binary();
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    for text in [
        STANDARD.encode(&bin),
        STANDARD_NO_PAD.encode(&bin),
        URL_SAFE.encode(&bin),
        URL_SAFE_NO_PAD.encode(&bin),
        format!("  {}\n", STANDARD.encode(&bin)),
    ] {
        assert_eq!(Macaroon::from_base64(&text).unwrap(), m, "{text}");
    }
    assert_eq!(Macaroon::from_base64("***"), Err(MacaroonError::Base64));
    assert!(decode_base64_lenient("a").is_none());
}

#[test]
fn v1_packets_decode() {
    fn packet(key: &str, value: &[u8]) -> Vec<u8> {
        let len = 4 + key.len() + 1 + value.len() + 1;
        let mut out = format!("{len:04x}{key} ").into_bytes();
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }
    let mut m = Macaroon::new(
        SECRET,
        b"we used our secret key".to_vec(),
        Some("http://mybank/"),
    );
    m.add_first_party_caveat("account = 3735928559");
    let mut v1 = packet("location", b"http://mybank/");
    v1.extend(packet("identifier", b"we used our secret key"));
    v1.extend(packet("cid", b"account = 3735928559"));
    v1.extend(packet("signature", m.signature()));
    let decoded = Macaroon::from_binary(&v1).unwrap();
    assert_eq!(decoded, m);
    decoded.verify_signature(SECRET).unwrap();
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(&v1);
    assert_eq!(Macaroon::from_base64(&encoded).unwrap(), m);
}

#[test]
fn malformed_binaries_are_errors_not_panics() {
    let good = Macaroon::new(b"k", b"identifier".to_vec(), Some("lsat")).to_binary();
    // Every truncation and every single-byte corruption decodes to an error or a different macaroon.
    for end in 0..good.len() {
        assert!(
            Macaroon::from_binary(&good[..end]).is_err(),
            "truncated at {end}"
        );
    }
    for i in 0..good.len() {
        for b in [0u8, 1, 2, 6, 0x7f, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[i] = b;
            let _ = Macaroon::from_binary(&bad);
        }
    }
    let cases: &[(&[u8], MacaroonError)] = &[
        (b"", MacaroonError::Empty),
        (&[3, 0], MacaroonError::UnknownVersion(3)),
        (
            &[2, 0],
            MacaroonError::Malformed("section without identifier"),
        ),
        (
            &[
                2, 2, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            MacaroonError::Malformed("field length overflows"),
        ),
        (&[2, 2, 100, 1], MacaroonError::Malformed("truncated")),
        (
            &[2, 2, 1, b'x', 1, 1, b'y', 0],
            MacaroonError::Malformed("fields out of order or repeated"),
        ),
        (
            &[2, 2, 1, b'x', 0, 0, 6, 3, 1, 2, 3],
            MacaroonError::Malformed("signature is not 32 bytes"),
        ),
        (
            &[2, 2, 1, b'x', 4, 1, 1, 0],
            MacaroonError::Malformed("unexpected field"),
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(
            Macaroon::from_binary(bytes).as_ref().err(),
            Some(expected),
            "{bytes:?}"
        );
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(
        Macaroon::from_binary(&trailing),
        Err(MacaroonError::Malformed(
            "trailing bytes after the signature"
        ))
    );
    let huge = vec![2u8; automaton_l402::macaroon::MAX_MACAROON_BYTES + 1];
    assert_eq!(Macaroon::from_binary(&huge), Err(MacaroonError::TooLarge));
}

#[test]
fn tampering_breaks_the_signature() {
    let key = [9u8; 32];
    let mut m = Macaroon::new(&key, b"id".to_vec(), Some("lsat"));
    m.add_first_party_caveat("services=a:0");
    m.add_first_party_caveat("a_valid_until=100");
    let bin = m.to_binary();
    // Flip every bit that lands in the identifier, a caveat or the signature: decoded ones never verify.
    for i in 1..bin.len() {
        for bit in 0..8 {
            let mut bad = bin.clone();
            bad[i] ^= 1 << bit;
            if let Ok(decoded) = Macaroon::from_binary(&bad) {
                // The location is not signed (libmacaroons: it is a hint), so only other changes must fail.
                let same_signed_content = decoded.identifier() == m.identifier()
                    && decoded.caveats() == m.caveats()
                    && decoded.signature() == m.signature();
                if !same_signed_content {
                    assert!(
                        decoded.verify_signature(&key).is_err(),
                        "byte {i} bit {bit}"
                    );
                }
            }
        }
    }
}

#[test]
fn debug_redacts_signature_and_preimage_caveats() {
    let mut m = Macaroon::new(b"k", b"id".to_vec(), None);
    m.add_first_party_caveat(format!("preimage={}", "ab".repeat(32)));
    let debug = format!("{m:?}");
    assert!(!debug.contains(&"ab".repeat(32)));
    assert!(!debug.contains(&hex::encode(m.signature())));
}
