//! What a sandbox may reach, and the proxy that holds it to that. One address rule serves the
//! webhooks and every runtime's sandboxes: public addresses only, never loopback, private, shared
//! or link-local ones (the Kubernetes NetworkPolicy in manifests/ says the same), with the
//! exceptions an operator names (`--egress-allow HOST[:PORT]`).
//!
//! A local sandbox under bubblewrap has a network of its own with nothing in it but loopback; its
//! one way out is a Unix socket, mounted into it, on which `serve` runs the proxy below (HTTP
//! CONNECT, or a plain request in absolute form). Every connection is decided here, against the
//! addresses a name resolves to when connecting, and logged with the sandbox it came from. The
//! proxy trusts nothing the sandbox sends: heads are bounded in size and time.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The longest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// How long a sandbox may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections one sandbox may hold open through the proxy at once.
const MAX_CONNECTIONS: usize = 256;

/// Addresses neither a sandbox nor a webhook may reach unless allowed: loopback, private, link-local
/// (cloud metadata), shared, reserved, unspecified and multicast ranges, and IPv6 forms that carry
/// one of those IPv4 addresses inside (mapped, compatible, NAT64, 6to4).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared (carrier-grade NAT)
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) // benchmarking
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || o[0] >= 240 // reserved
                || o[0] == 0
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let o = v6.octets();
            let embedded =
                |a: usize| IpAddr::V4(std::net::Ipv4Addr::new(o[a], o[a + 1], o[a + 2], o[a + 3]));
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            // IPv4-compatible (::a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) carry the address last.
            if (s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified())
                || s[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
            {
                return is_private(embedded(12));
            }
            // 6to4 (2002:a.b.c.d::/48) carries it after the prefix.
            if s[0] == 0x2002 && is_private(embedded(2)) {
                return true;
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
        }
    }
}

/// One exception an operator allows: a host (an address or a name) and, optionally, one port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    host: Host,
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    /// Lower case, without a trailing dot.
    Name(String),
}

fn normalize_name(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl std::str::FromStr for Allow {
    type Err = String;

    /// `127.0.0.1:8080`, `10.0.0.5`, `[::1]:8080`, `::1`, `models.internal:443`, `models.internal`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "--egress-allow {s:?}: {why}; give HOST or HOST:PORT, e.g. 127.0.0.1:8080, [::1]:8080 or models.example.com:443"
            )
        };
        let s = s.trim();
        let port = |p: &str| match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad("the port must be 1 to 65535")),
            Ok(p) => Ok(Some(p)),
        };
        if let Some(rest) = s.strip_prefix('[') {
            let (ip, tail) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            let ip = ip.parse().map_err(|_| bad("not an IPv6 address"))?;
            let port = match tail.strip_prefix(':') {
                Some(p) => port(p)?,
                None if tail.is_empty() => None,
                None => return Err(bad("unexpected text after ]")),
            };
            return Ok(Allow {
                host: Host::Ip(ip),
                port,
            });
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Allow {
                host: Host::Ip(ip),
                port: None,
            });
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(Allow {
                host: Host::Ip(addr.ip()),
                port: port(&addr.port().to_string())?,
            });
        }
        let (name, port) = match s.rsplit_once(':') {
            Some((name, p)) => (name, port(p)?),
            None => (s, None),
        };
        let name = normalize_name(name);
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !valid {
            return Err(bad("not a host name or an IP address"));
        }
        Ok(Allow {
            host: Host::Name(name),
            port,
        })
    }
}

impl Allow {
    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

/// Where sandboxes may connect: public addresses, and the operator's exceptions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<Allow>,
}

