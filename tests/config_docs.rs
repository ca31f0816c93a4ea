//! docs/config.md and `walhook config schema` stay in step with the config types: every
//! key the loader accepts is documented, and the example configs validate against the
//! schema the binary prints (which rejects unknown keys).

use std::path::Path;
use std::process::Command;

use crate::support::walhook_bin;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn printed_schema() -> serde_json::Value {
    let out = Command::new(walhook_bin())
        .args(["config", "schema"])
        .output()
        .expect("run walhook config schema");
    assert!(
        out.status.success(),
        "walhook config schema: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("walhook config schema prints JSON")
}

#[test]
fn every_config_key_is_documented_in_docs_config_md() {
    let docs = std::fs::read_to_string(repo("docs/config.md")).expect("read docs/config.md");
    let keys = walhook::config::schema_keys();
    assert!(keys.len() > 40, "too few keys found: {keys:?}");
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| {
            // A key as `dotted.key`, a section as `[key]` or `[[key]]`.
            !["`{}`", "`[{}]`", "`[[{}]]`"]
                .iter()
                .any(|form| docs.contains(&form.replace("{}", key)))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/config.md does not document these keys (write each as `dotted.key`): {missing:?}"
    );
}

#[test]
fn example_configs_validate_against_the_printed_schema() {
    let schema = printed_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("config")).expect("read config/") {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let value: serde_json::Value =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{} is not TOML: {e}", path.display()));
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", path.display());
        checked += 1;
    }
    assert!(checked > 0, "no config/*.toml found");

    // The schema is strict: a misspelt key or a wrong type fails, as walhook itself does.
    for bad in [
        "[source]\nurll = \"postgres://x\"\n",
        "[[tables]]\ntable = \"public.users\"\nevents = { insert = 3 }\n",
        "[[subscriptions]]\nname = \"a\"\nurl = \"http://x\"\nevents = [\"*\"]\n[subscriptions.retryy]\n",
        "[[subscriptions]]\nname = \"a\"\npayload = \"fat\"\n",
    ] {
        let value: serde_json::Value = toml::from_str(bad).unwrap();
        assert!(!validator.is_valid(&value), "schema accepted:\n{bad}");
    }
}
