//! Any text given to the YAML configuration loader: a config or an error, never a panic.
#![no_main]

use kvtier::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = Config::from_yaml_str(text, "fuzz.yaml") {
            let _ = config.render();
        }
    }
});