impl EgressPolicy {
    /// From `--egress-allow` values; the error names the value to fix.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let allow = entries
            .iter()
            .filter(|e| !e.trim().is_empty())
            .map(|e| e.parse())
            .collect::<Result<_, _>>()?;
        Ok(EgressPolicy { allow })
    }

    /// The allowed loopback addresses that name a port: a local sandbox gets a listener at each
    /// inside its own network, carried to the same address outside, so a client configured with
    /// `http://127.0.0.1:PORT` (a local model server) works unchanged.
    pub fn loopback_forwards(&self) -> Vec<SocketAddr> {
        self.allow
            .iter()
            .filter_map(|a| match (&a.host, a.port) {
                (Host::Ip(ip), Some(port)) if ip.is_loopback() => Some(SocketAddr::new(*ip, port)),
                _ => None,
            })
            .collect()
    }

    fn allows_ip(&self, ip: IpAddr, port: u16) -> bool {
        self.allow
            .iter()
            .any(|a| a.host == Host::Ip(ip) && a.port_matches(port))
    }

    fn allows_name(&self, name: &str, port: u16) -> bool {
        self.allow
            .iter()
            .any(|a| matches!(&a.host, Host::Name(n) if n == name) && a.port_matches(port))
    }

    /// The address a connection to `host:port` goes to, or why it may not. A name is resolved
    /// here, once, and the connection is made to the address that was checked (no second lookup
    /// that DNS could answer differently). A name the operator allowed may resolve anywhere;
    /// any other must resolve to public addresses only.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = host.parse::<IpAddr>() {
            return if !is_private(ip) || self.allows_ip(ip, port) {
                Ok(SocketAddr::new(ip, port))
            } else {
                Err(format!(
                    "{ip} is a loopback, private, shared or link-local address, which sandboxes may not reach (an operator can allow it with --egress-allow)"
                ))
            };
        }
        let name = normalize_name(host);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| format!("{name:?} does not resolve: {e}"))?
            .collect();
        let first = addrs
            .first()
            .copied()
            .ok_or_else(|| format!("{name:?} has no address"))?;
        if self.allows_name(&name, port) {
            return Ok(first);
        }
        match addrs
            .iter()
            .find(|a| is_private(a.ip()) && !self.allows_ip(a.ip(), port))
        {
            Some(private) => Err(format!(
                "{name:?} resolves to {}, a loopback, private, shared or link-local address, which sandboxes may not reach (an operator can allow the name with --egress-allow)",
                private.ip()
            )),
            None => Ok(first),
        }
    }
}

/// The most hosts a session may narrow its sandbox's egress to.
pub const MAX_NARROWED_HOSTS: usize = 64;

/// The public hosts one session's sandbox may reach: a narrowing of the policy, set when the
/// session takes the sandbox. The operator's exceptions (`--egress-allow`: model endpoints and
/// the like) stay reachable; of the rest, only these hosts. An empty list: none of the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Narrowing {
    /// As given: `host`, `host:port`, `*.domain` or `*.domain:port`.
    given: Vec<String>,
    rules: Vec<(Rule, Option<u16>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Exact(Host),
    /// A name ending in `.domain` (lower case, no leading dot).
    Under(String),
}

