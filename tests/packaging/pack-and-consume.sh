#!/usr/bin/env bash
# Packaging test, as a user meets the project: pack the SparseAttention library and the sparse-attn tool
# from a clean build into a local folder feed; build and run a fresh console app (tests/packaging/consumer,
# copied outside the repository so no Directory.Build.* of ours applies) that references the package by
# version from that feed; install the tool from the feed and run pattern, config show, a tiny train, eval
# and demo --help. Prints one "ok - ..." or "not ok - ..." line per check and exits non-zero if any failed.
#
# Our packages get a fresh prerelease version (VersionPrefix + "-ci.<time>.<pid>") and restore into a
# private NuGet packages folder, so no stale copy can stand in for them; third-party packages (TorchSharp-cpu
# and libtorch, ~1 GB unpacked) are read from the user's global packages folder as a fallback folder.
#
# Usage: tests/packaging/pack-and-consume.sh [--keep]   (--keep leaves the temporary folder for inspection)
set -uo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
keep=0; [ "${1:-}" = "--keep" ] && keep=1
work=$(mktemp -d "${TMPDIR:-/tmp}/sparse-attn-packaging.XXXXXX")
cleanup() { if [ "$keep" = 1 ]; then echo "# kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

failures=0
ok() { echo "ok - $1"; }
not_ok() { echo "not ok - $1"; failures=$((failures + 1)); }
# check DESCRIPTION COMMAND...: runs the command with its output in $work/last.log; ok when it exits 0.
check() {
  local what=$1; shift
  "$@" >"$work/last.log" 2>&1
  local rc=$?
  if [ "$rc" -eq 0 ]; then ok "$what"; return 0; fi
  not_ok "$what (exit $rc)"; sed 's/^/#   /' "$work/last.log" | tail -25; return 1
}
# expect DESCRIPTION PATTERN: the last command's output matches the extended regex PATTERN.
expect() {
  if grep -Eq -- "$2" "$work/last.log"; then ok "$1"; else not_ok "$1: no line matches /$2/"; sed 's/^/#   /' "$work/last.log" | tail -15; fi
}

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) rid=linux-x64 ;;
  Linux-aarch64) rid=linux-arm64 ;;
  Darwin-arm64) rid=osx-arm64 ;;
  *) echo "not ok - packaging test: no tool package for $(uname -s)-$(uname -m)"; exit 1 ;;
esac

