#!/usr/bin/env bash
# The main job on the built-in synthetic dataset: synth -> train a teacher -> distill a student -> export ->
# quantize + promotion gate -> benchmark -> serve -> score held-out images over HTTP and by STOW-RS -> batch-score
# the held-out archive -> the review UI (the service keeps running; KEEP_SERVING=0 stops it).
set -euo pipefail
BIN=${BIN:-.venv/bin}
OUT=${DEMO_DIR:-demo_out}
PATIENTS=${DEMO_PATIENTS:-400}
MINUTES=${DEMO_MINUTES:-7}
STUDENT_MINUTES=${DEMO_STUDENT_MINUTES:-4}
DIFFICULTY=${DEMO_DIFFICULTY:-0.1}
PORT=${DEMO_PORT:-8765}
EPOCHS=${DEMO_EPOCHS:-45}
URL="http://127.0.0.1:${PORT}"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$OUT"
mkdir -p "$OUT"
step "1/14 synthetic mammograms: $PATIENTS patients x 4 views (difficulty $DIFFICULTY)"
"$BIN/medvision" synth "$OUT/data" --patients "$PATIENTS" --difficulty "$DIFFICULTY"

step "2/14 manifest, patient-level split (leakage-checked) and data card"
"$BIN/medvision" data manifest --rsna "$OUT/data/labels.csv" --images "$OUT/data/images" --out "$OUT/manifest.csv"
"$BIN/medvision" data split "$OUT/manifest.csv" --out "$OUT/split.csv"
"$BIN/medvision" data card "$OUT/manifest.csv" --name synthetic_demo --out-dir "$OUT/data_card" --split "$OUT/split.csv" \
  --intended-use "Synthetic mammograms for demonstrating and testing medvision end to end. No patient data went in; results on it say nothing about real mammograms."

step "3/14 train the teacher ViT from scratch (at most $MINUTES min; images decoded once into $OUT/cache)"
"$BIN/medvision" train --config demo --manifest "$OUT/manifest.csv" --split "$OUT/split.csv" \
  --out "$OUT/run" "train.epochs=$EPOCHS" "train.max_minutes=$MINUTES" "data.cache_dir=$OUT/cache"

step "4/14 evaluate the teacher: calibration and operating point on validation; held-out report with 95 % CIs"
"$BIN/medvision" evaluate "$OUT/run" --no-progress > "$OUT/evaluation.json"
cat "$OUT/evaluation.json"

step "5/14 export the teacher (ONNX, metadata and calibration embedded, parity-checked against torch)"
"$BIN/medvision" export "$OUT/run" --out "$OUT/teacher.onnx"

step "6/14 distill a 3-layer student from the teacher's logits (at most $STUDENT_MINUTES min, same split)"
"$BIN/medvision" distill --teacher "$OUT/run" --config student_demo --out "$OUT/student" \
  "train.max_minutes=$STUDENT_MINUTES" "data.cache_dir=$OUT/cache"

step "7/14 evaluate and export the student"
"$BIN/medvision" evaluate "$OUT/student" --no-progress > "$OUT/student_evaluation.json"
"$BIN/medvision" export "$OUT/student" --out "$OUT/student_fp32.onnx"

step "8/14 quantize (INT8 candidates timed here) and gate against the teacher on the held-out split"
SERVE_MODEL="$OUT/model.onnx"
if "$BIN/medvision" quantize "$OUT/student_fp32.onnx" --run "$OUT/student" --teacher "$OUT/run" \
     --out "$SERVE_MODEL" --no-progress > "$OUT/gate.txt"; then
  GATE=promoted
else
  code=$?
  if [ "$code" != 3 ]; then cat "$OUT/gate.txt"; exit "$code"; fi
  GATE=refused
  SERVE_MODEL="$OUT/teacher.onnx"
fi
sed -n '/PROMOTED\|REFUSED/,$p' "$OUT/gate.txt"
[ "$GATE" = refused ] && echo "the student was not promoted: the service runs the teacher ($SERVE_MODEL)"

