#!/bin/sh
# Dependency caching for the Docker builder: with only the manifests copied in, give every
# crate empty targets so `cargo build` compiles the dependencies into their own cached layer.
# The real sources replace the stubs in the next layer.
#
#   stub-targets.sh WORKSPACE_DIR
set -eu
cd "$1"
for manifest in services/*/Cargo.toml; do
    dir="$(dirname "$manifest")"
    mkdir -p "$dir/src"
    [ -f "$dir/src/lib.rs" ] || : > "$dir/src/lib.rs"
    [ -f "$dir/src/main.rs" ] || echo 'fn main() {}' > "$dir/src/main.rs"
    # Explicit target paths ([[bin]], [[test]], ...) must exist too.
    sed -n 's/^path *= *"\(.*\)"/\1/p' "$manifest" | while read -r path; do
        mkdir -p "$dir/$(dirname "$path")"
        [ -f "$dir/$path" ] || echo 'fn main() {}' > "$dir/$path"
    done
done
