//! Connecting to Redis, and reading stream entries out of its replies.
//!
//! [`set_up`] runs once, in the master (or the task node's manager, or `taskd dead-letter`)
//! before anything forks: it reads the TLS files (`--redis-ca-file`, and the client's
//! certificate and key for mutual TLS) while the process may still read them, and every
//! process after the fork connects with what it built.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use redis::{Connection, RedisError, Value};

use crate::config::ServerConfig;

/// How long a command that does not block may take before the connection counts as broken.
pub const REPLY_LIMIT: Duration = Duration::from_secs(5);
const CONNECT_LIMIT: Duration = Duration::from_secs(2);

/// Where this process's connections go: built by [`set_up`] before the fork.
struct Target {
    url: String,
    way: Way,
    /// The CA file the server's certificate is checked against, for the error that says it
    /// does not verify (None: the system's CAs).
    ca_file: Option<PathBuf>,
    /// The queue a process talks about unless it serves another ([`serve_queue`]): in a
    /// Cluster, its hash slot picks the node.
    queue: String,
}

enum Way {
    /// One server (`redis://`, `rediss://`, `redis+unix://`).
    Direct(redis::Client),
    /// The master that a set of Sentinels names (`redis+sentinel://`), asked at each connect.
    Sentinel(Box<SentinelSet>),
    /// The node of a Redis Cluster that serves the queue's hash slot (`redis+cluster://`),
    /// asked at each connect: every key of a queue shares its hash tag, so one node has them
    /// (each queue's own node: see [`connect_queue`]).
    Cluster(ClusterSet),
}

static TARGET: OnceLock<Target> = OnceLock::new();

/// Reads the TLS settings of `config`'s Redis URL and builds the client every later
/// [`connect`] to that URL uses. A file that cannot be read or holds no PEM certificate is an
/// error naming its option, now rather than at the first connection of each process.
pub fn set_up(config: &ServerConfig) -> Result<(), String> {
    let Some(url) = &config.redis_url else { return Ok(()) };
    hide_secrets_of(url);
    if TARGET.get().is_some_and(|t| &t.url == url) {
        return Ok(());
    }
    let invalid = |e: RedisError| format!("invalid redis_url {}: {}", super::redact(url), describe(&e));
    let way = if url.starts_with(CLUSTER_SCHEME) {
        Way::Cluster(
            ClusterSet::parse(url)
                .map_err(|why| format!("invalid redis_url {}: {why}", super::redact(url)))?,
        )
    } else if url.starts_with(SENTINEL_SCHEME) || url.starts_with(SENTINEL_TLS_SCHEME) {
        let tls = match url.starts_with(SENTINEL_TLS_SCHEME) {
            true => Some(tls_certificates(config)?),
            false => None,
        };
        Way::Sentinel(Box::new(
            SentinelSet::parse(url, tls)
                .map_err(|why| format!("invalid redis_url {}: {why}", super::redact(url)))?,
        ))
    } else if url.starts_with("rediss://") {
        Way::Direct(redis::Client::build_with_tls(url.as_str(), tls_certificates(config)?).map_err(invalid)?)
    } else {
        Way::Direct(redis::Client::open(url.as_str()).map_err(invalid)?)
    };
    let queue = config.queues().first().map_or_else(String::new, |q| (*q).to_string());
    let _ = TARGET.set(Target { url: url.clone(), way, ca_file: config.redis_ca_file.clone(), queue });
    Ok(())
}

/// The CA and client certificate of a TLS URL (`--redis-ca-file`, `--redis-cert-file`,
/// `--redis-key-file`), read now.
fn tls_certificates(config: &ServerConfig) -> Result<redis::TlsCertificates, String> {
    let root_cert = match &config.redis_ca_file {
        Some(path) => Some(read_pem(path, "redis_ca_file", "CERTIFICATE")?),
        None => None,
    };
    let client_tls = match (&config.redis_cert_file, &config.redis_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read_pem(cert, "redis_cert_file", "CERTIFICATE")?,
            client_key: read_pem(key, "redis_key_file", "PRIVATE KEY")?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates { client_tls, root_cert })
}

