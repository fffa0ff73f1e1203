"""Quality of converted models on real text (issue #21): dense vs structure x ratio x method, through the CLI only.

Each cell runs `blrdeploy convert` then `blrdeploy eval` as subprocesses (so it measures what a user gets and does not
depend on internal APIs), and records both commands, their JSON, timings, the commit and the machine load. Cells
already in the output JSON are skipped, so an interrupted run resumes; the JSON is rewritten atomically after every
cell. At the end (or with --table-only) it prints one row per structure x ratio x method.

Methods: weight-only (fit the weights), calibrated (--calibration: fit the layer outputs on the calibration text),
allocation (calibrated + --allocation sensitivity; skipped, not recorded, while `convert --help` has no --allocation),
sequential (calibrated + --sequential: block by block on the converted model's own inputs), sequential+allocation;
METHOD+healed (METHOD's checkpoint, then `blrdeploy heal` on the calibration text, then eval of the healed one).

Example (the causal LM, 8 cells):
    python bench/quality.py --model /work/data/lm --structures lowrank,monarch --ratios 0.8,0.5 \
        --methods weight-only,calibrated --calibration-tokens 16384 --eval-tokens 16384 \
        --out bench/results/quality_smollm2-135m.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = (
    "weight-only",
    "calibrated",
    "allocation",
    "sequential",
    "sequential+allocation",
    "allocation+healed",
    "sequential+allocation+healed",
)
HEALED = "+healed"  # a method ending so converts as the method before it, then runs `blrdeploy heal` on the result


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def commit() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    status = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True)
    c = head.stdout.strip() or os.environ.get("BLRDEPLOY_COMMIT", "unknown")  # a copy without .git (the GPU machine)
    return c + ("-dirty" if status.stdout.strip() else "")


def tree_diff() -> str | None:
    """sha256 (first 12) of `git diff HEAD` of the tracked files: tells two dirty trees apart (read-only git)."""
    out = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD"], capture_output=True)
    return hashlib.sha256(out.stdout).hexdigest()[:12] if out.stdout else None


def machine() -> dict:
    return {"nproc": os.cpu_count(), "loadavg": list(os.getloadavg()), "host": os.uname().nodename}


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def has_allocation(cli: list[str]) -> bool:
    out = subprocess.run(
        [*cli, "convert", "--help"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}
    )
    return "--allocation" in out.stdout


def run(cmd: list[str], log: Path, timeout: float | None) -> tuple[int | None, str, float]:
    """Runs cmd in its own process group; stdout returned, stderr to log. rc None: killed at the timeout."""
    t0 = time.perf_counter()
    with open(log, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
            return None, "", time.perf_counter() - t0
        except BaseException:
            os.killpg(p.pid, signal.SIGTERM)
            raise
    return p.returncode, out, time.perf_counter() - t0


def tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def cell_key(structure: str, ratio: float, method: str) -> str:
    return f"{structure}/{ratio:g}/{method}"


def convert_cmd(a, structure: str, ratio: float, method: str, out_dir: Path, steps: int | None) -> list[str]:
    method = method.removesuffix(HEALED)
    cmd = [*a.cli, "convert", a.model, "-o", str(out_dir), "--structure", structure, "--params-ratio", f"{ratio:g}",
           "--device", a.device, "--overwrite", "--json"]  # fmt: skip
    if method != "weight-only":
        cmd += ["--calibration", a.calibration, "--calibration-tokens", str(a.calibration_tokens),
                "--seq-len", str(a.seq_len)]  # fmt: skip
    if a.allocation_flag:  # explicit: convert's default (auto) is sensitivity whenever --calibration is given
        cmd += ["--allocation", "sensitivity" if method.endswith("allocation") else "uniform"]
    if method.startswith("sequential"):
        cmd += ["--sequential"]
    if steps is not None and structure == "blast":
        cmd += ["--steps", str(steps)]
    for pattern in a.include or ():
        cmd += ["--include", pattern]
    return cmd


def heal_cmd(a, ckpt: Path, out_dir: Path) -> list[str]:
    lr = [] if a.heal_lr is None else ["--lr", f"{a.heal_lr:g}"]  # None: heal's default by structure
    return [*a.cli, "heal", str(ckpt), "--data", a.calibration, "-o", str(out_dir), "--steps", str(a.heal_steps),
            *lr, "--batch", str(a.heal_batch), "--seq-len", str(a.seq_len),
            "--device", a.device, "--overwrite", "--json"]  # fmt: skip


def summarize_heal(h: dict) -> dict:
    keep = ("loss", "tokens_seen", "trainable_params", "trained", "options", "seconds", "tokens_per_second", "plan")
    return {k: h[k] for k in keep if k in h}


def eval_cmd(a, ckpt: Path) -> list[str]:
    return [*a.cli, "eval", str(ckpt), "--data", a.eval_data, "--seq-len", str(a.seq_len),
            "--max-tokens", str(a.eval_tokens), "--device", a.device, "--json"]  # fmt: skip


def summarize_convert(s: dict) -> dict:
    layers = s.get("layers") or []
    out_err = [e["output_relative_error"] for e in layers if e.get("output_relative_error") is not None]
    keep = ("params_before", "params_after", "compression", "layers_converted", "worst_relative_error",
            "mean_relative_error", "worst_output_relative_error", "mean_output_relative_error", "output_agreement",
            "calibration", "seconds", "peak_host_memory_gib", "skipped", "allocation")  # fmt: skip
    d = {k: s[k] for k in keep if k in s}
    if isinstance(d.get("allocation"), dict) and isinstance(d["allocation"].get("shared_rank"), list):
        d["allocation"] = {**d["allocation"], "shared_rank": f"{len(d['allocation']['shared_rank'])} groups"}
    if "mean_output_relative_error" not in d and out_err:
        d["mean_output_relative_error"] = sum(out_err) / len(out_err)
    d["layers"] = [
        {
            k: e.get(k)
            for k in (
                "name",
                "num_blocks",
                "rank",
                "params",
                "dense_params",
                "relative_error",
                "output_relative_error",
                "seconds",
            )
        }  # fmt: skip
        for e in layers
    ]
    return d


def summarize_eval(e: dict) -> dict:
    cols = {c["name"]: c for c in e.get("columns", [])}
    dense, conv = cols.get("dense") or {}, cols.get("converted") or {}
    d = {k: e.get(k) for k in ("kind", "windows", "tokens", "seq_len", "documents", "seconds", "notes")}
    d["dense"] = {k: v for k, v in dense.items() if v is not None}
    d["converted"] = {k: v for k, v in conv.items() if v is not None}
    if dense.get("perplexity") and conv.get("perplexity"):
        d["ppl_ratio"] = conv["perplexity"] / dense["perplexity"]
    return d


def run_cell(a, structure: str, ratio: float, method: str) -> dict:
    key = cell_key(structure, ratio, method)
    name = key.replace("/", "_")
    ckpt = Path(a.work) / name
    logs = Path(a.work) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cell = {"structure": structure, "ratio": ratio, "method": method, "commit": commit(), "tree_diff": tree_diff(),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "attempts": []}  # fmt: skip
    steps = a.steps
    # a finished convert's JSON: a rerun (the next device call) reuses its checkpoint, when the command and the
    # tree that made it are this run's (the --work folder is shared between runs of other models and options)
    done = logs / f"{name}.convert.json"
    made_by = {"command": shlex.join(convert_cmd(a, structure, ratio, method, ckpt, steps)), "commit": cell["commit"],
               "tree_diff": cell["tree_diff"]}  # fmt: skip
    if done.is_file() and (ckpt / "blr_config.json").is_file():
        saved = json.loads(done.read_text())
        if saved.get("made_by") == made_by:
            cell.update(saved["cell"])
            cell["convert_reused"] = True
            print(f"[{key}] convert: reusing {ckpt}", flush=True)
            return _after_convert(a, cell, key, name, ckpt, saved["output"], logs)
    done.unlink(missing_ok=True)
    (logs / f"{name}.eval_before.json").unlink(missing_ok=True)  # of an older checkpoint
    while True:
        cmd = convert_cmd(a, structure, ratio, method, ckpt, steps)
        print(f"[{key}] convert: {shlex.join(cmd)}", flush=True)
        log = logs / f"{name}.convert{'' if steps is None else f'.steps{steps}'}.log"
        timeout = a.convert_timeout if structure == "blast" and a.fallback_steps and steps != a.fallback_steps else None
        rc, out, secs = run(cmd, log, timeout)
        attempt = {"command": shlex.join(cmd), "steps": steps, "rc": rc, "wall_seconds": round(secs, 1)}
        cell["attempts"].append(attempt)
        if rc is None:
            attempt["note"] = f"stopped after {a.convert_timeout:.0f} s; rerun with --steps {a.fallback_steps}"
            print(f"[{key}] {attempt['note']}", flush=True)
            steps = a.fallback_steps
            continue
        break
    cell["convert_command"] = attempt["command"]
    cell["steps"] = steps if structure == "blast" else None
    if structure == "blast" and steps is None:
        cell["steps"] = "default (300)"
    cell["convert_wall_seconds"] = round(secs, 1)
    if rc != 0:
        cell["error"] = f"convert exit {rc}: {tail(log)}"
        return cell
    try:
        output = json.loads(out)
    except json.JSONDecodeError:
        cell["error"] = f"convert JSON unreadable: {out[-500:]} {tail(log)}"
        return cell
    if method.endswith(HEALED):  # only a cell with steps after the convert can be cut off after it
        kept = {k: cell[k] for k in ("attempts", "convert_command", "steps", "convert_wall_seconds")}
        write_atomic(done, {"made_by": made_by, "cell": kept, "output": output})
    return _after_convert(a, cell, key, name, ckpt, output, logs)


def _after_convert(a, cell: dict, key: str, name: str, ckpt: Path, output: dict, logs: Path) -> dict:
    """A cell's steps after its convert: heal (the +healed methods, after an eval of the unhealed checkpoint with
    --eval-before), then eval."""
    method = cell["method"]
    cell["convert"] = summarize_convert(output)
    effective = effective_allocation(cell)
    base = cell["method"].removesuffix(HEALED)
    if expected_method(base, effective) != base:
        cell["warning"] = f"convert used allocation {effective!r}, not what method {method!r} means"
    if method.endswith(HEALED):
        if a.eval_before:
            before, command = logs / f"{name}.eval_before.json", shlex.join(eval_cmd(a, ckpt))
            saved = json.loads(before.read_text()) if before.is_file() else {}
            if saved.get("command") == command:
                cell["eval_before"] = saved["eval"]
            else:
                summary = run_step(cell, key, "eval_before", eval_cmd(a, ckpt), logs / f"{name}.eval_before.log")
                if summary is None:
                    return cell
                cell["eval_before"] = summarize_eval(summary)
                write_atomic(before, {"command": command, "eval": cell["eval_before"]})
        healed = Path(a.work) / f"{name}_healed"
        summary = run_step(cell, key, "heal", heal_cmd(a, ckpt, healed), logs / f"{name}.heal.log")
        if summary is None:
            return cell
        cell["heal"] = summarize_heal(summary)
        if not a.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)
        ckpt = healed
    cell["machine_eval"] = machine()
    summary = run_step(cell, key, "eval", eval_cmd(a, ckpt), logs / f"{name}.eval.log")
    if summary is None:
        return cell
    cell["eval"] = summarize_eval(summary)
    if not a.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    return cell


def run_step(cell: dict, key: str, what: str, cmd: list[str], log: Path) -> dict | None:
    """One CLI step of a cell (heal, eval) with --json: its command and wall time go into ``cell``; its parsed JSON
    is returned, or None with ``cell["error"]`` set."""
    print(f"[{key}] {what}: {shlex.join(cmd)}", flush=True)
    cell[f"{what}_command"] = shlex.join(cmd)
    rc, out, secs = run(cmd, log, None)
    cell[f"{what}_wall_seconds"] = round(secs, 1)
    if rc != 0:
        cell["error"] = f"{what} exit {rc}: {tail(log)}"
        return None
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        cell["error"] = f"{what} JSON unreadable: {out[-500:]} {tail(log)}"
        return None


def effective_allocation(cell: dict) -> str:
    """The allocation convert reports having used; 'uniform' for a convert from before --allocation existed."""
    alloc = (cell.get("convert") or {}).get("allocation")
    return alloc.get("method", "?") if isinstance(alloc, dict) else "uniform (no --allocation yet)"


def expected_method(method: str, effective: str) -> str:
    """Which method a cell really measured, from the allocation its convert reports."""
    if method in ("weight-only", "allocation-unweighted"):
        return method
    if method.startswith("sequential"):
        return "sequential+allocation" if effective == "sensitivity" else "sequential"
    return "allocation" if effective == "sensitivity" else "calibrated"


def reconcile(results: dict) -> None:
    """Files a cell under the method it really measured. Before --allocation was passed explicitly, 'calibrated'
    cells ran with convert's default --allocation auto, which is sensitivity when --calibration is given."""
    cells = results["cells"]
    for key, c in list(cells.items()):
        if c.get("error") or c["method"].endswith(HEALED):  # healed cells always passed --allocation
            continue
        eff = effective_allocation(c)
        real = expected_method(c["method"], eff)
        if real == c["method"]:
            continue
        new_key = cell_key(c["structure"], c["ratio"], real)
        del cells[key]
        c = {**c, "method": real, "filed_from": key,
             "note": f"ran as {c['method']!r} without an --allocation flag; convert reported allocation {eff!r} "
                     f"(its default auto = sensitivity with --calibration), so it measures {real!r}"}  # fmt: skip
        if new_key in cells:
            results.setdefault("superseded", []).append(c)
        else:
            cells[new_key] = c
            print(f"[{key}] filed as {new_key}: convert reported allocation {eff!r}", flush=True)


