"""What verified best_of adds to a request: inside vLLM (the plugin) and as a second server.

    .venv-vllm/bin/python bench/bench_vllm_serve.py [--rounds 30] [--best-of 4] [--quick]
        [--backend fuse|copy]

One real vLLM server (CPU build, the tiny random model of scripts/make_tiny_model.py)
runs with the branchagent plugin (``VLLM_PLUGINS=branchagent``), and ``branchagent
serve`` runs in front of it. Three kinds of request ask for the same ``K`` samples
(same prompt, seed and length), interleaved round by round so that drift hits them
alike:

- ``raw``: ``n=K`` straight to vLLM (no branchagent field: vLLM's own handler);
- ``plugin``: ``best_of=K`` to the same vLLM server: K branches forked, each
  candidate written into its branch (``--apply file:candidate.txt``), verified, all
  aborted, in vLLM's process;
- ``proxy``: ``best_of=K`` to ``branchagent serve``, which asks vLLM over HTTP.

The verifier is ``true`` run in each branch (``--no-isolate``): its own run time is
what any verifier costs, so the figure "added over raw" is branch work plus the
verifier's process start. Each kind is timed at concurrency 1 and 8 (median and p95
of the request's wall time, client side). The same run gives, from the plugin's
records, the verifier's own run time per candidate (from its start to its process's
exit), so that it can be taken out: "plugin adds beyond the verifier" is, request by
request, the plugin request's wall time less its slowest verifier's run, compared with
raw vLLM. The backend is FUSE when pyfuse3 imports in this interpreter (``make vllm``
installs it), else copy.
Results: a Markdown table on stdout and bench/results/vllm_serve.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx

if __package__ in (None, ""):  # run as a script: make ``bench._util`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import machine_facts, machine_line, stats

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def add(a, b):\n"
MODEL = "tiny"
KINDS = ("raw", "plugin", "proxy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def _process(argv: Sequence[str], log: Path, health: str, env: dict[str, str],
             wait: float = 180) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + wait
        while not _healthy(health):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{argv[2]} did not come up:\n"
                                 + log.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any],
               trial_ms: list[tuple[float, float, float]]) -> int:
    t0 = time.perf_counter_ns()
    r = await client.post(url, json=body)
    elapsed = time.perf_counter_ns() - t0
    r.raise_for_status()
    doc = r.json()
    ext = doc.get("branchagent")
    if ext is not None:
        for c in ext["candidates"]:
            verify = c.get("verify") or {}
            if verify.get("returncode") != 0:
                raise SystemExit(f"a candidate was not verified: {c}")
        trial_ms.append((elapsed / 1e6, 1e3 * max(c["duration"] for c in ext["candidates"]),
                         1e3 * max(c["verify"]["duration"] for c in ext["candidates"])))
    return elapsed


async def _round(client: httpx.AsyncClient, urls: dict[str, str], body: dict[str, Any],
                 k: int, concurrency: int, samples: dict[str, list[int]],
                 trial_ms: list[tuple[float, float, float]]) -> None:
    for kind in KINDS:
        ours = {"best_of": k, "n": 1} if kind != "raw" else {"n": k}
        out: list[int] = []

        async def go(i: int, kind: str = kind, ours: dict[str, int] = ours,
                     out: list[int] = out) -> None:
            req = {**body, **ours, "seed": body["seed"] + i}
            out.append(await _one(client, urls[kind], req, trial_ms if kind == "plugin"
                                  else []))

        async with anyio.create_task_group() as tg:
            for i in range(concurrency):
                tg.start_soon(go, i)
        samples[kind].extend(out)


async def _bench(urls: dict[str, str], k: int, rounds: int, max_tokens: int
                 ) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0,
            "seed": 7}
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(2):  # warm every path
            await _round(client, urls, body, k, 1, {x: [] for x in KINDS}, [])
        for concurrency in (1, 8):
            samples: dict[str, list[int]] = {x: [] for x in KINDS}
            trial_ms: list[tuple[float, float, float]] = []
            for _ in range(rounds):
                await _round(client, urls, body, k, concurrency, samples, trial_ms)
            # Per plugin request: its wall time less its slowest verifier's run (start to
            # exit of the verifier's process), paired request by request.
            less_verifier = [int((e - v) * 1e6) for e, _, v in trial_ms]
            results[str(concurrency)] = {
                "stats": {x: stats(samples[x]).to_json() for x in KINDS},
                "slowest_candidate_ms_median": statistics.median(t for _, t, _ in trial_ms),
                "slowest_verifier_ms_median": statistics.median(v for _, _, v in trial_ms),
                "plugin_less_verifier": stats(less_verifier).to_json(),
            }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds per concurrency level")
    p.add_argument("--best-of", type=int, default=4, help="samples per request (K)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="5 rounds: a smoke run")
    p.add_argument("--backend", choices=("fuse", "copy"), default=None,
                   help="branch backend (default: fuse when pyfuse3 imports, else copy)")
    args = p.parse_args(argv)
    backend = args.backend or ("fuse" if importlib.util.find_spec("pyfuse3") else "copy")
    rounds = 5 if args.quick else args.rounds
    with tempfile.TemporaryDirectory(prefix="bench-vllm-serve-") as tmp_name, ExitStack() as st:
        tmp = Path(tmp_name)
        model, repo = tmp / "model", tmp / "repo"
        subprocess.run([sys.executable, os.fspath(ROOT / "scripts" / "make_tiny_model.py"),
                        os.fspath(model)], check=True, capture_output=True)
        repo.mkdir()
        for i in range(20):
            (repo / f"mod{i}.py").write_text(f"X = {i}\n")
        options = (f"-w {repo} --backend {backend} --no-isolate --apply file:candidate.txt "
                   f"--best-of {args.best_of} --max-concurrent 8 --verify true")
        vport, sport = _free_port(), _free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1",
               "VLLM_PLUGINS": "branchagent", "BRANCHAGENT_VLLM": options}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        st.enter_context(_process(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
             os.fspath(model), "--host", "127.0.0.1", "--port", str(vport), "--dtype",
             "float32", "--max-model-len", "256", "--enforce-eager", "--served-model-name",
             MODEL, "--seed", "0"], tmp / "vllm.log", f"http://127.0.0.1:{vport}/health", env))
        proxy_repo = tmp / "proxy-repo"
        proxy_repo.mkdir()
        for i in range(20):
            (proxy_repo / f"mod{i}.py").write_text(f"X = {i}\n")
        st.enter_context(_process(
            [sys.executable, "-m", "branchagent.cli", "serve", "-w", os.fspath(proxy_repo),
             "--backend", backend, "--no-isolate", "--upstream", f"http://127.0.0.1:{vport}/v1",
             "--port", str(sport), "--apply", "file:candidate.txt", "--verify", "true",
             "--best-of", str(args.best_of), "--max-concurrent", "8"],
            tmp / "serve.log", f"http://127.0.0.1:{sport}/health", dict(os.environ)))
        urls = {"raw": f"http://127.0.0.1:{vport}/v1/completions",
                "plugin": f"http://127.0.0.1:{vport}/v1/completions",
                "proxy": f"http://127.0.0.1:{sport}/v1/completions"}
        results = anyio.run(_bench, urls, args.best_of, rounds, args.max_tokens)
        facts = machine_facts(tmp)
    lines = [f"Machine: {machine_line(facts)}; vLLM CPU, tiny random model, K={args.best_of} "
             f"samples of {args.max_tokens} tokens, {rounds} rounds, verifier `true`, "
             f"{backend} backend, 20-file workspace.", "",
             "| concurrency | raw vLLM p50 / p95 | plugin p50 / p95 | proxy p50 / p95 "
             "| plugin adds (p50) | proxy adds (p50) | slowest candidate's branch+verify (p50) "
             "| slowest verifier run (p50) | plugin adds beyond the verifier (p50 / p95) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for conc, r in results.items():
        s = r["stats"]
        cell = {x: f"{s[x]['median_ms']:.1f} / {s[x]['p95_ms']:.1f} ms" for x in KINDS}
        lv = r["plugin_less_verifier"]
        beyond = (f"{lv['median_ms'] - s['raw']['median_ms']:+.1f} / "
                  f"{lv['p95_ms'] - s['raw']['p95_ms']:+.1f} ms")
        lines.append(
            f"| {conc} | {cell['raw']} | {cell['plugin']} | {cell['proxy']} "
            f"| {s['plugin']['median_ms'] - s['raw']['median_ms']:+.1f} ms "
            f"| {s['proxy']['median_ms'] - s['raw']['median_ms']:+.1f} ms "
            f"| {r['slowest_candidate_ms_median']:.1f} ms "
            f"| {r['slowest_verifier_ms_median']:.1f} ms "
            f"| {beyond} |")
    print("\n".join(lines))
    out = ROOT / "bench" / "results" / "vllm_serve.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"facts": facts, "backend": backend, "best_of": args.best_of,
                               "rounds": rounds,
                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
