//! Every refusal is produced by a real token built for it: signed with jsonwebtoken and the
//! committed test keys in `tests/data/auth/` (throwaway keys, see the README there).

use std::collections::HashSet;
use std::path::PathBuf;

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const NOW: u64 = 2_000_000_000;
const USER: u64 = 1001;
const SECRET: &[u8] = b"test-secret-0123456789abcdef-0123456789";

macro_rules! key_file {
    ($name:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/auth/",
            $name
        ))
    };
}

const RSA_PRIVATE: &[u8] = key_file!("rsa_private.pem");
const RSA_PUBLIC: &[u8] = key_file!("rsa_public.pem");
const RSA_PUBLIC_PKCS1: &[u8] = key_file!("rsa_public_pkcs1.pem");
const RSA_OTHER_PRIVATE: &[u8] = key_file!("rsa_other_private.pem");
const RSA1024_PUBLIC: &[u8] = key_file!("rsa1024_public.pem");
const EC_PRIVATE: &[u8] = key_file!("ec_private.pem");
const EC_PUBLIC: &[u8] = key_file!("ec_public.pem");
const EC_OTHER_PRIVATE: &[u8] = key_file!("ec_other_private.pem");
const EC_P384_PUBLIC: &[u8] = key_file!("ec_p384_public.pem");

/// base64url of `{"alg":"none","typ":"JWT"}`.
const NONE_HEADER: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
/// base64url of `{"alg":"None"}`.
const NONE_CAPS_HEADER: &str = "eyJhbGciOiJOb25lIn0";
/// base64url of `{"alg":"RS256","typ":"JWT"}`.
const RS256_HEADER: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9";
/// base64url of `not json`.
const NOT_JSON_HEADER: &str = "bm90IGpzb24";
/// base64url of `{"typ":"JWT"}` (no alg).
const NO_ALG_HEADER: &str = "eyJ0eXAiOiJKV1QifQ";

// ---- helpers ----------------------------------------------------------------------------

