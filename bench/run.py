"""llmgen against transformers on the same random weights, in the same run, alternating.

    python bench/run.py [--shape gpt2-124m|smollm2-135m|pythia-160m|qwen3-0.6b] [--device cpu|cuda]
                        [--dtype float32|bfloat16|float16] [--threads 2] [--repeats 5]
                        [--new-tokens 64] [--quick]

Prints one table of medians: decode tokens/s at batch 1 (greedy, EOS ignored), the
same with sampling through the default chain (T=1, nothing else) and the embedded
model's chain (T=0.8, top-p 0.95), batch tokens/s at 16, a beam-4 step against a greedy step, prefill tokens/s for a 512-token
prompt, and the machine's measured bandwidth bound for batch-1 decode (weights bytes /
the bandwidth of a large matrix-vector product in the same dtype) with llmgen's fraction
of it. On CPU also the embedded model's time to first token from process start, and
peak RSS. Needs the test extra (transformers).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import SHAPES, checkpoint, weight_bytes  # noqa: E402

from llmgen.checkpoint import load_checkpoint  # noqa: E402
from llmgen.config import GenerationConfig, SamplingConfig  # noqa: E402
from llmgen.decoding.beam import BeamConfig, beam_search  # noqa: E402
from llmgen.decoding.greedy_sample import Row, generate_batch  # noqa: E402
from llmgen.models.linear import PACK_FOR_ROWS, linear, onednn_available  # noqa: E402

PROMPT = list(range(1, 17))


def sync() -> None:
    """Wait for queued GPU work, so a timer stops when the work is done."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turn so drift hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def bandwidth_gbs(repeats: int, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Bytes per second streamed by a matrix-vector product larger than any cache, with
    each kernel we can reach: torch.mv, F.linear and, on CPU in float32, oneDNN's product
    on the dense and on the packed weight (what llmgen's layers use). The bound is the
    fastest, so llmgen is not flattered by a slow kernel."""
    w = torch.randn(8192, 8192, device=device).to(dtype)
    x = torch.randn(1, 8192, device=device).to(dtype)
    kernels = {"torch.mv": lambda: torch.mv(w, x[0]), "F.linear": lambda: torch.nn.functional.linear(x, w)}
    if device.type == "cpu" and dtype == torch.float32 and onednn_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_FOR_ROWS)
        kernels["oneDNN"] = lambda: linear(x, w)
        kernels["oneDNN packed"] = lambda: linear(x, packed)
    with torch.inference_mode():
        seconds = alternate(kernels, repeats + 5)
    return {name: w.numel() * w.element_size() / t / 1e9 for name, t in seconds.items()}


def startup_seconds(pairs: int) -> tuple[float, float]:
    """(``llmgen run "I like" -n 1`` minus ``python -c "import torch"``, both whole processes,
    as the median of alternating pairs so drift hits both alike; llmgen's time from
    process start to its first byte of output)."""
    extra, first = [], []
    for _ in range(pairs):
        baseline = timed(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True, capture_output=True))
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "llmgen", "run", "I like", "-n", "1", "--seed", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdout.read(1)
        first.append(time.perf_counter() - start)
        proc.stdout.read()
        if proc.wait():
            raise RuntimeError("llmgen run failed")
        extra.append(time.perf_counter() - start - baseline)
    return statistics.median(extra), statistics.median(first)


def peak_rss_mb(code: str) -> float:
    """Peak resident memory of a fresh process running ``code``. (VmHWM, not ru_maxrss:
    ru_maxrss survives exec, so a child would report its parent's peak.)"""
    probe = "\nprint(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    out = subprocess.run([sys.executable, "-c", code + probe], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default=SHAPES[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 1, 8
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    path = checkpoint(args.shape)
    ours = load_checkpoint(path, device=args.device, dtype=args.dtype)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    n = args.new_tokens
    greedy = GenerationConfig(max_new_tokens=n, ignore_eos=True, sampling=SamplingConfig(temperature=0))

    def ours_gen(batch):
        return lambda: generate_batch(ours.model, [Row(PROMPT, None, n)] * batch, greedy, ours.decode)

    def ref_gen(batch, beams=1, **sampling):
        ids = torch.tensor([PROMPT] * batch, device=device)
        return lambda: ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=bool(sampling), num_beams=beams, pad_token_id=0, top_k=None, **sampling)

    def ours_sample(**sampling):
        gen = GenerationConfig(max_new_tokens=n, ignore_eos=True, sampling=SamplingConfig(**sampling))
        return lambda: generate_batch(ours.model, [Row(PROMPT, 0, n)], gen, ours.decode)

    rows = []
    with torch.inference_mode():
        t = alternate({"llmgen": ours_gen(1), "transformers": ref_gen(1)}, args.repeats)
        ours1, ref1 = n / t["llmgen"], n / t["transformers"]
        rows.append(("decode tok/s, batch 1", ours1, ref1))
        for label, sampling in (("T=1", {"temperature": 1.0}), ("T=0.8, top-p 0.95", {"temperature": 0.8, "top_p": 0.95})):
            t = alternate({"llmgen": ours_sample(**sampling), "transformers": ref_gen(1, **sampling)}, args.repeats)
            rows.append((f"sample tok/s, batch 1, {label}", n / t["llmgen"], n / t["transformers"]))
        t = alternate({"llmgen": ours_gen(16), "transformers": ref_gen(16)}, max(1, args.repeats // 2))
        rows.append(("decode tok/s, batch 16", 16 * n / t["llmgen"], 16 * n / t["transformers"]))

        beam_cfg = BeamConfig(width=4, max_new_tokens=n, length_penalty=0.0, tree_top=0)
        t = alternate({"beam": lambda: beam_search(ours.model, PROMPT, beam_cfg), "greedy": ours_gen(1),
                       "ref_beam": ref_gen(1, beams=4)}, max(1, args.repeats // 2))
        rows.append(("beam-4 step / greedy step", t["beam"] / t["greedy"], t["ref_beam"] / (n / ref1)))

        long = torch.randint(1, 500, (1, 512), device=device)
        t = alternate({"llmgen": lambda: ours.model(long, None, ours.model.new_cache(1, 513)), "transformers": lambda: ref(long)},
                      args.repeats)
        rows.append(("prefill tok/s, 512-token prompt", 512 / t["llmgen"], 512 / t["transformers"]))

    weights_mb = weight_bytes(ours.model) / 2**20
    if device.type == "cpu":
        extra, first = startup_seconds(1 if args.quick else 2 * args.repeats + 1)
        rows.append(("embedded model: `run -n 1` minus `import torch` (s)", extra, None))
        rows.append(("embedded model: first token from process start (s)", first, None))
        torch_rss = peak_rss_mb("import torch")
        load_rss = peak_rss_mb(
            f"import torch; from llmgen.checkpoint import load_checkpoint\n"
            f"c = load_checkpoint({str(path)!r}, device='cpu', dtype={args.dtype!r})\n"
            "with torch.inference_mode(): c.model(torch.tensor([list(range(1, 17))]))"
        )
        rows.append(("peak RSS MB (weights %.0f MB, torch alone %.0f MB)" % (weights_mb, torch_rss), load_rss, None))

    bw = bandwidth_gbs(args.repeats, device, dtype)
    best = max(bw, key=bw.get)
    bound = bw[best] * 1e9 / weight_bytes(ours.model)
    measured = ", ".join(f"{name} {gbs:.1f}" for name, gbs in bw.items())
    rows.append((f"bandwidth bound, batch-1 tok/s ({best}; GB/s: {measured})", bound, None))
    rows.append(("llmgen batch-1 fraction of the bound", ours1 / bound, None))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {args.threads} threads")
    print(f"{args.shape} shape, {args.dtype}, {where}, torch {torch.__version__}, {n} new tokens, "
          f"median of {args.repeats}")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'':{width}} {'llmgen':>10} {'transformers':>13} {'ratio':>7}")
    for name, a, b in rows:
        ratio = f"{a / b:6.2f}x" if b else ""
        print(f"{name:{width}} {a:10.3f} {'' if b is None else f'{b:13.3f}'} {ratio:>7}")
    if device.type == "cpu":
        print(f"(peak RSS budget: 1.3 x weights + torch = {1.3 * weights_mb + torch_rss:.0f} MB)")


if __name__ == "__main__":
    main()
