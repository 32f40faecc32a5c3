//! Verification in Aperture's order, each failure distinct.

use std::collections::HashMap;

use automaton_l402::mint::{mint_with, MintRequest};
use automaton_l402::verify::{verify_with_keys, VerifyContext, VerifyError};
use automaton_l402::{
    format_authorization, parse_authorization, Credential, Identifier, Macaroon, Scheme, Service,
};
use sha2::Digest;

const NOW: u64 = 1_700_000_000;

struct Fixture {
    keys: HashMap<[u8; 32], [u8; 32]>,
    macaroon: Macaroon,
    preimage: [u8; 32],
}

fn fixture(services: &[Service], valid_until: Option<u64>) -> Fixture {
    let preimage = [0x33u8; 32];
    let payment_hash: [u8; 32] = sha2::Sha256::digest(preimage).into();
    let minted = mint_with(
        &MintRequest {
            payment_hash,
            services,
            capabilities: &[],
            valid_until,
        },
        [0x44; 32],
        [0x55; 32],
    );
    let mut keys = HashMap::new();
    keys.insert(minted.root_key_id, minted.root_key);
    Fixture {
        keys,
        macaroon: minted.macaroon,
        preimage,
    }
}

fn cred(m: &Macaroon, preimage: [u8; 32]) -> Credential {
    parse_authorization(&format_authorization(&m.to_base64(), &preimage)).unwrap()
}

fn ctx(service: &str) -> VerifyContext<'_> {
    VerifyContext {
        service,
        capability: None,
        now_unix: NOW,
    }
}

#[test]
fn valid_credential_verifies() {
    let f = fixture(&[Service::new("svc", 0)], Some(NOW + 60));
    let v = verify_with_keys(&cred(&f.macaroon, f.preimage), &ctx("svc"), &f.keys).unwrap();
    assert_eq!(v.valid_until, Some(NOW + 60));
    assert_eq!(
        v.identifier,
        Identifier::decode(f.macaroon.identifier()).unwrap()
    );
    assert_eq!(v.root_key_id, v.identifier.root_key_id());
}

#[test]
fn each_failure_in_order() {
    let f = fixture(&[Service::new("svc", 0)], Some(NOW + 60));
    // Wrong preimage is caught before the root key is even looked up.
    let mut looked_up = false;
    let err = automaton_l402::verify_credential(&cred(&f.macaroon, [0; 32]), &ctx("svc"), |_| {
        looked_up = true;
        None
    });
    assert_eq!(err, Err(VerifyError::PreimageMismatch));
    assert!(!looked_up);

    // Revoked: the root key is gone.
    assert_eq!(
        verify_with_keys(&cred(&f.macaroon, f.preimage), &ctx("svc"), &HashMap::new()),
        Err(VerifyError::UnknownRootKey)
    );

    // Tampered: a caveat stripped by re-encoding without it (signature no longer matches).
    let stripped = {
        let mut bin = Vec::new();
        let m = Macaroon::new(&[0x44; 32], f.macaroon.identifier().to_vec(), Some("lsat"));
        // Same identifier, no caveats, but carrying the original (caveated) signature.
        let mut b = m.to_binary();
        let sig_at = b.len() - 32;
        b[sig_at..].copy_from_slice(f.macaroon.signature());
        bin.extend(b);
        Macaroon::from_binary(&bin).unwrap()
    };
    assert!(matches!(
        verify_with_keys(&cred(&stripped, f.preimage), &ctx("svc"), &f.keys),
        Err(VerifyError::Signature(_))
    ));

    // Another service.
    assert_eq!(
        verify_with_keys(&cred(&f.macaroon, f.preimage), &ctx("other"), &f.keys),
        Err(VerifyError::ServiceNotAllowed {
            service: "other".into()
        })
    );

    // Expired: at and after valid_until.
    for now in [NOW + 60, NOW + 61] {
        let c = VerifyContext {
            now_unix: now,
            ..ctx("svc")
        };
        assert_eq!(
            verify_with_keys(&cred(&f.macaroon, f.preimage), &c, &f.keys),
            Err(VerifyError::Expired {
                valid_until: NOW + 60
            })
        );
    }

    // A bad identifier.
    let odd = Macaroon::new(&[1; 32], vec![0, 1, 2], None);
    assert!(matches!(
        verify_with_keys(&cred(&odd, f.preimage), &ctx("svc"), &f.keys),
        Err(VerifyError::Identifier(_))
    ));
}

