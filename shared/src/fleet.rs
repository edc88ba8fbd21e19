//! The planner's rules for the agents a page talks to: the one that served it (its token
//! is in the page's address) and the ones the user adds by address and token, remembered
//! in the browser's local storage, never in share links. Pure, so they are tested here
//! without a browser or Leptos.

/// The most agents one page keeps (each holds a WebSocket open).
pub const MAX_AGENTS: usize = 16;
/// The longest token accepted (the agent's own are 64 hex characters).
pub const MAX_TOKEN_CHARS: usize = 256;
/// The longest agent address accepted.
pub const MAX_ADDRESS_CHARS: usize = 2048;
/// Where the added agents are kept (JSON: `[{"url": …, "token": …}]`).
pub const STORAGE_KEY: &str = "headroom.agents";

/// Where an agent's WebSocket is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAddress {
    /// `ws://` or `wss://` URL of its `/ws` endpoint, without the token.
    pub socket_url: String,
    /// `host:port`, as the page shows it.
    pub label: String,
}

impl AgentAddress {
    /// The URL the page opens: the token as the `token` query parameter (the one way a
    /// browser can present it). Tokens are URL-safe by [`parse_token`].
    pub fn url_with_token(&self, token: &str) -> String {
        format!("{}?token={token}", self.socket_url)
    }
}

fn is_loopback(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Reads an agent's address as a user pastes it: the URL the agent printed
/// (`https://gpu1.lab:7878/?token=…`), its WebSocket URL (`wss://…/ws`), or a bare
/// `host:port` (TLS assumed). Returns the address and the token the URL carried, if any.
/// Plain `http`/`ws` is accepted only for loopback (an SSH tunnel's end): anywhere else
/// the token would cross the network in clear.
pub fn parse_address(text: &str) -> Result<(AgentAddress, Option<String>), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("agent address: empty; paste the URL the agent printed, or host:port".into());
    }
    if text.chars().count() > MAX_ADDRESS_CHARS {
        return Err(format!("agent address: longer than {MAX_ADDRESS_CHARS} characters"));
    }
    let with_scheme = if text.contains("://") { text.to_owned() } else { format!("https://{text}") };
    let url = url::Url::parse(&with_scheme).map_err(|e| format!("agent address: {e}"))?;
    let secure = match url.scheme() {
        "https" | "wss" => true,
        "http" | "ws" => false,
        other => return Err(format!("agent address: the scheme must be https, wss, http or ws, not '{other}'")),
    };
    let host = url.host().ok_or("agent address: it names no host")?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("agent address: user names and passwords do not belong in it; give the token apart".into());
    }
    if !secure && !is_loopback(&host) {
        return Err(format!(
            "agent address: plain {} to {host} would send the token in clear; serve the agent with TLS \
             (https://) or reach it through an SSH tunnel to a loopback port",
            url.scheme()
        ));
    }
    if !matches!(url.path(), "" | "/" | "/ws" | "/index.html") {
        return Err(format!("agent address: unexpected path '{}'; give the agent's address or its /ws", url.path()));
    }
    let token = url.query_pairs().find(|(k, _)| k == "token").map(|(_, v)| parse_token(&v)).transpose()?;
    let port = url.port_or_known_default().ok_or("agent address: no port")?;
    let host_text = match host {
        url::Host::Ipv6(ip) => format!("[{ip}]"),
        other => other.to_string(),
    };
    let label = format!("{host_text}:{port}");
    let scheme = if secure { "wss" } else { "ws" };
    Ok((AgentAddress { socket_url: format!("{scheme}://{label}/ws"), label }, token))
}

/// Checks a token as typed: 1 to [`MAX_TOKEN_CHARS`] characters, letters, digits and
/// `-._~` only (what goes into a URL unescaped).
pub fn parse_token(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("token: empty; use the token the agent printed, or one from `headroom token add`".into());
    }
    if t.chars().count() > MAX_TOKEN_CHARS {
        return Err(format!("token: longer than {MAX_TOKEN_CHARS} characters"));
    }
    if let Some(bad) = t.chars().find(|c| !(c.is_ascii_alphanumeric() || "-._~".contains(*c))) {
        return Err(format!("token: '{bad}' is not a token character (letters, digits, -._~)"));
    }
    Ok(t.to_owned())
}

