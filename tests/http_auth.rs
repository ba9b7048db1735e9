//! `POST /reload` off loopback: refused by `config check` without a token file, and with one the daemon warns
//! at start and asks every reload for the bearer token (real HTTP requests); GET endpoints stay open.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::config::{Config, Pipeline};
use common::daemon::{find_metric, request, Daemon};

const TOKEN: &str = "q6Yb1mZ0p3Hc9TfKx2Lw";

fn config_check(path: &Path) -> (Option<i32>, String) {
    let out = common::config_check(path);
    (out.status.code(), common::stderr(&out))
}

#[test]
fn listening_off_loopback_needs_a_token_file() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("serve.toml");
    let token = dir.path().join("http.token");

    std::fs::write(&path, "[http]\nlisten = \"0.0.0.0:9480\"\n").expect("write");
    let (code, err) = config_check(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("http.listen") && err.contains("http.token_file"),
        "{err}"
    );

    // A token file that is missing, or holds too short a token, is an error that does not quote it.
    let with_token = format!(
        "[http]\nlisten = \"0.0.0.0:9480\"\ntoken_file = \"{}\"\n",
        token.display()
    );
    std::fs::write(&path, &with_token).expect("write");
    let (code, err) = config_check(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("http.token_file: cannot read"), "{err}");
    std::fs::write(&token, "short-secret\n").expect("write");
    let (code, err) = config_check(&path);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("at least 16 characters") && !err.contains("short-secret"),
        "{err}"
    );

    // A good token: accepted, with warnings for the open port and a world-readable file.
    std::fs::write(&token, format!("{TOKEN}\n")).expect("write");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, err) = config_check(&path);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: http.listen") && err.contains("other machines"),
        "{err}"
    );
    assert!(
        err.contains("warning: http.token_file") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (_, err) = config_check(&path);
    assert!(!err.contains("warning: http.token_file"), "{err}");
    assert!(!err.contains(TOKEN), "{err}");
}

#[test]
fn reload_off_loopback_needs_the_bearer_token() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = Config::new()
        .listen_on("0.0.0.0")
        .token_file(dir.path(), TOKEN)
        .pipeline(
            Pipeline::folder("p", &dir.path().join("in"), &dir.path().join("out"))
                .with("queries = [\"red square\"]"),
        );
    let mut serve = Daemon::start(dir.path(), &config);
    serve.wait_ready();
    let port = serve.port;
    let log = serve.log_text();
    assert!(
        log.contains("WARN") && log.contains("other machines"),
        "no warning about the open port:\n{log}"
    );

    // GET endpoints are open.
    for path in ["/livez", "/readyz", "/metrics", "/status"] {
        assert_eq!(serve.get(path).code, 200, "{path}");
    }
    let reloads = |serve: &Daemon| {
        find_metric(&serve.metrics(), "tclseg_reloads_total", "").expect("tclseg_reloads_total")
    };

    let none = serve.post("/reload", None);
    assert_eq!(none.code, 401, "{}", none.body);
    // Header names are case-insensitive (RFC 9110), and hyper writes them in lower case.
    assert!(
        none.head
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{}",
        none.head
    );
    let wrong = serve.post("/reload", Some("q6Yb1mZ0p3Hc9TfKx2LX"));
    assert_eq!(wrong.code, 403, "{}", wrong.body);
    // Header names and the scheme are case-insensitive; another scheme is no token.
    let reload_with = |header: &str| request(port, "POST", "/reload", &format!("{header}\r\n"));
    let other_scheme = reload_with(&format!("Authorization: Basic {TOKEN}"));
    assert_eq!(other_scheme.code, 401, "{}", other_scheme.body);
    assert_eq!(reloads(&serve), 0.0, "a refused request reloaded");

    let right = reload_with(&format!("authorization: bearer {TOKEN}"));
    assert_eq!(right.code, 200, "{}", right.body);
    assert_eq!(reloads(&serve), 1.0);
    assert!(!serve.log_text().contains(TOKEN), "the token is in the log");
    assert_eq!(serve.terminate(Duration::from_secs(60)).code(), Some(0));
}
