//! HTTP requests to the registry: does it answer, and does a manifest or blob answer 404.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How `/v2/` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Up {
    /// 200: open registry.
    Open,
    /// 401: authentication required; content checks are not possible anonymously.
    AuthRequired,
}

fn agent() -> ureq::Agent {
    // The probe only reads status codes from the registry on this host, sending nothing secret;
    // a registry's certificate is usually issued for its public name, not for 127.0.0.1.
    let tls = ureq::tls::TlsConfig::builder()
        .disable_verification(true)
        .build();
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(tls)
        .build()
        .into()
}

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws";

/// The status code of `GET` (or `HEAD`) `<base><path>`.
pub fn status(base: &str, path: &str, head: bool) -> Result<u16> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let agent = agent();
    let resp = if head {
        agent.head(&url).header("Accept", ACCEPT).call()
    } else {
        agent.get(&url).header("Accept", ACCEPT).call()
    }
    .with_context(|| format!("no answer from {url}"))?;
    Ok(resp.status().as_u16())
}

/// Waits until `<base>/v2/` answers 200 or 401.
pub fn wait_until_up(base: &str, timeout: Duration) -> Result<Up> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        match status(base, "/v2/", false) {
            Ok(200) => return Ok(Up::Open),
            Ok(401) => return Ok(Up::AuthRequired),
            Ok(code) => last = format!("answered {code}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "the registry at {base} did not answer /v2/ within {}s ({last})",
        timeout.as_secs()
    )
}
