"""``blrdeploy heal``: a short distillation of a converted model back toward the dense model it came from.

A calibrated conversion fits each layer on its own; what is left is the error the layers make together. Healing
trains the BLR factors (and, if asked, the biases and norms) on text so that the converted model's outputs match
the dense model's: the mean per-token KL(dense || converted) of the next-token distributions for causal LMs, the
relative squared error of the last hidden states for encoders (on one document at a time, padding masked, as an
embedding model is used). Everything else stays frozen.

The student is the checkpoint loaded in float32 (the master weights the optimizer updates); on a GPU the forward
runs under bfloat16 autocast. The teacher is the source the checkpoint records (checked against its fingerprint),
in the student's compute dtype, without gradients. The text is cut into windows once, before any model loads; the
windows of step s are a function of (seed, s) alone, so a run resumed from its state file sees the batches an
uninterrupted run would, and ends with the same weights.

Nothing is written to the output until the last step is done: the checkpoint goes in atomically (an interrupted
heal leaves an existing checkpoint at the output as it was). Every ``save_every`` steps the trainable tensors,
the optimizer and the losses so far go to a state file beside the output (``OUT.heal-state.pt``), written
atomically; a later run with the same checkpoint, text and options resumes from it, and a finished run removes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint

from blrdeploy.conversion.calibration import calibration_windows, forward_kwargs, read_option_text
from blrdeploy.conversion.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    checkpoint_files,
    load,
    read_blr_config,
    save,
    verify,
)
from blrdeploy.conversion.pipeline import open_recorded_source
from blrdeploy.conversion.sequential import block_stack
from blrdeploy.files import atomic_file, check_output_dir
from blrdeploy.models.families import FAMILIES, token_inputs
from blrdeploy.models.outputs import agreement, main_output, model_output
from blrdeploy.models.sources import is_causal_lm, read_config
from blrdeploy.models.text import TextError, default_seq_len, load_tokenizer
from blrdeploy.structures.modules import BLRLinear

STATE_SUFFIX = ".heal-state.pt"
DEFAULT_STEPS = 200
# Relative peak learning rates (see tensor_scale) when --lr is not given, per structure of the layer a factor belongs
# to, from 30-step probes on real models (bench/NOTES.md, "Healing's learning rate"): BLAST's loss fell furthest at
# 1e-4 (3e-4 and 1e-3 did worse on SmolLM2-135M and all-MiniLM-L6-v2), low-rank's and Monarch's at 1e-3 (1e-4 is
# slow, 1e-2 made low-rank worse).
DEFAULT_LR = {"blast": 1e-4, "monarch": 1e-3, "lowrank": 1e-3}
OTHER_LR = 1e-4  # biases and norms (--train-norms)
DEFAULT_BATCH = 4  # windows per step
DEFAULT_SAVE_EVERY = 50
WARMUP = 0.05  # of the steps: the learning rate rises linearly, then follows a cosine down to FINAL_LR of it
FINAL_LR = 0.1
CLIP = 1.0  # gradient norm: one bad batch must not undo the conversion's fit

Progress = Callable[[dict], None]  # called after every step with {"step", "steps", "loss", "tokens_per_second"}


class HealError(ValueError):
    """Bad input to heal: one line for the user, nothing written."""


@dataclass(frozen=True)
class HealOptions:
    steps: int = DEFAULT_STEPS
    lr: float | None = None  # None: DEFAULT_LR by structure
    batch: int = DEFAULT_BATCH
    seq_len: int | None = None  # None: the model's context, at most MAX_SEQ_LEN
    tokens: int | None = None  # text read, in tokens; None: enough for every step to see new windows
    train_norms: bool = False  # also biases and normalization weights (else the BLR factors only)
    seed: int = 0
    save_every: int = DEFAULT_SAVE_EVERY
    checkpointing: bool = False  # each block's activations recomputed in the backward: less memory, ~1/3 more time
    stream_teacher: bool | None = None  # teacher's blocks in host memory, one at a time on the GPU; None: if needed

    def check(self) -> None:
        if self.steps <= 0:
            raise HealError(f"--steps must be at least 1, not {self.steps}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise HealError(f"--lr must be a positive number, not {self.lr}")
        if self.batch <= 0:
            raise HealError(f"--batch must be at least 1, not {self.batch}")
        if self.seq_len is not None and self.seq_len < 2:
            raise HealError(f"--seq-len must be at least 2, not {self.seq_len}")
        if self.tokens is not None and self.tokens <= 0:
            raise HealError(f"--tokens must be positive, not {self.tokens}")
        if self.save_every <= 0:
            raise HealError(f"--save-every must be at least 1, not {self.save_every}")


def state_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + STATE_SUFFIX)


# ------------------------------------------------------------------------------------------------ what trains


def trainable(model: nn.Module, train_norms: bool) -> dict[str, nn.Parameter]:
    """The parameters healing updates, by name: every BLR layer's factors; with ``train_norms`` also every bias
    and every normalization layer's weights. The rest (embeddings, heads, dense layers) is frozen."""
    chosen = {}
    for module_name, module in model.named_modules():
        is_blr = isinstance(module, BLRLinear)
        is_norm = "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            if (is_blr and name != "bias") or (train_norms and (name == "bias" or is_norm)):
                chosen[f"{module_name}.{name}" if module_name else name] = param
    return chosen