/// `redis+sentinel://[USER:PASS@]HOST:PORT,HOST:PORT/MASTER_NAME[?db=N&sentinel_user=U&
/// sentinel_password=P]`: the user and password before the hosts are the master's; those of
/// the Sentinels (`requirepass`, or an ACL user, in sentinel.conf) are the query's.
pub const SENTINEL_SCHEME: &str = "redis+sentinel://";
/// The same over TLS: to the Sentinels and to the master, with the CA and client certificate of
/// `--redis-ca-file`, `--redis-cert-file`, `--redis-key-file`.
pub const SENTINEL_TLS_SCHEME: &str = "rediss+sentinel://";
/// How long one Sentinel may take to answer, so that a dead one delays a lookup by no more.
const SENTINEL_LIMIT: Duration = Duration::from_secs(1);
const SENTINEL_PORT: u16 = 26379;

struct SentinelSet {
    sentinels: Vec<(String, u16)>,
    master: String,
    /// The master's user, password and database, on a placeholder address.
    template: redis::ConnectionInfo,
    /// The Sentinels' user and password, on a placeholder address.
    sentinel_template: redis::ConnectionInfo,
    /// `rediss+sentinel://`: TLS to the Sentinels and the master, with these.
    tls: Option<redis::TlsCertificates>,
}

