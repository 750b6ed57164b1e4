//! `seccomp-exec PROFILE COMMAND [ARGS...]`: applies an OCI seccomp profile (the
//! `linux.seccomp` a runtime hands to runc) to itself, then executes COMMAND under it, as
//! a container runtime does just before the container's entrypoint. Syscalls the profile
//! names that this architecture lacks are skipped, as runc skips them.

use std::{os::unix::process::CommandExt as _, process::ExitCode};

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};
use serde_json::Value;

fn action(group: &Value, default_errno: i32) -> Result<ScmpAction, String> {
    let errno = group["errnoRet"]
        .as_i64()
        .and_then(|e| i32::try_from(e).ok())
        .unwrap_or(default_errno);
    match group["action"].as_str() {
        Some("SCMP_ACT_ALLOW") => Ok(ScmpAction::Allow),
        Some("SCMP_ACT_ERRNO") => Ok(ScmpAction::Errno(errno)),
        other => Err(format!("action {other:?} is not one this tool applies")),
    }
}

fn compare(arg: &Value) -> Result<ScmpArgCompare, String> {
    let index = arg["index"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .ok_or("an argument without an index")?;
    let value = arg["value"].as_u64().ok_or("an argument without a value")?;
    let op = match arg["op"].as_str() {
        Some("SCMP_CMP_EQ") => ScmpCompareOp::Equal,
        Some("SCMP_CMP_MASKED_EQ") => ScmpCompareOp::MaskedEqual(value),
        other => return Err(format!("comparison {other:?} is not one this tool applies")),
    };
    let datum = if matches!(op, ScmpCompareOp::MaskedEqual(_)) {
        arg["valueTwo"].as_u64().unwrap_or(0)
    } else {
        value
    };
    Ok(ScmpArgCompare::new(index, op, datum))
}

fn apply(profile: &Value) -> Result<usize, String> {
    let default = action(
        &serde_json::json!({"action": profile["defaultAction"], "errnoRet": profile["defaultErrnoRet"]}),
        libc::EPERM,
    )?;
    let mut filter = ScmpFilterContext::new(default).map_err(|e| e.to_string())?;
    let mut rules = 0;
    for group in profile["syscalls"].as_array().ok_or("no syscalls")? {
        let act = action(group, libc::EPERM)?;
        let args: Vec<ScmpArgCompare> = group["args"]
            .as_array()
            .map(|a| a.iter().map(compare).collect::<Result<_, _>>())
            .transpose()?
            .unwrap_or_default();
        for name in group["names"].as_array().ok_or("a group without names")? {
            let name = name.as_str().ok_or("a name that is not a string")?;
            let Ok(syscall) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let added = if args.is_empty() {
                filter.add_rule(act, syscall)
            } else {
                filter.add_rule_conditional(act, syscall, &args)
            };
            added.map_err(|e| format!("{name}: {e}"))?;
            rules += 1;
        }
    }
    filter.load().map_err(|e| e.to_string())?;
    Ok(rules)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [profile, command, rest @ ..] = args.as_slice() else {
        eprintln!("usage: seccomp-exec PROFILE COMMAND [ARGS...]");
        return ExitCode::FAILURE;
    };
    let loaded = std::fs::read_to_string(profile)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
        .and_then(|p| apply(&p));
    match loaded {
        Ok(rules) => eprintln!("seccomp-exec: {rules} rules from {profile} applied"),
        Err(e) => {
            eprintln!("seccomp-exec: {profile}: {e}");
            return ExitCode::FAILURE;
        }
    }
    let e = std::process::Command::new(command).args(rest).exec();
    eprintln!("seccomp-exec: {command}: {e}");
    ExitCode::FAILURE
}