# ------------------------------------------------------------------------------------------------ the loss


LOSS_NAMES = {True: "KL(dense || converted), nats/token", False: "relative squared error of the hidden states"}
KL_CHUNK = 1024  # tokens per piece of the KL: its float32 softmaxes are recomputed in the backward, not kept


def distill_loss(
    student_out: torch.Tensor, teacher_out: torch.Tensor, causal: bool, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal LMs: mean over tokens of KL(teacher || student) of the next-token distributions, in nats, computed
    KL_CHUNK tokens at a time under activation checkpointing (at 4 x 2048 tokens of a 128k vocabulary each float32
    copy of the logits is 4 GB; only the logits themselves are kept). Encoders: ||h_s - h_t||² / ||h_t||² over the
    batch's last hidden states, at the positions ``mask`` (an attention mask) keeps. Both in float32."""
    if not causal:
        s, t = student_out.float(), teacher_out.float()
        if mask is not None:
            keep = mask.bool()
            s, t = s[keep], t[keep]
        return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-30)
    s, t = student_out.flatten(0, -2), teacher_out.flatten(0, -2)
    total = student_out.new_zeros((), dtype=torch.float32)
    for i in range(0, s.shape[0], KL_CHUNK):
        piece = (s[i : i + KL_CHUNK], t[i : i + KL_CHUNK])
        total = total + (checkpoint(_kl_sum, *piece, use_reentrant=False) if s.requires_grad else _kl_sum(*piece))
    return total / s.shape[0]


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum")


SCALE_FLOOR = 1e-3  # a tensor of zeros (a fresh bias) still moves


def tensor_scale(p: torch.Tensor) -> float:
    """A tensor's RMS: its learning rate is --lr times this, so --lr is a relative step. A factorization splits
    each layer's scale among its factors at will (BLAST's U, V near 0.02 and S near 20 on a real encoder): one
    absolute step size moves U by 0.5% per step and S by nothing, and a relative one treats them alike."""
    return max(p.detach().float().pow(2).mean().sqrt().item(), SCALE_FLOOR)


def schedule(step: int, steps: int) -> float:
    """The fraction of the peak rates at ``step``: a linear warm-up over WARMUP of the steps, then a cosine from 1
    down to FINAL_LR."""
    warm = max(1, round(WARMUP * steps))
    if step < warm:
        return (step + 1) / warm
    done = (step - warm) / max(1, steps - warm)
    return FINAL_LR + (1 - FINAL_LR) * 0.5 * (1 + math.cos(math.pi * done))


