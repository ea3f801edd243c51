//! Where a worker's calls go when the coordinator runs as several Raft replicas (issue 14): only the
//! leader serves worker RPCs; a follower answers each with `UNAVAILABLE` and, when it knows the leader,
//! names it in the `iro-leader` metadata of that status. The client follows the hint at once; without
//! one (an election) it tries the next replica and backs off.
//!
//! Both the hint and an operator's list of replicas are checked here, so that a client dials only
//! `http(s)://host:port` URLs: a hint is data from the network, and a bad one is logged and ignored
//! rather than followed.

use tonic::codegen::http::Uri;
use tonic::codegen::http::uri::Scheme;

/// The response metadata (headers or trailers of the `Status`) in which a follower names the leader's
/// gRPC URL, e.g. `iro-leader: https://coord-1.coord.ns.svc:50051`.
pub const LEADER_HEADER: &str = "iro-leader";

/// How much of a rejected hint a warning shows.
const SHOWN_CHARS: usize = 120;

/// The leader's URL a follower named in `status`, normalized (`scheme://host:port`, no trailing slash);
/// None when the status names none. A value that is not a plain `http(s)://host:port` URL is logged and
/// ignored, as if there were no hint.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    let value = status.metadata().get(LEADER_HEADER)?;
    let checked = value.to_str().map_err(|_| "not visible ASCII".to_owned()).and_then(check_url);
    match checked {
        Ok(url) => Some(url),
        Err(why) => {
            let shown: String = String::from_utf8_lossy(value.as_bytes()).chars().take(SHOWN_CHARS).collect();
            tracing::warn!(header = LEADER_HEADER, value = ?shown, "ignoring the leader hint: {why}");
            None
        }
    }
}

/// A comma-separated list of coordinator gRPC URLs (every replica of one cluster, or one of them): each
/// entry trimmed and normalized as `leader_hint` does, duplicates dropped (the first stays, in order).
/// An empty list or entry, or one that is not `http(s)://host:port`, is an error naming it.
pub fn parse_urls(list: &str) -> Result<Vec<String>, String> {
    let mut urls: Vec<String> = Vec::new();
    for (i, entry) in split_list(list)?.into_iter().enumerate() {
        let url = check_url(entry).map_err(|why| {
            format!(
                "coordinator URL {} `{}` {why} (expected http://HOST:PORT or https://HOST:PORT)",
                i + 1,
                entry.escape_debug()
            )
        })?;
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    Ok(urls)
}

/// `list`'s comma-separated entries, trimmed; an empty list or entry (`a,,b`, a trailing comma) is an error.
/// For lists whose entries are checked elsewhere (`iro status`: a status URL may leave the port out).
pub fn split_list(list: &str) -> Result<Vec<&str>, String> {
    if list.trim().is_empty() {
        return Err("no coordinator URL given".to_owned());
    }
    list.split(',')
        .enumerate()
        .map(|(i, entry)| match entry.trim() {
            "" => Err(format!("entry {} of `{}` is empty", i + 1, list.escape_debug())),
            entry => Ok(entry),
        })
        .collect()
}

/// `url` as `scheme://host:port` if it is an http:// or https:// URL with a host and a port and nothing
/// else (no user info, path, query or control characters); otherwise why not.
fn check_url(url: &str) -> Result<String, String> {
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("holds a control or whitespace character".to_owned());
    }
    let uri: Uri = url.parse().map_err(|e| format!("is not a URL: {e}"))?;
    let scheme = match uri.scheme() {
        Some(s) if *s == Scheme::HTTP => "http",
        Some(s) if *s == Scheme::HTTPS => "https",
        Some(s) => return Err(format!("has scheme `{s}`, not http or https")),
        None => return Err("has no http:// or https:// scheme".to_owned()),
    };
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err("holds user info".to_owned());
    }
    if authority.host().is_empty() {
        return Err("has no host".to_owned());
    }
    match authority.port_u16() {
        Some(0) => return Err("has port 0".to_owned()),
        Some(_) => {}
        None if authority.port().is_some() => return Err("has a port that is not a number below 65536".to_owned()),
        None => return Err("has no port".to_owned()),
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty()) {
        return Err("has a path or query (only scheme://host:port)".to_owned());
    }
    Ok(format!("{scheme}://{authority}"))
}