/// The claims of a good token for USER at NOW.
fn base() -> Value {
    json!({ "sub": USER.to_string(), "exp": NOW + 3600, "iat": NOW })
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims
        .as_object_mut()
        .unwrap()
        .insert(name.to_string(), value);
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

fn encode_with(alg: jsonwebtoken::Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs_key(secret: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(secret).unwrap()
}

/// An HS256 token over `claims` with SECRET.
fn hs(claims: &Value) -> String {
    encode_with(jsonwebtoken::Algorithm::HS256, &hs_key(SECRET), claims)
}

fn rs(private_pem: &[u8], claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem).unwrap();
    encode_with(jsonwebtoken::Algorithm::RS256, &key, claims)
}

fn es(private_pem: &[u8], claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(private_pem).unwrap();
    encode_with(jsonwebtoken::Algorithm::ES256, &key, claims)
}

fn hs_verifier() -> Verifier {
    Verifier::hs256_secret(SECRET).unwrap()
}

fn rs_verifier() -> Verifier {
    Verifier::rs256_public_pem(RSA_PUBLIC).unwrap()
}

fn es_verifier() -> Verifier {
    Verifier::es256_public_pem(EC_PUBLIC).unwrap()
}

/// Verifies an HS256 token over `claims` for USER at NOW.
fn check(claims: &Value) -> Result<Grants, AuthError> {
    hs_verifier().verify(hs(claims).as_bytes(), USER, NOW)
}

fn check_at(claims: &Value, now: u64) -> Result<Grants, AuthError> {
    hs_verifier().verify(hs(claims).as_bytes(), USER, now)
}

/// The three dot-separated parts of a compact token.
fn parts(token: &str) -> [String; 3] {
    let v: Vec<&str> = token.split('.').collect();
    assert_eq!(v.len(), 3, "{token}");
    [v[0].to_string(), v[1].to_string(), v[2].to_string()]
}

/// A file in the temp directory, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!("imrelay-auth-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---- round trips ------------------------------------------------------------------------

#[test]
fn mint_hs256_round_trip() {
    let token = mint_hs256(
        SECRET,
        USER,
        NOW,
        3600,
        &RoomGrant::only([7, 3, 3]),
        true,
        Some("phone"),
    );
    let g = hs_verifier().verify(token.as_bytes(), USER, NOW).unwrap();
    assert_eq!(
        g,
        Grants {
            user: USER,
            expires_at: NOW + 3600,
            rooms: RoomGrant::only([3, 7]),
            send_rooms: RoomGrant::only([3, 7]),
            admin: true,
            device: Some("phone".to_string()),
        }
    );
    assert_eq!(g.rooms, RoomGrant::Only([3, 7].into_iter().collect()));
}

#[test]
fn mint_hs256_minimal_round_trip() {
    let token = mint_hs256(SECRET, u64::MAX, NOW, 60, &RoomGrant::None, false, None);
    let g = hs_verifier()
        .verify(token.as_bytes(), u64::MAX, NOW)
        .unwrap();
    assert_eq!(g.user, u64::MAX);
    assert_eq!(g.expires_at, NOW + 60);
    assert_eq!(
        (g.rooms, g.send_rooms, g.admin, g.device),
        (RoomGrant::None, RoomGrant::None, false, None)
    );
}

#[test]
fn mint_send_rooms_separately() {
    let mut m = Mint::new(USER, NOW, 600);
    m.rooms = RoomGrant::All;
    m.send_rooms = Some(RoomGrant::only([5]));
    let g = hs_verifier()
        .verify(m.hs256(SECRET).as_bytes(), USER, NOW)
        .unwrap();
    assert_eq!(
        (g.rooms.clone(), g.send_rooms.clone()),
        (RoomGrant::All, RoomGrant::only([5]))
    );
    assert!(g.can_join(9) && !g.can_send(9) && g.can_send(5));

    // Some(None) is written as [] and means "no sending", not "same as rooms".
    m.send_rooms = Some(RoomGrant::None);
    assert_eq!(m.claims()["send_rooms"], json!([]));
    let g = hs_verifier()
        .verify(m.hs256(SECRET).as_bytes(), USER, NOW)
        .unwrap();
    assert_eq!((g.rooms, g.send_rooms), (RoomGrant::All, RoomGrant::None));
}

#[test]
fn mint_not_before_is_honoured() {
    let mut m = Mint::new(USER, NOW, 600);
    m.not_before = Some(NOW + 100);
    let token = m.hs256(SECRET);
    assert_eq!(
        hs_verifier().verify(token.as_bytes(), USER, NOW),
        Err(AuthError::NotYetValid)
    );
    assert!(hs_verifier()
        .verify(token.as_bytes(), USER, NOW + 100)
        .is_ok());
}

#[test]
fn rs256_round_trip_spki_and_pkcs1() {
    let mut m = Mint::new(USER, NOW, 600);
    m.rooms = RoomGrant::only([42]);
    let token = m.sign(Algorithm::Rs256, RSA_PRIVATE).unwrap();
    for pem in [RSA_PUBLIC, RSA_PUBLIC_PKCS1] {
        let v = Verifier::rs256_public_pem(pem).unwrap();
        assert_eq!(v.algorithm(), Algorithm::Rs256);
        let g = v.verify(token.as_bytes(), USER, NOW).unwrap();
        assert_eq!(g.rooms, RoomGrant::only([42]));
    }
}

#[test]
fn es256_round_trip() {
    let mut m = Mint::new(USER, NOW, 600);
    m.device = Some("tablet".into());
    let token = m.sign(Algorithm::Es256, EC_PRIVATE).unwrap();
    let g = es_verifier().verify(token.as_bytes(), USER, NOW).unwrap();
    assert_eq!(g.device.as_deref(), Some("tablet"));
    assert_eq!(es_verifier().algorithm(), Algorithm::Es256);
}

#[test]
fn mint_sign_rejects_bad_keys() {
    let m = Mint::new(USER, NOW, 600);
    assert!(matches!(
        m.sign(Algorithm::Rs256, b"nope"),
        Err(KeyError::InvalidKey(_))
    ));
    assert!(matches!(
        m.sign(Algorithm::Es256, RSA_PRIVATE),
        Err(KeyError::InvalidKey(_))
    ));
    assert!(matches!(
        m.sign(Algorithm::Hs256, b""),
        Err(KeyError::InvalidKey(_))
    ));
}

#[test]
#[should_panic(expected = "secret must not be empty")]
fn mint_hs256_panics_on_empty_secret() {
    mint_hs256(b"", USER, NOW, 60, &RoomGrant::None, false, None);
}

#[test]
fn no_system_clock_is_read() {
    // Valid only around t = 1000 (1970): jsonwebtoken's own exp check would refuse it.
    let token = Mint::new(USER, 1000, 100).hs256(SECRET);
    assert_eq!(
        hs_verifier()
            .verify(token.as_bytes(), USER, 1000)
            .unwrap()
            .expires_at,
        1100
    );
    assert_eq!(
        hs_verifier().verify(token.as_bytes(), USER, 1130),
        Err(AuthError::Expired)
    );
    // And a token far in the future verifies when `now` says so.
    let token = Mint::new(USER, 4_000_000_000, 100).hs256(SECRET);
    assert!(hs_verifier()
        .verify(token.as_bytes(), USER, 4_000_000_000)
        .is_ok());
    assert_eq!(
        hs_verifier().verify(token.as_bytes(), USER, NOW),
        Err(AuthError::IssuedInFuture)
    );
}

// ---- every variant ----------------------------------------------------------------------

#[test]
fn every_auth_error_variant_comes_from_a_real_token() {
    let hs_v = hs_verifier();
    let cases: Vec<(AuthError, String)> = vec![
        (AuthError::Malformed, hs(&with(base(), "device", json!("")))),
        (
            AuthError::BadSignature,
            encode_with(
                jsonwebtoken::Algorithm::HS256,
                &hs_key(b"another-secret-of-32-bytes-or-more"),
                &base(),
            ),
        ),
        (
            AuthError::WrongAlgorithm,
            encode_with(jsonwebtoken::Algorithm::HS512, &hs_key(SECRET), &base()),
        ),
        (
            AuthError::Expired,
            hs(&with(base(), "exp", json!(NOW - LEEWAY_SECS))),
        ),
        (
            AuthError::NotYetValid,
            hs(&with(base(), "nbf", json!(NOW + LEEWAY_SECS + 1))),
        ),
        (
            AuthError::IssuedInFuture,
            hs(&with(base(), "iat", json!(NOW + LEEWAY_SECS + 1))),
        ),
        (AuthError::MissingSub, hs(&without(base(), "sub"))),
        (AuthError::BadSub, hs(&with(base(), "sub", json!("0")))),
        (
            AuthError::SubMismatch,
            hs(&with(base(), "sub", json!("1002"))),
        ),
        (AuthError::MissingExp, hs(&without(base(), "exp"))),
    ];
    let mut seen = HashSet::new();
    for (want, token) in &cases {
        assert_eq!(
            hs_v.verify(token.as_bytes(), USER, NOW),
            Err(*want),
            "{want:?}"
        );
        seen.insert(*want);
    }
    assert_eq!(seen, AuthError::ALL.into_iter().collect::<HashSet<_>>());
    // The base token itself is fine.
    assert!(check(&base()).is_ok());
}

#[test]
fn reasons_are_short_distinct_and_displayed() {
    let mut reasons = HashSet::new();
    for e in AuthError::ALL {
        let r = e.reason();
        assert!(!r.is_empty() && r.len() < 32 && r.is_ascii(), "{r}");
        assert!(reasons.insert(r), "duplicate reason {r}");
        assert_eq!(e.to_string(), r);
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert_eq!(boxed.to_string(), r);
    }
}

// ---- Malformed --------------------------------------------------------------------------

#[test]
fn malformed_shapes() {
    let v = hs_verifier();
    let good = hs(&base());
    let [h, p, s] = parts(&good);
    let cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"\xff\xfe\xfd".to_vec(),
        [good.as_bytes(), b"\xff"].concat(),
        b"abc".to_vec(),
        b"a.b".to_vec(),
        format!("{h}.{p}").into_bytes(),
        format!("{h}.{p}.{s}.{s}").into_bytes(),
        format!("{good}\n").into_bytes(),
        format!(" {good}").into_bytes(),
        format!("{h}.{p}.!!!").into_bytes(),
        format!("{h}.{p}.{s}=").into_bytes(),
        format!("{NOT_JSON_HEADER}.{p}.{s}").into_bytes(),
        format!("{NO_ALG_HEADER}.{p}.{s}").into_bytes(),
        format!("{h}!.{p}.{s}").into_bytes(),
    ];
    for token in cases {
        assert_eq!(
            v.verify(&token, USER, NOW),
            Err(AuthError::Malformed),
            "{:?}",
            String::from_utf8_lossy(&token)
        );
    }
}