def fmt(v, f: str) -> str:
    return "—" if v is None else f.format(v)


def fmt_big(v, f: str, suffix: str = "") -> str:
    """f below 10,000, else 3 significant digits in e notation (perplexities of broken models)."""
    return "—" if v is None else (f.format(v) if abs(v) < 1e4 else f"{v:.2e}") + suffix


def table(results: dict) -> str:
    cells = results.get("cells", {})
    order = {m: i for i, m in enumerate(METHODS)}
    sstruct = {"lowrank": 0, "monarch": 1, "blast": 2}
    keys = sorted(cells, key=lambda k: (sstruct.get(cells[k]["structure"], 9), -cells[k]["ratio"],
                                        order.get(cells[k]["method"], 9)))  # fmt: skip
    enc = any((cells[k].get("eval") or {}).get("kind") == "encoder" for k in keys)
    if enc:
        head = ["structure", "ratio", "method", "alloc", "steps", "params after", "cos mean", "cos min", "convert s",
                "heal s", "eval s", "out err mean", "w err mean"]  # fmt: skip
    else:
        head = ["structure", "ratio", "method", "alloc", "steps", "params after", "ppl dense", "ppl conv", "x dense",
                "top-1 agr", "KL nats/tok", "convert s", "heal s", "eval s", "out err mean", "w err mean"]  # fmt: skip
    rows = []
    for k in keys:
        c = cells[k]
        cv, ev = c.get("convert") or {}, c.get("eval") or {}
        d, v = ev.get("dense") or {}, ev.get("converted") or {}
        steps = str(c.get("steps") or "—") if c["structure"] == "blast" else "—"
        method, eb = c["method"], c.get("eval_before") or {}
        if eb.get("ppl_ratio") is not None:  # a healed cell measured before healing too
            method += f" (from {fmt_big(eb['ppl_ratio'], '{:,.2f}', 'x')})"
        elif (eb.get("converted") or {}).get("cosine_mean") is not None:
            method += f" (from cos {eb['converted']['cosine_mean']:.4f})"
        base = [c["structure"], f"{c['ratio']:g}", method, effective_allocation(c).split(" ")[0], steps,
                fmt(cv.get("params_after"), "{:,}")]  # fmt: skip
        tail_ = [
            fmt(cv.get("seconds"), "{:.0f}"),
            fmt((c.get("heal") or {}).get("seconds"), "{:.0f}"),
            fmt(ev.get("seconds"), "{:.0f}"),
            fmt(cv.get("mean_output_relative_error"), "{:.4f}"),
            fmt(cv.get("mean_relative_error"), "{:.4f}"),
        ]
        if c.get("error"):
            rows.append(base + ["ERROR: " + c["error"].splitlines()[0][:60]])
        elif enc:
            rows.append(base + [fmt(v.get("cosine_mean"), "{:.4f}"), fmt(v.get("cosine_min"), "{:.4f}")] + tail_)
        else:
            rows.append(base + [fmt(d.get("perplexity"), "{:.3f}"), fmt_big(v.get("perplexity"), "{:,.2f}"),
                                fmt_big(ev.get("ppl_ratio"), "{:,.2f}", "x"), fmt(v.get("top1_agreement"), "{:.4f}"),
                                fmt(v.get("kl"), "{:.4f}")] + tail_)  # fmt: skip
    widths = [max(len(str(r[i])) if i < len(r) else 0 for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=False)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=False)) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model directory (a Hugging Face checkpoint)")
    p.add_argument("--calibration", default="/work/data/text/calib.jsonl")
    p.add_argument("--eval-data", default="/work/data/text/eval.jsonl")
    p.add_argument("--structures", default="lowrank,monarch,blast")
    p.add_argument("--ratios", default="0.8,0.5")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--calibration-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=16384, help="eval --max-tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="BLAST --steps (default: the CLI's)")
    p.add_argument("--heal-steps", type=int, default=200, help="heal --steps (the +healed methods)")
    p.add_argument("--heal-lr", type=float, default=None, help="heal --lr (default: heal's, by structure)")
    p.add_argument("--heal-batch", type=int, default=4, help="heal --batch")
    p.add_argument("--eval-before", action="store_true", help="+healed cells: eval the checkpoint before healing too")
    p.add_argument(
        "--convert-timeout",
        type=float,
        default=1200.0,
        help="a BLAST convert running longer is stopped and rerun with --fallback-steps",
    )
    p.add_argument("--fallback-steps", type=int, default=100, help="0: no fallback")
    p.add_argument("--include", action="append", help="convert --include pattern (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="blrdeploy --threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--blrdeploy", default=str(Path(sys.executable).parent / "blrdeploy"))
    p.add_argument("--work", default="/tmp/blr_quality", help="checkpoints and logs")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--retry-errors", action="store_true", help="rerun cells recorded with an error")
    p.add_argument("--out", required=True, help="results JSON (read first to resume)")
    p.add_argument("--note", help="recorded with this run (why it was started this way)")
    p.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    a = p.parse_args(argv)
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if a.table_only:
        results.setdefault("cells", {})
        reconcile(results)
        print(table(results))
        return 0
    if not a.model:
        p.error("--model is needed")
    a.cli = [a.blrdeploy, "--threads", str(a.threads)]
    results.setdefault("cells", {})
    results.setdefault("runs", [])
    reconcile(results)
    results.update(
        model=a.model,
        data={
            "calibration": {"path": a.calibration, "sha256": sha256(Path(a.calibration))},
            "eval": {"path": a.eval_data, "sha256": sha256(Path(a.eval_data))},
        },
        model_files={f.name: sha256(f) for f in sorted(Path(a.model).glob("*.safetensors"))},
    )
    results["runs"].append({"argv": sys.argv, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "commit": commit(), "machine": machine(), "calibration_tokens": a.calibration_tokens,
                            "eval_tokens": a.eval_tokens, "seq_len": a.seq_len,
                            "lm_windows_planned": a.eval_tokens // a.seq_len, "note": a.note})  # fmt: skip
    write_atomic(out, results)
    allocation = a.allocation_flag = has_allocation(a.cli)
    structures = [s for s in a.structures.split(",") if s]
    ratios = [float(r) for r in a.ratios.split(",") if r]
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}")
    for s in structures:
        for r in ratios:
            for m in methods:
                key = cell_key(s, r, m)
                old = results["cells"].get(key)
                if old is not None and not (a.retry_errors and old.get("error")):
                    print(f"[{key}] done before, skipped", flush=True)
                    continue
                if m == "allocation" and not allocation:
                    print(f"[{key}] skipped: convert has no --allocation yet", flush=True)
                    continue
                cell = run_cell(a, s, r, m)
                cell.update(calibration_tokens=a.calibration_tokens if m != "weight-only" else None,
                            eval_tokens=a.eval_tokens, seq_len=a.seq_len)  # fmt: skip
                results["cells"][key] = cell
                write_atomic(out, results)
                ev = cell.get("eval") or {}
                print(f"[{key}] {'ERROR ' + cell['error'][:300] if cell.get('error') else 'done'}: "
                      f"ppl {ev.get('converted', {}).get('perplexity')} ratio {ev.get('ppl_ratio')} "
                      f"cos {ev.get('converted', {}).get('cosine_mean')}", flush=True)  # fmt: skip
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
