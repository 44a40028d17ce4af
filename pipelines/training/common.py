"""Shared training loop for the pack's three trainable models (train_diffharmony, train_refiner,
train_evaluator).

Hugging Face accelerate runs it on one GPU, several (``accelerate launch --multi_gpu ...``) or the CPU, with
optional fp16/bf16 mixed precision and gradient accumulation. AdamW, a diffusers LR schedule, gradient
clipping, an EMA of the trained weights (diffusers ``EMAModel``) and gradient checkpointing are options of
every command.

Output folder::

    <out>/checkpoint-<step>/model...        the model as the pack's loaders read it (EMA weights when EMA is on)
    <out>/checkpoint-<step>/training_state/ raw weights, EMA, optimizer (safetensors) + state.json, to resume
    <out>/final/...                         the model after the last step (EMA weights when EMA is on)
    <out>/train_log.csv                     step, loss, learning rate

Nothing is pickled: every tensor is written with safetensors, everything else as JSON. Existing folders are
never overwritten.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..core.errors import InputError, WeightsError
from ..ihd import dataset as ihd

MIXED_PRECISION = ("no", "fp16", "bf16")
STATE_DIR = "training_state"


class Task(Protocol):
    """What a trainer needs from a model-specific task."""

    model: nn.Module  # the trained module (its parameters with requires_grad are optimised)

    def setup(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Move frozen helpers (VAE, text encoder, generator model) to the device in ``weight_dtype``."""

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scalar loss of a batch; ``model`` is the (possibly distributed-wrapped) trained module. With a
        ``generator`` every random draw (noise, timesteps) comes from it."""

    def export(self, folder: Path, model: nn.Module) -> None:
        """Write ``model`` into the new folder ``folder`` in the layout the pack's loader reads."""

    def enable_gradient_checkpointing(self) -> None:
        ...


def make_accelerator(args):
    cpu = bool(getattr(args, "cpu", False)) or not torch.cuda.is_available()
    if cpu and args.mixed_precision == "fp16":
        raise InputError("fp16 mixed precision needs a GPU; use --mixed-precision bf16 (or no) on the CPU")
    return Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum, cpu=cpu)