#[test]
fn claims_that_are_not_an_object_are_malformed() {
    for claims in [json!([1, 2]), json!("1001"), json!(1001), json!(null)] {
        assert_eq!(check(&claims), Err(AuthError::Malformed), "{claims}");
    }
}

#[test]
fn duplicate_registered_claims_are_malformed() {
    // {"sub":"1001","exp":2000003600,"sub":"1001"}: even equal duplicates are refused, so
    // no two JSON parsers can read different users out of one token.
    let dup = "eyJzdWIiOiIxMDAxIiwiZXhwIjoyMDAwMDAzNjAwLCJzdWIiOiIxMDAxIn0";
    // The same without the duplicate, as a control.
    let single = "eyJzdWIiOiIxMDAxIiwiZXhwIjoyMDAwMDAzNjAwfQ";
    let header = parts(&hs(&base()))[0].clone();
    let sign = |payload: &str| {
        let message = format!("{header}.{payload}");
        let tag = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &hs_key(SECRET),
            jsonwebtoken::Algorithm::HS256,
        )
        .unwrap();
        format!("{message}.{tag}")
    };
    assert_eq!(
        hs_verifier().verify(sign(dup).as_bytes(), USER, NOW),
        Err(AuthError::Malformed)
    );
    assert_eq!(
        hs_verifier()
            .verify(sign(single).as_bytes(), USER, NOW)
            .unwrap()
            .expires_at,
        2_000_003_600
    );
}

#[test]
fn unsupported_critical_header_is_malformed() {
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.crit = Some(vec!["exp".to_string()]);
    let token = jsonwebtoken::encode(&header, &base(), &hs_key(SECRET)).unwrap();
    assert_eq!(
        hs_verifier().verify(token.as_bytes(), USER, NOW),
        Err(AuthError::Malformed)
    );
}

#[test]
fn extra_header_fields_are_ignored() {
    let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("key-2024".into());
    header.typ = Some("at+jwt".into());
    header.extras.insert("x-custom", json!({"a": [1, 2]}));
    let token = jsonwebtoken::encode(&header, &base(), &hs_key(SECRET)).unwrap();
    assert!(hs_verifier().verify(token.as_bytes(), USER, NOW).is_ok());
}

#[test]
fn oversize_token_is_malformed_even_when_signed() {
    let v = hs_verifier();
    // The largest padded token that fits, and the first that does not.
    let mut largest_ok = None;
    let mut first_too_big = None;
    for n in 2800..3200 {
        let token = hs(&with(base(), "pad", json!("x".repeat(n))));
        if token.len() <= MAX_TOKEN_LEN {
            largest_ok = Some(token);
        } else {
            first_too_big = Some(token);
            break;
        }
    }
    let (ok, big) = (largest_ok.unwrap(), first_too_big.unwrap());
    assert!(ok.len() >= MAX_TOKEN_LEN - 2, "{}", ok.len());
    assert!(v.verify(ok.as_bytes(), USER, NOW).is_ok());
    assert!(big.len() > MAX_TOKEN_LEN);
    assert_eq!(
        v.verify(big.as_bytes(), USER, NOW),
        Err(AuthError::Malformed)
    );
    // Garbage over the limit is refused before any parsing.
    assert_eq!(
        v.verify(&vec![b'a'; MAX_TOKEN_LEN + 1], USER, NOW),
        Err(AuthError::Malformed)
    );
}

#[test]
fn malformed_time_claims() {
    for (name, value) in [
        ("exp", json!("2000003600")),
        ("exp", json!(-1)),
        ("exp", json!(true)),
        ("exp", json!([NOW + 3600])),
        ("exp", json!(1.0e30)),
        ("nbf", json!("0")),
        ("nbf", json!(-5)),
        ("iat", json!({})),
        ("iat", json!(-0.5)),
    ] {
        assert_eq!(
            check(&with(base(), name, value.clone())),
            Err(AuthError::Malformed),
            "{name}: {value}"
        );
    }
}

#[test]
fn fractional_times_round_the_strict_way() {
    // exp rounds down: NOW - LEEWAY + 0.5 is NOW - LEEWAY, expired.
    let exp = (NOW - LEEWAY_SECS) as f64 + 0.5;
    assert_eq!(
        check(&with(base(), "exp", json!(exp))),
        Err(AuthError::Expired)
    );
    let exp = (NOW + 100) as f64 + 0.5;
    assert_eq!(
        check(&with(base(), "exp", json!(exp))).unwrap().expires_at,
        NOW + 100
    );
    // nbf and iat round up: NOW + LEEWAY + 0.5 is NOW + LEEWAY + 1, too early.
    let t = (NOW + LEEWAY_SECS) as f64 + 0.5;
    assert_eq!(
        check(&with(base(), "nbf", json!(t))),
        Err(AuthError::NotYetValid)
    );
    assert_eq!(
        check(&with(base(), "iat", json!(t))),
        Err(AuthError::IssuedInFuture)
    );
    let t = (NOW + LEEWAY_SECS) as f64 - 0.5;
    assert!(check(&with(base(), "nbf", json!(t))).is_ok());
}

