"""
One full MSN training step (target forward, anchor forward + backward, AdamW, EMA), timed for several implementations
of the same work in one run, each in its own subprocess so that its peak memory is its own.

`--work` picks the shape (the table of issue 12):

    pair   ViT-Ti/16 at 224 px, batch 32, 1 anchor view (mask 0.6) + 1 target view
    paper  ViT-Ti/16, batch 16, 1 anchor view at 224 px (mask 0.15) + 10 focal views at 96 px + 1 target view
    small  ViT 32 px, patch 4, width 192, depth 6, batch 128, 1 anchor (mask 0.15) + 6 focal views at 16 px + target

Implementations (`--impls`):

    msn_hf   MSNModel (this package)
    msn_hf_before  MSNModel with the anchor's last block computed for every token (msn_hf before issue 12)
    timm     the same work written directly on two timm ViTs, two heads and a prototype matrix, with the simplest
             loss (sharpened softmax targets, no Sinkhorn): the floor, so that msn_hf / timm is the overhead of MSN
    lightly  lightly's MSN building blocks (MaskedVisionTransformerTIMM, MSNProjectionHead, MSNLoss,
             update_momentum), set up as lightly's MSN example but with unmasked focal views and trainable prototypes
             to do the same work; needs `lightly` importable (`--lightly_path` is prepended to sys.path)

Each of `--rounds` rounds is a fresh process that builds every implementation, warms each up, then times `--steps`
steps with the implementations interleaved step by step (the machine's load hits them alike); speeds are medians,
ratios the median of the per-step paired ratios. Memory: the exact bytes autograd saves for the backward pass (the
activation memory; peak RSS on a CPU is dominated by the allocator and other processes), and on CUDA
`torch.cuda.max_memory_allocated` during each implementation's step (all implementations' weights included).

    python benchmarks/train_step.py --work paper
    python benchmarks/train_step.py --work paper --device cuda --backbone vit_small_patch16_224 --batch_size 64 \\
        --precision bf16 --impls msn_hf --flops [--torch_compile]
    python benchmarks/train_step.py --masking     # token dropping vs mask tokens vs no masking (issue 2)
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

WORKS = {
    "pair": dict(backbone="vit_tiny_patch16_224", backbone_kwargs={}, batch_size=32, image_size=224, mask_ratio=0.6,
                 num_focal_views=0, focal_size=96),
    "paper": dict(backbone="vit_tiny_patch16_224", backbone_kwargs={}, batch_size=16, image_size=224, mask_ratio=0.15,
                  num_focal_views=10, focal_size=96),
    "small": dict(backbone="vit_tiny_patch16_224",
                  backbone_kwargs=dict(patch_size=4, embed_dim=192, depth=6, num_heads=3), batch_size=128,
                  image_size=32, mask_ratio=0.15, num_focal_views=6, focal_size=16),
}  # fmt: skip
MASKING_SETTINGS = [("drop", 0.6), ("mask_token", 0.6), ("drop", 0.0)]
TEMPERATURE, SHARPEN, MOMENTUM = 0.1, 0.25, 0.996


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class FullLastBlock:
    """Context for msn_hf_before: the anchor's last block computed for every token, as before issue 12."""

    def __enter__(self):
        from msn_hf import modeling_msn

        self.module, self.saved = modeling_msn, modeling_msn.class_token_block
        modeling_msn.class_token_block = lambda block, tokens: block(tokens)[:, :1]

    def __exit__(self, *exc):
        self.module.class_token_block = self.saved


def build_msn_hf(
    work: dict, device, mask_strategy: str = "drop", torch_compile: bool = False, full_last_block: bool = False
):
    import contextlib

    import torch

    from msn_hf import MSNConfig, MSNModel

    config = MSNConfig(
        backbone=work["backbone"],
        backbone_kwargs=work["backbone_kwargs"],
        image_size=work["image_size"],
        focal_image_size=work["focal_size"],
        mask_ratio=work["mask_ratio"],
        mask_strategy=mask_strategy,
    )
    model = MSNModel(config).to(device).train()
    forward = torch.compile(model) if torch_compile else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_fn(target, anchor, focal):
        with FullLastBlock() if full_last_block else contextlib.nullcontext():
            return forward(target, anchor_pixel_values=anchor, focal_pixel_values=focal).loss

    return loss_fn, optimizer, lambda: model.update_target_encoder(MOMENTUM)


