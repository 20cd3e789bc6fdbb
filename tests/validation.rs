//! Every option within a range that the daemon can run with: a value that would crash it (or
//! silently do nothing) is refused by `--check-config` and at start, with a sentence saying
//! why, before anything listens. And a job may not ask to run longer than `task_timeout`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::Daemon;

fn taskd(args: &[&str]) -> Output {
    common::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_taskd")).args(args).env("NO_COLOR", "1"),
        Duration::from_secs(60),
    )
}

/// `args` are refused with a sentence naming `option`, both by `--check-config` and by a start
/// (which never prints its "listening" line).
fn refused(args: &[&str], option: &str) {
    let mut check = vec!["--check-config"];
    check.extend_from_slice(args);
    let out = taskd(&check);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--check-config {args:?} passed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains(&format!("invalid {option}: ")), "{args:?}: {stderr}");
    // A sentence with its reason, not just the option's name.
    let reason = stderr.split_once(&format!("invalid {option}: ")).map(|(_, r)| r.trim()).unwrap_or("");
    assert!(reason.split_whitespace().count() >= 6, "{args:?}: no reason given: {stderr}");
    match Daemon::try_start(args) {
        Ok(_) => panic!("taskd {args:?} started"),
        Err((status, log)) => {
            assert!(status.contains("first stdout line \"\""), "{args:?} printed a line: {status}");
            assert!(!status.contains("exit status: 0"), "{args:?}: {status}");
            assert!(log.contains(&format!("invalid {option}: ")), "{args:?}: {log}");
        }
    }
}

#[test]
fn values_that_crashed_the_daemon_are_refused_before_it_listens() {
    // The three of the issue: a panic at start, at the first job, at SIGTERM.
    refused(&["--task-timeout", "1e300"], "task_timeout");
    refused(&["--task-timeout", "1e19"], "task_timeout");
    refused(&["--max-wait-time", "18446744073709551615"], "max_wait_time");
    // Their neighbours: not a duration, negative, too short to run anything, past a day.
    refused(&["--task-timeout", "NaN"], "task_timeout");
    refused(&["--task-timeout=-1"], "task_timeout");
    refused(&["--task-timeout", "0.0000001"], "task_timeout");
    refused(&["--task-timeout", "86401"], "task_timeout");
    refused(&["--max-wait-time", "86401"], "max_wait_time");
    refused(&["--heartbeat-idle-time", "18446744073709551615"], "heartbeat_idle_time");
    refused(&["--batch-timeout-ms", "18446744073709551615"], "batch_timeout_ms");
    // Counts that overflow what they are added to, and sizes the master would have to hold.
    refused(&["--max-request", "1000", "--max-request-grace", "18446744073709551615"], "max_request_grace");
    refused(&["--task-retry-max", "4294967295"], "task_retry_max");
    refused(&["--task-queue-max", "18446744073709551615"], "task_queue_max");
    refused(&["--buffer-output-size", "18446744073709551615"], "buffer_output_size");
    refused(&["--result-keep", "18446744073709551615"], "result_keep");
    // Every job would run past task_timeout.
    refused(&["--task-timeout", "2", "--simulate-ms", "5000"], "simulate_ms");
}

#[test]
fn the_config_file_and_the_environment_are_checked_alike() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("taskd.toml");
    std::fs::write(&file, "task_timeout = 1e300\n").unwrap();
    refused(&["--config", file.to_str().unwrap()], "task_timeout");
    let out = common::run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_taskd"))
            .args(["--check-config"])
            .env("TASKD_MAX_WAIT_TIME", "18446744073709551615"),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid max_wait_time"), "{out:?}");
}

#[test]
fn the_bounds_themselves_are_accepted_and_the_default_bounds_a_job() {
    let out = taskd(&["--check-config", "--task-timeout", "86400", "--max-wait-time", "86400"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = taskd(&["--check-config"]);
    let config = String::from_utf8_lossy(&out.stdout);
    assert!(config.contains("\ntask_timeout = 300.0\n"), "five minutes by default:\n{config}");
    // 0 still means no limit when set explicitly.
    let daemon = Daemon::start(&["--task-timeout", "0", "--simulate-ms", "0"]);
    let mut client = daemon.connect();
    client.submit(r#"{"type":"email","to":"patient@example.com","simulate_ms":3600000}"#);
}

#[test]
fn log_level_takes_levels_and_filters_but_refuses_other_words() {
    // `verbose` used to be read as a target name: every log line was silently dropped.
    refused(&["--log-level", "verbose"], "log_level");
    refused(&["--log-level", "taskd=loud"], "log_level");
    let out = taskd(&["--check-config", "--log-level", "taskd=debug,warn"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The filter is the one in use (RUST_LOG, which the tests set, overrides it: unset here).
    let daemon =
        Daemon::start_env(&["--log-level", "taskd=debug,warn", "--simulate-ms", "0"], &[("RUST_LOG", "")])
            .unwrap_or_else(|(status, log)| panic!("did not start ({status}):\n{log}"));
    let mut client = daemon.connect();
    let accepted = client.submit("filtered@example.com");
    assert_eq!(client.final_reply(&accepted["task_id"], &mut Vec::new())["event"], "done");
    daemon.wait_log(" DEBUG ");
}

#[test]
fn a_job_may_not_ask_for_a_delivery_longer_than_task_timeout() {
    let daemon = Daemon::start(&["--task-timeout", "2", "--simulate-ms", "0"]);
    let mut client = daemon.connect();
    client.send(r#"{"type":"email","to":"slow@example.com","simulate_ms":2001}"#);
    let reply = client.recv();
    assert_eq!(reply["event"], "error", "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("simulate_ms") && error.contains("2001 ms"), "{error}");
    assert!(error.contains("task_timeout (2000 ms)"), "names both values: {error}");
    // A batch with one such member is refused whole; a delivery within the limit runs.
    client.send(
        r#"{"type":"batch","jobs":[{"type":"sms","to":"+15551234567"},{"type":"email","to":"slow@example.com","simulate_ms":9000}]}"#,
    );
    let reply = client.recv();
    assert_eq!(reply["event"], "error", "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("9000 ms"), "{reply}");
    let accepted = client.submit(r#"{"type":"email","to":"within@example.com","simulate_ms":1000}"#);
    let done = client.final_reply(&accepted["task_id"], &mut Vec::new());
    assert_eq!(done["event"], "done", "{done}");
    // With the default, past five minutes.
    let daemon = Daemon::start(&["--simulate-ms", "0"]);
    let mut client = daemon.connect();
    client.send(r#"{"type":"sms","to":"+15551234567","simulate_ms":3600000}"#);
    let reply = client.recv();
    assert!(reply["error"].as_str().unwrap().contains("task_timeout (300000 ms)"), "{reply}");
}