#[test]
fn malformed_grant_claims() {
    let bad: Vec<(&str, Value)> = vec![
        ("rooms", json!("all")),
        ("rooms", json!("**")),
        ("rooms", json!(5)),
        ("rooms", json!({"1": true})),
        ("rooms", json!(true)),
        ("rooms", json!([0])),
        ("rooms", json!(["0"])),
        ("rooms", json!([-1])),
        ("rooms", json!([1.5])),
        ("rooms", json!([2.0])),
        ("rooms", json!(["01"])),
        ("rooms", json!(["x"])),
        ("rooms", json!([" 1"])),
        ("rooms", json!(["18446744073709551616"])),
        ("rooms", json!([[1]])),
        ("rooms", json!([null])),
        ("rooms", json!(["*"])),
        ("send_rooms", json!("none")),
        ("send_rooms", json!([0])),
        ("admin", json!("true")),
        ("admin", json!(1)),
        ("device", json!(5)),
        ("device", json!("")),
        ("device", json!("x".repeat(MAX_DEVICE_LEN + 1))),
        ("device", json!("phone\nFAKE LOG LINE")),
        ("device", json!("tab\u{7f}")),
        ("device", json!(["phone"])),
    ];
    for (name, value) in bad {
        assert_eq!(
            check(&with(base(), name, value.clone())),
            Err(AuthError::Malformed),
            "{name}: {value}"
        );
    }
}

#[test]
fn device_limits() {
    let max = "d".repeat(MAX_DEVICE_LEN);
    assert_eq!(
        check(&with(base(), "device", json!(max))).unwrap().device,
        Some(max)
    );
    // The limit is in bytes: 32 two-byte characters fit, 33 do not.
    let e = "é".repeat(32);
    assert_eq!(
        check(&with(base(), "device", json!(e))).unwrap().device,
        Some(e)
    );
    assert_eq!(
        check(&with(base(), "device", json!("é".repeat(33)))),
        Err(AuthError::Malformed)
    );
    assert_eq!(
        check(&with(base(), "device", Value::Null)).unwrap().device,
        None
    );
}

#[test]
fn room_list_is_bounded() {
    // Duplicates count: 1024 entries pass (and collapse to one room), 1025 do not, and
    // both tokens stay under MAX_TOKEN_LEN so the room bound is what refuses the second.
    let ok = hs(&with(base(), "rooms", json!(vec![1; MAX_ROOMS])));
    assert!(ok.len() <= MAX_TOKEN_LEN);
    assert_eq!(
        hs_verifier()
            .verify(ok.as_bytes(), USER, NOW)
            .unwrap()
            .rooms,
        RoomGrant::only([1])
    );
    let big = hs(&with(base(), "rooms", json!(vec![1; MAX_ROOMS + 1])));
    assert!(big.len() <= MAX_TOKEN_LEN);
    assert_eq!(
        hs_verifier().verify(big.as_bytes(), USER, NOW),
        Err(AuthError::Malformed)
    );
    let big = hs(&with(base(), "send_rooms", json!(vec![1; MAX_ROOMS + 1])));
    assert_eq!(
        hs_verifier().verify(big.as_bytes(), USER, NOW),
        Err(AuthError::Malformed)
    );
}

// ---- algorithm --------------------------------------------------------------------------

#[test]
fn alg_none_is_refused() {
    let good = hs(&base());
    let [_, p, s] = parts(&good);
    for v in [hs_verifier(), rs_verifier(), es_verifier()] {
        for header in [NONE_HEADER, NONE_CAPS_HEADER] {
            for sig in ["", s.as_str()] {
                let token = format!("{header}.{p}.{sig}");
                assert_eq!(
                    v.verify(token.as_bytes(), USER, NOW),
                    Err(AuthError::WrongAlgorithm),
                    "{:?} {token}",
                    v.algorithm()
                );
            }
        }
    }
}