#[cfg(test)]
mod tests {
    use tonic::metadata::{MetadataMap, MetadataValue};

    use super::*;

    fn unavailable(value: Option<&'static [u8]>) -> tonic::Status {
        let mut metadata = MetadataMap::new();
        if let Some(value) = value {
            metadata.insert(LEADER_HEADER, MetadataValue::try_from(value).unwrap());
        }
        tonic::Status::with_metadata(tonic::Code::Unavailable, "not the leader", metadata)
    }

    #[test]
    fn a_hint_is_read_and_normalized() {
        let hint = |v: &'static [u8]| leader_hint(&unavailable(Some(v)));
        assert_eq!(hint(b"https://coord-1.coord.ns.svc:50051").as_deref(), Some("https://coord-1.coord.ns.svc:50051"));
        assert_eq!(hint(b"http://127.0.0.1:40123/").as_deref(), Some("http://127.0.0.1:40123"));
        assert_eq!(hint(b"HTTP://[::1]:50051").as_deref(), Some("http://[::1]:50051"));
        assert_eq!(leader_hint(&unavailable(None)), None, "an election: no header");
        assert_eq!(leader_hint(&tonic::Status::unavailable("down")), None);
    }

    #[test]
    fn a_bad_hint_is_ignored() {
        let bad: [&'static [u8]; 14] = [
            b"",
            b"coord-1:50051",
            b"ftp://coord-1:50051",
            b"unix:///var/run/iro.sock",
            b"https://coord-1",
            b"https://:50051",
            b"https://coord-1:0",
            b"https://coord-1:65536",
            b"https://coord-1:http",
            b"https://user:pw@coord-1:50051",
            b"https://coord-1:50051/iro.v1.Coordinator",
            b"https://coord-1:50051?x=1",
            b"https://coord-1:50051\t",
            b"https://co\xc3\xb6rd:50051",
        ];
        for value in bad {
            assert_eq!(leader_hint(&unavailable(Some(value))), None, "{}", String::from_utf8_lossy(value));
        }
    }

    #[test]
    fn control_characters_are_refused() {
        for url in ["http://a:1\n", "http://a\r\n:1", "http://a:1\u{7f}", "http://a\u{0}b:1", "http://a b:1"] {
            assert!(check_url(url).unwrap_err().contains("control"), "{url:?}");
        }
    }

    #[test]
    fn a_list_is_trimmed_deduplicated_and_kept_in_order() {
        assert_eq!(parse_urls("http://127.0.0.1:50051").unwrap(), ["http://127.0.0.1:50051"]);
        let list =
            " https://coord-0.c:50051, https://coord-1.c:50051 ,https://coord-0.c:50051/,https://coord-2.c:50051";
        assert_eq!(
            parse_urls(list).unwrap(),
            ["https://coord-0.c:50051", "https://coord-1.c:50051", "https://coord-2.c:50051"]
        );
    }

    #[test]
    fn a_bad_list_names_the_bad_entry() {
        let error = parse_urls("http://a:1,coord-1:50051,http://b:2").unwrap_err();
        assert!(error.contains("2 `coord-1:50051`") && error.contains("HOST:PORT"), "{error}");
        let error = parse_urls("http://a:1,https://b").unwrap_err();
        assert!(error.contains("`https://b` has no port"), "{error}");
        let error = parse_urls("http://a:1,,http://b:2").unwrap_err();
        assert!(error.contains("entry 2") && error.contains("empty"), "{error}");
        assert!(parse_urls("http://a:1,").unwrap_err().contains("entry 2"));
        assert_eq!(parse_urls("  ").unwrap_err(), "no coordinator URL given");
        let error = parse_urls("http://a:1,http://a\u{7}b:2").unwrap_err();
        assert!(error.contains("2 `http://a\\u{7}b:2`") && error.contains("control"), "escaped: {error}");
    }
}