impl SentinelSet {
    fn parse(url: &str, tls: Option<redis::TlsCertificates>) -> Result<SentinelSet, String> {
        let rest = url
            .strip_prefix(SENTINEL_SCHEME)
            .or_else(|| url.strip_prefix(SENTINEL_TLS_SCHEME))
            .ok_or("not a redis+sentinel:// URL")?;
        let (before, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, master) =
            before.split_once('/').ok_or("no master name after the Sentinels (/NAME)")?;
        let master = master.trim_end_matches('/');
        if master.is_empty() || master.contains('/') {
            return Err(
                "name the master after the Sentinels: redis+sentinel://HOST:PORT,HOST:PORT/NAME".into()
            );
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let mut sentinels = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let (name, port) = match host.rsplit_once(':') {
                Some((name, port)) => (
                    name,
                    port.parse::<u16>().map_err(|_| format!("{host:?} is not HOST:PORT of a Sentinel"))?,
                ),
                None => (host, SENTINEL_PORT),
            };
            sentinels.push((name.trim_matches(['[', ']']).to_string(), port));
        }
        if sentinels.is_empty() {
            return Err("no Sentinel named: redis+sentinel://HOST:PORT,HOST:PORT/NAME".into());
        }
        let (mut db, mut sentinel_user, mut sentinel_password) = ("0", "", None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("db", v)) => db = v,
                Some(("sentinel_user", v)) => sentinel_user = v,
                Some((SENTINEL_PASSWORD, v)) => sentinel_password = Some(v),
                _ => {
                    let name = pair.split('=').next().unwrap_or_default();
                    return Err(format!(
                        "unknown parameter {name:?} (the Sentinel URL takes db, sentinel_user and {SENTINEL_PASSWORD})"
                    ));
                }
            }
        }
        let template =
            redis::IntoConnectionInfo::into_connection_info(format!("redis://{userinfo}127.0.0.1/{db}"))
                .map_err(|e| e.to_string())?;
        let sentinel_userinfo = match sentinel_password {
            Some(password) => format!("{sentinel_user}:{password}@"),
            None if sentinel_user.is_empty() => String::new(),
            None => return Err(format!("sentinel_user without {SENTINEL_PASSWORD}")),
        };
        let sentinel_template =
            redis::IntoConnectionInfo::into_connection_info(format!("redis://{sentinel_userinfo}127.0.0.1/"))
                .map_err(|e| e.to_string())?;
        Ok(SentinelSet { sentinels, master: master.to_string(), template, sentinel_template, tls })
    }

    /// A client for `host:port` with the user and password of `template`, over TLS if the set
    /// is (the host name, or IP address, is what the server's certificate must be valid for).
    fn client(
        &self,
        template: &redis::ConnectionInfo,
        host: &str,
        port: u16,
    ) -> redis::RedisResult<redis::Client> {
        match &self.tls {
            Some(certs) => {
                let addr = redis::ConnectionAddr::TcpTls {
                    host: host.to_string(),
                    port,
                    insecure: false,
                    tls_params: None,
                };
                redis::Client::build_with_tls(template.clone().set_addr(addr), certs.clone())
            }
            None => redis::Client::open(
                template.clone().set_addr(redis::ConnectionAddr::Tcp(host.to_string(), port)),
            ),
        }
    }

    /// Asks each Sentinel in turn where the master is, and connects there if the server
    /// answers ROLE as a master (a Sentinel may still name the old one during a failover).
    fn connect(&self) -> Result<Connection, RedisError> {
        let mut why = Vec::new();
        for (host, port) in &self.sentinels {
            let (ip, master_port) = match self.ask(host, *port) {
                Ok(addr) => addr,
                Err(e) => {
                    why.push(format!("Sentinel {host}:{port}: {}", sentinel_sentence(&e)));
                    continue;
                }
            };
            let tried = self
                .client(&self.template, &ip, master_port)
                .and_then(|c| c.get_connection_with_timeout(CONNECT_LIMIT));
            let mut conn = match tried {
                Ok(conn) => conn,
                Err(e) => {
                    why.push(format!("Sentinel {host}:{port} names {ip}:{master_port}: {}", sentence(&e)));
                    continue;
                }
            };
            conn.set_read_timeout(Some(SENTINEL_LIMIT))?;
            let role: Value = redis::cmd("ROLE").query(&mut conn)?;
            match as_array(role).into_iter().next().map(as_text).as_deref() {
                Some("master") => {
                    noticed_master(
                        &format!("Sentinel: master {}", self.master),
                        &format!("{ip}:{master_port}"),
                        "failover",
                    );
                    return Ok(conn);
                }
                other => why.push(format!(
                    "Sentinel {host}:{port} names {ip}:{master_port}, which is a {} (a failover is under way)",
                    other.unwrap_or("server of unknown role")
                )),
            }
        }
        Err(RedisError::from((
            redis::ErrorKind::Io,
            LOOKUP_FAILED,
            format!("no master {} found: {}", self.master, why.join("; ")),
        )))
    }

    fn ask(&self, host: &str, port: u16) -> Result<(String, u16), RedisError> {
        let mut conn =
            self.client(&self.sentinel_template, host, port)?.get_connection_with_timeout(SENTINEL_LIMIT)?;
        conn.set_read_timeout(Some(SENTINEL_LIMIT))?;
        conn.set_write_timeout(Some(SENTINEL_LIMIT))?;
        let addr: Option<Vec<String>> =
            redis::cmd("SENTINEL").arg("get-master-addr-by-name").arg(&self.master).query(&mut conn)?;
        match addr.as_deref() {
            Some([ip, port]) => match port.parse() {
                Ok(port) => Ok((ip.clone(), port)),
                Err(_) => Err(RedisError::from((redis::ErrorKind::Parse, "a master port that is no number"))),
            },
            _ => Err(RedisError::from((redis::ErrorKind::Io, "it knows no master of that name"))),
        }
    }
}

/// What a Sentinel's refusal means, and what to do about it.
fn sentinel_sentence(e: &RedisError) -> String {
    let refused_auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"));
    if refused_auth {
        format!(
            "{} (the Sentinels' password and user go in the URL's query: ?{SENTINEL_PASSWORD}=…&sentinel_user=…)",
            sentence(e)
        )
    } else {
        sentence(e)
    }
}

const LOOKUP_FAILED: &str = "Redis lookup";
/// The query parameter of the Sentinels' password: a secret ([`super::redact`]).
pub const SENTINEL_PASSWORD: &str = "sentinel_password";