def batch_windows(step: int, count: int, batch: int, seed: int) -> torch.Tensor:
    """The window indices of ``step``: consecutive slices of a seeded permutation per pass over the windows, so
    they depend on (seed, step) alone, and a resumed run sees what an uninterrupted one would."""
    orders: dict[int, torch.Tensor] = {}  # one permutation per pass this step reaches (at most two)
    picks = []
    for k in range(step * batch, (step + 1) * batch):
        epoch, at = divmod(k, count)
        if epoch not in orders:
            orders[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        picks.append(orders[epoch][at])
    return torch.stack(picks)


def peak_rates(model: nn.Module, params: dict[str, nn.Parameter], lr: float | None) -> dict[str, float]:
    """Each trained tensor's peak relative rate: ``lr`` where given, else its layer structure's DEFAULT_LR
    (OTHER_LR for biases and norms)."""
    rates = {}
    for name in params:
        owner = model.get_submodule(name.rpartition(".")[0])
        structure = getattr(owner, "structure", None) if isinstance(owner, BLRLinear) else None
        rates[name] = lr if lr is not None else DEFAULT_LR.get(structure, OTHER_LR)
    return rates


def make_optimizer(params: dict[str, nn.Parameter], rates: dict[str, float]) -> torch.optim.AdamW:
    """AdamW, one group per tensor so each has its own peak rate (``rates``) times its scale (see
    tensor_scale); no weight decay (it would pull the factors toward zero, away from the fit)."""
    groups = [{"params": [p], "peak": rates[name] * tensor_scale(p)} for name, p in params.items()]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), weight_decay=0.0)


def train_step(
    student: nn.Module, teacher: nn.Module, ids: torch.Tensor, kwargs: dict, causal: bool,
    params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer, fraction: float, compute: torch.dtype,
    on_gpu: bool,
) -> tuple[float, float]:  # fmt: skip
    """One step of healing on the windows ``ids``: the teacher's outputs, the student's under autocast (on a GPU),
    the loss, its gradient clipped to CLIP, and the update at ``fraction`` of each tensor's peak rate. Returns
    (loss, gradient norm before clipping); a non-finite either way skips the update, and the caller stops. The
    benchmark of a heal step (bench/heal_step.py) times this function."""
    for group in optimizer.param_groups:
        group["lr"] = fraction * group["peak"]
    with torch.no_grad():
        target = main_output(teacher(input_ids=ids, **kwargs))
    with torch.autocast(device_type="cuda", dtype=compute, enabled=on_gpu):
        out = main_output(student(input_ids=ids, **kwargs))
    loss = distill_loss(out, target, causal, kwargs.get("attention_mask"))
    del out, target  # the logits are the largest tensors of a step: not kept alive into the next
    value = loss.item()
    if not math.isfinite(value):
        return value, float("nan")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    del loss
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), CLIP).item()
    if math.isfinite(norm):
        optimizer.step()
    return value, norm


# ------------------------------------------------------------------------------------------------ the text