step "9/14 benchmark: teacher vs student, torch vs ONNX Runtime, fp32 vs INT8 (same threads, batches, inputs)"
INT8_ARGS=()
[ "$GATE" = promoted ] && INT8_ARGS=(--int8 "$OUT/model.onnx")
"$BIN/medvision" bench --teacher "$OUT/run" --student "$OUT/student" --onnx "$OUT/student_fp32.onnx" \
  "${INT8_ARGS[@]}" --seconds 2 --out "$OUT/bench" --no-progress 2>/dev/null

step "10/14 start the service on $URL ($(basename "$SERVE_MODEL")), with its database and API keys"
mkdir -p "$OUT/service"
export MEDVISION_DATABASE_URL="sqlite:///$(cd "$OUT/service" && pwd)/medvision.db"
"$BIN/medvision" keys create demo-site --scopes score > "$OUT/service_key.json"
"$BIN/medvision" keys create demo-admin --scopes admin > "$OUT/admin_key.json"
KEY=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['key'])" "$OUT/service_key.json")
ADMIN_KEY=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['key'])" "$OUT/admin_key.json")
MEDVISION_DATA_DIR="$OUT/service" "$BIN/medvision" serve --model "$SERVE_MODEL" --port "$PORT" > "$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen('$URL/readyz', timeout=1)" 2>/dev/null; then break; fi
  if ! kill -0 "$SERVER" 2>/dev/null; then cat "$OUT/serve.log"; echo "service failed to start" >&2; exit 1; fi
  sleep 0.5
done

step "11/14 score the held-out test patients over HTTP"
MEDVISION_API_KEY="$KEY" "$BIN/medvision" predict "$OUT/data/images" --url "$URL" --labels "$OUT/data/labels.csv" \
  --split "$OUT/run/split.csv" --subset test --out "$OUT/test_scores.csv" | tee "$OUT/test_summary.json"

"$BIN/python" - "$OUT" "$BIN" "$SERVE_MODEL" "$URL" "$ADMIN_KEY" <<'PY'
import json, os, sys, urllib.request
out, bin_, served, url, admin = sys.argv[1:6]
s = json.load(open(f"{out}/test_summary.json"))
teacher = json.load(open(f"{out}/evaluation.json"))
student = json.load(open(f"{out}/student_evaluation.json"))
gate = json.load(open(f"{out}/model.gate.json"))


def line(name, e):
    lo, hi = e["auroc_ci95"]
    return f"{name}: held-out AUROC {e['auroc']:.3f} (95 % CI {lo:.3f}-{hi:.3f}, patient bootstrap)"


print()
print(line("teacher (torch)", teacher))
print(line("student (torch)", student))
verdict = "promoted" if gate["passed"] else "REFUSED (" + "; ".join(gate["reasons"]) + ")"
drop = gate["criteria"][0]
print(f"gate: {verdict}; AUROC drop {drop['measured']:+.3f} (95 % CI {drop['ci95'][0]:+.3f} to {drop['ci95'][1]:+.3f})")
if gate.get("contract_check"):
    c = gate["contract_check"]
    print(f"decode contract vs every pixel decoded, same model: AUROC {c['auroc_contract']:.3f} vs {c['auroc_full']:.3f}, "
          f"{c['flipped']} of {gate['test_images']} decisions differ (largest probability change {c['max_probability_change']:.3f})")
print(f"served {os.path.basename(served)}: test AUROC {s['auroc']:.3f} on {s['labelled']} images ({s['positives']} cancer) "
      f"scored over HTTP; sensitivity {s['sensitivity']:.2f} / specificity {s['specificity']:.2f} at its operating point")
promoted = "model.onnx (the promoted INT8 student) + " if gate["passed"] else "no model.onnx (the gate wrote none), "
print(f"artifacts in {out}/: {promoted}model.card.md, .gate.json, .quantize.json, teacher.onnx, student_fp32.onnx, "
      "run/ and student/ (checkpoints, evaluation/report.md), bench/bench.md, test_scores.csv, data_card/")
