#!/usr/bin/env bash
# Rerun docs/results.md: CE, label smoothing, Mixup, CutMix, BYOT, DKS, CS-KD, PS-KD and MixSKD (recipes
# paper and official) on the 10k-image CIFAR-10 subset (DATA), ResNet-18 width 16, batch 64, 90 epochs (5
# warmup epochs, milestones 46 and 68, the recipe's 105/205 and 155/205), each seed; then the table (table.md)
# and the figure.
#
#   export DATA=path/to/cifar10_q75_10k.npz   # the .npz to train on (docs/results.md says how it was made)
#   bash experiments.sh                                         # one run at a time
#   JOBS=10 bash experiments.sh                                 # ten runs at once (one GPU)
#   JOBS=2 bash experiments.sh                                  # on a 2-core CPU: one thread per run
#   SEEDS="0 1 2" RUNS=runs/three-seeds bash experiments.sh
#   SEEDS=2 METHODS="ce mixskd-paper" bash experiments.sh     # a third seed for two methods
#   ARCH=torchvision:resnet18 WIDTH= WARMUP= EPOCHS=15 METHODS="ce ps-kd mixskd-paper" RUNS=runs/library \
#     bash experiments.sh                                       # a library network, as a user gets it
#   WIDTH=64 EPOCHS=205 WARMUP= METHODS="ce ps-kd dks mixskd-paper mixskd-official" RUNS=runs/recipe JOBS=10 \
#     bash experiments.sh                                       # the recipe itself: train.py's defaults
#   for e in 15 30 60 90 205; do
#     EPOCHS=$e METHODS="ce ps-kd mixskd-paper" RUNS=runs/length/e$e bash experiments.sh; done  # five lengths
#   python eval.py --budget runs/length                         # which method for a budget: runs/length/budget.png
#
# ARCH, WIDTH (empty: the network's own, as for torchvision:/timm: networks), WARMUP (warmup epochs; empty:
# train.py's default) and EPOCHS set the network and the length; the defaults are the table's.
#
# A finished run (summary.json) is skipped and an interrupted one resumed, so rerunning continues (its log,
# RUNS/<run>.log, goes on where it stopped).
# With JOBS=n each job gets (cores / n) CPU threads (OMP_NUM_THREADS), since n jobs of one thread per
# core each would oversubscribe the CPU; an OMP_NUM_THREADS you set yourself is kept.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:?set DATA to the .npz to train on, e.g. DATA=path/to/cifar10_q75_10k.npz}
RUNS=${RUNS:-runs/cpu-budget}
SEEDS=${SEEDS:-"0 1"}
JOBS=${JOBS:-1}
EPOCHS=${EPOCHS:-90}
ARCH=${ARCH:-resnet18}
WIDTH=${WIDTH-16}
WARMUP=${WARMUP-5}
METHODS=${METHODS:-"ce label-smooth mixup cutmix byot dks cs-kd ps-kd mixskd-paper mixskd-official"}
PYTHON=${PYTHON:-python}
cores=$(env -u OMP_NUM_THREADS nproc)  # nproc alone would echo OMP_NUM_THREADS
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / JOBS > 0 ? cores / JOBS : 1 ))}
[ -f "$DATA" ] || { echo "error: DATA=$DATA does not exist: set DATA to the .npz to train on" >&2; exit 1; }
mkdir -p "$RUNS"

for seed in $SEEDS; do
  for name in $METHODS; do
    method=$(echo "$name" | sed 's/^mixskd-/mixskd --recipe /')  # mixskd-paper -> mixskd --recipe paper
    name="$name-seed$seed"
    dir="$RUNS/$name"
    [ -f "$dir/summary.json" ] && continue
    resume="" into=">"
    [ -f "$dir/last.pt" ] && resume="--resume" into=">>"  # a resumed run's log goes on after its first part's
    echo "$PYTHON train.py --arch $ARCH ${WIDTH:+--width $WIDTH} --dataset $DATA --batch-size 64 --epochs $EPOCHS \
${WARMUP:+--warmup-epochs $WARMUP} --seed $seed --method $method --out $dir $resume $into $dir.log 2>&1 \
|| echo failed: $dir, see $dir.log"
  done
done | tr '\n' '\0' | xargs -0 -P "$JOBS" -I{} bash -c {}

$PYTHON eval.py --table "$RUNS" | tee "$RUNS/table.md"
$PYTHON eval.py --plot "$RUNS" --out "$RUNS/results.png" || echo "(no figure: see the line above)"