/// Whether one more agent, at `address`, can join `known` (the addresses already listed).
pub fn check_new(known: &[AgentAddress], address: &AgentAddress) -> Result<(), String> {
    if known.iter().any(|a| a.socket_url == address.socket_url) {
        return Err(format!("agent address: {} is already in the list", address.label));
    }
    if known.len() >= MAX_AGENTS {
        return Err(format!("agents: at most {MAX_AGENTS}; remove one first"));
    }
    Ok(())
}

/// The stored form of the added agents.
pub fn encode_saved(agents: &[(AgentAddress, String)]) -> String {
    let list: Vec<serde_json::Value> =
        agents.iter().map(|(a, token)| serde_json::json!({ "url": a.socket_url, "token": token })).collect();
    serde_json::Value::Array(list).to_string()
}

/// The added agents from storage, each checked again as if typed; what does not pass (a
/// damaged or hand-edited entry) is left out, and so is anything past [`MAX_AGENTS`].
pub fn decode_saved(text: &str) -> Vec<(AgentAddress, String)> {
    let Ok(serde_json::Value::Array(list)) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let mut out: Vec<(AgentAddress, String)> = Vec::new();
    for entry in list {
        let (Some(url), Some(token)) = (entry["url"].as_str(), entry["token"].as_str()) else {
            continue;
        };
        let (Ok((address, _)), Ok(token)) = (parse_address(url), parse_token(token)) else {
            continue;
        };
        let known: Vec<AgentAddress> = out.iter().map(|(a, _)| a.clone()).collect();
        if check_new(&known, &address).is_ok() {
            out.push((address, token));
        }
    }
    out
}

