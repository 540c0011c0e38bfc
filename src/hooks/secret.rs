//! `X-Gitlab-Token`: GitLab sends the hook's secret token as is (not an HMAC), so the receiver compares it with
//! each configured secret (several while one is rotated) in constant time.

use subtle::ConstantTimeEq;

/// Whether `token` is one of `secrets`. Every secret is compared, each in constant time, so the answer's timing
/// tells neither which secret nor how much of one matched (only the count of secrets, which is no secret).
pub fn accepted(token: Option<&[u8]>, secrets: &[String]) -> bool {
    let Some(token) = token else {
        return false;
    };
    secrets
        .iter()
        .fold(0u8, |any, s| any | token.ct_eq(s.as_bytes()).unwrap_u8())
        == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_configured_secret_and_nothing_else() {
        let secrets = vec![
            "old-secret-0123456789".to_owned(),
            "new-secret-0123456789".to_owned(),
        ];
        assert!(accepted(Some(b"old-secret-0123456789"), &secrets));
        assert!(accepted(Some(b"new-secret-0123456789"), &secrets));
        for bad in [
            &b""[..],
            b"new-secret",
            b"new-secret-01234567890",
            b"NEW-secret-0123456789",
        ] {
            assert!(!accepted(Some(bad), &secrets));
        }
        assert!(!accepted(None, &secrets));
        assert!(!accepted(Some(b""), &[]));
    }
}