/// `redis+cluster://[USER:PASS@]HOST:PORT,HOST:PORT`: some nodes of the cluster.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

struct ClusterSet {
    seeds: Vec<(String, u16)>,
    /// The user and password, on a placeholder address.
    template: redis::ConnectionInfo,
}

impl ClusterSet {
    fn parse(url: &str) -> Result<ClusterSet, String> {
        let rest = url.strip_prefix(CLUSTER_SCHEME).ok_or("not a redis+cluster:// URL")?;
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (format!("{u}@"), h),
            None => (String::new(), authority),
        };
        let mut seeds = Vec::new();
        for host in hosts.split(',').filter(|h| !h.is_empty()) {
            let (name, port) = host.rsplit_once(':').ok_or_else(|| format!("{host:?} is not HOST:PORT"))?;
            let port = port.parse::<u16>().map_err(|_| format!("{host:?} is not HOST:PORT"))?;
            seeds.push((name.trim_matches(['[', ']']).to_string(), port));
        }
        if seeds.is_empty() {
            return Err("no node named: redis+cluster://HOST:PORT,HOST:PORT".into());
        }
        let template =
            redis::IntoConnectionInfo::into_connection_info(format!("redis://{userinfo}127.0.0.1/"))
                .map_err(|e| e.to_string())?;
        Ok(ClusterSet { seeds, template })
    }

    /// Asks the nodes in turn which one serves the slot of `queue` (CLUSTER SLOTS), and
    /// connects there. A slot moved later answers MOVED (or ASK, TRYAGAIN while it moves),
    /// which counts as a lost connection: the next connect asks again.
    fn connect(&self, queue: &str) -> Result<Connection, RedisError> {
        let slot = hash_slot(queue.as_bytes());
        let mut why = Vec::new();
        for (host, port) in &self.seeds {
            let owner = match self.owner(host, *port, slot) {
                Ok(Some(owner)) => owner,
                Ok(None) => {
                    why.push(format!("{host}:{port}: no node serves slot {slot}"));
                    continue;
                }
                Err(e) => {
                    why.push(format!("{host}:{port}: {}", sentence(&e)));
                    continue;
                }
            };
            let info = self.template.clone().set_addr(redis::ConnectionAddr::Tcp(owner.0.clone(), owner.1));
            match redis::Client::open(info).and_then(|c| c.get_connection_with_timeout(CONNECT_LIMIT)) {
                Ok(conn) => {
                    noticed_master(
                        &format!("Redis Cluster: the node of slot {slot} (queue {queue})"),
                        &format!("{}:{}", owner.0, owner.1),
                        "resharding or failover",
                    );
                    return Ok(conn);
                }
                Err(e) => why.push(format!("{host}:{port} names {}:{}: {}", owner.0, owner.1, sentence(&e))),
            }
        }
        Err(RedisError::from((
            redis::ErrorKind::Io,
            LOOKUP_FAILED,
            format!("no Redis Cluster node found for slot {slot} (queue {queue}): {}", why.join("; ")),
        )))
    }

    fn owner(&self, host: &str, port: u16, slot: u16) -> Result<Option<(String, u16)>, RedisError> {
        let info = self.template.clone().set_addr(redis::ConnectionAddr::Tcp(host.to_string(), port));
        let mut conn = redis::Client::open(info)?.get_connection_with_timeout(SENTINEL_LIMIT)?;
        conn.set_read_timeout(Some(SENTINEL_LIMIT))?;
        let slots: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
        for range in as_array(slots) {
            let mut parts = as_array(range).into_iter();
            let (Some(start), Some(end), Some(master)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let (Some(start), Some(end)) = (as_int(&start), as_int(&end)) else { continue };
            if !(start..=end).contains(&i64::from(slot)) {
                continue;
            }
            let mut node = as_array(master).into_iter();
            let ip = node.next().map(as_text).filter(|ip| !ip.is_empty()).unwrap_or_else(|| host.to_string());
            let owner_port = node.next().as_ref().and_then(as_int).and_then(|p| u16::try_from(p).ok());
            return Ok(owner_port.map(|p| (ip, p)));
        }
        Ok(None)
    }
}