impl Narrowing {
    /// The hosts a client named; the error names the entry to fix.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        if entries.len() > MAX_NARROWED_HOSTS {
            return Err(format!(
                "at most {MAX_NARROWED_HOSTS} hosts ({} given)",
                entries.len()
            ));
        }
        let mut rules = Vec::with_capacity(entries.len());
        for entry in entries {
            let entry = entry.trim();
            let bad = |why: String| {
                format!(
                    "{entry:?}: {why}; give a host name or address, with an optional :port, or \
                     *.domain for every name under a domain"
                )
            };
            if entry.trim_start_matches("*.").split('.').any(str::is_empty) {
                return Err(bad(
                    "a name has an empty label (`..`, or a leading or trailing dot)".into(),
                ));
            }
            match entry.strip_prefix("*.") {
                Some(domain) => {
                    let parsed: Allow = domain.parse().map_err(|_| bad("not a domain".into()))?;
                    // A numeric last label would let names that resolvers read as addresses
                    // (`0xcb.0.113.8`) through.
                    let numeric_tail = |name: &str| {
                        name.rsplit('.')
                            .next()
                            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
                    };
                    match parsed.host {
                        Host::Name(name) if name.contains('.') && !numeric_tail(&name) => {
                            rules.push((Rule::Under(name), parsed.port));
                        }
                        _ => return Err(bad("a wildcard covers a domain with a dot in it".into())),
                    }
                }
                None => {
                    let parsed: Allow = entry.parse().map_err(|_| bad("not a host".into()))?;
                    rules.push((Rule::Exact(parsed.host), parsed.port));
                }
            }
        }
        Ok(Narrowing {
            given: entries.iter().map(|e| e.trim().to_string()).collect(),
            rules,
        })
    }

    /// The entries as given (what is stored to restore the narrowing after a restart).
    pub fn given(&self) -> &[String] {
        &self.given
    }

    /// Whether a connection to `host:port` is one of the session's hosts.
    fn permits(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let target = match host.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(normalize_name(host)),
        };
        self.rules.iter().any(|(rule, p)| {
            p.is_none_or(|p| p == port)
                && match (rule, &target) {
                    (Rule::Exact(h), t) => h == t,
                    (Rule::Under(domain), Host::Name(name)) => name
                        .strip_suffix(domain.as_str())
                        .is_some_and(|head| head.ends_with('.')),
                    (Rule::Under(_), Host::Ip(_)) => false,
                }
        })
    }
}

/// A sandbox's narrowing as its proxy reads it for each request: none until a session sets one.
/// A change ends every connection the proxy holds, so none outlives the rule it was let in by.
#[derive(Debug)]
pub struct NarrowingCell {
    current: std::sync::RwLock<Option<Narrowing>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl NarrowingCell {
    pub fn new(current: Option<Narrowing>) -> Arc<NarrowingCell> {
        Arc::new(NarrowingCell {
            current: std::sync::RwLock::new(current),
            changed: tokio::sync::watch::channel(0).0,
        })
    }

    /// Sets (or, with `None`, lifts) the narrowing, ending the connections already open.
    pub fn set(&self, to: Option<Narrowing>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = to;
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn get(&self) -> Option<Narrowing> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl EgressPolicy {
    /// Whether the operator allowed `host:port` by name or address (`--egress-allow`).
    fn excepts(&self, host: &str, port: u16) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => self.allows_ip(ip, port),
            Err(_) => self.allows_name(&normalize_name(host), port),
        }
    }
}

/// Serves the egress proxy for sandbox `sandbox` on `listener` until the task is aborted; each
/// connection is also held to the sandbox's `narrowing`, when its session set one.
pub fn serve(
    listener: UnixListener,
    sandbox: String,
    policy: Arc<EgressPolicy>,
    narrowing: Arc<NarrowingCell>,
) -> tokio::task::JoinHandle<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    tracing::warn!(sandbox = %sandbox, error = %e, "accepting an egress connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(sandbox = %sandbox, "too many egress connections; refusing one");
                let mut conn = conn;
                let _ = answer(
                    &mut conn,
                    429,
                    "too many connections through the egress proxy",
                )
                .await;
                continue;
            };
            let (sandbox, policy) = (sandbox.clone(), policy.clone());
            let narrowing = narrowing.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(conn, &sandbox, &policy, &narrowing).await {
                    tracing::debug!(sandbox = %sandbox, error = %e, "an egress connection ended with an error");
                }
                drop(slot);
            });
        }
    })
}

/// Binds the proxy's socket at `path` (replacing a stale one), connectable by the sandbox's
/// user: `owner`, when the sandbox runs as another user than `serve`. As root `serve` gives it
/// the socket; otherwise (a container's user, `serve` not root) the socket is open to all, and
/// the data dir above it (0700) keeps everyone on the host but `serve`'s user out.
pub fn bind(path: &Path, owner: Option<u32>) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    let me = nix::unistd::geteuid();
    let mode = match owner {
        Some(uid) if me.is_root() => {
            std::os::unix::fs::chown(path, Some(uid), Some(uid))?;
            0o600
        }
        Some(uid) if uid != me.as_raw() => 0o666,
        _ => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// A target as a request names it: CONNECT's `host:port`, or an absolute `http://` URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    /// For a plain request: the head to send on, in origin form.
    forward_head: Option<Vec<u8>>,
}