# the PACS path: push every held-out study by STOW-RS (as a PACS would), wait for their scores and DICOM SRs;
# their images stay on the service for the review UI (images /v1/predict scored already are not scored again)
import csv, glob, time
import pydicom
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session
key = json.load(open(f"{out}/service_key.json"))["key"]
test_patients = sorted({r["patient_id"] for r in csv.DictReader(open(f"{out}/run/split.csv")) if r["split"] == "test"})
session = create_session()
session.headers["Authorization"] = f"Bearer {key}"
client = DICOMwebClient(url=f"{url}/dicomweb", session=session)
uids = []
for patient in test_patients:
    study = [pydicom.dcmread(f) for f in sorted(glob.glob(f"{out}/data/images/{patient}/*.dcm"))]
    client.store_instances(study)
    uids.append(str(study[0].StudyInstanceUID))


def status_of(uid):
    return json.load(urllib.request.urlopen(urllib.request.Request(
        f"{url}/v1/studies/{uid}", headers={"Authorization": f"Bearer {key}"}), timeout=10))


deadline = time.monotonic() + 300
while time.monotonic() < deadline and any(status_of(u)["status"] == "received" for u in uids):
    time.sleep(1)
states = [status_of(u) for u in uids]
uid, status = uids[0], states[0]
results = json.load(urllib.request.urlopen(urllib.request.Request(
    f"{url}/v1/studies/{uid}/results", headers={"Authorization": f"Bearer {key}"}), timeout=10))
print(f"STOW-RS: {len(uids)} held-out studies pushed over DICOMweb, {sum(s['status'] == 'scored' for s in states)} "
      f"scored with a DICOM SR each; e.g. study 1 (max probability {results['max_probability']:.3f}): its SR "
      f"{status['report_sop_instance_uid']} is at {url}/dicomweb/studies/{uid}/series/"
      f"{status['report_series_instance_uid']}/instances/{status['report_sop_instance_uid']}")
req = urllib.request.Request(f"{url}/v1/admin/usage", headers={"Authorization": f"Bearer {admin}"})
usage = json.load(urllib.request.urlopen(req, timeout=10))
print("usage metered per site and day: " + "; ".join(f"{u['site']} {u['day']}: {u['images']} images, "
                                                      f"{u['studies']} studies" for u in usage))
print(f"serve it later: MEDVISION_DATABASE_URL={os.environ['MEDVISION_DATABASE_URL']} "
      f"MEDVISION_DATA_DIR={out}/service {bin_}/medvision serve "
      f"--model {served}  (OpenAPI docs at /docs; API keys: {bin_}/medvision keys create NAME --scopes score)")
PY

step "12/14 score the held-out archive in batch: medvision score (decode pool + batched ONNX Runtime, resumable)"
mapfile -t TEST_DIRS < <("$BIN/python" -c "import csv,sys; [print(f'{sys.argv[1]}/data/images/{p}') for p in sorted({r['patient_id'] for r in csv.DictReader(open(f'{sys.argv[1]}/run/split.csv')) if r['split'] == 'test'})]" "$OUT")
"$BIN/medvision" score "${TEST_DIRS[@]}" --model "$SERVE_MODEL" --out "$OUT/archive_scores" --no-progress \
  > "$OUT/archive_summary.json"
"$BIN/python" - "$OUT" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/archive_summary.json"))
print(f"medvision score: {s['scored_now']} images scored, {sum(s['refused_now'].values())} refused, {s['total']['exams']} "
      f"exams, {s['images_per_s']} images/s ({s['decode_ms_per_image']} ms decode per image in {s['decode_workers']} "
      f"processes, {s['inference_ms_per_image']} ms inference); rows in {s['outputs']['images']}, exams in "
      f"{s['outputs']['exams']}; rerunning the command skips what is there")
PY

step "13/14 a second site on other equipment: the drift watch notices, and the site gets its own calibration"
"$BIN/medvision" synth "$OUT/site_b" --site shifted --patients 300 --difficulty "$DIFFICULTY" --prevalence 0.2 \
  --no-progress > /dev/null
"$BIN/medvision" data manifest --rsna "$OUT/site_b/labels.csv" --images "$OUT/site_b/images" \
  --out "$OUT/site_b/manifest.csv" > /dev/null
"$BIN/medvision" data card "$OUT/site_b/manifest.csv" --name site_b --out-dir "$OUT/data_card" --no-progress \
  --compare "$OUT/manifest.csv" --compare-name synthetic_demo > /dev/null
