//! What an object-store error means for the caller: a row that fails (404, 403 on one
//! object), or a store that cannot be used now (no network, wrong credentials, no bucket),
//! which ends the phase with a one-line error naming the bucket and leaves the rows `pending`.

use crate::error::Error;

/// The kind of an object-store failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// 404: the object (or the bucket) is not there.
    NotFound,
    /// 403 for this request (a policy); other objects may be readable.
    Denied,
    /// The credentials themselves are refused (unknown key, bad signature, expired token).
    Credentials,
    /// No answer: connection refused, DNS, timeouts (after the client's retries).
    Unreachable,
    /// 5xx or throttling that outlasted the client's retries.
    Server,
    /// Anything else (a malformed answer, a bad key name).
    Other,
}

/// One failure, classified, with the parts of a one-line message.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: Kind,
    pub status: Option<u16>,
    /// The S3 error code from the body (`NoSuchBucket`, `AccessDenied`, ...).
    pub code: Option<String>,
    /// The server's message, or the innermost error's text.
    pub detail: String,
}

/// S3 codes that mean the credentials, not the object, are at fault: the whole bucket is
/// unusable with them.
const CREDENTIAL_CODES: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
    "AuthenticationFailed",
    "InvalidAuthenticationInfo",
];

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = text.find(open)? + open.len();
    let end = text[start..].find(close)? + start;
    Some(&text[start..end])
}

fn status_in(text: &str) -> Option<u16> {
    // "Server returned non-2xx status code: 503 Service Unavailable: ..."
    let rest = text.split("status code: ").nth(1)?;
    rest.get(..3)?.parse().ok()
}

fn one_line(s: &str) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.len() > 200 {
        let cut = (0..=200)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}...", &s[..cut])
    } else {
        s
    }
}

/// The innermost error's text: "connection refused", not a URL and a chain of wrappers.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    let s = cur.to_string();
    let s = s.split(" (os error").next().unwrap_or(&s).to_string();
    s.to_lowercase()
}

fn transport_kind(
    e: &(dyn std::error::Error + 'static),
) -> Option<object_store::client::HttpErrorKind> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<object_store::client::HttpError>() {
            return Some(h.kind());
        }
        cur = err.source();
    }
    None
}

/// Classify an error of the object_store crate.
pub fn classify(e: &object_store::Error) -> Failure {
    use object_store::client::HttpErrorKind as H;
    use object_store::Error as E;
    let text = e.to_string();
    let code = between(&text, "<Code>", "</Code>").map(str::to_string);
    let message = between(&text, "<Message>", "</Message>").map(one_line);
    let mut status = status_in(&text);
    let kind = match e {
        E::NotFound { .. } => {
            status = status.or(Some(404));
            Kind::NotFound
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            status = status.or(Some(if matches!(e, E::Unauthenticated { .. }) {
                401
            } else {
                403
            }));
            if code
                .as_deref()
                .is_some_and(|c| CREDENTIAL_CODES.contains(&c))
                || matches!(e, E::Unauthenticated { .. })
            {
                Kind::Credentials
            } else {
                Kind::Denied
            }
        }
        _ => {
            let credentials = code
                .as_deref()
                .is_some_and(|c| CREDENTIAL_CODES.contains(&c));
            // object_store wraps its transport error transparently (the `HttpError` itself
            // is skipped by `source()`), so its text is the sign where the kind is not found.
            let transport = transport_kind(e)
                .map(|k| matches!(k, H::Connect | H::Request | H::Timeout | H::Interrupted))
                .unwrap_or_else(|| text.contains("HTTP error:") && !text.contains("decod"));
            match status {
                Some(s) if s >= 500 || s == 429 => Kind::Server,
                Some(401) => Kind::Credentials,
                Some(400 | 403) if credentials => Kind::Credentials,
                Some(403) => Kind::Denied,
                Some(404) => Kind::NotFound,
                None if transport => Kind::Unreachable,
                _ => Kind::Other,
            }
        }
    };
    let detail = match (&message, kind) {
        (Some(m), _) => m.clone(),
        (None, Kind::Unreachable) => innermost(e),
        (None, _) => one_line(&innermost(e)),
    };
    Failure {
        kind,
        status,
        code,
        detail,
    }
}

impl Failure {
    /// `what (status code)`: "not found (404)", "access denied (403 AccessDenied)".
    pub fn headline(&self) -> String {
        let what = match self.kind {
            Kind::NotFound if self.code.as_deref() == Some("NoSuchBucket") => "bucket not found",
            Kind::NotFound => "not found",
            Kind::Denied => "access denied",
            Kind::Credentials => "credentials refused",
            Kind::Unreachable => "cannot reach the object store",
            Kind::Server => "server error",
            Kind::Other => "request failed",
        };
        match (self.status, &self.code) {
            (Some(s), Some(c)) => format!("{what} ({s} {c})"),
            (Some(s), None) => format!("{what} ({s})"),
            (None, _) => what.to_string(),
        }
    }

    /// The reason stored on a `failed` row: "not found (404): s3://b/k".
    pub fn row_reason(&self, uri: &str) -> String {
        match self.kind {
            Kind::NotFound => format!("not found ({}): {uri}", self.status.unwrap_or(404)),
            _ => format!("{}: {uri}: {}", self.headline(), self.detail),
        }
    }

    /// True when the failure concerns the store as a whole, not this object: the phase
    /// stops (rows stay `pending`) instead of failing every row one by one.
    pub fn is_store_wide(&self) -> bool {
        matches!(self.kind, Kind::Unreachable | Kind::Credentials)
    }

    /// The error for the caller: one line naming the bucket (or the object).
    pub fn into_error(self, uri: &str) -> Error {
        let endpoint = match self.kind {
            Kind::Unreachable => std::env::var("AWS_ENDPOINT_URL")
                .or_else(|_| std::env::var("AWS_ENDPOINT"))
                .map(|e| format!(" at {e}"))
                .unwrap_or_default(),
            _ => String::new(),
        };
        Error::ObjectStore {
            uri: uri.to_string(),
            reason: format!("{}{endpoint}: {}", self.headline(), self.detail),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_code_and_message() {
        let t = "Generic S3 error: Error performing GET http://x in 1ms - Server returned non-2xx status code: 503 Service Unavailable: <Error><Code>SlowDown</Code><Message>Please  reduce\nyour rate</Message></Error>";
        assert_eq!(status_in(t), Some(503));
        assert_eq!(between(t, "<Code>", "</Code>"), Some("SlowDown"));
        assert_eq!(one_line("a \n b"), "a b");
        let f = Failure {
            kind: Kind::NotFound,
            status: Some(404),
            code: Some("NoSuchKey".into()),
            detail: "x".into(),
        };
        assert_eq!(f.row_reason("s3://b/k"), "not found (404): s3://b/k");
        let nb = Failure {
            code: Some("NoSuchBucket".into()),
            ..f
        };
        assert_eq!(nb.headline(), "bucket not found (404 NoSuchBucket)");
        assert!(!nb.is_store_wide());
    }
}
