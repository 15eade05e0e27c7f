//! nginx as the baseline reverse proxy for the message-path benchmark: what an operator would
//! otherwise put in front of a harness server. The benchmark starts Debian's nginx itself, with a
//! config of its own in a scratch directory, listening on 127.0.0.1 only.

use anyhow::Context;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx whose location `/h{i}/` proxies to the i-th upstream harness.
pub(crate) struct Nginx {
    child: Child,
    pub(crate) base: String,
    dir: std::path::PathBuf,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        // SIGQUIT would wait for keep-alive connections; the benchmark is done with them.
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nginx binary: PATH, then Debian's location.
fn binary() -> Option<std::path::PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let debian = std::path::PathBuf::from("/usr/sbin/nginx");
        debian.is_file().then_some(debian)
    })
}

/// A free port on 127.0.0.1 (released before nginx binds it; a small race on a quiet machine).
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The config: one upstream with keep-alive connections per harness, HTTP/1.1 to it, and no
/// buffering either way so SSE events pass as they come.
fn config(dir: &std::path::Path, port: u16, upstreams: &[String]) -> String {
    let d = dir.display();
    let mut ups = String::new();
    let mut locations = String::new();
    for (i, addr) in upstreams.iter().enumerate() {
        ups.push_str(&format!(
            "  upstream h{i} {{ server {addr}; keepalive 16; }}\n"
        ));
        locations.push_str(&format!(
            "    location /h{i}/ {{\n      proxy_pass http://h{i}/;\n      \
             proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      \
             proxy_buffering off;\n      proxy_request_buffering off;\n      \
             proxy_read_timeout 120s;\n    }}\n"
        ));
    }
    format!(
        "daemon off;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
         keepalive_requests 100000;\n{ups}  server {{\n    listen 127.0.0.1:{port};\n{locations}  }}\n}}\n"
    )
}

/// Starts nginx in front of `upstreams` (host:port each), or says why it cannot.
pub(crate) fn start(upstreams: &[String]) -> anyhow::Result<Nginx> {
    let bin = binary().context("nginx is not installed (apt-get install nginx)")?;
    let dir = std::env::temp_dir().join(format!(
        "sandwarden-bench-nginx-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let port = free_port()?;
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config(&dir, port, upstreams))?;
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&dir)
        // Debian's build logs to /var/log/nginx before reading the config; -e points it here.
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let nginx = Nginx {
        child,
        base: format!("http://127.0.0.1:{port}"),
        dir,
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(5),
            "nginx did not listen on 127.0.0.1:{port} within 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(nginx)
}

impl Nginx {
    /// CPU seconds used so far by the master and its workers.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let master = self.child.id();
        sandwarden::procfs::cpu_seconds(master)
            + sandwarden::procfs::children(master)
                .into_iter()
                .map(sandwarden::procfs::cpu_seconds)
                .sum::<f64>()
    }
}
