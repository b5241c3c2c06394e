#!/usr/bin/env bash
# The owner tools end to end with a trained label-conditioned protector: raeg export-key,
# protect --lossless, verify, restore (default sidecar, and approximate), tamper reports
# (a file moved to another class folder, a manifest label edited), refusal of a flat folder,
# then benchmarks/bench_protect_folder.py for the key and for an unconditioned network of
# the same architecture (throughput comparison).
#
#   CKPT=<protector checkpoint> IN=<class-folder copy of images> O=<scratch dir> \
#       bash benchmarks/owner_tools.sh
#
# IN must be a copy (never a data root): the script only reads it. Results land in $O.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${CKPT:?set CKPT to a protector checkpoint (e.g. runs/protect_quick/protector/checkpoints/last.ckpt)}"
: "${IN:?set IN to a class-folder copy of images}"
: "${O:?set O to a scratch folder for the outputs}"
: "${RAEG_DATA_DIR:?set RAEG_DATA_DIR (the class names come from cifar10/train)}"
export O IN RAEG_DATA_DIR WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$O"
R=.venv/bin/raeg
rm -rf $O/prot* $O/rest* $O/tamper* $O/*.raegkey
$R export-key --checkpoint $CKPT --out $O/cond.raegkey --classes $RAEG_DATA_DIR/cifar10/train
.venv/bin/python - <<'PY'
import os, torch
from raeg_pl.io.keyfile import read_key, save_key
from raeg_pl.models.protector import InvertibleProtector
cond = read_key(os.environ["O"] + "/cond.raegkey").net
cfg = {k: v for k, v in cond.config.items() if k not in ("num_classes", "cond_channels")}
net = InvertibleProtector(**cfg)
# Same architecture, unconditioned: the trained coupling weights where shapes agree.
own = net.state_dict()
for k, v in cond.state_dict().items():
    if k in own and own[k].shape == v.shape:
        own[k] = v
net.load_state_dict(own)
save_key(net, os.environ["O"] + "/uncond.raegkey")
print("cond", cond.config, "uncond", net.config)
PY
for K in cond uncond; do
  /usr/bin/time -f "$K protect lossless wall %e s" $R protect --key $O/$K.raegkey --input $IN --output $O/prot_$K --lossless --no-progress --json > $O/protect_$K.json
  /usr/bin/time -f "$K verify wall %e s" $R verify --input $O/prot_$K --json > $O/verify_$K.json
  /usr/bin/time -f "$K restore (default sidecar) wall %e s" $R restore --key $O/$K.raegkey --input $O/prot_$K --output $O/rest_$K --no-progress --json > $O/restore_$K.json
  /usr/bin/time -f "$K restore approximate wall %e s" $R restore --key $O/$K.raegkey --input $O/prot_$K --output $O/restapprox_$K --no-sidecar --no-progress --json > $O/restapprox_$K.json
done
# Tampering: a protected file moved to another class folder, and a manifest label edited.
cp -r $O/prot_cond $O/tamper_move
f=$(ls $O/tamper_move/cat | head -1); mv $O/tamper_move/cat/$f $O/tamper_move/dog/from_cat_$f
$R verify --input $O/tamper_move > $O/tamper_move_verify.txt 2>&1; echo "verify (moved) exit $?" >> $O/tamper_move_verify.txt
$R restore --key $O/cond.raegkey --input $O/tamper_move --output $O/tamper_move_rest --no-progress > $O/tamper_move_restore.txt 2>&1; echo "restore (moved) exit $?" >> $O/tamper_move_restore.txt
cp -r $O/prot_cond $O/tamper_label
.venv/bin/python - <<'PY'
import json, os
p = os.environ["O"] + "/tamper_label/manifest.json"
m = json.load(open(p))
files = m["files"]
rel = sorted(files)[0]
files[rel]["label"] = "dog" if files[rel]["label"] != "dog" else "cat"
json.dump(m, open(p, "w"))
print("edited", rel)
PY
$R verify --input $O/tamper_label > $O/tamper_label_verify.txt 2>&1; echo "verify (label) exit $?" >> $O/tamper_label_verify.txt
$R restore --key $O/cond.raegkey --input $O/tamper_label --output $O/tamper_label_rest --no-progress > $O/tamper_label_restore.txt 2>&1; echo "restore (label) exit $?" >> $O/tamper_label_restore.txt
# Flat folder without labels: refused before writing.
mkdir -p $O/flat && cp $IN/cat/* $O/flat/ 2>/dev/null
$R protect --key $O/cond.raegkey --input $O/flat --output $O/prot_flat > $O/flat.txt 2>&1; echo "protect flat exit $?; output exists: $(test -e $O/prot_flat && echo yes || echo no)" >> $O/flat.txt
# Figures from the stored files.
.venv/bin/python benchmarks/bench_protect_folder.py --key $O/cond.raegkey --input $IN --out $O/bench_cond.json > $O/bench_cond.txt 2>&1
.venv/bin/python benchmarks/bench_protect_folder.py --key $O/uncond.raegkey --input $IN --out $O/bench_uncond.json > $O/bench_uncond.txt 2>&1
echo "done: results in $O"