echo "data card of site-b, compared with the training data: $OUT/data_card/site_b.md"
"$BIN/medvision" keys create site-b --scopes score > "$OUT/site_b_key.json"
SITE_B_KEY=$("$BIN/python" -c "import json,sys; print(json.load(open(sys.argv[1]))['key'])" "$OUT/site_b_key.json")
MEDVISION_API_KEY="$SITE_B_KEY" "$BIN/medvision" predict "$OUT/site_b/images" --url "$URL" \
  --labels "$OUT/site_b/labels.csv" --out "$OUT/site_b_scores.csv" --no-progress > "$OUT/site_b_summary.json"
"$BIN/python" - "$OUT" "$URL" "$ADMIN_KEY" <<'PY'
import csv, json, sys, urllib.request
out, url, admin = sys.argv[1:4]
s = json.load(open(f"{out}/site_b_summary.json"))
print(f"site-b (another vendor, older patients): {s['labelled']} images scored, AUROC {s['auroc']:.3f}, "
      f"sensitivity {s['sensitivity']:.2f} / specificity {s['specificity']:.2f} at the model's threshold")
drift = json.load(urllib.request.urlopen(urllib.request.Request(
    f"{url}/v1/admin/drift", headers={"Authorization": f"Bearer {admin}"}), timeout=60))
for site in drift["sites"]:
    print(f"drift watch, {site['site']}: {site['studies']} studies, "
          + (f"ALARM on {', '.join(site['alarms'])}" if site["alarms"] else "no alarm")
          + ("" if site["studies"] >= drift["policy"]["min_studies"] else
             f" (an alarm needs {drift['policy']['min_studies']} studies)"))
labels = {r["image_id"]: r["cancer"] for r in csv.DictReader(open(f"{out}/site_b/labels.csv"))}
with open(f"{out}/site_b_outcomes.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["sop_instance_uid", "cancer"])
    for r in csv.DictReader(open(f"{out}/site_b_scores.csv")):
        if r["sop_instance_uid"]:
            w.writerow([r["sop_instance_uid"], labels[r["image_id"]]])
PY
if "$BIN/medvision" recalibrate fit --site site-b --model "$SERVE_MODEL" --outcomes "$OUT/site_b_outcomes.csv" \
    --out "$OUT/site_b_calibration.json" > "$OUT/site_b_recalibration.json"; then
  "$BIN/medvision" recalibrate apply "$OUT/site_b_calibration.json" > /dev/null
  APPLIED=applied
else
  APPLIED="not applied"
fi
"$BIN/python" - "$OUT" "$APPLIED" <<'PY'
import json, sys
out, applied = sys.argv[1:3]
r = json.load(open(f"{out}/site_b_recalibration.json"))
h = r["held_out"]
for name in ("model_threshold", "site_threshold"):
    m = h[name]
    print(f"  held-out ({h['studies']} studies) at the {name.replace('_', ' ')} {m['threshold']:.4f}: sensitivity "
          f"{m['sensitivity']:.2f} ({m['sensitivity_ci95'][0]:.2f}-{m['sensitivity_ci95'][1]:.2f}), specificity "
          f"{m['specificity']:.2f}")
print(f"site-b calibration {'accepted' if r['accepted'] else 'REFUSED'} and {applied}: " + "; ".join(r["reasons"]))
PY

step "14/14 the clinician review UI: a reader account, the held-out studies on its worklist"
"$BIN/medvision" users create reader --role reader > "$OUT/reader_account.json" 2>/dev/null
"$BIN/medvision" users create admin --role admin > "$OUT/admin_account.json" 2>/dev/null
"$BIN/python" - "$OUT" "$URL" <<'PY'
import json, sys
out, url = sys.argv[1:3]
reader, admin = (json.load(open(f"{out}/{n}_account.json")) for n in ("reader", "admin"))
print(f"review UI: {url}/ui  (sign in as '{reader['username']}' / {reader['password']}; admin: "
      f"'{admin['username']}' / {admin['password']}; both also in {out}/*_account.json)")
print("  worklist sorted by AI suspicion -> Enter opens a study; H heatmap, W window presets, A / D / U agree / "
      "disagree / uncertain, N / P next / previous, Esc back")
PY
if [ "${KEEP_SERVING:-1}" = 1 ]; then
  echo "the service keeps running for the review UI; Ctrl-C stops it"
  wait "$SERVER"
fi
