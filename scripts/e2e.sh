#!/usr/bin/env bash
# The reference's test steps, with curl, against a running DPIP.
#   DPIP_URL (default http://localhost:8080), DPIP_USER (admin), DPIP_PASSWORD (required),
#   E2E_FRAMES (how many frames to push, default 10).
# Prints each step and ends with "E2E PASS" (exit 0) or "E2E FAIL: <step>" (exit 1).
set -uo pipefail

URL=${DPIP_URL:-http://localhost:8080}
USER_NAME=${DPIP_USER:-admin}
PASSWORD=${DPIP_PASSWORD:?set DPIP_PASSWORD (make run prints it; it is also in data/admin-password)}
FRAMES=${E2E_FRAMES:-10}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

step() { printf '== %s\n' "$*"; }
fail() { printf 'E2E FAIL: %s\n' "$*"; exit 1; }
json() { "$PY" -c 'import json,sys; v=json.load(sys.stdin)
for k in sys.argv[1].split("."): v=v[int(k)] if isinstance(v,list) else v[k]
print(json.dumps(v) if isinstance(v,(list,dict,bool)) else v)' "$1"; }
code() { curl -s -o "$WORK/body" -w '%{http_code}' "$@"; }

step "login: GET /login with Basic auth as $USER_NAME"
[ "$(code -u "$USER_NAME:$PASSWORD" "$URL/login")" = 200 ] || fail "login: $(cat "$WORK/body")"
TOKEN=$(json token < "$WORK/body") || fail "login: no token"
AUTH="Authorization: Bearer $TOKEN"

step "status: GET /status lists the workers"
[ "$(code -H "$AUTH" "$URL/status")" = 200 ] || fail "status: $(cat "$WORK/body")"
ALIVE=$("$PY" -c 'import json,sys; print(sum(w["alive"] for w in json.load(sys.stdin)["workers"]))' < "$WORK/body")
echo "   $ALIVE live worker(s)"
[ "$ALIVE" -ge 1 ] || fail "status: no live worker"

step "workload: bare POST /workloads"
[ "$(code -X POST -H "$AUTH" "$URL/workloads")" = 200 ] || fail "create workload: $(cat "$WORK/body")"
WID=$(json workload_id < "$WORK/body")
[ "$(json filter < "$WORK/body")" = grayscale ] || fail "default filter is not grayscale"
echo "   workload $WID"

step "frames: make $FRAMES PNG frames"
mkdir -p "$WORK/frames" "$WORK/out"
"$PY" - "$WORK/frames" "$FRAMES" <<'PYEOF' || fail "cannot make frames (needs Pillow)"
import sys
from PIL import Image, ImageDraw
out, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    im = Image.linear_gradient("L").resize((320, 180)).convert("RGB")
    ImageDraw.Draw(im).rectangle((i * 10, 20, i * 10 + 40, 80), fill=(255, 40 * (i % 6), 0))
    im.save(f"{out}/{i}.png")
PYEOF

step "push: POST /images, one frame at a time (field data, type=original)"
for ((i = 0; i < FRAMES; i++)); do
  c=$(code -H "$AUTH" -F "data=@$WORK/frames/$i.png" -F "workload_id=$WID" -F type=original "$URL/images")
  [ "$c" = 200 ] || fail "upload $i: HTTP $c $(cat "$WORK/body")"
  [ "$(json image_id < "$WORK/body")" = "$i" ] || fail "upload $i got id $(json image_id < "$WORK/body")"
done

step "wait: GET /workloads/$WID until completed"
for ((t = 0; t < 600; t++)); do
  code -H "$AUTH" "$URL/workloads/$WID" > /dev/null
  STATUS=$(json status < "$WORK/body")
  [ "$STATUS" = completed ] && break
  sleep 0.2
done
[ "$STATUS" = completed ] || fail "workload still $STATUS after 120 s"
[ "$(json filtered_images < "$WORK/body" | tr -d ' ')" = "[$(seq -s, 0 $((FRAMES - 1)))]" ] \
  || fail "filtered_images is $(json filtered_images < "$WORK/body")"

step "pull: GET /images/{id} with a form body (workload_id, type=filtered)"
for ((i = 0; i < FRAMES; i++)); do
  c=$(curl -s -X GET -H "$AUTH" -d "workload_id=$WID" -d type=filtered -o "$WORK/out/$i.png" \
      -w '%{http_code} %{content_type}' "$URL/images/$i")
  [ "$c" = "200 image/png" ] || fail "pull $i: $c"
done
"$PY" - "$WORK/frames" "$WORK/out" "$FRAMES" <<'PYEOF' || fail "filtered frames are not the grayscale of their originals"
import sys
from PIL import Image
src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    a, b = Image.open(f"{src}/{i}.png"), Image.open(f"{out}/{i}.png")
    assert b.format == "PNG" and b.size == a.size, i
    assert b.tobytes() == a.convert("L").tobytes(), i
PYEOF

step "original: GET /images/0?type=original is byte-identical"
curl -s -H "$AUTH" -o "$WORK/orig0.png" "$URL/images/0?workload_id=$WID&type=original"
cmp -s "$WORK/orig0.png" "$WORK/frames/0.png" || fail "original 0 differs from what was uploaded"

step "errors: no token is 401, unknown workload is 404, wrong method is 405"
[ "$(code "$URL/status")" = 401 ] || fail "no token was not 401"
[ "$(code -H "$AUTH" "$URL/workloads/no-such-workload")" = 404 ] || fail "unknown workload was not 404"
[ "$(code -X PUT -H "$AUTH" "$URL/status")" = 405 ] || fail "PUT /status was not 405"

step "logout: DELETE /logout, then the token is dead"
[ "$(code -X DELETE -H "$AUTH" "$URL/logout")" = 200 ] || fail "logout: $(cat "$WORK/body")"
[ "$(code -H "$AUTH" "$URL/status")" = 401 ] || fail "token still works after logout"

echo "E2E PASS"
