//! No shell ever runs, whatever the input.

use super::*;

// ---- no shell ----

/// Tools run through one function with an argument vector: no `sh -c` anywhere in the driver.
#[test]
fn the_driver_never_runs_a_shell() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut commands = Vec::new();
    for rel in walk(&src) {
        let path = src.join(&rel);
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for shell in [
                "\"sh\"",
                "\"/bin/sh\"",
                "\"bash\"",
                "\"/bin/bash\"",
                "\"-c\"",
            ] {
                assert!(
                    !code.contains(shell),
                    "{}:{}: {shell} in {line:?}",
                    rel.display(),
                    n + 1
                );
            }
            // src/bin/loopcsi-bench is the benchmark, not the driver: it runs fio and
            // losetup itself (never through a shell, which the check above covers).
            if code.contains("Command::new") && !rel.starts_with("bin") {
                commands.push(format!("{}:{}", rel.display(), n + 1));
            }
        }
    }
    assert!(
        commands.iter().all(|c| c.starts_with("host/tools.rs:")),
        "processes are started outside host/tools.rs: {commands:?}"
    );
}