/// Redis Cluster's hash slot of a key whose hash tag is `tag` (CRC16/XMODEM mod 16384).
fn hash_slot(tag: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in tag {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc % 16384
}

/// Logs where the master is (of each thing: a Sentinel's master, a queue's Cluster node),
/// when this process first learns it and when it moved.
fn noticed_master(what: &str, addr: &str, cause: &str) {
    static LAST: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());
    let mut known = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match known.iter_mut().find(|(w, _)| w == what) {
        None => {
            tracing::info!("{what} is at {addr}");
            known.push((what.to_string(), addr.to_string()));
        }
        Some((_, last)) if last != addr => {
            tracing::warn!("{what} moved from {last} to {addr} ({cause})");
            addr.clone_into(last);
        }
        Some(_) => {}
    }
}

/// The bytes of a PEM file, which must hold at least one `-----BEGIN …{kind}-----` block.
fn read_pem(path: &Path, option: &str, kind: &str) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("invalid {option}: cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.trim_end().ends_with(&format!("{kind}-----")));
    if !found {
        return Err(format!("invalid {option}: {} holds no PEM {kind}", path.display()));
    }
    Ok(bytes)
}

/// Opens a connection. `reply_limit` None: no client-side limit, for the connections that
/// block in XREAD/XREADGROUP (a reply timeout shorter than BLOCK would give up on a read that
/// Redis still carries out, moving entries into the pending list with nobody to run them).
pub fn connect(url: &str, reply_limit: Option<Duration>) -> Result<Connection, RedisError> {
    let queue = match (PROCESS_QUEUE.get(), TARGET.get()) {
        (Some(queue), _) => queue.as_str(),
        (None, Some(target)) => target.queue.as_str(),
        (None, None) => "",
    };
    connect_queue(url, queue, reply_limit)
}

/// The queue a task process of a task node serves (`taskd task-node --redis-queue a,b`): set
/// once, after the fork, before it connects; every later [`connect`] of the process (its
/// consumer, its heartbeat, the rate limits) goes to that queue's node in a Cluster.
static PROCESS_QUEUE: OnceLock<String> = OnceLock::new();

/// This process serves `queue` (see [`PROCESS_QUEUE`]); the first call wins.
pub fn serve_queue(queue: &str) {
    let _ = PROCESS_QUEUE.set(queue.to_string());
}

/// [`connect`] for the keys of `queue`: in a Cluster, to the node of its slot; elsewhere the
/// one server every queue is on. For a process that talks about several queues (a task node's
/// manager).
pub fn connect_queue(
    url: &str,
    queue: &str,
    reply_limit: Option<Duration>,
) -> Result<Connection, RedisError> {
    let conn = match TARGET.get() {
        Some(Target { url: set_up, way: Way::Sentinel(set), .. }) if set_up == url => set.connect()?,
        Some(Target { url: set_up, way: Way::Cluster(set), .. }) if set_up == url => set.connect(queue)?,
        Some(Target { url: set_up, way: Way::Direct(client), .. }) if set_up == url => {
            client.get_connection_with_timeout(CONNECT_LIMIT)?
        }
        _ => redis::Client::open(url)?.get_connection_with_timeout(CONNECT_LIMIT)?,
    };
    conn.set_read_timeout(reply_limit)?;
    conn.set_write_timeout(Some(REPLY_LIMIT))?;
    Ok(conn)
}

/// [`connect`] for the commands sent per job (a consumer's reads and writes, the bridge's read
/// of replies), read by taskd's own parser where the URL allows (see [`super::hot`]); otherwise
/// the same connection as [`connect`].
pub fn connect_hot(url: &str, reply_limit: Option<Duration>) -> Result<super::hot::HotConn, RedisError> {
    let info = match TARGET.get() {
        Some(Target { url: set_up, way: Way::Direct(client), .. }) if set_up == url => {
            Some(client.get_connection_info())
        }
        _ => None,
    };
    super::hot::HotConn::connect(info, CONNECT_LIMIT, reply_limit, REPLY_LIMIT, || connect(url, reply_limit))
}

