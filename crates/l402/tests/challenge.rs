//! Table tests over every challenge and credential form of specs/l402.md §1–2 and §8, and garbage that must
//! never panic.

use automaton_l402::challenge::{parse_auth_challenges, AuthChallenge};
use automaton_l402::{
    challenge_headers, format_authorization, format_challenge_v0, parse_authorization,
    parse_challenges, parse_macaroon_header, preferred, Challenge, ChallengeError, CredentialError,
    Macaroon, Scheme, TokenParam,
};

const MAC: &str = "AgEEbHNhdAJCAAAC1EmjH7smfI81Lplop54+X8lcG76qUC/WRU695aS+3Kurq6urq6urq6urq6urq6urq6urq6urq6urq6urq6urAAIdc2VydmljZXM9c3RhdHVzLWF0dGVzdGF0aW9uOjAAAilzdGF0dXMtYXR0ZXN0YXRpb25fdmFsaWRfdW50aWw9MTcwMDAwMDAwMAAABiCZ/0H1j94GIPyGjCqd6ZTSkcUAT1y7isHr3Pp1cCC/fQ==";
const INV: &str = "lnbcrt210n1pjexample";

fn one(scheme: Scheme, token: &str, param: TokenParam, version: Option<&str>) -> Challenge {
    Challenge {
        scheme,
        token: token.to_string(),
        token_param: param,
        invoice: INV.to_string(),
        version: version.map(str::to_string),
    }
}

