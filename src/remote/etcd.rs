//! A small etcd v3 client over etcd's JSON gateway (`/v3/...`, served by etcd ≥ 3.4 on
//! its client port): leases, puts, ranges, deletes and the compare-and-create
//! transaction leader election needs. JSON over HTTP keeps the build free of protobuf
//! tooling; membership traffic is a few small requests per second.
//!
//! With etcd's authentication enabled, name the user in the URL
//! (`etcd://user:password@host:port/cluster`, or `etcd://user@host:port/cluster` with the
//! password in `KVTIER_ETCD_PASSWORD`): the client authenticates once, sends the token
//! with every request, and authenticates again when etcd says the token expired. The
//! password is never logged ([`Etcd::endpoint`] and errors name the host only).
//!
//! etcd over TLS: `etcds://host:port/cluster?cacert=ca.pem&cert=client.pem&key=client-key.pem`
//! (cargo feature `etcd-tls`, the system's OpenSSL): `cacert` replaces the system's trusted
//! CAs, `cert` and `key` present a client certificate (etcd's `--client-cert-auth`).

use std::time::Duration;

use serde_json::{json, Value};

use super::RemoteError;

/// An etcd endpoint and the key prefix of one kvtier cluster.
#[derive(Clone, Debug)]
pub struct Etcd {
    http: reqwest::Client,
    base: String,
    /// `/kvtier/<cluster>/`.
    prefix: String,
    /// The user to authenticate as, when etcd's authentication is on.
    auth: Option<std::sync::Arc<Credentials>>,
}

/// The environment variable holding the etcd password when the URL names only the user.
pub const PASSWORD_ENV: &str = "KVTIER_ETCD_PASSWORD";

/// An etcd user, its password and the current token.
struct Credentials {
    user: String,
    password: String,
    token: parking_lot::Mutex<Option<String>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Credentials {{ user: {:?}, password: <redacted> }}",
            self.user
        )
    }
}

/// Whether etcd refused a request for want of (valid) authentication.
fn auth_refused(status: reqwest::StatusCode, body: &Value) -> bool {
    let text = body["error"]
        .as_str()
        .or(body["message"].as_str())
        .unwrap_or("");
    status == reqwest::StatusCode::UNAUTHORIZED
        || text.contains("invalid auth token")
        || text.contains("user name is empty")
}

/// The TLS files an `etcds://` URL names in its query (`cacert`, `cert`, `key`).
#[derive(Debug, Default)]
struct TlsFiles {
    cacert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl TlsFiles {
    fn parse(query: &str) -> Result<TlsFiles, String> {
        let mut files = TlsFiles::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("query parameter `{pair}` has no value"))?;
            let value = Some(percent_decode(value));
            match name {
                "cacert" => files.cacert = value,
                "cert" => files.cert = value,
                "key" => files.key = value,
                other => {
                    return Err(format!(
                        "unknown query parameter `{other}` (known: cacert, cert, key)"
                    ))
                }
            }
        }
        if files.cert.is_some() != files.key.is_some() {
            return Err("`cert` and `key` go together (a client certificate and its key)".into());
        }
        Ok(files)
    }

    fn is_empty(&self) -> bool {
        self.cacert.is_none() && self.cert.is_none() && self.key.is_none()
    }

    /// Sets up `builder` for TLS with these files.
    #[cfg(feature = "etcd-tls")]
    fn configure(
        &self,
        builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, RemoteError> {
        let read = |param: &str, path: &str| {
            std::fs::read(path).map_err(|e| {
                RemoteError::Config(format!("etcd TLS `{param}={path}`: cannot read: {e}"))
            })
        };
        let unusable = |param: &str, path: &str, e: reqwest::Error| {
            RemoteError::Config(format!("etcd TLS `{param}={path}`: {e}"))
        };
        let mut builder = builder.https_only(true);
        if let Some(path) = &self.cacert {
            let certs = reqwest::Certificate::from_pem_bundle(&read("cacert", path)?)
                .map_err(|e| unusable("cacert", path, e))?;
            if certs.is_empty() {
                return Err(RemoteError::Config(format!(
                    "etcd TLS `cacert={path}`: no PEM certificate in it"
                )));
            }
            builder = builder.tls_certs_only(certs);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            let identity =
                reqwest::Identity::from_pkcs8_pem(&read("cert", cert)?, &read("key", key)?)
                    .map_err(|e| unusable("cert/key", cert, e))?;
            builder = builder.identity(identity);
        }
        Ok(builder)
    }

    #[cfg(not(feature = "etcd-tls"))]
    fn configure(
        &self,
        _builder: reqwest::ClientBuilder,
    ) -> Result<reqwest::ClientBuilder, RemoteError> {
        Err(RemoteError::Config(
            "etcd over TLS (etcds://) needs kvtier built with the `etcd-tls` feature".into(),
        ))
    }
}