/// Whether an error means the connection is gone (reconnect), rather than a refused command.
pub fn is_connection_error(e: &RedisError) -> bool {
    // READONLY: the server became a replica (a Sentinel failover): the master is elsewhere now.
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.code() == Some("READONLY")
        || slot_moving(e)
}

/// The queue's slot moved to another node of the cluster (MOVED), or is moving (ASK: the key
/// is on the importing node already; TRYAGAIN: a command's keys are split between the two),
/// also as the error of one command in a pipeline or a MULTI (whose EXEC then says only
/// EXECABORT). Each counts as a lost connection: the process asks the cluster again and
/// retries. Nothing of a MULTI aborted so was done, and each retried write is one a consumer
/// kept (its outcomes) or one a client did not get `accepted` for. While a slot moves the
/// queue waits (no ASKING to the importing node): a resharding moves a queue's few keys in
/// milliseconds.
fn slot_moving(e: &RedisError) -> bool {
    const CODES: [&str; 3] = ["MOVED", "ASK", "TRYAGAIN"];
    if e.code().is_some_and(|c| CODES.contains(&c)) {
        return true;
    }
    e.clone().into_server_errors().is_some_and(|errors| errors.iter().any(|(_, s)| CODES.contains(&s.code())))
}

/// The Redis URL of this process, whose secrets no description of an error may show.
static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes [`describe`] scrub `url`'s passwords from what it says (the first URL given wins:
/// a process talks to one Redis).
pub fn hide_secrets_of(url: &str) {
    let _ = URL.set(url.to_string());
}

/// An error as a sentence for a person (a timed-out read shows as "Resource temporarily
/// unavailable" otherwise), without the password of the URL.
pub fn describe(e: &RedisError) -> String {
    let text = sentence(e);
    match URL.get() {
        Some(url) => super::scrub(&text, url),
        None => text,
    }
}

fn sentence(e: &RedisError) -> String {
    if let Some(tls) = tls_error(e) {
        tls_sentence(tls)
    } else if slot_moving(e) {
        format!("the queue's hash slot moved, or is moving, to another node of the cluster ({e})")
    } else if e.to_string().starts_with(LOOKUP_FAILED) {
        e.detail().unwrap_or(LOOKUP_FAILED).to_string()
    } else if e.is_timeout() {
        format!("Redis did not answer within {} s", REPLY_LIMIT.as_secs())
    } else if e.is_connection_refusal() {
        format!("Redis refused the connection ({e}): is redis-server running?")
    } else if e.is_connection_dropped() {
        format!("the connection to Redis was lost ({e})")
    } else {
        e.to_string()
    }
}

/// The TLS failure under a connection's error, if that is what it was: rustls's error, in the
/// I/O error the client library keeps behind an `Arc`.
fn tls_error(e: &RedisError) -> Option<&rustls::Error> {
    use std::error::Error;
    type Inner = std::sync::Arc<dyn Error + Send + Sync>;
    let inner = e.source()?.downcast_ref::<Inner>()?;
    let io = (**inner).downcast_ref::<std::io::Error>()?;
    io.get_ref()?.downcast_ref::<rustls::Error>()
}

