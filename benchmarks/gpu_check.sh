#!/usr/bin/env bash
# One-GPU health and speed check, under 5 minutes on one modern GPU (never run yet: the machines
# this library is developed on have no GPU, so no GPU figure exists in this repository).
#
#   bash benchmarks/gpu_check.sh              # on a CUDA machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu_check.sh      # tiny sizes on whatever device: checks the script
#
# 1. the test suite on CUDA (multi-process gloo tests skip themselves there), time-boxed;
# 2. bf16 training: tokens/s and MFU against a bf16 matmul measured in the same run;
# 3. KV-cached decode, batch 1 and 8: tokens/s against the HBM roofline (bytes of weights and
#    cache streamed per step over a copy bandwidth measured in the same run);
# 4. PPO (LoRA actor/critic on one PaLM): episodes/s.
# Writes benchmarks/results/gpu_check.json (SMOKE=1: $TMPDIR/gpu_check-smoke.json), prints it.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SMOKE="${SMOKE:-0}"
if [[ "$SMOKE" == 0 ]]; then
  echo "== 1. test suite on CUDA (150 s box)"
  timeout 150 python -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -5 || echo "tests: FAILED or timed out"
fi
echo "== 2-4. speed"
SMOKE="$SMOKE" python - <<'PY'
import json, os, time
from pathlib import Path

import torch

from palm_rlhf.model.palm import PaLM
from palm_rlhf.model.sampling import sample_tokens

smoke = os.environ["SMOKE"] != "0"
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if device.type != "cuda" and not smoke:
    raise SystemExit("no CUDA device: run with SMOKE=1 to check the script only")
dtype = torch.bfloat16
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
       "torch": torch.__version__, "smoke": smoke}

# peak references measured here, not taken from a datasheet
n = 512 if smoke else 8192
a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
matmul_s = timed(lambda: a @ b, 2, 3 if smoke else 20)
out["matmul_bf16_tflops"] = 2 * n**3 / matmul_s / 1e12
buf = torch.empty(int(2e7 if smoke else 2e9) // 2, device=device, dtype=dtype)
dst = torch.empty_like(buf)
copy_s = timed(lambda: dst.copy_(buf), 1, 3 if smoke else 10)
out["copy_bandwidth_gbs"] = 2 * buf.numel() * 2 / copy_s / 1e9  # read + write
del a, b, buf, dst

# 2. training
size = dict(dim=128, depth=2, heads=4, dim_head=32) if smoke else dict(dim=2048, depth=16, heads=16, dim_head=128)
seq, batch = (128, 2) if smoke else (2048, 8)
torch.manual_seed(0)
model = PaLM(num_tokens=32000, max_seq_len=seq, **size).to(device)
params = sum(p.numel() for p in model.parameters())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
tokens = torch.randint(1, 32000, (batch, seq + 1), device=device)


def train_step():
    with torch.autocast(device.type, dtype=dtype):
        loss = model(tokens, return_loss=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


step_s = timed(train_step, 2 if smoke else 5, 2 if smoke else 15)
# 6N per token for the weights (forward + backward) + 12 * depth * seq * dim for attention
flops_per_token = 6 * params + 12 * size["depth"] * seq * size["heads"] * size["dim_head"]
out["train"] = dict(params=params, seq=seq, batch=batch, tokens_per_s=batch * seq / step_s,
                    mfu=batch * seq * flops_per_token / step_s / (out["matmul_bf16_tflops"] * 1e12))
del optimizer

# 3. decode: each step streams every weight once plus the KV cache so far
model = model.to(dtype).eval()
new = 16 if smoke else 256
for decode_batch in (1, 8):
    prompt = torch.randint(1, 32000, (decode_batch, 32), device=device)
    with torch.no_grad():
        run = lambda: sample_tokens(model, prompt, new, temperature=0.0)
        decode_s = timed(run, 1, 1 if smoke else 3)
    cache_bytes = 2 * size["depth"] * decode_batch * (32 + new / 2) * size["dim_head"] * 2
    step_bytes = params * 2 + cache_bytes
    roofline = out["copy_bandwidth_gbs"] * 1e9 / step_bytes * decode_batch
    achieved = decode_batch * new / decode_s
    out[f"decode_batch{decode_batch}"] = dict(tokens_per_s=achieved, roofline_tokens_per_s=roofline,
                                              fraction_of_roofline=achieved / roofline)
del model

# 4. PPO episodes/s
from palm_rlhf.rl.ppo.trainer import RLHFTrainer

torch.manual_seed(0)
palm = PaLM(num_tokens=256, dim=64 if smoke else 512, depth=2 if smoke else 8, heads=8, dim_head=64)
prompts = [torch.randint(1, 256, (8,)) for _ in range(64)]
reward = lambda seq, mask, prompt_mask: (seq == 7).float().mean(-1)
trainer = RLHFTrainer(palm=palm, reward_model=reward, prompt_token_ids=prompts,
                      mixed_precision="bf16" if device.type == "cuda" else "no",
                      rollout_batch_size=64, minibatch_size=32, epochs=1, progress=False)
episodes = 64 if smoke else 512
trainer.train(num_episodes=64, max_timesteps=8, update_timesteps=64)  # warm-up
sync()
start = time.perf_counter()
trainer.train(num_episodes=episodes, max_timesteps=16 if smoke else 64, update_timesteps=64)
sync()
out["ppo_episodes_per_s"] = episodes / (time.perf_counter() - start)

import tempfile

path = Path(tempfile.gettempdir(), "gpu_check-smoke.json") if smoke else Path("benchmarks/results/gpu_check.json")
path.write_text(json.dumps(out, indent=2) + "\n")
print(json.dumps(out, indent=2))
PY