suffix="ci.$(date -u +%Y%m%d%H%M%S).$$"
version="$(dotnet msbuild "$repo/src/SparseAttention/SparseAttention.csproj" -getProperty:Version -p:VersionSuffix="$suffix" 2>/dev/null | tr -d '[:space:]')"
if [[ ! "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+-ci\. ]]; then echo "not ok - version from Directory.Build.props (got '$version')"; exit 1; fi
feed="$work/feed"; mkdir -p "$feed" "$work/packages"
echo "# version $version, tool platform $rid, work folder $work"

# Private packages folder for everything restored here; the global one only as a read-only fallback.
global_packages="${NUGET_PACKAGES:-$HOME/.nuget/packages}"
cat >"$work/nuget.config" <<EOF
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <config><add key="globalPackagesFolder" value="$work/packages" /></config>
  <fallbackPackageFolders><add key="user-global" value="$global_packages" /></fallbackPackageFolders>
  <packageSources>
    <clear />
    <add key="local-feed" value="$feed" />
    <add key="nuget.org" value="https://api.nuget.org/v3/index.json" />
  </packageSources>
  <packageSourceMapping>
    <packageSource key="local-feed"><package pattern="SparseAttention" /><package pattern="sparse-attn" /><package pattern="sparse-attn.*" /></packageSource>
    <packageSource key="nuget.org"><package pattern="*" /></packageSource>
  </packageSourceMapping>
</configuration>
EOF

# ---- pack, from a clean build (its own artifacts folder, nothing reused from bin/ or obj/) ----
pack() { dotnet pack "$repo/$1" -c Release -o "$feed" --artifacts-path "$work/artifacts" -p:VersionSuffix="$suffix" "${@:2}"; }
check "pack the SparseAttention library" pack src/SparseAttention
check "pack the sparse-attn tool for $rid" pack src/SparseAttention.Cli -p:ToolPackageRuntimeIdentifiers="$rid"

lib="$feed/SparseAttention.$version.nupkg"
if [ -f "$lib" ]; then
  entries=$(unzip -Z1 "$lib")
  for f in buildTransitive/SparseAttention.targets PACKAGE.md lib/net10.0/SparseAttention.dll lib/net10.0/SparseAttention.xml; do
    if grep -qx "$f" <<<"$entries"; then ok "library package has $f"; else not_ok "library package has $f"; fi
  done
  if unzip -p "$lib" SparseAttention.nuspec | grep -q '<license type="expression">MIT</license>'; then ok "library package: MIT licence expression"; else not_ok "library package: MIT licence expression"; fi
  if [ -f "$feed/SparseAttention.$version.snupkg" ]; then ok "symbols package (snupkg)"; else not_ok "symbols package (snupkg)"; fi
else
  not_ok "library package $lib exists"
fi
limit=$((250 * 1024 * 1024))
for p in "$feed/sparse-attn.$version.nupkg" "$feed/sparse-attn.$rid.$version.nupkg"; do
  if [ -f "$p" ]; then
    size=$(stat -c %s "$p")
    if [ "$size" -lt "$limit" ]; then ok "$(basename "$p"): $((size / 1024 / 1024)) MB < 250 MB"; else not_ok "$(basename "$p"): $((size / 1024 / 1024)) MB >= 250 MB"; fi
  else
    not_ok "tool package $(basename "$p") exists"
  fi
done
tool_pkg="$feed/sparse-attn.$rid.$version.nupkg"
if [ -f "$tool_pkg" ]; then
  other=$(unzip -Z1 "$tool_pkg" | grep -E '(^|/)(lib)?torch_cpu\.(dll|dylib)$|/runtimes/' | head -3)
  if [ -z "$other" ]; then ok "tool package carries only $rid native libraries"; else not_ok "tool package carries other platforms: $other"; fi
fi

# ---- a fresh console app referencing the package from the feed ----
# From here on, restores go to the private packages folder (our packages) with the global one as fallback.
export NUGET_PACKAGES="$work/packages"
app="$work/app"; cp -r "$repo/tests/packaging/consumer" "$app"; cp "$work/nuget.config" "$app/"
# Control: with the package's fix switched off the app must fail to load libtorch on a host whose libstdc++
# lacks GLIBCXX_3.4.32 (Debian 12, Ubuntu 22.04) — this shows that the fix below comes from the package.
libstdcxx=$(/sbin/ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 .*x86-64|libstdc\+\+\.so\.6 .*AArch64/ {print $NF; exit}')
if [ -n "$libstdcxx" ] && ! grep -q GLIBCXX_3.4.32 "$libstdcxx"; then
  if dotnet build "$app" -c Release -o "$work/app-unpatched" -p:SparseAttentionVersion="$version" -p:SparseAttentionPatchLibTorchSharp=false >"$work/last.log" 2>&1; then
    if (dotnet "$work/app-unpatched/SparseAttention.PackageConsumer.dll") >"$work/last.log" 2>&1; then
      not_ok "control: without the package's fix the app should not load libtorch on this host (old libstdc++)"
    elif grep -q "libtorch" "$work/last.log"; then
      ok "control: without the package's fix the app cannot load libtorch on this host, as expected"
    else
      not_ok "control: the unpatched app failed, but not at loading libtorch"; sed 's/^/#   /' "$work/last.log" | tail -15
    fi
  else
    not_ok "control build of the app (fix switched off)"; sed 's/^/#   /' "$work/last.log" | tail -15
  fi
else
  echo "# control skipped: this host's libstdc++ has GLIBCXX_3.4.32 (or was not found)"
fi
if check "build the app against SparseAttention $version from the local feed" \
     dotnet build "$app" -c Release -o "$work/app-out" -p:SparseAttentionVersion="$version"; then
  expect "the package's build target patched the app's libLibTorchSharp.so" "Marked GLIBCXX_3.4.32 weak in .*app-out.*libLibTorchSharp\.so"
  if check "run the app (kernel vs dense, model forward)" dotnet "$work/app-out/SparseAttention.PackageConsumer.dll"; then
    expect "app: kernel output shape (agreement with the dense computation is in its exit code)" "^kernel shape 2x3x100x16 max_abs_diff "
    expect "app: model forward" "^model logits 2x64x256 loss [0-9]"
    expect "app: all checks passed" "^PACKAGE-SMOKE-OK$"
  fi
fi
# What users deploy: a framework-dependent publish for this platform gets its copy patched too.
if check "publish the app for $rid" \
     dotnet publish "$app" -c Release -r "$rid" --self-contained false -o "$work/app-pub" -p:SparseAttentionVersion="$version"; then
  expect "the package's publish target patched the published libLibTorchSharp.so" "Marked GLIBCXX_3.4.32 weak in .*app-pub.*libLibTorchSharp\.so"
  check "run the published app" dotnet "$work/app-pub/SparseAttention.PackageConsumer.dll" && expect "published app: all checks passed" "^PACKAGE-SMOKE-OK$"
fi
if [ -d "$work/packages/sparseattention/$version" ]; then ok "SparseAttention $version restored from the local feed into the private packages folder"
else not_ok "SparseAttention $version not found in the private packages folder"; fi
echo "# private packages folder: $(ls "$work/packages" | tr '\n' ' ')"

# ---- the tool, installed from the feed ----
tools="$work/tools"
# From an empty folder: dotnet tool install looks at project files in the current folder.
mkdir -p "$work/cwd"; cd "$work/cwd" || exit 1
if check "dotnet tool install sparse-attn $version from the local feed" \
     dotnet tool install sparse-attn --version "$version" --tool-path "$tools" --configfile "$work/nuget.config"; then
  sa="$tools/sparse-attn"
  check "sparse-attn pattern" "$sa" pattern --kind local --local-attn-ctx 16 --seq-len 64 --block 8 &&
    expect "pattern prints the sparsity" "^local\(ctx=16, causal\): seq_len=64 block=8 heads=1 sparsity=0\.[0-9]+"
  check "sparse-attn config show" "$sa" config show --preset tiny-routing --set dim=96 &&
    expect "config show prints the override" '"dim": 96,'
  # A tiny corpus (about 24 KB of varied text) and a few training steps of a small tiny-routing model.
  for i in $(seq 1 300); do echo "Line $i: the quick brown fox number $((i * 7 % 13)) jumps over $((i % 5)) lazy dogs."; done >"$work/corpus.txt"
  check "sparse-attn train (3 steps, tiny-routing)" "$sa" train --data "$work/corpus.txt" --out "$work/run" --preset tiny-routing --set dim=32 \
      --max-steps 3 --batch-size 2 --warmup 1 --eval-every 3 --eval-batches 1 --log-every 1 --threads 2 &&
    expect "train reports validation bits per byte" "bpc"
  if ls "$work/run"/ckpt-*.sat >/dev/null 2>&1; then ok "train wrote a checkpoint"; else not_ok "train wrote a checkpoint"; fi
  check "sparse-attn eval of the trained checkpoint" "$sa" eval --checkpoint "$work/run" --data "$work/corpus.txt" --max-bytes 2000 --json &&
    expect "eval prints bits per byte as JSON" '^\{"bpc":[0-9.]+, "tokens":[0-9]+, "bytes":[0-9]+, "loss":[0-9.]+, "tokenizer":"bytes", "bucket_size":256, "bpc_by_position":\[[0-9.]+(, ([0-9.]+|null))*\]\}$'
  check "sparse-attn demo --help" "$sa" demo --help && expect "demo --help shows usage" "^Usage:"
  if "$sa" config show --preset no-such-preset >"$work/last.log" 2>&1; then not_ok "a bad preset exits non-zero"
  elif [ $? -eq 2 ]; then ok "a bad preset exits 2 (usage error)"; else not_ok "a bad preset exits 2 (usage error)"; fi
fi

echo "# packaging: $failures failed"
[ "$failures" -eq 0 ]