def _text_windows(checkpoint: Path, config: dict, causal: bool, data: Path, options: HealOptions):
    """(text, windows, lengths). Causal LMs: non-overlapping windows of the token stream, lengths None (all full).
    Encoders: one document a window, wrapped in the tokenizer's special tokens ([CLS] ... [SEP]) and cut at
    --seq-len, as an embedding model is used and as ``eval`` measures it (one text a sample); rows padded, each
    window's length in ``lengths``. Windows of the joined stream taught the encoder the boundaries between
    documents instead: on all-MiniLM-L6-v2 400 steps of 8 x 512 streamed tokens healed less than 200 steps of
    4 x 128 (bench/NOTES.md, 2026-12-08)."""
    seq_len = options.seq_len or default_seq_len(config)
    tokens = options.tokens or options.steps * options.batch * seq_len
    if causal:
        text, windows = calibration_windows(
            checkpoint, config, data, seq_len, tokens, option="--data", tokens_option="--tokens"
        )
        return text, windows, None
    text = read_option_text(data, "--data")
    tokenizer = load_tokenizer(checkpoint, "--data")
    template = tokenizer("", verbose=False)["input_ids"]  # the special tokens alone, e.g. [CLS] [SEP]
    if seq_len <= len(template) + 1:
        raise HealError(f"--seq-len {seq_len} leaves no room beside the tokenizer's {len(template)} special tokens")
    wanted = options.steps * options.batch  # enough that every step sees new documents, unless --tokens says less
    rows, read = [], 0
    for doc in text.documents:
        ids = tokenizer(doc, truncation=True, max_length=seq_len, verbose=False)["input_ids"]
        if len(ids) <= len(template):
            continue  # nothing but special tokens: nothing to distill
        rows.append(ids)
        read += len(ids)
        if len(rows) >= wanted if options.tokens is None else read >= options.tokens:
            break
    if not rows:
        raise TextError(f"--data text {data} has no document the tokenizer turns into tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=pad)
    return text, windows, torch.tensor([len(r) for r in rows], dtype=torch.long)


def _tokens_seen(windows: torch.Tensor, lengths: torch.Tensor | None, options: HealOptions) -> int:
    """The tokens the run's steps read, padding not counted."""
    if lengths is None:
        return options.steps * options.batch * windows.shape[1]
    picks = (batch_windows(s, windows.shape[0], options.batch, options.seed) for s in range(options.steps))
    return sum(int(lengths[p].sum()) for p in picks)


def _batch(windows: torch.Tensor, lengths: torch.Tensor | None, picks: torch.Tensor, kwargs: dict, device):
    """(ids, forward kwargs, tokens) of the windows ``picks``: encoders' cut to their longest and masked past
    each one's length (the attention mask also tells the loss which positions count)."""
    if lengths is None:
        return windows[picks].to(device), kwargs, picks.numel() * windows.shape[1]
    n = lengths[picks]
    width = int(n.max())
    mask = (torch.arange(width)[None, :] < n[:, None]).long()
    return windows[picks, :width].to(device), {**kwargs, "attention_mask": mask.to(device)}, int(n.sum())


# ------------------------------------------------------------------------------------------------ the state file


def _state_key(
    checkpoint_sha: str, data_sha: str, options: HealOptions, windows: torch.Tensor, lengths, gpu: bool
) -> dict:
    """What a state file must match to be resumed: the same checkpoint, text, options, token windows (a changed
    tokenizer changes them) and compute (bfloat16 on a GPU, float32 on the CPU)."""
    memory_only = ("save_every", "checkpointing", "stream_teacher")  # change how, not what, a run computes
    resumable = {k: v for k, v in asdict(options).items() if k not in memory_only}
    return {"checkpoint_sha256": checkpoint_sha, "data_sha256": data_sha, "options": resumable,
            "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(), "shape": list(windows.shape),
            "lengths": None if lengths is None else hashlib.sha256(lengths.numpy().tobytes()).hexdigest(),
            "compute": "bfloat16 on a GPU" if gpu else "float32 on the CPU"}  # fmt: skip


def _load_state(path: Path, key: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say which, never guess
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        message = f"{path} is not a heal state this blrdeploy can read ({reason}): move it away to start over"
        raise HealError(message) from None
    if not isinstance(state, dict) or state.get("key") != key:
        raise HealError(
            f"{path} holds the state of a different heal (checkpoint, text or options differ): move it away to "
            "start over, or rerun with the options it was made with"
        )
    return state


def _save_state(path: Path, key: dict, step: int, params: dict, optimizer, losses: list[float]) -> None:
    state = {
        "key": key,
        "step": step,
        "params": {name: p.detach().cpu().clone() for name, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "losses": list(losses),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


# ------------------------------------------------------------------------------------------------ heal


def _text_sha256(text) -> str:
    """One digest for the text read: its files' names and sha256 (models.text), in their order."""
    return hashlib.sha256(json.dumps(text.files, sort_keys=True).encode()).hexdigest()


def heal(
    checkpoint: str | Path,
    data: str | Path,
    output: str | Path,
    options: HealOptions = HealOptions(),
    *,
    device: str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    on_plan: Callable[[dict], None] | None = None,
) -> dict:
    """Distill the converted ``checkpoint`` toward its dense source on the text at ``data``; write the healed
    checkpoint to ``output``. Returns the summary (losses, tokens, time, the plan). Every input is checked before
    any model loads; a HealError (or CheckpointError, TextError) says what is wrong in one line. ``on_plan`` gets
    the plan (:func:`plan`) before the models load, ``progress`` a line's worth after every step."""
    t0 = time.perf_counter()
    options.check()
    checkpoint, data, output = Path(checkpoint), Path(data), Path(output)
    cfg = read_blr_config(checkpoint)
    check_output_dir(output, overwrite, checkpoint_files, CHECKPOINT)
    config = read_config(checkpoint)
    src = cfg["source"]
    causal = _is_causal(src)
    text, windows, lengths = _text_windows(checkpoint, config, causal, data, options)
    verify(checkpoint)  # the weights are the ones written: healing a corrupt file would hide it
    on_gpu = torch.device(device).type == "cuda"
    compute = torch.bfloat16 if on_gpu else torch.float32
    key = _state_key(cfg["weights"]["sha256"], _text_sha256(text), options, windows, lengths, on_gpu)
    state_file = state_path(output)
    state = _load_state(state_file, key)

    the_plan = plan(cfg, config, windows, options, device, causal)
    names = [e["name"] for e in cfg["layers"]]
    the_plan["teacher"] = _teacher_placement(the_plan, device, options.stream_teacher, names)
    if on_plan is not None:
        on_plan({**the_plan, "resume_at_step": None if state is None else state["step"]})
    seed = (cfg.get("conversion") or {}).get("seed", 0)
    if on_gpu:  # the summary reports the run's measured peak beside the plan's estimate
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    try:
        # loaded in the compute dtype (not cast after): float32 buffers such as rotary frequencies stay float32
        source, _ = open_recorded_source(src, seed=seed, dtype=compute)
    except ValueError as exc:
        raise HealError(f"heal needs the dense model {checkpoint} was converted from: {exc}") from None
    teacher = source.model.eval().requires_grad_(False)
    if the_plan["teacher"] == STREAMED:
        _stream_blocks(teacher, names, torch.device(device))
    else:
        teacher.to(device)
    student = load(checkpoint, device=device, fuse_siblings=False)  # as stored: the healed checkpoint keeps each
    stored = {n: t.dtype for n, t in [*student.named_parameters(), *student.named_buffers()]}  # tensor's dtype
    student = student.float().requires_grad_(False)  # the float32 master weights
    if options.checkpointing:
        _checkpoint_blocks(student, names)
    params = trainable(student, options.train_norms)
    if not params:
        raise CheckpointError(f"{checkpoint} has no BLR layer to heal")
    for p in params.values():
        p.requires_grad_(True)
    rates = peak_rates(student, params, options.lr)
    optimizer = make_optimizer(params, rates)

    kwargs = forward_kwargs(student)
    # the same two windows before and after: a quick check
    probe, probe_kwargs, _ = _batch(windows, lengths, torch.arange(min(2, windows.shape[0])), kwargs, device)
    before = _agreement(student, teacher, probe, probe_kwargs, on_gpu, compute)  # the checkpoint's, resumed or not
    start, losses = 0, []
    if state is not None:
        with torch.no_grad():
            for name, value in state["params"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], list(state["losses"])

    diverged = (
        f"lower --lr (the last saved state, if any, is {state_file}: it holds this --lr's run, so move it away to "
        "start over); nothing else was written"
    )
    tick = time.perf_counter()
    for step in range(start, options.steps):
        picks = batch_windows(step, windows.shape[0], options.batch, options.seed)
        ids, step_kwargs, tokens = _batch(windows, lengths, picks, kwargs, device)
        fraction = schedule(step, options.steps)
        loss, norm = train_step(student, teacher, ids, step_kwargs, causal, params, optimizer, fraction, compute,
                                on_gpu)  # fmt: skip
        if not math.isfinite(loss):
            raise HealError(f"the distillation loss became {loss} at step {step + 1}: {diverged}")
        if not math.isfinite(norm):
            raise HealError(f"the gradient became {norm} at step {step + 1}: {diverged}")
        losses.append(loss)
        now = time.perf_counter()
        if progress is not None:
            progress({"step": step + 1, "steps": options.steps, "loss": losses[-1],
                      "tokens_per_second": tokens / max(now - tick, 1e-9)})  # fmt: skip
        tick = now
        if (step + 1) % options.save_every == 0 and step + 1 < options.steps:
            _save_state(state_file, key, step + 1, params, optimizer, losses)

    bad = next((name for name, p in params.items() if not torch.isfinite(p).all()), None)
    if bad is not None:  # the last update is checked too: a blown-up model is never written
        raise HealError(f"{bad} holds non-finite values after step {options.steps}: {diverged}")
    after = _agreement(student, teacher, probe, probe_kwargs, on_gpu, compute)
    if not all(math.isfinite(v) for v in after.values()):  # finite weights can still overflow the activations
        raise HealError(f"the healed model's outputs hold non-finite values after step {options.steps}: {diverged}")
    summary = dict(cfg.get("summary") or {})
    if summary.get("output_agreement") is not None:  # info shows it: the healed model's, on convert's inputs
        summary["output_agreement"] = _seeded_agreement(student, teacher, cfg, seed)
    _restore_dtypes(student, stored)
    record = {
        "from": str(checkpoint.resolve()),
        "from_sha256": cfg["weights"]["sha256"],
        "data": {"path": str(data.resolve()), "files": text.files, "documents": len(text.documents)},
        "options": asdict(options),
        "windows": list(windows.shape),
        "tokens_seen": _tokens_seen(windows, lengths, options),
        "trained": "BLR factors, biases and norms" if options.train_norms else "BLR factors",
        "trainable_params": sum(p.numel() for p in params.values()),
        "peak_lr": sorted(set(rates.values())),  # relative; per structure unless --lr was given
        "loss": {"first": losses[0], "last": losses[-1], "curve": _curve(losses), "of": LOSS_NAMES[causal]},
        "output_agreement": {"windows": probe.shape[0], "before": before, "after": after},
        "device": str(device),
        "teacher": the_plan["teacher"],
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(torch.device(device)) if on_gpu else None,
        "resumed_at_step": start or None,
    }
    extra = {k: v for k, v in cfg.items() if k not in ("format_version", "source", "dtypes", "layers", "tied",
             "non_persistent_buffers", "weights", "tool_versions", "created")}  # fmt: skip
    extra["summary"] = summary
    extra["healing"] = record
    save(student, output, source=src, extra=extra, overwrite=overwrite, tokenizer_from=checkpoint,
         layers=cfg["layers"])  # fmt: skip
    state_file.unlink(missing_ok=True)  # ours, and finished with: a later run must not resume a done heal
    return {**record, "plan": the_plan, "output": str(output), "losses": losses, "seconds": time.perf_counter() - t0,
            "tokens_per_second": record["tokens_seen"] / max(time.perf_counter() - t0, 1e-9)}  # fmt: skip


def _checkpoint_blocks(model: nn.Module, names: list[str]) -> None:
    """--checkpointing: each block of the stack holding the converted layers keeps only its inputs in the forward
    and runs again in the backward. Done here, not with transformers' switch, which acts only in train mode (the
    student stays in eval mode: no dropout, so a resumed run repeats an uninterrupted one)."""
    try:
        _, blocks, _ = block_stack(model, names)
    except ValueError:
        raise HealError("--checkpointing: the converted layers are not inside one stack of blocks") from None
    for block in blocks:

        def run(*args, _forward=block.forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = run


def _is_causal(src: dict) -> bool:
    """True for a causal LM (distilled on its next-token logits), False for a base text encoder (on its last hidden
    states); anything else is refused, so models.outputs.main_output is the logits of the one and the hidden states
    of the other (a task head's logits never stand in for an encoder's states)."""
    cls = src.get("class") or ""
    family = FAMILIES.get(src.get("family") or "")
    if src.get("library") == "transformers" and (family is None or family.tokens):
        if is_causal_lm(cls):
            return True
        if cls.endswith("Model"):  # BertModel, ...: the encoder alone, no task head
            return False
    raise HealError(
        f"heal distills causal LMs (next-token logits) and base text encoders such as BertModel (hidden states); "
        f"{cls or 'this model'} is neither"
    )


def _restore_dtypes(model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Each tensor back to the dtype it was stored in (a bfloat16 model with float32 rotary buffers stays so)."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            want = dtypes.get(name)
            if want is not None and t.is_floating_point() and t.dtype != want:
                t.data = t.data.to(want)


def _seeded_agreement(student, teacher, cfg: dict, seed: int) -> dict:
    """The agreement ``convert`` records (its summary, ``info``): outputs on the family's seeded inputs."""
    family = FAMILIES.get(cfg["source"].get("family") or "")
    inputs = family.sample(teacher, 2, seed) if family and family.sample else token_inputs(teacher, 2, seed)
    return agreement(model_output(student, inputs), model_output(teacher, inputs))


def _agreement(student, teacher, ids, kwargs, on_gpu, compute) -> dict:
    """Relative error and cosine of the student's output (logits or hidden states) against the teacher's on ``ids``."""
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=compute, enabled=on_gpu):
        out = main_output(student(input_ids=ids, **kwargs)).float().cpu()
        ref = main_output(teacher(input_ids=ids, **kwargs)).float().cpu()
    mask = kwargs.get("attention_mask")
    if mask is not None:  # padding's outputs are nobody's
        keep = mask.bool().cpu()
        out, ref = out[keep], ref[keep]
    return agreement(out, ref)


def _curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """(step, mean loss over the steps since the previous point) at about ``points`` points: a readable curve."""
    size = max(1, math.ceil(len(losses) / points))
    return [[min(i + size, len(losses)), sum(losses[i : i + size]) / len(losses[i : i + size])]
            for i in range(0, len(losses), size)]  # fmt: skip


def plan(cfg: dict, config: dict, windows: torch.Tensor, options: HealOptions, device: str, causal: bool) -> dict:
    """What the run will hold, from the checkpoint's own record before anything loads: the teacher in the compute
    dtype (bfloat16 on a GPU), the float32 student, a float32 gradient and AdamW's two float32 moments per trained
    parameter, and an estimate of the activations (:func:`activation_bytes`)."""
    summary = cfg.get("summary") or {}
    layers = cfg["layers"]
    factored = sum(e["params"] for e in layers)
    dense = sum(e["in_features"] * e["out_features"] for e in layers)
    before = summary.get("params_before")
    after = summary.get("params_after") or (None if before is None else before - dense + factored)
    compute_bytes = 2 if torch.device(device).type == "cuda" else 4
    out = {
        "teacher_params": before,
        "student_params": after,
        "trainable_params": factored,  # the factors; biases and norms (--train-norms) add a little
        "windows": windows.shape[0],
        "seq_len": windows.shape[1],
        "steps": options.steps,
        "batch": options.batch,
        "checkpointing": options.checkpointing,
        "device": str(device),
    }
    if before is not None and after is not None:
        out["bytes_weights_and_optimizer"] = before * compute_bytes + after * 4 + factored * 12
        out["bytes_teacher"] = before * compute_bytes
        out["bytes_teacher_streamed"] = _streamed_teacher_bytes(config, before) * compute_bytes
    tokens = options.batch * windows.shape[1]
    for name, ckpt in (("bytes_activations", options.checkpointing), ("bytes_activations_checkpointed", True)):
        out[name] = activation_bytes(config, tokens, causal, ckpt, compute_bytes, factored)
    return out


def _streamed_teacher_bytes(config: dict, params: int) -> int:
    """Parameters a streamed teacher keeps on the GPU: all but its blocks, plus two blocks (the one running, and
    a margin for the previous one's memory, freed only as the allocator reuses it); without the sizes in the config,
    a quarter of the teacher (a guess on the safe side)."""
    dims = _dims(config)
    if dims is None:
        return params // 4
    hidden, _, blocks, vocab = dims
    outside = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)  # untied unless it says so
    return min(params, outside + 2 * max(0, params - outside) // blocks)


def _dims(config: dict) -> tuple[int, int, int, int] | None:
    """(hidden, MLP width, blocks, vocabulary) under the names the transformers families use, or None."""
    hidden = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    blocks = config.get("num_hidden_layers") or config.get("n_layer")
    if not (hidden and blocks):
        return None
    width = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    return hidden, width, blocks, config.get("vocab_size") or 0


def activation_bytes(
    config: dict, tokens: int, causal: bool, checkpointing: bool, compute_bytes: int, trained: int
) -> int | None:  # fmt: skip
    """An estimate of what a step's backward needs besides the weights: per block and token, the inputs its matmuls
    keep in the compute dtype (8 x hidden + 4 x MLP width: projections, attention, gate, up, down) and its float32
    residual and norm inputs (4 x hidden); with --checkpointing only each block's float32 input plus one block's
    worth. A causal LM adds its logits (student, teacher and their gradient in the compute dtype) and one float32
    KL chunk's softmaxes; the autocast copy of the trained factors comes on top. bench/heal_step.py compares it with
    the measured peak. None when the config does not say the model's sizes."""
    dims = _dims(config)
    if dims is None:
        return None
    hidden, width, blocks, vocab = dims
    per_block = tokens * (compute_bytes * (8 * hidden + 4 * width) + 4 * 4 * hidden)
    kept = tokens * 4 * hidden * blocks + per_block if checkpointing else per_block * blocks
    if causal:
        head = 3 * tokens * vocab * compute_bytes + 4 * min(tokens, KL_CHUNK) * vocab * 4
    else:
        head = 3 * tokens * hidden * 4
    return kept + head + trained * compute_bytes


STREAMED = "streamed block by block from host memory"
RESIDENT = "on the device"


def _teacher_placement(the_plan: dict, device: str, stream: bool | None, names: list[str]) -> str:
    """Where the teacher runs: on the device, or (``stream``, or when teacher and student do not fit the GPU
    together) streamed block by block; a run that fits neither way is refused, before loading, with the numbers."""
    if torch.device(device).type != "cuda":
        return RESIDENT  # the host's memory is the user's to manage; --stream-teacher has nothing to save there
    held, acts = the_plan.get("bytes_weights_and_optimizer"), the_plan.get("bytes_activations") or 0
    if held is None:
        return _streamable(names) if stream else RESIDENT
    free, total = torch.cuda.mem_get_info(torch.device(device))
    streamed_need = held - the_plan["bytes_teacher"] + the_plan["bytes_teacher_streamed"] + acts
    chosen = stream if stream is not None else held + acts > free  # streamed only when it must be: it is slower
    need = streamed_need if chosen else held + acts
    if need <= free:
        return _streamable(names) if chosen else RESIDENT
    gib = 2**30
    hint = "a smaller model or a larger GPU"
    saved = the_plan.get("bytes_activations_checkpointed")
    if stream is False and streamed_need <= free:
        hint = "drop --teacher-on-device (a teacher streamed block by block fits)"
    elif need - acts <= free:
        hint = "lower --batch or --seq-len"
        if not the_plan.get("checkpointing") and saved is not None and need - acts + saved <= free:
            hint = f"add --checkpointing (activations about {saved / gib:.1f} GiB), or lower --batch or --seq-len"
    teacher = the_plan["bytes_teacher_streamed" if chosen else "bytes_teacher"]
    raise HealError(
        f"heal needs about {need / gib:.1f} GiB ({teacher / gib:.1f} GiB teacher{', streamed' if chosen else ''}, "
        f"{(need - acts - teacher) / gib:.1f} GiB student, gradients and optimizer, {acts / gib:.1f} GiB "
        f"activations, estimated); {device} has {free / gib:.1f} GiB free of {total / gib:.1f} GiB: {hint}"
    )


_BLOCK = re.compile(r"^(.+)\.(\d+)\.")


def _streamable(names: list[str]) -> str:
    """STREAMED, once the converted layers' names show one stack of numbered blocks (what _stream_blocks walks);
    said before anything loads."""
    prefixes = {m.group(1) if (m := _BLOCK.match(n)) else None for n in names}
    if len(prefixes) != 1 or None in prefixes:
        raise HealError("the teacher cannot be streamed: the converted layers are not inside one stack of blocks")
    return STREAMED


def _stream_blocks(teacher: nn.Module, names: list[str], device: torch.device) -> None:
    """The teacher's blocks stay in host memory (pinned, for the fastest copy) and each is copied to ``device`` in
    its forward pre-hook and dropped in its forward hook; everything else (embeddings, head, rotary tables) moves to
    ``device``. The GPU then holds one teacher block at a time, and every step pays a full copy of the blocks (not
    overlapped with compute: the copy is issued on the compute stream when the block is reached). The drop is safe
    before the block's kernels finish: the copy's memory returns to the caching allocator, which hands it only to
    work queued later on the same stream."""
    list_name, blocks, _ = block_stack(teacher, names)
    inside = list_name + "."
    pin = device.type == "cuda"
    with torch.no_grad():
        for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
            if not name.startswith(inside):
                t.data = t.data.to(device)
            elif pin:
                t.data = t.data.pin_memory()  # in place: the unpinned original is not kept beside it
    for block in blocks:
        tensors = [t for _, t in [*block.named_parameters(), *block.named_buffers()]]
        host = [t.data for t in tensors]

        def load(_module, _args, _tensors=tensors, _host=host):
            for t, h in zip(_tensors, _host, strict=True):
                t.data = h.to(device, non_blocking=True, copy=True)  # a copy even on the CPU: the tests see it

        def drop(_module, _args, _output, _tensors=tensors, _host=host):
            for t, h in zip(_tensors, _host, strict=True):
                t.data = h

        block.register_forward_pre_hook(load)
        block.register_forward_hook(drop)
