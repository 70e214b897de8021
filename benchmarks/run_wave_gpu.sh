#!/usr/bin/env bash
# GPU checks of this wave, in phases (one device call each; logs and JSON under $OUT):
#   bash benchmarks/run_wave_gpu.sh tests     build the CUDA ops, every `gpu` test of ops/model/data/infer
#   bash benchmarks/run_wave_gpu.sh train     the head's GroupNorm variants, fixed-shape training (tv, default, ODTK)
#   bash benchmarks/run_wave_gpu.sh loaders   loaders alone, cuDNN autotuning on/off
#   bash benchmarks/run_wave_gpu.sh realdata  real-shaped training (preloaded / torch / DALI), eager + compiled
#   bash benchmarks/run_wave_gpu.sh ddp       bench_ddp.py on all visible GPUs (scaling, equivalence, eval)
#   bash benchmarks/run_wave_gpu.sh gradsync  the default (train.grad_sync auto: after backward on one node) vs DDP,
#                                             compiled, on all visible GPUs, after their NCCL tests (~9 min on 2 GPUs)
#   bash benchmarks/run_wave_gpu.sh gradsync_eager   the same comparison eager, real-shaped data (~4 min)
#   bash benchmarks/run_wave_gpu.sh numa      eager 1/2 GPUs (default and DDP) with and without torchrun's
#                                             --numa-binding=node, after the host's topology (~5 min)
#   bash benchmarks/run_wave_gpu.sh realdata2 issue 13 on 1 and 2 GPUs: img/s over iterations 1-1000 (start-up
#                                             included), real-shaped JPEGs at the default jitter, then one
#                                             fixed shape (~10 min; `realdata2 coco|fixed`: one of them)
#   bash benchmarks/run_wave_gpu.sh warmstart a cold compile writing --compile-cache, then a fresh process started
#                                             from the file: first step and the compile caches' hits / bypasses
#                                             then 1,000 iterations (13.6 s before the GroupNorm change; ~8 min)
#   bash benchmarks/run_wave_gpu.sh profile2  why a 2-GPU eager step is longer than a 1-GPU one: rank 0's GPU
#                                             busy time and launches per step at 1 and 2 GPUs, default and
#                                             DDP; then the DALI corrupt-image GPU test (~4 min)
#   bash benchmarks/run_wave_gpu.sh contention eager 1 GPU, 2 GPUs, and two 1-GPU runs at once; the DALI GPU tests (~5 min)
#   bash benchmarks/run_wave_gpu.sh exclusive  eager 1/2 GPUs, each rank on its own cores (--numa-binding=exclusive, ~3 min)
#   bash benchmarks/run_wave_gpu.sh cudagraphs compiled 1/2 GPUs with the network's forward and backward replayed
#                                             from CUDA graphs, one shape then COCO's sizes (~9 min)
#   bash benchmarks/run_wave_gpu.sh x4tests   4 GPUs: two "nodes" x 2 GPUs (c10d rendezvous, NCCL), the pipeline's train
#                                             step on all 4 GPUs, the DALI GPU tests (~4 min)
#   bash benchmarks/run_wave_gpu.sh scaling4  eager 1, 2, 4 GPUs, and 2 and 4 independent 1-GPU runs at once (~5 min)
#   bash benchmarks/run_wave_gpu.sh equiv4    4 GPUs x 8 vs 1 GPU x 32 (and a second seed), sharded evaluation on 4 (~4 min)
#   bash benchmarks/run_wave_gpu.sh cudagraphs4  compiled 1, 2, 4 GPUs replayed from CUDA graphs, one shape (~7 min)
#   bash benchmarks/run_wave_gpu.sh cg_compare   after cudagraphs4 on one machine: compiled 1/2 GPUs without CUDA graphs
#                                             (one shape), then CUDA graphs on COCO's sizes at the default jitter, 1 GPU
#   bash benchmarks/run_wave_gpu.sh cgtest    train.cuda_graph's GPU test and the training step's host-sync tests (~3 min)
#   bash benchmarks/run_wave_gpu.sh cgcoco    compiled from CUDA graphs on COCO's sizes at the default jitter (12 padded
#                                             shapes), 1 and 2 GPUs (~9 min; the 1-GPU run's log kept)
#   bash benchmarks/run_wave_gpu.sh scaling2  issue 14 over 170-iteration windows: eager 1/2 GPUs twice (real-shaped JPEGs),
#                                             then compiled and replayed from CUDA graphs (one shape), 1/2 GPUs (~8 min)
#   bash benchmarks/run_wave_gpu.sh compile1000 cold|warm [graphs] [static|blocks|dynamic] [cpp] [fixed|coco]   issue 13's --compile figure in the eager
#                                             one's form, one shape (fixed) and COCO's sizes (coco), 1 and 2 GPUs.
#                                             `cold` fills inductor's caches (30 iterations, both data sets at once,
#                                             ~7 min); `warm`, on the same machine next, starts from them as a pod
#                                             with --compile-cache does and times iterations 1-1,000 (~6 min);
#                                             `graphs` adds --cuda-graph (its own caches: cold again);
#                                             `static` compiles each bucket (train.compile_shapes=static; its cold
#                                             pass runs 120 iterations, ~12 compiles: run it twice if cut off);
#                                             `blocks` (the default) or `dynamic`: one graph, its height and width
#                                             symbolic multiples of the pad stride or plain symbols
#                                             (train.compile_shapes; each its own caches: cold again);
#                                             `package` keeps the compiled forward packaged in a compile-cache file
#                                             per data set (train.compile_package): warm starts skip dynamo;
#                                             `cpp` compiles with inductor's C++ wrapper (TORCHINDUCTOR_CPP_WRAPPER=1:
#                                             the graphs' launches from C++, not Python; own caches: cold again);
#                                             fixed or coco runs that data set alone;
#                                             C1000_GPUS=1 on a one-GPU machine, =2 for 2 GPUs alone (default 1,2: both,
#                                             one after the other); C1000_ARGS adds bench_ddp.py options
#                                             (e.g. --profile-start: where the start-up goes); C1000_TAG adds to its output folder's name
#   bash benchmarks/run_wave_gpu.sh compileprof [cpp] [blocks|dynamic] [fixed|coco]  after `compile1000 cold` (same options): why the compiled step with symbolic shapes
#                                             (COCO's sizes) is slower than on one static shape (160 against 214
#                                             img/s): 1 GPU, 200 iterations each, 10 profiled (GPU busy ms and
#                                             launches per step; host-bound or slower kernels?) (~3 min)
#   bash benchmarks/run_wave_gpu.sh packageprof after `C1000_GPUS=2 ... compile1000 cold package` on the same machine: why
#                                             COCO's sizes lose more against one shape on 2 GPUs than on 1 (82.5 %
#                                             against 90.7 %): 1 and 2 GPUs from its packages, 300 iterations each,
#                                             10 profiled on rank 0 (GPU busy and launches per step) (~3 min)
#   bash benchmarks/run_wave_gpu.sh cachestart issue 13: --compile-cache on several GPUs (one set of artifacts per GPU):
#                                             a 1-GPU then a 2-GPU launch write the file from an empty inductor cache,
#                                             then both start again from it on another empty one; COCO's sizes, 30
#                                             iterations each; the logs say which rank loaded or compiled what (~7 min)
#   bash benchmarks/run_wave_gpu.sh newshape  issue 13: what a step pays at a new padded shape (cuDNN's plans, autotuning
#                                             off), and whether a helper thread pays it while Python is busy (~1 min)
#   bash benchmarks/run_wave_gpu.sh aotcompile issue 13: can a warm start skip dynamo? aot_compile of the training forward
#                                             (inductor, symbolic block counts) saved, then loaded in a fresh process and
#                                             run at 4 padded shapes against eager (outputs, gradients, BN stats) (~4 min)
#   bash benchmarks/run_wave_gpu.sh combo     issue 15: the .pt2 engine with inductor's combo kernels (the head's
#                                             per-level GroupNorm kernels launched together) against the default
#                                             export, two fresh processes each, batch 1 profiled (~6 min)
#   bash benchmarks/run_wave_gpu.sh bnhead    issues 15/13: the default per-level BatchNorm head against the GroupNorm head:
#                                             .pt2 engines (batch 1 profiled), the CUDA .pt2 test, then fixed-shape
#                                             training eager and compiled (~11 min)
#   bash benchmarks/run_wave_gpu.sh b1captures issue 15: is the batch-1 spread per capture or per process? One export, then
#                                             3 fresh processes each capturing its batch-1 graph 4 times on new
#                                             threads (cuDNN autotuned again each) and 4 on the main thread,
#                                             every graph timed in interleaved rounds (probe_b1_captures.py, ~5 min)
#   bash benchmarks/run_wave_gpu.sh clipackage issue 13: the CLI as a user runs it, `retinaflow train` R50-FPN --compile
#                                             --compile-cache --compile-package (torch loader, COCO-sized synthetic
#                                             JPEGs, 200 iterations), cold then warm in a fresh process; each log
#                                             line stamped with seconds since its launch (~9 min)
#   bash benchmarks/run_wave_gpu.sh b1timeline issue 15: one export, then where a batch-1 call's time goes (kernels,
#                                             gaps inside the graph, host before and after) in 2 fresh processes,
#                                             one replay's kernels listed in launch order (probe_b1_timeline.py, ~4 min)
#   KERNELS_OLD=DIR bash benchmarks/run_wave_gpu.sh kernelab  the checkout's kernels/ against another copy (DIR, e.g.
#                                             `git archive HEAD~1 kernels | tar -x -C DIR --strip-components=1`,
#                                             carried): the GPU op tests (new kernels), bench_postprocess at batch 1 and 8 with each,
#                                             then one .pt2 export timed at batch 1 in fresh processes, alternating
#                                             old and new kernels (the engine calls the loaded ops), 3 each (~6 min)
#   bash benchmarks/run_wave_gpu.sh nmsphases issue 15: the NMS kernel's GPU time against max_det, the candidate count
#                                             and the classes (probe_nms_phases.py: sorts or walk?), ~1 min
#   bash benchmarks/run_wave_gpu.sh gputests  every `gpu` test of the package (one GPU: the multi-GPU ones skip), ~4 min
#   bash benchmarks/run_wave_gpu.sh b1spread  issue 15: the batch-1 engine's spread over fresh processes, cuDNN autotuned
#                                             against its heuristics (CUDNN_BENCHMARK=0), one export (~5 min)
#   bash benchmarks/run_wave_gpu.sh engines   every `gpu` test (kernels, engines, C++ runner, NCCL faults), probe_pt2, bench_engine
#   bash benchmarks/run_wave_gpu.sh accuracy  bench_accuracy (retinaflow recipes vs torchvision) + INT8 on a result
#   bash benchmarks/run_wave_gpu.sh scratch   R50-FPN from random init at the issue's scale: default norms vs ODTK's
# Wheels the machine lacks (DALI via .device-wheels, pycocotools in .whl) are installed into /tmp/site first.
set -uo pipefail
export PYTHONPATH="/tmp/site:$PWD/src:$PWD/benchmarks:$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="$PWD/.torch_ext" TORCH_CUDA_ARCH_LIST=9.0 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ] && ! python -c "import pycocotools" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
fi
python -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1
python -m retinaflow.ops.build 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# every phase starts on idle GPUs: processes an earlier call left (its command cut off) are named and killed
left=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | tr -d ' ' | paste -sd' ')
if [ -n "$left" ]; then echo "killing processes left on the GPUs: $left"; kill -9 $left; sleep 2; fi
# tp LIMIT ARGS...: a bench_ddp.py throughput run with the DALI loader (what issues 13, 14 and 17 measure),
# killed after LIMIT seconds (0: no limit); figures: the lines of its JSON worth reading in the call's output
tp() { local limit=$1; shift; timeout "$limit" python benchmarks/bench_ddp.py --loaders dali --skip-equivalence "$@"; }
figures() {
  grep -E -e '"(img_s|img_s_log_steps|slowest_log_steps|window|loader_img_s_rank|scaling_.|efficiency_.|wall_s|setup_s|error|.x1gpu_.*)"|rror' \
    -e '"(wall_ms_per_step|gpu_busy_ms_per_step|gpu_busy_fraction|kernel_launches_per_step)"'  # with --profile
}
# data fixed|coco: bench_ddp's arguments for 1333x800 JPEGs (one shape) or COCO's sizes at the default jitter
data() {
  case $1 in
    fixed) echo --sizes fixed --jitter 800,800 --images 400 --data-dir /tmp/ddp_fixed ;;
    coco) echo --sizes coco --jitter 640,1024 --images 1200 --data-dir /tmp/bench_ddp_data ;;
  esac
}
# c1000 fixed|coco cold|warm [--cudagraphs] [--compile-shapes static]: one compile1000 launch, 1 and 2 GPUs,
# its own work directory (the cold ones run at once); cold runs 30 iterations (only the caches matter; 120
# with static shapes, to meet every bucket), warm 1,000 from iteration 1
c1000() {
  local iters=1000 limit=400 tag
  local package=()
  if [ -n "${C1000_PACKAGE:-}" ]; then package=(--compile-cache "/tmp/c1000_$1.bin" --compile-package); fi
  tag=$(echo "${@:3} ${TORCHINDUCTOR_CPP_WRAPPER:+cpp} ${C1000_PACKAGE:+package} ${C1000_TAG:-}" | sed -e 's/--cudagraphs/graphs/' -e 's/--compile-shapes //' \
    -e 's/^ *//' -e 's/ *$//' -e 's/ /_/g')
  if [ "$2" = cold ]; then
    iters=30 limit=560
    case " ${*:3} " in *" static "*) iters=120 ;; esac
  fi
  tp "$limit" --gpus "${C1000_GPUS:-1,2}" --compile-only "${@:3}" $(data "$1") --work "/tmp/c1000_$1" --tp-iters "$iters" \
    --tp-warmup 0 "${package[@]}" ${C1000_ARGS:-} --out-dir "$OUT/c1000_$1_$2${tag:+_$tag}" 2>&1 | figures | sed "s/^/[$1 $2${tag:+ $tag}] /"
  cp /tmp/c1000_"$1"/tp_*.log "$OUT/c1000_$1_$2${tag:+_$tag}/" 2>/dev/null  # the launches' logs (recompiles)
  grep -h -e "compile package" -e "compile: first" /tmp/c1000_"$1"/tp_*.log 2>/dev/null | sed "s/^/[$1 $2] /"
}
case "${1:-tests}" in
  tests)
    python -m pytest -q -p no:cacheprovider -m gpu tests/ops tests/model tests/engine/test_infer.py tests/data \
      2>&1 | tee "$OUT/gpu_tests.log" | tail -8 ;;
  train)  # the head's GroupNorm alone, then the fixed-shape training benchmark
    python benchmarks/bench_norm.py 2>&1 | tee "$OUT/norm.log" | tail -20
    python benchmarks/bench_train.py --batch 8 ${TRAIN_ARGS:---compile} 2>&1 | tee "$OUT/fixed_shape.log" | tail -30 ;;
  loaders)  # loaders alone, cuDNN autotuning on/off in fresh processes
    python benchmarks/bench_train_realdata.py --loader-only 2>&1 | tee "$OUT/loader_only.log" | tail -30
    python benchmarks/bench_cudnn.py --shapes 896x1408,1408x896,768x1280 --iters 10 2>&1 | tee "$OUT/cudnn.log" | tail -40 ;;
  realdata)
    python benchmarks/bench_train_realdata.py ${REALDATA_ARGS:---batch 8 --first 500 --second 500 --cudnn auto --peers dali,preloaded --compile} \
      2>&1 | tee "$OUT/realdata.log" | tail -60 ;;
  ddp)
    python benchmarks/bench_ddp.py --gpus "1,$(nvidia-smi -L | wc -l)" --out-dir "$OUT" ${DDP_ARGS:-} 2>&1 | tail -80 ;;
  gradsync)  # the NCCL tests (same weights as DDP; the lagged normaliser), then throughput both ways
    python -m pytest -q -p no:cacheprovider -m gpu -rA tests/engine/test_distributed.py \
      -k "after_backward or lagged or compiled" 2>&1 | tee "$OUT/gradsync_tests.log" | tail -8
    gpus=$(nvidia-smi -L | wc -l); counts=1,2; [ "$gpus" -ge 4 ] && counts=1,2,4
    tp 0 --gpus "$counts" --compile-only --sizes fixed --images 400 --data-dir /tmp/ddp_fixed \
      --ddp-variant ddp=grad_sync=ddp --out-dir "$OUT" 2>&1 | tail -40 ;;
  gradsync_eager)
    gpus=$(nvidia-smi -L | wc -l); counts=1,2; [ "$gpus" -ge 4 ] && counts=1,2,4
    tp 0 --gpus "$counts" --ddp-variant ddp=grad_sync=ddp --out-dir "$OUT" 2>&1 | tail -40 ;;
  numa)  # is a rank's host work slowed by running far from its GPU? (eager DDP: 1.64x on one 2 x H100 host)
    nvidia-smi topo -m | tee "$OUT/topology.txt"; lscpu | grep -iE "numa|socket|model name" | tee -a "$OUT/topology.txt"
    for bind in "" "--torchrun-arg=--numa-binding=node"; do
      tp 0 --gpus 1,2 --ddp-variant ddp=grad_sync=ddp $bind --out-dir "$OUT/numa${bind:+_node}" 2>&1 \
        | grep -E '"(img_s|scaling|efficiency|error|1gpu|2gpu)'
    done ;;
  warmstart)
    rm -f /tmp/warm.bin
    # cold: a short run that writes the file; warm: the issue's 1,000 iterations from it (eager alongside);
    # warm1: a short warm start without inductor's compile-worker pool (does starting it cost the seconds?)
    for run in "cold 20 40 0" "warm 500 500 0" "warm1 20 40 1"; do
      set -- $run
      threads=(); [ "$4" = 1 ] && threads=(TORCHINDUCTOR_COMPILE_THREADS=1)
      env "${threads[@]}" TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_$1 python benchmarks/bench_train_realdata.py \
        --batch 8 --first $2 --second $3 --peers preloaded --cudnn off --compile --compile-cache /tmp/warm.bin \
        2>&1 | tee "$OUT/warmstart_$1.log" | grep -E "compiled|first_step|compile_caches" | tail -6
    done ;;
  profile2)
    tp 0 --gpus 1,2 --profile --ddp-variant ddp=grad_sync=ddp --out-dir "$OUT/profile2" 2>&1 | tail -60
    python -m pytest -q -p no:cacheprovider -m gpu tests/data/test_dali.py -k corrupt 2>&1 | tail -3 ;;
  realdata2)  # the mean over the first 1,000 iterations: real data, default jitter, against one fixed shape
    runs=("coco 640,1024" "fixed 800,800")  # ~5 min each: "realdata2 coco" or "realdata2 fixed" runs one
    case "${2:-}" in coco) runs=("${runs[0]}") ;; fixed) runs=("${runs[1]}") ;; esac
    for run in "${runs[@]}"; do
      set -- $run
      tp 0 --gpus 1,2 --sizes $1 --jitter $2 --images 1200 --tp-iters 1000 --tp-warmup 0 --data-dir /tmp/ddp_$1 \
        --out-dir "$OUT/$1" 2>&1 | tail -30
    done ;;
  contention)  # is a 2-GPU eager step longer because ranks slow each other's host, or because they wait?
    tp 0 --gpus 1,2 --concurrent-singles --out-dir "$OUT/contention" 2>&1 | figures | head -20
    # the DALI GPU tests: parity with the torch loader is now asserted over the images' own pixels
    python -m pytest -q -p no:cacheprovider -m gpu tests/data/test_dali.py 2>&1 | tail -3 ;;
  exclusive)  # the same eager 1/2-GPU runs with each rank bound to its own half of the cores (torchrun)
    tp 0 --gpus 1,2 --torchrun-arg=--numa-binding=exclusive --out-dir "$OUT/exclusive" 2>&1 | figures | head -20 ;;
  cudagraphs)  # the compiled step replayed from CUDA graphs: host launches gone, is 2-GPU scaling >= 1.9x?
    for run in "fixed 800,800 400" "coco 640,1024 1200"; do
      set -- $run
      tp 280 --gpus 1,2 --compile-only --cudagraphs --sizes $1 --jitter $2 --images $3 --data-dir /tmp/ddp_$1 \
        --out-dir "$OUT/cudagraphs_$1" 2>&1 | figures | head -20
    done ;;
  x4tests)  # issue 17: what needs 4 GPUs (the multi-node rehearsal with 2 processes per node), then DALI on a GPU
    python -m pytest -q -p no:cacheprovider -m gpu -rA --durations=5 tests/kubeflow/test_trainjob_multinode.py \
      tests/kubeflow/steps/test_training_ddp.py 2>&1 | tee "$OUT/x4_tests.log" | tail -12
    python -m pytest -q -p no:cacheprovider -m gpu tests/data/test_dali.py 2>&1 | tee "$OUT/dali_tests.log" | tail -3 ;;
  scaling4)  # issue 17 (and 14): scaling at 1, 2, 4 GPUs; do ranks slow each other's host (concurrent singles)?
    tp 570 --gpus 1,2,4 --concurrent-singles --out-dir "$OUT/scaling4" 2>&1 | figures ;;
  equiv4)  # issue 17: N x b vs 1 x N*b at N = 4 (same seed; a second seed for the noise), sharded evaluation on 4
    timeout 570 python benchmarks/bench_ddp.py --gpus 4 --skip-throughput --out-dir "$OUT/equiv4" 2>&1 | tail -40 ;;
  cudagraphs4)  # issues 14/17: compiled, replayed from CUDA graphs, one shape, 1/2/4 GPUs
    tp 570 --gpus 1,2,4 --compile-only --cudagraphs --sizes fixed --images 400 --data-dir /tmp/ddp_fixed \
      --out-dir "$OUT/cudagraphs4" 2>&1 | figures ;;
  cg_compare)
    tp 250 --gpus 1,2 --compile-only --sizes fixed --images 400 --data-dir /tmp/ddp_fixed \
      --out-dir "$OUT/compiled_fixed" 2>&1 | figures
    tp 280 --gpus 1 --compile-only --cudagraphs --sizes coco --jitter 640,1024 --tp-iters 300 --tp-warmup 100 \
      --data-dir /tmp/bench_ddp_data --out-dir "$OUT/cudagraphs_coco" 2>&1 | figures ;;
  scaling2)  # issue 14: is 2-GPU scaling >= 1.9x over 170-iteration windows? Eager twice (its spread), then graphs
    for run in 1 2; do
      tp 200 --gpus 1,2 --out-dir "$OUT/eager2_$run" 2>&1 | figures
    done
    tp 300 --gpus 1,2 --compile-only --cudagraphs --sizes fixed --images 400 --data-dir /tmp/ddp_fixed \
      --out-dir "$OUT/cg2" 2>&1 | figures ;;
  compile1000)  # cold: fill the compile caches (fixed and coco at once); warm: iterations 1-1,000 from them
    pass=${2:?cold or warm}; opts=(); sets=(fixed coco)
    for opt in "${@:3}"; do  # `compile1000 warm coco`, `compile1000 warm graphs static coco`: options, one set
      case $opt in
        graphs) opts+=(--cudagraphs) ;;
        static) opts+=(--compile-shapes static) ;;  # one graph per bucket (train.compile_shapes)
        blocks|dynamic) opts+=(--compile-shapes "$opt") ;;  # one symbolic graph, in pad-stride blocks (the
                                                           # default) or not (engine/blocks.py)
        cpp) export TORCHINDUCTOR_CPP_WRAPPER=1 ;;  # inductor's C++ wrapper: each graph's launches from C++
        package) export C1000_PACKAGE=1 ;;  # train.compile_package in a compile-cache file per data set
        fixed|coco) sets=("$opt") ;;
        *) echo "unknown: $opt"; exit 2 ;;
      esac
    done
    for d in "${sets[@]}"; do
      if [ "$pass" = cold ]; then c1000 "$d" cold "${opts[@]}" & else c1000 "$d" warm "${opts[@]}"; fi
    done
    wait ;;
  packageprof)  # a 1-GPU launch runs cuda:0's package of the 2-GPU cache file (same network, same fingerprint)
    for d in coco fixed; do
      for g in 1 2; do
        C1000_GPUS=$g C1000_PACKAGE=1 C1000_TAG=prof_${g}gpu C1000_ARGS="--profile --tp-iters 300" c1000 "$d" warm
      done
    done ;;
  cachestart)
    rm -f /tmp/cc.bin
    for run in cold warm; do
      TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_cc_$run tp 560 --gpus 1,2 --compile-only $(data coco) \
        --work /tmp/cc_$run --tp-iters 30 --tp-warmup 0 --compile-cache /tmp/cc.bin --out-dir "$OUT/cachestart_$run" \
        2>&1 | figures | sed "s/^/[$run] /"
      cp /tmp/cc_$run/tp_*.log "$OUT/cachestart_$run/" 2>/dev/null
      grep -h -e "compile cache" -e "compile: first" /tmp/cc_$run/tp_*.log | sed "s/^/[$run] /"
    done ;;
  aotcompile)
    python benchmarks/probe_aot_compile.py save /tmp/net.aot 2>&1 | tee "$OUT/aot_save.log" | tail -1
    python benchmarks/probe_aot_compile.py load /tmp/net.aot 2>&1 | tee "$OUT/aot_load.log" | tail -1 ;;
  newshape)
    python benchmarks/probe_new_shape.py 2>&1 | tee "$OUT/new_shape.json" | tail -3 ;;
  compileprof)  # compiled, 1 GPU, one shape then COCO's sizes, profiled: GPU busy against wall per step
    sets=(fixed coco) opts=()  # `compileprof blocks coco`, `compileprof cpp`: after the same `compile1000 cold`
    for opt in "${@:2}"; do
      case $opt in
        cpp) export TORCHINDUCTOR_CPP_WRAPPER=1 ;;
        blocks|dynamic) opts+=(--compile-shapes "$opt") ;;
        fixed|coco) sets=("$opt") ;;
        *) echo "unknown: $opt"; exit 2 ;;
      esac
    done
    tag=$(echo "${*:2}" | tr ' ' _)
    for d in "${sets[@]}"; do
      tp 300 --gpus 1 --compile-only --profile "${opts[@]}" $(data "$d") --work "/tmp/c1000_$d" --tp-iters 200 \
        --tp-warmup 50 --out-dir "$OUT/cprof_$d${tag:+_$tag}" 2>&1 | figures | sed "s/^/[$d${tag:+ $tag}] /"
    done ;;
  combo)  # issue 15's batch 1 (2.65-2.82 ms against 2.3): fewer, fuller GroupNorm launches?
    timeout 570 python benchmarks/tune_engine.py --variants base,combo_kernels,combo_kernels_benchmarked \
      --profile base,combo_kernels --repeat 2 --no-peer --out /tmp/tune_combo 2>&1 | tee "$OUT/combo.jsonl" \
      | cut -c1-1500 ;;
  cgtest)
    python -m pytest -q -p no:cacheprovider -m gpu -rA tests/engine/test_train_step_gpu.py 2>&1 \
      | tee "$OUT/cgtest.log" | tail -6 ;;
  cgcoco)
    tp 560 --gpus 1,2 --compile-only --cudagraphs --sizes coco --jitter 640,1024 --out-dir "$OUT/cgcoco" 2>&1 \
      | figures
    cp /tmp/bench_ddp_work/tp_dali_compiled_1gpu.log "$OUT/cgcoco/" 2>/dev/null ;;
  bnhead)  # `bnhead engines`: the engines alone (~5 min)
    timeout 330 python benchmarks/tune_engine.py --variants base,gn_head --profile base,gn_head --repeat 1 \
      --no-peer --out /tmp/tune_bn 2>&1 | tee "$OUT/bnhead_engines.jsonl" | cut -c1-1500
    [ "${2:-}" = engines ] && exit 0
    python -m pytest -q -p no:cacheprovider -m gpu tests/export/test_aoti.py -k cuda_fp16 2>&1 | tail -2
    timeout 300 python benchmarks/bench_train.py --batch 8 --iters 20 --warmup 5 --compile --head-norms gn 2>&1 \
      | tee "$OUT/bnhead_train.log" | tail -3 ;;
  b1captures)
    timeout 300 python benchmarks/tune_engine.py --variants base --profile none --repeat 1 --no-peer \
      --out /tmp/b1captures 2>&1 | tee "$OUT/b1captures_export.jsonl" | cut -c1-400
    for k in 0 1 2; do
      timeout 120 python benchmarks/probe_b1_captures.py /tmp/b1captures/base/engine.pt2 --captures "${B1CAPTURES_K:-4}"
    done 2>&1 | tee "$OUT/b1captures.jsonl" | cut -c1-700 ;;
  clipackage)
    d=/tmp/clipackage; rm -rf "$d"; mkdir -p "$d"
    python -m retinaflow data synth --out "$d/data" --images 600 --sizes coco --workers 14 | tail -1
    # stamp START: each line prefixed with the seconds since START
    stamp() { python -c 'import sys, time
s = float(sys.argv[1])
for line in sys.stdin:
    print(f"{time.time() - s:7.1f} {line}", end="", flush=True)' "$1"; }
    for pass in cold warm; do
      limit=${CLIP_COLD_S:-330}; [ $pass = warm ] && limit=${CLIP_WARM_S:-200}
      start=$(date +%s.%N)
      timeout "$limit" python -m retinaflow train "$d/$pass.pth" --images "$d/data/train" \
        --annotations "$d/data/annotations/train.json" --iters 200 --batch 8 --precision bf16 --loader torch \
        --workers 12 --compile --compile-cache "$d/cc.bin" --compile-package --log-every 20 \
        --checkpoint-every 1000 2>&1 | stamp "$start" | tee "$OUT/clipackage_$pass.log" | cut -c1-300
      echo "$pass: rc ${PIPESTATUS[0]}, compile cache $(stat -c %s "$d/cc.bin" 2>/dev/null) bytes"
    done ;;
  b1timeline)
    timeout 300 python benchmarks/tune_engine.py --variants base --profile none --repeat 1 --no-peer \
      --out /tmp/b1timeline 2>&1 | tee "$OUT/b1timeline_export.jsonl" | cut -c1-400
    for k in 0 1; do
      timeout 120 python benchmarks/probe_b1_timeline.py /tmp/b1timeline/base/engine.pt2 --out "$OUT/b1timeline_$k.json"
    done 2>&1 | tee "$OUT/b1timeline.jsonl" | cut -c1-700 ;;
  kernelab)
    old=$(realpath "${KERNELS_OLD:?KERNELS_OLD=folder of the kernels to compare with}") ext_old=$PWD/.torch_ext_old
    python -m pytest -q -p no:cacheprovider -m gpu tests/ops 2>&1 | tee "$OUT/ops_tests.log" | tail -3
    with() {  # with old|new CMD...: CMD with that side's kernels
      if [ "$1" = old ]; then shift; RETINAFLOW_KERNELS_DIR="$old" TORCH_EXTENSIONS_DIR="$ext_old" "$@"
      else shift; "$@"; fi
    }
    for v in old new; do
      with $v python -m retinaflow.ops.build 2>&1 | tail -1
      with $v timeout 150 python benchmarks/bench_postprocess.py --batches 1 8 --profile > "$OUT/post_$v.json" 2>&1
      echo "[$v] $(tr -d ' \n' < "$OUT/post_$v.json" | cut -c1-1500)"
    done
    timeout 300 python benchmarks/tune_engine.py --variants base --profile none --repeat 1 --no-peer \
      --out /tmp/kernelab 2>&1 | cut -c1-400
    for k in 0 1 2; do
      for v in old new; do
        (cd benchmarks && with $v timeout 100 python -c "import json; from pathlib import Path
from tune_engine import measure
print(json.dumps({'kernels': '$v', 'run': $k, **measure('base', Path('/tmp/kernelab'), 50, True, 10 + 2 * $k + ('$v' == 'new'))}))")
      done
    done 2>&1 | tee "$OUT/kernelab.jsonl" | cut -c1-900 ;;
  nmsphases)
    timeout 200 python benchmarks/probe_nms_phases.py 2>&1 | tee "$OUT/nmsphases.json" | cut -c1-3000 ;;
  gputests)
    timeout "${GPUTESTS_S:-540}" python -m pytest -q -p no:cacheprovider -m gpu -rs --durations=20 tests/ops tests/model tests/engine \
      tests/data tests/export tests/deploy tests/kernels tests/kubeflow/steps tests/test_cli.py 2>&1 \
      | tee "$OUT/gpu_tests.log" | tail -60 ;;
  b1spread)  # issue 15: one export, batch 1 in 4 fresh processes autotuning cuDNN, then 4 on its heuristics
    timeout 300 python benchmarks/tune_engine.py --variants base --profile none --repeat 4 --no-peer \
      --out /tmp/b1spread 2>&1 | tee "$OUT/b1spread_autotuned.jsonl" | cut -c1-400
    for k in 0 1 2 3; do
      (cd benchmarks && CUDNN_BENCHMARK=0 timeout 100 python -c "import json; from pathlib import Path
from tune_engine import measure
print(json.dumps({'cudnn_benchmark': 0, 'run': $k, **measure('base', Path('/tmp/b1spread'), 50, False, 10 + $k)}))")
    done 2>&1 | tee "$OUT/b1spread_heuristics.jsonl" | cut -c1-400 ;;
  engines)
    python -m pytest -q -p no:cacheprovider -m gpu -rs --durations=15 tests/ops tests/model tests/engine tests/data \
      tests/export tests/deploy tests/kernels tests/kubeflow/steps 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
    # the .pt2 load crash first (native backtrace of a fresh-process load); the latency benchmark if R50 loads
    timeout 300 python benchmarks/probe_pt2.py --out /tmp/probe --variants tiny,r50 --parallel 2 2>&1 | tee "$OUT/probe.jsonl" | cut -c1-3000
    grep -q '"variant": "r50".*"load_rc": 0' "$OUT/probe.jsonl" && timeout 240 python -X faulthandler \
      benchmarks/bench_engine.py --engine /tmp/probe/r50/r50.pt2 --keep /tmp/bench_engine 2>&1 | tee "$OUT/engine.json" | tail -40 ;;
  accuracy)
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)
    # Default recipe vs ODTK's and the ablations that say which part of the default carries its gain.
    odtk="model.head_norm=none,matcher.allow_low_quality=false,loss.box_loss=smooth_l1,loss.box_weight=1.0"
    recipes="--recipe default= --recipe odtk=$odtk --recipe no_head_norm=model.head_norm=none"
    recipes="$recipes --recipe smooth_l1=loss.box_loss=smooth_l1,loss.box_weight=1.0 --recipe gn_head=model.head_norm=gn"
    python benchmarks/bench_accuracy.py --out /tmp/acc --data /tmp/real_data --gpus "$gpus" --keep \
      --iters 500 --jobs-per-gpu 12 --workers 1 ${ACC_ARGS:-$recipes} \
      2>&1 | tee "$OUT/accuracy.log" | tail -60
    cp /tmp/acc/summary.json /tmp/acc/runs.jsonl "$OUT/" 2>/dev/null
    ckpt=$(ls /tmp/acc/*/model.pth 2>/dev/null | grep -m1 "${INT8_RUN:-default_s0}")
    [ -n "$ckpt" ] && timeout 240 python benchmarks/bench_int8.py "$ckpt" --images /tmp/real_data/val \
      --annotations /tmp/real_data/annotations/val.json --calibration-images 256 2>&1 | tee "$OUT/int8.log" | tail -30 ;;
  scratch)  # issue 12's case: R50-FPN, no backbone weights, lr 0.01, batch 32, 512 px (ODTK's network diverged)
    gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)
    r50="model.backbone=resnet50,model.fpn_channels=256,train.optimizer=sgd,train.weight_decay=0.0001"
    python benchmarks/bench_accuracy.py --out /tmp/scratch --data /tmp/real_data --gpus "$gpus" --libs retinaflow \
      --backbone-weights none --batch 32 --size 512 --lr 0.01 --iters ${SCRATCH_ITERS:-300} --seeds 0 \
      --jobs-per-gpu 1 --workers 6 --recipe "r50_default=$r50" \
      --recipe "r50_odtk=$r50,model.norm=frozen_bn,model.head_norm=none" 2>&1 | tee "$OUT/scratch.log" | tail -30
    for f in /tmp/scratch/*.log; do echo "== $f"; grep -aE "loss|error|mAP" "$f" | tail -12; done > "$OUT/scratch_runs.log" ;;
esac
