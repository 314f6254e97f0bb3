#!/usr/bin/env bash
# The key/envelope walk-through that `make keys-demo` runs: two parties enrol each other by fingerprint, exchange a
# sealed file, rotate a key and show what is refused. Everything happens in demo-out/ and nothing keeps running.
set -euo pipefail
cd "$(dirname "$0")/.."
out="demo-out/keys-walkthrough"
rm -rf "$out" && mkdir -p "$out/agency" "$out/unit"
umask 077
# Bold step titles only on a terminal, and never with NO_COLOR set (https://no-color.org) or TERM=dumb.
if [ -t 1 ] && [ -z "${NO_COLOR:-}" ] && [ "${TERM:-}" != dumb ]; then
  step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
  step() { printf '\n== %s\n' "$*"; }
fi

# Each side has its own passphrase, kept in a file readable only by its owner.
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$out/agency/passphrase"
python3 -c 'import secrets; print(secrets.token_urlsafe(24))' > "$out/unit/passphrase"
agency() { hedui-keys --keystore "$out/agency/keystore.json" --passphrase-file "$out/agency/passphrase" "$@"; }
unit() { hedui-keys --keystore "$out/unit/keystore.json" --passphrase-file "$out/unit/passphrase" "$@"; }

step "1. The verification agency (Changchun, 220100) and the city tax bureau each create a keystore"
agency init agency.220100
unit init unit.220100.tax

step "2. Each exports its public bundle and prints a key letter for the other side"
agency export --out "$out/agency.bundle"
unit export --out "$out/unit.bundle"
unit letter --out "$out/unit/key-letter.txt"
cat "$out/unit/key-letter.txt"

step "3. Import only when the fingerprint read over the phone matches (a wrong one is refused)"
unit_fp=$(hedui-keys inspect "$out/unit.bundle" | sed -n 's/^bundle fingerprint: //p')
agency_fp=$(hedui-keys inspect "$out/agency.bundle" | sed -n 's/^bundle fingerprint: //p')
if agency import "$out/unit.bundle" --fingerprint "12345 12345 12345 12345 12345 12345 12345 12345"; then
  echo "BUG: a wrong fingerprint was accepted" >&2; exit 1
fi
agency import "$out/unit.bundle" --fingerprint "$unit_fp"
unit import "$out/agency.bundle" --fingerprint "$agency_fp"

step "4. The agency seals a (synthetic) query list for the tax bureau; only the bureau can open it"
printf 'subject_ref,category\nS0001,tax\nS0002,tax\n' > "$out/agency/query-list.csv"
agency seal "$out/agency/query-list.csv" --to unit.220100.tax --media-type text/csv --out "$out/query-list.hsf"
unit open "$out/query-list.hsf" --out-dir "$out/unit/inbox"

step "5. A changed byte is refused; the reason is shown to our own operator only"
python3 - "$out/query-list.hsf" "$out/tampered.hsf" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[len(data) // 2] ^= 0x01
open(sys.argv[2], "wb").write(bytes(data))
PY
if unit open "$out/tampered.hsf" --out-dir "$out/unit/tampered"; then
  echo "BUG: a tampered file was opened" >&2; exit 1
fi

step "6. The same disc brought back is refused: the bureau's replay store remembers what it opened"
if unit open "$out/query-list.hsf" --out-dir "$out/unit/again"; then
  echo "BUG: a sealed file was opened twice" >&2; exit 1
fi

step "7. The agency rotates its signing key; the bureau applies the signed announcement"
agency rotate signing --overlap-days 14 --out "$out/agency-rotation.txt"
unit apply "$out/agency-rotation.txt"
printf 'subject_ref,category\nS0003,tax\n' > "$out/agency/query-list-2.csv"
agency seal "$out/agency/query-list-2.csv" --to unit.220100.tax --out "$out/query-list-2.hsf"
unit open "$out/query-list-2.hsf" --out-dir "$out/unit/inbox"
unit list

step "Done"
echo "Everything is in $out/ (keystores are encrypted, mode 0600). Key letter: $out/unit/key-letter.txt"
echo "Specification: docs/envelope.md and docs/keys.md"
