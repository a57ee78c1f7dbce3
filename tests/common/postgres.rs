//! A throwaway PostgreSQL for tests.
//!
//! [`postgres`] finds the machine's PostgreSQL (`pg_config --bindir`) or
//! takes `OPSD_TEST_PG_URL` (a superuser's URL of a running server). A
//! cluster of our own is created on first use (`initdb` + `pg_ctl`, run as
//! the `postgres` user when the tests run as root, fsync on) in
//! `target/tmp/pg/<test process id>/`, on a free loopback port, and
//! stopped by [`Postgres::stop`] at the end of the test binary; clusters
//! left behind by killed test runs are stopped and removed the next time.
//! Each test gets its own database ([`Postgres::database`]), so tests run in
//! parallel. Our cluster listens on 127.0.0.1 and 127.0.0.2 and, when
//! `openssl` is there, serves TLS with a certificate for `localhost` and
//! 127.0.0.1 signed by a test CA ([`Cluster::ca`]).

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use libtest_mimic::Trial;

use super::outside::{self, Tool};

/// The async body of a test that needs PostgreSQL.
pub type Body =
    fn(Arc<Postgres>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A trial that runs `body` on its own runtime with the server (ignored
/// locally, failed under CI, without PostgreSQL).
pub fn trial(name: &str, pg: &Tool<Arc<Postgres>>, body: Body) -> Trial {
    outside::test(name, pg, move |pg| outside::block_on(body(pg)))
}

/// The `main` of a test file whose trials need PostgreSQL: finds it, runs
/// the trials `make` returns, and stops the cluster at the end.
pub fn main_with(make: impl FnOnce(&Tool<Arc<Postgres>>) -> Vec<Trial>) -> std::process::ExitCode {
    let pg = postgres();
    let code = outside::run(make(&pg));
    if let Ok(pg) = &pg {
        pg.stop();
    }
    code
}

/// A PostgreSQL server the tests may create databases in.
pub struct Postgres {
    source: Source,
    /// The cluster, once started (our own only).
    cluster: Mutex<Option<Cluster>>,
    /// Databases created so far (dropped at the end on an outside server).
    created: Mutex<Vec<String>>,
}

enum Source {
    /// `pg_config --bindir`: start a cluster of our own.
    Binaries(PathBuf),
    /// `OPSD_TEST_PG_URL`.
    Url(String),
}

/// A cluster of our own.
pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
    /// TLS is on (the certificates could be made).
    tls: bool,
}

/// Finds PostgreSQL, or says why it cannot be had.
pub fn postgres() -> Tool<Arc<Postgres>> {
    if let Ok(url) = std::env::var("OPSD_TEST_PG_URL") {
        if !url.is_empty() {
            return Ok(Arc::new(Postgres::new(Source::Url(url))));
        }
    }
    let bindir = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .map_err(|e| {
            format!(
                "PostgreSQL is not installed (pg_config: {e}); set OPSD_TEST_PG_URL or install it"
            )
        })?;
    if !bindir.status.success() {
        return Err("pg_config --bindir failed".into());
    }
    let bindir = PathBuf::from(String::from_utf8_lossy(&bindir.stdout).trim());
    for tool in ["initdb", "pg_ctl", "postgres"] {
        if !bindir.join(tool).exists() {
            return Err(format!(
                "{} is missing (install the PostgreSQL server, e.g. Debian's postgresql)",
                bindir.join(tool).display()
            ));
        }
    }
    if is_root()
        && !Command::new("id")
            .arg("postgres")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Err("running as root, and there is no postgres user to run PostgreSQL as".into());
    }
    Ok(Arc::new(Postgres::new(Source::Binaries(bindir))))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Runs a PostgreSQL program as the postgres user (when we are root).
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Where clusters live: under the target directory, never in /tmp.
fn clusters_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pg")
}

impl Cluster {
    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_ctl(&self) -> Command {
        let mut command = as_postgres(&self.bindir.join("pg_ctl"));
        command.arg("-D").arg(self.data());
        command
    }

    /// Stops the clusters of test processes that are gone.
    fn reap(bindir: &Path) {
        let Ok(entries) = std::fs::read_dir(clusters_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let alive = Path::new("/proc").join(&name).exists();
            if name.parse::<u32>().is_ok() && !alive {
                let _ = as_postgres(&bindir.join("pg_ctl"))
                    .arg("-D")
                    .arg(entry.path().join("data"))
                    .args(["stop", "-m", "immediate"])
                    .output();
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn create(bindir: &Path) -> Self {
        Self::reap(bindir);
        let dir = clusters_dir().join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:postgres").arg(&dir);
                    c
                },
                "chown",
            );
        }
        let mut cluster = Self {
            dir,
            port: free_port(),
            bindir: bindir.to_owned(),
            tls: false,
        };
        let mut initdb = as_postgres(&bindir.join("initdb"));
        initdb.arg("-D").arg(cluster.data()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(initdb, "initdb");
        // Trust the whole loopback range (the tests also use 127.0.0.2).
        let hba = cluster.data().join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).unwrap();
        rules.push_str("\nhost all all 127.0.0.0/8 trust\n");
        std::fs::write(&hba, rules).unwrap();
        cluster.tls = cluster.make_certificates();
        cluster.start();
        cluster
    }