/// Where a request head ends (just past its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Reads a request head: the bytes up to its blank line, and what came after.
async fn read_head(conn: &mut UnixStream) -> std::io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let read = tokio::time::timeout(HEAD_TIMEOUT, async {
        loop {
            if let Some(end) = head_end(&buf) {
                let rest = buf.split_off(end);
                return Ok(Some((std::mem::take(&mut buf), rest)));
            }
            if buf.len() > MAX_HEAD {
                return Ok(None);
            }
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    read.unwrap_or(Ok(None))
}

/// Parses a request head into its target; the error is the answer's text.
fn parse_target(head: &[u8]) -> Result<Target, String> {
    let text =
        std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8".to_string())?;
    let (line, rest) = text.split_once("\r\n").unwrap_or((text, ""));
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("a request line must be METHOD TARGET HTTP/1.1".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x is proxied".into());
    }
    if method == "CONNECT" {
        let (host, port) = target
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| "CONNECT needs HOST:PORT".to_string())?;
        return Ok(Target {
            host: host.to_string(),
            port,
            forward_head: None,
        });
    }
    let url = url::Url::parse(target)
        .map_err(|_| "a proxied request needs an absolute http:// URL, or CONNECT".to_string())?;
    if url.scheme() != "http" {
        return Err("only http:// is proxied in absolute form; use CONNECT for https".into());
    }
    let host = url
        .host_str()
        .ok_or_else(|| "the URL has no host".to_string())?;
    let port = url.port_or_known_default().unwrap_or(80);
    let mut origin = url.path().to_string();
    if let Some(q) = url.query() {
        origin.push('?');
        origin.push_str(q);
    }
    // One request per connection: a kept-alive connection could carry a next request for
    // another host past this check.
    let mut forward = format!("{method} {origin} {version}\r\n");
    for header in rest.split("\r\n").filter(|h| !h.is_empty()) {
        let name = header.split(':').next().unwrap_or("").trim();
        if [
            "connection",
            "proxy-connection",
            "proxy-authorization",
            "keep-alive",
        ]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        {
            continue;
        }
        forward.push_str(header);
        forward.push_str("\r\n");
    }
    forward.push_str("Connection: close\r\n\r\n");
    Ok(Target {
        host: host.to_string(),
        port,
        forward_head: Some(forward.into_bytes()),
    })
}

async fn answer(conn: &mut UnixStream, status: u16, text: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        429 => "Too Many Requests",
        _ => "Bad Gateway",
    };
    let body = format!("{text}\n");
    conn.write_all(
        format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
}

async fn handle(
    mut conn: UnixStream,
    sandbox: &str,
    policy: &EgressPolicy,
    cell: &NarrowingCell,
) -> std::io::Result<()> {
    // Subscribed before anything is decided: a narrowing set from here on ends this connection.
    let mut changes = cell.changed.subscribe();
    let Some((head, early)) = read_head(&mut conn).await? else {
        return answer(
            &mut conn,
            400,
            "no complete request head (at most 16 KiB, within 10 s)",
        )
        .await;
    };
    let target = match parse_target(&head) {
        Ok(t) => t,
        Err(why) => return answer(&mut conn, 400, &why).await,
    };
    let shown = format!("{}:{}", target.host, target.port);
    // Read when the request is, not when the connection was opened.
    let narrowing = cell.get();
    if let Some(narrowing) = &narrowing
        && !policy.excepts(&target.host, target.port)
        && !narrowing.permits(&target.host, target.port)
    {
        let why = format!(
            "this session's sandbox may reach only {}",
            if narrowing.given.is_empty() {
                "the operator's allowed hosts".to_string()
            } else {
                narrowing.given.join(", ")
            }
        );
        tracing::info!(sandbox = %sandbox, target = %shown, decision = "denied", reason = %why, "egress");
        return answer(&mut conn, 403, &format!("egress to {shown} refused: {why}")).await;
    }
    let addr = match policy.resolve(&target.host, target.port).await {
        Ok(addr) => addr,
        Err(why) => {
            tracing::info!(sandbox = %sandbox, target = %shown, decision = "denied", reason = %why, "egress");
            return answer(&mut conn, 403, &format!("egress to {shown} refused: {why}")).await;
        }
    };
    tracing::info!(sandbox = %sandbox, target = %shown, %addr, decision = "allowed", "egress");
    let mut upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return answer(
                &mut conn,
                502,
                &format!("connecting to {shown} failed: {e}"),
            )
            .await;
        }
        Err(_) => return answer(&mut conn, 502, &format!("connecting to {shown} timed out")).await,
    };
    let _ = upstream.set_nodelay(true);
    match &target.forward_head {
        None => {
            conn.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                .await?
        }
        Some(head) => upstream.write_all(head).await?,
    }
    if !early.is_empty() {
        upstream.write_all(&early).await?;
    }
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut conn, &mut upstream) => copied.map(|_| ()),
        // A new narrowing (or the proxy replaced): this connection was let in by the old rule.
        _ = changes.changed() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> EgressPolicy {
        EgressPolicy::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("policy")
    }

    #[test]
    fn a_narrowing_permits_its_hosts_names_under_its_domains_and_their_ports_only() {
        let n = Narrowing::parse(&[
            "Api.Example.com".to_string(),
            "*.pkg.example:443".to_string(),
            "203.0.113.7:8443".to_string(),
        ])
        .expect("narrowing");
        for (host, port, permitted) in [
            ("api.example.com", 443, true),
            ("api.example.com.", 80, true),
            ("www.example.com", 443, false),
            ("a.pkg.example", 443, true),
            ("a.b.pkg.example", 443, true),
            ("a.pkg.example", 80, false),
            ("pkg.example", 443, false),
            ("evilpkg.example", 443, false),
            ("203.0.113.7", 8443, true),
            ("203.0.113.7", 443, false),
            ("[::1]", 443, false),
        ] {
            assert_eq!(n.permits(host, port), permitted, "{host}:{port}");
        }
        assert!(!Narrowing::default().permits("api.example.com", 443));
        for bad in ["*.com", "bad host", "*.", "a.example:0"] {
            assert!(Narrowing::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..65).map(|i| format!("h{i}.example")).collect();
        assert!(Narrowing::parse(&many).is_err());
        // Names a resolver reads as addresses, and empty labels, are no domains.
        for bad in ["*.0.113.8", "*..com", "a..example", "*.example.com."] {
            assert!(Narrowing::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    /// A connection the proxy let through ends when the sandbox's narrowing changes, and a
    /// request is held to the narrowing in force when it arrives, not when it connected.
    #[tokio::test]
    async fn a_new_narrowing_ends_open_connections_and_holds_later_requests() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let target = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = target.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = target.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = conn.read(&mut buf).await {
                        if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("e.sock");
        let listener = bind(&path, None).expect("listen");
        let cell = NarrowingCell::new(None);
        let policy = Arc::new(policy(&[&format!("127.0.0.1:{port}")]));
        let _proxy = serve(listener, "s".into(), policy, cell.clone());
        let connect = |head: String| {
            let path = path.clone();
            async move {
                let mut conn = UnixStream::connect(&path).await.expect("connect");
                conn.write_all(head.as_bytes()).await.expect("head");
                let mut answer = vec![0u8; 256];
                let n = conn.read(&mut answer).await.expect("answer");
                (conn, String::from_utf8_lossy(&answer[..n]).to_string())
            }
        };
        let (mut tunnel, said) =
            connect(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n")).await;
        assert!(said.starts_with("HTTP/1.1 200"), "{said}");
        tunnel.write_all(b"ping").await.expect("write");
        let mut echo = [0u8; 4];
        tunnel.read_exact(&mut echo).await.expect("echo");
        assert_eq!(&echo, b"ping");
        // A connection opened now, its request sent after the narrowing is set.
        let mut idle = UnixStream::connect(&path).await.expect("connect");
        cell.set(Some(
            Narrowing::parse(&["allowed.example".to_string()]).expect("narrowing"),
        ));
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_end(&mut rest))
            .await
            .expect("the tunnel ends");
        assert!(ended.is_ok() && rest.is_empty(), "{ended:?} {rest:?}");
        idle.write_all(b"CONNECT blocked.example:443 HTTP/1.1\r\n\r\n")
            .await
            .expect("head");
        let mut answer = String::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(5), idle.read_to_string(&mut answer)).await;
        assert!(
            answer.starts_with("HTTP/1.1 403") && answer.contains("may reach only allowed.example"),
            "{answer}"
        );
        // The operator's exception stays reachable under the narrowing.
        let (_, said) = connect(format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n")).await;
        assert!(said.starts_with("HTTP/1.1 200"), "{said}");
    }

    #[test]
    fn allow_rules_parse_addresses_names_and_ports() {
        let p = policy(&[
            "127.0.0.1:8080",
            "10.0.0.5",
            "[::1]:99",
            "Models.Example.com.:443",
        ]);
        assert_eq!(
            p.loopback_forwards(),
            vec![
                "127.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
                "[::1]:99".parse().expect("addr")
            ]
        );
        assert!(p.allows_ip("10.0.0.5".parse().expect("ip"), 1));
        assert!(!p.allows_ip("127.0.0.1".parse().expect("ip"), 8081));
        assert!(p.allows_name("models.example.com", 443));
        assert!(!p.allows_name("models.example.com", 80));
        for bad in ["127.0.0.1:0", "host:99999", "bad host", "[::1", "a/b"] {
            let err = EgressPolicy::parse(&[bad.to_string()]).expect_err(bad);
            assert!(
                err.contains("--egress-allow") && err.contains("e.g."),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn private_addresses_are_refused_unless_allowed() {
        let p = policy(&["127.0.0.1:8080"]);
        for (host, port) in [
            ("127.0.0.1", 8081),
            ("169.254.169.254", 80),
            ("10.1.2.3", 443),
            ("[::1]", 8080),
            ("localhost", 8081),
        ] {
            let err = p.resolve(host, port).await.expect_err(host);
            assert!(err.contains("--egress-allow"), "{err}");
        }
        assert_eq!(
            p.resolve("127.0.0.1", 8080).await,
            Ok("127.0.0.1:8080".parse().expect("addr"))
        );
        assert_eq!(
            p.resolve("93.184.216.34", 443).await,
            Ok("93.184.216.34:443".parse().expect("addr"))
        );
        let named = policy(&["localhost:8080"]);
        assert!(named.resolve("localhost", 8080).await.is_ok());
    }

    #[test]
    fn plain_requests_are_sent_on_in_origin_form_one_per_connection() {
        let t = parse_target(
            b"GET http://example.com:8080/a?b=1 HTTP/1.1\r\nHost: example.com\r\nProxy-Connection: keep-alive\r\nConnection: keep-alive\r\nX-Y: z\r\n\r\n",
        )
        .expect("target");
        assert_eq!((t.host.as_str(), t.port), ("example.com", 8080));
        let head = String::from_utf8(t.forward_head.expect("head")).expect("utf8");
        assert_eq!(
            head,
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-Y: z\r\nConnection: close\r\n\r\n"
        );
        let t = parse_target(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n").expect("connect");
        assert_eq!(
            (t.host.as_str(), t.port, t.forward_head),
            ("[::1]", 443, None)
        );
        for bad in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"GET https://x/ HTTP/1.1\r\n\r\n",
            b"CONNECT host HTTP/1.1\r\n\r\n",
            b"GET http://x/ HTTP/2\r\n\r\n",
        ] {
            assert!(
                parse_target(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
