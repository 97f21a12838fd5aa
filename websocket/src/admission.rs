//! Who may open a websocket: which pages ([`Origins`]), and from which address
//! ([`client_address`]), so that a stranger's page cannot hold the task's protection
//! and one address cannot take every slot.

use std::net::{IpAddr, Ipv6Addr};

use axum::http::{HeaderMap, header};

/// The pages that may open a websocket, from `ALLOWED_ORIGINS`.
///
/// An entry is an origin as a browser sends it (`https://app.example.com`,
/// `http://localhost:3000`), or a bare host (`app.example.com`), which allows that
/// host over http and https alike: the form a load balancer's DNS name comes in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins {
    entries: Vec<String>,
}

/// Why a request's origin is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Two or more `Origin` headers: no browser sends that (RFC 6454, section 7.3).
    Several,
    /// A page of an origin not allowed.
    Foreign,
}

impl Origins {
    /// Any page may connect.
    #[must_use]
    pub fn any() -> Self {
        Self::default()
    }

    /// Only pages of these entries, each checked by [`Origins::parse_entry`].
    ///
    /// # Errors
    /// The first entry that is not an origin or a host.
    pub fn only<I, S>(entries: I) -> Result<Self, String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let entries = entries
            .into_iter()
            .map(|e| Self::parse_entry(e.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// `ALLOWED_ORIGINS`: entries separated by commas; empty entries are skipped,
    /// so a list built by joining (`${LoadBalancer.DNSName},${More}`) may end in one.
    ///
    /// # Errors
    /// The first entry that is not an origin or a host.
    pub fn parse(raw: &str) -> Result<Self, String> {
        Self::only(raw.split(',').filter(|entry| !entry.trim().is_empty()))
    }

    /// One entry of `ALLOWED_ORIGINS`, lower case, without a trailing slash: an
    /// origin (`scheme://host[:port]`) or a bare `host[:port]`.
    ///
    /// # Errors
    /// When it has a path, a query, credentials or another scheme.
    pub fn parse_entry(raw: &str) -> Result<String, String> {
        let entry = raw.trim().trim_end_matches('/').to_ascii_lowercase();
        let host = entry
            .strip_prefix("https://")
            .or_else(|| entry.strip_prefix("http://"))
            .unwrap_or(&entry);
        if !is_host(host) {
            return Err(format!(
                "ALLOWED_ORIGINS={raw:?} is not an origin: expected scheme://host[:port], such as \
                 https://app.example.com, or a host such as app.example.com"
            ));
        }
        Ok(entry)
    }

    /// True when any page may connect.
    #[must_use]
    pub fn is_any(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries, as given.
    #[must_use]
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// Whether a request with these headers may open a websocket. Browsers always
    /// send one `Origin` with a websocket upgrade; other clients need not, and could
    /// send any value they liked, so its absence is no reason to refuse.
    ///
    /// # Errors
    /// Several `Origin` headers, whatever the settings; or one not allowed.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let mut origins = headers.get_all(header::ORIGIN).iter();
        let origin = origins.next();
        if origins.next().is_some() {
            return Err(Refused::Several);
        }
        let Some(origin) = origin else {
            return Ok(());
        };
        if self.is_any() {
            return Ok(());
        }
        let origin = origin.to_str().unwrap_or_default().trim_end_matches('/');
        let host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let allowed = self.entries.iter().any(|entry| {
            entry.eq_ignore_ascii_case(origin)
                || host.is_some_and(|host| entry.eq_ignore_ascii_case(host))
        });
        if allowed {
            Ok(())
        } else {
            Err(Refused::Foreign)
        }
    }
}

/// `host[:port]`: a DNS name or IPv4 address, or an IPv6 address in brackets.
fn is_host(text: &str) -> bool {
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => (host, Some(port)),
        _ => (text, None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        }
    };
    port_ok && host_ok
}

/// The address a client's connections are counted under: the peer, or, when the
/// load balancer is trusted, the address it appended to `X-Forwarded-For`.
///
/// The ALB appends the address it saw to the right of `X-Forwarded-For`; whatever
/// comes before is the client's own text. So only the rightmost entry is believed,
/// and only when told (`TRUST_X_FORWARDED_FOR`): a client that reaches the server
/// directly could write any address there. IPv6 clients are counted by their /64,
/// the block one subscriber usually gets.
#[must_use]
pub fn client_address(peer: IpAddr, headers: &HeaderMap, trust_forwarded_for: bool) -> IpAddr {
    let forwarded = trust_forwarded_for
        .then(|| headers.get_all("x-forwarded-for").iter().next_back())
        .flatten()
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.rsplit(',').next())
        .and_then(|last| last.trim().parse::<IpAddr>().ok());
    match forwarded.unwrap_or(peer).to_canonical() {
        IpAddr::V6(v6) => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(name, HeaderValue::from_static(v));
        }
        headers
    }

    #[test]
    fn origins_and_bare_hosts_are_allowed_and_nothing_else() {
        let origins = Origins::only([
            "https://App.example.com/",
            "Name-123.us-east-1.elb.amazonaws.com",
        ])
        .unwrap();
        let check = |o: &'static str| origins.check(&with("origin", &[o]));
        assert_eq!(check("https://app.example.com"), Ok(()));
        assert_eq!(check("http://app.example.com"), Err(Refused::Foreign));
        assert_eq!(check("http://name-123.us-east-1.elb.amazonaws.com"), Ok(()));
        assert_eq!(
            check("https://name-123.us-east-1.elb.amazonaws.com"),
            Ok(())
        );
        assert_eq!(
            check("https://name-123.us-east-1.elb.amazonaws.com:8443"),
            Err(Refused::Foreign)
        );
        assert_eq!(check("https://evil.example"), Err(Refused::Foreign));
        assert_eq!(check("null"), Err(Refused::Foreign));
        assert_eq!(origins.check(&HeaderMap::new()), Ok(()), "not a browser");
    }

    #[test]
    fn two_origin_headers_are_refused_even_when_any_page_may_connect() {
        let two = with(
            "origin",
            &["https://app.example.com", "https://app.example.com"],
        );
        assert_eq!(Origins::any().check(&two), Err(Refused::Several));
        let only = Origins::only(["https://app.example.com"]).unwrap();
        assert_eq!(only.check(&two), Err(Refused::Several));
    }

    #[test]
    fn a_list_may_have_empty_entries() {
        let origins = Origins::parse("name.elb.amazonaws.com, ,https://app.example.com,").unwrap();
        assert_eq!(
            origins.entries(),
            ["name.elb.amazonaws.com", "https://app.example.com"]
        );
        assert!(Origins::parse("app.example.com,ftp://x").is_err());
    }

    #[test]
    fn entries_are_origins_or_hosts() {
        for bad in [
            "https://app.example.com/page",
            "ftp://app.example.com",
            "https://user@app.example.com",
            "",
            "https://",
            "https:",
            "app.example.com:http",
        ] {
            assert!(Origins::parse_entry(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Origins::parse_entry(" http://localhost:3000/ "),
            Ok("http://localhost:3000".to_owned())
        );
        assert!(Origins::parse_entry("http://[::1]:3000").is_ok());
        assert!(Origins::parse_entry("192.0.2.1").is_ok());
    }

    #[test]
    fn forwarded_for_is_believed_only_when_trusted_and_only_its_last_entry() {
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let headers = with("x-forwarded-for", &["203.0.113.1, 198.51.100.7"]);
        assert_eq!(client_address(peer, &headers, false), peer);
        assert_eq!(
            client_address(peer, &headers, true),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        let two = with("x-forwarded-for", &["203.0.113.1", "198.51.100.8"]);
        assert_eq!(
            client_address(peer, &two, true),
            "198.51.100.8".parse::<IpAddr>().unwrap()
        );
        let junk = with("x-forwarded-for", &["not an address"]);
        assert_eq!(client_address(peer, &junk, true), peer);
        assert_eq!(client_address(peer, &HeaderMap::new(), true), peer);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_and_mapped_ipv4_as_ipv4() {
        let headers = HeaderMap::new();
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        assert_eq!(
            client_address(a, &headers, false),
            client_address(b, &headers, false)
        );
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            client_address(mapped, &headers, false),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
    }
}