/// What failed in the TLS handshake, and what to do about it.
fn tls_sentence(e: &rustls::Error) -> String {
    let ca = TARGET.get().and_then(|t| t.ca_file.as_deref());
    let against = match ca {
        Some(path) => format!("the CA certificates of {} (redis_ca_file)", path.display()),
        None => "the system's CA certificates (give the server's CA with --redis-ca-file)".into(),
    };
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. }) => {
            format!("the Redis server's TLS certificate is not valid for the host name of redis_url ({e})")
        }
        rustls::Error::InvalidCertificate(_) => {
            format!("the Redis server's TLS certificate does not verify against {against} ({e})")
        }
        rustls::Error::AlertReceived(
            alert @ (rustls::AlertDescription::CertificateRequired
            | rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::HandshakeFailure),
        ) => format!(
            "the Redis server refused the TLS handshake ({alert:?}): it wants a client certificate it \
             trusts (--redis-cert-file, --redis-key-file)"
        ),
        other => format!("TLS with the Redis server failed: {other}"),
    }
}

/// One entry of a stream: none of its fields for an entry deleted while it was pending.
///
/// Its fields' names and values are kept back to back in one buffer: a job's entry has a dozen
/// of them, and an allocation each was most of what a consumer spent reading a job.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamEntry {
    pub id: String,
    bytes: Vec<u8>,
    /// Per field, where its name ends in `bytes` and where its value ends (a name begins where
    /// the value before it ends).
    ends: Vec<(usize, usize)>,
}

impl StreamEntry {
    /// An entry with no field yet.
    pub fn new(id: String) -> StreamEntry {
        StreamEntry { id, ..StreamEntry::default() }
    }

    /// An entry with `fields`, in order.
    pub fn with_fields<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        id: impl Into<String>,
        fields: impl IntoIterator<Item = (K, V)>,
    ) -> StreamEntry {
        let mut entry = StreamEntry { id: id.into(), ..StreamEntry::default() };
        for (k, v) in fields {
            entry.push(k.as_ref(), v.as_ref());
        }
        entry
    }

    /// Room for `fields` fields of `bytes` bytes in all.
    pub fn reserve(&mut self, fields: usize, bytes: usize) {
        self.ends.reserve_exact(fields);
        self.bytes.reserve_exact(bytes);
    }

    pub fn push(&mut self, name: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(name);
        let name_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((name_end, self.bytes.len()));
    }

    /// Whether it has any field (an entry deleted while it was pending has none).
    pub fn has_fields(&self) -> bool {
        !self.ends.is_empty()
    }

    /// Its fields, in order, as names and values.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(name_end, end)| {
            let field = (&self.bytes[start..name_end], &self.bytes[name_end..end]);
            start = end;
            field
        })
    }

    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields().find(|(k, _)| *k == name.as_bytes()).map(|(_, v)| v)
    }

    /// A field's value, copied out.
    pub fn copied(&self, name: &str) -> Option<Vec<u8>> {
        self.get(name).map(<[u8]>::to_vec)
    }

    pub fn bytes(&self, name: &str) -> &[u8] {
        self.get(name).unwrap_or_default()
    }

    pub fn number(&self, name: &str) -> Option<u64> {
        std::str::from_utf8(self.get(name)?).ok()?.parse().ok()
    }

    pub fn text(&self, name: &str) -> String {
        String::from_utf8_lossy(self.bytes(name)).into_owned()
    }
}

pub fn as_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

pub fn as_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

pub fn as_text(v: Value) -> String {
    as_bytes(v).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

pub fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// `[[id, [field, value, ...]], ...]`, as XRANGE, XCLAIM and XAUTOCLAIM return them.
pub fn entries(v: Value) -> Vec<StreamEntry> {
    as_array(v)
        .into_iter()
        .filter_map(|item| {
            let mut parts = as_array(item).into_iter();
            let id = as_bytes(parts.next()?)?;
            let mut flat = parts.next().map(as_array).unwrap_or_default().into_iter().filter_map(as_bytes);
            let mut entry =
                StreamEntry { id: String::from_utf8_lossy(&id).into_owned(), ..Default::default() };
            while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                entry.push(&k, &v);
            }
            Some(entry)
        })
        .collect()
}