/// Estimated seconds left of a run: the steps still to do times the mean time of the
/// last (up to) 20 whole steps seen, each the sum of its micro-batches' times. `records`
/// are `(step, step_time_ms)` in order; `None` before one whole step was seen.
pub fn eta_seconds(records: &[(u64, f64)], planned_steps: u64) -> Option<f64> {
    const WINDOW: usize = 20;
    let &(last_step, _) = records.last()?;
    // The last step may still be going on: the pace comes from the ones before it.
    let mut sums: Vec<f64> = Vec::new();
    let mut current = None;
    for &(step, ms) in records.iter().rev().skip_while(|(s, _)| *s == last_step) {
        if current != Some(step) {
            if sums.len() == WINDOW {
                break;
            }
            sums.push(0.0);
            current = Some(step);
        }
        if let Some(sum) = sums.last_mut() {
            *sum += ms;
        }
    }
    if sums.is_empty() {
        return None;
    }
    let per_step_ms = sums.iter().sum::<f64>() / sums.len() as f64;
    Some(planned_steps.saturating_sub(last_step) as f64 * per_step_ms / 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_users_paste_them() {
        let (a, token) = parse_address("https://gpu1.lab:7878/?token=abc123").expect("printed URL");
        assert_eq!(a.socket_url, "wss://gpu1.lab:7878/ws");
        assert_eq!(a.label, "gpu1.lab:7878");
        assert_eq!(token.as_deref(), Some("abc123"));
        assert_eq!(a.url_with_token("abc123"), "wss://gpu1.lab:7878/ws?token=abc123");
        let (bare, token) = parse_address(" gpu2:9000 ").expect("host:port");
        assert_eq!((bare.socket_url.as_str(), token), ("wss://gpu2:9000/ws", None));
        let (default_port, _) = parse_address("https://gpu3.lab").expect("default port");
        assert_eq!(default_port.label, "gpu3.lab:443");
        let (tunnel, _) = parse_address("http://127.0.0.1:7878").expect("a tunnel's end");
        assert_eq!(tunnel.socket_url, "ws://127.0.0.1:7878/ws");
        let (v6, _) = parse_address("ws://[::1]:7000/ws").expect("v6 loopback");
        assert_eq!(v6.socket_url, "ws://[::1]:7000/ws");
        assert!(parse_address("http://localhost:7878/index.html").is_ok());
    }

    #[test]
    fn unsafe_or_malformed_addresses_are_refused_with_the_reason() {
        let err = |t: &str| parse_address(t).expect_err(t);
        assert!(err("http://gpu1.lab:7878").contains("in clear"), "{}", err("http://gpu1.lab:7878"));
        assert!(err("ws://10.0.0.5:7878/ws").contains("SSH tunnel"));
        assert!(err("ftp://gpu1").contains("scheme"));
        assert!(err("").contains("empty"));
        assert!(err("https://me:pw@gpu1.lab").contains("passwords"));
        assert!(err("https://gpu1.lab/admin").contains("path"));
        assert!(err("https://gpu1.lab/?token=a%20b").starts_with("token:"));
        assert!(err(&"a".repeat(MAX_ADDRESS_CHARS + 1)).contains("longer"));
        assert!(err("https://[::1").starts_with("agent address:"));
    }

    #[test]
    fn tokens_are_url_safe_and_bounded() {
        assert_eq!(parse_token(" 0f3a-b_c.d~ ").expect("ok"), "0f3a-b_c.d~");
        assert!(parse_token("").is_err());
        assert!(parse_token("a&b").expect_err("&").contains("'&'"));
        assert!(parse_token(&"a".repeat(MAX_TOKEN_CHARS)).is_ok());
        assert!(parse_token(&"a".repeat(MAX_TOKEN_CHARS + 1)).is_err());
    }

    #[test]
    fn the_list_has_no_duplicates_and_a_limit() {
        let addr = |i: usize| parse_address(&format!("gpu{i}:7878")).expect("addr").0;
        let mut known = Vec::new();
        for i in 0..MAX_AGENTS {
            check_new(&known, &addr(i)).expect("room");
            known.push(addr(i));
        }
        assert!(check_new(&known[..3], &addr(1)).expect_err("dup").contains("already"));
        assert!(check_new(&known, &addr(99)).expect_err("full").contains("at most"));
    }

    #[test]
    fn saved_agents_round_trip_and_damaged_entries_are_dropped() {
        let a = parse_address("gpu1:7878").expect("a").0;
        let b = parse_address("http://127.0.0.1:9").expect("b").0;
        let saved = vec![(a.clone(), "t1".to_owned()), (b, "t2".to_owned())];
        assert_eq!(decode_saved(&encode_saved(&saved)), saved);
        let damaged = r#"[{"url":"http://far.away:1","token":"x"},{"url":"gpu1:7878"},
            {"url":"wss://gpu1:7878/ws","token":"t1"},{"url":"gpu1:7878","token":"dup"},7]"#;
        assert_eq!(decode_saved(damaged), vec![(a, "t1".to_owned())]);
        assert!(decode_saved("not json").is_empty());
        let many: Vec<_> = (0..40).map(|i| (parse_address(&format!("g{i}:1")).expect("a").0, "t".into())).collect();
        assert_eq!(decode_saved(&encode_saved(&many)).len(), MAX_AGENTS);
    }

    #[test]
    fn eta_is_the_steps_left_at_the_pace_of_the_last_whole_steps() {
        // Two micro-batches a step, 100 ms each: 200 ms a step.
        let recs: Vec<(u64, f64)> = (1..=5).flat_map(|s| [(s, 100.0), (s, 100.0)]).collect();
        let eta = eta_seconds(&recs, 10).expect("eta");
        assert!((eta - 1.0).abs() < 1e-9, "{eta}");
        // The step in progress is not counted as a whole one.
        let mut partial = recs.clone();
        partial.push((6, 5000.0));
        assert!((eta_seconds(&partial, 10).expect("eta") - 0.8).abs() < 1e-9);
        // Only the last 20 whole steps set the pace.
        let mut long: Vec<(u64, f64)> = (1..=30).map(|s| (s, 1000.0)).collect();
        long.extend((31..=60).map(|s| (s, 10.0)));
        let eta = eta_seconds(&long, 100).expect("eta");
        assert!((eta - 40.0 * 0.010).abs() < 1e-9, "{eta}");
        assert_eq!(eta_seconds(&[(1, 5.0)], 10), None, "no whole step yet");
        assert_eq!(eta_seconds(&[], 10), None);
        assert_eq!(eta_seconds(&recs, 3), Some(0.0), "past the plan");
    }
}
