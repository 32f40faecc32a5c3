//! The fuzz targets' bodies (`fuzz/`), here so ordinary tests run the same code over a generated corpus.

use crate::{challenge, credential, macaroon::Macaroon, verify};

/// Feeds arbitrary bytes to every parser; none may panic. Anything that parses is re-encoded and re-parsed.
pub fn parse_everything(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let headers: Vec<&str> = text.split('\n').collect();
    if let Ok(challenges) = challenge::parse_challenges(headers.iter().copied()) {
        for c in &challenges {
            let _ = c.payment_hash();
            let again = challenge::parse_challenges([c.to_header_value().as_str()]);
            assert!(
                again.is_ok(),
                "a formatted challenge must parse: {:?} -> {:?}",
                c.to_header_value(),
                again
            );
        }
    }
    for header in &headers {
        let _ = challenge::parse_auth_challenges(header);
        if let Ok(cred) = credential::parse_authorization(header) {
            let ctx = verify::VerifyContext {
                service: "svc",
                capability: None,
                now_unix: 0,
            };
            let _ = verify::verify_credential(&cred, &ctx, |_| Some([0u8; 32]));
        }
        let _ = credential::parse_macaroon_header(header);
    }
    if let Ok(m) = Macaroon::from_binary(data) {
        let again = Macaroon::from_binary(&m.to_binary());
        assert!(again.is_ok(), "a re-encoded macaroon must decode");
        let _ = m.verify_signature(&[0u8; 32]);
    }
}