#[test]
fn algorithm_confusion_is_refused() {
    // The classic attack: RS256 is configured, the attacker signs HS256 with the public
    // key PEM (public, after all) as the HMAC secret.
    let forged = encode_with(jsonwebtoken::Algorithm::HS256, &hs_key(RSA_PUBLIC), &base());
    assert_eq!(
        rs_verifier().verify(forged.as_bytes(), USER, NOW),
        Err(AuthError::WrongAlgorithm)
    );
    let forged = encode_with(jsonwebtoken::Algorithm::HS256, &hs_key(EC_PUBLIC), &base());
    assert_eq!(
        es_verifier().verify(forged.as_bytes(), USER, NOW),
        Err(AuthError::WrongAlgorithm)
    );

    // The same with the header claiming RS256: an HMAC tag is not an RSA signature.
    let p = parts(&rs(RSA_PRIVATE, &base()))[1].clone();
    let message = format!("{RS256_HEADER}.{p}");
    let tag = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &hs_key(RSA_PUBLIC),
        jsonwebtoken::Algorithm::HS256,
    )
    .unwrap();
    let forged = format!("{message}.{tag}");
    assert_eq!(
        rs_verifier().verify(forged.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn other_algorithms_are_refused() {
    let rs_token = rs(RSA_PRIVATE, &base());
    let es_token = es(EC_PRIVATE, &base());
    let hs_token = hs(&base());
    let hs384 = encode_with(jsonwebtoken::Algorithm::HS384, &hs_key(SECRET), &base());
    let rsa_key = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
    let ps256 = encode_with(jsonwebtoken::Algorithm::PS256, &rsa_key, &base());
    let rs512 = encode_with(jsonwebtoken::Algorithm::RS512, &rsa_key, &base());

    let wrong = |v: &Verifier, t: &str| {
        assert_eq!(
            v.verify(t.as_bytes(), USER, NOW),
            Err(AuthError::WrongAlgorithm)
        )
    };
    wrong(&hs_verifier(), &rs_token);
    wrong(&hs_verifier(), &es_token);
    wrong(&hs_verifier(), &hs384);
    wrong(&rs_verifier(), &hs_token);
    wrong(&rs_verifier(), &es_token);
    wrong(&rs_verifier(), &ps256);
    wrong(&rs_verifier(), &rs512);
    wrong(&es_verifier(), &hs_token);
    wrong(&es_verifier(), &rs_token);
}

// ---- BadSignature -----------------------------------------------------------------------

#[test]
fn bad_signatures() {
    let other_secret = encode_with(
        jsonwebtoken::Algorithm::HS256,
        &hs_key(b"x-another-secret-0123456789abcdef"),
        &base(),
    );
    assert_eq!(
        hs_verifier().verify(other_secret.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );

    let other_rsa = rs(RSA_OTHER_PRIVATE, &base());
    assert_eq!(
        rs_verifier().verify(other_rsa.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );

    let other_ec = es(EC_OTHER_PRIVATE, &base());
    assert_eq!(
        es_verifier().verify(other_ec.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );

    // An ES256 signature of the wrong length (63 bytes: 84 base64url characters, a clean
    // decode), and an empty one.
    let [h, p, s] = parts(&es(EC_PRIVATE, &base()));
    assert_eq!(s.len(), 86);
    for sig in [&s[..84], ""] {
        let token = format!("{h}.{p}.{sig}");
        assert_eq!(
            es_verifier().verify(token.as_bytes(), USER, NOW),
            Err(AuthError::BadSignature)
        );
    }
}

#[test]
fn tampered_claims_break_the_signature() {
    // A user's own token with the claims of an admin token spliced in.
    let mine = hs(&base());
    let admin = hs(&with(base(), "admin", json!(true)));
    let [h, _, s] = parts(&mine);
    let p = parts(&admin)[1].clone();
    let token = format!("{h}.{p}.{s}");
    assert_eq!(
        hs_verifier().verify(token.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );
    for (mine, admin, v) in [
        (
            rs(RSA_PRIVATE, &base()),
            rs(RSA_PRIVATE, &with(base(), "admin", json!(true))),
            rs_verifier(),
        ),
        (
            es(EC_PRIVATE, &base()),
            es(EC_PRIVATE, &with(base(), "admin", json!(true))),
            es_verifier(),
        ),
    ] {
        let [h, _, s] = parts(&mine);
        let token = format!("{h}.{}.{s}", parts(&admin)[1]);
        assert_eq!(
            v.verify(token.as_bytes(), USER, NOW),
            Err(AuthError::BadSignature)
        );
    }
}

// ---- time and leeway --------------------------------------------------------------------

#[test]
fn exp_leeway_boundary() {
    // Accepted while now < exp + LEEWAY_SECS.
    assert_eq!(
        check(&with(base(), "exp", json!(NOW - LEEWAY_SECS))),
        Err(AuthError::Expired)
    );
    let g = check(&with(base(), "exp", json!(NOW - LEEWAY_SECS + 1))).unwrap();
    assert_eq!(g.expires_at, NOW - LEEWAY_SECS + 1);
    assert!(check(&with(base(), "exp", json!(NOW))).is_ok());
    assert_eq!(
        check(&with(base(), "exp", json!(0))),
        Err(AuthError::Expired)
    );
    assert!(check(&with(base(), "exp", json!(u64::MAX))).is_ok());
    // The same token, walked across the boundary by `now`.
    let token = hs(&with(base(), "exp", json!(NOW)));
    let v = hs_verifier();
    assert!(v
        .verify(token.as_bytes(), USER, NOW + LEEWAY_SECS - 1)
        .is_ok());
    assert_eq!(
        v.verify(token.as_bytes(), USER, NOW + LEEWAY_SECS),
        Err(AuthError::Expired)
    );
    // No overflow at the top of the range.
    let token = hs(&with(base(), "exp", json!(u64::MAX)));
    assert_eq!(
        v.verify(token.as_bytes(), USER, u64::MAX)
            .unwrap()
            .expires_at,
        u64::MAX
    );
}

#[test]
fn nbf_leeway_boundary() {
    assert!(check(&with(base(), "nbf", json!(NOW + LEEWAY_SECS))).is_ok());
    assert_eq!(
        check(&with(base(), "nbf", json!(NOW + LEEWAY_SECS + 1))),
        Err(AuthError::NotYetValid)
    );
    assert!(check(&with(base(), "nbf", json!(0))).is_ok());
    assert_eq!(
        check(&with(base(), "nbf", json!(u64::MAX))),
        Err(AuthError::NotYetValid)
    );
    // nbf is checked against `now`, not against exp or iat.
    let late = with(
        with(base(), "nbf", json!(NOW + 500)),
        "exp",
        json!(NOW + 1000),
    );
    assert_eq!(check(&late), Err(AuthError::NotYetValid));
    assert!(check_at(&late, NOW + 470).is_ok());
}

#[test]
fn iat_leeway_boundary() {
    assert!(check(&with(base(), "iat", json!(NOW + LEEWAY_SECS))).is_ok());
    assert_eq!(
        check(&with(base(), "iat", json!(NOW + LEEWAY_SECS + 1))),
        Err(AuthError::IssuedInFuture)
    );
    assert!(check(&without(base(), "iat")).is_ok());
    assert!(check(&with(base(), "iat", Value::Null)).is_ok());
    assert!(check(&with(base(), "iat", json!(0))).is_ok());
}

// ---- sub and exp ------------------------------------------------------------------------

#[test]
fn missing_sub() {
    assert_eq!(check(&without(base(), "sub")), Err(AuthError::MissingSub));
    assert_eq!(
        check(&with(base(), "sub", Value::Null)),
        Err(AuthError::MissingSub)
    );
}

#[test]
fn bad_sub() {
    for sub in [
        json!("0"),
        json!("00"),
        json!("abc"),
        json!(""),
        json!("01001"),
        json!(" 1001"),
        json!("1001 "),
        json!("+1001"),
        json!("-1001"),
        json!("1e3"),
        json!("1001.0"),
        json!("١٠٠١"),
        json!("18446744073709551616"),
        json!(1001),
        json!(true),
        json!(1001.0),
    ] {
        assert_eq!(
            check(&with(base(), "sub", sub.clone())),
            Err(AuthError::BadSub),
            "{sub}"
        );
    }
    // An array or object sub never reaches our check: jsonwebtoken's own pass over the
    // registered claims cannot read past it, and the whole claims set is refused.
    for sub in [json!(["1001"]), json!({"id": "1001"})] {
        assert_eq!(
            check(&with(base(), "sub", sub.clone())),
            Err(AuthError::Malformed),
            "{sub}"
        );
    }
}

#[test]
fn sub_mismatch() {
    assert_eq!(
        check(&with(base(), "sub", json!("1002"))),
        Err(AuthError::SubMismatch)
    );
    let max = with(base(), "sub", json!(u64::MAX.to_string()));
    assert_eq!(check(&max), Err(AuthError::SubMismatch));
    assert_eq!(
        hs_verifier()
            .verify(hs(&max).as_bytes(), u64::MAX, NOW)
            .unwrap()
            .user,
        u64::MAX
    );
    // A LOGIN as user 0 can never match a valid sub.
    assert_eq!(
        hs_verifier().verify(hs(&base()).as_bytes(), 0, NOW),
        Err(AuthError::SubMismatch)
    );
}

#[test]
fn missing_exp() {
    assert_eq!(check(&without(base(), "exp")), Err(AuthError::MissingExp));
    assert_eq!(
        check(&with(base(), "exp", Value::Null)),
        Err(AuthError::MissingExp)
    );
}

#[test]
fn order_of_checks() {
    let v = hs_verifier();
    // Signature before claims.
    let forged = encode_with(
        jsonwebtoken::Algorithm::HS256,
        &hs_key(b"x-another-secret-0123456789abcdef"),
        &without(base(), "sub"),
    );
    assert_eq!(
        v.verify(forged.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );
    // sub before exp, before types, before time.
    let expired = with(base(), "exp", json!(1));
    assert_eq!(
        check(&with(expired.clone(), "sub", json!("7"))),
        Err(AuthError::SubMismatch)
    );
    assert_eq!(
        check(&without(with(base(), "sub", json!("x")), "exp")),
        Err(AuthError::BadSub)
    );
    assert_eq!(
        check(&with(without(base(), "exp"), "device", json!(""))),
        Err(AuthError::MissingExp)
    );
    assert_eq!(
        check(&with(expired.clone(), "device", json!(""))),
        Err(AuthError::Malformed)
    );
    // Within time: exp, then nbf, then iat.
    let future = with(
        with(base(), "nbf", json!(NOW + 999)),
        "iat",
        json!(NOW + 999),
    );
    assert_eq!(
        check(&with(future.clone(), "exp", json!(1))),
        Err(AuthError::Expired)
    );
    assert_eq!(check(&future), Err(AuthError::NotYetValid));
}

// ---- grants -----------------------------------------------------------------------------

#[test]
fn rooms_claim() {
    assert_eq!(
        check(&with(base(), "rooms", json!("*"))).unwrap().rooms,
        RoomGrant::All
    );
    let g = check(&with(
        base(),
        "rooms",
        json!([3, "1", 2, 3, "18446744073709551615"]),
    ))
    .unwrap();
    assert_eq!(g.rooms, RoomGrant::only([1, 2, 3, u64::MAX]));
    match &g.rooms {
        RoomGrant::Only(set) => assert_eq!(set.as_slice(), &[1, 2, 3, u64::MAX]),
        other => panic!("{other:?}"),
    }
    assert_eq!(check(&base()).unwrap().rooms, RoomGrant::None);
    assert_eq!(
        check(&with(base(), "rooms", json!([]))).unwrap().rooms,
        RoomGrant::None
    );
    assert_eq!(
        check(&with(base(), "rooms", Value::Null)).unwrap().rooms,
        RoomGrant::None
    );
}

#[test]
fn send_rooms_defaults_to_rooms() {
    for rooms in [json!("*"), json!([5, 6]), json!([])] {
        let g = check(&with(base(), "rooms", rooms.clone())).unwrap();
        assert_eq!(g.send_rooms, g.rooms, "{rooms}");
    }
    let g = check(&base()).unwrap();
    assert_eq!((g.rooms, g.send_rooms), (RoomGrant::None, RoomGrant::None));

    let g = check(&with(
        with(base(), "rooms", json!("*")),
        "send_rooms",
        json!([]),
    ))
    .unwrap();
    assert_eq!((g.rooms, g.send_rooms), (RoomGrant::All, RoomGrant::None));
    let g = check(&with(
        with(base(), "rooms", json!([1])),
        "send_rooms",
        json!("*"),
    ))
    .unwrap();
    assert_eq!(
        (g.rooms, g.send_rooms),
        (RoomGrant::only([1]), RoomGrant::All)
    );
    let g = check(&with(
        with(base(), "rooms", json!([1, 2])),
        "send_rooms",
        json!(["2"]),
    ))
    .unwrap();
    assert!(g.can_join(1) && !g.can_send(1) && g.can_send(2));
}

#[test]
fn room_grant_allows() {
    assert!(RoomGrant::All.allows(5) && RoomGrant::All.allows(u64::MAX));
    assert!(!RoomGrant::All.allows(0), "room 0 is never granted");
    assert!(!RoomGrant::None.allows(5));
    let only = RoomGrant::only([9, 2, 2, 0]);
    assert_eq!(only, RoomGrant::only([2, 9]));
    assert!(only.allows(2) && only.allows(9) && !only.allows(3) && !only.allows(0));
    assert_eq!(RoomGrant::only([0]), RoomGrant::None);
    assert_eq!(RoomGrant::only([]), RoomGrant::None);
    assert_eq!(RoomGrant::default(), RoomGrant::None);
    let set: RoomSet = [4, 0, 4, 1].into_iter().collect();
    assert_eq!(
        (set.len(), set.as_slice(), set.is_empty()),
        (2, &[1u64, 4][..], false)
    );
    assert!(RoomSet::new().is_empty() && !RoomGrant::Only(RoomSet::new()).allows(1));
}

#[test]
fn admin_claim() {
    assert!(check(&with(base(), "admin", json!(true))).unwrap().admin);
    assert!(!check(&with(base(), "admin", json!(false))).unwrap().admin);
    assert!(!check(&base()).unwrap().admin);
    assert!(!check(&with(base(), "admin", Value::Null)).unwrap().admin);
}

#[test]
fn unknown_claims_are_ignored() {
    let mut claims = base();
    for (name, value) in [
        ("iss", json!("https://issuer.example")),
        ("aud", json!(["relay", "other"])),
        ("jti", json!("abc")),
        ("scope", json!({"nested": [1, {"deep": null}]})),
        ("rooms_v2", json!("anything")),
    ] {
        claims = with(claims, name, value);
    }
    assert!(check(&claims).is_ok());
    assert!(check(&with(base(), "aud", json!("someone-else"))).is_ok());
}

#[test]
fn protocol_md_example_token_verifies() {
    // The example token of protocol.md section 16.6 (signed by an independent
    // implementation, Python's hmac).
    let draft = include_str!("../../protocol.md");
    let token = draft.lines().find(|l| l.starts_with("eyJ")).unwrap();
    let v = Verifier::hs256_secret(b"imrelay-example-secret-do-not-use").unwrap();
    let (iat, exp) = (1_700_000_000, 1_700_003_600);
    let g = v.verify(token.as_bytes(), 1001, iat).unwrap();
    assert_eq!(
        g,
        Grants {
            user: 1001,
            expires_at: exp,
            rooms: RoomGrant::only([7, 42]),
            send_rooms: RoomGrant::only([7]),
            admin: false,
            device: Some("phone".into()),
        }
    );
    assert!(v.verify(token.as_bytes(), 1001, iat - LEEWAY_SECS).is_ok());
    assert_eq!(
        v.verify(token.as_bytes(), 1001, iat - LEEWAY_SECS - 1),
        Err(AuthError::IssuedInFuture)
    );
    assert!(v
        .verify(token.as_bytes(), 1001, exp + LEEWAY_SECS - 1)
        .is_ok());
    assert_eq!(
        v.verify(token.as_bytes(), 1001, exp + LEEWAY_SECS),
        Err(AuthError::Expired)
    );
    assert_eq!(
        v.verify(token.as_bytes(), 1002, iat),
        Err(AuthError::SubMismatch)
    );
}

// ---- keys -------------------------------------------------------------------------------

#[test]
fn hs256_secret_length() {
    let short = vec![b'k'; MIN_SECRET_LEN - 1];
    assert!(matches!(
        Verifier::hs256_secret(&short),
        Err(KeyError::SecretTooShort { len: 31, min: 32 })
    ));
    assert!(matches!(
        Verifier::hs256_secret(b""),
        Err(KeyError::SecretTooShort { len: 0, .. })
    ));
    let v = Verifier::hs256_secret(vec![b'k'; MIN_SECRET_LEN]).unwrap();
    assert_eq!(v.algorithm(), Algorithm::Hs256);
    // A token minted with a short secret is refused by a verifier with the real one.
    let token = mint_hs256(b"short", USER, NOW, 60, &RoomGrant::None, false, None);
    assert_eq!(
        hs_verifier().verify(token.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );
}

#[test]
fn secret_file_trims_one_trailing_newline() {
    let token = hs(&base());
    for (name, contents) in [
        ("plain", SECRET.to_vec()),
        ("lf", [SECRET, b"\n"].concat()),
        ("crlf", [SECRET, b"\r\n"].concat()),
    ] {
        let f = TempFile::new(name, &contents);
        let v = Verifier::from_secret_file(&f.0).unwrap();
        assert!(v.verify(token.as_bytes(), USER, NOW).is_ok(), "{name}");
        let v = Verifier::from_key_file(&f.0, Algorithm::Hs256).unwrap();
        assert!(v.verify(token.as_bytes(), USER, NOW).is_ok(), "{name}");
    }
    // Only one: a second newline is part of the secret.
    let f = TempFile::new("lflf", &[SECRET, b"\n\n"].concat());
    let v = Verifier::from_secret_file(&f.0).unwrap();
    assert_eq!(
        v.verify(token.as_bytes(), USER, NOW),
        Err(AuthError::BadSignature)
    );
    // Length is checked after trimming.
    let f = TempFile::new(
        "short",
        &[vec![b'k'; MIN_SECRET_LEN - 1], b"\n".to_vec()].concat(),
    );
    assert!(matches!(
        Verifier::from_secret_file(&f.0),
        Err(KeyError::SecretTooShort { len: 31, .. })
    ));
}

#[test]
fn missing_key_files_are_io_errors() {
    let path = std::env::temp_dir().join("imrelay-auth-no-such-file");
    let e = Verifier::from_secret_file(&path).unwrap_err();
    assert!(matches!(&e, KeyError::Io { path: p, .. } if *p == path));
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().contains("imrelay-auth-no-such-file"));
    assert!(matches!(
        Verifier::from_public_key_file(&path, Algorithm::Rs256),
        Err(KeyError::Io { .. })
    ));
    assert!(matches!(
        Verifier::from_key_file(&path, Algorithm::Es256),
        Err(KeyError::Io { .. })
    ));
}

#[test]
fn public_key_files() {
    let rsa = TempFile::new("rsa.pem", RSA_PUBLIC);
    let ec = TempFile::new("ec.pem", EC_PUBLIC);
    let v = Verifier::from_public_key_file(&rsa.0, Algorithm::Rs256).unwrap();
    assert!(v
        .verify(rs(RSA_PRIVATE, &base()).as_bytes(), USER, NOW)
        .is_ok());
    let v = Verifier::from_key_file(&ec.0, Algorithm::Es256).unwrap();
    assert!(v
        .verify(es(EC_PRIVATE, &base()).as_bytes(), USER, NOW)
        .is_ok());
    assert!(matches!(
        Verifier::from_public_key_file(&rsa.0, Algorithm::Hs256),
        Err(KeyError::NotPublicKeyAlgorithm)
    ));
    assert!(matches!(
        Verifier::from_public_key_file(&rsa.0, Algorithm::Es256),
        Err(KeyError::BadPem)
    ));
}

#[test]
fn rsa_key_checks() {
    assert!(matches!(
        Verifier::rs256_public_pem(RSA_PRIVATE),
        Err(KeyError::PrivateKey)
    ));
    assert!(matches!(
        Verifier::rs256_public_pem(EC_PUBLIC),
        Err(KeyError::BadPem)
    ));
    assert!(matches!(
        Verifier::rs256_public_pem(b"hello"),
        Err(KeyError::BadPem)
    ));
    assert!(matches!(
        Verifier::rs256_public_pem(b""),
        Err(KeyError::BadPem)
    ));
    assert!(matches!(
        Verifier::rs256_public_pem(RSA1024_PUBLIC),
        Err(KeyError::RsaKeyTooSmall {
            bits: 1024,
            min: 2048
        })
    ));
    // Valid PEM and DER, but SEQUENCE { INTEGER 5 } is no RSA public key.
    let broken = b"-----BEGIN RSA PUBLIC KEY-----\nMAMCAQU=\n-----END RSA PUBLIC KEY-----\n";
    assert!(matches!(
        Verifier::rs256_public_pem(broken),
        Err(KeyError::InvalidKey(_))
    ));
}

#[test]
fn ec_key_checks() {
    assert!(matches!(
        Verifier::es256_public_pem(EC_PRIVATE),
        Err(KeyError::PrivateKey)
    ));
    assert!(matches!(
        Verifier::es256_public_pem(RSA_PUBLIC),
        Err(KeyError::BadPem)
    ));
    assert!(matches!(
        Verifier::es256_public_pem(RSA_PUBLIC_PKCS1),
        Err(KeyError::BadPem)
    ));
    assert!(matches!(
        Verifier::es256_public_pem(b"hello"),
        Err(KeyError::BadPem)
    ));
    assert!(matches!(
        Verifier::es256_public_pem(EC_P384_PUBLIC),
        Err(KeyError::InvalidKey(_))
    ));
}

#[test]
fn key_errors_display() {
    let errors = [
        KeyError::SecretTooShort { len: 3, min: 32 },
        KeyError::PrivateKey,
        KeyError::BadPem,
        KeyError::InvalidKey("x".into()),
        KeyError::RsaKeyTooSmall {
            bits: 1024,
            min: 2048,
        },
        KeyError::NotPublicKeyAlgorithm,
        KeyError::UnknownAlgorithm("none".into()),
        KeyError::NoCryptoProvider,
    ];
    for e in errors {
        assert!(!e.to_string().is_empty());
        assert!(std::error::Error::source(&e).is_none());
    }
}

#[test]
fn verifier_debug_hides_the_key() {
    let v = hs_verifier();
    let shown = format!("{v:?}");
    assert!(shown.contains("Hs256"), "{shown}");
    assert!(!shown.contains("test-secret"), "{shown}");
    let clone = v.clone();
    assert!(clone.verify(hs(&base()).as_bytes(), USER, NOW).is_ok());
}

#[test]
fn algorithm_names() {
    for (name, alg) in [
        ("HS256", Algorithm::Hs256),
        ("rs256", Algorithm::Rs256),
        ("Es256", Algorithm::Es256),
    ] {
        assert_eq!(name.parse::<Algorithm>().unwrap(), alg);
        assert_eq!(alg.to_string(), name.to_ascii_uppercase());
    }
    for name in ["none", "HS512", "", "RS256 "] {
        assert!(
            matches!(name.parse::<Algorithm>(), Err(KeyError::UnknownAlgorithm(n)) if n == name)
        );
    }
}

// ---- parse_ttl --------------------------------------------------------------------------

#[test]
fn ttl_parsing() {
    assert_eq!(parse_ttl("90s"), Ok(90));
    assert_eq!(parse_ttl("30m"), Ok(1_800));
    assert_eq!(parse_ttl("1h"), Ok(3_600));
    assert_eq!(parse_ttl("2d"), Ok(172_800));
    assert_eq!(parse_ttl("007s"), Ok(7));
    assert_eq!(
        parse_ttl("213503982334601d"),
        Ok(213_503_982_334_601 * 86_400)
    );
    assert_eq!(parse_ttl(""), Err(TtlError::Empty));
    assert_eq!(parse_ttl("90"), Err(TtlError::MissingUnit));
    assert_eq!(parse_ttl("1w"), Err(TtlError::UnknownUnit('w')));
    assert_eq!(parse_ttl("1H"), Err(TtlError::UnknownUnit('H')));
    assert_eq!(parse_ttl("1é"), Err(TtlError::UnknownUnit('é')));
    assert_eq!(parse_ttl("1h "), Err(TtlError::UnknownUnit(' ')));
    assert_eq!(parse_ttl("h"), Err(TtlError::BadNumber));
    assert_eq!(parse_ttl("-1h"), Err(TtlError::BadNumber));
    assert_eq!(parse_ttl("+1h"), Err(TtlError::BadNumber));
    assert_eq!(parse_ttl("1.5h"), Err(TtlError::BadNumber));
    assert_eq!(parse_ttl(" 1h"), Err(TtlError::BadNumber));
    assert_eq!(parse_ttl("1h30m"), Err(TtlError::BadNumber));
    assert_eq!(parse_ttl("0s"), Err(TtlError::Zero));
    assert_eq!(parse_ttl("213503982334602d"), Err(TtlError::Overflow));
    assert_eq!(parse_ttl("99999999999999999999s"), Err(TtlError::Overflow));
    for e in [
        TtlError::Empty,
        TtlError::MissingUnit,
        TtlError::UnknownUnit('w'),
        TtlError::BadNumber,
        TtlError::Zero,
        TtlError::Overflow,
    ] {
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn a_secret_file_loses_one_line_end_of_either_kind_and_nothing_else() {
    let dir = std::env::temp_dir().join(format!("imrelay-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = b"0123456789abcdef0123456789abcdef";
    for (name, tail, kept) in [
        ("lf", &b"\n"[..], &b""[..]),
        ("crlf", b"\r\n", b""),
        ("none", b"", b""),
        ("two", b"\n\n", b"\n"),
        ("space", b" \n", b" "),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, [&secret[..], tail].concat()).unwrap();
        let read = read_secret_file(&path).unwrap();
        assert_eq!(read, [&secret[..], kept].concat(), "{name}");
        // The relay's verifier reads the same bytes: a token signed with them verifies.
        let token = mint_hs256(&read, 7, 1000, 60, &RoomGrant::None, false, None);
        let v = Verifier::from_secret_file(&path).unwrap();
        assert!(v.verify(token.as_bytes(), 7, 1000).is_ok(), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
