"""Fuzz the command line: hostile configs, options, tokenizers, data files and resume states.

tests/fuzz_reader.py covers the checkpoint reader; this covers everything else a user
hands modelgrow. Each case copies a small valid input, mutates one thing, runs the real
command in this process (click's test runner, so a case costs no interpreter start) and
classifies how it ended:

- **ok**: exit 0 (the mutation was harmless);
- **refused**: exit 2, 3 or 5 with one line on stderr starting ``error:`` (exit 2 may also
  be click's own usage block);
- **failure**: anything else: exit 1 ("internal error"), an exception that escaped, a
  traceback in the output, a refusal that spans lines, exit 4 (verification failed: the
  command accepted an input and then broke its own promise), or a case slower than the
  deadline.

A hang is caught by SIGALRM at the deadline and counted as a failure. Work-size options
(``--steps`` and the like) are never given huge values, and a convert whose growth options
are fuzzed runs as ``--dry-run`` (every check and the pre-flight estimate, no growth): a
legitimately long run is not a hang.

    python tests/fuzz_cli.py --cases 1000 --seed 0 [--family data] [--json]
    python tests/fuzz_cli.py --seed 0 --case 17 -v        # replay one case
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402 - tests/ helpers

from modelgrow import cli  # noqa: E402

DEFAULT_DEADLINE_S = 30.0
TRAIN = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--eval-every", "0"]
WORK_OPTIONS = {"steps", "fit_steps", "relora_every", "save_every", "eval_every", "full_rank_steps", "eval_batches",
                "batch_size", "seq_len", "fit_batch_size", "fit_seq_len", "warmup", "restart_warmup"}
GROWTH_OPTIONS = {"width", "depth", "ffn", "heads", "kv_heads", "experts", "top_k", "layers", "insert"}
DEMO = Path(cli.__file__).parent / "data" / "demo"

HOSTILE_VALUES = [float("nan"), float("inf"), -float("inf"), -1, 0, 1, 2, 3, 7, 0.5, -0.5, 1.5, 1e6, 1e308, 10**30,
                  -10**12, "", "x", "\ud800", "gelu_fake", None, True, False, [], {}, [1, 2], {"a": 1}, "NaN",
                  2**31, 2**63, 1e-30, -1e-6]
OPTION_VALUES = ["0", "-1", "1", "2", "3", "1e9", "nan", "inf", "-inf", "", "abc", "1.5", "0.0", "2x", "0x", "-2x",
                 "1.0001x", "100000x", "x" * 5000, "/dev/null", "/", "/proc/self/environ", "-", "..", "auto",
                 "cuda", "fp16", "bf16", "float8", "every:0", "every:-1", "end", "0,0", "1,1,1", "9999", "3+",
                 "0-1", "1-0", "new", "all", "*", "[", "9" * 40]


@dataclass
class Base:
    """The valid inputs every case starts from (built once)."""
    root: Path
    gpt2: Path
    llama: Path
    bert: Path
    text: Path
    ids: Path
    step: Path  # a step folder written by train --save-every


@dataclass
class Case:
    family: str
    what: str
    args: list[str]
    expect_output: Path | None = None


@dataclass
class Summary:
    cases: int = 0
    ok: int = 0
    refused: int = 0
    failures: int = 0
    families: Counter = field(default_factory=Counter)
    exit_codes: Counter = field(default_factory=Counter)
    slowest_s: float = 0.0
    slowest_what: str = ""
    failure_cases: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"cases": self.cases, "ok": self.ok, "refused": self.refused, "failures": self.failures,
                "families": dict(self.families), "exit_codes": {str(k): v for k, v in sorted(self.exit_codes.items(), key=str)},
                "slowest_s": round(self.slowest_s, 2), "slowest_what": self.slowest_what,
                "failure_cases": self.failure_cases[:50]}


def build_base(root: Path) -> Base:
    root.mkdir(parents=True, exist_ok=True)
    text = root / "text.txt"
    text.write_text(tiny.stdlib_corpus(root).read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    ids = root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 96, 2000).astype(np.int32))
    demo = root / "demo"
    shutil.copytree(DEMO, demo, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    trained = root / "trained"
    result = _invoke(["train", str(demo), "-o", str(trained), "--data", str(text), *TRAIN[:1], "3",
                      *TRAIN[2:], "--save-every", "1"])
    if result[0] != 0:
        raise RuntimeError(f"could not build the resume seed: {result}")
    return Base(root, tiny.gpt2(root / "gpt2", embd=32, layers=2), tiny.llama(root / "llama"),
                tiny.bert(root / "bert"), text, ids, root / "trained-checkpoints" / "step-1")


# -- families --------------------------------------------------------------------------------


def _walk_keys(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _walk_keys(v, (*prefix, k))


def _set(obj: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _delete(obj: dict, path: tuple) -> None:
    for k in path[:-1]:
        obj = obj[k]
    del obj[path[-1]]


def _mutate_json(rng: random.Random, obj: dict) -> str:
    keys = list(_walk_keys(obj))
    roll = rng.random()
    if roll < 0.1 or not keys:
        key = f"extra_{rng.randint(0, 9)}"
        obj[key] = rng.choice(HOSTILE_VALUES)
        return f"added {key}"
    path = rng.choice(keys)
    if roll < 0.2:
        _delete(obj, path)
        return f"deleted {'.'.join(map(str, path))}"
    value = rng.choice(HOSTILE_VALUES)
    _set(obj, path, value)
    return f"{'.'.join(map(str, path))} = {value!r:.40}"


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, allow_nan=True), encoding="utf-8")


def fam_config(rng: random.Random, base: Base, work: Path) -> Case:
    src = work / "src"
    shutil.copytree(rng.choice([base.gpt2, base.llama, base.bert]), src)
    config = json.loads((src / "config.json").read_text())
    what = _mutate_json(rng, config)
    _write_json(src / "config.json", config)
    grow = rng.choice([["--width", "2x"], ["--width", "2x", "--depth", "2x"], ["--width", "1.5x"], ["--depth", "2x"]])
    return Case("config", what, ["convert", str(src), "-o", str(work / "out"), *grow], work / "out")


def _command_options(name: str) -> list:
    command = cli.main.commands[name]
    return [p for p in command.get_params(cli.click.Context(command)) if isinstance(p, cli.click.Option)
            and p.name not in ("help",)]


def fam_options(rng: random.Random, base: Base, work: Path) -> Case:
    command = rng.choice(["convert", "convert", "verify", "train", "inspect"])
    out = work / "out"
    args = {"convert": ["convert", str(base.gpt2), "-o", str(out), "--width", "2x"],
            "verify": ["verify", str(base.gpt2), str(base.gpt2)],
            "train": ["train", str(base.gpt2), "-o", str(out), "--data", str(base.ids), *TRAIN],
            "inspect": ["inspect", str(base.gpt2)]}[command]
    picked = []
    for _ in range(rng.randint(1, 2)):
        opt = rng.choice(_command_options(command))
        flag = max(opt.opts, key=len)
        if opt.is_flag:
            args.append(flag)
            picked.append(flag)
            continue
        value = rng.choice(OPTION_VALUES)
        if command == "convert" and opt.name in GROWTH_OPTIONS and "--dry-run" not in args:
            args.append("--dry-run")  # checks and pre-flight as the real run; a legitimately huge growth is not a hang
        if opt.name in WORK_OPTIONS and value.replace(".", "").replace("e", "").isdigit() and float(value) > 1000:
            value = "3"  # a long run is not a hang
        args += [flag, value]
        picked.append(f"{flag} {value[:30]!r}")
    return Case("options", f"{command} {' '.join(picked)}", args, out if command in ("convert", "train") else None)


def _tokenizer_mutation(rng: random.Random, tok: dict) -> str:
    roll = rng.random()
    if roll < 0.15:
        tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": rng.choice(["(a+)+$", "(\\w+\\s?)*$", "(.*)*x", "["])},
                                "behavior": "Isolated", "invert": False}
        return f"pre_tokenizer Split {tok['pre_tokenizer']['pattern']['Regex']}"
    if roll < 0.3 and isinstance(tok.get("model", {}).get("vocab"), dict):
        vocab = tok["model"]["vocab"]
        key = rng.choice(list(vocab))
        vocab[key] = rng.choice([-1, 256, 10**6, 2**40, "x", None])
        return f"vocab[{key!r}] = {vocab[key]!r}"
    if roll < 0.4:
        tok["model"]["type"] = rng.choice(["WordPiece", "Unigram", "WordLevel", "Nope", 3])
        return f"model.type = {tok['model']['type']!r}"
    return _mutate_json(rng, tok)


def fam_tokenizer(rng: random.Random, base: Base, work: Path) -> Case:
    path = work / "tokenizer.json"
    raw = (DEMO / "tokenizer.json").read_text(encoding="utf-8")
    roll = rng.random()
    if roll < 0.15:
        cut = rng.randint(0, len(raw))
        path.write_text(raw[:cut], encoding="utf-8")
        what = f"truncated at {cut}"
    elif roll < 0.25:
        data = bytearray(raw.encode())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        what = "bytes flipped"
    else:
        tok = json.loads(raw)
        what = _tokenizer_mutation(rng, tok)
        _write_json(path, tok)
    out = work / "out"
    return Case("tokenizer", what, ["train", str(base.root / "demo"), "-o", str(out), "--data", str(base.text),
                                    "--tokenizer", str(path), *TRAIN], out)


def _data_file(rng: random.Random, base: Base, work: Path) -> tuple[Path, str]:
    kind = rng.choice(["txt", "npy", "npy", "bin", "jsonl", "special"])
    if kind == "txt":
        choice = rng.choice(["binary", "latin1", "empty", "spaces", "short", "nul", "long-line"])
        data = {"binary": bytes(rng.randrange(256) for _ in range(3000)), "latin1": "é".encode("latin-1") * 500,
                "empty": b"", "spaces": b" \n\t" * 100, "short": b"hi", "nul": b"\0" * 4000,
                "long-line": b"ab" * 40_000}[choice]
        path = work / "data.txt"
        path.write_bytes(data)
        return path, f"text {choice}"
    if kind == "npy":
        choice = rng.choice(["float", "int64-big", "negative", "2d", "object", "npz", "truncated", "bool", "empty", "u8"])
        path = work / "data.npy"
        ids = np.random.default_rng(rng.randrange(99)).integers(0, 96, 500)
        arrays = {"float": ids.astype(np.float32), "int64-big": ids + 2**40, "negative": ids - 200,
                  "2d": ids.reshape(20, 25), "bool": ids > 3, "empty": ids[:0], "u8": ids.astype(np.uint8)}
        if choice in arrays:
            np.save(path, arrays[choice])
        elif choice == "object":
            np.save(path, np.array([{"a": 1}, 2], dtype=object), allow_pickle=True)
        elif choice == "npz":
            with open(path, "wb") as f:
                np.savez(f, ids=ids)
        else:
            np.save(path, ids)
            path.write_bytes(path.read_bytes()[: rng.randint(0, 300)])
        return path, f"npy {choice}"
    if kind == "bin":
        path = work / "data.bin"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 3, 999, 4001]))))
        return path, f"bin {path.stat().st_size} bytes"
    if kind == "jsonl":
        path = work / "data.jsonl"
        lines = [json.dumps({"text": "hello world " * 20})] * 30
        lines[rng.randrange(30)] = rng.choice(["{", "[]", '{"content": "x"}', '{"text": 3}', '{"text": null}', "",
                                               '{"text": "\\ud800"}', "1e999"])
        path.write_text("\n".join(lines), encoding="utf-8")
        return path, f"jsonl {lines}"[:60]
    choice = rng.choice(["fifo", "dir", "devzero", "missing", "link-out"])
    path = work / "data.txt"
    if choice == "fifo":
        os.mkfifo(path)
    elif choice == "dir":
        path.mkdir()
    elif choice == "devzero":
        path.symlink_to("/dev/zero")
    elif choice == "link-out":
        path.symlink_to(base.text)
    return path, f"special {choice}"


def fam_data(rng: random.Random, base: Base, work: Path) -> Case:
    path, what = _data_file(rng, base, work)
    out = work / "out"
    return Case("data", what, ["train", str(base.root / "demo"), "-o", str(out), "--data", str(path), *TRAIN], out)


def fam_resume(rng: random.Random, base: Base, work: Path) -> Case:
    step = work / "step-1"
    shutil.copytree(base.step, step)
    state_dir = step / "training_state"
    if rng.random() < 0.6:
        state = json.loads((state_dir / "state.json").read_text())
        what = _mutate_json(rng, state)
        _write_json(state_dir / "state.json", state)
    else:
        tensors = state_dir / "state.safetensors"
        data = bytearray(tensors.read_bytes())
        if rng.random() < 0.5:
            data = data[: rng.randint(0, len(data))]
            what = f"state tensors truncated to {len(data)}"
        else:
            for _ in range(rng.randint(1, 16)):
                data[rng.randrange(min(len(data), 2000))] = rng.randrange(256)
            what = "state tensors header bytes flipped"
        tensors.write_bytes(bytes(data))
    out = work / "out"
    return Case("resume", what, ["train", str(base.root / "demo"), "-o", str(out), "--data", str(base.text),
                                 *TRAIN[:1], "3", *TRAIN[2:], "--resume", str(step)], out)


FAMILIES = {"config": fam_config, "options": fam_options, "tokenizer": fam_tokenizer, "data": fam_data,
            "resume": fam_resume}


# -- running ---------------------------------------------------------------------------------


class Hang(BaseException):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise Hang


def _invoke(args: list[str], deadline_s: float = DEFAULT_DEADLINE_S) -> tuple[int | None, str, str, BaseException | None]:
    runner = CliRunner()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, deadline_s)
    try:
        result = runner.invoke(cli.main, args, catch_exceptions=True)
    except Hang as exc:
        return None, "", "", exc
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - what escapes the CLI (a Rust panic is a BaseException)
        return None, "", "", exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exc


def classify(code: int | None, stderr: str, exc: BaseException | None, elapsed: float, deadline_s: float) -> str | None:
    """None when the case ended as it should; otherwise why it is a failure."""
    if isinstance(exc, Hang) or (elapsed > deadline_s and exc is None):
        return f"slower than {deadline_s:.0f} s"
    if exc is not None:
        return f"exception escaped: {type(exc).__name__}: {exc}"[:300]
    if "Traceback" in stderr:
        return "a traceback in the output"
    if code == 0:
        return None
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    if code == 2 and (any(ln.startswith("Usage:") for ln in lines) or (len(lines) == 1 and lines[0].startswith("Error: "))):
        return None  # click's own usage error, with or without its usage block
    if code in (2, 3, 5) and len(lines) == 1 and lines[0].startswith("error: "):
        return None
    if code == 1:
        return f"exit 1: {' | '.join(lines)[:300]}"
    if code == 4:
        return f"exit 4 (verification failed on an accepted input): {' | '.join(lines)[:300]}"
    return f"exit {code} with {len(lines)} lines: {' | '.join(lines)[:300]}"


def plan_case(seed: int, case: int, families: list[str]) -> tuple[random.Random, str]:
    rng = random.Random(f"{seed}:{case}")
    return rng, families[case % len(families)]


def run(cases: int, seed: int = 0, *, families: list[str] | None = None, only: int | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S, verbose: bool = False, root: Path | None = None) -> Summary:
    families = families or list(FAMILIES)
    summary, here = Summary(), os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fuzz-cli-", dir=root) as tmp:
        base = build_base(Path(tmp) / "base")
        for n in ([only] if only is not None else range(cases)):
            rng, family = plan_case(seed, n, families)
            work = Path(tmp) / f"case-{n}"
            work.mkdir()
            case = FAMILIES[family](rng, base, work)
            t0 = time.perf_counter()
            os.chdir(work)  # relative paths among the option values land in the case's folder
            try:
                code, _, stderr, exc = _invoke(case.args, deadline_s)
            finally:
                os.chdir(here)
            elapsed = time.perf_counter() - t0
            why = classify(code, stderr, exc, elapsed, deadline_s)
            if why is None and code != 0 and case.expect_output is not None and case.expect_output.exists():
                why = f"refused (exit {code}) but left {case.expect_output}"
            summary.cases += 1
            summary.families[family] += 1
            summary.exit_codes[code] += 1
            if elapsed > summary.slowest_s:
                summary.slowest_s, summary.slowest_what = elapsed, f"#{n} {family}: {case.what}"
            if why is None:
                summary.ok += code == 0
                summary.refused += code != 0
            else:
                summary.failures += 1
                summary.failure_cases.append({"case": n, "family": family, "what": case.what, "why": why})
            if verbose:
                print(f"#{n} {family} [{case.what}] exit {code} {elapsed:.2f}s {why or 'fine'}\n  {stderr.strip()[:400]}",
                      flush=True)
            shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tests/fuzz_cli.py", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, default=None, help="replay one case")
    ap.add_argument("--family", action="append", choices=list(FAMILIES))
    ap.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    s = run(a.cases, a.seed, families=a.family, only=a.case, deadline_s=a.deadline_s, verbose=a.verbose or a.case is not None)
    out = {**s.as_dict(), "wall_s": round(time.perf_counter() - t0, 1)}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{s.cases} cases: {s.ok} ok, {s.refused} refused, {s.failures} failures; families {dict(s.families)}; "
              f"slowest {s.slowest_s:.1f} s ({s.slowest_what})")
        for f in s.failure_cases[:20]:
            print(f"  #{f['case']} {f['family']} [{f['what']}]: {f['why']}")
    return 1 if s.failures else 0


if __name__ == "__main__":
    sys.exit(main())