def weight_dtype_of(accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# ------------------------------------------------------------------------------- optimizer state I/O
def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for key, v in rest.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": rest["param_groups"]}


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Copy a folder, hard-linking files where the file system allows (exports share frozen parts)."""
    def _copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=_copy)


def checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else None


def latest_checkpoint(out: Path) -> Path | None:
    found = [(checkpoint_step(p), p) for p in out.glob("checkpoint-*") if (p / STATE_DIR / "state.json").is_file()]
    found = [(s, p) for s, p in found if s is not None]
    return max(found)[1] if found else None


# --------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Optimizer, schedule, EMA, mixed precision, checkpoints and the loop around a ``Task``."""

    def __init__(self, task: Task, args: argparse.Namespace, accelerator=None):
        if args.max_steps < 1:
            raise InputError(f"--max-steps must be >= 1, got {args.max_steps}")
        self.task = task
        self.args = args
        self.acc = accelerator or make_accelerator(args)
        self.out = Path(args.out)
        self.weight_dtype = weight_dtype_of(self.acc)
        task.setup(self.acc.device, self.weight_dtype)
        model = task.model
        model.train()
        if args.gradient_checkpointing:
            task.enable_gradient_checkpointing()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InputError("the model has no trainable parameters")
        self.ema = None
        if args.ema_decay > 0:
            self.ema = EMAModel(self.params, decay=args.ema_decay)
            self.ema.to(self.acc.device)
        optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                      weight_decay=args.weight_decay, eps=args.adam_eps)
        # stepped here once per optimizer step (not prepared by accelerate, which would step it per process)
        self.scheduler = get_scheduler(args.lr_scheduler, optimizer, step_rules=args.lr_step_rules,
                                       num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.step_count = 0
        self.epoch = 0

    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def step(self, batch: dict, generator: torch.Generator | None = None) -> float:
        """One forward/backward (and, at the end of an accumulation window, one optimizer step)."""
        with self.acc.accumulate(self.model):
            with self.acc.autocast():
                loss = self.task.loss(self.model, batch, generator)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is {float(loss)} at step {self.step_count}: lower the learning "
                                         f"rate or use bf16/fp32")
            self.acc.backward(loss)
            if self.acc.sync_gradients and self.args.max_grad_norm > 0:
                self.acc.clip_grad_norm_(self.params, self.args.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.acc.sync_gradients:
            if not self.optimizer.step_was_skipped:
                self.scheduler.step()
            if self.ema is not None:
                self.ema.step(self.params)
            self.step_count += 1
        return float(loss.detach().float())

    # --------------------------------------------------------------------------------- save / load
    def export(self, folder: Path) -> Path:
        """The model (EMA weights when EMA is on) in the loader's layout; main process only."""
        if folder.exists():
            raise InputError(f"{folder} already exists; existing folders are never overwritten")
        model = self.unwrapped
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            self.task.export(folder, model)
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)
        return folder

    def save_checkpoint(self) -> Path | None:
        folder = self.out / f"checkpoint-{self.step_count}"
        self.acc.wait_for_everyone()
        if self.acc.is_main_process and not folder.exists():
            tmp = self.out / f".checkpoint-{self.step_count}.partial"
            if tmp.exists():
                shutil.rmtree(tmp)  # a previous attempt at this very step that died half-way
            tmp.mkdir(parents=True)
            self.export(tmp / "model")
            state = tmp / STATE_DIR
            state.mkdir()
            model_sd = {k: v.detach().cpu().contiguous() for k, v in self.unwrapped.state_dict().items()}
            save_file(model_sd, str(state / "model.safetensors"))
            opt_tensors, opt_rest = flatten_optimizer_state(self.optimizer.state_dict())
            save_file(opt_tensors, str(state / "optimizer.safetensors"))
            info = {"step": self.step_count, "epoch": self.epoch, "optimizer": opt_rest,
                    "scheduler": _jsonable(self.scheduler.state_dict()), "args": _jsonable(vars(self.args))}
            if self.ema is not None:
                ema_state = self.ema.state_dict()
                save_file({f"ema.{i}": p.detach().cpu().contiguous() for i, p in enumerate(ema_state["shadow_params"])},
                          str(state / "ema.safetensors"))
                info["ema"] = {k: v for k, v in ema_state.items() if k != "shadow_params"}
            if self.acc.scaler is not None:
                info["grad_scaler"] = _jsonable(self.acc.scaler.state_dict())
            (state / "state.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
            # the checkpoint appears whole or not at all
            os.replace(tmp, folder)
            self._prune()
        self.acc.wait_for_everyone()
        return folder

    def _prune(self) -> None:
        keep = int(getattr(self.args, "keep_checkpoints", 0) or 0)
        if keep <= 0:
            return
        ours = sorted((checkpoint_step(p), p) for p in self.out.glob("checkpoint-*") if checkpoint_step(p) is not None)
        for _, p in ours[:-keep]:
            shutil.rmtree(p)

    def load_checkpoint(self, folder: Path) -> None:
        state = folder / STATE_DIR
        if not (state / "state.json").is_file():
            raise WeightsError(f"{folder} is not a training checkpoint: {state / 'state.json'} is missing")
        info = json.loads((state / "state.json").read_text(encoding="utf-8"))
        model_sd = load_file(str(state / "model.safetensors"))
        self.unwrapped.load_state_dict(model_sd, strict=True)
        opt = unflatten_optimizer_state(load_file(str(state / "optimizer.safetensors")), info["optimizer"])
        self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(info["scheduler"])
        if self.ema is not None:
            if "ema" not in info:
                raise WeightsError(f"{folder} was trained without EMA; resume with --ema-decay 0")
            shadow = load_file(str(state / "ema.safetensors"))
            self.ema.load_state_dict({**info["ema"], "shadow_params": [shadow[f"ema.{i}"] for i in range(len(shadow))]})
            self.ema.to(self.acc.device)
        if self.acc.scaler is not None and "grad_scaler" in info:
            self.acc.scaler.load_state_dict(info["grad_scaler"])
        self.step_count = int(info["step"])
        self.epoch = int(info["epoch"])

    # ------------------------------------------------------------------------------------------ loop
    def fit(self, dataset, collate_fn=None) -> Path:
        """Train until ``max_steps``; returns the final model folder (written by the main process)."""

        args = self.args
        final = self.out / "final"
        if final.exists():
            raise InputError(f"{final} already exists: this run is finished (choose another --out)")
        self.out.mkdir(parents=True, exist_ok=True)
        if args.resume:
            folder = latest_checkpoint(self.out) if args.resume == "latest" else Path(args.resume)
            if folder is None:
                raise InputError(f"--resume latest: no checkpoint with a training state in {self.out}")
            self.load_checkpoint(folder)
        per_step = args.batch_size * self.acc.num_processes
        log_path = self.out / "train_log.csv"
        bar = tqdm(total=args.max_steps, initial=self.step_count, desc="training", unit="step",
                   disable=not self.acc.is_local_main_process, dynamic_ncols=True)
        window = []
        while self.step_count < args.max_steps:
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)  # new crops and flips every epoch
            # the order of an epoch depends on (seed, epoch) only, so a resumed run draws the same orders
            loader = self.acc.prepare(torch.utils.data.DataLoader(
                dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                collate_fn=collate_fn, drop_last=len(dataset) >= per_step,
                generator=torch.Generator().manual_seed(args.seed * 1000003 + self.epoch)))
            for batch in loader:
                before = self.step_count
                window.append(self.step(batch))
                if self.step_count == before:
                    continue  # inside an accumulation window
                bar.update(1)
                loss = float(sum(window) / len(window))
                window = []
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.acc.is_main_process and (self.step_count % max(args.log_every, 1) == 0
                                                 or self.step_count == args.max_steps):
                    _append_log(log_path, self.step_count, loss, self.scheduler.get_last_lr()[0])
                if args.save_every and self.step_count % args.save_every == 0 and self.step_count < args.max_steps:
                    self.save_checkpoint()
                if self.step_count >= args.max_steps:
                    break
            self.epoch += 1
        bar.close()
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.export(final)
        self.acc.wait_for_everyone()
        return final


def _append_log(path: Path, step: int, loss: float, lr: float) -> None:
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        if new:
            w.writerow(["step", "loss", "lr"])
        w.writerow([step, f"{loss:.6g}", f"{lr:.6g}"])


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def train(args, build, prepare=None) -> tuple[Path, bool]:
    """What a training command runs: build the task and dataset from ``args``, train, return the final model
    folder and whether this is the main process (the one that reports). ``prepare(task, accelerator)`` runs
    before training."""
    task, dataset = build(args)
    acc = make_accelerator(args)
    if prepare is not None:
        prepare(task, acc)
    final = Trainer(task, args, acc).fit(dataset, collate_fn=ihd.collate)
    return final, acc.is_main_process