#[test]
fn attenuation_only_narrows() {
    let f = fixture(
        &[Service::new("a", 0), Service::new("b", 0)],
        Some(NOW + 100),
    );
    // The holder narrows to service b and an earlier expiry: still valid for b, not for a.
    let mut narrowed = f.macaroon.clone();
    narrowed.add_first_party_caveat("services=b:0");
    narrowed.add_first_party_caveat(format!("b_valid_until={}", NOW + 10));
    let v = verify_with_keys(&cred(&narrowed, f.preimage), &ctx("b"), &f.keys).unwrap();
    assert_eq!(v.valid_until, Some(NOW + 10));
    assert_eq!(
        verify_with_keys(&cred(&narrowed, f.preimage), &ctx("a"), &f.keys),
        Err(VerifyError::ServiceNotAllowed {
            service: "a".into()
        })
    );
    // Widening is refused.
    let mut widened = f.macaroon.clone();
    widened.add_first_party_caveat("services=a:0,b:0,c:0");
    assert!(matches!(
        verify_with_keys(&cred(&widened, f.preimage), &ctx("a"), &f.keys),
        Err(VerifyError::InvalidAttenuation { .. })
    ));
    let mut later = f.macaroon.clone();
    later.add_first_party_caveat(format!("a_valid_until={}", NOW + 1000));
    assert!(matches!(
        verify_with_keys(&cred(&later, f.preimage), &ctx("a"), &f.keys),
        Err(VerifyError::InvalidAttenuation { .. })
    ));
    // Unknown and other services' caveats are skipped; malformed ones refused.
    let mut unknown = f.macaroon.clone();
    unknown.add_first_party_caveat("zz_monthly_volume_sats=5");
    unknown.add_first_party_caveat("b_valid_until=1");
    verify_with_keys(&cred(&unknown, f.preimage), &ctx("a"), &f.keys).unwrap();
    let mut malformed = f.macaroon.clone();
    malformed.add_first_party_caveat("no equals sign");
    assert!(matches!(
        verify_with_keys(&cred(&malformed, f.preimage), &ctx("a"), &f.keys),
        Err(VerifyError::InvalidCaveat(_))
    ));
    let mut bad_time = f.macaroon.clone();
    bad_time.add_first_party_caveat("a_valid_until=soon");
    assert!(matches!(
        verify_with_keys(&cred(&bad_time, f.preimage), &ctx("a"), &f.keys),
        Err(VerifyError::InvalidCaveat(_))
    ));
}

#[test]
fn capabilities_and_preimage_caveat() {
    let preimage = [0x33u8; 32];
    let payment_hash: [u8; 32] = sha2::Sha256::digest(preimage).into();
    let services = [Service::new("svc", 0)];
    let caps: &[&str] = &["read"];
    let minted = mint_with(
        &MintRequest {
            payment_hash,
            services: &services,
            capabilities: &[("svc", caps)],
            valid_until: None,
        },
        [1; 32],
        [2; 32],
    );
    let keys: HashMap<_, _> = [(minted.root_key_id, minted.root_key)].into();
    let read = VerifyContext {
        capability: Some("read"),
        ..ctx("svc")
    };
    let write = VerifyContext {
        capability: Some("write"),
        ..ctx("svc")
    };
    let c = cred(&minted.macaroon, preimage);
    assert!(verify_with_keys(&c, &read, &keys).is_ok());
    assert_eq!(
        verify_with_keys(&c, &write, &keys),
        Err(VerifyError::CapabilityNotAllowed {
            capability: "write".into()
        })
    );
    let mut with_wrong_preimage = minted.macaroon.clone();
    with_wrong_preimage.add_first_party_caveat(format!("preimage={}", hex::encode([9u8; 32])));
    assert_eq!(
        verify_with_keys(&cred(&with_wrong_preimage, preimage), &read, &keys),
        Err(VerifyError::PreimageMismatch)
    );
}

#[test]
fn any_of_several_tokens_may_verify() {
    let f = fixture(&[Service::new("svc", 0)], None);
    let stranger = Macaroon::new(
        &[9; 32],
        Identifier::new([0; 32], [0; 32]).encode().to_vec(),
        None,
    );
    let credential = Credential {
        scheme: Scheme::L402,
        macaroons: vec![stranger, f.macaroon.clone()],
        preimage: f.preimage,
    };
    let v = verify_with_keys(&credential, &ctx("svc"), &f.keys).unwrap();
    assert_eq!(v.macaroon_index, 1);
}
