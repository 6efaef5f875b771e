#!/bin/bash
# Throughput: the same N (160) detector-size JPEG 2000 films scored from local disk and from Orthanc over DICOMweb.
set -e
CK=$(realpath ${1:?usage: benchmarks/pacs_throughput.sh CHECKPOINT (N=160 films by default)})
# Usage: benchmarks/pacs_throughput.sh CHECKPOINT   (N films, default 160; needs make pacs-deps)
M=$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/meddx
PY=$(dirname "$M")/python
W=${WORK:-/tmp/meddx-pacs-bench}
mkdir -p "$W" && cd "$W"
rm -rf bN && $M synth bN --n ${N:-160} --size 2400x2800 --format dicom-j2k --seed 21 >/dev/null
mkdir -p borth && cat > borth/config.json <<JSON
{"Name":"bench","StorageDirectory":"$W/borth/db","IndexDirectory":"$W/borth/db","HttpPort":18043,"DicomPort":14243,
 "RemoteAccessAllowed":false,"AuthenticationEnabled":true,"RegisteredUsers":{"meddx":"s3cret"},
 "Plugins":["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],"DicomWeb":{"Enable":true,"Root":"/dicom-web/"},"HttpCompressionEnabled":false}
JSON
rm -rf borth/db; Orthanc borth/config.json > borth/log 2>&1 & OPID=$!
sleep 3
$PY - <<PY
import glob, pydicom, requests
from dicomweb_client.api import DICOMwebClient
s=requests.Session(); s.auth=("meddx","s3cret")
c=DICOMwebClient("http://127.0.0.1:18043/dicom-web", session=s)
files=sorted(glob.glob("bN/*/*.dcm"))
for i in range(0, len(files), 10): c.store_instances([pydicom.dcmread(f) for f in files[i:i+10]])
print("stored", len(files))
PY
export MEDDX_PSEUDONYM_KEY=k1 MEDDX_DICOMWEB_USER=meddx MEDDX_DICOMWEB_PASSWORD=s3cret
for round in 1 2; do
  rm -rf o_local o_pacs
  echo "round $round local:"; $M score bN --model $CK --out o_local --quiet 2>&1 | grep inputs=
  echo "round $round dicomweb:"; $M score dicomweb+http://127.0.0.1:18043/dicom-web --model $CK --out o_pacs --quiet 2>&1 | grep inputs=
done
kill $OPID