    /// The test CA that signed the server's certificate (TLS is on).
    pub fn ca(&self) -> Option<PathBuf> {
        self.tls.then(|| self.dir.join("ca.pem"))
    }

    /// A CA and a server certificate for `localhost` and 127.0.0.1 (not
    /// 127.0.0.2), made with `openssl`; false when it cannot be had.
    fn make_certificates(&self) -> bool {
        let dir = &self.dir;
        let openssl = |args: &[&str]| {
            Command::new("openssl")
                .current_dir(dir)
                .args(args)
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let made = std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .is_ok()
            && openssl(
                &[
                    &["req", "-x509"],
                    &ec[..],
                    &[
                        "-keyout",
                        "ca.key",
                        "-out",
                        "ca.pem",
                        "-days",
                        "30",
                        "-subj",
                        "/CN=opsd test CA",
                    ],
                ]
                .concat(),
            )
            && openssl(
                &[
                    &["req"],
                    &ec[..],
                    &[
                        "-keyout",
                        "server.key",
                        "-out",
                        "server.csr",
                        "-subj",
                        "/CN=localhost",
                    ],
                ]
                .concat(),
            )
            && openssl(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "30",
                "-extfile",
                "san.ext",
            ]);
        if !made {
            return false;
        }
        if is_root() {
            let _ = Command::new("chown")
                .args(["postgres:postgres", "server.key", "server.crt"])
                .current_dir(dir)
                .status();
        }
        let _ = Command::new("chmod")
            .args(["600", "server.key"])
            .current_dir(dir)
            .status();
        true
    }

    /// Starts (or restarts) the cluster and waits until it accepts
    /// connections.
    pub fn start(&self) {
        let mut options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1,127.0.0.2 -c max_connections=400 \
             -c fsync=on -c synchronous_commit=on -c shared_buffers=64MB",
            self.port,
            self.dir.display()
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={0}/server.crt -c ssl_key_file={0}/server.key",
                self.dir.display()
            ));
        }
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self
                .pg_ctl()
                .arg("-l")
                .arg(self.dir.join("log"))
                .args(["-w", "-t", "60", "-o", &options, "start"])
                .output()
                .unwrap();
            if out.status.success() {
                return;
            }
            // After a kill -9 of the postmaster, its children may hold the
            // shared memory for a moment.
            assert!(
                Instant::now() < give_up,
                "pg_ctl start failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The postmaster's process id.
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// `kill -9` of the postmaster, then waits until it is gone.
    pub fn kill_postmaster(&self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let proc = Path::new("/proc").join(pid.to_string());
        let give_up = Instant::now() + Duration::from_secs(30);
        while proc.exists() && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&self) {
        let _ = self.pg_ctl().args(["stop", "-m", "immediate"]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

impl Postgres {
    fn new(source: Source) -> Self {
        Self {
            source,
            cluster: Mutex::new(None),
            created: Mutex::new(Vec::new()),
        }
    }

    /// The URL of database `db` on this server.
    fn url(&self, db: &str) -> String {
        match &self.source {
            Source::Url(url) => {
                let (base, query) = url.split_once('?').unwrap_or((url, ""));
                let authority_end = base
                    .find("://")
                    .map(|i| i + 3)
                    .and_then(|start| base[start..].find('/').map(|i| start + i))
                    .unwrap_or(base.len());
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{query}")
                };
                format!("{}/{db}{query}", &base[..authority_end])
            }
            Source::Binaries(bindir) => {
                let mut cluster = self.cluster.lock().unwrap();
                let cluster = cluster.get_or_insert_with(|| Cluster::create(bindir));
                format!("postgres://postgres@127.0.0.1:{}/{db}", cluster.port)
            }
        }
    }

    /// Runs `f` with our own cluster (None on an outside server).
    pub fn with_cluster<T>(&self, f: impl FnOnce(&Cluster) -> T) -> Option<T> {
        let _ = self.url("postgres");
        self.cluster.lock().unwrap().as_ref().map(f)
    }

    /// A superuser connection to the `postgres` database.
    pub async fn admin(&self) -> tokio_postgres::Client {
        connect(&self.url("postgres")).await
    }

    /// A new, empty database; returns its URL.
    pub async fn database(&self, name: &str) -> String {
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let db = format!(
            "opsd_{}_{}_{clean}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        let admin = self.admin().await;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE \"{db}\" ENCODING 'UTF8' TEMPLATE template0"
            ))
            .await
            .unwrap();
        self.created.lock().unwrap().push(db.clone());
        self.url(&db)
    }

    /// Stops our cluster, or drops the databases made on an outside server.
    pub fn stop(&self) {
        if let Some(cluster) = self.cluster.lock().unwrap().take() {
            cluster.stop();
            return;
        }
        if let Source::Url(_) = &self.source {
            let databases = std::mem::take(&mut *self.created.lock().unwrap());
            if databases.is_empty() {
                return;
            }
            super::outside::block_on(async {
                let admin = self.admin().await;
                for db in databases {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                        .await;
                }
            });
        }
    }
}

/// A plain connection (no TLS) for test queries.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}
