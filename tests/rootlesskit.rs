//! The deployment docs/rootless.md documents for rootless Docker and nerdctl
//! users: RootlessKit owns the container's namespaces (slirp4netns, no port
//! driver of its own), the forwarder runs as the same unprivileged user,
//! pointed at RootlessKit's child PID, and is driven with rootlessctl
//! against the forwarder's API socket.

use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Stdio};
use std::time::Duration;

use forwarder_testkit::wait::try_wait_until;
use forwarder_tests::{
    limit, require_root, test_user, user_command, wait_until, wait_until_async, within, Fwd, Netns,
    Privilege,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; RootlessKit stops its child on
        // SIGTERM.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let exited = try_wait_until(Duration::from_secs(5), "RootlessKit to exit", || {
            matches!(self.0.try_wait(), Ok(Some(_)))
        });
        if exited.is_ok() {
            return;
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rootlessctl(sock: &str, args: &[&str]) -> (bool, String) {
    let out = user_command("rootlessctl")
        .args(["--socket", sock])
        .args(args)
        .output()
        .expect("rootlessctl (cargo xtask setup installs rootlesskit)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beside_rootlesskit() {
    require_root();
    let (uid, gid) = test_user();
    let subuid = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
    assert!(
        subuid.lines().any(|l| l.starts_with("fwdtest:")),
        "fwdtest has no subordinate uid range: run `cargo xtask setup`"
    );
    let dir = std::env::temp_dir().join(format!("fwt-rk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    // SAFETY: chown of a directory we created.
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
    assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, gid) }, 0);
    let state = dir.join("state");

    // RootlessKit with its own slirp4netns network and no port driver; the
    // "container" is an echo server on 127.0.0.1:80 inside.
    let rk = user_command("rootlesskit")
        .env("HOME", &dir)
        .args([
            "--net=slirp4netns",
            "--disable-host-loopback",
            "--port-driver=none",
        ])
        .arg(format!("--state-dir={}", state.display()))
        .args([
            "socat",
            "TCP-LISTEN:80,bind=127.0.0.1,fork,reuseaddr",
            "EXEC:cat",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rootlesskit");
    let rk = Kill(rk);
    let child_pid: u32 = wait_until(
        limit(Duration::from_secs(10)),
        "RootlessKit to write its child_pid",
        || {
            let p = std::fs::read_to_string(state.join("child_pid")).ok()?;
            p.trim().parse().ok()
        },
    );

    // The forwarder, as the same user, in a parent namespace of our own.
    let parent = Netns::new("rkp");
    let sock = dir.join("forwarder.sock").display().to_string();
    let args: Vec<String> = [
        "run",
        "--child-pid",
        &child_pid.to_string(),
        "--api-socket",
        &sock,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let f = Fwd::spawn_as(&parent, &args, None, Privilege::User);
    // Logged before the ready line, read from stderr by another thread.
    let err = f.wait_stderr("child-side agent", Duration::from_secs(10));
    assert!(err.contains("child-side agent"), "{err}");

    let (ok, out) = rootlessctl(&sock, &["add-ports", "127.0.0.1:8080:80/tcp"]);
    assert!(ok && out.trim() == "1", "add-ports: {out}");
    let (ok, out) = rootlessctl(&sock, &["list-ports"]);
    assert!(ok && out.contains("8080"), "{out}");
    within(20, "traffic through the published port", async {
        // socat may still be starting inside RootlessKit: retry briefly.
        wait_until_async(
            limit(Duration::from_secs(10)),
            "an echo through the published port",
            async || {
                let mut c = parent.connect("127.0.0.1:8080").await?;
                c.write_all(b"beside rootlesskit").await.expect("write");
                let mut b = [0u8; 18];
                c.read_exact(&mut b).await?;
                assert_eq!(&b, b"beside rootlesskit");
                Ok::<_, std::io::Error>(())
            },
        )
        .await;
    })
    .await;
    let (ok, out) = rootlessctl(&sock, &["remove-ports", "1"]);
    assert!(ok, "{out}");
    assert!(
        parent.connect("127.0.0.1:8080").await.is_err(),
        "still listening after removal"
    );
    f.stop();
    drop(rk);
    let _ = std::fs::remove_dir_all(&dir);
}