def _head(width: int):
    from torch import nn

    return nn.Sequential(
        nn.Linear(width, 2048), nn.BatchNorm1d(2048), nn.GELU(),
        nn.Linear(2048, 2048), nn.BatchNorm1d(2048), nn.GELU(),
        nn.Linear(2048, 256),
    )  # fmt: skip


def build_timm(work: dict, device):
    import timm
    import torch
    import torch.nn.functional as F

    def vit():
        return timm.create_model(
            work["backbone"], img_size=work["image_size"], num_classes=0, dynamic_img_size=True,
            **work["backbone_kwargs"],
        ).to(device)  # fmt: skip

    encoder, target_encoder = vit(), vit()
    head, target_head = _head(encoder.embed_dim).to(device), _head(encoder.embed_dim).to(device)
    target_encoder.load_state_dict(encoder.state_dict())
    target_head.load_state_dict(head.state_dict())
    for module in (target_encoder, target_head):
        module.requires_grad_(False)
    prototypes = torch.nn.Parameter(torch.rand(1024, 256, device=device) - 0.5)
    trained = [*encoder.parameters(), *head.parameters(), prototypes]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    ema_target = [*target_encoder.parameters(), *target_head.parameters()]
    ema_source = [*encoder.parameters(), *head.parameters()]

    def logits(z):
        return F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).t() / TEMPERATURE

    def loss_fn(target, anchor, focal):
        with torch.no_grad():
            targets = F.softmax(logits(target_head(target_encoder.forward_features(target)[:, 0])) / SHARPEN, -1)
        tokens = encoder._pos_embed(encoder.patch_embed(anchor.flatten(0, 1)))
        num_patches = tokens.shape[1] - 1
        keep = torch.rand(tokens.shape[0], num_patches, device=device).argsort(1)[
            :, : int(num_patches * (1 - work["mask_ratio"]))
        ]
        kept = tokens[:, 1:].gather(1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = encoder.norm(encoder.blocks(encoder.norm_pre(torch.cat([tokens[:, :1], kept], 1))))
        embeddings = [head(tokens[:, 0])]
        if focal is not None:
            embeddings.append(head(encoder.forward_features(focal.transpose(0, 1).flatten(0, 1))[:, 0]))
        log_probs = F.log_softmax(logits(torch.cat(embeddings)).float(), -1)
        num_views = log_probs.shape[0] // targets.shape[0]
        cross_entropy = -(targets.float().repeat(num_views, 1) * log_probs).sum(-1).mean()
        mean_probs = log_probs.exp().mean(0)
        return cross_entropy + (mean_probs * mean_probs.log()).sum()

    def ema():
        with torch.no_grad():
            torch._foreach_lerp_(ema_target, ema_source, 1 - MOMENTUM)

    return loss_fn, optimizer, ema


def build_lightly(work: dict, device):
    import copy

    import timm
    import torch
    from lightly.loss import MSNLoss
    from lightly.models import utils
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.models.modules.heads import MSNProjectionHead

    vit = timm.create_model(
        work["backbone"], img_size=work["image_size"], num_classes=0, dynamic_img_size=True, **work["backbone_kwargs"]
    )
    anchor_backbone = MaskedVisionTransformerTIMM(vit=vit).to(device)
    anchor_head = MSNProjectionHead(vit.embed_dim).to(device)
    backbone, head = copy.deepcopy(anchor_backbone), copy.deepcopy(anchor_head)
    utils.deactivate_requires_grad(backbone)
    utils.deactivate_requires_grad(head)
    prototypes = torch.nn.Linear(256, 1024, bias=False).to(device)
    criterion = MSNLoss()
    params = [*anchor_backbone.parameters(), *anchor_head.parameters(), *prototypes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def loss_fn(target, anchor, focal):
        targets_out = head(backbone(images=target))
        anchor = anchor.flatten(0, 1)
        sequence_length = anchor_backbone.sequence_length
        idx_keep, _ = utils.random_token_mask(
            size=(anchor.shape[0], sequence_length), mask_ratio=work["mask_ratio"], device=device
        )
        anchors_out = [anchor_head(anchor_backbone(images=anchor, idx_keep=idx_keep))]
        if focal is not None:
            focal = torch.cat(list(focal.unbind(1)))
            anchors_out.append(anchor_head(anchor_backbone(images=focal)))
        return criterion(torch.cat(anchors_out), targets_out, prototypes.weight)

    def ema():
        utils.update_momentum(anchor_backbone, backbone, MOMENTUM)
        utils.update_momentum(anchor_head, head, MOMENTUM)

    return loss_fn, optimizer, ema


def build_inputs(work: dict, device):
    import torch

    batch, size, focal_size = work["batch_size"], work["image_size"], work["focal_size"]
    target = torch.randn(batch, 3, size, size, device=device)
    anchor = torch.randn(batch, 1, 3, size, size, device=device)
    focal = None
    if work["num_focal_views"]:
        focal = torch.randn(batch, work["num_focal_views"], 3, focal_size, focal_size, device=device)
    return target, anchor, focal


def make_step(built, inputs, device, precision):
    import torch

    loss_fn, optimizer, ema = built
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            loss = loss_fn(*inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def saved_activation_bytes(step) -> int:
    """Run one step, counting the bytes of the distinct storages autograd saves for the backward pass."""
    import torch

    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return sum(saved.values())


def run_one(args) -> list[dict]:
    """Build every implementation in this process and time their steps interleaved, so that load hits all alike."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    work = dict(WORKS[args.work])
    for name in ("backbone", "batch_size"):
        if getattr(args, name) is not None:
            work[name] = getattr(args, name)
    mask_strategy = "drop"
    if args.masking_setting:
        mask_strategy, ratio = args.masking_setting.split(",")
        work.update(mask_ratio=float(ratio), num_focal_views=0)
    inputs = build_inputs(work, device)
    steps, results = {}, {}
    for impl in args.impls.split(","):
        torch.manual_seed(0)
        if impl in ("msn_hf", "msn_hf_before"):
            built = build_msn_hf(work, device, mask_strategy, args.torch_compile, full_last_block=impl != "msn_hf")
        elif impl == "timm":
            built = build_timm(work, device)
        else:
            built = build_lightly(work, device)
        steps[impl] = make_step(built, inputs, device, args.precision)
        results[impl] = {"impl": impl, "times": []}
    for impl, step in steps.items():
        # Warm-up: the first step allocates optimiser state and, for compiled models, compiles.
        for _ in range(args.warmup):
            step()
        if args.torch_compile:
            # Saved-tensor hooks and the FLOP counter do not see inside compiled graphs: take them from an eager run.
            results[impl]["saved_activations_mib"] = None
            continue
        results[impl]["saved_activations_mib"] = saved_activation_bytes(step) / 2**20
        if args.flops:
            with FlopCounterMode(display=False) as counter:
                step()
            results[impl]["flops_per_step"] = counter.get_total_flops()
    for index in range(args.steps):
        order = list(steps) if index % 2 == 0 else list(reversed(steps))
        for impl in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            steps[impl]()
            results[impl]["times"].append(time.perf_counter() - start)
            if device.type == "cuda":
                results[impl]["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    for result in results.values():
        result["images_per_second"] = work["batch_size"] / statistics.median(result["times"])
    return list(results.values())


def subprocess_run(args, extra: list[str] = ()) -> list[dict]:
    command = [
        sys.executable, __file__, "--one", "--impls", args.impls, "--work", args.work, "--device", args.device,
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision, *extra,
    ]  # fmt: skip
    for name in ("backbone", "batch_size"):
        if getattr(args, name) is not None:
            command += [f"--{name}", str(getattr(args, name))]
    command += ["--flops"] if args.flops else []
    command += ["--torch_compile"] if args.torch_compile else []
    env = dict(os.environ)
    if "lightly" in args.impls and args.lightly_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), args.lightly_path]))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over steps of the speed ratio of two implementations timed back to back."""
    return statistics.median(b / t for t, b in zip(times, baseline))


def compare_impls(args) -> None:
    impls = args.impls.split(",")
    rounds = []
    for round_index in range(args.rounds):
        rounds.append({r["impl"]: r for r in subprocess_run(args)})
        print(f"round {round_index + 1}: {json.dumps(rounds[-1])}", file=sys.stderr)
    work = dict(WORKS[args.work])
    for name in ("backbone", "batch_size"):
        if getattr(args, name) is not None:
            work[name] = getattr(args, name)
    print(f"work={args.work} {work} precision={args.precision} device={args.device} steps={args.steps}")
    cuda = args.device.startswith("cuda")
    memory = " | CUDA max allocated (MiB)" if cuda else ""
    print(f"| impl | images/s per round | vs timm per round | vs lightly per round | saved activations (MiB){memory} |")
    print("|---|---|---|---|---|" + ("---|" if cuda else ""))
    for impl in impls:
        def ratios(baseline, impl=impl):
            if baseline not in impls:
                return "-"
            return ", ".join(f"{paired_ratio(r[impl]['times'], r[baseline]['times']):.2f}x" for r in rounds)

        speeds = ", ".join(f"{r[impl]['images_per_second']:.2f}" for r in rounds)
        line = f"| {impl} | {speeds} | {ratios('timm')} | {ratios('lightly')} | "
        saved = rounds[0][impl]["saved_activations_mib"]
        line += f"{saved:.0f} |" if saved is not None else "- |"
        if cuda:
            line += f" {rounds[0][impl]['cuda_max_allocated_mib']:.0f} |"
        print(line)
    for impl in impls:
        flops = rounds[0][impl].get("flops_per_step")
        if flops:
            line = f"{impl}: {flops / 1e9:.1f} GFLOP per step (FlopCounterMode)"
            if args.peak_tflops:
                achieved = [flops / statistics.median(r[impl]["times"]) for r in rounds]
                mfu = ", ".join(f"{a / 1e12:.0f} TFLOP/s = {100 * a / (args.peak_tflops * 1e12):.1f} %" for a in achieved)
                line += f"; per round {mfu} MFU of {args.peak_tflops:g} TFLOP/s peak"
            print(line)


def compare_masking(args) -> None:
    rows = []
    args.impls = "msn_hf"
    for strategy, ratio in MASKING_SETTINGS:
        rows.append(subprocess_run(args, ["--masking_setting", f"{strategy},{ratio}"])[0])
        rows[-1]["setting"] = f"{strategy if ratio > 0 else 'none'} ({ratio})"
    baseline = rows[1]["images_per_second"]
    print(f"| masking ({args.precision}) | images/s | speed vs mask_token |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['images_per_second']:.2f} | {r['images_per_second'] / baseline:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", choices=sorted(WORKS), default="pair")
    parser.add_argument("--impls", default="msn_hf,msn_hf_before,timm,lightly")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--backbone", help="override the work's timm model, e.g. vit_small_patch16_224")
    parser.add_argument("--batch_size", type=int, help="override the work's batch size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--flops", action="store_true", help="count the FLOPs of one extra step")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the msn_hf model")
    parser.add_argument("--peak_tflops", type=float, help="with --flops: print the MFU against this peak")
    parser.add_argument("--lightly_path", default=os.environ.get("LIGHTLY_PATH", "/work/lightly-pkgs"))
    parser.add_argument("--masking", action="store_true", help="compare masking strategies instead (issue 2)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--masking_setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
    elif args.masking:
        compare_masking(args)
    else:
        compare_impls(args)


if __name__ == "__main__":
    main()
