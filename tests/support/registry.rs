//! Debian's `docker-registry` (distribution 2.8) on 127.0.0.1, one process per test.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use cora_tests::registry::Registry;
//! let plain = Registry::start()?; // http://127.0.0.1:PORT
//! let ca = cora_tests::tls::TestCa::new()?;
//! let secured = Registry::builder().tls(&ca).htpasswd("alice", "pw").start()?;
//! let mirror = Registry::builder().pull_through(&plain.url()).start()?;
//! # Ok(()) }
//! ```
//! Storage and config live in a temporary directory; the process is killed (by PID) on drop.
use crate::tls::TestCa;
use crate::{reserve_port, wait_until};
use anyhow::{Context, Result, bail};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry. Killed on drop.
pub struct Registry {
    child: Child,
    pub addr: SocketAddr,
    /// `127.0.0.1:PORT`, the host part of image references.
    pub host: String,
    /// Set when started with TLS: the CA that signed the server certificate.
    pub ca_file: Option<PathBuf>,
    tls: bool,
    dir: tempfile::TempDir,
}

/// Options for [`Registry`]; see the module docs.
#[derive(Default)]
pub struct RegistryBuilder {
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    htpasswd: Option<(String, String)>,
    remote: Option<String>,
}

impl RegistryBuilder {
    /// Serve HTTPS with a certificate for 127.0.0.1/localhost signed by `ca`.
    pub fn tls(mut self, ca: &TestCa) -> Self {
        self.tls = Some((
            ca.server_cert.clone(),
            ca.server_key.clone(),
            ca.ca_cert.clone(),
        ));
        self
    }

    /// Require HTTP basic auth (bcrypt htpasswd made with `htpasswd -Bbn`).
    pub fn htpasswd(mut self, user: &str, password: &str) -> Self {
        self.htpasswd = Some((user.into(), password.into()));
        self
    }

    /// Run as a pull-through cache of `remote_url` (e.g. `http://127.0.0.1:5000`).
    pub fn pull_through(mut self, remote_url: &str) -> Self {
        self.remote = Some(remote_url.into());
        self
    }

    pub fn start(self) -> Result<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            bail!("{REGISTRY_BIN} missing: apt-get install docker-registry (cargo xtask deps)");
        }
        let dir = tempfile::tempdir()?;
        let port = reserve_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{}", port.port).parse()?;
        let mut cfg = String::new();
        writeln!(cfg, "version: 0.1")?;
        writeln!(cfg, "log:\n  level: info\n  accesslog:\n    disabled: true")?;
        writeln!(
            cfg,
            "storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true",
            dir.path().join("data").display()
        )?;
        writeln!(cfg, "http:\n  addr: {addr}\n  secret: cora-test-secret")?;
        if let Some((cert, key, _)) = &self.tls {
            writeln!(
                cfg,
                "  tls:\n    certificate: {}\n    key: {}",
                cert.display(),
                key.display()
            )?;
        }
        if let Some((user, pw)) = &self.htpasswd {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pw])
                .output()
                .context("running htpasswd (apt-get install apache2-utils)")?;
            if !out.status.success() {
                bail!("htpasswd failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, &out.stdout)?;
            writeln!(
                cfg,
                "auth:\n  htpasswd:\n    realm: cora-test\n    path: {}",
                path.display()
            )?;
        }
        if let Some(remote) = &self.remote {
            writeln!(cfg, "proxy:\n  remoteurl: {remote}")?;
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {REGISTRY_BIN}"))?;
        let mut reg = Registry {
            child,
            addr,
            host: addr.to_string(),
            ca_file: self.tls.as_ref().map(|t| t.2.clone()),
            tls: self.tls.is_some(),
            dir,
        };
        let ready = reg.wait_ready();
        drop(port);
        ready?;
        Ok(reg)
    }
}

impl Registry {
    /// A plain-HTTP registry without auth.
    pub fn start() -> Result<Registry> {
        Self::builder().start()
    }

    pub fn builder() -> RegistryBuilder {
        RegistryBuilder::default()
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.host
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The registry's own log (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Polls `GET /v2/` with curl until it answers 200 or 401 (auth on), or fails with the log.
    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/v2/", self.url());
        let ca = self.ca_file.clone();
        let res = wait_until(Duration::from_secs(20), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                bail!(
                    "docker-registry exited ({st}) during start-up:\n{}",
                    self.log()
                );
            }
            let mut cmd = Command::new("curl");
            cmd.args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "2",
            ]);
            if let Some(ca) = &ca {
                cmd.arg("--cacert").arg(ca);
            }
            let out = cmd.arg(&url).output().context("running curl")?;
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            Ok(code == "200" || code == "401")
        });
        res.with_context(|| format!("registry at {url} not ready; log:\n{}", self.log()))
    }

    /// Whether `repo` links blob `digest` in this registry's own storage. distribution writes the
    /// repository link last when it commits a blob (a pull-through cache does so once its
    /// background copy from the remote is complete).
    pub fn has_blob(&self, repo: &str, digest: &str) -> bool {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("data/docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex)
            .join("link")
            .is_file()
    }

    /// Kills the process now (e.g. to simulate a dead mirror).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}
