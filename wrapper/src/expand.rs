//! `$NAME` and `${NAME}` in the game's arguments, for the variables the wrapper sets.
//!
//! Kubernetes expands `$(VAR)` only from the container's own env, which cannot hold ports
//! chosen at run time, and the wrapper runs no shell. So it expands its own variables
//! (`SERVER_PORT`, `SPOTABLE_PORT_GAME`, …) itself and leaves every other `$` as written.

use std::ffi::{OsStr, OsString};

/// `arg` with each `$NAME` / `${NAME}` whose NAME is in `vars` replaced by its value. `$$` is
/// left as written (a shell script's PID), as is every other `$`. Arguments that are not
/// UTF-8 are returned unchanged.
pub fn expand(arg: &OsStr, vars: &[(String, String)]) -> OsString {
    let Some(s) = arg.to_str() else {
        return arg.to_owned();
    };
    let lookup = |name: &str| {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push_str("$$");
            rest = tail;
            continue;
        }
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => (&braced[..end], end + 2),
                None => ("", 0),
            }
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match lookup(name).filter(|_| !name.is_empty()) {
            Some(value) => {
                out.push_str(value);
                rest = &after[consumed..];
            }
            None => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, String)> {
        vec![
            ("SERVER_PORT".into(), "7005".into()),
            ("SPOTABLE_PORT_RCON".into(), "7006".into()),
        ]
    }

    fn x(s: &str) -> String {
        expand(OsStr::new(s), &vars()).into_string().unwrap()
    }

    #[test]
    fn own_variables_are_expanded_in_both_forms() {
        assert_eq!(x("$SERVER_PORT"), "7005");
        assert_eq!(x("0.0.0.0:${SERVER_PORT}"), "0.0.0.0:7005");
        assert_eq!(x("--rcon=$SPOTABLE_PORT_RCON,x"), "--rcon=7006,x");
        assert_eq!(x("${SERVER_PORT}${SPOTABLE_PORT_RCON}"), "70057006");
    }

    #[test]
    fn everything_else_is_left_as_written() {
        assert_eq!(x("$HOME/x"), "$HOME/x");
        assert_eq!(x("${HOME}"), "${HOME}");
        assert_eq!(x("${SERVER_PORT"), "${SERVER_PORT");
        assert_eq!(x("cost: 5$"), "cost: 5$");
        assert_eq!(x("$"), "$");
        assert_eq!(x("${}"), "${}");
        assert_eq!(x("$SERVER_PORTS"), "$SERVER_PORTS");
        assert_eq!(x("$$SERVER_PORT"), "$$SERVER_PORT");
        assert_eq!(x("kill -USR1 $$"), "kill -USR1 $$");
        assert_eq!(x("plain"), "plain");
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_is_unchanged() {
        use std::os::unix::ffi::OsStrExt;
        let raw = OsStr::from_bytes(b"\xff$SERVER_PORT");
        assert_eq!(expand(raw, &vars()), raw);
    }
}
