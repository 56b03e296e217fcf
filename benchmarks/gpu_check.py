"""Training-throughput check for a GPU machine: a few DDP steps of the paper-sized ITV model under bf16 autocast.

What runs: ``ulrl.model.build_model`` (the config defaults are the paper's: 2048-d space, video biGRU 1024 + CNN
2-5 × 512, word 500, text biGRU 512 + CNN 2-4 × 512) wrapped in DistributedDataParallel on one process (world
size 1; nccl on CUDA, gloo with ``--cpu``), Adam, grad-norm clip, and ``ulrl.losses.total_loss`` with the
antonym unlikelihood term. The input is one synthetic batch shaped like the paper's data: B pairs of T frames of
F-d features (lengths uniform in [T/2, T]) and L-token captions over V words, K concepts with P positives per
video, and a random symmetric contradiction matrix. Data loading is not part of the timed step.

Reported: seconds per step and samples/s; an analytic FLOP count per step (:func:`step_flops`) and the TFLOP/s
it implies; the TFLOP/s of one GEMM of the model's largest shape, both GRU directions' input projection
(B·T, F) @ (F, 6H), in the step's dtype on the same device, as the yardstick; peak memory; the parameter count
and the bytes DDP all-reduces per step. The FLOP model assumes what the defaults are: the multilevel text
encoder, local (not global) triplet negatives and the antonym negative-concept strategy.

    benchmarks/gpu_check.sh [--steps 20 --batch 128 ...]        # prints "no GPU" and exits 0 without CUDA
    python benchmarks/gpu_check.py --cpu --steps 2 --batch 8 model.video_rnn_size=32 ...   # same path, gloo
    python benchmarks/gpu_check.py --collate-only --frames 40    # CPU cost of the Ray Data collate per sample

Trailing ``key=value`` arguments override the model/loss config exactly as the jobs' command lines do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ulrl.config import (ConfigError, JobConfig, LossConfig, ModelConfig, apply_overrides,  # noqa: E402
                         parse_overrides)  # fmt: skip
from ulrl.losses import total_loss  # noqa: E402
from ulrl.model import ModelDims, build_model  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """Synthetic batch sizes (defaults: the paper's ITV set-up with a ~10k-concept bank)."""

    batch: int = 128
    frames: int = 64
    frame_dim: int = 4096
    clip_dim: int = 0
    words: int = 32
    vocab: int = 10000
    concepts: int = 10000
    positives: int = 20
    antonym_pairs: int = 1000

    def dims(self) -> ModelDims:
        return ModelDims(self.frame_dim, self.clip_dim, self.vocab, self.concepts, sentence_dim=0)


# ------------------------------------------------------------------------------------------- FLOP model


def sequence_flops(lengths: torch.Tensor, padded_len: int, input_dim: int, rnn_size: int,
                   kernel_sizes: list[int], num_filters: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one RecurrentConvLevels block on a batch.

    biGRU: 2 directions × 2·3H·(I + H) per valid step (packed sequences skip padding; an empty row runs one
    step). CNN: per kernel k, 2·(2H)·F_c·k per output position, T + k − 1 positions per row (full padding).
    """
    valid_steps = int(lengths.clamp_min(1).sum())
    gru = 2 * 2 * 3 * rnn_size * (input_dim + rnn_size) * valid_steps
    rows = lengths.shape[0]
    conv = sum(2 * 2 * rnn_size * num_filters * k * (padded_len + k - 1) * rows for k in kernel_sizes)
    return gru + conv


def model_flops(cfg: ModelConfig, dims: ModelDims, frame_lengths: torch.Tensor, frames: int,
                token_lengths: torch.Tensor, words: int) -> dict[str, int]:
    """Forward FLOPs of ``ITVModel.forward`` (multilevel text encoder), by part. Elementwise ops not counted."""
    rows, embed = frame_lengths.shape[0], cfg.embed_dim
    video_seq = 2 * cfg.video_rnn_size + len(cfg.video_kernel_sizes) * cfg.video_num_filters
    text_seq = 2 * cfg.text_rnn_size + len(cfg.text_kernel_sizes) * cfg.text_num_filters
    return {
        "video_levels": sequence_flops(frame_lengths, frames, dims.frame_dim, cfg.video_rnn_size,
                                       cfg.video_kernel_sizes, cfg.video_num_filters),
        "video_head": 2 * (video_seq + dims.frame_dim + dims.clip_dim) * embed * rows,
        "text_levels": sequence_flops(token_lengths, words, cfg.word_dim, cfg.text_rnn_size,
                                      cfg.text_kernel_sizes, cfg.text_num_filters),
        "text_head": 2 * (text_seq + dims.vocab_size) * embed * rows,  # the bag of words is a dense (B, V) input
        "decoder": 2 * 2 * embed * dims.num_concepts * rows,  # video and text embeddings
    }


def loss_flops(rows: int, embed_dim: int, num_concepts: int) -> dict[str, int]:
    """Forward FLOPs of ``total_loss`` with local negatives and the antonym strategy.

    triplet: (B, D) @ (D, B) both ways. unlikelihood: per side (B, K) @ (K, K) twice (pushed concepts, anchor
    count) — dense in K², and without a backward, as labels and the contradiction matrix are constants.
    """
    return {"triplet": 2 * 2 * rows * rows * embed_dim, "unlikelihood": 2 * 2 * 2 * rows * num_concepts ** 2}


def step_flops(model_part: dict[str, int], loss_part: dict[str, int]) -> int:
    """One training step ≈ 3 × forward (backward ≈ 2 × forward) for the model and triplet, 1 × for unlikelihood.

    The 3× slightly overcounts the first GRU layer, whose input (the frames) needs no gradient.
    """
    return 3 * (sum(model_part.values()) + loss_part["triplet"]) + loss_part["unlikelihood"]


def parameter_count(cfg: ModelConfig, dims: ModelDims) -> int:
    """Trainable parameters of ``build_model(cfg, dims)``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(cfg, dims)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------- synthetic data


def _lengths(rows: int, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(low, high + 1, (rows,), generator=generator)  # (B,)


def _left_aligned(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)


def synthetic_batch(shape: Shape, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A collated batch as docs/architecture.md defines it, on the CPU (seeded, so every device sees the same)."""
    frame_lengths = _lengths(shape.batch, max(1, shape.frames // 2), shape.frames, generator)
    token_lengths = _lengths(shape.batch, min(4, shape.words), shape.words, generator)
    scores = torch.rand(shape.batch, shape.concepts, generator=generator)  # (B, K)
    positives = scores.topk(min(shape.positives, shape.concepts), dim=1).indices  # (B, P)
    batch = {
        "frames": torch.randn(shape.batch, shape.frames, shape.frame_dim, generator=generator),  # (B, T, F)
        "frame_mask": _left_aligned(frame_lengths, shape.frames),  # (B, T)
        "tokens": torch.randint(2, shape.vocab, (shape.batch, shape.words), generator=generator),  # (B, L)
        "token_mask": _left_aligned(token_lengths, shape.words),  # (B, L)
        "concept_labels": torch.zeros(shape.batch, shape.concepts).scatter_(1, positives, 1.0),  # (B, K)
        "video_index": torch.arange(shape.batch),  # (B,) one caption per video: no shared positives
    }
    if shape.clip_dim > 0:
        batch["clip_features"] = torch.randn(shape.batch, shape.clip_dim, generator=generator)  # (B, C)
    return batch


def contradiction_matrix(shape: Shape, generator: torch.Generator) -> torch.Tensor:
    """(K, K) 0/1, symmetric, zero diagonal, with ``antonym_pairs`` random pairs."""
    first = torch.randint(0, shape.concepts, (shape.antonym_pairs,), generator=generator)
    second = torch.randint(0, shape.concepts, (shape.antonym_pairs,), generator=generator)
    matrix = torch.zeros(shape.concepts, shape.concepts)
    matrix[first, second] = 1.0
    matrix[second, first] = 1.0
    return matrix.fill_diagonal_(0.0)


def arrow_videos(shape: Shape, generator: torch.Generator, captions_per_video: int = 2):
    """The same synthetic videos as rows of the store's ``videos`` table (float16 frames), for the collate."""
    import numpy as np
    import pyarrow as pa

    frame_lengths = _lengths(shape.batch, max(1, shape.frames // 2), shape.frames, generator).numpy()
    token_lengths = _lengths(shape.batch * captions_per_video, min(4, shape.words), shape.words, generator).numpy()
    frames = torch.randn(int(frame_lengths.sum()) * shape.frame_dim, generator=generator).half().numpy()
    tokens = torch.randint(2, shape.vocab, (int(token_lengths.sum()),), generator=generator, dtype=torch.int32)
    concepts = torch.rand(shape.batch, shape.concepts, generator=generator).topk(shape.positives, dim=1).indices

    def offsets(lengths) -> pa.Array:
        return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    frame_rows = pa.FixedSizeListArray.from_arrays(pa.array(frames), shape.frame_dim)  # (Σ T_b, F)
    captions = pa.ListArray.from_arrays(offsets(token_lengths), pa.array(tokens.numpy()))
    return pa.table({
        "video_index": pa.array(np.arange(shape.batch, dtype=np.int64)),
        "frames": pa.ListArray.from_arrays(offsets(frame_lengths), frame_rows),
        "caption_token_ids": pa.ListArray.from_arrays(offsets([captions_per_video] * shape.batch), captions),
        "concept_ids": pa.ListArray.from_arrays(offsets([shape.positives] * shape.batch),
                                                pa.array(concepts.flatten().int().numpy())),
    })


def collate_rate(shape: Shape, seed: int, min_seconds: float = 1.0) -> dict:
    """Samples/s of the training collate (``ulrl.data.TrainCollate``: Arrow rows → padded float32 tensors)."""
    from ulrl.data import TrainCollate

    table = arrow_videos(shape, torch.Generator().manual_seed(seed))
    collate = TrainCollate(0, seed, shape.frames, shape.words, shape.concepts, shape.frame_dim)
    collate(table)  # warm-up
    wall, cpu, runs = time.perf_counter(), time.process_time(), 0
    while runs < 2 or time.perf_counter() - wall < min_seconds:
        collate(table)
        runs += 1
    return {"collate_samples_per_second": runs * shape.batch / (time.perf_counter() - wall),
            "collate_samples_per_cpu_second": runs * shape.batch / (time.process_time() - cpu)}


# ------------------------------------------------------------------------------------------- measurement


def gemm_tflops(rows: int, inner: int, cols: int, dtype: torch.dtype, device: torch.device,
                min_seconds: float = 0.5) -> float:
    """TFLOP/s of (rows, inner) @ (inner, cols) in ``dtype``, repeated until ``min_seconds`` have passed."""
    left = torch.randn(rows, inner, device=device).to(dtype)
    right = torch.randn(inner, cols, device=device).to(dtype)
    left @ right  # warm-up: kernel selection, allocator
    _sync(device)
    start, runs = time.perf_counter(), 0
    while runs < 2 or time.perf_counter() - start < min_seconds:
        left @ right
        runs += 1
        _sync(device)
    return 2 * rows * inner * cols * runs / (time.perf_counter() - start) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_single_process(backend: str, workdir: str) -> None:
    """World size 1 through a file store: no TCP listener; gloo is kept on loopback."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"file://{workdir}/pg-store", rank=0, world_size=1)


def train_steps(model, optimizer, batch, contradiction, loss_cfg: LossConfig, steps: int, warmup: int,
                bf16: bool, grad_clip: float) -> tuple[float, torch.Tensor]:
    """Run ``warmup`` then ``steps`` timed optimizer steps; returns (seconds per timed step, last loss)."""
    device = contradiction.device
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(batch)
            loss = total_loss(out, batch, contradiction, loss_cfg)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / steps, loss.detach()


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Shape()
    for name in Shape.__dataclass_fields__:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN/NCCL set-up)")
    parser.add_argument("--cpu", action="store_true", help="run the same path on the CPU with gloo")
    parser.add_argument("--collate-only", action="store_true",
                        help="only time the Ray Data collate of these batches on the CPU (needs ray, pyarrow)")
    parser.add_argument("--no-bf16", action="store_true",
                        help="fp32 on the GPU, like train.bf16=false (bf16 is never used on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="model./loss./train. key=value config overrides")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 2 or not 0 < args.positives <= args.concepts:
        parser.error("need --steps >= 1, --warmup >= 0, --batch >= 2 and 0 < --positives <= --concepts")
    args.shape = Shape(**{name: getattr(args, name) for name in Shape.__dataclass_fields__})
    try:
        args.config = apply_overrides(JobConfig(), parse_overrides(args.overrides))
    except ConfigError as err:
        parser.error(str(err))
    return args


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Build, run and time; every number of the report."""
    shape, cfg = args.shape, args.config
    bf16 = device.type == "cuda" and cfg.train.bf16 and not args.no_bf16
    generator = torch.Generator().manual_seed(args.seed)
    batch = {k: v.to(device) for k, v in synthetic_batch(shape, generator).items()}
    contradiction = contradiction_matrix(shape, generator).to(device)
    torch.manual_seed(args.seed)
    model = build_model(cfg.model, shape.dims()).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=cfg.train.lr)
    seconds, loss = train_steps(ddp, optimizer, batch, contradiction, cfg.loss, args.steps, args.warmup,
                                bf16, cfg.train.grad_clip)
    lengths = batch["frame_mask"].sum(1).cpu(), batch["token_mask"].sum(1).cpu()
    model_part = model_flops(cfg.model, shape.dims(), lengths[0], shape.frames, lengths[1], shape.words)
    loss_part = loss_flops(shape.batch, cfg.model.embed_dim, shape.concepts)
    flops = step_flops(model_part, loss_part)
    gemm_dtype = torch.bfloat16 if bf16 else torch.float32
    gemm = gemm_tflops(shape.batch * shape.frames, shape.frame_dim, 6 * cfg.model.video_rnn_size, gemm_dtype,
                       device)
    params = sum(p.numel() for p in model.parameters())
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "backend": dist.get_backend(), "bf16": bf16,
        "shape": dataclasses.asdict(shape),
        "parameters": params, "allreduce_bytes_fp32": 4 * params,
        "seconds_per_step": seconds, "samples_per_second": shape.batch / seconds,
        "model_forward_flops": model_part, "loss_forward_flops": loss_part, "step_flops": flops,
        "achieved_tflops": flops / seconds / 1e12, "gemm_dtype": str(gemm_dtype).removeprefix("torch."),
        "gemm_tflops": gemm, "peak_memory_gib": _peak_memory_gib(device), "loss": float(loss),
        "steps": args.steps, "warmup": args.warmup, "cpu_threads": torch.get_num_threads(),
    }


def report(result: dict) -> str:
    """Human-readable lines of a :func:`measure` result."""
    shape, model_fwd = result["shape"], sum(result["model_forward_flops"].values())
    return "\n".join([
        f"device: {result['device']} (torch {result['torch']}), backend {result['backend']}, world size 1, "
        f"bf16 autocast {'on' if result['bf16'] else 'off'}, {result['cpu_threads']} CPU threads",
        "shape: " + " ".join(f"{k}={v}" for k, v in shape.items()),
        f"model: {result['parameters']:,} parameters; DDP all-reduces {result['allreduce_bytes_fp32'] / 1e6:.1f} MB "
        "of fp32 gradients per step",
        f"step: {result['seconds_per_step']:.4f} s over {result['steps']} timed steps "
        f"-> {result['samples_per_second']:.1f} samples/s",
        f"flops: {result['step_flops'] / 1e12:.3f} TFLOP per step (model forward {model_fwd / 1e12:.3f}, "
        f"unlikelihood {result['loss_forward_flops']['unlikelihood'] / 1e12:.3f}) "
        f"-> {result['achieved_tflops']:.2f} TFLOP/s",
        f"gemm: {result['gemm_dtype']} ({shape['batch'] * shape['frames']}x{shape['frame_dim']})@"
        f"({shape['frame_dim']}x6H) -> {result['gemm_tflops']:.2f} TFLOP/s; "
        f"the step reaches {100 * result['achieved_tflops'] / result['gemm_tflops']:.1f} % of it",
        f"memory: peak {result['peak_memory_gib']:.2f} GiB",
        f"loss: {result['loss']:.4f}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.collate_only:
        rates = collate_rate(args.shape, args.seed)
        print(f"collate: {rates['collate_samples_per_second']:.1f} samples/s "
              f"({rates['collate_samples_per_cpu_second']:.1f} per CPU-second, {torch.get_num_threads()} threads)")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print(f"no GPU: torch {torch.__version__} sees no CUDA device; nothing measured (--cpu runs the same path)")
        return 0
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory() as workdir:
        init_single_process("gloo" if args.cpu else "nccl", workdir)
        try:
            result = measure(args, device)
        finally:
            dist.destroy_process_group()
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not math.isfinite(result["loss"]):
        print("error: the loss is not finite")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
