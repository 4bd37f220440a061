"""
One full MSN training step (forward, backward, AdamW, EMA) for each masking strategy and precision.

ViT-Ti/16 at 224 px, one anchor and one target view per image, mask ratio 0.6, no focal views. Each setting runs in
its own subprocess so that its peak memory is its own: on CPU the peak resident set size above the level after
building the model (noisy: the allocator keeps freed pages), on CUDA `torch.cuda.max_memory_allocated`. The
warm-up step also counts, exactly, the bytes of the tensors saved for the backward pass (the activation memory that
masking is meant to cut) and the FLOPs of the step (`torch.utils.flop_counter`).

    python benchmarks/train_step.py                       # CPU, batch 32, writes a markdown table to stdout
    python benchmarks/train_step.py --device cuda --batch_size 128
"""

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = [
    ("drop", 0.6),
    ("mask_token", 0.6),
    ("drop", 0.0),  # no masking
]
PRECISIONS = ["fp32", "bf16"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(strategy: str, mask_ratio: float, precision: str, args) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from msn_hf import MSNConfig, MSNModel

    torch.manual_seed(0)
    device = torch.device(args.device)
    config = MSNConfig(backbone="vit_tiny_patch16_224", mask_ratio=mask_ratio, mask_strategy=strategy)
    model = MSNModel(config).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    target = torch.randn(args.batch_size, 3, 224, 224, device=device)
    anchor = torch.randn(args.batch_size, 1, 3, 224, 224, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = model(target, anchor_pixel_values=anchor).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target_encoder(0.996)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Warm-up (allocator, optimiser state, kernels), measuring the saved activations and FLOPs of one step.
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), FlopCounterMode(display=False) as flops:
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_bytes()
    peak = baseline
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
        synchronize()
        peak = max(peak, rss_bytes())
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated()
    else:
        # ru_maxrss (KiB) sees transient peaks inside a step that sampling between steps would miss.
        peak_memory = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - baseline
    return {
        "strategy": strategy if mask_ratio > 0 else "none",
        "mask_ratio": mask_ratio,
        "precision": precision,
        "images_per_second": args.batch_size * args.steps / elapsed,
        "peak_memory_mib": peak_memory / 2**20,
        "saved_activations_mib": sum(saved.values()) / 2**20,
        "gflops_per_step": flops.get_total_flops() / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "strategy,mask_ratio,precision"
    args = parser.parse_args()

    if args.one:
        strategy, ratio, precision = args.one.split(",")
        print(json.dumps(run_one(strategy, float(ratio), precision, args)))
        return

    rows = []
    for precision in PRECISIONS:
        for strategy, ratio in SETTINGS:
            command = [sys.executable, __file__, "--device", args.device, "--batch_size", str(args.batch_size),
                       "--steps", str(args.steps), "--one", f"{strategy},{ratio},{precision}"]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(output.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)

    print("| precision | masking | images/s | speed vs mask_token | GFLOPs/step | saved activations (MiB) "
          "| activations vs mask_token | peak RSS growth (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for precision in PRECISIONS:
        group = [r for r in rows if r["precision"] == precision]
        baseline = next(r for r in group if r["strategy"] == "mask_token")
        for r in group:
            print(
                f"| {precision} | {r['strategy']} ({r['mask_ratio']}) | {r['images_per_second']:.2f} | "
                f"{r['images_per_second'] / baseline['images_per_second']:.2f}x | {r['gflops_per_step']:.0f} | "
                f"{r['saved_activations_mib']:.0f} | "
                f"{r['saved_activations_mib'] / baseline['saved_activations_mib']:.2f}x | {r['peak_memory_mib']:.0f} |"
            )


if __name__ == "__main__":
    main()
