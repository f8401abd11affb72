//! Proxy settings from the real process environment. This binary holds a single test because
//! it changes environment variables, which is only sound while no other thread reads them.
use bytes::Bytes;
use cora_tests::http_proxy::ForwardProxy;
use cora_tests::registry::Registry;
use cora_tests::tls::TestCa;
use lazy::registry::{Client, ClientConfig, Reference};
use sha2::{Digest, Sha256};
use std::time::Duration;

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn set_env(vars: &[(&str, &str)]) {
    for name in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        // SAFETY: the only test of this binary; the runtime is single-threaded and no other
        // thread reads the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    for (k, v) in vars {
        // SAFETY: as above.
        unsafe { std::env::set_var(k, v) };
    }
}

#[tokio::test(flavor = "current_thread")]
async fn proxy_environment_is_honoured() {
    let proxy = ForwardProxy::start().await.unwrap();
    let ca = TestCa::new().unwrap();
    let tls_reg = Registry::builder().tls(&ca).start().unwrap();
    let plain_reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds.json");
    std::fs::write(&creds, r#"{"auths":{}}"#).unwrap();
    let config = || ClientConfig {
        creds_file: Some(creds.clone()),
        ca_files: vec![ca.ca_cert.clone()],
        insecure_hosts: vec![plain_reg.host.clone()],
        request_timeout: Duration::from_secs(5),
        ..ClientConfig::default() // reads the proxy variables
    };
    let data = b"through the proxy".to_vec();
    let d = sha(&data);

    // Uppercase variables; HTTPS goes through a CONNECT tunnel, HTTP in absolute form.
    set_env(&[("HTTPS_PROXY", &proxy.url()), ("HTTP_PROXY", &proxy.url())]);
    let client = Client::new(config()).unwrap();
    for reg in [&tls_reg, &plain_reg] {
        let r: Reference = format!("{}/proxied/app:v1", reg.host).parse().unwrap();
        client
            .push_blob(&r, &d, Bytes::from(data.clone()))
            .await
            .unwrap();
        assert_eq!(
            client.get_blob_range(&r, &d, 3..10).await.unwrap(),
            data[3..10]
        );
    }
    let lines = proxy.request_lines();
    assert!(
        lines
            .iter()
            .any(|l| *l == format!("CONNECT {} HTTP/1.1", tls_reg.host)),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "HEAD http://{}/v2/proxied/app/blobs/",
            plain_reg.host
        )) || l.starts_with(&format!("GET http://{}/v2/", plain_reg.host))),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.contains(&format!("CONNECT {}", plain_reg.host))),
        "{lines:?}"
    );

    // NO_PROXY by host:port and by suffix-matching name: no new proxy connections.
    for no_proxy in [
        format!("example.com,{},{}", tls_reg.host, plain_reg.host),
        "*".to_string(),
    ] {
        set_env(&[
            ("https_proxy", &proxy.url()),
            ("http_proxy", &proxy.url()),
            ("no_proxy", &no_proxy),
        ]);
        let before = proxy.request_lines().len();
        let direct = Client::new(config()).unwrap();
        for reg in [&tls_reg, &plain_reg] {
            let r: Reference = format!("{}/proxied/app:v1", reg.host).parse().unwrap();
            assert_eq!(
                direct.get_blob(&r, &d, data.len() as u64).await.unwrap(),
                data
            );
        }
        assert_eq!(
            proxy.request_lines().len(),
            before,
            "NO_PROXY={no_proxy} ignored"
        );
    }

    // A proxy that is down makes requests fail with an error naming the proxy.
    let reserved = cora_tests::reserve_port().unwrap();
    let dead = format!("http://127.0.0.1:{}", reserved.port);
    set_env(&[("HTTPS_PROXY", &dead)]);
    let mut cfg = config();
    cfg.max_retries = 0;
    let r: Reference = format!("{}/proxied/app:v1", tls_reg.host).parse().unwrap();
    let e = Client::new(cfg)
        .unwrap()
        .get_blob(&r, &d, data.len() as u64)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("proxy"), "{e}");
    set_env(&[]);
}