/// An etcd lease id.
pub type LeaseId = i64;

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for &ch in s.as_bytes() {
        if ch == b'=' {
            break;
        }
        let v = B64.iter().position(|&b| b == ch)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The key just past every key starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

impl Etcd {
    /// A client for `url`: `etcd://[user[:password]@]host:port[/cluster]` (`http://`
    /// accepted), or `etcds://…` (`https://`) for etcd over TLS, which takes the query
    /// parameters `cacert` (PEM file of the CAs to trust instead of the system's), and
    /// `cert` + `key` (PEM client certificate and PKCS#8 key, for etcd's
    /// `--client-cert-auth`). The cluster name, `default` if absent, namespaces every key.
    /// Connects lazily.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RemoteError> {
        let shown = crate::config::redact_passwords(url);
        let bad = |why: String| RemoteError::Config(format!("metadata server `{shown}`: {why}"));
        let (tls, rest) = if let Some(r) = url
            .strip_prefix("etcds://")
            .or_else(|| url.strip_prefix("https://"))
        {
            (true, r)
        } else if let Some(r) = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("http://"))
        {
            (false, r)
        } else {
            return Err(bad(
                "expected etcd://[user[:password]@]host:port[/cluster], or etcds://… for TLS"
                    .into(),
            ));
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        let files = TlsFiles::parse(query).map_err(bad)?;
        if !tls && !files.is_empty() {
            return Err(bad(
                "TLS files given for a plain-text URL: use etcds://host:port/…".into(),
            ));
        }
        // The authority ends at the first '/'; the user information at its last '@'
        // (reserved characters in a user or password are percent-encoded).
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let (auth, rest) = match rest[..authority_end].rsplit_once('@') {
            Some((userinfo, host)) => {
                let (user, password) = match userinfo.split_once(':') {
                    Some((u, p)) => (percent_decode(u), percent_decode(p)),
                    None => (
                        percent_decode(userinfo),
                        std::env::var(PASSWORD_ENV).map_err(|_| {
                            bad(format!(
                                "no password for user `{userinfo}` (put it in the URL as \
                                 user:password@ or in {PASSWORD_ENV})"
                            ))
                        })?,
                    ),
                };
                let auth = Credentials {
                    user,
                    password,
                    token: parking_lot::Mutex::new(None),
                };
                let rest = format!("{host}{}", &rest[authority_end..]);
                (Some(std::sync::Arc::new(auth)), rest)
            }
            None => (None, rest.to_string()),
        };
        let rest = rest.as_str();
        let (hostport, cluster) = match rest.split_once('/') {
            Some((h, c)) if !c.trim_matches('/').is_empty() => (h, c.trim_matches('/')),
            Some((h, _)) => (h, "default"),
            None => (rest, "default"),
        };
        if hostport.is_empty() || !hostport.contains(':') {
            return Err(bad("expected etcd://host:port[/cluster]".into()));
        }
        let scheme = if tls { "https" } else { "http" };
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if tls {
            builder = files.configure(builder)?;
        }
        let http = builder.build().map_err(|source| RemoteError::EtcdHttp {
            url: format!("{scheme}://{hostport}"),
            source,
        })?;
        Ok(Etcd {
            http,
            base: format!("{scheme}://{hostport}/v3"),
            prefix: format!("/kvtier/{cluster}/"),
            auth,
        })
    }

    /// A fresh token for the configured user.
    async fn authenticate(&self, auth: &Credentials) -> Result<String, RemoteError> {
        let url = format!("{}/auth/authenticate", self.base);
        let body = json!({ "name": auth.user, "password": auth.password });
        let (status, value) = self.send(&url, &body, None).await?;
        match value["token"].as_str() {
            Some(token) if status.is_success() => {
                *auth.token.lock() = Some(token.to_string());
                Ok(token.to_string())
            }
            _ => Err(RemoteError::Etcd(format!(
                "{url}: etcd refused user `{}`: {status}: {}",
                auth.user,
                value["error"]
                    .as_str()
                    .or(value["message"].as_str())
                    .unwrap_or("?")
            ))),
        }
    }

    async fn send(
        &self,
        url: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<(reqwest::StatusCode, Value), RemoteError> {
        let mut req = self.http.post(url).json(body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let resp = req.send().await.map_err(|source| RemoteError::EtcdHttp {
            url: url.to_string(),
            source,
        })?;
        let status = resp.status();
        let value: Value = resp.json().await.map_err(|source| RemoteError::EtcdHttp {
            url: url.to_string(),
            source,
        })?;
        Ok((status, value))
    }

    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    /// `/kvtier/<cluster>/<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, RemoteError> {
        let url = format!("{}/{path}", self.base);
        let (status, value) = match &self.auth {
            None => self.send(&url, &body, None).await?,
            Some(auth) => {
                let cached = auth.token.lock().clone();
                let token = match cached {
                    Some(t) => t,
                    None => self.authenticate(auth).await?,
                };
                let (status, value) = self.send(&url, &body, Some(&token)).await?;
                if auth_refused(status, &value) {
                    // Expired (etcd's simple tokens live minutes): once more, afresh.
                    let token = self.authenticate(auth).await?;
                    self.send(&url, &body, Some(&token)).await?
                } else {
                    (status, value)
                }
            }
        };
        if !status.is_success() {
            let hint = if self.auth.is_none() && auth_refused(status, &value) {
                " (etcd's authentication is on: name the user in the URL, \
                 etcd://user:password@host:port/cluster)"
            } else {
                ""
            };
            return Err(RemoteError::Etcd(format!("{url}: {status}: {value}{hint}")));
        }
        Ok(value)
    }

    /// Grants a lease of `ttl` seconds.
    pub async fn grant(&self, ttl: u64) -> Result<LeaseId, RemoteError> {
        let v = self.post("lease/grant", json!({ "TTL": ttl })).await?;
        int(&v["ID"]).ok_or_else(|| RemoteError::Etcd(format!("lease grant: no ID in {v}")))
    }

    /// Refreshes a lease; `false` if it has expired.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<bool, RemoteError> {
        let v = self
            .post("lease/keepalive", json!({ "ID": lease.to_string() }))
            .await?;
        Ok(int(&v["result"]["TTL"]).unwrap_or(0) > 0)
    }

    /// Revokes a lease (deleting its keys).
    pub async fn revoke(&self, lease: LeaseId) -> Result<(), RemoteError> {
        self.post("lease/revoke", json!({ "ID": lease.to_string() }))
            .await
            .map(|_| ())
    }

    /// Puts `key` = `value`, attached to `lease` if given.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<(), RemoteError> {
        let mut body = json!({ "key": b64(key.as_bytes()), "value": b64(value) });
        if let Some(l) = lease {
            body["lease"] = json!(l.to_string());
        }
        self.post("kv/put", body).await.map(|_| ())
    }

    /// The value of `key`, if set.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, RemoteError> {
        let v = self
            .post("kv/range", json!({ "key": b64(key.as_bytes()) }))
            .await?;
        Ok(kvs(&v).into_iter().next().map(|(_, val)| val))
    }

    /// Every `(key, value)` under `prefix` (relative to the cluster prefix).
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, RemoteError> {
        let full = self.key(prefix);
        let v = self
            .post(
                "kv/range",
                json!({ "key": b64(full.as_bytes()), "range_end": b64(&prefix_end(full.as_bytes())) }),
            )
            .await?;
        Ok(kvs(&v))
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), RemoteError> {
        self.post("kv/deleterange", json!({ "key": b64(key.as_bytes()) }))
            .await
            .map(|_| ())
    }

    /// Sets `key` = `value` under `lease` only if `key` does not exist. Returns `Ok(None)`
    /// when it was set, or `Ok(Some(current))` with the value that is there.
    pub async fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Option<Vec<u8>>, RemoteError> {
        let k = b64(key.as_bytes());
        let v = self
            .post(
                "kv/txn",
                json!({
                    "compare": [{ "key": k, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
                    "success": [{ "requestPut": { "key": k, "value": b64(value), "lease": lease.to_string() } }],
                    "failure": [{ "requestRange": { "key": k } }],
                }),
            )
            .await?;
        if v["succeeded"].as_bool() == Some(true) {
            return Ok(None);
        }
        let current = v["responses"][0]["response_range"]["kvs"][0]["value"]
            .as_str()
            .and_then(unb64)
            .unwrap_or_default();
        Ok(Some(current))
    }
}

/// `%XX` sequences decoded (an invalid one is kept as written).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, ..) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn kvs(v: &Value) -> Vec<(String, Vec<u8>)> {
    v["kvs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|kv| {
                    let key = unb64(kv["key"].as_str()?)?;
                    let value = kv["value"].as_str().map_or(Some(Vec::new()), unb64)?;
                    Some((String::from_utf8_lossy(&key).into_owned(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"/kvtier/x/master",
            &[0xff, 0, 7],
        ] {
            assert_eq!(unb64(&b64(data)).unwrap(), data);
        }
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert!(unb64("Zm9v!").is_none());
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
    }

    #[test]
    fn urls_name_the_cluster() {
        let e = Etcd::new("etcd://h:2379", Duration::from_secs(1)).unwrap();
        assert_eq!(e.key("master"), "/kvtier/default/master");
        assert_eq!(e.endpoint(), "http://h:2379/v3");
        let e = Etcd::new("etcd://h:2379/prod/", Duration::from_secs(1)).unwrap();
        assert_eq!(e.key("segments/"), "/kvtier/prod/segments/");
        let e = Etcd::new("etcd://kv:pw@h:2379/prod", Duration::from_secs(1)).unwrap();
        assert_eq!(e.endpoint(), "http://h:2379/v3");
        assert_eq!(e.key("master"), "/kvtier/prod/master");
        assert!(!format!("{e:?}").contains("pw"));
        // Reserved characters percent-encoded; the last '@' of the authority ends it.
        let e = Etcd::new("etcd://kv:p%40ss%2Fw@h:2379/prod", Duration::from_secs(1)).unwrap();
        assert_eq!(e.auth.as_ref().unwrap().password, "p@ss/w");
        assert_eq!(e.endpoint(), "http://h:2379/v3");
        assert!(Etcd::new("h:2379", Duration::from_secs(1)).is_err());
        assert!(Etcd::new("etcd://nohost", Duration::from_secs(1)).is_err());
    }
}