/// The entries of each stream of an XREAD or XREADGROUP reply, with the stream's key; none on
/// a timeout.
pub fn read_streams(v: Value) -> Vec<(String, StreamEntry)> {
    let mut out = Vec::new();
    for stream in as_array(v) {
        let mut parts = as_array(stream).into_iter();
        let key = parts.next().map(as_text).unwrap_or_default();
        for entry in parts.next().map(entries).unwrap_or_default() {
            out.push((key.clone(), entry));
        }
    }
    out
}

/// The entries of the first (only) stream of an XREAD or XREADGROUP reply; none on a timeout.
pub fn read_entries(v: Value) -> Vec<StreamEntry> {
    let Some(first) = as_array(v).into_iter().next() else {
        return Vec::new();
    };
    let mut parts = as_array(first).into_iter();
    let _key = parts.next();
    parts.next().map(entries).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn finds_the_hash_slot_of_a_queue() {
        // As CLUSTER KEYSLOT answers for "{taskd}:jobs" and "{foo}bar".
        assert_eq!(hash_slot(b"foo"), 12182);
        assert_eq!(hash_slot(b"123456789"), 0x31C3, "CRC16/XMODEM's check value");
        let set = ClusterSet::parse("redis+cluster://:pw@h1:7000,h2:7001").unwrap();
        assert_eq!(set.seeds.len(), 2);
        assert!(ClusterSet::parse("redis+cluster://h1").is_err());
    }

    #[test]
    fn reads_a_sentinel_url() {
        let set =
            SentinelSet::parse("redis+sentinel://app:s3cret@10.0.0.5:26380,sentinel-b/mymaster?db=2", None)
                .unwrap();
        assert_eq!(set.sentinels, vec![("10.0.0.5".to_string(), 26380), ("sentinel-b".to_string(), 26379)]);
        assert_eq!(set.master, "mymaster");
        let redis = set.template.redis_settings();
        assert_eq!((redis.username(), redis.password(), redis.db()), (Some("app"), Some("s3cret"), 2));
        for bad in
            ["redis+sentinel://h:1", "redis+sentinel://h:1/", "redis+sentinel:///m", "redis+sentinel://h:x/m"]
        {
            assert!(SentinelSet::parse(bad, None).is_err(), "{bad}");
        }
        let set = SentinelSet::parse(
            "rediss+sentinel://:m@h:1/m?sentinel_password=s%40x&db=1&sentinel_user=sen",
            None,
        )
        .unwrap();
        let (master, sentinel) = (set.template.redis_settings(), set.sentinel_template.redis_settings());
        assert_eq!((master.password(), master.db()), (Some("m"), 1));
        assert_eq!((sentinel.username(), sentinel.password()), (Some("sen"), Some("s@x")));
        assert!(SentinelSet::parse("redis+sentinel://h:1/m?sentinel_pass=x", None).is_err(), "a typo");
        assert!(SentinelSet::parse("redis+sentinel://h:1/m?sentinel_user=x", None).is_err());
        let url = "rediss+sentinel://:m1@h:1/m?sentinel_password=s3cret";
        assert_eq!(super::super::redact(url), "rediss+sentinel://:***@h:1/m?sentinel_password=***");
        assert!(!super::super::scrub(&format!("{url} s3cret m1"), url).contains("s3cret"));
        assert_eq!(super::super::redact("redis+sentinel://:pw@h:1,h:2/m"), "redis+sentinel://:***@h:1,h:2/m");
    }

    #[test]
    fn reads_entries_of_a_stream_reply() {
        let entry =
            Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("t"), bulk("42"), bulk("d"), bulk("{}")])]);
        let deleted = Value::Array(vec![bulk("2-0"), Value::Nil]);
        let reply =
            Value::Array(vec![Value::Array(vec![bulk("{q}:jobs"), Value::Array(vec![entry, deleted])])]);
        let got = read_entries(reply);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id, "1-0");
        assert_eq!(got[0].number("t"), Some(42));
        assert_eq!(got[0].bytes("d"), b"{}");
        assert!(!got[1].has_fields(), "a deleted entry has no fields");
        assert!(read_entries(Value::Nil).is_empty(), "a timed-out read has none");
    }
}
