//! Who may open the WebSocket: a secret token (browsers cannot set headers on a
//! WebSocket, so it travels as the `token` query parameter) compared in constant time,
//! and an `Origin` allowlist matched exactly on scheme, host and port.

/// The `token` parameter of a query string, percent-decoding not needed: tokens are hex.
pub fn token_from_query(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|pair| pair.strip_prefix("token="))
}

/// The token of an `Authorization: Bearer TOKEN` header value.
pub fn token_from_bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The tokens a serving agent accepts: the one it printed at start (`--token`, or a
/// fresh one), or the named tokens of a token file, re-read as it changes.
#[derive(Debug)]
pub enum Tokens {
    One(String),
    File(crate::tokens::TokenStore),
}

impl Tokens {
    /// The name of the token `given` is (`printed` for the one token), if it is one.
    pub fn check(&self, given: &str) -> Option<String> {
        match self {
            Tokens::One(t) => crate::tokens::same(given, t).then(|| "printed".to_owned()),
            Tokens::File(store) => store.check(given),
        }
    }
}

/// An origin normalised to `scheme://host:port`, with the scheme's default port filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin(String);

impl Origin {
    pub fn parse(text: &str) -> Option<Origin> {
        let text = text.trim().to_ascii_lowercase();
        let (scheme, rest) = text.split_once("://")?;
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            _ => return None,
        };
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return None;
        }
        // IPv6 hosts come in brackets: [::1]:8080.
        let (host, port) = if let Some(end) = rest.find(']') {
            let host = &rest[..=end];
            match &rest[end + 1..] {
                "" => (host, default_port),
                p => (host, p.strip_prefix(':')?.parse().ok()?),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().ok()?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() {
            return None;
        }
        Some(Origin(format!("{scheme}://{host}:{port}")))
    }
}

/// The host names a request's `Host` may give for an agent bound to `bind_host`: the
/// loopback names, the bound address (unless it is a wildcard) and `extra` names.
pub fn own_hosts(bind_host: &str, extra: &[String]) -> Vec<String> {
    let mut hosts = vec!["127.0.0.1".to_owned(), "localhost".to_owned(), "[::1]".to_owned()];
    let bracketed = if bind_host.contains(':') { format!("[{bind_host}]") } else { bind_host.to_owned() };
    if !hosts.contains(&bracketed) && bracketed != "0.0.0.0" && bracketed != "[::]" {
        hosts.push(bracketed);
    }
    hosts.extend(extra.iter().map(|h| h.trim().to_ascii_lowercase()));
    hosts
}

/// Whether a `Host` header names this agent: one of `hosts`, with the agent's `port` or
/// none. Anything else — a name that resolves here only through DNS rebinding above all
/// — is refused.
pub fn host_allowed(host: &str, port: u16, hosts: &[String]) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let (name, given_port) = if let Some(end) = host.find(']') {
        (&host[..=end], host[end + 1..].strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host.as_str(), None),
        }
    };
    if let Some(p) = given_port
        && p.parse::<u16>().ok() != Some(port)
    {
        return false;
    }
    !name.is_empty() && hosts.iter().any(|h| h == name)
}

/// The origins the agent serves its own pages from (`https` when it serves TLS).
pub fn own_origins(port: u16, bind_host: &str, tls: bool) -> Vec<Origin> {
    let scheme = if tls { "https" } else { "http" };
    let mut hosts = vec!["127.0.0.1".to_owned(), "localhost".to_owned(), "[::1]".to_owned()];
    let bracketed = if bind_host.contains(':') { format!("[{bind_host}]") } else { bind_host.to_owned() };
    if !hosts.contains(&bracketed) && bracketed != "0.0.0.0" && bracketed != "[::]" {
        hosts.push(bracketed);
    }
    hosts.iter().filter_map(|h| Origin::parse(&format!("{scheme}://{h}:{port}"))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_on_scheme_host_and_port() {
        let allowed = own_origins(8787, "127.0.0.1", false);
        let ok = |o: &str| Origin::parse(o).is_some_and(|o| allowed.contains(&o));
        assert!(ok("http://127.0.0.1:8787"));
        assert!(ok("http://LOCALHOST:8787"));
        assert!(ok("http://[::1]:8787"));
        assert!(!ok("http://127.0.0.1:8788"), "other port");
        assert!(!ok("https://127.0.0.1:8787"), "other scheme");
        assert!(!ok("http://127.0.0.1.evil.example:8787"), "suffix trick");
        assert!(!ok("http://evil.example"), "foreign host");
        assert!(!ok("null"), "opaque origin");
        assert_eq!(Origin::parse("https://example.com").map(|o| o.0), Some("https://example.com:443".into()));
        // A configured origin (`--allow-origin https://plan.example.org`) against lookalikes.
        let plan = [Origin::parse("https://plan.example.org").expect("origin")];
        let ok = |o: &str| Origin::parse(o).is_some_and(|o| plan.contains(&o));
        assert!(ok("https://plan.example.org") && ok("https://plan.example.org:443") && ok("HTTPS://Plan.Example.Org"));
        for bad in [
            "https://plan.example.org.evil.com",
            "https://plan.example.orgy",
            "https://evilplan.example.org",
            "https://plan.example.org:8443",
            "http://plan.example.org",
            "https://plan.example.org@evil.com",
            "https://plan.example.org/path",
            "null",
            "",
        ] {
            assert!(!ok(bad), "{bad:?} must not pass as https://plan.example.org");
        }
        let tls = own_origins(8787, "127.0.0.1", true);
        assert!(tls.contains(&Origin::parse("https://127.0.0.1:8787").expect("origin")));
        assert!(!tls.contains(&Origin::parse("http://127.0.0.1:8787").expect("origin")));
    }

    #[test]
    fn hosts_match_the_agents_names_and_port_only() {
        let hosts = own_hosts("127.0.0.1", &["gpu-box.lab".to_owned()]);
        let ok = |h: &str| host_allowed(h, 8787, &hosts);
        assert!(ok("127.0.0.1:8787") && ok("localhost:8787") && ok("[::1]:8787") && ok("LOCALHOST"));
        assert!(ok("gpu-box.lab:8787"), "a configured name");
        assert!(!ok("evil.example:8787"), "a rebound name");
        assert!(!ok("127.0.0.1.evil.example:8787"), "suffix trick");
        assert!(!ok("localhost:8788"), "other port");
        assert!(!ok("localhost:x"), "no port");
        assert!(!ok(""), "empty");
        assert!(!host_allowed("0.0.0.0:8787", 8787, &own_hosts("0.0.0.0", &[])), "wildcards are no names");
    }

    #[test]
    fn tokens_compare_and_parse() {
        let new_token = || crate::tokens::generate().expect("the OS RNG");
        let t = new_token();
        assert_eq!(t.len(), crate::tokens::TOKEN_HEX_CHARS);
        assert_ne!(t, new_token());
        assert!(crate::tokens::same(&t, &t));
        assert!(!crate::tokens::same("abc", &t));
        assert_eq!(token_from_query(Some("a=1&token=xyz")), Some("xyz"));
        assert_eq!(token_from_query(Some("tokenx=1")), None);
        assert_eq!(token_from_query(None), None);
        assert_eq!(token_from_bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(token_from_bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(token_from_bearer(Some("Basic abc")), None);
        assert_eq!(token_from_bearer(Some("Bearer ")), None);
        assert_eq!(token_from_bearer(None), None);
        let one = Tokens::One(t.clone());
        assert_eq!(one.check(&t).as_deref(), Some("printed"));
        assert_eq!(one.check(&new_token()), None);
    }
}