#[test]
fn every_challenge_form_in_the_spec() {
    use Scheme::*;
    use TokenParam::*;
    let mac_unpadded = MAC.trim_end_matches('=');
    let cases: Vec<(Vec<String>, Vec<Challenge>)> = vec![
        // Deployed legacy form.
        (
            vec![format!(r#"L402 macaroon="{MAC}", invoice="{INV}""#)],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        // Current spec form with version and token=.
        (
            vec![format!(
                r#"L402 version="0", token="{MAC}", invoice="{INV}""#
            )],
            vec![one(L402, MAC, Token, Some("0"))],
        ),
        // LSAT, lowercase scheme, mixed-case names.
        (
            vec![format!(r#"lsat Macaroon="{MAC}", INVOICE="{INV}""#)],
            vec![one(Lsat, MAC, Macaroon, None)],
        ),
        (
            vec![format!(r#"l402 macaroon="{MAC}",invoice="{INV}""#)],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        // Any order, unknown parameters ignored.
        (
            vec![format!(
                r#"L402 invoice="{INV}", foo="bar, baz", macaroon="{MAC}", version=0"#
            )],
            vec![one(L402, MAC, Macaroon, Some("0"))],
        ),
        // Unquoted values (base64 padding stays), whitespace around = and ,.
        (
            vec![format!("L402 macaroon = {MAC} ,  invoice =\t{INV}")],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        (
            vec![format!("L402 macaroon={MAC},invoice={INV}")],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        // token preferred over macaroon when both are present, in either order.
        (
            vec![format!(
                r#"L402 macaroon="other", token="{MAC}", invoice="{INV}""#
            )],
            vec![one(L402, MAC, Token, None)],
        ),
        (
            vec![format!(
                r#"L402 token="{MAC}", macaroon="other", invoice="{INV}""#
            )],
            vec![one(L402, MAC, Token, None)],
        ),
        // Aperture's two headers, LSAT first.
        (
            challenge_headers(MAC, INV).to_vec(),
            vec![
                one(Lsat, MAC, Macaroon, None),
                one(L402, MAC, Macaroon, None),
            ],
        ),
        // Folded into one header beside another scheme (MPP Payment, Basic with a token68, Bearer).
        (
            vec![format!(
                r#"Payment id="abc", realm="x", method="lightning", intent="charge", request="eyJh", L402 macaroon="{MAC}", invoice="{INV}""#
            )],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        (
            vec![format!(
                r#"Basic YWxhZGRpbjpvcGVuc2VzYW1l==, LSAT macaroon="{MAC}", invoice="{INV}", Bearer realm="r""#
            )],
            vec![one(Lsat, MAC, Macaroon, None)],
        ),
        (
            vec![format!(
                r#"LSAT macaroon="{MAC}", invoice="{INV}", L402 macaroon="{MAC}", invoice="{INV}""#
            )],
            vec![
                one(Lsat, MAC, Macaroon, None),
                one(L402, MAC, Macaroon, None),
            ],
        ),
        // Several headers, one of them not L402.
        (
            vec![
                "Bearer realm=\"api\"".to_string(),
                format!(r#"L402 macaroon="{MAC}", invoice="{INV}""#),
            ],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        // URL-safe / unpadded tokens are kept as sent (decoding is lenient).
        (
            vec![format!(
                r#"L402 macaroon="{mac_unpadded}", invoice="{INV}""#
            )],
            vec![one(L402, mac_unpadded, Macaroon, None)],
        ),
        // Escapes inside quoted strings; space-separated parameters without commas.
        (
            vec![format!(
                r#"L402 realm="a \"quoted\" realm" macaroon="{MAC}" invoice="{INV}""#
            )],
            vec![one(L402, MAC, Macaroon, None)],
        ),
        // The spec's own v0 formatter.
        (
            vec![format_challenge_v0(MAC, INV)],
            vec![one(L402, MAC, Token, Some("0"))],
        ),
    ];
    for (headers, expected) in cases {
        let got = parse_challenges(headers.iter().map(String::as_str));
        assert_eq!(got.as_ref().ok(), Some(&expected), "headers: {headers:?}");
        let chosen = preferred(&expected).unwrap();
        if expected.iter().any(|c| c.scheme == Scheme::L402) {
            assert_eq!(chosen.scheme, Scheme::L402);
        }
    }
}

#[test]
fn challenges_without_what_we_need_say_why() {
    let cases: Vec<(Vec<&str>, ChallengeError)> = vec![
        (vec![], ChallengeError::NoHeader),
        (vec![""], ChallengeError::NoL402Challenge),
        (vec!["Bearer realm=\"x\""], ChallengeError::NoL402Challenge),
        (vec!["L402 invoice=\"lnbc1\""], ChallengeError::MissingToken),
        (
            vec!["L402 macaroon=\"\", invoice=\"lnbc1\""],
            ChallengeError::MissingToken,
        ),
        (
            vec!["L402 macaroon=\"AgE\""],
            ChallengeError::MissingInvoice,
        ),
        (
            vec!["L402 macaroon=\"AgE\", invoice=\"  \""],
            ChallengeError::MissingInvoice,
        ),
        (
            vec!["L402X macaroon=\"AgE\", invoice=\"lnbc1\""],
            ChallengeError::NoL402Challenge,
        ),
        (
            vec!["macaroon=\"AgE\", invoice=\"lnbc1\""],
            ChallengeError::NoL402Challenge,
        ),
    ];
    for (headers, expected) in cases {
        assert_eq!(
            parse_challenges(headers.iter().copied()),
            Err(expected.clone()),
            "{headers:?}"
        );
    }
}

#[test]
fn challenge_token_decodes_and_exposes_its_payment_hash() {
    let challenges =
        parse_challenges([format!(r#"L402 macaroon="{MAC}", invoice="{INV}""#).as_str()]).unwrap();
    assert_eq!(
        hex::encode(challenges[0].payment_hash().unwrap()),
        "02d449a31fbb267c8f352e9968a79e3e5fc95c1bbeaa502fd6454ebde5a4bedc"
    );
    let bad =
        parse_challenges([r#"L402 macaroon="bm90IGEgbWFjYXJvb24=", invoice="lnbc1""#]).unwrap();
    assert!(matches!(
        bad[0].payment_hash(),
        Err(ChallengeError::BadToken(_))
    ));
    let plain = Macaroon::new(b"k", b"not 66 bytes".to_vec(), None).to_base64();
    let bad_id =
        parse_challenges([format!(r#"L402 macaroon="{plain}", invoice="lnbc1""#).as_str()])
            .unwrap();
    assert_eq!(bad_id[0].payment_hash(), Err(ChallengeError::BadIdentifier));
    // Debug never shows the token.
    assert!(!format!("{:?}", challenges[0]).contains(MAC));
}

#[test]
fn generic_rfc7235_parsing() {
    let got = parse_auth_challenges(
        r#"Newauth realm="apps", type=1, title="Login to \"apps\"", Basic realm="simple""#,
    );
    assert_eq!(
        got,
        vec![
            AuthChallenge {
                scheme: "Newauth".into(),
                token68: None,
                params: vec![
                    ("realm".into(), "apps".into()),
                    ("type".into(), "1".into()),
                    ("title".into(), "Login to \"apps\"".into())
                ],
            },
            AuthChallenge {
                scheme: "Basic".into(),
                token68: None,
                params: vec![("realm".into(), "simple".into())]
            },
        ]
    );
    let got = parse_auth_challenges("Negotiate abc=, NTLM, Bearer");
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].token68.as_deref(), Some("abc="));
    assert_eq!(got[1].scheme, "NTLM");
    assert_eq!(got[2].scheme, "Bearer");
}

#[test]
fn garbage_never_panics_and_never_yields_a_challenge() {
    let long = "L402 ".repeat(20_000);
    let nested = "\"".repeat(1000);
    let cases = [
        "",
        ",,,,",
        "=",
        "====",
        "\"",
        "\"unterminated",
        "L402",
        "L402 ",
        "L402 =",
        "L402 macaroon",
        "L402 macaroon=",
        "L402 macaroon=\"",
        "L402 macaroon=\"\\",
        "L402 , , invoice",
        "L402 macaroon=\"a\" invoice",
        "\u{0}\u{1}\u{ff}",
        "L402\tmacaroon=a,invoice=",
        long.as_str(),
        nested.as_str(),
    ];
    for case in cases {
        let _ = parse_auth_challenges(case);
        assert!(parse_challenges([case]).is_err(), "{case:?}");
    }
    // Syntactically a challenge, but its token is no macaroon: the buyer finds out before paying.
    let emoji = parse_challenges(["L402 macaroon=\u{1F600}, invoice=\u{1F600}\u{0}"]).unwrap();
    assert!(matches!(
        emoji[0].payment_hash(),
        Err(ChallengeError::BadToken(_))
    ));
    // Every prefix of a valid header is handled.
    let valid = format!(
        r#"LSAT macaroon="{MAC}", invoice="{INV}", L402 version="0", token="{MAC}", invoice="{INV}""#
    );
    for end in 0..valid.len() {
        let _ = parse_challenges([&valid[..end]]);
    }
    // Oversized headers are not looked at.
    let huge = format!(
        r#"L402 macaroon="{MAC}", invoice="{INV}", x="{}""#,
        "a".repeat(70_000)
    );
    assert!(parse_challenges([huge.as_str()]).is_err());
}

#[test]
fn credential_forms() {
    let preimage = [0x5a; 32];
    let hex_lower = hex::encode(preimage);
    let hex_upper = hex_lower.to_uppercase();
    let expected = Macaroon::from_base64(MAC).unwrap();
    assert_eq!(
        format_authorization(MAC, &preimage),
        format!("L402 {MAC}:{hex_lower}")
    );
    let ok_cases = [
        format!("L402 {MAC}:{hex_lower}"),
        format!("LSAT {MAC}:{hex_lower}"),
        format!("l402   {MAC}:{hex_upper}"),
        format!("  L402 {MAC}:{hex_lower}  "),
        format!("L402 {}:{hex_lower}", MAC.trim_end_matches('=')),
        format!("L402 not-base64!,{MAC}:{hex_lower}"),
    ];
    for case in &ok_cases {
        let cred = parse_authorization(case).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(cred.preimage, preimage);
        assert_eq!(cred.macaroons, vec![expected.clone()], "{case}");
    }
    let two = parse_authorization(&format!("L402 {MAC},{MAC}:{hex_lower}")).unwrap();
    assert_eq!(two.macaroons.len(), 2);
    assert_eq!(
        parse_authorization(&format!("LSAT {MAC}:{hex_lower}"))
            .unwrap()
            .scheme,
        Scheme::Lsat
    );

    let err_cases = [
        (
            format!("Bearer {MAC}:{hex_lower}"),
            CredentialError::NotL402,
        ),
        ("L402".to_string(), CredentialError::NotL402),
        (format!("L402 {MAC}"), CredentialError::MissingPreimage),
        (
            format!("L402 {MAC}:{}", &hex_lower[..62]),
            CredentialError::BadPreimage,
        ),
        (
            format!("L402 {MAC}:{}zz", &hex_lower[..62]),
            CredentialError::BadPreimage,
        ),
        (
            format!("L402 :{hex_lower}"),
            CredentialError::MissingMacaroon,
        ),
        (
            format!("L402 ,,:{hex_lower}"),
            CredentialError::MissingMacaroon,
        ),
    ];
    for (case, expected) in err_cases {
        assert_eq!(parse_authorization(&case), Err(expected), "{case}");
    }
    assert!(matches!(
        parse_authorization(&format!("L402 ***:{hex_lower}")),
        Err(CredentialError::BadMacaroon(_))
    ));
    // Debug redacts the preimage.
    let cred = parse_authorization(&ok_cases[0]).unwrap();
    assert!(!format!("{cred:?}").contains(&hex_lower));
}

#[test]
fn macaroon_header_with_preimage_caveat() {
    let preimage = [0x42u8; 32];
    let mut m = Macaroon::from_base64(MAC).unwrap();
    m.add_first_party_caveat(format!("preimage={}", hex::encode(preimage)));
    let cred = parse_macaroon_header(&hex::encode(m.to_binary())).unwrap();
    assert_eq!(cred.preimage, preimage);
    let plain = Macaroon::from_base64(MAC).unwrap();
    assert_eq!(
        parse_macaroon_header(&hex::encode(plain.to_binary())),
        Err(CredentialError::NoPreimageCaveat)
    );
    assert!(parse_macaroon_header("zz").is_err());
}
